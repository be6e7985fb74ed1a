//! The report: the federation's status after a reconcile (conditions, per-cluster status, `readyClusters`) from
//! what each member's reconcile did, and the Events that a change of status is told by. Pure: the clock comes in as
//! an argument.

use jiff::{SignedDuration, Timestamp};
use meshfed_api::{ClusterStatus, MeshFederationSpec, MeshFederationStatus, SecretKeyRef, TrustStatus};

use crate::{
    conditions::{Cond, ConditionType, Reason, first_failure, kstatus, stamp},
    credential::CredentialReport,
    federation::{Failure, FederationRef, RELEASE_ANNOTATION},
    gateway::GatewayAddress,
    kinds::OWNED_KINDS,
    pki::CertSummary,
    validate::{Problem, Validated},
    versions::MemberVersion,
};

/// The Event for a cluster released by annotation: what meshfed left behind there and how to find it.
pub fn released(fref: &FederationRef, cluster: &str, kubeconfig: &SecretKeyRef) -> Announcement {
    let note = format!(
        "cluster {cluster} was released without cleanup ({RELEASE_ANNOTATION}); what meshfed wrote there for this federation is left behind: find it with `kubectl get {} -A -l {}`",
        kinds_for_kubectl(),
        fref.selector(cluster)
    );
    Announcement {
        warning: true,
        reason: Reason::ClusterReleased.to_string(),
        note,
        cluster: Some(cluster.into()),
        kubeconfig: Some(kubeconfig.clone()),
    }
}

/// The Events for the objects taken over in a reconcile: one per member, naming each object and what taking it over
/// changed.
pub fn adopted(reports: &[MemberReport]) -> Vec<Announcement> {
    reports
        .iter()
        .filter(|r| !r.adopted.is_empty())
        .map(|r| Announcement {
            warning: false,
            reason: Reason::Adopted.to_string(),
            note: event_note(format!("took over in cluster {}: {}", r.name, r.adopted.join("; "))),
            cluster: Some(r.name.clone()),
            kubeconfig: Some(r.kubeconfig.clone()),
        })
        .collect()
}

/// The Event for a cluster let go as it runs (`deletionPolicy: Orphan`).
pub fn orphaned(fref: &FederationRef, cluster: &str, kubeconfig: &SecretKeyRef) -> Announcement {
    let note = format!(
        "cluster {cluster} was let go as it runs (deletionPolicy: Orphan): meshfed's labels and claim are removed, everything else is left in place and no longer managed; it was labelled {}",
        fref.selector(cluster)
    );
    Announcement {
        warning: false,
        reason: Reason::ClusterOrphaned.to_string(),
        note,
        cluster: Some(cluster.into()),
        kubeconfig: Some(kubeconfig.clone()),
    }
}

/// Every kind meshfed writes, as `kubectl get` names them unambiguously (`deployments.apps`, `istios.sailoperator.io`).
fn kinds_for_kubectl() -> String {
    let name = |k: &crate::kinds::OwnedKind| match k.group {
        "" => k.plural.to_string(),
        group => format!("{}.{group}", k.plural),
    };
    OWNED_KINDS.iter().map(name).collect::<Vec<_>>().join(",")
}

/// Whether `new` says something `previous` does not, apart from `lastSeen` (which moves at every contact and would
/// otherwise cost a status write per resync).
pub fn status_changed(previous: Option<&MeshFederationStatus>, new: &MeshFederationStatus) -> bool {
    let mask = |s: &MeshFederationStatus| {
        let mut s = s.clone();
        s.clusters.iter_mut().for_each(|c| c.last_seen = None);
        s
    };
    previous.is_none_or(|p| mask(p) != mask(new))
}

/// Something a person should hear about, as an Event on the federation. Events with the same reason (and cluster)
/// are counted as one series, so a note says what happened, not details that differ each time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// A Warning (something went wrong) rather than a Normal Event.
    pub warning: bool,
    pub reason: String,
    pub note: String,
    /// The cluster it is about, if one.
    pub cluster: Option<String>,
    /// That cluster's kubeconfig Secret in the federation's namespace: the Event's related object, so that Events
    /// about different clusters are counted apart.
    pub kubeconfig: Option<SecretKeyRef>,
}

/// The longest Event note the API accepts, in bytes (`events.k8s.io/v1` refuses longer ones, and the Event is lost).
pub const EVENT_NOTE_MAX_BYTES: usize = 1024;

/// `note` as an Event can carry it: unchanged when it fits in [`EVENT_NOTE_MAX_BYTES`], else cut at a character
/// boundary and marked, so that a message naming many members (each unreachable one adds a line) is still told.
pub fn event_note(note: String) -> String {
    const MORE: &str = " [truncated]";
    if note.len() <= EVENT_NOTE_MAX_BYTES {
        return note;
    }
    let mut end = EVENT_NOTE_MAX_BYTES - MORE.len();
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MORE}", &note[..end])
}

impl Announcement {
    fn new(warning: bool, reason: &str, note: String) -> Self {
        Self { warning, reason: reason.into(), note, cluster: None, kubeconfig: None }
    }

    fn about(self, cluster: &ClusterStatus) -> Self {
        Self { cluster: Some(cluster.name.clone()), kubeconfig: cluster.kubeconfig_secret_ref.clone(), ..self }
    }
}

