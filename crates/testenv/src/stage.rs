//! What a real member cluster has around meshfed's objects and a bare API server lacks, played for tests and the
//! demo: the Istio, Sail operator and Gateway API CRDs, a cloud that gives LoadBalancer Services an address, nodes
//! with addresses, a Sail operator that reports every `Istio`, `IstioCNI` and `ZTunnel` ready, istiod programming
//! ambient east-west Gateways at the cloud's address, and istiod publishing the roots of its
//! `cacerts` to workloads (ConfigMap `istio-ca-root-cert`). Only status and nodes are played: every
//! object meshfed writes is validated by the real API server against the real CRD schemas.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Secret, Service};
use kube::{
    Api, Client, ResourceExt,
    api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;
use tokio::task::JoinHandle;

use crate::{Cluster, gateway_api_crds, istio_crds};

/// The Sail operator release whose CRDs are installed (`github.com/istio-ecosystem/sail-operator`).
pub const SAIL_VERSION: &str = "1.30.3";
/// Its commit, as the Go module proxy names it where it serves the module.
pub const SAIL_COMMIT: &str = "4241170416706137c6263939099a4f4aaefc76d1";

/// The Sail operator's CRDs as one YAML stream, from the first place that has them: the directory named by
/// `MESHFED_SAIL_CRDS`; the Sail Go module at [`SAIL_COMMIT`] through the Go module proxy (`chart/crds`); the
/// project's sibling `../shared/sail-operator-<version>/crds`.
pub fn sail_crds() -> Result<String> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = DIR.get_or_init(|| sail_crds_dir().map_err(|e| format!("{e:#}"))).clone().map_err(anyhow::Error::msg)?;
    let mut out = String::new();
    for f in crate::yaml_files(&dir)? {
        out.push_str("---\n");
        out.push_str(&std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?);
    }
    Ok(out)
}

fn sail_crds_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("MESHFED_SAIL_CRDS") {
        return Ok(dir.into());
    }
    let module = format!("github.com/istio-ecosystem/sail-operator@{SAIL_COMMIT}");
    let served = match crate::go_module_dir(&module) {
        Ok(dir) => return Ok(dir.join("chart/crds")),
        Err(e) => e,
    };
    let shared =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../../shared/sail-operator-{SAIL_VERSION}/crds"));
    shared.canonicalize().with_context(|| {
        format!(
            "the Sail operator CRDs: {served:#}, and {} does not exist; set MESHFED_SAIL_CRDS to a directory holding them",
            shared.display()
        )
    })
}

/// The API resource of the Sail operator's `Istio`.
fn istio_resource() -> ApiResource {
    ApiResource {
        group: "sailoperator.io".into(),
        version: "v1".into(),
        api_version: "sailoperator.io/v1".into(),
        kind: "Istio".into(),
        plural: "istios".into(),
    }
}

/// A running play of the cloud and the Sail operator in one cluster; it stops when dropped.
pub struct Stage(Vec<JoinHandle<()>>);

impl Drop for Stage {
    fn drop(&mut self) {
        self.0.iter().for_each(JoinHandle::abort);
    }
}

impl Cluster {
    /// Installs the real Istio, Sail operator and Gateway API (standard) CRDs.
    pub async fn install_mesh_crds(&self) -> Result<()> {
        self.install_crds(&istio_crds()?).await?;
        self.install_crds(&sail_crds()?).await?;
        self.install_crds(&gateway_api_crds()?).await
    }

