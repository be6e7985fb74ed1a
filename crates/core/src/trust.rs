//! Trust, the federation-wide decisions: where a root rotation stands, what each member's `cacerts` should become,
//! and the hub Secret of a generated root. Issuing an intermediate (key generation) is the one step left to the
//! caller, which [`CacertsPlan::Issue`] asks for; [`issued`] then gives the data to write.

use std::{collections::BTreeMap, fmt};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::{ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use meshfed_api::{MeshFederationSpec, TrustStatus};

use crate::{
    conditions::Reason,
    federation::{FIELD_MANAGER, Failure, FederationRef, LABEL_FEDERATION, MANAGED_BY},
    pki::{self, CaMaterial, CacertsBundle, CacertsVerdict, CertSummary, IntermediateProfile, Root},
    redact,
    rotation::{self, Action, MemberRoots},
    validate::Durations,
};

/// Set on a federation with a generated root to ask for a new root: each new value starts one rotation.
pub const ROTATE_ROOT_ANNOTATION: &str = "meshfed.io/rotate-root";

/// The hub Secret that holds a generated root: `<federation>-root-ca` in the federation's namespace. For a name
/// too long for that (over 245 characters), the federation's name is cut and followed by 16 hex digits of its
/// SHA-256, so that the Secret's name stays within 253 characters.
pub fn root_secret_name(federation: &str) -> String {
    const SUFFIX: &str = "-root-ca";
    const MAX_NAME: usize = 253;
    if federation.len() + SUFFIX.len() <= MAX_NAME {
        return format!("{federation}{SUFFIX}");
    }
    let short = crate::federation::label_value(federation);
    let hash = &short[short.len() - 16..];
    let mut keep = MAX_NAME - SUFFIX.len() - hash.len() - 1;
    while !federation.is_char_boundary(keep) {
        keep -= 1;
    }
    format!("{}-{hash}{SUFFIX}", federation[..keep].trim_end_matches(['.', '-']))
}

/// The keys under which a generated root's Secret keeps the root it replaced, for the rotation away from it: the
/// members' intermediates from it are renewed (and a member that joins is signed) by it while a peer may not
/// trust the new root yet.
pub const PREVIOUS_ROOT_CERT: &str = "previous-tls.crt";
pub const PREVIOUS_ROOT_KEY: &str = "previous-tls.key";

/// The data of a generated root's Secret that replaces `old` (its current data) with `new`, keeping the old root
/// under [`PREVIOUS_ROOT_CERT`] and [`PREVIOUS_ROOT_KEY`].
pub fn replaced_root_data(old: &BTreeMap<String, ByteString>, new: &CaMaterial) -> BTreeMap<String, ByteString> {
    let mut data = new.secret_data();
    for (from, to) in [(pki::TLS_CERT, PREVIOUS_ROOT_CERT), (pki::TLS_KEY, PREVIOUS_ROOT_KEY)] {
        if let Some(v) = old.get(from) {
            data.insert(to.into(), v.clone());
        }
    }
    data
}

/// The root a generated root's Secret kept when it was replaced (see [`replaced_root_data`]), as the data of a
/// root Secret.
pub fn previous_root_data(data: &BTreeMap<String, ByteString>) -> BTreeMap<String, ByteString> {
    [(PREVIOUS_ROOT_CERT, pki::TLS_CERT), (PREVIOUS_ROOT_KEY, pki::TLS_KEY)]
        .into_iter()
        .filter_map(|(from, to)| Some((to.to_string(), data.get(from)?.clone())))
        .collect()
}

/// The hub Secret of a generated root (type `kubernetes.io/tls`), annotated with the rotation request it answers.
pub fn root_secret(fref: &FederationRef, material: &CaMaterial, request: Option<String>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(root_secret_name(&fref.name)),
            namespace: Some(fref.namespace.clone()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY.into(), FIELD_MANAGER.into()),
                (LABEL_FEDERATION.into(), fref.name_label()),
            ])),
            annotations: request.map(|r| BTreeMap::from([(ROTATE_ROOT_ANNOTATION.into(), r)])),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(material.secret_data()),
        ..Default::default()
    }
}