/// What changed from `previous` to `new` that a person should hear about: a condition whose status or reason
/// changed, a cluster that joined or was removed, a new intermediate CA in a cluster, and each step of a root
/// rotation.
pub fn announcements(previous: Option<&MeshFederationStatus>, new: &MeshFederationStatus) -> Vec<Announcement> {
    let empty = MeshFederationStatus::default();
    let previous = previous.unwrap_or(&empty);
    let mut out = Vec::new();
    // Stalled and Reconciling say again what Ready says: no Events of their own.
    for c in new.conditions.iter().filter(|c| c.type_ != "Stalled" && c.type_ != "Reconciling") {
        if !previous.conditions.iter().any(|p| p.type_ == c.type_ && p.status == c.status && p.reason == c.reason) {
            let note = format!("{} is {}: {}", c.type_, c.status, c.message);
            let warning = c.status != "True"
                || c.reason == Reason::RootExpiring.as_str()
                || c.reason == Reason::CredentialNotRenewed.as_str();
            out.push(Announcement::new(warning, &c.reason, note));
        }
    }
    for c in &new.clusters {
        let before = previous.clusters.iter().find(|p| p.name == c.name);
        if before.is_none() {
            let note = format!("cluster {} joined the federation", c.name);
            out.push(Announcement::new(false, Reason::ClusterAdded.as_str(), note).about(c));
        }
        if let Some(fingerprint) = &c.intermediate_fingerprint
            && before.and_then(|b| b.intermediate_fingerprint.as_ref()) != Some(fingerprint)
        {
            let note = format!("cluster {}: a new intermediate CA is in place (its cacerts)", c.name);
            out.push(Announcement::new(false, Reason::IntermediateIssued.as_str(), note).about(c));
        }
    }
    for gone in previous.clusters.iter().filter(|p| !new.clusters.iter().any(|c| c.name == p.name)) {
        let note = format!("cluster {} left the federation", gone.name);
        out.push(Announcement::new(false, Reason::ClusterRemoved.as_str(), note).about(gone));
    }
    let (was, now) = (previous.trust.as_ref(), new.trust.as_ref());
    let phase = |t: Option<&TrustStatus>| t.and_then(|t| t.rotation_phase.clone());
    match (phase(was), phase(now)) {
        (before, Some(phase)) if before.as_ref() != Some(&phase) => {
            out.push(Announcement::new(false, Reason::RootRotation.as_str(), format!("root rotation: phase {phase}")));
        }
        (Some(_), None) => {
            let root = now.and_then(|t| t.root_fingerprint.as_deref()).unwrap_or("?");
            out.push(Announcement::new(
                false,
                Reason::RootRotated.as_str(),
                format!("root rotation done: the root is now {root}"),
            ));
        }
        _ => {}
    }
    out
}

/// What one reconcile did with one member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberReport {
    pub name: String,
    pub kubeconfig: SecretKeyRef,
    /// The member's Kubernetes version when it was reached.
    pub version: Option<String>,
    /// What went wrong, if anything: unreachable when `version` is `None`, else a failed write.
    pub failure: Option<Failure>,
    /// The member left the spec and is being cleaned up.
    pub leaving: bool,
    /// The cluster's identity: the UID of its `kube-system` namespace, when it was reached.
    pub identity: Option<String>,
    /// It was let go by the release annotation without being cleaned up.
    pub released: bool,
    /// It left as it runs (`deletionPolicy: Orphan`): only meshfed's marks and claim were removed.
    pub orphaned: bool,
    /// What went wrong with remote access for this member: its reader token, or the remote secrets it holds.
    pub remote_access: Option<Failure>,
    /// When the reader token that peers hold for this member expires.
    pub token_expires_at: Option<Timestamp>,
    /// When that token falls due for refresh, by the hub's clock ([`crate::remote::TokenTimes::refresh_at`]).
    pub token_refresh_at: Option<Timestamp>,
    /// The hub's credential for the member, when it was reached: when it expires, whether meshfed renews it.
    pub credential: Option<CredentialReport>,
    /// The member's intermediate CA as it is now, or why it could not be put in place.
    pub intermediate: Option<Result<CertSummary, Failure>>,
    /// The member's east-west gateway, where it needs one: where other members dial it, or why they cannot yet.
    pub gateway: Option<Result<GatewayAddress, Failure>>,
    /// Whether the member's control plane is ready, or why not; `None` when the member was not planned.
    pub control_plane: Option<Result<(), Failure>>,
    /// The Istio version it runs for the federation, where known.
    pub istio_version: Option<MemberVersion>,
    /// When meshfed last restarted its istiod (after the remote secrets it holds changed, on an Istio version that
    /// needs it).
    pub istiod_restarted_at: Option<Timestamp>,
    /// The objects it took over in this reconcile (`existingObjects: Adopt`), each with what that changed.
    pub adopted: Vec<String>,
}

impl MemberReport {
    /// A report with nothing known yet.
    pub fn new(name: &str, kubeconfig: &SecretKeyRef, leaving: bool) -> Self {
        Self {
            name: name.into(),
            kubeconfig: kubeconfig.clone(),
            version: None,
            failure: None,
            leaving,
            identity: None,
            released: false,
            orphaned: false,
            remote_access: None,
            token_expires_at: None,
            token_refresh_at: None,
            credential: None,
            intermediate: None,
            gateway: None,
            control_plane: None,
            istio_version: None,
            istiod_restarted_at: None,
            adopted: Vec::new(),
        }
    }

    /// Why its trust is not in place, if it is not.
    fn trust_failure(&self) -> Option<&Failure> {
        self.intermediate.as_ref()?.as_ref().err()
    }

    /// Why its gateway cannot be dialled, if it cannot.
    fn gateway_failure(&self) -> Option<&Failure> {
        self.gateway.as_ref()?.as_ref().err()
    }

    /// Why its control plane is not ready, if it is not.
    fn control_plane_failure(&self) -> Option<&Failure> {
        self.control_plane.as_ref()?.as_ref().err()
    }

