//! The hub controller: for every `MeshFederation`, observe -> plan -> apply -> prune -> report.
//!
//! The plan lives in `meshfed-core`; this module only reads, writes and waits. Every member is handled concurrently
//! with its own deadline, so one slow or dead member never delays the others.

use meshfed_core::conditions::Reason;
use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{StreamExt, future::join_all};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Namespace, ObjectReference, Secret, Service},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ListParams, Patch, PatchParams},
    runtime::{
        Controller, Predicate, WatchStreamExt,
        controller::Action,
        events::{Event as KubeEvent, EventType, Recorder, Reporter},
        finalizer::{Event, finalizer},
        predicates, reflector, watcher,
    },
};
use meshfed_api::{ExposeMode, MeshFederation, MeshFederationSpec, SecretKeyRef, TrustStatus};
use meshfed_core::{
    gateway::{self, GatewayAddress},
    member::{self, MemberFacts, MemberPlan, ObjectKey},
    pki::{self, CertSummary, Root},
    plan::{self, FIELD_MANAGER, Failure, FederationRef, MemberReport, RELEASE_ANNOTATION},
    remote,
    trust::CacertsPlan,
    validate::{Durations, validate},
};
use serde_json::json;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    Error,
    apply::{self, Reached, Writer},
    members::{Backoff, ClientPool, member_id},
    metrics::{FailureLabels, Metrics},
    remote_access, trust,
    watches::MemberWatches,
};

/// The finalizer that holds a federation until its members are cleaned up.
pub const FINALIZER: &str = "meshfed.io/cleanup";

/// The controller's clock: the system time, moved by an offset that tests advance to see renewals without waiting.
#[derive(Debug, Clone, Default)]
pub struct Clock(Arc<AtomicI64>);

impl Clock {
    pub fn now(&self) -> Timestamp {
        Timestamp::now() + SignedDuration::from_secs(self.0.load(Ordering::Relaxed))
    }

    /// Moves the clock forward (for tests).
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_secs() as i64, Ordering::Relaxed);
    }
}

/// Settings of the controller.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long one member may take to answer within a reconcile before it is reported unreachable.
    pub member_timeout: Duration,
    /// How soon a federation that is not ready is looked at again.
    pub retry_after: Duration,
    /// The longest a failing member is left alone before it is tried again (the wait starts at `retry_after` and
    /// doubles with every failure in a row).
    pub member_backoff_max: Duration,
    /// How often a ready federation is checked against its members.
    pub resync_after: Duration,
    /// The time.
    pub clock: Clock,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            member_timeout: Duration::from_secs(10),
            retry_after: Duration::from_secs(5),
            member_backoff_max: Duration::from_secs(60),
            resync_after: Duration::from_secs(300),
            clock: Clock::default(),
        }
    }
}

struct Context {
    hub: Client,
    /// The hub's identity (its `kube-system` namespace's UID), written on every claim.
    hub_id: String,
    recorder: Recorder,
    pool: ClientPool,
    backoff: Backoff,
    watches: MemberWatches,
    settings: Settings,
    metrics: Metrics,
}

/// Runs the controller until the future is dropped. Fails at once, with an install hint, when the CRD is missing.
pub async fn run(hub: Client, settings: Settings, metrics: Metrics) -> anyhow::Result<()> {
    let feds: Api<MeshFederation> = Api::all(hub.clone());
    if let Err(e) = feds.list(&ListParams::default().limit(1)).await {
        anyhow::bail!(
            "cannot list MeshFederations in the hub ({e}); is the CRD installed? `meshfed crd | kubectl apply --server-side -f -`"
        );
    }
    let hub_id = Api::<Namespace>::all(hub.clone())
        .get("kube-system")
        .await
        .map_err(|e| {
            anyhow::anyhow!("cannot read namespace kube-system in the hub (meshfed's identity on claims): {e}")
        })?
        .metadata
        .uid
        .unwrap_or_default();
    metrics.set_ready();
    let (watches, triggers) = MemberWatches::new(metrics.member_watches.clone(), metrics.kind_watches.clone());
    let triggers = futures::stream::unfold(triggers, |mut rx| async { rx.recv().await.map(|t| (t, rx)) });
    let recorder = Recorder::new(hub.clone(), Reporter { controller: "meshfed".into(), instance: None });
    let ctx = Arc::new(Context {
        hub,
        hub_id,
        recorder,
        pool: ClientPool::default(),
        backoff: Backoff::default(),
        watches,
        settings,
        metrics,
    });
    info!("meshfed controller started");
    // What asks a federation to be reconciled: its spec (generation), annotations (a release, a rotation request, a
    // manual nudge), finalizers and deletion; not its status, which meshfed itself writes at the end of a reconcile.
    let (store, writer) = reflector::store();
    let asks = predicates::generation.combine(predicates::annotations).combine(predicates::finalizers);
    let federations = watcher(feds, watcher::Config::default().any_semantic())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(asks, Default::default());
    Controller::for_stream(federations, store)
        .reconcile_on(triggers)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                match e {
                    kube::runtime::controller::Error::ReconcilerFailed(e, obj) => {
                        let federation = format!("{}/{}", obj.namespace.unwrap_or_default(), obj.name);
                        warn!(%federation, error = %e, "reconcile failed")
                    }
                    e => warn!(error = %e, "controller error"),
                }
            }
        })
        .await;
    Ok(())
}

