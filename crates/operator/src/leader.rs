//! Leader election on a Lease in the hub: of several replicas, only the holder of the Lease runs the controller,
//! so only it writes. A replica that loses the Lease stops its controller at once and returns an error (the process
//! exits and is restarted); the next leader resumes from what the clusters say.
//!
//! Losing the Lease is not always seen: a leader whose renewals fail (its API access to the hub is cut, its Lease
//! permission revoked) is never told that another replica took over, while it may still reach the members. So the
//! leader also fences itself: it looks at the Lease when a renewal is due, and stops as soon as the Lease's own
//! last renewal is older than the lease duration less a margin, that is before any other replica may take it
//! (they wait for the full duration since that renewal).

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use kube_lease_manager::LeaseManagerBuilder;
use tokio::{task::JoinHandle, time::Instant};
use tracing::{info, warn};

/// The Lease meshfed's replicas compete for.
pub const LEASE_NAME: &str = "meshfed-leader";

/// When the leader renews and when it must stop writing, for a Lease of a given duration: it renews at half the
/// duration since its last renewal (the manager's `grace` ahead of expiry, in whole seconds), and stops writing a
/// tenth of the duration before the Lease can expire, so that the renewal has the rest of the time to land and be
/// seen, and a write in flight when the controller is dropped (its reconcile tasks are aborted at their next await)
/// lands before another replica may start. Pure: the times come in as arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    /// The Lease duration, whole seconds (as the Lease stores it), at least 3.
    pub lease: Duration,
    /// How long before the Lease expires its holder renews it.
    pub grace: Duration,
    /// How long before the Lease expires its holder stops writing.
    pub margin: Duration,
    /// How often the holder looks at the Lease while a renewal it expects has not shown.
    pub poll: Duration,
}

/// What one look at the Lease says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// This replica holds the Lease: it may write until `write_until`, and looks again at `next_look`.
    Holding { write_until: Timestamp, next_look: Timestamp },
    /// Another replica holds it, or nobody does: stop now.
    NotHolding,
}

impl Fence {
    pub fn new(lease: Duration) -> Self {
        let lease = Duration::from_secs(lease.as_secs().max(3));
        Self { lease, grace: Duration::from_secs(lease.as_secs() / 2), margin: lease / 10, poll: lease / 10 }
    }

    /// The last moment a holder whose last renewal was at `renewed` may write.
    pub fn write_until(&self, renewed: Timestamp) -> Timestamp {
        renewed + signed(self.lease) - signed(self.margin)
    }

    /// One look, at `now`, at a Lease held by `holder` and last renewed at `renewed`, by replica `identity`.
    pub fn look(&self, holder: Option<&str>, renewed: Option<Timestamp>, identity: &str, now: Timestamp) -> Verdict {
        let (Some(holder), Some(renewed)) = (holder, renewed) else { return Verdict::NotHolding };
        if holder != identity {
            return Verdict::NotHolding;
        }
        let write_until = self.write_until(renewed);
        // The next renewal is due at `renewed + lease - grace`: look then, and every `poll` until it shows.
        let renewal_due = renewed + signed(self.lease) - signed(self.grace);
        let next_look = renewal_due.max(now + signed(self.poll)).min(write_until);
        Verdict::Holding { write_until, next_look }
    }
}

fn signed(d: Duration) -> SignedDuration {
    SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX)
}

/// `at` (by the system clock) as an instant of the runtime's clock.
fn instant_of(at: Timestamp, now: Timestamp) -> Instant {
    let ahead = Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO);
    Instant::now() + ahead
}

/// Runs `work` while this replica (`identity`) holds the Lease `meshfed-leader` in `namespace`. Returns when
/// `work` ends, or with an error when the Lease is lost or this replica's renewal deadline passes.
pub async fn run_as_leader<F>(
    hub: Client,
    namespace: &str,
    identity: &str,
    lease: Duration,
    work: F,
) -> anyhow::Result<()>
where
    F: Future<Output = anyhow::Result<()>>,
{
    let fence = Fence::new(lease);
    let manager = LeaseManagerBuilder::new(hub.clone(), LEASE_NAME)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(fence.lease.as_secs())
        .with_grace(fence.grace.as_secs())
        .with_field_manager("meshfed")
        .build()
        .await?;
    let (mut leading, task) = manager.watch().await;
    // The manager renews the Lease in its own task: end it with this future, so a replica that is stopped stops
    // renewing and another takes over when the Lease runs out.
    let _renewing = AbortOnDrop(task);
    info!(%identity, "waiting to become the leader");
    while !*leading.borrow_and_update() {
        leading.changed().await?;
    }
    info!(%identity, "leading");
    let lost = async { while leading.changed().await.is_ok() && *leading.borrow() {} };
    let leases: Api<Lease> = Api::namespaced(hub, namespace);
    tokio::select! {
        r = work => r,
        _ = lost => anyhow::bail!("lost the leader Lease; stopping so that another replica takes over"),
        e = fenced(&leases, identity, fence) => Err(e),
    }
}

