//! The hub's access to a member: exactly the permissions meshfed needs there, derived from the owned-kinds table
//! (every kind in its [`home_namespace`]) and the names the plan uses (the Istio namespace, the reader ClusterRole,
//! the reader ServiceAccount), and the objects `meshfed join` writes into a member to grant them: a ServiceAccount
//! for the hub in [`HUB_NAMESPACE`], one ClusterRole for what is cluster-wide, one Role per namespace for the rest.
//! `meshfed join` grants them, the README's table of member permissions is checked against them, and the end-to-end
//! suites reach every member with them, so a permission meshfed lacks fails a suite.
//!
//! Namespaced kinds are read, watched and written only in the namespaces meshfed writes them in (the Istio
//! namespace; `kube-system` for the claim): the hub never reads a Secret outside the Istio namespace. The reader
//! ClusterRole grants Istio's reader rules, cluster-wide Secrets among them, which the hub does not hold: Kubernetes
//! lets it write that role and its binding only with `escalate` and `bind`, which are granted on that one role's
//! name. A changed Istio namespace needs the hub's access there too: run `meshfed join` again with the new one
//! (it adds the Role there; the old one stays until `meshfed leave --istio-namespace <old>`), so meshfed can move
//! everything and prune the old namespace. In [`HUB_NAMESPACE`] the hub may only create tokens for its own
//! ServiceAccount (`resourceNames`): it renews its credential with them ([`crate::credential`]).

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        core::v1::{Namespace, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde_json::Value;

use crate::{
    federation::{FederationRef, label_value},
    kinds::{self, CLUSTER_ROLE, CLUSTER_ROLE_BINDING, CONFIG_MAP, NAMESPACE, OWNED_KINDS, OwnedKind},
    remote::{READER_SERVICE_ACCOUNT, federation_scoped_name, reader_cluster_role_name},
};

/// The member namespace that holds the hub's ServiceAccount.
pub const HUB_NAMESPACE: &str = "meshfed-system";
/// The prefix of the hub's ServiceAccount, ClusterRole, Roles and bindings in a member (see [`hub_identity_name`]).
pub const HUB_IDENTITY_PREFIX: &str = "meshfed-hub";
/// The label on everything `meshfed join` writes in a member, valued with the hub identity's name (as a label
/// value): `meshfed leave` removes only what carries it.
pub const JOIN_LABEL: &str = "meshfed.io/hub-access";

/// The name of the hub's ServiceAccount, ClusterRole, ClusterRoleBinding, Roles and RoleBindings in a member, for
/// federation `fed`: `meshfed-hub.<federation namespace>.<federation name>`, one federation's own.
pub fn hub_identity_name(fed: &FederationRef) -> String {
    federation_scoped_name(HUB_IDENTITY_PREFIX, fed)
}

/// The Kubernetes user the hub's ServiceAccount authenticates as.
pub fn hub_user(fed: &FederationRef) -> String {
    format!("system:serviceaccount:{HUB_NAMESPACE}:{}", hub_identity_name(fed))
}

/// One permission of the hub in a member: what, where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permission {
    /// The API group (`""` for the core group).
    pub group: &'static str,
    /// The resource (plural), or `resource/subresource`.
    pub resource: String,
    pub verbs: &'static [&'static str],
    /// The namespace it holds in; `None`: cluster-wide.
    pub namespace: Option<String>,
    /// Only these objects (`resourceNames`); empty: any.
    pub names: Vec<String>,
    pub why: &'static str,
    /// Whether meshfed fails without it, naming it in the member's condition; without one that is not required,
    /// meshfed skips what `why` says.
    pub required: bool,
}

const READ: &[&str] = &["get", "list", "watch"];
/// Server-side apply updates by `patch`, and an apply that creates the object also needs `create` (on its name);
/// prune and recreation delete.
const WRITE: &[&str] = &["create", "patch", "delete"];
const READ_WRITE: &[&str] = &["get", "list", "watch", "create", "patch", "delete"];
/// The claim is created (of two racing hubs one wins), never applied.
const CLAIM: &[&str] = &["get", "list", "watch", "create", "patch", "delete"];

