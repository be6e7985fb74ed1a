//! Root rotation without an outage: the phases, and what each member's `cacerts` should become in each.
//!
//! A rotation runs from the root the members were last brought to (the status's `trust.rootFingerprint`), and any
//! other root of the federation they still trust or sign with, to the root the spec names now: a root that changes
//! mid-rotation (given back, or asked for anew) starts no second rotation, it becomes the target of this one. Its
//! phases are computed afresh from what the members hold (and one time kept in the status), so a restarted operator
//! resumes where the members are:
//! 1. `DistributingRoot`: every member's `root-cert.pem` gets the new root beside the old one; intermediates stay.
//!    It ends when every member's control plane publishes the new root to its workloads (istiod's ConfigMap
//!    `istio-ca-root-cert` holds it), not merely when the files hold it.
//! 2. `ReissuingIntermediates`: each member gets an intermediate from the new root, still trusting both.
//! 3. `AwaitingWorkloadCertificates`: every member signs with the new root, but workloads keep presenting
//!    certificates from the old intermediates until those expire: the old root stays trusted for the longest
//!    workload certificate lifetime (plus a margin) after the last member got its new intermediate.
//! 4. `DroppingOldRoot`: `root-cert.pem` keeps only the new root.
//!
//! Moving past phase 1 needs every member's state: while one is unreachable, the rotation holds where it is
//! (adding the new root, which is always safe, goes on). So no member ever signs with a CA that a peer does not
//! trust, and no member stops trusting a CA that a peer's workloads still present.

use std::{collections::BTreeMap, fmt, time::Duration};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::ByteString;

use crate::pki::{self, CA_CERT, ROOT_CERT};

/// A phase of a root rotation, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    DistributingRoot,
    ReissuingIntermediates,
    AwaitingWorkloadCertificates,
    DroppingOldRoot,
}

impl Phase {
    /// The phase a status message names (it starts with the phase).
    pub fn named_in(message: &str) -> Option<Self> {
        use Phase::*;
        [DistributingRoot, ReissuingIntermediates, AwaitingWorkloadCertificates, DroppingOldRoot]
            .into_iter()
            .find(|p| message.starts_with(&p.to_string()))
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::DistributingRoot => "DistributingRoot",
            Self::ReissuingIntermediates => "ReissuingIntermediates",
            Self::AwaitingWorkloadCertificates => "AwaitingWorkloadCertificates",
            Self::DroppingOldRoot => "DroppingOldRoot",
        })
    }
}

/// What a member's `cacerts` says about the rotation to root `new` (a PEM certificate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemberRoots {
    /// `root-cert.pem` holds the new root.
    pub trusts_new: bool,
    /// `root-cert.pem` holds certificates other than the new root.
    pub trusts_others: bool,
    /// `ca-cert.pem` is signed by the new root.
    pub issued_by_new: bool,
    /// The member's control plane publishes the new root to its workloads (or no control plane publishes any).
    pub published_new: bool,
}

impl MemberRoots {
    /// Reads a member's `cacerts` data (absent: it holds nothing yet) and the roots its control plane publishes
    /// (`published`: the PEM bundle of istiod's `istio-ca-root-cert`; absent: no control plane publishes one).
    pub fn of(data: Option<&BTreeMap<String, ByteString>>, published: Option<&str>, new_root_pem: &str) -> Self {
        let Some(data) = data else { return Self::default() };
        let new_fp = pki::fingerprints(new_root_pem.as_bytes()).into_iter().next();
        let roots = data.get(ROOT_CERT).map(|b| pki::fingerprints(&b.0)).unwrap_or_default();
        let holds_new = |fps: &[String]| new_fp.as_ref().is_some_and(|n| fps.contains(n));
        Self {
            trusts_new: holds_new(&roots),
            trusts_others: roots.iter().any(|r| Some(r) != new_fp.as_ref()),
            issued_by_new: data.get(CA_CERT).is_some_and(|c| pki::issued_by(&c.0, new_root_pem.as_bytes())),
            published_new: published.is_none_or(|p| holds_new(&pki::fingerprints(p.as_bytes()))),
        }
    }
}

/// Where a rotation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// The first phase not yet finished by every member; `None` when the rotation is complete: every member has an
    /// intermediate from the new root and trusts only it.
    pub phase: Option<Phase>,
    /// When every member was first seen holding an intermediate from the new root.
    pub reissued_at: Option<Timestamp>,
    /// When the old root may be dropped, while the rotation waits for it.
    pub wake_at: Option<Timestamp>,
}

