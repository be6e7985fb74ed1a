//! The seeds' check on a real data plane (`../shared/DATAPLANE.md`): on a federation the real operator made, with a
//! real istiod in each Primary, `hello` v1 runs in east and v2 in west behind sidecars (Istio's `pilot-agent` driving
//! upstream Envoy), and a client in each member calls `hello.sample:5000/hello`. From each client, answers come from
//! both versions in both clusters (the split is asserted, never only success), every request over mutual TLS (a
//! mesh-wide STRICT PeerAuthentication refuses anything else), the server seeing the client's SPIFFE ID and the
//! certificate istiod issued it, each server presenting a certificate issued by its own member's intermediate that
//! chains to the federation's root.
//!
//! Everything runs in a private network namespace (root, as CI runs it): pods have non-loopback addresses there.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Pod as KubePod};
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams},
};
use meshfed_core::pki;
use meshfed_e2e::{
    ISTIO_NAMESPACE,
    dataplane::{DataPlane, HELLO_HOST, HELLO_PORT, MEMBERS, REQUESTS, WAIT, addresses, expected_answers, split},
    example, is_ready, sample_until, until,
};
use meshfed_testenv::{Pod, call};
use serde_json::json;

/// The certificates `pod`'s sidecar presents to a client of the mesh (the client's certificate and key, verifying
/// against `root_file`), fingerprints from the leaf up, after checking that the chain verifies.
async fn presented_chain(pod: &Pod, client: &Pod, root_file: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let certs = client.certs_dir();
    let out = tokio::process::Command::new("openssl")
        .args(["s_client", "-connect", &pod.addr(HELLO_PORT).to_string(), "-showcerts", "-verify_return_error"])
        .args(["-alpn", "istio-http/1.1,istio"])
        .arg("-cert")
        .arg(certs.join("cert-chain.pem"))
        .arg("-cert_chain")
        .arg(certs.join("cert-chain.pem"))
        .arg("-key")
        .arg(certs.join("key.pem"))
        .arg("-CAfile")
        .arg(root_file)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(10), out).await??;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && text.contains("Verify return code: 0 (ok)"),
        "{}'s certificate does not verify against the federation's root: {}",
        pod.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(pki::fingerprints(text.as_bytes()))
}

/// The seeds' check on the federation `yaml`: from each member's client, answers from v1 in east and v2 in west,
/// over mTLS with certificates issued under each member's intermediate.
async fn seeds_check(yaml: String) -> anyhow::Result<()> {
    let dp = DataPlane::start(&yaml).await?;
    let expected = expected_answers();
    let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
    for (member, ..) in MEMBERS {
        let counts = split(&dp, member, &expected).await?;
        println!("{member}'s client, {REQUESTS} requests: {counts:?}");
        ensure!(
            counts.keys().all(|k| expected.contains(&k.as_str())),
            "{member}'s client got answers from {counts:?}, beyond {expected:?}"
        );
        // Two endpoints, least-request balancing: each gets about half; fewer than an eighth means one is starved.
        for e in &expected {
            let n = counts.get(*e).copied().unwrap_or(0);
            ensure!(n >= REQUESTS / 8, "{member}'s client got {n} of {REQUESTS} answers from {e}: {counts:?}");
        }
    }
    // Plaintext is refused: what was answered went over mTLS.
    for server in dp.servers.values() {
        let plain = call(server.addr(HELLO_PORT), HELLO_HOST, "/hello", Duration::from_secs(5)).await;
        ensure!(plain.is_err(), "{} answered a plaintext request: {plain:?}", server.name());
    }
    let root = dp.root().await?;
    let root_file = dp.f.env.dir().join("federation-root.pem");
    std::fs::write(&root_file, &root)?;
    for (member, ..) in MEMBERS {
        let server = &dp.servers[member];
        // The intermediate of the istiod that issued the server's certificate: its member's, or its Primary's.
        let issuer = dp.control_plane(member);
        let intermediate = dp.intermediate(issuer).await?;
        for client in dp.clients.values() {
            let chain = presented_chain(server, client, &root_file).await?;
            let held = pki::fingerprints(&server.certificate_chain()?);
            ensure!(chain.first() == held.first(), "{} presents {chain:?}, not its agent's {held:?}", server.name());
            ensure!(
                chain.get(1) == pki::fingerprints(&intermediate).first(),
                "{}'s chain {chain:?} does not go through {issuer}'s intermediate",
                server.name()
            );
            let leaf = pki::certificates(&server.certificate_chain()?).into_iter().next().context("a leaf")?.1;
            ensure!(
                pki::issued_by(leaf.as_bytes(), &intermediate),
                "{}'s leaf is not signed by {issuer}'s intermediate",
                server.name()
            );
            ensure!(pki::issued_by(&intermediate, &root), "{issuer}'s intermediate is not signed by the root");
        }
        println!(
            "{} presents a certificate of {issuer}'s intermediate, chaining to the federation's root",
            server.name()
        );
    }
    Ok(())
}

