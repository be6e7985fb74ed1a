//! The seeds' check's data plane (`../shared/DATAPLANE.md`), shared by the `dataplane` suite and `cargo demo
//! --traffic`: on a federation the real operator made, with a real istiod in each Primary, `hello` v1 runs in east
//! and v2 in west behind sidecars (Istio's `pilot-agent` driving upstream Envoy), and a client in each member calls
//! `hello.sample:5000/hello`. Everything runs in a private network namespace
//! ([`meshfed_testenv::in_network_namespace`], root): pods have non-loopback addresses there.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Secret, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api,
    api::{ApiResource, DynamicObject, Patch, PatchParams},
};
use meshfed_api::{ClusterRole, MeshFederation};
use meshfed_core::pki;
use meshfed_testenv::{
    ISTIOD_ENV_FOR_UPSTREAM_ENVOY, Istiod, Options, OwnNetwork, Pod, PodSpec, call, free_port, serve_hello,
};
use serde_json::json;

use crate::{Fixture, ISTIO_NAMESPACE, NAMESPACE, is_ready};

pub const SAMPLE: &str = "sample";
pub const HELLO_PORT: u16 = 5000;
pub const HELLO_HOST: &str = "hello.sample.svc.cluster.local:5000";
pub const WAIT: Duration = Duration::from_secs(60);
/// How long a client may take, once every pod is ready, to see both versions (istiod pushing the other member's
/// endpoint).
pub const CONVERGE: Duration = Duration::from_secs(60);
/// The requests each client sends once converged; every one must be answered.
pub const REQUESTS: usize = 40;
/// The client's identity, as the server must see it.
pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/sample/sa/sleep";

/// Each member's version of `hello` and its pods' addresses (server, client, east-west gateway).
pub const MEMBERS: [(&str, &str, &str, &str, &str); 2] = [
    ("east", "v1", "10.244.1.10", "10.244.1.20", "10.244.1.30"),
    ("west", "v2", "10.244.2.10", "10.244.2.20", "10.244.2.30"),
];
/// The port other networks' sidecars dial on a member's east-west gateway.
pub const CROSS_NETWORK_PORT: u16 = 15443;

/// The address of east's istiod's pod, where a Remote's agents reach it through east's gateway.
pub const ISTIOD_IP: &str = "10.244.1.40";

/// The answers every client must get, `version@cluster`: each member's version of `hello`.
pub fn expected_answers() -> Vec<String> {
    MEMBERS.iter().map(|(m, v, ..)| format!("{v}@{m}")).collect()
}

/// Every address of the environment's network namespace: the servers', the clients' and istiod's (each gateway has
/// its own).
pub fn addresses() -> Vec<&'static str> {
    MEMBERS.iter().flat_map(|(_, _, server, client, _)| [*server, *client]).chain([ISTIOD_IP]).collect()
}

/// A federation the real operator converged, a real istiod in each Primary, and in each member `hello` (its version,
/// behind a sidecar, the app in this process) and a client's sidecar. Dropped in field order: pods, apps, istiods,
/// then the clusters.
pub struct DataPlane {
    pub clients: BTreeMap<String, Pod>,
    pub gateways: BTreeMap<String, Pod>,
    pub servers: BTreeMap<String, Pod>,
    pub apps: Vec<tokio::task::JoinHandle<()>>,
    pub istiods: BTreeMap<String, Istiod>,
    /// More environment for every pod's agent (e.g. a short `SECRET_TTL`).
    pub pod_env: Vec<(String, String)>,
    pub fed: MeshFederation,
    pub f: Fixture,
}

impl DataPlane {
    pub async fn start(yaml: &str) -> anyhow::Result<Self> {
        Self::start_with(yaml, &[]).await
    }

