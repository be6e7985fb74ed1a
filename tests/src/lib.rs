//! What the end-to-end suites and the demo share: a hub and members from `meshfed-testenv`, the CRD installed, one
//! kubeconfig Secret per member in the hub, and the meshfed controller running in-process against the hub.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::{
    ByteString,
    api::core::v1::{Namespace, Secret},
    apimachinery::pkg::apis::meta::v1::Condition,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use meshfed_api::MeshFederation;
use meshfed_operator::{
    controller::{self, Clock, Settings},
    metrics::Metrics,
};
use meshfed_testenv::{Env, Options};
use tokio::task::JoinHandle;

/// The hub namespace the examples in `deploy/` live in.
pub const NAMESPACE: &str = "mesh-system";
/// The hub namespace the operator's ServiceAccount (from the chart) lives in.
pub const OPERATOR_NAMESPACE: &str = "meshfed-system";
/// The name of the hub cluster in every fixture.
pub const HUB: &str = "hub";

/// A hub, its members, and a running controller. Everything stops when it is dropped.
pub struct Fixture {
    pub env: Env,
    pub hub: Client,
    /// The running controller's metrics.
    pub metrics: Metrics,
    /// The running controller's clock, to advance.
    pub clock: Clock,
    operator: Option<JoinHandle<()>>,
}

impl Fixture {
    /// Starts a hub and `members`, installs the CRD, writes `<member>-kubeconfig` Secrets (key `kubeconfig`) in
    /// [`NAMESPACE`], and starts the controller in-process with short timeouts.
    pub async fn start(members: &[&str], options: Options) -> Result<Self> {
        let mut f = Self::clusters(members, options).await?;
        let settings = Settings {
            member_timeout: Duration::from_secs(5),
            retry_after: Duration::from_secs(1),
            clock: f.clock.clone(),
            ..Settings::default()
        };
        let hub = f.chart_credentials().await?;
        let metrics = f.metrics.clone();
        f.operator = Some(tokio::spawn(async move {
            if let Err(e) = controller::run(hub, settings, metrics).await {
                eprintln!("controller stopped: {e:#}");
            }
        }));
        Ok(f)
    }

    /// Like [`Fixture::start`], without starting the controller (to run it as a process instead).
    pub async fn clusters(members: &[&str], options: Options) -> Result<Self> {
        let names: Vec<&str> = std::iter::once(HUB).chain(members.iter().copied()).collect();
        let env = Env::start(&names, options).await?;
        let hub_cluster = env.cluster(HUB);
        hub_cluster.install_crds(&meshfed_api::crd_yaml()).await?;
        let hub = hub_cluster.client().await?;
        let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": NAMESPACE}}))?;
        Api::<Namespace>::all(hub.clone()).create(&PostParams::default(), &ns).await?;
        for m in members {
            put_kubeconfig(&hub, m, env.cluster(m).kubeconfig()).await?;
        }
        Ok(Self { env, hub, metrics: Metrics::default(), clock: Clock::default(), operator: None })
    }

    /// The federations of [`NAMESPACE`].
    pub fn federations(&self) -> Api<MeshFederation> {
        Api::namespaced(self.hub.clone(), NAMESPACE)
    }

    /// A hub client with exactly the permissions of the Helm chart: its RBAC (`charts/meshfed/templates/rbac.yaml`)
    /// is installed into [`OPERATOR_NAMESPACE`], and the client authenticates as its ServiceAccount. The operator of
    /// every test runs with it, so a permission the chart lacks fails the suite.
    pub async fn chart_credentials(&self) -> Result<Client> {
        let rbac =
            std::fs::read_to_string(format!("{}/../charts/meshfed/templates/rbac.yaml", env!("CARGO_MANIFEST_DIR")))?
                .replace("{{ .Release.Namespace }}", OPERATOR_NAMESPACE);
        let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": OPERATOR_NAMESPACE}}))?;
        Api::<Namespace>::all(self.hub.clone()).create(&PostParams::default(), &ns).await?;
        let pp = PatchParams::apply("e2e").force();
        for doc in serde_yaml::Deserializer::from_str(&rbac) {
            let obj: kube::api::DynamicObject = serde::Deserialize::deserialize(doc)?;
            let gvk = kube::api::GroupVersionKind::try_from(obj.types.as_ref().context("a kind")?)?;
            let (resource, caps) = kube::discovery::pinned_kind(&self.hub, &gvk).await?;
            let api: Api<kube::api::DynamicObject> = match (caps.scope, obj.metadata.namespace.as_deref()) {
                (kube::discovery::Scope::Namespaced, Some(ns)) => Api::namespaced_with(self.hub.clone(), ns, &resource),
                _ => Api::all_with(self.hub.clone(), &resource),
            };
            api.patch(&obj.metadata.name.clone().context("a name")?, &pp, &Patch::Apply(&obj)).await?;
        }
        let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(self.hub.clone(), OPERATOR_NAMESPACE);
        let request: k8s_openapi::api::authentication::v1::TokenRequest =
            serde_json::from_value(serde_json::json!({"spec": {"expirationSeconds": 7200}}))?;
        let token = sas
            .create_token_request("meshfed", &PostParams::default(), &request)
            .await?
            .status
            .context("a token")?
            .token;
        let mut kubeconfig: serde_yaml::Value = serde_yaml::from_str(self.env.cluster(HUB).kubeconfig())?;
        kubeconfig["users"][0]["user"] = serde_yaml::from_str(&format!("token: {token}"))?;
        meshfed_testenv::client_from_kubeconfig(&serde_yaml::to_string(&kubeconfig)?).await
    }