/// Runs the seeds' check on the example federation `name` inside a private network namespace holding every pod's
/// address; prints how long it took.
fn seeds_check_in_netns(name: &'static str) -> anyhow::Result<()> {
    let started = Instant::now();
    let r = meshfed_testenv::in_network_namespace(&addresses(), move || seeds_check(example(name)));
    println!("{name}: {:?}", started.elapsed());
    r
}

#[test]
fn multi_primary_on_two_networks_each_client_reaches_the_other_version_through_its_members_east_west_gateway()
-> anyhow::Result<()> {
    seeds_check_in_netns("multi-primary-multi-network")
}

#[test]
fn primary_remote_the_remotes_pods_are_served_through_the_primarys_gateway_and_reach_both_versions()
-> anyhow::Result<()> {
    seeds_check_in_netns("primary-remote")
}

#[test]
fn primary_remote_on_two_networks_the_remotes_pods_are_served_and_reached_through_gateways() -> anyhow::Result<()> {
    seeds_check_in_netns("primary-remote-multi-network")
}

#[test]
fn multi_primary_on_one_network_each_client_reaches_both_versions_over_mtls_from_each_members_intermediate()
-> anyhow::Result<()> {
    seeds_check_in_netns("multi-primary")
}

/// What a client's requests got, each at its time since the start: `version@cluster`, or the error.
type Sent = Vec<(Duration, Result<String, String>)>;

/// Requests sent continuously from a client (one every 50 ms, each within 2 s), every answer (`version@cluster`) or
/// failure recorded with its time.
struct Traffic {
    task: tokio::task::JoinHandle<()>,
    log: std::sync::Arc<std::sync::Mutex<Sent>>,
}