/// Where a rotation stands at `now`, from every member's state (`None`: the member did not answer), when the
/// members were first seen on new intermediates (`reissued_at`, kept in the status), and the longest workload
/// certificate lifetime plus margin (`workload_wait`).
pub fn progress(
    members: &[Option<MemberRoots>],
    reissued_at: Option<Timestamp>,
    workload_wait: Duration,
    now: Timestamp,
) -> Progress {
    // A member that did not answer has not been shown to have finished any phase.
    let all = |test: fn(&MemberRoots) -> bool| members.iter().all(|m| m.as_ref().is_some_and(test));
    let waiting = |phase| Progress { phase: Some(phase), reissued_at: None, wake_at: None };
    if !all(|m| m.issued_by_new) {
        return waiting(if all(|m| m.trusts_new && m.published_new) {
            Phase::ReissuingIntermediates
        } else {
            Phase::DistributingRoot
        });
    }
    let since = reissued_at.unwrap_or(now);
    let until = since + SignedDuration::try_from(workload_wait).unwrap_or(SignedDuration::MAX);
    let phase = if all(|m| !m.trusts_others) {
        None
    } else if now < until {
        Some(Phase::AwaitingWorkloadCertificates)
    } else {
        Some(Phase::DroppingOldRoot)
    };
    Progress {
        phase,
        reissued_at: Some(since),
        wake_at: (phase == Some(Phase::AwaitingWorkloadCertificates)).then_some(until),
    }
}

/// What to do with one member's `cacerts` in a phase. `all_known`: every member answered (needed to go further
/// than adding the new root).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing to change.
    Keep,
    /// Write `root-cert.pem` as the old roots it holds plus the new one; keep its intermediate.
    AddNewRoot,
    /// Issue an intermediate from the new root, trusting the old roots and the new one.
    ReissueTrustingBoth,
    /// Write `root-cert.pem` as the new root alone.
    DropOldRoots,
}

