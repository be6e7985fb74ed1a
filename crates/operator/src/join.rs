//! `meshfed join` and `meshfed leave`, the IO half of `meshfed_core::access`: the hub's access to a member, granted
//! as the member's ServiceAccount for the hub with exactly [`access::member_permissions`], and the hub's kubeconfig
//! Secret holding a token of it from the TokenRequest API. Every write is a server-side apply (field manager
//! `meshfed-join`) or a create of what is missing, so running join twice changes nothing; leave removes only what
//! carries join's label.

use std::time::Duration;

use anyhow::Context as _;
use jiff::Timestamp;
use k8s_openapi::{
    ByteString,
    api::core::v1::{Namespace, Secret, ServiceAccount},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DynamicObject, ListParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use meshfed_core::{
    access::{self, HUB_NAMESPACE, JOIN_LABEL},
    federation::{FIELD_MANAGER as MESHFED, FederationRef, MANAGED_BY},
    kubeconfig,
    remote::token_request,
};
use serde_json::Value;

/// The field manager of join's writes.
pub const FIELD_MANAGER: &str = "meshfed-join";
/// The key of the kubeconfig in the hub's Secret (the default of `kubeconfigSecretRef.key`).
pub const SECRET_KEY: &str = "kubeconfig";

/// One member joining a federation.
#[derive(Debug, Clone)]
pub struct Join {
    pub federation: FederationRef,
    /// The member's name in the federation (`clusters[].name`); the hub's Secret is `<cluster>-kubeconfig`.
    pub cluster: String,
    pub istio_namespace: String,
    /// How the hub reaches the member's API server, and its CA (PEM).
    pub server: String,
    pub ca_pem: Option<Vec<u8>>,
    /// The lifetime asked for the hub's token.
    pub token_ttl: Duration,
}

impl Join {
    /// The hub's Secret for this member.
    pub fn secret_name(&self) -> String {
        format!("{}-kubeconfig", self.cluster)
    }
}

/// What a join or leave changed, one line per object.
pub type Changes = Vec<String>;

fn api_of(client: &Client, object: &Value) -> (Api<DynamicObject>, String) {
    let kind = object["kind"].as_str().unwrap_or_default();
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    // The kinds join writes (namespaces, service accounts, roles, bindings) all take a plain `s`.
    let plural = format!("{}s", kind.to_lowercase());
    let ar = kube::api::ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: api_version.into(),
        kind: kind.into(),
        plural,
    };
    let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
    let api = match object["metadata"]["namespace"].as_str() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    (api, name)
}

fn describe(object: &Value) -> String {
    let m = &object["metadata"];
    match m["namespace"].as_str() {
        Some(ns) => format!("{} {ns}/{}", object["kind"].as_str().unwrap_or(""), m["name"].as_str().unwrap_or("")),
        None => format!("{} {}", object["kind"].as_str().unwrap_or(""), m["name"].as_str().unwrap_or("")),
    }
}

/// The Istio namespace as join creates it where it is missing (the hub's Role lives in it), labelled as join's.
pub fn missing_istio_namespace(fed: &FederationRef, name: &str) -> Value {
    let labels = access::join_labels(fed);
    serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

/// Grants the hub's access to `member` for `fed` with Istio namespace `istio_namespace`: creates the Istio
/// namespace when it is missing, then applies the hub's namespace, ServiceAccount and RBAC.
pub async fn grant(member: &Client, fed: &FederationRef, istio_namespace: &str) -> anyhow::Result<Changes> {
    let mut changes = Vec::new();
    let namespaces: Api<Namespace> = Api::all(member.clone());
    if namespaces.get_opt(istio_namespace).await?.is_none() {
        let ns: Namespace = serde_json::from_value(missing_istio_namespace(fed, istio_namespace))?;
        match namespaces
            .create(&PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() }, &ns)
            .await
        {
            Ok(_) => changes.push(format!("created Namespace {istio_namespace}")),
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e).context(format!("creating namespace {istio_namespace}")),
        }
    }
    for object in access::hub_access(fed, istio_namespace).objects() {
        let (api, name) = api_of(member, &object);
        let before = api.get_opt(&name).await?.and_then(|o| o.metadata.resource_version);
        let after = api
            .patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&object))
            .await
            .with_context(|| format!("applying {}", describe(&object)))?
            .metadata
            .resource_version;
        if before != after {
            changes.push(format!("applied {}", describe(&object)));
        }
    }
    Ok(changes)
}

