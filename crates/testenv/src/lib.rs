//! Real local Kubernetes clusters for tests and the demo.
//!
//! Each simulated cluster is a real kube-apiserver on a loopback port with RBAC on, its own serving CA, client CA,
//! admin client certificate and service-account keys (so TokenRequest works), storing its data under its own prefix
//! of one shared etcd. A kube-controller-manager (garbage collector, namespace, service-account and token
//! controllers) runs beside it on request. The binaries come from `hack/k8s-binaries.sh`, which builds them through
//! the Go module proxy once per version into a cache outside the work tree, under a lock.
//!
//! Every process is killed when the [`Env`] is dropped, including on panic, and is also told by the kernel to die
//! with the process that started it, so no test leaves a stray API server behind.
//!
//! [`Istiod`] runs a real istiod (`pilot-discovery`, built by `hack/istio-binaries.sh` the same way) against a
//! cluster, for the conformance suite that checks what meshfed writes against Istio's own reading of it; [`istioctl`]
//! is built beside it. [`Pod`] runs a member's pod as real processes (Istio's `pilot-agent` and upstream Envoy) in
//! the private network namespace of [`in_network_namespace`], for the data plane suite.

use std::{
    fs,
    net::TcpListener,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use base64::{Engine, engine::general_purpose::STANDARD as B64};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, Client, Config, ResourceExt,
    api::{Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};

mod dataplane;
mod istiod;
mod stage;
pub use dataplane::{
    Answer, ENVOY_VERSION, ISTIOD_ENV_FOR_UPSTREAM_ENVOY, OwnNetwork, Pod, PodSpec, call, envoy, forward,
    in_network_namespace, may_make_network_namespace, serve_hello,
};
pub use istiod::{ISTIO_VERSION, Istiod, istio_binaries, istioctl};
pub use stage::{SAIL_COMMIT, SAIL_VERSION, Stage, add_node, sail_crds};

/// The Kubernetes version the binaries are built at (`hack/k8s-binaries.sh` builds this one by default).
pub const K8S_VERSION: &str = "v1.34.2";
/// The `istio.io/api` module version whose CRDs are installed into members.
pub const ISTIO_API_VERSION: &str = "v1.31.1";

/// The `sigs.k8s.io/gateway-api` module version whose standard CRDs are installed into members (the one Istio's
/// pinned istiod requires).
pub const GATEWAY_API_VERSION: &str = "v1.6.0";

/// Options for [`Env::start`].
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Also run kube-controller-manager in every cluster (namespace deletion, garbage collection, token Secrets).
    pub controller_manager: bool,
    /// A real istiod will run in the members: the stage does not play its publishing of `istio-ca-root-cert`.
    pub real_istiod: bool,
}

/// A set of running local clusters sharing one etcd.
pub struct Env {
    clusters: Vec<Cluster>,
    _etcd: Process,
    dir: tempfile::TempDir,
}

impl Env {
    /// Starts one cluster per name, concurrently, and waits until every API server is ready.
    pub async fn start(names: &[&str], options: Options) -> Result<Self> {
        let bin = binaries()?;
        let dir = tempfile::Builder::new().prefix("meshfed-testenv-").tempdir()?;
        let etcd_port = free_port()?;
        let peer_port = free_port()?;
        let etcd_dir = dir.path().join("etcd");
        let etcd = Process::spawn(
            Command::new(bin.join("etcd")).args([
                "--name=default".to_string(),
                format!("--data-dir={}", etcd_dir.display()),
                format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"),
                format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-cluster=default=http://127.0.0.1:{peer_port}"),
                "--unsafe-no-fsync".into(),
                "--log-level=warn".into(),
            ]),
            &dir.path().join("etcd.log"),
        )?;
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let mut clusters = Vec::new();
        for (i, name) in names.iter().enumerate() {
            clusters.push(Cluster::create(name, i, dir.path(), &bin, &etcd_url, options.controller_manager)?);
        }
        let mut env = Self { clusters, _etcd: etcd, dir };
        futures_join(env.clusters.iter_mut().map(|c| c.start())).await?;
        Ok(env)
    }

    /// The cluster with this name.
    pub fn cluster(&self, name: &str) -> &Cluster {
        self.clusters.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no cluster {name:?} in this env"))
    }

