//! Observability end to end: the metrics the README documents, scraped over HTTP from a converged federation and
//! checked against its status; the series of a member that left, and of a federation that is gone, are removed;
//! liveness and readiness answer; every JSON log line of a reconcile names its federation, and no log line holds a
//! private key or a token.

use std::{
    io::Write,
    sync::{Arc, Mutex},
    time::Duration,
};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client,
    api::{DynamicObject, ListParams},
};
use meshfed_core::{
    federation::{FIELD_MANAGER, MANAGED_BY},
    kinds::OWNED_KINDS,
    remote,
};
use meshfed_e2e::{Fixture, Scrape, example, http_get, is_ready};
use meshfed_operator::member::kinds::api_resource;
use meshfed_testenv::Options;
use serde_json::Value;

/// The operator's log, as `meshfed run --log-json` writes it.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Log {
    fn capture() -> Self {
        let log = Self::default();
        let writer = log.clone();
        tracing_subscriber::fmt()
            .json()
            .with_env_filter("meshfed_operator=info")
            .with_writer(move || writer.clone())
            .init();
        log
    }

    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

const WAIT: Duration = Duration::from_secs(60);
const FED: &str = r#"federation="mesh-system/prod""#;

/// The `meshfed_*` names the README mentions.
fn documented() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let mut names: Vec<String> = readme
        .split(|c: char| !(c.is_ascii_lowercase() || c == '_'))
        .filter(|w| w.starts_with("meshfed_"))
        .map(String::from)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Scrapes until `done` holds, for at most a few seconds.
async fn settled(port: u16, done: impl Fn(&Scrape) -> bool) -> anyhow::Result<Scrape> {
    let mut last = None;
    let every = Duration::from_millis(100);
    let settled = meshfed_e2e::sample_until(std::time::Instant::now(), Duration::from_secs(5), every, async |_, _| {
        let m = Scrape::from(port).await?;
        let done = done(&m);
        last = Some(m);
        Ok(done)
    })
    .await;
    let last = last.expect("one scrape at least");
    anyhow::ensure!(settled.is_ok(), "the metrics did not settle:\n{}", last.0);
    Ok(last)
}

/// How many kinds of the table `member` holds objects of, labelled as meshfed's.
async fn kinds_held(member: &Client) -> anyhow::Result<usize> {
    let owned = ListParams::default().labels(&format!("{MANAGED_BY}={FIELD_MANAGER}")).limit(1);
    let mut held = 0;
    for kind in OWNED_KINDS {
        let api = Api::<DynamicObject>::all_with(member.clone(), &api_resource(kind));
        held += usize::from(!api.list(&owned).await?.items.is_empty());
    }
    Ok(held)
}

fn unix(rfc3339: Option<&String>) -> f64 {
    rfc3339.expect("a timestamp in status").parse::<Timestamp>().unwrap().as_second() as f64
}