fn error_policy(_fed: Arc<MeshFederation>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failures.get_or_create(&FailureLabels { category: error.metric_label().into() }).inc();
    Action::requeue(ctx.settings.retry_after)
}

/// Every log line of a reconcile carries the federation (`namespace/name`) from this span; lines about one member
/// also name its cluster. The span is made when kube-runtime calls this, inside its own span that says why the
/// reconcile runs (`object.reason`), so every line carries that too.
fn reconcile(fed: Arc<MeshFederation>, ctx: Arc<Context>) -> impl Future<Output = Result<Action, Error>> {
    let span = info_span!("reconcile", federation = %federation_ref(&fed));
    async move {
        let _timer = ctx.metrics.time_reconcile();
        let timeline = Timeline::start();
        let ns = fed.namespace().ok_or(Error::NotNamespaced)?;
        let api: Api<MeshFederation> = Api::namespaced(ctx.hub.clone(), &ns);
        finalizer(&api, FINALIZER, fed, |event| async {
            match event {
                Event::Apply(fed) => converge(&fed, &ctx, timeline).await,
                Event::Cleanup(fed) => cleanup(&fed, &ctx).await,
            }
        })
        .await
        .map_err(|e| Error::Finalizer(Box::new(e)))
    }
    .instrument(span)
}

/// Where the time of one reconcile went, step by step; logged when it ends (target `meshfed::timeline`, level
/// info), for the benchmark and for anyone asking where a convergence spends its time.
struct Timeline {
    last: Instant,
    steps: Vec<(&'static str, Duration)>,
}

impl Timeline {
    fn start() -> Self {
        Self { last: Instant::now(), steps: Vec::new() }
    }

    /// Ends step `name`, which began where the previous one ended.
    fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        self.steps.push((name, now - self.last));
        self.last = now;
    }

    /// Logs the steps and the reason of the `Ready` condition they ended with.
    fn log(&self, ready: &str) {
        let total: Duration = self.steps.iter().map(|(_, d)| *d).sum();
        let steps: Vec<String> =
            self.steps.iter().map(|(n, d)| format!("{n}={:.1}ms", d.as_secs_f64() * 1e3)).collect();
        info!(target: "meshfed::timeline", total_ms = total.as_secs_f64() * 1e3, steps = %steps.join(" "), ready, "reconciled");
    }
}

fn federation_ref(fed: &MeshFederation) -> FederationRef {
    FederationRef { namespace: fed.namespace().unwrap_or_default(), name: fed.name_any() }
}