    /// Like [`DataPlane::start`], with `pod_env` added to every pod's agent.
    pub async fn start_with(yaml: &str, pod_env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let f = Fixture::start(&["east", "west"], Options { real_istiod: true, ..Options::default() }).await?;
        f.apply(yaml).await?;
        let fed = f.wait_for("prod", WAIT, is_ready).await?;
        let primaries: Vec<String> =
            fed.spec.clusters.iter().filter(|c| c.role == ClusterRole::Primary).map(|c| c.name.clone()).collect();
        let started = futures::future::try_join_all(
            primaries
                .iter()
                .map(|p| Istiod::start_with_env(f.env.cluster(p), p, ISTIO_NAMESPACE, ISTIOD_ENV_FOR_UPSTREAM_ENVOY)),
        )
        .await?;
        let istiods: BTreeMap<String, Istiod> = primaries.into_iter().zip(started).collect();
        for (member, ..) in MEMBERS {
            strict_mtls(&f, member).await?;
        }
        let (clients, gateways, servers) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
        let pod_env = pod_env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut dp = Self { clients, gateways, servers, apps: Vec::new(), istiods, pod_env, fed, f };
        // A Primary serving Remotes: they reach its istiod through its gateway, which routes to istiod's Service.
        for (primary, istiod) in &dp.istiods {
            if dp.fed.spec.clusters.iter().any(|c| c.control_plane.as_deref() == Some(primary)) {
                dp.apps.push(serve_istiod(&dp.f, primary, istiod).await?);
            }
        }
        for (member, _, _, _, gateway_ip) in MEMBERS {
            if let Some(gateway) = dp.gateway_pod(member, gateway_ip).await? {
                let pod = Pod::start(dp.f.env.cluster(member), dp.config_cluster(member), gateway).await?;
                dp.gateways.insert(member.into(), pod);
            }
        }
        for (member, version, server_ip, client_ip, _) in MEMBERS {
            let app_port = free_port()?;
            dp.apps.push(serve_hello(SocketAddr::from((Ipv4Addr::LOCALHOST, app_port)), version, member).await?);
            let server = PodSpec {
                name: format!("hello-{version}"),
                service_account: "hello".into(),
                ip: server_ip.into(),
                inbound: Some(("hello".into(), HELLO_PORT, app_port)),
                labels: BTreeMap::from([("version".into(), version.into())]),
                ..dp.pod_spec(member).await?
            };
            let client = PodSpec {
                name: format!("sleep-{member}"),
                service_account: "sleep".into(),
                ip: client_ip.into(),
                outbound: vec![HELLO_PORT],
                ..dp.pod_spec(member).await?
            };
            let (cluster, config) = (dp.f.env.cluster(member), dp.config_cluster(member));
            let (server, client) =
                futures::try_join!(Pod::start(cluster, config, server), Pod::start(cluster, config, client))?;
            dp.servers.insert(member.into(), server);
            dp.clients.insert(member.into(), client);
        }
        Ok(dp)
    }

    /// The member whose istiod serves `member` (its certificates, its configuration): itself, or its Primary.
    pub fn control_plane<'a>(&'a self, member: &'a str) -> &'a str {
        let spec = self.fed.spec.clusters.iter().find(|c| c.name == member).expect("a member of the federation");
        spec.control_plane.as_deref().unwrap_or(member)
    }

    /// The cluster where the mesh's configuration for `member` lives: its control plane's.
    pub fn config_cluster(&self, member: &str) -> &meshfed_testenv::Cluster {
        self.f.env.cluster(self.control_plane(member))
    }

    /// What every pod of `member` shares: its mesh, cluster, network and control plane: a Primary's own istiod; for
    /// a Remote, the `remotePilotAddress` meshfed wrote into its `Istio` (its Primary's gateway), port 15012.
    pub async fn pod_spec(&self, member: &str) -> anyhow::Result<PodSpec> {
        let spec = self.fed.spec.clusters.iter().find(|c| c.name == member).expect("a member of the federation");
        let discovery_address = match self.istiods.get(member) {
            Some(istiod) => istiod.secure_xds_address(),
            None => format!("{}:15012", remote_pilot_address(&self.f, member).await?),
        };
        Ok(PodSpec {
            namespace: SAMPLE.into(),
            mesh_id: self.fed.spec.mesh_id.clone(),
            cluster_id: member.into(),
            network: spec.network.clone(),
            discovery_address,
            istio_namespace: ISTIO_NAMESPACE.into(),
            env: self.pod_env.clone(),
            ..PodSpec::default()
        })
    }

    /// Where meshfed reports `member`'s east-west gateway (`status.clusters[].gatewayAddress`), if it has one.
    pub fn gateway_address(&self, member: &str) -> Option<String> {
        let status = self.fed.status.as_ref()?;
        status.clusters.iter().find(|c| c.name == member)?.gateway_address.clone()
    }

    /// The pod of `member`'s east-west gateway, as a kubelet would run it from the Deployment meshfed wrote (its
    /// labels, ServiceAccount and environment), at `ip`, its Envoy in a network namespace of its own that also holds
    /// the address meshfed reports for it (the played cloud's load balancer). None when meshfed wrote no gateway.
    pub async fn gateway_pod(&self, member: &str, ip: &str) -> anyhow::Result<Option<PodSpec>> {
        let deployments = Api::<Deployment>::namespaced(self.f.member(member).await?, ISTIO_NAMESPACE);
        let Some(deployment) = deployments.get_opt("istio-eastwestgateway").await? else { return Ok(None) };
        let address = self.gateway_address(member).context("meshfed wrote a gateway but reports no address")?;
        let template = deployment.spec.context("a Deployment's spec")?.template;
        let pod = template.spec.context("a pod template's spec")?;
        let env = pod.containers.iter().flat_map(|c| c.env.iter().flatten());
        Ok(Some(PodSpec {
            name: format!("istio-eastwestgateway-{member}"),
            namespace: ISTIO_NAMESPACE.into(),
            service_account: pod.service_account_name.clone().context("the gateway's ServiceAccount")?,
            ip: ip.into(),
            labels: template.metadata.and_then(|m| m.labels).unwrap_or_default(),
            gateway: true,
            env: env
                .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
                .chain(self.pod_env.clone())
                .collect(),
            own_network: Some(OwnNetwork {
                addresses: vec![address, ip.into()],
                ready_ports: self.gateway_ports(member),
            }),
            ..self.pod_spec(member).await?
        }))
    }

