//! High availability: two replicas with leader election; the leader is killed and the other takes over, resuming
//! from what the clusters say, with one root CA and the same end state.

use std::time::{Duration, Instant};

use k8s_openapi::api::{coordination::v1::Lease, core::v1::Namespace, core::v1::Secret};
use kube::{Api, api::ListParams};
use meshfed_e2e::{Fixture, NAMESPACE, example, fed_condition, is_ready};
use meshfed_operator::{
    controller::{self, Settings},
    leader,
};
use meshfed_testenv::Options;

const LEASE: Duration = Duration::from_secs(3);

fn replica(f: &Fixture, identity: &'static str) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let hub = f.hub.clone();
    let settings = Settings { retry_after: Duration::from_secs(1), ..Settings::default() };
    tokio::spawn(async move {
        let work = controller::run(hub.clone(), settings, Default::default());
        leader::run_as_leader(hub, NAMESPACE, identity, LEASE, work).await
    })
}

async fn holder(f: &Fixture) -> Option<String> {
    let lease = Api::<Lease>::namespaced(f.hub.clone(), NAMESPACE).get_opt(leader::LEASE_NAME).await.ok()??;
    lease.spec?.holder_identity
}

#[tokio::test(flavor = "multi_thread")]
async fn when_the_leader_dies_the_other_replica_takes_over_and_converges_the_next_change() -> anyhow::Result<()> {
    let f = Fixture::clusters(&["east", "west"], Options::default()).await?;
    let mut replicas = vec![("a", replica(&f, "a")), ("b", replica(&f, "b"))];
    f.apply(&example("multi-primary-multi-network")).await?;
    f.wait_for("prod", Duration::from_secs(60), is_ready).await?;
    let first = holder(&f).await.expect("a leader holds the Lease");

    // Kill the leader; change the spec; the other replica must converge it once the Lease runs out.
    let i = replicas.iter().position(|(id, _)| *id == first).unwrap();
    replicas.remove(i).1.abort();
    let killed = Instant::now();
    f.apply(&example("multi-primary-multi-network").replace("network: network2", "network: network9")).await?;
    let fed = f.wait_for("prod", Duration::from_secs(60), is_ready).await?;
    println!("the change converged {:.1?} after the leader was killed (Lease: {LEASE:?})", killed.elapsed());
    let second = holder(&f).await.unwrap();
    assert_ne!(second, first, "the Lease did not move");
    assert_eq!(fed_condition(&fed, "TrustReady").unwrap().status, "True");
    let west = Api::<Namespace>::all(f.member("west").await?).get("istio-system").await?;
    assert_eq!(west.metadata.labels.unwrap()["topology.istio.io/network"], "network9");
    // One root CA, and both members' intermediates from it (TrustReady checks the chain to the one root).
    let roots = Api::<Secret>::namespaced(f.hub.clone(), NAMESPACE).list(&ListParams::default()).await?;
    let roots: Vec<_> =
        roots.items.iter().filter(|s| s.metadata.name.as_deref().is_some_and(|n| n.ends_with("-root-ca"))).collect();
    assert_eq!(roots.len(), 1);
    Ok(())
}
