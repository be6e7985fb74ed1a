//! `meshfed check`: the mesh verified end to end from the hub, independently of the operator's own status. Every
//! member is reached through its kubeconfig Secret, and what it holds is read and judged here: its claim, network
//! label, `cacerts` against the federation's root, control plane and gateway; then every remote secret is used the
//! way istiod uses it, against its target. Nothing is written; no token or key is ever printed.

use std::{collections::BTreeMap, time::Duration};

use futures::future::join_all;
use jiff::Timestamp;
use k8s_openapi::api::{
    core::v1::{ConfigMap, Namespace, Secret, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config, ResourceExt,
    api::{DynamicObject, ListParams},
    config::KubeConfigOptions,
};
use meshfed_api::{ClusterSpec, ExposeMode, MeshFederation, MeshFederationSpec};
use meshfed_core::{
    control_plane,
    federation::FederationRef,
    gateway, istio, kinds,
    member::{self, ClaimHolder},
    pki::{self, CA_CERT, ROOT_CERT},
    remote, topology, trust,
    validate::validate,
};
use serde::Serialize;

use crate::member::{client::ClientPool, kinds::api_resource};

/// One verdict: in which area, about what (a member, or a holder -> target pair), and why.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Finding {
    pub area: &'static str,
    pub subject: String,
    pub ok: bool,
    pub detail: String,
}

fn found(area: &'static str, subject: impl Into<String>, verdict: Result<String, String>) -> Finding {
    let ok = verdict.is_ok();
    Finding { area, subject: subject.into(), ok, detail: verdict.unwrap_or_else(|e| e) }
}

/// How long one member may take to answer.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Checks federation `name` of `namespace` in the hub `hub` at `now`.
pub async fn check(hub: &Client, namespace: &str, name: &str, now: Timestamp) -> anyhow::Result<Vec<Finding>> {
    let fed = Api::<MeshFederation>::namespaced(hub.clone(), namespace).get(name).await?;
    let fref = FederationRef { namespace: namespace.into(), name: name.into() };
    let spec = &fed.spec;
    let mut out = Vec::new();
    let observed = fed.status.as_ref().and_then(|s| s.observed_generation);
    out.push(found(
        "operator",
        name,
        match (observed, fed.metadata.generation) {
            (Some(o), Some(g)) if o == g => Ok(format!("the status describes generation {g}")),
            (o, g) => Err(format!(
                "the status describes generation {} but the spec is at {}: is the operator running?",
                o.map_or("none".into(), |o| o.to_string()),
                g.unwrap_or_default()
            )),
        },
    ));
    if let Err(problems) = validate(spec) {
        let why = problems.iter().map(|p| format!("{}: {}", p.reason, p.message)).collect::<Vec<_>>().join("; ");
        out.push(found("spec", name, Err(why)));
        return Ok(out);
    }
    let root = root_pem(hub, &fref, spec, now).await;
    out.push(found(
        "trust",
        "root",
        root.as_ref().map(|(fp, days)| format!("{fp}, expires in {days} days")).map_err(Clone::clone),
    ));
    let hub_id = Api::<Namespace>::all(hub.clone()).get("kube-system").await?.uid().unwrap_or_default();
    let pool = ClientPool::default();
    let pool = &pool;
    let (hub_id, root_ref, fref) = (&hub_id, root.as_ref().ok(), &fref);
    let members = join_all(spec.clusters.iter().map(|c| async move {
        let member = pool
            .member(hub, namespace, &c.kubeconfig_secret_ref, TIMEOUT)
            .await
            .map_err(|f| format!("{}: {}", f.reason, f.message))?;
        let seen = member_findings(&member.client, fref, hub_id, spec, c, root_ref, now);
        match tokio::time::timeout(TIMEOUT, seen).await {
            Ok(Ok((findings, roots))) => Ok((member.client, findings, roots)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("did not answer within {TIMEOUT:?}")),
        }
    }))
    .await;
    let mut trusted: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut clients = BTreeMap::new();
    for (c, seen) in spec.clusters.iter().zip(members) {
        match seen {
            Ok((client, findings, roots)) => {
                out.extend(findings);
                trusted.insert(c.name.clone(), roots);
                clients.insert(c.name.clone(), client);
            }
            Err(e) => out.push(found("members", &c.name, Err(e))),
        }
    }
    let sets: Vec<&Vec<String>> = trusted.values().collect();
    if let [first, rest @ ..] = sets.as_slice() {
        let same = rest.iter().all(|s| s == first);
        let listing = || trusted.iter().map(|(m, r)| format!("{m}: {}", r.join(","))).collect::<Vec<_>>().join("; ");
        out.push(found(
            "trust",
            "root set",
            if same {
                Ok(format!("every member trusts {}", first.join(", ")))
            } else {
                Err(format!("members trust different roots ({})", listing()))
            },
        ));
    }
    let placement = remote::remote_secret_placement(spec);
    let pairs: Vec<(&String, &String, &Client)> = placement
        .iter()
        .filter_map(|(holder, targets)| Some((holder, targets, clients.get(holder)?)))
        .flat_map(|(holder, targets, client)| targets.iter().map(move |t| (holder, t, client)))
        .collect();
    let checked = join_all(pairs.iter().map(|(_, target, client)| remote_access(client, spec, target, now))).await;
    for ((holder, target, _), verdict) in pairs.iter().zip(checked) {
        out.push(found("remote access", format!("{holder} -> {target}"), verdict));
    }
    Ok(out)
}