/// A token of the hub's ServiceAccount in `member` for `fed`, from the TokenRequest API, asking for `ttl`.
pub async fn hub_token(member: &Client, fed: &FederationRef, ttl: Duration) -> anyhow::Result<String> {
    let sas: Api<ServiceAccount> = Api::namespaced(member.clone(), HUB_NAMESPACE);
    let status = sas
        .create_token_request(&access::hub_identity_name(fed), &PostParams::default(), &token_request(ttl))
        .await
        .context("requesting a token for the hub's ServiceAccount")?
        .status
        .context("the API server returned no token")?;
    Ok(status.token)
}

/// Makes the hub's Secret for `join` hold a kubeconfig with a fresh token, unless the one it holds still serves
/// ([`access::hub_kubeconfig_current`]); a Secret that join did not write is never replaced.
pub async fn write_hub_secret(
    hub: &Client,
    namespace: &str,
    member: &Client,
    join: &Join,
    now: Timestamp,
) -> anyhow::Result<Changes> {
    let secrets: Api<Secret> = Api::namespaced(hub.clone(), namespace);
    let name = join.secret_name();
    let existing =
        secrets.get_opt(&name).await.with_context(|| format!("reading Secret {namespace}/{name} in the hub"))?;
    let label = access::join_labels(&join.federation);
    if let Some(s) = &existing {
        if s.labels().get(JOIN_LABEL) != label.get(JOIN_LABEL) {
            anyhow::bail!(
                "Secret {namespace}/{name} exists in the hub and was not written by meshfed join: remove it or join under another cluster name"
            );
        }
        let held = s.data.as_ref().and_then(|d| d.get(SECRET_KEY)).and_then(|b| std::str::from_utf8(&b.0).ok());
        if held.is_some_and(|y| {
            access::hub_kubeconfig_current(
                y,
                &join.server,
                join.ca_pem.as_deref(),
                &join.federation,
                join.token_ttl,
                now,
            )
        }) {
            return Ok(Vec::new());
        }
    }
    let token = hub_token(member, &join.federation, join.token_ttl).await?;
    let yaml = access::hub_kubeconfig(&join.cluster, &join.server, join.ca_pem.as_deref(), &token);
    // The operator's kubeconfig rules apply to what join writes.
    kubeconfig::check(&yaml).map_err(|e| anyhow::anyhow!("the kubeconfig join would write is refused: {e}"))?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(namespace.into()),
            labels: Some(label),
            ..Default::default()
        },
        data: Some([(SECRET_KEY.to_string(), ByteString(yaml.into_bytes()))].into()),
        ..Default::default()
    };
    let mut body = serde_json::to_value(&secret)?;
    (body["apiVersion"], body["kind"]) = ("v1".into(), "Secret".into());
    secrets
        .patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body))
        .await
        .with_context(|| format!("writing Secret {namespace}/{name} in the hub"))?;
    Ok(vec![format!("wrote Secret {namespace}/{name} in the hub (a token of {})", access::hub_user(&join.federation))])
}

/// Joins: grants the hub's access in `member`, then writes the hub's Secret in `namespace` of `hub`.
pub async fn join(
    hub: &Client,
    namespace: &str,
    member: &Client,
    join: &Join,
    now: Timestamp,
) -> anyhow::Result<Changes> {
    let mut changes = grant(member, &join.federation, &join.istio_namespace).await?;
    changes.extend(write_hub_secret(hub, namespace, member, join, now).await?);
    Ok(changes)
}

