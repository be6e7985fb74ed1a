//! What the end-to-end suites and the demo share: a hub and members from `meshfed-testenv`, the CRD installed, one
//! kubeconfig Secret per member in the hub, and the meshfed controller running in-process against the hub.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::{
    ByteString,
    api::core::v1::{Namespace, Secret},
    apimachinery::pkg::apis::meta::v1::Condition,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams},
};
use meshfed_api::MeshFederation;
use meshfed_core::{federation, kinds};
use meshfed_operator::{
    join,
    metrics::Metrics,
    reconcile::{self, Clock, Settings},
};
use meshfed_testenv::{Env, Options, Stage};
use tokio::task::JoinHandle;

pub mod dataplane;

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
    /// The cloud and the Sail operator, played in every member.
    _stages: Vec<Stage>,
}

impl Fixture {
    /// Starts a hub and `members`, installs the CRD, writes `<member>-kubeconfig` Secrets (key `kubeconfig`) in
    /// [`NAMESPACE`], and starts the controller in-process with short timeouts.
    pub async fn start(members: &[&str], options: Options) -> Result<Self> {
        let mut f = Self::clusters(members, options).await?;
        f.operator = Some(f.run_operator(f.metrics.clone()).await?);
        Ok(f)
    }

    /// Starts a controller in-process, as the chart's ServiceAccount ([`Fixture::chart_credentials`]), with the
    /// fixture's clock, short timeouts and `metrics`; aborting the task kills it as abruptly as a killed process.
    pub async fn run_operator(&self, metrics: Metrics) -> Result<JoinHandle<()>> {
        let settings = Settings {
            member_timeout: Duration::from_secs(5),
            retry_after: Duration::from_secs(1),
            member_backoff_max: Duration::from_secs(4),
            clock: self.clock.clone(),
            ..Settings::default()
        };
        let hub = self.chart_credentials().await?;
        Ok(tokio::spawn(async move {
            if let Err(e) = reconcile::run(hub, settings, metrics).await {
                eprintln!("controller stopped: {e:#}");
            }
        }))
    }

    /// Like [`Fixture::start`], without starting the controller (to run it as a process instead).
    pub async fn clusters(members: &[&str], options: Options) -> Result<Self> {
        let names: Vec<&str> = std::iter::once(HUB).chain(members.iter().copied()).collect();
        let play_istiod = !options.real_istiod;
        let env = Env::start(&names, options).await?;
        // A few clusters at a time: installing the CRDs into fifty fresh API servers at once starves them all.
        futures::stream::iter(members.iter().map(|m| env.cluster(m).install_mesh_crds()))
            .buffer_unordered(8)
            .try_collect::<Vec<()>>()
            .await?;
        let hub_cluster = env.cluster(HUB);
        hub_cluster.install_crds(&meshfed_api::crd_yaml()).await?;
        let hub = hub_cluster.client().await?;
        let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": NAMESPACE}}))?;
        Api::<Namespace>::all(hub.clone()).create(&PostParams::default(), &ns).await?;
        let mut stages = Vec::new();
        for (i, m) in members.iter().enumerate() {
            join_member(&hub, env.cluster(m), &prod(), ISTIO_NAMESPACE).await?;
            stages.push(env.cluster(m).play_cloud_and_sail(&load_balancer_ip(i), play_istiod).await?);
        }
        Ok(Self { env, hub, metrics: Metrics::default(), clock: Clock::default(), operator: None, _stages: stages })
    }

    /// Joins every member to federation `name` of [`NAMESPACE`] instead (as `meshfed join` does): its kubeconfig
    /// Secret then holds that federation's identity.
    pub async fn join_as(&self, name: &str) -> Result<()> {
        let fed = federation::FederationRef { namespace: NAMESPACE.into(), name: name.into() };
        let secrets: Api<Secret> = Api::namespaced(self.hub.clone(), NAMESPACE);
        for c in self.env.clusters().iter().filter(|c| c.name() != HUB) {
            secrets.delete(&format!("{}-kubeconfig", c.name()), &DeleteParams::default()).await?;
            join_member(&self.hub, c, &fed, ISTIO_NAMESPACE).await?;
        }
        Ok(())
    }

