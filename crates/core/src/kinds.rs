//! The one table of kinds meshfed owns in members, and the keys of the objects it reads and writes by name.
//! Observation, apply, prune, watches, metrics, the member permissions and the tests' end state all follow this table:
//! a new member-side kind is one entry here and one planning rule in [`crate::member`].

use std::{collections::BTreeMap, sync::Arc};

use serde_json::Value;

use crate::{istio, pki};

/// A kind of object meshfed writes in members: its API coordinates and scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OwnedKind {
    /// The API group (`""` for the core group).
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    /// The resource name in URLs.
    pub plural: &'static str,
    pub namespaced: bool,
}

impl OwnedKind {
    /// `group/version`, or `version` for the core group, as in an object's `apiVersion`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.into() } else { format!("{}/{}", self.group, self.version) }
    }
}

const fn kind(group: &'static str, version: &'static str, kind: &'static str, plural: &'static str) -> OwnedKind {
    OwnedKind { group, version, kind, plural, namespaced: true }
}

const fn cluster_scoped(mut k: OwnedKind) -> OwnedKind {
    k.namespaced = false;
    k
}

pub const CONFIG_MAP: OwnedKind = kind("", "v1", "ConfigMap", "configmaps");
pub const NAMESPACE: OwnedKind = cluster_scoped(kind("", "v1", "Namespace", "namespaces"));
pub const SERVICE_ACCOUNT: OwnedKind = kind("", "v1", "ServiceAccount", "serviceaccounts");
pub const CLUSTER_ROLE: OwnedKind =
    cluster_scoped(kind("rbac.authorization.k8s.io", "v1", "ClusterRole", "clusterroles"));
pub const CLUSTER_ROLE_BINDING: OwnedKind =
    cluster_scoped(kind("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding", "clusterrolebindings"));
pub const SECRET: OwnedKind = kind("", "v1", "Secret", "secrets");
pub const ROLE: OwnedKind = kind("rbac.authorization.k8s.io", "v1", "Role", "roles");
pub const ROLE_BINDING: OwnedKind = kind("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings");
pub const SERVICE: OwnedKind = kind("", "v1", "Service", "services");
pub const DEPLOYMENT: OwnedKind = kind("apps", "v1", "Deployment", "deployments");
pub const POD_DISRUPTION_BUDGET: OwnedKind = kind("policy", "v1", "PodDisruptionBudget", "poddisruptionbudgets");
/// The Sail operator's Istio control plane (a CRD).
pub const ISTIO: OwnedKind = cluster_scoped(kind("sailoperator.io", "v1", "Istio", "istios"));
/// Istio's Gateway and VirtualService (CRDs, installed with Istio).
pub const GATEWAY: OwnedKind = kind("networking.istio.io", "v1", "Gateway", "gateways");
pub const VIRTUAL_SERVICE: OwnedKind = kind("networking.istio.io", "v1", "VirtualService", "virtualservices");
/// The Sail operator's ambient data plane (CRDs): the CNI node agent and ztunnel, in ambient mode.
pub const ISTIO_CNI: OwnedKind = cluster_scoped(kind("sailoperator.io", "v1", "IstioCNI", "istiocnis"));
pub const ZTUNNEL: OwnedKind = cluster_scoped(kind("sailoperator.io", "v1", "ZTunnel", "ztunnels"));
/// The Gateway API's Gateway (a CRD): the ambient east-west gateway, which istiod deploys.
pub const KUBERNETES_GATEWAY: OwnedKind = kind("gateway.networking.k8s.io", "v1", "Gateway", "gateways");

/// Every kind meshfed writes in a member, in the order it applies them; prune and cleanup go in reverse, so the
/// claim (a ConfigMap) is taken first and given back last, a namespace goes after what it holds, and the Istio
/// configuration goes before the control plane that serves it.
pub const OWNED_KINDS: &[OwnedKind] = &[
    CONFIG_MAP,
    NAMESPACE,
    SERVICE_ACCOUNT,
    CLUSTER_ROLE,
    CLUSTER_ROLE_BINDING,
    ROLE,
    ROLE_BINDING,
    SECRET,
    SERVICE,
    DEPLOYMENT,
    POD_DISRUPTION_BUDGET,
    ISTIO,
    ISTIO_CNI,
    ZTUNNEL,
    GATEWAY,
    VIRTUAL_SERVICE,
    KUBERNETES_GATEWAY,
];