/// The federation's root: its fingerprint and days until it expires.
async fn root_pem(
    hub: &Client,
    fref: &FederationRef,
    spec: &MeshFederationSpec,
    now: Timestamp,
) -> Result<(String, i64), String> {
    let name = match &spec.trust.root.secret_ref {
        Some(byo) => byo.name.clone(),
        None => trust::root_secret_name(&fref.name),
    };
    let secret = Api::<Secret>::namespaced(hub.clone(), &fref.namespace)
        .get_opt(&name)
        .await
        .map_err(|e| format!("reading Secret {name}: {e}"))?
        .ok_or_else(|| format!("the root CA Secret {name} does not exist"))?;
    let root =
        pki::load_root_secret(&secret.data.unwrap_or_default(), now).map_err(|e| format!("Secret {name}: {e}"))?;
    let summary = root.summary();
    Ok((summary.fingerprint.clone(), summary.not_after.duration_since(now).as_hours() / 24))
}

/// What one member shows: its findings, and the roots its `cacerts` trusts.
async fn member_findings(
    client: &Client,
    fref: &FederationRef,
    hub_id: &str,
    spec: &MeshFederationSpec,
    cluster: &ClusterSpec,
    root: Option<&(String, i64)>,
    now: Timestamp,
) -> Result<(Vec<Finding>, Vec<String>), String> {
    let name = cluster.name.as_str();
    let ns = &spec.istio.namespace;
    let version = client.apiserver_version().await.map_err(|e| format!("unreachable: {e}"))?;
    let mut out = vec![found("members", name, Ok(format!("reachable, Kubernetes {}", version.git_version)))];
    let claim_key = kinds::claim_key(ns);
    let claim = Api::<ConfigMap>::namespaced(client.clone(), kinds::CLAIM_NAMESPACE)
        .get_opt(&claim_key.name)
        .await
        .map_err(|e| e.to_string())?;
    out.push(found(
        "members",
        name,
        match claim.map(|c| member::claim_holder(&c.metadata, fref, hub_id, name)) {
            Some(ClaimHolder::Us) => Ok(format!("its Istio namespace {ns} is claimed by this federation")),
            Some(ClaimHolder::UsAs(other)) => Err(format!("claimed by this federation as cluster {other}")),
            Some(ClaimHolder::Other { federation, .. }) => {
                Err(format!("its Istio namespace {ns} belongs to federation {federation}"))
            }
            None => Err(format!("no claim {claim_key}: meshfed has not taken this member")),
        },
    ));
    let namespace = Api::<Namespace>::all(client.clone()).get_opt(ns).await.map_err(|e| e.to_string())?;
    let network = namespace.as_ref().and_then(|n| n.labels().get(meshfed_core::istio::NETWORK_LABEL).cloned());
    out.push(found(
        "networks",
        name,
        if network.as_deref() == Some(cluster.network.as_str()) {
            Ok(format!("namespace {ns} is on network {}", cluster.network))
        } else {
            Err(format!("namespace {ns} is labelled for network {network:?}, not {}", cluster.network))
        },
    ));
    let cacerts =
        Api::<Secret>::namespaced(client.clone(), ns).get_opt(pki::CACERTS_SECRET).await.map_err(|e| e.to_string())?;
    let data = cacerts.and_then(|s| s.data).unwrap_or_default();
    let roots: Vec<String> = data.get(ROOT_CERT).map(|b| pki::fingerprints(&b.0)).unwrap_or_default();
    let intermediate = data.get(CA_CERT).map(|c| c.0.clone());
    let chains = |root_fp: &str| {
        let bundle = data.get(ROOT_CERT).map(|b| b.0.as_slice()).unwrap_or_default();
        let root_pem = pki::certificates(bundle).into_iter().find(|(fp, _)| fp == root_fp).map(|(_, pem)| pem);
        intermediate.as_ref().zip(root_pem).is_some_and(|(i, r)| pki::issued_by(i, r.as_bytes()))
    };
    out.push(found(
        "trust",
        name,
        match (intermediate.as_ref().map(pki::summarize), root) {
            (None, _) => Err("no cacerts with an intermediate".into()),
            (Some(Err(e)), _) => Err(format!("cacerts: {e}")),
            (Some(Ok(_)), Some((fp, _))) if !chains(fp) => {
                Err(format!("its intermediate does not chain to the federation's root {fp}"))
            }
            (Some(Ok(s)), _) => Ok(format!(
                "intermediate {} expires in {} days",
                s.fingerprint,
                s.not_after.duration_since(now).as_hours() / 24
            )),
        },
    ));
    let istios = Api::<DynamicObject>::all_with(client.clone(), &api_resource(&kinds::ISTIO));
    out.push(found(
        "control plane",
        name,
        match istios.get_opt(&spec.istio.revision).await {
            Ok(istio) => {
                let istio = istio.map(|i| serde_json::to_value(i).unwrap_or_default());
                control_plane::istio_ready(istio.as_ref())
                    .map(|()| "the Sail operator reports Istio ready".into())
                    .map_err(|f| f.message)
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {
                Err("the cluster does not serve sailoperator.io/v1 Istio: install the Sail operator".into())
            }
            Err(e) => Err(e.to_string()),
        },
    ));
    if topology::needs_gateway(spec, cluster) {
        let service = Api::<Service>::namespaced(client.clone(), ns)
            .get_opt(gateway::GATEWAY_NAME)
            .await
            .map_err(|e| e.to_string())?;
        let gw = &cluster.east_west_gateway;
        let nodes = if matches!(gw.expose, ExposeMode::NodePort | ExposeMode::HostNetwork) {
            crate::member::read::nodes(client, gw.node_selector.as_ref()).await.map_err(|f| f.message)?
        } else {
            Vec::new()
        };
        out.push(found(
            "networks",
            format!("{name} gateway"),
            gateway::gateway_address(cluster, service.as_ref(), &nodes)
                .map(|a| format!("dialled at {a}"))
                .map_err(|f| f.message),
        ));
    }
    Ok((out, roots))
}

/// Uses `holder`'s remote secret for `target` as istiod does: its kubeconfig must authenticate against the target
/// and list services and endpointslices there; says how long its token has left.
async fn remote_access(
    holder: &Client,
    spec: &MeshFederationSpec,
    target: &str,
    now: Timestamp,
) -> Result<String, String> {
    let name = istio::remote_secret_name(target);
    let secret = Api::<Secret>::namespaced(holder.clone(), &spec.istio.namespace)
        .get_opt(&name)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("no remote secret {name}"))?;
    let yaml = secret
        .data
        .as_ref()
        .and_then(|d| d.get(target))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .ok_or_else(|| format!("{name} has no key {target}"))?;
    let (kc, _) = meshfed_core::kubeconfig::check(&yaml).map_err(|e| format!("{name}: {e}"))?;
    let mut config =
        Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.map_err(|e| format!("{name}: {e}"))?;
    config.connect_timeout = Some(TIMEOUT);
    let client = Client::try_from(config).map_err(|e| format!("{name}: {e}"))?;
    let lp = ListParams::default().limit(1);
    Api::<Service>::all(client.clone()).list(&lp).await.map_err(|e| format!("listing services with {name}: {e}"))?;
    Api::<EndpointSlice>::all(client)
        .list(&lp)
        .await
        .map_err(|e| format!("listing endpointslices with {name}: {e}"))?;
    let left = remote::token_in_remote_secret(&secret, target)
        .and_then(|t| remote::token_claims(&t).ok())
        .map_or("unknown".into(), |c| format!("{} h", c.expires_at.duration_since(now).as_hours()));
    Ok(format!("authenticates, lists services and endpointslices; token valid for {left}"))
}

