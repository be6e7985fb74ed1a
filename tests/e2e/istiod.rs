//! Conformance with the real istiod, on multi-primary meshes: once meshfed converged, a real istiod
//! (`pilot-discovery`, built from the `istio.io/istio` module) runs in each Primary against that member alone, and
//! the tests read only what istiod reports of what meshfed wrote: the CA it signs with (from `cacerts`), the
//! clusters it discovers (from the remote secrets, with their TokenRequest tokens), and the services and endpoints
//! of the other member with that member's network (from the Istio namespace's label).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use meshfed_api::{ClusterRole, MeshFederation};
use meshfed_core::{federation::FederationRef, istio, member, pki, remote};
use meshfed_e2e::{Fixture, NAMESPACE, example, is_ready, until};
use meshfed_testenv::{Istiod, Options};
use serde_json::{Value, json};

const ISTIO_NAMESPACE: &str = "istio-system";
const WAIT: Duration = Duration::from_secs(60);
/// How soon a Service and its endpoints created in one member must be known to the other member's istiod. istiod
/// watches the member through the remote secret, so it takes well under a second on an idle machine; the bound
/// leaves room for a loaded one.
const DISCOVERY_BOUND: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);

/// The trust section of a federation with a generated root, as [`prod`] takes it.
const GENERATED_ROOT: &str = "  trust: {root: {generate: {}}}\n";

/// East and west on networks of their own.
const NETWORKS: [&str; 2] = ["network1", "network2"];

/// Federation `prod` of the suite: east and west, both Primary, on `networks`, in the suite's Istio namespace;
/// `spec_lines` (each indented two spaces, newline-terminated) hold its trust and anything else of the spec, and
/// `west_fields` is appended to west's entry (`, field: value`).
fn prod(spec_lines: &str, [east, west]: [&str; 2], west_fields: &str) -> String {
    format!(
        "apiVersion: meshfed.io/v1alpha1\nkind: MeshFederation\nmetadata: {{name: prod, namespace: {NAMESPACE}}}\nspec:\n  meshID: prod\n  istio: {{namespace: {ISTIO_NAMESPACE}}}\n{spec_lines}  clusters:\n  - {{name: east, network: {east}, kubeconfigSecretRef: {{name: east-kubeconfig}}}}\n  - {{name: west, network: {west}, kubeconfigSecretRef: {{name: west-kubeconfig}}{west_fields}}}\n"
    )
}

/// A converged federation `prod` of east and west, with an istiod running in each Primary.
struct Mesh {
    f: Fixture,
    fed: MeshFederation,
    istiods: BTreeMap<String, Istiod>,
}

impl Mesh {
    /// Two Primaries, east and west, on the given networks.
    async fn start(east_network: &str, west_network: &str) -> anyhow::Result<Self> {
        Self::start_with(east_network, west_network, Options::default()).await
    }

    /// Like [`Mesh::start`], with the clusters started with `options`.
    async fn start_with(east_network: &str, west_network: &str, options: Options) -> anyhow::Result<Self> {
        Self::from_yaml_with(&prod(GENERATED_ROOT, [east_network, west_network], ""), options).await
    }

    /// The federation `yaml` (members east and west), converged, with an istiod started in each of its Primaries.
    async fn from_yaml(yaml: &str) -> anyhow::Result<Self> {
        Self::from_yaml_with(yaml, Options::default()).await
    }

    /// Like [`Mesh::from_yaml`], with the clusters started with `options` (`real_istiod` is always set).
    async fn from_yaml_with(yaml: &str, options: Options) -> anyhow::Result<Self> {
        Self::from_yaml_accepting(yaml, options, &[]).await
    }

    /// Like [`Mesh::from_yaml_with`], with every member's Sail operator also installing the Istio `versions` (its
    /// `Istio` CRD's `spec.version` enum extended, as a newer Sail operator's is).
    async fn from_yaml_accepting(yaml: &str, options: Options, versions: &[&str]) -> anyhow::Result<Self> {
        // The real istiod publishes the roots: the stage does not play it.
        let f = Fixture::start(&["east", "west"], Options { real_istiod: true, ..options }).await?;
        for member in ["east", "west"] {
            let crds: Api<CustomResourceDefinition> = Api::all(f.member(member).await?);
            let mut crd = serde_json::to_value(crds.get(istio::SAIL_ISTIO_CRD).await?)?;
            let accepted = &mut crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
                ["version"]["enum"];
            accepted
                .as_array_mut()
                .context("the Sail CRD lists the versions it installs")?
                .extend(versions.iter().map(|v| json!(v)));
            crds.replace(istio::SAIL_ISTIO_CRD, &PostParams::default(), &serde_json::from_value(crd)?).await?;
        }
        f.apply(yaml).await?;
        let fed = f.wait_for("prod", WAIT, is_ready).await?;
        // istiod starts after meshfed converged, as it would once `cacerts` exists: it reads the CA only at start.
        let primaries: Vec<String> =
            fed.spec.clusters.iter().filter(|c| c.role == ClusterRole::Primary).map(|c| c.name.clone()).collect();
        let started = futures::future::try_join_all(
            primaries.iter().map(|p| Istiod::start(f.env.cluster(p), p, ISTIO_NAMESPACE)),
        )
        .await?;
        let istiods = primaries.into_iter().zip(started).collect();
        Ok(Self { f, fed, istiods })
    }

    /// The istiod that serves `member`: its own on a Primary, its Primary's on a Remote.
    fn istiod(&self, member: &str) -> &Istiod {
        let spec = self.fed.spec.clusters.iter().find(|c| c.name == member).expect("a member of the federation");
        &self.istiods[spec.control_plane.as_deref().unwrap_or(member)]
    }

    fn network(&self, member: &str) -> String {
        self.fed.spec.clusters.iter().find(|c| c.name == member).expect("a member of the federation").network.clone()
    }
}

/// In no case does an istiod refuse a kubeconfig meshfed wrote (a shape istiod would refuse is refused at the hub and
/// never leaves meshfed): checked on every istiod's whole log when a test ends without failing.
impl Drop for Mesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        for (member, istiod) in &self.istiods {
            let log = std::fs::read_to_string(istiod.log()).unwrap_or_default();
            if let Some(line) = log.lines().find(|l| l.contains("kubeconfig is not allowed")) {
                panic!("{member}'s istiod refused a kubeconfig meshfed wrote: {line}");
            }
        }
    }
}

/// The certificates (by fingerprint) of the root istiod publishes to workloads: ConfigMap `istio-ca-root-cert`, key
/// `root-cert.pem`, in the Istio namespace. Empty until istiod wrote it.
async fn published_roots(mesh: &Mesh, member: &str) -> Vec<String> {
    let cms: Api<ConfigMap> = Api::namespaced(mesh.f.member(member).await.unwrap(), ISTIO_NAMESPACE);
    let cm = cms.get_opt("istio-ca-root-cert").await.unwrap();
    let pem = cm.and_then(|cm| cm.data?.get("root-cert.pem").cloned()).unwrap_or_default();
    pki::fingerprints(pem.as_bytes())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_primary_istiod_signs_with_the_federation_root_not_a_self_signed_ca() -> anyhow::Result<()> {
    let mesh = Mesh::start("network1", "network2").await?;
    let hub_root = Api::<Secret>::namespaced(mesh.f.hub.clone(), NAMESPACE).get("prod-root-ca").await?;
    let root = pki::fingerprints(&hub_root.data.as_ref().unwrap()["tls.crt"].0);
    assert_eq!(root.len(), 1, "the hub holds one root");
    let status_root = mesh.fed.status.as_ref().and_then(|s| s.trust.as_ref()?.root_fingerprint.clone());
    assert_eq!(status_root.as_ref(), Some(&root[0]), "status.trust names the hub's root");

    for member in ["east", "west"] {
        let published = async || !published_roots(&mesh, member).await.is_empty();
        until(&format!("{member}'s istiod to publish its root"), WAIT, POLL, published).await?;
        // istiod falls back silently to a self-signed CA when it cannot use `cacerts`: compare, never assume.
        assert_eq!(
            published_roots(&mesh, member).await,
            root,
            "{member}'s istiod does not sign with the federation's root; its log:\n{}",
            mesh.istiod(member).log_tail()
        );
    }
    Ok(())
}

/// Whether `holder`'s istiod reports `other` as a remote cluster, synced, from meshfed's remote secret for it.
fn synced(clusterz: &Value, other: &str) -> bool {
    clusterz.as_array().into_iter().flatten().any(|c| {
        c["id"] == other
            && c["syncStatus"] == "synced"
            && c["secretName"].as_str().is_some_and(|s| s.ends_with(&format!("istio-remote-secret-{other}")))
    })
}

/// Creates Service `hello` in namespace `sample` of `member`, with one ready endpoint at `address` in an
/// EndpointSlice (no Pod: the endpoint is all istiod needs to know of it).
async fn create_hello(mesh: &Mesh, member: &str, address: &str) -> anyhow::Result<()> {
    let client = mesh.f.member(member).await?;
    let pp = PostParams::default();
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "sample"}}))?;
    Api::<Namespace>::all(client.clone()).create(&pp, &ns).await?;
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "hello"},
        "spec": {"ports": [{"name": "http", "port": 5000, "protocol": "TCP"}]},
    }))?;
    Api::<Service>::namespaced(client.clone(), "sample").create(&pp, &svc).await?;
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "hello-1", "labels": {"kubernetes.io/service-name": "hello"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [address], "conditions": {"ready": true}}],
        "ports": [{"name": "http", "port": 5000, "protocol": "TCP"}],
    }))?;
    Api::<EndpointSlice>::namespaced(client, "sample").create(&pp, &slice).await?;
    Ok(())
}