/// What one member's `cacerts` should become. Its `Debug` shows the keys of `data`, never their values.
#[derive(Clone)]
pub enum CacertsPlan<'r> {
    /// Hold this data (kept as it is, or with only its trusted roots changed); its intermediate is `summary`.
    Hold { data: BTreeMap<String, ByteString>, summary: CertSummary, why: Option<String> },
    /// Issue a new intermediate from `signer` (the federation's root, or during a rotation the root it rotates
    /// from), whose `root-cert.pem` trusts `other_roots` (PEM) besides the signer.
    Issue { why: String, other_roots: String, signer: &'r Root },
}

impl fmt::Debug for CacertsPlan<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Hold { data, summary, why } => f
                .debug_struct("Hold")
                .field("data", &redact::SecretData(data))
                .field("summary", summary)
                .field("why", why)
                .finish(),
            Self::Issue { why, other_roots, signer } => f
                .debug_struct("Issue")
                .field("why", why)
                .field("other_roots", other_roots)
                .field("signer", signer)
                .finish(),
        }
    }
}

/// The trust plan of a federation: per member of the spec that answered, its `cacerts` plan (or why it has none),
/// the trust status, and when to look again because a rotation waits for time to pass.
#[derive(Debug, Clone)]
pub struct TrustPlan<'r> {
    pub cacerts: BTreeMap<String, Result<CacertsPlan<'r>, Failure>>,
    pub status: TrustStatus,
    pub wake_at: Option<Timestamp>,
}

/// What a member shows of its trust: its `cacerts` data (`None`: it has none), and the roots its control plane
/// publishes to workloads (istiod's `istio-ca-root-cert`; `None`: no control plane publishes any there). Its
/// `Debug` shows the keys of `cacerts`, never their values.
#[derive(Clone, Copy, Default)]
pub struct Observed<'a> {
    pub cacerts: Option<&'a BTreeMap<String, ByteString>>,
    pub published: Option<&'a str>,
}

impl fmt::Debug for Observed<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Observed")
            .field("cacerts", &self.cacerts.map(redact::SecretData))
            .field("published", &self.published)
            .finish()
    }
}

/// How long after the last member got its intermediate from a new root the old root stays trusted, beyond the
/// longest workload certificate lifetime: for clocks that disagree and certificates signed just before the switch.
pub const WORKLOAD_MARGIN: std::time::Duration = std::time::Duration::from_secs(300);