    /// The cluster with this name, to stop or start it.
    pub fn cluster_mut(&mut self, name: &str) -> &mut Cluster {
        self.clusters.iter_mut().find(|c| c.name == name).unwrap_or_else(|| panic!("no cluster {name:?} in this env"))
    }

    /// Every cluster, in the order they were named.
    pub fn clusters(&self) -> &[Cluster] {
        &self.clusters
    }

    /// The directory holding the clusters' data, certificates and logs (removed when the env is dropped).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// One simulated cluster.
pub struct Cluster {
    name: String,
    dir: PathBuf,
    port: u16,
    kubeconfig: String,
    apiserver_args: Vec<String>,
    controller_manager_args: Option<Vec<String>>,
    bin: PathBuf,
    apiserver: Option<Process>,
    controller_manager: Option<Process>,
}

impl Cluster {
    fn create(
        name: &str,
        index: usize,
        root: &Path,
        bin: &Path,
        etcd_url: &str,
        controller_manager: bool,
    ) -> Result<Self> {
        let dir = root.join(name);
        fs::create_dir_all(&dir)?;
        let port = free_port()?;
        let pki = Pki::generate(name)?;
        let file = |n: &str, content: &str| -> Result<String> {
            let p = dir.join(n);
            fs::write(&p, content)?;
            Ok(p.display().to_string())
        };
        let serving_cert = file("serving.crt", &pki.serving_cert)?;
        let serving_key = file("serving.key", &pki.serving_key)?;
        let ca = file("ca.crt", &pki.ca_cert)?;
        let sa_key = file("sa.key", &pki.sa_key)?;
        let sa_pub = file("sa.pub", &pki.sa_pub)?;
        let server = format!("https://127.0.0.1:{port}");
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: {name}\nclusters:\n- name: {name}\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\ncontexts:\n- name: {name}\n  context:\n    cluster: {name}\n    user: {name}-admin\nusers:\n- name: {name}-admin\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\n",
            B64.encode(&pki.ca_cert),
            B64.encode(&pki.admin_cert),
            B64.encode(&pki.admin_key),
        );
        let kubeconfig_file = file("kubeconfig", &kubeconfig)?;
        let apiserver_args = vec![
            format!("--etcd-servers={etcd_url}"),
            format!("--etcd-prefix=/clusters/{name}"),
            format!("--secure-port={port}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--cert-dir={}", dir.join("certs").display()),
            format!("--tls-cert-file={serving_cert}"),
            format!("--tls-private-key-file={serving_key}"),
            format!("--client-ca-file={ca}"),
            "--authorization-mode=RBAC".into(),
            format!("--service-account-issuer=https://{name}.meshfed.test"),
            format!("--service-account-key-file={sa_pub}"),
            format!("--service-account-signing-key-file={sa_key}"),
            // Distinct service ranges, as distinct real clusters would have.
            format!("--service-cluster-ip-range=10.{}.0.0/16", 96 + index),
            "--enable-priority-and-fairness=false".into(),
            "--profiling=false".into(),
            "--allow-privileged=true".into(),
        ];
        let controller_manager_args = controller_manager.then(|| {
            vec![
                format!("--kubeconfig={kubeconfig_file}"),
                "--controllers=garbagecollector,namespace,serviceaccount,serviceaccount-token".into(),
                format!("--service-account-private-key-file={sa_key}"),
                format!("--root-ca-file={ca}"),
                "--leader-elect=false".into(),
                "--secure-port=0".into(),
                "--concurrent-namespace-syncs=2".into(),
            ]
        });
        Ok(Self {
            name: name.into(),
            dir,
            port,
            kubeconfig,
            apiserver_args,
            controller_manager_args,
            bin: bin.into(),
            apiserver: None,
            controller_manager: None,
        })
    }

    /// The cluster's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A kubeconfig (YAML, credentials inline) with admin rights on this cluster, usable by other processes.
    pub fn kubeconfig(&self) -> &str {
        &self.kubeconfig
    }

