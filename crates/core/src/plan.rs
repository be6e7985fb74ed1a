//! The federation plan: from the spec, the previous status and what was observed of every member (reached or not),
//! the decisions of one reconcile: which members are refused and why, which leave, the trust and token decisions,
//! the gateway every member is dialled at, each member's [`MemberPlan`] (the one `meshfed render` shows), and the
//! next requeue. The operator observes, calls these in order, and applies what they return; it decides nothing.
//! Pure: the clock comes in as an argument.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use jiff::Timestamp;
use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Namespace, Node, Secret, Service},
};
use meshfed_api::{
    ClusterRole, ClusterSpec, DataPlane, ExistingObjects, MeshFederationSpec, MeshFederationStatus, SecretKeyRef,
};

use crate::{
    conditions::Reason,
    control_plane,
    federation::{Failure, FederationRef},
    gateway::{self, GatewayAddress},
    kinds::{self, Holdings, OwnedKind, typed},
    member::{self, ClaimHolder, MemberFacts, MemberPlan},
    pki::{self, Root},
    remote::{self, Token},
    status::{Announcement, MemberReport},
    topology,
    trust::{self, TrustPlan},
    validate::Durations,
    versions::{self, SailVersions},
};

/// What one reconcile saw of a member that answered.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    /// What it holds of the federation, and the objects read by name.
    pub held: Holdings,
    /// Kinds of the owned-kinds table its API does not serve (their CRDs are not installed).
    pub unserved: BTreeSet<OwnedKind>,
    /// The nodes its gateway may run on (read where the gateway is dialled at a node's address).
    pub nodes: Vec<Node>,
    /// The pod and service ranges its API shows (read where another cluster shares its network).
    pub ranges: Vec<String>,
    /// The Istio versions its Sail operator accepts (`None`: its `Istio` CRD is not installed).
    pub sail: Option<SailVersions>,
}

/// Refuses the same cluster listed twice under two Secrets (one `kube-system` UID) among the members that answered
/// (a report with an identity and no failure): the later one in the spec gets `DuplicateCluster` and is not written.
/// Returns the names refused.
pub fn refuse_duplicates(reports: &mut [MemberReport]) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut refused = BTreeSet::new();
    for r in reports.iter_mut().filter(|r| !r.leaving && r.failure.is_none()) {
        let Some(identity) = r.identity.clone() else { continue };
        match seen.get(&identity) {
            Some(first) => {
                r.failure = Some(Failure::new(
                    Reason::DuplicateCluster,
                    format!(
                        "this is the same cluster as {first} (kube-system namespace UID {identity}); remove one of the two"
                    ),
                ));
                refused.insert(r.name.clone());
            }
            None => _ = seen.insert(identity, r.name.clone()),
        }
    }
    refused
}

/// Whether a member's kubeconfig Secret still reaches the cluster the status knows it as (`known_as`: the UID of its
/// `kube-system` namespace, `now`: the one it reaches). A Secret edited to reach another cluster is refused before
/// anything is written there: converging the new cluster under the old name would orphan everything meshfed wrote in
/// the first one, which it could then no longer reach to clean up.
pub fn same_cluster(known_as: Option<&str>, now: Option<&str>, secret: &SecretKeyRef) -> Result<(), Failure> {
    match (known_as, now) {
        (Some(was), Some(now)) if was != now => Err(Failure::new(
            Reason::ClusterChanged,
            format!(
                "kubeconfig Secret {} now reaches another cluster (kube-system UID {now}, was {was}); meshfed writes nothing there. What it wrote in the first cluster stays: point the Secret back to keep it, or to move this member, first remove it from the spec with the Secret pointing back (which cleans the first cluster up) or release it (meshfed.io/release-clusters), then add it again",
                secret.name
            ),
        )),
        _ => Ok(()),
    }
}

/// The members that hold an intermediate CA labelled for this federation: asked when the federation has no root
/// yet, which is minted only when none does (a root that is gone while members still trust it is reported, never
/// replaced behind the user's back). From a root the user brought to a generated one the members move by a
/// rotation, so then none counts.
pub fn intermediates_held(
    spec: &MeshFederationSpec,
    fref: &FederationRef,
    previous: Option<&MeshFederationStatus>,
    observed: &BTreeMap<String, Observation>,
) -> Vec<String> {
    if trust::root_was_brought(previous.and_then(|p| p.trust.as_ref())) {
        return Vec::new();
    }
    let key = kinds::cacerts_key(&spec.istio.namespace);
    observed
        .iter()
        .filter(|(name, o)| o.held.get(&key).is_some_and(|s| member::labelled_for(s, fref, name)))
        .map(|(name, _)| name.clone())
        .collect()
}

/// The trust plan over what the members that answered show: their `cacerts` and the roots their istiod publishes.
/// `roots`: the federation's root, and the others the hub keeps for a rotation.
pub fn trust_plan<'r>(
    spec: &MeshFederationSpec,
    (root, kept): (&'r Root, &'r [Root]),
    durations: &Durations,
    previous: Option<&MeshFederationStatus>,
    observed: &BTreeMap<String, Observation>,
    now: Timestamp,
) -> TrustPlan<'r> {
    let ns = &spec.istio.namespace;
    let (key, published) = (kinds::cacerts_key(ns), kinds::published_roots_key(ns));
    let held: BTreeMap<&String, (Option<Secret>, Option<ConfigMap>)> =
        observed.iter().map(|(name, o)| (name, (typed(&o.held, &key), typed(&o.held, &published)))).collect();
    let data = held
        .iter()
        .map(|(name, (secret, cm))| {
            let cacerts = secret.as_ref().and_then(|s| s.data.as_ref());
            let published =
                cm.as_ref().map(|cm| cm.data.as_ref().and_then(|d| d.get(pki::ROOT_CERT)).map_or("", |p| p.as_str()));
            ((*name).clone(), trust::Observed { cacerts, published })
        })
        .collect();
    let previous = previous.and_then(|p| p.trust.as_ref());
    trust::plan_trust(spec, root, kept, durations, previous, &data, now)
}

/// The gateway of every member that needs one: where other members dial it, from what it shows now (its gateway
/// Service and nodes), or, for a member not observed in this reconcile (unreachable, refused, or backing off), the
/// address it last showed (kept in its status). What meshfed writes into one member (a Primary's `meshNetworks`, a
/// Remote's `remotePilotAddress`) never changes because another member could not be reached.
/// `held_over`: Primaries that go on serving a Remote the spec moved away from them ([`held_over`]): their gateway
/// counts too.
pub fn gateways(
    spec: &MeshFederationSpec,
    observed: &BTreeMap<String, Observation>,
    previous: Option<&MeshFederationStatus>,
    held_over: &BTreeSet<String>,
) -> BTreeMap<String, Result<GatewayAddress, Failure>> {
    let key = kinds::ObjectKey {
        kind: kinds::SERVICE,
        namespace: Some(spec.istio.namespace.clone()),
        name: gateway::GATEWAY_NAME.into(),
    };
    let last_known = |name: &str| {
        let c = previous?.clusters.iter().find(|c| c.name == name)?;
        let addresses = c.gateway_address.as_deref()?.split(',').map(String::from).collect();
        Some(GatewayAddress { addresses, port: c.gateway_port? })
    };
    spec.clusters
        .iter()
        .filter(|c| topology::needs_gateway(spec, c) || held_over.contains(&c.name))
        .filter_map(|c| {
            let state = match observed.get(&c.name) {
                Some(o) if spec.data_plane == DataPlane::Ambient => {
                    let key = kinds::ambient_gateway_key(&spec.istio.namespace);
                    gateway::ambient_gateway_address(o.held.get(&key).map(Arc::as_ref))
                }
                Some(o) => gateway::gateway_address(c, typed::<Service>(&o.held, &key).as_ref(), &o.nodes),
                None => Ok(last_known(&c.name)?),
            };
            Some((c.name.clone(), state))
        })
        .collect()
}