const HELLO: &str = "hello.sample.svc.cluster.local";

/// Whether istiod's registry holds `hello` with an address in cluster `member`.
fn service_known(registryz: &Value, member: &str) -> bool {
    registryz.as_array().into_iter().flatten().any(|s| {
        s["hostname"] == HELLO && s["clusterVIPs"]["Addresses"][member].as_array().is_some_and(|a| !a.is_empty())
    })
}

/// Whether istiod holds, in the shard of cluster `member`, `hello`'s endpoint at `address` on `network`.
fn endpoint_known(endpoint_shardz: &Value, member: &str, address: &str, network: &str) -> bool {
    let shard = &endpoint_shardz[HELLO]["sample"]["Shards"][format!("Kubernetes/{member}")];
    shard
        .as_array()
        .into_iter()
        .flatten()
        .any(|e| e["Network"] == network && e["Addresses"].as_array().is_some_and(|a| a.iter().any(|x| x == address)))
}

/// The multi-primary discovery scenario on the given networks: each istiod syncs the other member through meshfed's
/// remote secret, then a Service created in each member reaches the other member's istiod, with its endpoint on the
/// creating member's network, within [`DISCOVERY_BOUND`]. Prints the measured latencies.
async fn each_primary_discovers_the_other(east_network: &str, west_network: &str) -> anyhow::Result<()> {
    let mesh = Mesh::start(east_network, west_network).await?;
    for (holder, other) in [("east", "west"), ("west", "east")] {
        let istiod = mesh.istiod(holder);
        let ok = async || istiod.debug("/debug/clusterz").await.is_ok_and(|c| synced(&c, other));
        if let Err(e) = until(&format!("{holder}'s istiod to sync {other}"), WAIT, POLL, ok).await {
            let clusterz = istiod.debug("/debug/clusterz").await?;
            panic!("{e}; clusterz: {clusterz}; log:\n{}", istiod.log_tail());
        }
    }

    for (origin, observer, address) in [("west", "east", "10.244.1.5"), ("east", "west", "10.244.2.7")] {
        let istiod = mesh.istiod(observer);
        let network = mesh.network(origin);
        let started = Instant::now();
        create_hello(&mesh, origin, address).await?;
        let seen = async || {
            let (Ok(registry), Ok(shards)) =
                (istiod.debug("/debug/registryz").await, istiod.debug("/debug/endpointShardz").await)
            else {
                return false;
            };
            service_known(&registry, origin) && endpoint_known(&shards, origin, address, &network)
        };
        let what = format!("{observer}'s istiod to know {origin}'s service and its endpoint on {network}");
        if let Err(e) = until(&what, DISCOVERY_BOUND, POLL, seen).await {
            let shards = istiod.debug("/debug/endpointShardz").await?;
            panic!("{e}; endpointShardz: {shards}; log:\n{}", istiod.log_tail());
        }
        println!(
            "discovery latency ({east_network}/{west_network}): a Service created in {origin} is in {observer}'s istiod after {:?}",
            started.elapsed()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn on_two_networks_each_primary_istiod_discovers_the_other_members_services_on_its_network() -> anyhow::Result<()>
{
    each_primary_discovers_the_other("network1", "network2").await
}

#[tokio::test(flavor = "multi_thread")]
async fn on_one_network_each_primary_istiod_discovers_the_other_members_services() -> anyhow::Result<()> {
    each_primary_discovers_the_other("network1", "network1").await
}

/// The gateways `istiod` reports for `network` on `/debug/networkz`, as `address:port`.
async fn gateways(istiod: &Istiod, network: &str) -> anyhow::Result<Vec<String>> {
    let all = istiod.debug("/debug/networkz").await?;
    let mut found: Vec<String> = all
        .as_array()
        .into_iter()
        .flatten()
        .filter(|g| g["Network"] == network)
        .map(|g| format!("{}:{}", g["Addr"].as_str().unwrap_or_default(), g["Port"]))
        .collect();
    found.sort();
    Ok(found)
}

#[tokio::test(flavor = "multi_thread")]
async fn istiod_finds_every_networks_gateway_in_each_exposure_mode() -> anyhow::Result<()> {
    let mesh = Mesh::start("network1", "network2").await?;
    let west = mesh.f.member("west").await?;
    meshfed_testenv::add_node(&west, "w1", &[("gateway", "yes")], &[("ExternalIP", "198.51.100.7")]).await?;
    let yaml = |gw: &str| prod(GENERATED_ROOT, NETWORKS, &format!(", eastWestGateway: {gw}"));
    // Each mode in turn: meshfed converges, then east's istiod must report west's gateway where meshfed says it is
    // (status.clusters[].gatewayAddress and gatewayPort), and nowhere else.
    for gw in [
        "{expose: LoadBalancer}",
        "{expose: NodePort, nodeSelector: {gateway: 'yes'}}",
        "{expose: HostNetwork, nodeSelector: {gateway: 'yes'}}",
        "{expose: LoadBalancer, address: 192.0.2.50}",
    ] {
        mesh.f.apply(&yaml(gw)).await?;
        let fed = mesh.f.wait_for("prod", WAIT, is_ready).await?;
        let status = fed.status.unwrap();
        let west_status = status.clusters.iter().find(|c| c.name == "west").unwrap();
        let expected =
            format!("{}:{}", west_status.gateway_address.as_deref().unwrap(), west_status.gateway_port.unwrap());
        let seen = async || gateways(mesh.istiod("east"), "network2").await.is_ok_and(|g| g == [expected.clone()]);
        until(&format!("east's istiod to report west's gateway at {expected} ({gw})"), DISCOVERY_BOUND, POLL, seen)
            .await
            .map_err(|e| {
                let all = futures::executor::block_on(mesh.istiod("east").debug("/debug/networkz")).unwrap_or_default();
                anyhow::anyhow!("{e}; networkz: {all}; log:\n{}", mesh.istiod("east").log_tail())
            })?;
        println!("{gw}: east's istiod dials network2 at {expected}");
    }
    Ok(())
}

/// The Envoy cluster a sidecar dials `hello` through.
const HELLO_CLUSTER: &str = "outbound|5000||hello.sample.svc.cluster.local";

/// Creates, in namespace `sample` of `member` (created if missing), a Pod `hello-<member>` labelled
/// `security.istio.io/tlsMode: istio` (what injection sets: an endpoint istiod may route to through a network's
/// gateway must be mTLS-capable) and made Running and Ready at `address` as a kubelet would (no kubelet runs here),
/// then Service `hello` (port 5000) and an EndpointSlice whose ready endpoint at `address` names the Pod.
async fn create_hello_pod(mesh: &Mesh, member: &str, address: &str) -> anyhow::Result<()> {
    let client = mesh.f.member(member).await?;
    let pp = PostParams::default();
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "sample"}}))?;
    match Api::<Namespace>::all(client.clone()).create(&pp, &ns).await {
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        r => drop(r?),
    }
    // No controller-manager here makes the namespace's `default` ServiceAccount, which Pod admission looks up.
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "default"}}))?;
    Api::<ServiceAccount>::namespaced(client.clone(), "sample").create(&pp, &sa).await?;
    let pod_name = format!("hello-{member}");
    let pods = Api::<Pod>::namespaced(client.clone(), "sample");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": pod_name, "labels": {"app": "hello", "security.istio.io/tlsMode": "istio"}},
        "spec": {"automountServiceAccountToken": false, "containers": [{"name": "hello", "image": "hello", "ports": [{"containerPort": 5000}]}]},
    }))?;
    pods.create(&pp, &pod).await?;
    let status = json!({"status": {
        "phase": "Running",
        "podIP": address,
        "podIPs": [{"ip": address}],
        "conditions": [{"type": "Ready", "status": "True"}],
    }});
    pods.patch_status(&pod_name, &PatchParams::default(), &Patch::Merge(&status)).await?;
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "hello"},
        "spec": {"selector": {"app": "hello"}, "ports": [{"name": "http", "port": 5000, "protocol": "TCP"}]},
    }))?;
    Api::<Service>::namespaced(client.clone(), "sample").create(&pp, &svc).await?;
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": format!("hello-{member}"), "labels": {"kubernetes.io/service-name": "hello"}},
        "addressType": "IPv4",
        "endpoints": [{
            "addresses": [address],
            "conditions": {"ready": true},
            "targetRef": {"kind": "Pod", "namespace": "sample", "name": pod_name},
        }],
        "ports": [{"name": "http", "port": 5000, "protocol": "TCP"}],
    }))?;
    Api::<EndpointSlice>::namespaced(client, "sample").create(&pp, &slice).await?;
    Ok(())
}

