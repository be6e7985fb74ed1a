//! Trust, the federation-wide decisions: where a root rotation stands, what each member's `cacerts` should become,
//! the hub Secret of a generated root, and the roots the hub keeps for a rotation. Issuing an intermediate (key
//! generation) is the one step left to the caller, which [`CacertsPlan::Issue`] asks for; [`issued`] then gives the
//! data to write.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::{ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use meshfed_api::{MeshFederationSpec, TrustStatus};

use crate::{
    conditions::Reason,
    federation::{FIELD_MANAGER, Failure, FederationRef, LABEL_FEDERATION, MANAGED_BY},
    pki::{self, CaMaterial, CacertsBundle, CacertsVerdict, CertSummary, IntermediateProfile, Root},
    redact,
    rotation::{self, Action, MemberRoots},
    status::Announcement,
    validate::Durations,
};

/// Set on a federation with a generated root to ask for a new root: each new value starts one rotation.
pub const ROTATE_ROOT_ANNOTATION: &str = "meshfed.io/rotate-root";

/// The hub Secret that holds a generated root: `<federation>-root-ca` in the federation's namespace. For a name
/// too long for that (over 245 characters), the federation's name is cut and followed by 16 hex digits of its
/// SHA-256, so that the Secret's name stays within 253 characters.
pub fn root_secret_name(federation: &str) -> String {
    hub_secret_name(federation, "-root-ca")
}

/// The hub Secret in which meshfed keeps a copy of every root it may still sign with or that members may still
/// trust (see [`still_kept`]): `<federation>-kept-roots`, cut as [`root_secret_name`] is.
pub fn kept_roots_secret_name(federation: &str) -> String {
    hub_secret_name(federation, "-kept-roots")
}

fn hub_secret_name(federation: &str, suffix: &str) -> String {
    const MAX_NAME: usize = 253;
    if federation.len() + suffix.len() <= MAX_NAME {
        return format!("{federation}{suffix}");
    }
    let short = crate::federation::label_value(federation);
    let hash = &short[short.len() - 16..];
    let mut keep = MAX_NAME - suffix.len() - hash.len() - 1;
    while !federation.is_char_boundary(keep) {
        keep -= 1;
    }
    format!("{}-{hash}{suffix}", federation[..keep].trim_end_matches(['.', '-']))
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

/// The hub Secret of the kept roots ([`kept_roots_secret_name`]) holding `data` ([`kept_roots_data`]).
pub fn kept_roots_secret(fref: &FederationRef, data: BTreeMap<String, ByteString>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(kept_roots_secret_name(&fref.name)),
            namespace: Some(fref.namespace.clone()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY.into(), FIELD_MANAGER.into()),
                (LABEL_FEDERATION.into(), fref.name_label()),
            ])),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    }
}

/// The data key of a kept root's certificate or key: its fingerprint's hex digits, then `.crt` or `.key`.
fn kept_key(root: &Root, ext: &str) -> String {
    let fp = &root.summary().fingerprint;
    format!("{}.{ext}", fp.strip_prefix("sha256:").unwrap_or(fp))
}

/// The roots a kept roots Secret holds ([`kept_roots_data`]) that still load at `now`.
pub fn load_kept_roots(data: &BTreeMap<String, ByteString>, now: Timestamp) -> Vec<Root> {
    data.iter()
        .filter_map(|(k, cert)| Some((cert, data.get(&format!("{}.key", k.strip_suffix(".crt")?))?)))
        .filter_map(|(cert, key)| pki::load_root(&cert.0, &key.0, now).ok())
        .collect()
}

/// The roots the hub keeps besides `root` (the one in use), of `kept` (those it kept so far), so that a root can
/// change under meshfed (a second rotation asked for before the first is through, a brought root renewed in place
/// with a new key, a root given back mid-rotation) without the members losing the key they sign with or the name of
/// a root they must keep trusting: every one until a rotation is through; none once `previous` says the members
/// were all brought to `root` and no rotation runs (then no member trusts another).
pub fn still_kept(root: &Root, kept: Vec<Root>, previous: Option<&TrustStatus>) -> Vec<Root> {
    let fp = &root.summary().fingerprint;
    let through = previous.is_some_and(|t| t.rotation_phase.is_none() && t.root_fingerprint.as_ref() == Some(fp));
    let mut out: Vec<Root> = Vec::new();
    for r in kept.into_iter().filter(|r| !through && r.summary().fingerprint != *fp) {
        if !out.iter().any(|o| o.summary().fingerprint == r.summary().fingerprint) {
            out.push(r);
        }
    }
    out
}

/// The data of the kept roots Secret ([`kept_roots_secret_name`]): a copy of `root` and of every root of `kept`.
pub fn kept_roots_data(root: &Root, kept: &[Root]) -> BTreeMap<String, ByteString> {
    std::iter::once(root)
        .chain(kept)
        .flat_map(|r| {
            let m = r.material();
            [(kept_key(r, "crt"), m.cert_pem), (kept_key(r, "key"), m.key_pem)]
        })
        .map(|(k, v)| (k, ByteString(v.into_bytes())))
        .collect()
}

