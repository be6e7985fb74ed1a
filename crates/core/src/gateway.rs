//! East-west gateways: where a cluster needs one, the objects that make it (ISTIO-FACTS.md sections 5 and 6), how it
//! is exposed, and the address other members dial, read from what the member shows (section 10).

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{Node, Service, ServiceAccount},
        policy::v1::PodDisruptionBudget,
        rbac::v1::{Role, RoleBinding},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use meshfed_api::{ClusterSpec, ExposeMode, MeshFederationSpec};
use serde_json::{Value, json};

use crate::{
    conditions::Reason,
    federation::{Failure, FederationRef},
    istio::{self, NETWORK_LABEL},
    topology::{self, Topology},
};

/// The name of the gateway's Deployment, Service, PodDisruptionBudget and the `app` label.
pub const GATEWAY_NAME: &str = "istio-eastwestgateway";
/// The gateway's ServiceAccount.
pub const GATEWAY_SERVICE_ACCOUNT: &str = "istio-eastwestgateway-service-account";
/// The gateway's Role and RoleBinding (it reads its certificates' Secrets).
pub const GATEWAY_SDS: &str = "istio-eastwestgateway-sds";
/// The port other networks' sidecars dial (mTLS with SNI, `AUTO_PASSTHROUGH`).
pub const CROSS_NETWORK_PORT: i32 = 15443;
/// On a NodePort gateway Service: which nodes' addresses istiod uses (a JSON label selector).
pub const NODE_SELECTOR_ANNOTATION: &str = "traffic.istio.io/nodeSelector";
/// The Istio Gateway that exposes the cluster's services to other networks.
pub const CROSS_NETWORK_GATEWAY: &str = "cross-network-gateway";
/// The Istio Gateway and VirtualService that expose istiod to Remotes.
pub const ISTIOD_GATEWAY: &str = "istiod-gateway";
pub const ISTIOD_VIRTUAL_SERVICE: &str = "istiod-vs";

/// Whether istiod learns the gateway's address from the gateway Service itself (its load balancer status, or the
/// node selector annotation of a NodePort), or only from `meshNetworks`: a fixed address or a host-network gateway.
fn discovered_from_service(cluster: &ClusterSpec) -> bool {
    let gw = &cluster.east_west_gateway;
    gw.address.is_none() && matches!(gw.expose, ExposeMode::LoadBalancer | ExposeMode::NodePort)
}

/// The labels of the gateway's pods and of the selector of its Service, Deployment and PodDisruptionBudget.
fn selector() -> BTreeMap<String, String> {
    BTreeMap::from([("app".into(), GATEWAY_NAME.into()), ("istio".into(), "eastwestgateway".into())])
}

fn meta(fref: &FederationRef, spec: &MeshFederationSpec, cluster: &ClusterSpec, name: &str) -> ObjectMeta {
    let mut labels = fref.owned_labels(&cluster.name);
    labels.extend(selector());
    labels.insert(NETWORK_LABEL.into(), cluster.network.clone());
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(spec.istio.namespace.clone()),
        labels: Some(labels),
        ..Default::default()
    }
}

/// A typed object from its JSON form, written here and known to fit the type.
fn from<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("a well-formed object")
}

/// The built-in objects of `cluster`'s east-west gateway, in the Istio namespace, when it needs one.
pub struct GatewayObjects {
    pub service_account: ServiceAccount,
    pub role: Role,
    pub role_binding: RoleBinding,
    pub service: Service,
    pub deployment: Deployment,
    pub disruption_budget: PodDisruptionBudget,
}