/// What `observer`'s istiod tells a sidecar of `observer` (on its network) about `hello`: `address:port` with
/// weight, sorted.
async fn sidecar_view(mesh: &Mesh, observer: &str) -> anyhow::Result<Vec<String>> {
    let answer =
        mesh.istiod(observer).sidecar_endpoints(observer, &mesh.network(observer), "10.244.9.9", HELLO_CLUSTER).await?;
    let mut seen: Vec<String> = answer["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| format!("{}:{} weight {}", e["address"].as_str().unwrap_or_default(), e["port"], e["weight"]))
        .collect();
    seen.sort();
    Ok(seen)
}

/// Each member's `hello` pod address.
fn pod_address(member: &str) -> &'static str {
    if member == "east" { "10.244.2.7" } else { "10.244.1.5" }
}

/// What a sidecar of `observer` must be told about `hello` (a pod in each member) on one network: both pods.
fn told_on_one_network(_observer: &str) -> Vec<String> {
    vec![format!("{}:5000 weight 1", pod_address("west")), format!("{}:5000 weight 1", pod_address("east"))]
}

/// What a sidecar of `observer` must be told about `hello` when east and west are on two networks: its own
/// member's pod, and the other member's through that member's east-west gateway (the address meshfed reports in
/// status, the played cloud's load balancer address) at 15443, weight 1 for the one endpoint behind it.
fn told_on_two_networks(mesh: &Mesh, observer: &str) -> Vec<String> {
    let other = if observer == "east" { "west" } else { "east" };
    let status = mesh.fed.status.as_ref().expect("a status");
    let c = status.clusters.iter().find(|c| c.name == other).expect("a member's status");
    let gateway = c.gateway_address.clone().unwrap_or_else(|| panic!("meshfed reports no gateway address for {other}"));
    let mut v = vec![format!("{}:5000 weight 1", pod_address(observer)), format!("{gateway}:15443 weight 1")];
    v.sort();
    v
}

/// The other member's pod address, which a sidecar on another network must never be told to dial.
fn other_pod(observer: &str) -> Vec<String> {
    vec![pod_address(if observer == "east" { "west" } else { "east" }).to_string()]
}

/// The sidecar scenario: once `hello` runs in both members ([`pod_address`]), a sidecar of each member asks the
/// istiod serving it over ADS and must be told exactly `expected(observer)` within [`DISCOVERY_BOUND`] of
/// `started`; no sample on the way may name an address in `never(observer)`. Prints the measured times.
async fn each_sidecar_is_told(
    mesh: &Mesh,
    started: Instant,
    expected: impl Fn(&str) -> Vec<String>,
    never: impl Fn(&str) -> Vec<String>,
) -> anyhow::Result<()> {
    for observer in ["east", "west"] {
        let (mut want, forbidden) = (expected(observer), never(observer));
        want.sort();
        let (mut last, mut error) = (Vec::new(), String::new());
        let mut samples = 0;
        loop {
            match sidecar_view(mesh, observer).await {
                Ok(view) => last = view,
                Err(e) => error = format!("; last probe error: {e:#}"),
            }
            samples += 1;
            if let Some(bad) = last.iter().find(|e| forbidden.iter().any(|f| e.starts_with(&format!("{f}:")))) {
                panic!("{observer}'s sidecar was told to dial {bad} directly (sample {samples}: {last:?})");
            }
            if last == want {
                break;
            }
            if started.elapsed() > DISCOVERY_BOUND {
                panic!(
                    "{observer}'s sidecar was told {last:?}, not {want:?}, after {DISCOVERY_BOUND:?}{error}; log:\n{}",
                    mesh.istiod(observer).log_tail()
                );
            }
            tokio::time::sleep(POLL).await;
        }
        println!(
            "{observer}'s sidecar is told {want:?} by {}'s istiod for {HELLO_CLUSTER} {:?} after the Services were created ({samples} ADS samples)",
            mesh.istiod(observer).cluster_id(),
            started.elapsed()
        );
    }
    Ok(())
}

/// Creates `hello` in both members, Pod-backed, at [`pod_address`].
async fn create_hellos(mesh: &Mesh) -> anyhow::Result<Instant> {
    let started = Instant::now();
    for member in ["east", "west"] {
        create_hello_pod(mesh, member, pod_address(member)).await?;
    }
    Ok(started)
}

#[tokio::test(flavor = "multi_thread")]
async fn on_one_network_a_sidecar_is_told_the_pod_addresses_in_every_member() -> anyhow::Result<()> {
    let mesh = Mesh::start("network1", "network1").await?;
    let started = create_hellos(&mesh).await?;
    each_sidecar_is_told(&mesh, started, told_on_one_network, |_| vec![]).await
}

#[tokio::test(flavor = "multi_thread")]
async fn on_two_networks_a_sidecar_is_told_the_other_networks_gateway_never_its_pods() -> anyhow::Result<()> {
    let mesh = Mesh::start("network1", "network2").await?;
    let started = create_hellos(&mesh).await?;
    each_sidecar_is_told(&mesh, started, |o| told_on_two_networks(&mesh, o), other_pod).await
}

/// The primary-remote scenario on a `deploy/examples` federation (east the Primary, west its Remote): east's
/// istiod syncs west through meshfed's remote secret, discovers a Service created in west with its endpoint on
/// west's network, and tells a sidecar of either member (west's sidecars are served by east's istiod) what it tells
/// on that many networks. Prints the measured times.
async fn the_primary_serves_its_remote(example_name: &str) -> anyhow::Result<()> {
    let mesh = Mesh::from_yaml(&example(example_name)).await?;
    assert_eq!(mesh.istiods.keys().collect::<Vec<_>>(), ["east"], "only the Primary runs an istiod");
    let east = mesh.istiod("east");
    assert_eq!(mesh.istiod("west").cluster_id(), "east", "west is served by east's istiod");
    let started = Instant::now();
    let ok = async || east.debug("/debug/clusterz").await.is_ok_and(|c| synced(&c, "west"));
    if let Err(e) = until("east's istiod to sync its Remote west", WAIT, POLL, ok).await {
        panic!("{e}; clusterz: {}; log:\n{}", east.debug("/debug/clusterz").await?, east.log_tail());
    }
    println!(
        "{example_name}: east's istiod reports west synced {:?} after it was ready (it started in {:?}; /ready waits for remote clusters)",
        started.elapsed(),
        east.ready_after()
    );

    let network = mesh.network("west");
    let started = Instant::now();
    create_hello_pod(&mesh, "west", pod_address("west")).await?;
    let seen = async || {
        let (Ok(registry), Ok(shards)) =
            (east.debug("/debug/registryz").await, east.debug("/debug/endpointShardz").await)
        else {
            return false;
        };
        service_known(&registry, "west") && endpoint_known(&shards, "west", pod_address("west"), &network)
    };
    if let Err(e) = until("east's istiod to know west's service and endpoint", DISCOVERY_BOUND, POLL, seen).await {
        panic!("{e}; endpointShardz: {}; log:\n{}", east.debug("/debug/endpointShardz").await?, east.log_tail());
    }
    println!(
        "{example_name}: a Service created in the Remote west is in east's istiod, on {network}, after {:?}",
        started.elapsed()
    );

    let started = Instant::now();
    create_hello_pod(&mesh, "east", pod_address("east")).await?;
    if mesh.network("east") == network {
        each_sidecar_is_told(&mesh, started, told_on_one_network, |_| vec![]).await
    } else {
        each_sidecar_is_told(&mesh, started, |o| told_on_two_networks(&mesh, o), other_pod).await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn primary_remote_the_primary_istiod_syncs_and_serves_its_remote() -> anyhow::Result<()> {
    the_primary_serves_its_remote("primary-remote").await
}

#[tokio::test(flavor = "multi_thread")]
async fn primary_remote_on_two_networks_the_primary_istiod_serves_its_remote_through_gateways() -> anyhow::Result<()> {
    the_primary_serves_its_remote("primary-remote-multi-network").await
}

/// The chain istiod serves on its TLS xDS port (what a sidecar or a Remote verifies), as fingerprints from the
/// leaf up, and whether openssl verifies it against the roots in `ca_file` (a member's `root-cert.pem`).
async fn served_chain(istiod: &Istiod, ca_file: &std::path::Path) -> anyhow::Result<(bool, Vec<String>, String)> {
    let out = tokio::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &istiod.secure_xds_address(),
            "-alpn",
            "h2",
            "-showcerts",
            "-verify_return_error",
        ])
        .arg("-CAfile")
        .arg(ca_file)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(10), out).await??;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let verified = out.status.success() && text.contains("Verify return code: 0 (ok)");
    let why = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        text.lines().filter(|l| l.contains("erif")).collect::<Vec<_>>().join("\n")
    );
    Ok((verified, pki::fingerprints(text.as_bytes()), why))
}

