//! The foundation end to end, against real local clusters: a federation converges, bad input is refused and writes
//! nothing, a dead member is isolated and catches up, and deletion cleans every member.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::{
    Api, Client,
    api::{DynamicObject, ListParams, Patch, PatchParams},
};
use meshfed_core::{
    access,
    federation::{self, FederationRef},
    kinds,
};
use meshfed_e2e::{Fixture, condition, example, fed_condition, is_ready, put_kubeconfig};
use meshfed_testenv::Options;

const WAIT: Duration = Duration::from_secs(60);
const NETWORK: &str = "topology.istio.io/network";

async fn istio_namespace(member: &Client) -> Option<Namespace> {
    Api::<Namespace>::all(member.clone()).get_opt("istio-system").await.expect("reading the istio namespace")
}

fn labels(ns: &Namespace) -> std::collections::BTreeMap<String, String> {
    ns.metadata.labels.clone().unwrap_or_default()
}

/// Namespaces in a member that carry meshfed's ownership label.
async fn owned_namespaces(member: &Client) -> Vec<String> {
    let lp = ListParams::default().labels("app.kubernetes.io/managed-by=meshfed");
    Api::<Namespace>::all(member.clone())
        .list(&lp)
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect()
}

/// Gone, or being deleted (a cluster without kube-controller-manager never finishes a namespace deletion).
fn deleted(ns: &Option<Namespace>) -> bool {
    ns.as_ref().is_none_or(|n| n.metadata.deletion_timestamp.is_some())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_federation_labels_every_member_and_deletion_cleans_them() -> anyhow::Result<()> {
    let f = Fixture::start(&["east", "west"], Options { controller_manager: true, ..Options::default() }).await?;
    let east = f.member("east").await?;
    let west = f.member("west").await?;
    // West already had an Istio namespace of its own when it joined (join then leaves it as it is): meshfed labels
    // it but must never delete it. East's was created by join, marked as meshfed marks one it creates.
    let theirs = serde_json::json!({"metadata": {"labels": {"team": "mesh", access::JOIN_LABEL: null},
        "annotations": {federation::ANNOTATION_CREATED: null}}});
    Api::<Namespace>::all(west.clone()).patch("istio-system", &PatchParams::default(), &Patch::Merge(&theirs)).await?;

    let applied = Instant::now();
    f.apply(&example("multi-primary-multi-network")).await?;
    let fed = f.wait_for("prod", WAIT, is_ready).await?;
    println!("time from apply to Ready=True: {:?}", applied.elapsed());

    let status = fed.status.as_ref().unwrap();
    assert_eq!(status.observed_generation, fed.metadata.generation);
    assert_eq!(status.topology.as_deref(), Some("MultiPrimary/MultiNetwork"));
    assert_eq!(status.ready_clusters.as_deref(), Some("2/2"));
    for c in &status.clusters {
        assert!(c.reachable, "{c:?}");
        assert_eq!(c.kubernetes_version.as_deref(), Some(meshfed_testenv::K8S_VERSION));
        assert_eq!(condition(&c.conditions, "Ready").unwrap().status, "True");
    }
    for cond in ["Ready", "Valid", "ClustersReachable"] {
        assert_eq!(fed_condition(&fed, cond).unwrap().status, "True", "{cond}");
    }
    assert!(fed.metadata.finalizers.as_ref().unwrap().contains(&"meshfed.io/cleanup".to_string()));
    // kstatus reads it as Current: neither Stalled nor Reconciling.
    assert!(fed_condition(&fed, "Stalled").is_none() && fed_condition(&fed, "Reconciling").is_none());
    assert_eq!(meshfed_e2e::kstatus(&fed), "Current");
    // The flip to Ready is announced as an Event on the federation.
    f.wait_for_event("prod", |e| {
        e.reason.as_deref() == Some("Converged")
            && e.type_.as_deref() == Some("Normal")
            && e.note.as_deref().is_some_and(|n| n.starts_with("Ready is True"))
    })
    .await?;

    let east_ns = istio_namespace(&east).await.expect("east has the Istio namespace");
    assert_eq!(labels(&east_ns)[NETWORK], "network1");
    assert_eq!(labels(&east_ns)["app.kubernetes.io/managed-by"], "meshfed");
    assert_eq!(labels(&east_ns)["meshfed.io/cluster"], "east");
    let west_ns = istio_namespace(&west).await.unwrap();
    assert_eq!((labels(&west_ns)[NETWORK].as_str(), labels(&west_ns)["team"].as_str()), ("network2", "mesh"));

    // A network change in the spec reaches the member.
    let moved = example("multi-primary-multi-network").replace("network: network2", "network: network3");
    f.apply(&moved).await?;
    f.wait_for("prod", WAIT, is_ready).await?;
    assert_eq!(labels(&istio_namespace(&west).await.unwrap())[NETWORK], "network3");

    f.delete("prod").await?;
    f.wait_gone("prod", WAIT).await?;
    // East's namespace was meshfed's: deleted (the namespace controller finishes it).
    let deleted = async || istio_namespace(&east).await.is_none();
    meshfed_e2e::until("east's istio-system to be deleted", WAIT, Duration::from_millis(200), deleted).await?;
    // West's was not: it stays, with its own label and without any of meshfed's.
    let west_ns = istio_namespace(&west).await.expect("a namespace meshfed did not create is never deleted");
    let mut left = labels(&west_ns);
    left.remove("kubernetes.io/metadata.name"); // set by the API server on every namespace
    assert_eq!(left, [("team".to_string(), "mesh".to_string())].into());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_federation_with_a_200_character_name_converges_repairs_drift_and_is_deleted() -> anyhow::Result<()> {
    let f = Fixture::start(&["east", "west"], Options::default()).await?;
    // Label values hold 63 characters; this name is labelled in its shortened form (`federation::label_value`).
    let name = format!("{}prod", "federation-with-a-long-name.".repeat(7));
    assert_eq!(name.len(), 200);
    let fref = FederationRef { namespace: meshfed_e2e::NAMESPACE.into(), name: name.clone() };
    f.join_as(&name).await?;
    f.apply(&example("multi-primary-multi-network").replacen("  name: prod\n", &format!("  name: {name}\n"), 1))
        .await?;
    f.wait_for(&name, WAIT, is_ready).await?;
    let east = f.member("east").await?;
    let cacerts = Api::<Secret>::namespaced(east.clone(), "istio-system");
    let held = cacerts.get("cacerts").await?;
    assert_eq!(held.metadata.labels.unwrap()["meshfed.io/federation"], fref.name_label());

    // A watch event maps the shortened label back to the federation: a deleted cacerts is back long before the
    // resync (5 minutes).
    cacerts.delete("cacerts", &Default::default()).await?;
    meshfed_e2e::until("cacerts is put back", Duration::from_secs(20), Duration::from_millis(100), async || {
        cacerts.get_opt("cacerts").await.ok().flatten().is_some_and(|s| s.metadata.deletion_timestamp.is_none())
    })
    .await?;

    f.delete(&name).await?;
    f.wait_gone(&name, WAIT).await?;
    for m in ["east", "west"] {
        let client = f.member(m).await?;
        for kind in kinds::OWNED_KINDS {
            let ar = meshfed_operator::member::kinds::api_resource(kind);
            let lp = ListParams::default().labels(&fref.selector(m));
            let left = Api::<DynamicObject>::all_with(client.clone(), &ar).list(&lp).await?.items;
            // Without kube-controller-manager a namespace stays Terminating: being deleted is cleaned up.
            let left: Vec<_> = left.iter().filter(|o| o.metadata.deletion_timestamp.is_none()).collect();
            assert!(left.is_empty(), "{m}: {} left: {:?}", kind.kind, left.iter().map(|o| &o.metadata.name));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_federations_get_a_precise_reason_and_write_nothing() -> anyhow::Result<()> {
    let f = Fixture::start(&["east", "west"], Options::default()).await?;
    let base = example("multi-primary-multi-network");
    let west_remote_of = |cp: &str| {
        base.replace(
            "    network: network2\n",
            &format!("    network: network2\n    role: Remote\n    controlPlane: {cp}\n"),
        )
    };
    let cases: Vec<(&str, String, &str, &str)> = vec![
        ("dup", base.replace("name: west", "name: east"), "DuplicateClusterName", "\"east\" is used more than once"),
        ("unknown-cp", west_remote_of("north"), "UnknownControlPlane", "\"north\", which is not a cluster"),
        (
            "cp-remote",
            base.replace("  clusters:\n", "  clusters:\n  - {name: north, network: network1, role: Remote, controlPlane: west, kubeconfigSecretRef: {name: north-kubeconfig}}\n").replace("    network: network2\n", "    network: network2\n    role: Remote\n    controlPlane: east\n"),
            "ControlPlaneNotPrimary",
            "cluster \"north\" names controlPlane \"west\", which is a Remote",
        ),
        ("ttl", base.replace("tokenTTL: 24h", "tokenTTL: a-day"), "InvalidDuration", "remoteAccess.tokenTTL \"a-day\""),
        (
            "cidrs",
            base.replace("network: network2", "network: network1\n    podCIDRs: [10.0.0.0/16]").replace("    kubeconfigSecretRef: {name: east-kubeconfig}", "    podCIDRs: [10.0.4.0/24]\n    kubeconfigSecretRef: {name: east-kubeconfig}"),
            "OverlappingCIDRs",
            "clusters \"east\" (10.0.4.0/24) and \"west\" (10.0.0.0/16)",
        ),
        ("same-kubeconfig", base.replace("{name: west-kubeconfig}", "{name: east-kubeconfig}"), "DuplicateKubeconfig", "use the same kubeconfig"),
        (
            "gw-port",
            base.replace("    kubeconfigSecretRef: {name: west-kubeconfig}", "    eastWestGateway: {address: \"203.0.113.7:15443\"}\n    kubeconfigSecretRef: {name: west-kubeconfig}"),
            "InvalidGatewayAddress",
            "eastWestGateway.address \"203.0.113.7:15443\" is not an IP address or a DNS name",
        ),
        (
            "api-credential",
            base.replace("    kubeconfigSecretRef: {name: west-kubeconfig}", "    apiServer: https://admin:s3cret@west.example:6443\n    kubeconfigSecretRef: {name: west-kubeconfig}"),
            "InvalidAPIServer",
            "carries user info (a user name or password before @ in https://west.example:6443)",
        ),
        ("ttl-long", base.replace("tokenTTL: 24h", "tokenTTL: 1193047h"), "InvalidDuration", "must be at most 2^32 seconds"),
    ];
    for (name, yaml, reason, message) in &cases {
        f.apply(&yaml.replace("name: prod", &format!("name: {name}"))).await?;
        let fed = f.wait_for(name, WAIT, |f| fed_condition(f, "Valid").is_some()).await?;
        let valid = fed_condition(&fed, "Valid").unwrap();
        assert_eq!((valid.status.as_str(), valid.reason.as_str()), ("False", *reason), "{name}: {}", valid.message);
        // kstatus reads it as Failed in the same reconcile: Stalled, with the reason; not Reconciling.
        let stalled = fed_condition(&fed, "Stalled").expect("Stalled");
        assert_eq!((stalled.status.as_str(), stalled.reason.as_str()), ("True", *reason));
        assert_eq!(meshfed_e2e::kstatus(&fed), "Failed");
        assert!(valid.message.contains(message), "{name}: {:?} lacks {message:?}", valid.message);
        assert!(!valid.message.contains("s3cret"), "{name}: a credential in the status: {}", valid.message);
        assert_eq!(fed_condition(&fed, "Ready").unwrap().status, "False");
    }
    // What a schema can say, the API server refuses before meshfed sees it.
    for (yaml, message) in [
        (
            base.replace("    network: network2\n", "    network: network2\n    role: Remote\n"),
            "a Remote cluster must name its controlPlane",
        ),
        (base.replace("name: west", "name: West_1"), "spec.clusters[1].name in body should match"),
        (
            base.replace("      generate:", "      secretRef: {name: corp-root}\n      generate:"),
            "set exactly one of trust.root.generate and trust.root.secretRef",
        ),
        (
            base.replace("namespace: istio-system", "namespace: kube-system"),
            "istio.namespace may not be a namespace of Kubernetes itself",
        ),
        (
            base.replace(
                "namespace: istio-system",
                &format!("namespace: istio-system\n    revision: {}", "r".repeat(57)),
            ),
            "spec.istio.revision",
        ),
    ] {
        let err = f.apply(&yaml.replace("name: prod", "name: cel")).await.unwrap_err();
        assert!(err.to_string().contains(message), "{err}");
    }
    // Nothing reached any member: the Istio namespace is as join created it, without a label of meshfed's.
    for m in ["east", "west"] {
        let member = f.member(m).await?;
        let ns = istio_namespace(&member).await.expect("join created it");
        assert!(!labels(&ns).contains_key(NETWORK), "{m} got a network label from an invalid federation");
        assert_eq!(owned_namespaces(&member).await, Vec::<String>::new());
    }

    // Fixing the spec converges it.
    f.join_as("dup").await?;
    f.apply(&base.replace("name: prod", "name: dup")).await?;
    f.wait_for("dup", WAIT, is_ready).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exec_kubeconfig_is_refused_unrun_and_only_its_member_waits() -> anyhow::Result<()> {
    let f = Fixture::start(&["east", "west"], Options::default()).await?;
    let marker = f.env.dir().join("exec-ran");
    let mut kc: serde_json::Value = serde_saphyr::from_str(f.env.cluster("west").kubeconfig())?;
    kc["users"][0]["user"] = serde_saphyr::from_str(&format!(
        "exec: {{apiVersion: client.authentication.k8s.io/v1, command: sh, args: [-c, 'touch {}'], interactiveMode: Never}}",
        marker.display()
    ))?;
    put_kubeconfig(&f.hub, "west", &serde_saphyr::to_string(&kc)?).await?;

    f.apply(&example("multi-primary-multi-network")).await?;
    let fed = f
        .wait_for("prod", WAIT, |fed| {
            let clusters = fed.status.as_ref().map(|s| s.clusters.as_slice()).unwrap_or_default();
            let ready = |n: &str| {
                clusters
                    .iter()
                    .any(|c| c.name == n && condition(&c.conditions, "Ready").is_some_and(|r| r.status == "True"))
            };
            ready("east") && clusters.iter().any(|c| c.name == "west")
        })
        .await?;
    let west = fed.status.as_ref().unwrap().clusters.iter().find(|c| c.name == "west").unwrap();
    let reach = condition(&west.conditions, "Reachable").unwrap();
    assert_eq!((reach.status.as_str(), reach.reason.as_str()), ("False", "KubeconfigRefused"));
    assert!(reach.message.contains("`exec`") && reach.message.contains("west-kubeconfig"), "{}", reach.message);
    assert_eq!(fed_condition(&fed, "ClustersReachable").unwrap().reason, "KubeconfigRefused");
    assert!(!marker.exists(), "meshfed ran the kubeconfig's exec command");
    assert!(istio_namespace(&f.member("east").await?).await.is_some());

    // Replacing the Secret with a good kubeconfig is picked up without touching the federation.
    put_kubeconfig(&f.hub, "west", f.env.cluster("west").kubeconfig()).await?;
    f.wait_for("prod", WAIT, is_ready).await?;
    assert!(istio_namespace(&f.member("west").await?).await.is_some());
    assert!(!marker.exists());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_member_is_reported_alone_and_catches_up_and_holds_deletion() -> anyhow::Result<()> {
    let mut f = Fixture::start(&["east", "west", "north"], Options::default()).await?;
    let yaml = example("multi-primary-multi-network").replace(
        "  clusters:\n",
        "  clusters:\n  - {name: north, network: network3, kubeconfigSecretRef: {name: north-kubeconfig}}\n",
    );
    f.env.cluster_mut("north").stop();

    f.apply(&yaml).await?;
    let fed = f
        .wait_for("prod", WAIT, |fed| fed.status.as_ref().is_some_and(|s| s.ready_clusters.as_deref() == Some("2/3")))
        .await?;
    let reach = fed_condition(&fed, "ClustersReachable").unwrap();
    assert_eq!(reach.status, "False");
    assert!(reach.message.starts_with("north: "), "{}", reach.message);
    // A member that does not answer may come back: kstatus reads the federation as InProgress, not Failed.
    assert_eq!(meshfed_e2e::kstatus(&fed), "InProgress");
    let clusters = &fed.status.as_ref().unwrap().clusters;
    assert!(clusters.iter().all(|c| c.reachable == (c.name != "north")), "{clusters:?}");
    for m in ["east", "west"] {
        assert!(istio_namespace(&f.member(m).await?).await.is_some(), "{m} did not converge while north was down");
    }

    f.env.cluster_mut("north").start().await?;
    f.wait_for("prod", WAIT, is_ready).await?;
    assert_eq!(labels(&istio_namespace(&f.member("north").await?).await.unwrap())[NETWORK], "network3");

    // Deleting while a member is down: the others are cleaned, the finalizer waits for the one that is down.
    f.env.cluster_mut("north").stop();
    f.delete("prod").await?;
    let fed = f
        .wait_for("prod", WAIT, |fed| fed_condition(fed, "Ready").is_some_and(|c| c.reason == "CleanupPending"))
        .await?;
    assert!(fed_condition(&fed, "Ready").unwrap().message.contains("north: "), "{:?}", fed_condition(&fed, "Ready"));
    for m in ["east", "west"] {
        assert!(deleted(&istio_namespace(&f.member(m).await?).await), "{m} not cleaned up");
    }
    f.reconciled_since(f.metrics.reconciles.get()).await?;
    assert!(
        f.federations().get_opt("prod").await?.is_some(),
        "the finalizer was released with a member not cleaned up"
    );

    f.env.cluster_mut("north").start().await?;
    f.wait_gone("prod", WAIT).await?;
    assert!(deleted(&istio_namespace(&f.member("north").await?).await));
    Ok(())
}
