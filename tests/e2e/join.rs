//! Members joined with least privilege (issue 27), end to end against real local clusters: `meshfed join` (and its
//! `--dry-run -o yaml` applied as it is) gives a federation that converges with exactly the permissions of
//! `meshfed_core::access`, running it twice changes nothing, `meshfed leave` removes what it wrote; the member
//! identity cannot read a Secret outside the Istio namespace; and removing any one required permission gives a
//! member condition that names it.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use k8s_openapi::api::{
    core::v1::{Secret, ServiceAccount},
    rbac::v1::{ClusterRole, PolicyRule, Role},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DynamicObject, ListParams, Patch, PatchParams, PostParams},
};
use meshfed_api::MeshFederation;
use meshfed_core::{
    access::{self, HUB_NAMESPACE, JOIN_LABEL, Permission},
    remote,
};
use meshfed_e2e::{
    Fixture, HUB, ISTIO_NAMESPACE, NAMESPACE, apply_manifests, condition, example, fed_condition, is_ready, prod,
};
use meshfed_operator::join;
use meshfed_testenv::Options;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

/// One kubeconfig with an admin context per cluster of the fixture (named as the cluster), the hub's current.
fn kubeconfig_file(f: &Fixture) -> anyhow::Result<PathBuf> {
    let mut merged = serde_json::json!({"apiVersion": "v1", "kind": "Config", "current-context": HUB,
        "clusters": [], "users": [], "contexts": []});
    for c in f.env.clusters() {
        let kc: Value = serde_saphyr::from_str(c.kubeconfig())?;
        for list in ["clusters", "users", "contexts"] {
            merged[list].as_array_mut().unwrap().extend(kc[list].as_array().unwrap().iter().cloned());
        }
    }
    let path = f.env.dir().join("join.kubeconfig");
    std::fs::write(&path, serde_saphyr::to_string(&merged)?)?;
    Ok(path)
}

fn request(f: &Fixture, cluster: &str) -> anyhow::Result<join::Request> {
    Ok(join::Request {
        cluster: cluster.into(),
        kubeconfig: Some(kubeconfig_file(f)?),
        context: cluster.into(),
        namespace: Some(NAMESPACE.into()),
        federation: Some("prod".into()),
        token_ttl: Duration::from_secs(3600),
        ..Default::default()
    })
}

/// A client that authenticates with the kubeconfig of the hub's Secret for `cluster`.
async fn hub_credential(f: &Fixture, cluster: &str) -> anyhow::Result<Client> {
    let s = Api::<Secret>::namespaced(f.hub.clone(), NAMESPACE).get(&format!("{cluster}-kubeconfig")).await?;
    let yaml = String::from_utf8(s.data.unwrap()["kubeconfig"].0.clone())?;
    meshfed_testenv::client_from_kubeconfig(&yaml).await
}

/// What join wrote in a member, as `Kind namespace/name`.
async fn joined(member: &Client) -> anyhow::Result<Vec<String>> {
    let lp = ListParams::default().labels(JOIN_LABEL);
    let mut out = Vec::new();
    for (group, version, kind, plural) in [
        ("", "v1", "Namespace", "namespaces"),
        ("", "v1", "ServiceAccount", "serviceaccounts"),
        ("rbac.authorization.k8s.io", "v1", "ClusterRole", "clusterroles"),
        ("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding", "clusterrolebindings"),
        ("rbac.authorization.k8s.io", "v1", "Role", "roles"),
        ("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings"),
    ] {
        let ar = kube::api::ApiResource {
            group: group.into(),
            version: version.into(),
            api_version: if group.is_empty() { version.into() } else { format!("{group}/{version}") },
            kind: kind.into(),
            plural: plural.into(),
        };
        for o in Api::<DynamicObject>::all_with(member.clone(), &ar).list(&lp).await?.items {
            out.push(format!("{kind} {}/{}", o.namespace().unwrap_or_default(), o.name_any()));
        }
    }
    out.sort();
    Ok(out)
}