/// What the plans of every member in one apply wave share: the reader token of every member some Primary reads
/// (`None`: the first wave, without remote secrets; a target missing from the map keeps the secret its holders
/// hold), the gateways, and the restart marker of every Primary whose istiod meshfed restarts after its remote
/// secrets changed ([`istiod_restarts`]).
#[derive(Debug, Clone, Copy)]
pub struct Wave<'a> {
    pub tokens: Option<&'a BTreeMap<String, Result<Token, Failure>>>,
    pub gateways: &'a BTreeMap<String, Result<GatewayAddress, Failure>>,
    pub restarts: &'a BTreeMap<String, String>,
    /// Primaries that go on serving a Remote the spec moved away from them ([`held_over`]).
    pub held_over: &'a BTreeSet<String>,
}

/// The complete plan of member `cluster`: what it holds now (`seen`), the `cacerts` data the trust plan gives it
/// (`None`: it keeps what it holds), and what every member's plan in this wave shares.
/// `meshfed render` calls this too, with placeholders, so what it shows is what the controller writes.
pub fn member_plan(
    fref: &FederationRef,
    hub: &str,
    spec: &MeshFederationSpec,
    cluster: &ClusterSpec,
    seen: &Observation,
    cacerts: Option<BTreeMap<String, ByteString>>,
    wave: Wave<'_>,
) -> MemberPlan {
    // A Primary held over plans as the Primary of a Remote still: for its own plan, only whether it serves one counts.
    let serving;
    let spec = match spec.clusters.iter().position(|c| c.role == ClusterRole::Remote) {
        Some(remote) if wave.held_over.contains(&cluster.name) => {
            let mut still = spec.clone();
            still.clusters[remote].control_plane = Some(cluster.name.clone());
            serving = still;
            &serving
        }
        _ => spec,
    };
    let remote_secrets = remote::remote_secret_targets(spec, cluster)
        .filter_map(|target| {
            let token = wave.tokens?.get(&target.name)?.as_ref().ok()?;
            Some((target.name.clone(), remote::remote_secret(fref, spec, cluster, &token.target, &token.token)))
        })
        .collect();
    let namespace = typed::<Namespace>(&seen.held, &kinds::namespace_key(&spec.istio.namespace));
    let facts = MemberFacts {
        namespace: namespace.as_ref(),
        cacerts,
        remote_secrets,
        gateways: wave.gateways.clone(),
        unserved: seen.unserved.clone(),
        istio: seen.held.get(&kinds::istio_key(&spec.istio.revision)).map(Arc::as_ref),
        istiod_restart: wave.restarts.get(&cluster.name).map(String::as_str),
        ambient: [kinds::ISTIO_CNI, kinds::ZTUNNEL].map(|kind| {
            let key = kinds::ObjectKey { kind, namespace: None, name: kinds::AMBIENT_SINGLETON.into() };
            seen.held.get(&key).map(Arc::as_ref)
        }),
    };
    let mut plan = member::member_plan(fref, hub, spec, cluster, facts);
    member::mark_adopted(&mut plan, fref, &seen.held, spec.existing_objects == ExistingObjects::Adopt);
    plan
}

/// Make before break for a Remote whose control plane moves to another Primary: the Primaries that go on serving
/// Remotes as before (their istiod exposed through their gateway, `externalIstiod`), although the spec no longer
/// makes them serve any, while a Remote may still point at them: one whose `Istio` does not yet point at its new
/// Primary's gateway (that gateway may have no address yet), or one not observed now (what it points at cannot be
/// known, and it is changed nowhere). A Primary that served no Remote (its `Istio` is not an external istiod) is not
/// held over. Once every Remote points where the spec says, what the old Primary ran for them is pruned.
pub fn held_over(
    spec: &MeshFederationSpec,
    observed: &BTreeMap<String, Observation>,
    gateways: &BTreeMap<String, Result<GatewayAddress, Failure>>,
) -> BTreeSet<String> {
    let key = kinds::istio_key(&spec.istio.revision);
    let global = |name: &str, field: &str| {
        let istio = observed.get(name)?.held.get(&key)?;
        Some(istio["spec"]["values"]["global"][field].clone())
    };
    let unswitched = spec.clusters.iter().filter(|c| c.role == ClusterRole::Remote).any(|remote| {
        if !observed.contains_key(&remote.name) {
            return true;
        }
        let primary = remote.control_plane.as_deref().unwrap_or_default();
        let target = gateways.get(primary).and_then(|g| g.as_ref().ok()?.addresses.first().cloned());
        match (global(&remote.name, "remotePilotAddress"), target) {
            // No control plane yet: it points nowhere.
            (None, _) => false,
            (Some(held), Some(target)) => held != target,
            (Some(_), None) => true,
        }
    });
    let was_serving = |p: &ClusterSpec| global(&p.name, "externalIstiod") == Some(serde_json::Value::Bool(true));
    spec.clusters
        .iter()
        .filter(|p| {
            unswitched && p.role == ClusterRole::Primary && !topology::serves_remotes(spec, p) && was_serving(p)
        })
        .map(|p| p.name.clone())
        .collect()
}

/// The gateways of a wave and the Primaries held over for a Remote that moves ([`held_over`], decided on the
/// gateways the spec asks for), whose gateways then count too.
pub fn gateways_and_held_over(
    spec: &MeshFederationSpec,
    observed: &BTreeMap<String, Observation>,
    previous: Option<&MeshFederationStatus>,
) -> (BTreeMap<String, Result<GatewayAddress, Failure>>, BTreeSet<String>) {
    let held = held_over(spec, observed, &gateways(spec, observed, previous, &BTreeSet::new()));
    (gateways(spec, observed, previous, &held), held)
}

/// How long an istiod restart that meshfed asked for holds back the restart of another Primary's istiod: at least
/// [`RESTART_SPACING`], and until the Sail operator reports that `Istio` ready for the generation meshfed wrote, for at
/// most [`RESTART_WINDOW`] (a restart that does not end must not hold the others past their tokens' expiry).
pub const RESTART_SPACING: Duration = Duration::from_secs(60);
/// See [`RESTART_SPACING`].
pub const RESTART_WINDOW: Duration = Duration::from_secs(300);

/// The istiod restarts of one wave: the marker of every Primary on an Istio version that needs a restart after its
/// remote secrets changed (the value of [`control_plane::RESTART_ANNOTATION`] on its istiod's pods), the Primaries
/// whose istiod restarts now, and when one held back may go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Restarts {
    pub markers: BTreeMap<String, String>,
    pub now: BTreeSet<String>,
    pub held_back_until: Option<Timestamp>,
    /// The federation runs in ambient mode (which has a remote secret defect of its own).
    pub ambient: bool,
}

