//! Root rotation without an outage: the phases, and what each member's `cacerts` should become in each.
//!
//! A rotation runs from the root the members were last brought to (the status's `trust.rootFingerprint`) to the
//! root the spec names now. It has three phases, each computed afresh from what the members hold, so a restarted
//! operator resumes where the members are:
//! 1. `DistributingRoot`: every member's `root-cert.pem` gets the new root beside the old one; intermediates stay.
//! 2. `ReissuingIntermediates`: once every member trusts both, each gets an intermediate from the new root, still
//!    trusting both.
//! 3. `DroppingOldRoot`: once every member has an intermediate from the new root, `root-cert.pem` keeps only it.
//!
//! Moving to phase 2 or 3 needs every member's state: while one is unreachable, the rotation holds where it is
//! (adding the new root, which is always safe, goes on). So no member ever signs with a CA that a peer does not
//! trust, and no member stops trusting a CA that a peer still signs with.

use std::fmt;

use k8s_openapi::ByteString;
use std::collections::BTreeMap;

use crate::pki::{self, CA_CERT, ROOT_CERT};

/// A phase of a root rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    DistributingRoot,
    ReissuingIntermediates,
    DroppingOldRoot,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::DistributingRoot => "DistributingRoot",
            Self::ReissuingIntermediates => "ReissuingIntermediates",
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
}

impl MemberRoots {
    /// Reads a member's `cacerts` data (absent: it holds nothing yet).
    pub fn of(data: Option<&BTreeMap<String, ByteString>>, new_root_pem: &str) -> Self {
        let Some(data) = data else { return Self::default() };
        let new_fp = pki::fingerprints(new_root_pem.as_bytes()).into_iter().next();
        let roots = data.get(ROOT_CERT).map(|b| pki::fingerprints(&b.0)).unwrap_or_default();
        Self {
            trusts_new: new_fp.as_ref().is_some_and(|n| roots.contains(n)),
            trusts_others: roots.iter().any(|r| Some(r) != new_fp.as_ref()),
            issued_by_new: data.get(CA_CERT).is_some_and(|c| pki::issued_by(&c.0, new_root_pem.as_bytes())),
        }
    }
}

/// Where a rotation stands, from every member's state (`None`: the member did not answer): the first phase not
/// yet finished by every member. `None` when the rotation is complete: every member has an intermediate from the
/// new root and trusts only it.
pub fn phase(members: &[Option<MemberRoots>]) -> Option<Phase> {
    // A member that did not answer has not been shown to have finished any phase.
    let all = |test: fn(&MemberRoots) -> bool| members.iter().all(|m| m.as_ref().is_some_and(test));
    if all(|m| m.issued_by_new) {
        (!all(|m| !m.trusts_others)).then_some(Phase::DroppingOldRoot)
    } else if all(|m| m.trusts_new) {
        Some(Phase::ReissuingIntermediates)
    } else {
        Some(Phase::DistributingRoot)
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
        Phase::ReissuingIntermediates | Phase::DroppingOldRoot if !member.issued_by_new && all_known => {
            Action::ReissueTrustingBoth
        }
        Phase::DroppingOldRoot if member.trusts_others && all_known => Action::DropOldRoots,
        _ => Action::Keep,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD_ONLY: MemberRoots = MemberRoots { trusts_new: false, trusts_others: true, issued_by_new: false };
    const BOTH: MemberRoots = MemberRoots { trusts_new: true, trusts_others: true, issued_by_new: false };
    const NEW_INTERMEDIATE: MemberRoots = MemberRoots { trusts_new: true, trusts_others: true, issued_by_new: true };
    const DONE: MemberRoots = MemberRoots { trusts_new: true, trusts_others: false, issued_by_new: true };

    #[test]
    fn the_phases_follow_what_the_members_hold() {
        assert_eq!(phase(&[Some(OLD_ONLY), Some(BOTH)]), Some(Phase::DistributingRoot));
        assert_eq!(phase(&[Some(BOTH), Some(BOTH)]), Some(Phase::ReissuingIntermediates));
        assert_eq!(phase(&[Some(NEW_INTERMEDIATE), Some(BOTH)]), Some(Phase::ReissuingIntermediates));
        assert_eq!(phase(&[Some(NEW_INTERMEDIATE), Some(DONE)]), Some(Phase::DroppingOldRoot));
        assert_eq!(phase(&[Some(DONE), Some(DONE)]), None);
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

    #[test]
    fn no_sequence_of_actions_leaves_a_signer_untrusted() {
        // Walk a two-member rotation to the end; at every step each member trusts every CA that signs.
        let mut members = [OLD_ONLY, OLD_ONLY];
        for _ in 0..10 {
            let Some(p) = phase(&members.map(Some)) else { break };
            let next = members.map(|m| match action(p, m, true) {
                Action::Keep => m,
                Action::AddNewRoot => MemberRoots { trusts_new: true, ..m },
                Action::ReissueTrustingBoth => NEW_INTERMEDIATE,
                Action::DropOldRoots => DONE,
            });
            for signer in next {
                for verifier in next {
                    let trusted = if signer.issued_by_new { verifier.trusts_new } else { verifier.trusts_others };
                    assert!(trusted, "{verifier:?} does not trust {signer:?} in {p}");
                }
            }
            members = next;
        }
        assert_eq!(members, [DONE, DONE]);
    }
}
