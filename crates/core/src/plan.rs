//! The federation plan: from the spec, the previous status and what was observed of every member, the decisions of
//! one reconcile. Pure: the clock comes in as an argument.

use std::time::Duration;

use jiff::Timestamp;
use meshfed_api::{MeshFederationSpec, MeshFederationStatus, SecretKeyRef};

use crate::status::MemberReport;

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
/// refresh, the next intermediate renewal (`renew_before` ahead of an intermediate's expiry) and the `resync`,
/// and at least [`MIN_REQUEUE`]. Without this a short `tokenTTL` or `renewBefore` would fall due between two
/// resyncs and expire first.
pub fn next_deadline(members: &[MemberReport], renew_before: Duration, now: Timestamp, resync: Duration) -> Duration {
    let renewals = members
        .iter()
        .filter_map(|m| m.intermediate.as_ref()?.as_ref().ok())
        .map(|i| crate::pki::renewal_at(i.not_after, renew_before).unwrap_or(now));
    let refreshes = members.iter().filter_map(|m| m.token_refresh_at);
    let earliest = renewals.chain(refreshes).min();
    let until = |at: Timestamp| Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO);
    earliest.map_or(resync, |at| until(at).min(resync)).max(MIN_REQUEUE)
}


#[cfg(test)]
mod tests {
    use super::*;
    use crate::{federation::Failure, pki::CertSummary};

    fn summary() -> CertSummary {
        CertSummary { fingerprint: "sha256:ab".into(), not_after: "2027-01-01T00:00:00Z".parse().unwrap() }
    }

    fn now() -> Timestamp {
        "2026-11-22T10:00:00Z".parse().unwrap()
    }

    fn report(name: &str, version: Option<&str>, failure: Option<Failure>) -> MemberReport {
        let mut r = MemberReport::new(name, &SecretKeyRef { name: name.into(), key: "kubeconfig".into() }, false);
        r.intermediate = version.map(|_| Ok(summary()));
        r.version = version.map(Into::into);
        r.failure = failure;
        r
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
