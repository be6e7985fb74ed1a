//! Federations that cannot hurt each other, against real local clusters: a member's Istio namespace belongs to one
//! federation (its claim, in the member), a second federation naming it is refused there and writes nothing, racing
//! federations leave one claim, deletion never hangs on a member that holds nothing, a member gone for good can be
//! released, and a moved Istio namespace leaves nothing behind. Federations share a member each in its own Istio
//! namespace and revision; one that asks for another's revision is refused there before it writes anything.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::{
    Api, Client, ResourceExt,
    api::{DynamicObject, ListParams, Patch, PatchParams},
};
use meshfed_api::MeshFederation;
use meshfed_core::kinds::OWNED_KINDS;
use meshfed_e2e::{Fixture, NAMESPACE, condition, example, fed_condition, is_ready, put_kubeconfig, until};
use meshfed_operator::member::kinds::api_resource;
use meshfed_testenv::Options;

const WAIT: Duration = Duration::from_secs(60);

/// A federation named `name` over `clusters` (`name:network`), in Istio namespace `istio`.
fn federation(name: &str, istio: &str, clusters: &[&str]) -> String {
    federation_of_revision(name, istio, "default", clusters)
}

/// A federation named `name` over `clusters` (`name:network`), in Istio namespace `istio` with revision `revision`,
/// each reached with Secret `<cluster>-<name>-kubeconfig`: what `Fixture::join_federation` writes.
fn federation_of_revision(name: &str, istio: &str, revision: &str, clusters: &[&str]) -> String {
    let members: String = clusters
        .iter()
        .map(|c| {
            let (cluster, network) = c.split_once(':').unwrap();
            format!(
                "  - {{name: {cluster}, network: {network}, kubeconfigSecretRef: {{name: {cluster}-{name}-kubeconfig}}}}\n"
            )
        })
        .collect();
    format!(
        "apiVersion: meshfed.io/v1alpha1\nkind: MeshFederation\nmetadata: {{name: {name}, namespace: {NAMESPACE}}}\nspec:\n  meshID: {name}\n  istio: {{namespace: {istio}, revision: {revision}}}\n  trust: {{root: {{generate: {{}}}}}}\n  clusters:\n{members}"
    )
}

/// Every object meshfed owns in a member (any federation) and that is not being deleted (a namespace stays
/// terminating without kube-controller-manager), with its resourceVersion.
async fn owned_versions(member: &Client) -> anyhow::Result<BTreeMap<String, String>> {
    versions(member, MANAGED).await
}

const MANAGED: &str = "app.kubernetes.io/managed-by=meshfed";

/// What [`owned_versions`] finds of federation `name` (in the hub's test namespace).
async fn versions_of(member: &Client, name: &str) -> anyhow::Result<BTreeMap<String, String>> {
    versions(member, &format!("{MANAGED},meshfed.io/federation={name},meshfed.io/federation-namespace={NAMESPACE}"))
        .await
}

/// Every object of an owned kind with labels `selector` that is not being deleted, with its resourceVersion.
async fn versions(member: &Client, selector: &str) -> anyhow::Result<BTreeMap<String, String>> {
    listed(member, selector, |o| o.resource_version().unwrap_or_default()).await
}

/// Every object of an owned kind with labels `selector` that is not being deleted, with `what` of it.
async fn listed(
    member: &Client,
    selector: &str,
    what: impl Fn(&DynamicObject) -> String,
) -> anyhow::Result<BTreeMap<String, String>> {
    let lp = ListParams::default().labels(selector);
    let mut out = BTreeMap::new();
    for kind in OWNED_KINDS {
        let ar = api_resource(kind);
        for o in Api::<DynamicObject>::all_with(member.clone(), &ar).list(&lp).await?.items {
            if o.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let key = format!("{} {}/{}", kind.kind, o.namespace().unwrap_or_default(), o.name_any());
            out.insert(key, what(&o));
        }
    }
    Ok(out)
}

