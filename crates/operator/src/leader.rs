//! Leader election on a Lease in the hub: of several replicas, only the holder of the Lease runs the controller,
//! so only it writes. A replica that loses the Lease stops its controller at once and returns an error (the process
//! exits and is restarted); the next leader resumes from what the clusters say.

use std::time::Duration;

use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tokio::task::JoinHandle;
use tracing::info;

/// The Lease meshfed's replicas compete for.
pub const LEASE_NAME: &str = "meshfed-leader";

/// Runs `work` while this replica (`identity`) holds the Lease `meshfed-leader` in `namespace`. Returns when
/// `work` ends, or with an error when the Lease is lost.
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
    let seconds = lease.as_secs().max(3);
    let manager = LeaseManagerBuilder::new(hub, LEASE_NAME)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(seconds)
        .with_grace(seconds / 3)
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
    tokio::select! {
        r = work => r,
        _ = lost => anyhow::bail!("lost the leader Lease; stopping so that another replica takes over"),
    }
}

struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
