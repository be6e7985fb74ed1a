use meshfed_api::MeshFederation;

use super::*;
use crate::kinds::{CLAIM_NAMESPACE, ObjectKey, SECRET};

const EXAMPLES: [&str; 5] = [
    include_str!("../../../deploy/examples/ambient-multi-network.yaml"),
    include_str!("../../../deploy/examples/multi-primary.yaml"),
    include_str!("../../../deploy/examples/multi-primary-multi-network.yaml"),
    include_str!("../../../deploy/examples/primary-remote.yaml"),
    include_str!("../../../deploy/examples/primary-remote-multi-network.yaml"),
];

fn fed() -> FederationRef {
    FederationRef { namespace: "mesh-system".into(), name: "prod".into() }
}

/// Every object each example's members hold, with the Istio namespace moved to `istio_namespace`.
fn planned(istio_namespace: &str) -> Vec<Value> {
    EXAMPLES
        .iter()
        .flat_map(|yaml| {
            let mut f: MeshFederation = serde_saphyr::from_str(yaml).unwrap();
            f.spec.istio.namespace = istio_namespace.into();
            crate::render::render(&fed(), &f.spec, None).unwrap().into_iter().flat_map(|(_, objects)| objects)
        })
        .collect()
}

fn kind_of(object: &Value) -> OwnedKind {
    *OWNED_KINDS.iter().find(|k| k.kind == object["kind"] && k.api_version() == object["apiVersion"]).unwrap()
}

#[test]
fn every_object_of_every_topology_lives_where_its_kind_is_granted_and_the_hub_may_read_watch_apply_and_prune_it() {
    for istio_namespace in ["istio-system", "mesh"] {
        let permissions = member_permissions(&fed(), istio_namespace);
        let objects = planned(istio_namespace);
        assert!(objects.len() > 40, "the four topologies plan {} objects", objects.len());
        for object in objects {
            let kind = kind_of(&object);
            let (namespace, name) = (object["metadata"]["namespace"].as_str(), object["metadata"]["name"].as_str());
            assert_eq!(namespace, kinds::home_namespace(&kind, istio_namespace), "{object}");
            let allowed = |verb| allows(&permissions, kind.group, kind.plural, verb, namespace, name);
            for verb in ["get", "create", "patch", "delete"] {
                assert!(allowed(verb), "{verb} {} {namespace:?}/{name:?}", kind.kind);
            }
            for verb in ["list", "watch"] {
                assert!(allows(&permissions, kind.group, kind.plural, verb, namespace, None), "{verb} {}", kind.kind);
            }
        }
        // What meshfed reads by name, and the claim it creates.
        let claim = kinds::claim_key(istio_namespace);
        for key in [
            claim.clone(),
            kinds::namespace_key(istio_namespace),
            kinds::namespace_key(CLAIM_NAMESPACE),
            kinds::cacerts_key(istio_namespace),
            kinds::published_roots_key(istio_namespace),
            kinds::istio_key("default"),
        ] {
            let ObjectKey { kind, namespace, name } = &key;
            assert!(allows(&permissions, kind.group, kind.plural, "get", namespace.as_deref(), Some(name)), "{key}");
        }
        assert!(allows(&permissions, "", "configmaps", "create", Some(CLAIM_NAMESPACE), None));
        let token = |sa| allows(&permissions, "", "serviceaccounts/token", "create", Some(istio_namespace), Some(sa));
        assert!(token(READER_SERVICE_ACCOUNT) && !token("istiod"), "tokens of the reader only");
    }
}

