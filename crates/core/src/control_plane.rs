//! The Istio control plane of every member: one Sail operator `Istio` resource (ISTIO-FACTS.md section 7), and
//! whether it is ready, read from the status the Sail operator writes.

use std::collections::BTreeMap;

use meshfed_api::{ClusterRole, ClusterSpec, DataPlane, MeshFederationSpec};
use serde_json::{Value, json};

use crate::{
    conditions::Reason,
    federation::{Failure, FederationRef},
    gateway::{self, GatewayAddress},
    kinds, topology,
};

/// The annotation on istiod's pods (through the `Istio`'s `spec.values.pilot.podAnnotations`, which the Sail
/// operator renders into istiod's Deployment) whose change rolls istiod: the digest of the remote secrets it was
/// started for, on an Istio version that needs a restart to take an updated remote secret (`plan::istiod_restarts`).
pub const RESTART_ANNOTATION: &str = "meshfed.io/remote-secrets";

/// The restart marker an `Istio` (as a member holds it) carries, if any.
pub fn restart_marker(istio: &Value) -> Option<&str> {
    istio["spec"]["values"]["pilot"]["podAnnotations"][RESTART_ANNOTATION].as_str()
}

/// The `Istio` resource of `cluster`, or why it cannot be written yet: a Remote waits for its Primary's gateway
/// address. `gateways` holds the gateway address of every cluster where it is known; `restart` is the restart marker
/// of a Primary's istiod, where it has one.
pub fn istio(
    fref: &FederationRef,
    spec: &MeshFederationSpec,
    cluster: &ClusterSpec,
    gateways: &BTreeMap<String, GatewayAddress>,
    restart: Option<&str>,
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
            // istiod takes a new root bundle from its plugged-in CA files only with this; a root rotation needs it.
            computed["pilot"] = json!({"env": {"ISTIO_MULTIROOT_MESH": "true"}});
            if let Some(marker) = restart {
                computed["pilot"]["podAnnotations"] = json!({RESTART_ANNOTATION: marker});
            }
            if topology::serves_remotes(spec, cluster) {
                global["externalIstiod"] = true.into();
            }
            if spec.data_plane == DataPlane::Ambient {
                // istiod in ambient finds every network's gateway by itself (meshNetworks is not read there).
                computed["pilot"]["env"]["AMBIENT_ENABLE_MULTI_NETWORK"] = "true".into();
                computed["pilot"]["env"]["AMBIENT_ENABLE_MULTI_NETWORK_INGRESS"] = "true".into();
                profile = Some("ambient");
            } else if let Some(networks) = gateway::mesh_networks(spec, gateways) {
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
        "metadata": {"name": spec.istio.revision, "labels": fref.owned_labels(&cluster.name)},
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

/// The ambient data plane of `cluster` (ISTIO-FACTS.md section 14): the Sail `IstioCNI` and `ZTunnel`, both
/// cluster-scoped singletons named `default`, in the Istio namespace (which meshfed creates and labels with the
/// network), on the federation's Istio version, ztunnel with the cluster's name and network.
pub fn ambient_data_plane(fref: &FederationRef, spec: &MeshFederationSpec, cluster: &ClusterSpec) -> [Value; 2] {
    let metadata = json!({"name": kinds::AMBIENT_SINGLETON, "labels": fref.owned_labels(&cluster.name)});
    let mut cni = json!({
        "apiVersion": "sailoperator.io/v1",
        "kind": "IstioCNI",
        "metadata": metadata,
        "spec": {"namespace": spec.istio.namespace, "profile": "ambient"},
    });
    let mut ztunnel = json!({
        "apiVersion": "sailoperator.io/v1",
        "kind": "ZTunnel",
        "metadata": metadata,
        "spec": {
            "namespace": spec.istio.namespace,
            "values": {"ztunnel": {"multiCluster": {"clusterName": cluster.name}, "network": cluster.network}},
        },
    });
    if let Some(version) = &spec.istio.version {
        cni["spec"]["version"] = version.clone().into();
        ztunnel["spec"]["version"] = version.clone().into();
    }
    [cni, ztunnel]
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
    sail_ready("Istio", observed)
}

/// Whether a Sail operator resource of `kind` (`Istio`, `IstioCNI`, `ZTunnel`), as the member holds it, is ready:
/// its `Ready` condition is True for the generation meshfed wrote.
pub fn sail_ready(kind: &str, observed: Option<&Value>) -> Result<(), Failure> {
    let Some(istio) = observed else {
        return Err(Failure::new(Reason::IstioNotReady, format!("the {kind} resource is not there yet")));
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
                "the Sail operator reports {kind} {} not ready ({}): {}",
                istio["metadata"]["name"].as_str().unwrap_or_default(),
                c["reason"].as_str().unwrap_or_default(),
                c["message"].as_str().unwrap_or_default()
            ),
        )),
        _ => Err(Failure::new(Reason::IstioNotReady, "the Sail operator has not reported on this generation yet")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> MeshFederationSpec {
        serde_saphyr::from_str(
            "meshID: m\nistio: {values: {global: {meshID: theirs, logging: {level: debug}}, pilot: {replicaCount: 2}}}\ntrust: {root: {generate: {}}}\nclusters:\n- {name: east, network: n1, kubeconfigSecretRef: {name: e}}\n- {name: r, network: n2, role: Remote, controlPlane: east, kubeconfigSecretRef: {name: r}}\n",
        )
        .unwrap()
    }

    fn fed() -> FederationRef {
        FederationRef { namespace: "ns".into(), name: "f".into() }
    }

    #[test]
    fn a_primary_that_serves_remotes_runs_an_external_istiod_with_the_users_values_underneath() {
        let s = spec();
        let istio = istio(&fed(), &s, &s.clusters[0], &BTreeMap::new(), None).unwrap();
        let values = &istio["spec"]["values"];
        assert_eq!(values["global"]["meshID"], "m", "meshfed's value wins");
        assert_eq!(values["global"]["logging"]["level"], "debug", "the user's other values stay");
        assert_eq!(values["pilot"]["replicaCount"], 2);
        assert_eq!(values["pilot"]["env"]["ISTIO_MULTIROOT_MESH"], "true", "istiod takes a new root bundle");
        assert_eq!(values["global"]["externalIstiod"], true);
        assert_eq!(values["global"]["multiCluster"]["clusterName"], "east");
        assert!(istio["spec"]["profile"].is_null() && istio["spec"]["version"].is_null());
        assert_eq!(istio["metadata"]["name"], "default", "the default revision");
    }

    #[test]
    fn the_revision_names_the_istio_resource_and_istiods_service() {
        let mut s = spec();
        assert_eq!(crate::istio::istiod_service(&s.istio), "istiod");
        s.istio.revision = "mesh1".into();
        assert_eq!(istio(&fed(), &s, &s.clusters[0], &BTreeMap::new(), None).unwrap()["metadata"]["name"], "mesh1");
        assert_eq!(crate::istio::istiod_service(&s.istio), "istiod-mesh1");
    }

    #[test]
    fn a_remote_waits_for_its_primarys_gateway_then_points_at_it() {
        let s = spec();
        let waiting = istio(&fed(), &s, &s.clusters[1], &BTreeMap::new(), None).unwrap_err();
        assert_eq!(waiting.reason, Reason::AwaitingPrimaryGateway);
        let at = GatewayAddress { addresses: vec!["203.0.113.9".into(), "203.0.113.10".into()], port: 15443 };
        let istio = istio(&fed(), &s, &s.clusters[1], &BTreeMap::from([("east".into(), at)]), Some("ignored")).unwrap();
        assert_eq!(istio["spec"]["profile"], "remote");
        assert_eq!(istio["spec"]["values"]["global"]["remotePilotAddress"], "203.0.113.9");
        assert_eq!(istio["spec"]["values"]["istiodRemote"]["injectionPath"], "/inject/cluster/r/net/n2");
        assert!(istio["spec"]["values"]["global"]["externalIstiod"].is_null());
        assert!(istio["spec"]["values"]["pilot"]["podAnnotations"].is_null(), "a Remote runs no istiod to restart");
    }

    #[test]
    fn a_primarys_restart_marker_is_an_annotation_on_istiods_pods_beside_the_users_own() {
        let mut s = spec();
        s.istio.values = Some(json!({"pilot": {"podAnnotations": {"team": "mesh"}}}));
        let istio = istio(&fed(), &s, &s.clusters[0], &BTreeMap::new(), Some("sha256:ab")).unwrap();
        assert_eq!(
            istio["spec"]["values"]["pilot"]["podAnnotations"],
            json!({"team": "mesh", RESTART_ANNOTATION: "sha256:ab"})
        );
        assert_eq!(restart_marker(&istio), Some("sha256:ab"));
    }

    #[test]
    fn ready_means_the_sail_operator_said_so_for_this_generation() {
        let observed = |generation: i64, status: &str| json!({"metadata": {"generation": 2}, "status": {"observedGeneration": generation, "conditions": [{"type": "Ready", "status": status, "reason": "IstiodNotReady", "message": "istiod has 0 ready pods"}]}});
        assert_eq!(istio_ready(Some(&observed(2, "True"))), Ok(()));
        let stale = istio_ready(Some(&observed(1, "True"))).unwrap_err();
        assert!(stale.message.contains("not reported on this generation"), "{}", stale.message);
        let not_ready = istio_ready(Some(&observed(2, "False"))).unwrap_err();
        assert_eq!(not_ready.reason, Reason::IstioNotReady);
        assert!(not_ready.message.contains("IstiodNotReady") && not_ready.message.contains("0 ready pods"));
        assert!(istio_ready(None).is_err());
    }
}
