//! The Istio control plane of every member: one Sail operator `Istio` resource (ISTIO-FACTS.md section 7), and
//! whether it is ready, read from the status the Sail operator writes.

use std::collections::BTreeMap;

use meshfed_api::{ClusterRole, ClusterSpec, MeshFederationSpec};
use serde_json::{Value, json};

use crate::{
    conditions::Reason,
    gateway::{self, GatewayAddress},
    plan::{Failure, FederationRef},
};

/// The name of the `Istio` resource in every member. It is cluster-scoped, and `default` keeps Istio's usual
/// injection labels working (`istio-injection=enabled` selects the revision named `default`).
pub const ISTIO_NAME: &str = "default";
/// On a Remote's Istio namespace: the Primary whose istiod serves it.
pub const CONTROL_PLANE_CLUSTERS_ANNOTATION: &str = "topology.istio.io/controlPlaneClusters";

/// The `Istio` resource of `cluster`, or why it cannot be written yet: a Remote waits for its Primary's gateway
/// address. `gateways` holds the gateway address of every cluster where it is known.
pub fn istio(
    fref: &FederationRef,
    spec: &MeshFederationSpec,
    cluster: &ClusterSpec,
    gateways: &BTreeMap<String, GatewayAddress>,
) -> Result<Value, Failure> {
    let mut global = json!({
        "meshID": spec.mesh_id,
        "multiCluster": {"clusterName": cluster.name},
        "network": cluster.network,
    });
    let mut computed = json!({});
    let mut profile = None;
    match cluster.role {
        ClusterRole::Primary => {
            if gateway::serves_remotes(spec, cluster) {
                global["externalIstiod"] = true.into();
            }
            if let Some(networks) = gateway::mesh_networks(spec, gateways) {
                global["meshNetworks"] = networks;
            }
        }
        ClusterRole::Remote => {
            let primary = cluster.control_plane.as_deref().unwrap_or_default();
            let Some(address) = gateways.get(primary).and_then(|g| g.addresses.first()) else {
                return Err(Failure::new(
                    Reason::AwaitingPrimaryGateway,
                    format!("waiting for the gateway address of its control plane {primary}"),
                ));
            };
            global["remotePilotAddress"] = address.clone().into();
            computed["istiodRemote"] =
                json!({"injectionPath": format!("/inject/cluster/{}/net/{}", cluster.name, cluster.network)});
            profile = Some("remote");
        }
    }
    computed["global"] = global;
    let mut values = spec.istio.values.clone().filter(Value::is_object).unwrap_or_else(|| json!({}));
    merge(&mut values, computed);
    let mut body = json!({
        "apiVersion": "sailoperator.io/v1",
        "kind": "Istio",
        "metadata": {"name": ISTIO_NAME, "labels": fref.owned_labels(&cluster.name)},
        "spec": {"namespace": spec.istio.namespace, "values": values},
    });
    if let Some(version) = &spec.istio.version {
        body["spec"]["version"] = version.clone().into();
    }
    if let Some(profile) = profile {
        body["spec"]["profile"] = profile.into();
    }
    Ok(body)
}

/// Merges `over` into `base`, object by object; where both set a key to something else than an object, `over` wins.
fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, o) => *b = o,
    }
}

/// Whether the member's `Istio` (as the member holds it) is ready: the Sail operator's `Ready` condition is True for
/// the generation meshfed wrote.
pub fn istio_ready(observed: Option<&Value>) -> Result<(), Failure> {
    let Some(istio) = observed else {
        return Err(Failure::new(Reason::IstioNotReady, "the Istio resource is not there yet"));
    };
    let status = &istio["status"];
    let ready = status["conditions"].as_array().and_then(|c| c.iter().find(|c| c["type"] == "Ready"));
    let current =
        status["observedGeneration"].is_null() || status["observedGeneration"] == istio["metadata"]["generation"];
    match ready {
        Some(c) if c["status"] == "True" && current => Ok(()),
        Some(c) if current => Err(Failure::new(
            Reason::IstioNotReady,
            format!(
                "the Sail operator reports Istio {ISTIO_NAME} not ready ({}): {}",
                c["reason"].as_str().unwrap_or_default(),
                c["message"].as_str().unwrap_or_default()
            ),
        )),
        _ => Err(Failure::new(Reason::IstioNotReady, "the Sail operator has not reported on this generation yet")),
    }
}