#[test]
fn the_hub_reads_no_secret_outside_the_istio_namespace_and_writes_only_meshfeds_own_cluster_roles_and_namespace() {
    let permissions = member_permissions(&fed(), "istio-system");
    for verb in ["get", "list", "watch"] {
        assert!(!allows(&permissions, "", "secrets", verb, None, None), "{verb} Secrets cluster-wide");
        for ns in ["default", "kube-system", HUB_NAMESPACE] {
            assert!(!allows(&permissions, "", "secrets", verb, Some(ns), Some("x")), "{verb} Secrets in {ns}");
        }
    }
    assert!(allows(&permissions, "", "secrets", "list", Some("istio-system"), None));
    let reader = reader_cluster_role_name(&fed());
    for verb in ["create", "patch", "delete", "escalate", "bind"] {
        assert!(allows(&permissions, CLUSTER_ROLE.group, "clusterroles", verb, None, Some(&reader)), "{verb}");
        assert!(!allows(&permissions, CLUSTER_ROLE.group, "clusterroles", verb, None, Some("cluster-admin")), "{verb}");
    }
    assert!(!allows(&permissions, CLUSTER_ROLE.group, "clusterrolebindings", "patch", None, Some("x")));
    assert!(!allows(&permissions, "", "namespaces", "delete", None, Some("default")));
    assert!(!allows(&permissions, "", "configmaps", "list", Some("default"), None));
}

#[test]
fn the_rbac_is_the_permissions_one_cluster_role_and_one_role_per_namespace_bound_to_the_hubs_service_account() {
    let access = hub_access(&fed(), &["istio-system"]);
    let permissions = member_permissions(&fed(), "istio-system");
    let rules = |rules: &Option<Vec<PolicyRule>>| rules.as_ref().unwrap().len();
    let namespaced: Vec<(&str, usize)> =
        access.roles.iter().map(|(r, _)| (r.metadata.namespace.as_deref().unwrap(), rules(&r.rules))).collect();
    let count = |ns: &str| permissions.iter().filter(|p| p.namespace.as_deref() == Some(ns)).count();
    let roles = [("istio-system", count("istio-system")), ("kube-system", count("kube-system")), (HUB_NAMESPACE, 1)];
    assert_eq!(namespaced, roles);
    assert_eq!(rules(&access.cluster_role.rules), permissions.iter().filter(|p| p.namespace.is_none()).count());
    let cluster_wide = access.cluster_role.rules.as_ref().unwrap();
    assert!(
        cluster_wide.iter().all(|r| r.resources.as_ref().unwrap() != &[SECRET.plural]),
        "no Secret rule is cluster-wide"
    );
    assert_eq!(hub_identity_name(&fed()), "meshfed-hub.mesh-system.prod");
    assert_eq!(hub_user(&fed()), "system:serviceaccount:meshfed-system:meshfed-hub.mesh-system.prod");
    let (_, binding) = &access.roles[0];
    assert_eq!(binding.role_ref.kind, "Role");
    assert_eq!(binding.subjects.as_ref().unwrap()[0].namespace.as_deref(), Some(HUB_NAMESPACE));
    let kinds: Vec<String> = access.objects().iter().map(|o| o["kind"].as_str().unwrap().to_string()).collect();
    assert_eq!(
        kinds,
        [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Role",
            "RoleBinding",
            "Role",
            "RoleBinding"
        ]
    );
    assert!(access.objects().iter().all(|o| o["metadata"]["labels"][JOIN_LABEL] == "meshfed-hub.mesh-system.prod"));
}

fn jwt(sub: &str, iat: i64, exp: i64) -> String {
    use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
    let part = |v: serde_json::Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(&v).unwrap());
    format!(
        "{}.{}.c2ln",
        part(serde_json::json!({"alg": "RS256"})),
        part(serde_json::json!({"sub": sub, "iat": iat, "exp": exp}))
    )
}