/// What one member's `cacerts` should become. Its `Debug` shows the keys of `data`, never their values.
#[derive(Clone)]
pub enum CacertsPlan<'r> {
    /// Hold this data (kept as it is, or with only its trusted roots changed); its intermediate is `summary`.
    Hold { data: BTreeMap<String, ByteString>, summary: CertSummary, why: Option<String> },
    /// Issue a new intermediate from `signer` (the federation's root, or during a rotation a root every peer
    /// trusts), whose `root-cert.pem` trusts `other_roots` (PEM) besides the signer.
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
/// the trust status, when to look again because a rotation waits for time to pass, and what to say about roots
/// removed from members because the federation does not use them.
#[derive(Debug, Clone)]
pub struct TrustPlan<'r> {
    pub cacerts: BTreeMap<String, Result<CacertsPlan<'r>, Failure>>,
    pub status: TrustStatus,
    pub wake_at: Option<Timestamp>,
    pub announcements: Vec<Announcement>,
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

impl Observed<'_> {
    fn get(&self, key: &str) -> &[u8] {
        self.cacerts.and_then(|d| d.get(key)).map_or(&[][..], |b| &b.0[..])
    }
}

/// How long after the last member got its intermediate from a new root the old root stays trusted, beyond the
/// longest workload certificate lifetime: for clocks that disagree and certificates signed just before the switch.
pub const WORKLOAD_MARGIN: std::time::Duration = std::time::Duration::from_secs(300);