/// A member's `cacerts` key, as stored.
async fn cacerts_key(mesh: &Mesh, member: &str, key: &str) -> anyhow::Result<Vec<u8>> {
    let secret = Api::<Secret>::namespaced(mesh.f.member(member).await?, ISTIO_NAMESPACE).get("cacerts").await?;
    Ok(secret.data.unwrap_or_default().remove(key).map(|v| v.0).unwrap_or_default())
}

/// How long a renewal may take to reach istiod: meshfed's next reconcile (poked) writes `cacerts`, the Secret
/// volume projects it, istiod's file watch reloads after 100 ms.
const RENEWAL_BOUND: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread")]
async fn an_intermediate_renewal_reaches_istiod_which_serves_a_chain_every_member_trusts_at_every_sample()
-> anyhow::Result<()> {
    // Intermediates valid 2h, renewed 116 minutes before expiry: due 4 minutes after issue. The controller's clock is
    // advanced 4.5 minutes, within the 5 minutes new certificates are backdated, so the renewed intermediate is
    // already valid for the API servers and istiod, which keep real time.
    let trust = "  trust: {root: {generate: {}}, intermediate: {validity: 2h, renewBefore: 116m}}\n";
    let mesh = Mesh::from_yaml(&prod(trust, NETWORKS, "")).await?;
    let members = ["east", "west"];
    let dir = tempfile::tempdir()?;
    let mut initial = BTreeMap::new();
    for m in members {
        let (ok, chain, why) = served_chain(mesh.istiod(m), &{
            let f = dir.path().join(format!("{m}-root.pem"));
            std::fs::write(&f, cacerts_key(&mesh, m, "root-cert.pem").await?)?;
            f
        })
        .await?;
        assert!(ok && chain.len() >= 2, "{m}'s istiod serves no verified chain before the renewal: {why}");
        assert_eq!(chain[1], pki::fingerprints(&cacerts_key(&mesh, m, "ca-cert.pem").await?)[0], "{m}'s intermediate");
        initial.insert(m, chain[1].clone());
    }

    mesh.f.clock.advance(Duration::from_secs(270));
    let started = Instant::now();
    mesh.f.poke("prod").await?;
    let (mut renewed_at, mut served_at) = (BTreeMap::new(), BTreeMap::new());
    let (mut samples, mut verifications) = (0, 0);
    loop {
        samples += 1;
        let elapsed = started.elapsed();
        // The roots each member trusts now, from its own cacerts (the files a sidecar there would get).
        let mut ca_files = Vec::new();
        for m in members {
            let f = dir.path().join(format!("{m}-root.pem"));
            std::fs::write(&f, cacerts_key(&mesh, m, "root-cert.pem").await?)?;
            ca_files.push((m, f));
        }
        for m in members {
            let intermediate = pki::fingerprints(&cacerts_key(&mesh, m, "ca-cert.pem").await?)[0].clone();
            if intermediate != initial[m] {
                renewed_at.entry(m).or_insert_with(|| started.elapsed());
            }
            let istiod = mesh.istiod(m);
            let checks = futures::future::try_join_all(ca_files.iter().map(|(_, f)| served_chain(istiod, f))).await?;
            for ((truster, _), (ok, chain, why)) in ca_files.iter().zip(checks) {
                verifications += 1;
                assert!(
                    ok,
                    "sample {samples} at {elapsed:?}: {m}'s istiod serves a chain {truster} does not trust ({chain:?}): {why}\nlog:\n{}",
                    istiod.log_tail()
                );
                if chain.get(1).is_some_and(|c| *c != initial[m]) {
                    assert_eq!(chain[1], intermediate, "{m}'s istiod serves an intermediate that is not in cacerts");
                    served_at.entry(m).or_insert_with(|| started.elapsed());
                }
            }
            // And the root it publishes to workloads is one every member trusts.
            let published = published_roots(&mesh, m).await;
            assert!(!published.is_empty(), "sample {samples}: {m}'s istiod publishes no root");
            for (truster, f) in &ca_files {
                let trusted = pki::fingerprints(&std::fs::read(f)?);
                assert!(
                    published.iter().all(|p| trusted.contains(p)),
                    "sample {samples} at {elapsed:?}: {m}'s istiod publishes a root {truster} does not trust"
                );
            }
        }
        // Done once both istiods serve their new intermediate and a second more of samples held.
        if served_at.len() == members.len() && served_at.values().all(|t| elapsed > *t + Duration::from_secs(1)) {
            break;
        }
        if elapsed > RENEWAL_BOUND {
            panic!(
                "after {RENEWAL_BOUND:?}: cacerts renewed at {renewed_at:?}, istiods serving the new intermediate at {served_at:?}; east's log:\n{}",
                mesh.istiod("east").log_tail()
            );
        }
        tokio::time::sleep(POLL).await;
    }
    for m in members {
        let projections = mesh.istiod(m).cacerts_projected_at();
        assert_eq!(projections.len(), 2, "{m}'s cacerts projected at start and once renewed");
        println!(
            "intermediate renewal in {m}: cacerts seen rewritten {:?} after the poke, projected into ROOT_CA_DIR at {:?}, new chain seen served by istiod at {:?}",
            renewed_at[m],
            projections[1].saturating_duration_since(started),
            served_at[m]
        );
    }
    println!(
        "{samples} samples over {:?} (one every {:?} on average), {verifications} chain verifications: every one to a root every member trusts",
        started.elapsed(),
        started.elapsed() / samples
    );
    Ok(())
}

/// One 100 ms sample of what an istiod holds of the other member: its status on clusterz (from meshfed's remote
/// secret; `None` when not listed), and its `hello` endpoint in endpointShardz.
struct Sample {
    at: Duration,
    status: Option<String>,
    endpoint: bool,
}

/// The other member's sync status on `clusterz`, when listed from meshfed's remote secret for it.
fn sync_status(clusterz: &Value, other: &str) -> Option<String> {
    clusterz.as_array().into_iter().flatten().find_map(|c| {
        let ours = c["secretName"].as_str().is_some_and(|s| s.ends_with(&format!("istio-remote-secret-{other}")));
        (c["id"] == other && ours).then(|| c["syncStatus"].as_str().unwrap_or_default().to_string())
    })
}

/// The intervals (from the first failing sample to the next good one, or to the end) in which `ok` failed.
fn gaps(samples: &[Sample], ok: impl Fn(&Sample) -> bool) -> Vec<(Duration, Duration)> {
    let mut out = Vec::new();
    let mut from = None;
    for s in samples {
        match (ok(s), from) {
            (false, None) => from = Some(s.at),
            (true, Some(f)) => {
                out.push((f, s.at));
                from = None;
            }
            _ => {}
        }
    }
    if let (Some(f), Some(last)) = (from, samples.last()) {
        out.push((f, last.at));
    }
    out
}

/// The remote secret `holder` holds for `target`.
async fn remote_secret(mesh: &Mesh, holder: &str, target: &str) -> anyhow::Result<Secret> {
    let name = istio::remote_secret_name(target);
    Ok(Api::<Secret>::namespaced(mesh.f.member(holder).await?, ISTIO_NAMESPACE).get(&name).await?)
}

