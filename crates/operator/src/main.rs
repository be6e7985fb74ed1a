use std::time::Duration;

use clap::{Parser, Subcommand};
use meshfed_operator::{
    check, join, leader,
    metrics::Metrics,
    reconcile::{self, Settings},
    table,
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
    /// Print, without any cluster, the objects meshfed would hold in each member for a federation (YAML to review
    /// and diff; Secret data redacted; keys, tokens and gateway addresses as placeholders).
    Render {
        /// The MeshFederation manifest.
        #[arg(short = 'f', long)]
        file: std::path::PathBuf,
        /// Only this member cluster.
        #[arg(long)]
        cluster: Option<String>,
    },
    /// Verify a federation end to end from the hub, independently of the operator's status: every member reached
    /// through its kubeconfig Secret, its claim, network, cacerts against the root, control plane and gateway, and
    /// every remote secret used against its target. Exit 0 only when everything passes. Never prints a secret.
    Check {
        /// Only this federation (default: every federation of the namespace).
        name: Option<String>,
        /// The federations' namespace (default: the kubeconfig's).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Try again until everything passes or this much time has passed, for example `2m`.
        #[arg(long, value_parser = humantime::parse_duration)]
        wait: Option<Duration>,
        /// Also check that a leader holds the operator's Lease in this namespace (where the chart runs it, for
        /// example `meshfed-system`).
        #[arg(long)]
        lease_namespace: Option<String>,
        /// Output: `text` (default) or `json`.
        #[arg(short = 'o', long, default_value = "text")]
        output: String,
    },
    /// Print the state of the federations in the hub of the current kubeconfig: conditions, and per cluster its
    /// role, network, reachability, gateway, control plane and expiries.
    Status {
        /// Only this federation.
        name: Option<String>,
        /// The federations' namespace (default: the kubeconfig's).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
    },
    /// Join a member cluster to a federation with least privilege: create in the member a ServiceAccount for the
    /// hub (namespace `meshfed-system`) with exactly the permissions meshfed needs there, write the kubeconfig
    /// Secret `<NAME>-kubeconfig` in the hub (the member's API server and CA, a token from the TokenRequest API),
    /// and print the `clusters[]` entry to add. Running it again changes nothing.
    Join {
        #[command(flatten)]
        args: JoinArgs,
        /// The member's network (`topology.istio.io/network`) in the printed entry (default: NAME).
        #[arg(long)]
        network: Option<String>,
        /// `Remote` for a member served by the istiod of `--control-plane`.
        #[arg(long)]
        role: Option<String>,
        /// The Primary that serves a Remote.
        #[arg(long)]
        control_plane: Option<String>,
        /// The address the hub reaches the member's API server at (default: the member context's server).
        #[arg(long)]
        server: Option<String>,
        /// The lifetime asked for the hub's token; a new one is written when less than a third of it remains.
        #[arg(long, default_value = "720h", value_parser = humantime::parse_duration)]
        token_ttl: Duration,
        /// Print both sides as YAML for GitOps (with `-o yaml`) instead of writing them.
        #[arg(long)]
        dry_run: bool,
        /// Output of a dry run: `yaml`.
        #[arg(short = 'o', long)]
        output: Option<String>,
    },
    /// Remove what `meshfed join` wrote for a member: its RBAC and ServiceAccount for the hub, and the hub's Secret.
    Leave {
        #[command(flatten)]
        args: JoinArgs,
    },
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
        /// Run the controller only while holding the Lease `meshfed-leader` (for several replicas).
        #[arg(long)]
        leader_elect: bool,
        /// The hub namespace of the Lease.
        #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
        lease_namespace: String,
        /// This replica's identity in the Lease.
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
        /// Seconds a Lease lasts without renewal: how soon another replica takes over from a dead leader.
        #[arg(long, default_value_t = 15)]
        lease_seconds: u64,
    },
}

/// Which member, federation and hub `join` and `leave` are about.
#[derive(clap::Args)]
struct JoinArgs {
    /// The member's name in the federation (its Istio cluster ID).
    name: String,
    /// The member's context in the kubeconfig.
    #[arg(long)]
    context: String,
    /// The hub's context (default: the current one).
    #[arg(long)]
    hub_context: Option<String>,
    /// The kubeconfig (default: `$KUBECONFIG` or `~/.kube/config`).
    #[arg(long)]
    kubeconfig: Option<std::path::PathBuf>,
    /// The federation's namespace in the hub (default: the hub context's).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// The federation (default: the only one in the namespace).
    #[arg(long)]
    federation: Option<String>,
    /// The Istio namespace, for a federation not created yet (default: the federation's, else `istio-system`).
    #[arg(long)]
    istio_namespace: Option<String>,
}

impl JoinArgs {
    fn request(self) -> join::Request {
        join::Request {
            cluster: self.name,
            kubeconfig: self.kubeconfig,
            context: self.context,
            hub_context: self.hub_context,
            namespace: self.namespace,
            federation: self.federation,
            istio_namespace: self.istio_namespace,
            ..Default::default()
        }
    }
}

fn main() -> anyhow::Result<()> {
    // glibc gives each thread that allocates an arena of its own (up to 8 per core) and keeps what was freed in each:
    // most of the operator's resident memory, growing with the members, was freed memory held in those arenas. One
    // arena, set before the runtime starts its threads, holds it in one place (10 members: 34 -> 28 MiB).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: sets a parameter of glibc's allocator, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    tokio::runtime::Runtime::new()?.block_on(command(Cli::parse().command))
}