/// Plans every member's `cacerts` against `root`. `observed` has what every member of the spec that answered shows.
/// When the status says members were last brought to another root, this is the next step of a rotation (signing
/// with `previous_root`, the root it rotates from, where a peer may not trust the new one yet, when the hub still
/// holds it); otherwise renewals and repairs as [`pki::inspect_cacerts`] decides.
pub fn plan_trust<'r>(
    spec: &MeshFederationSpec,
    root: &'r Root,
    previous_root: Option<&'r Root>,
    durations: &Durations,
    previous: Option<&TrustStatus>,
    observed: &BTreeMap<String, Observed<'_>>,
    now: Timestamp,
) -> TrustPlan<'r> {
    let new = root.summary();
    let from = previous.and_then(|t| t.root_fingerprint.clone()).filter(|f| *f != new.fingerprint);
    let states: Vec<Option<MemberRoots>> = spec
        .clusters
        .iter()
        .map(|c| observed.get(&c.name).map(|o| MemberRoots::of(o.cacerts, o.published, root.cert_pem())))
        .collect();
    let all_known = states.iter().all(Option::is_some);
    // A rotation runs while the members were last brought to another root and have not all moved on.
    let reissued_at = previous.and_then(|t| t.intermediates_reissued_at.as_ref()?.parse().ok());
    let wait = durations.workload_certificate_ttl + WORKLOAD_MARGIN;
    let mut progress = from.as_ref().map(|_| rotation::progress(&states, reissued_at, wait, now));
    // What the members are shown to have done decides each one's step; the report may hold a phase reached before.
    let step_phase = progress.and_then(|p| p.phase);
    // A member that does not answer holds the rotation where it is; the report does not fall back a phase for it
    // (nor forget when the members were reissued): only what is done is held, not what was reached.
    if let (Some(p), false) = (progress.as_mut(), all_known) {
        let reported = previous.and_then(|t| rotation::Phase::named_in(t.rotation_phase.as_deref()?));
        p.phase = p.phase.max(reported);
        p.reissued_at = p.reissued_at.or(reissued_at);
    }
    let phase = progress.and_then(|p| p.phase);
    // A member that holds nothing usable trusts every root its peers trust, so that it reaches them all. Its
    // intermediate is signed by the new root once every peer trusts and publishes it (those that do not answer did
    // when the rotation went past its first phase); before that by the root the rotation comes from, which every
    // peer trusts until the rotation's end.
    let peers_roots: Vec<u8> =
        observed.values().filter_map(|o| o.cacerts?.get(pki::ROOT_CERT)).flat_map(|b| b.0.clone()).collect();
    let peers_on_new = (all_known || phase > Some(rotation::Phase::DistributingRoot))
        && states.iter().flatten().filter(|m| m.trusts_new || m.trusts_others).all(|m| m.trusts_new && m.published_new);
    let signers = Signers {
        root,
        previous: previous_root,
        fresh: previous_root.filter(|_| !peers_on_new).unwrap_or(root),
        peers_roots: &peers_roots,
    };
    let mut cacerts = BTreeMap::new();
    for (cluster, state) in spec.clusters.iter().zip(&states) {
        let Some(o) = observed.get(&cluster.name) else { continue };
        let profile = IntermediateProfile {
            cluster: &cluster.name,
            istio_namespace: &spec.istio.namespace,
            algorithm: spec.trust.intermediate.algorithm,
        };
        let step = step_phase.zip(*state).map(|(p, s)| rotation::action(p, s, all_known));
        cacerts.insert(cluster.name.clone(), member_cacerts(o.cacerts, &signers, &profile, durations, now, step));
    }
    let status = match (phase, previous) {
        (Some(p), Some(prev)) => {
            let held = if all_known { String::new() } else { "; held until every member answers".into() };
            let waits = match (p, progress.and_then(|p| p.wake_at)) {
                (rotation::Phase::DistributingRoot, _) => {
                    "; waiting for every member's control plane to publish the new root (istio-ca-root-cert)".into()
                }
                (_, Some(until)) => format!(
                    "; the old root stays trusted until {until}, when the workload certificates issued under it have expired"
                ),
                _ => String::new(),
            };
            TrustStatus {
                rotation_phase: Some(format!(
                    "{p}: rotating from root {} to {}{held}{waits}",
                    from.unwrap_or_default(),
                    new.fingerprint
                )),
                intermediates_reissued_at: progress.and_then(|p| p.reissued_at).map(|t| t.to_string()),
                ..prev.clone()
            }
        }
        _ => TrustStatus {
            root_fingerprint: Some(new.fingerprint.clone()),
            root_not_after: Some(new.not_after_rfc3339()),
            rotation_phase: None,
            intermediates_reissued_at: None,
            root_source: Some(root_source(spec)),
        },
    };
    TrustPlan { cacerts, status, wake_at: progress.and_then(|p| p.wake_at) }
}

/// Where the spec takes its root from, as `status.trust.rootSource` says it.
pub fn root_source(spec: &MeshFederationSpec) -> String {
    match &spec.trust.root.secret_ref {
        Some(byo) => format!("secretRef/{}", byo.name),
        None => "generate".into(),
    }
}