/// What meshfed keeps of `kind` in a member.
fn objects_of(kind: &OwnedKind) -> &'static str {
    match kind.kind {
        "ConfigMap" => "the claim on the Istio namespace (read, watched, created, pruned)",
        "Namespace" => "the Istio namespace, labelled with its network (and kube-system read: the cluster's identity)",
        "ServiceAccount" => "the reader's and the east-west gateway's ServiceAccounts",
        "ClusterRole" => "the reader ClusterRole (Istio's reader rules)",
        "ClusterRoleBinding" => "the reader ClusterRoleBinding",
        "Role" | "RoleBinding" => "the east-west gateway's Role and RoleBinding (its certificates)",
        "Secret" => "`cacerts` and the remote secrets",
        "Service" => "the east-west gateway's Service (and its address)",
        "Deployment" => "the east-west gateway",
        "PodDisruptionBudget" => "the east-west gateway's PodDisruptionBudget",
        "Istio" => "the Sail `Istio` control plane (and its status)",
        "Gateway" if kind.group == kinds::KUBERNETES_GATEWAY.group => {
            "the ambient east-west gateway (a Gateway API Gateway, and its address)"
        }
        "Gateway" => "Istio Gateways `cross-network-gateway` and `istiod-gateway`",
        "IstioCNI" => "the Sail `IstioCNI` (ambient mode; and its status)",
        "ZTunnel" => "the Sail `ZTunnel` (ambient mode; and its status)",
        "VirtualService" => "Istio VirtualService `istiod-vs`",
        _ => "objects meshfed owns",
    }
}

/// Every permission the hub needs in a member whose Istio namespace is `istio_namespace`, for federation `fed`:
/// every owned kind read, watched and written where meshfed writes it (cluster-scoped kinds cluster-wide, their
/// writes limited to meshfed's own names where the plan fixes them), then what the plan needs besides.
pub fn member_permissions(fed: &FederationRef, istio_namespace: &str) -> Vec<Permission> {
    let reader_role = reader_cluster_role_name(fed);
    let permission = |kind: &OwnedKind, verbs, namespace: Option<&str>, names: Vec<String>| Permission {
        group: kind.group,
        resource: kind.plural.into(),
        verbs,
        namespace: namespace.map(Into::into),
        names,
        why: objects_of(kind),
        required: true,
    };
    let mut out = Vec::new();
    for kind in OWNED_KINDS {
        let named = match *kind {
            NAMESPACE => vec![istio_namespace.to_string()],
            CLUSTER_ROLE | CLUSTER_ROLE_BINDING => vec![reader_role.clone()],
            _ => Vec::new(),
        };
        match kinds::home_namespace(kind, istio_namespace) {
            Some(ns) => {
                out.push(permission(kind, if *kind == CONFIG_MAP { CLAIM } else { READ_WRITE }, Some(ns), named))
            }
            None if named.is_empty() => out.push(permission(kind, READ_WRITE, None, named)),
            None => {
                out.push(permission(kind, READ, None, Vec::new()));
                out.push(permission(kind, WRITE, None, named));
            }
        }
    }
    let published = kinds::published_roots_key(istio_namespace);
    out.extend([
        Permission {
            group: CLUSTER_ROLE.group,
            resource: CLUSTER_ROLE.plural.into(),
            verbs: &["escalate", "bind"],
            namespace: None,
            names: vec![reader_role],
            why: "to write the reader ClusterRole and bind it: it grants Istio's reader rules (every Secret among them), which the hub does not hold",
            required: true,
        },
        Permission {
            group: "",
            resource: "serviceaccounts/token".into(),
            verbs: &["create"],
            namespace: Some(istio_namespace.into()),
            names: vec![READER_SERVICE_ACCOUNT.into()],
            why: "the reader tokens in peers' remote secrets (TokenRequest)",
            required: true,
        },
        Permission {
            group: "",
            resource: "serviceaccounts/token".into(),
            verbs: &["create"],
            namespace: Some(HUB_NAMESPACE.into()),
            names: vec![hub_identity_name(fed)],
            why: "the hub's own token (TokenRequest): meshfed renews its credential for the member before it expires; without it the cluster reports `CredentialNotRenewed` once a third of the token's lifetime remains",
            required: false,
        },
        Permission {
            group: "",
            resource: CONFIG_MAP.plural.into(),
            verbs: &["get"],
            namespace: published.namespace,
            names: vec![published.name],
            why: "the roots istiod publishes to workloads: a root rotation waits for them",
            required: true,
        },
        Permission {
            group: "",
            resource: "nodes".into(),
            verbs: &["list"],
            namespace: None,
            names: Vec::new(),
            why: "the addresses of the nodes a NodePort or HostNetwork gateway runs on, and the pod ranges of clusters on one network",
            required: true,
        },
        Permission {
            group: "networking.k8s.io",
            resource: "servicecidrs".into(),
            verbs: &["list"],
            namespace: None,
            names: Vec::new(),
            why: "the service ranges of clusters on one network, which must not overlap; without it that check is skipped",
            required: false,
        },
        Permission {
            group: "apiextensions.k8s.io",
            resource: "customresourcedefinitions".into(),
            verbs: &["get"],
            namespace: None,
            names: vec![format!("{}.{}", kinds::ISTIO.plural, kinds::ISTIO.group)],
            why: "the Sail operator's `Istio` CRD: the Istio versions the member's Sail operator installs, and its default",
            required: true,
        },
    ]);
    out
}

