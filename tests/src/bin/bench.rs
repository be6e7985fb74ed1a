//! The benchmark: convergence time against its floor, where the time goes, API writes to converge, API writes of
//! resyncs when nothing changed (the goal is zero), and the operator's CPU and memory; for N primaries on N
//! networks (or all on one), optionally serving R remotes, in one federation or in F federations: each over its own members, or with
//! `--shared` all over the same members, each federation in its own Istio namespace and revision.
//!
//! It runs the real `meshfed` binary as its own process against a local hub and local members, reads its
//! `/metrics`, its timeline (one log line per reconcile, with the steps it took and why it ran), and its CPU and
//! memory from /proc. Run it with `hack/bench.sh --members 10`.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::Parser;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams},
    runtime::wait::await_condition,
};
use meshfed_api::MeshFederation;
use meshfed_e2e::{Fixture, NAMESPACE, Scrape, is_ready, until};
use meshfed_testenv::Options;

#[derive(Parser)]
#[command(about = "Measure meshfed against local clusters")]
struct Args {
    /// How many primary clusters (per federation), each on its own network.
    #[arg(long, default_value_t = 3)]
    members: usize,
    /// How many remote clusters (per federation), served by the primaries in turn (each on its primary's network).
    #[arg(long, default_value_t = 0)]
    remotes: usize,
    /// How many federations, each over its own members (or, with `--shared`, all over the same ones).
    #[arg(long, default_value_t = 1)]
    federations: usize,
    /// The federations share their members, each in its own Istio namespace and revision.
    #[arg(long)]
    shared: bool,
    /// Every cluster on one network (no gateways but the primaries' that serve remotes).
    #[arg(long)]
    one_network: bool,
    /// Istio's ambient data plane (`dataPlane: Ambient`; primaries only, each on its own network).
    #[arg(long)]
    ambient: bool,
    /// How many resyncs to force once converged, to count the writes of a steady state.
    #[arg(long, default_value_t = 5)]
    resyncs: u64,
    /// How long to watch the idle operator's CPU once converged, in seconds.
    #[arg(long, default_value_t = 10)]
    idle: u64,
    /// The meshfed binary (default: next to this one).
    #[arg(long)]
    meshfed: Option<PathBuf>,
}

/// The writes that depend on each other on the way to `Ready=True`, however many members: the finalizer (hub), the
/// claim, the three apply stages (namespaces, namespaced objects, the control plane), the TokenRequest, the remote
/// secret, the status (hub). Everything else goes concurrently with one of these.
const CRITICAL_WRITES: u32 = 8;

struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Operator {
    /// CPU seconds (user + system) the operator used so far.
    fn cpu(&self) -> Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.0.id()))?;
        // After the command name (in parentheses, which may hold spaces): field 3 is the state; 14 and 15 the times.
        let fields: Vec<&str> = stat.rsplit_once(')').context("/proc stat")?.1.split_whitespace().collect();
        let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
        Ok(ticks / 100.0)
    }

    /// How many sockets the operator holds open (connections to API servers, and its metrics listener).
    fn sockets(&self) -> Result<usize> {
        let fds = std::fs::read_dir(format!("/proc/{}/fd", self.0.id()))?;
        Ok(fds
            .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .filter(|l| l.to_string_lossy().starts_with("socket:"))
            .count())
    }

    /// Resident and peak resident memory, in MiB.
    fn memory(&self) -> Result<(f64, f64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.0.id()))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.trim().trim_end_matches(" kB").parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        Ok((field("VmRSS:") / 1024.0, field("VmHWM:") / 1024.0))
    }
}

/// One reconcile as the operator logged it: when it ended, why it ran, and its steps.
struct Reconciled {
    at: jiff::Timestamp,
    federation: String,
    reason: String,
    steps: String,
}

