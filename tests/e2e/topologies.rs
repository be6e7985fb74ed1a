//! The four topologies end to end, against real local clusters with the real Istio and Sail operator CRDs (so the
//! API servers validate every Gateway, VirtualService and `Istio` meshfed writes against their schemas and CEL
//! rules), the cloud and the Sail operator played: each example converges with exactly the objects its topology
//! needs, a switch between them prunes what is no longer needed, and every exposure mode gives the address istiod
//! needs.

use std::{collections::BTreeSet, time::Duration};

use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Namespace, Service},
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, DynamicObject, ListParams},
};
use meshfed_core::kinds::{ISTIO, OWNED_KINDS, ZTUNNEL};
use meshfed_e2e::{Fixture, NAMESPACE, condition, example, fed_condition, is_ready, load_balancer_ip};
use meshfed_operator::member::kinds::api_resource;
use meshfed_testenv::{Options, add_node};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

/// Every object meshfed holds in a member for federation `prod`, as `Kind namespace/name`.
async fn held(member: &Client, cluster: &str) -> anyhow::Result<BTreeSet<String>> {
    let lp = ListParams::default().labels(&format!("meshfed.io/federation=prod,meshfed.io/cluster={cluster}"));
    let mut out = BTreeSet::new();
    for kind in OWNED_KINDS {
        let found = match Api::<DynamicObject>::all_with(member.clone(), &api_resource(kind)).list(&lp).await {
            Err(kube::Error::Api(e)) if e.code == 404 => continue, // a CRD that is not installed
            found => found?,
        };
        for o in found.items {
            out.insert(format!("{} {}/{}", kind.kind, o.namespace().unwrap_or_default(), o.name_any()));
        }
    }
    Ok(out)
}

/// The objects of a member in any topology, plus `extra`.
fn expected(extra: &[&[&str]]) -> BTreeSet<String> {
    let base = [
        "ConfigMap kube-system/meshfed-claim.istio-system",
        "Namespace /istio-system",
        "ServiceAccount istio-system/meshfed-reader",
        "ClusterRole /meshfed-reader.mesh-system.prod",
        "ClusterRoleBinding /meshfed-reader.mesh-system.prod",
        "Secret istio-system/cacerts",
        "Istio /default",
    ];
    base.iter().chain(extra.iter().flat_map(|e| e.iter())).map(|s| s.to_string()).collect()
}

const GATEWAY: &[&str] = &[
    "ServiceAccount istio-system/istio-eastwestgateway-service-account",
    "Role istio-system/istio-eastwestgateway-sds",
    "RoleBinding istio-system/istio-eastwestgateway-sds",
    "Service istio-system/istio-eastwestgateway",
    "Deployment istio-system/istio-eastwestgateway",
    "PodDisruptionBudget istio-system/istio-eastwestgateway",
];
const CROSS_NETWORK: &[&str] = &["Gateway istio-system/cross-network-gateway"];
const EXPOSE_ISTIOD: &[&str] = &["Gateway istio-system/istiod-gateway", "VirtualService istio-system/istiod-vs"];

/// What `meshfed render` says each member holds for the example `name`, as `Kind namespace/name`.
fn rendered(name: &str) -> std::collections::BTreeMap<String, BTreeSet<String>> {
    let fed: meshfed_api::MeshFederation = serde_saphyr::from_str(&example(name)).unwrap();
    let fref = meshfed_core::federation::FederationRef { namespace: "mesh-system".into(), name: "prod".into() };
    let members = meshfed_core::render::render(&fref, &fed.spec, None).unwrap();
    members
        .into_iter()
        .map(|(cluster, objects)| {
            let keys = objects.iter().map(|o| {
                let m = &o["metadata"];
                format!(
                    "{} {}/{}",
                    o["kind"].as_str().unwrap(),
                    m["namespace"].as_str().unwrap_or(""),
                    m["name"].as_str().unwrap()
                )
            });
            (cluster, keys.collect())
        })
        .collect()
}