/// The gateway's objects, exposed as `cluster.eastWestGateway` says. `advertised`: where other members dial it, when
/// known (a host-network gateway runs one pod on each node it is advertised at).
pub fn gateway_objects(
    fref: &FederationRef,
    spec: &MeshFederationSpec,
    cluster: &ClusterSpec,
    advertised: Option<&GatewayAddress>,
) -> GatewayObjects {
    let gw = &cluster.east_west_gateway;
    let meta = |name: &str| meta(fref, spec, cluster, name);
    let mut service_meta = meta(GATEWAY_NAME);
    if !discovered_from_service(cluster) {
        // istiod would take a labelled Service for the network's gateway; this one's address comes from meshNetworks.
        service_meta.labels.as_mut().map(|l| l.remove(NETWORK_LABEL));
    }
    if gw.expose == ExposeMode::NodePort && gw.address.is_none() {
        let nodes = serde_json::to_string(&gw.node_selector.clone().unwrap_or_default()).expect("labels serialize");
        service_meta.annotations = Some(BTreeMap::from([(NODE_SELECTOR_ANNOTATION.into(), nodes)]));
    }
    let service_type = match gw.expose {
        ExposeMode::LoadBalancer => "LoadBalancer",
        ExposeMode::NodePort => "NodePort",
        ExposeMode::HostNetwork | ExposeMode::ClusterIP => "ClusterIP",
    };
    let ports = [("status-port", 15021), ("tls", CROSS_NETWORK_PORT), ("tls-istiod", 15012), ("tls-webhook", 15017)];
    let service_ports: Vec<Value> = ports
        .iter()
        .map(|(name, port)| json!({"name": name, "port": port, "targetPort": port, "protocol": "TCP"}))
        .collect();
    let mut pod_labels = selector();
    pod_labels.insert(NETWORK_LABEL.into(), cluster.network.clone());
    pod_labels.insert("sidecar.istio.io/inject".into(), "true".into());
    if spec.istio.revision != istio::DEFAULT_REVISION {
        // The injector of another revision than `default` selects pods by this label.
        pod_labels.insert("istio.io/rev".into(), spec.istio.revision.clone());
    }
    let host_network = gw.expose == ExposeMode::HostNetwork;
    let container_ports: Vec<Value> = ports
        .iter()
        .chain(&[("http-envoy-prom", 15090)])
        .map(|(name, port)| json!({"name": name, "containerPort": port, "protocol": "TCP"}))
        .collect();
    let mut pod_spec = json!({
        "serviceAccountName": GATEWAY_SERVICE_ACCOUNT,
        "containers": [{
            "name": "istio-proxy",
            "image": "auto",
            "env": [
                {"name": "ISTIO_META_REQUESTED_NETWORK_VIEW", "value": cluster.network},
                {"name": "ISTIO_META_UNPRIVILEGED_POD", "value": "true"},
            ],
            "ports": container_ports,
        }],
    });
    let mut deployment_spec = json!({"selector": {"matchLabels": selector()}});
    if host_network {
        // Without ClusterFirstWithHostNet the pod resolves names with the node's DNS and cannot reach istiod.
        pod_spec["hostNetwork"] = true.into();
        pod_spec["dnsPolicy"] = "ClusterFirstWithHostNet".into();
        pod_spec["nodeSelector"] = json!(gw.node_selector.clone().unwrap_or_default());
        // Dialled at every selected node's address: one pod on each of them (never two on one node, whose ports one
        // pod holds), and an update replaces a pod in place, since no node has room for one more.
        pod_spec["affinity"] = json!({"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": selector()}, "topologyKey": "kubernetes.io/hostname"},
        ]}});
        deployment_spec["strategy"] =
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}});
        if gw.address.is_none()
            && let Some(nodes) = advertised
        {
            deployment_spec["replicas"] = nodes.addresses.len().into();
        }
    }
    deployment_spec["template"] = json!({
        "metadata": {
            "labels": pod_labels,
            "annotations": {"inject.istio.io/templates": "gateway", "sidecar.istio.io/inject": "true"},
        },
        "spec": pod_spec,
    });
    GatewayObjects {
        service_account: ServiceAccount { metadata: meta(GATEWAY_SERVICE_ACCOUNT), ..Default::default() },
        role: from(json!({
            "metadata": meta(GATEWAY_SDS),
            "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "watch", "list"]}],
        })),
        role_binding: from(json!({
            "metadata": meta(GATEWAY_SDS),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": GATEWAY_SDS},
            "subjects": [{"kind": "ServiceAccount", "name": GATEWAY_SERVICE_ACCOUNT, "namespace": spec.istio.namespace}],
        })),
        service: from(json!({
            "metadata": service_meta,
            "spec": {"type": service_type, "selector": selector(), "ports": service_ports},
        })),
        // No `replicas` but on host network, as Istio's gateway chart with autoscaling: the Deployment defaults to 1,
        // and a HorizontalPodAutoscaler (or a person) owns the count without meshfed setting it back.
        deployment: from(json!({"metadata": meta(GATEWAY_NAME), "spec": deployment_spec})),
        disruption_budget: from(json!({
            "metadata": meta(GATEWAY_NAME),
            "spec": {"minAvailable": 1, "selector": {"matchLabels": selector()}},
        })),
    }
}