fn parse_timeline(line: &str) -> Option<Reconciled> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    (v["target"] == "meshfed::timeline").then_some(())?;
    let spans = v["spans"].as_array()?;
    let field = |name: &str| spans.iter().find_map(|s| s[name].as_str()).unwrap_or("?").to_string();
    let fields = v["fields"].as_object()?;
    // The reconcile's steps, or one member's part in a step (the other fields, as they come).
    let steps = match fields.get("steps") {
        Some(steps) => {
            format!("{} ready={}", steps.as_str()?, fields.get("ready").and_then(|r| r.as_str()).unwrap_or("?"))
        }
        None => fields.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" "),
    };
    Some(Reconciled {
        at: v["timestamp"].as_str()?.parse().ok()?,
        federation: field("object.ref"),
        reason: field("object.reason"),
        steps,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let meshfed = match args.meshfed {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("meshfed"),
    };
    // Per federation: its name, primaries and remotes.
    let federations: Vec<(String, Vec<String>, Vec<String>)> = (0..args.federations)
        .map(|j| {
            let (name, prefix) = match (args.federations, args.shared) {
                (1, _) => ("bench".to_string(), String::new()),
                (_, true) => (format!("bench-{j}"), String::new()),
                (_, false) => (format!("bench-{j}"), format!("f{j}")),
            };
            let primaries = (0..args.members).map(|i| format!("{prefix}p{i}")).collect();
            (name, primaries, (0..args.remotes).map(|i| format!("{prefix}r{i}")).collect())
        })
        .collect();
    let mut refs: Vec<&str> = federations.iter().flat_map(|(_, p, r)| p.iter().chain(r)).map(String::as_str).collect();
    // Every federation's own cluster counts as one member, whether or not federations share the clusters.
    let members = refs.len();
    refs.sort();
    refs.dedup();
    let started = Instant::now();
    let f = Fixture::clusters(&refs, Options::default()).await?;
    // Each federation reaches its members with its own credential, joined for it as `meshfed join` does.
    for (name, primaries, remotes) in &federations {
        let istio = if args.shared { format!("istio-{name}") } else { "istio-system".to_string() };
        let members: Vec<&str> = primaries.iter().chain(remotes).map(String::as_str).collect();
        f.join_federation(name, &istio, &members).await?;
    }
    println!("{} members + hub up in {:.1?}", refs.len(), started.elapsed());

    // A running cluster's API server has served these kinds before; a fresh one sets up each kind (a CRD's
    // schema, its storage) on first use, which is not meshfed's time: every kind is listed once first.
    let warm = refs.iter().map(|m| async {
        let client = f.member(m).await?;
        for kind in meshfed_core::kinds::OWNED_KINDS {
            let ar = meshfed_operator::member::kinds::api_resource(kind);
            Api::<DynamicObject>::all_with(client.clone(), &ar).list(&ListParams::default()).await?;
        }
        anyhow::Ok(())
    });
    futures::future::try_join_all(warm).await?;

    // One write's latency on these API servers, now: the unit of the floor.
    let configmaps: Api<ConfigMap> = Api::namespaced(f.member(refs[0]).await?, "default");
    let mut latencies = Vec::new();
    for i in 0..30 {
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({"metadata": {"name": format!("bench-{i}")}}))?;
        let t = Instant::now();
        configmaps.create(&PostParams::default(), &cm).await?;
        latencies.push(t.elapsed());
    }
    for i in 0..30 {
        configmaps.delete(&format!("bench-{i}"), &DeleteParams::default()).await?;
    }
    latencies.sort();
    let write = latencies[latencies.len() / 2];
    // Real clusters write in parallel; here every member shares this machine's cores, so many writes at once also
    // cost their total: the machine's write throughput, measured with writes to every cluster at once (10 each, and at
    // least 100 in all, so that a few clusters still give a steady figure).
    let clients = futures::future::try_join_all(refs.iter().map(|m| f.member(m))).await?;
    let each = 10.max(100_usize.div_ceil(clients.len()));
    let burst = clients.iter().flat_map(|c| (0..each).map(move |i| (c, i)));
    let t = Instant::now();
    let writes = burst.clone().map(|(c, i)| async move {
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({"metadata": {"name": format!("burst-{i}")}}))?;
        Api::<ConfigMap>::namespaced(c.clone(), "default").create(&PostParams::default(), &cm).await?;
        anyhow::Ok(())
    });
    futures::future::try_join_all(writes).await?;
    let per_write = t.elapsed() / (each * clients.len()) as u32;
    futures::future::try_join_all(burst.map(|(c, i)| async move {
        Api::<ConfigMap>::namespaced(c.clone(), "default").delete(&format!("burst-{i}"), &DeleteParams::default()).await
    }))
    .await?;

    let kubeconfig = f.env.dir().join("hub.kubeconfig");
    std::fs::write(&kubeconfig, f.env.cluster("hub").kubeconfig())?;
    let port = meshfed_testenv::free_port()?;
    let mut child = Command::new(&meshfed)
        .args(["run", "--metrics-addr", &format!("127.0.0.1:{port}")])
        .env("KUBECONFIG", &kubeconfig)
        // Each reconcile's steps; with `MESHFED_BENCH_MEMBERS=1`, each member's part in them too.
        .env(
            "MESHFED_LOG",
            match std::env::var_os("MESHFED_BENCH_MEMBERS") {
                Some(_) => "warn,meshfed::timeline=debug,kube_runtime::controller=info",
                None => "warn,meshfed::timeline=info,kube_runtime::controller=info",
            },
        )
        .env("MESHFED_LOG_JSON", "true")
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!("starting {} (build it with `cargo build --release -p meshfed-operator`)", meshfed.display())
        })?;
    let timeline: Arc<Mutex<Vec<Reconciled>>> = Arc::default();
    let stdout = child.stdout.take().context("the operator's stdout")?;
    let lines = timeline.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(r) = parse_timeline(&line) {
                lines.lock().expect("timeline lock").push(r);
            }
        }
    });
    let op = Operator(child);
    let scrape = || Scrape::from(port);
    let every = Duration::from_millis(100);
    until("the operator's metrics", Duration::from_secs(30), every, async || scrape().await.is_ok()).await?;

    let yaml = |name: &str, primaries: &[String], remotes: &[String]| {
        let istio = match args.shared {
            true => format!("  istio: {{namespace: istio-{name}, revision: {name}}}\n"),
            false => String::new(),
        };
        let network = |p: &str| if args.one_network { "net".to_string() } else { format!("net-{p}") };
        let clusters: String = primaries
            .iter()
            .map(|n| {
                let net = network(n);
                format!("  - {{name: {n}, network: {net}, kubeconfigSecretRef: {{name: {n}-{name}-kubeconfig}}}}\n")
            })
            .chain(remotes.iter().enumerate().map(|(i, n)| {
                let p = &primaries[i % primaries.len()];
                let net = network(p);
                format!(
                    "  - {{name: {n}, network: {net}, role: Remote, controlPlane: {p}, kubeconfigSecretRef: {{name: {n}-{name}-kubeconfig}}}}\n"
                )
            }))
            .collect();
        let data_plane = if args.ambient { "  dataPlane: Ambient\n" } else { "" };
        format!(
            "apiVersion: meshfed.io/v1alpha1\nkind: MeshFederation\nmetadata: {{name: {name}, namespace: {NAMESPACE}}}\nspec:\n  meshID: {name}\n{istio}{data_plane}  trust: {{root: {{generate: {{}}}}}}\n  clusters:\n{clusters}"
        )
    };
    let names: Vec<&String> = federations.iter().map(|(name, _, _)| name).collect();
    let cpu_before = op.cpu()?;
    let applied = Instant::now();
    let applied_at = jiff::Timestamp::now();
    for (name, primaries, remotes) in &federations {
        f.apply(&yaml(name, primaries, remotes)).await?;
    }
    // Watched, not polled: the time Ready=True is written, to the watch's latency.
    for name in &names {
        let ready = await_condition(f.federations(), name, |fed: Option<&MeshFederation>| fed.is_some_and(is_ready));
        tokio::time::timeout(Duration::from_secs(900), ready).await.context("waiting for Ready=True")??;
    }
    let converge = applied.elapsed();
    let cpu_converge = op.cpu()? - cpu_before;
    let m = scrape().await?;
    let (writes, status_writes, reconciles) =
        (m.sum("meshfed_member_writes_total"), m.sum("meshfed_status_writes_total"), m.sum("meshfed_reconciles_total"));
    let lists = m.sum("meshfed_member_lists_total");
    let (_, peak_converge) = op.memory()?;

    // Force resyncs: every annotation change is a watch event and a reconcile with nothing to do.
    for i in 0..args.resyncs {
        for name in &names {
            let patch = serde_json::json!({"metadata": {"annotations": {"bench/resync": i.to_string()}}});
            f.federations().patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        }
        let want = reconciles + (i + 1) * names.len() as u64;
        let resynced = async || scrape().await.is_ok_and(|m| m.sum("meshfed_reconciles_total") >= want);
        until("a resync", Duration::from_secs(120), every, resynced).await?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = scrape().await?;
    let idle_from = op.cpu()?;
    tokio::time::sleep(Duration::from_secs(args.idle)).await;
    let idle_cpu = op.cpu()? - idle_from;
    let (rss, hwm) = op.memory()?;
    let sockets = op.sockets()?;

    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
    println!("\ntimeline of the convergence (reconciles that ended by Ready, time since apply):");
    for r in timeline.lock().expect("timeline lock").iter() {
        let since = r.at.duration_since(applied_at).as_secs_f64() * 1e3;
        if since <= converge.as_secs_f64() * 1e3 + 50.0 {
            println!("  +{since:7.1} ms  {}  ({})  {}", r.federation, r.reason, r.steps);
        }
    }
    println!();
    println!(
        "members:                         {members} ({} primaries, {} remotes per federation)",
        args.members, args.remotes
    );
    println!("federations:                     {} (over {} clusters)", names.len(), refs.len());
    println!("one write (median of 30):        {} (p90 {})", ms(write), ms(latencies[latencies.len() * 9 / 10]));
    println!("writes at once (this machine):   {} each, over {} writes", ms(per_write), each * refs.len());
    // The floor: the dependent writes one after another, or all of meshfed's writes at this machine's throughput,
    // whichever is longer.
    let (chain, total) = (write * CRITICAL_WRITES, per_write * (writes + status_writes) as u32);
    let floor = chain.max(total);
    println!(
        "floor:                           {} ({CRITICAL_WRITES} dependent writes: {}; all writes at once: {})",
        ms(floor),
        ms(chain),
        ms(total)
    );
    println!(
        "apply -> Ready=True:             {} = {:.1}x the floor",
        ms(converge),
        converge.as_secs_f64() / floor.as_secs_f64()
    );
    println!("member writes to converge:       {writes} ({:.1} per member)", writes as f64 / members as f64);
    println!("status writes to converge:       {status_writes}");
    println!("reconciles to converge:          {reconciles}");
    println!(
        "lists (caches could not answer): {lists} to converge, {} in the resyncs",
        after.sum("meshfed_member_lists_total") - lists
    );
    println!(
        "writes in {} resyncs (steady):    {} member, {} status",
        args.resyncs,
        after.sum("meshfed_member_writes_total") - writes,
        after.sum("meshfed_status_writes_total") - status_writes
    );
    println!(
        "operator CPU to converge:        {cpu_converge:.2} s ({:.1} ms per member)",
        cpu_converge * 1e3 / members as f64
    );
    println!("operator CPU idle:               {idle_cpu:.2} s in {} s", args.idle);
    println!(
        "operator memory:                 {rss:.1} MiB resident ({:.2} MiB per member), {peak_converge:.1} MiB peak converging, {hwm:.1} MiB peak",
        rss / members as f64
    );
    println!("operator sockets:                {sockets} ({:.1} per member)", sockets as f64 / members as f64);
    let watches = after.sum("meshfed_kind_watches");
    println!("watches open on members:         {watches} ({:.1} per cluster)", watches as f64 / refs.len() as f64);
    Ok(())
}