/// Whether `permissions` let the hub `verb` `resource` of `group` named `name` in `namespace` (`None`: a
/// cluster-scoped object, or a request across all namespaces), as Kubernetes' RBAC decides.
pub fn allows(
    permissions: &[Permission],
    group: &str,
    resource: &str,
    verb: &str,
    namespace: Option<&str>,
    name: Option<&str>,
) -> bool {
    permissions.iter().any(|p| {
        p.group == group
            && p.resource == resource
            && p.verbs.contains(&verb)
            && (p.namespace.is_none() || p.namespace.as_deref() == namespace)
            && (p.names.is_empty() || name.is_some_and(|n| p.names.iter().any(|m| m == n)))
    })
}

/// The labels of everything `meshfed join` writes in a member for `fed`.
pub fn join_labels(fed: &FederationRef) -> BTreeMap<String, String> {
    BTreeMap::from([(JOIN_LABEL.to_string(), label_value(&hub_identity_name(fed)))])
}

/// The hub's access to a member as RBAC: a ClusterRole with the cluster-wide permissions and one Role per
/// namespace with the others, each bound to the hub's ServiceAccount.
#[derive(Debug, Clone, PartialEq)]
pub struct HubAccess {
    pub namespace: Namespace,
    pub service_account: ServiceAccount,
    pub cluster_role: ClusterRole,
    pub cluster_role_binding: ClusterRoleBinding,
    pub roles: Vec<(Role, RoleBinding)>,
}

/// The permissions of [`member_permissions`] for every one of `istio_namespaces` (a member moving from one Istio
/// namespace to another needs both until the move is done), each once: the cluster-wide ones that differ only in
/// the objects they name are one permission naming them all.
pub fn member_permissions_in(fed: &FederationRef, istio_namespaces: &[&str]) -> Vec<Permission> {
    let mut out: Vec<Permission> = Vec::new();
    for p in istio_namespaces.iter().flat_map(|ns| member_permissions(fed, ns)) {
        let same = |q: &&mut Permission| {
            (q.group, &q.resource, q.verbs, &q.namespace) == (p.group, &p.resource, p.verbs, &p.namespace)
                && q.names.is_empty() == p.names.is_empty()
        };
        match out.iter_mut().find(same) {
            Some(q) => {
                for n in p.names {
                    if !q.names.contains(&n) {
                        q.names.push(n);
                    }
                }
            }
            None => out.push(p),
        }
    }
    out
}