/// Decides the istiod restarts of a wave. A Primary on a version with a defect of an updated remote secret
/// ([`versions::restart_after_remote_secret_change`]) runs istiod with a marker: the digest of the remote secrets it
/// holds once this wave is written. Its `Istio` is applied after those secrets (the last apply stage), so a changed
/// marker rolls istiod onto them: one restart per change (a token refresh, a member that joins or leaves), never
/// before the secrets are in place. At most one Primary restarts at a time: one whose marker must change waits, with
/// its current marker, while another restart is under way ([`RESTART_SPACING`]). The first wave (`tokens: None`)
/// restarts nothing: the second writes the new secrets and decides. A new `Istio` gets its first marker in the
/// second wave of the reconcile that creates it, without waiting (its istiod is only starting); so does one written
/// before meshfed used markers (its Deployment rolls once).
pub fn istiod_restarts(
    fref: &FederationRef,
    spec: &MeshFederationSpec,
    observed: &BTreeMap<String, Observation>,
    reports: &[MemberReport],
    tokens: Option<&BTreeMap<String, Result<Token, Failure>>>,
    previous: Option<&MeshFederationStatus>,
    now: Timestamp,
) -> Restarts {
    let key = kinds::istio_key(&spec.istio.revision);
    let since = |name: &str, within: Duration| {
        let c = previous?.clusters.iter().find(|c| c.name == name)?;
        let at: Timestamp = c.istiod_restarted_at.as_deref()?.parse().ok()?;
        let until = at.checked_add(jiff::SignedDuration::try_from(within).ok()?).ok()?;
        (until > now).then_some(until)
    };
    // A restart asked for in an earlier reconcile that is still under way holds the others back.
    let under_way = spec.clusters.iter().filter_map(|c| {
        let istio = observed.get(&c.name)?.held.get(&key);
        let ready = control_plane::istio_ready(istio.map(Arc::as_ref)).is_ok();
        let spacing = since(&c.name, RESTART_SPACING);
        if ready { spacing } else { spacing.or_else(|| since(&c.name, RESTART_WINDOW)) }
    });
    let mut under_way = under_way.max();
    let ambient = spec.data_plane == DataPlane::Ambient;
    let mut restarts = Restarts { ambient, ..Default::default() };
    for cluster in spec.clusters.iter().filter(|c| c.role == ClusterRole::Primary) {
        let (Some(seen), Some(report)) = (observed.get(&cluster.name), reports.iter().find(|r| r.name == cluster.name))
        else {
            continue;
        };
        let release = report.istio_version.as_ref().and_then(|v| v.release);
        if !versions::restart_after_remote_secret_change(release, ambient) {
            continue;
        }
        let Some(istio) = seen.held.get(&key) else {
            // A new `Istio`: its first marker comes with the remote secrets, in the second wave of its first
            // reconcile (its istiod is only starting then).
            continue;
        };
        let held = control_plane::restart_marker(istio).map(String::from);
        let marker = remote_secrets_digest(fref, spec, cluster, seen, tokens);
        let marker = match held {
            Some(held) if held != marker => {
                if tokens.is_none() {
                    held
                } else if under_way.is_some() {
                    restarts.held_back_until = under_way;
                    held
                } else {
                    restarts.now.insert(cluster.name.clone());
                    under_way =
                        now.checked_add(jiff::SignedDuration::try_from(RESTART_SPACING).unwrap_or_default()).ok();
                    marker
                }
            }
            _ => marker,
        };
        restarts.markers.insert(cluster.name.clone(), marker);
    }
    restarts
}

/// Records the restarts of istiod the second wave carried out (a member whose writes failed did not restart) in the
/// reports, and announces each (an Event naming the defects it works around).
pub fn record_restarts(restarts: &Restarts, reports: &mut [MemberReport], now: Timestamp) -> Vec<Announcement> {
    let done = reports.iter_mut().filter(|r| restarts.now.contains(&r.name) && r.failure.is_none());
    done.map(|r| {
        r.istiod_restarted_at = Some(now);
        let version = r.istio_version.as_ref();
        let defects = versions::remote_secret_defects(version.and_then(|v| v.release), restarts.ambient);
        let version = version.map_or("an Istio version not known".into(), |v| format!("Istio {}", v.name));
        Announcement {
            warning: false,
            reason: Reason::IstiodRestarted.to_string(),
            note: format!(
                "restarting istiod: the remote secrets it holds changed, and {version} takes an updated remote secret only when istiod restarts ({defects})"
            ),
            cluster: Some(r.name.clone()),
            kubeconfig: Some(r.kubeconfig.clone()),
        }
    })
    .collect()
}

/// The digest of the remote secrets `holder` holds once a wave with `tokens` is written: for every target, the
/// secret planned from its token, or else the one it holds.
fn remote_secrets_digest(
    fref: &FederationRef,
    spec: &MeshFederationSpec,
    holder: &ClusterSpec,
    seen: &Observation,
    tokens: Option<&BTreeMap<String, Result<Token, Failure>>>,
) -> String {
    let data: BTreeMap<&str, Option<BTreeMap<String, ByteString>>> = remote::remote_secret_targets(spec, holder)
        .map(|target| {
            let planned = tokens
                .and_then(|t| t.get(&target.name)?.as_ref().ok())
                .map(|token| remote::remote_secret(fref, spec, holder, &token.target, &token.token));
            let held = || typed::<Secret>(&seen.held, &kinds::remote_secret_key(&spec.istio.namespace, &target.name));
            (target.name.as_str(), planned.or_else(held).and_then(|s| s.data))
        })
        .collect();
    pki::fingerprint_der(&serde_json::to_vec(&data).unwrap_or_default())
}

/// The members whose reader token is had in this reconcile: every member that answered whose first wave went
/// through, and one whose writes failed where it holds its reader ServiceAccount, so that tokens are renewed
/// whatever else failed and its peers never hold an expired one.
pub fn token_targets(
    spec: &MeshFederationSpec,
    observed: &BTreeMap<String, Observation>,
    failed: &BTreeSet<String>,
) -> BTreeSet<String> {
    let reader = kinds::ObjectKey {
        kind: kinds::SERVICE_ACCOUNT,
        namespace: Some(spec.istio.namespace.clone()),
        name: remote::READER_SERVICE_ACCOUNT.into(),
    };
    let readable = |name: &String, seen: &Observation| !failed.contains(name) || seen.held.contains_key(&reader);
    observed.iter().filter(|(name, seen)| readable(name, seen)).map(|(name, _)| name.clone()).collect()
}

/// Puts the reader tokens into the reports: every member that some Primary reads gets its token's times, or why it
/// has none. One that answered but got no token this time (its writes failed before its reader was in place, or it
/// waits in its backoff) keeps its last token's facts while that token is before its refresh point; past it, its
/// remote access is not reported ready, since its peers' copies age towards expiry.
pub fn record_tokens(
    spec: &MeshFederationSpec,
    reports: &mut [MemberReport],
    tokens: &BTreeMap<String, Result<Token, Failure>>,
    previous: Option<&MeshFederationStatus>,
    ttl: Duration,
    now: Timestamp,
) {
    let placement = remote::remote_secret_placement(spec);
    let read: BTreeSet<&str> = placement.values().flatten().map(String::as_str).collect();
    let lifetime = jiff::SignedDuration::try_from(ttl).unwrap_or(jiff::SignedDuration::MAX);
    let fresh_until = |name: &str| {
        let c = previous?.clusters.iter().find(|c| c.name == name)?;
        let expires: Timestamp = c.reader_token_expires_at.as_deref()?.parse().ok()?;
        Some(remote::token_refresh_at(expires.checked_sub(lifetime).unwrap_or(expires), expires))
    };
    for r in reports.iter_mut().filter(|r| !r.leaving) {
        match (tokens.get(&r.name), &r.failure) {
            (Some(Ok(t)), _) => (r.token_expires_at, r.token_refresh_at) = (Some(t.expires_at), Some(t.refresh_at)),
            (Some(Err(f)), _) => r.remote_access = Some(f.clone()),
            (None, Some(f)) if r.version.is_some() && read.contains(r.name.as_str()) => match fresh_until(&r.name) {
                Some(at) if at > now => r.token_refresh_at = Some(at),
                _ => {
                    r.remote_access = Some(Failure::new(
                        Reason::TokenNotRefreshed,
                        format!(
                            "its reader token is past its refresh point and no fresh one could be had, so its peers' copies age towards expiry: {}",
                            f.message
                        ),
                    ))
                }
            },
            (None, _) => {}
        }
    }
}