/// Plans every member's `cacerts` against `root`, the root the spec names. `observed` has what every member of the
/// spec that answered shows; `kept` the other roots whose keys the hub still holds ([`still_kept`]).
///
/// A rotation to `root` runs while the status says the members were last brought to another root, or that a
/// rotation was under way (a root given back mid-rotation is a rotation back to it), or while a member trusts or
/// signs with a kept root other than `root`: every root a live certificate may chain to stays trusted until the
/// rotation is through. Then each member takes the rotation's next step, and one that holds nothing usable is
/// signed by a root every peer trusts. Otherwise renewals and repairs as [`pki::inspect_cacerts`] decides, and a
/// member trusts exactly `root`. In both, a root the federation does not use is removed from the members, and said.
pub fn plan_trust<'r>(
    spec: &MeshFederationSpec,
    root: &'r Root,
    kept: &'r [Root],
    durations: &Durations,
    previous: Option<&TrustStatus>,
    observed: &BTreeMap<String, Observed<'_>>,
    now: Timestamp,
) -> TrustPlan<'r> {
    let new = root.summary();
    let last = previous.and_then(|t| t.root_fingerprint.clone());
    let from = last.clone().filter(|f| *f != new.fingerprint);
    let others: Vec<&Root> = kept.iter().filter(|r| r.summary().fingerprint != new.fingerprint).collect();
    // The roots a member trusts or signs with, among those the hub knows besides `root`.
    let holds = |o: &Observed, r: &Root| {
        pki::fingerprints(o.get(pki::ROOT_CERT)).contains(&r.summary().fingerprint)
            || pki::issued_by(o.get(pki::CA_CERT), r.cert_pem().as_bytes())
    };
    let rotating = from.is_some()
        || previous.is_some_and(|t| t.rotation_phase.is_some())
        || observed.values().any(|o| others.iter().any(|r| holds(o, r)));
    // The roots a member may trust: in a rotation, every root the federation used (a root a live certificate may
    // chain to); otherwise the root alone.
    let mut known = BTreeSet::from([new.fingerprint.clone()]);
    if rotating {
        known.extend(last.iter().chain(others.iter().map(|r| &r.summary().fingerprint)).cloned());
    }
    let states: Vec<Option<MemberRoots>> = spec
        .clusters
        .iter()
        .map(|c| observed.get(&c.name).map(|o| MemberRoots::of(o.cacerts, o.published, root.cert_pem())))
        .collect();
    let all_known = states.iter().all(Option::is_some);
    // What the status reported of this rotation, when it names this root as its target: a phase reached, and when
    // every member was first seen on intermediates from it. A report about a rotation to another root says nothing
    // of this one.
    let report = previous
        .filter(|t| t.rotation_phase.as_deref().is_some_and(|p| p.contains(&format!(" to {}", new.fingerprint))));
    let reissued_at = report.and_then(|t| t.intermediates_reissued_at.as_ref()?.parse().ok());
    let wait = durations.workload_certificate_ttl + WORKLOAD_MARGIN;
    let mut progress = rotating.then(|| rotation::progress(&states, reissued_at, wait, now));
    // What the members are shown to have done decides each one's step; the report may hold a phase reached before.
    let step_phase = progress.and_then(|p| p.phase);
    // A member that does not answer holds the rotation where it is; the report does not fall back a phase for it
    // (nor forget when the members were reissued): only what is done is held, not what was reached.
    if let (Some(p), false) = (progress.as_mut(), all_known) {
        let reported = report.and_then(|t| rotation::Phase::named_in(t.rotation_phase.as_deref()?));
        p.phase = p.phase.max(reported);
        p.reissued_at = p.reissued_at.or(reissued_at);
    }
    let phase = progress.and_then(|p| p.phase);
    // A member that holds nothing usable trusts every root of the federation its peers trust, so that it reaches
    // them all. Its intermediate is signed by the new root once every peer trusts and publishes it (those that do
    // not answer did when the rotation went past its first phase); before that by a root every peer trusts and
    // publishes, whose key the hub holds: the one the members were last brought to, or, when every member
    // answered, another one (a root given back mid-rotation). Without one, it waits: never signed by a root a peer
    // does not trust.
    let peers_roots: Vec<u8> = observed.values().flat_map(|o| o.get(pki::ROOT_CERT).to_vec()).collect();
    let peers_on_new = (all_known || phase > Some(rotation::Phase::DistributingRoot))
        && states.iter().flatten().filter(|m| m.trusts_new || m.trusts_others).all(|m| m.trusts_new && m.published_new);
    let every_peer_trusts = |r: &Root| {
        observed.values().filter(|o| !o.get(pki::ROOT_CERT).is_empty()).all(|o| {
            let fp = &r.summary().fingerprint;
            pki::fingerprints(o.get(pki::ROOT_CERT)).contains(fp)
                && o.published.is_none_or(|p| pki::fingerprints(p.as_bytes()).contains(fp))
        })
    };
    let mut candidates = others.clone();
    candidates.sort_by_key(|r| Some(&r.summary().fingerprint) != last.as_ref());
    let fresh = match peers_on_new {
        true => Some(root),
        false => candidates
            .into_iter()
            .filter(|r| all_known || Some(&r.summary().fingerprint) == last.as_ref())
            .find(|r| every_peer_trusts(r)),
    };
    let signers = Signers { root, kept: &others, fresh, peers_roots: &peers_roots, known: &known };
    let mut cacerts = BTreeMap::new();
    let mut announcements = Vec::new();
    for (cluster, state) in spec.clusters.iter().zip(&states) {
        let Some(o) = observed.get(&cluster.name) else { continue };
        let profile = IntermediateProfile {
            cluster: &cluster.name,
            istio_namespace: &spec.istio.namespace,
            algorithm: spec.trust.intermediate.algorithm,
        };
        let step = step_phase.zip(*state).map(|(p, s)| rotation::action(p, s, all_known));
        let plan = member_cacerts(o.cacerts, &signers, &profile, durations, now, step);
        let unknown: Vec<String> =
            pki::fingerprints(o.get(pki::ROOT_CERT)).into_iter().filter(|fp| !known.contains(fp)).collect();
        if plan.is_ok() && !unknown.is_empty() {
            announcements.push(Announcement {
                warning: true,
                reason: Reason::UnknownRootRemoved.to_string(),
                note: format!(
                    "cluster {}: its cacerts trusted a root the federation does not use ({}); it was removed",
                    cluster.name,
                    unknown.join(", ")
                ),
                cluster: Some(cluster.name.clone()),
                kubeconfig: Some(cluster.kubeconfig_secret_ref.clone()),
            });
        }
        cacerts.insert(cluster.name.clone(), plan);
    }
    let current = || TrustStatus {
        root_fingerprint: Some(new.fingerprint.clone()),
        root_not_after: Some(new.not_after_rfc3339()),
        rotation_phase: None,
        intermediates_reissued_at: None,
        root_source: Some(root_source(spec)),
    };
    let status = match phase {
        Some(p) => {
            // The roots it rotates from: the one the members were last brought to, and every other kept root a
            // member still trusts or signs with.
            let mut olds: Vec<&String> = from.iter().collect();
            for r in others.iter().filter(|r| observed.values().any(|o| holds(o, r))) {
                if !olds.contains(&&r.summary().fingerprint) {
                    olds.push(&r.summary().fingerprint);
                }
            }
            let list = |fps: &[&String]| fps.iter().map(|f| f.as_str()).collect::<Vec<_>>().join(", ");
            let keys: Vec<&String> =
                olds.iter().copied().filter(|f| others.iter().any(|r| r.summary().fingerprint == **f)).collect();
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
            let kept = match keys.as_slice() {
                [] => String::new(),
                keys => format!("; the hub keeps the key of {} until the rotation is through", list(keys)),
            };
            let from = match olds.as_slice() {
                [] => String::new(),
                olds => format!("from root {} ", list(olds)),
            };
            TrustStatus {
                rotation_phase: Some(format!("{p}: rotating {from}to {}{held}{waits}{kept}", new.fingerprint)),
                intermediates_reissued_at: progress.and_then(|p| p.reissued_at).map(|t| t.to_string()),
                ..previous.cloned().unwrap_or_else(current)
            }
        }
        None => current(),
    };
    TrustPlan { cacerts, status, wake_at: progress.and_then(|p| p.wake_at), announcements }
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

