//! The `MeshFederation` custom resource (`meshfed.io/v1alpha1`).
//!
//! The doc comments on these types are the user documentation that `kubectl explain` shows. Everything a schema can
//! check is a CEL rule here; what needs the whole object (unique names, references between clusters, durations) is
//! checked by `meshfed-core` and reported as the `Valid` condition.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema, core::Rule};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of every meshfed resource.
pub const GROUP: &str = "meshfed.io";

/// A mesh federation: one Istio mesh spread over several Kubernetes clusters, described once in the hub cluster.
///
/// meshfed makes every member cluster match it: a shared root CA and one intermediate CA per cluster, network
/// labels, east-west gateways, remote secrets with short-lived tokens, and a Sail operator `Istio` resource per
/// cluster. The topology (multi-primary or primary-remote, on one network or several) follows from the clusters'
/// roles and networks.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "meshfed.io",
    version = "v1alpha1",
    kind = "MeshFederation",
    plural = "meshfederations",
    shortname = "meshfed",
    shortname = "mf",
    namespaced,
    status = "MeshFederationStatus",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Topology","type":"string","jsonPath":".status.topology"}"#,
    printcolumn = r#"{"name":"Clusters","type":"string","description":"Members that are reachable and converged, of all members","jsonPath":".status.readyClusters"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MeshFederationSpec {
    /// The mesh ID shared by every member (Istio `values.global.meshID`). Example: `prod`.
    #[serde(rename = "meshID")]
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub mesh_id: String,

    /// How Istio is installed in every member.
    #[serde(default)]
    pub istio: IstioSpec,

    /// The mesh's trust: the shared root CA and the intermediate CA issued to every member.
    pub trust: TrustSpec,

    /// How workloads join the mesh, in every member. `Sidecar` (the default): an Envoy sidecar per pod, east-west
    /// gateways meshfed deploys. `Ambient`: no sidecars; every member runs Istio's ambient data plane (the Sail
    /// `IstioCNI` and `ZTunnel`, both named `default`, in the Istio namespace), its `Istio` has `profile: ambient` with
    /// `AMBIENT_ENABLE_MULTI_NETWORK`, and its east-west gateway is a Gateway API `Gateway` of class `istio-east-west`
    /// (HBONE on port 15008) that istiod deploys and exposes as a LoadBalancer. Ambient needs the Gateway API's CRDs in
    /// every member, every cluster a `Primary`, the clusters on more than one network, an east-west gateway exposed as
    /// `LoadBalancer`, and Istio 1.29 or later (upstream supports ambient multicluster only as multi-primary on several
    /// networks, Beta since 1.29); anything else is refused. Services cross clusters only when labelled
    /// `istio.io/global: "true"`. Changing it switches every member: the old mode's objects are removed and the new
    /// mode's written.
    #[serde(default)]
    pub data_plane: DataPlane,

    /// How istiod in one member reads the API of another (the remote secrets).
    #[serde(default)]
    pub remote_access: RemoteAccessSpec,

    /// The member clusters. Each name is the Istio cluster ID and must be unique in the federation.
    #[x_kube(validation = Rule::new("size(self) >= 1").message("a federation needs at least one cluster"))]
    #[x_kube(validation = Rule::new("self.exists(c, c.role == 'Primary')").message("at least one cluster must be a Primary"))]
    #[schemars(length(max = 100))]
    pub clusters: Vec<ClusterSpec>,

    /// What meshfed does with an object it would write in a member that is already there and that it did not
    /// create (a mesh built by hand or with `istioctl`: `cacerts`, remote secrets, the `Istio`, the east-west
    /// gateway). `Report` (the default): the object is left alone, the member reports `ObjectNotOwned` naming it, and
    /// nothing is written to that member. `Adopt`: meshfed takes such objects over: it labels them for this
    /// federation, marks them `meshfed.io/adopted`, converges them to the plan and names what it changed in an
    /// `Adopted` Event; from then on they are meshfed's (see `deletionPolicy`). A `cacerts` is kept when its
    /// intermediate is valid under the federation's root, else reissued from it. The Istio namespace is labelled,
    /// never adopted: it is deleted only if meshfed created it. Run `meshfed check` first: it lists what adoption
    /// would take over and change.
    #[serde(default)]
    pub existing_objects: ExistingObjects,

    /// What deleting the federation, or removing a cluster from `clusters`, does in that member. `Delete` (the
    /// default): everything meshfed created or adopted there is deleted (the control plane with it); the Istio
    /// namespace only if meshfed created it. `Orphan`: the member is let go as it runs: meshfed removes its labels
    /// and annotations and gives back its claim, and every object (`cacerts`, remote secrets, the gateway, the
    /// `Istio` and its istiod) stays exactly as it is; the remote secrets' tokens are no longer refreshed and expire
    /// after `remoteAccess.tokenTTL`. On deletion, a generated root's Secret is kept in the hub too (no longer owned
    /// by the federation), so that a new federation can bring it as `trust.root.secretRef` and adopt the mesh.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// How workloads join the mesh.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DataPlane {
    /// An Envoy sidecar in every pod (Istio's classic data plane).
    #[default]
    Sidecar,
    /// Istio's ambient mode: a ztunnel per node, no sidecars.
    Ambient,
}