/// Whether the root in use (as `previous` says) was brought by the user: then a missing generated root is one to
/// make, and the members move to it by a rotation; it is not a generated root that went missing.
pub fn root_was_brought(previous: Option<&TrustStatus>) -> bool {
    previous.and_then(|t| t.root_source.as_deref()).is_some_and(|s| s.starts_with("secretRef/"))
}

/// The certificates of `bundles` (PEM), once each, except `signer`: what a `root-cert.pem` holds besides the root
/// that signs its intermediate.
fn roots_besides(bundles: &[&[u8]], signer: &Root) -> String {
    let mut seen = vec![signer.summary().fingerprint.clone()];
    let mut out = String::new();
    for (fp, pem) in bundles.iter().flat_map(|b| pki::certificates(b)) {
        if !seen.contains(&fp) {
            seen.push(fp);
            out.push_str(&pem);
        }
    }
    out
}

/// The roots a plan signs with: the federation's root; during a rotation the root it comes from, when the hub
/// still holds it; the one that signs a member holding nothing usable (`fresh`), which trusts `peers_roots` too.
struct Signers<'r, 'p> {
    root: &'r Root,
    previous: Option<&'r Root>,
    fresh: &'r Root,
    peers_roots: &'p [u8],
}

/// One member's `cacerts`: outside a rotation (`step` is `None`), kept or reissued as [`pki::inspect_cacerts`]
/// says; in one, the rotation's step for it. An intermediate that expires soon is renewed in every phase, from the
/// root that signed it (its peers trust that one already); one that istiod would not take
/// ([`pki::usable_cacerts`]: incomplete, unreadable, a key that does not match, expired) is issued afresh.
fn member_cacerts<'r>(
    data: Option<&BTreeMap<String, ByteString>>,
    signers: &Signers<'r, '_>,
    profile: &IntermediateProfile<'_>,
    durations: &Durations,
    now: Timestamp,
    step: Option<Action>,
) -> Result<CacertsPlan<'r>, Failure> {
    let root = signers.root;
    let get = |key| data.and_then(|d| d.get(key)).map_or(&[][..], |b: &ByteString| &b.0[..]);
    let (ca_cert, trusted) = (get(pki::CA_CERT), get(pki::ROOT_CERT));
    // What istiod would take, whatever root signed it.
    let current = || pki::usable_cacerts(data, now).map_err(|r| Failure::new(r.reason(), r.to_string()));
    let with_roots = |roots: String, why: &str| -> Result<CacertsPlan<'r>, Failure> {
        let mut d = data.cloned().unwrap_or_default();
        d.insert(pki::ROOT_CERT.into(), ByteString(roots.into_bytes()));
        Ok(CacertsPlan::Hold { data: d, summary: current()?, why: Some(why.into()) })
    };
    let issue = |why: &str, signer: &'r Root, trusting: &[&[u8]]| {
        Ok(CacertsPlan::Issue { why: why.into(), other_roots: roots_besides(trusting, signer), signer })
    };
    match step {
        None => match pki::inspect_cacerts(data, root, profile, durations.renew_before, now) {
            CacertsVerdict::Keep(summary) => {
                Ok(CacertsPlan::Hold { data: data.cloned().unwrap_or_default(), summary, why: None })
            }
            CacertsVerdict::Reissue(reason) => issue(&reason.to_string(), root, &[]),
        },
        Some(_) if current().is_err() => {
            let unusable = current().err().map(|f| f.message).unwrap_or_default();
            let why = format!("issuing an intermediate for a member that holds no usable one ({unusable})");
            issue(&why, signers.fresh, &[signers.peers_roots, root.cert_pem().as_bytes()])
        }
        Some(Action::Keep) => {
            let summary = current()?;
            if summary.not_after > now + SignedDuration::try_from(durations.renew_before).unwrap_or(SignedDuration::MAX)
            {
                return Ok(CacertsPlan::Hold { data: data.cloned().unwrap_or_default(), summary, why: None });
            }
            let signer = [Some(root), signers.previous]
                .into_iter()
                .flatten()
                .find(|r| pki::issued_by(ca_cert, r.cert_pem().as_bytes()));
            match signer {
                Some(signer) => {
                    issue("renewing an expiring intermediate from the root that signed it", signer, &[trusted])
                }
                None => Err(Failure::new(
                    Reason::IntermediateExpiring,
                    format!(
                        "the intermediate expires at {}; the hub no longer holds the root that signed it, so it is renewed from the new root once every member's control plane trusts that one",
                        summary.not_after
                    ),
                )),
            }
        }
        Some(Action::AddNewRoot) => {
            with_roots(roots_besides(&[trusted], root) + root.cert_pem(), "adding the new root beside the old one")
        }
        Some(Action::ReissueTrustingBoth) => issue("issuing an intermediate from the new root", root, &[trusted]),
        Some(Action::DropOldRoots) => with_roots(root.cert_pem().into(), "dropping the old root"),
    }
}