/// The hub's access to a member whose Istio namespace is one of `istio_namespaces`, for `fed`:
/// [`member_permissions_in`] as RBAC objects, labelled with [`join_labels`].
pub fn hub_access(fed: &FederationRef, istio_namespaces: &[&str]) -> HubAccess {
    let name = hub_identity_name(fed);
    let labels = join_labels(fed);
    let meta = |namespace: Option<&str>| ObjectMeta {
        name: Some(name.clone()),
        namespace: namespace.map(Into::into),
        labels: Some(labels.clone()),
        ..Default::default()
    };
    let permissions = member_permissions_in(fed, istio_namespaces);
    let rules = |namespace: Option<&str>| -> Vec<PolicyRule> {
        let strings = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        permissions
            .iter()
            .filter(|p| p.namespace.as_deref() == namespace)
            .map(|p| PolicyRule {
                api_groups: Some(vec![p.group.into()]),
                resources: Some(vec![p.resource.clone()]),
                verbs: strings(p.verbs),
                resource_names: (!p.names.is_empty()).then(|| p.names.clone()),
                ..Default::default()
            })
            .collect()
    };
    let subjects = Some(vec![Subject {
        kind: "ServiceAccount".into(),
        name: name.clone(),
        namespace: Some(HUB_NAMESPACE.into()),
        api_group: None,
    }]);
    let role_ref = |kind: &str| RoleRef { api_group: CLUSTER_ROLE.group.into(), kind: kind.into(), name: name.clone() };
    let mut namespaces: Vec<&str> = permissions.iter().filter_map(|p| p.namespace.as_deref()).collect();
    namespaces.sort();
    namespaces.dedup();
    let roles = namespaces
        .into_iter()
        .map(|ns| {
            let role = Role { metadata: meta(Some(ns)), rules: Some(rules(Some(ns))) };
            let binding =
                RoleBinding { metadata: meta(Some(ns)), role_ref: role_ref("Role"), subjects: subjects.clone() };
            (role, binding)
        })
        .collect();
    HubAccess {
        namespace: Namespace {
            metadata: ObjectMeta {
                name: Some(HUB_NAMESPACE.into()),
                labels: Some(labels.clone()),
                ..Default::default()
            },
            ..Default::default()
        },
        service_account: ServiceAccount {
            metadata: meta(Some(HUB_NAMESPACE)),
            automount_service_account_token: Some(false),
            ..Default::default()
        },
        cluster_role: ClusterRole { metadata: meta(None), rules: Some(rules(None)), ..Default::default() },
        cluster_role_binding: ClusterRoleBinding {
            metadata: meta(None),
            role_ref: role_ref("ClusterRole"),
            subjects: subjects.clone(),
        },
        roles,
    }
}

impl HubAccess {
    /// Every object, as JSON with `apiVersion` and `kind`, in the order to create them (namespaces first; the
    /// Istio namespace, which the plan's Roles live in, is written by join only where it is missing).
    pub fn objects(&self) -> Vec<Value> {
        let json = |v: Value, api_version: &str, kind: &str| {
            let mut v = v;
            v["apiVersion"] = api_version.into();
            v["kind"] = kind.into();
            v
        };
        let rbac = "rbac.authorization.k8s.io/v1";
        let mut out = vec![
            json(serde_json::to_value(&self.namespace).unwrap_or_default(), "v1", "Namespace"),
            json(serde_json::to_value(&self.service_account).unwrap_or_default(), "v1", "ServiceAccount"),
            json(serde_json::to_value(&self.cluster_role).unwrap_or_default(), rbac, "ClusterRole"),
            json(serde_json::to_value(&self.cluster_role_binding).unwrap_or_default(), rbac, "ClusterRoleBinding"),
        ];
        for (role, binding) in &self.roles {
            out.push(json(serde_json::to_value(role).unwrap_or_default(), rbac, "Role"));
            out.push(json(serde_json::to_value(binding).unwrap_or_default(), rbac, "RoleBinding"));
        }
        out
    }
}

