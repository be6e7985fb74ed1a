//! What meshfed owns in a member, on one path: the table of owned kinds, the claim, one member's complete plan, and
//! the pure decisions of the generic apply (write or not) and prune (delete, release or keep).
//!
//! Adding a kind of member object is one entry in [`OWNED_KINDS`] plus one planning rule in [`member_plan`]: the
//! operator observes, applies, prunes, cleans up and watches every kind of the table the same way, and the tests'
//! end state lists them from the same table.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Namespace, Secret},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use meshfed_api::{ClusterSpec, DataPlane, MeshFederationSpec};
use serde::Serialize;
use serde_json::{Value, json};

use crate::{
    conditions::Reason,
    control_plane,
    federation::{
        ANNOTATION_ADOPTED, ANNOTATION_CREATED, Failure, FederationRef, LABEL_CLUSTER, LABEL_FEDERATION,
        LABEL_FEDERATION_NAMESPACE, created_by_meshfed,
    },
    gateway::{self, GatewayAddress},
    istio::{self, NETWORK_LABEL},
    kinds::{self, *},
    pki, redact, remote, topology,
};

/// One object a member should hold: the complete body meshfed applies (with `apiVersion` and `kind`).
#[derive(Clone, PartialEq)]
pub struct Desired {
    pub key: ObjectKey,
    pub body: Value,
    /// The object's `data` must be exactly the desired keys: a key someone else added (istiod's `istio-generated`
    /// marker in `cacerts`, one more cluster in a remote secret) makes meshfed recreate the object, since an apply
    /// leaves fields it does not own in place.
    pub exact_data: bool,
    /// Fields (JSON pointers) that cannot change in place: when the member's object differs there, meshfed deletes
    /// and recreates it (the Sail `Istio`'s immutable `spec.namespace`, a Service's type).
    pub recreate_on: &'static [&'static str],
}

impl std::fmt::Debug for Desired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Desired")
            .field("key", &self.key)
            .field("body", &redact::body(&self.body))
            .field("exact_data", &self.exact_data)
            .field("recreate_on", &self.recreate_on)
            .finish()
    }
}

impl Desired {
    /// The desired form of a typed object, whose kind must be in [`OWNED_KINDS`].
    fn of<K: k8s_openapi::Resource + k8s_openapi::Metadata<Ty = ObjectMeta> + Serialize>(obj: &K) -> Self {
        let kind = *OWNED_KINDS
            .iter()
            .find(|k| k.group == K::GROUP && k.kind == K::KIND)
            .unwrap_or_else(|| panic!("{} is planned but not in OWNED_KINDS", K::KIND));
        let meta = obj.metadata();
        let key = ObjectKey { kind, namespace: meta.namespace.clone(), name: meta.name.clone().unwrap_or_default() };
        // Typed Kubernetes objects always serialize (and carry their apiVersion and kind).
        let body = serde_json::to_value(obj).expect("a Kubernetes object serializes");
        Self { key, body: stamped(body), exact_data: false, recreate_on: &[] }
    }

    /// The desired form of an object of a kind without Rust types (a CRD), as JSON with at least its metadata.
    fn dynamic(kind: OwnedKind, mut body: Value) -> Self {
        body["apiVersion"] = kind.api_version().into();
        body["kind"] = kind.kind.into();
        let meta = &body["metadata"];
        let name = meta["name"].as_str().unwrap_or_default().to_string();
        let key = ObjectKey { kind, namespace: meta["namespace"].as_str().map(Into::into), name };
        Self { key, body: stamped(body), exact_data: false, recreate_on: &[] }
    }

    fn recreate_on(self, recreate_on: &'static [&'static str]) -> Self {
        Self { recreate_on, ..self }
    }

    fn exact(self) -> Self {
        Self { exact_data: true, ..self }
    }
}

/// Whether `observed` already holds everything in `desired` (a JSON subset: objects by key, lists item by item), so
/// that applying `desired` would change nothing and can be skipped.
pub fn holds(observed: &serde_json::Value, desired: &serde_json::Value) -> bool {
    use serde_json::Value::{Array, Object};
    match (desired, observed) {
        (Object(d), Object(o)) => d.iter().all(|(k, dv)| o.get(k).is_some_and(|ov| holds(ov, dv))),
        (Array(d), Array(o)) => d.len() == o.len() && d.iter().zip(o).all(|(dv, ov)| holds(ov, dv)),
        (d, o) => d == o,
    }
}

/// On every object meshfed applies: a digest of what it applied (all but `data`). An apply leaves the fields it no
/// longer sets in place only if meshfed skips it, and a member's object cannot show which fields are gone from the
/// plan; so a plan that drops a field (a Remote's `remotePilotAddress`, a gateway's `meshNetworks`) changes this
/// digest, and the object is applied, which removes them.
pub const ANNOTATION_APPLIED: &str = "meshfed.io/applied";

/// `body` with its [`ANNOTATION_APPLIED`] digest (the same again for a body that has it).
fn stamped(mut body: Value) -> Value {
    let mut what = body.clone();
    if let Some(o) = what.as_object_mut() {
        o.remove("data");
        o.remove("stringData");
    }
    if let Some(a) = what["metadata"]["annotations"].as_object_mut() {
        a.remove(ANNOTATION_APPLIED);
    }
    let digest = pki::fingerprint_der(what.to_string().as_bytes());
    let annotations = &mut body["metadata"]["annotations"];
    if !annotations.is_object() {
        *annotations = json!({});
    }
    annotations[ANNOTATION_APPLIED] = digest.into();
    body
}

/// The complete list of objects one member should hold for a federation, in apply order, and the objects it may
/// keep as they are although the plan does not write them this time (a `cacerts` or a remote secret whose new
/// content could not be had: an unreachable root, a token from a target that did not answer).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MemberPlan {
    pub objects: Vec<Desired>,
    pub keep: BTreeSet<ObjectKey>,
    /// The member's east-west gateway: where other members dial it, or why it cannot be dialled yet; `None` where
    /// the topology needs no gateway.
    pub gateway: Option<Result<GatewayAddress, Failure>>,
    /// Why the member's control plane is not ready, if it is not.
    pub control_plane: Option<Failure>,
}

// ---------------------------------------------------------------------------------------------------------------
// The claim
// ---------------------------------------------------------------------------------------------------------------

/// On a claim: the identity of the hub whose federation holds it (its `kube-system` namespace's UID), so that two
/// hubs with a federation of the same namespace and name do not both take one member.
pub const ANNOTATION_HUB: &str = "meshfed.io/hub";

/// The claim that says `cluster` of `fref`, in the hub `hub`, holds the member's Istio namespace. meshfed creates it
/// (create, not apply: of two racing writers one wins) before it writes anything else there.
pub fn claim(fref: &FederationRef, hub: &str, spec: &MeshFederationSpec, cluster: &str) -> ConfigMap {
    let key = claim_key(&spec.istio.namespace);
    let claim = ConfigMap {
        metadata: ObjectMeta {
            name: Some(key.name),
            namespace: key.namespace,
            labels: Some(fref.owned_labels(cluster)),
            annotations: Some(BTreeMap::from([(ANNOTATION_HUB.into(), hub.into())])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([
            ("federation".into(), fref.to_string()),
            ("cluster".into(), cluster.into()),
            ("istioNamespace".into(), spec.istio.namespace.clone()),
        ])),
        ..Default::default()
    };
    // Created as the plan would apply it, so that the plan finds nothing to change.
    serde_json::from_value(Desired::of(&claim).body).expect("a ConfigMap")
}

/// Who holds a claim, as read from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimHolder {
    /// This federation, for this cluster.
    Us,
    /// This federation, under another cluster name: the same cluster is listed twice.
    UsAs(String),
    /// Another federation (`hub` says which hub when it is not ours).
    Other { federation: String, hub: String },
}