    /// Plays the cloud and the Sail operator in this cluster until the returned [`Stage`] is dropped: every
    /// LoadBalancer Service gets `load_balancer_ip` in its status, and every `Istio`, `IstioCNI` and `ZTunnel` resource
    /// a `Ready` condition for its current generation; and, with `play_istiod`, istiod: its gateway controller, which
    /// programs every Gateway API `Gateway` of class `istio-east-west` at `load_balancer_ip` (the address of the
    /// LoadBalancer Service istiod would deploy for it), and its publishing of the roots of `cacerts`. The Sail CRDs
    /// must be installed (and the Gateway API's, for its Gateways to be played).
    pub async fn play_cloud_and_sail(&self, load_balancer_ip: &str, play_istiod: bool) -> Result<Stage> {
        let client = self.client().await?;
        let istios = Api::<DynamicObject>::all_with(client.clone(), &istio_resource());
        let istio_events = watcher(istios, watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .map(|o| o.map(|i| Played::Istio(Box::new(i))))
            .boxed();
        let service_events = watcher(Api::<Service>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .map(|o| o.map(|s| Played::Service(Box::new(s))))
            .boxed();
        let mut played = vec![istio_events, service_events];
        for kind in ["IstioCNI", "ZTunnel"] {
            let resource = sail_resource(kind);
            let events = watcher(Api::<DynamicObject>::all_with(client.clone(), &resource), watcher::Config::default())
                .default_backoff()
                .applied_objects()
                .map(move |o| o.map(|i| Played::SailReady(sail_resource(kind), Box::new(i))));
            played.push(events.boxed());
        }
        if play_istiod {
            let gateways = Api::<DynamicObject>::all_with(client.clone(), &kubernetes_gateway_resource());
            let gateway_events = watcher(gateways, watcher::Config::default())
                .default_backoff()
                .applied_objects()
                .map(|o| o.map(|g| Played::Gateway(Box::new(g))));
            played.push(gateway_events.boxed());
            let cacerts = watcher::Config::default().fields("metadata.name=cacerts");
            let cacerts_events = watcher(Api::<Secret>::all(client.clone()), cacerts)
                .default_backoff()
                .applied_objects()
                .map(|o| o.map(|s| Played::Cacerts(Box::new(s))));
            played.push(cacerts_events.boxed());
        }
        // The cloud, the Sail operator and istiod are separate controllers: each answers its own events at once.
        let tasks = played.into_iter().map(|mut events| {
            let (client, ip) = (client.clone(), load_balancer_ip.to_string());
            tokio::spawn(async move {
                while let Some(event) = events.next().await {
                    let Ok(event) = event else { continue };
                    if let Err(e) = play(&client, event, &ip).await {
                        tracing::debug!("stage: {e:#}");
                    }
                }
            })
        });
        Ok(Stage(tasks.collect()))
    }
}

/// The API resource of a cluster-scoped Sail operator kind (`IstioCNI`, `ZTunnel`).
fn sail_resource(kind: &str) -> ApiResource {
    ApiResource { kind: kind.into(), plural: format!("{}s", kind.to_lowercase()), ..istio_resource() }
}

/// The API resource of the Gateway API's `Gateway`.
fn kubernetes_gateway_resource() -> ApiResource {
    ApiResource {
        group: "gateway.networking.k8s.io".into(),
        version: "v1".into(),
        api_version: "gateway.networking.k8s.io/v1".into(),
        kind: "Gateway".into(),
        plural: "gateways".into(),
    }
}

/// The Sail operator's status of a resource it reconciled: `Reconciled` and `Ready` for `generation`.
fn sail_ready_status(generation: Option<i64>) -> serde_json::Value {
    json!({"status": {
        "observedGeneration": generation,
        "state": "Healthy",
        "conditions": [
            {"type": "Reconciled", "status": "True", "reason": "Reconciled", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"},
            {"type": "Ready", "status": "True", "reason": "Healthy", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"},
        ],
    }})
}

enum Played {
    Istio(Box<DynamicObject>),
    SailReady(ApiResource, Box<DynamicObject>),
    Gateway(Box<DynamicObject>),
    Service(Box<Service>),
    Cacerts(Box<Secret>),
}

async fn play(client: &Client, event: Played, ip: &str) -> Result<()> {
    let status = |body| Patch::Merge(body);
    match event {
        Played::Istio(istio) => {
            render_mesh_networks(client, &istio).await?;
            let generation = istio.metadata.generation;
            if istio.data["status"]["observedGeneration"].as_i64() == generation {
                return Ok(());
            }
            let istios = Api::<DynamicObject>::all_with(client.clone(), &istio_resource());
            istios
                .patch_status(&istio.name_any(), &PatchParams::default(), &status(sail_ready_status(generation)))
                .await?;
        }
        Played::SailReady(resource, object) => {
            let generation = object.metadata.generation;
            if object.data["status"]["observedGeneration"].as_i64() == generation {
                return Ok(());
            }
            let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
            api.patch_status(&object.name_any(), &PatchParams::default(), &status(sail_ready_status(generation)))
                .await?;
        }
        Played::Gateway(gateway) => {
            // istiod deploys an istio-east-west Gateway as a LoadBalancer Service and reports that Service's address.
            let generation = gateway.metadata.generation;
            let programmed = gateway.data["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter().any(|c| c["type"] == "Programmed" && c["observedGeneration"].as_i64() == generation)
            });
            if gateway.data["spec"]["gatewayClassName"] != "istio-east-west" || programmed {
                return Ok(());
            }
            let condition = |type_: &str, reason: &str| json!({"type": type_, "status": "True", "reason": reason, "message": "", "observedGeneration": generation, "lastTransitionTime": "2026-01-01T00:00:00Z"});
            let body = json!({"status": {
                "addresses": [{"type": "IPAddress", "value": ip}],
                "conditions": [condition("Accepted", "Accepted"), condition("Programmed", "Programmed")],
            }});
            let api = Api::<DynamicObject>::namespaced_with(
                client.clone(),
                &gateway.namespace().unwrap_or_default(),
                &kubernetes_gateway_resource(),
            );
            api.patch_status(&gateway.name_any(), &PatchParams::default(), &status(body)).await?;
        }
        Played::Cacerts(secret) => {
            // istiod publishes the roots of its CA bundle to workloads, as it reloads them.
            let Some(roots) = secret.data.as_ref().and_then(|d| d.get("root-cert.pem")) else { return Ok(()) };
            let namespace = secret.namespace().unwrap_or_default();
            let cm = json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "istio-ca-root-cert", "namespace": namespace},
                "data": {"root-cert.pem": String::from_utf8_lossy(&roots.0)},
            });
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
            api.patch("istio-ca-root-cert", &PatchParams::apply("istiod-play").force(), &Patch::Apply(&cm)).await?;
        }
        Played::Service(svc) => {
            let lb = svc.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("LoadBalancer");
            let has = svc
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref()?.ingress.as_ref())
                .is_some_and(|i| !i.is_empty());
            if !lb || has {
                return Ok(());
            }
            let api: Api<Service> = Api::namespaced(client.clone(), &svc.namespace().unwrap_or_default());
            let body = json!({"status": {"loadBalancer": {"ingress": [{"ip": ip}]}}});
            api.patch_status(&svc.name_any(), &PatchParams::default(), &status(body)).await?;
        }
    }
    Ok(())
}

