//! Cross-cluster discovery end to end: remote secrets where the topology needs them, kubeconfigs in them that work
//! and may only read, tokens renewed before they expire, and secrets removed with the clusters they were for.

use std::{collections::BTreeSet, time::Duration};

use k8s_openapi::api::{
    core::v1::{Secret, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
};
use meshfed_core::{kubeconfig, remote};
use meshfed_e2e::{Fixture, condition, fed_condition, is_ready};
use meshfed_testenv::{Options, client_from_kubeconfig};

const WAIT: Duration = Duration::from_secs(60);

fn federation(clusters: &[&str], ttl: &str) -> String {
    let items: String = clusters.iter().map(|c| format!("  - {c}\n")).collect();
    format!(
        "apiVersion: meshfed.io/v1alpha1\nkind: MeshFederation\nmetadata: {{name: prod, namespace: mesh-system}}\nspec:\n  meshID: prod\n  trust: {{root: {{generate: {{}}}}}}\n  remoteAccess: {{tokenTTL: {ttl}}}\n  clusters:\n{items}"
    )
}

fn primary(name: &str, network: &str) -> String {
    format!("{{name: {name}, network: {network}, kubeconfigSecretRef: {{name: {name}-kubeconfig}}}}")
}

fn remote_of(name: &str, network: &str, control_plane: &str) -> String {
    format!(
        "{{name: {name}, network: {network}, role: Remote, controlPlane: {control_plane}, kubeconfigSecretRef: {{name: {name}-kubeconfig}}}}"
    )
}

/// The remote secrets a member holds (by Istio's label), by name.
async fn remote_secrets(member: &Client) -> Vec<Secret> {
    let lp = ListParams::default().labels("istio/multiCluster=true");
    Api::<Secret>::namespaced(member.clone(), "istio-system").list(&lp).await.unwrap().items
}

fn names(secrets: &[Secret]) -> BTreeSet<String> {
    secrets.iter().filter_map(|s| s.metadata.name.clone()).collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The kubeconfig a remote secret holds for `target`.
fn kubeconfig_of(secret: &Secret, target: &str) -> String {
    String::from_utf8(secret.data.as_ref().unwrap()[target].0.clone()).unwrap()
}

/// istiod's view: the kubeconfig passes meshfed's own refusal rules (no exec, no files), reads what istiod reads in
/// the target, and is refused a write by the target's real RBAC.
async fn assert_works_and_only_reads(kubeconfig_yaml: &str, what: &str) {
    kubeconfig::check(kubeconfig_yaml).unwrap_or_else(|e| panic!("{what}: {e}"));
    let reader = client_from_kubeconfig(kubeconfig_yaml).await.unwrap();
    Api::<Service>::all(reader.clone()).list(&ListParams::default()).await.unwrap_or_else(|e| panic!("{what}: {e}"));
    Api::<EndpointSlice>::all(reader.clone())
        .list(&ListParams::default())
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let secret: Secret = serde_json::from_value(serde_json::json!({"metadata": {"name": "stolen"}})).expect("a secret");
    let err = Api::<Secret>::namespaced(reader, "default").create(&PostParams::default(), &secret).await.unwrap_err();
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 403), "{what}: writing a Secret was not refused: {err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_primary_holds_a_working_read_only_remote_secret_for_every_other_member() -> anyhow::Result<()> {
    let f = Fixture::start(&["east", "west", "north"], Options::default()).await?;
    let clusters = [primary("east", "n1"), primary("west", "n2"), primary("north", "n1")];
    f.apply(&federation(&clusters.iter().map(String::as_str).collect::<Vec<_>>(), "24h")).await?;
    let fed = f.wait_for("prod", WAIT, is_ready).await?;
    assert_eq!(fed_condition(&fed, "RemoteAccessReady").unwrap().status, "True");

    let all = ["east", "west", "north"];
    for holder in all {
        let held = remote_secrets(&f.member(holder).await?).await;
        let others: Vec<&str> = all.iter().copied().filter(|c| *c != holder).collect();
        let expected: Vec<String> = others.iter().map(|o| format!("istio-remote-secret-{o}")).collect();
        assert_eq!(names(&held), expected.iter().map(String::as_str).map(String::from).collect(), "{holder}");
        for target in others {
            let s = held
                .iter()
                .find(|s| s.metadata.name.as_deref() == Some(&format!("istio-remote-secret-{target}")))
                .unwrap();
            assert_eq!(s.metadata.annotations.as_ref().unwrap()["networking.istio.io/cluster"], target);
            assert_eq!(s.data.as_ref().unwrap().keys().collect::<Vec<_>>(), [target]);
            let kc = kubeconfig_of(s, target);
            assert!(kc.contains(&f.env.cluster(target).server()), "{holder}/{target}: wrong server");
            assert_works_and_only_reads(&kc, &format!("{holder}'s secret for {target}")).await;
        }
    }
    let status = fed.status.as_ref().unwrap();
    for c in &status.clusters {
        assert!(c.reader_token_expires_at.is_some(), "{} has no token expiry in status", c.name);
        assert_eq!(condition(&c.conditions, "RemoteAccessReady").unwrap().status, "True");
    }
    // No token anywhere in status.
    let text = serde_json::to_string(&fed.status)?;
    for holder in all {
        for s in remote_secrets(&f.member(holder).await?).await {
            let target = s.metadata.annotations.as_ref().unwrap()["networking.istio.io/cluster"].clone();
            let token = remote::token_in_remote_secret(&s, &target).unwrap();
            assert!(!text.contains(token.expose()), "a token is in the status");
        }
    }

    // A deleted remote secret is put back; an edited one is repaired.
    let east = f.member("east").await?;
    let east_secrets: Api<Secret> = Api::namespaced(east.clone(), "istio-system");
    east_secrets.delete("istio-remote-secret-west", &Default::default()).await?;
    f.poke("prod").await?;
    wait(|| async { names(&remote_secrets(&east).await).contains("istio-remote-secret-west") }).await;
    let mut edited = east_secrets.get("istio-remote-secret-north").await?;
    edited.data.as_mut().unwrap().insert("north".into(), k8s_openapi::ByteString(b"not a kubeconfig".to_vec()));
    east_secrets.replace("istio-remote-secret-north", &PostParams::default(), &edited).await?;
    f.poke("prod").await?;
    wait(|| async {
        let s = east_secrets.get("istio-remote-secret-north").await.unwrap();
        remote::token_in_remote_secret(&s, "north").is_some()
    })
    .await;
    let repaired = east_secrets.get("istio-remote-secret-north").await?;
    assert_works_and_only_reads(&kubeconfig_of(&repaired, "north"), "the repaired secret").await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn primary_remote_places_secrets_on_the_primary_only_and_removal_cleans_everywhere() -> anyhow::Result<()> {
    let f = Fixture::start(&["east", "west", "north"], Options::default()).await?;
    let (e, w, n) = (primary("east", "n1"), remote_of("west", "n2", "east"), remote_of("north", "n1", "east"));
    f.apply(&federation(&[&e, &w, &n], "1h")).await?;
    let fed = f.wait_for("prod", WAIT, is_ready).await?;
    assert_eq!(fed.status.as_ref().unwrap().topology.as_deref(), Some("PrimaryRemote/MultiNetwork"));
    let east = f.member("east").await?;
    assert_eq!(names(&remote_secrets(&east).await), set(&["istio-remote-secret-west", "istio-remote-secret-north"]));
    for remote_member in ["west", "north"] {
        assert!(remote_secrets(&f.member(remote_member).await?).await.is_empty(), "a Remote holds a remote secret");
    }
    for s in remote_secrets(&east).await {
        let target = s.metadata.annotations.as_ref().unwrap()["networking.istio.io/cluster"].clone();
        assert_works_and_only_reads(&kubeconfig_of(&s, &target), &format!("east's secret for {target}")).await;
    }

    // North leaves: east loses its secret for north, and north loses meshfed's reader identity.
    f.apply(&federation(&[&e, &w], "1h")).await?;
    f.wait_for("prod", WAIT, |fed| is_ready(fed) && fed.status.as_ref().unwrap().clusters.len() == 2).await?;
    assert_eq!(names(&remote_secrets(&east).await), set(&["istio-remote-secret-west"]));
    let north = f.member("north").await?;
    let lp = ListParams::default().labels("meshfed.io/cluster=north");
    assert!(Api::<k8s_openapi::api::rbac::v1::ClusterRole>::all(north.clone()).list(&lp).await?.items.is_empty());
    assert!(Api::<k8s_openapi::api::core::v1::ServiceAccount>::all(north).list(&lp).await?.items.is_empty());

    // East becomes a Remote of a new primary, west: east's secrets go, west gets one for east.
    let (e2, w2) = (remote_of("east", "n1", "west"), primary("west", "n2"));
    f.apply(&federation(&[&e2, &w2], "1h")).await?;
    f.wait_for("prod", WAIT, is_ready).await?;
    assert!(remote_secrets(&east).await.is_empty());
    assert_eq!(names(&remote_secrets(&f.member("west").await?).await), set(&["istio-remote-secret-east"]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_are_replaced_before_they_expire_and_the_old_one_still_works_until_then() -> anyhow::Result<()> {
    let f = Fixture::start(&["east", "west"], Options::default()).await?;
    // The TokenRequest API issues no token shorter than 10 minutes; the controller's clock is advanced instead of
    // waiting. The API servers keep real time, so the old token is really still valid when it is replaced.
    f.apply(&federation(&[&primary("east", "n1"), &primary("west", "n2")], "10m")).await?;
    f.wait_for("prod", WAIT, is_ready).await?;
    let held = |member: Client| async move {
        let s = remote_secrets(&member).await.into_iter().next().expect("a remote secret");
        let target = s.metadata.annotations.as_ref().unwrap()["networking.istio.io/cluster"].clone();
        (kubeconfig_of(&s, &target), remote::token_in_remote_secret(&s, &target).unwrap())
    };
    let (old_kubeconfig, old_token) = held(f.member("east").await?).await;
    let (_, west_old_token) = held(f.member("west").await?).await;
    let writes = f.metrics.member_writes_total();

    // Two thirds of the lifetime on, less than a third remains but nothing expired: no renewal yet at 6 minutes.
    f.clock.advance(Duration::from_secs(6 * 60));
    f.poke_and_wait("prod").await?;
    assert_eq!(held(f.member("east").await?).await.1.expose(), old_token.expose(), "renewed too early");
    assert_eq!(f.metrics.member_writes_total(), writes, "a resync with nothing to renew wrote");

    f.clock.advance(Duration::from_secs(60));
    f.poke("prod").await?;
    let east = f.member("east").await?;
    wait(|| async { held(east.clone()).await.1.expose() != old_token.expose() }).await;
    let (new_kubeconfig, _) = held(east).await;
    // Both work: the old one until it expires, so istiod's swap never meets an expired token.
    assert_works_and_only_reads(&old_kubeconfig, "the replaced token").await;
    assert_works_and_only_reads(&new_kubeconfig, "the new token").await;
    // The other holder's token was renewed in the same pass.
    let (_, west_token) = held(f.member("west").await?).await;
    assert_ne!(west_token.expose(), west_old_token.expose());
    Ok(())
}

async fn wait<F, Fut>(done: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let reached = meshfed_e2e::until("the condition", WAIT, Duration::from_millis(200), async || done().await).await;
    reached.expect("the condition is reached");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hub_credential_that_cannot_create_tokens_is_named_with_the_permission_it_lacks() -> anyhow::Result<()> {
    use k8s_openapi::api::{
        authentication::v1::{TokenRequest, TokenRequestSpec},
        core::v1::ServiceAccount,
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    };
    let f = Fixture::start(&["east", "west"], Options::default()).await?;
    // West's kubeconfig Secret holds a credential that may do everything meshfed does except create tokens.
    let west = f.member("west").await?;
    let create = PostParams::default();
    let role: ClusterRole = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "hub-without-tokens"},
        "rules": meshfed_core::kinds::OWNED_KINDS
            .iter()
            .map(|k| serde_json::json!({"apiGroups": [k.group], "resources": [k.plural], "verbs": ["*"]}))
            .chain([
                serde_json::json!({"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list"]}),
                // The Istio versions the member's Sail operator installs.
                serde_json::json!({"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "resourceNames": ["istios.sailoperator.io"], "verbs": ["get"]}),
            ])
            .collect::<Vec<_>>(),
    }))?;
    Api::<ClusterRole>::all(west.clone()).create(&create, &role).await?;
    let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "hub-without-tokens"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "hub-without-tokens"},
        "subjects": [{"kind": "ServiceAccount", "name": "hub", "namespace": "default"}],
    }))?;
    Api::<ClusterRoleBinding>::all(west.clone()).create(&create, &binding).await?;
    let sas: Api<ServiceAccount> = Api::namespaced(west.clone(), "default");
    sas.create(&create, &serde_json::from_value(serde_json::json!({"metadata": {"name": "hub"}}))?).await?;
    let req = TokenRequest {
        spec: TokenRequestSpec { expiration_seconds: Some(3600), ..Default::default() },
        ..Default::default()
    };
    let token = sas.create_token_request("hub", &create, &req).await?.status.unwrap().token;
    let mut kc: serde_json::Value = serde_saphyr::from_str(f.env.cluster("west").kubeconfig())?;
    kc["users"][0]["user"] = serde_saphyr::from_str(&format!("token: {token}"))?;
    meshfed_e2e::put_kubeconfig(&f.hub, "west", &serde_saphyr::to_string(&kc)?).await?;

    f.apply(&federation(&[&primary("east", "n1"), &primary("west", "n2")], "1h")).await?;
    let fed = f
        .wait_for("prod", WAIT, |fed| fed_condition(fed, "RemoteAccessReady").is_some_and(|c| c.status == "False"))
        .await?;
    let access = fed_condition(&fed, "RemoteAccessReady").unwrap();
    assert_eq!(access.reason, "TokenRequestFailed");
    assert!(
        access.message.starts_with("west: ") && access.message.contains("serviceaccounts/token"),
        "{}",
        access.message
    );
    assert!(!access.message.contains(&token), "the hub credential's token is in the status");
    assert_eq!(fed_condition(&fed, "Ready").unwrap().status, "False");
    // What could be done was done: west holds its secret for east; east holds none for west.
    assert_eq!(names(&remote_secrets(&west).await), set(&["istio-remote-secret-east"]));
    assert!(remote_secrets(&f.member("east").await?).await.is_empty());
    Ok(())
}