/// Advances the controller's clock just past the refresh point of the tokens in the remote secrets of `pairs`
/// (holder, target); returns how many seconds a fresh token then stays clear of its own refresh point.
///
/// A token is due when less than a third of its lifetime remains by the controller's clock, but the API servers
/// issue fresh tokens in real time: an advance past two thirds of a lifetime (7 of 10 minutes) would make every
/// fresh token due at once as well, and meshfed would renew at every reconcile (what a first version of this
/// test saw: a new token every 100 ms). So the clock goes just past the older token's due point; a fresh token
/// then stays clear for as long as the newest old one had lived, less a second, which is made 15 s.
async fn advance_past_refresh(mesh: &Mesh, pairs: &[(&str, &str)]) -> anyhow::Result<u64> {
    let mut claims = Vec::new();
    for (holder, target) in pairs {
        let token =
            remote::token_in_remote_secret(&remote_secret(mesh, holder, target).await?, target).expect("a token");
        claims.push(remote::token_claims(&token)?);
    }
    let newest = claims.iter().map(|c| c.issued_at).max().unwrap();
    let age = jiff::Timestamp::now().duration_since(newest).unsigned_abs();
    tokio::time::sleep(Duration::from_secs(15).saturating_sub(age)).await;
    let now = jiff::Timestamp::now();
    let advance = claims
        .iter()
        .map(|c| {
            let lifetime = c.expires_at.duration_since(c.issued_at).as_secs();
            c.expires_at.duration_since(now).as_secs() - lifetime / 3 + 1
        })
        .max()
        .unwrap();
    let lifetime = claims[0].expires_at.duration_since(claims[0].issued_at).as_secs();
    let clear = lifetime * 2 / 3 - advance;
    println!("token refresh: clock advanced {advance} s; a fresh {lifetime} s token is due again after {clear} s");
    mesh.f.clock.advance(Duration::from_secs(advance.try_into()?));
    Ok(clear.try_into()?)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_refresh_never_drops_the_remote_cluster_or_its_endpoints_from_istiod_at_any_sample()
-> anyhow::Result<()> {
    // Tokens of 10 minutes (the TokenRequest API's shortest), renewed when a third remains: the controller's clock is
    // advanced 7 minutes instead of waiting; the API servers keep real time, so the old token still works.
    // On an Istio that takes an updated remote secret in place (1.31.0: its Sail operator installs it), istiod is
    // never restarted: it carries no restart marker.
    let spec = format!("{GENERATED_ROOT}  remoteAccess: {{tokenTTL: 10m}}\n");
    let yaml = prod(&spec, NETWORKS, "").replace("istio: {", "istio: {version: v1.31.0, ");
    let mesh = Mesh::from_yaml_accepting(&yaml, Options::default(), &["v1.31.0"]).await?;
    let markers = async || -> anyhow::Result<Vec<Value>> {
        let mut out = Vec::new();
        for holder in ["east", "west"] {
            out.push(sail_istio(&mesh, holder).await?["spec"]["values"]["pilot"]["podAnnotations"].clone());
        }
        Ok(out)
    };
    assert_eq!(markers().await?, [Value::Null, Value::Null], "no restart marker on Istio 1.31.0");
    create_hellos(&mesh).await?;
    let other = |m: &str| if m == "east" { "west" } else { "east" };
    let sample = async |holder: &str| {
        let istiod = mesh.istiod(holder);
        let (c, e) = futures::join!(istiod.debug("/debug/clusterz"), istiod.debug("/debug/endpointShardz"));
        let o = other(holder);
        (
            c.ok().and_then(|c| sync_status(&c, o)),
            e.is_ok_and(|e| endpoint_known(&e, o, pod_address(o), &mesh.network(o))),
        )
    };
    for holder in ["east", "west"] {
        let ready = async || sample(holder).await == (Some("synced".into()), true);
        until(&format!("{holder}'s istiod to hold {}'s endpoint", other(holder)), WAIT, POLL, ready).await?;
    }
    let secret = async |holder: &str| -> anyhow::Result<Secret> {
        let name = format!("istio-remote-secret-{}", other(holder));
        Ok(Api::<Secret>::namespaced(mesh.f.member(holder).await?, ISTIO_NAMESPACE).get(&name).await?)
    };
    let before = [secret("east").await?.data, secret("west").await?.data];

    let clear = advance_past_refresh(&mesh, &[("east", "west"), ("west", "east")]).await?;
    let started = Instant::now();
    mesh.f.poke("prod").await?;
    let mut samples: BTreeMap<&str, Vec<Sample>> = BTreeMap::new();
    let (mut rewritten, mut swapped) = (BTreeMap::new(), BTreeMap::new());
    loop {
        for (i, holder) in ["east", "west"].into_iter().enumerate() {
            let (status, endpoint) = sample(holder).await;
            samples.entry(holder).or_default().push(Sample { at: started.elapsed(), status, endpoint });
            if !rewritten.contains_key(holder) && secret(holder).await?.data != before[i] {
                rewritten.insert(holder, started.elapsed());
            }
            // istiod builds a client from the new kubeconfig, syncs it, then stops the old one (make-before-break).
            let log = std::fs::read_to_string(mesh.istiod(holder).log())?;
            let o = other(holder);
            if !swapped.contains_key(holder)
                && log.contains(&format!("stopping previous cluster {o} after new cluster synced"))
            {
                swapped.insert(holder, started.elapsed());
            }
        }
        // Sampled until both istiods swapped to the new token and 3 s more (where a dropped shard would show).
        let elapsed = started.elapsed();
        if swapped.len() == 2 && swapped.values().all(|t| elapsed > *t + Duration::from_secs(3)) {
            break;
        }
        assert!(elapsed.as_secs() < clear, "the sampling outlived the fresh tokens' clear time");
        if elapsed > WAIT {
            panic!(
                "after {WAIT:?}: remote secrets rewritten at {rewritten:?}, istiods swapped at {swapped:?}; east's log:\n{}",
                mesh.istiod("east").log_tail()
            );
        }
        tokio::time::sleep(POLL).await;
    }
    let mut failed = Vec::new();
    for (holder, s) in &samples {
        let o = other(holder);
        // One refresh: istiod was handed one new kubeconfig for the other member (one `Update cluster`).
        let log = std::fs::read_to_string(mesh.istiod(holder).log())?;
        let updates = log.matches(&format!("Update cluster\tcluster={o} ")).count();
        assert_eq!(updates, 1, "{holder}'s istiod was handed {updates} new kubeconfigs for {o}, not one");
        let synced = |s: &Sample| s.status.as_deref() == Some("synced");
        let (unsynced, missing) = (gaps(s, synced), gaps(s, |s| s.endpoint));
        let unlisted = gaps(s, |s| s.status.is_some());
        // Anything but synced, or syncing while istiod builds the new client and the old one still serves.
        let bad: Vec<_> = s.iter().filter(|s| !matches!(s.status.as_deref(), Some("synced" | "syncing"))).collect();
        let endpoints = if missing.is_empty() { "no gap" } else { "GAP" };
        println!(
            "token refresh (10m tokens, istio.io/istio {}): {holder}'s istiod, {} samples over {:?}: the secret for {o} rewritten at {:?}, the new client synced and the old one stopped at {:?}; {o}'s endpoint in endpointShardz: {endpoints} {missing:?}; {o} on clusterz: listed at every sample: {}, reported other than synced during {unsynced:?}",
            meshfed_testenv::ISTIO_VERSION,
            s.len(),
            s.last().map(|s| s.at).unwrap_or_default(),
            rewritten.get(holder),
            swapped.get(holder),
            unlisted.is_empty(),
        );
        let last_synced = s.last().is_some_and(synced);
        if !missing.is_empty() || !unlisted.is_empty() || !bad.is_empty() || !last_synced {
            println!("{holder}'s clusterz now: {}", mesh.istiod(holder).debug("/debug/clusterz").await?);
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| {
                    l.contains(&format!("cluster {o}"))
                        || l.contains(&format!("cluster={o}"))
                        || l.contains("remote-secret")
                })
                .collect();
            println!("{holder}'s istiod on {o}:\n{}", lines.join("\n"));
            failed.push(*holder);
        }
    }
    // The judge's verdict: the endpoints never went, the cluster never left clusterz nor timed out or closed, and it
    // is synced again. (This Istio swaps make-before-break: clusterz shows the new client `syncing` while it
    // syncs, about 0.2 s, and the old one keeps serving meanwhile; measured and printed above.)
    assert!(failed.is_empty(), "a token refresh cost {failed:?}'s istiod its remote cluster or its endpoints");
    assert_eq!(markers().await?, [Value::Null, Value::Null], "no restart after the refresh on Istio 1.31.0");
    Ok(())
}

/// `member`'s Sail `Istio` of the default revision, as JSON.
async fn sail_istio(mesh: &Mesh, member: &str) -> anyhow::Result<Value> {
    let resource = meshfed_operator::member::kinds::api_resource(&meshfed_core::kinds::ISTIO);
    let istios = Api::<kube::api::DynamicObject>::all_with(mesh.f.member(member).await?, &resource);
    Ok(serde_json::to_value(istios.get("default").await?)?)
}

/// The restart marker on `member`'s istiod pods, from its Sail `Istio`.
async fn restart_marker(mesh: &Mesh, member: &str) -> anyhow::Result<Option<String>> {
    Ok(meshfed_core::control_plane::restart_marker(&sail_istio(mesh, member).await?).map(String::from))
}