    /// The ports `member`'s gateway serves: other networks' sidecars (15443) on two networks, its Remotes' agents
    /// (istiod, 15012) when it is their Primary.
    pub fn gateway_ports(&self, member: &str) -> Vec<u16> {
        let clusters = &self.fed.spec.clusters;
        let networks: std::collections::BTreeSet<&str> = clusters.iter().map(|c| c.network.as_str()).collect();
        let serves_remotes = clusters.iter().any(|c| c.control_plane.as_deref() == Some(member));
        let mut ports = Vec::new();
        if networks.len() > 1 {
            ports.push(CROSS_NETWORK_PORT);
        }
        if serves_remotes {
            ports.push(15012);
        }
        ports
    }

    /// Where `client`'s sidecar must send requests for `server`'s `hello`: the server pod on the same network, the
    /// server's member's east-west gateway at the address meshfed reports on another.
    pub fn endpoint(&self, client: &str, server: &str) -> String {
        let network = |m: &str| self.fed.spec.clusters.iter().find(|c| c.name == m).map(|c| c.network.clone());
        if network(client) == network(server) {
            self.servers[server].addr(HELLO_PORT).to_string()
        } else {
            let gateway =
                self.gateway_address(server).unwrap_or_else(|| panic!("meshfed reports no gateway for {server}"));
            format!("{gateway}:{CROSS_NETWORK_PORT}")
        }
    }

    /// The federation's root (the hub's), PEM.
    pub async fn root(&self) -> anyhow::Result<Vec<u8>> {
        let secret = Api::<Secret>::namespaced(self.f.hub.clone(), NAMESPACE).get("prod-root-ca").await?;
        Ok(secret.data.unwrap_or_default().remove("tls.crt").context("the root's tls.crt")?.0)
    }

    /// `member`'s intermediate: the first certificate of its `cacerts`' `ca-cert.pem`, PEM.
    pub async fn intermediate(&self, member: &str) -> anyhow::Result<Vec<u8>> {
        let secret = Api::<Secret>::namespaced(self.f.member(member).await?, ISTIO_NAMESPACE).get("cacerts").await?;
        Ok(secret.data.unwrap_or_default().remove("ca-cert.pem").context("cacerts' ca-cert.pem")?.0)
    }

    /// Logs of every pod and istiod, for a failure message.
    pub fn logs(&self) -> String {
        let pods = self.servers.values().chain(self.clients.values()).chain(self.gateways.values());
        let mut out: Vec<String> = pods.map(|p| format!("--- pod {}:\n{}", p.name(), p.log_tail())).collect();
        out.extend(self.istiods.iter().map(|(m, i)| format!("--- istiod of {m}:\n{}", i.log_tail())));
        out.join("\n")
    }
}

/// The `remotePilotAddress` meshfed wrote into the Sail `Istio` of the Remote `member`.
async fn remote_pilot_address(f: &Fixture, member: &str) -> anyhow::Result<String> {
    let resource = meshfed_operator::member::kinds::api_resource(&meshfed_core::kinds::ISTIO);
    let istio = Api::<DynamicObject>::all_with(f.member(member).await?, &resource).get("default").await?;
    let address = istio.data["spec"]["values"]["global"]["remotePilotAddress"].as_str();
    Ok(address.with_context(|| format!("meshfed wrote no remotePilotAddress for {member}"))?.to_string())
}

/// Plays the `istiod` Service of `primary` (the one meshfed's `istiod-vs` routes a Remote's connections to) with its
/// pod at [`ISTIOD_IP`], port 15012 forwarded to the running istiod's TLS xDS port.
async fn serve_istiod(f: &Fixture, primary: &str, istiod: &Istiod) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let client = f.member(primary).await?;
    let pp = kube::api::PostParams::default();
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "istiod"},
        "spec": {"ports": [{"name": "tls-xds", "port": 15012, "protocol": "TCP"}]},
    }))?;
    Api::<Service>::namespaced(client.clone(), ISTIO_NAMESPACE).create(&pp, &svc).await?;
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "istiod-1", "labels": {"kubernetes.io/service-name": "istiod"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ISTIOD_IP], "conditions": {"ready": true}}],
        "ports": [{"name": "tls-xds", "port": 15012, "protocol": "TCP"}],
    }))?;
    Api::<EndpointSlice>::namespaced(client, ISTIO_NAMESPACE).create(&pp, &slice).await?;
    let to = istiod.secure_xds_address().parse()?;
    meshfed_testenv::forward(SocketAddr::from((ISTIOD_IP.parse::<Ipv4Addr>()?, 15012)), to).await
}