    /// Joins `members` to federation `name` of [`NAMESPACE`] with Istio namespace `istio_namespace` as `meshfed join`
    /// does, each into Secret `<member>-<name>-kubeconfig` (the fixture's `<member>-kubeconfig` stay prod's):
    /// federations that share members reach each with their own identity, as on a real hub.
    pub async fn join_federation(&self, name: &str, istio_namespace: &str, members: &[&str]) -> Result<()> {
        let fed = federation::FederationRef { namespace: NAMESPACE.into(), name: name.into() };
        for m in members {
            let secret_prefix = format!("{m}-{name}");
            join_named(&self.hub, self.env.cluster(m), &secret_prefix, &fed, istio_namespace, JOIN_TTL).await?;
        }
        Ok(())
    }

    /// The federations of [`NAMESPACE`].
    pub fn federations(&self) -> Api<MeshFederation> {
        Api::namespaced(self.hub.clone(), NAMESPACE)
    }

    /// A hub client with exactly the permissions of the Helm chart: the RBAC objects of the plain manifests rendered
    /// from it (`deploy/meshfed.yaml`) are installed into [`OPERATOR_NAMESPACE`], and the client authenticates as its
    /// ServiceAccount. The operator of every test runs with it, so a permission the chart lacks fails the suite.
    pub async fn chart_credentials(&self) -> Result<Client> {
        let ns = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NAMESPACE}});
        Api::<Namespace>::all(self.hub.clone())
            .patch(OPERATOR_NAMESPACE, &PatchParams::apply("e2e"), &Patch::Apply(&ns))
            .await?;
        let rbac = ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"];
        apply_manifests(&self.hub, &manifests(), |kind| rbac.contains(&kind)).await?;
        self.credentials_of("meshfed").await
    }

    /// A hub client that authenticates as ServiceAccount `service_account` of [`OPERATOR_NAMESPACE`].
    pub async fn credentials_of(&self, service_account: &str) -> Result<Client> {
        let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(self.hub.clone(), OPERATOR_NAMESPACE);
        let request: k8s_openapi::api::authentication::v1::TokenRequest =
            serde_json::from_value(serde_json::json!({"spec": {"expirationSeconds": 7200}}))?;
        let token = sas
            .create_token_request(service_account, &PostParams::default(), &request)
            .await?
            .status
            .context("a token")?
            .token;
        let mut kubeconfig: serde_json::Value = serde_saphyr::from_str(self.env.cluster(HUB).kubeconfig())?;
        kubeconfig["users"][0]["user"] = serde_saphyr::from_str(&format!("token: {token}"))?;
        meshfed_testenv::client_from_kubeconfig(&serde_saphyr::to_string(&kubeconfig)?).await
    }

    /// Creates or updates a federation from YAML, as `kubectl apply --server-side` would.
    pub async fn apply(&self, yaml: &str) -> Result<MeshFederation> {
        let fed: MeshFederation = serde_saphyr::from_str(yaml)?;
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
        let mut last = None;
        let reached = sample_until(Instant::now(), timeout, POLL, async |_, _| {
            let fed = self.federations().get(name).await?;
            let done = done(&fed);
            last = Some(fed);
            Ok(done)
        })
        .await;
        match (reached, last) {
            (Ok(_), Some(fed)) => Ok(fed),
            (e, last) => bail!(
                "federation {name} not as expected ({:?}); status:\n{}",
                e.err(),
                serde_saphyr::to_string(&last.and_then(|f| f.status))?
            ),
        }
    }

    /// Waits until the federation is gone (its finalizer released).
    pub async fn wait_gone(&self, name: &str, timeout: Duration) -> Result<()> {
        let mut last = None;
        let gone = sample_until(Instant::now(), timeout, POLL, async |_, _| {
            last = self.federations().get_opt(name).await?;
            Ok(last.is_none())
        })
        .await;
        gone.map(drop).map_err(|e| {
            let status = last.and_then(|f| f.status).map(|s| serde_saphyr::to_string(&s).unwrap_or_default());
            anyhow::anyhow!("federation {name} still there: {e}; status:\n{}", status.unwrap_or_default())
        })
    }

    /// Waits until an Event on federation `name` satisfies `matches`.
    pub async fn wait_for_event(
        &self,
        name: &str,
        matches: impl Fn(&k8s_openapi::api::events::v1::Event) -> bool,
    ) -> Result<()> {
        let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(self.hub.clone(), NAMESPACE);
        let mut list = Vec::new();
        let regards = |e: &&k8s_openapi::api::events::v1::Event| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
        };
        let found = sample_until(Instant::now(), Duration::from_secs(30), POLL, async |_, _| {
            list = events.list(&ListParams::default()).await?.items;
            Ok(list.iter().filter(regards).any(&matches))
        })
        .await;
        found.map(drop).map_err(|e| anyhow::anyhow!("no such Event on {name}: {e}; all Events:\n{list:#?}"))
    }

    /// The remote secret `holder` holds for `target` in its Istio namespace `namespace`.
    pub async fn remote_secret(&self, namespace: &str, holder: &str, target: &str) -> Result<Secret> {
        let name = meshfed_core::istio::remote_secret_name(target);
        Ok(Api::<Secret>::namespaced(self.member(holder).await?, namespace).get(&name).await?)
    }

    /// Advances the controller's clock just past the refresh point of the reader tokens in the remote secrets of
    /// `pairs` (holder, target; Istio namespace `namespace`); returns how many seconds a fresh token then stays clear
    /// of its own refresh point. For tokens of 10 minutes, the TokenRequest API's shortest.
    ///
    /// A token is due when less than a third of its lifetime remains by the controller's clock, but the API servers
    /// issue fresh tokens in real time: an advance past two thirds of a lifetime (7 of 10 minutes) would make every
    /// fresh token due at once as well, and meshfed would renew at every reconcile. So the clock goes just past the
    /// older token's due point; a fresh token then stays clear for as long as the newest old one had lived, less a
    /// second, which is made 15 s.
    pub async fn advance_past_refresh(&self, namespace: &str, pairs: &[(&str, &str)]) -> Result<u64> {
        let mut claims = Vec::new();
        for (holder, target) in pairs {
            let secret = self.remote_secret(namespace, holder, target).await?;
            let token = meshfed_core::remote::token_in_remote_secret(&secret, target).context("a token")?;
            claims.push(meshfed_core::remote::token_claims(&token)?);
        }
        let newest = claims.iter().map(|c| c.issued_at).max().context("a pair")?;
        let age = jiff::Timestamp::now().duration_since(newest).unsigned_abs();
        tokio::time::sleep(Duration::from_secs(15).saturating_sub(age)).await;
        let now = jiff::Timestamp::now();
        let lifetime = |c: &meshfed_core::remote::TokenClaims| c.expires_at.duration_since(c.issued_at).as_secs();
        let advance = claims.iter().map(|c| c.expires_at.duration_since(now).as_secs() - lifetime(c) / 3 + 1).max();
        let (advance, lifetime) = (advance.context("a pair")?, lifetime(&claims[0]));
        let clear = lifetime * 2 / 3 - advance;
        println!("token refresh: clock advanced {advance} s; a fresh {lifetime} s token is due again after {clear} s");
        self.clock.advance(Duration::from_secs(advance.try_into()?));
        Ok(clear.try_into()?)
    }

    /// Triggers a reconcile of a federation without changing its spec (an annotation change is a watch event).
    pub async fn poke(&self, name: &str) -> Result<()> {
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos().to_string();
        let patch = serde_json::json!({"metadata": {"annotations": {"e2e/poke": stamp}}});
        self.federations().patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        Ok(())
    }

    /// Pokes federation `name`, then waits until a reconcile that started after the poke has ended, so that an
    /// assertion that nothing changed is about a reconcile that ran (reconciles of one federation never overlap).
    pub async fn poke_and_wait(&self, name: &str) -> Result<()> {
        let started = self.metrics.reconciles.get();
        self.poke(name).await?;
        self.reconciled_since(started).await
    }

    /// Waits until a reconcile after the `started`-th has ended (`started`: the reconcile counter read earlier).
    pub async fn reconciled_since(&self, started: u64) -> Result<()> {
        let m = &self.metrics;
        let after = async || m.reconciles_finished.get() > started;
        until("a reconcile after the change", Duration::from_secs(30), Duration::from_millis(20), after).await
    }

    /// Serves the running controller's metrics, as `meshfed run` does, on a free loopback port; returns the port.
    pub async fn serve_metrics(&self) -> Result<u16> {
        let port = meshfed_testenv::free_port()?;
        let metrics = self.metrics.clone();
        tokio::spawn(metrics.serve(([127, 0, 0, 1], port).into()));
        let up = async || http_get(port, "/healthz").await.is_ok();
        until("the metrics endpoint", Duration::from_secs(10), Duration::from_millis(50), up).await?;
        Ok(port)
    }

    /// The state the federation `name` left in the hub and in `members`, without what differs by chance between two
    /// runs (keys, tokens, times): every object meshfed owns in each member with its meshfed labels and data keys,
    /// whether each member's `cacerts` trusts exactly the hub's root, how many roots the hub holds, and the
    /// conditions of the federation and of each cluster. Two runs that end the same give equal sets.
    pub async fn end_state(&self, name: &str, members: &[&str]) -> Result<BTreeSet<String>> {
        let mut state = BTreeSet::new();
        let secrets: Api<Secret> = Api::namespaced(self.hub.clone(), NAMESPACE);
        let roots: Vec<Secret> = secrets
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|s| s.name_any().ends_with("-root-ca"))
            .collect();
        state.insert(format!("hub: {} root CA Secret(s)", roots.len()));
        let root_pem = roots.first().and_then(|r| r.data.as_ref()?.get("tls.crt").map(|b| b.0.clone()));
        let fed = self.federations().get(name).await?;
        let status = fed.status.unwrap_or_default();
        for c in &status.conditions {
            state.insert(format!("federation: {}={} ({})", c.type_, c.status, c.reason));
        }
        for cluster in &status.clusters {
            for c in &cluster.conditions {
                state.insert(format!("{}: {}={} ({})", cluster.name, c.type_, c.status, c.reason));
            }
        }
        let owned = ListParams::default().labels(&format!("{}={}", federation::MANAGED_BY, federation::FIELD_MANAGER));
        for m in members {
            let client = self.member(m).await?;
            let mut objects = Vec::new();
            // Every kind meshfed owns, from the one table that drives its observe, prune and watches.
            for kind in kinds::OWNED_KINDS {
                let ar = meshfed_operator::member::kinds::api_resource(kind);
                for o in Api::<DynamicObject>::all_with(client.clone(), &ar).list(&owned).await?.items {
                    let data = o.data.get("data").and_then(|d| d.as_object());
                    match data {
                        Some(data) if kind.kind == "Secret" => {
                            let keys: Vec<&String> = data.keys().collect();
                            objects.push(format!("Secret {} keys {keys:?}", describe(&o)));
                        }
                        _ => objects.push(format!("{} {}", kind.kind, describe(&o))),
                    }
                    let root = data.and_then(|d| d.get("root-cert.pem")).and_then(|p| p.as_str());
                    if let Some(pem) = root {
                        let pem = base64::engine::general_purpose::STANDARD.decode(pem)?;
                        let trusted = root_pem.as_ref() == Some(&pem);
                        objects.push(format!("Secret {} trusts exactly the hub's root: {trusted}", o.name_any()));
                    }
                }
            }
            state.extend(objects.into_iter().map(|o| format!("{m}: {o}")));
        }
        Ok(state)
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