/// The owned kind and key of an object given as JSON with its `apiVersion` and `kind`, if its kind is owned.
pub fn key_of(object: &Value) -> Option<ObjectKey> {
    let kind = *OWNED_KINDS.iter().find(|k| object["apiVersion"] == k.api_version() && object["kind"] == k.kind)?;
    Some(ObjectKey::of(kind, object))
}

/// Identifies one object in a member.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: OwnedKind,
    pub namespace: Option<String>,
    pub name: String,
}

impl ObjectKey {
    /// The key of an object of `kind` given as JSON: its metadata's namespace and name.
    pub fn of(kind: OwnedKind, object: &Value) -> Self {
        let meta = |field: &str| object["metadata"][field].as_str().map(String::from);
        Self { kind, namespace: meta("namespace"), name: meta("name").unwrap_or_default() }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind.kind, self.name),
            None => write!(f, "{} {}", self.kind.kind, self.name),
        }
    }
}

/// The Secret key of a remote secret held in `namespace` for `target`.
pub fn remote_secret_key(namespace: &str, target: &str) -> ObjectKey {
    ObjectKey { kind: SECRET, namespace: Some(namespace.into()), name: istio::remote_secret_name(target) }
}

/// The key of a member's `cacerts` in `namespace`.
pub fn cacerts_key(namespace: &str) -> ObjectKey {
    ObjectKey { kind: SECRET, namespace: Some(namespace.into()), name: pki::CACERTS_SECRET.into() }
}

/// The ConfigMap in which istiod publishes the roots workloads trust (`root-cert.pem`), in the Istio namespace;
/// read, never written.
pub fn published_roots_key(namespace: &str) -> ObjectKey {
    ObjectKey { kind: CONFIG_MAP, namespace: Some(namespace.into()), name: "istio-ca-root-cert".into() }
}

/// The key of a member's Sail `Istio` of `revision`.
pub fn istio_key(revision: &str) -> ObjectKey {
    ObjectKey { kind: ISTIO, namespace: None, name: revision.into() }
}

/// The name of the Sail `IstioCNI` and `ZTunnel` singletons.
pub const AMBIENT_SINGLETON: &str = "default";

/// The key of the ambient east-west gateway (a Gateway API `Gateway`) in `namespace`.
pub fn ambient_gateway_key(namespace: &str) -> ObjectKey {
    ObjectKey {
        kind: KUBERNETES_GATEWAY,
        namespace: Some(namespace.into()),
        name: crate::gateway::AMBIENT_GATEWAY_NAME.into(),
    }
}

/// The key of the Istio namespace `namespace`.
pub fn namespace_key(namespace: &str) -> ObjectKey {
    ObjectKey { kind: NAMESPACE, namespace: None, name: namespace.into() }
}

/// Where claims live: a namespace every cluster has.
pub const CLAIM_NAMESPACE: &str = "kube-system";

/// The claim on a member's Istio namespace `namespace`: ConfigMap `meshfed-claim.<namespace>` in `kube-system`.
pub fn claim_key(namespace: &str) -> ObjectKey {
    ObjectKey { kind: CONFIG_MAP, namespace: Some(CLAIM_NAMESPACE.into()), name: format!("meshfed-claim.{namespace}") }
}

/// Where meshfed writes the objects of `kind` in a member whose Istio namespace is `istio_namespace`: `None` for a
/// cluster-scoped kind, [`CLAIM_NAMESPACE`] for ConfigMaps (the claim), the Istio namespace for every other kind.
/// The member's watches, its reads and the hub's permissions there ([`crate::access`]) are scoped by it.
pub fn home_namespace<'a>(kind: &OwnedKind, istio_namespace: &'a str) -> Option<&'a str> {
    match *kind {
        _ if !kind.namespaced => None,
        CONFIG_MAP => Some(CLAIM_NAMESPACE),
        _ => Some(istio_namespace),
    }
}

/// What a member holds, by key, as JSON (shared with the member's watch caches): everything labelled for one
/// federation and cluster, and the objects read by name whatever their labels (the Istio namespace and `cacerts`,
/// which may predate meshfed, the claim, the `Istio`).
pub type Holdings = BTreeMap<ObjectKey, Arc<Value>>;

/// A held object as its typed form, if the member holds it.
pub fn typed<K: serde::de::DeserializeOwned>(held: &Holdings, key: &ObjectKey) -> Option<K> {
    held.get(key).and_then(|v| K::deserialize(v.as_ref()).ok())
}