/// Makes every member hold what the spec asks, cleans up members that left it, and reports.
///
/// Per member, concurrently: reach it, take its claim, observe what it holds. Then, federation-wide: the trust plan
/// and the intermediates it asks for. Then every member's plan is applied in two waves, because a remote secret
/// needs a token and a token needs its reader ServiceAccount in place: first everything but the remote secrets,
/// then, with a token for every member read, the complete plan, followed by the prune.
async fn converge(fed: &MeshFederation, ctx: &Context, mut timeline: Timeline) -> Result<Action, Error> {
    timeline.mark("finalizer");
    let fref = federation_ref(fed);
    let spec = &fed.spec;
    let previous = fed.status.as_ref();
    let mut validation = validate(spec);
    let mut root_status = None;
    let mut overlapping = None;
    let mut wake_at = None;
    let mut trust_said = Vec::new();
    let reports = match &validation {
        Err(problems) => {
            info!(problems = problems.len(), "federation is invalid; nothing is written to members");
            Vec::new()
        }
        Ok(valid) => {
            let now = ctx.settings.clock.now();
            let leaving = plan::leaving_members(spec, previous);
            let staying =
                spec.clusters.iter().map(|c| observe_member(ctx, &fref, spec, &c.name, &c.kubeconfig_secret_ref, true));
            let (root, staying, leaving) = futures::join!(
                trust::root(&ctx.hub, &fref, fed, &valid.durations, now),
                join_all(staying),
                join_all(leaving.into_iter().map(|(name, secret)| cleanup_member(ctx, fed, name, secret))),
            );
            timeline.mark("observe");
            let (mut reports, reached): (Vec<MemberReport>, Vec<Option<Reached>>) = staying.into_iter().unzip();
            let mut reached = refuse_duplicates(&mut reports, reached);
            let ranges = reached.iter().map(|(name, r)| (name.clone(), r.ranges.clone())).collect();
            let overlaps = meshfed_core::validate::observed_overlaps(spec, &ranges);
            if !overlaps.is_empty() {
                info!("the ranges of members on one network overlap; nothing more is written to members");
                overlapping = Some(overlaps);
                reached.clear();
            }
            let root = match root {
                Ok(Some(root)) => Ok(root),
                // No root yet: made now, unless members hold intermediates of one that is gone.
                Ok(None) => {
                    let key = member::cacerts_key(&spec.istio.namespace);
                    // From a root the user brought to a generated one, the members move by a rotation.
                    let brought = meshfed_core::trust::root_was_brought(previous.and_then(|p| p.trust.as_ref()));
                    let held_by: Vec<String> = reached
                        .iter()
                        .filter(|(name, r)| r.held.get(&key).is_some_and(|s| member::labelled_for(s, &fref, name)))
                        .filter(|_| !brought)
                        .map(|(name, _)| name.clone())
                        .collect();
                    trust::mint(&ctx.hub, &fref, fed, &valid.durations, now, &held_by).await
                }
                Err(f) => Err(f),
            };
            let cacerts = match &root {
                Ok(root) => {
                    let kept = trust::kept_roots(&ctx.hub, &fref, fed, root, now).await;
                    let previous = previous.and_then(|p| p.trust.as_ref());
                    let roots = (root, kept.as_slice());
                    let (status, cacerts, wake, said) =
                        plan_cacerts(spec, roots, &valid.durations, previous, &reached, now);
                    root_status = Some(Ok(status));
                    wake_at = wake;
                    trust_said = said;
                    cacerts
                }
                Err(f) => {
                    warn!(reason = %f.reason, "{}", f.message);
                    root_status = Some(Err(f.clone()));
                    BTreeMap::new()
                }
            };
            for r in &mut reports {
                r.intermediate = cacerts.get(&r.name).map(|c| c.as_ref().map(|(_, s)| s.clone()).map_err(Clone::clone));
            }
            timeline.mark("trust");
            let gateways = gateway_states(spec, &reached);
            let first = apply_wave(ctx, &fref, spec, &mut reached, &cacerts, &gateways, None).await;
            timeline.mark("first_wave");
            let (base, max) = (ctx.settings.retry_after, ctx.settings.member_backoff_max);
            for name in record_failures(&mut reports, first) {
                // No token step and no second wave for it: its failure goes into the backoff now.
                let (r, gone) = (reports.iter().find(|r| r.name == name), reached.remove(&name));
                if let (Some(r), Some(gone)) = (r, gone) {
                    ctx.backoff.record(&fref.to_string(), &gone.member, r, base, max);
                }
            }
            let (ttl, timeout) = (valid.durations.token_ttl, ctx.settings.member_timeout);
            let tokens = remote_access::tokens(&ctx.metrics, spec, &reached, ttl, now, timeout).await;
            timeline.mark("tokens");
            // The first wave may have made or replaced a gateway Service: its address as it is now.
            let gateways = gateway_states(spec, &reached);
            let second = apply_wave(ctx, &fref, spec, &mut reached, &cacerts, &gateways, Some(&tokens)).await;
            timeline.mark("second_wave");
            record_failures(&mut reports, second);
            for r in &mut reports {
                match tokens.get(&r.name) {
                    Some(Ok(t)) => (r.token_expires_at, r.token_refresh_at) = (Some(t.expires_at), Some(t.refresh_at)),
                    Some(Err(f)) => r.remote_access = Some(f.clone()),
                    None => {}
                }
                if let Some(m) = reached.get(&r.name) {
                    ctx.backoff.record(&fref.to_string(), &m.member, r, base, max);
                }
            }
            reports.extend(leaving);
            reports
        }
    };
    // Refused on what the members show: tried again, since the members, not the spec, may change.
    let refused_by_members = overlapping.is_some();
    if let Some(overlaps) = overlapping {
        validation = Err(overlaps);
    }
    let status = plan::federation_status(
        previous,
        fed.meta().generation,
        spec,
        &validation,
        root_status.as_ref(),
        &reports,
        ctx.settings.clock.now(),
    );
    let key = fref.to_string();
    ctx.metrics.members_failed(reports.iter().flat_map(|r| r.failure.iter().chain(&r.remote_access)));
    ctx.metrics.observe_status(&key, &status);
    let in_use =
        status.clusters.iter().filter_map(|c| Some(member_id(&fref.namespace, c.kubeconfig_secret_ref.as_ref()?)));
    ctx.watches.used_by(&key, in_use.collect());
    timeline.mark("plan_status");
    let said = report(fed, ctx, &status, [released_announcements(fed, &reports), trust_said].concat()).await?;
    timeline.mark("status");
    publish(ctx, fed, said);
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready");
    timeline.log(ready.map_or("", |c| &c.reason));
    let ready = ready.is_some_and(|c| c.status == "True");
    Ok(match (&validation, ready) {
        (Err(_), _) if refused_by_members => Action::requeue(ctx.settings.retry_after),
        // An invalid spec waits for its next edit: retrying cannot fix it.
        (Err(_), _) => Action::await_change(),
        (Ok(v), true) => {
            let now = ctx.settings.clock.now();
            Action::requeue(plan::next_deadline(&reports, v.durations.renew_before, now, ctx.settings.resync_after))
        }
        // A rotation that waits for workload certificates to expire is looked at when they have.
        (Ok(_), false) if let Some(at) = wake_at => {
            let left = at.duration_since(ctx.settings.clock.now()).unsigned_abs();
            Action::requeue(left.clamp(ctx.settings.retry_after, ctx.settings.resync_after))
        }
        (Ok(_), false) => Action::requeue(ctx.settings.retry_after),
    })
}