/// What cleanup does with a member that left the spec, or whose federation is deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leave {
    /// Prune everything meshfed wrote there for the federation.
    Clean,
    /// It is still in the spec under another name (the same cluster: its `kube-system` UID, or the same kubeconfig
    /// Secret where that member did not answer): the member that stays relabels what it holds; nothing is removed.
    Renamed(String),
    /// Its claim names another holder (another federation, or one of the same namespace and name in another hub,
    /// whose objects carry the same labels): nothing there is the federation's to remove.
    ClaimedBy(String),
}

/// What cleanup does with `leaving`, given what it shows (`seen`) and the members that stay (`staying`; none when
/// the federation is deleted).
pub fn leave(
    fref: &FederationRef,
    hub: &str,
    spec: &MeshFederationSpec,
    leaving: &MemberReport,
    seen: &Observation,
    staying: &[MemberReport],
) -> Leave {
    let same_cluster = |s: &&MemberReport| match (&s.identity, &leaving.identity) {
        (Some(a), Some(b)) => a == b,
        _ => s.version.is_none() && s.kubeconfig == leaving.kubeconfig,
    };
    if let Some(s) = staying.iter().filter(|s| !s.leaving).find(same_cluster) {
        return Leave::Renamed(s.name.clone());
    }
    let claim = seen.held.get(&kinds::claim_key(&spec.istio.namespace));
    let meta = claim.and_then(|c| serde_json::from_value(c["metadata"].clone()).ok());
    match meta.map(|m| member::claim_holder(&m, fref, hub, &leaving.name)) {
        Some(ClaimHolder::Other { federation, hub: their_hub }) if their_hub == hub => Leave::ClaimedBy(federation),
        Some(ClaimHolder::Other { federation, hub: their_hub }) => {
            Leave::ClaimedBy(format!("{federation} in another hub ({their_hub})"))
        }
        _ => Leave::Clean,
    }
}

/// After a cleanup of `report` that failed: whether the member may be let go all the same. One that was never
/// reached holds nothing of the federation (the status may not show yet that the last reconcile reached it: a
/// report from the backoff says so too); one named in the release annotation is let go as it is.
pub fn let_go_after_failure(
    report: &mut MemberReport,
    previous: Option<&MeshFederationStatus>,
    release_annotation: Option<&String>,
) {
    if report.failure.is_none() {
        return;
    }
    let last = previous.and_then(|s| s.clusters.iter().find(|c| c.name == report.name));
    if report.version.is_none() && last.is_none_or(|c| c.last_seen.is_none()) {
        report.failure = None;
    } else if crate::federation::release_requested(release_annotation, &report.name) {
        report.failure = None;
        report.released = true;
    }
}

/// The members that left the spec but that the status still lists (not cleaned up yet), with their kubeconfig
/// Secret: every reconcile cleans them up until they hold nothing of the federation.
pub fn leaving_members(
    spec: &MeshFederationSpec,
    status: Option<&MeshFederationStatus>,
) -> Vec<(String, SecretKeyRef)> {
    status
        .into_iter()
        .flat_map(|s| &s.clusters)
        .filter(|c| !spec.clusters.iter().any(|m| m.name == c.name))
        .filter_map(|c| Some((c.name.clone(), c.kubeconfig_secret_ref.clone()?)))
        .collect()
}

/// The shortest wait before the next reconcile, so that a deadline already due does not spin.
pub const MIN_REQUEUE: Duration = Duration::from_secs(1);

/// How long a converged federation waits for its next reconcile: until the earliest of the next reader token
/// refresh, the next intermediate renewal (`renew_before` ahead of an intermediate's expiry), the next renewal (or
/// alarm) of the hub's credential for a member ([`crate::credential::CredentialReport::due_at`]) and the `resync`,
/// and at least [`MIN_REQUEUE`]. Without this a short `tokenTTL` or `renewBefore` would fall due between two
/// resyncs and expire first.
pub fn next_deadline(members: &[MemberReport], renew_before: Duration, now: Timestamp, resync: Duration) -> Duration {
    let renewals = members
        .iter()
        .filter_map(|m| m.intermediate.as_ref()?.as_ref().ok())
        .map(|i| crate::pki::renewal_at(i.not_after, renew_before).unwrap_or(now));
    let refreshes = members.iter().filter_map(|m| m.token_refresh_at);
    let credentials = members.iter().filter_map(|m| m.credential.as_ref()?.due_at);
    let earliest = renewals.chain(refreshes).chain(credentials).min();
    let until = |at: Timestamp| Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO);
    earliest.map_or(resync, |at| until(at).min(resync)).max(MIN_REQUEUE)
}

/// How the spec fared, for the requeue: invalid (waits for an edit), refused on what the members show (overlapping
/// ranges: tried again, since the members may change), or valid with its durations.
#[derive(Debug, Clone, Copy)]
pub enum Verdict<'a> {
    Invalid,
    RefusedByMembers,
    Valid(&'a Durations),
}

/// When to look at the federation again: how long, or `None` to wait for a change of the federation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How soon a federation that is not ready is looked at again.
    pub retry_after: Duration,
    /// How often a ready federation is checked against its members.
    pub resync_after: Duration,
}