/// The certificates of `bundles` (PEM) whose fingerprint is `known`, once each, except `signer`: what a
/// `root-cert.pem` holds besides the root that signs its intermediate. A root the federation does not use is never
/// carried over.
fn roots_besides(bundles: &[&[u8]], signer: &Root, known: &BTreeSet<String>) -> String {
    let mut seen = vec![signer.summary().fingerprint.clone()];
    let mut out = String::new();
    for (fp, pem) in bundles.iter().flat_map(|b| pki::certificates(b)) {
        if known.contains(&fp) && !seen.contains(&fp) {
            seen.push(fp);
            out.push_str(&pem);
        }
    }
    out
}

/// The roots a plan signs with: the federation's root; during a rotation the other roots whose keys the hub holds;
/// the one that signs a member holding nothing usable (`fresh`; none while no root every peer trusts can), which
/// trusts the federation's roots among `peers_roots` too. `known`: the roots a member may trust.
struct Signers<'r, 'p> {
    root: &'r Root,
    kept: &'p [&'r Root],
    fresh: Option<&'r Root>,
    peers_roots: &'p [u8],
    known: &'p BTreeSet<String>,
}

/// One member's `cacerts`: outside a rotation (`step` is `None`), kept or reissued as [`pki::inspect_cacerts`]
/// says, trusting the root alone; in one, the rotation's step for it. An intermediate that expires soon is renewed
/// in every phase, from the root that signed it (its peers trust that one already); one that istiod would not take
/// ([`pki::usable_cacerts`]: incomplete, unreadable, a key that does not match, expired) is issued afresh. A root
/// that is not `known` is dropped from what it trusts.
fn member_cacerts<'r>(
    data: Option<&BTreeMap<String, ByteString>>,
    signers: &Signers<'r, '_>,
    profile: &IntermediateProfile<'_>,
    durations: &Durations,
    now: Timestamp,
    step: Option<Action>,
) -> Result<CacertsPlan<'r>, Failure> {
    let (root, known) = (signers.root, signers.known);
    let get = |key| data.and_then(|d| d.get(key)).map_or(&[][..], |b: &ByteString| &b.0[..]);
    let (ca_cert, trusted) = (get(pki::CA_CERT), get(pki::ROOT_CERT));
    let only_known = pki::fingerprints(trusted).iter().all(|fp| known.contains(fp));
    // What istiod would take, whatever root signed it.
    let current = || pki::usable_cacerts(data, now).map_err(|r| Failure::new(r.reason(), r.to_string()));
    let with_roots = |roots: String, why: &str| -> Result<CacertsPlan<'r>, Failure> {
        let mut d = data.cloned().unwrap_or_default();
        d.insert(pki::ROOT_CERT.into(), ByteString(roots.into_bytes()));
        Ok(CacertsPlan::Hold { data: d, summary: current()?, why: Some(why.into()) })
    };
    let keep = |summary: CertSummary| match only_known {
        true => Ok(CacertsPlan::Hold { data: data.cloned().unwrap_or_default(), summary, why: None }),
        false => {
            let roots = roots_besides(&[trusted], root, known);
            let roots = if pki::fingerprints(trusted).contains(&root.summary().fingerprint) {
                roots + root.cert_pem()
            } else {
                roots
            };
            with_roots(roots, "removing a root the federation does not use")
        }
    };
    let issue = |why: &str, signer: &'r Root, trusting: &[&[u8]]| {
        Ok(CacertsPlan::Issue { why: why.into(), other_roots: roots_besides(trusting, signer, known), signer })
    };
    match step {
        None => match pki::inspect_cacerts(data, root, profile, durations.renew_before, now) {
            CacertsVerdict::Keep(summary) => keep(summary),
            CacertsVerdict::Reissue(reason) => issue(&reason.to_string(), root, &[]),
        },
        Some(_) if current().is_err() => match signers.fresh {
            Some(signer) => {
                let unusable = current().err().map(|f| f.message).unwrap_or_default();
                let why = format!("issuing an intermediate for a member that holds no usable one ({unusable})");
                issue(&why, signer, &[signers.peers_roots, root.cert_pem().as_bytes()])
            }
            None => Err(Failure::new(
                Reason::RootUnavailable,
                "the member holds no usable intermediate, and the hub holds the key of no root that every member trusts; it gets one once every member's control plane trusts the new root",
            )),
        },
        Some(Action::Keep) => {
            let summary = current()?;
            if summary.not_after > now + SignedDuration::try_from(durations.renew_before).unwrap_or(SignedDuration::MAX)
            {
                return keep(summary);
            }
            let signer = std::iter::once(root)
                .chain(signers.kept.iter().copied())
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
        Some(Action::AddNewRoot) => with_roots(
            roots_besides(&[trusted], root, known) + root.cert_pem(),
            "adding the new root beside the old one",
        ),
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
        let kept = std::slice::from_ref(&old);
        let plan = plan_trust(&s, &new, kept, &durations, Some(&rotating_from(&old)), &observed, now());
        let joiner = plan.cacerts["c"].as_ref().unwrap();
        assert!(matches!(joiner, CacertsPlan::Issue { .. }), "{joiner:?}");
        // Its peers still sign with the old root: it must trust it, beside the new one.
        let roots: BTreeSet<_> = roots_of(joiner).into_iter().collect();
        assert_eq!(roots, [fp(&old), fp(&new)].into());
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
        let stale = plan_trust(&s, &new, &[], &durations, Some(&previous), &observed, now());
        assert!(stale.status.rotation_phase.as_deref().unwrap().contains("istio-ca-root-cert"));
        assert!(stale.cacerts.values().all(|p| matches!(p, Ok(CacertsPlan::Hold { .. }))), "nobody is reissued yet");
        let observed = observe(&data, [&both, &both, &both]);
        let published = plan_trust(&s, &new, &[], &durations, Some(&previous), &observed, now());
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
        let reached = format!("ReissuingIntermediates: rotating from root {} to {}", fp(&old), fp(&new));
        let previous = TrustStatus { rotation_phase: Some(reached), ..rotating_from(&old) };
        let plan = plan_trust(&s, &new, &[], &durations, Some(&previous), &observed, now());
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
        let plan = plan_trust(&s, &new, &[], &durations, Some(&previous), &observed, now());
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
        let plan = plan_trust(&s, &new, std::slice::from_ref(&old), &durations, Some(&previous), &observed, now());
        assert!(plan.status.rotation_phase.as_deref().unwrap().starts_with("DistributingRoot"));
        // c may not trust the new root yet: a is renewed from the root every peer trusts, and keeps trusting both.
        assert_eq!(fp(signer_of(&plan.cacerts["a"])), fp(&old));
        assert_eq!(roots_of(plan.cacerts["a"].as_ref().unwrap()), [fp(&new), fp(&old)]);
        assert!(matches!(plan.cacerts["b"], Ok(CacertsPlan::Hold { why: None, .. })));
        // Without the old root on the hub, nothing can renew it safely: said, not hidden.
        let plan = plan_trust(&s, &new, &[], &durations, Some(&previous), &observed, now());
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
        let plan =
            plan_trust(&s, &new, std::slice::from_ref(&old), &durations, Some(&rotating_from(&old)), &observed, now());
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
            let plan =
                plan_trust(&s, &new, std::slice::from_ref(&old), &durations, Some(&previous), &observe(a, b), now());
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
        let plan =
            plan_trust(&with_d, &new, std::slice::from_ref(&old), &durations, Some(&previous), &observe(&a, &b), now());
        assert_eq!(fp(signer_of(&plan.cacerts["c"])), fp(&old));
        // The old root was dropped already: c must not be signed by it, nor trust it.
        let (a, b) = (cacerts(&new, "a", 1000 * HOUR, ""), cacerts(&new, "b", 1000 * HOUR, ""));
        assert_eq!(joiner(&a, &b), (fp(&new), vec![fp(&new)]));
    }

    /// A mesh played through time, one reconcile every [`TICK`], as the operator runs it: the hub keeps a copy of the
    /// roots ([`kept_roots_data`]) before it plans; every member that answers is written what the plan asks. For
    /// every member, what its `cacerts` holds, what its istiod publishes (its `root-cert.pem` as it was a
    /// reconcile earlier) and which intermediates its workloads present certificates from (each one until a
    /// workload certificate lifetime after it was replaced). After every reconcile, every workload certificate
    /// still alive must chain to a root that every member, reachable or not, trusts both in its files and in what
    /// it publishes.
    struct Mesh {
        spec: MeshFederationSpec,
        members: BTreeMap<String, Member>,
        status: Option<TrustStatus>,
        keyring: BTreeMap<String, ByteString>,
        now: Timestamp,
        /// Which intermediate (ca-cert.pem) verifies with which root certificate, as found: a signature check is
        /// slow in a debug build.
        verified: std::cell::RefCell<BTreeMap<(Vec<u8>, String), bool>>,
    }

    #[derive(Default)]
    struct Member {
        data: Option<BTreeMap<String, ByteString>>,
        published: Option<String>,
        down: bool,
        refuses_writes: bool,
        presented: Vec<(Vec<u8>, Option<Timestamp>)>,
    }

    /// What one reconcile said.
    struct Said {
        phase: Option<String>,
        failures: BTreeMap<String, Failure>,
        announcements: Vec<Announcement>,
    }

    impl Mesh {
        fn new(clusters: &[&str], intermediate: &str) -> Self {
            let mut spec: MeshFederationSpec = serde_saphyr::from_str(&format!(
                "meshID: m\ntrust: {{root: {{generate: {{}}}}, intermediate: {intermediate}}}\nclusters: []\n"
            ))
            .unwrap();
            spec.clusters.clear();
            let (members, keyring, verified) = Default::default();
            let mut mesh = Self { spec, members, status: None, keyring, now: now(), verified };
            for c in clusters {
                mesh.join(c);
            }
            mesh
        }

        fn join(&mut self, name: &str) {
            let yaml = format!("{{name: {name}, network: {name}, kubeconfigSecretRef: {{name: {name}}}}}");
            self.spec.clusters.push(serde_saphyr::from_str(&yaml).unwrap());
            self.members.insert(name.into(), Member::default());
        }

        fn member(&mut self, name: &str) -> &mut Member {
            self.members.get_mut(name).unwrap()
        }

        /// The fingerprints of the roots `name` trusts (`root-cert.pem`).
        fn trusts(&self, name: &str) -> Vec<String> {
            let data = self.members[name].data.as_ref().unwrap();
            pki::fingerprints(&data[pki::ROOT_CERT].0)
        }

        /// Whether `name`'s intermediate is signed by `root`.
        fn signed_by(&self, name: &str, root: &Root) -> bool {
            let data = self.members[name].data.as_ref().unwrap();
            pki::issued_by(&data[pki::CA_CERT].0, root.cert_pem().as_bytes())
        }

        /// One reconcile against `root`, then [`TICK`] passes.
        fn reconcile(&mut self, root: &Root) -> Said {
            let durations = validate(&self.spec).unwrap().durations;
            // istiod has published what its files held at the last reconcile (without files, what it had).
            for m in self.members.values_mut() {
                if let Some(d) = &m.data {
                    m.published = Some(String::from_utf8(d[pki::ROOT_CERT].0.clone()).unwrap());
                }
            }
            let kept = still_kept(root, load_kept_roots(&self.keyring, self.now), self.status.as_ref());
            self.keyring = kept_roots_data(root, &kept);
            let observed: BTreeMap<String, Observed> = self
                .members
                .iter()
                .filter(|(_, m)| !m.down)
                .map(|(n, m)| (n.clone(), Observed { cacerts: m.data.as_ref(), published: m.published.as_deref() }))
                .collect();
            let plan = plan_trust(&self.spec, root, &kept, &durations, self.status.as_ref(), &observed, self.now);
            let mut failures = BTreeMap::new();
            for (name, step) in plan.cacerts {
                let cluster = self.spec.clusters.iter().find(|c| c.name == name).unwrap().name.clone();
                let (now, m) = (self.now, self.members.get_mut(&name).unwrap());
                let data = match step {
                    Err(f) => {
                        failures.insert(name, f);
                        continue;
                    }
                    _ if m.refuses_writes => continue,
                    Ok(CacertsPlan::Hold { data, .. }) => data,
                    Ok(CacertsPlan::Issue { other_roots, signer, .. }) => {
                        let profile = IntermediateProfile {
                            cluster: &cluster,
                            istio_namespace: "istio-system",
                            algorithm: KeyAlgorithm::ECDSAP256,
                        };
                        let bundle = pki::issue_intermediate(signer, &profile, durations.intermediate_validity, now);
                        issued(bundle.unwrap(), &other_roots)
                    }
                };
                let ca = data[pki::CA_CERT].0.clone();
                if m.presented.last().is_none_or(|(c, _)| *c != ca) {
                    if let Some((_, replaced)) = m.presented.last_mut() {
                        *replaced = Some(now);
                    }
                    m.presented.push((ca, None));
                }
                m.data = Some(data);
            }
            self.status = Some(plan.status.clone());
            self.assert_every_live_certificate_is_trusted(durations.workload_certificate_ttl);
            self.now += TICK;
            Said { phase: plan.status.rotation_phase, failures, announcements: plan.announcements }
        }

        /// Loses `name`'s `cacerts` (deleted by hand): its workloads keep their certificates until they expire.
        fn lose_cacerts(&mut self, name: &str) {
            let (now, m) = (self.now, self.member(name));
            m.data = None;
            if let Some((_, replaced)) = m.presented.last_mut() {
                *replaced = Some(now);
            }
        }

        fn assert_every_live_certificate_is_trusted(&self, ttl: Duration) {
            let ttl = SignedDuration::try_from(ttl).unwrap();
            for (signer, s) in &self.members {
                for (ca, _) in s.presented.iter().filter(|(_, r)| r.is_none_or(|r| self.now < r + ttl)) {
                    for (verifier, v) in &self.members {
                        let Some(data) = &v.data else { continue };
                        // Its workloads verify with what istiod published; a member new to the mesh has none yet.
                        let published = v.published.as_deref().map(|p| pki::fingerprints(p.as_bytes()));
                        let trusted = pki::certificates(&data[pki::ROOT_CERT].0).into_iter().any(|(fp, pem)| {
                            published.as_ref().is_none_or(|p| p.contains(&fp)) && {
                                let mut verified = self.verified.borrow_mut();
                                let key = (ca.clone(), fp);
                                *verified.entry(key).or_insert_with(|| pki::issued_by(ca, pem.as_bytes()))
                            }
                        });
                        assert!(
                            trusted,
                            "{}: {verifier} does not trust a live workload certificate of {signer} (phase {:?})",
                            self.now,
                            self.status.as_ref().and_then(|s| s.rotation_phase.as_deref())
                        );
                    }
                }
            }
        }

        /// Reconciles against `root` until the rotation is through (at most `times`).
        fn rotate_to_the_end(&mut self, root: &Root, times: usize) {
            for _ in 0..times {
                if self.reconcile(root).phase.is_none() {
                    return;
                }
            }
            panic!("the rotation is not through after {times} reconciles: {:?}", self.status);
        }

        /// Every member signs with `root` and trusts it alone, and the status says so.
        fn assert_on(&self, root: &Root) {
            for name in self.members.keys() {
                assert!(self.signed_by(name, root), "{name} does not sign with the root");
                assert_eq!(self.trusts(name), [fp(root)], "{name} trusts another root");
            }
            let status = self.status.as_ref().unwrap();
            assert_eq!(
                (status.root_fingerprint.as_deref(), status.rotation_phase.as_deref()),
                (Some(&*fp(root)), None)
            );
        }
    }

    const DEFAULT_INTERMEDIATE: &str = "{}";

    /// The time between two reconciles of [`Mesh`]: a rotation waits a day for workload certificates, so that is
    /// nine of them.
    const TICK: SignedDuration = SignedDuration::from_hours(3);

    #[test]
    fn a_root_given_back_at_any_moment_of_a_rotation_is_rotated_back_to_without_a_peer_distrusting_a_live_certificate()
    {
        let (a, b) = (root(), root());
        // The `i`-th reconcile of the rotation from a to b: c's write fails once, when the members get intermediates
        // from b.
        let forward = |mesh: &mut Mesh, i: usize| {
            mesh.member("c").refuses_writes = i == 1;
            let phase = mesh.reconcile(&b).phase;
            mesh.member("c").refuses_writes = false;
            phase.map(|p| p.split(':').next().unwrap().to_string())
        };
        // The phase after each reconcile of that rotation, to its end.
        let mut whole = Mesh::new(&["a", "b", "c"], DEFAULT_INTERMEDIATE);
        whole.rotate_to_the_end(&a, 2);
        let mut phases = Vec::new();
        while let Some(phase) = forward(&mut whole, phases.len()) {
            phases.push(phase);
        }
        assert!(TICK * phases.len() as i32 > SignedDuration::from_hours(24), "it waited a day: {phases:?}");
        // The root is given back (a GitOps revert) in the first two reconciles of every phase, mid-way through the
        // wait, and after the rotation's last step: every certificate a workload holds stays trusted by every
        // member, and the members end on a alone.
        let mut moments: BTreeSet<usize> = [1, phases.len() / 2, phases.len() + 1].into();
        for h in (1..phases.len()).filter(|&h| phases[h] != phases[h - 1]) {
            moments.extend([h + 1, h + 2]);
        }
        for given_back in moments {
            let mut mesh = Mesh::new(&["a", "b", "c"], DEFAULT_INTERMEDIATE);
            mesh.rotate_to_the_end(&a, 2);
            for i in 0..given_back {
                forward(&mut mesh, i);
            }
            let mid_way = ["a", "b", "c"].map(|m| mesh.signed_by(m, &b));
            if given_back == 2 {
                assert_eq!(mid_way, [true, true, false], "a and b sign with b, c still with a");
            }
            mesh.rotate_to_the_end(&a, 40);
            mesh.assert_on(&a);
        }
    }

    #[test]
    fn a_second_rotation_asked_for_mid_rotation_keeps_the_key_every_member_trusts() {
        let (a, b, c) = (root(), root(), root());
        let mut mesh = Mesh::new(&["east", "west", "north"], "{validity: 48h, renewBefore: 24h}");
        mesh.rotate_to_the_end(&a, 2);
        // North stops answering; a new root b is asked for, then, before that rotation is through, another one, c
        // (a generated root's Secret now holds c, with b as the one it replaced; or a root brought in a Secret that
        // cert-manager renewed twice with new keys).
        mesh.member("north").down = true;
        for target in [&b, &b, &c, &c] {
            let said = mesh.reconcile(target);
            assert!(said.phase.as_deref().unwrap().starts_with("DistributingRoot"), "{:?}", said.phase);
        }
        let said = mesh.reconcile(&c);
        let phase = said.phase.unwrap();
        assert!(phase.contains(&format!("the hub keeps the key of {}, {}", fp(&a), fp(&b))), "{phase}");
        assert_eq!(mesh.trusts("east"), [fp(&a), fp(&b), fp(&c)]);
        // North trusts a alone: a member that joins, and one that loses its cacerts, are signed by a.
        mesh.join("south");
        mesh.lose_cacerts("west");
        mesh.reconcile(&c);
        for m in ["south", "west"] {
            assert!(mesh.signed_by(m, &a), "{m} is not signed by the root north trusts");
            let trusted: BTreeSet<_> = mesh.trusts(m).into_iter().collect();
            assert_eq!(trusted, [fp(&a), fp(&b), fp(&c)].into(), "{m}");
        }
        // A day on, the intermediates from a are due for renewal: renewed from a (27 hours later).
        let before = mesh.members["east"].presented.len();
        for _ in 0..9 {
            let said = mesh.reconcile(&c);
            assert!(said.failures.is_empty(), "{:?}", said.failures);
        }
        assert!(["east", "west", "south"].iter().all(|m| mesh.signed_by(m, &a)));
        assert_eq!(mesh.members["east"].presented.len(), before + 1, "east was renewed once");
        // North is back: the rotation runs to its end on c.
        mesh.member("north").down = false;
        mesh.rotate_to_the_end(&c, 40);
        mesh.assert_on(&c);
        // Once it is through, the hub keeps c alone.
        mesh.reconcile(&c);
        assert_eq!(load_kept_roots(&mesh.keyring, mesh.now).iter().map(fp).collect::<Vec<_>>(), [fp(&c)]);
    }

    #[test]
    fn a_member_with_nothing_usable_waits_rather_than_be_signed_by_a_root_a_peer_does_not_trust() {
        let (a, b) = (root(), root());
        let mut mesh = Mesh::new(&["east", "west", "north"], DEFAULT_INTERMEDIATE);
        mesh.rotate_to_the_end(&a, 2);
        mesh.member("north").down = true;
        mesh.reconcile(&b);
        // The hub lost the key of a (a hub restored without the Secret that kept it): nothing every member trusts
        // can sign; west, which lost its cacerts, waits and says why, and nobody signs with b.
        mesh.keyring.clear();
        mesh.lose_cacerts("west");
        for _ in 0..3 {
            let said = mesh.reconcile(&b);
            assert_eq!(said.failures["west"].reason, Reason::RootUnavailable, "{:?}", said.failures);
        }
        assert!(mesh.members["west"].data.is_none());
        assert!(!mesh.signed_by("east", &b));
    }

    #[test]
    fn a_root_the_federation_does_not_use_is_removed_from_a_member_and_said_and_never_copied_to_one_that_joins() {
        let (a, b, foreign) = (root(), root(), root());
        let mut mesh = Mesh::new(&["east", "west", "north"], DEFAULT_INTERMEDIATE);
        mesh.rotate_to_the_end(&a, 2);
        let append = |mesh: &mut Mesh, name: &str| {
            let data = mesh.member(name).data.as_mut().unwrap();
            data.get_mut(pki::ROOT_CERT).unwrap().0.extend_from_slice(foreign.cert_pem().as_bytes());
        };
        // Outside a rotation: east trusts a alone again, and the removal is said once, about east.
        append(&mut mesh, "east");
        let said = mesh.reconcile(&a);
        assert_eq!(mesh.trusts("east"), [fp(&a)]);
        let [removed] = said.announcements.as_slice() else { panic!("{:?}", said.announcements) };
        assert_eq!((removed.reason.as_str(), removed.cluster.as_deref()), ("UnknownRootRemoved", Some("east")));
        assert!(removed.warning && removed.note.contains(&fp(&foreign)), "{removed:?}");
        assert!(mesh.reconcile(&a).announcements.is_empty());
        assert_eq!(mesh.status.as_ref().unwrap().rotation_phase, None);
        // During a rotation (held by north): removed too, and a member that joins trusts the federation's roots
        // only.
        mesh.member("north").down = true;
        mesh.reconcile(&b);
        append(&mut mesh, "east");
        mesh.join("south");
        let said = mesh.reconcile(&b);
        assert_eq!(said.announcements.len(), 1, "{:?}", said.announcements);
        for m in ["east", "south"] {
            let trusted: BTreeSet<_> = mesh.trusts(m).into_iter().collect();
            assert_eq!(trusted, [fp(&a), fp(&b)].into(), "{m}");
        }
    }

    #[test]
    fn a_report_about_a_rotation_to_another_root_does_not_move_this_one_on() {
        let (s, old, other, new) = (spec(), root(), root(), root());
        let durations = validate(&s).unwrap().durations;
        let a = cacerts(&old, "a", 1000 * HOUR, new.cert_pem());
        let b = cacerts(&old, "b", 1000 * HOUR, new.cert_pem());
        let both = format!("{}{}", old.cert_pem(), new.cert_pem());
        // c does not answer; the last report was about a rotation to `other`, past its first phase.
        let observed = BTreeMap::from([
            ("a".to_string(), Observed { cacerts: Some(&a), published: Some(both.as_str()) }),
            ("b".to_string(), Observed { cacerts: Some(&b), published: Some(both.as_str()) }),
            ("d".to_string(), Observed::default()),
        ]);
        let mut with_d = spec();
        with_d.clusters.push(serde_saphyr::from_str("{name: d, network: n4, kubeconfigSecretRef: {name: d}}").unwrap());
        let reached = format!("AwaitingWorkloadCertificates: rotating from root {} to {}", fp(&old), fp(&other));
        let previous = TrustStatus {
            rotation_phase: Some(reached),
            intermediates_reissued_at: Some(now().to_string()),
            ..rotating_from(&old)
        };
        let kept = [old, other];
        let plan = plan_trust(&with_d, &new, &kept, &durations, Some(&previous), &observed, now());
        let phase = plan.status.rotation_phase.unwrap();
        assert!(phase.starts_with("DistributingRoot"), "{phase}");
        assert_eq!(plan.status.intermediates_reissued_at, None);
        // c may not trust the new root: d is signed by the old one.
        assert_eq!(fp(signer_of(&plan.cacerts["d"])), fp(&kept[0]));
    }
}
