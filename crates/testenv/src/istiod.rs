//! A real istiod (`pilot-discovery`) run as a plain process against one test cluster, as Istio's control plane in
//! that cluster would be, reading only what is in the cluster (ISTIO-FACTS.md section 12).

use std::{
    fs,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Cluster, Process, free_port, tail};

/// The `istio.io/istio` module version istiod is built at (`hack/istio-binaries.sh` builds this one by default):
/// master just before Istio 1.31.
pub const ISTIO_VERSION: &str = "v0.0.0-20260827124520-eed52ebb66ad";

/// How long istiod may take to answer `/ready` (about 5 s on an idle machine).
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// The directory holding `pilot-discovery`, building it on first use (`hack/istio-binaries.sh`, under a lock).
pub fn istio_binaries() -> Result<PathBuf> {
    crate::build_with("istio-binaries.sh", "MESHFED_ISTIO_VERSION", ISTIO_VERSION)
}

/// A running istiod for one cluster, on free loopback ports, in a working directory of its own. It is killed when
/// dropped (and dies with the test process).
pub struct Istiod {
    cluster_id: String,
    http_port: u16,
    grpc_port: u16,
    ready_after: Duration,
    dir: tempfile::TempDir,
    _process: Process,
}

impl Istiod {
    /// Starts istiod for `cluster` as cluster `cluster_id`, with its control plane in `istio_namespace` (which must
    /// exist), and waits until it is ready.
    ///
    /// istiod gets the cluster's admin kubeconfig, as its own ServiceAccount would have its rights. Its CA is the
    /// plugged-in one: `USE_REMOTE_CERTS=true` with an empty `ROOT_CA_DIR` makes it copy Secret `cacerts` from
    /// `istio_namespace` at start, and fall back silently to a self-signed CA when there is none. Its network is the
    /// `topology.istio.io/network` label of `istio_namespace`; other clusters come from the remote secrets there.
    /// Injection and analysis are off; no mesh config file is given, so it reads the `istio` ConfigMap if any.
    pub async fn start(cluster: &Cluster, cluster_id: &str, istio_namespace: &str) -> Result<Self> {
        // The first use builds istiod for minutes: off the runtime's threads, which the tests' controller shares.
        let bin = tokio::task::spawn_blocking(istio_binaries).await??;
        let dir = tempfile::Builder::new().prefix("istiod-").tempdir_in(&cluster.dir)?;
        let kubeconfig = dir.path().join("kubeconfig");
        fs::write(&kubeconfig, cluster.kubeconfig())?;
        let root_ca_dir = dir.path().join("cacerts");
        fs::create_dir(&root_ca_dir)?;
        let http_port = free_port()?;
        let grpc_port = free_port()?;
        let addr = |flag: &str| -> Result<String> { Ok(format!("--{flag}=127.0.0.1:{}", free_port()?)) };
        let mut cmd = Command::new(bin.join("pilot-discovery"));
        cmd.current_dir(dir.path())
            .env_remove("KUBECONFIG")
            .envs([
                ("POD_NAMESPACE", istio_namespace),
                ("POD_NAME", &format!("istiod-{cluster_id}")),
                ("REVISION", "default"),
                ("ROOT_CA_DIR", &root_ca_dir.display().to_string()),
                ("USE_REMOTE_CERTS", "true"),
                ("PILOT_ENABLE_ANALYSIS", "false"),
                ("INJECT_ENABLED", "false"),
            ])
            .args([
                "discovery".to_string(),
                format!("--kubeconfig={}", kubeconfig.display()),
                format!("--clusterID={cluster_id}"),
                format!("--httpAddr=127.0.0.1:{http_port}"),
                format!("--grpcAddr=127.0.0.1:{grpc_port}"),
                addr("secureGRPCAddr")?,
                addr("monitoringAddr")?,
                addr("httpsAddr")?,
                format!("--ctrlz_port={}", free_port()?),
                "--ctrlz_address=127.0.0.1".into(),
                format!("--meshConfig={}", dir.path().join("mesh.yaml").display()),
                format!("--networksConfig={}", dir.path().join("meshNetworks.yaml").display()),
                "--domain=cluster.local".into(),
            ]);
        let spawned = Instant::now();
        let mut process = Process::spawn(&mut cmd, &dir.path().join("istiod.log"))?;
        let log = dir.path().join("istiod.log");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if matches!(get(http_port, "/ready").await, Ok((200, _))) {
                break;
            }
            if let Some(status) = process.0.try_wait()? {
                bail!("istiod of {cluster_id} exited with {status}; log tail:\n{}", tail(&log));
            }
            if Instant::now() > deadline {
                bail!("istiod of {cluster_id} not ready after {READY_TIMEOUT:?}; log tail:\n{}", tail(&log));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let ready_after = spawned.elapsed();
        Ok(Self { cluster_id: cluster_id.into(), http_port, grpc_port, ready_after, dir, _process: process })
    }

    /// The cluster ID istiod runs as.
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// One of istiod's JSON debug endpoints, e.g. `/debug/clusterz`, `/debug/registryz`, `/debug/endpointShardz`.
    pub async fn debug(&self, path: &str) -> Result<serde_json::Value> {
        match get(self.http_port, path).await? {
            (200, body) => serde_json::from_str(&body).with_context(|| format!("istiod's {path} is not JSON")),
            (code, body) => bail!("istiod's {path} answered {code}: {body}"),
        }
    }

    /// How long istiod took from its start to answering `/ready` (which waits for the remote clusters it found at
    /// start to sync).
    pub fn ready_after(&self) -> Duration {
        self.ready_after
    }

    /// istiod's plaintext xDS address (`--grpcAddr`), which takes any ADS client without authentication.
    pub fn xds_address(&self) -> String {
        format!("127.0.0.1:{}", self.grpc_port)
    }

    /// What istiod tells a sidecar about the endpoints of Envoy cluster `envoy_cluster` (e.g.
    /// `outbound|5000||hello.sample.svc.cluster.local`): `hack/istio-binaries.sh`'s `adsc-probe` connects to the xDS
    /// port with Istio's own ADS client as a sidecar (node `sidecar~<ip>~probe.sample~sample.svc.cluster.local`,
    /// metadata `CLUSTER_ID`, `NETWORK`, `NAMESPACE`, `ISTIO_VERSION`, `INSTANCE_IPS`), fetches CDS then EDS, and
    /// answers `{"cluster", "known" (in CDS), "endpoints": [{"address", "port", "weight", "tlsMode", "workload"}]}`.
    pub async fn sidecar_endpoints(
        &self,
        cluster_id: &str,
        network: &str,
        ip: &str,
        envoy_cluster: &str,
    ) -> Result<serde_json::Value> {
        let bin = tokio::task::spawn_blocking(istio_binaries).await??;
        let out = tokio::process::Command::new(bin.join("adsc-probe"))
            .args([
                "--addr",
                &self.xds_address(),
                "--cluster-id",
                cluster_id,
                "--network",
                network,
                "--ip",
                ip,
                "--cluster",
                envoy_cluster,
                "--timeout",
                "10s",
            ])
            .kill_on_drop(true)
            .output()
            .await
            .context("running adsc-probe")?;
        if !out.status.success() {
            bail!(
                "adsc-probe against {}'s istiod failed ({}): {}",
                self.cluster_id,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout).context("adsc-probe's answer is not JSON")
    }

    /// istiod's log file (removed with it).
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("istiod.log")
    }

    /// The last lines of istiod's log, for failure messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log())
    }
}

/// GETs `path` from istiod's loopback HTTP port: the status code and the body.
async fn get(port: u16, path: &str) -> Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut response)).await??;
    let (head, body) = response.split_once("\r\n\r\n").context("an HTTP response")?;
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).context("an HTTP status code")?;
    Ok((code, body.to_string()))
}