    /// Reached, written, with its intermediate CA, its remote access, its gateway and its control plane in place.
    fn converged(&self) -> bool {
        self.version.is_some()
            && self.failure.is_none()
            && self.remote_access.is_none()
            && self.trust_failure().is_none()
            && self.gateway_failure().is_none()
            && self.control_plane_failure().is_none()
    }
}

/// The federation's status after a reconcile. `validation` is the outcome of [`crate::validate::validate`]; on a
/// valid spec `members` has one report per member of the spec and per member still leaving. An invalid spec touches
/// no member, so the previous per-cluster entries are kept as they were.
pub fn federation_status(
    previous: Option<&MeshFederationStatus>,
    generation: Option<i64>,
    spec: &MeshFederationSpec,
    validation: &Result<Validated, Vec<Problem>>,
    root: Option<&Result<TrustStatus, Failure>>,
    members: &[MemberReport],
    now: Timestamp,
) -> MeshFederationStatus {
    let prev_conditions = previous.map(|p| p.conditions.as_slice()).unwrap_or_default();
    let validated = match validation {
        Err(problems) => {
            let reason = problems.first().map_or(Reason::Valid, |p| p.reason);
            let message = problems.iter().map(|p| p.message.as_str()).collect::<Vec<_>>().join("; ");
            let ready = Cond::failed(
                ConditionType::Ready,
                reason,
                "the spec is invalid; nothing is written to any member until it is fixed",
            );
            let valid = Cond::failed(ConditionType::Valid, reason, message);
            let stalled = kstatus(&ready, std::slice::from_ref(&valid));
            let conds = [ready, valid].into_iter().chain(stalled).collect();
            return MeshFederationStatus {
                observed_generation: generation,
                topology: None,
                ready_clusters: previous.and_then(|p| p.ready_clusters.clone()),
                conditions: stamp(prev_conditions, conds, generation, now),
                trust: previous.and_then(|p| p.trust.clone()),
                clusters: previous.map(|p| p.clusters.clone()).unwrap_or_default(),
            };
        }
        Ok(v) => v,
    };

    let unreachable: Vec<_> = members.iter().filter(|m| m.version.is_none()).collect();
    let not_renewed: Vec<(&str, &Failure)> = members
        .iter()
        .filter(|m| !m.leaving)
        .filter_map(|m| Some((m.name.as_str(), m.credential.as_ref()?.warning.as_ref()?)))
        .collect();
    let reachable = match (unreachable.as_slice(), not_renewed.as_slice()) {
        ([], []) => Cond::ok(
            ConditionType::ClustersReachable,
            Reason::AllReachable,
            format!("all {} members answered", members.len()),
        ),
        // Still True: every credential works; a person has until it expires to act.
        ([], [(_, first), ..]) => Cond::ok(
            ConditionType::ClustersReachable,
            first.reason,
            format!(
                "all {} members answered; {}",
                members.len(),
                not_renewed.iter().map(|(name, f)| format!("{name}: {}", f.message)).collect::<Vec<_>>().join("; ")
            ),
        ),
        ([first, ..], _) => Cond::failed(
            ConditionType::ClustersReachable,
            first.failure.as_ref().map_or(Reason::Unreachable, |f| f.reason),
            unreachable.iter().map(|m| format!("{}: {}", m.name, failure_message(m))).collect::<Vec<_>>().join("; "),
        ),
    };
    let failed: Vec<_> = members.iter().filter(|m| m.version.is_some() && m.failure.is_some()).collect();
    let leaving: Vec<_> =
        members.iter().filter(|m| m.leaving && m.failure.is_some()).map(|m| m.name.as_str()).collect();
    let mut conds =
        vec![Cond::ok(ConditionType::Valid, Reason::Valid, format!("topology {}", validated.topology)), reachable];
    if let [first, ..] = failed.as_slice() {
        conds.push(Cond::failed(
            ConditionType::MembersConverged,
            first.failure.as_ref().map_or(Reason::WriteFailed, |f| f.reason),
            failed.iter().map(|m| format!("{}: {}", m.name, failure_message(m))).collect::<Vec<_>>().join("; "),
        ));
    } else {
        conds.push(Cond::ok(
            ConditionType::MembersConverged,
            Reason::ObjectsInPlace,
            "every reachable member holds what the spec asks",
        ));
    }
    let no_trust: Vec<_> = members.iter().filter(|m| !m.leaving && m.trust_failure().is_some()).collect();
    conds.push(match (root, no_trust.as_slice()) {
        (Some(Err(f)), _) => Cond::failed(ConditionType::TrustReady, f.reason, f.message.clone()),
        (_, [first, ..]) => Cond::failed(
            ConditionType::TrustReady,
            first.trust_failure().map_or(Reason::RootUnknown, |f| f.reason),
            no_trust
                .iter()
                .filter_map(|m| Some(format!("{}: {}", m.name, m.trust_failure()?.message)))
                .collect::<Vec<_>>()
                .join("; "),
        ),
        (Some(Ok(TrustStatus { rotation_phase: Some(phase), .. })), []) => {
            Cond::failed(ConditionType::TrustReady, Reason::RootRotationInProgress, phase.clone())
        }
        (Some(Ok(r)), []) => {
            let root = r.root_fingerprint.as_deref().unwrap_or_default();
            let held = format!("every reachable member holds an intermediate CA of root {root}");
            let renew_before = SignedDuration::try_from(validated.durations.renew_before).unwrap_or(SignedDuration::MAX);
            match r.root_not_after.as_deref().and_then(|t| t.parse::<Timestamp>().ok()) {
                // Warned as early as intermediates are renewed: a root is replaced by a rotation, which a person asks for.
                Some(expiry) if expiry.checked_sub(renew_before).is_ok_and(|warn_at| warn_at <= now) => Cond::ok(
                    ConditionType::TrustReady,
                    Reason::RootExpiring,
                    format!("{held}; the root expires at {expiry}: rotate it (annotation meshfed.io/rotate-root, or a new trust.root.secretRef)"),
                ),
                _ => Cond::ok(ConditionType::TrustReady, Reason::IntermediatesValid, held),
            }
        }
        (None, []) => Cond::failed(ConditionType::TrustReady, Reason::RootUnknown, "the root CA was not read"),
    });
    conds.push(area(
        members,
        ConditionType::RemoteAccessReady,
        |m| m.remote_access.as_ref(),
        Cond::ok(
            ConditionType::RemoteAccessReady,
            Reason::RemoteSecretsInPlace,
            "every Primary holds a valid remote secret for every other member",
        ),
    ));
    conds.push(area(
        members,
        ConditionType::GatewaysReady,
        MemberReport::gateway_failure,
        Cond::ok(
            ConditionType::GatewaysReady,
            Reason::GatewaysAddressed,
            "every gateway the topology needs has an address",
        ),
    ));
    conds.push(area(
        members,
        ConditionType::ControlPlaneReady,
        MemberReport::control_plane_failure,
        Cond::ok(ConditionType::ControlPlaneReady, Reason::ControlPlanesReady, "every member's Istio is ready"),
    ));
    let ready = match (first_failure(&conds), leaving.as_slice()) {
        (Some(f), _) => Cond::failed(ConditionType::Ready, f.reason, f.message.clone()),
        (None, [_, ..]) => Cond::failed(
            ConditionType::Ready,
            Reason::CleanupPending,
            format!("waiting to clean up members that left the spec: {}", leaving.join(", ")),
        ),
        (None, []) => {
            Cond::ok(ConditionType::Ready, Reason::Converged, format!("all {} members converged", spec.clusters.len()))
        }
    };
    conds.extend(kstatus(&ready, &conds));
    conds.insert(0, ready);

    let prev_cluster = |name: &str| previous.and_then(|p| p.clusters.iter().find(|c| c.name == name));
    let clusters: Vec<ClusterStatus> = members
        .iter()
        .filter(|m| !(m.leaving && m.failure.is_none()))
        .map(|m| member_status(prev_cluster(&m.name), generation, m, now))
        .collect();
    let converged = members.iter().filter(|m| !m.leaving && m.converged()).count();
    MeshFederationStatus {
        observed_generation: generation,
        topology: Some(validated.topology.to_string()),
        ready_clusters: Some(format!("{converged}/{}", spec.clusters.len())),
        conditions: stamp(prev_conditions, conds, generation, now),
        trust: match root {
            Some(Ok(r)) => Some(r.clone()),
            _ => previous.and_then(|p| p.trust.clone()),
        },
        clusters,
    }
}