    /// Creates or updates a federation from YAML, as `kubectl apply --server-side` would.
    pub async fn apply(&self, yaml: &str) -> Result<MeshFederation> {
        let fed: MeshFederation = serde_yaml::from_str(yaml)?;
        Ok(self.federations().patch(&fed.name_any(), &PatchParams::apply("e2e").force(), &Patch::Apply(&fed)).await?)
    }

    /// Deletes a federation.
    pub async fn delete(&self, name: &str) -> Result<()> {
        self.federations().delete(name, &DeleteParams::default()).await?;
        Ok(())
    }

    /// Waits until the federation satisfies `done` and returns it; on timeout, fails showing its last status.
    pub async fn wait_for(
        &self,
        name: &str,
        timeout: Duration,
        done: impl Fn(&MeshFederation) -> bool,
    ) -> Result<MeshFederation> {
        let deadline = Instant::now() + timeout;
        loop {
            let fed = self.federations().get(name).await?;
            if done(&fed) {
                return Ok(fed);
            }
            if Instant::now() > deadline {
                bail!(
                    "federation {name} not as expected after {timeout:?}; status:\n{}",
                    serde_yaml::to_string(&fed.status)?
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the federation is gone (its finalizer released).
    pub async fn wait_gone(&self, name: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while let Some(fed) = self.federations().get_opt(name).await? {
            if Instant::now() > deadline {
                bail!(
                    "federation {name} still there after {timeout:?}; status:\n{}",
                    serde_yaml::to_string(&fed.status)?
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// Triggers a reconcile of a federation without changing its spec (an annotation change is a watch event).
    pub async fn poke(&self, name: &str) -> Result<()> {
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos().to_string();
        let patch = serde_json::json!({"metadata": {"annotations": {"e2e/poke": stamp}}});
        self.federations().patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        Ok(())
    }

    /// Serves the running controller's metrics, as `meshfed run` does, on a free loopback port; returns the port.
    pub async fn serve_metrics(&self) -> Result<u16> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let metrics = self.metrics.clone();
        tokio::spawn(metrics.serve(([127, 0, 0, 1], port).into()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while http_get(port, "/healthz").await.is_err() {
            if Instant::now() > deadline {
                bail!("the metrics endpoint did not come up on port {port}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(port)
    }

    /// An admin client for a member.
    pub async fn member(&self, name: &str) -> Result<Client> {
        self.env.cluster(name).client().await.with_context(|| format!("client for {name}"))
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(op) = &self.operator {
            op.abort();
        }
    }
}

/// Writes (or replaces) the kubeconfig Secret `<member>-kubeconfig` in the hub.
pub async fn put_kubeconfig(hub: &Client, member: &str, kubeconfig: &str) -> Result<()> {
    let secret = Secret {
        metadata: kube::api::ObjectMeta { name: Some(format!("{member}-kubeconfig")), ..Default::default() },
        data: Some([("kubeconfig".to_string(), ByteString(kubeconfig.as_bytes().to_vec()))].into()),
        ..Default::default()
    };
    let secrets: Api<Secret> = Api::namespaced(hub.clone(), NAMESPACE);
    secrets.patch(&format!("{member}-kubeconfig"), &PatchParams::apply("e2e").force(), &Patch::Apply(&secret)).await?;
    Ok(())
}

/// The condition of `type_` among `conditions`.
pub fn condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// The federation's condition of `type_`.
pub fn fed_condition<'a>(fed: &'a MeshFederation, type_: &str) -> Option<&'a Condition> {
    fed.status.as_ref().and_then(|s| condition(&s.conditions, type_))
}

/// Whether the federation reports `Ready=True` for its current generation.
pub fn is_ready(fed: &MeshFederation) -> bool {
    let current = fed.status.as_ref().and_then(|s| s.observed_generation) == fed.metadata.generation;
    current && fed_condition(fed, "Ready").is_some_and(|c| c.status == "True")
}

/// The example federation of a topology, from `deploy/examples/`.
pub fn example(name: &str) -> String {
    let path = format!("{}/../deploy/examples/{name}.yaml", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// GETs `path` from a loopback HTTP server on `port`: the status code and the body.
pub async fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).await?;
    let mut response = String::new();
    s.read_to_string(&mut response).await?;
    let (head, body) = response.split_once("\r\n\r\n").context("an HTTP response")?;
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).context("an HTTP status code")?;
    Ok((code, body.to_string()))
}

/// A scrape of a Prometheus text endpoint.
pub struct Scrape(pub String);

impl Scrape {
    /// Scrapes `/metrics` on a loopback `port`.
    pub async fn from(port: u16) -> Result<Self> {
        match http_get(port, "/metrics").await? {
            (200, body) => Ok(Self(body)),
            (code, _) => bail!("/metrics answered {code}"),
        }
    }

    /// The samples of `name`: each with its labels (the text between the braces) and its value.
    pub fn samples<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
        self.0.lines().filter_map(move |l| {
            let rest = l.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => r.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            Some((labels, value.parse().ok()?))
        })
    }

    /// The value of `name` whose labels contain every one of `labels` (as `key="value"`).
    pub fn value(&self, name: &str, labels: &[&str]) -> Option<f64> {
        self.samples(name).find(|(l, _)| labels.iter().all(|want| l.split(',').any(|have| have == *want))).map(|s| s.1)
    }

    /// The sum of a metric's samples over all its labels.
    pub fn sum(&self, name: &str) -> u64 {
        self.samples(name).map(|s| s.1).sum::<f64>() as u64
    }
}