/// What meshfed does with an object it would write that it did not create.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExistingObjects {
    /// Leave it alone and report it (`ObjectNotOwned`); nothing is written to that member.
    #[default]
    Report,
    /// Take it over: label it for the federation and converge it to the plan.
    Adopt,
}

/// What leaving a member does there.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeletionPolicy {
    /// Delete what meshfed created or adopted.
    #[default]
    Delete,
    /// Leave everything running; remove only meshfed's labels, annotations and claim.
    Orphan,
}

/// How Istio is installed in every member cluster.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IstioSpec {
    /// The namespace Istio lives in, in every member. meshfed creates it when missing, labels it with the
    /// cluster's network and writes `cacerts`, the east-west gateway and RBAC into it, so it may not be a namespace
    /// of Kubernetes itself (`default`, `kube-system`, `kube-public`, `kube-node-lease`). Default: `istio-system`.
    #[serde(default = "default_istio_namespace")]
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    #[x_kube(validation = not_a_system_namespace())]
    pub namespace: String,

    /// The Istio revision of the federation's control plane: the name of the Sail `Istio` resource in every member.
    /// `default` (the default) keeps the usual injection label `istio-injection=enabled` working; with another
    /// revision, workloads (and the east-west gateway) select the control plane with the label `istio.io/rev:
    /// <revision>` and istiod's Service is `istiod-<revision>`. Federations that share a cluster (each in its own
    /// Istio namespace) need different revisions, and each its own `meshConfig.discoverySelectors` in `values`.
    /// Changing it replaces the control plane in every member, as a changed namespace does. At most 56 characters,
    /// so that `istiod-<revision>` is a Service name (at most 63).
    #[serde(default = "default_revision")]
    #[schemars(length(min = 1, max = MAX_REVISION_LEN), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub revision: String,

    /// The Istio version written into each member's Sail `Istio` resource, for example `v1.30.3` or `v1.30-latest`:
    /// one that every member's Sail operator accepts (a member whose Sail operator does not is refused with
    /// `IstioVersionNotAccepted`, and nothing is written there). Unset: each Sail operator's default. On a version
    /// before 1.30.4 (1.30 line) or 1.31.0, meshfed restarts a Primary's istiod after its remote secrets changed
    /// (Istio defects #60612, #61043, #60920).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,

    /// Free-form Istio values (the Sail `Istio` resource's `spec.values`), merged under the values meshfed computes
    /// (meshID, cluster name, network, remote settings): where both set a key, meshfed's wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_unknown_object")]
    pub values: Option<serde_json::Value>,
}

