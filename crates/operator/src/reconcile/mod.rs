//! The hub controller: for every `MeshFederation`, observe -> plan -> apply -> report.
//!
//! Every decision is taken by the federation plan in `meshfed_core::plan`; the stages here only read, write and
//! wait: [`observe`] reaches each member, [`apply`] writes each member's plan in two waves, [`cleanup`] removes
//! what members that leave hold, [`report`] writes the status and Events. Every member is handled concurrently with
//! its own deadline, so one slow or dead member never delays the others.

mod apply;
mod cleanup;
mod observe;
mod report;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{StreamExt, future::join_all};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client, Resource, ResourceExt,
    api::ListParams,
    runtime::{
        Controller, Predicate, WatchStreamExt,
        controller::Action,
        events::{Recorder, Reporter},
        finalizer::{Event, finalizer},
        predicates, reflector, watcher,
    },
};
use meshfed_api::MeshFederation;
use meshfed_core::{
    conditions::Reason,
    federation::{Failure, FederationRef},
    plan::{self, Timing, Verdict},
    status,
    validate::{observed_overlaps, validate},
};
use tracing::{Instrument, info, info_span, warn};

use crate::{
    Error,
    member::{
        Reached,
        client::{Backoff, ClientPool, member_id},
        watches::{self, MemberWatches},
    },
    metrics::{FailureLabels, Metrics},
    trust,
};
use observe::observe_member;

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