#[tokio::test(flavor = "multi_thread")]
async fn the_documented_metrics_are_served_and_follow_the_members_and_logs_name_the_federation() -> anyhow::Result<()> {
    let log = Log::capture();
    let f = Fixture::start(&["east", "west"], Options::default()).await?;
    let port = f.serve_metrics().await?;
    assert_eq!(http_get(port, "/healthz").await?.0, 200);

    f.apply(&example("multi-primary-multi-network")).await?;
    let fed = f.wait_for("prod", WAIT, is_ready).await?;
    let status = fed.status.unwrap();
    assert_eq!(http_get(port, "/readyz").await?.0, 200, "the controller runs");
    // A second federation whose only member's kubeconfig Secret does not exist: a member failure, by reason.
    let lost = "apiVersion: meshfed.io/v1alpha1\nkind: MeshFederation\nmetadata: {name: lost, namespace: mesh-system}\nspec:\n  meshID: lost\n  istio: {namespace: istio-lost}\n  trust: {root: {generate: {}}}\n  clusters:\n  - {name: nowhere, network: n1, kubeconfigSecretRef: {name: nowhere-kubeconfig}}\n";
    f.apply(lost).await?;
    let missing = |fed: &meshfed_api::MeshFederation| {
        fed.status.as_ref().is_some_and(|s| {
            s.clusters.iter().any(|c| c.last_error.as_deref().is_some_and(|e| e.contains("does not exist")))
        })
    };
    f.wait_for("lost", WAIT, missing).await?;
    let m = Scrape::from(port).await?;
    let failed = m.value("meshfed_member_failures_total", &[r#"reason="KubeconfigSecretMissing""#]);
    assert!(failed.is_some_and(|n| n >= 1.0), "a missing kubeconfig Secret is counted by its reason:\n{}", m.0);

    // The README and the endpoint agree: every documented series is served, and every served one is documented
    // (a counter `x` is served as `x_total`).
    let documented = documented();
    assert!(documented.len() >= 10, "the README lists the metrics: {documented:?}");
    let served: Vec<&str> = m.0.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next()).collect();
    let same = |d: &str, s: &str| d == s || d.strip_suffix("_total") == Some(s);
    for d in &documented {
        assert!(served.iter().any(|s| same(d, s)), "{d} is documented but not served:\n{}", m.0);
    }
    for s in &served {
        assert!(documented.iter().any(|d| same(d, s)), "{s} is served but not in the README");
    }

    assert!(m.sum("meshfed_reconciles_total") >= 1);
    assert!(m.sum("meshfed_member_writes_total") > 0);
    assert!(m.sum("meshfed_status_writes_total") >= 1);
    assert_eq!(m.value("meshfed_member_watches", &[]), Some(2.0));
    // Only the kinds a member holds are watched (a multi-network primary holds no VirtualService).
    let held = kinds_held(&f.member("east").await?).await? + kinds_held(&f.member("west").await?).await?;
    assert!(held < 2 * OWNED_KINDS.len(), "{held} kinds held");
    settled(port, |m| m.value("meshfed_kind_watches", &[]) == Some(held as f64)).await?;
    // A reconcile of the converged federation reads its members from the watches' caches: it lists nothing.
    let lists = m.sum("meshfed_member_lists_total");
    f.poke_and_wait("prod").await?;
    let after = Scrape::from(port).await?;
    assert_eq!(after.sum("meshfed_member_lists_total"), lists, "a steady reconcile listed:\n{}", after.0);
    let root = unix(status.trust.as_ref().unwrap().root_not_after.as_ref());
    assert_eq!(m.value("meshfed_root_expiry_timestamp_seconds", &[FED]), Some(root));
    for c in &status.clusters {
        let cluster = format!(r#"cluster="{}""#, c.name);
        let labels = [FED, cluster.as_str()];
        assert_eq!(m.value("meshfed_member_reachable", &labels), Some(1.0), "{}", c.name);
        assert!(m.value("meshfed_member_latency_seconds_count", &labels).unwrap() >= 1.0, "{}", c.name);
        let intermediate = unix(c.intermediate_not_after.as_ref());
        assert_eq!(m.value("meshfed_intermediate_expiry_timestamp_seconds", &labels), Some(intermediate));
        let token = unix(c.reader_token_expires_at.as_ref());
        assert_eq!(m.value("meshfed_reader_token_expiry_timestamp_seconds", &labels), Some(token));
    }

    // Logs: every line of a reconcile names the federation, every line about a member names its cluster, and no
    // line holds a private key or the reader token that peers use.
    let held =
        Api::<Secret>::namespaced(f.member("east").await?, "istio-system").get("istio-remote-secret-west").await?;
    let token = remote::token_in_remote_secret(&held, "west").expect("a token in the remote secret");
    let text = log.text();
    assert!(!text.contains("PRIVATE KEY") && !text.contains(token.expose()), "a secret is in the log");
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let applying: Vec<&Value> = lines.iter().filter(|l| l["fields"]["message"] == "applying").collect();
    assert!(!applying.is_empty(), "no write was logged:\n{text}");
    for l in &lines {
        let in_reconcile = l["spans"].as_array().is_some_and(|s| s.iter().any(|s| s["name"] == "reconcile"));
        if in_reconcile {
            let federation = l["span"]["federation"].as_str();
            assert!(matches!(federation, Some("mesh-system/prod" | "mesh-system/lost")), "{l}");
        }
    }
    for l in applying {
        assert_eq!(l["span"]["federation"], "mesh-system/prod", "{l}");
        assert!(l["fields"]["cluster"].is_string(), "{l}");
    }

    // West leaves: its series go, and so do the watches on it.
    let without_west = example("multi-primary-multi-network")
        .replace("  - name: west\n    network: network2\n    kubeconfigSecretRef: {name: west-kubeconfig}\n", "");
    f.apply(&without_west).await?;
    f.wait_for("prod", WAIT, |fed| {
        is_ready(fed) && fed.status.as_ref().is_some_and(|s| s.clusters.iter().all(|c| c.name != "west"))
    })
    .await?;
    // A reconcile that the cleanup's own deletions triggered may still be finishing on the older status: the series
    // go within a moment. (The write counters are totals of the process, by cluster, and keep counting.)
    let m = settled(port, |m| {
        let of_west = m.0.lines().any(|l| l.contains(FED) && l.contains(r#"cluster="west""#));
        !of_west && m.value("meshfed_member_watches", &[]) == Some(1.0)
    })
    .await?;
    assert_eq!(m.value("meshfed_member_reachable", &[FED, r#"cluster="east""#]), Some(1.0));

    // The federation goes: so do all its series and every watch.
    f.delete("prod").await?;
    f.wait_gone("prod", WAIT).await?;
    settled(port, |m| !m.0.contains(FED) && m.value("meshfed_member_watches", &[]) == Some(0.0)).await?;
    Ok(())
}