/// An Istio `networking.istio.io/v1` Gateway or VirtualService of the gateway (section 6), as JSON.
pub fn istio_gateway_configs(
    fref: &FederationRef,
    spec: &MeshFederationSpec,
    cluster: &ClusterSpec,
) -> Vec<(&'static str, Value)> {
    let ns = &spec.istio.namespace;
    let meta = |name: &str| serde_json::to_value(meta(fref, spec, cluster, name)).expect("metadata serializes");
    let selector = json!({"istio": "eastwestgateway"});
    let mut out = Vec::new();
    if Topology::of(spec).multi_network {
        out.push((
            "Gateway",
            json!({
                "metadata": meta(CROSS_NETWORK_GATEWAY),
                "spec": {
                    "selector": selector,
                    "servers": [{
                        "port": {"number": CROSS_NETWORK_PORT, "name": "tls", "protocol": "TLS"},
                        "tls": {"mode": "AUTO_PASSTHROUGH"},
                        "hosts": ["*.local"],
                    }],
                },
            }),
        ));
    }
    if topology::serves_remotes(spec, cluster) {
        let server = |number: i32, name: &str| json!({"port": {"number": number, "name": name, "protocol": "tls"}, "tls": {"mode": "PASSTHROUGH"}, "hosts": ["*"]});
        out.push(("Gateway", json!({
            "metadata": meta(ISTIOD_GATEWAY),
            "spec": {"selector": selector, "servers": [server(15012, "tls-istiod"), server(15017, "tls-istiodwebhook")]},
        })));
        let istiod = format!("{}.{ns}.svc.cluster.local", istio::istiod_service(&spec.istio));
        let route = |port: i32, to: i32| json!({"match": [{"port": port, "sniHosts": ["*"]}], "route": [{"destination": {"host": istiod, "port": {"number": to}}}]});
        out.push((
            "VirtualService",
            json!({
                "metadata": meta(ISTIOD_VIRTUAL_SERVICE),
                "spec": {"hosts": ["*"], "gateways": [ISTIOD_GATEWAY], "tls": [route(15012, 15012), route(15017, 443)]},
            }),
        ));
    }
    out
}

/// The ambient east-west gateway (a Gateway API `Gateway`), and the Deployment and Service istiod makes for it (the
/// class adds no suffix). Not the sidecar-mode gateway's name: istiod does not manage a Deployment or Service it did not
/// make, so a Gateway of that name would get no address while a switch from sidecars still holds them.
pub const AMBIENT_GATEWAY_NAME: &str = "istio-ambient-eastwestgateway";
/// The port other networks' ztunnels dial on an ambient east-west gateway (HBONE).
pub const HBONE_PORT: i32 = 15008;
/// The class of the ambient east-west gateway, which istiod deploys (ISTIO-FACTS.md section 14).
pub const EAST_WEST_GATEWAY_CLASS: &str = "istio-east-west";

/// The ambient east-west gateway of `cluster`: a Gateway API `Gateway` of class `istio-east-west` with one HBONE
/// listener on 15008, labelled with the cluster's network (without it istiod sees no network gateway). istiod deploys
/// it (a Deployment and a LoadBalancer Service) and writes its address into its `status.addresses`; meshfed writes no
/// Deployment or Service for it.
pub fn ambient_gateway(fref: &FederationRef, spec: &MeshFederationSpec, cluster: &ClusterSpec) -> Value {
    let mut labels = fref.owned_labels(&cluster.name);
    labels.insert(NETWORK_LABEL.into(), cluster.network.clone());
    if spec.istio.revision != "default" {
        labels.insert("istio.io/rev".into(), spec.istio.revision.clone());
    }
    json!({
        "metadata": {"name": AMBIENT_GATEWAY_NAME, "namespace": spec.istio.namespace, "labels": labels},
        "spec": {
            "gatewayClassName": EAST_WEST_GATEWAY_CLASS,
            "listeners": [{
                "name": "mesh",
                "port": HBONE_PORT,
                "protocol": "HBONE",
                "tls": {"mode": "Terminate", "options": {"gateway.istio.io/tls-terminate-mode": "ISTIO_MUTUAL"}},
            }],
        },
    })
}