impl Traffic {
    fn start(client: &Pod, started: Instant) -> Self {
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (addr, record) = (client.addr(HELLO_PORT), log.clone());
        let task = tokio::spawn(async move {
            loop {
                let answer = call(addr, HELLO_HOST, "/hello", Duration::from_secs(2)).await;
                let answer = answer.map(|a| format!("{}@{}", a.version, a.cluster)).map_err(|e| format!("{e:#}"));
                record.lock().unwrap().push((started.elapsed(), answer));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Self { task, log }
    }

    /// Stops sending; what was recorded.
    fn stop(self) -> Sent {
        self.task.abort();
        std::mem::take(&mut self.log.lock().unwrap())
    }
}

/// Whether every pod of `dp` holds a certificate issued by the current intermediate of the istiod serving it.
async fn every_pod_renewed(dp: &DataPlane) -> anyhow::Result<bool> {
    for (member, ..) in MEMBERS {
        let intermediate = dp.intermediate(dp.control_plane(member)).await?;
        for pod in [&dp.servers[member], &dp.clients[member]] {
            if !pki::issued_by(&pod.certificate_chain()?, &intermediate) {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// Runs `change` (given the time traffic started) under steady traffic from each member's client, then `after` more
/// of traffic; prints what each client sent and got, and fails on any failed request (each shown with its time and
/// error) or when a client got no answer from a version in the last 10 s; returns what each member's client sent and
/// got.
async fn under_traffic(
    dp: &mut DataPlane,
    what: &str,
    after: Duration,
    change: impl AsyncFnOnce(&mut DataPlane, Instant) -> anyhow::Result<()>,
) -> anyhow::Result<BTreeMap<&'static str, Sent>> {
    let ((), sent) = traffic_through(dp, what, after, change).await?;
    let failures = failures(&sent);
    ensure!(failures.is_empty(), "{what}: {} requests failed:\n{}", failures.len(), failures.join("\n"));
    Ok(sent)
}

/// Like [`under_traffic`], without failing on failed requests: prints them (each with its time and error) and
/// returns what `change` returned and what each member's client sent and got. Still fails when a client got no
/// answer from a version in the last 10 s.
async fn traffic_through<R>(
    dp: &mut DataPlane,
    what: &str,
    after: Duration,
    change: impl AsyncFnOnce(&mut DataPlane, Instant) -> anyhow::Result<R>,
) -> anyhow::Result<(R, BTreeMap<&'static str, Sent>)> {
    let expected = expected_answers();
    let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
    for (member, ..) in MEMBERS {
        split(dp, member, &expected).await?;
    }
    let started = Instant::now();
    let traffic: Vec<(&str, Traffic)> =
        MEMBERS.iter().map(|(m, ..)| (*m, Traffic::start(&dp.clients[*m], started))).collect();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let changed = change(dp, started).await?;
    println!("{what}: done at {:?}", started.elapsed());
    tokio::time::sleep(after).await;
    let mut sent = BTreeMap::new();
    for (member, t) in traffic {
        let log = t.stop();
        let mut counts = BTreeMap::<&str, usize>::new();
        for (_, a) in &log {
            *counts.entry(a.as_ref().map_or("failed", String::as_str)).or_default() += 1;
        }
        println!("{what}: {member}'s client sent {} requests over {:?}: {counts:?}", log.len(), started.elapsed());
        let gaps: Vec<String> = expected.iter().map(|e| format!("{e} {:?}", longest_gap(&log, e))).collect();
        println!("{what}: {member}'s client, the longest time without an answer from each version: {gaps:?}");
        let recent = started.elapsed().saturating_sub(Duration::from_secs(10));
        let tail: Vec<&String> =
            log.iter().filter(|(at, _)| *at > recent).filter_map(|(_, a)| a.as_ref().ok()).collect();
        for e in &expected {
            ensure!(tail.iter().any(|a| a == e), "{member}'s client got no answer from {e} in the last 10 s: {tail:?}");
        }
        sent.insert(member, log);
    }
    let failures = failures(&sent);
    println!(
        "{what}: {} requests failed{}{}",
        failures.len(),
        if failures.is_empty() { "" } else { ":\n" },
        failures.join("\n")
    );
    Ok((changed, sent))
}

/// Every failed request of `sent`, with its client, its time and its error.
fn failures(sent: &BTreeMap<&str, Sent>) -> Vec<String> {
    let failed = sent.iter().flat_map(|(m, log)| log.iter().map(move |(at, a)| (m, at, a)));
    failed.filter_map(|(m, at, a)| Some(format!("{m} at {at:?}: {}", a.as_ref().err()?))).collect()
}

/// The longest time `log` went without an answer `answer` (from its first request to its last).
fn longest_gap(log: &Sent, answer: &str) -> Duration {
    let (Some(first), Some(last)) = (log.first(), log.last()) else { return Duration::ZERO };
    let answered = log.iter().filter(|(_, a)| a.as_deref() == Ok(answer)).map(|(at, _)| *at);
    let times: Vec<Duration> = std::iter::once(first.0).chain(answered).chain([last.0]).collect();
    times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
}

/// The answers of `log` between `from` and `to` (times since the traffic started), by `version@cluster`.
fn answers_between(log: &Sent, from: Duration, to: Duration) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for (_, a) in log.iter().filter(|(at, _)| (from..=to).contains(at)) {
        if let Ok(a) = a {
            *counts.entry(a.clone()).or_default() += 1;
        }
    }
    counts
}

/// A root rotation from start to end under steady traffic, with workload certificates of one minute
/// (`SECRET_TTL=60s`, the agents renewing at half life) and `workloadCertificateTTL: 1m` to match. The last phase
/// waits `workloadCertificateTTL` plus a five-minute margin: once every pod really holds a certificate from its
/// member's new intermediate and the minute has passed in real time, the controller's clock skips the margin. Then
/// traffic runs 40 s more (every agent renews again, trusting the new root alone). Zero failed requests.
async fn root_rotation_under_traffic() -> anyhow::Result<()> {
    let yaml = example("multi-primary").replace("  trust:\n", "  trust:\n    workloadCertificateTTL: 1m\n");
    let mut dp = DataPlane::start_with(&yaml, &[("SECRET_TTL", "60s")]).await?;
    let old = dp.fed.status.as_ref().and_then(|s| s.trust.as_ref()?.root_fingerprint.clone()).context("a root")?;
    under_traffic(&mut dp, "root rotation", Duration::from_secs(40), async |dp, started| {
        let patch = json!({"metadata": {"annotations": {"meshfed.io/rotate-root": "2026-12-06"}}});
        dp.f.federations().patch("prod", &PatchParams::default(), &Patch::Merge(&patch)).await?;
        println!("root rotation: asked at {:?}", started.elapsed());
        let (mut phases, mut awaiting_since, mut skipped) = (Vec::<String>::new(), None, false);
        loop {
            let fed = dp.f.federations().get("prod").await?;
            let trust = fed.status.as_ref().and_then(|s| s.trust.clone()).unwrap_or_default();
            let phase = trust.rotation_phase.clone().unwrap_or_else(|| "none".into());
            if phases.last() != Some(&phase) {
                println!("root rotation: phase {phase} at {:?}", started.elapsed());
                phases.push(phase.clone());
            }
            if phase.contains("AwaitingWorkloadCertificates") {
                let since = *awaiting_since.get_or_insert_with(Instant::now);
                if !skipped && since.elapsed() > Duration::from_secs(60) && every_pod_renewed(dp).await? {
                    println!(
                        "root rotation: every pod renewed under the new intermediates at {:?}; the clock skips the five-minute margin",
                        started.elapsed()
                    );
                    dp.f.clock.advance(meshfed_core::trust::WORKLOAD_MARGIN + Duration::from_secs(5));
                    dp.f.poke("prod").await?;
                    skipped = true;
                }
            }
            if is_ready(&fed) && trust.rotation_phase.is_none() && trust.root_fingerprint.as_ref() != Some(&old) {
                return Ok(());
            }
            ensure!(
                started.elapsed() < Duration::from_secs(300),
                "the rotation did not finish in 5 minutes (phases {phases:?})\n{}",
                dp.logs()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await?;
    Ok(())
}

/// An intermediate renewal under steady traffic: intermediates valid 2h, renewed 116 minutes before expiry; the
/// controller's clock is advanced 4.5 minutes (within the 5 minutes new certificates are backdated), meshfed renews
/// every member's intermediate, istiod takes it from its `cacerts`, and every pod renews its certificate under it
/// (`SECRET_TTL=60s`); then 10 s more of traffic. Zero failed requests.
async fn intermediate_renewal_under_traffic() -> anyhow::Result<()> {
    let yaml = example("multi-primary")
        .replace("  trust:\n", "  trust:\n    intermediate: {validity: 2h, renewBefore: 116m}\n");
    let mut dp = DataPlane::start_with(&yaml, &[("SECRET_TTL", "60s")]).await?;
    let mut initial = BTreeMap::new();
    for (member, ..) in MEMBERS {
        initial.insert(member, dp.intermediate(member).await?);
    }
    under_traffic(&mut dp, "intermediate renewal", Duration::from_secs(10), async |dp, started| {
        dp.f.clock.advance(Duration::from_secs(270));
        dp.f.poke("prod").await?;
        let mut renewed = false;
        loop {
            if !renewed {
                let mut all = true;
                for (member, ..) in MEMBERS {
                    all &= dp.intermediate(member).await? != initial[member];
                }
                if all {
                    println!("intermediate renewal: every member's cacerts renewed at {:?}", started.elapsed());
                    renewed = true;
                }
            }
            if renewed && every_pod_renewed(dp).await? {
                println!("intermediate renewal: every pod renewed under it at {:?}", started.elapsed());
                return Ok(());
            }
            ensure!(started.elapsed() < Duration::from_secs(180), "no renewal through in 3 minutes\n{}", dp.logs());
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await?;
    Ok(())
}

#[test]
fn an_intermediate_renewal_under_steady_traffic_fails_no_request() -> anyhow::Result<()> {
    meshfed_testenv::in_network_namespace(&addresses(), intermediate_renewal_under_traffic)
}

#[test]
fn a_root_rotation_under_steady_traffic_fails_no_request() -> anyhow::Result<()> {
    meshfed_testenv::in_network_namespace(&addresses(), root_rotation_under_traffic)
}

/// How long a member's API server stays down under traffic.
const OUTAGE: Duration = Duration::from_secs(30);

/// Three changes under steady traffic, on one federation on two networks (tokens of 10 minutes, the TokenRequest
/// API's shortest), each with its own traffic and its own count:
/// 1. west's east-west gateway Deployment deleted ([`gateway_deleted`]): meshfed puts it back, cross-network answers
///    resume;
/// 2. west's API server stopped for [`OUTAGE`] and started again: the data plane needs no API server, so every client
///    keeps getting answers from both versions while it is down (asserted), failures counted;
/// 3. the reader tokens refreshed (the controller's clock advanced past their refresh point, as
///    [`meshfed_e2e::Fixture::advance_past_refresh`] does): the remote secrets hold new tokens, each istiod swaps to its new client
///    for the other member (make-before-break), zero requests fail and no version goes unanswered for 3 s.
///
/// The gateway goes first, on a settled member: right after an outage meshfed sees a deletion only once its watch
/// of the member is back (kube's backoff, up to 30 s; `resilience.rs` has that case). The example's Istio is 1.30.3,
/// on which meshfed also marks istiod for a restart after a refresh; the istiod run here (the pinned
/// `istio.io/istio` build) takes the new secret in place and is not restarted.
async fn a_deleted_gateway_an_outage_and_a_token_refresh() -> anyhow::Result<()> {
    let yaml = example("multi-primary-multi-network").replace("tokenTTL: 24h", "tokenTTL: 10m");
    ensure!(yaml.contains("tokenTTL: 10m"), "the example declares a token TTL");
    let mut dp = DataPlane::start(&yaml).await?;
    gateway_deleted(&mut dp, "west's east-west gateway deleted").await?;
    let expected = expected_answers();

    let what = "west's API server stopped";
    let ((stopped, restarted), sent) = traffic_through(&mut dp, what, Duration::from_secs(10), async |dp, started| {
        dp.f.env.cluster_mut("west").stop();
        let stopped = started.elapsed();
        println!("{what}: at {stopped:?}");
        tokio::time::sleep(OUTAGE).await;
        let restarted = started.elapsed();
        dp.f.env.cluster_mut("west").start().await?;
        println!("{what}: started again at {restarted:?}, ready at {:?}", started.elapsed());
        dp.f.wait_for("prod", WAIT, is_ready).await?;
        println!("{what}: the federation Ready again at {:?}", started.elapsed());
        Ok((stopped, restarted))
    })
    .await?;
    for (member, log) in &sent {
        let during = answers_between(log, stopped, restarted);
        println!("{what}: {member}'s client while west's API server was down ({:?}): {during:?}", restarted - stopped);
        for e in &expected {
            ensure!(during.contains_key(e), "{member}'s client got no answer from {e} while west was down: {during:?}");
        }
    }

    let what = "reader-token refresh";
    let pairs = [("east", "west"), ("west", "east")];
    let mut before = Vec::new();
    for (holder, target) in pairs {
        before.push(dp.f.remote_secret(ISTIO_NAMESPACE, holder, target).await?.data);
    }
    let swaps_before: Vec<usize> = pairs.iter().map(|(h, t)| swaps(&dp, h, t)).collect::<anyhow::Result<_>>()?;
    let sent = under_traffic(&mut dp, what, Duration::from_secs(10), async |dp, started| {
        dp.f.advance_past_refresh(ISTIO_NAMESPACE, &pairs).await?;
        dp.f.poke("prod").await?;
        let (mut rewritten, mut swapped) = (BTreeMap::new(), BTreeMap::new());
        // West's istiod sees its new secret once its own watch is back from the outage (client-go's backoff, up to a
        // minute); a second refresh meanwhile (the fresh tokens fall due again) changes nothing asserted here.
        sample_until(started, started.elapsed() + 2 * WAIT, Duration::from_millis(200), async |_, elapsed| {
            for (i, (holder, target)) in pairs.iter().enumerate() {
                let now = dp.f.remote_secret(ISTIO_NAMESPACE, holder, target).await?.data;
                if !rewritten.contains_key(holder) && now != before[i] {
                    rewritten.insert(*holder, elapsed);
                }
                if !swapped.contains_key(holder) && swaps(dp, holder, target)? > swaps_before[i] {
                    swapped.insert(*holder, elapsed);
                }
            }
            Ok(rewritten.len() == pairs.len() && swapped.len() == pairs.len())
        })
        .await
        .with_context(|| format!("secrets rewritten at {rewritten:?}, istiods swapped at {swapped:?}"))?;
        println!("{what}: remote secrets rewritten at {rewritten:?}, each istiod on its new client at {swapped:?}");
        Ok(())
    })
    .await?;
    // Answers from both clusters kept coming: no version went missing for longer than a few requests' worth.
    for (member, log) in &sent {
        for e in &expected {
            let gap = longest_gap(log, e);
            ensure!(gap < Duration::from_secs(3), "{what}: {member}'s client got no answer from {e} for {gap:?}");
        }
    }
    Ok(())
}

/// West's east-west gateway Deployment deleted under steady traffic, its pod going with it (played: the test is the
/// garbage collector and the kubelet); meshfed puts the Deployment back (asserted), the pod is started again from
/// it, and east's client gets answers from v2 in west again (asserted). Prints the times and the failures.
async fn gateway_deleted(dp: &mut DataPlane, what: &str) -> anyhow::Result<()> {
    let ((deleted, killed, restored, running), sent) =
        traffic_through(dp, what, Duration::from_secs(10), async |dp, started| {
            let west = dp.f.member("west").await?;
            let deployments = Api::<Deployment>::namespaced(west.clone(), ISTIO_NAMESPACE);
            let old = deployments.get("istio-eastwestgateway").await?.metadata.uid;
            deployments.delete("istio-eastwestgateway", &DeleteParams::default()).await?;
            let deleted = started.elapsed();
            // As the garbage collector and the kubelet would: the gateway's pod goes with its Deployment.
            let pod = dp.gateways.remove("west").context("west's gateway pod")?;
            let name = pod.name().to_string();
            drop(pod);
            Api::<KubePod>::namespaced(west, ISTIO_NAMESPACE).delete(&name, &DeleteParams::default()).await?;
            let killed = started.elapsed();
            println!("{what}: deleted and its pod killed at {killed:?}");
            let back = async || {
                let now = deployments.get_opt("istio-eastwestgateway").await;
                now.is_ok_and(|d| d.is_some_and(|d| d.metadata.uid != old))
            };
            until("meshfed to put west's gateway Deployment back", WAIT, Duration::from_millis(100), back).await?;
            let restored = started.elapsed();
            println!("{what}: meshfed put it back at {restored:?}");
            let gateway_ip = MEMBERS.iter().find(|m| m.0 == "west").map(|m| m.4).context("west's gateway address")?;
            let spec = dp.gateway_pod("west", gateway_ip).await?.context("west's restored gateway")?;
            let pod = Pod::start(dp.f.env.cluster("west"), dp.config_cluster("west"), spec).await?;
            dp.gateways.insert("west".into(), pod);
            let running = started.elapsed();
            println!("{what}: its pod ready again at {running:?}");
            Ok((deleted, killed, restored, running))
        })
        .await?;
    let east = &sent["east"];
    let resumed = east.iter().find(|(at, a)| *at > killed && a.as_deref() == Ok("v2@west")).map(|(at, _)| *at);
    let resumed = resumed.context("east's client got no answer from west after its gateway went")?;
    println!(
        "{what}: meshfed put the Deployment back {:?} after its deletion; the pod ran again {:?} and east's client got v2@west again {:?} after the pod went",
        restored - deleted,
        running - killed,
        resumed - killed
    );
    // meshfed's watch on the member sees the deletion: the repair takes about a second, not a resync.
    ensure!(
        restored - deleted < Duration::from_secs(10),
        "meshfed put the gateway back only after {:?}",
        restored - deleted
    );
    Ok(())
}

/// How many times `holder`'s istiod has swapped its client for `target` to a new remote secret (it builds a client
/// from the new kubeconfig, syncs it, then stops the old one).
fn swaps(dp: &DataPlane, holder: &str, target: &str) -> anyhow::Result<usize> {
    let log = std::fs::read_to_string(dp.istiods[holder].log())?;
    Ok(log.matches(&format!("stopping previous cluster {target} after new cluster synced")).count())
}

#[test]
fn through_a_deleted_gateway_an_api_server_outage_and_a_token_refresh_answers_keep_coming() -> anyhow::Result<()> {
    meshfed_testenv::in_network_namespace(&addresses(), a_deleted_gateway_an_outage_and_a_token_refresh)
}
