//! Drift repair: what meshfed owns in a member, deleted or edited by hand, is back within seconds, through the
//! watches on the members (the federation is not touched and the next resync is minutes away).

use std::time::{Duration, Instant};

use k8s_openapi::api::{apps::v1::Deployment, core::v1::Namespace, core::v1::Secret, rbac::v1::ClusterRole};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams},
};
use meshfed_e2e::{Fixture, example, is_ready};
use meshfed_testenv::Options;

/// The promise is "about a second"; the bound leaves room for a loaded two-core machine.
const REPAIR_BOUND: Duration = Duration::from_secs(5);

async fn repaired<F, Fut>(what: &str, check: F) -> Duration
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    let ok = async || check().await;
    if let Err(e) = meshfed_e2e::until(what, REPAIR_BOUND, Duration::from_millis(50), ok).await {
        panic!("{what} was not repaired: {e}");
    }
    let took = start.elapsed();
    println!("{what}: repaired in {took:.2?}");
    took
}

#[tokio::test(flavor = "multi_thread")]
async fn drift_of_every_owned_kind_is_repaired_within_seconds_without_touching_the_federation() -> anyhow::Result<()> {
    let f = Fixture::start(&["east", "west"], Options::default()).await?;
    f.apply(&example("multi-primary-multi-network")).await?;
    f.wait_for("prod", Duration::from_secs(60), is_ready).await?;
    let east: Client = f.member("east").await?;
    let west: Client = f.member("west").await?;
    let east_secrets: Api<Secret> = Api::namespaced(east.clone(), "istio-system");
    let west_secrets: Api<Secret> = Api::namespaced(west.clone(), "istio-system");

    // An autoscaler scales the gateway through the scale subresource, as a HorizontalPodAutoscaler does: its
    // count is not drift. The reconcile that repairs cacerts below reads and compares the Deployment too.
    let deployments: Api<Deployment> = Api::namespaced(east.clone(), "istio-system");
    let scale = serde_json::json!({"spec": {"replicas": 3}});
    let by_autoscaler = PatchParams { field_manager: Some("e2e-autoscaler".into()), ..Default::default() };
    deployments.patch_scale("istio-eastwestgateway", &by_autoscaler, &Patch::Merge(&scale)).await?;

    east_secrets.delete("cacerts", &Default::default()).await?;
    repaired("a deleted cacerts", || async { east_secrets.get_opt("cacerts").await.unwrap().is_some() }).await;
    let replicas = deployments.get("istio-eastwestgateway").await?.spec.and_then(|s| s.replicas);
    assert_eq!(replicas, Some(3), "meshfed set back the replica count an autoscaler chose");
    // Its new intermediate is announced, like the first one was: the same Event about east, seen twice.
    f.wait_for_event("prod", |e| {
        e.reason.as_deref() == Some("IntermediateIssued")
            && e.related.as_ref().and_then(|r| r.name.as_deref()) == Some("east-kubeconfig")
            && e.series.as_ref().is_some_and(|s| s.count >= 2)
    })
    .await?;

    west_secrets.delete("istio-remote-secret-east", &Default::default()).await?;
    repaired("a deleted remote secret", || async {
        west_secrets.get_opt("istio-remote-secret-east").await.unwrap().is_some()
    })
    .await;

    let namespaces: Api<Namespace> = Api::all(east.clone());
    let edit = serde_json::json!({"metadata": {"labels": {"topology.istio.io/network": "elsewhere"}}});
    namespaces.patch("istio-system", &PatchParams::default(), &Patch::Merge(&edit)).await?;
    repaired("an edited network label", || async {
        let ns = namespaces.get("istio-system").await.unwrap();
        ns.metadata.labels.unwrap_or_default().get("topology.istio.io/network").map(String::as_str) == Some("network1")
    })
    .await;

    let roles: Api<ClusterRole> = Api::all(west.clone());
    let lp = ListParams::default().labels("meshfed.io/cluster=west");
    let role = roles.list(&lp).await?.items.remove(0).metadata.name.unwrap();
    roles.delete(&role, &Default::default()).await?;
    repaired("a deleted reader ClusterRole", || async { roles.get_opt(&role).await.unwrap().is_some() }).await;
    Ok(())
}