impl Default for IstioSpec {
    fn default() -> Self {
        Self { namespace: default_istio_namespace(), revision: default_revision(), version: None, values: None }
    }
}

/// The namespaces of Kubernetes itself, in every cluster: none of them can be a federation's Istio namespace.
pub const SYSTEM_NAMESPACES: [&str; 4] = ["default", "kube-system", "kube-public", "kube-node-lease"];

/// The longest `istio.revision`: istiod's Service is `istiod-<revision>`, and a Service name has at most 63
/// characters.
pub const MAX_REVISION_LEN: usize = 63 - "istiod-".len();

fn not_a_system_namespace() -> Rule {
    let names = SYSTEM_NAMESPACES.map(|n| format!("'{n}'")).join(", ");
    Rule::new(format!("!(self in [{names}])")).message(
        "istio.namespace may not be a namespace of Kubernetes itself; use a namespace of its own, such as istio-system",
    )
}

fn default_istio_namespace() -> String {
    "istio-system".into()
}

fn default_revision() -> String {
    "default".into()
}

/// The mesh's trust: one shared root, one intermediate CA per member (Istio's plugged-in CA, Secret `cacerts`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrustSpec {
    /// Where the root CA comes from: set exactly one of `generate` and `secretRef`.
    pub root: RootSpec,

    /// The intermediate CA that meshfed issues to every member from the root.
    #[serde(default)]
    pub intermediate: IntermediateSpec,

    /// The longest lifetime of the workload certificates istiod issues (Istio's `DEFAULT_WORKLOAD_CERT_TTL`, 24h
    /// unless you changed it), as a duration such as `24h` (the default). During a root rotation meshfed drops the
    /// old root only this long (plus five minutes) after every member got its intermediate from the new root, so
    /// that no workload still presents a certificate that chains to the old root.
    #[serde(default = "default_workload_certificate_ttl", rename = "workloadCertificateTTL")]
    pub workload_certificate_ttl: String,
}

fn default_workload_certificate_ttl() -> String {
    "24h".into()
}

/// The root CA's source: exactly one of `generate` and `secretRef`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.generate) != has(self.secretRef)").message("set exactly one of trust.root.generate and trust.root.secretRef"))]
pub struct RootSpec {
    /// meshfed generates the root once and keeps it in a Secret in the federation's namespace. It never replaces
    /// that root by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate: Option<GeneratedRoot>,

    /// A root CA you bring: a Secret in the federation's namespace with `tls.crt`/`tls.key` or
    /// `ca-cert.pem`/`ca-key.pem`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
}

/// A root CA that meshfed generates.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GeneratedRoot {
    /// The key algorithm. Default: `ECDSAP256`.
    #[serde(default)]
    pub algorithm: KeyAlgorithm,

    /// How long the root is valid, as a duration such as `87600h` (10 years, the default) or `8760h 30m`.
    #[serde(default = "default_root_validity")]
    pub validity: String,
}

fn default_root_validity() -> String {
    "87600h".into()
}

/// The intermediate CA issued to every member.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IntermediateSpec {
    /// The key algorithm. Default: `ECDSAP256`.
    #[serde(default)]
    pub algorithm: KeyAlgorithm,

    /// How long an intermediate is valid, as a duration such as `8760h` (1 year, the default).
    #[serde(default = "default_intermediate_validity")]
    pub validity: String,

    /// How long before its expiry an intermediate is reissued, as a duration such as `720h` (30 days, the
    /// default). Must be shorter than `validity` and at least `10m`.
    #[serde(default = "default_renew_before")]
    pub renew_before: String,
}

impl Default for IntermediateSpec {
    fn default() -> Self {
        Self {
            algorithm: KeyAlgorithm::default(),
            validity: default_intermediate_validity(),
            renew_before: default_renew_before(),
        }
    }
}