/// The address of an ambient east-west gateway, from the `Gateway` as its member holds it (`gateway`): its
/// `status.addresses`, once istiod reports it `Programmed` for the generation meshfed wrote (before that, istiod
/// may publish an address no other network can reach, such as its Service's cluster IP).
pub fn ambient_gateway_address(gateway: Option<&Value>) -> Result<GatewayAddress, Failure> {
    let Some(gateway) = gateway else {
        return Err(Failure::new(
            Reason::AwaitingGatewayService,
            format!("the Gateway {AMBIENT_GATEWAY_NAME} is not there yet"),
        ));
    };
    let status = &gateway["status"];
    let programmed = status["conditions"].as_array().and_then(|c| c.iter().find(|c| c["type"] == "Programmed"));
    let current =
        |c: &Value| c["observedGeneration"].is_null() || c["observedGeneration"] == gateway["metadata"]["generation"];
    let addresses: Vec<String> = status["addresses"]
        .as_array()
        .map(|a| a.iter().filter_map(|a| a["value"].as_str().map(String::from)).collect())
        .unwrap_or_default();
    match programmed {
        Some(c) if c["status"] == "True" && current(c) && !addresses.is_empty() => {
            Ok(GatewayAddress { addresses, port: HBONE_PORT })
        }
        Some(c) if current(c) && c["status"] != "True" => Err(Failure::new(
            Reason::AwaitingLoadBalancer,
            format!(
                "istiod reports the Gateway {AMBIENT_GATEWAY_NAME} not programmed ({}): {}",
                c["reason"].as_str().unwrap_or_default(),
                c["message"].as_str().unwrap_or_default()
            ),
        )),
        _ => Err(Failure::new(
            Reason::AwaitingLoadBalancer,
            format!(
                "the Gateway {AMBIENT_GATEWAY_NAME} has no address yet: istiod deploys it and reports its load balancer's address once it is programmed"
            ),
        )),
    }
}

/// Where other members dial a cluster's gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayAddress {
    /// The addresses (IPs or host names) of the gateway, first the one a Remote's `remotePilotAddress` takes.
    pub addresses: Vec<String>,
    /// The port other networks' sidecars dial (15443, or the node port of a NodePort gateway).
    pub port: i32,
}

impl std::fmt::Display for GatewayAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.addresses.join(","), self.port)
    }
}