fn member_reason(fed: &MeshFederation, cluster: &str) -> Option<String> {
    let c = fed.status.as_ref()?.clusters.iter().find(|c| c.name == cluster)?;
    Some(condition(&c.conditions, "Ready")?.reason.clone())
}

/// Samples `prod` every 100 ms until stopped; counts the samples where it was not `Ready=True`.
fn watch_ready(f: &Fixture) -> (Arc<AtomicBool>, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let (stop, samples, not_ready) =
        (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (api, s, n, done) = (f.federations(), Arc::clone(&samples), Arc::clone(&not_ready), Arc::clone(&stop));
    tokio::spawn(async move {
        // Also paced when the hub does not answer (as once the fixture is gone after a failed assertion).
        while !done.load(Ordering::Relaxed) {
            if let Ok(fed) = api.get("prod").await {
                s.fetch_add(1, Ordering::Relaxed);
                if !is_ready(&fed) {
                    n.fetch_add(1, Ordering::Relaxed);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    (stop, samples, not_ready)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_federation_is_refused_on_a_claimed_member_and_writes_nothing_there() -> anyhow::Result<()> {
    let f = Fixture::start(&["east", "west", "north"], Options::default()).await?;
    f.join_federation("staging", "istio-system", &["west", "north"]).await?;
    f.apply(&example("multi-primary-multi-network")).await?;
    f.wait_for("prod", WAIT, is_ready).await?;
    let west = f.member("west").await?;
    let before = owned_versions(&west).await?;
    let (stop, samples, not_ready) = watch_ready(&f);

    // staging names west (prod's) and north (free).
    f.apply(&federation("staging", "istio-system", &["west:n1", "north:n2"])).await?;
    // North converges once the played cloud gave its gateway an address: a reconcile or two after west's refusal.
    let claimed = |fed: &MeshFederation| {
        member_reason(fed, "west").as_deref() == Some("ClusterClaimed")
            && member_reason(fed, "north").as_deref() == Some("Converged")
    };
    let staging = f.wait_for("staging", WAIT, claimed).await?;
    let west_status = staging.status.as_ref().unwrap().clusters.iter().find(|c| c.name == "west").unwrap();
    let message = &condition(&west_status.conditions, "Ready").unwrap().message;
    assert!(message.contains("mesh-system/prod"), "the refusal names the owner: {message}");
    assert_eq!(fed_condition(&staging, "Ready").unwrap().status, "False");
    assert_eq!(member_reason(&staging, "north").as_deref(), Some("Converged"), "the free member converges");
    assert_eq!(owned_versions(&west).await?, before, "staging wrote nothing in west");

    // Edited, still nothing there; the reconcile of the edit is proven by its observedGeneration.
    let edit = serde_json::json!({"spec": {"clusters": [
        {"name": "west", "network": "n1", "kubeconfigSecretRef": {"name": "west-staging-kubeconfig"}},
        {"name": "north", "network": "n3", "kubeconfigSecretRef": {"name": "north-staging-kubeconfig"}},
    ]}});
    let edited = f.federations().patch("staging", &PatchParams::default(), &Patch::Merge(&edit)).await?;
    let generation = edited.metadata.generation;
    f.wait_for("staging", WAIT, |fed| {
        fed.status.as_ref().is_some_and(|s| s.observed_generation == generation) && claimed(fed)
    })
    .await?;
    assert_eq!(owned_versions(&west).await?, before, "the edit wrote nothing in west");

    // Deleted: north is cleaned, west (which holds nothing of staging) does not hold the deletion up.
    f.delete("staging").await?;
    f.wait_gone("staging", Duration::from_secs(20)).await?;
    assert_eq!(owned_versions(&west).await?, before, "staging's deletion touched nothing of prod's");
    let north = owned_versions(&f.member("north").await?).await?;
    assert!(north.is_empty(), "north keeps nothing of staging: {north:?}");

    stop.store(true, Ordering::Relaxed);
    let samples = samples.load(Ordering::Relaxed);
    assert!(samples > 10, "prod was sampled ({samples} samples)");
    assert_eq!(not_ready.load(Ordering::Relaxed), 0, "prod stayed Ready=True at every one of {samples} samples");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn federations_share_members_each_in_its_own_istio_namespace_and_revision() -> anyhow::Result<()> {
    let f = Fixture::start(&["east", "west"], Options::default()).await?;
    f.join_federation("alpha", "istio-alpha", &["east", "west"]).await?;
    f.join_federation("beta", "istio-beta", &["east", "west"]).await?;
    f.join_federation("gamma", "istio-gamma", &["east"]).await?;
    let both = ["east:n1", "west:n2"];
    f.apply(&federation_of_revision("alpha", "istio-alpha", "alpha", &both)).await?;
    f.apply(&federation_of_revision("beta", "istio-beta", "beta", &both)).await?;
    futures::try_join!(f.wait_for("alpha", WAIT, is_ready), f.wait_for("beta", WAIT, is_ready))?;
    let (east, west) = (f.member("east").await?, f.member("west").await?);
    for member in [&east, &west] {
        let istios = Api::<DynamicObject>::all_with(member.clone(), &api_resource(&meshfed_core::kinds::ISTIO));
        for (revision, namespace) in [("alpha", "istio-alpha"), ("beta", "istio-beta")] {
            let istio = istios.get(revision).await?;
            assert_eq!(istio.data["spec"]["namespace"], namespace);
            assert_eq!(istio.labels()["meshfed.io/federation"], revision);
        }
    }
    let alpha = [versions_of(&east, "alpha").await?, versions_of(&west, "alpha").await?];
    assert!(alpha[0].contains_key("Secret istio-alpha/cacerts"), "{:?}", alpha[0]);

    // gamma asks for alpha's revision in its own namespace: refused on east before it writes anything there.
    f.apply(&federation_of_revision("gamma", "istio-gamma", "alpha", &["east:n1"])).await?;
    let refused = |fed: &MeshFederation| member_reason(fed, "east").as_deref() == Some("OwnedByAnotherFederation");
    let gamma = f.wait_for("gamma", WAIT, refused).await?;
    let east_status = gamma.status.as_ref().unwrap().clusters.iter().find(|c| c.name == "east").unwrap();
    assert!(east_status.reachable, "a member that refuses a write is still reachable, also while it backs off");
    let message = &condition(&east_status.conditions, "Ready").unwrap().message;
    assert!(message.contains("Istio alpha belongs to federation mesh-system/alpha"), "{message}");
    let gamma_east = versions_of(&east, "gamma").await?;
    assert_eq!(
        gamma_east.keys().collect::<Vec<_>>(),
        ["ConfigMap kube-system/meshfed-claim.istio-gamma"],
        "only its claim"
    );

    // Deleting beta and gamma cleans their own objects and touches nothing of alpha's.
    f.delete("beta").await?;
    f.delete("gamma").await?;
    f.wait_gone("beta", Duration::from_secs(20)).await?;
    f.wait_gone("gamma", Duration::from_secs(20)).await?;
    for (member, alpha) in [&east, &west].into_iter().zip(alpha) {
        let left = [versions_of(member, "beta").await?, versions_of(member, "gamma").await?];
        assert!(left.iter().all(BTreeMap::is_empty), "beta and gamma leave nothing: {left:?}");
        assert_eq!(versions_of(member, "alpha").await?, alpha, "alpha's objects stay as they were");
    }
    assert!(is_ready(&f.federations().get("alpha").await?));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_ambient_federation_is_refused_on_a_member_that_runs_anothers_ztunnel_and_writes_nothing_more()
-> anyhow::Result<()> {
    let f = Fixture::start(&["east", "west"], Options::default()).await?;
    let both = ["east:n1", "west:n2"];
    let ambient = |name: &str| {
        let namespace = format!("istio-{name}");
        federation_of_revision(name, &namespace, name, &both)
            .replace("  clusters:\n", "  dataPlane: Ambient\n  clusters:\n")
    };
    for name in ["alpha", "beta"] {
        f.join_federation(name, &format!("istio-{name}"), &["east", "west"]).await?;
    }
    f.apply(&ambient("alpha")).await?;
    f.wait_for("alpha", WAIT, is_ready).await?;
    let (east, west) = (f.member("east").await?, f.member("west").await?);
    let alpha = [versions_of(&east, "alpha").await?, versions_of(&west, "alpha").await?];
    assert!(alpha[0].contains_key("ZTunnel /default"), "{:?}", alpha[0]);

    // beta, in its own Istio namespace and revision, would need the members' one istio-cni and ztunnel.
    f.apply(&ambient("beta")).await?;
    let refused = |fed: &MeshFederation| {
        ["east", "west"].iter().all(|m| member_reason(fed, m).as_deref() == Some("OwnedByAnotherFederation"))
    };
    let beta = f.wait_for("beta", WAIT, refused).await?;
    for (member, client) in [("east", &east), ("west", &west)] {
        let status = beta.status.as_ref().unwrap().clusters.iter().find(|c| c.name == member).unwrap();
        let message = &condition(&status.conditions, "Ready").unwrap().message;
        for kind in ["IstioCNI", "ZTunnel"] {
            assert!(message.contains(&format!("{kind} default belongs to federation mesh-system/alpha")), "{message}");
        }
        assert!(message.contains("one ambient federation only"), "{message}");
        let written = versions_of(client, "beta").await?;
        assert_eq!(
            written.keys().collect::<Vec<_>>(),
            ["ConfigMap kube-system/meshfed-claim.istio-beta"],
            "only its claim"
        );
    }
    f.delete("beta").await?;
    f.wait_gone("beta", Duration::from_secs(20)).await?;
    for (member, alpha) in [&east, &west].into_iter().zip(alpha) {
        assert!(versions_of(member, "beta").await?.is_empty());
        assert_eq!(versions_of(member, "alpha").await?, alpha, "alpha's objects stay as they were");
    }
    assert!(is_ready(&f.federations().get("alpha").await?));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn two_federations_racing_for_one_member_leave_exactly_one_claim() -> anyhow::Result<()> {
    let f = Fixture::start(&["east"], Options::default()).await?;
    f.join_federation("alpha", "istio-system", &["east"]).await?;
    f.join_federation("beta", "istio-system", &["east"]).await?;
    let (a, b) = (federation("alpha", "istio-system", &["east:n1"]), federation("beta", "istio-system", &["east:n1"]));
    futures::try_join!(f.apply(&a), f.apply(&b))?;
    let settled = |fed: &MeshFederation| {
        matches!(member_reason(fed, "east").as_deref(), Some("Converged") | Some("ClusterClaimed"))
    };
    let (alpha, beta) = futures::try_join!(f.wait_for("alpha", WAIT, settled), f.wait_for("beta", WAIT, settled))?;
    let reasons = [member_reason(&alpha, "east").unwrap(), member_reason(&beta, "east").unwrap()];
    let said = |fed: &MeshFederation| serde_json::to_string(&fed.status.as_ref().unwrap().clusters).unwrap();
    assert_eq!(
        reasons.iter().filter(|r| *r == "Converged").count(),
        1,
        "{reasons:?}: {} {}",
        said(&alpha),
        said(&beta)
    );
    let east = f.member("east").await?;
    let claims = Api::<ConfigMap>::namespaced(east.clone(), "kube-system")
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by=meshfed"))
        .await?
        .items;
    assert_eq!(claims.len(), 1, "one claim: {:?}", claims.iter().map(|c| c.name_any()).collect::<Vec<_>>());
    let winner = if reasons[0] == "Converged" { "alpha" } else { "beta" };
    assert_eq!(claims[0].labels()["meshfed.io/federation"], winner);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn deletion_never_hangs_on_members_that_hold_nothing_and_a_dead_member_can_be_released() -> anyhow::Result<()> {
    let mut f = Fixture::start(&["east", "west"], Options::default()).await?;
    // A refused kubeconfig (it runs a command) and a Secret that never existed.
    let exec = "apiVersion: v1\nkind: Config\ncurrent-context: c\nclusters: [{name: k, cluster: {server: 'https://127.0.0.1:1'}}]\ncontexts: [{name: c, context: {cluster: k, user: u}}]\nusers: [{name: u, user: {exec: {command: /bin/true, apiVersion: client.authentication.k8s.io/v1}}}]\n";
    put_kubeconfig(&f.hub, "refused-broken", exec).await?;
    f.apply(&federation("broken", "istio-system", &["refused:n1", "missing:n2"])).await?;
    let reported =
        |fed: &MeshFederation| member_reason(fed, "missing").is_some() && member_reason(fed, "refused").is_some();
    let broken = f.wait_for("broken", WAIT, reported).await?;
    assert_eq!(member_reason(&broken, "refused").as_deref(), Some("KubeconfigRefused"));
    assert_eq!(member_reason(&broken, "missing").as_deref(), Some("KubeconfigSecretMissing"));
    let asked = Instant::now();
    f.delete("broken").await?;
    f.wait_gone("broken", Duration::from_secs(10)).await?;
    println!("a federation of members that hold nothing deleted in {:?}", asked.elapsed());

    // A member that holds prod's objects and is gone for good holds the deletion until it is released.
    f.apply(&example("multi-primary-multi-network")).await?;
    f.wait_for("prod", WAIT, is_ready).await?;
    f.env.cluster_mut("west").stop();
    f.delete("prod").await?;
    let pending = |fed: &MeshFederation| {
        fed_condition(fed, "Ready").is_some_and(|c| c.reason == "CleanupPending" && c.message.contains("west"))
    };
    f.wait_for("prod", WAIT, pending).await?;
    let release = serde_json::json!({"metadata": {"annotations": {"meshfed.io/release-clusters": "west"}}});
    f.federations().patch("prod", &PatchParams::default(), &Patch::Merge(&release)).await?;
    f.wait_gone("prod", Duration::from_secs(20)).await?;
    f.wait_for_event("prod", |e| {
        e.reason.as_deref() == Some("ClusterReleased")
            && e.note.as_deref().is_some_and(|n| n.contains("west") && n.contains("meshfed.io/cluster=west"))
    })
    .await?;
    assert!(owned_versions(&f.member("east").await?).await?.is_empty(), "east was cleaned up");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_moved_istio_namespace_leaves_nothing_in_the_old_one() -> anyhow::Result<()> {
    let f = Fixture::start(&["east", "west"], Options { controller_manager: true, ..Options::default() }).await?;
    f.apply(&example("multi-primary-multi-network")).await?;
    f.wait_for("prod", WAIT, is_ready).await?;
    // The hub's access follows the move as the README says: `meshfed join` again with the new Istio namespace
    // (it keeps the access to the old one, where meshfed prunes).
    for m in ["east", "west"] {
        meshfed_e2e::join_member(&f.hub, f.env.cluster(m), &meshfed_e2e::prod(), "istio-mesh").await?;
    }
    let moved = serde_json::json!({"spec": {"istio": {"namespace": "istio-mesh"}}});
    let generation =
        f.federations().patch("prod", &PatchParams::default(), &Patch::Merge(&moved)).await?.metadata.generation;
    f.wait_for("prod", WAIT, |fed| is_ready(fed) && fed.status.as_ref().unwrap().observed_generation == generation)
        .await?;
    for m in ["east", "west"] {
        let member = f.member(m).await?;
        let owned = owned_versions(&member).await?;
        assert!(owned.keys().all(|k| !k.contains("istio-system")), "{m} keeps something in istio-system: {owned:?}");
        assert!(owned.contains_key("Secret istio-mesh/cacerts"), "{m}: {owned:?}");
        assert!(owned.contains_key("ConfigMap kube-system/meshfed-claim.istio-mesh"), "{m}: {owned:?}");
        let old = Api::<Namespace>::all(member.clone()).get_opt("istio-system").await?;
        assert!(
            old.is_none_or(|n| n.metadata.deletion_timestamp.is_some()),
            "{m}: the old namespace meshfed made goes"
        );
        let secrets = Api::<Secret>::namespaced(member, "istio-mesh").list(&ListParams::default()).await?.items;
        assert!(secrets.iter().any(|s| s.name_any().starts_with("istio-remote-secret-")), "{m}: remote secrets moved");
    }
    Ok(())
}

/// Hub B: the environment's cluster `hub-b` made a hub (the CRD, the federation namespace, the members joined),
/// running a controller of its own.
async fn second_hub(f: &Fixture) -> anyhow::Result<(Client, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    let hub_b_cluster = f.env.cluster("hub-b");
    hub_b_cluster.install_crds(&meshfed_api::crd_yaml()).await?;
    let hub_b = hub_b_cluster.client().await?;
    let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": NAMESPACE}}))?;
    Api::<Namespace>::all(hub_b.clone()).create(&Default::default(), &ns).await?;
    // Hub B reaches the members as `meshfed join` would have joined them there (the same identity as hub A's).
    for m in ["east", "west"] {
        meshfed_e2e::join_member(&hub_b, f.env.cluster(m), &meshfed_e2e::prod(), "istio-system").await?;
    }
    let settings = meshfed_operator::reconcile::Settings {
        member_timeout: Duration::from_secs(5),
        retry_after: Duration::from_secs(1),
        member_backoff_max: Duration::from_secs(4),
        ..Default::default()
    };
    Ok((hub_b.clone(), tokio::spawn(meshfed_operator::reconcile::run(hub_b, settings, Default::default()))))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_same_named_federation_in_another_hub_never_cleans_up_a_member_it_does_not_hold() -> anyhow::Result<()> {
    // Hub A is the fixture's; hub B is one more cluster of the environment, running a controller of its own.
    let f = Fixture::start(&["east", "west", "hub-b"], Options::default()).await?;
    f.apply(&example("multi-primary-multi-network")).await?;
    f.wait_for("prod", WAIT, is_ready).await?;
    let (hub_b, controller_b) = second_hub(&f).await?;
    let before = (owned_versions(&f.member("east").await?).await?, owned_versions(&f.member("west").await?).await?);

    // The same federation (one GitOps repository synced to two hubs): B is refused on both members.
    let feds_b: Api<MeshFederation> = Api::namespaced(hub_b.clone(), NAMESPACE);
    let prod: MeshFederation = serde_saphyr::from_str(&example("multi-primary-multi-network"))?;
    feds_b.create(&Default::default(), &prod).await?;
    let refused = |fed: &MeshFederation| {
        ["east", "west"].iter().all(|m| member_reason(fed, m).as_deref() == Some("ClusterClaimed"))
    };
    let every = Duration::from_millis(100);
    let claimed = async || feds_b.get("prod").await.is_ok_and(|fed| refused(&fed));
    until("hub B's federation reports both members claimed", WAIT, every, claimed).await?;
    let fed_b = feds_b.get("prod").await?;
    let message = &condition(&fed_b.status.as_ref().unwrap().clusters[0].conditions, "Ready").unwrap().message;
    assert!(message.contains("another hub"), "the refusal names the other hub: {message}");

    // Deleting B's federation runs B's cleanup, which finds A's claim and touches nothing.
    feds_b.delete("prod", &Default::default()).await?;
    let gone = async || feds_b.get_opt("prod").await.is_ok_and(|fed| fed.is_none());
    until("hub B's federation is deleted, holding on to no member it never held", WAIT, every, gone).await?;
    controller_b.abort();
    let after = (owned_versions(&f.member("east").await?).await?, owned_versions(&f.member("west").await?).await?);
    assert_eq!(after, before, "hub A's objects in its members are untouched");
    f.poke_and_wait("prod").await?;
    assert!(is_ready(&f.federations().get("prod").await?), "hub A's federation stays ready");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hub_restored_with_a_new_identity_takes_its_members_back_once_their_claims_are_deleted() -> anyhow::Result<()>
{
    let f = Fixture::clusters(&["east", "west", "hub-b"], Options::default()).await?;
    let hub_a = f.run_operator(Default::default()).await?;
    f.apply(&example("multi-primary-multi-network")).await?;
    f.wait_for("prod", WAIT, is_ready).await?;
    let uids = async |m: &str| listed(&f.member(m).await?, MANAGED, |o| o.uid().unwrap_or_default()).await;
    let before = (uids("east").await?, uids("west").await?);
    hub_a.abort();
    // The hub restored from a backup: another cluster (another identity) with the federation and its root Secret.
    let (hub_b, controller_b) = second_hub(&f).await?;
    let root_name = meshfed_core::trust::root_secret_name("prod");
    let root = Api::<Secret>::namespaced(f.hub.clone(), NAMESPACE).get(&root_name).await?;
    let restored: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": root_name, "labels": root.metadata.labels},
        "data": root.data,
    }))?;
    Api::<Secret>::namespaced(hub_b.clone(), NAMESPACE).create(&Default::default(), &restored).await?;
    let feds_b: Api<MeshFederation> = Api::namespaced(hub_b.clone(), NAMESPACE);
    feds_b.create(&Default::default(), &serde_saphyr::from_str(&example("multi-primary-multi-network"))?).await?;
    let every = Duration::from_millis(100);
    let claimed = async || {
        feds_b.get("prod").await.is_ok_and(|fed| {
            ["east", "west"].iter().all(|m| member_reason(&fed, m).as_deref() == Some("ClusterClaimed"))
        })
    };
    until("the restored hub to find its members claimed by the old one", WAIT, every, claimed).await?;
    let fed_b = feds_b.get("prod").await?;
    let message = &condition(&fed_b.status.as_ref().unwrap().clusters[0].conditions, "Ready").unwrap().message;
    let advice = "if that hub is gone for good (a hub restored from a backup has a new identity), delete ConfigMap kube-system/meshfed-claim.istio-system in this cluster";
    assert!(message.contains(advice), "the refusal says how to take the member back: {message}");
    assert_eq!((uids("east").await?, uids("west").await?), before, "nothing touched while claimed");

    // What the message says: the claims deleted, the restored hub takes every member back as it is.
    for m in ["east", "west"] {
        let claims: Api<ConfigMap> = Api::namespaced(f.member(m).await?, "kube-system");
        claims.delete("meshfed-claim.istio-system", &Default::default()).await?;
    }
    let ready = async || feds_b.get("prod").await.is_ok_and(|fed| is_ready(&fed));
    until("the restored hub's federation to be ready", WAIT, every, ready).await?;
    controller_b.abort();
    let (east, west) = (uids("east").await?, uids("west").await?);
    let kept = |now: &BTreeMap<String, String>, was: &BTreeMap<String, String>| {
        was.iter().filter(|(k, uid)| now.get(*k) != Some(uid) && !k.starts_with("ConfigMap kube-system/")).count()
    };
    assert_eq!((kept(&east, &before.0), kept(&west, &before.1)), (0, 0), "every object kept, in place: {east:?}");
    Ok(())
}