/// A mesh-wide `PeerAuthentication` in `member` that makes every sidecar refuse plaintext.
async fn strict_mtls(f: &Fixture, member: &str) -> anyhow::Result<()> {
    let resource = ApiResource {
        group: "security.istio.io".into(),
        version: "v1".into(),
        api_version: "security.istio.io/v1".into(),
        kind: "PeerAuthentication".into(),
        plural: "peerauthentications".into(),
    };
    let pa = json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": ISTIO_NAMESPACE},
        "spec": {"mtls": {"mode": "STRICT"}},
    });
    let api = Api::<DynamicObject>::namespaced_with(f.member(member).await?, ISTIO_NAMESPACE, &resource);
    api.patch("default", &PatchParams::apply("e2e").force(), &Patch::Apply(&pa)).await?;
    Ok(())
}

/// The answers of `REQUESTS` calls from `member`'s client, by `version@cluster`, once the client has seen every
/// version of `expected` (within [`CONVERGE`]); every call must be answered, by a server that saw the client's
/// identity and the certificate the client's agent holds.
pub async fn split(dp: &DataPlane, member: &str, expected: &[&str]) -> anyhow::Result<BTreeMap<String, usize>> {
    let client = &dp.clients[member];
    let addr = client.addr(HELLO_PORT);
    let call = || call(addr, HELLO_HOST, "/hello", Duration::from_secs(5));
    let started = Instant::now();
    let (mut seen, mut last_error) = (BTreeMap::<String, usize>::new(), String::new());
    while !expected.iter().all(|e| seen.contains_key(*e)) {
        match call().await {
            Ok(a) => *seen.entry(format!("{}@{}", a.version, a.cluster)).or_default() += 1,
            Err(e) => last_error = format!("{e:#}"),
        }
        if started.elapsed() > CONVERGE {
            bail!(
                "{member}'s client saw only {seen:?} after {CONVERGE:?}, not all of {expected:?} (last error: {last_error})\n{}",
                dp.logs()
            );
        }
    }
    println!("{member}'s client saw every version after {:?}", started.elapsed());
    let leaf = pki::fingerprints(&client.certificate_chain()?).into_iter().next().context("the client's leaf")?;
    let before = successes(client).await?;
    let mut counts = BTreeMap::new();
    for i in 0..REQUESTS {
        let a = call().await.with_context(|| format!("request {i} of {REQUESTS} from {member}'s client"))?;
        ensure!(a.xfcc_field("URI") == Some(CLIENT_ID), "the server saw the client as {:?}, not {CLIENT_ID}", a.xfcc);
        // Envoy's hash of the certificate the client presented: the one istiod issued to the client's agent.
        let presented = a.xfcc_field("Hash").map(|h| format!("sha256:{h}"));
        ensure!(presented.as_ref() == Some(&leaf), "the client presented {presented:?}, not its certificate {leaf}");
        *counts.entry(format!("{}@{}", a.version, a.cluster)).or_default() += 1;
    }
    // Which endpoint carried each request, as the client's Envoy counted them: each server's answers went where the
    // client must reach that server (its pod, or its member's gateway), and nowhere else.
    let mut carried = successes(client).await?;
    carried.retain(|endpoint, n| {
        *n -= before.get(endpoint).copied().unwrap_or(0);
        *n > 0
    });
    let mut want = BTreeMap::new();
    for (answered, n) in &counts {
        let server = answered.split_once('@').map_or("", |s| s.1);
        *want.entry(dp.endpoint(member, server)).or_default() += *n as u64;
    }
    ensure!(carried == want, "{member}'s client sent its requests to {carried:?}, not {want:?} (answers {counts:?})");
    println!("{member}'s client reached them through {carried:?}");
    Ok(counts)
}

/// The requests `pod`'s Envoy completed successfully per endpoint of `hello`'s cluster (`address:port`).
async fn successes(pod: &Pod) -> anyhow::Result<BTreeMap<String, u64>> {
    let prefix = format!("outbound|{HELLO_PORT}||hello.sample.svc.cluster.local::");
    let clusters = pod.envoy_admin("/clusters").await?;
    let stats = clusters.lines().filter_map(|l| l.strip_prefix(&prefix));
    let parse = |l: &str| Some((l.split_once("::rq_success::")?.0.to_string(), l.rsplit("::").next()?.parse().ok()?));
    Ok(stats.filter(|l| l.contains("::rq_success::")).filter_map(parse).collect())
}