#[tokio::test(flavor = "multi_thread")]
async fn meshfed_join_and_its_dry_run_give_a_federation_that_converges_with_least_privilege_and_leave_removes_it()
-> anyhow::Result<()> {
    // The namespace controller finishes the namespaces leave deletes.
    let f = Fixture::start(&["east", "west"], Options { controller_manager: true, ..Options::default() }).await?;
    let (east, west) = (f.member("east").await?, f.member("west").await?);
    // Start from members nobody joined: leave takes back what the fixture's join wrote.
    for m in ["east", "west"] {
        let left = join::run_leave(&request(&f, m)?).await?;
        assert!(left.contains("deleted Secret mesh-system/") && left.contains("deleted ClusterRole"), "{left}");
        gone(&f, m).await?;
    }
    assert_eq!(join::run_leave(&request(&f, "east")?).await?, "nothing to remove\n");

    // east joins with `meshfed join`; running it again changes nothing.
    let mut east_req = request(&f, "east")?;
    east_req.network = Some("network1".into());
    let said = join::run_join(&east_req).await?;
    assert!(said.contains("created Namespace istio-system"), "{said}");
    assert!(
        said.ends_with("- name: east\n  network: network1\n  kubeconfigSecretRef: {name: east-kubeconfig}\n"),
        "{said}"
    );
    let secret_version = |f: &Fixture| {
        let secrets = Api::<Secret>::namespaced(f.hub.clone(), NAMESPACE);
        async move { secrets.get("east-kubeconfig").await.map(|s| s.resource_version()) }
    };
    let (before, rbac_before) = (secret_version(&f).await?, joined(&east).await?);
    let again = join::run_join(&east_req).await?;
    assert!(again.starts_with("nothing to change"), "{again}");
    assert_eq!((secret_version(&f).await?, joined(&east).await?), (before, rbac_before));

    // west joins from `--dry-run -o yaml`, applied as it is (the token filled in as its comment says).
    let mut west_req = request(&f, "west")?;
    (west_req.dry_run, west_req.role, west_req.control_plane) = (true, Some("Remote".into()), Some("east".into()));
    let yaml = join::run_join(&west_req).await?;
    assert!(yaml.contains("#   role: Remote\n#   controlPlane: east"), "{yaml}");
    let (member_side, hub_side): (Vec<&str>, Vec<&str>) =
        yaml.split("\n---\n").partition(|doc| doc.contains("# member cluster: west"));
    apply_manifests(&west, &member_side.join("\n---\n"), |_| true).await?;
    let token = Api::<ServiceAccount>::namespaced(west.clone(), HUB_NAMESPACE)
        .create_token_request(
            &access::hub_identity_name(&prod()),
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"spec": {"expirationSeconds": 3600}}))?,
        )
        .await?
        .status
        .unwrap()
        .token;
    let hub_doc = hub_side.iter().find(|d| d.contains("kind: Secret")).unwrap().replace("<TOKEN>", &token);
    apply_manifests(&f.hub, &hub_doc, |_| true).await?;
    // The same access; only the Istio namespace differs: the dry run's is plain, so meshfed never deletes it.
    let mut east_joined = joined(&east).await?;
    east_joined.retain(|o| o != "Namespace /istio-system");
    assert_eq!(joined(&west).await?, east_joined, "the dry run grants what join grants");

    // The federation converges with exactly those permissions.
    f.apply(&example("primary-remote-multi-network")).await?;
    f.wait_for("prod", WAIT, is_ready).await?;

    // The member identity reads no Secret outside the Istio namespace.
    for m in ["east", "west"] {
        let hub_as = hub_credential(&f, m).await?;
        let refused = |r: Result<_, kube::Error>| matches!(r, Err(kube::Error::Api(e)) if e.code == 403);
        assert!(refused(Api::<Secret>::all(hub_as.clone()).list(&ListParams::default()).await), "{m}: all Secrets");
        for ns in ["kube-system", "default", HUB_NAMESPACE] {
            let listed = Api::<Secret>::namespaced(hub_as.clone(), ns).list(&ListParams::default()).await;
            assert!(refused(listed), "{m}: Secrets of {ns}");
        }
        let istio = Api::<Secret>::namespaced(hub_as, ISTIO_NAMESPACE).list(&ListParams::default()).await?;
        assert!(istio.items.iter().any(|s| s.name_any() == "cacerts"), "{m} reads the Istio namespace's Secrets");
    }

    // Leave, once the federation is gone, removes what join wrote, and nothing of meshfed's.
    f.federations().delete("prod", &Default::default()).await?;
    f.wait_gone("prod", WAIT).await?;
    for m in ["east", "west"] {
        let left = join::run_leave(&request(&f, m)?).await?;
        assert!(left.contains("deleted ServiceAccount meshfed-system/meshfed-hub.mesh-system.prod"), "{left}");
        gone(&f, m).await?;
        let secret = Api::<Secret>::namespaced(f.hub.clone(), NAMESPACE).get_opt(&format!("{m}-kubeconfig")).await?;
        assert!(secret.is_none(), "the hub's Secret for {m} is gone");
    }
    Ok(())
}