/// The members that answered, by name, less the same cluster listed twice under two Secrets (one `kube-system`
/// UID): the later one in the spec is refused and not written.
fn refuse_duplicates(reports: &mut [MemberReport], reached: Vec<Option<Reached>>) -> BTreeMap<String, Reached> {
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for (r, m) in reports.iter_mut().zip(reached) {
        let (Some(m), Some(identity)) = (m, r.identity.clone()) else { continue };
        match seen.get(&identity) {
            Some(first) => {
                r.failure = Some(Failure::new(
                    Reason::DuplicateCluster,
                    format!(
                        "this is the same cluster as {first} (kube-system namespace UID {identity}); remove one of the two"
                    ),
                ))
            }
            None => {
                seen.insert(identity, r.name.clone());
                out.insert(r.name.clone(), m);
            }
        }
    }
    out
}

/// The gateway of every reached member that needs one: where other members dial it, from the gateway Service and
/// the nodes it observed, or why it cannot be dialled yet.
fn gateway_states(
    spec: &MeshFederationSpec,
    reached: &BTreeMap<String, Reached>,
) -> BTreeMap<String, Result<GatewayAddress, Failure>> {
    let key = ObjectKey {
        kind: member::SERVICE,
        namespace: Some(spec.istio.namespace.clone()),
        name: gateway::GATEWAY_NAME.into(),
    };
    spec.clusters
        .iter()
        .filter(|c| gateway::needs_gateway(spec, c))
        .filter_map(|c| {
            let r = reached.get(&c.name)?;
            let service = apply::typed::<Service>(&r.held, &key);
            Some((c.name.clone(), gateway::gateway_address(c, service.as_ref(), &r.nodes)))
        })
        .collect()
}

