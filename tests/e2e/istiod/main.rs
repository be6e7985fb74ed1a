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
use meshfed_e2e::{Fixture, NAMESPACE, example, is_ready, sample_until, until};
use meshfed_testenv::{Istiod, Options};
use serde_json::{Value, json};

mod adoption;
mod ambient;
mod discovery;
mod remote_access;
mod trust;

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

/// Whether `holder`'s istiod reports `other` as a remote cluster, synced, from meshfed's remote secret for it.
fn synced(clusterz: &Value, other: &str) -> bool {
    clusterz.as_array().into_iter().flatten().any(|c| {
        c["id"] == other
            && c["syncStatus"] == "synced"
            && c["secretName"].as_str().is_some_and(|s| s.ends_with(&format!("istio-remote-secret-{other}")))
    })
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

/// The Envoy cluster a sidecar dials `hello` through.
const HELLO_CLUSTER: &str = "outbound|5000||hello.sample.svc.cluster.local";

/// Creates, in namespace `sample` of `member` (created if missing), a Pod `hello-<member>` labelled
/// `security.istio.io/tlsMode: istio` (what injection sets: an endpoint istiod may route to through a network's
/// gateway must be mTLS-capable) and made Running and Ready at `address` as a kubelet would (no kubelet runs here),
/// then Service `hello` (port 5000) and an EndpointSlice whose ready endpoint at `address` names the Pod.
async fn create_hello_pod(mesh: &Mesh, member: &str, address: &str) -> anyhow::Result<()> {
    let pod = json!({"name": format!("hello-{member}"), "labels": {"security.istio.io/tlsMode": "istio"}});
    create_backed_service(&mesh.f.member(member).await?, "hello", pod, json!({}), address).await
}

/// Creates, in namespace `sample` (created if missing), Pod `pod_metadata.name` (with that metadata, and label
/// `app: <service>`) made Running and Ready at `address` as a kubelet would (no kubelet runs here), then Service
/// `service` (port 5000, labelled `service_labels`) and an EndpointSlice whose ready endpoint at `address` names the
/// Pod.
async fn create_backed_service(
    client: &kube::Client,
    service: &str,
    mut pod_metadata: Value,
    service_labels: Value,
    address: &str,
) -> anyhow::Result<()> {
    let pp = PostParams::default();
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "sample"}}))?;
    create_if_missing(&Api::all(client.clone()), &ns).await?;
    pod_metadata["labels"]["app"] = json!(service);
    let pod_name = pod_metadata["name"].as_str().context("a Pod name")?.to_string();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": pod_metadata,
        "spec": {"automountServiceAccountToken": false, "containers": [{"name": service, "image": service, "ports": [{"containerPort": 5000}]}]},
    }))?;
    run_pod(client, "sample", &pod, address).await?;
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": service, "labels": service_labels},
        "spec": {"selector": {"app": service}, "ports": [{"name": "http", "port": 5000, "protocol": "TCP"}]},
    }))?;
    Api::<Service>::namespaced(client.clone(), "sample").create(&pp, &svc).await?;
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": pod_name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": [{
            "addresses": [address],
            "conditions": {"ready": true},
            "targetRef": {"kind": "Pod", "namespace": "sample", "name": pod_name},
        }],
        "ports": [{"name": "http", "port": 5000, "protocol": "TCP"}],
    }))?;
    Api::<EndpointSlice>::namespaced(client.clone(), "sample").create(&pp, &slice).await?;
    Ok(())
}

/// Creates `object` unless there is one of its name already.
async fn create_if_missing<K>(api: &Api<K>, object: &K) -> anyhow::Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    match api.create(&PostParams::default(), object).await {
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        r => r.map(drop).map_err(Into::into),
    }
}

/// Runs `pod` in `namespace` as a kubelet would (no kubelet runs here): creates it, with its ServiceAccount (which
/// nothing makes without a controller-manager) if missing, and makes it Running and Ready at `address`.
async fn run_pod(client: &kube::Client, namespace: &str, pod: &Pod, address: &str) -> anyhow::Result<()> {
    let account = pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into());
    let account: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": account}}))?;
    create_if_missing(&Api::namespaced(client.clone(), namespace), &account).await?;
    let pods = Api::<Pod>::namespaced(client.clone(), namespace);
    let name = pod.metadata.name.clone().context("a Pod name")?;
    // Pod admission looks the ServiceAccount up in its own cache, which may not hold one made a moment ago.
    let deadline = Instant::now() + WAIT;
    while let Err(e) = pods.create(&PostParams::default(), pod).await {
        let unknown_account =
            matches!(&e, kube::Error::Api(s) if s.code == 403 && s.message.contains("service account"));
        anyhow::ensure!(unknown_account && Instant::now() < deadline, "creating Pod {name}: {e}");
        tokio::time::sleep(POLL).await;
    }
    let status = json!({"status": {
        "phase": "Running",
        "podIP": address,
        "podIPs": [{"ip": address}],
        "conditions": [{"type": "Ready", "status": "True"}],
    }});
    pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await?;
    Ok(())
}

/// Each member's `hello` pod address.
fn pod_address(member: &str) -> &'static str {
    if member == "east" { "10.244.2.7" } else { "10.244.1.5" }
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

/// Creates `hello` in both members, Pod-backed, at [`pod_address`].
async fn create_hellos(mesh: &Mesh) -> anyhow::Result<Instant> {
    let started = Instant::now();
    for member in ["east", "west"] {
        create_hello_pod(mesh, member, pod_address(member)).await?;
    }
    Ok(started)
}
