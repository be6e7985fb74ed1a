//! `Debug` forms of what carries private keys and tokens: the data of a Secret (an intermediate CA's key in
//! `cacerts`, a reader token in a remote secret) shows its keys and sizes, never a value. The plan's types that hold
//! Secret data ([`crate::member::Desired`], [`crate::member::MemberFacts`], [`crate::trust::CacertsPlan`],
//! [`crate::trust::Observed`]) format through these, so that `{:?}` of a plan is safe to log.

use std::{collections::BTreeMap, fmt};

use k8s_openapi::{ByteString, api::core::v1::Secret};
use serde_json::Value;

/// A value in place of a secret one: its size only.
struct Redacted(usize);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<redacted, {} bytes>", self.0)
    }
}

/// The `data` of a Secret: its keys, each with the size of its value.
pub struct SecretData<'a>(pub &'a BTreeMap<String, ByteString>);

impl fmt::Debug for SecretData<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.0.iter().map(|(k, v)| (k, Redacted(v.0.len())))).finish()
    }
}

/// A Secret: its metadata and type, and of its `data` and `stringData` only the keys and sizes.
pub struct SecretObject<'a>(pub &'a Secret);

impl fmt::Debug for SecretObject<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        let string_data = s
            .string_data
            .as_ref()
            .map(|d| d.iter().map(|(k, v)| (k.clone(), ByteString(vec![0; v.len()]))).collect::<BTreeMap<_, _>>());
        f.debug_struct("Secret")
            .field("metadata", &s.metadata)
            .field("type_", &s.type_)
            .field("immutable", &s.immutable)
            .field("data", &s.data.as_ref().map(SecretData))
            .field("string_data", &string_data.as_ref().map(SecretData))
            .finish()
    }
}