    /// The API server's URL.
    pub fn server(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Whether the API server is running.
    pub fn is_running(&self) -> bool {
        self.apiserver.is_some()
    }

    /// An admin client for this cluster.
    pub async fn client(&self) -> Result<Client> {
        client_from_kubeconfig(&self.kubeconfig).await
    }

    /// Stops the API server (and controller manager). Its data stays in etcd; [`Cluster::start`] brings it back on
    /// the same address with the same certificates.
    pub fn stop(&mut self) {
        self.controller_manager.take();
        self.apiserver.take();
    }

    /// Starts (or restarts) the API server and waits until it is ready.
    pub async fn start(&mut self) -> Result<()> {
        if self.apiserver.is_none() {
            let log = self.dir.join("kube-apiserver.log");
            self.apiserver =
                Some(Process::spawn(Command::new(self.bin.join("kube-apiserver")).args(&self.apiserver_args), &log)?);
        }
        self.wait_ready().await?;
        if let (None, Some(args)) = (&self.controller_manager, &self.controller_manager_args) {
            let log = self.dir.join("kube-controller-manager.log");
            self.controller_manager =
                Some(Process::spawn(Command::new(self.bin.join("kube-controller-manager")).args(args), &log)?);
        }
        Ok(())
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let client = self.client().await?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let req = http_get("/readyz");
            if let Ok(Ok(body)) = tokio::time::timeout(Duration::from_secs(5), client.request_text(req)).await
                && body.trim() == "ok"
            {
                return Ok(());
            }
            if let Some(p) = &mut self.apiserver
                && let Some(status) = p.0.try_wait()?
            {
                bail!(
                    "kube-apiserver of {} exited with {status}; log: {}\n{}",
                    self.name,
                    self.dir.join("kube-apiserver.log").display(),
                    tail(&self.dir.join("kube-apiserver.log"))
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-apiserver of {} not ready after 120s; log tail:\n{}",
                    self.name,
                    tail(&self.dir.join("kube-apiserver.log"))
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Installs CRDs from a multi-document YAML and waits until each is established.
    pub async fn install_crds(&self, yaml: &str) -> Result<()> {
        let crds: Api<CustomResourceDefinition> = Api::all(self.client().await?);
        let mut names = Vec::new();
        for value in serde_saphyr::from_multiple::<serde_json::Value>(yaml)? {
            if value.is_null() {
                continue;
            }
            let crd: CustomResourceDefinition = serde_json::from_value(value)?;
            let name = crd.name_any();
            crds.patch(&name, &PatchParams::apply("meshfed-testenv").force(), &Patch::Apply(&crd))
                .await
                .with_context(|| format!("installing CRD {name}"))?;
            names.push(name);
        }
        for name in names {
            let cond = kube::runtime::conditions::is_crd_established();
            tokio::time::timeout(
                Duration::from_secs(60),
                kube::runtime::wait::await_condition(crds.clone(), &name, cond),
            )
            .await
            .with_context(|| format!("CRD {name} not established"))??;
        }
        Ok(())
    }

    /// Installs the real Istio CRDs (from the `istio.io/api` module, through the Go module proxy).
    pub async fn install_istio_crds(&self) -> Result<()> {
        self.install_crds(&istio_crds()?).await
    }
}

fn http_get(path: &str) -> http::Request<Vec<u8>> {
    http::Request::get(path).body(Vec::new()).expect("a valid request")
}

/// A client built from kubeconfig YAML, as meshfed builds its member clients.
pub async fn client_from_kubeconfig(yaml: &str) -> Result<Client> {
    let kc = Kubeconfig::from_yaml(yaml)?;
    let mut config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    config.connect_timeout = Some(Duration::from_secs(5));
    Ok(Client::try_from(config)?)
}

/// The real Istio CRDs, read from the `istio.io/api` module in the Go module cache (downloaded on first use).
pub fn istio_crds() -> Result<String> {
    let dir = go_module_dir(&format!("istio.io/api@{ISTIO_API_VERSION}"))?;
    Ok(fs::read_to_string(dir.join("kubernetes/customresourcedefinitions.gen.yaml"))?)
}

/// The directory of Go module `module` (`path@version`) in the Go module cache, downloaded through the Go module
/// proxy on first use.
pub(crate) fn go_module_dir(module: &str) -> Result<PathBuf> {
    let out = Command::new("go")
        .args(["mod", "download", "-json", module])
        .current_dir(std::env::temp_dir())
        .output()
        .context("running `go mod download` (is Go installed?)")?;
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).context("reading `go mod download -json`")?;
    let dir = info["Dir"].as_str().with_context(|| format!("{module} not downloadable: {}", info["Error"]))?;
    Ok(dir.into())
}

/// The Gateway API's standard CRDs (`config/crd/standard`, its CustomResourceDefinitions only) as one YAML stream,
/// read from the `sigs.k8s.io/gateway-api` module in the Go module cache (downloaded on first use).
pub fn gateway_api_crds() -> Result<String> {
    let dir = go_module_dir(&format!("sigs.k8s.io/gateway-api@{GATEWAY_API_VERSION}"))?;
    let mut out = String::new();
    for f in yaml_files(&dir.join("config/crd/standard"))? {
        let text = fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        // The directory also holds a ValidatingAdmissionPolicy (safe upgrades), which is not a CRD.
        if text.contains("\nkind: CustomResourceDefinition\n") {
            out.push_str("---\n");
            out.push_str(&text);
        }
    }
    Ok(out)
}

/// The directory of the Kubernetes binaries, building them on first use (`hack/k8s-binaries.sh`, under a lock).
pub fn binaries() -> Result<PathBuf> {
    build_with("k8s-binaries.sh", "MESHFED_K8S_VERSION", K8S_VERSION)
}

/// Runs `hack/<script>` with `version` in `env` (it builds once per version, under a lock, and prints the
/// directory of what it built); returns that directory.
pub(crate) fn build_with(script: &str, env: &str, version: &str) -> Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../hack").join(script);
    let out = Command::new("bash")
        .arg(&script)
        .env(env, version)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed ({}): see its output above", script.display(), out.status);
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

async fn futures_join<F: Future<Output = Result<()>>>(futs: impl Iterator<Item = F>) -> Result<()> {
    let handles: Vec<_> = futs.collect();
    for r in futures::future::join_all(handles).await {
        r?;
    }
    Ok(())
}

/// A loopback port that is free now and that this process has not handed out before. Ports come from below the
/// kernel's ephemeral range (32768 and up by default), where outgoing connections (many, while a test retries a
/// stopped cluster) never take them, and are never reused within a process, so a stopped cluster keeps its port for
/// its restart. Processes start at different points of the range.
pub fn free_port() -> Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let start = (u64::from(std::process::id()) * 7919 % u64::from(COUNT)) as u32;
    let _ = NEXT.compare_exchange(u32::MAX, start, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..COUNT {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::Relaxed) % COUNT) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback port in {FIRST}..{}", FIRST + COUNT)
}

fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<_> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// A child process that is killed when dropped, and dies with its parent.
struct Process(Child);

impl Process {
    fn spawn(cmd: &mut Command, log: &Path) -> Result<Self> {
        let out = fs::File::create(log)?;
        cmd.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
        // SAFETY: prctl is async-signal-safe; the closure touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        Ok(Self(cmd.spawn().with_context(|| format!("starting {:?}", cmd.get_program()))?))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The certificates and keys of one cluster.
struct Pki {
    ca_cert: String,
    serving_cert: String,
    serving_key: String,
    admin_cert: String,
    admin_key: String,
    sa_key: String,
    sa_pub: String,
}

impl Pki {
    fn generate(name: &str) -> Result<Self> {
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);

        let serving_key = KeyPair::generate()?;
        let mut serving = CertificateParams::new(vec!["localhost".to_string(), "kubernetes.default.svc".into()])?;
        serving.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
        serving.distinguished_name.push(DnType::CommonName, "kube-apiserver");
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving_cert = serving.signed_by(&serving_key, &issuer)?;

        let admin_key = KeyPair::generate()?;
        let mut admin = CertificateParams::new(Vec::<String>::new())?;
        admin.distinguished_name.push(DnType::CommonName, "admin");
        admin.distinguished_name.push(DnType::OrganizationName, "system:masters");
        admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let admin_cert = admin.signed_by(&admin_key, &issuer)?;

        let sa = KeyPair::generate()?;
        Ok(Self {
            ca_cert: ca_cert.pem(),
            serving_cert: serving_cert.pem(),
            serving_key: serving_key.serialize_pem(),
            admin_cert: admin_cert.pem(),
            admin_key: admin_key.serialize_pem(),
            sa_key: sa.serialize_pem(),
            sa_pub: sa.public_key_pem(),
        })
    }
}

/// The `.yaml` files of `dir`, sorted by name.
fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    Ok(files)
}