impl Context {
    /// Records that `federation` now uses exactly `members` (by id; none once it is gone) with its Istio namespace:
    /// what is kept for members no
    /// federation uses (their watches, clients) and for members this one no longer uses (their backoff) is released.
    fn members_used(&self, federation: &str, members: BTreeSet<String>, istio_namespace: &str) {
        self.backoff.retain(federation, &members);
        let watched = members.iter().map(|m| watches::watched(m, istio_namespace)).collect();
        let used = self.watches.used_by(federation, watched);
        self.pool.retain(&used);
    }
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
                Event::Cleanup(fed) => cleanup::cleanup(&fed, &ctx).await,
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
/// Observe every member (taking its claim) and the root; plan trust, gateways and every member's plan; apply them in
/// two waves, because a remote secret needs a token and a token needs its reader ServiceAccount in place: first
/// everything but the remote secrets, then, with a token for every member read, the complete plan and the prune.
async fn converge(fed: &MeshFederation, ctx: &Context, mut timeline: Timeline) -> Result<Action, Error> {
    timeline.mark("finalizer");
    let (fref, spec, previous) = (federation_ref(fed), &fed.spec, fed.status.as_ref());
    let now = ctx.settings.clock.now();
    let valid = match validate(spec) {
        Ok(valid) => valid,
        Err(problems) => {
            info!(problems = problems.len(), "federation is invalid; nothing is written to members");
            let status =
                status::federation_status(previous, fed.meta().generation, spec, &Err(problems), None, &[], now);
            return finish(fed, ctx, timeline, status, Verdict::Invalid, None, &[], Vec::new()).await;
        }
    };
    let staying = spec.clusters.iter().map(|c| {
        let known_as = previous.and_then(|p| p.clusters.iter().find(|s| s.name == c.name)?.cluster_uid.as_deref());
        observe_member(ctx, &fref, spec, &c.name, &c.kubeconfig_secret_ref, true, known_as)
    });
    let (root, staying) = futures::join!(trust::root(&ctx.hub, &fref, fed, &valid.durations, now), join_all(staying));
    let (mut reports, reached): (Vec<_>, Vec<_>) = staying.into_iter().unzip();
    // Members that left the spec are cleaned up once the staying ones are known: one may be the same cluster renamed.
    let leaving = plan::leaving_members(spec, previous);
    let leaving = join_all(leaving.into_iter().map(|(name, secret)| cleanup::leave(ctx, fed, name, secret, &reports)));
    let leaving = leaving.await;
    timeline.mark("observe");
    let mut reached: BTreeMap<String, Reached> =
        reports.iter().zip(reached).filter_map(|(r, m)| Some((r.name.clone(), m?))).collect();
    for name in plan::refuse_duplicates(&mut reports) {
        reached.remove(&name);
    }
    // The hub's credential for each member reached: renewed when it falls due.
    let credentials = spec.clusters.iter().filter_map(|c| {
        let r = reached.get(&c.name)?;
        let renewed = crate::credential::renew(
            &ctx.hub,
            &fref.namespace,
            &c.name,
            &c.kubeconfig_secret_ref,
            &r.member,
            now,
            ctx.settings.member_timeout,
        );
        Some(async move { (c.name.clone(), renewed.await) })
    });
    for (name, credential) in join_all(credentials).await {
        if let Some(r) = reports.iter_mut().find(|r| r.name == name) {
            r.credential = Some(credential);
        }
    }
    timeline.mark("credentials");
    let ranges = reached.iter().map(|(name, r)| (name.clone(), r.seen.ranges.clone())).collect();
    let overlaps = observed_overlaps(spec, &ranges);
    if !overlaps.is_empty() {
        info!("the ranges of members on one network overlap; nothing more is written to members");
        reached.clear();
    }
    let seen = |reached: &BTreeMap<String, Reached>| -> BTreeMap<_, _> {
        reached.iter().map(|(n, r)| (n.clone(), r.seen.clone())).collect()
    };
    // What every member showed stays the plan's input through both waves, also for a member whose write failed.
    let mut observed = seen(&reached);
    let root = match root {
        Ok(Some(root)) => Ok(root),
        // No root yet: made now, unless members hold intermediates of one that is gone.
        Ok(None) => {
            let held_by = plan::intermediates_held(spec, &fref, previous, &observed);
            trust::mint(&ctx.hub, &fref, fed, &valid.durations, now, &held_by).await
        }
        Err(f) => Err(f),
    };
    let kept = match &root {
        Ok(root) => trust::kept_roots(&ctx.hub, &fref, fed, root, now).await,
        Err(_) => Vec::new(),
    };
    let (trust_status, cacerts, wake_at, trust_said) = match &root {
        Ok(root) => {
            let planned = plan::trust_plan(spec, (root, &kept), &valid.durations, previous, &observed, now);
            let cacerts = trust::carry_out(spec, &valid.durations, planned.cacerts, now);
            (Ok(planned.status), cacerts, planned.wake_at, planned.announcements)
        }
        Err(f) => {
            warn!(reason = %f.reason, "{}", f.message);
            (Err(f.clone()), BTreeMap::new(), None, Vec::new())
        }
    };
    for r in &mut reports {
        r.intermediate = cacerts.get(&r.name).map(|c| c.as_ref().map(|(_, s)| s.clone()).map_err(Clone::clone));
    }
    timeline.mark("trust");
    let (gateways, held_over) = plan::gateways_and_held_over(spec, &observed, previous);
    let restarts = plan::istiod_restarts(&fref, spec, &observed, &reports, None, previous, now);
    let shared = plan::Wave { tokens: None, gateways: &gateways, restarts: &restarts.markers, held_over: &held_over };
    let first = apply::wave(ctx, &fref, spec, &mut reached, &cacerts, shared).await;
    timeline.mark("first_wave");
    let failed = apply::record(ctx, &fref, &mut reports, &reached, first);
    let token_targets = plan::token_targets(spec, &seen(&reached), &failed);
    let (ttl, timeout) = (valid.durations.token_ttl, ctx.settings.member_timeout);
    let tokens = crate::remote::tokens(&ctx.metrics, spec, &reached, &token_targets, ttl, now, timeout).await;
    timeline.mark("tokens");
    reached.retain(|name, _| !failed.contains(name));
    // The first wave may have made or replaced a gateway Service: its address as it is now.
    observed.extend(seen(&reached));
    let (gateways, held_over) = plan::gateways_and_held_over(spec, &observed, previous);
    let restarts = plan::istiod_restarts(&fref, spec, &observed, &reports, Some(&tokens), previous, now);
    let shared =
        plan::Wave { tokens: Some(&tokens), gateways: &gateways, restarts: &restarts.markers, held_over: &held_over };
    let second = apply::wave(ctx, &fref, spec, &mut reached, &cacerts, shared).await;
    timeline.mark("second_wave");
    apply::record(ctx, &fref, &mut reports, &reached, second);
    let restarted = plan::record_restarts(&restarts, &mut reports, now);
    let wake_at = wake_at.into_iter().chain(restarts.held_back_until).min();
    plan::record_tokens(spec, &mut reports, &tokens, previous, ttl, now);
    reports.extend(leaving);
    let verdict = if overlaps.is_empty() { Verdict::Valid(&valid.durations) } else { Verdict::RefusedByMembers };
    let validation = if overlaps.is_empty() { Ok(valid.clone()) } else { Err(overlaps) };
    let generation = fed.meta().generation;
    let status = status::federation_status(previous, generation, spec, &validation, Some(&trust_status), &reports, now);
    let announcements = [report::released(fed, &reports), trust_said, restarted].concat();
    finish(fed, ctx, timeline, status, verdict, wake_at, &reports, announcements).await
}

/// Reports the status and Events of a reconcile and says when the next one is due.
#[allow(clippy::too_many_arguments)]
async fn finish(
    fed: &MeshFederation,
    ctx: &Context,
    mut timeline: Timeline,
    status: meshfed_api::MeshFederationStatus,
    verdict: Verdict<'_>,
    wake_at: Option<Timestamp>,
    reports: &[status::MemberReport],
    announcements: Vec<status::Announcement>,
) -> Result<Action, Error> {
    let key = federation_ref(fed).to_string();
    ctx.metrics.members_failed(reports.iter().flat_map(|r| r.failure.iter().chain(&r.remote_access)));
    ctx.metrics.observe_status(&key, &status);
    let namespace = fed.namespace().unwrap_or_default();
    let in_use = status.clusters.iter().filter_map(|c| Some(member_id(&namespace, c.kubeconfig_secret_ref.as_ref()?)));
    ctx.members_used(&key, in_use.collect(), &fed.spec.istio.namespace);
    timeline.mark("plan_status");
    let said = report::report(fed, ctx, &status, announcements).await?;
    timeline.mark("status");
    report::publish(ctx, fed, said);
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready");
    timeline.log(ready.map_or("", |c| &c.reason));
    let ready = ready.is_some_and(|c| c.status == "True");
    let timing = Timing { retry_after: ctx.settings.retry_after, resync_after: ctx.settings.resync_after };
    let now = ctx.settings.clock.now();
    Ok(plan::requeue(verdict, ready, wake_at, reports, now, timing).map_or_else(Action::await_change, Action::requeue))
}

/// Runs `work` within `timeout`, as a member failure when it takes longer.
pub(super) async fn within<T>(timeout: Duration, work: impl Future<Output = Result<T, Failure>>) -> Result<T, Failure> {
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| Err(Failure::new(Reason::Timeout, format!("the member did not answer within {timeout:?}"))))
}