/// Each member's `cacerts` data and intermediate (or why it has none), as the trust plan asks: kept, with new trusted
/// roots, or issued afresh; the trust status; when a rotation that waits for time wants to be looked at again; and
/// what to say of roots removed from members. `roots`: the federation's root, and the others the hub keeps.
fn plan_cacerts(
    spec: &MeshFederationSpec,
    (root, kept): (&Root, &[Root]),
    durations: &Durations,
    previous: Option<&TrustStatus>,
    reached: &BTreeMap<String, Reached>,
    now: Timestamp,
) -> (TrustStatus, PlannedCacerts, Option<Timestamp>, Vec<plan::Announcement>) {
    let (key, published) =
        (member::cacerts_key(&spec.istio.namespace), member::published_roots_key(&spec.istio.namespace));
    let observed: BTreeMap<String, (Option<Secret>, Option<ConfigMap>)> = reached
        .iter()
        .map(|(name, r)| (name.clone(), (apply::typed(&r.held, &key), apply::typed(&r.held, &published))))
        .collect();
    let data = observed
        .iter()
        .map(|(n, (s, cm))| {
            let cacerts = s.as_ref().and_then(|s| s.data.as_ref());
            let published =
                cm.as_ref().map(|cm| cm.data.as_ref().and_then(|d| d.get(pki::ROOT_CERT)).map_or("", |p| p.as_str()));
            (n.clone(), meshfed_core::trust::Observed { cacerts, published })
        })
        .collect();
    let planned = meshfed_core::trust::plan_trust(spec, root, kept, durations, previous, &data, now);
    let cacerts = planned
        .cacerts
        .into_iter()
        .map(|(name, step)| {
            let cluster = spec.clusters.iter().find(|c| c.name == name).expect("planned for a member of the spec");
            let held = step.and_then(|step| match step {
                CacertsPlan::Hold { data, summary, why } => {
                    if let Some(why) = why {
                        info!(cluster = %name, "cacerts: {why}");
                    }
                    Ok((data, summary))
                }
                CacertsPlan::Issue { why, other_roots, signer } => {
                    info!(cluster = %name, "cacerts: {why}");
                    let data = trust::issue(signer, spec, cluster, durations, now, &other_roots)?;
                    let summary =
                        pki::summarize(&data[pki::CA_CERT].0).map_err(|e| Failure::new(e.reason(), e.to_string()))?;
                    Ok((data, summary))
                }
            });
            (name, held)
        })
        .collect();
    (planned.status, cacerts, planned.wake_at, planned.announcements)
}

type CacertsData = BTreeMap<String, ByteString>;

/// Per member, the `cacerts` data it should hold and its intermediate, or why it has none.
type PlannedCacerts = BTreeMap<String, Result<(CacertsData, CertSummary), Failure>>;

/// Applies every reached member's plan: without remote secrets when `tokens` is `None` (the first wave), else the
/// complete plan followed by the prune. Returns each member's outcome.
async fn apply_wave(
    ctx: &Context,
    fref: &FederationRef,
    spec: &MeshFederationSpec,
    reached: &mut BTreeMap<String, Reached>,
    cacerts: &PlannedCacerts,
    gateways: &BTreeMap<String, Result<GatewayAddress, Failure>>,
    tokens: Option<&BTreeMap<String, Result<remote_access::Token, Failure>>>,
) -> Vec<WaveResult> {
    let placement = remote::remote_secret_placement(spec);
    let work = reached.iter_mut().map(|(name, r)| {
        let cluster = spec.clusters.iter().find(|c| c.name == *name).expect("a member of the spec");
        let remote_secrets = tokens
            .into_iter()
            .flat_map(|tokens| placement.get(name).into_iter().flatten().map(move |t| (t, tokens.get(t))))
            .filter_map(|(t, token)| {
                let token = token?.as_ref().ok()?;
                Some((t.clone(), remote::remote_secret(fref, spec, cluster, &token.target, &token.token)))
            })
            .collect();
        let namespace = apply::typed::<Namespace>(&r.held, &member::namespace_key(&spec.istio.namespace));
        let facts = MemberFacts {
            namespace: namespace.as_ref(),
            cacerts: cacerts.get(name).and_then(|c| c.as_ref().ok()).map(|(data, _)| data.clone()),
            remote_secrets,
            gateways: gateways.clone(),
            unserved: r.unserved.clone(),
            istio: r.held.get(&member::istio_key(&spec.istio.revision)).map(Arc::as_ref),
        };
        let plan = member::member_plan(fref, &ctx.hub_id, spec, cluster, facts);
        async move {
            let w = Writer { cluster: name, metrics: &ctx.metrics, client: &r.member.client, cache: &r.cache };
            let work = async {
                apply::apply_plan(&w, fref, &plan, &mut r.held).await?;
                if tokens.is_some() {
                    apply::prune(&w, fref, &plan, &r.held).await?;
                }
                Ok(())
            };
            let started = Instant::now();
            let result = within(ctx.settings.member_timeout, work).await;
            let ms = started.elapsed().as_secs_f64() * 1e3;
            debug!(target: "meshfed::timeline", cluster = %name, wave = if tokens.is_some() { 2 } else { 1 }, ms, "applied");
            WaveResult {
                name: name.clone(),
                result,
                gateway: plan.gateway.clone(),
                control_plane: plan.control_plane.clone(),
            }
        }
    });
    join_all(work).await
}