/// Who holds the claim `observed` (the claim ConfigMap's metadata), from the point of view of `cluster` of `fref`
/// in hub `hub`.
pub fn claim_holder(observed: &ObjectMeta, fref: &FederationRef, hub: &str, cluster: &str) -> ClaimHolder {
    let label = |k: &str| observed.labels.as_ref().and_then(|l| l.get(k)).cloned().unwrap_or_default();
    let their_hub = observed.annotations.as_ref().and_then(|a| a.get(ANNOTATION_HUB)).cloned().unwrap_or_default();
    let (namespace, name) = (label(LABEL_FEDERATION_NAMESPACE), label(LABEL_FEDERATION));
    if their_hub != hub || !fref.is_labelled(&namespace, &name) {
        return ClaimHolder::Other { federation: format!("{namespace}/{name}"), hub: their_hub };
    }
    match label(LABEL_CLUSTER) {
        c if c == cluster => ClaimHolder::Us,
        c => ClaimHolder::UsAs(c),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The plan of one member
// ---------------------------------------------------------------------------------------------------------------

/// What one member's plan needs beyond the spec, decided by the federation-wide pass. Its `Debug` shows the keys of
/// `cacerts` and of the remote secrets, never their values.
#[derive(Clone, Default)]
pub struct MemberFacts<'a> {
    /// The member's Istio namespace as it is now (meshfed marks a namespace it creates, to delete only those).
    pub namespace: Option<&'a Namespace>,
    /// The `cacerts` data the member should hold; `None` keeps what it holds (no root to issue from).
    pub cacerts: Option<BTreeMap<String, ByteString>>,
    /// The remote secrets this member should hold, by target; targets of the topology missing here keep what the
    /// member holds for them (their token could not be had this time).
    pub remote_secrets: BTreeMap<String, Secret>,
    /// The gateway of every cluster that needs one, as its member shows it (`gateway::gateway_address`): its
    /// address, or why it has none yet. A Remote's control plane and every Primary's `meshNetworks` are built from it.
    pub gateways: BTreeMap<String, Result<GatewayAddress, Failure>>,
    /// Kinds of [`OWNED_KINDS`] that the member's API does not serve (their CRDs are not installed).
    pub unserved: BTreeSet<OwnedKind>,
    /// The member's `Istio` as it is now, with the status the Sail operator writes.
    pub istio: Option<&'a Value>,
    /// The restart marker of its istiod, where it has one (`plan::istiod_restarts`).
    pub istiod_restart: Option<&'a str>,
    /// In ambient mode: the member's Sail `IstioCNI` and `ZTunnel` as they are now, with their status.
    pub ambient: [Option<&'a Value>; 2],
}

impl std::fmt::Debug for MemberFacts<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let remote_secrets: BTreeMap<_, _> =
            self.remote_secrets.iter().map(|(t, s)| (t, redact::SecretObject(s))).collect();
        f.debug_struct("MemberFacts")
            .field("namespace", &self.namespace)
            .field("cacerts", &self.cacerts.as_ref().map(redact::SecretData))
            .field("remote_secrets", &remote_secrets)
            .field("gateways", &self.gateways)
            .field("unserved", &self.unserved)
            .field("istio", &self.istio)
            .field("istiod_restart", &self.istiod_restart)
            .field("ambient", &self.ambient)
            .finish()
    }
}

/// The complete plan of `cluster` (which the spec lists) in `hub`: the claim, the Istio namespace labelled with the
/// network, the reader identity, `cacerts`, the remote secrets of a Primary, the east-west gateway and its Istio
/// configuration where the topology needs them, and the Sail `Istio` control plane.
pub fn member_plan(
    fref: &FederationRef,
    hub: &str,
    spec: &MeshFederationSpec,
    cluster: &ClusterSpec,
    facts: MemberFacts<'_>,
) -> MemberPlan {
    let ns = &spec.istio.namespace;
    let mut plan = MemberPlan::default();
    plan.objects.push(Desired::of(&claim(fref, hub, spec, &cluster.name)));
    plan.objects.push(Desired::of(&istio_namespace(fref, spec, cluster, facts.namespace)));
    let reader = remote::reader_objects(fref, spec, cluster);
    plan.objects.push(Desired::of(&reader.service_account));
    plan.objects.push(Desired::of(&reader.cluster_role));
    plan.objects.push(Desired::of(&reader.cluster_role_binding));
    match facts.cacerts {
        Some(data) => plan.objects.push(Desired::of(&cacerts(fref, spec, cluster, data)).exact()),
        None => _ = plan.keep.insert(cacerts_key(ns)),
    }
    for target in remote::remote_secret_targets(spec, cluster) {
        match facts.remote_secrets.get(&target.name) {
            Some(secret) => plan.objects.push(Desired::of(secret).exact()),
            None => _ = plan.keep.insert(remote_secret_key(ns, &target.name)),
        }
    }
    let known: BTreeMap<String, GatewayAddress> =
        facts.gateways.iter().filter_map(|(c, g)| Some((c.clone(), g.as_ref().ok()?.clone()))).collect();
    let ambient = spec.data_plane == DataPlane::Ambient;
    if ambient {
        plan.gateway = Some(if facts.unserved.contains(&KUBERNETES_GATEWAY) {
            Err(Failure::new(
                Reason::GatewayAPIMissing,
                format!(
                    "the cluster does not serve {} Gateway, which ambient mode's east-west gateway is: install the Gateway API's standard CRDs there (the release's standard-install.yaml, of the version your Istio supports)",
                    KUBERNETES_GATEWAY.api_version()
                ),
            ))
        } else {
            plan.objects.push(Desired::dynamic(KUBERNETES_GATEWAY, gateway::ambient_gateway(fref, spec, cluster)));
            facts.gateways.get(&cluster.name).cloned().unwrap_or_else(|| gateway::ambient_gateway_address(None))
        });
    } else if topology::needs_gateway(spec, cluster) {
        let gw = gateway::gateway_objects(fref, spec, cluster, known.get(&cluster.name));
        plan.objects.push(Desired::of(&gw.service_account));
        plan.objects.push(Desired::of(&gw.role));
        plan.objects.push(Desired::of(&gw.role_binding));
        plan.objects.push(Desired::of(&gw.service).recreate_on(&["/spec/type"]));
        plan.objects.push(Desired::of(&gw.deployment).recreate_on(&["/spec/selector"]));
        plan.objects.push(Desired::of(&gw.disruption_budget));
        let mut state = facts.gateways.get(&cluster.name).cloned().unwrap_or_else(|| {
            Err(Failure::new(Reason::AwaitingGatewayService, "the gateway Service is not there yet"))
        });
        for (kind, body) in gateway::istio_gateway_configs(fref, spec, cluster) {
            let kind = if kind == GATEWAY.kind { GATEWAY } else { VIRTUAL_SERVICE };
            if facts.unserved.contains(&kind) {
                state = Err(Failure::new(
                    Reason::IstioCRDsMissing,
                    format!(
                        "the cluster does not serve {} {}; the Sail operator installs Istio's CRDs with Istio",
                        kind.api_version(),
                        kind.kind
                    ),
                ));
            } else {
                plan.objects.push(Desired::dynamic(kind, body));
            }
        }
        plan.gateway = Some(state);
    }
    plan.control_plane = if facts.unserved.contains(&ISTIO) {
        Some(Failure::new(
            Reason::SailOperatorMissing,
            "the cluster does not serve sailoperator.io/v1 Istio: install the Sail operator there",
        ))
    } else {
        match control_plane::istio(fref, spec, cluster, &known, facts.istiod_restart) {
            Ok(body) => {
                plan.objects.push(Desired::dynamic(ISTIO, body).recreate_on(&["/spec/namespace"]));
                control_plane::istio_ready(facts.istio).err()
            }
            Err(waiting) => {
                plan.keep.insert(istio_key(&spec.istio.revision));
                Some(waiting)
            }
        }
    };
    if ambient {
        let data_plane = ambient_data_plane(fref, spec, cluster, facts.ambient, &facts.unserved, &mut plan);
        // What only a person can clear comes first: a missing Sail operator, then its missing ambient kinds.
        plan.control_plane = match (plan.control_plane.take(), data_plane) {
            (Some(istio), _) if istio.reason == Reason::SailOperatorMissing => Some(istio),
            (_, Some(kinds)) if kinds.reason == Reason::SailAmbientKindsMissing => Some(kinds),
            (istio, data_plane) => istio.or(data_plane),
        };
    }
    plan.objects.sort_by_key(|d| kind_order(&d.key.kind));
    plan
}