/// The action for one member in `phase`.
pub fn action(phase: Phase, member: MemberRoots, all_known: bool) -> Action {
    match phase {
        _ if !member.trusts_new && !member.issued_by_new => Action::AddNewRoot,
        Phase::ReissuingIntermediates | Phase::AwaitingWorkloadCertificates | Phase::DroppingOldRoot
            if !member.issued_by_new && all_known =>
        {
            Action::ReissueTrustingBoth
        }
        Phase::DroppingOldRoot if member.trusts_others && all_known => Action::DropOldRoots,
        _ => Action::Keep,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD_ONLY: MemberRoots =
        MemberRoots { trusts_new: false, trusts_others: true, issued_by_new: false, published_new: false };
    const BOTH: MemberRoots = MemberRoots { trusts_new: true, published_new: true, ..OLD_ONLY };
    const NEW_INTERMEDIATE: MemberRoots = MemberRoots { issued_by_new: true, ..BOTH };
    const DONE: MemberRoots = MemberRoots { trusts_others: false, ..NEW_INTERMEDIATE };
    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn t(hours: i64) -> Timestamp {
        Timestamp::UNIX_EPOCH + SignedDuration::from_hours(hours)
    }

    fn phase(members: &[Option<MemberRoots>]) -> Option<Phase> {
        progress(members, Some(t(0)), DAY, t(100)).phase
    }

    #[test]
    fn the_phases_follow_what_the_members_hold() {
        assert_eq!(phase(&[Some(OLD_ONLY), Some(BOTH)]), Some(Phase::DistributingRoot));
        assert_eq!(phase(&[Some(BOTH), Some(BOTH)]), Some(Phase::ReissuingIntermediates));
        assert_eq!(phase(&[Some(NEW_INTERMEDIATE), Some(BOTH)]), Some(Phase::ReissuingIntermediates));
        assert_eq!(phase(&[Some(NEW_INTERMEDIATE), Some(DONE)]), Some(Phase::DroppingOldRoot));
        assert_eq!(phase(&[Some(DONE), Some(DONE)]), None);
    }

    #[test]
    fn nobody_signs_with_the_new_root_before_every_control_plane_publishes_it() {
        let in_files_only = MemberRoots { published_new: false, ..BOTH };
        assert_eq!(phase(&[Some(BOTH), Some(in_files_only)]), Some(Phase::DistributingRoot));
        assert_eq!(action(Phase::DistributingRoot, in_files_only, true), Action::Keep);
    }

    #[test]
    fn the_old_root_stays_until_the_workload_certificates_under_it_expired() {
        let all_new = [Some(NEW_INTERMEDIATE), Some(NEW_INTERMEDIATE)];
        // First seen now: the wait starts now, and the plan says when to look again.
        let first = progress(&all_new, None, DAY, t(10));
        assert_eq!(
            first,
            Progress {
                phase: Some(Phase::AwaitingWorkloadCertificates),
                reissued_at: Some(t(10)),
                wake_at: Some(t(34)),
            }
        );
        assert_eq!(action(Phase::AwaitingWorkloadCertificates, NEW_INTERMEDIATE, true), Action::Keep);
        // The time kept in the status carries the wait across restarts, to the end.
        assert_eq!(progress(&all_new, Some(t(10)), DAY, t(33)).phase, Some(Phase::AwaitingWorkloadCertificates));
        let done = progress(&all_new, Some(t(10)), DAY, t(34));
        assert_eq!((done.phase, done.wake_at), (Some(Phase::DroppingOldRoot), None));
    }

    #[test]
    fn an_unknown_member_holds_the_rotation_and_never_completes_it() {
        assert_eq!(phase(&[Some(DONE), None]), Some(Phase::DistributingRoot));
        // Nothing beyond adding the new root happens while a member is unknown.
        assert_eq!(action(Phase::ReissuingIntermediates, BOTH, false), Action::Keep);
        assert_eq!(action(Phase::DroppingOldRoot, NEW_INTERMEDIATE, false), Action::Keep);
        assert_eq!(action(Phase::DistributingRoot, OLD_ONLY, false), Action::AddNewRoot);
    }

    #[test]
    fn each_phase_asks_for_its_own_change_only() {
        assert_eq!(action(Phase::DistributingRoot, OLD_ONLY, true), Action::AddNewRoot);
        assert_eq!(action(Phase::DistributingRoot, BOTH, true), Action::Keep);
        assert_eq!(action(Phase::ReissuingIntermediates, BOTH, true), Action::ReissueTrustingBoth);
        assert_eq!(action(Phase::ReissuingIntermediates, NEW_INTERMEDIATE, true), Action::Keep);
        assert_eq!(action(Phase::DroppingOldRoot, NEW_INTERMEDIATE, true), Action::DropOldRoots);
        assert_eq!(action(Phase::DroppingOldRoot, DONE, true), Action::Keep);
    }

    /// One member in the simulation: its `cacerts` as the plan sees it, and the workload certificates it presents.
    #[derive(Clone, Copy, Debug)]
    struct Sim {
        roots: MemberRoots,
        /// Workloads present certificates from the old intermediate until then (none: until it is replaced).
        old_leaves_until: Option<Timestamp>,
    }

    #[test]
    fn no_workload_is_ever_presented_a_certificate_its_peers_do_not_trust() {
        // Three members, one hour per reconcile; istiod publishes a new bundle one reconcile after the files change;
        // workload certificates live a day, and meshfed waits a day after the last reissue.
        let mut members = [Sim { roots: OLD_ONLY, old_leaves_until: None }; 3];
        let mut reissued_at = None;
        for hour in 0..100 {
            let now = t(hour);
            let p = progress(&members.map(|m| Some(m.roots)), reissued_at, DAY, now);
            reissued_at = p.reissued_at;
            let Some(phase) = p.phase else { break };
            let next = members.map(|m| {
                // What istiod read at the last reconcile reaches the workloads now.
                let roots = MemberRoots { published_new: m.roots.trusts_new, ..m.roots };
                match action(phase, m.roots, true) {
                    Action::Keep => Sim { roots, ..m },
                    Action::AddNewRoot => Sim { roots: MemberRoots { trusts_new: true, ..roots }, ..m },
                    Action::ReissueTrustingBoth => Sim {
                        roots: MemberRoots { issued_by_new: true, ..roots },
                        old_leaves_until: Some(now + SignedDuration::from_hours(24)),
                    },
                    Action::DropOldRoots => Sim { roots: MemberRoots { trusts_others: false, ..roots }, ..m },
                }
            });
            for signer in next {
                let presents_old = !signer.roots.issued_by_new || signer.old_leaves_until.is_some_and(|u| now < u);
                for verifier in next {
                    // Workloads verify with what their istiod publishes.
                    let verifier_new = verifier.roots.trusts_new && verifier.roots.published_new;
                    assert!(
                        !signer.roots.issued_by_new || verifier_new,
                        "hour {hour}: new leaves untrusted in {phase}"
                    );
                    assert!(
                        !presents_old || verifier.roots.trusts_others,
                        "hour {hour}: old leaves untrusted in {phase}"
                    );
                }
            }
            members = next;
        }
        assert!(members.iter().all(|m| m.roots == DONE), "{members:?}");
    }
}