#[tokio::test(flavor = "multi_thread")]
async fn on_an_istio_that_needs_it_a_token_refresh_restarts_the_primarys_istiod_once_onto_the_new_secret()
-> anyhow::Result<()> {
    // East the Primary on Istio 1.30.3 (#61043, #60920: an updated remote secret needs an istiod restart), west its
    // Remote; tokens of 10 minutes, refreshed by advancing the controller's clock.
    let yaml = example("primary-remote").replace("  clusters:", "  remoteAccess: {tokenTTL: 10m}\n  clusters:");
    assert!(yaml.contains("version: v1.30.3"));
    let mut mesh = Mesh::from_yaml(&yaml).await?;
    create_hello_pod(&mesh, "west", pod_address("west")).await?;
    let network = mesh.network("west");
    let sample = async |istiod: &Istiod| {
        let (c, e) = futures::join!(istiod.debug("/debug/clusterz"), istiod.debug("/debug/endpointShardz"));
        let status = c.ok().and_then(|c| sync_status(&c, "west"));
        (status, e.is_ok_and(|e| endpoint_known(&e, "west", pod_address("west"), &network)))
    };
    let ready = async || sample(mesh.istiod("east")).await == (Some("synced".into()), true);
    until("east's istiod to hold west's endpoint", WAIT, POLL, ready).await?;
    let marker =
        restart_marker(&mesh, "east").await?.context("on Istio 1.30.3 east's istiod carries a restart marker")?;
    let before = remote_secret(&mesh, "east", "west").await?.data;

    let clear = advance_past_refresh(&mesh, &[("east", "west")]).await?;
    let started = Instant::now();
    mesh.f.poke("prod").await?;
    // Played as a Deployment rollout: when the marker on istiod's pods changes, a new istiod starts (reading the
    // remote secrets as they are then), and the old one stops once the new one is ready. Sampled every 100 ms: the
    // istiod that serves (the old one until the new one is ready).
    let (mut samples, mut changed, mut rolled) = (Vec::new(), None, None);
    let mut markers = vec![marker.clone()];
    let mut new_istiod = None;
    {
        let cluster = mesh.f.env.cluster("east");
        let mut rollout = std::pin::pin!(futures::future::OptionFuture::from(None));
        loop {
            let serving = new_istiod.as_ref().unwrap_or(mesh.istiod("east"));
            let (status, endpoint) = sample(serving).await;
            samples.push(Sample { at: started.elapsed(), status, endpoint });
            let now_marker = restart_marker(&mesh, "east").await?;
            if now_marker.as_deref() != markers.last().map(String::as_str) {
                markers.push(now_marker.clone().unwrap_or_default());
                if changed.is_none() {
                    changed = Some(started.elapsed());
                    // The secret was rewritten before istiod was told to restart.
                    let now_secret = remote_secret(&mesh, "east", "west").await?.data;
                    assert_ne!(now_secret, before, "the marker changed before the remote secret held the new token");
                    rollout.set(Some(Istiod::start(cluster, "east", ISTIO_NAMESPACE)).into());
                }
            }
            tokio::select! {
                Some(started_istiod) = &mut rollout => {
                    rollout.set(None.into());
                    new_istiod = Some(started_istiod?);
                    rolled = Some(started.elapsed());
                }
                _ = tokio::time::sleep(POLL) => {}
            }
            let elapsed = started.elapsed();
            if rolled.is_some_and(|r| elapsed > r + Duration::from_secs(3)) {
                break;
            }
            assert!(elapsed.as_secs() < clear, "the sampling outlived the fresh token's clear time");
            if elapsed > WAIT {
                panic!(
                    "after {WAIT:?}: markers {markers:?}, changed at {changed:?}; east's log:\n{}",
                    mesh.istiod("east").log_tail()
                );
            }
        }
    }
    let new_istiod = new_istiod.expect("the rollout ended");
    mesh.istiods.insert("east".into(), new_istiod);
    let (changed, rolled) = (changed.unwrap(), rolled.unwrap());
    let synced = |s: &Sample| s.status.as_deref() == Some("synced");
    // Synced, or syncing while the old istiod (this Istio takes the update in place too) builds its new client.
    let served = |s: &Sample| matches!(s.status.as_deref(), Some("synced" | "syncing"));
    let (unsynced, unserved, missing) =
        (gaps(&samples, synced), gaps(&samples, served), gaps(&samples, |s| s.endpoint));
    println!(
        "istiod restart (Istio v1.30.3 declared; the istiod run is istio.io/istio {}): marker changed {changed:?} after the refresh began, the new istiod was ready {:?} later; {} samples over {:?}: west syncing (not synced) during {unsynced:?}, neither during {unserved:?}, west's endpoint missing during {missing:?}",
        meshfed_testenv::ISTIO_VERSION,
        rolled - changed,
        samples.len(),
        samples.last().map(|s| s.at).unwrap_or_default(),
    );
    assert_eq!(markers.len(), 2, "one restart for one refresh: markers {markers:?}");
    assert!(unserved.is_empty() && missing.is_empty(), "west left east's istiod: {unserved:?} {missing:?}");
    assert!(samples.last().is_some_and(synced), "west is synced in the restarted istiod");
    // The new istiod read the new secret at its start: it never needed an in-place update.
    let log = std::fs::read_to_string(mesh.istiod("east").log())?;
    assert_eq!(
        log.matches("Update cluster\tcluster=west ").count(),
        0,
        "the restarted istiod started on the new secret"
    );
    // Reported: the time in east's status, and an Event.
    mesh.f
        .wait_for("prod", WAIT, |fed| {
            let east = fed.status.as_ref().and_then(|s| s.clusters.iter().find(|c| c.name == "east"));
            east.is_some_and(|c| c.istiod_restarted_at.is_some() && c.istio_version.as_deref() == Some("v1.30.3"))
        })
        .await?;
    mesh.f.wait_for_event("prod", |e| e.reason.as_deref() == Some("IstiodRestarted")).await?;
    Ok(())
}

/// The certificates istiod serves on its TLS xDS port, leaf first, as PEM (unverified).
async fn served_certs(istiod: &Istiod) -> anyhow::Result<Vec<String>> {
    let out = tokio::process::Command::new("openssl")
        .args(["s_client", "-connect", &istiod.secure_xds_address(), "-alpn", "h2", "-showcerts"])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(10), out).await??;
    Ok(pki::certificates(&out.stdout).into_iter().map(|(_, pem)| pem).collect())
}

/// Whether `chain` (leaf, intermediate, ...) chains to a root of `bundle`: the leaf is signed by the intermediate,
/// and the intermediate by a certificate of the bundle.
fn chains_to(chain: &[String], bundle: &[u8]) -> bool {
    let [leaf, intermediate, ..] = chain else { return false };
    pki::issued_by(leaf.as_bytes(), intermediate.as_bytes())
        && pki::certificates(bundle).iter().any(|(_, root)| pki::issued_by(intermediate.as_bytes(), root.as_bytes()))
}