/// Waits until member `m` holds nothing that join wrote.
async fn gone(f: &Fixture, m: &str) -> anyhow::Result<()> {
    let member = f.member(m).await?;
    let nothing = async || joined(&member).await.is_ok_and(|j| j.is_empty());
    meshfed_e2e::until(&format!("leave removed everything on {m}"), WAIT, Duration::from_millis(200), nothing).await
}

/// The member's Role or ClusterRole that holds `p`, with its rules less `p`'s.
fn without(p: &Permission) -> (Option<String>, Vec<PolicyRule>) {
    let access = access::hub_access(&prod(), &[ISTIO_NAMESPACE]);
    let rules = match &p.namespace {
        None => access.cluster_role.rules.clone().unwrap(),
        Some(ns) => {
            access.roles.iter().find(|(r, _)| r.namespace().as_deref() == Some(ns)).unwrap().0.rules.clone().unwrap()
        }
    };
    let is_p = |r: &PolicyRule| {
        r.api_groups.as_deref() == Some(&[p.group.to_string()][..])
            && r.resources.as_deref() == Some(&[p.resource.clone()][..])
            && r.verbs == p.verbs.iter().map(|v| v.to_string()).collect::<Vec<_>>()
            && r.resource_names.clone().unwrap_or_default() == p.names
    };
    assert_eq!(rules.iter().filter(|r| is_p(r)).count(), 1, "{p:?} is one rule");
    (p.namespace.clone(), rules.into_iter().filter(|r| !is_p(r)).collect())
}

async fn set_rules(member: &Client, namespace: Option<&str>, rules: Vec<PolicyRule>) -> anyhow::Result<()> {
    let name = access::hub_identity_name(&prod());
    let patch = Patch::Merge(serde_json::json!({"rules": rules}));
    match namespace {
        None => _ = Api::<ClusterRole>::all(member.clone()).patch(&name, &PatchParams::default(), &patch).await?,
        Some(ns) => {
            _ = Api::<Role>::namespaced(member.clone(), ns).patch(&name, &PatchParams::default(), &patch).await?
        }
    }
    Ok(())
}