/// The load balancer address the played cloud gives the `i`th member's LoadBalancer Services.
pub fn load_balancer_ip(i: usize) -> String {
    format!("203.0.113.{}", 10 + i)
}

/// The federation the examples in `deploy/` declare.
pub fn prod() -> federation::FederationRef {
    federation::FederationRef { namespace: NAMESPACE.into(), name: "prod".into() }
}

/// The Istio namespace of the examples.
pub const ISTIO_NAMESPACE: &str = "istio-system";

/// Joins `cluster` to federation `fed` as `meshfed join` does: the member's ServiceAccount for the hub with exactly
/// the member permissions (`meshfed_core::access`), and the hub's Secret `<cluster>-kubeconfig` with its token. The
/// suites reach members with it, never as an admin, so a permission meshfed lacks there fails them.
pub async fn join_member(
    hub: &Client,
    cluster: &meshfed_testenv::Cluster,
    fed: &federation::FederationRef,
    istio_namespace: &str,
) -> Result<()> {
    join_member_for(hub, cluster, fed, istio_namespace, JOIN_TTL).await
}

/// The lifetime of the hub's tokens the fixture's joins ask for: join's default, so that tests that advance the
/// controller's clock by a day or two do not renew them.
const JOIN_TTL: Duration = Duration::from_secs(720 * 3600);