/// Renders the `Istio`'s `values.global.meshNetworks` into the mesh networks istiod reads (ConfigMap `istio`, key
/// `meshNetworks`, in the Istio namespace), as the Sail operator's charts do.
async fn render_mesh_networks(client: &Client, istio: &DynamicObject) -> Result<()> {
    let spec = &istio.data["spec"];
    let namespace = spec["namespace"].as_str().unwrap_or("istio-system");
    let networks = match &spec["values"]["global"]["meshNetworks"] {
        serde_json::Value::Null => json!({}),
        n => n.clone(),
    };
    let cm = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "istio", "namespace": namespace},
        "data": {"meshNetworks": json!({"networks": networks}).to_string()},
    });
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    api.patch("istio", &PatchParams::apply("sail-operator-play").force(), &Patch::Apply(&cm)).await?;
    Ok(())
}

/// Adds a node named `name` with `labels` and `addresses` (`(type, address)`, e.g. `("ExternalIP", "203.0.113.7")`),
/// as a kubelet would register it.
pub async fn add_node(client: &Client, name: &str, labels: &[(&str, &str)], addresses: &[(&str, &str)]) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let labels: serde_json::Map<String, serde_json::Value> =
        labels.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
    let node: Node = serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}}))?;
    nodes.create(&PostParams::default(), &node).await?;
    let addresses: Vec<_> = addresses.iter().map(|(t, a)| json!({"type": t, "address": a})).collect();
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(json!({"status": {"addresses": addresses}})))
        .await?;
    Ok(())
}