/// What one wave did with one member, and the state of its gateway and control plane that its plan saw.
struct WaveResult {
    name: String,
    result: Result<(), Failure>,
    gateway: Option<Result<GatewayAddress, Failure>>,
    control_plane: Option<Failure>,
}

/// Puts each wave's outcome into its member's report; returns the members that failed.
fn record_failures(reports: &mut [MemberReport], results: Vec<WaveResult>) -> Vec<String> {
    let mut failed = Vec::new();
    for WaveResult { name, result, gateway, control_plane } in results {
        let Some(r) = reports.iter_mut().find(|r| r.name == name) else { continue };
        r.gateway = gateway;
        r.control_plane = Some(control_plane.map_or(Ok(()), Err));
        if let Err(f) = result {
            warn!(cluster = %name, reason = %f.reason, "{}", f.message);
            r.failure = Some(f);
            failed.push(name);
        }
    }
    failed
}

/// The clusters released by annotation in this reconcile, each with what meshfed left behind there.
fn released_announcements(fed: &MeshFederation, reports: &[MemberReport]) -> Vec<plan::Announcement> {
    let fref = federation_ref(fed);
    reports.iter().filter(|r| r.released).map(|r| plan::released(&fref, &r.name, &r.kubeconfig)).collect()
}

/// Removes what meshfed wrote in every member; keeps the finalizer while any member could not be cleaned.
async fn cleanup(fed: &MeshFederation, ctx: &Context) -> Result<Action, Error> {
    let fref = federation_ref(fed);
    let mut members: Vec<(String, SecretKeyRef)> =
        fed.spec.clusters.iter().map(|c| (c.name.clone(), c.kubeconfig_secret_ref.clone())).collect();
    members.extend(plan::leaving_members(&fed.spec, fed.status.as_ref()));
    let reports = join_all(members.into_iter().map(|(name, secret)| cleanup_member(ctx, fed, name, secret))).await;
    ctx.metrics.members_failed(reports.iter().flat_map(|r| &r.failure));
    let pending: Vec<_> = reports.iter().filter(|r| r.failure.is_some()).cloned().collect();
    if pending.is_empty() {
        publish(ctx, fed, released_announcements(fed, &reports));
        info!("members cleaned up; releasing the finalizer");
        let key = fref.to_string();
        ctx.metrics.forget(&key);
        ctx.watches.used_by(&key, Default::default());
        return Ok(Action::await_change());
    }
    let status = plan::deletion_status(fed.status.as_ref(), fed.meta().generation, &pending, ctx.settings.clock.now());
    ctx.metrics.observe_status(&fref.to_string(), &status);
    let said = report(fed, ctx, &status, released_announcements(fed, &reports)).await?;
    publish(ctx, fed, said);
    Err(Error::CleanupPending(pending.iter().map(|p| p.name.clone()).collect::<Vec<_>>().join(", ")))
}

/// Runs `work` within `timeout`, as a member failure when it takes longer.
async fn within<T>(timeout: Duration, work: impl Future<Output = Result<T, Failure>>) -> Result<T, Failure> {
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| Err(Failure::new(Reason::Timeout, format!("the member did not answer within {timeout:?}"))))
}