/// Plans the member's Sail `IstioCNI` and `ZTunnel` (ambient mode) into `plan`, where the member serves them; returns
/// why its data plane is not ready, if it is not (`held`: the two as the member holds them).
fn ambient_data_plane(
    fref: &FederationRef,
    spec: &MeshFederationSpec,
    cluster: &ClusterSpec,
    held: [Option<&Value>; 2],
    unserved: &BTreeSet<OwnedKind>,
    plan: &mut MemberPlan,
) -> Option<Failure> {
    let kinds = [ISTIO_CNI, ZTUNNEL];
    let missing: Vec<&str> = kinds.iter().filter(|k| unserved.contains(k)).map(|k| k.kind).collect();
    if !missing.is_empty() {
        return Some(Failure::new(
            Reason::SailAmbientKindsMissing,
            format!(
                "the cluster does not serve sailoperator.io/v1 {}, which ambient mode needs: install a Sail operator that has them (1.27 or later)",
                missing.join(" and ")
            ),
        ));
    }
    let bodies = control_plane::ambient_data_plane(fref, spec, cluster);
    let mut failure = None;
    for ((kind, body), held) in kinds.into_iter().zip(bodies).zip(held) {
        plan.objects.push(Desired::dynamic(kind, body).recreate_on(&["/spec/namespace"]));
        failure = failure.or(control_plane::sail_ready(kind.kind, held).err());
    }
    failure
}

/// How many apply stages a member's plan has: see [`apply_stage`].
pub const APPLY_STAGES: usize = 4;

/// The stage in which objects of a kind are applied; the objects of one stage go concurrently. First the
/// cluster-scoped objects others live in or refer to (namespaces, cluster roles and their bindings: the hub may
/// `bind` meshfed's cluster roles by name), then everything namespaced but role bindings, which follow their roles
/// (the API server resolves a binding's Role to check that the hub holds what it grants: a Role written in the same
/// stage may not be there yet, and the binding is refused as not found), last the control plane (`Istio`, and in
/// ambient mode `IstioCNI` and `ZTunnel`), so that istiod starts on the `cacerts` and the configuration meant for it,
/// not on a self-signed CA.
pub fn apply_stage(kind: &OwnedKind) -> usize {
    match *kind {
        NAMESPACE | CLUSTER_ROLE | CLUSTER_ROLE_BINDING => 0,
        ROLE_BINDING => 2,
        ISTIO | ISTIO_CNI | ZTUNNEL => 3,
        _ => 1,
    }
}

/// A kind's place in [`OWNED_KINDS`]: the order of apply, and the reverse order of prune.
fn kind_order(kind: &OwnedKind) -> usize {
    OWNED_KINDS.iter().position(|k| k == kind).unwrap_or(usize::MAX)
}

