//! The demo: a hub and two members on this machine, the example federation applied, the controller running, and the
//! result printed as a table. `--keep` leaves everything running and writes each cluster's kubeconfig to a directory.

use std::{path::PathBuf, time::Duration, time::Instant};

use anyhow::Result;
use clap::Parser;
use meshfed_api::MeshFederation;
use meshfed_e2e::{Fixture, HUB, NAMESPACE, example, is_ready};
use meshfed_testenv::Options;

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
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            std::env::var("MESHFED_LOG")
                .unwrap_or_else(|_| "warn,kube_client::client=error,kube_client::client::builder=off".into()),
        )
        .init();

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
        std::fs::create_dir_all(&args.dir)?;
        for c in fixture.env.clusters() {
            std::fs::write(args.dir.join(format!("{}.kubeconfig", c.name())), c.kubeconfig())?;
        }
        let dir = std::fs::canonicalize(&args.dir)?;
        println!("\nkubeconfigs in {}; for example:", dir.display());
        println!("  kubectl --kubeconfig {}/{HUB}.kubeconfig -n {NAMESPACE} get meshfederations", dir.display());
        println!("  kubectl --kubeconfig {}/east.kubeconfig get namespace istio-system --show-labels", dir.display());
        println!("Ctrl-C stops everything.");
        tokio::signal::ctrl_c().await?;
    }
    Ok(())
}

fn print_status(fed: &MeshFederation) {
    print!("{}", meshfed_operator::table::status_table(fed));
}