/// Every condition message of the federation and its clusters.
fn messages(fed: &MeshFederation) -> String {
    let status = fed.status.clone().unwrap_or_default();
    let fed_level = status.conditions.iter().map(|c| c.message.clone());
    let members = status.clusters.iter().flat_map(|c| c.conditions.iter().map(|c| c.message.clone()));
    fed_level.chain(members).collect::<Vec<_>>().join("\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn removing_any_one_required_permission_gives_a_member_condition_that_names_it() -> anyhow::Result<()> {
    let f = Fixture::clusters(&["east", "west"], Options::default()).await?;
    let mut operator = f.run_operator(f.metrics.clone()).await?;
    let members = [f.member("east").await?, f.member("west").await?];
    // Every owned kind in play: east serves west through its gateway, on its nodes' network (which meshfed lists).
    let yaml = example("primary-remote-multi-network").replace(
        "    kubeconfigSecretRef: {name: east-kubeconfig}",
        "    kubeconfigSecretRef: {name: east-kubeconfig}\n    eastWestGateway: {expose: HostNetwork, nodeSelector: {gateway: 'yes'}}",
    );
    let addresses = [("InternalIP", "10.0.0.7"), ("ExternalIP", "198.51.100.7")];
    meshfed_testenv::add_node(&members[0], "e1", &[("gateway", "yes")], &addresses).await?;
    f.apply(&yaml).await?;
    f.wait_for("prod", WAIT, is_ready).await?;

    let permissions = access::member_permissions(&prod(), ISTIO_NAMESPACE);
    let optional: Vec<&str> = permissions.iter().filter(|p| !p.required).map(|p| p.resource.as_str()).collect();
    // The hub's own token is needed only when it falls due (proven by the renewal tests below).
    assert_eq!(optional, ["serviceaccounts/token", "servicecidrs"], "only these may go unnoticed by a reconcile");
    let reader = meshfed_core::remote::reader_cluster_role_name(&prod());
    for p in permissions.iter().filter(|p| p.required) {
        let (namespace, rules) = without(p);
        for m in &members {
            set_rules(m, namespace.as_deref(), rules.clone()).await?;
        }
        // A fresh controller lists and watches everything again; what it must write again is made to drift.
        operator.abort();
        operator = f.run_operator(f.metrics.clone()).await?;
        for m in &members {
            let rbac = |kind: &str| {
                let ar = kube::api::ApiResource::erase::<ClusterRole>(&());
                let ar =
                    kube::api::ApiResource { kind: kind.into(), plural: format!("{}s", kind.to_lowercase()), ..ar };
                Api::<DynamicObject>::all_with(m.clone(), &ar)
            };
            for kind in ["ClusterRoleBinding", "ClusterRole"] {
                rbac(kind).delete(&reader, &Default::default()).await?;
            }
            let unlabel = serde_json::json!({"metadata": {"labels": {"topology.istio.io/network": null}}});
            Api::<k8s_openapi::api::core::v1::Namespace>::all(m.clone())
                .patch(ISTIO_NAMESPACE, &PatchParams::default(), &Patch::Merge(&unlabel))
                .await?;
        }
        Api::<Secret>::namespaced(members[0].clone(), ISTIO_NAMESPACE)
            .delete("istio-remote-secret-west", &Default::default())
            .await?;
        let named = if p.verbs.contains(&"escalate") {
            "`escalate` and `bind` on clusterroles".to_string()
        } else {
            format!("resource \"{}\" in API group \"{}\"", p.resource, p.group)
        };
        let names_it = |fed: &MeshFederation| messages(fed).contains(&named);
        f.wait_for("prod", WAIT, names_it).await.map_err(|e| anyhow::anyhow!("{p:?}: {e}"))?;
        for m in &members {
            join_member_rbac(m).await?;
        }
        f.wait_for("prod", WAIT, is_ready).await.map_err(|e| anyhow::anyhow!("restoring {p:?}: {e}"))?;
    }
    operator.abort();
    Ok(())
}

/// Puts the hub's RBAC in a member back as join writes it.
async fn join_member_rbac(member: &Client) -> anyhow::Result<()> {
    join::grant(member, &prod(), ISTIO_NAMESPACE).await?;
    Ok(())
}

/// The kubeconfig of the hub's Secret for `cluster`, as it is stored.
async fn hub_kubeconfig(f: &Fixture, cluster: &str) -> anyhow::Result<String> {
    let s = Api::<Secret>::namespaced(f.hub.clone(), NAMESPACE).get(&format!("{cluster}-kubeconfig")).await?;
    Ok(String::from_utf8(s.data.unwrap()["kubeconfig"].0.clone())?)
}

/// The claims of the token in the hub's Secret for `cluster`, and the token.
async fn hub_token(f: &Fixture, cluster: &str) -> anyhow::Result<(remote::TokenClaims, remote::ReaderToken)> {
    let token = remote::token_in_kubeconfig(hub_kubeconfig(f, cluster).await?.as_bytes()).context("a token")?;
    Ok((remote::token_claims(&token)?, token))
}

/// Waits until the newest of the tokens of `claims` is 30 s old, then advances the controller's clock just past the
/// renewal point of them all (a third of their lifetime left). A fresh token, issued in real time, then stays clear
/// of its own renewal point for as long as the newest old one had lived (30 s), so that it is renewed once.
async fn advance_past_renewal(f: &Fixture, claims: &[remote::TokenClaims]) {
    let newest = claims.iter().map(|c| c.issued_at).max().unwrap();
    let age = jiff::Timestamp::now().duration_since(newest).unsigned_abs();
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(age)).await;
    let now = jiff::Timestamp::now();
    let due_in =
        |c: &remote::TokenClaims| c.expires_at.duration_since(now) - c.expires_at.duration_since(c.issued_at) / 3;
    let advance = claims.iter().map(due_in).max().unwrap();
    f.clock.advance(advance.unsigned_abs() + Duration::from_secs(1));
}