/// The address of `cluster`'s gateway as its member shows it: from a fixed `address`, the gateway Service's load
/// balancer, its cluster IP, or the addresses of the nodes it may run on; or why there is none yet. `service` is the
/// gateway Service as the member holds it; `nodes` the member's nodes that match the gateway's node selector (read
/// only for NodePort and HostNetwork).
pub fn gateway_address(
    cluster: &ClusterSpec,
    service: Option<&Service>,
    nodes: &[Node],
) -> Result<GatewayAddress, Failure> {
    let gw = &cluster.east_west_gateway;
    let port_of = |service: &Service| {
        service.spec.as_ref()?.ports.as_ref()?.iter().find(|p| p.port == CROSS_NETWORK_PORT)?.node_port
    };
    let fixed = |addresses: Vec<String>, port| Ok(GatewayAddress { addresses, port });
    if let Some(address) = &gw.address {
        // A front proxy forwards the gateway's own ports; with NodePort it forwards to the node ports.
        let port = match gw.expose {
            ExposeMode::NodePort => service.and_then(port_of),
            _ => Some(CROSS_NETWORK_PORT),
        };
        return match port {
            Some(port) => fixed(vec![address.clone()], port),
            None => Err(Failure::new(Reason::AwaitingGatewayService, "the gateway Service has no node port yet")),
        };
    }
    let node_addresses = |types: &[&str]| -> Vec<String> {
        let mut out: Vec<String> = nodes
            .iter()
            .filter(|n| !n.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false))
            .filter_map(|n| {
                let addresses = n.status.as_ref()?.addresses.as_ref()?;
                types.iter().find_map(|t| addresses.iter().find(|a| a.type_ == *t).map(|a| a.address.clone()))
            })
            .collect();
        out.sort();
        out.dedup();
        out
    };
    let selector = || {
        gw.node_selector.as_ref().map_or("any node".into(), |s| {
            format!("nodes labelled {}", s.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","))
        })
    };
    match gw.expose {
        ExposeMode::LoadBalancer => {
            let ingress = service.and_then(|s| s.status.as_ref()?.load_balancer.as_ref()?.ingress.clone());
            let addresses: Vec<String> =
                ingress.unwrap_or_default().into_iter().filter_map(|i| i.ip.or(i.hostname)).collect();
            if addresses.is_empty() {
                return Err(Failure::new(
                    Reason::AwaitingLoadBalancer,
                    format!(
                        "Service {GATEWAY_NAME} has no load balancer address yet; a cluster without a load balancer can expose the gateway as NodePort or HostNetwork, or give a fixed address"
                    ),
                ));
            }
            fixed(addresses, CROSS_NETWORK_PORT)
        }
        ExposeMode::ClusterIP => match service.and_then(|s| s.spec.as_ref()?.cluster_ip.clone()) {
            Some(ip) if ip != "None" => fixed(vec![ip], CROSS_NETWORK_PORT),
            _ => Err(Failure::new(Reason::AwaitingGatewayService, "the gateway Service has no cluster IP yet")),
        },
        ExposeMode::NodePort => {
            // istiod takes only nodes' ExternalIP addresses for a NodePort gateway.
            let addresses = node_addresses(&["ExternalIP"]);
            let Some(port) = service.and_then(port_of) else {
                return Err(Failure::new(Reason::AwaitingGatewayService, "the gateway Service has no node port yet"));
            };
            if addresses.is_empty() {
                return Err(Failure::new(
                    Reason::NoNodeAddresses,
                    format!(
                        "no schedulable node among {} has an ExternalIP address, which istiod needs for a NodePort gateway",
                        selector()
                    ),
                ));
            }
            fixed(addresses, port)
        }
        ExposeMode::HostNetwork => {
            let addresses = node_addresses(&["ExternalIP", "InternalIP"]);
            if addresses.is_empty() {
                return Err(Failure::new(
                    Reason::NoSchedulableNodes,
                    format!("no schedulable node among {} has an address for the host-network gateway", selector()),
                ));
            }
            fixed(addresses, CROSS_NETWORK_PORT)
        }
    }
}

