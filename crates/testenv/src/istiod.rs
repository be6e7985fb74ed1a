//! A real istiod (`pilot-discovery`) run as a plain process against one test cluster, as Istio's control plane in
//! that cluster would be, reading only what is in the cluster (ISTIO-FACTS.md section 12).

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Cluster, Process, free_port, tail};

/// The `istio.io/istio` module version istiod is built at (`hack/istio-binaries.sh` builds this one by default):
/// master just before Istio 1.31.
pub const ISTIO_VERSION: &str = "v0.0.0-20260827124520-eed52ebb66ad";

/// How long istiod may take to answer `/ready` (about 5 s on an idle machine).
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// The directory holding `pilot-discovery`, `adsc-probe` and `istioctl`, building them on first use
/// (`hack/istio-binaries.sh`, under a lock).
pub fn istio_binaries() -> Result<PathBuf> {
    crate::build_with("istio-binaries.sh", "MESHFED_ISTIO_VERSION", ISTIO_VERSION)
}

/// The path of `istioctl`, built from the same `istio.io/istio` module as istiod (see [`istio_binaries`]); it blocks
/// for minutes on first use.
pub fn istioctl() -> Result<PathBuf> {
    Ok(istio_binaries()?.join("istioctl"))
}

/// A running istiod for one cluster, on free loopback ports, in a working directory of its own. It is killed when
/// dropped (and dies with the test process).
pub struct Istiod {
    cluster_id: String,
    http_port: u16,
    grpc_port: u16,
    secure_grpc_port: u16,
    ready_after: Duration,
    cacerts: SecretVolume,
    // Dropped before `dir`: the process dies before its directory goes.
    _process: Process,
    dir: tempfile::TempDir,
}

impl Istiod {
    /// Starts istiod for `cluster` as cluster `cluster_id`, with its control plane in `istio_namespace` (which must
    /// exist), and waits until it is ready.
    ///
    /// istiod gets the cluster's admin kubeconfig, as its own ServiceAccount would have its rights. Its CA is the
    /// plugged-in one, as Istio's charts mount it: Secret `cacerts` of `istio_namespace` projected into
    /// `ROOT_CA_DIR` the way a kubelet projects a Secret volume (its atomic writer), before istiod starts and
    /// again whenever the Secret changes, so renewals reach istiod through the files it watches. With no `cacerts`
    /// the directory stays empty and istiod falls back silently to a self-signed CA. Its network is the
    /// `topology.istio.io/network` label of `istio_namespace`; other clusters come from the remote secrets there.
    /// Injection and analysis are off; no mesh config file is given, so it reads the `istio` ConfigMap if any. Like
    /// the Sail operator, it adds the environment that `spec.values.pilot.env` of the cluster's Sail `Istio` asks for.
    pub async fn start(cluster: &Cluster, cluster_id: &str, istio_namespace: &str) -> Result<Self> {
        Self::start_with_env(cluster, cluster_id, istio_namespace, &[]).await
    }

    /// Like [`Istiod::start`], with `env` added to istiod's environment last (it wins over the Sail `Istio`'s), e.g.
    /// [`crate::ISTIOD_ENV_FOR_UPSTREAM_ENVOY`] for the data plane suite's proxies.
    pub async fn start_with_env(
        cluster: &Cluster,
        cluster_id: &str,
        istio_namespace: &str,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let client = cluster.client().await?;
        let mut all = vec![("INJECT_ENABLED".to_string(), "false".to_string())];
        all.extend(sail_pilot_env(sail_istio_specs(client, istio_namespace).await));
        all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Self::launch(cluster, cluster_id, istio_namespace, all).await
    }

    /// Starts istiod as the Sail operator deploys it for the cluster's Sail `Istio` of `istio_namespace`: Istio's
    /// istiod chart (of the `istio.io/istio` module istiod is built from) rendered with the pinned helm for the
    /// `Istio`'s `spec.profile` and `spec.values`; the chart's mesh config (ConfigMap `istio`, key `mesh`) and
    /// injection templates (ConfigMap `istio-sidecar-injector`, which istiod's gateway controller deploys
    /// `istio-east-west` Gateways with) applied to the cluster before istiod starts, as the operator does; istiod
    /// given the literal environment of the chart's Deployment (e.g. the ambient profile's `PILOT_ENABLE_AMBIENT`),
    /// injection on. The mesh networks stay the stage's play of the chart (see `play_cloud_and_sail`). Otherwise as
    /// [`Istiod::start`].
    pub async fn start_as_sail(cluster: &Cluster, cluster_id: &str, istio_namespace: &str) -> Result<Self> {
        let client = cluster.client().await?;
        let specs = sail_istio_specs(client.clone(), istio_namespace).await;
        let [spec] = specs.as_slice() else {
            bail!("{} Sail Istio resources for namespace {istio_namespace} in {cluster_id}: one expected", specs.len())
        };
        let chart = render_istiod_chart(cluster, spec, istio_namespace).await?;
        for mut cm in chart.config_maps {
            let name = cm["metadata"]["name"].as_str().unwrap_or_default().to_string();
            if name == "istio" {
                cm["data"].as_object_mut().map(|d| d.remove("meshNetworks"));
            }
            Api::<ConfigMap>::namespaced(client.clone(), istio_namespace)
                .patch(&name, &PatchParams::apply("sail-operator-chart").force(), &Patch::Apply(&cm))
                .await
                .with_context(|| format!("applying the chart's ConfigMap {name}"))?;
        }
        Self::launch(cluster, cluster_id, istio_namespace, chart.env).await
    }