/// The status while the federation is being deleted: which members are not cleaned up yet, and why.
pub fn deletion_status(
    previous: Option<&MeshFederationStatus>,
    generation: Option<i64>,
    pending: &[MemberReport],
    now: Timestamp,
) -> MeshFederationStatus {
    let mut status = previous.cloned().unwrap_or_default();
    let message = pending.iter().map(|m| format!("{}: {}", m.name, failure_message(m))).collect::<Vec<_>>().join("; ");
    let conds = vec![Cond::failed(
        ConditionType::Ready,
        Reason::CleanupPending,
        format!("the federation is being deleted; members not cleaned up yet: {message}"),
    )];
    let conds = conds.into_iter().chain([Cond::ok(
        ConditionType::Reconciling,
        Reason::CleanupPending,
        "the federation is being deleted: meshfed is cleaning up the members",
    )]);
    let mut stamped = stamp(&status.conditions, conds.collect(), generation, now);
    let kept = ["Ready", "Reconciling", "Stalled"];
    status.conditions.retain(|c| !kept.contains(&c.type_.as_str()));
    status.conditions.insert(0, stamped.remove(0));
    status.conditions.extend(stamped);
    status.clusters = pending
        .iter()
        .map(|m| member_status(status.clusters.iter().find(|c| c.name == m.name), generation, m, now))
        .collect();
    status
}

/// A federation condition over one area of the members: `ok` unless a member that stays fails in it (`failure`);
/// then the first such member's reason, and each one's message.
fn area(
    members: &[MemberReport],
    type_: ConditionType,
    failure: fn(&MemberReport) -> Option<&Failure>,
    ok: Cond,
) -> Cond {
    let failing: Vec<(&str, &Failure)> =
        members.iter().filter(|m| !m.leaving).filter_map(|m| Some((m.name.as_str(), failure(m)?))).collect();
    match failing.as_slice() {
        [] => ok,
        [(_, first), ..] => Cond::failed(
            type_,
            first.reason,
            failing.iter().map(|(name, f)| format!("{name}: {}", f.message)).collect::<Vec<_>>().join("; "),
        ),
    }
}

fn failure_message(m: &MemberReport) -> &str {
    m.failure.as_ref().map_or("", |f| f.message.as_str())
}