#[test]
fn the_hubs_kubeconfig_is_inline_and_stays_while_its_token_is_fresh_for_the_same_server_ca_and_identity() {
    let (day, ttl) = (86_400, std::time::Duration::from_secs(30 * 86_400));
    let at = |s: i64| jiff::Timestamp::from_second(s).unwrap();
    let token = jwt(&hub_user(&fed()), 0, 30 * day);
    let yaml = hub_kubeconfig("east", "https://east:6443", Some(b"CA PEM"), &token);
    let (_, server) = crate::kubeconfig::check(&yaml).expect("what the operator accepts");
    assert_eq!(server, "https://east:6443");
    let current =
        |yaml: &str, server, ca: &[u8], now| hub_kubeconfig_current(yaml, server, Some(ca), &fed(), ttl, at(now));
    assert!(current(&yaml, "https://east:6443", b"CA PEM", day), "running join again changes nothing");
    assert!(!current(&yaml, "https://east:6443", b"CA PEM", 25 * day), "a token past its refresh point is replaced");
    assert!(!current(&yaml, "https://other:6443", b"CA PEM", day), "another server");
    assert!(!current(&yaml, "https://east:6443", b"other CA", day), "another CA");
    let other = FederationRef { namespace: "mesh-system".into(), name: "staging".into() };
    let theirs = hub_kubeconfig("east", "https://east:6443", Some(b"CA PEM"), &jwt(&hub_user(&other), 0, 30 * day));
    assert!(!current(&theirs, "https://east:6443", b"CA PEM", day), "another federation's identity");
}

#[test]
fn a_member_moving_its_istio_namespace_grants_both_until_the_move_is_done_each_permission_once() {
    let both = member_permissions_in(&fed(), &["istio-system", "mesh"]);
    for ns in ["istio-system", "mesh"] {
        for p in member_permissions(&fed(), ns) {
            let names: Vec<Option<&str>> =
                if p.names.is_empty() { vec![None] } else { p.names.iter().map(|n| Some(n.as_str())).collect() };
            for name in names {
                for verb in p.verbs {
                    let (ns, resource) = (p.namespace.as_deref(), p.resource.as_str());
                    assert!(allows(&both, p.group, resource, verb, ns, name), "{verb} {resource} {ns:?} {name:?}");
                }
            }
        }
    }
    let namespace_writes: Vec<&Permission> =
        both.iter().filter(|p| p.resource == "namespaces" && p.verbs.contains(&"delete")).collect();
    assert_eq!(namespace_writes.len(), 1);
    assert_eq!(namespace_writes[0].names, ["istio-system", "mesh"]);
    let claims = both.iter().filter(|p| p.namespace.as_deref() == Some(CLAIM_NAMESPACE)).count();
    assert_eq!(claims, 1, "the claims' permission once");
    let roles = hub_access(&fed(), &["istio-system", "mesh"]).roles;
    let where_: Vec<&str> = roles.iter().map(|(r, _)| r.metadata.namespace.as_deref().unwrap()).collect();
    assert_eq!(where_, ["istio-system", "kube-system", "mesh", HUB_NAMESPACE]);
}

#[test]
fn the_readmes_table_of_member_permissions_is_the_one_the_code_grants() {
    let readme = include_str!("../../../README.md");
    let table = permissions_table();
    assert!(readme.contains(&table), "README.md lacks the member permissions table; put this in it:\n{table}");
}

#[test]
fn in_its_own_namespace_the_hub_may_only_create_tokens_for_its_own_service_account() {
    let permissions = member_permissions(&fed(), "istio-system");
    let own = hub_identity_name(&fed());
    let token = |verb, name| allows(&permissions, "", "serviceaccounts/token", verb, Some(HUB_NAMESPACE), name);
    assert!(token("create", Some(&own)), "it renews its own credential");
    assert!(!token("create", Some("meshfed-hub.mesh-system.other")), "not another federation's");
    assert!(!token("create", None) && !token("get", Some(&own)));
    let in_hub_namespace: Vec<&Permission> =
        permissions.iter().filter(|p| p.namespace.as_deref() == Some(HUB_NAMESPACE)).collect();
    assert_eq!(in_hub_namespace.len(), 1, "nothing else there");
    assert!(!in_hub_namespace[0].required, "without it meshfed works and says the credential is not renewed");
}
