//! High availability: two replicas with leader election on the chart's Lease, with the chart's credentials; the
//! leader is killed in the middle of a convergence and the other takes over, resuming from what the clusters say:
//! one root CA, and the same end state as a run that was never killed. A leader whose Lease renewals fail stops
//! writing before the other replica takes the Lease.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Secret, ServiceAccount},
    rbac::v1::{ClusterRoleBinding, RoleBinding},
};
use kube::{
    Api, Client,
    api::{DeleteParams, PostParams},
};
use meshfed_e2e::{Fixture, OPERATOR_NAMESPACE, example, is_ready, sample_until, until};
use meshfed_operator::{
    leader,
    metrics::Metrics,
    reconcile::{self, Settings},
};
use meshfed_testenv::Options;

const LEASE: Duration = Duration::from_secs(3);
const WAIT: Duration = Duration::from_secs(60);

/// A replica as the chart runs it: its ServiceAccount, leader election on the Lease in the release namespace.
async fn replica(f: &Fixture, identity: &'static str, metrics: Metrics) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let hub = f.chart_credentials().await?;
    let settings = Settings { retry_after: Duration::from_secs(1), ..Settings::default() };
    Ok(tokio::spawn(async move {
        let work = reconcile::run(hub.clone(), settings, metrics);
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
    let mut first = None;
    let took = sample_until(Instant::now(), WAIT, Duration::from_millis(50), async |_, _| {
        first = holder(&f).await;
        Ok(first.is_some())
    })
    .await;
    let first = first.unwrap_or_else(|| panic!("no replica took the Lease: {took:?}"));
    let leader_metrics = if first == "a" { a } else { b };

    // Kill the leader once it has started writing to members, before it is done.
    f.apply(&example("multi-primary-multi-network")).await?;
    let wrote = async || leader_metrics.member_writes_total() > 0;
    until("the leader to write", deadline.saturating_duration_since(Instant::now()), Duration::from_millis(1), wrote)
        .await?;
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
    // `meshfed check --lease-namespace` sees the live leader.
    let leader = meshfed_operator::check::leader(&f.hub, OPERATOR_NAMESPACE, jiff::Timestamp::now()).await;
    assert!(leader.ok && leader.detail.starts_with(&holder(&f).await.unwrap()), "{leader:?}");
    let state = f.end_state("prod", &members).await?;
    assert!(state.contains("hub: 1 root CA Secret(s)"), "{state:#?}");
    assert_eq!(state, reference);
    Ok(())
}

/// A ServiceAccount `replica-<id>` bound to the chart's ClusterRole and Lease Role by bindings of its own, so that
/// one replica's Lease access can be revoked alone; a client with its credentials.
async fn own_credentials(f: &Fixture, id: &str) -> anyhow::Result<Client> {
    f.chart_credentials().await?; // installs the chart's RBAC
    let name = format!("replica-{id}");
    let subject = serde_json::json!([{"kind": "ServiceAccount", "name": name, "namespace": OPERATOR_NAMESPACE}]);
    let pp = PostParams::default();
    let sa: ServiceAccount = serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?;
    Api::<ServiceAccount>::namespaced(f.hub.clone(), OPERATOR_NAMESPACE).create(&pp, &sa).await?;
    let crb: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "meshfed"},
        "subjects": subject,
    }))?;
    Api::<ClusterRoleBinding>::all(f.hub.clone()).create(&pp, &crb).await?;
    let rb: RoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": leader::LEASE_NAME},
        "subjects": subject,
    }))?;
    Api::<RoleBinding>::namespaced(f.hub.clone(), OPERATOR_NAMESPACE).create(&pp, &rb).await?;
    f.credentials_of(&name).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leader_whose_lease_renewals_fail_stops_writing_before_the_other_replica_takes_over() -> anyhow::Result<()> {
    let f = Fixture::clusters(&["east", "west"], Options::default()).await?;
    // Per replica: its metrics, and when it stopped with how many member writes it had made by then.
    type Stopped = Arc<Mutex<Option<(Instant, u64)>>>;
    let mut replicas: Vec<(&str, Metrics, Stopped, tokio::task::JoinHandle<()>)> = Vec::new();
    for id in ["a", "b"] {
        let hub = own_credentials(&f, id).await?;
        let (metrics, stopped) = (Metrics::default(), Stopped::default());
        let settings = Settings { retry_after: Duration::from_secs(1), ..Settings::default() };
        let (m, s) = (metrics.clone(), stopped.clone());
        let task = tokio::spawn(async move {
            let work = reconcile::run(hub.clone(), settings, m.clone());
            let result = leader::run_as_leader(hub, OPERATOR_NAMESPACE, id, LEASE, work).await;
            *s.lock().unwrap() = Some((Instant::now(), m.member_writes_total()));
            eprintln!("replica {id} stopped: {result:?}");
        });
        replicas.push((id, metrics, stopped, task));
    }
    f.apply(&example("multi-primary-multi-network")).await?;
    f.wait_for("prod", WAIT, is_ready).await?;
    let first = holder(&f).await.expect("a leader");
    let (_, leader_metrics, leader_stopped, _) = replicas.iter().find(|r| r.0 == first).unwrap();
    let other = replicas.iter().find(|r| r.0 != first).unwrap().0;

    // Cut the leader's Lease access: its renewals (and its looks at the Lease) fail from now on, while it still
    // reads the hub and reaches the members. Keep the members drifting, so that a leader still running writes.
    let bindings = Api::<RoleBinding>::namespaced(f.hub.clone(), OPERATOR_NAMESPACE);
    bindings.delete(&format!("replica-{first}"), &DeleteParams::default()).await?;
    let cut = Instant::now();
    let cacerts = Api::<Secret>::namespaced(f.member("east").await?, "istio-system");
    let mut taken = None;
    let took = sample_until(cut, WAIT, Duration::from_millis(100), async |_, _| {
        if holder(&f).await.as_deref() == Some(other) {
            taken = Some((Instant::now(), leader_metrics.member_writes_total()));
            return Ok(true);
        }
        // Drift for the new leader to repair: the old one, cut off, must not.
        let _ = cacerts.delete("cacerts", &DeleteParams::default()).await;
        Ok(false)
    })
    .await;
    let (taken, writes_when_taken) = taken.unwrap_or_else(|| panic!("{other} never took the Lease: {took:?}"));
    let (stopped, writes) = leader_stopped.lock().unwrap().expect("the leader whose renewals fail did not stop");
    println!(
        "{first} stopped {:.1?} after its Lease access was cut, {:.1?} before {other} took the Lease (Lease: {LEASE:?}); member writes: {writes} when it stopped, {writes_when_taken} at the takeover",
        stopped - cut,
        taken - stopped
    );
    assert!(stopped < taken, "{first} stopped after {other} took the Lease");
    assert!(stopped - cut <= LEASE, "{first} wrote for {:?} after its last renewal at the latest", stopped - cut);

    // The new leader repairs the drift; the old one starts no write any more (one in flight when it stopped may
    // still land then, within the fence's margin, before the takeover).
    f.wait_for("prod", WAIT, is_ready).await?;
    meshfed_e2e::until("cacerts is put back", WAIT, Duration::from_millis(100), async || {
        cacerts.get_opt("cacerts").await.ok().flatten().is_some()
    })
    .await?;
    assert_eq!(leader_metrics.member_writes_total(), writes_when_taken, "{first} wrote after {other} took over");
    Ok(())
}