fn member_status(
    previous: Option<&ClusterStatus>,
    generation: Option<i64>,
    m: &MemberReport,
    now: Timestamp,
) -> ClusterStatus {
    let reachable = match (&m.version, &m.failure) {
        (Some(v), _) => match &m.credential {
            Some(CredentialReport { warning: Some(w), .. }) => {
                Cond::ok(ConditionType::Reachable, w.reason, format!("Kubernetes {v}; {}", w.message))
            }
            Some(c) => Cond::ok(ConditionType::Reachable, Reason::Reachable, format!("Kubernetes {v}; {}", c.note)),
            None => Cond::ok(ConditionType::Reachable, Reason::Reachable, format!("Kubernetes {v}")),
        },
        (None, Some(f)) => Cond::failed(ConditionType::Reachable, f.reason, f.message.clone()),
        (None, None) => Cond::failed(ConditionType::Reachable, Reason::Unreachable, ""),
    };
    let access = match (&m.version, &m.remote_access) {
        (_, Some(f)) => Cond::failed(ConditionType::RemoteAccessReady, f.reason, f.message.clone()),
        (None, None) => {
            Cond::failed(ConditionType::RemoteAccessReady, Reason::Unreachable, "the member did not answer")
        }
        (Some(_), None) => Cond::ok(
            ConditionType::RemoteAccessReady,
            Reason::RemoteSecretsInPlace,
            "its reader and remote secrets are in place",
        ),
    };
    let trust = match (&m.version, &m.intermediate) {
        (_, Some(Err(f))) => Cond::failed(ConditionType::TrustReady, f.reason, f.message.clone()),
        (_, Some(Ok(i))) => {
            Cond::ok(ConditionType::TrustReady, Reason::IntermediateValid, format!("intermediate {}", i.fingerprint))
        }
        (None, None) => Cond::failed(ConditionType::TrustReady, Reason::Unreachable, "the member did not answer"),
        (Some(_), None) => {
            Cond::failed(ConditionType::TrustReady, Reason::RootUnavailable, "no root CA to issue an intermediate from")
        }
    };
    let gateway = match (&m.gateway, &m.control_plane) {
        (Some(Ok(a)), _) => {
            Cond::ok(ConditionType::GatewaysReady, Reason::GatewaysAddressed, format!("dialled at {a}"))
        }
        (Some(Err(f)), _) => Cond::failed(ConditionType::GatewaysReady, f.reason, f.message.clone()),
        (None, Some(_)) => {
            Cond::ok(ConditionType::GatewaysReady, Reason::NoGatewayNeeded, "the topology needs no gateway here")
        }
        (None, None) => Cond::failed(ConditionType::GatewaysReady, Reason::Unreachable, "the member did not answer"),
    };
    let control = match &m.control_plane {
        Some(Ok(())) => {
            Cond::ok(ConditionType::ControlPlaneReady, Reason::IstioReady, "the Sail operator reports Istio ready")
        }
        Some(Err(f)) => Cond::failed(ConditionType::ControlPlaneReady, f.reason, f.message.clone()),
        None => Cond::failed(ConditionType::ControlPlaneReady, Reason::Unreachable, "the member did not answer"),
    };
    let areas = [trust, access, gateway, control];
    let ready = match (&m.failure, m.leaving, first_failure(&areas)) {
        (Some(f), true, _) => {
            Cond::failed(ConditionType::Ready, Reason::CleanupPending, format!("cleanup waits: {}", f.message))
        }
        (Some(f), false, _) => Cond::failed(ConditionType::Ready, f.reason, f.message.clone()),
        (None, false, Some(area)) => Cond::failed(ConditionType::Ready, area.reason, area.message.clone()),
        (None, _, _) => Cond::ok(ConditionType::Ready, Reason::Converged, "holds what the spec asks"),
    };
    let mut conds = vec![reachable, ready];
    if !m.leaving {
        conds.extend(areas);
    }
    let prev_conditions = previous.map(|p| p.conditions.as_slice()).unwrap_or_default();
    let reached = m.version.is_some();
    ClusterStatus {
        name: m.name.clone(),
        reachable: reached,
        cluster_uid: m.identity.clone().or_else(|| previous.and_then(|p| p.cluster_uid.clone())),
        kubernetes_version: m.version.clone().or_else(|| previous.and_then(|p| p.kubernetes_version.clone())),
        last_seen: if reached { Some(now.to_string()) } else { previous.and_then(|p| p.last_seen.clone()) },
        last_error: m.failure.as_ref().map(|f| f.message.clone()),
        kubeconfig_secret_ref: Some(m.kubeconfig.clone()),
        intermediate_fingerprint: match &m.intermediate {
            Some(Ok(i)) => Some(i.fingerprint.clone()),
            _ => previous.and_then(|p| p.intermediate_fingerprint.clone()),
        },
        intermediate_not_after: match &m.intermediate {
            Some(Ok(i)) => Some(i.not_after_rfc3339()),
            _ => previous.and_then(|p| p.intermediate_not_after.clone()),
        },
        gateway_address: match &m.gateway {
            Some(Ok(a)) => Some(a.addresses.join(",")),
            Some(Err(_)) => None,
            None => previous.and_then(|p| p.gateway_address.clone()),
        },
        gateway_port: match &m.gateway {
            Some(Ok(a)) => Some(a.port),
            Some(Err(_)) => None,
            None => previous.and_then(|p| p.gateway_port),
        },
        reader_token_expires_at: m
            .token_expires_at
            .map(|t| t.to_string())
            .or_else(|| previous.and_then(|p| p.reader_token_expires_at.clone())),
        credential_expires_at: match &m.credential {
            Some(c) => c.expires_at.map(|t| t.to_string()),
            None => previous.and_then(|p| p.credential_expires_at.clone()),
        },
        istio_version: m
            .istio_version
            .as_ref()
            .map(|v| v.name.clone())
            .or_else(|| previous.and_then(|p| p.istio_version.clone())),
        istiod_restarted_at: m
            .istiod_restarted_at
            .map(|t| t.to_string())
            .or_else(|| previous.and_then(|p| p.istiod_restarted_at.clone())),
        conditions: stamp(prev_conditions, conds, generation, now),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::validate::validate;

    fn spec() -> MeshFederationSpec {
        serde_saphyr::from_str(
            "meshID: m\ntrust: {root: {generate: {}}}\nclusters:\n- {name: east, network: n1, kubeconfigSecretRef: {name: east}}\n- {name: west, network: n2, kubeconfigSecretRef: {name: west}}\n",
        )
        .unwrap()
    }

    pub(crate) fn summary() -> CertSummary {
        CertSummary { fingerprint: "sha256:ab".into(), not_after: "2027-01-01T00:00:00Z".parse().unwrap() }
    }

    fn root() -> Result<TrustStatus, Failure> {
        Ok(TrustStatus {
            root_fingerprint: Some("sha256:ab".into()),
            root_not_after: Some("2027-01-01T00:00:00Z".into()),
            rotation_phase: None,
            intermediates_reissued_at: None,
            root_source: None,
        })
    }

    pub(crate) fn now() -> Timestamp {
        "2026-11-22T10:00:00Z".parse().unwrap()
    }

    pub(crate) fn report(name: &str, version: Option<&str>, failure: Option<Failure>) -> MemberReport {
        let mut r = MemberReport::new(name, &SecretKeyRef { name: name.into(), key: "kubeconfig".into() }, false);
        r.intermediate = version.map(|_| Ok(summary()));
        r.version = version.map(Into::into);
        r.failure = failure;
        r
    }

    fn condition<'a>(
        conds: &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
        t: &str,
    ) -> (&'a str, &'a str) {
        let c = conds.iter().find(|c| c.type_ == t).unwrap_or_else(|| panic!("no {t} condition"));
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn a_resync_that_only_moves_last_seen_writes_no_status() {
        let s = spec();
        let members = [report("east", Some("v"), None), report("west", Some("v"), None)];
        let first = federation_status(None, Some(1), &s, &validate(&s), Some(&root()), &members, now());
        let later = federation_status(
            Some(&first),
            Some(1),
            &s,
            &validate(&s),
            Some(&root()),
            &members,
            "2026-11-22T11:00:00Z".parse().unwrap(),
        );
        assert!(!status_changed(Some(&first), &later));
        let down = [members[0].clone(), report("west", None, Some(Failure::new(Reason::Unreachable, "refused")))];
        let changed = federation_status(Some(&first), Some(1), &s, &validate(&s), Some(&root()), &down, now());
        assert!(status_changed(Some(&first), &changed));
    }

    #[test]
    fn a_root_that_expires_within_renew_before_is_warned_about_while_the_federation_stays_ready() {
        let s = spec();
        let up = [report("east", Some("v"), None), report("west", Some("v"), None)];
        let far = federation_status(None, Some(1), &s, &validate(&s), Some(&root()), &up, now());
        let soon = Ok(TrustStatus { root_not_after: Some("2026-12-01T00:00:00Z".into()), ..root().unwrap() });
        let near = federation_status(Some(&far), Some(1), &s, &validate(&s), Some(&soon), &up, now());
        assert_eq!(condition(&near.conditions, "TrustReady"), ("True", "RootExpiring"));
        assert_eq!(condition(&near.conditions, "Ready"), ("True", "Converged"));
        let said = announcements(Some(&far), &near);
        assert!(said.iter().any(|a| a.warning && a.reason == "RootExpiring" && a.note.contains("rotate")), "{said:?}");
    }

    #[test]
    fn a_credential_that_cannot_be_renewed_is_warned_about_while_the_federation_stays_ready() {
        use crate::credential::{Credential, decide, refused, report as credential_report};
        let s = spec();
        let token = Credential::ServiceAccountToken {
            namespace: "meshfed-system".into(),
            name: "meshfed-hub.mesh-system.prod".into(),
            issued_at: "2026-11-01T00:00:00Z".parse().unwrap(),
            expires_at: "2026-12-01T00:00:00Z".parse().unwrap(),
        };
        let kept = credential_report("east", &token, &decide(&token, now(), SignedDuration::ZERO), now());
        let mut up = [report("east", Some("v1.34.2"), None), report("west", Some("v1.34.2"), None)];
        up[0].credential = Some(kept);
        up.iter_mut().for_each(|r| r.control_plane = Some(Ok(())));
        let first = federation_status(None, Some(1), &s, &validate(&s), Some(&root()), &up, now());
        let east = &first.clusters[0];
        assert_eq!(east.credential_expires_at.as_deref(), Some("2026-12-01T00:00:00Z"));
        let reachable = east.conditions.iter().find(|c| c.type_ == "Reachable").unwrap();
        assert_eq!(reachable.reason, "Reachable");
        assert!(reachable.message.contains("renewed before it expires"), "{}", reachable.message);
        assert_eq!(condition(&first.conditions, "ClustersReachable"), ("True", "AllReachable"));

        // The renewal is refused: said on the cluster and the federation, with a Warning Event; still Ready.
        up[0].credential = Some(refused("east", &token, "forbidden"));
        let second = federation_status(Some(&first), Some(1), &s, &validate(&s), Some(&root()), &up, now());
        assert_eq!(condition(&second.conditions, "ClustersReachable"), ("True", "CredentialNotRenewed"));
        assert_eq!(condition(&second.conditions, "Ready"), ("True", "Converged"));
        assert_eq!(condition(&second.clusters[0].conditions, "Reachable"), ("True", "CredentialNotRenewed"));
        assert_eq!(condition(&second.clusters[0].conditions, "Ready"), ("True", "Converged"));
        let said = announcements(Some(&first), &second);
        let warned = said.iter().find(|a| a.reason == "CredentialNotRenewed").expect("a warning");
        assert!(
            warned.warning && warned.note.contains("east: ") && warned.note.contains("meshfed join east"),
            "{said:?}"
        );

        // Not reached: the last known expiry stays.
        let down = [report("east", None, Some(Failure::new(Reason::Unreachable, "refused"))), up[1].clone()];
        let third = federation_status(Some(&second), Some(1), &s, &validate(&s), Some(&root()), &down, now());
        assert_eq!(third.clusters[0].credential_expires_at.as_deref(), Some("2026-12-01T00:00:00Z"));
    }

    #[test]
    fn changes_a_person_should_know_are_announced_once() {
        let s = spec();
        let up = [report("east", Some("v"), None), report("west", Some("v"), None)];
        let first = federation_status(None, Some(1), &s, &validate(&s), Some(&root()), &up, now());
        let reasons = |a: Vec<Announcement>| a.into_iter().map(|a| a.reason).collect::<Vec<_>>();
        let joined = announcements(None, &first);
        assert!(joined.iter().any(|a| a.note.starts_with("Ready is True")), "{joined:?}");
        assert_eq!(joined.iter().filter(|a| a.reason == "ClusterAdded").count(), 2, "{joined:?}");
        assert!(announcements(Some(&first), &first).is_empty(), "nothing changed, nothing said");

        let down = [up[0].clone(), report("west", None, Some(Failure::new(Reason::Unreachable, "refused")))];
        let second = federation_status(Some(&first), Some(1), &s, &validate(&s), Some(&root()), &down, now());
        let said = announcements(Some(&first), &second);
        assert!(said.iter().all(|a| a.warning), "{said:?}");
        let types: Vec<_> = said.iter().map(|a| a.note.split(' ').next().unwrap()).collect();
        assert_eq!(types, ["Ready", "ClustersReachable"]);

        // Still down, for another reason: said again, with the new reason.
        let refused = [up[0].clone(), report("west", None, Some(Failure::new(Reason::Timeout, "no answer")))];
        let third = federation_status(Some(&second), Some(1), &s, &validate(&s), Some(&root()), &refused, now());
        assert_eq!(reasons(announcements(Some(&second), &third)), ["Timeout", "Timeout"]);

        let mut left = first.clone();
        left.clusters.retain(|c| c.name == "east");
        assert_eq!(reasons(announcements(Some(&first), &left)), ["ClusterRemoved"]);
    }

    #[test]
    fn a_new_intermediate_and_every_rotation_step_are_announced() {
        let s = spec();
        let up = [report("east", Some("v"), None)];
        let first = federation_status(None, Some(1), &s, &validate(&s), Some(&root()), &up, now());
        let mut reissued = first.clone();
        reissued.clusters[0].intermediate_fingerprint = Some("sha256:new".into());
        let said = announcements(Some(&first), &reissued);
        assert_eq!(said.len(), 1);
        assert_eq!(said[0].reason, "IntermediateIssued");
        assert_eq!(said[0].cluster.as_deref(), Some("east"));
        assert_eq!(said[0].kubeconfig.as_ref().map(|k| k.name.as_str()), Some("east"), "the Secret the fixture names");

        let phase = |p: Option<&str>| {
            let mut s = first.clone();
            s.trust.as_mut().unwrap().rotation_phase = p.map(String::from);
            s
        };
        let (distributing, reissuing) = (phase(Some("DistributingRoot")), phase(Some("ReissuingIntermediates")));
        let step = |a: &MeshFederationStatus, b: &MeshFederationStatus| {
            announcements(Some(a), b).into_iter().map(|a| (a.reason, a.note)).collect::<Vec<_>>()
        };
        assert_eq!(
            step(&first, &distributing),
            [("RootRotation".into(), "root rotation: phase DistributingRoot".into())]
        );
        assert_eq!(step(&distributing, &reissuing)[0].1, "root rotation: phase ReissuingIntermediates");
        assert!(step(&reissuing, &reissuing).is_empty());
        assert_eq!(step(&reissuing, &first)[0].0, "RootRotated");
    }

    #[test]
    fn all_members_converged_makes_the_federation_ready() {
        let s = spec();
        let members = [report("east", Some("v1.34.2"), None), report("west", Some("v1.34.2"), None)];
        let st = federation_status(None, Some(3), &s, &validate(&s), Some(&root()), &members, now());
        assert_eq!(condition(&st.conditions, "Ready"), ("True", "Converged"));
        assert_eq!(condition(&st.conditions, "Valid"), ("True", "Valid"));
        assert_eq!(condition(&st.conditions, "ClustersReachable"), ("True", "AllReachable"));
        assert_eq!(
            (st.observed_generation, st.topology.as_deref(), st.ready_clusters.as_deref()),
            (Some(3), Some("MultiPrimary/MultiNetwork"), Some("2/2"))
        );
        assert_eq!(st.clusters[1].kubernetes_version.as_deref(), Some("v1.34.2"));
        assert_eq!(st.clusters[1].last_seen.as_deref(), Some("2026-11-22T10:00:00Z"));
    }

    #[test]
    fn one_unreachable_member_is_named_and_keeps_its_last_known_facts() {
        let s = spec();
        let up = [report("east", Some("v1.34.2"), None), report("west", Some("v1.34.2"), None)];
        let before = federation_status(None, Some(1), &s, &validate(&s), Some(&root()), &up, now());
        let down = [up[0].clone(), report("west", None, Some(Failure::new(Reason::Unreachable, "connection refused")))];
        let later: Timestamp = "2026-11-22T10:01:00Z".parse().unwrap();
        let st = federation_status(Some(&before), Some(1), &s, &validate(&s), Some(&root()), &down, later);
        assert_eq!(condition(&st.conditions, "Ready"), ("False", "Unreachable"));
        let reach = st.conditions.iter().find(|c| c.type_ == "ClustersReachable").unwrap();
        assert_eq!(reach.message, "west: connection refused");
        let west = &st.clusters[1];
        assert!(!west.reachable);
        assert_eq!(west.last_seen.as_deref(), Some("2026-11-22T10:00:00Z"));
        assert_eq!(west.last_error.as_deref(), Some("connection refused"));
        assert_eq!(st.ready_clusters.as_deref(), Some("1/2"));
        // East's Ready condition did not flip, so its transition time did not move.
        assert_eq!(st.clusters[0].conditions, before.clusters[0].conditions);
    }

    #[test]
    fn an_invalid_spec_reports_every_problem_and_keeps_the_members_it_knew() {
        let mut s = spec();
        let up = [report("east", Some("v1.34.2"), None), report("west", Some("v1.34.2"), None)];
        let before = federation_status(None, Some(1), &s, &validate(&s), Some(&root()), &up, now());
        s.clusters[1].name = "east".into();
        let st = federation_status(Some(&before), Some(2), &s, &validate(&s), Some(&root()), &[], now());
        assert_eq!(condition(&st.conditions, "Valid"), ("False", "DuplicateClusterName"));
        assert_eq!(condition(&st.conditions, "Ready"), ("False", "DuplicateClusterName"));
        assert_eq!(st.clusters, before.clusters);
        assert_eq!(st.observed_generation, Some(2));
    }

    #[test]
    fn a_root_that_cannot_be_had_fails_trust_and_readiness_naming_why() {
        let s = spec();
        let members = [report("east", Some("v"), None), report("west", Some("v"), None)];
        let missing = Err(Failure::new(Reason::RootMissing, "restore the Secret"));
        let st = federation_status(None, Some(1), &s, &validate(&s), Some(&missing), &members, now());
        assert_eq!(condition(&st.conditions, "TrustReady"), ("False", "RootMissing"));
        assert_eq!(condition(&st.conditions, "Ready"), ("False", "RootMissing"));
        let st = federation_status(None, Some(1), &s, &validate(&s), Some(&root()), &members, now());
        assert_eq!(st.trust.unwrap().root_fingerprint.as_deref(), Some("sha256:ab"));
        let rotating = root().map(|t| TrustStatus { rotation_phase: Some("DistributingRoot".into()), ..t });
        let st = federation_status(None, Some(1), &s, &validate(&s), Some(&rotating), &members, now());
        assert_eq!(condition(&st.conditions, "TrustReady"), ("False", "RootRotationInProgress"));
        assert_eq!(st.clusters[0].intermediate_not_after.as_deref(), Some("2027-01-01T00:00:00Z"));
    }

    #[test]
    fn a_leaving_member_stays_in_status_until_it_is_cleaned_up() {
        let s = spec();
        let mut gone = report("old", None, Some(Failure::new(Reason::Unreachable, "timed out")));
        gone.leaving = true;
        let members = [report("east", Some("v"), None), report("west", Some("v"), None), gone.clone()];
        let st = federation_status(None, Some(1), &s, &validate(&s), Some(&root()), &members, now());
        assert_eq!(st.clusters.len(), 3);
        assert_eq!(condition(&st.clusters[2].conditions, "Ready"), ("False", "CleanupPending"));
        gone.failure = None;
        gone.version = Some("v".into());
        let members = [members[0].clone(), members[1].clone(), gone];
        let st = federation_status(Some(&st), Some(1), &s, &validate(&s), Some(&root()), &members, now());
        assert_eq!(st.clusters.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["east", "west"]);
        assert_eq!(condition(&st.conditions, "Ready"), ("True", "Converged"));
    }

    #[test]
    fn event_notes_fit_the_apis_limit_cut_at_a_character_boundary() {
        // Eight unreachable members with ordinary messages make a condition's note longer than an Event may be.
        let s = spec();
        let members: Vec<MemberReport> = (0..8)
            .map(|i| {
                let why = format!("https://member-{i}.example:6443: error trying to connect: tcp connect error: Connection refused (os error 111), after 10s: the member did not answer");
                report(&format!("member-{i}"), None, Some(Failure::new(Reason::Unreachable, why)))
            })
            .collect();
        let st = federation_status(None, Some(1), &s, &validate(&s), Some(&root()), &members, now());
        let said = announcements(None, &st);
        let long = said.iter().find(|a| a.reason == "Unreachable").expect("an Event about the unreachable members");
        assert!(long.note.len() > EVENT_NOTE_MAX_BYTES, "{}", long.note.len());
        let note = event_note(long.note.clone());
        assert!(note.len() <= EVENT_NOTE_MAX_BYTES && note.ends_with(" [truncated]"), "{}", note.len());
        assert!(long.note.starts_with(note.trim_end_matches(" [truncated]")));

        for filler in ["é", "€", "𝄞"] {
            let note = event_note(filler.repeat(EVENT_NOTE_MAX_BYTES));
            assert!(note.len() <= EVENT_NOTE_MAX_BYTES && note.ends_with(" [truncated]"), "{filler}: {}", note.len());
        }
        let exact = "x".repeat(EVENT_NOTE_MAX_BYTES);
        assert_eq!(event_note(exact.clone()), exact, "a note that fits is not touched");
    }
}