/// A remote secret's kubeconfig with a billion-laughs tree (10^9 strings once expanded) and a token-like string,
/// padded with a comment to `size` bytes.
fn laughs(size: usize) -> String {
    let mut doc = String::from(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\ncontexts:\n- {name: c, context: {cluster: k, user: u}}\nclusters:\n- {name: k, cluster: {server: 'https://127.0.0.1:1'}}\nusers:\n- {name: u, user: {token: s3cr3t-token}}\nl0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n",
    );
    for i in 1..10 {
        let p = i - 1;
        doc.push_str(&format!("l{i}: &l{i} [*l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}]\n"));
    }
    doc.push('#');
    doc.push_str(&"x".repeat(size.saturating_sub(doc.len() + 1)));
    doc.push('\n');
    doc
}

/// The peak resident memory of this process (the operator runs in it), in bytes, from `/proc/self/status`.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok());
    kib.unwrap_or(0) * 1024
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crafted_remote_secret_costs_the_operator_little_and_is_put_right() -> anyhow::Result<()> {
    let f = Fixture::start(&["east", "west"], Options::default()).await?;
    f.apply(&federation(&[&primary("east", "n1"), &primary("west", "n2")], "24h")).await?;
    f.wait_for("prod", WAIT, is_ready).await?;
    let secrets = Api::<Secret>::namespaced(f.member("east").await?, "istio-system");
    // The peak so far (clusters started, a federation converged), reset where the kernel allows it.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let before = peak_rss();
    // Anyone who may edit Secrets in a member's Istio namespace: a 1 MiB one (a Secret's limit), refused unread,
    // and one just under meshfed's cap, refused by the parser's budget.
    for (what, size) in [("1 MiB", (1 << 20) - 4096), ("256 KiB", 255 * 1024)] {
        let doc = laughs(size);
        let mut crafted = secrets.get("istio-remote-secret-west").await?;
        crafted.metadata.managed_fields = None;
        crafted.data = Some([("west".to_string(), k8s_openapi::ByteString(doc.into_bytes()))].into());
        secrets.replace("istio-remote-secret-west", &PostParams::default(), &crafted).await?;
        // meshfed puts a working kubeconfig back (the watch sees the edit) and stays ready.
        wait(|| async {
            let s = secrets.get("istio-remote-secret-west").await.unwrap();
            s.data.as_ref().is_some_and(|d| d["west"].0.len() < 64 * 1024)
                && remote::token_in_remote_secret(&s, "west").is_some()
        })
        .await;
        let s = secrets.get("istio-remote-secret-west").await?;
        assert_works_and_only_reads(&kubeconfig_of(&s, "west"), what).await;
        let fed = f.wait_for("prod", WAIT, is_ready).await?;
        let status = serde_json::to_string(&fed.status)?;
        assert!(!status.contains("s3cr3t") && !status.contains("lol"), "{what}: {status}");
    }
    let grew = peak_rss().saturating_sub(before);
    println!("peak resident memory grew by {} MiB", grew >> 20);
    assert!(grew < 128 << 20, "the operator's peak memory grew by {} MiB", grew >> 20);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_member_whose_writes_keep_failing_still_gets_its_token_renewed_and_its_peers_keep_a_fresh_one()
-> anyhow::Result<()> {
    let f = Fixture::start(&["east", "west"], Options::default()).await?;
    f.apply(&federation(&[&primary("east", "network1"), &primary("west", "network2")], "10m")).await?;
    f.wait_for("prod", WAIT, is_ready).await?;
    // West refuses meshfed's gateway Deployment from now on (an admission policy, as a platform team might set):
    // its gateway is deleted, and every write wave in west fails on putting it back.
    let west = f.member("west").await?;
    let policy: serde_json::Value = serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": "no-gateways"},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{"apiGroups": ["apps"], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"], "resources": ["deployments"]}]},
            "validations": [{"expression": "object.metadata.name != 'istio-eastwestgateway'", "message": "no gateways here"}],
        },
    });
    let binding = serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": "no-gateways"},
        "spec": {"policyName": "no-gateways", "validationActions": ["Deny"]},
    });
    meshfed_e2e::apply_manifests(
        &west,
        &format!("{}\n---\n{}", serde_json::to_string(&policy)?, serde_json::to_string(&binding)?),
        |_| true,
    )
    .await?;
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> = Api::namespaced(west.clone(), "istio-system");
    // The policy takes effect within a second or so: a dry-run create of the gateway is refused then.
    let gateway = deployments.get("istio-eastwestgateway").await?;
    let refused = async || {
        let mut probe = gateway.clone();
        probe.metadata = kube::api::ObjectMeta { name: Some("istio-eastwestgateway".into()), ..Default::default() };
        let dry = PostParams { dry_run: true, ..Default::default() };
        deployments.delete("istio-eastwestgateway", &Default::default()).await.ok();
        deployments.create(&dry, &probe).await.is_err_and(|e| e.to_string().contains("no gateways here"))
    };
    meshfed_e2e::until("west's admission policy to refuse the gateway", WAIT, Duration::from_millis(200), refused)
        .await?;
    let failing = |fed: &meshfed_api::MeshFederation| {
        fed_condition(fed, "MembersConverged")
            .is_some_and(|c| c.reason == "WriteFailed" && c.message.contains("no gateways here"))
    };
    f.poke("prod").await?;
    f.wait_for("prod", WAIT, failing).await?;
    let old = remote::token_in_remote_secret(&f.remote_secret("istio-system", "east", "west").await?, "west")
        .expect("a token");

    // West's token falls due: it is renewed although every wave in west fails, and east holds the new one.
    f.advance_past_refresh("istio-system", &[("east", "west")]).await?;
    f.poke("prod").await?;
    let renewed = async || {
        let secret = f.remote_secret("istio-system", "east", "west").await.ok();
        secret.and_then(|s| remote::token_in_remote_secret(&s, "west")).is_some_and(|t| t.expose() != old.expose())
    };
    meshfed_e2e::until("east to hold a fresh token for west", WAIT, Duration::from_millis(200), renewed).await?;
    // The reconcile that renewed it reports it: west's writes still fail, its remote access is ready with the
    // fresh token's expiry (read as soon as that status is written: the controller's advanced clock makes the fresh
    // token due again 15 s later).
    let west_of = |fed: &meshfed_api::MeshFederation| {
        fed.status.as_ref().and_then(|s| s.clusters.iter().find(|c| c.name == "west").cloned())
    };
    let reported = |fed: &meshfed_api::MeshFederation| {
        west_of(fed).is_some_and(|w| {
            let access = condition(&w.conditions, "RemoteAccessReady").is_some_and(|c| c.status == "True");
            let expires = w.reader_token_expires_at.and_then(|e| e.parse::<jiff::Timestamp>().ok());
            access && expires.is_some_and(|e| e > f.clock.now())
        })
    };
    let fed = f.wait_for("prod", Duration::from_secs(10), reported).await?;
    assert!(failing(&fed), "west's writes still fail: {:?}", fed_condition(&fed, "MembersConverged"));
    Ok(())
}
