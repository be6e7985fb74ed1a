//! What a member holds in ambient mode (ISTIO-FACTS.md section 14), and what a switch between data planes prunes.

use super::*;
use meshfed_api::DataPlane;

fn fed() -> FederationRef {
    FederationRef { namespace: "mesh-system".into(), name: "prod".into() }
}

/// Two Primaries on two networks, in `mode`.
fn spec(mode: DataPlane) -> MeshFederationSpec {
    let mut spec: MeshFederationSpec = serde_saphyr::from_str(
        "meshID: m\nistio: {version: v1.30.3}\ntrust: {root: {generate: {}}}\nclusters:\n- {name: east, network: n1, kubeconfigSecretRef: {name: east}}\n- {name: west, network: n2, kubeconfigSecretRef: {name: west}}\n",
    )
    .unwrap();
    spec.data_plane = mode;
    spec
}

/// Each object of the plan as `group/Kind namespace/name`: the two `Gateway` kinds told apart.
fn objects(plan: &MemberPlan) -> Vec<String> {
    plan.objects
        .iter()
        .map(|d| format!("{}/{} {}", d.key.kind.group, d.key.kind.kind, d.key.to_string().split_once(' ').unwrap().1))
        .collect()
}

fn body(plan: &MemberPlan, kind: OwnedKind) -> &Value {
    &plan.objects.iter().find(|d| d.key.kind == kind).unwrap_or_else(|| panic!("no {}", kind.kind)).body
}

fn east(spec: &MeshFederationSpec, facts: MemberFacts<'_>) -> MemberPlan {
    member_plan(&fed(), "hub", spec, &spec.clusters[0], facts)
}

#[test]
fn an_ambient_member_holds_the_ambient_control_plane_ztunnel_cni_and_an_hbone_gateway_and_no_sidecar_gateway() {
    let s = spec(DataPlane::Ambient);
    let plan = east(&s, MemberFacts::default());
    assert_eq!(
        objects(&plan),
        [
            "/ConfigMap kube-system/meshfed-claim.istio-system",
            "/Namespace istio-system",
            "/ServiceAccount istio-system/meshfed-reader",
            "rbac.authorization.k8s.io/ClusterRole meshfed-reader.mesh-system.prod",
            "rbac.authorization.k8s.io/ClusterRoleBinding meshfed-reader.mesh-system.prod",
            "sailoperator.io/Istio default",
            "sailoperator.io/IstioCNI default",
            "sailoperator.io/ZTunnel default",
            "gateway.networking.k8s.io/Gateway istio-system/istio-ambient-eastwestgateway",
        ]
    );
    // Trust and remote access as for sidecars: cacerts and the remote secret of west are kept (none to write here).
    assert!(plan.keep.contains(&cacerts_key("istio-system")));
    assert!(plan.keep.contains(&remote_secret_key("istio-system", "west")));

    let istio = body(&plan, ISTIO);
    assert_eq!(istio["spec"]["profile"], "ambient");
    let values = &istio["spec"]["values"];
    assert_eq!(values["pilot"]["env"]["AMBIENT_ENABLE_MULTI_NETWORK"], "true");
    assert_eq!(values["pilot"]["env"]["AMBIENT_ENABLE_MULTI_NETWORK_INGRESS"], "true");
    assert_eq!(
        values["pilot"]["env"]["ISTIO_MULTIROOT_MESH"], "true",
        "a root rotation reaches ztunnel through cacerts"
    );
    assert_eq!(values["global"], json!({"meshID": "m", "multiCluster": {"clusterName": "east"}, "network": "n1"}));

    let cni = body(&plan, ISTIO_CNI);
    assert_eq!(cni["spec"], json!({"namespace": "istio-system", "profile": "ambient", "version": "v1.30.3"}));
    let ztunnel = body(&plan, ZTUNNEL);
    assert_eq!(
        ztunnel["spec"],
        json!({"namespace": "istio-system", "version": "v1.30.3", "values": {"ztunnel": {"multiCluster": {"clusterName": "east"}, "network": "n1"}}})
    );

    let gateway = body(&plan, KUBERNETES_GATEWAY);
    assert_eq!(gateway["metadata"]["labels"][NETWORK_LABEL], "n1");
    assert!(labelled_for(gateway, &fed(), "east"));
    assert_eq!(
        gateway["spec"],
        json!({"gatewayClassName": "istio-east-west", "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE", "tls": {"mode": "Terminate", "options": {"gateway.istio.io/tls-terminate-mode": "ISTIO_MUTUAL"}}}]})
    );
    // The control plane and data plane come last, after cacerts and the gateway.
    let last = APPLY_STAGES - 1;
    assert_eq!([ISTIO, ISTIO_CNI, ZTUNNEL].map(|k| apply_stage(&k)), [last; 3]);
    assert!(apply_stage(&KUBERNETES_GATEWAY) < last);
    assert!(apply_stage(&KUBERNETES_GATEWAY) >= apply_stage(&SECRET));
}

#[test]
fn an_ambient_members_gateway_address_is_the_one_its_gateway_reports() {
    let s = spec(DataPlane::Ambient);
    let waiting = east(&s, MemberFacts::default()).gateway.unwrap().unwrap_err();
    assert_eq!(waiting.reason, Reason::AwaitingGatewayService);
    let at = gateway::GatewayAddress { addresses: vec!["203.0.113.7".into()], port: 15008 };
    let facts = MemberFacts { gateways: BTreeMap::from([("east".into(), Ok(at.clone()))]), ..Default::default() };
    assert_eq!(east(&s, facts).gateway, Some(Ok(at)));
}