/// Reaches member `name` through its kubeconfig `secret` within the member deadline: its version and identity,
/// then (when `take_claim`) its claim, and what it holds of the federation. Failures land in the report.
async fn observe_member(
    ctx: &Context,
    fref: &FederationRef,
    spec: &MeshFederationSpec,
    name: &str,
    secret: &SecretKeyRef,
    take_claim: bool,
) -> (MemberReport, Option<Reached>) {
    let mut report = MemberReport::new(name, secret, !take_claim);
    let timeout = ctx.settings.member_timeout;
    let started = Instant::now();
    let member = match ctx.pool.member(&ctx.hub, &fref.namespace, secret, timeout).await {
        Ok(m) => m,
        Err(f) => {
            report.failure = Some(f);
            return (report, None);
        }
    };
    let key = fref.to_string();
    let cache = ctx.watches.ensure(&key, &member.id, &member.version, &member.client);
    if let Some((last, reached)) = ctx.backoff.waiting(&key, &member) {
        (report.failure, report.version) = (Some(last), reached);
        return (report, None);
    }
    // One round trip for everything that does not depend on the rest: the probe, the identity, what the member
    // holds, and the nodes and ranges the topology needs; then the claim, which depends on what is held.
    let client_ms = started.elapsed().as_secs_f64() * 1e3;
    let run = async {
        let asked = Instant::now();
        let probe = async {
            let version = member
                .probe()
                .await
                .map_err(|e| Failure::new(Reason::Unreachable, format!("{}: {e}", member.server)))?;
            ctx.metrics.member_answered(&key, name, asked.elapsed());
            Ok(version)
        };
        let identity = async {
            Api::<Namespace>::all(member.client.clone())
                .get("kube-system")
                .await
                .map_err(|e| apply::read_failure("reading namespace kube-system (the cluster's identity)", e))
        };
        let ns = &spec.istio.namespace;
        let by_name = [
            member::claim_key(ns),
            member::namespace_key(ns),
            member::cacerts_key(ns),
            member::published_roots_key(ns),
            // Cluster-wide by its revision: another federation's is seen as such, never taken over.
            member::istio_key(&spec.istio.revision),
        ];
        // A gateway exposed on its nodes is dialled at their addresses.
        let cluster = spec.clusters.iter().find(|c| c.name == name);
        let gw = cluster.filter(|c| take_claim && gateway::needs_gateway(spec, c)).map(|c| &c.east_west_gateway);
        let nodes = async {
            match gw {
                Some(gw)
                    if gw.address.is_none() && matches!(gw.expose, ExposeMode::NodePort | ExposeMode::HostNetwork) =>
                {
                    apply::nodes(&member.client, gw.node_selector.as_ref()).await
                }
                _ => Ok(Vec::new()),
            }
        };
        // Clusters that share a network route pods directly: their ranges must not overlap.
        let shares_network =
            cluster.is_some_and(|c| spec.clusters.iter().any(|o| o.name != c.name && o.network == c.network));
        let ranges =
            async { if take_claim && shares_network { apply::ranges(&member.client).await } else { Vec::new() } };
        let (version, identity, observed, nodes, ranges) = futures::join!(
            probe,
            identity,
            apply::observe(&member.client, &cache, &ctx.metrics, fref, name, &by_name),
            nodes,
            ranges
        );
        // The probe's failure says best what is wrong with a member that does not answer.
        report.version = Some(version?.git_version);
        report.identity = identity?.metadata.uid;
        let ((mut held, unserved), nodes) = (observed?, nodes?);
        let reads_ms = asked.elapsed().as_secs_f64() * 1e3;
        let observed_ns = held.get(&member::namespace_key(ns));
        if take_claim && observed_ns.is_some_and(|n| !n["metadata"]["deletionTimestamp"].is_null()) {
            return Err(Failure::new(
                Reason::NamespaceTerminating,
                format!("namespace {ns} is being deleted; waiting for it to go"),
            ));
        }
        if take_claim {
            let w = Writer { cluster: name, metrics: &ctx.metrics, client: &member.client, cache: &cache };
            apply::claim(&w, fref, &ctx.hub_id, spec, &mut held).await?;
        }
        let claim_ms = asked.elapsed().as_secs_f64() * 1e3 - reads_ms;
        debug!(target: "meshfed::timeline", cluster = %name, client_ms, reads_ms, claim_ms, "observed");
        Ok((held, unserved, nodes, ranges))
    };
    match within(timeout, run).await {
        Ok((held, unserved, nodes, ranges)) => (report, Some(Reached { member, cache, held, unserved, nodes, ranges })),
        Err(f) => {
            warn!(cluster = %name, reason = %f.reason, "{}", f.message);
            report.failure = Some(f);
            ctx.backoff.record(&key, &member, &report, ctx.settings.retry_after, ctx.settings.member_backoff_max);
            (report, None)
        }
    }
}