/// [`join_member`], with a token of the hub's ServiceAccount that lives `token_ttl`.
pub async fn join_member_for(
    hub: &Client,
    cluster: &meshfed_testenv::Cluster,
    fed: &federation::FederationRef,
    istio_namespace: &str,
    token_ttl: Duration,
) -> Result<()> {
    join_named(hub, cluster, cluster.name(), fed, istio_namespace, token_ttl).await
}

/// Joins `cluster` as [`join_member_for`] does, into Secret `<name>-kubeconfig`.
async fn join_named(
    hub: &Client,
    cluster: &meshfed_testenv::Cluster,
    name: &str,
    fed: &federation::FederationRef,
    istio_namespace: &str,
    token_ttl: Duration,
) -> Result<()> {
    let kubeconfig = kube::config::Kubeconfig::from_yaml(cluster.kubeconfig())?;
    let (server, ca_pem) = join::endpoint(&kubeconfig, None)?;
    let request = join::Join {
        federation: fed.clone(),
        cluster: name.into(),
        istio_namespace: istio_namespace.into(),
        server,
        ca_pem,
        token_ttl,
    };
    join::join(hub, NAMESPACE, &cluster.client().await?, &request, jiff::Timestamp::now()).await?;
    Ok(())
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

/// `namespace/name {labels}` of an object.
fn describe(o: &impl kube::Resource) -> String {
    let labels: BTreeMap<&String, &String> = o.labels().iter().collect();
    format!("{}/{} {labels:?}", o.namespace().unwrap_or_default(), o.name_any())
}

/// The plain manifests rendered from the chart: `deploy/meshfed.yaml`.
pub fn manifests() -> String {
    let path = format!("{}/../deploy/meshfed.yaml", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Applies, server-side with strict field validation (an unknown or misspelt field fails), the objects of a
/// multi-document YAML whose kind `keep` accepts, in order; returns their kinds and names.
pub async fn apply_manifests(client: &Client, yaml: &str, keep: impl Fn(&str) -> bool) -> Result<Vec<String>> {
    let pp =
        PatchParams { field_validation: Some(kube::api::ValidationDirective::Strict), ..PatchParams::apply("e2e") };
    let mut applied = Vec::new();
    for value in serde_saphyr::from_multiple::<serde_json::Value>(yaml)? {
        if value.is_null() {
            continue; // a document of comments only
        }
        let obj: kube::api::DynamicObject = serde_json::from_value(value)?;
        let types = obj.types.as_ref().context("every manifest has apiVersion and kind")?;
        if !keep(&types.kind) {
            continue;
        }
        let gvk = kube::api::GroupVersionKind::try_from(types)?;
        let (resource, caps) = kube::discovery::pinned_kind(client, &gvk).await?;
        let api: Api<kube::api::DynamicObject> = match (caps.scope, obj.metadata.namespace.as_deref()) {
            (kube::discovery::Scope::Namespaced, Some(ns)) => Api::namespaced_with(client.clone(), ns, &resource),
            (kube::discovery::Scope::Namespaced, None) => {
                bail!("{} {:?} has no namespace", gvk.kind, obj.metadata.name)
            }
            _ => Api::all_with(client.clone(), &resource),
        };
        let name = obj.metadata.name.clone().context("every manifest has a name")?;
        api.patch(&name, &pp, &Patch::Apply(&obj)).await.with_context(|| format!("applying {} {name}", gvk.kind))?;
        applied.push(format!("{}/{name}", gvk.kind));
    }
    Ok(applied)
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
/// The status kstatus (`sigs.k8s.io/cli-utils/pkg/kstatus`, what Flux, kpt and `kubectl wait` use) computes for a
/// custom resource, by its documented generic rules: `Terminating` while deleted; `InProgress` while the status
/// describes an older generation or `Reconciling` is True; `Failed` while `Stalled` is True; else `Current`.
pub fn kstatus(fed: &MeshFederation) -> &'static str {
    let is_true = |t: &str| fed_condition(fed, t).is_some_and(|c| c.status == "True");
    let observed = fed.status.as_ref().and_then(|s| s.observed_generation);
    if fed.metadata.deletion_timestamp.is_some() {
        "Terminating"
    } else if observed.is_some_and(|o| Some(o) < fed.metadata.generation)
        || observed.is_none()
        || is_true("Reconciling")
    {
        "InProgress"
    } else if is_true("Stalled") {
        "Failed"
    } else {
        "Current"
    }
}

pub fn is_ready(fed: &MeshFederation) -> bool {
    let current = fed.status.as_ref().and_then(|s| s.observed_generation) == fed.metadata.generation;
    current && fed_condition(fed, "Ready").is_some_and(|c| c.status == "True")
}

/// The example federation of a topology, from `deploy/examples/`.
pub fn example(name: &str) -> String {
    let path = format!("{}/../deploy/examples/{name}.yaml", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// How often the fixture's waits look again.
const POLL: Duration = Duration::from_millis(200);

/// Waits until `ok` holds, checking every `every`, for at most `timeout`.
pub async fn until(what: &str, timeout: Duration, every: Duration, ok: impl AsyncFn() -> bool) -> Result<()> {
    let reached = sample_until(Instant::now(), timeout, every, async |_, _| Ok(ok().await)).await;
    reached.map(drop).map_err(|e| anyhow::anyhow!("waiting for {what}: {e}"))
}

/// The one sampler of the suites: calls `sample` every `every` (each call `every` after the previous one began, or
/// at once when it took longer) with the sample's number and the time since `started`, until it returns `true`.
/// `sample` asserts what must hold at every sample (a claim "at every sample" is checked there), and says when the
/// change it watches is through. Returns the number of samples; an error once `bound` has passed since `started`.
pub async fn sample_until(
    started: Instant,
    bound: Duration,
    every: Duration,
    mut sample: impl AsyncFnMut(u32, Duration) -> Result<bool>,
) -> Result<u32> {
    let mut n = 0;
    loop {
        n += 1;
        let sampled = Instant::now();
        if sample(n, started.elapsed()).await? {
            return Ok(n);
        }
        if started.elapsed() > bound {
            bail!("not through after {bound:?} ({n} samples)");
        }
        tokio::time::sleep(every.saturating_sub(sampled.elapsed())).await;
    }
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
