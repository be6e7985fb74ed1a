//! High availability: two replicas with leader election on the chart's Lease, with the chart's credentials; the
//! leader is killed in the middle of a convergence and the other takes over, resuming from what the clusters say:
//! one root CA, and the same end state as a run that was never killed.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use meshfed_e2e::{Fixture, OPERATOR_NAMESPACE, example, is_ready};
use meshfed_operator::{
    controller::{self, Settings},
    leader,
    metrics::Metrics,
};
use meshfed_testenv::Options;

const LEASE: Duration = Duration::from_secs(3);
const WAIT: Duration = Duration::from_secs(60);

/// A replica as the chart runs it: its ServiceAccount, leader election on the Lease in the release namespace.
async fn replica(f: &Fixture, identity: &'static str, metrics: Metrics) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let hub = f.chart_credentials().await?;
    let settings = Settings { retry_after: Duration::from_secs(1), ..Settings::default() };
    Ok(tokio::spawn(async move {
        let work = controller::run(hub.clone(), settings, metrics);
        if let Err(e) = leader::run_as_leader(hub, OPERATOR_NAMESPACE, identity, LEASE, work).await {
            eprintln!("replica {identity} stopped: {e:#}");
        }
    }))
}

async fn holder(f: &Fixture) -> Option<String> {
    let leases = Api::<Lease>::namespaced(f.hub.clone(), OPERATOR_NAMESPACE);
    leases.get_opt(leader::LEASE_NAME).await.ok()??.spec?.holder_identity
}

#[tokio::test(flavor = "multi_thread")]
async fn when_the_leader_dies_mid_convergence_the_other_replica_takes_over_and_ends_the_same() -> anyhow::Result<()> {
    let members = ["east", "west"];
    // The reference: one operator, never killed.
    let reference = {
        let f = Fixture::start(&members, Options::default()).await?;
        f.apply(&example("multi-primary-multi-network")).await?;
        f.wait_for("prod", WAIT, is_ready).await?;
        f.end_state("prod", &members).await?
    };

    let f = Fixture::clusters(&members, Options::default()).await?;
    let (a, b) = (Metrics::default(), Metrics::default());
    let mut replicas = vec![("a", replica(&f, "a", a.clone()).await?), ("b", replica(&f, "b", b.clone()).await?)];
    let deadline = Instant::now() + WAIT;
    let first = loop {
        if let Some(h) = holder(&f).await {
            break h;
        }
        assert!(Instant::now() < deadline, "no replica took the Lease");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let leader_metrics = if first == "a" { a } else { b };

    // Kill the leader once it has started writing to members, before it is done.
    f.apply(&example("multi-primary-multi-network")).await?;
    while leader_metrics.member_writes_total() == 0 {
        assert!(Instant::now() < deadline, "the leader wrote nothing");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let i = replicas.iter().position(|(id, _)| *id == first).unwrap();
    replicas.remove(i).1.abort();
    let killed = Instant::now();
    let written = leader_metrics.member_writes_total();
    assert!(f.federations().get("prod").await?.status.is_none(), "the leader finished before it was killed");

    f.wait_for("prod", WAIT, is_ready).await?;
    println!(
        "converged {:.1?} after the leader was killed after {written} writes (Lease: {LEASE:?})",
        killed.elapsed()
    );
    assert_ne!(holder(&f).await.unwrap(), first, "the Lease did not move");
    let state = f.end_state("prod", &members).await?;
    assert!(state.contains("hub: 1 root CA Secret(s)"), "{state:#?}");
    assert_eq!(state, reference);
    Ok(())
}