/// Removes what meshfed wrote for the federation in member `name`: the prune of an empty plan. A member that was
/// never reached holds nothing of the federation, and one named in [`RELEASE_ANNOTATION`] is let go as it is: neither
/// holds the cleanup up.
async fn cleanup_member(ctx: &Context, fed: &MeshFederation, name: String, secret: SecretKeyRef) -> MemberReport {
    let fref = federation_ref(fed);
    let (mut report, reached) = observe_member(ctx, &fref, &fed.spec, &name, &secret, false).await;
    if let Some(Reached { member, cache, held, .. }) = reached {
        let w = Writer { cluster: &name, metrics: &ctx.metrics, client: &member.client, cache: &cache };
        match within(ctx.settings.member_timeout, apply::prune(&w, &fref, &MemberPlan::default(), &held)).await {
            Ok(()) => info!(cluster = %name, "member cleaned up"),
            Err(f) => report.failure = Some(f),
        }
        let (base, max) = (ctx.settings.retry_after, ctx.settings.member_backoff_max);
        ctx.backoff.record(&fref.to_string(), &member, &report, base, max);
    }
    if report.failure.is_some() {
        let previous = fed.status.as_ref().and_then(|s| s.clusters.iter().find(|c| c.name == name));
        // The status may not show yet that the last reconcile reached it: a report from the backoff says so too.
        let never_reached = report.version.is_none() && previous.is_none_or(|c| c.last_seen.is_none());
        if never_reached {
            info!(cluster = %name, "never reached: it holds nothing of the federation");
            report.failure = None;
        } else if plan::release_requested(fed.annotations().get(RELEASE_ANNOTATION), &name) {
            warn!(cluster = %name, "released by annotation without cleanup");
            report.failure = None;
            report.released = true;
        }
    }
    report
}
/// Patches the status when it differs from what the federation already shows; returns what is to be said about
/// the change as Events, after `extra`.
async fn report(
    fed: &MeshFederation,
    ctx: &Context,
    status: &meshfed_api::MeshFederationStatus,
    mut extra: Vec<plan::Announcement>,
) -> Result<Vec<plan::Announcement>, Error> {
    if !plan::status_changed(fed.status.as_ref(), status) {
        return Ok(extra);
    }
    let api: Api<MeshFederation> = Api::namespaced(ctx.hub.clone(), &fed.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": MeshFederation::api_version(&()),
        "kind": MeshFederation::kind(&()),
        "status": status,
    });
    ctx.metrics.status_writes.inc();
    api.patch_status(&fed.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(patch))
        .await
        .map_err(Error::Status)?;
    let mut said = plan::announcements(fed.status.as_ref(), status);
    said.append(&mut extra);
    Ok(said)
}

/// Publishes Events on the federation, concurrently and in the background: a reconcile does not wait for them. One
/// about a cluster relates to its kubeconfig Secret.
fn publish(ctx: &Context, fed: &MeshFederation, said: Vec<plan::Announcement>) {
    if said.is_empty() {
        return;
    }
    let events: Vec<KubeEvent> = said
        .into_iter()
        .map(|said| KubeEvent {
            type_: if said.warning { EventType::Warning } else { EventType::Normal },
            reason: said.reason,
            note: Some(plan::event_note(said.note)),
            action: "Reconcile".into(),
            secondary: said.kubeconfig.map(|secret| ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Secret".into()),
                namespace: fed.namespace(),
                name: Some(secret.name),
                ..Default::default()
            }),
        })
        .collect();
    let (recorder, regarding) = (ctx.recorder.clone(), fed.object_ref(&()));
    let published = async move {
        join_all(events.iter().map(|event| async {
            // An Event that cannot be written is not worth failing a reconcile over.
            if let Err(e) = recorder.publish(event, &regarding).await {
                warn!(error = %e, "cannot publish an Event");
            }
        }))
        .await;
    };
    tokio::spawn(published.in_current_span());
}
