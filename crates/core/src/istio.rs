//! Istio's own names: the labels, annotations, Secrets and Services that Istio defines and reads, in one place, so that
//! every module that writes for Istio uses the same spelling (ISTIO-FACTS.md has where each comes from).

use meshfed_api::IstioSpec;

/// Istio's network label (ISTIO-FACTS.md section 4).
pub const NETWORK_LABEL: &str = "topology.istio.io/network";

/// The revision whose istiod Service is plain `istiod` and which `istio-injection=enabled` selects.
pub const DEFAULT_REVISION: &str = "default";

/// The name of istiod's Service in the Istio namespace: `istiod` for the default revision, else
/// `istiod-<revision>` (as the Sail operator names it).
pub fn istiod_service(istio: &IstioSpec) -> String {
    match istio.revision.as_str() {
        DEFAULT_REVISION => "istiod".into(),
        revision => format!("istiod-{revision}"),
    }
}

/// On a Remote's Istio namespace: the Primary whose istiod serves it.
pub const CONTROL_PLANE_CLUSTERS_ANNOTATION: &str = "topology.istio.io/controlPlaneClusters";

/// The prefix of a remote secret's name; the target cluster's name follows.
pub const REMOTE_SECRET_PREFIX: &str = "istio-remote-secret-";
/// The label by which istiod finds remote secrets; its value is `"true"`.
pub const MULTI_CLUSTER_LABEL: &str = "istio/multiCluster";
/// The annotation naming the cluster a remote secret gives access to (written by istioctl; istiod does not need it).
pub const CLUSTER_ANNOTATION: &str = "networking.istio.io/cluster";

/// The name of the remote secret that gives access to `target`: `istio-remote-secret-<target>`.
pub fn remote_secret_name(target: &str) -> String {
    format!("{REMOTE_SECRET_PREFIX}{target}")
}

/// The Sail operator's `Istio` CRD, whose schema lists the Istio versions that operator installs.
pub const SAIL_ISTIO_CRD: &str = "istios.sailoperator.io";