#[test]
fn a_member_without_the_gateway_api_or_the_sail_ambient_kinds_is_told_what_to_install_and_the_rest_converges() {
    let s = spec(DataPlane::Ambient);
    let facts = MemberFacts { unserved: BTreeSet::from([KUBERNETES_GATEWAY, ZTUNNEL]), ..Default::default() };
    let plan = east(&s, facts.clone());
    let gateway = plan.gateway.clone().unwrap().unwrap_err();
    assert_eq!(gateway.reason, Reason::GatewayAPIMissing);
    assert!(gateway.message.contains("gateway.networking.k8s.io/v1 Gateway"), "{}", gateway.message);
    let data_plane = plan.control_plane.clone().unwrap();
    assert_eq!(data_plane.reason, Reason::SailAmbientKindsMissing);
    assert!(
        data_plane.message.contains("ZTunnel") && !data_plane.message.contains("IstioCNI"),
        "{}",
        data_plane.message
    );
    // Nothing of a kind it does not serve is planned; the rest is.
    let kinds: BTreeSet<OwnedKind> = plan.objects.iter().map(|d| d.key.kind).collect();
    assert!(!kinds.contains(&KUBERNETES_GATEWAY) && !kinds.contains(&ZTUNNEL) && !kinds.contains(&ISTIO_CNI));
    assert!(kinds.contains(&ISTIO) && kinds.contains(&NAMESPACE) && kinds.contains(&SERVICE_ACCOUNT));
    // A sidecar federation does not need them.
    let sidecar = east(&spec(DataPlane::Sidecar), facts);
    assert!(sidecar.control_plane.is_none_or(|f| f.reason != Reason::SailAmbientKindsMissing));
    assert!(sidecar.gateway.unwrap().is_err_and(|f| f.reason != Reason::GatewayAPIMissing));
}

#[test]
fn an_ambient_control_plane_is_ready_once_the_sail_operator_reports_istio_cni_and_ztunnel_ready() {
    let s = spec(DataPlane::Ambient);
    let ready = json!({"metadata": {"name": "default", "generation": 1}, "status": {"observedGeneration": 1, "conditions": [{"type": "Ready", "status": "True"}]}});
    let not_ready = json!({"metadata": {"name": "default", "generation": 1}, "status": {"observedGeneration": 1, "conditions": [{"type": "Ready", "status": "False", "reason": "ReconcileError", "message": "no nodes"}]}});
    let facts = |cni, ztunnel| MemberFacts { istio: Some(&ready), ambient: [cni, ztunnel], ..Default::default() };
    assert_eq!(east(&s, facts(Some(&ready), Some(&ready))).control_plane, None);
    let waiting = east(&s, facts(Some(&ready), Some(&not_ready))).control_plane.unwrap();
    assert_eq!(waiting.reason, Reason::IstioNotReady);
    assert!(waiting.message.contains("ZTunnel default not ready (ReconcileError): no nodes"), "{}", waiting.message);
    let absent = east(&s, facts(None, Some(&ready))).control_plane.unwrap();
    assert!(absent.message.contains("IstioCNI"), "{}", absent.message);
}

/// What prune removes from east when it holds everything `from` planned and the plan is now `to`.
fn pruned_by_switch(from: DataPlane, to: DataPlane) -> Vec<String> {
    let held = east(&spec(from), MemberFacts::default());
    let plan = east(&spec(to), MemberFacts::default());
    let held: Vec<(ObjectKey, Value)> = held.objects.iter().map(|d| (d.key.clone(), d.body.clone())).collect();
    to_prune(&fed(), "east", &plan, held.iter().map(|(k, v)| (k, v)))
        .into_iter()
        .map(|p| match p {
            Prune::Delete(k) => format!("{}/{} {}", k.kind.group, k.kind.kind, k.name),
            other => panic!("{other:?}"),
        })
        .collect()
}

#[test]
fn switching_between_sidecar_and_ambient_prunes_exactly_the_old_modes_objects() {
    let mut to_ambient = pruned_by_switch(DataPlane::Sidecar, DataPlane::Ambient);
    to_ambient.sort();
    assert_eq!(
        to_ambient,
        [
            "/Service istio-eastwestgateway",
            "/ServiceAccount istio-eastwestgateway-service-account",
            "apps/Deployment istio-eastwestgateway",
            "networking.istio.io/Gateway cross-network-gateway",
            "policy/PodDisruptionBudget istio-eastwestgateway",
            "rbac.authorization.k8s.io/Role istio-eastwestgateway-sds",
            "rbac.authorization.k8s.io/RoleBinding istio-eastwestgateway-sds",
        ]
    );
    let mut to_sidecar = pruned_by_switch(DataPlane::Ambient, DataPlane::Sidecar);
    to_sidecar.sort();
    assert_eq!(
        to_sidecar,
        [
            "gateway.networking.k8s.io/Gateway istio-ambient-eastwestgateway",
            "sailoperator.io/IstioCNI default",
            "sailoperator.io/ZTunnel default",
        ]
    );
}

#[test]
fn a_node_agent_held_by_another_federation_says_a_cluster_is_in_one_ambient_federation_only() {
    let plan = east(&spec(DataPlane::Ambient), MemberFacts::default());
    let key = |kind: OwnedKind| plan.objects.iter().find(|d| d.key.kind == kind).unwrap().key.clone();
    for kind in [ZTUNNEL, ISTIO_CNI] {
        let message = held_by_another(&key(kind), "mesh-system/other");
        assert!(message.starts_with(&format!("{} belongs to federation mesh-system/other", key(kind))), "{message}");
        assert!(message.contains("one ambient federation only"), "{message}");
    }
    let message = held_by_another(&key(ISTIO), "mesh-system/other");
    assert_eq!(message, format!("{} belongs to federation mesh-system/other", key(ISTIO)));
}