async fn join_for_an_hour(f: &Fixture, member: &str) -> anyhow::Result<()> {
    let hour = Duration::from_secs(3600);
    meshfed_e2e::join_member_for(&f.hub, f.env.cluster(member), &prod(), ISTIO_NAMESPACE, hour).await
}

fn cluster_status<'a>(fed: &'a MeshFederation, name: &str) -> &'a meshfed_api::ClusterStatus {
    fed.status.as_ref().unwrap().clusters.iter().find(|c| c.name == name).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_hubs_credential_is_renewed_before_it_expires_for_the_same_service_account_and_the_federation_stays_ready()
-> anyhow::Result<()> {
    let f = Fixture::start(&["east", "west"], Options::default()).await?;
    f.apply(&example("multi-primary")).await?;
    f.wait_for("prod", WAIT, is_ready).await?;
    let members = ["east", "west"];
    for m in members {
        join_for_an_hour(&f, m).await?;
    }
    let mut before = Vec::new();
    for m in members {
        before.push((hub_kubeconfig(&f, m).await?, hub_token(&f, m).await?));
    }
    // Status shows when each credential expires (once a reconcile has read the new Secrets).
    f.poke("prod").await?;
    let expiries = |fed: &MeshFederation, tokens: &[remote::TokenClaims]| {
        members.iter().zip(tokens).all(|(m, c)| {
            cluster_status(fed, m).credential_expires_at.as_deref() == Some(c.expires_at.to_string().as_str())
        })
    };
    let old: Vec<remote::TokenClaims> = before.iter().map(|(_, (c, _))| c.clone()).collect();
    assert!(old.iter().all(|c| c.expires_at.duration_since(c.issued_at).as_secs() == 3600), "join asked for an hour");
    f.wait_for("prod", WAIT, |fed| is_ready(fed) && expiries(fed, &old)).await?;
    let reachable = condition(&cluster_status(&f.federations().get("prod").await?, "east").conditions, "Reachable")
        .unwrap()
        .message
        .clone();
    assert!(reachable.contains("renewed before it expires"), "{reachable}");

    // Past the renewal point by the controller's clock: both tokens are replaced, and prod stays Ready throughout.
    advance_past_renewal(&f, &old).await;
    f.poke("prod").await?;
    let api = f.federations();
    let samples =
        meshfed_e2e::sample_until(std::time::Instant::now(), WAIT, Duration::from_millis(200), async |n, _| {
            let fed = api.get("prod").await?;
            anyhow::ensure!(is_ready(&fed), "prod is not Ready at sample {n}: {:?}", fed.status);
            let mut renewed = 0;
            for (m, (_, (_, token))) in members.iter().zip(&before) {
                renewed += usize::from(hub_token(&f, m).await?.1 != *token);
            }
            Ok(renewed == members.len())
        })
        .await?;
    println!("renewed after {samples} samples, Ready at every one");
    let mut after = Vec::new();
    for (m, (yaml, (claims, token))) in members.iter().zip(&before) {
        let (new_claims, new_token) = hub_token(&f, m).await?;
        // The same ServiceAccount (its UID too), the same lifetime, a later expiry.
        assert_eq!(new_claims.subject, claims.subject, "{m}");
        assert_eq!(new_claims.subject.as_deref(), Some(access::hub_user(&prod()).as_str()));
        assert_eq!(new_claims.service_account_uid, claims.service_account_uid, "{m}");
        assert_eq!(new_claims.expires_at.duration_since(new_claims.issued_at).as_secs(), 3600, "{m}");
        assert!(new_claims.expires_at > claims.expires_at, "{m}");
        // Only the token changed, every other byte as join wrote it.
        assert_eq!(hub_kubeconfig(&f, m).await?, yaml.replace(token.expose(), new_token.expose()), "{m}");
        // The member accepts it: the hub reads what it may with it.
        let hub_as = hub_credential(&f, m).await?;
        Api::<k8s_openapi::api::core::v1::Namespace>::all(hub_as.clone()).get("kube-system").await?;
        Api::<Secret>::namespaced(hub_as, ISTIO_NAMESPACE).get("cacerts").await?;
        after.push(new_claims);
    }
    // Status follows, and prod stays Ready while the members are reached with their new credentials (new clients,
    // new watches): sampled for 5 s at least.
    let started = std::time::Instant::now();
    let samples = meshfed_e2e::sample_until(started, WAIT, Duration::from_millis(200), async |n, elapsed| {
        let fed = api.get("prod").await?;
        anyhow::ensure!(is_ready(&fed), "prod is not Ready at sample {n} after the renewal: {:?}", fed.status);
        Ok(expiries(&fed, &after) && elapsed >= Duration::from_secs(5))
    })
    .await?;
    println!("{samples} more samples, Ready at every one, until status showed the new expiries");
    let renewed = api.get("prod").await?;
    assert_eq!(fed_condition(&renewed, "ClustersReachable").unwrap().reason, "AllReachable");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_join_identity_that_may_not_renew_its_token_gets_a_reason_that_says_what_to_do_long_before_expiry()
-> anyhow::Result<()> {
    let f = Fixture::start(&["east", "west"], Options::default()).await?;
    f.apply(&example("multi-primary")).await?;
    f.wait_for("prod", WAIT, is_ready).await?;
    let east = f.member("east").await?;
    // east's identity loses `create` on its own serviceaccounts/token (the Role in meshfed-system).
    let permissions = access::member_permissions(&prod(), ISTIO_NAMESPACE);
    let own_token = permissions.iter().find(|p| p.namespace.as_deref() == Some(HUB_NAMESPACE)).unwrap();
    assert_eq!((own_token.resource.as_str(), own_token.verbs), ("serviceaccounts/token", &["create"][..]));
    join_for_an_hour(&f, "east").await?;
    let (namespace, rules) = without(own_token);
    set_rules(&east, namespace.as_deref(), rules).await?;
    let (claims, token) = hub_token(&f, "east").await?;
    advance_past_renewal(&f, std::slice::from_ref(&claims)).await;
    f.poke("prod").await?;

    let warned = |fed: &MeshFederation| {
        fed_condition(fed, "ClustersReachable").is_some_and(|c| c.reason == "CredentialNotRenewed")
    };
    let fed = f.wait_for("prod", WAIT, warned).await?;
    let message = &fed_condition(&fed, "ClustersReachable").unwrap().message;
    for part in [
        "east: ",
        &format!("expires at {}", claims.expires_at),
        "cannot create resource \"serviceaccounts/token\"",
        "meshfed join east --context",
    ] {
        assert!(message.contains(part), "{part:?} in {message}");
    }
    assert_eq!(fed_condition(&fed, "ClustersReachable").unwrap().status, "True", "the credential still works");
    assert!(is_ready(&fed), "still Ready: {:?}", fed.status);
    assert_eq!(
        condition(&cluster_status(&fed, "east").conditions, "Reachable").unwrap().reason,
        "CredentialNotRenewed"
    );
    assert_eq!(hub_token(&f, "east").await?.1, token, "the Secret is left as it is");
    assert!(
        condition(&cluster_status(&fed, "west").conditions, "Reachable").unwrap().reason == "Reachable",
        "west renews nothing yet"
    );

    // Granted again, as `meshfed join` grants: renewed at the next reconcile, and the reason is gone.
    join_member_rbac(&east).await?;
    f.poke("prod").await?;
    let fine = |fed: &MeshFederation| {
        is_ready(fed) && fed_condition(fed, "ClustersReachable").is_some_and(|c| c.reason == "AllReachable")
    };
    f.wait_for("prod", WAIT, fine).await?;
    assert_ne!(hub_token(&f, "east").await?.1, token, "renewed");
    Ok(())
}