fn default_intermediate_validity() -> String {
    "8760h".into()
}

fn default_renew_before() -> String {
    "720h".into()
}

/// A key algorithm for a CA.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeyAlgorithm {
    /// ECDSA on the NIST P-256 curve.
    #[default]
    ECDSAP256,
    /// RSA with a 2048-bit modulus.
    RSA2048,
    /// RSA with a 4096-bit modulus (Istio's reference tooling).
    RSA4096,
}

/// How istiod in one member reads the API of another.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RemoteAccessSpec {
    /// Lifetime of the reader tokens that meshfed puts into remote secrets, as a duration such as `24h` (the
    /// default; at least `10m`). meshfed requests a new token when a third of the lifetime remains.
    #[serde(default = "default_token_ttl", rename = "tokenTTL")]
    pub token_ttl: String,
}

impl Default for RemoteAccessSpec {
    fn default() -> Self {
        Self { token_ttl: default_token_ttl() }
    }
}

fn default_token_ttl() -> String {
    "24h".into()
}

/// A member cluster of the federation.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.role != 'Remote' || has(self.controlPlane)").message("a Remote cluster must name its controlPlane"))]
#[x_kube(validation = Rule::new("self.role != 'Primary' || !has(self.controlPlane)").message("a Primary cluster runs its own istiod: do not set controlPlane"))]
pub struct ClusterSpec {
    /// The cluster's name: its Istio cluster ID, unique in the federation. A DNS-1123 label, for example `east`.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,

    /// The Istio network the cluster's workloads are on (`topology.istio.io/network`). Clusters on one network
    /// reach each other's pods directly; clusters on different networks through east-west gateways.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"))]
    pub network: String,

    /// `Primary` runs istiod; `Remote` is served by the istiod of the Primary named in `controlPlane`.
    /// Default: `Primary`.
    #[serde(default)]
    pub role: ClusterRole,

    /// For a `Remote`: the name of the Primary whose istiod serves it. Must not be set on a Primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane: Option<String>,

    /// The Secret, in the federation's namespace, holding the kubeconfig that the hub uses to reach this cluster.
    /// The kubeconfig must carry its credentials inline (token or client-certificate-data); meshfed refuses
    /// kubeconfigs that run commands (`exec`), use auth providers, or read files.
    pub kubeconfig_secret_ref: SecretKeyRef,

    /// The address at which other members' istiod reach this cluster's API server, for example
    /// `https://east.example:6443`. Default: the server of the kubeconfig in `kubeconfigSecretRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('https://')").message("apiServer must be an https:// URL"))]
    #[schemars(length(max = 2048))]
    pub api_server: Option<String>,

    /// The cluster's pod CIDRs, for example `10.10.0.0/16`. Optional; when given, clusters on one network must not
    /// overlap.
    #[serde(default, rename = "podCIDRs", skip_serializing_if = "Vec::is_empty")]
    pub pod_cidrs: Vec<String>,

    /// The cluster's service CIDRs, for example `10.96.0.0/16`. Optional; when given, clusters on one network must
    /// not overlap.
    #[serde(default, rename = "serviceCIDRs", skip_serializing_if = "Vec::is_empty")]
    pub service_cidrs: Vec<String>,

    /// The east-west gateway, deployed where the topology needs one: on every cluster of a multi-network
    /// federation, and on a Primary that serves Remotes.
    #[serde(default)]
    pub east_west_gateway: EastWestGatewaySpec,
}

/// A cluster's role in the mesh.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClusterRole {
    /// Runs its own istiod, which discovers every other member.
    #[default]
    Primary,
    /// Runs no istiod; served by its `controlPlane`'s istiod through that Primary's east-west gateway.
    Remote,
}

/// A reference to a Secret in the federation's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SecretRef {
    /// The Secret's name.
    pub name: String,
}