/// When the next reconcile is due: an invalid spec waits for its next edit (retrying cannot fix it); a ready
/// federation at its earliest deadline ([`next_deadline`]) or when a held back istiod restart may go (`wake_at`);
/// a rotation that waits for workload certificates to
/// expire when they have (`wake_at`, within retry and resync); anything else that is not ready soon.
pub fn requeue(
    verdict: Verdict<'_>,
    ready: bool,
    wake_at: Option<Timestamp>,
    reports: &[MemberReport],
    now: Timestamp,
    timing: Timing,
) -> Option<Duration> {
    match (verdict, ready, wake_at) {
        (Verdict::Invalid, _, _) => None,
        (Verdict::RefusedByMembers, _, _) => Some(timing.retry_after),
        (Verdict::Valid(d), true, wake_at) => {
            let deadline = next_deadline(reports, d.renew_before, now, timing.resync_after);
            let woken = wake_at.map(|at| Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO));
            Some(woken.map_or(deadline, |w| w.min(deadline)).max(MIN_REQUEUE))
        }
        (Verdict::Valid(_), false, Some(at)) => {
            Some(at.duration_since(now).unsigned_abs().clamp(timing.retry_after, timing.resync_after))
        }
        (Verdict::Valid(_), false, None) => Some(timing.retry_after),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        pki::CertSummary,
        status::tests::{now, report},
    };

    fn spec(yaml_clusters: &str) -> MeshFederationSpec {
        serde_saphyr::from_str(&format!("meshID: m\ntrust: {{root: {{generate: {{}}}}}}\nclusters:\n{yaml_clusters}"))
            .unwrap()
    }

    fn fref() -> FederationRef {
        FederationRef { namespace: "mesh-system".into(), name: "prod".into() }
    }

    /// Two Primaries on two networks, east's gateway at a fixed address (one that istiod knows only from
    /// `meshNetworks`).
    fn two_networks() -> MeshFederationSpec {
        spec(
            "- {name: east, network: n1, kubeconfigSecretRef: {name: east}, eastWestGateway: {address: 192.0.2.10}}\n- {name: west, network: n2, kubeconfigSecretRef: {name: west}, eastWestGateway: {address: 192.0.2.20}}\n",
        )
    }

    fn status_with_gateway(name: &str, address: &str, port: i32) -> MeshFederationStatus {
        let cluster = meshfed_api::ClusterStatus {
            name: name.into(),
            gateway_address: Some(address.into()),
            gateway_port: Some(port),
            ..Default::default()
        };
        MeshFederationStatus { clusters: vec![cluster], ..Default::default() }
    }

    fn held(entries: Vec<(kinds::ObjectKey, serde_json::Value)>) -> Observation {
        Observation { held: entries.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(), ..Default::default() }
    }

    #[test]
    fn a_member_not_reached_keeps_its_last_known_gateway_in_every_other_members_plan() {
        let s = two_networks();
        let previous = status_with_gateway("west", "192.0.2.20", 15443);
        // Only east answered this time.
        let observed = BTreeMap::from([("east".to_string(), Observation::default())]);
        let gateways = gateways(&s, &observed, Some(&previous), &BTreeSet::new());
        assert_eq!(gateways["west"], Ok(GatewayAddress { addresses: vec!["192.0.2.20".into()], port: 15443 }));
        // So east's `Istio` keeps west's network in `meshNetworks`.
        let wave = Wave { tokens: None, gateways: &gateways, restarts: &BTreeMap::new(), held_over: &BTreeSet::new() };
        let plan = member_plan(&fref(), "hub", &s, &s.clusters[0], &observed["east"], None, wave);
        let istio = plan.objects.iter().find(|d| d.key.kind == kinds::ISTIO).expect("east's Istio");
        let networks = &istio.body["spec"]["values"]["meshConfig"]["meshNetworks"];
        let networks =
            if networks.is_null() { &istio.body["spec"]["values"]["global"]["meshNetworks"] } else { networks };
        assert!(networks.to_string().contains("192.0.2.20"), "west's gateway stays in east's meshNetworks: {networks}");
        // Without a last known address, a member not reached is not invented.
        assert!(!super::gateways(&s, &observed, None, &BTreeSet::new()).contains_key("west"));
    }

    /// Three Primaries on one network, each holding a remote secret with token `t1` for every other, its `Istio`
    /// ready with the marker of what it holds, on Istio `version`.
    fn three_primaries(version: &str) -> (MeshFederationSpec, BTreeMap<String, Observation>, Vec<MemberReport>) {
        let s = spec(
            "- {name: east, network: n1, kubeconfigSecretRef: {name: east}}\n- {name: west, network: n1, kubeconfigSecretRef: {name: west}}\n- {name: north, network: n1, kubeconfigSecretRef: {name: north}}\n",
        );
        let mut observed = BTreeMap::new();
        let mut reports = Vec::new();
        for holder in &s.clusters {
            let secrets = remote::remote_secret_targets(&s, holder).map(|t| {
                let secret =
                    remote::remote_secret(&fref(), &s, holder, &target(&t.name), &remote::ReaderToken::new("t1"));
                (kinds::remote_secret_key("istio-system", &t.name), serde_json::to_value(secret).unwrap())
            });
            let mut seen = held(secrets.collect());
            let marker = remote_secrets_digest(&fref(), &s, holder, &seen, None);
            seen.held.insert(kinds::istio_key("default"), Arc::new(ready_istio(&marker)));
            observed.insert(holder.name.clone(), seen);
            let mut r = report(&holder.name, Some("v1.34.2"), None);
            r.istio_version = crate::versions::member_version(Some(version), None).unwrap();
            reports.push(r);
        }
        (s, observed, reports)
    }

    fn target(name: &str) -> remote::RemoteTarget {
        remote::RemoteTarget {
            cluster: name.into(),
            server: format!("https://{name}:6443"),
            ca_data_base64: None,
            tls_server_name: None,
        }
    }

    fn ready_istio(marker: &str) -> serde_json::Value {
        serde_json::json!({
            "metadata": {"name": "default", "generation": 1},
            "spec": {"values": {"pilot": {"podAnnotations": {control_plane::RESTART_ANNOTATION: marker}}}},
            "status": {"observedGeneration": 1, "conditions": [{"type": "Ready", "status": "True"}]},
        })
    }

    /// North's reader token refreshed: `t2`.
    fn north_refreshed() -> BTreeMap<String, Result<Token, Failure>> {
        let token = Token {
            target: target("north"),
            token: remote::ReaderToken::new("t2"),
            expires_at: now(),
            refresh_at: now(),
        };
        BTreeMap::from([("north".to_string(), Ok(token))])
    }

    fn restarted_at(name: &str, at: Timestamp) -> MeshFederationStatus {
        let cluster = meshfed_api::ClusterStatus {
            name: name.into(),
            istiod_restarted_at: Some(at.to_string()),
            ..Default::default()
        };
        MeshFederationStatus { clusters: vec![cluster], ..Default::default() }
    }

    #[test]
    fn on_an_affected_istio_a_token_refresh_restarts_each_primary_holding_it_once_one_at_a_time() {
        let (s, observed, mut reports) = three_primaries("v1.30.3");
        let held_marker = |name: &str| {
            control_plane::restart_marker(&observed[name].held[&kinds::istio_key("default")]).unwrap().to_string()
        };
        // Steady state: every marker stays as held, nothing restarts, in either wave.
        let tokens_kept = BTreeMap::new();
        for tokens in [None, Some(&tokens_kept)] {
            let steady = istiod_restarts(&fref(), &s, &observed, &reports, tokens, None, now());
            assert!(steady.now.is_empty() && steady.held_back_until.is_none(), "{steady:?}");
            assert!(["east", "west", "north"].iter().all(|n| steady.markers[*n] == held_marker(n)));
        }
        // North's token is refreshed: east and west hold it; the first wave writes no secret and restarts nothing.
        let fresh = north_refreshed();
        let first = istiod_restarts(&fref(), &s, &observed, &reports, None, None, now());
        assert!(first.now.is_empty(), "the first wave writes no remote secret");
        // The second wave writes the new secrets and restarts east's istiod with them; west waits its turn; north
        // holds no secret for itself.
        let second = istiod_restarts(&fref(), &s, &observed, &reports, Some(&fresh), None, now());
        assert_eq!(second.now, BTreeSet::from(["east".to_string()]));
        assert_ne!(second.markers["east"], held_marker("east"), "east's istiod rolls onto the new secret");
        assert_eq!(second.markers["west"], held_marker("west"), "west's istiod is not restarted at the same time");
        assert_eq!(second.markers["north"], held_marker("north"));
        let spacing = jiff::SignedDuration::try_from(RESTART_SPACING).unwrap();
        assert_eq!(second.held_back_until, Some(now() + spacing));
        let announced = record_restarts(&second, &mut reports, now());
        assert_eq!(reports[0].istiod_restarted_at, Some(now()));
        assert!(
            announced[0].note.contains("Istio v1.30.3") && announced[0].note.contains("#61043, #60920"),
            "{}",
            announced[0].note
        );

        // The next reconcile, 30 s on (east's Istio was re-applied with its marker and reported ready): west still
        // waits for the spacing; once it passed, west restarts, and east is not restarted again.
        let mut after = observed.clone();
        let east_now = ready_istio(&second.markers["east"]);
        after.get_mut("east").unwrap().held.insert(kinds::istio_key("default"), Arc::new(east_now.clone()));
        for (name, r) in [("east", 0), ("west", 1)] {
            let secret =
                remote::remote_secret(&fref(), &s, &s.clusters[r], &target("north"), &remote::ReaderToken::new("t2"));
            after.get_mut(name).unwrap().held.insert(
                kinds::remote_secret_key("istio-system", "north"),
                Arc::new(serde_json::to_value(secret).unwrap()),
            );
        }
        let previous = restarted_at("east", now());
        let soon = istiod_restarts(
            &fref(),
            &s,
            &after,
            &reports,
            Some(&tokens_kept),
            Some(&previous),
            now() + jiff::SignedDuration::from_secs(30),
        );
        assert!(soon.now.is_empty() && soon.held_back_until == Some(now() + spacing), "{soon:?}");
        let later = now() + jiff::SignedDuration::from_secs(61);
        let then = istiod_restarts(&fref(), &s, &after, &reports, Some(&tokens_kept), Some(&previous), later);
        assert_eq!(then.now, BTreeSet::from(["west".to_string()]));
        assert_eq!(then.markers["east"], second.markers["east"], "one restart per change");
        // East's restart that is not reported ready holds west back longer, but not past the window.
        after.get_mut("east").unwrap().held.insert(kinds::istio_key("default"), Arc::new(serde_json::json!({"metadata": {"generation": 2}, "spec": east_now["spec"], "status": {"observedGeneration": 1}})));
        assert!(
            istiod_restarts(&fref(), &s, &after, &reports, Some(&tokens_kept), Some(&previous), later).now.is_empty()
        );
        let past = now() + jiff::SignedDuration::try_from(RESTART_WINDOW).unwrap();
        assert_eq!(
            istiod_restarts(&fref(), &s, &after, &reports, Some(&tokens_kept), Some(&previous), past).now.len(),
            1
        );
    }

    #[test]
    fn on_a_fixed_istio_a_token_refresh_restarts_nothing_and_istiod_carries_no_marker() {
        for version in ["v1.30.4", "v1.31.0"] {
            let (s, observed, reports) = three_primaries(version);
            let r = istiod_restarts(&fref(), &s, &observed, &reports, Some(&north_refreshed()), None, now());
            assert_eq!(r, Restarts::default(), "{version}");
        }
        // A version that is not known gets the workaround.
        let (s, observed, mut reports) = three_primaries("v1.30.4");
        reports.iter_mut().for_each(|r| r.istio_version = None);
        let r = istiod_restarts(&fref(), &s, &observed, &reports, Some(&north_refreshed()), None, now());
        assert_eq!(r.now.len(), 1);
    }

    #[test]
    fn in_ambient_mode_istio_1_30_4_still_restarts_istiod_after_a_token_refresh_naming_the_ambient_defect() {
        let (mut s, observed, mut reports) = three_primaries("v1.30.4");
        s.data_plane = meshfed_api::DataPlane::Ambient;
        let r = istiod_restarts(&fref(), &s, &observed, &reports, Some(&north_refreshed()), None, now());
        assert_eq!(r.now.len(), 1, "{r:?}");
        let announced = record_restarts(&r, &mut reports, now());
        assert!(announced[0].note.contains("(istio/istio#60033)"), "{}", announced[0].note);
        s.istio.version = Some("v1.31.0".into());
        let (_, observed, reports) = three_primaries("v1.31.0");
        let r = istiod_restarts(&fref(), &s, &observed, &reports, Some(&north_refreshed()), None, now());
        assert!(r.now.is_empty() && r.markers.is_empty(), "{r:?}");
    }

    #[test]
    fn a_new_istio_gets_its_first_marker_without_a_restart_and_a_failed_write_is_no_restart() {
        let (s, mut observed, mut reports) = three_primaries("v1.29.6");
        observed.get_mut("east").unwrap().held.remove(&kinds::istio_key("default"));
        let first = istiod_restarts(&fref(), &s, &observed, &reports, None, None, now());
        assert!(!first.markers.contains_key("east"), "the first wave creates east's Istio without a marker: {first:?}");
        let mut unmarked = ready_istio("");
        unmarked["spec"]["values"]["pilot"]["podAnnotations"] = serde_json::Value::Null;
        let mut created = observed.clone();
        created.get_mut("east").unwrap().held.insert(kinds::istio_key("default"), Arc::new(unmarked));
        let second = istiod_restarts(&fref(), &s, &created, &reports, Some(&north_refreshed()), None, now());
        assert!(second.markers.contains_key("east") && !second.now.contains("east"), "{second:?}");
        let r = istiod_restarts(&fref(), &s, &observed, &reports, Some(&north_refreshed()), None, now());
        assert_eq!(r.now, BTreeSet::from(["west".to_string()]), "the first Primary with an istiod running restarts");
        reports[1].failure = Some(Failure::new(Reason::WriteFailed, "quota"));
        assert!(record_restarts(&r, &mut reports, now()).is_empty());
        assert_eq!(reports[1].istiod_restarted_at, None);
    }

    #[test]
    fn a_member_whose_writes_failed_still_gets_a_token_where_it_holds_its_reader() {
        let s = two_networks();
        let reader = kinds::ObjectKey {
            kind: kinds::SERVICE_ACCOUNT,
            namespace: Some("istio-system".into()),
            name: remote::READER_SERVICE_ACCOUNT.into(),
        };
        let with_reader = held(vec![(reader, serde_json::json!({"metadata": {"name": "meshfed-reader"}}))]);
        let observed =
            BTreeMap::from([("east".to_string(), with_reader), ("west".to_string(), Observation::default())]);
        let all = BTreeSet::from(["east".to_string(), "west".to_string()]);
        assert_eq!(token_targets(&s, &observed, &BTreeSet::new()), all, "every member that answered");
        // Both failed their first wave: east holds its reader (a token for it works), west does not (yet).
        assert_eq!(token_targets(&s, &observed, &all), BTreeSet::from(["east".to_string()]));
    }

    #[test]
    fn a_primary_goes_on_serving_a_remote_that_moves_to_another_until_it_points_there() {
        // West moves from east to north, whose gateway has no address yet.
        let s = spec(
            "- {name: east, network: n1, kubeconfigSecretRef: {name: east}}\n- {name: north, network: n1, kubeconfigSecretRef: {name: north}}\n- {name: west, network: n1, role: Remote, controlPlane: north, kubeconfigSecretRef: {name: west}}\n",
        );
        let istio = |global: serde_json::Value| {
            (kinds::istio_key("default"), serde_json::json!({"spec": {"values": {"global": global}}}))
        };
        let mut observed = BTreeMap::from([
            ("east".to_string(), held(vec![istio(serde_json::json!({"externalIstiod": true}))])),
            ("north".to_string(), held(vec![istio(serde_json::json!({}))])),
            ("west".to_string(), held(vec![istio(serde_json::json!({"remotePilotAddress": "192.0.2.1"}))])),
        ]);
        let mut gateways =
            BTreeMap::from([("north".to_string(), Err(Failure::new(Reason::NoNodeAddresses, "no node")))]);
        let east_keeps = BTreeSet::from(["east".to_string()]);
        assert_eq!(held_over(&s, &observed, &gateways), east_keeps, "west still points at east");
        // East's plan then still exposes istiod to its Remote and runs an external istiod.
        let (restarts, kept) = (BTreeMap::new(), east_keeps.clone());
        let wave = Wave { tokens: None, gateways: &gateways, restarts: &restarts, held_over: &kept };
        let plan = member_plan(&fref(), "hub", &s, &s.clusters[0], &observed["east"], None, wave);
        let istio_of =
            |plan: &MemberPlan| plan.objects.iter().find(|d| d.key.kind == kinds::ISTIO).unwrap().body.clone();
        assert_eq!(istio_of(&plan)["spec"]["values"]["global"]["externalIstiod"], true);
        assert!(plan.objects.iter().any(|d| d.key.kind == kinds::VIRTUAL_SERVICE), "istiod stays exposed");
        let unheld = Wave { held_over: &BTreeSet::new(), ..wave };
        let moved = member_plan(&fref(), "hub", &s, &s.clusters[0], &observed["east"], None, unheld);
        assert!(istio_of(&moved)["spec"]["values"]["global"]["externalIstiod"].is_null(), "without the hold");
        // North's gateway has an address, but west's Istio is not re-applied yet: still held over.
        let north = GatewayAddress { addresses: vec!["192.0.2.9".into()], port: 15443 };
        gateways.insert("north".into(), Ok(north));
        assert_eq!(held_over(&s, &observed, &gateways), east_keeps);
        // West unreachable: what it points at is not known, so east goes on serving.
        observed.remove("west");
        assert_eq!(held_over(&s, &observed, &gateways), east_keeps);
        // West points at north: east is let go.
        observed.insert("west".into(), held(vec![istio(serde_json::json!({"remotePilotAddress": "192.0.2.9"}))]));
        assert!(held_over(&s, &observed, &gateways).is_empty());
    }

    #[test]
    fn a_kubeconfig_secret_that_reaches_another_cluster_is_refused() {
        let secret = SecretKeyRef { name: "east-kubeconfig".into(), key: "kubeconfig".into() };
        assert_eq!(same_cluster(Some("uid-1"), Some("uid-1"), &secret), Ok(()));
        assert_eq!(same_cluster(None, Some("uid-2"), &secret), Ok(()), "first contact: nothing known yet");
        let moved = same_cluster(Some("uid-1"), Some("uid-2"), &secret).unwrap_err();
        assert_eq!(moved.reason, Reason::ClusterChanged);
        assert!(
            moved.message.contains("east-kubeconfig")
                && moved.message.contains("uid-2")
                && moved.message.contains("was uid-1")
        );
    }

    #[test]
    fn the_same_cluster_listed_twice_is_refused_in_its_later_listing_only() {
        let mut reports = [report("a", Some("v"), None), report("b", Some("v"), None), report("c", None, None)];
        reports[0].identity = Some("uid-1".into());
        reports[1].identity = Some("uid-1".into());
        reports[2].identity = Some("uid-1".into());
        reports[2].failure = Some(Failure::new(Reason::Unreachable, "down"));
        let refused = refuse_duplicates(&mut reports);
        assert_eq!(refused, BTreeSet::from(["b".to_string()]));
        assert_eq!(reports[1].failure.as_ref().unwrap().reason, Reason::DuplicateCluster);
        assert!(reports[0].failure.is_none());
        assert_eq!(
            reports[2].failure.as_ref().unwrap().reason,
            Reason::Unreachable,
            "one that did not answer is not judged"
        );
    }

    #[test]
    fn only_intermediates_labelled_for_the_federation_hold_a_root_back() {
        let s = two_networks();
        let key = kinds::cacerts_key("istio-system");
        let ours = serde_json::json!({"metadata": {"labels": fref().owned_labels("east")}});
        let theirs = serde_json::json!({"metadata": {"name": "cacerts"}});
        let observed = BTreeMap::from([
            ("east".to_string(), held(vec![(key.clone(), ours)])),
            ("west".to_string(), held(vec![(key, theirs)])),
        ]);
        assert_eq!(intermediates_held(&s, &fref(), None, &observed), vec!["east".to_string()]);
        let brought = MeshFederationStatus {
            trust: Some(meshfed_api::TrustStatus { root_source: Some("secretRef".into()), ..Default::default() }),
            ..Default::default()
        };
        let from_brought = intermediates_held(&s, &fref(), Some(&brought), &observed);
        assert_eq!(from_brought.is_empty(), crate::trust::root_was_brought(brought.trust.as_ref()));
    }

    #[test]
    fn a_renamed_cluster_is_not_cleaned_up_and_another_hubs_claim_is_not_touched() {
        let s = spec("- {name: east2, network: n1, kubeconfigSecretRef: {name: east}}\n");
        let mut old = report("east", Some("v"), None);
        old.leaving = true;
        old.identity = Some("uid-east".into());
        let mut new = report("east2", Some("v"), None);
        new.identity = Some("uid-east".into());
        let nothing = Observation::default();
        assert_eq!(
            leave(&fref(), "hub-a", &s, &old, &nothing, std::slice::from_ref(&new)),
            Leave::Renamed("east2".into())
        );
        // The new name did not answer: the same kubeconfig Secret says it is the same cluster.
        let (mut silent, mut old_same_secret) = (report("east2", None, None), old.clone());
        silent.kubeconfig = SecretKeyRef { name: "east".into(), key: "kubeconfig".into() };
        old_same_secret.kubeconfig = silent.kubeconfig.clone();
        assert_eq!(leave(&fref(), "hub-a", &s, &old_same_secret, &nothing, &[silent]), Leave::Renamed("east2".into()));
        // Another cluster: cleaned, unless its claim names another hub's federation of the same name.
        let mut other = new.clone();
        other.identity = Some("uid-west".into());
        assert_eq!(leave(&fref(), "hub-a", &s, &old, &nothing, std::slice::from_ref(&other)), Leave::Clean);
        let claim = crate::member::claim(&fref(), "hub-b", &s, "east");
        let claimed = held(vec![(kinds::claim_key("istio-system"), serde_json::to_value(&claim).unwrap())]);
        assert!(
            matches!(leave(&fref(), "hub-a", &s, &old, &claimed, &[other.clone()]), Leave::ClaimedBy(h) if h.contains("hub-b"))
        );
        let ours = crate::member::claim(&fref(), "hub-a", &s, "east");
        let ours = held(vec![(kinds::claim_key("istio-system"), serde_json::to_value(&ours).unwrap())]);
        assert_eq!(leave(&fref(), "hub-a", &s, &old, &ours, &[other]), Leave::Clean);
    }

    #[test]
    fn a_member_whose_writes_fail_is_not_reported_with_remote_access_once_its_token_is_due() {
        let s = two_networks();
        let ttl = Duration::from_secs(24 * 3600);
        let failed = || {
            let mut r = report("west", Some("v"), Some(Failure::new(Reason::WriteFailed, "quota exceeded")));
            r.identity = Some("uid".into());
            r
        };
        let previous = |expires: Timestamp| {
            let cluster = meshfed_api::ClusterStatus {
                name: "west".into(),
                reader_token_expires_at: Some(expires.to_string()),
                ..Default::default()
            };
            MeshFederationStatus { clusters: vec![cluster], ..Default::default() }
        };
        // Issued an hour ago: before its refresh point, its facts stand.
        let mut reports = [failed()];
        let fresh = previous(now() + jiff::SignedDuration::from_hours(23));
        record_tokens(&s, &mut reports, &BTreeMap::new(), Some(&fresh), ttl, now());
        assert!(reports[0].remote_access.is_none());
        assert!(reports[0].token_refresh_at.is_some_and(|at| at > now()));
        // Issued 20 hours ago, past its refresh point (2/3 of its life): not ready, and says why.
        let mut reports = [failed()];
        let due = previous(now() + jiff::SignedDuration::from_hours(4));
        record_tokens(&s, &mut reports, &BTreeMap::new(), Some(&due), ttl, now());
        let f = reports[0].remote_access.as_ref().expect("remote access not ready");
        assert_eq!(f.reason, Reason::TokenNotRefreshed);
        assert!(f.message.contains("quota exceeded"), "{}", f.message);
        // A token had this time: its times, whatever else failed.
        let mut reports = [failed()];
        let target = remote::RemoteTarget {
            cluster: "west".into(),
            server: "https://w".into(),
            ca_data_base64: None,
            tls_server_name: None,
        };
        let (expires_at, refresh_at) =
            (now() + jiff::SignedDuration::from_hours(24), now() + jiff::SignedDuration::from_hours(16));
        let token = Token { target, token: remote::ReaderToken::new("t"), expires_at, refresh_at };
        record_tokens(&s, &mut reports, &BTreeMap::from([("west".to_string(), Ok(token))]), Some(&due), ttl, now());
        assert!(reports[0].remote_access.is_none());
        assert_eq!(reports[0].token_expires_at, Some(expires_at));
    }

    #[test]
    fn the_next_reconcile_follows_the_verdict_readiness_and_a_waiting_rotation() {
        let timing = Timing { retry_after: Duration::from_secs(5), resync_after: Duration::from_secs(300) };
        let durations = crate::validate::validate(&two_networks()).unwrap().durations;
        let up = [report("east", Some("v"), None)];
        assert_eq!(
            requeue(Verdict::Invalid, false, None, &up, now(), timing),
            None,
            "an invalid spec waits for an edit"
        );
        assert_eq!(requeue(Verdict::RefusedByMembers, false, None, &up, now(), timing), Some(timing.retry_after));
        let ready = requeue(Verdict::Valid(&durations), true, None, &up, now(), timing);
        assert_eq!(ready, Some(next_deadline(&up, durations.renew_before, now(), timing.resync_after)));
        let in_a_minute = now() + jiff::SignedDuration::from_mins(1);
        assert_eq!(
            requeue(Verdict::Valid(&durations), false, Some(in_a_minute), &up, now(), timing),
            Some(Duration::from_secs(60))
        );
        let in_a_day = now() + jiff::SignedDuration::from_hours(24);
        assert_eq!(
            requeue(Verdict::Valid(&durations), false, Some(in_a_day), &up, now(), timing),
            Some(timing.resync_after)
        );
        assert_eq!(requeue(Verdict::Valid(&durations), false, None, &up, now(), timing), Some(timing.retry_after));
    }

    #[test]
    fn a_converged_federation_wakes_for_the_renewal_of_a_hub_credential_and_one_that_is_not_ready_retries_as_ever() {
        let timing = Timing { retry_after: Duration::from_secs(5), resync_after: Duration::from_secs(300) };
        let durations = crate::validate::validate(&two_networks()).unwrap().durations;
        let mut up = [report("east", Some("v"), None)];
        let due_at = now() + jiff::SignedDuration::from_secs(90);
        up[0].credential = Some(crate::credential::CredentialReport {
            expires_at: Some(now() + jiff::SignedDuration::from_mins(10)),
            due_at: Some(due_at),
            note: String::new(),
            warning: None,
        });
        let ready = requeue(Verdict::Valid(&durations), true, None, &up, now(), timing);
        assert_eq!(ready, Some(Duration::from_secs(90)), "at its renewal point, before the resync");
        up[0].credential.as_mut().unwrap().due_at = Some(now() + jiff::SignedDuration::from_hours(480));
        assert_eq!(requeue(Verdict::Valid(&durations), true, None, &up, now(), timing), Some(timing.resync_after));
        let not_ready = requeue(Verdict::Valid(&durations), false, None, &up, now(), timing);
        assert_eq!(not_ready, Some(timing.retry_after), "a renewal far ahead never delays a retry");
    }

    #[test]
    fn a_failed_cleanup_lets_go_only_of_members_never_reached_or_released() {
        let failing = || report("west", Some("v"), Some(Failure::new(Reason::WriteFailed, "refused")));
        let mut r = failing();
        let_go_after_failure(&mut r, None, None);
        assert!(r.failure.is_some(), "reached now: it may hold objects");
        let mut r = report("west", None, Some(Failure::new(Reason::Unreachable, "down")));
        let_go_after_failure(&mut r, None, None);
        assert!(r.failure.is_none(), "never reached: holds nothing");
        let mut r = failing();
        let_go_after_failure(&mut r, None, Some(&"east, west".to_string()));
        assert!(r.failure.is_none() && r.released);
    }

    #[test]
    fn a_converged_federation_is_looked_at_again_at_its_earliest_deadline() {
        let resync = Duration::from_secs(300);
        let day = Duration::from_secs(24 * 3600);
        let mut east = report("east", Some("v"), None);
        let west = report("west", Some("v"), None);
        // Nothing due before the resync: the resync.
        assert_eq!(next_deadline(&[east.clone(), west.clone()], day, now(), resync), resync);
        // A token due in 2 minutes.
        east.token_refresh_at = Some(now() + jiff::SignedDuration::from_mins(2));
        assert_eq!(next_deadline(&[east.clone(), west.clone()], day, now(), resync), Duration::from_secs(120));
        // An intermediate (valid until 2027-01-01) due for renewal in one minute, with renewBefore reaching back
        // to a minute from now.
        let not_after: Timestamp = "2027-01-01T00:00:00Z".parse().unwrap();
        let renew_before =
            Duration::try_from(not_after.duration_since(now() + jiff::SignedDuration::from_mins(1))).unwrap();
        assert_eq!(next_deadline(&[east.clone(), west.clone()], renew_before, now(), resync), Duration::from_secs(60));
        // Already due (a renewal that failed and is retried): soon, never at once.
        east.token_refresh_at = Some(now() - jiff::SignedDuration::from_mins(1));
        assert_eq!(next_deadline(&[east, west], day, now(), resync), MIN_REQUEUE);
        // An unreachable member has no intermediate or token to wait for.
        assert_eq!(next_deadline(&[report("gone", None, None)], day, now(), resync), resync);
    }

    #[test]
    fn an_intermediate_with_a_short_renew_before_never_expires_when_reconciles_follow_the_deadline() {
        // Intermediates of 30 minutes renewed 10 minutes ahead (the shortest renewBefore `Valid` accepts), over a
        // day sampled every second: the one in place is never expired, although the resync is an hour (looked at
        // only at the resync, each would expire 30 minutes after it was issued).
        let (validity, renew_before) = (Duration::from_secs(1800), Duration::from_secs(600));
        let resync = Duration::from_secs(3600);
        let start = now();
        let end = start + jiff::SignedDuration::from_hours(24);
        let issue = |at: Timestamp| CertSummary {
            fingerprint: format!("sha256:{}", at.as_second()),
            not_after: at + jiff::SignedDuration::try_from(validity).unwrap(),
        };
        let (mut at, mut held, mut issued) = (start, issue(start), 1);
        while at < end {
            if crate::pki::renewal_at(held.not_after, renew_before).is_none_or(|due| at >= due) {
                held = issue(at);
                issued += 1;
            }
            let mut r = report("east", Some("v"), None);
            r.intermediate = Some(Ok(held.clone()));
            let next = at + jiff::SignedDuration::try_from(next_deadline(&[r], renew_before, at, resync)).unwrap();
            let mut sample = at;
            while sample < next {
                assert!(sample <= held.not_after, "expired at {} and in place at {sample}", held.not_after);
                sample += jiff::SignedDuration::from_secs(1);
            }
            at = next;
        }
        assert_eq!(issued, 72, "the first, then one every 20 minutes");
    }
}