async fn command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Crd => print!("{}", meshfed_api::crd_yaml()),
        Command::Render { file, cluster } => render(&file, cluster.as_deref())?,
        Command::Check { name, namespace, wait, lease_namespace, output } => {
            let hub = kube::Client::try_default().await?;
            let ns = namespace.unwrap_or_else(|| hub.default_namespace().to_string());
            let names = match name {
                Some(n) => vec![n],
                None => {
                    let api: kube::Api<meshfed_api::MeshFederation> = kube::Api::namespaced(hub.clone(), &ns);
                    api.list(&Default::default()).await?.items.into_iter().filter_map(|f| f.metadata.name).collect()
                }
            };
            let deadline = std::time::Instant::now() + wait.unwrap_or_default();
            let findings = loop {
                let mut findings = Vec::new();
                if let Some(ns) = &lease_namespace {
                    findings.push(check::leader(&hub, ns, jiff::Timestamp::now()).await);
                }
                for name in &names {
                    findings.extend(check::check(&hub, &ns, name, jiff::Timestamp::now()).await?);
                }
                let failing = findings.iter().filter(|f| !f.ok).count();
                if failing == 0 || std::time::Instant::now() >= deadline {
                    break findings;
                }
                eprintln!("{failing} of {} checks fail; trying again", findings.len());
                tokio::time::sleep(Duration::from_secs(2)).await;
            };
            match output.as_str() {
                "json" => println!("{}", serde_json::to_string_pretty(&findings)?),
                _ => print!("{}", check::report(&findings)),
            }
            if !check::passed(&findings) {
                std::process::exit(1);
            }
        }
        Command::Join { args, network, role, control_plane, server, token_ttl, dry_run, output } => {
            if output.as_deref().is_some_and(|o| o != "yaml") {
                anyhow::bail!("-o: only `yaml` is supported");
            }
            let request = join::Request { network, role, control_plane, server, token_ttl, dry_run, ..args.request() };
            print!("{}", join::run_join(&request).await?);
        }
        Command::Leave { args } => print!("{}", join::run_leave(&args.request()).await?),
        Command::Status { name, namespace } => {
            let hub = kube::Client::try_default().await?;
            let ns = namespace.unwrap_or_else(|| hub.default_namespace().to_string());
            let api: kube::Api<meshfed_api::MeshFederation> = kube::Api::namespaced(hub, &ns);
            let feds = match name {
                Some(n) => vec![api.get(&n).await?],
                None => api.list(&Default::default()).await?.items,
            };
            for fed in feds {
                println!("{}", table::status_table(&fed));
            }
        }
        Command::Run {
            log_json,
            member_timeout,
            metrics_addr,
            leader_elect,
            lease_namespace,
            identity,
            lease_seconds,
        } => {
            let filter = EnvFilter::try_from_env("MESHFED_LOG").unwrap_or_else(|_| EnvFilter::new("info,kube=warn"));
            let logs = fmt().with_env_filter(filter);
            if log_json {
                logs.json().init()
            } else {
                logs.init()
            }
            let hub = meshfed_operator::member::client::multiplexed_client(kube::Config::infer().await?)?;
            let settings = Settings { member_timeout: Duration::from_secs(member_timeout), ..Settings::default() };
            let metrics = Metrics::default();
            let controller = reconcile::run(hub.clone(), settings, metrics.clone());
            let trim = release_freed_memory(metrics.clone());
            let controller = async {
                if !leader_elect {
                    return controller.await;
                }
                let identity = identity.unwrap_or_else(|| format!("meshfed-{}", std::process::id()));
                let lease = Duration::from_secs(lease_seconds);
                leader::run_as_leader(hub, &lease_namespace, &identity, lease, controller).await
            };
            tokio::select! {
                r = controller => r?,
                r = metrics.serve(metrics_addr) => r?,
                () = trim => {}
                _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; stopping"),
            }
        }
    }
    Ok(())
}

/// Gives the memory that reconciles freed back to the system, a few seconds after they ran: glibc returns only
/// the free top of its heap by itself, and keeps the freed pages below it (20 members: 43 -> 39 MiB once converged).
/// Idle, it only reads a counter.
async fn release_freed_memory(metrics: Metrics) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut trimmed_after = 0;
    loop {
        tick.tick().await;
        let finished = metrics.reconciles_finished.get();
        if finished != trimmed_after {
            trimmed_after = finished;
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            // SAFETY: malloc_trim only returns free pages of glibc's allocator to the system.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }
}

/// `meshfed render`: the federation in `file`, member by member, as YAML documents.
fn render(file: &std::path::Path, cluster: Option<&str>) -> anyhow::Result<()> {
    let fed: meshfed_api::MeshFederation = meshfed_core::yaml::from_slice(&std::fs::read(file)?)?;
    let fref = meshfed_core::federation::FederationRef {
        namespace: fed.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
        name: fed.metadata.name.clone().unwrap_or_default(),
    };
    match meshfed_core::render::render(&fref, &fed.spec, cluster) {
        Ok(members) => {
            for (cluster, objects) in members {
                for object in objects {
                    print!("---\n# member cluster: {cluster}\n{}", serde_saphyr::to_string(&object)?);
                }
            }
            Ok(())
        }
        Err(problems) => {
            let why: Vec<String> = problems.iter().map(|p| format!("{}: {}", p.reason, p.message)).collect();
            anyhow::bail!("the federation is invalid:\n{}", why.join("\n"))
        }
    }
}