/// Whether `object` carries join's label for `fed`.
fn joined(object: &ObjectMeta, fed: &FederationRef) -> bool {
    let label = access::join_labels(fed);
    object.labels.as_ref().and_then(|l| l.get(JOIN_LABEL)) == label.get(JOIN_LABEL)
}

/// Leaves: removes from `member` what join wrote there for `fed` (the RBAC and ServiceAccount; the hub's namespace
/// when no other federation's ServiceAccount is left in it; the Istio namespace when join created it and meshfed
/// holds nothing there any more), then the hub's Secret `secret` in `namespace`, when join wrote it.
pub async fn leave(
    hub: Option<(&Client, &str, &str)>,
    member: &Client,
    fed: &FederationRef,
    istio_namespace: &str,
) -> anyhow::Result<Changes> {
    let mut changes = Vec::new();
    let mut objects = access::hub_access(fed, istio_namespace).objects();
    objects.reverse();
    for object in objects {
        let (api, name) = api_of(member, &object);
        let Some(found) = api.get_opt(&name).await? else { continue };
        if !joined(&found.metadata, fed) {
            continue;
        }
        if object["kind"] == "Namespace" {
            let sas: Api<ServiceAccount> = Api::namespaced(member.clone(), HUB_NAMESPACE);
            let others = sas.list(&ListParams::default().labels(JOIN_LABEL)).await?.items;
            if !others.is_empty() {
                continue;
            }
        }
        api.delete(&name, &Default::default()).await.with_context(|| format!("deleting {}", describe(&object)))?;
        changes.push(format!("deleted {}", describe(&object)));
    }
    let namespaces: Api<Namespace> = Api::all(member.clone());
    if let Some(ns) = namespaces.get_opt(istio_namespace).await?
        && joined(&ns.metadata, fed)
        && ns.labels().get(MANAGED_BY).is_none_or(|v| v != MESHFED)
    {
        namespaces.delete(istio_namespace, &Default::default()).await?;
        changes.push(format!("deleted Namespace {istio_namespace} (join created it; meshfed holds nothing there)"));
    }
    if let Some((hub, namespace, secret)) = hub {
        let secrets: Api<Secret> = Api::namespaced(hub.clone(), namespace);
        if let Some(s) = secrets.get_opt(secret).await?
            && joined(&s.metadata, fed)
        {
            secrets.delete(secret, &Default::default()).await?;
            changes.push(format!("deleted Secret {namespace}/{secret} in the hub"));
        }
    }
    Ok(changes)
}

/// The API server and CA (PEM) of `context` (default: the current one) in `kc`, as the hub is to reach them: the
/// CA inline or read from its file here, on the machine that runs join.
pub fn endpoint(kc: &kube::config::Kubeconfig, context: Option<&str>) -> anyhow::Result<(String, Option<Vec<u8>>)> {
    let name = context.or(kc.current_context.as_deref()).context("no context given and no current context")?;
    let ctx = kc.contexts.iter().find(|c| c.name == name).and_then(|c| c.context.as_ref());
    let ctx = ctx.with_context(|| format!("no context {name:?} in the kubeconfig"))?;
    let cluster = kc.clusters.iter().find(|c| c.name == ctx.cluster).and_then(|c| c.cluster.as_ref());
    let cluster = cluster.with_context(|| format!("context {name:?} names no cluster in the kubeconfig"))?;
    let server = cluster.server.clone().with_context(|| format!("cluster {:?} has no server", ctx.cluster))?;
    let ca = match (&cluster.certificate_authority_data, &cluster.certificate_authority) {
        (Some(data), _) => Some(serde_json::from_value::<ByteString>(Value::String(data.clone()))?.0),
        (None, Some(path)) => Some(std::fs::read(path).with_context(|| format!("reading the CA file {path}"))?),
        (None, None) => None,
    };
    Ok((server, ca))
}
