//! Trust, the federation-wide decisions: where a root rotation stands, what each member's `cacerts` should become,
//! and the hub Secret of a generated root. Issuing an intermediate (key generation) is the one step left to the
//! caller, which [`CacertsPlan::Issue`] asks for; [`issued`] then gives the data to write.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::{ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use meshfed_api::{MeshFederationSpec, TrustStatus};

use crate::{
    pki::{self, CaMaterial, CacertsBundle, CacertsVerdict, CertSummary, IntermediateProfile, Root},
    plan::{FIELD_MANAGER, Failure, FederationRef, LABEL_FEDERATION, MANAGED_BY},
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
    let short = crate::plan::label_value(federation);
    let hash = &short[short.len() - 16..];
    let mut keep = MAX_NAME - SUFFIX.len() - hash.len() - 1;
    while !federation.is_char_boundary(keep) {
        keep -= 1;
    }
    format!("{}-{hash}{SUFFIX}", federation[..keep].trim_end_matches(['.', '-']))
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

/// What one member's `cacerts` should become.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacertsPlan {
    /// Hold this data (kept as it is, or with only its trusted roots changed); its intermediate is `summary`.
    Hold { data: BTreeMap<String, ByteString>, summary: CertSummary, why: Option<String> },
    /// Issue a new intermediate from the root, whose `root-cert.pem` trusts `other_roots` (PEM) besides the root.
    Issue { why: String, other_roots: String },
}

/// The trust plan of a federation: per member of the spec that answered, its `cacerts` plan (or why it has none),
/// and the trust status.
#[derive(Debug, Clone)]
pub struct TrustPlan {
    pub cacerts: BTreeMap<String, Result<CacertsPlan, Failure>>,
    pub status: TrustStatus,
}

/// Plans every member's `cacerts` against `root`. `observed` has, for every member of the spec that answered, its
/// `cacerts` data (`None`: it has none). When the status says members were last brought to another root, this is
/// the next step of a rotation; otherwise renewals and repairs as [`pki::inspect_cacerts`] decides.
pub fn plan_trust(
    spec: &MeshFederationSpec,
    root: &Root,
    durations: &Durations,
    previous: Option<&TrustStatus>,
    observed: &BTreeMap<String, Option<&BTreeMap<String, ByteString>>>,
    now: Timestamp,
) -> TrustPlan {
    let new = root.summary();
    let from = previous.and_then(|t| t.root_fingerprint.clone()).filter(|f| *f != new.fingerprint);
    let states: Vec<Option<MemberRoots>> = spec
        .clusters
        .iter()
        .map(|c| observed.get(&c.name).map(|data| MemberRoots::of(*data, root.cert_pem())))
        .collect();
    let all_known = states.iter().all(Option::is_some);
    // A rotation runs while the members were last brought to another root and have not all moved on.
    let phase = from.as_ref().and_then(|_| rotation::phase(&states));
    let mut cacerts = BTreeMap::new();
    for (cluster, state) in spec.clusters.iter().zip(&states) {
        let Some(data) = observed.get(&cluster.name) else { continue };
        let profile = IntermediateProfile {
            cluster: &cluster.name,
            istio_namespace: &spec.istio.namespace,
            algorithm: spec.trust.intermediate.algorithm,
        };
        let step = phase.zip(*state).map(|(p, s)| rotation::action(p, s, all_known));
        cacerts.insert(cluster.name.clone(), member_cacerts(*data, root, &profile, durations, now, step));
    }
    let status = match (&phase, previous) {
        (Some(p), Some(prev)) => {
            let held = if all_known { String::new() } else { "; held until every member answers".into() };
            TrustStatus {
                rotation_phase: Some(format!(
                    "{p}: rotating from root {} to {}{held}",
                    from.unwrap_or_default(),
                    new.fingerprint
                )),
                ..prev.clone()
            }
        }
        _ => TrustStatus {
            root_fingerprint: Some(new.fingerprint.clone()),
            root_not_after: Some(new.not_after_rfc3339()),
            rotation_phase: None,
        },
    };
    TrustPlan { cacerts, status }
}

/// One member's `cacerts`: outside a rotation (`step` is `None`), kept or reissued as [`pki::inspect_cacerts`]
/// says; in one, the rotation's step for it.
fn member_cacerts(
    data: Option<&BTreeMap<String, ByteString>>,
    root: &Root,
    profile: &IntermediateProfile<'_>,
    durations: &Durations,
    now: Timestamp,
    step: Option<Action>,
) -> Result<CacertsPlan, Failure> {
    let current = || {
        data.and_then(|d| d.get(pki::CA_CERT))
            .ok_or_else(|| Failure::new("CacertsUnreadable", "cacerts has no ca-cert.pem"))
            .and_then(|c| pki::summarize(&c.0).map_err(|e| Failure::new(e.reason(), e.to_string())))
    };
    let old_roots = || -> String {
        let bundle = data.and_then(|d| d.get(pki::ROOT_CERT)).map(|b| b.0.as_slice()).unwrap_or_default();
        pki::certificates(bundle)
            .into_iter()
            .filter(|(fp, _)| *fp != root.summary().fingerprint)
            .map(|(_, pem)| pem)
            .collect()
    };
    let with_roots = |roots: String, why: &str| -> Result<CacertsPlan, Failure> {
        let mut d = data.cloned().unwrap_or_default();
        d.insert(pki::ROOT_CERT.into(), ByteString(roots.into_bytes()));
        Ok(CacertsPlan::Hold { data: d, summary: current()?, why: Some(why.into()) })
    };
    let issue = |why: &str, other_roots: String| Ok(CacertsPlan::Issue { why: why.into(), other_roots });
    match step {
        None => match pki::inspect_cacerts(data, root, profile, durations.renew_before, now) {
            CacertsVerdict::Keep(summary) => {
                Ok(CacertsPlan::Hold { data: data.cloned().unwrap_or_default(), summary, why: None })
            }
            CacertsVerdict::Reissue(reason) => issue(&reason.to_string(), String::new()),
        },
        Some(Action::Keep) => {
            Ok(CacertsPlan::Hold { data: data.cloned().unwrap_or_default(), summary: current()?, why: None })
        }
        Some(Action::AddNewRoot) if current().is_ok() => {
            with_roots(old_roots() + root.cert_pem(), "adding the new root beside the old one")
        }
        Some(Action::AddNewRoot | Action::ReissueTrustingBoth) => {
            issue("issuing an intermediate from the new root", old_roots())
        }
        Some(Action::DropOldRoots) => with_roots(root.cert_pem().into(), "dropping the old root"),
    }
}

/// The `cacerts` data of a freshly issued `bundle`, whose `root-cert.pem` also trusts `other_roots` (PEM).
pub fn issued(mut bundle: CacertsBundle, other_roots: &str) -> BTreeMap<String, ByteString> {
    bundle.root_cert_pem = format!("{other_roots}{}", bundle.root_cert_pem);
    bundle.secret_data()
}
