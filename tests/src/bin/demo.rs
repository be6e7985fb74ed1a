//! The demo: a hub and two members on this machine, the example federation applied, the controller running, and the
//! result printed as a table. `--keep` leaves everything running and writes each cluster's kubeconfig to a directory.
//! `--traffic` also runs the seeds' check on a real data plane (`meshfed_e2e::dataplane`) and prints the answers.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Result;
use clap::Parser;
use meshfed_api::MeshFederation;
use meshfed_e2e::{
    Fixture, HUB, NAMESPACE,
    dataplane::{CLIENT_ID, DataPlane, MEMBERS, REQUESTS, addresses, expected_answers, split},
    example, is_ready,
};
use meshfed_testenv::{Env, Options};

#[derive(Parser)]
#[command(about = "Run meshfed against a local hub and two member clusters")]
struct Args {
    /// Keep the clusters and the controller running until Ctrl-C, and write every cluster's kubeconfig.
    #[arg(long)]
    keep: bool,
    /// Where `--keep` writes the kubeconfigs.
    #[arg(long, default_value = "meshfed-demo")]
    dir: PathBuf,
    /// The example from deploy/examples to apply.
    #[arg(long, default_value = "multi-primary-multi-network")]
    example: String,
    /// Also run the seeds' check on a real data plane: a real istiod in each Primary, `hello` v1 in east and v2 in
    /// west behind sidecars (Istio's pilot-agent and upstream Envoy), a client in each member, and print the answers
    /// per version and cluster. Needs root (everything runs in a private network namespace); builds pilot-agent and
    /// istiod and fetches Envoy on first use.
    #[arg(long)]
    traffic: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            std::env::var("MESHFED_LOG")
                .unwrap_or_else(|_| "warn,kube_client::client=error,kube_client::client::builder=off".into()),
        )
        .init();
    if args.traffic {
        meshfed_testenv::may_make_network_namespace()?;
        println!("building (first use) or finding kube-apiserver, etcd, istiod, pilot-agent and Envoy...");
        return meshfed_testenv::in_network_namespace(&addresses(), move || traffic(args));
    }
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(demo(args))
}

async fn demo(args: Args) -> Result<()> {
    println!("starting a hub and members east, west (real kube-apiserver + etcd on 127.0.0.1)...");
    let started = Instant::now();
    let fixture = Fixture::start(&["east", "west"], Options { controller_manager: true, ..Options::default() }).await?;
    println!(
        "clusters up with the Istio and Sail operator CRDs in {:.1?} (the cloud and the Sail operator are played); applying deploy/examples/{}.yaml",
        started.elapsed(),
        args.example
    );

    let applied = Instant::now();
    let fed = fixture.apply(&example(&args.example)).await?;
    let fed = fixture.wait_for(&fed.metadata.name.unwrap(), Duration::from_secs(120), is_ready).await?;
    println!("Ready=True {:.1?} after apply\n", applied.elapsed());
    print_status(&fed);

    if args.keep {
        keep(&fixture.env, &args.dir, "").await?;
    }
    Ok(())
}

/// The seeds' check on the example federation, in a private network namespace: every member's client calls
/// `hello.sample:5000/hello` and the answers are printed per version and cluster.
async fn traffic(args: Args) -> Result<()> {
    println!(
        "starting a hub and members east, west in a private network namespace, applying deploy/examples/{}.yaml, then a real istiod in each Primary and the pods (hello v1 in east, v2 in west, a client in each)...",
        args.example
    );
    let started = Instant::now();
    let dp = DataPlane::start(&example(&args.example)).await?;
    println!("Ready=True and every pod ready {:.1?} after the start\n", started.elapsed());
    print_status(&dp.fed);
    let expected = expected_answers();
    let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
    println!("\n{REQUESTS} requests from each member's client to hello.sample:5000/hello:");
    let mut rows = Vec::new();
    for (member, ..) in MEMBERS {
        rows.push((member, split(&dp, member, &expected).await?));
    }
    println!("\n{:<16}{}", "CLIENT IN", expected.iter().map(|e| format!("{e:<12}")).collect::<String>());
    for (member, counts) in rows {
        let cells: String = expected.iter().map(|e| format!("{:<12}", counts.get(*e).copied().unwrap_or(0))).collect();
        println!("{member:<16}{cells}");
    }
    println!(
        "every answer came over mutual TLS, the server seeing the client as {CLIENT_ID} with the certificate istiod issued it"
    );
    if args.keep {
        let thread = std::fs::read_link("/proc/thread-self")?;
        let enter = format!("nsenter --net=/proc/{}/ns/net ", thread.display());
        keep(&dp.f.env, &args.dir, &enter).await?;
    }
    Ok(())
}

/// Writes every cluster's kubeconfig to `dir` and waits for Ctrl-C; `enter` prefixes the commands shown (to enter
/// the network namespace the clusters run in).
async fn keep(env: &Env, dir: &Path, enter: &str) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    for c in env.clusters() {
        std::fs::write(dir.join(format!("{}.kubeconfig", c.name())), c.kubeconfig())?;
    }
    let dir = std::fs::canonicalize(dir)?;
    println!("\nkubeconfigs in {}; for example:", dir.display());
    println!("  {enter}kubectl --kubeconfig {}/{HUB}.kubeconfig -n {NAMESPACE} get meshfederations", dir.display());
    println!(
        "  {enter}kubectl --kubeconfig {}/east.kubeconfig get namespace istio-system --show-labels",
        dir.display()
    );
    println!("Ctrl-C stops everything.");
    tokio::signal::ctrl_c().await?;
    Ok(())
}

fn print_status(fed: &MeshFederation) {
    print!("{}", meshfed_operator::table::status_table(fed));
}