/// The `cacerts` data of a freshly issued `bundle`, whose `root-cert.pem` also trusts `other_roots` (PEM).
pub fn issued(mut bundle: CacertsBundle, other_roots: &str) -> BTreeMap<String, ByteString> {
    bundle.root_cert_pem = format!("{other_roots}{}", bundle.root_cert_pem);
    bundle.secret_data()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use meshfed_api::KeyAlgorithm;

    use super::*;
    use crate::validate::validate;

    const HOUR: Duration = Duration::from_secs(3600);

    fn spec() -> MeshFederationSpec {
        serde_saphyr::from_str(
            "meshID: m\ntrust: {root: {generate: {}}}\nclusters:\n- {name: a, network: n1, kubeconfigSecretRef: {name: a}}\n- {name: b, network: n2, kubeconfigSecretRef: {name: b}}\n- {name: c, network: n3, kubeconfigSecretRef: {name: c}}\n",
        )
        .unwrap()
    }

    fn now() -> Timestamp {
        "2026-11-24T00:00:00Z".parse().unwrap()
    }

    fn root() -> Root {
        let material = pki::generate_root(KeyAlgorithm::ECDSAP256, 100 * 24 * HOUR, now()).unwrap();
        pki::load_root_secret(&material.secret_data(), now()).unwrap()
    }

    /// `cluster`'s `cacerts` from `root`, valid `validity`, trusting `other_roots` too.
    fn cacerts(root: &Root, cluster: &str, validity: Duration, other_roots: &str) -> BTreeMap<String, ByteString> {
        let profile =
            IntermediateProfile { cluster, istio_namespace: "istio-system", algorithm: KeyAlgorithm::ECDSAP256 };
        issued(pki::issue_intermediate(root, &profile, validity, now()).unwrap(), other_roots)
    }

    fn rotating_from(old: &Root) -> TrustStatus {
        TrustStatus { root_fingerprint: Some(old.summary().fingerprint.clone()), ..Default::default() }
    }

    fn roots_of(plan: &CacertsPlan) -> Vec<String> {
        match plan {
            CacertsPlan::Hold { data, .. } => pki::fingerprints(&data[pki::ROOT_CERT].0),
            CacertsPlan::Issue { other_roots, signer, .. } => {
                let mut roots = pki::fingerprints(other_roots.as_bytes());
                roots.push(signer.summary().fingerprint.clone());
                roots
            }
        }
    }

    fn signer_of<'r>(plan: &Result<CacertsPlan<'r>, Failure>) -> &'r Root {
        match plan {
            Ok(CacertsPlan::Issue { signer, .. }) => signer,
            other => panic!("expected an intermediate to be issued: {other:?}"),
        }
    }

    fn fp(root: &Root) -> String {
        root.summary().fingerprint.clone()
    }

    #[test]
    fn a_member_that_joins_mid_rotation_trusts_every_root_its_peers_trust() {
        let (s, old, new) = (spec(), root(), root());
        let durations = validate(&s).unwrap().durations;
        let (a, b) = (cacerts(&old, "a", 1000 * HOUR, ""), cacerts(&old, "b", 1000 * HOUR, ""));
        let observed = BTreeMap::from([
            ("a".to_string(), Observed { cacerts: Some(&a), published: None }),
            ("b".to_string(), Observed { cacerts: Some(&b), published: None }),
            ("c".to_string(), Observed::default()),
        ]);
        let plan = plan_trust(&s, &new, None, &durations, Some(&rotating_from(&old)), &observed, now());
        let joiner = plan.cacerts["c"].as_ref().unwrap();
        assert!(matches!(joiner, CacertsPlan::Issue { .. }), "{joiner:?}");
        // Its peers still sign with the old root: it must trust it, beside the new one it is issued from.
        assert_eq!(roots_of(joiner), [fp(&old), fp(&new)]);
    }

    #[test]
    fn the_new_root_is_used_only_once_every_control_plane_publishes_it() {
        let (s, old, new) = (spec(), root(), root());
        let durations = validate(&s).unwrap().durations;
        let both = format!("{}{}", old.cert_pem(), new.cert_pem());
        let data: Vec<_> = ["a", "b", "c"].map(|c| cacerts(&old, c, 1000 * HOUR, new.cert_pem())).into();
        fn observe<'a>(
            data: &'a [BTreeMap<String, ByteString>],
            published: [&'a str; 3],
        ) -> BTreeMap<String, Observed<'a>> {
            ["a", "b", "c"]
                .iter()
                .zip(data)
                .zip(published)
                .map(|((c, d), p)| (c.to_string(), Observed { cacerts: Some(d), published: Some(p) }))
                .collect()
        }
        let previous = rotating_from(&old);
        let observed = observe(&data, [&both, &both, old.cert_pem()]);
        let stale = plan_trust(&s, &new, None, &durations, Some(&previous), &observed, now());
        assert!(stale.status.rotation_phase.as_deref().unwrap().contains("istio-ca-root-cert"));
        assert!(stale.cacerts.values().all(|p| matches!(p, Ok(CacertsPlan::Hold { .. }))), "nobody is reissued yet");
        let observed = observe(&data, [&both, &both, &both]);
        let published = plan_trust(&s, &new, None, &durations, Some(&previous), &observed, now());
        assert!(published.cacerts.values().all(|p| matches!(p, Ok(CacertsPlan::Issue { .. }))));
    }

    #[test]
    fn a_member_that_stops_answering_holds_the_rotation_without_turning_its_report_back() {
        let (s, old, new) = (spec(), root(), root());
        let durations = validate(&s).unwrap().durations;
        let both = format!("{}{}", old.cert_pem(), new.cert_pem());
        let a = cacerts(&new, "a", 1000 * HOUR, old.cert_pem());
        let b = cacerts(&old, "b", 1000 * HOUR, new.cert_pem());
        // c does not answer; the last reconcile had reached ReissuingIntermediates.
        let observed = BTreeMap::from([
            ("a".to_string(), Observed { cacerts: Some(&a), published: Some(both.as_str()) }),
            ("b".to_string(), Observed { cacerts: Some(&b), published: Some(both.as_str()) }),
        ]);
        let previous =
            TrustStatus { rotation_phase: Some("ReissuingIntermediates: rotating".into()), ..rotating_from(&old) };
        let plan = plan_trust(&s, &new, None, &durations, Some(&previous), &observed, now());
        let phase = plan.status.rotation_phase.unwrap();
        assert!(
            phase.starts_with("ReissuingIntermediates") && phase.contains("held until every member answers"),
            "{phase}"
        );
        // Held: b is not reissued while c cannot be seen.
        assert!(matches!(plan.cacerts["b"], Ok(CacertsPlan::Hold { .. })), "{:?}", plan.cacerts["b"]);
    }

    #[test]
    fn an_intermediate_keeps_being_renewed_during_a_rotation() {
        let (s, old, new) = (spec(), root(), root());
        let durations = validate(&s).unwrap().durations;
        // Every member signs with the new root and waits for workload certificates; a's intermediate expires soon.
        let a = cacerts(&new, "a", 10 * HOUR, old.cert_pem());
        let others: Vec<_> = ["b", "c"].map(|c| cacerts(&new, c, 1000 * HOUR, old.cert_pem())).into();
        let observed = BTreeMap::from([
            ("a".to_string(), Observed { cacerts: Some(&a), published: None }),
            ("b".to_string(), Observed { cacerts: Some(&others[0]), published: None }),
            ("c".to_string(), Observed { cacerts: Some(&others[1]), published: None }),
        ]);
        let previous = TrustStatus { intermediates_reissued_at: Some(now().to_string()), ..rotating_from(&old) };
        let plan = plan_trust(&s, &new, None, &durations, Some(&previous), &observed, now());
        assert!(plan.status.rotation_phase.as_deref().unwrap().starts_with("AwaitingWorkloadCertificates"));
        assert_eq!(plan.wake_at, Some(now() + SignedDuration::from_hours(24) + SignedDuration::from_mins(5)));
        let renewed = plan.cacerts["a"].as_ref().unwrap();
        assert!(matches!(renewed, CacertsPlan::Issue { .. }), "{renewed:?}");
        assert_eq!(roots_of(renewed), [fp(&old), fp(&new)], "still trusting the old root");
        assert!(matches!(plan.cacerts["b"], Ok(CacertsPlan::Hold { .. })));
    }

    #[test]
    fn an_expiring_intermediate_is_renewed_from_the_old_root_while_a_member_holds_the_rotation_in_its_first_phase() {
        let (s, old, new) = (spec(), root(), root());
        let durations = validate(&s).unwrap().durations;
        // The new root was added to a and b; c does not answer. a's intermediate from the old root expires soon.
        let a = cacerts(&old, "a", 10 * HOUR, new.cert_pem());
        let b = cacerts(&old, "b", 1000 * HOUR, new.cert_pem());
        let observed = BTreeMap::from([
            ("a".to_string(), Observed { cacerts: Some(&a), published: None }),
            ("b".to_string(), Observed { cacerts: Some(&b), published: None }),
        ]);
        let previous = rotating_from(&old);
        let plan = plan_trust(&s, &new, Some(&old), &durations, Some(&previous), &observed, now());
        assert!(plan.status.rotation_phase.as_deref().unwrap().starts_with("DistributingRoot"));
        // c may not trust the new root yet: a is renewed from the root every peer trusts, and keeps trusting both.
        assert_eq!(fp(signer_of(&plan.cacerts["a"])), fp(&old));
        assert_eq!(roots_of(plan.cacerts["a"].as_ref().unwrap()), [fp(&new), fp(&old)]);
        assert!(matches!(plan.cacerts["b"], Ok(CacertsPlan::Hold { why: None, .. })));
        // Without the old root on the hub, nothing can renew it safely: said, not hidden.
        let plan = plan_trust(&s, &new, None, &durations, Some(&previous), &observed, now());
        let failure = plan.cacerts["a"].as_ref().unwrap_err();
        assert_eq!(failure.reason, Reason::IntermediateExpiring, "{failure:?}");
    }

    #[test]
    fn a_member_whose_cacerts_istiod_would_refuse_is_issued_afresh_during_a_rotation() {
        let (s, old, new) = (spec(), root(), root());
        let durations = validate(&s).unwrap().durations;
        // The new root is being added to every member; a's bundle lost its key, b's is a partial bundle.
        let mut a = cacerts(&old, "a", 1000 * HOUR, new.cert_pem());
        a.remove(pki::CA_KEY);
        let mut b = cacerts(&old, "b", 1000 * HOUR, "");
        b.remove(pki::CERT_CHAIN);
        let c = cacerts(&old, "c", 1000 * HOUR, new.cert_pem());
        let observed = BTreeMap::from([
            ("a".to_string(), Observed { cacerts: Some(&a), published: None }),
            ("b".to_string(), Observed { cacerts: Some(&b), published: None }),
            ("c".to_string(), Observed { cacerts: Some(&c), published: None }),
        ]);
        let plan = plan_trust(&s, &new, Some(&old), &durations, Some(&rotating_from(&old)), &observed, now());
        assert!(plan.status.rotation_phase.as_deref().unwrap().starts_with("DistributingRoot"));
        for (member, missing) in [("a", pki::CA_KEY), ("b", pki::CERT_CHAIN)] {
            match &plan.cacerts[member] {
                Ok(CacertsPlan::Issue { why, .. }) => assert!(why.contains(missing), "{member}: {why}"),
                other => panic!("{member} holds no usable cacerts and must be issued one: {other:?}"),
            }
        }
        assert!(matches!(plan.cacerts["c"], Ok(CacertsPlan::Hold { why: None, .. })), "{:?}", plan.cacerts["c"]);
    }

    #[test]
    fn a_member_that_joins_mid_rotation_is_signed_by_the_root_every_peer_trusts() {
        let (s, old, new) = (spec(), root(), root());
        let durations = validate(&s).unwrap().durations;
        let both = format!("{}{}", old.cert_pem(), new.cert_pem());
        let observe = |a, b| {
            BTreeMap::from([
                ("a".to_string(), Observed { cacerts: Some(a), published: Some(both.as_str()) }),
                ("b".to_string(), Observed { cacerts: Some(b), published: Some(both.as_str()) }),
                ("c".to_string(), Observed::default()),
            ])
        };
        let previous = rotating_from(&old);
        // c's intermediate: who signs it, and what it trusts.
        let joiner = |a, b| {
            let plan = plan_trust(&s, &new, Some(&old), &durations, Some(&previous), &observe(a, b), now());
            let c = &plan.cacerts["c"];
            (fp(signer_of(c)), roots_of(c.as_ref().unwrap()))
        };
        // a and b do not trust the new root yet: c is signed by the old one, and trusts both.
        let (a, b) = (cacerts(&old, "a", 1000 * HOUR, ""), cacerts(&old, "b", 1000 * HOUR, ""));
        assert_eq!(joiner(&a, &b), (fp(&old), vec![fp(&new), fp(&old)]));
        // Both trust and publish the new root: c is signed by it (and not reissued later).
        let (a, b) = (cacerts(&old, "a", 1000 * HOUR, new.cert_pem()), cacerts(&old, "b", 1000 * HOUR, new.cert_pem()));
        assert_eq!(joiner(&a, &b), (fp(&new), vec![fp(&old), fp(&new)]));
        // They do, but a fourth member (d) does not answer while the rotation is in its first phase: it may not.
        let mut with_d = spec();
        with_d.clusters.push(serde_saphyr::from_str("{name: d, network: n4, kubeconfigSecretRef: {name: d}}").unwrap());
        let plan = plan_trust(&with_d, &new, Some(&old), &durations, Some(&previous), &observe(&a, &b), now());
        assert_eq!(fp(signer_of(&plan.cacerts["c"])), fp(&old));
        // The old root was dropped already: c must not be signed by it, nor trust it.
        let (a, b) = (cacerts(&new, "a", 1000 * HOUR, ""), cacerts(&new, "b", 1000 * HOUR, ""));
        assert_eq!(joiner(&a, &b), (fp(&new), vec![fp(&new)]));
    }
}