/// Returns once this replica may no longer write: its Lease's last renewal is older than the fence allows, or the
/// Lease names another holder. A look that fails extends nothing.
async fn fenced(leases: &Api<Lease>, identity: &str, fence: Fence) -> anyhow::Error {
    // It has just acquired (or renewed) the Lease: until the first look says when, count from now.
    let mut write_until = instant_of(fence.write_until(Timestamp::now()), Timestamp::now());
    let mut next_look = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(write_until) => {
                warn!(%identity, "the leader Lease was not renewed in time; stopping before another replica can take it");
                return anyhow::anyhow!(
                    "the leader Lease was not renewed within {:?}; stopped writing before another replica can take it",
                    fence.lease - fence.margin
                );
            }
            _ = tokio::time::sleep_until(next_look) => {}
        }
        let now = Timestamp::now();
        match leases.get_opt(LEASE_NAME).await {
            Ok(lease) => {
                let spec = lease.and_then(|l| l.spec);
                let holder = spec.as_ref().and_then(|s| s.holder_identity.as_deref());
                let renewed = spec.as_ref().and_then(|s| s.renew_time.as_ref()).map(|t| t.0);
                match fence.look(holder, renewed, identity, now) {
                    Verdict::Holding { write_until: until, next_look: look } => {
                        write_until = instant_of(until, now);
                        next_look = instant_of(look, now);
                    }
                    Verdict::NotHolding => {
                        return anyhow::anyhow!("the leader Lease names another holder; stopping");
                    }
                }
            }
            Err(e) => {
                warn!(%identity, error = %e, "cannot read the leader Lease");
                next_look = Instant::now() + fence.poll;
            }
        }
    }
}

struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn the_leader_stops_writing_before_another_replica_may_take_the_lease() {
        let f = Fence::new(Duration::from_secs(15));
        let renewed = ts("2026-11-24T08:00:00Z");
        let Verdict::Holding { write_until, next_look } = f.look(Some("a"), Some(renewed), "a", renewed) else {
            panic!("a holds the Lease")
        };
        // Others take an unrenewed Lease once its duration has passed since the last renewal; the holder has
        // stopped before that.
        let taken_at = renewed + SignedDuration::from_secs(15);
        assert!(write_until < taken_at, "{write_until}");
        assert_eq!(write_until, ts("2026-11-24T08:00:13.5Z"));
        // ...and after the renewal falls due (at 7 s: half the duration), leaving it time to land and be seen.
        assert_eq!(next_look, ts("2026-11-24T08:00:08Z"));
        assert!(next_look + SignedDuration::from_secs(5) < write_until);
    }

    #[test]
    fn a_renewal_that_does_not_show_is_looked_for_until_the_deadline_which_never_moves() {
        let f = Fence::new(Duration::from_secs(15));
        let renewed = ts("2026-11-24T08:00:00Z");
        let mut now = renewed + SignedDuration::from_secs(8);
        let mut looks = 0;
        // The renewals fail: every look finds the same renewal time.
        while let Verdict::Holding { write_until, next_look } = f.look(Some("a"), Some(renewed), "a", now) {
            assert_eq!(write_until, ts("2026-11-24T08:00:13.5Z"), "failed renewals never extend the deadline");
            assert!(next_look > now || next_look == write_until);
            if now >= write_until {
                break;
            }
            now = next_look;
            looks += 1;
        }
        assert!((1..=5).contains(&looks), "{looks} looks: the holder looked again, a few times, before the deadline");
        assert!(now >= ts("2026-11-24T08:00:13.5Z"), "the looks went on until the deadline: {now}");
        // A renewal that shows moves the deadline.
        let later = renewed + SignedDuration::from_secs(8);
        let Verdict::Holding { write_until, .. } = f.look(Some("a"), Some(later), "a", now) else { panic!() };
        assert_eq!(write_until, ts("2026-11-24T08:00:21.5Z"));
    }

    #[test]
    fn a_lease_held_by_another_or_by_nobody_stops_at_once() {
        let f = Fence::new(Duration::from_secs(3));
        let now = ts("2026-11-24T08:00:00Z");
        assert_eq!(f.look(Some("b"), Some(now), "a", now), Verdict::NotHolding);
        assert_eq!(f.look(None, Some(now), "a", now), Verdict::NotHolding);
        assert_eq!(f.look(Some("a"), None, "a", now), Verdict::NotHolding);
    }

    #[test]
    fn short_leases_keep_the_order_renew_then_stop_then_takeover() {
        for secs in [1, 3, 4, 15, 60] {
            let f = Fence::new(Duration::from_secs(secs));
            let renew = f.lease - f.grace;
            let stop = f.lease - f.margin;
            assert!(renew < stop && stop < f.lease, "{secs}s: renew at {renew:?}, stop at {stop:?}");
            assert!(f.grace >= Duration::from_secs(1), "{secs}s: the manager renews in whole seconds");
        }
    }
}