/// A reference to one key of a Secret in the federation's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SecretKeyRef {
    /// The Secret's name.
    pub name: String,
    /// The key within the Secret. Default: `kubeconfig`.
    #[serde(default = "default_kubeconfig_key")]
    pub key: String,
}

fn default_kubeconfig_key() -> String {
    "kubeconfig".into()
}

/// How the east-west gateway is exposed to the other members.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.expose != 'HostNetwork' || has(self.nodeSelector)").message("HostNetwork exposure needs a nodeSelector naming the nodes the gateway may run on"))]
pub struct EastWestGatewaySpec {
    /// `LoadBalancer` (default; the address comes from the Service's load balancer), `NodePort` (a node address
    /// and the node port), `HostNetwork` (the gateway pod binds the node's ports; needs `nodeSelector`) or
    /// `ClusterIP` (reachable only inside one network).
    #[serde(default)]
    pub expose: ExposeMode,

    /// A fixed address (IP or DNS name) for the gateway, for a gateway behind something meshfed cannot see, such
    /// as a TCP pass-through proxy. Overrides the discovered address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,

    /// The nodes the gateway may run on (a node selector); required with `HostNetwork`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
}

/// How a gateway is exposed.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExposeMode {
    /// A Service of type LoadBalancer; the address is its load balancer's IP or hostname.
    #[default]
    LoadBalancer,
    /// A Service of type NodePort; the address is a node's address and the node port.
    NodePort,
    /// The gateway pod uses the node's network; the address is a selected node's address.
    HostNetwork,
    /// A Service of type ClusterIP; only for clusters on one network.
    ClusterIP,
}

/// What meshfed observed and did, for people and for GitOps tools (kstatus conventions).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MeshFederationStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// The topology derived from the clusters' roles and networks: `MultiPrimary` or `PrimaryRemote`, then
    /// `SingleNetwork` or `MultiNetwork`, for example `PrimaryRemote/MultiNetwork`; then `/Ambient` with `dataPlane:
    /// Ambient`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<String>,

    /// Members that are reachable and converged, of all members, for example `2/3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_clusters: Option<String>,

    /// The federation's conditions: `Ready` (everything below is true), `Valid`, `ClustersReachable`,
    /// `TrustReady`, `RemoteAccessReady`, `GatewaysReady`, `ControlPlaneReady`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// The root CA in use: fingerprint and expiry, never the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<TrustStatus>,

    /// One entry per member cluster, and per cluster still being cleaned up after it left the spec.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub clusters: Vec<ClusterStatus>,
}

/// The root CA in use.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrustStatus {
    /// SHA-256 fingerprint of the root certificate, as `sha256:<hex>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_fingerprint: Option<String>,
    /// When the root certificate expires (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_not_after: Option<String>,
    /// Where the root in use comes from: `generate`, or `secretRef/<name>` for a root you bring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_source: Option<String>,
    /// The phase of a root rotation in progress, if any, and what it waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_phase: Option<String>,
    /// During a root rotation: when every member was first seen holding an intermediate from the new root (RFC
    /// 3339). The old root is dropped `trust.workloadCertificateTTL` (plus five minutes) later; kept here so that a
    /// restarted operator resumes the wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intermediates_reissued_at: Option<String>,
}