/// The README's table of the hub's permissions in a member (Markdown), for a federation `<ns>/<name>` and Istio
/// namespace `<istio namespace>`: a test checks that the README holds exactly this.
pub fn permissions_table() -> String {
    let fed = FederationRef { namespace: "<ns>".into(), name: "<name>".into() };
    let mut out = String::from("| Resource | Verbs | Where | Only | Why |\n|---|---|---|---|---|\n");
    for p in member_permissions(&fed, "<istio namespace>") {
        let resource = if p.group.is_empty() { p.resource.clone() } else { format!("{}.{}", p.resource, p.group) };
        let names = p.names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
        let why = if p.required { p.why.to_string() } else { format!("{} (optional)", p.why) };
        out.push_str(&format!(
            "| `{resource}` | {} | {} | {} | {why} |\n",
            p.verbs.join(", "),
            p.namespace.as_deref().map_or("cluster-wide".into(), |ns| format!("`{ns}`")),
            if names.is_empty() { "any".into() } else { names },
        ));
    }
    out
}

/// The kubeconfig the hub reaches member `cluster` with: its API server `server`, its CA (PEM) and `token` (of the
/// hub's ServiceAccount), all inline, as [`crate::kubeconfig::check`] accepts.
pub fn hub_kubeconfig(cluster: &str, server: &str, ca_pem: Option<&[u8]>, token: &str) -> String {
    use base64::Engine as _;
    let mut entry = serde_json::json!({"server": server});
    if let Some(ca) = ca_pem {
        entry["certificate-authority-data"] = base64::engine::general_purpose::STANDARD.encode(ca).into();
    }
    let user = format!("{HUB_IDENTITY_PREFIX}@{cluster}");
    let kubeconfig = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster, "cluster": entry}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": cluster, "context": {"cluster": cluster, "user": user}}],
        "current-context": cluster,
    });
    serde_saphyr::to_string(&kubeconfig).unwrap_or_default()
}

/// Whether the hub's kubeconfig `yaml` for a member still serves as [`hub_kubeconfig`] would write it for `fed` at
/// `now`: the same server and CA, a token of the hub's ServiceAccount that [`crate::remote::token_needs_refresh`]
/// does not ask to replace for a lifetime of `ttl`. `meshfed join` then leaves the hub's Secret as it is.
pub fn hub_kubeconfig_current(
    yaml: &str,
    server: &str,
    ca_pem: Option<&[u8]>,
    fed: &FederationRef,
    ttl: std::time::Duration,
    now: jiff::Timestamp,
) -> bool {
    use base64::Engine as _;
    let Ok((kc, current_server)) = crate::kubeconfig::check(yaml) else { return false };
    let ca = kc.clusters.first().and_then(|c| c.cluster.as_ref()?.certificate_authority_data.clone());
    let expected_ca = ca_pem.map(|ca| base64::engine::general_purpose::STANDARD.encode(ca));
    let token = crate::remote::token_in_kubeconfig(yaml.as_bytes());
    let Some(claims) = token.and_then(|t| crate::remote::token_claims(&t).ok()) else { return false };
    current_server == server
        && ca == expected_ca
        && claims.subject.as_deref() == Some(hub_user(fed).as_str())
        && !crate::remote::token_needs_refresh(claims.issued_at, claims.expires_at, ttl, now)
}

#[cfg(test)]
#[path = "access_tests.rs"]
mod tests;