/// Whether a leader holds the operator's Lease in `namespace`: named, and renewed within its duration.
pub async fn leader(hub: &Client, namespace: &str, now: Timestamp) -> Finding {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(hub.clone(), namespace);
    let verdict = match leases.get_opt(crate::leader::LEASE_NAME).await {
        Err(e) => Err(format!("reading Lease {namespace}/{}: {e}", crate::leader::LEASE_NAME)),
        Ok(None) => Err(format!(
            "no Lease {namespace}/{}: is the operator running with --leader-elect?",
            crate::leader::LEASE_NAME
        )),
        Ok(Some(lease)) => {
            let spec = lease.spec.unwrap_or_default();
            let renewed = spec.renew_time.map(|t| t.0);
            let lasts = jiff::SignedDuration::from_secs(spec.lease_duration_seconds.unwrap_or_default().into());
            match (spec.holder_identity, renewed) {
                (Some(holder), Some(at)) if at + lasts >= now => Ok(format!("{holder} holds it, renewed at {at}")),
                (holder, at) => Err(format!("no live leader: holder {holder:?}, last renewed {at:?}")),
            }
        }
    };
    found("operator", "leader", verdict)
}

/// Whether every finding passed.
pub fn passed(findings: &[Finding]) -> bool {
    findings.iter().all(|f| f.ok)
}

/// The findings as a report people read, one line each.
pub fn report(findings: &[Finding]) -> String {
    findings
        .iter()
        .map(|f| format!("{:<4}  {:<13}  {:<16}  {}\n", if f.ok { "ok" } else { "FAIL" }, f.area, f.subject, f.detail))
        .collect()
}