/// What meshfed knows of one member.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    /// The cluster's name, as in the spec.
    pub name: String,
    /// Whether the hub reached the cluster's API server at the last reconcile.
    pub reachable: bool,
    /// The cluster's identity: the UID of its `kube-system` namespace. A kubeconfig Secret that later reaches a
    /// cluster with another UID is refused (`ClusterChanged`), so that what meshfed wrote in the first is not orphaned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_uid: Option<String>,
    /// The cluster's Kubernetes version, for example `v1.34.2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes_version: Option<String>,
    /// When the hub last reached the cluster (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    /// The last error meshfed met with this cluster, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The east-west gateway's address (IPs or host names, comma-separated) as other members dial it, where the
    /// topology needs a gateway and its address is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_address: Option<String>,
    /// The port other networks dial at `gatewayAddress`: 15443, or the node port of a NodePort gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_port: Option<i32>,
    /// SHA-256 fingerprint of the cluster's intermediate CA certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intermediate_fingerprint: Option<String>,
    /// When the cluster's intermediate CA expires (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intermediate_not_after: Option<String>,
    /// When the reader token that peers use for this cluster expires (RFC 3339); never the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reader_token_expires_at: Option<String>,
    /// When the hub's credential for this cluster (the token or client certificate of its kubeconfig Secret)
    /// expires (RFC 3339); absent when it does not expire. A ServiceAccount token that `meshfed join` wrote is
    /// renewed before then, once a third of its lifetime remains: meshfed asks the cluster for a fresh one for the
    /// same ServiceAccount and replaces only the token in the Secret. Any other credential is not renewed (the
    /// `Reachable` condition says so) and is reported with reason `CredentialNotRenewed` once a third of its lifetime
    /// remains, as is a token whose renewal the cluster refuses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_expires_at: Option<String>,
    /// The Istio version the cluster runs for the federation: `spec.istio.version`, or the default of the cluster's
    /// Sail operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub istio_version: Option<String>,
    /// When meshfed last restarted the cluster's istiod (RFC 3339): on an Istio version that does not take an updated
    /// remote secret safely, istiod is restarted once after the remote secrets it holds changed (a token refresh, a
    /// member that joins or leaves).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub istiod_restarted_at: Option<String>,
    /// The kubeconfig Secret this cluster was reached with, kept so that a cluster removed from the spec can still
    /// be cleaned up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig_secret_ref: Option<SecretKeyRef>,
    /// The cluster's conditions: `Reachable`, `Ready`, `TrustReady`, `RemoteAccessReady`, `GatewaysReady`,
    /// `ControlPlaneReady`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

fn preserve_unknown_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// The CRD as YAML, exactly as committed in `crds/`.
pub fn crd_yaml() -> String {
    // Long lines stay one plain line (not folded), multi-line descriptions literal blocks: as committed.
    let options = serde_saphyr::ser_options! { folded_wrap_chars: usize::MAX };
    serde_saphyr::to_string_with_options(&MeshFederation::crd(), options).expect("the CRD serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_crds_match_the_code() {
        let committed = include_str!("../../../crds/meshfederations.meshfed.io.yaml");
        assert!(
            committed == crd_yaml(),
            "crds/meshfederations.meshfed.io.yaml is stale: run `cargo run -p meshfed-operator -- crd > crds/meshfederations.meshfed.io.yaml`"
        );
        let chart = include_str!("../../../charts/meshfed/crds/meshfederations.meshfed.io.yaml");
        assert!(
            chart == crd_yaml(),
            "the chart's CRD is stale: run `cargo run -p meshfed-operator -- crd > charts/meshfed/crds/meshfederations.meshfed.io.yaml`"
        );
    }

    #[test]
    fn a_minimal_manifest_gets_the_documented_defaults() {
        let spec: MeshFederationSpec = serde_saphyr::from_str(
            "meshID: prod\ntrust: {root: {generate: {}}}\nclusters:\n- {name: east, network: n1, kubeconfigSecretRef: {name: east}}\n",
        )
        .unwrap();
        assert_eq!(spec.istio.namespace, "istio-system");
        assert_eq!(spec.remote_access.token_ttl, "24h");
        assert_eq!(spec.trust.intermediate.renew_before, "720h");
        assert_eq!(spec.trust.root.generate.unwrap().validity, "87600h");
        let c = &spec.clusters[0];
        assert_eq!((c.role, c.kubeconfig_secret_ref.key.as_str()), (ClusterRole::Primary, "kubeconfig"));
        assert_eq!(c.east_west_gateway.expose, ExposeMode::LoadBalancer);
    }
}
