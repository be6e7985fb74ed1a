//! The federation's vocabulary, shared by every step: which federation a plan is for, the labels and annotations
//! meshfed puts on what it writes, and why something about a member is not as desired.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Namespace;

use crate::conditions::Reason;

/// The field manager of every write meshfed makes.
pub const FIELD_MANAGER: &str = "meshfed";
/// Marks everything meshfed writes in a member.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The name of the federation that owns an object in a member (shortened and hashed when over 63 characters:
/// [`FederationRef::name_label`]).
pub const LABEL_FEDERATION: &str = "meshfed.io/federation";
/// The hub namespace of the federation that owns an object in a member.
pub const LABEL_FEDERATION_NAMESPACE: &str = "meshfed.io/federation-namespace";
/// The member cluster an object was written for.
pub const LABEL_CLUSTER: &str = "meshfed.io/cluster";
/// On a namespace that meshfed created (rather than found), so that cleanup deletes it only then.
pub const ANNOTATION_CREATED: &str = "meshfed.io/created-namespace";
/// On an object in a member that meshfed took over (`existingObjects: Adopt`) rather than created.
pub const ANNOTATION_ADOPTED: &str = "meshfed.io/adopted";
/// On a federation: the clusters (comma-separated names) that cleanup may let go of without cleaning them, for a
/// member that is gone for good while it still holds objects of the federation.
pub const RELEASE_ANNOTATION: &str = "meshfed.io/release-clusters";

/// Which federation a plan is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederationRef {
    pub namespace: String,
    pub name: String,
}

/// `namespace/name`, as in logs and metric labels.
impl std::fmt::Display for FederationRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The longest label value Kubernetes accepts, in characters.
pub const MAX_LABEL_VALUE: usize = 63;

/// `value` as a label value: itself when it fits in [`MAX_LABEL_VALUE`] characters, else its first 46 characters,
/// a dash and 16 hex digits of the SHA-256 of the whole value. A federation's name may be 253 characters long
/// while a label value may hold 63, so [`LABEL_FEDERATION`] carries this form: every name works, the short ones
/// (nearly all) stay readable as they are, and two long names differ in their hash.
pub fn label_value(value: &str) -> String {
    use sha2::{Digest, Sha256};
    if value.len() <= MAX_LABEL_VALUE {
        return value.into();
    }
    let hash: String = Sha256::digest(value.as_bytes())[..8].iter().map(|b| format!("{b:02x}")).collect();
    let mut keep = MAX_LABEL_VALUE - hash.len() - 1;
    while !value.is_char_boundary(keep) {
        keep -= 1;
    }
    // A label value must end with an alphanumeric character; the hash does.
    format!("{}-{hash}", value[..keep].trim_end_matches(['.', '-', '_']))
}

impl FederationRef {
    /// The value of [`LABEL_FEDERATION`] on what meshfed writes for this federation: its name, or for a name
    /// over 63 characters the shortened form of [`label_value`]. Compare labels with this, never with `name`.
    pub fn name_label(&self) -> String {
        label_value(&self.name)
    }

    /// Whether an object's [`LABEL_FEDERATION_NAMESPACE`] and [`LABEL_FEDERATION`] values name this federation.
    pub fn is_labelled(&self, namespace_label: &str, name_label: &str) -> bool {
        namespace_label == self.namespace && name_label == self.name_label()
    }

    /// The labels that every object meshfed writes for `cluster` carries.
    pub fn owned_labels(&self, cluster: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (MANAGED_BY.into(), FIELD_MANAGER.into()),
            (LABEL_FEDERATION.into(), self.name_label()),
            (LABEL_FEDERATION_NAMESPACE.into(), self.namespace.clone()),
            (LABEL_CLUSTER.into(), cluster.into()),
        ])
    }

    /// The label selector matching every object meshfed wrote for `cluster` of this federation.
    pub fn selector(&self, cluster: &str) -> String {
        self.owned_labels(cluster).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
    }
}

/// Whether meshfed created this namespace (and so may delete it on cleanup).
pub fn created_by_meshfed(ns: &Namespace) -> bool {
    ns.metadata.annotations.as_ref().is_some_and(|a| a.get(ANNOTATION_CREATED).is_some_and(|v| v == "true"))
}

/// Whether the release annotation's value (`a, b`) names `cluster`.
pub fn release_requested(annotation: Option<&String>, cluster: &str) -> bool {
    annotation.is_some_and(|a| a.split(',').any(|c| c.trim() == cluster))
}

/// Why something about a member is not as desired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: Reason,
    pub message: String,
}

impl Failure {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self { reason, message: message.into() }
    }
}
