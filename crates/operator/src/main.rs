use std::time::Duration;

use clap::{Parser, Subcommand};
use meshfed_operator::{
    controller::{self, Settings},
    metrics::Metrics,
};
use tracing_subscriber::{EnvFilter, fmt};

/// meshfed: one MeshFederation resource in a hub cluster, a working Istio multi-cluster mesh in its members.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the MeshFederation CRD as YAML (`meshfed crd | kubectl apply --server-side -f -`).
    Crd,
    /// Run the controller against the hub cluster of the current kubeconfig (or the in-cluster config).
    Run {
        /// Log as JSON lines instead of text.
        #[arg(long, env = "MESHFED_LOG_JSON")]
        log_json: bool,
        /// Seconds one member may take to answer in a reconcile before it is reported unreachable.
        #[arg(long, default_value_t = 10)]
        member_timeout: u64,
        /// Where to serve /metrics, /healthz and /readyz.
        #[arg(long, default_value = "0.0.0.0:8080")]
        metrics_addr: std::net::SocketAddr,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => print!("{}", meshfed_api::crd_yaml()),
        Command::Run { log_json, member_timeout, metrics_addr } => {
            let filter = EnvFilter::try_from_env("MESHFED_LOG").unwrap_or_else(|_| EnvFilter::new("info,kube=warn"));
            let logs = fmt().with_env_filter(filter);
            if log_json {
                logs.json().init()
            } else {
                logs.init()
            }
            let hub = kube::Client::try_default().await?;
            let settings = Settings { member_timeout: Duration::from_secs(member_timeout), ..Settings::default() };
            let metrics = Metrics::default();
            tokio::select! {
                r = controller::run(hub, settings, metrics.clone()) => r?,
                r = metrics.serve(metrics_addr) => r?,
                _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; stopping"),
            }
        }
    }
    Ok(())
}