    /// Starts istiod with `env` after the environment every istiod here gets, and waits until it is ready.
    async fn launch(
        cluster: &Cluster,
        cluster_id: &str,
        istio_namespace: &str,
        env: Vec<(String, String)>,
    ) -> Result<Self> {
        // The first use builds istiod for minutes: off the runtime's threads, which the tests' controller shares.
        let bin = tokio::task::spawn_blocking(istio_binaries).await??;
        let dir = tempfile::Builder::new().prefix("istiod-").tempdir_in(&cluster.dir)?;
        let kubeconfig = dir.path().join("kubeconfig");
        fs::write(&kubeconfig, cluster.kubeconfig())?;
        let root_ca_dir = dir.path().join("cacerts");
        fs::create_dir(&root_ca_dir)?;
        let client = cluster.client().await?;
        let cacerts = SecretVolume::start(client.clone(), istio_namespace, "cacerts", &root_ca_dir).await?;
        let http_port = free_port()?;
        let grpc_port = free_port()?;
        let secure_grpc_port = free_port()?;
        let addr = |flag: &str| -> Result<String> { Ok(format!("--{flag}=127.0.0.1:{}", free_port()?)) };
        let mut cmd = Command::new(bin.join("pilot-discovery"));
        cmd.current_dir(dir.path())
            .env_remove("KUBECONFIG")
            .envs([("REVISION", "default"), ("PILOT_ENABLE_ANALYSIS", "false")])
            .envs(env)
            // What a pod's downward API and its cacerts volume give istiod.
            .envs([
                ("POD_NAMESPACE", istio_namespace),
                ("POD_NAME", &format!("istiod-{cluster_id}")),
                ("ROOT_CA_DIR", &root_ca_dir.display().to_string()),
            ])
            .args([
                "discovery".to_string(),
                format!("--kubeconfig={}", kubeconfig.display()),
                format!("--clusterID={cluster_id}"),
                format!("--httpAddr=127.0.0.1:{http_port}"),
                format!("--grpcAddr=127.0.0.1:{grpc_port}"),
                format!("--secureGRPCAddr=127.0.0.1:{secure_grpc_port}"),
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
        Ok(Self {
            cluster_id: cluster_id.into(),
            http_port,
            grpc_port,
            secure_grpc_port,
            ready_after,
            cacerts,
            _process: process,
            dir,
        })
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
        self.probe(&[
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
        .await
    }

    /// What istiod tells a ztunnel of cluster `cluster_id` on `network` at `ip` over delta xDS: every
    /// `istio.workload.Address` (WDS), as `hack/istio-binaries.sh`'s `adsc-probe --wds` prints them (Istio's own delta
    /// client, node type ztunnel): `{"workloads": [{"uid", "name", "namespace", "clusterId", "network", "addresses",
    /// "tunnelProtocol", "gateway" ("<network>/<address>"), "gatewayPort", "capacity", "services"}], "services":
    /// [{"name", "namespace", "hostname", "addresses" ("<network>/<address>")}]}`.
    pub async fn ztunnel_view(&self, cluster_id: &str, network: &str, ip: &str) -> Result<serde_json::Value> {
        self.probe(&["--wds", "--cluster-id", cluster_id, "--network", network, "--ip", ip, "--timeout", "10s"]).await
    }

    /// Runs `adsc-probe` against istiod's plaintext xDS port with `args`: its JSON answer.
    async fn probe(&self, args: &[&str]) -> Result<serde_json::Value> {
        let bin = tokio::task::spawn_blocking(istio_binaries).await??;
        let out = tokio::process::Command::new(bin.join("adsc-probe"))
            .args(["--addr", &self.xds_address()])
            .args(args)
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

    /// istiod's TLS xDS address (`--secureGRPCAddr`, 15012 in a cluster), served with the certificate istiod signs for
    /// itself with its CA: what a sidecar or a Remote verifies against the mesh's root.
    pub fn secure_xds_address(&self) -> String {
        format!("127.0.0.1:{}", self.secure_grpc_port)
    }

    /// When `cacerts` was projected into istiod's `ROOT_CA_DIR`, the first time (before istiod started) and at every
    /// change since.
    pub fn cacerts_projected_at(&self) -> Vec<Instant> {
        self.cacerts.projected_at.lock().unwrap().clone()
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

/// The `spec` of every Sail `Istio` (`sailoperator.io/v1`) whose `spec.namespace` is `istio_namespace`; none when
/// Sail's CRD is not served.
async fn sail_istio_specs(client: Client, istio_namespace: &str) -> Vec<serde_json::Value> {
    let resource = ApiResource {
        group: "sailoperator.io".into(),
        version: "v1".into(),
        api_version: "sailoperator.io/v1".into(),
        kind: "Istio".into(),
        plural: "istios".into(),
    };
    let Ok(istios) = Api::<DynamicObject>::all_with(client, &resource).list(&Default::default()).await else {
        return Vec::new();
    };
    istios
        .into_iter()
        .map(|i| i.data["spec"].clone())
        .filter(|spec| spec["namespace"].as_str().unwrap_or("istio-system") == istio_namespace)
        .collect()
}

/// The environment the Sail operator gives istiod for the `Istio` `specs`: `spec.values.pilot.env` (Istio's istiod
/// chart puts it in the Deployment's env), and `EXTERNAL_ISTIOD` for `spec.values.global.externalIstiod`.
fn sail_pilot_env(specs: Vec<serde_json::Value>) -> Vec<(String, String)> {
    let mut env = Vec::new();
    for spec in specs {
        // The istiod chart's Deployment: `global.externalIstiod` sets EXTERNAL_ISTIOD (a Primary serving Remotes,
        // which then publishes the root into their namespaces too), unless `pilot.env` does.
        if spec["values"]["global"]["externalIstiod"] == true {
            env.push(("EXTERNAL_ISTIOD".into(), "true".into()));
        }
        for (k, v) in spec["values"]["pilot"]["env"].as_object().into_iter().flatten() {
            env.push((k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_string)));
        }
    }
    env
}

/// The pinned helm (`hack/helm.sh`, built on first use), the one the chart tests use.
const HELM_VERSION: &str = "v3.22.0";

/// What Istio's istiod chart makes for one Sail `Istio`: istiod's ConfigMaps and the literal environment of its
/// Deployment's container (what the downward API, a volume or the chart's own defaults give is left out).
struct IstiodChart {
    config_maps: Vec<serde_json::Value>,
    env: Vec<(String, String)>,
}

/// Renders Istio's istiod chart (`manifests/charts/istio-control/istio-discovery` of the `istio.io/istio` module
/// istiod is built from) with `helm template` for the Sail `Istio` `spec`: its `values`, its `profile` (the chart
/// merges `files/profile-<profile>.yaml`, as the Sail operator merges its copy of the profile) and the namespace.
async fn render_istiod_chart(cluster: &Cluster, spec: &serde_json::Value, namespace: &str) -> Result<IstiodChart> {
    let (helm, module) = tokio::task::spawn_blocking(|| {
        let helm = crate::build_with("helm.sh", "MESHFED_HELM_VERSION", HELM_VERSION)?;
        anyhow::Ok((helm, crate::go_module_dir(&format!("istio.io/istio@{ISTIO_VERSION}"))?))
    })
    .await??;
    let values = tempfile::Builder::new().prefix("values-").suffix(".json").tempfile_in(&cluster.dir)?;
    fs::write(values.path(), serde_json::to_vec(&spec["values"])?)?;
    let mut cmd = tokio::process::Command::new(&helm);
    cmd.args(["template", "istiod"])
        .arg(module.join("manifests/charts/istio-control/istio-discovery"))
        .args(["--namespace", namespace, "--set", &format!("global.istioNamespace={namespace}"), "--values"])
        .arg(values.path());
    if let Some(profile) = spec["profile"].as_str() {
        cmd.args(["--set", &format!("profile={profile}")]);
    }
    let out = cmd.output().await.context("running helm template")?;
    if !out.status.success() {
        bail!("helm template of the istiod chart failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut chart = IstiodChart { config_maps: Vec::new(), env: Vec::new() };
    for doc in serde_saphyr::from_multiple::<serde_json::Value>(&String::from_utf8(out.stdout)?)? {
        match doc["kind"].as_str() {
            Some("ConfigMap") => chart.config_maps.push(doc),
            Some("Deployment") if doc["metadata"]["name"] == "istiod" => {
                let env = &doc["spec"]["template"]["spec"]["containers"][0]["env"];
                for var in env.as_array().into_iter().flatten() {
                    // KUBECONFIG names the chart's remote-kubeconfig mount; istiod here gets --kubeconfig.
                    if let (Some(name), Some(value)) = (var["name"].as_str(), var["value"].as_str())
                        && name != "KUBECONFIG"
                    {
                        chart.env.push((name.into(), value.into()));
                    }
                }
            }
            _ => {}
        }
    }
    if chart.env.is_empty() {
        bail!("the istiod chart rendered no istiod Deployment with an environment");
    }
    Ok(chart)
}

/// GETs `path` from istiod's loopback HTTP port: the status code and the body.
pub(crate) async fn get(port: u16, path: &str) -> Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut response)).await??;
    let (head, body) = response.split_once("\r\n\r\n").context("an HTTP response")?;
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).context("an HTTP status code")?;
    Ok((code, body.to_string()))
}

/// A Secret projected into a directory the way a kubelet projects a Secret volume (its `AtomicWriter`): the keys'
/// files live in a hidden directory `..<timestamp>`, the link `..data` points at it and each key is a link
/// `<key> -> ..data/<key>`. A change writes a new hidden directory and swaps `..data` with one rename, so a reader
/// never sees old and new files mixed, then removes the old directory. A kubelet notices a change within its sync
/// period (up to about a minute); this one follows a watch of the Secret, so at once. A deleted Secret leaves the
/// last files, as a running pod keeps them. The watch ends when this is dropped.
struct SecretVolume {
    projected_at: Arc<Mutex<Vec<Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl SecretVolume {
    /// Projects Secret `name` of `namespace` into `dir` (empty while there is no such Secret), returning once the
    /// first projection is done, as a kubelet mounts a volume before the container starts.
    async fn start(client: Client, namespace: &str, name: &str, dir: &Path) -> Result<Self> {
        let api: Api<Secret> = Api::namespaced(client, namespace);
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let mut events = watcher(api, config).default_backoff().boxed();
        let projected_at = Arc::new(Mutex::new(Vec::new()));
        let (dir, at, secret_name) = (dir.to_path_buf(), projected_at.clone(), name.to_string());
        let (synced, first) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut synced = Some(synced);
            let mut current: Option<BTreeMap<String, Vec<u8>>> = None;
            while let Some(event) = events.next().await {
                let secret = match event {
                    Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => s,
                    Ok(watcher::Event::InitDone) => {
                        if let Some(tx) = synced.take() {
                            let _ = tx.send(());
                        }
                        continue;
                    }
                    // A deleted Secret leaves the files; a failed watch is retried with backoff.
                    Ok(watcher::Event::Init | watcher::Event::Delete(_)) | Err(_) => continue,
                };
                let data: BTreeMap<String, Vec<u8>> =
                    secret.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
                if current.as_ref() == Some(&data) {
                    continue;
                }
                match project(&dir, &data) {
                    Ok(()) => {
                        at.lock().unwrap().push(Instant::now());
                        current = Some(data);
                    }
                    Err(e) => tracing::warn!("projecting Secret {secret_name} into {}: {e}", dir.display()),
                }
            }
        });
        tokio::time::timeout(READY_TIMEOUT, first)
            .await
            .with_context(|| format!("no first sync of Secret {name}"))?
            .context("the Secret volume's watch ended")?;
        Ok(Self { projected_at, task })
    }
}

impl Drop for SecretVolume {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Writes `data` into `dir` as a kubelet's `AtomicWriter` does (see [`SecretVolume`]).
fn project(dir: &Path, data: &BTreeMap<String, Vec<u8>>) -> io::Result<()> {
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let hidden = format!("..{}.{:09}", stamp.as_secs(), stamp.subsec_nanos());
    fs::create_dir(dir.join(&hidden))?;
    for (key, value) in data {
        fs::write(dir.join(&hidden).join(key), value)?;
    }
    let old = fs::read_link(dir.join("..data")).ok();
    let tmp = dir.join("..data_tmp");
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&hidden, &tmp)?;
    fs::rename(&tmp, dir.join("..data"))?;
    for key in data.keys() {
        let link = dir.join(key);
        if !fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink()) {
            let tmp = dir.join(format!("..{key}_tmp"));
            let _ = fs::remove_file(&tmp);
            std::os::unix::fs::symlink(Path::new("..data").join(key), &tmp)?;
            fs::rename(&tmp, &link)?;
        }
    }
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if !name.starts_with("..") && !data.contains_key(&name) {
            fs::remove_file(dir.join(&name))?;
        }
    }
    if let Some(old) = old.filter(|o| o != Path::new(&hidden)) {
        fs::remove_dir_all(dir.join(old))?;
    }
    Ok(())
}
