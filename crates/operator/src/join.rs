//! `meshfed join` and `meshfed leave`, the IO half of `meshfed_core::access`: the hub's access to a member, granted
//! as the member's ServiceAccount for the hub with exactly [`access::member_permissions`], and the hub's kubeconfig
//! Secret holding a token of it from the TokenRequest API. Every write is a server-side apply (field manager
//! `meshfed-join`) or a create of what is missing, so running join twice changes nothing; leave removes only what
//! carries join's label.

use std::{collections::BTreeSet, time::Duration};

use anyhow::Context as _;
use jiff::Timestamp;
use k8s_openapi::{
    ByteString,
    api::{
        core::v1::{Namespace, Secret, ServiceAccount},
        rbac::v1::Role,
    },
};
use kube::{
    Api, Client, ResourceExt,
    api::{DynamicObject, ListParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use meshfed_core::{
    access::{self, HUB_NAMESPACE, JOIN_LABEL},
    federation::{ANNOTATION_CREATED, FIELD_MANAGER as MESHFED, FederationRef, MANAGED_BY},
    kinds::CLAIM_NAMESPACE,
    kubeconfig,
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

/// The Istio namespace as join creates it where it is missing (the hub's Role lives in it): labelled as join's, and
/// marked as meshfed marks a namespace it creates, so that the federation's cleanup deletes it as before (a member
/// that joins again after that gets its Role back from `meshfed join`).
pub fn missing_istio_namespace(fed: &FederationRef, name: &str) -> Value {
    let labels = access::join_labels(fed);
    serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": name, "labels": labels, "annotations": {ANNOTATION_CREATED: "true"}}})
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
    // A member that moves its Istio namespace keeps the hub's access to the one it leaves until that is gone.
    let mut istio_namespaces = joined_istio_namespaces(member, fed).await?;
    istio_namespaces.insert(istio_namespace.to_string());
    let istio_namespaces: Vec<&str> = istio_namespaces.iter().map(String::as_str).collect();
    for object in access::hub_access(fed, &istio_namespaces).objects() {
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

/// The Istio namespaces where `member` holds a Role of join's for `fed` (not yet deleted; not those of the claim and
/// of the hub's own ServiceAccount).
async fn joined_istio_namespaces(member: &Client, fed: &FederationRef) -> anyhow::Result<BTreeSet<String>> {
    let labels = access::join_labels(fed);
    let selector: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let roles = Api::<Role>::all(member.clone()).list(&ListParams::default().labels(&selector.join(","))).await?;
    Ok(roles
        .items
        .into_iter()
        .filter(|r| r.metadata.deletion_timestamp.is_none())
        .filter_map(|r| r.metadata.namespace)
        .filter(|ns| ns != CLAIM_NAMESPACE && ns != HUB_NAMESPACE)
        .collect())
}

/// A token of the hub's ServiceAccount in `member` for `fed`, from the TokenRequest API, asking for `ttl`.
pub async fn hub_token(member: &Client, fed: &FederationRef, ttl: Duration) -> anyhow::Result<String> {
    let name = access::hub_identity_name(fed);
    let token = crate::credential::service_account_token(member, HUB_NAMESPACE, &name, ttl).await?;
    Ok(token.expose().to_string())
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
    if let Some(s) = &existing {
        if !joined(&s.metadata, &join.federation) {
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
            labels: Some(access::join_labels(&join.federation)),
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
    let mut istio_namespaces = joined_istio_namespaces(member, fed).await?;
    istio_namespaces.insert(istio_namespace.to_string());
    let istio_namespaces: Vec<&str> = istio_namespaces.iter().map(String::as_str).collect();
    let mut objects = access::hub_access(fed, &istio_namespaces).objects();
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

/// What `meshfed join` and `meshfed leave` are asked.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// The member's name in the federation (`clusters[].name`).
    pub cluster: String,
    /// The kubeconfig (default: `$KUBECONFIG` or `~/.kube/config`), the member's context in it, and the hub's
    /// (default: the current context).
    pub kubeconfig: Option<std::path::PathBuf>,
    pub context: String,
    pub hub_context: Option<String>,
    /// The federation's namespace in the hub (default: the hub context's namespace) and name (default: the only
    /// federation there).
    pub namespace: Option<String>,
    pub federation: Option<String>,
    /// The Istio namespace (default: the federation's, else `istio-system`).
    pub istio_namespace: Option<String>,
    pub network: Option<String>,
    pub role: Option<String>,
    pub control_plane: Option<String>,
    /// How the hub reaches the member's API server (default: the member context's server).
    pub server: Option<String>,
    pub token_ttl: Duration,
    /// Print what join would write, as YAML for GitOps, instead of writing it.
    pub dry_run: bool,
}

/// The clients and names a request resolves to.
struct Resolved {
    hub: Client,
    member: Client,
    namespace: String,
    join: Join,
}

async fn client_for(kc: &kube::config::Kubeconfig, context: Option<&str>) -> anyhow::Result<Client> {
    let options = kube::config::KubeConfigOptions { context: context.map(Into::into), ..Default::default() };
    let config = kube::Config::from_custom_kubeconfig(kc.clone(), &options)
        .await
        .with_context(|| format!("the kubeconfig's context {}", context.unwrap_or("(current)")))?;
    Ok(Client::try_from(config)?)
}

async fn resolve(r: &Request) -> anyhow::Result<Resolved> {
    let kc = match &r.kubeconfig {
        Some(path) => kube::config::Kubeconfig::read_from(path)?,
        None => kube::config::Kubeconfig::read()?,
    };
    let (member, hub) = (client_for(&kc, Some(&r.context)).await?, client_for(&kc, r.hub_context.as_deref()).await?);
    let namespace = r.namespace.clone().unwrap_or_else(|| hub.default_namespace().to_string());
    let feds: Api<meshfed_api::MeshFederation> = Api::namespaced(hub.clone(), &namespace);
    let fed = match &r.federation {
        Some(name) => feds.get_opt(name).await?,
        None => match &feds.list(&Default::default()).await?.items[..] {
            [only] => Some(only.clone()),
            found => anyhow::bail!(
                "{} federations in namespace {namespace} of the hub: name one with --federation",
                found.len()
            ),
        },
    };
    let name = r.federation.clone().or_else(|| fed.as_ref()?.metadata.name.clone()).unwrap_or_default();
    let istio_namespace = match (&fed, &r.istio_namespace) {
        (Some(f), Some(asked)) if f.spec.istio.namespace != *asked => {
            anyhow::bail!("federation {namespace}/{name} has Istio namespace {}, not {asked}", f.spec.istio.namespace)
        }
        (Some(f), _) => f.spec.istio.namespace.clone(),
        (None, asked) => asked.clone().unwrap_or_else(|| "istio-system".into()),
    };
    let (context_server, ca_pem) = endpoint(&kc, Some(&r.context))?;
    let join = Join {
        federation: FederationRef { namespace: namespace.clone(), name },
        cluster: r.cluster.clone(),
        istio_namespace,
        server: r.server.clone().unwrap_or(context_server),
        ca_pem,
        token_ttl: r.token_ttl,
    };
    Ok(Resolved { hub, member, namespace, join })
}

/// The `clusters[]` entry that names the joined member, as YAML.
fn cluster_entry(r: &Request, join: &Join) -> String {
    let mut entry = format!("- name: {}\n  network: {}\n", join.cluster, r.network.as_deref().unwrap_or(&join.cluster));
    if let Some(role) = &r.role {
        entry.push_str(&format!("  role: {role}\n"));
    }
    if let Some(p) = &r.control_plane {
        entry.push_str(&format!("  controlPlane: {p}\n"));
    }
    entry.push_str(&format!("  kubeconfigSecretRef: {{name: {}}}\n", join.secret_name()));
    entry
}

/// `meshfed join`: what it did (or, with `dry_run`, the YAML it would write), and the `clusters[]` entry to add.
pub async fn run_join(r: &Request) -> anyhow::Result<String> {
    if r.role.as_deref() == Some("Remote") && r.control_plane.is_none() {
        anyhow::bail!("a Remote needs --control-plane, the Primary that serves it");
    }
    let Resolved { hub, member, namespace, join } = resolve(r).await?;
    let entry = cluster_entry(r, &join);
    let fed = &join.federation;
    if r.dry_run {
        let mut out = format!(
            "# meshfed join {} (dry run): apply the member side to the member, the hub side to the hub.\n",
            join.cluster
        );
        // The Istio namespace plain: applied where one exists, it is left as it is, and meshfed never deletes it.
        let istio_ns =
            serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": join.istio_namespace}});
        let mut member_side = vec![istio_ns];
        member_side.extend(access::hub_access(fed, &[&join.istio_namespace]).objects());
        for object in member_side {
            out.push_str(&format!("---\n# member cluster: {}\n{}", join.cluster, serde_saphyr::to_string(&object)?));
        }
        let yaml = access::hub_kubeconfig(&join.cluster, &join.server, join.ca_pem.as_deref(), "<TOKEN>");
        let secret = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": join.secret_name(), "namespace": namespace, "labels": access::join_labels(fed)},
            "stringData": {SECRET_KEY: yaml},
        });
        out.push_str(&format!(
            "---\n# hub: replace <TOKEN> with `kubectl --context {} -n {HUB_NAMESPACE} create token {} --duration {}s`\n{}",
            r.context,
            access::hub_identity_name(fed),
            join.token_ttl.as_secs(),
            serde_saphyr::to_string(&secret)?
        ));
        out.push_str(&format!("# add to spec.clusters of MeshFederation {fed}:\n# {}", entry.replace('\n', "\n# ")));
        return Ok(out.trim_end_matches("# ").to_string());
    }
    let changes = self::join(&hub, &namespace, &member, &join, Timestamp::now()).await?;
    let mut out = String::new();
    if changes.is_empty() {
        out.push_str("nothing to change: the member grants the hub's access and the hub's Secret serves\n");
    }
    for c in changes {
        out.push_str(&format!("{c}\n"));
    }
    out.push_str(&format!("add to spec.clusters of MeshFederation {fed}:\n{entry}"));
    Ok(out)
}

/// `meshfed leave`: removes what join wrote for the member and the federation.
pub async fn run_leave(r: &Request) -> anyhow::Result<String> {
    let Resolved { hub, member, namespace, join } = resolve(r).await?;
    let secret = join.secret_name();
    let changes = leave(Some((&hub, &namespace, &secret)), &member, &join.federation, &join.istio_namespace).await?;
    if changes.is_empty() {
        return Ok("nothing to remove\n".into());
    }
    Ok(changes.into_iter().map(|c| format!("{c}\n")).collect())
}