/// An object's JSON body as `Debug` shows it: a Secret's `data` and `stringData` values replaced by their sizes.
pub fn body(body: &Value) -> Value {
    let mut shown = body.clone();
    if body["kind"] == "Secret" {
        for field in ["data", "stringData"] {
            if let Some(data) = shown.get_mut(field).and_then(Value::as_object_mut) {
                for v in data.values_mut() {
                    *v = format!("{:?}", Redacted(v.as_str().map_or(0, str::len))).into();
                }
            }
        }
    }
    shown
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use base64::Engine as _;
    use jiff::Timestamp;
    use meshfed_api::{KeyAlgorithm, MeshFederationSpec};

    use crate::{
        federation::FederationRef,
        kinds,
        member::{self, MemberFacts},
        pki::{self, IntermediateProfile},
        remote::{self, ReaderToken, RemoteTarget},
        trust::{self, CacertsPlan, Observed},
    };

    const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6aXN0aW8tc3lzdGVtOnJlYWRlciJ9.c2lnbmF0dXJlLW9mLXRoZS10b2tlbg";

    /// Every form in which `secret` could show in a `Debug` output with its whitespace removed: a piece of it as
    /// text, as base64 at each of the three alignments it can take in a longer encoded value, and as the list of
    /// byte values that `ByteString`'s own `Debug` prints.
    fn forms(secret: &str) -> Vec<String> {
        let text: String = secret.lines().nth(1).unwrap_or(secret).chars().skip(4).take(24).collect();
        let bytes = secret.as_bytes();
        let mut out = vec![text];
        for shift in 0..3 {
            out.push(base64::engine::general_purpose::STANDARD.encode(&bytes[shift..])[4..28].to_string());
        }
        out.push(bytes[40..56].iter().map(|b| b.to_string()).collect::<Vec<_>>().join(","));
        out
    }

    /// Whether `{:?}` or `{:#?}` of `value` shows one of `secrets`, in one of its [`forms`].
    fn shows(value: &impl std::fmt::Debug, secrets: &[&str]) -> Option<String> {
        for shown in [format!("{value:?}"), format!("{value:#?}")] {
            let flat: String = shown.chars().filter(|c| !c.is_whitespace()).collect();
            if secrets.iter().flat_map(|s| forms(s)).any(|form| flat.contains(&form)) {
                return Some(shown);
            }
        }
        None
    }

    #[test]
    fn no_plan_shows_an_intermediate_key_or_a_token_in_its_debug_output() {
        let now: Timestamp = "2026-11-24T00:00:00Z".parse().unwrap();
        let spec: MeshFederationSpec = serde_saphyr::from_str(
            "meshID: m\ntrust: {root: {generate: {}}}\nclusters:\n- {name: east, network: n1, kubeconfigSecretRef: {name: east}}\n- {name: west, network: n2, kubeconfigSecretRef: {name: west}}\n",
        )
        .unwrap();
        let fref = FederationRef { namespace: "mesh-system".into(), name: "prod".into() };
        let east = &spec.clusters[0];
        let day = Duration::from_secs(24 * 3600);
        let root = pki::generate_root(KeyAlgorithm::ECDSAP256, 1000 * day, now).unwrap();
        let root = pki::load_root_secret(&root.secret_data(), now).unwrap();
        let profile = IntermediateProfile {
            cluster: "east",
            istio_namespace: "istio-system",
            algorithm: KeyAlgorithm::ECDSAP256,
        };
        let bundle = pki::issue_intermediate(&root, &profile, 100 * day, now).unwrap();
        let key = bundle.ca_key_pem.clone();
        let data = trust::issued(bundle, "");
        let target = RemoteTarget {
            cluster: "west".into(),
            server: "https://west.example:6443".into(),
            ca_data_base64: None,
            tls_server_name: None,
        };
        let remote_secret = remote::remote_secret(&fref, &spec, east, &target, &ReaderToken::new(TOKEN));
        // The fixture holds both, so that a test that finds neither proves something.
        assert!(shows(&data, &[&key]).is_some() && shows(&remote_secret, &[TOKEN]).is_some());

        // Every type that shows a key or token, with what it shows.
        let mut leaks = Vec::new();
        let mut assert_redacted = |what: &str, value: &dyn std::fmt::Debug, secrets: &[&str]| {
            if let Some(shown) = shows(&value, secrets) {
                leaks.push(format!("{what}: {shown}"));
            }
        };
        let facts = || MemberFacts {
            cacerts: Some(data.clone()),
            remote_secrets: [("west".to_string(), remote_secret.clone())].into(),
            ..Default::default()
        };
        assert_redacted("MemberFacts", &facts(), &[&key, TOKEN]);
        let plan = member::member_plan(&fref, "hub", &spec, east, facts());
        let secrets: Vec<_> = plan.objects.iter().filter(|d| d.key.kind == kinds::SECRET).collect();
        assert_eq!(secrets.len(), 2, "the plan holds cacerts and the remote secret: {:?}", plan.keep);
        assert_redacted("MemberPlan", &plan, &[&key, TOKEN]);
        assert_redacted("Desired", &secrets, &[&key, TOKEN]);
        assert!(format!("{:?}", plan.objects).contains("ca-key.pem"), "the keys are shown, not their values");

        let hold = CacertsPlan::Hold {
            data: data.clone(),
            summary: pki::summarize(&data[pki::CA_CERT].0).unwrap(),
            why: None,
        };
        assert_redacted("CacertsPlan", &hold, &[&key]);
        let issue = CacertsPlan::Issue { why: "missing".into(), other_roots: String::new(), signer: &root };
        assert_redacted("CacertsPlan", &issue, &[&key]);
        let observed = Observed { cacerts: Some(&data), published: None };
        assert_redacted("Observed", &observed, &[&key]);
        let durations = crate::validate::validate(&spec).unwrap().durations;
        let observed = [("east".to_string(), observed), ("west".to_string(), Observed::default())].into();
        let planned = trust::plan_trust(&spec, &root, &[], &durations, None, &observed, now);
        assert!(matches!(planned.cacerts["east"], Ok(CacertsPlan::Hold { .. })), "east keeps its cacerts");
        assert_redacted("TrustPlan", &planned, &[&key]);
        let names: Vec<_> = leaks.iter().map(|l| l.split(':').next().unwrap_or_default()).collect();
        assert!(leaks.is_empty(), "{names:?} show a key or token:\n{}", leaks.join("\n"));
    }
}