/// The `meshNetworks` every Primary's istiod needs for the networks whose gateway it cannot find by itself (a fixed
/// address or a host-network gateway): per such network, its clusters' registries and gateway addresses. `None`
/// when istiod finds every gateway on its own (ISTIO-FACTS.md section 10).
pub fn mesh_networks(spec: &MeshFederationSpec, gateways: &BTreeMap<String, GatewayAddress>) -> Option<Value> {
    if !Topology::of(spec).multi_network {
        return None;
    }
    let mut networks = serde_json::Map::new();
    for c in spec.clusters.iter().filter(|c| !discovered_from_service(c)) {
        let Some(gw) = gateways.get(&c.name) else { continue };
        let endpoints: Vec<Value> =
            spec.clusters.iter().filter(|o| o.network == c.network).map(|o| json!({"fromRegistry": o.name})).collect();
        let entry =
            networks.entry(c.network.clone()).or_insert_with(|| json!({"endpoints": endpoints, "gateways": []}));
        let list = entry["gateways"].as_array_mut().expect("gateways is a list");
        list.extend(gw.addresses.iter().map(|a| json!({"address": a, "port": gw.port})));
    }
    (!networks.is_empty()).then_some(Value::Object(networks))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(clusters: &str) -> MeshFederationSpec {
        serde_saphyr::from_str(&format!("meshID: m\ntrust: {{root: {{generate: {{}}}}}}\nclusters:\n{clusters}"))
            .unwrap()
    }

    fn service(v: Value) -> Service {
        serde_json::from_value(v).unwrap()
    }

    fn node(labels: Value, addresses: Value) -> Node {
        serde_json::from_value(json!({"metadata": {"name": "n", "labels": labels}, "status": {"addresses": addresses}}))
            .unwrap()
    }

    const EAST: &str = "- {name: east, network: n1, kubeconfigSecretRef: {name: east}}";

    fn with_gateway(gw: &str) -> ClusterSpec {
        spec(&format!("- {{name: west, network: n2, kubeconfigSecretRef: {{name: w}}, eastWestGateway: {gw}}}"))
            .clusters[0]
            .clone()
    }

    #[test]
    fn which_clusters_need_a_gateway_follows_the_topology() {
        let remote = "- {name: r, network: n1, role: Remote, controlPlane: east, kubeconfigSecretRef: {name: r}}";
        let west = "- {name: west, network: n1, kubeconfigSecretRef: {name: w}}";
        let flat = spec(&format!("{EAST}\n{west}"));
        assert!(
            flat.clusters.iter().all(|c| !crate::topology::needs_gateway(&flat, c)),
            "one network, no Remotes: none"
        );
        let served = spec(&format!("{EAST}\n{west}\n{remote}"));
        let needs: Vec<bool> = served.clusters.iter().map(|c| crate::topology::needs_gateway(&served, c)).collect();
        assert_eq!(needs, [true, false, false], "only the Primary that serves a Remote");
        let split = spec(&format!("{EAST}\n{}", west.replace("n1", "n2")));
        assert!(
            split.clusters.iter().all(|c| crate::topology::needs_gateway(&split, c)),
            "several networks: every cluster"
        );
    }

    #[test]
    fn the_gateway_deployment_leaves_its_replica_count_to_an_autoscaler() {
        let s = spec(EAST);
        let fref = FederationRef { namespace: "ns".into(), name: "f".into() };
        let deployment = serde_json::to_value(gateway_objects(&fref, &s, &s.clusters[0], None).deployment).unwrap();
        assert_eq!(deployment["spec"]["template"]["spec"]["containers"][0]["name"], "istio-proxy");
        assert_eq!(deployment["spec"].get("replicas"), None, "{deployment:#}");
    }

    #[test]
    fn a_host_network_gateway_runs_one_pod_on_each_node_it_is_dialled_at_and_rolls_in_place() {
        let s = spec(
            "- {name: east, network: n1, kubeconfigSecretRef: {name: e}, eastWestGateway: {expose: HostNetwork, nodeSelector: {gw: 'yes'}}}",
        );
        let fref = FederationRef { namespace: "ns".into(), name: "f".into() };
        let nodes =
            GatewayAddress { addresses: vec!["192.0.2.1".into(), "192.0.2.2".into()], port: CROSS_NETWORK_PORT };
        let deployment =
            serde_json::to_value(gateway_objects(&fref, &s, &s.clusters[0], Some(&nodes)).deployment).unwrap();
        let d = &deployment["spec"];
        assert_eq!(d["replicas"], 2, "one pod per advertised node");
        let anti =
            &d["template"]["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0];
        assert_eq!(anti["topologyKey"], "kubernetes.io/hostname", "never two on one node");
        assert_eq!(
            d["strategy"]["rollingUpdate"],
            json!({"maxSurge": 0, "maxUnavailable": 1}),
            "rolls without a spare node"
        );
        // Not known yet: the Deployment's default; and a load-balanced gateway leaves its count to an autoscaler.
        let unknown = serde_json::to_value(gateway_objects(&fref, &s, &s.clusters[0], None).deployment).unwrap();
        assert!(unknown["spec"].get("replicas").is_none());
        let lb = spec(EAST);
        let balanced =
            serde_json::to_value(gateway_objects(&fref, &lb, &lb.clusters[0], Some(&nodes)).deployment).unwrap();
        assert!(balanced["spec"].get("replicas").is_none() && balanced["spec"].get("strategy").is_none());
    }

    #[test]
    fn another_revision_than_default_is_selected_by_the_gateway_pods_and_istiods_route() {
        let remote = "- {name: r, network: n1, role: Remote, controlPlane: east, kubeconfigSecretRef: {name: r}}";
        let mut s = spec(&format!("{EAST}\n{remote}"));
        let fref = FederationRef { namespace: "ns".into(), name: "f".into() };
        let pod_labels = |s: &MeshFederationSpec| {
            let deployment = gateway_objects(&fref, s, &s.clusters[0], None).deployment;
            deployment.spec.unwrap().template.metadata.unwrap().labels.unwrap()
        };
        let istiod_host = |s: &MeshFederationSpec| {
            let configs = istio_gateway_configs(&fref, s, &s.clusters[0]);
            let (_, vs) = configs.into_iter().find(|(kind, _)| *kind == "VirtualService").unwrap();
            vs["spec"]["tls"][0]["route"][0]["destination"]["host"].clone()
        };
        assert_eq!(pod_labels(&s).get("istio.io/rev"), None, "the default revision injects by the usual labels");
        assert_eq!(istiod_host(&s), "istiod.istio-system.svc.cluster.local");
        s.istio.revision = "mesh1".into();
        assert_eq!(pod_labels(&s).get("istio.io/rev").map(String::as_str), Some("mesh1"));
        assert_eq!(istiod_host(&s), "istiod-mesh1.istio-system.svc.cluster.local");
    }

    #[test]
    fn each_exposure_mode_finds_its_address_where_istiod_does() {
        let lb = with_gateway("{expose: LoadBalancer}");
        let waiting = gateway_address(&lb, Some(&service(json!({}))), &[]).unwrap_err();
        assert_eq!(waiting.reason, Reason::AwaitingLoadBalancer);
        let ready = service(json!({"status": {"loadBalancer": {"ingress": [{"hostname": "lb.example"}]}}}));
        assert_eq!(
            gateway_address(&lb, Some(&ready), &[]),
            Ok(GatewayAddress { addresses: vec!["lb.example".into()], port: 15443 })
        );

        let np = with_gateway("{expose: NodePort, nodeSelector: {gw: 'yes'}}");
        let svc = service(
            json!({"spec": {"ports": [{"port": 15021, "nodePort": 30021}, {"port": 15443, "nodePort": 31443}]}}),
        );
        let internal_only = node(json!({"gw": "yes"}), json!([{"type": "InternalIP", "address": "10.0.0.1"}]));
        let err = gateway_address(&np, Some(&svc), std::slice::from_ref(&internal_only)).unwrap_err();
        assert_eq!(err.reason, Reason::NoNodeAddresses, "istiod takes only ExternalIP for NodePort");
        assert!(err.message.contains("gw=yes"), "{}", err.message);
        let external = node(json!({"gw": "yes"}), json!([{"type": "ExternalIP", "address": "198.51.100.1"}]));
        assert_eq!(
            gateway_address(&np, Some(&svc), &[external, internal_only.clone()]),
            Ok(GatewayAddress { addresses: vec!["198.51.100.1".into()], port: 31443 })
        );

        let host = with_gateway("{expose: HostNetwork, nodeSelector: {gw: 'yes'}}");
        assert_eq!(gateway_address(&host, None, &[]).unwrap_err().reason, Reason::NoSchedulableNodes);
        assert_eq!(
            gateway_address(&host, None, &[internal_only]),
            Ok(GatewayAddress { addresses: vec!["10.0.0.1".into()], port: 15443 })
        );

        let fixed = with_gateway("{expose: LoadBalancer, address: proxy.example}");
        assert_eq!(
            gateway_address(&fixed, None, &[]),
            Ok(GatewayAddress { addresses: vec!["proxy.example".into()], port: 15443 })
        );
        let cluster_ip = with_gateway("{expose: ClusterIP}");
        let svc = service(json!({"spec": {"clusterIP": "10.96.0.9"}}));
        assert_eq!(gateway_address(&cluster_ip, Some(&svc), &[]).unwrap().addresses, ["10.96.0.9"]);
    }

    #[test]
    fn the_service_carries_the_network_only_where_istiod_reads_the_address_from_it() {
        let fed = FederationRef { namespace: "ns".into(), name: "f".into() };
        let s = spec(EAST);
        let network = |gw: &str| {
            let svc = gateway_objects(&fed, &s, &with_gateway(gw), None).service;
            let labelled = svc.metadata.labels.unwrap().contains_key(NETWORK_LABEL);
            (svc.spec.unwrap().type_.unwrap(), labelled, svc.metadata.annotations.is_some())
        };
        assert_eq!(network("{expose: LoadBalancer}"), ("LoadBalancer".into(), true, false));
        assert_eq!(network("{expose: NodePort}"), ("NodePort".into(), true, true));
        assert_eq!(network("{expose: HostNetwork, nodeSelector: {a: b}}"), ("ClusterIP".into(), false, false));
        assert_eq!(network("{expose: LoadBalancer, address: p.example}"), ("LoadBalancer".into(), false, false));
    }

    #[test]
    fn mesh_networks_carry_only_the_gateways_istiod_cannot_find() {
        let s = spec(
            "- {name: a, network: n1, kubeconfigSecretRef: {name: a}}\n- {name: b, network: n2, kubeconfigSecretRef: {name: b}, eastWestGateway: {expose: HostNetwork, nodeSelector: {x: y}}}\n- {name: c, network: n2, kubeconfigSecretRef: {name: c}, eastWestGateway: {address: c.example}}",
        );
        let at = |a: &str| GatewayAddress { addresses: vec![a.into()], port: 15443 };
        let gateways =
            BTreeMap::from([("a".into(), at("1.1.1.1")), ("b".into(), at("2.2.2.2")), ("c".into(), at("c.example"))]);
        assert_eq!(
            mesh_networks(&s, &gateways),
            Some(json!({"n2": {
                "endpoints": [{"fromRegistry": "b"}, {"fromRegistry": "c"}],
                "gateways": [{"address": "2.2.2.2", "port": 15443}, {"address": "c.example", "port": 15443}],
            }}))
        );
        // A gateway whose address is not known yet is left out until it is.
        assert_eq!(mesh_networks(&s, &BTreeMap::from([("a".into(), at("1.1.1.1"))])), None);
    }

    #[test]
    fn an_ambient_gateways_address_is_its_status_address_once_istiod_programmed_it() {
        let gateway =
            |status: Value| json!({"metadata": {"name": AMBIENT_GATEWAY_NAME, "generation": 2}, "status": status});
        let programmed = |status: &str, generation: i64| json!([{"type": "Programmed", "status": status, "observedGeneration": generation, "reason": "AddressNotAssigned", "message": "no load balancer"}]);
        let addressed = gateway(
            json!({"addresses": [{"type": "IPAddress", "value": "203.0.113.7"}], "conditions": programmed("True", 2)}),
        );
        assert_eq!(
            ambient_gateway_address(Some(&addressed)),
            Ok(GatewayAddress { addresses: vec!["203.0.113.7".into()], port: HBONE_PORT })
        );
        // Not programmed: istiod's own reason, even where it published an address (its Service's cluster IP).
        let unprogrammed =
            gateway(json!({"addresses": [{"value": "10.96.0.9"}], "conditions": programmed("False", 2)}));
        let refused = ambient_gateway_address(Some(&unprogrammed)).unwrap_err();
        assert_eq!(refused.reason, Reason::AwaitingLoadBalancer);
        assert!(refused.message.contains("AddressNotAssigned") && refused.message.contains("no load balancer"));
        // Programmed for an older generation, programmed without an address, no status, no Gateway: not yet.
        let stale = gateway(json!({"addresses": [{"value": "203.0.113.7"}], "conditions": programmed("True", 1)}));
        assert!(ambient_gateway_address(Some(&stale)).is_err());
        assert!(ambient_gateway_address(Some(&gateway(json!({"conditions": programmed("True", 2)})))).is_err());
        assert_eq!(
            ambient_gateway_address(Some(&gateway(json!({})))).unwrap_err().reason,
            Reason::AwaitingLoadBalancer
        );
        assert_eq!(ambient_gateway_address(None).unwrap_err().reason, Reason::AwaitingGatewayService);
    }
}
