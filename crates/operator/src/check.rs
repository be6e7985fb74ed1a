//! `meshfed check`: the mesh verified end to end from the hub, independently of the operator's own status. Every
//! member is reached through its kubeconfig Secret, and what it holds is read and judged here: its claim, network
//! label, `cacerts` against the federation's root, control plane and gateway; then every remote secret is used the
//! way istiod uses it, against its target. Nothing is written; no token or key is ever printed.

use std::{collections::BTreeMap, time::Duration};

use futures::future::join_all;
use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::{
    core::v1::{ConfigMap, Namespace, Secret, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config, ResourceExt,
    api::{DynamicObject, ListParams},
    config::KubeConfigOptions,
};
use meshfed_api::{
    ClusterRole, ClusterSpec, DataPlane, ExistingObjects, ExposeMode, MeshFederation, MeshFederationSpec, TrustStatus,
};
use meshfed_core::{
    control_plane,
    federation::FederationRef,
    gateway, istio,
    kinds::{self, ObjectKey},
    member::{self, ClaimHolder},
    pki::{self, CA_CERT, CertSummary, ROOT_CERT, Root},
    remote, render,
    rotation::Phase,
    topology,
    trust::{self, CacertsPlan, Observed},
    validate::{Durations, validate},
    versions::{self, SailVersions},
};
use serde::Serialize;
use serde_json::Value;

use crate::member::{
    client::ClientPool,
    kinds::{api, api_resource, as_json},
};

/// One verdict: in which area, about what (a member, or a holder -> target pair), and why.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Finding {
    pub area: &'static str,
    pub subject: String,
    pub ok: bool,
    /// Passes, with something a person should know (a known Istio defect that meshfed works around).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub warning: bool,
    pub detail: String,
}

fn found(area: &'static str, subject: impl Into<String>, verdict: Result<String, String>) -> Finding {
    let ok = verdict.is_ok();
    Finding { area, subject: subject.into(), ok, warning: false, detail: verdict.unwrap_or_else(|e| e) }
}