/// Applies example `name` and waits until it converged; checks that every member holds exactly what `meshfed render`
/// says for it.
async fn converge(f: &Fixture, name: &str) -> anyhow::Result<meshfed_api::MeshFederation> {
    f.apply(&example(name)).await?;
    let fed = f.wait_for("prod", WAIT, is_ready).await?;
    for (cluster, objects) in rendered(name) {
        assert_eq!(
            held(&f.member(&cluster).await?, &cluster).await?,
            objects,
            "{name}: {cluster} holds what render says"
        );
    }
    Ok(fed)
}

async fn istio(member: &Client) -> anyhow::Result<Value> {
    let istio = Api::<DynamicObject>::all_with(member.clone(), &api_resource(&ISTIO)).get("default").await?;
    Ok(istio.data)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_topology_converges_with_what_it_needs_and_switching_prunes_the_rest() -> anyhow::Result<()> {
    let f = Fixture::start(&["east", "west"], Options::default()).await?;
    let (east, west) = (f.member("east").await?, f.member("west").await?);
    let east_lb = load_balancer_ip(0);
    let remote_secret = |target: &str| format!("Secret istio-system/istio-remote-secret-{target}");
    let (to_west, to_east) = (remote_secret("west"), remote_secret("east"));

    // Multi-primary on one network: no gateway anywhere.
    let fed = converge(&f, "multi-primary").await?;
    assert_eq!(fed.status.as_ref().unwrap().topology.as_deref(), Some("MultiPrimary/SingleNetwork"));
    assert_eq!(held(&east, "east").await?, expected(&[&[&to_west]]));
    assert_eq!(held(&west, "west").await?, expected(&[&[&to_east]]));
    for c in &fed.status.as_ref().unwrap().clusters {
        assert_eq!(condition(&c.conditions, "GatewaysReady").unwrap().reason, "NoGatewayNeeded");
        assert_eq!(condition(&c.conditions, "ControlPlaneReady").unwrap().reason, "IstioReady");
    }
    let values = &istio(&east).await?["spec"]["values"];
    assert_eq!(values["global"]["meshID"], "prod");
    assert_eq!(values["global"]["multiCluster"]["clusterName"], "east");
    assert_eq!(values["global"]["network"], "network1");
    assert_eq!(istio(&east).await?["spec"]["version"], "v1.30.3");

    // West becomes a Remote of east: east exposes istiod through its gateway, west's control plane points at it,
    // and west's remote secret for east (a Remote holds none) is pruned.
    let fed = converge(&f, "primary-remote").await?;
    assert_eq!(fed.status.as_ref().unwrap().topology.as_deref(), Some("PrimaryRemote/SingleNetwork"));
    assert_eq!(held(&east, "east").await?, expected(&[&[&to_west], GATEWAY, EXPOSE_ISTIOD]));
    assert_eq!(held(&west, "west").await?, expected(&[]));
    let east_status = fed.status.as_ref().unwrap().clusters.iter().find(|c| c.name == "east").unwrap();
    assert_eq!(
        (east_status.gateway_address.as_deref(), east_status.gateway_port),
        (Some(east_lb.as_str()), Some(15443))
    );
    assert_eq!(istio(&east).await?["spec"]["values"]["global"]["externalIstiod"], true);
    let remote = istio(&west).await?;
    assert_eq!(remote["spec"]["profile"], "remote");
    assert_eq!(remote["spec"]["values"]["global"]["remotePilotAddress"], east_lb.as_str());
    assert_eq!(remote["spec"]["values"]["istiodRemote"]["injectionPath"], "/inject/cluster/west/net/network1");
    let ns = Api::<Namespace>::all(west.clone()).get("istio-system").await?;
    assert_eq!(ns.annotations().get("topology.istio.io/controlPlaneClusters").map(String::as_str), Some("east"));

    // West moves to another network: both clusters get a gateway and expose their services across networks.
    let fed = converge(&f, "primary-remote-multi-network").await?;
    assert_eq!(fed.status.as_ref().unwrap().topology.as_deref(), Some("PrimaryRemote/MultiNetwork"));
    assert_eq!(held(&east, "east").await?, expected(&[&[&to_west], GATEWAY, CROSS_NETWORK, EXPOSE_ISTIOD]));
    assert_eq!(held(&west, "west").await?, expected(&[GATEWAY, CROSS_NETWORK]));
    let injection = &istio(&west).await?["spec"]["values"]["istiodRemote"]["injectionPath"];
    assert_eq!(injection, "/inject/cluster/west/net/network2");

    // West becomes a Primary again: istiod is no longer exposed, and nothing of the Remote is left.
    let fed = converge(&f, "multi-primary-multi-network").await?;
    assert_eq!(fed.status.as_ref().unwrap().topology.as_deref(), Some("MultiPrimary/MultiNetwork"));
    assert_eq!(held(&east, "east").await?, expected(&[&[&to_west], GATEWAY, CROSS_NETWORK]));
    assert_eq!(held(&west, "west").await?, expected(&[&[&to_east], GATEWAY, CROSS_NETWORK]));
    let spec = &istio(&west).await?["spec"];
    assert!(spec["profile"].is_null() && spec["values"]["global"]["remotePilotAddress"].is_null(), "{spec}");
    assert!(istio(&east).await?["spec"]["values"]["global"]["externalIstiod"].is_null());
    let ns = Api::<Namespace>::all(west.clone()).get("istio-system").await?;
    assert!(!ns.annotations().contains_key("topology.istio.io/controlPlaneClusters"));

    // A deleted gateway Deployment (a kind like any other in the table) is put back by its watch.
    let deployments: Api<Deployment> = Api::namespaced(east.clone(), "istio-system");
    let before = deployments.get("istio-eastwestgateway").await?.uid();
    deployments.delete("istio-eastwestgateway", &DeleteParams::default()).await?;
    meshfed_e2e::until("the gateway Deployment is back", WAIT, Duration::from_millis(100), async || {
        deployments.get_opt("istio-eastwestgateway").await.ok().flatten().is_some_and(|d| d.uid() != before)
    })
    .await?;

    // And back to one network: every gateway object is pruned.
    converge(&f, "multi-primary").await?;
    assert_eq!(held(&east, "east").await?, expected(&[&[&to_west]]));
    assert_eq!(held(&west, "west").await?, expected(&[&[&to_east]]));
    Ok(())
}

/// What a member holds in ambient mode beyond the objects of every topology: no sidecar-mode gateway.
const AMBIENT: &[&str] =
    &["IstioCNI /default", "ZTunnel /default", "Gateway istio-system/istio-ambient-eastwestgateway"];

#[tokio::test(flavor = "multi_thread")]
async fn the_ambient_example_converges_and_switching_data_planes_leaves_exactly_each_modes_objects()
-> anyhow::Result<()> {
    let f = Fixture::start(&["east", "west"], Options::default()).await?;
    let (east, west) = (f.member("east").await?, f.member("west").await?);
    let (to_west, to_east) =
        ("Secret istio-system/istio-remote-secret-west", "Secret istio-system/istio-remote-secret-east");
    let sidecars = async || -> anyhow::Result<()> {
        converge(&f, "multi-primary-multi-network").await?;
        assert_eq!(held(&east, "east").await?, expected(&[&[to_west], GATEWAY, CROSS_NETWORK]));
        assert_eq!(held(&west, "west").await?, expected(&[&[to_east], GATEWAY, CROSS_NETWORK]));
        let spec = &istio(&east).await?["spec"];
        assert!(spec["profile"].is_null() && spec["values"]["pilot"]["env"]["AMBIENT_ENABLE_MULTI_NETWORK"].is_null());
        Ok(())
    };
    sidecars().await?;

    // Ambient: every sidecar-mode gateway object is pruned; the ambient control plane, data plane and HBONE gateway
    // are written (the API servers validate them against the real Sail and Gateway API schemas), and each gateway's
    // address is the one istiod (played) reports in the Gateway's status.
    let fed = converge(&f, "ambient-multi-network").await?;
    assert_eq!(fed.status.as_ref().unwrap().topology.as_deref(), Some("MultiPrimary/MultiNetwork/Ambient"));
    assert_eq!(held(&east, "east").await?, expected(&[&[to_west], AMBIENT]));
    assert_eq!(held(&west, "west").await?, expected(&[&[to_east], AMBIENT]));
    for (i, name) in ["east", "west"].into_iter().enumerate() {
        let c = fed.status.as_ref().unwrap().clusters.iter().find(|c| c.name == name).unwrap();
        assert_eq!((c.gateway_address.as_deref(), c.gateway_port), (Some(load_balancer_ip(i).as_str()), Some(15008)));
        assert_eq!(condition(&c.conditions, "ControlPlaneReady").unwrap().reason, "IstioReady", "{name}");
    }
    let spec = &istio(&east).await?["spec"];
    assert_eq!(spec["profile"], "ambient");
    assert_eq!(spec["values"]["pilot"]["env"]["AMBIENT_ENABLE_MULTI_NETWORK"], "true");
    let ztunnel = Api::<DynamicObject>::all_with(west.clone(), &api_resource(&ZTUNNEL)).get("default").await?;
    assert_eq!(ztunnel.data["spec"]["values"]["ztunnel"]["network"], "network2");
    assert_eq!(ztunnel.data["spec"]["values"]["ztunnel"]["multiCluster"]["clusterName"], "west");
    // `meshfed check` judges what ambient needs: ztunnel and CNI ready, each gateway programmed and addressed.
    let findings = meshfed_operator::check::check(&f.hub, NAMESPACE, "prod", jiff::Timestamp::now()).await?;
    assert!(meshfed_operator::check::passed(&findings), "{findings:?}");
    let said = |area: &str, subject: &str| -> Vec<String> {
        findings.iter().filter(|x| x.area == area && x.subject == subject).map(|x| x.detail.clone()).collect()
    };
    assert_eq!(
        said("data plane", "west"),
        ["the Sail operator reports IstioCNI ready", "the Sail operator reports ZTunnel ready"]
    );
    let lb = load_balancer_ip(1);
    assert_eq!(
        said("networks", "west gateway"),
        [format!("Gateway istio-ambient-eastwestgateway programmed, dialled at {lb}:15008")]
    );
    assert!(said("services", "prod")[0].contains("istio.io/global"), "{findings:?}");

    // And back: exactly the sidecar-mode objects again, nothing of ambient left.
    sidecars().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ambient_member_without_the_gateway_api_is_told_what_to_install_and_the_rest_converges() -> anyhow::Result<()>
{
    let f = Fixture::start(&["east", "west"], Options::default()).await?;
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(f.member("west").await?);
    crds.delete("gateways.gateway.networking.k8s.io", &DeleteParams::default()).await?;
    meshfed_e2e::until("the Gateway CRD is gone", WAIT, Duration::from_millis(100), async || {
        crds.get_opt("gateways.gateway.networking.k8s.io").await.ok().flatten().is_none()
    })
    .await?;
    f.apply(&example("ambient-multi-network")).await?;
    let fed = f
        .wait_for("prod", WAIT, |fed| {
            let c = fed.status.as_ref().and_then(|s| s.clusters.iter().find(|c| c.name == "east").cloned());
            c.is_some_and(|c| condition(&c.conditions, "Ready").is_some_and(|r| r.status == "True"))
                && fed_condition(fed, "GatewaysReady").is_some_and(|c| c.reason == "GatewayAPIMissing")
        })
        .await?;
    let gateways = fed_condition(&fed, "GatewaysReady").unwrap();
    assert!(
        gateways.message.starts_with("west: ") && gateways.message.contains("install the Gateway API's standard CRDs"),
        "{}",
        gateways.message
    );
    // Everything else of west is in place, and east converged with its own gateway.
    assert_eq!(fed_condition(&fed, "MembersConverged").unwrap().status, "True");
    let mut without_gateway = expected(&[&["Secret istio-system/istio-remote-secret-east"], AMBIENT]);
    without_gateway.remove("Gateway istio-system/istio-ambient-eastwestgateway");
    assert_eq!(held(&f.member("west").await?, "west").await?, without_gateway);
    assert_eq!(
        held(&f.member("east").await?, "east").await?,
        expected(&[&["Secret istio-system/istio-remote-secret-west"], AMBIENT])
    );
    Ok(())
}

/// The multi-network example with west's gateway exposed as `expose` (YAML flow mapping).
fn exposed(expose: &str) -> String {
    example("multi-primary-multi-network").replace(
        "kubeconfigSecretRef: {name: west-kubeconfig}",
        &format!("kubeconfigSecretRef: {{name: west-kubeconfig}}\n    eastWestGateway: {expose}"),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn every_exposure_mode_gives_the_address_istiod_needs() -> anyhow::Result<()> {
    let f = Fixture::start(&["east", "west"], Options::default()).await?;
    let (east, west) = (f.member("east").await?, f.member("west").await?);
    add_node(&west, "w1", &[("gateway", "yes")], &[("InternalIP", "10.0.0.7"), ("ExternalIP", "198.51.100.7")]).await?;
    add_node(&west, "w2", &[], &[("InternalIP", "10.0.0.8"), ("ExternalIP", "198.51.100.8")]).await?;
    let services: Api<Service> = Api::namespaced(west.clone(), "istio-system");
    let west_status = |fed: &meshfed_api::MeshFederation| {
        fed.status.as_ref().and_then(|s| s.clusters.iter().find(|c| c.name == "west").cloned()).unwrap_or_default()
    };
    let mesh_networks = async || -> anyhow::Result<Value> {
        Ok(istio(&east).await?["spec"]["values"]["global"]["meshNetworks"].clone())
    };

    // NodePort: istiod reads the nodes itself, through the Service's node selector annotation.
    f.apply(&exposed("{expose: NodePort, nodeSelector: {gateway: 'yes'}}")).await?;
    let fed = f.wait_for("prod", WAIT, is_ready).await?;
    let svc = services.get("istio-eastwestgateway").await?;
    let node_port =
        svc.spec.as_ref().unwrap().ports.as_ref().unwrap().iter().find(|p| p.port == 15443).unwrap().node_port;
    assert_eq!(svc.spec.as_ref().unwrap().type_.as_deref(), Some("NodePort"));
    assert_eq!(
        svc.annotations().get("traffic.istio.io/nodeSelector").map(String::as_str),
        Some(r#"{"gateway":"yes"}"#)
    );
    assert_eq!(svc.labels().get("topology.istio.io/network").map(String::as_str), Some("network2"));
    let w = west_status(&fed);
    assert_eq!((w.gateway_address.as_deref(), w.gateway_port), (Some("198.51.100.7"), node_port));
    assert!(mesh_networks().await?.is_null());

    // HostNetwork on nodes that do not exist: said, not guessed.
    f.apply(&exposed("{expose: HostNetwork, nodeSelector: {gateway: 'nowhere'}}")).await?;
    let fed = f
        .wait_for("prod", WAIT, |fed| {
            fed_condition(fed, "GatewaysReady").is_some_and(|c| c.status == "False" && c.reason == "NoSchedulableNodes")
        })
        .await?;
    assert!(fed_condition(&fed, "GatewaysReady").unwrap().message.contains("gateway=nowhere"));

    // HostNetwork on the selected nodes: the pods bind the nodes' ports, and every Primary learns the address
    // from meshNetworks (the Service cannot carry it).
    f.apply(&exposed("{expose: HostNetwork, nodeSelector: {gateway: 'yes'}}")).await?;
    let fed = f.wait_for("prod", WAIT, is_ready).await?;
    let w = west_status(&fed);
    assert_eq!((w.gateway_address.as_deref(), w.gateway_port), (Some("198.51.100.7"), Some(15443)));
    let deployment = Api::<Deployment>::namespaced(west.clone(), "istio-system").get("istio-eastwestgateway").await?;
    let deployment = deployment.spec.unwrap();
    // One pod on each node it is dialled at (one selected node here), rolled in place.
    assert_eq!(deployment.replicas, Some(1));
    assert_eq!(deployment.strategy.unwrap().rolling_update.unwrap().max_surge, Some(IntOrString::Int(0)));
    let pod = deployment.template.spec.unwrap();
    assert!(pod.affinity.and_then(|a| a.pod_anti_affinity).is_some(), "never two on one node");
    assert_eq!((pod.host_network, pod.dns_policy.as_deref()), (Some(true), Some("ClusterFirstWithHostNet")));
    assert_eq!(pod.node_selector.unwrap().get("gateway").map(String::as_str), Some("yes"));
    let svc = services.get("istio-eastwestgateway").await?;
    assert_eq!(svc.spec.as_ref().unwrap().type_.as_deref(), Some("ClusterIP"));
    assert!(!svc.labels().contains_key("topology.istio.io/network"), "istiod must not take it for the gateway");
    assert_eq!(
        mesh_networks().await?,
        json!({"network2": {"endpoints": [{"fromRegistry": "west"}], "gateways": [{"address": "198.51.100.7", "port": 15443}]}})
    );

    // A fixed address (a proxy in front of a load balancer) overrides discovery.
    f.apply(&exposed("{expose: LoadBalancer, address: gw.west.example}")).await?;
    let fed = f.wait_for("prod", WAIT, is_ready).await?;
    let w = west_status(&fed);
    assert_eq!((w.gateway_address.as_deref(), w.gateway_port), (Some("gw.west.example"), Some(15443)));
    let networks = mesh_networks().await?;
    assert_eq!(networks["network2"]["gateways"], json!([{"address": "gw.west.example", "port": 15443}]));

    // Back to a discovered load balancer: meshNetworks is gone again, and the Service carries the network.
    f.apply(&example("multi-primary-multi-network")).await?;
    let fed = f
        .wait_for("prod", WAIT, |fed| {
            is_ready(fed) && west_status(fed).gateway_address.as_deref() == Some(&*load_balancer_ip(1))
        })
        .await?;
    assert!(is_ready(&fed));
    assert!(mesh_networks().await?.is_null());
    let svc = services.get("istio-eastwestgateway").await?;
    assert_eq!(svc.labels().get("topology.istio.io/network").map(String::as_str), Some("network2"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_member_without_the_sail_operator_is_told_so_and_the_rest_converges() -> anyhow::Result<()> {
    let f = Fixture::start(&["east", "west"], Options::default()).await?;
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(f.member("west").await?);
    crds.delete("istios.sailoperator.io", &DeleteParams::default()).await?;
    meshfed_e2e::until("the Istio CRD is gone", WAIT, Duration::from_millis(100), async || {
        crds.get_opt("istios.sailoperator.io").await.ok().flatten().is_none()
    })
    .await?;
    f.apply(&example("multi-primary-multi-network")).await?;
    let fed = f
        .wait_for("prod", WAIT, |fed| {
            let c = fed.status.as_ref().and_then(|s| s.clusters.iter().find(|c| c.name == "east").cloned());
            c.is_some_and(|c| condition(&c.conditions, "Ready").is_some_and(|r| r.status == "True"))
                && fed_condition(fed, "ControlPlaneReady").is_some_and(|c| c.reason == "SailOperatorMissing")
        })
        .await?;
    let cp = fed_condition(&fed, "ControlPlaneReady").unwrap();
    assert!(cp.message.starts_with("west: ") && cp.message.contains("install the Sail operator"), "{}", cp.message);
    // Everything else of west is in place, and the member is not failing: it waits for the operator.
    assert_eq!(fed_condition(&fed, "MembersConverged").unwrap().status, "True");
    let west = f.member("west").await?;
    let mut without_istio = expected(&[&["Secret istio-system/istio-remote-secret-east"], GATEWAY, CROSS_NETWORK]);
    without_istio.remove("Istio /default");
    assert_eq!(held(&west, "west").await?, without_istio);

    // A version the member's Sail operator does not install is refused before anything is written there, naming
    // the versions it accepts (read from its Istio CRD); west, whose CRDs are not installed, is not judged by it.
    let east = f.member("east").await?;
    let before = held(&east, "east").await?;
    let istios = Api::<DynamicObject>::all_with(east.clone(), &api_resource(&ISTIO));
    let istio_before = istios.get("default").await?.resource_version();
    f.apply(&example("multi-primary-multi-network").replace("version: v1.30.3", "version: v1.19.0")).await?;
    let refused = |fed: &meshfed_api::MeshFederation| {
        fed_condition(fed, "MembersConverged").is_some_and(|c| c.reason == "IstioVersionNotAccepted")
    };
    let fed = f.wait_for("prod", WAIT, refused).await?;
    let message = &fed_condition(&fed, "MembersConverged").unwrap().message;
    assert!(
        message.starts_with("east: spec.istio.version v1.19.0") && message.contains("v1.21.6 to v1.30.3"),
        "{message}"
    );
    assert_eq!(held(&east, "east").await?, before, "nothing was added to or removed from east");
    assert_eq!(istios.get("default").await?.resource_version(), istio_before, "east's Istio was not written");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn clusters_on_one_network_whose_ranges_overlap_are_refused_naming_both() -> anyhow::Result<()> {
    let f = Fixture::start(&["east", "west"], Options::default()).await?;
    let node = |name: &str, cidr: &str| -> anyhow::Result<k8s_openapi::api::core::v1::Node> {
        Ok(serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"podCIDRs": [cidr]}}))?)
    };
    let create = kube::api::PostParams::default();
    let (east, west) = (f.member("east").await?, f.member("west").await?);
    Api::all(east.clone()).create(&create, &node("e1", "10.244.0.0/24")?).await?;
    let west_nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(west.clone());
    west_nodes.create(&create, &node("w1", "10.244.0.0/24")?).await?;

    f.apply(&example("multi-primary")).await?;
    let fed = f
        .wait_for("prod", WAIT, |fed| fed_condition(fed, "Valid").is_some_and(|c| c.reason == "OverlappingCIDRs"))
        .await?;
    let valid = fed_condition(&fed, "Valid").unwrap();
    assert!(
        valid.message.contains(r#"clusters "east" (10.244.0.0/24) and "west" (10.244.0.0/24)"#),
        "{}",
        valid.message
    );
    // Nothing but the claims was written to either member.
    let claim = "ConfigMap kube-system/meshfed-claim.istio-system".to_string();
    assert_eq!(held(&east, "east").await?, BTreeSet::from([claim.clone()]));
    assert_eq!(held(&west, "west").await?, BTreeSet::from([claim]));

    // West's pods move to their own range: the federation converges without an edit.
    west_nodes.delete("w1", &DeleteParams::default()).await?;
    west_nodes.create(&create, &node("w1", "10.245.0.0/24")?).await?;
    f.wait_for("prod", WAIT, is_ready).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_remote_that_changes_primary_keeps_its_old_one_until_it_points_at_the_new() -> anyhow::Result<()> {
    let f = Fixture::start(&["east", "north", "west"], Options::default()).await?;
    let federation = |control_plane: &str| {
        format!(
            "apiVersion: meshfed.io/v1alpha1\nkind: MeshFederation\nmetadata: {{name: prod, namespace: mesh-system}}\nspec:\n  meshID: prod\n  trust: {{root: {{generate: {{}}}}}}\n  clusters:\n  - {{name: east, network: network1, kubeconfigSecretRef: {{name: east-kubeconfig}}}}\n  - {{name: north, network: network1, kubeconfigSecretRef: {{name: north-kubeconfig}}, eastWestGateway: {{expose: HostNetwork, nodeSelector: {{mesh/gateway: \"true\"}}}}}}\n  - {{name: west, network: network1, role: Remote, controlPlane: {control_plane}, kubeconfigSecretRef: {{name: west-kubeconfig}}}}\n"
        )
    };
    f.apply(&federation("east")).await?;
    f.wait_for("prod", WAIT, is_ready).await?;
    let (east, north, west) = (f.member("east").await?, f.member("north").await?, f.member("west").await?);
    let east_address = load_balancer_ip(0);
    let pilot = async || -> anyhow::Result<Value> {
        Ok(istio(&west).await?["spec"]["values"]["global"]["remotePilotAddress"].clone())
    };
    assert_eq!(pilot().await?, json!(east_address));
    let east_services: Api<Service> = Api::namespaced(east.clone(), "istio-system");

    // West moves to north, whose HostNetwork gateway has no node to run on yet: sampled for 5 s, west still points
    // at east, and east still exposes istiod to it and runs an external istiod.
    f.apply(&federation("north")).await?;
    let waits = |fed: &meshfed_api::MeshFederation| {
        fed_condition(fed, "ControlPlaneReady").is_some_and(|c| c.reason == "AwaitingPrimaryGateway")
    };
    f.wait_for("prod", WAIT, waits).await?;
    let started = std::time::Instant::now();
    let every = Duration::from_millis(100);
    let held_for = meshfed_e2e::sample_until(started, Duration::from_secs(10), every, async |n, elapsed| {
        assert_eq!(pilot().await?, json!(east_address), "sample {n}: west no longer points at east");
        assert!(east_services.get_opt("istio-eastwestgateway").await?.is_some(), "sample {n}: east's gateway is gone");
        assert_eq!(istio(&east).await?["spec"]["values"]["global"]["externalIstiod"], true, "sample {n}");
        // And east's gateway is reported for what it is: dialled at its address.
        let fed = f.federations().get("prod").await?;
        let east_status = fed.status.as_ref().and_then(|s| s.clusters.iter().find(|c| c.name == "east").cloned());
        let gateway = east_status.as_ref().and_then(|c| condition(&c.conditions, "GatewaysReady").cloned());
        assert!(gateway.as_ref().is_none_or(|c| c.status == "True"), "sample {n}: east's gateway reported {gateway:?}");
        Ok(elapsed > Duration::from_secs(5))
    })
    .await?;
    println!("west waits for north's gateway; east kept serving it at all {held_for} samples");

    // North's gateway gets a node: west points at north, and only then is east's gateway pruned.
    add_node(&north, "north-1", &[("mesh/gateway", "true")], &[("InternalIP", "192.0.2.77")]).await?;
    f.wait_for("prod", WAIT, is_ready).await?;
    assert_eq!(pilot().await?, json!("192.0.2.77"));
    let pruned = async || east_services.get_opt("istio-eastwestgateway").await.is_ok_and(|s| s.is_none());
    meshfed_e2e::until("east's gateway to be pruned once west moved", WAIT, every, pruned).await?;
    assert!(istio(&east).await?["spec"]["values"]["global"]["externalIstiod"].is_null());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn istio_values_the_sail_schema_refuses_are_reported_naming_the_field_and_nothing_is_dropped_silently()
-> anyhow::Result<()> {
    // The review feared values the Sail schema drops would be applied again at every reconcile. The API server
    // drops nothing: server-side apply refuses a key the schema does not declare, and the schema a null where it
    // wants a value; meshfed reports either, naming the field, and converges once the values are fixed.
    let f = Fixture::start(&["east", "west"], Options::default()).await?;
    let with_values = |values: &str| {
        example("multi-primary")
            .replace("    version: v1.30.3\n", &format!("    version: v1.30.3\n    values: {values}\n"))
    };
    for (values, field) in [
        ("{pilot: {notASailValue: 1}}", "spec.values.pilot.notASailValue"),
        ("{global: {logAsJson: null}}", "spec.values.global.logAsJson"),
    ] {
        f.apply(&with_values(values)).await?;
        let refused = |fed: &meshfed_api::MeshFederation| {
            fed_condition(fed, "MembersConverged")
                .is_some_and(|c| c.reason == "WriteFailed" && c.message.contains(field))
        };
        f.wait_for("prod", WAIT, refused).await?;
    }
    f.apply(&with_values("{pilot: {env: {TEAM: mesh}}}")).await?;
    f.wait_for("prod", WAIT, is_ready).await?;
    assert_eq!(istio(&f.member("east").await?).await?["spec"]["values"]["pilot"]["env"]["TEAM"], "mesh");
    Ok(())
}