/// The Istio namespace of a member, labelled with its network. `observed` is the namespace as it is now, if it
/// exists: meshfed marks a namespace it creates, so that cleanup deletes only namespaces meshfed made.
pub fn istio_namespace(
    fed: &FederationRef,
    spec: &MeshFederationSpec,
    cluster: &ClusterSpec,
    observed: Option<&Namespace>,
) -> Namespace {
    let mut labels = fed.owned_labels(&cluster.name);
    labels.insert(NETWORK_LABEL.into(), cluster.network.clone());
    let mut annotations = BTreeMap::new();
    if observed.is_none_or(created_by_meshfed) {
        annotations.insert(ANNOTATION_CREATED.into(), "true".into());
    }
    if let Some(primary) = &cluster.control_plane {
        annotations.insert(istio::CONTROL_PLANE_CLUSTERS_ANNOTATION.into(), primary.clone());
    }
    Namespace {
        metadata: ObjectMeta {
            name: Some(spec.istio.namespace.clone()),
            labels: Some(labels),
            annotations: (!annotations.is_empty()).then_some(annotations),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Secret `cacerts` in the Istio namespace of `cluster`, holding `data`.
pub fn cacerts(
    fref: &FederationRef,
    spec: &MeshFederationSpec,
    cluster: &ClusterSpec,
    data: BTreeMap<String, ByteString>,
) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(pki::CACERTS_SECRET.into()),
            namespace: Some(spec.istio.namespace.clone()),
            labels: Some(fref.owned_labels(&cluster.name)),
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Apply and prune decisions
// ---------------------------------------------------------------------------------------------------------------

/// What to do to make a member hold one desired object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// It already holds it: nothing.
    Nothing,
    /// Server-side apply the desired body.
    Apply,
    /// Delete the object, then apply (its data has keys meshfed does not write).
    Recreate,
}

/// An object that meshfed would have to change but that is not this federation's: another federation's (`owner`),
/// or one that meshfed did not create and was not asked to adopt (`owner` is `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Foreign {
    pub owner: Option<String>,
}

/// How a member's status names `key`, held by federation `owner`: with why that keeps this federation out for good
/// where the object is one per cluster (the ambient node agents).
pub fn held_by_another(key: &ObjectKey, owner: &str) -> String {
    let mut message = format!("{key} belongs to federation {owner}");
    if key.kind == ISTIO_CNI || key.kind == ZTUNNEL {
        message
            .push_str(" (a cluster runs one istio-cni and one ztunnel, so it can be in one ambient federation only)");
    }
    message
}

/// What to do about `desired` given the member's object of the same key as it is now (`observed`, as JSON).
/// An object labelled for another federation is never touched, nor one no federation labelled unless the plan
/// adopts it ([`mark_adopted`]); the Istio namespace is labelled whoever made it.
pub fn write_for(fref: &FederationRef, observed: Option<&Value>, desired: &Desired) -> Result<Write, Foreign> {
    let Some(o) = observed else { return Ok(Write::Apply) };
    match owner(o) {
        Some((namespace, name)) if !fref.is_labelled(namespace, name) => {
            return Err(Foreign { owner: Some(format!("{namespace}/{name}")) });
        }
        None if desired.key.kind != NAMESPACE && !adopted(&desired.body) => return Err(Foreign { owner: None }),
        _ => {}
    }
    let keys = |v: &Value| v.get("data").and_then(Value::as_object).map(|d| d.keys().cloned().collect::<Vec<_>>());
    let immutable_changed = desired.recreate_on.iter().any(|p| o.pointer(p) != desired.body.pointer(p));
    Ok(
        if immutable_changed
            || desired.exact_data && keys(o).unwrap_or_default() != keys(&desired.body).unwrap_or_default()
        {
            Write::Recreate
        } else if holds(o, &desired.body) {
            Write::Nothing
        } else {
            Write::Apply
        },
    )
}

/// The federation (namespace and name label) an object (as JSON) is labelled for; `None` when no federation's.
fn owner(object: &Value) -> Option<(&str, &str)> {
    let labels = &object["metadata"]["labels"];
    labels[LABEL_FEDERATION_NAMESPACE].as_str().zip(labels[LABEL_FEDERATION].as_str())
}

/// Whether writing `desired` over `observed` takes over an object no federation labelled (one the plan adopts).
pub fn adopts(observed: Option<&Value>, desired: &Desired) -> bool {
    desired.key.kind != NAMESPACE && observed.is_some_and(|o| owner(o).is_none())
}

/// Whether an object (as JSON) carries [`ANNOTATION_ADOPTED`].
fn adopted(object: &Value) -> bool {
    object["metadata"]["annotations"][ANNOTATION_ADOPTED] == "true"
}

/// Marks adopted the objects of `plan` that meshfed takes over: with `adopt` (`existingObjects: Adopt`), every one the
/// member holds that no federation labelled; and, whatever `adopt` says, every one meshfed adopted before and still
/// holds for `fref`, so that the mark stays. The Istio namespace is labelled, never adopted.
pub fn mark_adopted(plan: &mut MemberPlan, fref: &FederationRef, held: &Holdings, adopt: bool) {
    for d in plan.objects.iter_mut().filter(|d| d.key.kind != NAMESPACE) {
        let Some(o) = held.get(&d.key) else { continue };
        if adopt && owner(o).is_none() || owner(o).is_some_and(|(ns, name)| fref.is_labelled(ns, name)) && adopted(o) {
            d.body["metadata"]["annotations"][ANNOTATION_ADOPTED] = "true".into();
            d.body = stamped(std::mem::take(&mut d.body));
        }
    }
}

/// What taking over `observed` as `desired` changes in it, as JSON pointers (`/spec/values/global/network`), the
/// metadata left out: every place where `desired` sets something that `observed` does not hold. Names no values
/// (a Secret's data among them).
pub fn adoption_changes(observed: &Value, desired: &Value) -> Vec<String> {
    fn walk(path: &str, observed: Option<&Value>, desired: &Value, out: &mut Vec<String>) {
        match (desired, observed) {
            (Value::Object(d), Some(Value::Object(o))) => {
                for (k, dv) in d {
                    let at = format!("{path}/{}", k.replace('~', "~0").replace('/', "~1"));
                    walk(&at, o.get(k), dv, out);
                }
            }
            (d, o) if o == Some(d) => {}
            _ => out.push(path.to_string()),
        }
    }
    let mut desired = desired.clone();
    if let Some(d) = desired.as_object_mut() {
        for k in ["metadata", "apiVersion", "kind"] {
            d.remove(k);
        }
    }
    let mut out = Vec::new();
    walk("", Some(observed), &desired, &mut out);
    out
}

/// What `meshfed check` says of an object the plan writes (`desired`, as `meshfed render` shows it) that the member
/// holds (`observed`): nothing when it is this federation's or the Istio namespace (labelled whoever made it); a
/// failure for another federation's; for one meshfed did not create, what adopting it would change, a failure unless
/// the federation adopts (`adopt`). Secret data is not compared (render redacts it).
pub fn ownership(
    fref: &FederationRef,
    adopt: bool,
    observed: &Value,
    desired: &Value,
) -> Option<Result<String, String>> {
    let key = kinds::key_of(desired)?;
    match owner(observed) {
        _ if key.kind == NAMESPACE => None,
        Some((ns, name)) if fref.is_labelled(ns, name) => None,
        Some((ns, name)) => {
            Some(Err(format!("{}: meshfed leaves it alone", held_by_another(&key, &format!("{ns}/{name}")))))
        }
        None => {
            let changes: Vec<String> =
                adoption_changes(observed, desired).into_iter().filter(|p| !p.starts_with("/data")).collect();
            let changes = match (changes.is_empty(), key.kind == SECRET) {
                (true, false) => "nothing but its labels".to_string(),
                (true, true) => "its data as the plan decides".to_string(),
                (false, secret) => changes.join(", ") + if secret { ", and its data as the plan decides" } else { "" },
            };
            Some(match adopt {
                true => Ok(format!("{key} was not created by meshfed: adopting it changes {changes}")),
                false => Err(format!(
                    "{key} was not created by meshfed and is left alone (ObjectNotOwned); `existingObjects: Adopt` would take it over, changing {changes}"
                )),
            })
        }
    }
}

/// Letting a member go as it runs (`deletionPolicy: Orphan`): for every object it holds that meshfed labelled for
/// `fref` and `cluster`, a merge patch that removes meshfed's labels and annotations and nothing else; the claim,
/// meshfed's own record, is deleted ([`Prune::Delete`]). Nothing that runs is changed.
pub fn to_release<'a>(
    fref: &FederationRef,
    cluster: &str,
    owned: impl IntoIterator<Item = (&'a ObjectKey, &'a Value)>,
) -> Vec<Prune> {
    let labels: BTreeMap<String, Value> = fref.owned_labels(cluster).into_keys().map(|k| (k, Value::Null)).collect();
    let annotations: BTreeMap<&str, Value> =
        [ANNOTATION_APPLIED, ANNOTATION_CREATED, ANNOTATION_ADOPTED].map(|a| (a, Value::Null)).into();
    let patch = json!({"metadata": {"labels": labels, "annotations": annotations}});
    // The only ConfigMap meshfed writes is the claim.
    let mut out: Vec<Prune> = owned
        .into_iter()
        .filter(|(_, v)| labelled_for(v, fref, cluster) && v["metadata"]["deletionTimestamp"].is_null())
        .map(|(k, _)| match k.kind {
            CONFIG_MAP => Prune::Delete(k.clone()),
            _ => Prune::Unlabel(k.clone(), patch.clone()),
        })
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(kind_order(&p.key().kind)));
    out
}

/// What prune does to an object meshfed labelled for this federation and cluster that the plan does not want.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prune {
    Delete(ObjectKey),
    /// A namespace meshfed did not create: give back only what meshfed set on it (an apply of nothing).
    Release(ObjectKey, Value),
    /// An object let go as it runs: only meshfed's labels and annotations removed (this merge patch).
    Unlabel(ObjectKey, Value),
}

impl Prune {
    pub fn key(&self) -> &ObjectKey {
        match self {
            Self::Delete(k) | Self::Release(k, _) | Self::Unlabel(k, _) => k,
        }
    }
}

/// Of the objects a member holds that meshfed labelled for `fref` and `cluster` (`owned`: key and JSON), what to
/// prune so that it holds `plan` and nothing else of this federation, in reverse table order. An empty plan is
/// cleanup. A namespace is deleted only when meshfed created it, else released.
pub fn to_prune<'a>(
    fref: &FederationRef,
    cluster: &str,
    plan: &MemberPlan,
    owned: impl IntoIterator<Item = (&'a ObjectKey, &'a Value)>,
) -> Vec<Prune> {
    let wanted: BTreeSet<&ObjectKey> = plan.objects.iter().map(|d| &d.key).chain(&plan.keep).collect();
    let mut stale: Vec<(&ObjectKey, &Value)> = owned
        .into_iter()
        .filter(|(k, v)| !wanted.contains(k) && labelled_for(v, fref, cluster))
        .filter(|(_, v)| v["metadata"]["deletionTimestamp"].is_null())
        .collect();
    stale.sort_by_key(|(k, _)| std::cmp::Reverse(kind_order(&k.kind)));
    stale
        .into_iter()
        .map(|(k, v)| {
            let created = v["metadata"]["annotations"][ANNOTATION_CREATED] == "true";
            if k.kind == NAMESPACE && !created {
                let body =
                    json!({"apiVersion": k.kind.api_version(), "kind": k.kind.kind, "metadata": {"name": k.name}});
                Prune::Release(k.clone(), body)
            } else {
                Prune::Delete(k.clone())
            }
        })
        .collect()
}

