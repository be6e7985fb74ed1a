//! The benchmark: convergence time, API writes to converge, API writes of resyncs when nothing changed (the goal is
//! zero), and the operator's memory, for a federation of N primaries on N networks.
//!
//! It runs the real `meshfed` binary as its own process against a local hub and N local members, reads its
//! `/metrics`, and reads its memory from /proc. Run it with `hack/bench.sh --members 10`.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::Parser;
use kube::api::{Patch, PatchParams};
use meshfed_e2e::{Fixture, NAMESPACE, Scrape, is_ready, until};
use meshfed_testenv::Options;

#[derive(Parser)]
#[command(about = "Measure meshfed against local clusters")]
struct Args {
    /// How many member clusters (all Primary, each on its own network).
    #[arg(long, default_value_t = 3)]
    members: usize,
    /// How many resyncs to force once converged, to count the writes of a steady state.
    #[arg(long, default_value_t = 5)]
    resyncs: u64,
    /// The meshfed binary (default: next to this one).
    #[arg(long)]
    meshfed: Option<PathBuf>,
}

struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let meshfed = match args.meshfed {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("meshfed"),
    };
    let names: Vec<String> = (0..args.members).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let started = Instant::now();
    let f = Fixture::clusters(&refs, Options::default()).await?;
    println!("{} members + hub up in {:.1?}", args.members, started.elapsed());

    let kubeconfig = f.env.dir().join("hub.kubeconfig");
    std::fs::write(&kubeconfig, f.env.cluster("hub").kubeconfig())?;
    let port = meshfed_testenv::free_port()?;
    let op = Operator(
        Command::new(&meshfed)
            .args(["run", "--metrics-addr", &format!("127.0.0.1:{port}")])
            .env("KUBECONFIG", &kubeconfig)
            .env("MESHFED_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| {
                format!("starting {} (build it with `cargo build --release -p meshfed-operator`)", meshfed.display())
            })?,
    );
    let scrape = || Scrape::from(port);
    let every = Duration::from_millis(100);
    until("the operator's metrics", Duration::from_secs(30), every, async || scrape().await.is_ok()).await?;

    let clusters: String = names
        .iter()
        .map(|n| format!("  - {{name: {n}, network: net-{n}, kubeconfigSecretRef: {{name: {n}-kubeconfig}}}}\n"))
        .collect();
    let yaml = format!(
        "apiVersion: meshfed.io/v1alpha1\nkind: MeshFederation\nmetadata: {{name: bench, namespace: {NAMESPACE}}}\nspec:\n  meshID: bench\n  trust: {{root: {{generate: {{}}}}}}\n  clusters:\n{clusters}"
    );
    let applied = Instant::now();
    f.apply(&yaml).await?;
    f.wait_for("bench", Duration::from_secs(600), is_ready).await?;
    let converge = applied.elapsed();
    let m = scrape().await?;
    let (writes, status_writes, reconciles) =
        (m.sum("meshfed_member_writes_total"), m.sum("meshfed_status_writes_total"), m.sum("meshfed_reconciles_total"));

    // Force resyncs: every annotation change is a watch event and a reconcile with nothing to do.
    for i in 0..args.resyncs {
        let patch = serde_json::json!({"metadata": {"annotations": {"bench/resync": i.to_string()}}});
        f.federations().patch("bench", &PatchParams::default(), &Patch::Merge(&patch)).await?;
        let want = reconciles + i + 1;
        let resynced = async || scrape().await.is_ok_and(|m| m.sum("meshfed_reconciles_total") >= want);
        until("a resync", Duration::from_secs(60), every, resynced).await?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = scrape().await?;
    let (rss, hwm) = memory(op.0.id())?;

    println!("members:                         {}", args.members);
    println!("apply -> Ready=True:             {converge:.2?}");
    println!("member writes to converge:       {writes}");
    println!("status writes to converge:       {status_writes}");
    println!("reconciles to converge:          {reconciles}");
    println!(
        "writes in {} resyncs (steady):    {} member, {} status",
        args.resyncs,
        after.sum("meshfed_member_writes_total") - writes,
        after.sum("meshfed_status_writes_total") - status_writes
    );
    println!(
        "operator memory:                 {:.1} MiB resident, {:.1} MiB peak",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    Ok(())
}

/// Resident and peak resident memory of a process, in KiB.
fn memory(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().trim_end_matches(" kB").parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}