/// A root rotation (requested with `meshfed.io/rotate-root`), sampled every 100 ms until it finished and both
/// istiods serve a chain to the new root: at every sample, the chain each istiod serves on its TLS xDS port chains
/// to what every member trusts, both the roots in its `cacerts` and the roots its istiod publishes to its workloads
/// (signatures checked; one openssl handshake per istiod per sample keeps the samples 100 ms apart). Panics at the
/// first sample that breaks.
async fn root_rotation_holds_at_every_sample(mesh: &Mesh) -> anyhow::Result<()> {
    let members = ["east", "west"];
    for m in members {
        let published = async || !published_roots(mesh, m).await.is_empty();
        until(&format!("{m}'s istiod to publish its root"), WAIT, POLL, published).await?;
    }
    let old = mesh.fed.status.as_ref().unwrap().trust.clone().unwrap().root_fingerprint.unwrap();
    let patch = json!({"metadata": {"annotations": {"meshfed.io/rotate-root": "2026-11-24"}}});
    mesh.f.federations().patch("prod", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    // One client per member for the whole run: a new one per read costs a TLS handshake and slows the samples.
    let mut secrets = BTreeMap::new();
    let mut config_maps = BTreeMap::new();
    for m in members {
        let client = mesh.f.member(m).await?;
        secrets.insert(m, Api::<Secret>::namespaced(client.clone(), ISTIO_NAMESPACE));
        config_maps.insert(m, Api::<ConfigMap>::namespaced(client, ISTIO_NAMESPACE));
    }
    let cacerts_key = async |m: &str, key: &str| -> anyhow::Result<Vec<u8>> {
        let secret = secrets[m].get("cacerts").await?;
        Ok(secret.data.unwrap_or_default().remove(key).map(|v| v.0).unwrap_or_default())
    };
    let published_bundle = async |m: &str| -> anyhow::Result<String> {
        let cm = config_maps[m].get_opt("istio-ca-root-cert").await?;
        Ok(cm.and_then(|cm| cm.data?.get("root-cert.pem").cloned()).unwrap_or_default())
    };
    let started = Instant::now();
    let mut samples = 0;
    let mut phases = Vec::new();
    loop {
        samples += 1;
        let sampled = Instant::now();
        let fed = mesh.f.federations().get("prod").await?;
        let trust = fed.status.as_ref().and_then(|s| s.trust.clone()).unwrap_or_default();
        let phase = format!("{:?}", trust.rotation_phase);
        if phases.last() != Some(&phase) {
            phases.push(phase.clone());
            println!("root rotation: phase {phase} at {:?}", started.elapsed());
            // Workload certificates from the old intermediates live a day: the controller's clock moves past them.
            if phase.contains("AwaitingWorkloadCertificates") {
                mesh.f.clock.advance(Duration::from_secs(24 * 3600 + 6 * 60));
                mesh.f.poke("prod").await?;
            }
        }
        let (served, bundles) = futures::join!(
            futures::future::try_join_all(members.map(|m| served_certs(mesh.istiod(m)))),
            futures::future::try_join_all(members.map(async |m| -> anyhow::Result<_> {
                Ok([
                    (format!("{m}'s cacerts"), cacerts_key(m, "root-cert.pem").await?),
                    (format!("{m}'s published roots"), published_bundle(m).await?.into_bytes()),
                ])
            })),
        );
        let (served, bundles) = (served?, bundles?);
        let mut done = is_ready(&fed) && trust.root_fingerprint.as_ref() != Some(&old);
        for (m, chain) in members.iter().zip(&served) {
            for (truster, bundle) in bundles.iter().flatten() {
                assert!(
                    chains_to(chain, bundle),
                    "sample {samples} at {:?} (phase {phase}): {m}'s istiod serves a chain ({:?}) that {truster} ({:?}) does not trust; log:\n{}",
                    started.elapsed(),
                    chain.iter().flat_map(|c| pki::fingerprints(c.as_bytes())).collect::<Vec<_>>(),
                    pki::fingerprints(bundle),
                    mesh.istiod(m).log_tail()
                );
            }
            // Finished for this istiod once it serves its member's current intermediate and publishes only the
            // new root.
            let intermediate = pki::fingerprints(&cacerts_key(m, "ca-cert.pem").await?);
            let published = pki::fingerprints(published_bundle(m).await?.as_bytes());
            done &= chain.get(1).map(|c| pki::fingerprints(c.as_bytes())) == Some(intermediate)
                && trust.root_fingerprint.as_ref().is_some_and(|r| published == [r.clone()]);
        }
        if done {
            println!(
                "root rotation: finished and served by both istiods after {:?}; {samples} samples (one every {:?}), every served chain trusted by every member's cacerts and published roots",
                started.elapsed(),
                started.elapsed() / samples
            );
            return Ok(());
        }
        if started.elapsed() > RENEWAL_BOUND {
            panic!(
                "the rotation did not reach both istiods within {RENEWAL_BOUND:?} (phases {phases:?}); east's log:\n{}",
                mesh.istiod("east").log_tail()
            );
        }
        // The next sample 100 ms after this one began (or at once, when it took longer).
        tokio::time::sleep(POLL.saturating_sub(sampled.elapsed())).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_root_rotation_reaches_istiod_which_serves_a_chain_every_member_trusts_at_every_sample() -> anyhow::Result<()>
{
    // istiod takes a new root bundle from its files only with ISTIO_MULTIROOT_MESH=true (else it logs "Multi root is
    // disabled, updating new ROOT-CA not supported" and keeps the old one): meshfed sets it in every Primary's
    // Sail values (`pilot.env`), which the test's istiod gets as the Sail operator would give it.
    let mesh = Mesh::from_yaml(&prod(GENERATED_ROOT, NETWORKS, "")).await?;
    root_rotation_holds_at_every_sample(&mesh).await?;
    Ok(())
}

/// The cluster name istioctl's remote secret for west is made under: istiod registers a cluster ID once ("cluster has
/// already been registered" for a second secret naming it), and meshfed's `istio-remote-secret-west` holds `west`,
/// so istioctl's must name another ID for both to be consumed side by side. Both point at west's API server.
const ISTIOCTL_WEST: &str = "west-istioctl";
/// The name of istioctl's remote secret for [`ISTIOCTL_WEST`].
const ISTIOCTL_WEST_SECRET: &str = "istio-remote-secret-west-istioctl";

/// Runs the real `istioctl create-remote-secret --name <name>` against `member` with its admin kubeconfig, as an
/// administrator would: it applies Istio's reader ServiceAccount `istio-reader-service-account` and its ClusterRole
/// and ClusterRoleBinding (rendered from the charts built into istioctl) in `member`, creates a
/// `kubernetes.io/service-account-token` Secret there that kube-controller-manager's token controller fills, waits
/// for the token and prints a remote secret, which is returned parsed and applied nowhere.
async fn istioctl_remote_secret(mesh: &Mesh, member: &str, name: &str) -> anyhow::Result<Secret> {
    let istioctl = tokio::task::spawn_blocking(meshfed_testenv::istioctl).await??;
    let kubeconfig = tempfile::NamedTempFile::new()?;
    std::fs::write(kubeconfig.path(), mesh.f.env.cluster(member).kubeconfig())?;
    let out = tokio::process::Command::new(istioctl)
        .arg("create-remote-secret")
        .arg("--kubeconfig")
        .arg(kubeconfig.path())
        .args(["--name", name, "--istioNamespace", ISTIO_NAMESPACE])
        .env_remove("KUBECONFIG")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(WAIT, out).await??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(out.status.success(), "istioctl create-remote-secret failed ({}): {stderr}", out.status);
    // Its log and warnings (stdout holds the secret and its token: never printed).
    println!("istioctl create-remote-secret --name {name} said: {}", stderr.trim());
    let docs: Vec<Value> = serde_saphyr::from_multiple(std::str::from_utf8(&out.stdout)?)?;
    let secret =
        docs.into_iter().find(|d| !d.is_null()).with_context(|| format!("istioctl printed no object: {stderr}"))?;
    Ok(serde_json::from_value(secret)?)
}

/// The claims of a JWT, its payload decoded without checking the signature.
fn jwt_claims(token: &str) -> Value {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).expect("a JWT");
    let json =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).expect("base64url");
    serde_json::from_slice(&json).expect("JSON claims")
}

/// A ClusterRole's permissions as `group/resource verb` strings, sorted.
fn permissions(role: &k8s_openapi::api::rbac::v1::ClusterRole) -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    all.insert(format!("{group}/{resource} {verb}"));
                }
            }
        }
    }
    all
}

/// The kubeconfig a remote secret holds under `key`, as JSON.
fn kubeconfig_in(secret: &Secret, key: &str) -> Value {
    let bytes = &secret.data.as_ref().and_then(|d| d.get(key)).unwrap_or_else(|| panic!("no key {key}")).0;
    serde_saphyr::from_slice(bytes).expect("a kubeconfig")
}