/// Whether an object (as JSON) carries every label meshfed puts on what it writes for `cluster` of `fref`.
pub fn labelled_for(object: &Value, fref: &FederationRef, cluster: &str) -> bool {
    let labels = &object["metadata"]["labels"];
    fref.owned_labels(cluster).iter().all(|(k, v)| labels[k].as_str() == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_is_a_subset_check_that_sees_changed_values() {
        let observed = serde_json::json!({"metadata": {"name": "a", "uid": "1", "labels": {"x": "1", "y": "2"}}, "spec": {"l": [1, 2]}});
        assert!(holds(&observed, &serde_json::json!({"metadata": {"labels": {"x": "1"}}})));
        assert!(!holds(&observed, &serde_json::json!({"metadata": {"labels": {"x": "2"}}})));
        assert!(!holds(&observed, &serde_json::json!({"metadata": {"labels": {"z": "1"}}})));
        assert!(!holds(&observed, &serde_json::json!({"spec": {"l": [1]}})));
    }

    use crate::federation::{LABEL_CLUSTER, MANAGED_BY};

    fn spec() -> MeshFederationSpec {
        serde_saphyr::from_str(
            "meshID: m\ntrust: {root: {generate: {}}}\nclusters:\n- {name: east, network: n1, kubeconfigSecretRef: {name: east}}\n- {name: west, network: n2, kubeconfigSecretRef: {name: west}}\n- {name: rem, network: n2, role: Remote, controlPlane: east, kubeconfigSecretRef: {name: rem}}\n",
        )
        .unwrap()
    }

    fn fed() -> FederationRef {
        FederationRef { namespace: "mesh-system".into(), name: "prod".into() }
    }

    fn keys(plan: &MemberPlan) -> Vec<String> {
        plan.objects.iter().map(|d| d.key.to_string()).collect()
    }

    #[test]
    fn a_created_namespace_is_labelled_with_network_and_ownership_and_marked_created() {
        let s = spec();
        let ns = istio_namespace(&fed(), &s, &s.clusters[1], None);
        let labels = ns.metadata.labels.as_ref().unwrap();
        assert_eq!(ns.metadata.name.as_deref(), Some("istio-system"));
        assert_eq!(labels[NETWORK_LABEL], "n2");
        assert_eq!(labels[MANAGED_BY], "meshfed");
        assert_eq!((labels[LABEL_FEDERATION].as_str(), labels[LABEL_CLUSTER].as_str()), ("prod", "west"));
        assert!(created_by_meshfed(&ns));
        // Once it exists, the plan keeps the mark, so that the next apply does not drop it.
        assert!(created_by_meshfed(&istio_namespace(&fed(), &s, &s.clusters[1], Some(&ns))));
    }

    #[test]
    fn a_namespace_that_existed_before_is_not_marked_created() {
        let s = spec();
        let theirs = Namespace {
            metadata: ObjectMeta { name: Some("istio-system".into()), ..Default::default() },
            ..Default::default()
        };
        assert!(!created_by_meshfed(&istio_namespace(&fed(), &s, &s.clusters[0], Some(&theirs))));
    }

    #[test]
    fn ownership_needs_every_label_of_this_federation_and_cluster() {
        let s = spec();
        let ns = istio_namespace(&fed(), &s, &s.clusters[0], None);
        let ns = serde_json::to_value(ns).unwrap();
        assert!(labelled_for(&ns, &fed(), "east"));
        assert!(!labelled_for(&ns, &fed(), "west"));
        let other = FederationRef { namespace: "other".into(), name: "prod".into() };
        assert!(!labelled_for(&ns, &other, "east"));
    }

    #[test]
    fn every_planned_object_is_of_an_owned_kind_in_table_order() {
        let s = spec();
        let plan = member_plan(&fed(), "hub", &s, &s.clusters[0], MemberFacts::default());
        let order: Vec<usize> =
            plan.objects.iter().map(|d| OWNED_KINDS.iter().position(|k| *k == d.key.kind).unwrap()).collect();
        assert!(order.is_sorted(), "{:?}", keys(&plan));
        assert_eq!(
            keys(&plan),
            [
                "ConfigMap kube-system/meshfed-claim.istio-system",
                "Namespace istio-system",
                "ServiceAccount istio-system/meshfed-reader",
                "ServiceAccount istio-system/istio-eastwestgateway-service-account",
                "ClusterRole meshfed-reader.mesh-system.prod",
                "ClusterRoleBinding meshfed-reader.mesh-system.prod",
                "Role istio-system/istio-eastwestgateway-sds",
                "RoleBinding istio-system/istio-eastwestgateway-sds",
                "Service istio-system/istio-eastwestgateway",
                "Deployment istio-system/istio-eastwestgateway",
                "PodDisruptionBudget istio-system/istio-eastwestgateway",
                "Istio default",
                "Gateway istio-system/cross-network-gateway",
                "Gateway istio-system/istiod-gateway",
                "VirtualService istio-system/istiod-vs",
            ]
        );
        for d in &plan.objects {
            assert_eq!(d.body["kind"], d.key.kind.kind);
            assert_eq!(d.body["apiVersion"], d.key.kind.api_version());
            assert!(labelled_for(&d.body, &fed(), "east"), "{}", d.key);
        }
    }

    #[test]
    fn what_cannot_be_had_this_time_is_kept_not_pruned() {
        let s = spec();
        let plan = member_plan(&fed(), "hub", &s, &s.clusters[0], MemberFacts::default());
        assert!(plan.keep.contains(&cacerts_key("istio-system")));
        assert!(plan.keep.contains(&remote_secret_key("istio-system", "west")));
        assert!(plan.keep.contains(&remote_secret_key("istio-system", "rem")));
        // A Remote holds no remote secrets, so it keeps none either.
        let remote = member_plan(&fed(), "hub", &s, &s.clusters[2], MemberFacts::default());
        // A Remote whose Primary's gateway has no address yet keeps its control plane as it is.
        assert_eq!(remote.keep, BTreeSet::from([cacerts_key("istio-system"), istio_key("default")]));
    }

    #[test]
    fn a_plan_that_drops_a_field_is_applied_again_so_the_member_loses_it() {
        // West's gateway runs on its nodes: east's istiod learns it from meshNetworks. Then it moves behind a load
        // balancer, which istiod finds by itself: east's Istio no longer sets meshNetworks.
        let on_nodes = spec_of(
            "- {name: east, network: n1, kubeconfigSecretRef: {name: e}}\n- {name: west, network: n2, kubeconfigSecretRef: {name: w}, eastWestGateway: {expose: HostNetwork, nodeSelector: {gw: 'yes'}}}\n",
        );
        let mut balanced = on_nodes.clone();
        balanced.clusters[1].east_west_gateway = Default::default();
        let west = GatewayAddress { addresses: vec!["198.51.100.7".into()], port: 15443 };
        let facts =
            || MemberFacts { gateways: BTreeMap::from([("west".into(), Ok(west.clone()))]), ..Default::default() };
        let istio_of = |s: &MeshFederationSpec| {
            let p = member_plan(&fed(), "hub", s, &s.clusters[0], facts());
            p.objects.into_iter().find(|d| d.key == istio_key("default")).unwrap()
        };
        let (before, after) = (istio_of(&on_nodes), istio_of(&balanced));
        assert!(!before.body["spec"]["values"]["global"]["meshNetworks"].is_null());
        assert!(after.body["spec"]["values"]["global"]["meshNetworks"].is_null());
        // What the member holds is a superset of the new body but for the digest: applied again, so SSA removes it.
        assert!(holds(&before.body["spec"], &after.body["spec"]));
        assert_eq!(write_for(&fed(), Some(&before.body), &after), Ok(Write::Apply));
        assert_eq!(write_for(&fed(), Some(&after.body), &after), Ok(Write::Nothing));
    }

    #[test]
    fn a_changed_istio_namespace_replaces_the_istio_resource() {
        let s = spec();
        let istio = |s: &MeshFederationSpec| {
            let p = member_plan(&fed(), "hub", s, &s.clusters[0], MemberFacts::default());
            p.objects.into_iter().find(|d| d.key == istio_key("default")).unwrap()
        };
        let mut moved = s.clone();
        moved.istio.namespace = "mesh".into();
        assert_eq!(write_for(&fed(), Some(&istio(&s).body), &istio(&moved)), Ok(Write::Recreate));
    }

    fn owned(key: &ObjectKey, cluster: &str, extra: Value) -> (ObjectKey, Value) {
        let mut v = json!({"metadata": {"name": key.name, "labels": fed().owned_labels(cluster)}});
        if let (Some(m), Some(e)) = (v["metadata"].as_object_mut(), extra.as_object()) {
            m.extend(e.clone());
        }
        (key.clone(), v)
    }

    #[test]
    fn prune_removes_what_the_plan_no_longer_wants_last_kinds_first_and_spares_the_rest() {
        let s = spec();
        let plan = member_plan(&fed(), "hub", &s, &s.clusters[0], MemberFacts::default());
        let old_ns = namespace_key("old-istio");
        let old_cacerts = cacerts_key("old-istio");
        let mut theirs = owned(&cacerts_key("x"), "east", json!({}));
        theirs.1["metadata"]["labels"][LABEL_FEDERATION] = "other".into();
        let observed = [
            owned(&old_ns, "east", json!({"annotations": {ANNOTATION_CREATED: "true"}})),
            owned(&claim_key("istio-system"), "east", json!({})),
            owned(&old_cacerts, "east", json!({})),
            owned(&cacerts_key("istio-system"), "east", json!({})),
            owned(&remote_secret_key("istio-system", "gone"), "east", json!({})),
            owned(&cacerts_key("y"), "west", json!({})),
            theirs,
        ];
        let pruned = to_prune(&fed(), "east", &plan, observed.iter().map(|(k, v)| (k, v)));
        assert_eq!(
            pruned,
            [
                Prune::Delete(old_cacerts.clone()),
                Prune::Delete(remote_secret_key("istio-system", "gone")),
                Prune::Delete(old_ns.clone()),
            ]
        );
        // Cleanup is the same prune with an empty plan: the claim goes last; a namespace meshfed found is released.
        let found = owned(&old_ns, "east", json!({}));
        let cleanup =
            to_prune(&fed(), "east", &MemberPlan::default(), [(&found.0, &found.1), (&observed[1].0, &observed[1].1)]);
        assert!(matches!(&cleanup[0], Prune::Release(k, _) if *k == old_ns), "{cleanup:?}");
        assert_eq!(cleanup[1], Prune::Delete(claim_key("istio-system")));
    }

    #[test]
    fn an_object_of_another_federation_is_never_written() {
        let s = spec();
        let plan = member_plan(&fed(), "hub", &s, &s.clusters[0], MemberFacts::default());
        let sa = &plan.objects[2];
        let mut observed = sa.body.clone();
        assert_eq!(write_for(&fed(), Some(&observed), sa), Ok(Write::Nothing));
        assert_eq!(write_for(&fed(), None, sa), Ok(Write::Apply));
        observed["metadata"]["labels"][LABEL_FEDERATION] = "other".into();
        assert_eq!(write_for(&fed(), Some(&observed), sa), Err(Foreign { owner: Some("mesh-system/other".into()) }));
    }

    /// A plan as `member_plan` makes it for east, and the member holding `held` by key.
    fn planned_over(held: &[(&ObjectKey, Value)]) -> (MemberPlan, Holdings) {
        let s = spec();
        let plan = member_plan(&fed(), "hub", &s, &s.clusters[0], MemberFacts::default());
        (plan, held.iter().map(|(k, v)| ((*k).clone(), std::sync::Arc::new(v.clone()))).collect())
    }

    #[test]
    fn an_object_meshfed_did_not_create_is_written_only_when_adopted_and_stays_marked() {
        let (mut plan, _) = planned_over(&[]);
        let istio = plan.objects.iter().find(|d| d.key.kind == ISTIO).unwrap().clone();
        let ns = plan.objects.iter().find(|d| d.key.kind == NAMESPACE).unwrap().clone();
        // Made by hand: no federation's labels.
        let hand_made = json!({"metadata": {"name": "default", "labels": {"app": "x"}}, "spec": {"version": "v1.29.0", "namespace": "istio-system"}});
        assert_eq!(write_for(&fed(), Some(&hand_made), &istio), Err(Foreign { owner: None }));
        // The Istio namespace is labelled whoever made it.
        let found_ns = json!({"metadata": {"name": "istio-system"}});
        assert_eq!(write_for(&fed(), Some(&found_ns), &ns), Ok(Write::Apply));
        // Not asked to adopt: nothing is marked, so nothing is written.
        let held = [(&istio.key, hand_made.clone()), (&ns.key, found_ns)];
        let (_, holdings) = planned_over(&held);
        mark_adopted(&mut plan, &fed(), &holdings, false);
        let marked =
            |p: &MemberPlan| p.objects.iter().filter(|d| adopted(&d.body)).map(|d| d.key.clone()).collect::<Vec<_>>();
        assert!(marked(&plan).is_empty());
        // Asked to adopt: the hand-made Istio is marked (never the namespace) and written.
        mark_adopted(&mut plan, &fed(), &holdings, true);
        assert_eq!(marked(&plan), std::slice::from_ref(&istio.key));
        let adopting = plan.objects.iter().find(|d| d.key == istio.key).unwrap();
        assert_eq!(write_for(&fed(), Some(&hand_made), adopting), Ok(Write::Apply));
        assert_ne!(adopting.body, istio.body, "the mark changes the applied digest, so it is written");
        // Once adopted (labelled for us, marked), the mark stays although adoption is no longer asked for.
        let (mut later, _) = planned_over(&[]);
        let (_, now_held) = planned_over(&[(&istio.key, adopting.body.clone())]);
        mark_adopted(&mut later, &fed(), &now_held, false);
        let again = later.objects.iter().find(|d| d.key == istio.key).unwrap();
        assert_eq!(again.body, adopting.body);
        assert_eq!(write_for(&fed(), Some(&adopting.body), again), Ok(Write::Nothing));
        // A gateway Deployment made with another selector (immutable) is recreated when adopted.
        let s = spec();
        let mut plan = member_plan(&fed(), "hub", &s, &s.clusters[0], MemberFacts::default());
        let deployment = plan.objects.iter().find(|d| d.key.kind == DEPLOYMENT).unwrap().clone();
        let hand_made = json!({"metadata": {"name": deployment.key.name}, "spec": {"selector": {"matchLabels": {"istio": "eastwestgateway"}}}});
        let (_, held) = planned_over(&[(&deployment.key, hand_made.clone())]);
        mark_adopted(&mut plan, &fed(), &held, true);
        let adopting = plan.objects.iter().find(|d| d.key == deployment.key).unwrap();
        assert_eq!(write_for(&fed(), Some(&hand_made), adopting), Ok(Write::Recreate));
        // Another federation's object is never adopted.
        let mut theirs = istio.body.clone();
        theirs["metadata"]["labels"][LABEL_FEDERATION] = "other".into();
        let (mut plan, held) = planned_over(&[(&istio.key, theirs.clone())]);
        mark_adopted(&mut plan, &fed(), &held, true);
        assert!(marked(&plan).is_empty());
    }

    #[test]
    fn adoption_names_the_places_it_changes_and_no_value() {
        let observed = json!({"metadata": {"name": "default"}, "spec": {"version": "v1.30.3", "values": {"global": {"network": "net1", "meshID": "m"}}}, "data": {"ca-key.pem": "c2VjcmV0"}});
        let desired = json!({"apiVersion": "v1", "kind": "X", "metadata": {"name": "default", "labels": {"a": "b"}}, "spec": {"version": "v1.30.3", "values": {"global": {"network": "n1", "meshID": "m", "multiCluster": {"clusterName": "east"}}}}, "data": {"ca-key.pem": "bmV3"}});
        assert_eq!(
            adoption_changes(&observed, &desired),
            ["/data/ca-key.pem", "/spec/values/global/multiCluster", "/spec/values/global/network"]
        );
        assert!(adoption_changes(&desired, &desired).is_empty());
    }

    #[test]
    fn a_role_binding_is_applied_after_its_role_and_the_control_plane_last() {
        assert!(apply_stage(&ROLE_BINDING) > apply_stage(&ROLE));
        assert!(apply_stage(&CLUSTER_ROLE_BINDING) >= apply_stage(&CLUSTER_ROLE), "bound by name: no lookup");
        let control_plane = [ISTIO, ISTIO_CNI, ZTUNNEL];
        assert!(
            OWNED_KINDS.iter().filter(|k| !control_plane.contains(k)).all(|k| apply_stage(k) < apply_stage(&ISTIO))
        );
        assert!(OWNED_KINDS.iter().all(|k| apply_stage(k) < APPLY_STAGES));
    }

    #[test]
    fn check_names_what_is_not_ours_and_what_adopting_it_would_change() {
        let (plan, _) = planned_over(&[]);
        let istio = &plan.objects.iter().find(|d| d.key.kind == ISTIO).unwrap().body;
        let hand_made = json!({"metadata": {"name": "default"}, "spec": {"namespace": "istio-system"}});
        let refused = ownership(&fed(), false, &hand_made, istio).unwrap().unwrap_err();
        assert!(
            refused.starts_with("Istio default was not created by meshfed and is left alone (ObjectNotOwned)"),
            "{refused}"
        );
        assert!(refused.contains("/spec/values"), "{refused}");
        let adopting = ownership(&fed(), true, &hand_made, istio).unwrap().unwrap();
        assert!(
            adopting.starts_with("Istio default was not created by meshfed: adopting it changes /spec/"),
            "{adopting}"
        );
        // Ours, or the Istio namespace: nothing to say; another federation's: refused.
        assert_eq!(ownership(&fed(), false, istio, istio), None);
        let ns = &plan.objects.iter().find(|d| d.key.kind == NAMESPACE).unwrap().body;
        assert_eq!(ownership(&fed(), false, &json!({"metadata": {"name": "istio-system"}}), ns), None);
        let mut theirs = istio.clone();
        theirs["metadata"]["labels"][LABEL_FEDERATION] = "other".into();
        assert!(
            ownership(&fed(), true, &theirs, istio)
                .unwrap()
                .unwrap_err()
                .contains("belongs to federation mesh-system/other")
        );
    }

    #[test]
    fn letting_a_member_go_removes_only_meshfeds_marks_and_gives_the_claim_back() {
        let s = spec();
        let plan = member_plan(&fed(), "hub", &s, &s.clusters[0], MemberFacts::default());
        let mut held: Vec<(ObjectKey, Value)> = plan.objects.iter().map(|d| (d.key.clone(), d.body.clone())).collect();
        let not_ours = (remote_secret_key("istio-system", "x"), json!({"metadata": {"name": "x"}}));
        held.push(not_ours.clone());
        let released = to_release(&fed(), "east", held.iter().map(|(k, v)| (k, v)));
        // Every object of the plan but the claim is unlabelled, the claim last and deleted; not ours: untouched.
        assert_eq!(released.len(), plan.objects.len());
        assert!(released.iter().all(|p| p.key() != &not_ours.0));
        assert_eq!(released.last(), Some(&Prune::Delete(claim_key("istio-system"))));
        let Prune::Unlabel(_, patch) = &released[0] else { panic!("{released:?}") };
        for (k, _) in fed().owned_labels("east") {
            assert_eq!(patch["metadata"]["labels"][&k], Value::Null, "{k}");
        }
        assert!(patch["metadata"]["annotations"].as_object().unwrap().contains_key(ANNOTATION_APPLIED));
        assert_eq!(patch.as_object().unwrap().keys().collect::<Vec<_>>(), ["metadata"], "nothing but metadata");
        // The network label stays on the namespace: the mesh runs on.
        assert!(patch["metadata"]["labels"].get(NETWORK_LABEL).is_none());
    }

    #[test]
    fn data_keys_meshfed_does_not_write_make_it_recreate_an_exact_object() {
        let s = spec();
        let data = BTreeMap::from([(pki::CA_CERT.to_string(), ByteString(b"x".to_vec()))]);
        let facts = MemberFacts { cacerts: Some(data), ..Default::default() };
        let plan = member_plan(&fed(), "hub", &s, &s.clusters[0], facts);
        let cacerts = plan.objects.iter().find(|d| d.key == cacerts_key("istio-system")).unwrap();
        let mut observed = cacerts.body.clone();
        assert_eq!(write_for(&fed(), Some(&observed), cacerts), Ok(Write::Nothing));
        observed["data"]["istio-generated"] = "".into();
        assert_eq!(write_for(&fed(), Some(&observed), cacerts), Ok(Write::Recreate));
    }

    #[test]
    fn a_claim_tells_us_from_a_duplicate_and_from_another_federation_or_hub() {
        let s = spec();
        let c = claim(&fed(), "hub-a", &s, "east");
        assert_eq!(claim_holder(&c.metadata, &fed(), "hub-a", "east"), ClaimHolder::Us);
        assert_eq!(claim_holder(&c.metadata, &fed(), "hub-a", "west"), ClaimHolder::UsAs("east".into()));
        let other = FederationRef { namespace: "mesh-system".into(), name: "staging".into() };
        assert_eq!(
            claim_holder(&c.metadata, &other, "hub-a", "east"),
            ClaimHolder::Other { federation: "mesh-system/prod".into(), hub: "hub-a".into() }
        );
        assert!(matches!(claim_holder(&c.metadata, &fed(), "hub-b", "east"), ClaimHolder::Other { .. }));
    }

    /// A valid label value: at most 63 characters of `[A-Za-z0-9_.-]`, beginning and ending with an alphanumeric.
    fn valid_label_value(v: &str) -> bool {
        let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
        v.len() <= 63
            && v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && (v.is_empty() || (alnum(v.chars().next()) && alnum(v.chars().last())))
    }

    #[test]
    fn a_federation_name_of_any_valid_length_labels_what_it_owns_consistently() {
        let s = spec();
        let long =
            |c: char| FederationRef { namespace: "mesh-system".into(), name: format!("{}{c}", "a.b-".repeat(63)) };
        let (one, two) = (long('x'), long('y'));
        assert_eq!(one.name.len(), 253, "the longest name Kubernetes accepts");
        // Every label of every object planned is a valid label value, and the federation's label tells them apart.
        for fref in [&one, &two] {
            let plan = member_plan(fref, "hub", &s, &s.clusters[0], MemberFacts::default());
            for d in &plan.objects {
                let labels = d.body["metadata"]["labels"].as_object().unwrap();
                assert!(labels.values().all(|v| valid_label_value(v.as_str().unwrap())), "{}: {labels:?}", d.key);
                assert!(labelled_for(&d.body, fref, "east"), "{}", d.key);
                assert_eq!(write_for(fref, Some(&d.body), d), Ok(Write::Nothing), "{}", d.key);
            }
            let c = claim(fref, "hub", &s, "east");
            assert_eq!(claim_holder(&c.metadata, fref, "hub", "east"), ClaimHolder::Us);
        }
        assert_ne!(one.name_label(), two.name_label(), "two long names sharing a prefix differ in their labels");
        // ...so that one never writes over, prunes or claims what the other owns.
        let theirs = member_plan(&two, "hub", &s, &s.clusters[0], MemberFacts::default());
        let sa = &theirs.objects[2];
        assert!(matches!(write_for(&one, Some(&sa.body), sa), Err(Foreign { .. })));
        assert!(!labelled_for(&sa.body, &one, "east"));
        let c = claim(&two, "hub", &s, "east");
        assert!(matches!(claim_holder(&c.metadata, &one, "hub", "east"), ClaimHolder::Other { .. }));
        // The cleanup selector is made of the same values.
        assert!(one.selector("east").contains(&format!("meshfed.io/federation={}", one.name_label())));
        // A name that fits is its own label: nothing changes for existing federations.
        assert_eq!(fed().name_label(), "prod");
        let max = FederationRef { name: "n".repeat(63), ..fed() };
        assert_eq!(max.name_label(), max.name);
    }

    #[test]
    fn the_root_secret_name_fits_for_any_federation_name() {
        assert_eq!(crate::trust::root_secret_name("prod"), "prod-root-ca");
        let n245 = "r".repeat(245);
        assert_eq!(crate::trust::root_secret_name(&n245), format!("{n245}-root-ca"));
        let (a, b) = (format!("{}a", "r".repeat(252)), format!("{}b", "r".repeat(252)));
        let (ra, rb) = (crate::trust::root_secret_name(&a), crate::trust::root_secret_name(&b));
        assert!(ra.len() <= 253 && ra.ends_with("-root-ca"), "{ra}");
        assert_ne!(ra, rb);
    }

    fn spec_of(clusters: &str) -> MeshFederationSpec {
        serde_saphyr::from_str(&format!("meshID: m\ntrust: {{root: {{generate: {{}}}}}}\nclusters:\n{clusters}"))
            .unwrap()
    }

    fn secret_for(holder: &ClusterSpec, target: &str, spec: &MeshFederationSpec) -> Secret {
        let t = remote::RemoteTarget {
            cluster: target.into(),
            server: format!("https://{target}.example:6443"),
            ca_data_base64: None,
            tls_server_name: None,
        };
        remote::remote_secret(&fed(), spec, holder, &t, &remote::ReaderToken::new("t"))
    }

    /// What prune removes from `holder` that holds remote secrets for `held` (namespace, target) under `spec`.
    fn pruned_secrets(spec: &MeshFederationSpec, holder: &str, held: &[(&str, &str)]) -> Vec<String> {
        let cluster = ClusterSpec { name: holder.into(), ..spec.clusters[0].clone() };
        let cluster = spec.clusters.iter().find(|c| c.name == holder).unwrap_or(&cluster);
        let plan = match spec.clusters.iter().any(|c| c.name == holder) {
            true => member_plan(&fed(), "hub", spec, cluster, MemberFacts::default()),
            false => MemberPlan::default(),
        };
        let observed: Vec<(ObjectKey, Value)> = held
            .iter()
            .map(|(ns, target)| {
                let mut s = secret_for(cluster, target, spec);
                s.metadata.namespace = Some(ns.to_string());
                (remote_secret_key(ns, target), serde_json::to_value(s).unwrap())
            })
            .collect();
        to_prune(&fed(), holder, &plan, observed.iter().map(|(k, v)| (k, v)))
            .into_iter()
            .map(|p| p.key().to_string())
            .collect()
    }

    #[test]
    fn a_primary_that_becomes_a_remote_loses_its_remote_secrets_and_its_peers_keep_theirs_of_it() {
        let two = "- {name: east, network: n1, kubeconfigSecretRef: {name: e}}\n";
        let before = spec_of(&format!("{two}- {{name: west, network: n1, kubeconfigSecretRef: {{name: w}}}}\n"));
        assert!(pruned_secrets(&before, "west", &[("istio-system", "east")]).is_empty());
        let after = spec_of(&format!(
            "{two}- {{name: west, network: n1, role: Remote, controlPlane: east, kubeconfigSecretRef: {{name: w}}}}\n"
        ));
        assert_eq!(
            pruned_secrets(&after, "west", &[("istio-system", "east")]),
            ["Secret istio-system/istio-remote-secret-east"]
        );
        // east still discovers west, now a Remote it serves.
        assert!(pruned_secrets(&after, "east", &[("istio-system", "west")]).is_empty());
    }

    #[test]
    fn a_removed_cluster_loses_every_secret_and_its_peers_lose_theirs_of_it() {
        let s = spec_of(
            "- {name: east, network: n1, kubeconfigSecretRef: {name: e}}\n- {name: west, network: n2, kubeconfigSecretRef: {name: w}}\n",
        );
        assert_eq!(
            pruned_secrets(&s, "east", &[("istio-system", "west"), ("istio-system", "gone")]),
            ["Secret istio-system/istio-remote-secret-gone"]
        );
        assert_eq!(pruned_secrets(&s, "gone", &[("istio-system", "east"), ("istio-system", "west")]).len(), 2);
    }

    #[test]
    fn a_moved_istio_namespace_loses_the_secrets_of_the_old_one() {
        let s = spec_of(
            "- {name: east, network: n1, kubeconfigSecretRef: {name: e}}\n- {name: west, network: n2, kubeconfigSecretRef: {name: w}}\n",
        );
        assert_eq!(
            pruned_secrets(&s, "east", &[("istio-old", "west"), ("istio-system", "west")]),
            ["Secret istio-old/istio-remote-secret-west"]
        );
    }

    #[test]
    fn a_remote_secret_is_rewritten_when_its_server_labels_data_or_token_change_and_not_otherwise() {
        let s = spec_of(
            "- {name: east, network: n1, kubeconfigSecretRef: {name: e}}\n- {name: west, network: n2, kubeconfigSecretRef: {name: w}}\n",
        );
        let desired = Desired::of(&secret_for(&s.clusters[0], "west", &s)).exact();
        let mut observed = desired.body.clone();
        observed["metadata"]["uid"] = "u".into();
        observed["metadata"]["labels"]["someone/else"] = "x".into();
        observed["type"] = "Opaque".into();
        assert_eq!(write_for(&fed(), Some(&observed), &desired), Ok(Write::Nothing));
        let mut unlabelled = observed.clone();
        unlabelled["metadata"]["labels"].as_object_mut().unwrap().remove(istio::MULTI_CLUSTER_LABEL);
        assert_eq!(write_for(&fed(), Some(&unlabelled), &desired), Ok(Write::Apply));
        let mut extra = observed.clone();
        extra["data"]["north"] = "eA==".into();
        assert_eq!(write_for(&fed(), Some(&extra), &desired), Ok(Write::Recreate));
        let mut moved = observed.clone();
        moved["data"]["west"] = "b3RoZXI=".into();
        assert_eq!(write_for(&fed(), Some(&moved), &desired), Ok(Write::Apply));
    }
}

#[cfg(test)]
#[path = "member_ambient_tests.rs"]
mod ambient_tests;