/// The Istio version `cluster` runs for the federation: refused where its Sail operator does not install it; a
/// warning for a Primary on a version with a defect that meshfed's token refresh triggers.
fn istio_version(spec: &MeshFederationSpec, cluster: &ClusterSpec, sail: Option<&SailVersions>) -> Finding {
    let version = match versions::member_version(spec.istio.version.as_deref(), sail) {
        Ok(Some(v)) => v,
        Ok(None) => {
            return found("control plane", &cluster.name, Ok("Istio version not known (no Sail operator CRD)".into()));
        }
        Err(f) => return found("control plane", &cluster.name, Err(f.message)),
    };
    let ambient = spec.data_plane == DataPlane::Ambient;
    let defects = versions::remote_secret_defects(version.release, ambient);
    let mut finding = found("control plane", &cluster.name, Ok(format!("Istio {}", version.name)));
    if cluster.role == ClusterRole::Primary && !defects.is_empty() {
        finding.warning = true;
        finding.detail = format!(
            "Istio {} has {defects}: istiod mishandles an updated remote secret, so meshfed restarts it after each token refresh (every two thirds of remoteAccess.tokenTTL: 16 h with the default 24h); Istio {} needs no restart",
            version.name,
            if ambient { "1.31" } else { "1.30.4 or 1.31" }
        );
    }
    finding
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
    let valid = match validate(spec) {
        Ok(valid) => valid,
        Err(problems) => {
            let why = problems.iter().map(|p| format!("{}: {}", p.reason, p.message)).collect::<Vec<_>>().join("; ");
            out.push(found("spec", name, Err(why)));
            return Ok(out);
        }
    };
    let root = root(hub, &fref, spec, now).await;
    out.push(found(
        "trust",
        "root",
        root.as_ref()
            .map(|r| format!("{}, expires in {} days", r.summary().fingerprint, days_left(r.summary(), now)))
            .map_err(Clone::clone),
    ));
    let kept = match &root {
        Ok(r) => crate::trust::kept_roots(hub, &fref, &fed, r, now).await,
        Err(_) => Vec::new(),
    };
    let hub_id = Api::<Namespace>::all(hub.clone()).get("kube-system").await?.uid().unwrap_or_default();
    let pool = ClientPool::default();
    let pool = &pool;
    let (hub_id, fref) = (&hub_id, &fref);
    let members = join_all(spec.clusters.iter().map(|c| async move {
        let member = pool
            .member(hub, namespace, &c.kubeconfig_secret_ref, TIMEOUT)
            .await
            .map_err(|f| format!("{}: {}", f.reason, f.message))?;
        let seen = member_findings(&member.client, fref, hub_id, spec, c);
        match tokio::time::timeout(TIMEOUT, seen).await {
            Ok(Ok((findings, held))) => Ok((member.client, findings, held)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("did not answer within {TIMEOUT:?}")),
        }
    }))
    .await;
    let mut held: BTreeMap<String, Held> = BTreeMap::new();
    let mut clients = BTreeMap::new();
    for (c, seen) in spec.clusters.iter().zip(members) {
        match seen {
            Ok((client, findings, trust)) => {
                out.extend(findings);
                held.insert(c.name.clone(), trust);
                clients.insert(c.name.clone(), client);
            }
            Err(e) => out.push(found("members", &c.name, Err(e))),
        }
    }
    let observed = held
        .iter()
        .map(|(name, h)| (name.clone(), Observed { cacerts: h.cacerts.as_ref(), published: h.published.as_deref() }))
        .collect();
    let trust_status = fed.status.as_ref().and_then(|s| s.trust.as_ref());
    let roots = root.as_ref().ok().map(|r| (r, kept.as_slice()));
    out.extend(trust_findings(spec, roots, &valid.durations, trust_status, &observed, now));
    if spec.data_plane == DataPlane::Ambient {
        out.push(found(
            "services",
            name,
            Ok("ambient: a Service is reached from other clusters only when labelled istio.io/global: \"true\" (where the calling cluster has a Service of that name too, its copy's label decides); without the label it stays local to its cluster".into()),
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

/// The federation's root, read from the hub as the operator reads it (nothing is generated or written here).
async fn root(hub: &Client, fref: &FederationRef, spec: &MeshFederationSpec, now: Timestamp) -> Result<Root, String> {
    let name = match &spec.trust.root.secret_ref {
        Some(byo) => byo.name.clone(),
        None => trust::root_secret_name(&fref.name),
    };
    let secret = Api::<Secret>::namespaced(hub.clone(), &fref.namespace)
        .get_opt(&name)
        .await
        .map_err(|e| format!("reading Secret {name}: {e}"))?
        .ok_or_else(|| format!("the root CA Secret {name} does not exist"))?;
    pki::load_root_secret(&secret.data.unwrap_or_default(), now).map_err(|e| format!("Secret {name}: {e}"))
}

/// Whole days until a certificate expires.
fn days_left(summary: &CertSummary, now: Timestamp) -> i64 {
    summary.not_after.duration_since(now).as_hours() / 24
}

/// What a member holds of its trust: its `cacerts` data (`None`: no Secret) and the roots its control plane
/// publishes (istiod's `istio-ca-root-cert`; `None`: no such ConfigMap), as the operator observes them.
#[derive(Default)]
struct Held {
    cacerts: Option<BTreeMap<String, ByteString>>,
    published: Option<String>,
}

/// The members' trust, judged as the operator and istiod judge it, one finding per member that answered
/// (`observed`) and one for the federation:
/// - a member passes while the operator's trust plan ([`trust::plan_trust`], from `roots`: the federation's root
///   and the one a rotation comes from, and the status `previous`) keeps its `cacerts`, or, during a root rotation,
///   while its next step for it replaces a `cacerts` that istiod still takes ([`pki::usable_cacerts`]); it fails
///   when the plan replaces it outside a rotation, when istiod would refuse it, or when the plan cannot go on;
/// - the federation passes when every member trusts the root that signed each member's intermediate: the roots a
///   member trusts, in whatever order, may differ during a rotation.
///
/// Without the federation's root (`roots` is `None`; the root's own finding says why) a member passes on istiod's
/// judgement alone.
fn trust_findings(
    spec: &MeshFederationSpec,
    roots: Option<(&Root, &[Root])>,
    durations: &Durations,
    previous: Option<&TrustStatus>,
    observed: &BTreeMap<String, Observed<'_>>,
    now: Timestamp,
) -> Vec<Finding> {
    let plan = roots.map(|(root, kept)| trust::plan_trust(spec, root, kept, durations, previous, observed, now));
    let rotation = plan.as_ref().and_then(|p| Phase::named_in(p.status.rotation_phase.as_deref()?));
    let kept = |s: &CertSummary| format!("intermediate {} expires in {} days", s.fingerprint, days_left(s, now));
    let step = |s: &CertSummary, phase: Phase, why: &str| format!("{}; root rotation {phase}: next, {why}", kept(s));
    let mut out = Vec::new();
    for c in spec.clusters.iter().filter(|c| observed.contains_key(&c.name)) {
        let usable = pki::usable_cacerts(observed[&c.name].cacerts, now).map_err(|e| e.to_string());
        let verdict = match (plan.as_ref().and_then(|p| p.cacerts.get(&c.name)), rotation) {
            (None, _) => usable.map(|s| kept(&s)),
            (Some(Err(failure)), _) => Err(failure.message.clone()),
            (Some(Ok(CacertsPlan::Hold { summary, why, .. })), _) => Ok(match (why, rotation) {
                (Some(why), Some(phase)) => step(summary, phase, why),
                _ => kept(summary),
            }),
            (Some(Ok(CacertsPlan::Issue { why, .. })), Some(phase)) => usable.map(|s| step(&s, phase, why)),
            (Some(Ok(CacertsPlan::Issue { why, .. })), None) => {
                usable.and_then(|_| Err(format!("{why}: the operator issues it a new intermediate")))
            }
        };
        out.push(found("trust", &c.name, verdict));
    }
    if !observed.is_empty() {
        out.push(found("trust", "root set", cross_trust(spec, observed)));
    }
    out
}

/// Whether every member that answered trusts the root that signed each one's intermediate (the certificate of its
/// own `root-cert.pem` that signed its `ca-cert.pem`; a member with none is judged by its own finding).
fn cross_trust(spec: &MeshFederationSpec, observed: &BTreeMap<String, Observed<'_>>) -> Result<String, String> {
    let get = |o: &Observed<'_>, key: &str| o.cacerts.and_then(|d| d.get(key)).map(|b| b.0.clone()).unwrap_or_default();
    let members: Vec<(&str, &Observed<'_>)> =
        spec.clusters.iter().filter_map(|c| Some((c.name.as_str(), observed.get(&c.name)?))).collect();
    let mut signers = Vec::new();
    let mut missing = Vec::new();
    for (name, o) in &members {
        let intermediate = get(o, CA_CERT);
        let Some((signer, _)) = pki::certificates(&get(o, ROOT_CERT))
            .into_iter()
            .find(|(_, pem)| pki::issued_by(&intermediate, pem.as_bytes()))
        else {
            continue;
        };
        for (peer, p) in &members {
            if !pki::fingerprints(&get(p, ROOT_CERT)).contains(&signer) {
                missing.push(format!("{peer} does not trust {signer}, which signed the intermediate of {name}"));
            }
        }
        if !signers.contains(&signer) {
            signers.push(signer);
        }
    }
    if missing.is_empty() {
        Ok(format!("every member trusts the roots that signed the intermediates: {}", signers.join(", ")))
    } else {
        Err(format!("members trust different roots: {}", missing.join("; ")))
    }
}

/// What one member shows: its findings, and what it holds of its trust (judged with its peers by [`trust_findings`]).
async fn member_findings(
    client: &Client,
    fref: &FederationRef,
    hub_id: &str,
    spec: &MeshFederationSpec,
    cluster: &ClusterSpec,
) -> Result<(Vec<Finding>, Held), String> {
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
    let published = kinds::published_roots_key(ns);
    let published = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(&published.name)
        .await
        .map_err(|e| e.to_string())?
        .map(|cm| cm.data.and_then(|mut d| d.remove(ROOT_CERT)).unwrap_or_default());
    let held = Held { cacerts: cacerts.and_then(|s| s.data), published };
    let sail = crate::member::read::sail_versions(client).await.map_err(|f| f.message)?;
    out.push(istio_version(spec, cluster, sail.as_ref()));
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
    if spec.data_plane == DataPlane::Ambient {
        out.extend(ambient_findings(client, spec, cluster).await);
    } else if topology::needs_gateway(spec, cluster) {
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
    out.extend(ownership(client, fref, spec, name).await?);
    Ok((out, held))
}

/// What ambient mode needs in `cluster` beyond the control plane: the Sail `IstioCNI` and `ZTunnel` ready as the Sail
/// operator reports them, and the east-west `Gateway` programmed by istiod with an address.
async fn ambient_findings(client: &Client, spec: &MeshFederationSpec, cluster: &ClusterSpec) -> Vec<Finding> {
    let name = cluster.name.as_str();
    let mut out = Vec::new();
    for kind in [kinds::ISTIO_CNI, kinds::ZTUNNEL] {
        let objects = Api::<DynamicObject>::all_with(client.clone(), &api_resource(&kind));
        let verdict = match objects.get_opt(kinds::AMBIENT_SINGLETON).await {
            Ok(object) => {
                let object = object.map(|o| serde_json::to_value(o).unwrap_or_default());
                control_plane::sail_ready(kind.kind, object.as_ref())
                    .map(|()| format!("the Sail operator reports {} ready", kind.kind))
                    .map_err(|f| f.message)
            }
            Err(kube::Error::Api(e)) if e.code == 404 => Err(format!(
                "the cluster does not serve sailoperator.io/v1 {}: install a Sail operator with the ambient kinds",
                kind.kind
            )),
            Err(e) => Err(e.to_string()),
        };
        out.push(found("data plane", name, verdict));
    }
    let key = kinds::ambient_gateway_key(&spec.istio.namespace);
    let gateways =
        Api::<DynamicObject>::namespaced_with(client.clone(), &spec.istio.namespace, &api_resource(&key.kind));
    let verdict = match gateways.get_opt(&key.name).await {
        Ok(gw) => {
            let gw = gw.map(|g| serde_json::to_value(g).unwrap_or_default());
            gateway::ambient_gateway_address(gw.as_ref())
                .map(|a| format!("Gateway {} programmed, dialled at {a}", key.name))
                .map_err(|f| f.message)
        }
        Err(kube::Error::Api(e)) if e.code == 404 => Err(
            "the cluster does not serve gateway.networking.k8s.io/v1 Gateway: install the Gateway API's standard CRDs"
                .into(),
        ),
        Err(e) => Err(e.to_string()),
    };
    out.push(found("networks", format!("{name} gateway"), verdict));
    out
}

/// Of every object `meshfed render` shows for member `name`, those it holds that are not this federation's: another
/// federation's, or made by someone else, with what adopting them would change ([`member::ownership`]).
async fn ownership(
    client: &Client,
    fref: &FederationRef,
    spec: &MeshFederationSpec,
    name: &str,
) -> Result<Vec<Finding>, String> {
    let adopt = spec.existing_objects == ExistingObjects::Adopt;
    let rendered = render::render(fref, spec, Some(name)).map_err(|_| "the spec is invalid".to_string())?;
    let desired: Vec<(ObjectKey, Value)> =
        rendered.into_iter().flat_map(|(_, objects)| objects).filter_map(|o| Some((kinds::key_of(&o)?, o))).collect();
    let held = join_all(desired.iter().map(|(key, _)| async move { api(client, key).get_opt(&key.name).await })).await;
    let mut out = Vec::new();
    for ((key, desired), held) in desired.iter().zip(held) {
        let Some(observed) = held.map_err(|e| format!("reading {key}: {e}"))? else { continue };
        if let Some(verdict) = member::ownership(fref, adopt, &as_json(&key.kind, observed), desired) {
            out.push(found("ownership", name, verdict));
        }
    }
    Ok(out)
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
        .map(|f| {
            let verdict = match (f.ok, f.warning) {
                (false, _) => "FAIL",
                (true, true) => "WARN",
                (true, false) => "ok",
            };
            format!("{verdict:<4}  {:<13}  {:<16}  {}\n", f.area, f.subject, f.detail)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use jiff::SignedDuration;
    use meshfed_api::KeyAlgorithm;
    use meshfed_core::pki::IntermediateProfile;

    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn spec() -> MeshFederationSpec {
        serde_saphyr::from_str(
            "meshID: m\ntrust: {root: {generate: {}}}\nclusters:\n- {name: east, network: n1, kubeconfigSecretRef: {name: east}}\n- {name: west, network: n2, kubeconfigSecretRef: {name: west}}\n",
        )
        .unwrap()
    }

    fn now() -> Timestamp {
        "2026-11-24T00:00:00Z".parse().unwrap()
    }

    fn root() -> Root {
        let material = pki::generate_root(KeyAlgorithm::ECDSAP256, 1000 * 24 * HOUR, now() - HOUR * 24).unwrap();
        pki::load_root_secret(&material.secret_data(), now()).unwrap()
    }

    /// `cluster`'s `cacerts` from `signer`, issued at `at` for `validity`, whose `root-cert.pem` holds `roots`.
    fn cacerts(
        signer: &Root,
        cluster: &str,
        at: Timestamp,
        validity: Duration,
        roots: &[&Root],
    ) -> BTreeMap<String, ByteString> {
        let profile =
            IntermediateProfile { cluster, istio_namespace: "istio-system", algorithm: KeyAlgorithm::ECDSAP256 };
        let mut data = trust::issued(pki::issue_intermediate(signer, &profile, validity, at).unwrap(), "");
        let bundle: String = roots.iter().map(|r| r.cert_pem()).collect();
        data.insert(ROOT_CERT.into(), ByteString(bundle.into_bytes()));
        data
    }

    fn status(root: &Root) -> TrustStatus {
        TrustStatus { root_fingerprint: Some(root.summary().fingerprint.clone()), ..Default::default() }
    }

    /// The trust findings for `east` and `west` holding these, as `subject: detail` for each failure, and whether
    /// each of the two and the root set passed.
    fn judge(
        roots: (&Root, &[Root]),
        previous: &TrustStatus,
        east: &BTreeMap<String, ByteString>,
        west: &BTreeMap<String, ByteString>,
    ) -> (Vec<bool>, Vec<String>) {
        let s = spec();
        let durations = validate(&s).unwrap().durations;
        let observed = BTreeMap::from([
            ("east".to_string(), Observed { cacerts: Some(east), published: None }),
            ("west".to_string(), Observed { cacerts: Some(west), published: None }),
        ]);
        let findings = trust_findings(&s, Some(roots), &durations, Some(previous), &observed, now());
        let subjects: Vec<&str> = findings.iter().map(|f| f.subject.as_str()).collect();
        assert_eq!(subjects, ["east", "west", "root set"]);
        (
            findings.iter().map(|f| f.ok).collect(),
            findings.iter().map(|f| format!("{}: {}", f.subject, f.detail)).collect(),
        )
    }

    #[test]
    fn a_primary_on_an_istio_with_a_remote_secret_defect_is_a_warning_naming_the_issues() {
        let s: MeshFederationSpec = serde_saphyr::from_str(
            "meshID: m\nistio: {version: v1.30.3}\ntrust: {root: {generate: {}}}\nclusters:\n- {name: east, network: n1, kubeconfigSecretRef: {name: e}}\n- {name: r, network: n1, role: Remote, controlPlane: east, kubeconfigSecretRef: {name: r}}\n",
        )
        .unwrap();
        let sail = SailVersions { accepted: vec!["v1.30.3".into(), "v1.30.4".into(), "v1.21.6".into()], default: None };
        let east = istio_version(&s, &s.clusters[0], Some(&sail));
        assert!(east.ok && east.warning && east.detail.contains("istio/istio#61043, #60920"), "{east:?}");
        assert!(report(&[east]).starts_with("WARN"));
        let remote = istio_version(&s, &s.clusters[1], Some(&sail));
        assert!(remote.ok && !remote.warning, "a Remote runs no istiod: {remote:?}");
        let mut fixed = s.clone();
        fixed.istio.version = Some("v1.30.4".into());
        assert!(!istio_version(&fixed, &fixed.clusters[0], Some(&sail)).warning);
        fixed.istio.version = Some("v1.19.0".into());
        let refused = istio_version(&fixed, &fixed.clusters[0], Some(&sail));
        assert!(!refused.ok && refused.detail.contains("v1.21.6 to v1.30.4"), "{refused:?}");
    }

    #[test]
    fn a_converged_federation_passes() {
        let r = root();
        let (east, west) =
            (cacerts(&r, "east", now(), 8760 * HOUR, &[&r]), cacerts(&r, "west", now(), 8760 * HOUR, &[&r]));
        let (ok, details) = judge((&r, &[]), &status(&r), &east, &west);
        assert_eq!(ok, [true, true, true], "{details:#?}");
        assert!(details[0].contains("expires in 365 days"), "{details:#?}");
    }

    #[test]
    fn a_cacerts_istiod_would_refuse_fails() {
        let r = root();
        let west = cacerts(&r, "west", now(), 8760 * HOUR, &[&r]);
        let good = || cacerts(&r, "east", now(), 8760 * HOUR, &[&r]);
        let expired = cacerts(&r, "east", now() - SignedDuration::from_hours(4 * 24), 24 * HOUR, &[&r]);
        let mut no_key = good();
        no_key.remove(pki::CA_KEY);
        let mut no_chain = good();
        no_chain.remove(pki::CERT_CHAIN);
        let mut other_key = good();
        other_key.insert(pki::CA_KEY.into(), cacerts(&r, "east", now(), 8760 * HOUR, &[&r])[pki::CA_KEY].clone());
        for (what, east, says) in [
            ("expired", expired, "the intermediate CA expired at"),
            ("without ca-key.pem", no_key, "has no ca-key.pem"),
            ("without cert-chain.pem", no_chain, "has no cert-chain.pem"),
            ("with another key", other_key, "ca-key.pem in Secret cacerts is not the key of ca-cert.pem"),
        ] {
            let (ok, details) = judge((&r, &[]), &status(&r), &east, &west);
            assert_eq!(ok[..2], [false, true], "{what}: {details:#?}");
            assert!(details[0].contains(says), "{what}: {details:#?}");
        }
    }

    #[test]
    fn an_intermediate_of_another_root_fails_and_its_peers_do_not_trust_it() {
        let (r, foreign) = (root(), root());
        let east = cacerts(&foreign, "east", now(), 8760 * HOUR, &[&foreign]);
        let west = cacerts(&r, "west", now(), 8760 * HOUR, &[&r]);
        let (ok, details) = judge((&r, &[]), &status(&r), &east, &west);
        assert_eq!(ok, [false, true, false], "{details:#?}");
        assert!(details[0].contains("not signed by the federation's root CA"), "{details:#?}");
        let foreign_fp = &foreign.summary().fingerprint;
        assert!(
            details[2].contains(&format!("west does not trust {foreign_fp}, which signed the intermediate of east")),
            "{details:#?}"
        );
    }

    #[test]
    fn members_mid_rotation_pass_whichever_order_their_roots_are_in() {
        let (a, b) = (root(), root());
        // Rotating from a to b: both members trust both, in either order, and still sign with a.
        let east = cacerts(&a, "east", now(), 8760 * HOUR, &[&a, &b]);
        let west = cacerts(&a, "west", now(), 8760 * HOUR, &[&b, &a]);
        let (ok, details) = judge((&b, std::slice::from_ref(&a)), &status(&a), &east, &west);
        assert_eq!(ok, [true, true, true], "{details:#?}");
        assert!(
            details[0].contains("root rotation ReissuingIntermediates: next, issuing an intermediate"),
            "{details:#?}"
        );
        // Earlier: west has the new root, east not yet; both sign with a, which both trust.
        let east = cacerts(&a, "east", now(), 8760 * HOUR, &[&a]);
        let (ok, details) = judge((&b, std::slice::from_ref(&a)), &status(&a), &east, &west);
        assert_eq!(ok, [true, true, true], "{details:#?}");
        assert!(details[0].contains("root rotation DistributingRoot: next, adding the new root"), "{details:#?}");
        // Later: east signs with b, which west trusts too.
        let east = cacerts(&b, "east", now(), 8760 * HOUR, &[&a, &b]);
        let (ok, details) = judge((&b, std::slice::from_ref(&a)), &status(&a), &east, &west);
        assert_eq!(ok, [true, true, true], "{details:#?}");
        // A member that signs with b while a peer does not trust b is a failure, rotation or not.
        let west = cacerts(&a, "west", now(), 8760 * HOUR, &[&a]);
        let (ok, details) = judge((&b, std::slice::from_ref(&a)), &status(&a), &east, &west);
        assert!(!ok[2], "{details:#?}");
        assert!(details[2].contains("west does not trust"), "{details:#?}");
    }
}