/// Issue 13: `istioctl create-remote-secret`, built from the same Istio as istiod, side by side with meshfed's remote
/// secret, both consumed by east's real istiod. meshfed's `istio-remote-secret-west` syncs; istioctl's, run against
/// west and applied unchanged in east under cluster ID [`ISTIOCTL_WEST`] (see there), syncs too; a Service created
/// in west then reaches east's istiod through both. Then the differences, asserted as facts: istioctl's token is a
/// legacy Secret-based token that never expires, meshfed's a TokenRequest token living `tokenTTL` (24 h by default);
/// the reader identities and their ClusterRoles; the secrets' names, labels, annotation and keys. Needs
/// kube-controller-manager (the token controller fills istioctl's token Secret). Prints the measured times.
#[tokio::test(flavor = "multi_thread")]
async fn istioctls_remote_secret_and_meshfeds_both_sync_in_istiod_and_differ_in_token_and_identity()
-> anyhow::Result<()> {
    let mesh =
        Mesh::start_with("network1", "network1", Options { controller_manager: true, ..Options::default() }).await?;
    let east = mesh.istiod("east");
    let (east_client, west_client) = (mesh.f.member("east").await?, mesh.f.member("west").await?);
    let east_secrets = Api::<Secret>::namespaced(east_client, ISTIO_NAMESPACE);
    let clusterz_synced = async |id: &str| {
        east.debug("/debug/clusterz").await.is_ok_and(|c| {
            c.as_array().into_iter().flatten().any(|c| {
                c["id"] == id
                    && c["syncStatus"] == "synced"
                    && c["secretName"] == format!("{ISTIO_NAMESPACE}/istio-remote-secret-{id}")
            })
        })
    };
    let explain = async |e: anyhow::Error| {
        let clusterz = east.debug("/debug/clusterz").await.unwrap_or_default();
        format!("{e}; clusterz: {clusterz}; log:\n{}", east.log_tail())
    };

    // (a) meshfed's secret: east's istiod syncs west.
    let started = Instant::now();
    if let Err(e) =
        until("east's istiod to sync west from meshfed's secret", WAIT, POLL, async || clusterz_synced("west").await)
            .await
    {
        panic!("{}", explain(e).await);
    }
    println!("meshfed's secret: east's istiod reports west synced {:?} after it was ready", started.elapsed());

    // (b) istioctl's secret, made against west and applied as printed in east.
    let started = Instant::now();
    let printed = istioctl_remote_secret(&mesh, "west", ISTIOCTL_WEST).await?;
    println!("istioctl create-remote-secret against west took {:?}", started.elapsed());
    let started = Instant::now();
    let applied = east_secrets.create(&PostParams::default(), &printed).await?;
    let what = format!("east's istiod to sync {ISTIOCTL_WEST} from istioctl's secret");
    if let Err(e) = until(&what, WAIT, POLL, async || clusterz_synced(ISTIOCTL_WEST).await).await {
        panic!("{}", explain(e).await);
    }
    println!(
        "istioctl's secret: east's istiod reports {ISTIOCTL_WEST} synced {:?} after it was created",
        started.elapsed()
    );
    assert!(clusterz_synced("west").await, "meshfed's west stays synced beside istioctl's");

    // Both clients watch west: a Service created there reaches east's istiod through each, as its own cluster.
    let started = Instant::now();
    create_hello(&mesh, "west", "10.244.1.5").await?;
    let seen = async || {
        let (Ok(registry), Ok(shards)) =
            (east.debug("/debug/registryz").await, east.debug("/debug/endpointShardz").await)
        else {
            return false;
        };
        ["west", ISTIOCTL_WEST]
            .iter()
            .all(|id| service_known(&registry, id) && endpoint_known(&shards, id, "10.244.1.5", "network1"))
    };
    if let Err(e) = until("east's istiod to know west's hello through both secrets", DISCOVERY_BOUND, POLL, seen).await
    {
        panic!("{}", explain(e).await);
    }
    println!(
        "a Service created in west is in east's istiod as west and as {ISTIOCTL_WEST} after {:?}",
        started.elapsed()
    );

    // The secrets. Same scheme: `istio-remote-secret-<cluster>` in the Istio namespace, label `istio/multiCluster`,
    // annotation `networking.istio.io/cluster`, one key named after the cluster holding a kubeconfig with inline CA
    // and bearer token for the same server. istioctl prints `stringData` and no other label; meshfed writes `data`
    // and its ownership labels.
    let meshfed_secret = east_secrets.get("istio-remote-secret-west").await?;
    assert_eq!(printed.metadata.name.as_deref(), Some(ISTIOCTL_WEST_SECRET));
    assert_eq!(printed.metadata.namespace.as_deref(), Some(ISTIO_NAMESPACE));
    assert_eq!(
        printed.metadata.labels,
        Some(BTreeMap::from([(istio::MULTI_CLUSTER_LABEL.to_string(), "true".to_string())])),
        "istioctl's only label"
    );
    assert_eq!(
        printed.metadata.annotations,
        Some(BTreeMap::from([(istio::CLUSTER_ANNOTATION.to_string(), ISTIOCTL_WEST.to_string())]))
    );
    assert!(printed.data.is_none(), "istioctl prints stringData only");
    assert_eq!(
        printed.string_data.as_ref().map(|d| d.keys().cloned().collect::<Vec<_>>()),
        Some(vec![ISTIOCTL_WEST.into()])
    );
    let fed = FederationRef { namespace: NAMESPACE.into(), name: "prod".into() };
    let mut labels = fed.owned_labels("east");
    labels.insert(istio::MULTI_CLUSTER_LABEL.into(), "true".into());
    assert_eq!(meshfed_secret.metadata.labels, Some(labels), "meshfed's labels: Istio's and its ownership");
    // Besides Istio's annotation, meshfed stamps the digest of what it applied (its drift detection).
    let annotations = meshfed_secret.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(
        annotations.keys().map(String::as_str).collect::<Vec<_>>(),
        [member::ANNOTATION_APPLIED, istio::CLUSTER_ANNOTATION]
    );
    assert_eq!(annotations[istio::CLUSTER_ANNOTATION], "west");
    assert_eq!(meshfed_secret.data.as_ref().map(|d| d.keys().cloned().collect::<Vec<_>>()), Some(vec!["west".into()]));
    let (ours, theirs) = (kubeconfig_in(&meshfed_secret, "west"), kubeconfig_in(&applied, ISTIOCTL_WEST));
    for field in ["server", "certificate-authority-data"] {
        assert_eq!(ours["clusters"][0]["cluster"][field], theirs["clusters"][0]["cluster"][field], "{field}");
    }
    // For west itself istioctl names the secret as meshfed does: applied in a member meshfed manages, one would
    // overwrite the other. (A second run reuses the token Secret it made.)
    let mut again = istioctl_remote_secret(&mesh, "west", "west").await?;
    assert_eq!(again.metadata.name, meshfed_secret.metadata.name, "istioctl --name west names meshfed's secret");
    // As the API server stores it.
    again.data =
        again.string_data.take().map(|d| d.into_iter().map(|(k, v)| (k, ByteString(v.into_bytes()))).collect());

    // The tokens. istioctl's: a legacy token read from a `kubernetes.io/service-account-token` Secret, no `exp`
    // (valid until that Secret or the ServiceAccount is deleted), no `iat`, no audience. meshfed's: a TokenRequest
    // token for the API server's audience, `exp - iat` = tokenTTL (24 h by default), refreshed by meshfed.
    let token = |s: &Secret, key: &str| remote::token_in_remote_secret(s, key).expect("an inline token");
    let legacy = jwt_claims(token(&applied, ISTIOCTL_WEST).expose());
    let reader_sa = "istio-reader-service-account";
    let token_secret = format!("{reader_sa}-istio-remote-secret-token");
    assert!(legacy.get("exp").is_none() && legacy.get("iat").is_none() && legacy.get("aud").is_none(), "{legacy}");
    assert_eq!(legacy["iss"], "kubernetes/serviceaccount");
    assert_eq!(legacy["sub"], format!("system:serviceaccount:{ISTIO_NAMESPACE}:{reader_sa}"));
    assert_eq!(legacy["kubernetes.io/serviceaccount/secret.name"], token_secret.as_str());
    assert_eq!(jwt_claims(token(&again, "west").expose()), legacy, "the second run reuses the token");
    let west_secrets = Api::<Secret>::namespaced(west_client.clone(), ISTIO_NAMESPACE);
    let stored = west_secrets.get(&token_secret).await?;
    assert_eq!(stored.type_.as_deref(), Some("kubernetes.io/service-account-token"));
    let ttl = Duration::from_secs(24 * 3600);
    let ours = token(&meshfed_secret, "west");
    let claims = remote::token_claims(&ours)?;
    let lifetime = claims.expires_at.duration_since(claims.issued_at).unsigned_abs();
    assert_eq!(lifetime, ttl, "meshfed's token lives the default tokenTTL");
    let subject = format!("system:serviceaccount:{ISTIO_NAMESPACE}:{}", remote::READER_SERVICE_ACCOUNT);
    assert_eq!(claims.subject.as_deref(), Some(subject.as_str()));
    let raw = jwt_claims(ours.expose());
    assert_eq!(raw["aud"], json!(["https://west.meshfed.test"]), "the API server's audience");
    // meshfed keeps no token Secret in west: its tokens exist only inside the remote secrets.
    let token_secrets: Vec<String> = west_secrets
        .list(&Default::default())
        .await?
        .into_iter()
        .filter(|s| s.type_.as_deref() == Some("kubernetes.io/service-account-token"))
        .filter_map(|s| s.metadata.name)
        .collect();
    assert_eq!(token_secrets, [token_secret.as_str()], "the only token Secret in west is istioctl's");

    // The reader identities in west: Istio's chart names (istioctl applies them from its embedded charts) and
    // meshfed's own, each ClusterRole bound to its ServiceAccount only.
    let sas = Api::<ServiceAccount>::namespaced(west_client.clone(), ISTIO_NAMESPACE);
    for sa in [reader_sa, remote::READER_SERVICE_ACCOUNT] {
        sas.get(sa).await.with_context(|| format!("ServiceAccount {sa}"))?;
    }
    let roles = Api::<k8s_openapi::api::rbac::v1::ClusterRole>::all(west_client.clone());
    let bindings = Api::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>::all(west_client);
    let istioctl_role = format!("istio-reader-clusterrole-{ISTIO_NAMESPACE}");
    let meshfed_role = remote::reader_cluster_role_name(&fed);
    assert_eq!(meshfed_role, "meshfed-reader.mesh-system.prod");
    for (role, sa) in [(&istioctl_role, reader_sa), (&meshfed_role, remote::READER_SERVICE_ACCOUNT)] {
        let binding = bindings.get(role).await.with_context(|| format!("ClusterRoleBinding {role}"))?;
        assert_eq!(binding.role_ref.name, *role);
        let subjects: Vec<_> = binding
            .subjects
            .iter()
            .flatten()
            .map(|s| (s.kind.as_str(), s.name.as_str(), s.namespace.as_deref()))
            .collect();
        assert_eq!(subjects, [("ServiceAccount", sa, Some(ISTIO_NAMESPACE))], "{role}");
    }
    let (istioctl_perms, meshfed_perms) =
        (permissions(&roles.get(&istioctl_role).await?), permissions(&roles.get(&meshfed_role).await?));
    let only_istioctl: Vec<_> = istioctl_perms.difference(&meshfed_perms).collect();
    let only_meshfed: Vec<_> = meshfed_perms.difference(&istioctl_perms).collect();
    println!(
        "reader ClusterRoles: only istioctl's {istioctl_role} grants {only_istioctl:?}; only meshfed's {meshfed_role} grants {only_meshfed:?}"
    );
    assert_eq!(
        only_istioctl,
        ["networking.x-k8s.io/gateways get", "networking.x-k8s.io/gateways list", "networking.x-k8s.io/gateways watch"],
        "istioctl's chart also grants the retired alpha Gateway API group"
    );
    assert!(only_meshfed.is_empty(), "meshfed grants nothing Istio's reader does not");

    // meshfed leaves the foreign secret alone.
    mesh.f.poke_and_wait("prod").await?;
    let after = east_secrets.get(ISTIOCTL_WEST_SECRET).await?;
    assert_eq!(after.data, applied.data, "meshfed left istioctl's secret as it was");
    assert!(clusterz_synced("west").await && clusterz_synced(ISTIOCTL_WEST).await);
    println!(
        "tokens: istioctl's has no exp (a legacy Secret token: {token_secret}); meshfed's lives {lifetime:?} (exp {})",
        claims.expires_at
    );
    Ok(())
}
