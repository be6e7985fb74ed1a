//! The hub controller: for every `MeshFederation`, observe -> plan -> apply -> prune -> report.
//!
//! The plan lives in `meshfed-core`; this module only reads, writes and waits. Every member is handled concurrently
//! with its own deadline, so one slow or dead member never delays the others.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use futures::{StreamExt, future::join_all};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::{Namespace, ObjectReference};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ListParams, Patch, PatchParams},
    runtime::{
        Controller,
        controller::Action,
        events::{Event as KubeEvent, EventType, Recorder, Reporter},
        finalizer::{Event, finalizer},
        watcher,
    },
};
use meshfed_api::{ClusterSpec, MeshFederation, MeshFederationSpec, SecretKeyRef};
use meshfed_core::{
    plan::{self, FIELD_MANAGER, Failure, FederationRef, MemberReport},
    validate::validate,
};
use serde_json::json;
use tracing::{Instrument, info, info_span, warn};

use crate::{
    Error,
    apply::{self, Writer},
    members::{Backoff, ClientPool, Member, member_id},
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
    metrics.set_ready();
    let (watches, triggers) = MemberWatches::new(metrics.member_watches.clone());
    let triggers = futures::stream::unfold(triggers, |mut rx| async { rx.recv().await.map(|t| (t, rx)) });
    let recorder = Recorder::new(hub.clone(), Reporter { controller: "meshfed".into(), instance: None });
    let ctx = Arc::new(Context {
        hub,
        recorder,
        pool: ClientPool::default(),
        backoff: Backoff::default(),
        watches,
        settings,
        metrics,
    });
    info!("meshfed controller started");
    Controller::new(feds, watcher::Config::default().any_semantic())
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
/// also name its cluster.
async fn reconcile(fed: Arc<MeshFederation>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.time_reconcile();
    let ns = fed.namespace().ok_or(Error::NotNamespaced)?;
    let span = info_span!("reconcile", federation = %federation_ref(&fed));
    let api: Api<MeshFederation> = Api::namespaced(ctx.hub.clone(), &ns);
    finalizer(&api, FINALIZER, fed, |event| async {
        match event {
            Event::Apply(fed) => converge(&fed, &ctx).await,
            Event::Cleanup(fed) => cleanup(&fed, &ctx).await,
        }
    })
    .instrument(span)
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

fn federation_ref(fed: &MeshFederation) -> FederationRef {
    FederationRef { namespace: fed.namespace().unwrap_or_default(), name: fed.name_any() }
}

/// Makes every member hold what the spec asks, cleans up members that left it, and reports.
async fn converge(fed: &MeshFederation, ctx: &Context) -> Result<Action, Error> {
    let fref = federation_ref(fed);
    let spec = &fed.spec;
    let previous = fed.status.as_ref();
    let validation = validate(spec);
    let mut root_status = None;
    let reports = match &validation {
        Err(problems) => {
            info!(problems = problems.len(), "federation is invalid; nothing is written to members");
            Vec::new()
        }
        Ok(valid) => {
            let now = ctx.settings.clock.now();
            let root = trust::root(&ctx.hub, fed, &valid.durations, now).await;
            if let Err(f) = &root {
                warn!(reason = %f.reason, "{}", f.message);
            }
            let staying = spec.clusters.iter().map(|c| converge_member(ctx, &fref, spec, c));
            let leaving = previous
                .into_iter()
                .flat_map(|s| &s.clusters)
                .filter(|c| !spec.clusters.iter().any(|m| m.name == c.name))
                .filter_map(|c| Some((c.name.clone(), c.kubeconfig_secret_ref.clone()?)))
                .map(|(name, secret)| cleanup_member(ctx, &fref, spec, name, secret));
            let (staying, leaving) = futures::join!(join_all(staying), join_all(leaving));
            let observed: BTreeMap<_, _> =
                staying.iter().filter_map(|(r, o)| Some((r.name.clone(), o.as_ref()?))).collect();
            // Remote access and trust are independent of each other: both run at once.
            let access = remote_access::converge(
                &ctx.metrics,
                &fref,
                spec,
                &observed,
                valid.durations.token_ttl,
                ctx.settings.member_timeout,
                now,
            );
            let trust = async {
                let root = root.as_ref().map_err(Clone::clone)?;
                let issuer = trust::Issuer { root, durations: &valid.durations, now };
                let previous = previous.and_then(|p| p.trust.as_ref());
                let timeout = ctx.settings.member_timeout;
                Ok(trust::converge(&ctx.metrics, &fref, spec, issuer, previous, &observed, timeout).await)
            };
            let (access, trust) = futures::join!(access, trust);
            let mut intermediates = BTreeMap::new();
            root_status = Some(trust.map(|converged| {
                intermediates = converged.intermediates;
                converged.status
            }));
            let mut reports: Vec<MemberReport> = staying.into_iter().map(|(r, _)| r).collect();
            for r in &mut reports {
                if let Some(outcome) = access.get(&r.name) {
                    r.remote_access = outcome.failure.clone();
                    r.token_expires_at = outcome.token_expires_at;
                }
                r.intermediate = intermediates.remove(&r.name);
            }
            reports.extend(leaving);
            reports
        }
    };
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
    ctx.metrics.observe_status(&key, &status);
    let in_use =
        status.clusters.iter().filter_map(|c| Some(member_id(&fref.namespace, c.kubeconfig_secret_ref.as_ref()?)));
    ctx.watches.used_by(&key, in_use.collect());
    report(fed, ctx, &status).await?;
    let ready = status.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True");
    Ok(match (&validation, ready) {
        // An invalid spec waits for its next edit: retrying cannot fix it.
        (Err(_), _) => Action::await_change(),
        (Ok(_), true) => Action::requeue(ctx.settings.resync_after),
        (Ok(_), false) => Action::requeue(ctx.settings.retry_after),
    })
}

/// Removes what meshfed wrote in every member; keeps the finalizer while any member could not be cleaned.
async fn cleanup(fed: &MeshFederation, ctx: &Context) -> Result<Action, Error> {
    let fref = federation_ref(fed);
    let mut members: Vec<(String, SecretKeyRef)> =
        fed.spec.clusters.iter().map(|c| (c.name.clone(), c.kubeconfig_secret_ref.clone())).collect();
    for c in fed.status.iter().flat_map(|s| &s.clusters) {
        if let (false, Some(secret)) = (members.iter().any(|(n, _)| *n == c.name), &c.kubeconfig_secret_ref) {
            members.push((c.name.clone(), secret.clone()));
        }
    }
    let reports =
        join_all(members.into_iter().map(|(name, secret)| cleanup_member(ctx, &fref, &fed.spec, name, secret))).await;
    let pending: Vec<_> = reports.into_iter().filter(|r| r.failure.is_some()).collect();
    if pending.is_empty() {
        info!("members cleaned up; releasing the finalizer");
        let key = fref.to_string();
        ctx.metrics.forget(&key);
        ctx.watches.used_by(&key, Default::default());
        return Ok(Action::await_change());
    }
    let status = plan::deletion_status(fed.status.as_ref(), fed.meta().generation, &pending, ctx.settings.clock.now());
    ctx.metrics.observe_status(&fref.to_string(), &status);
    report(fed, ctx, &status).await?;
    Err(Error::CleanupPending(pending.iter().map(|p| p.name.clone()).collect::<Vec<_>>().join(", ")))
}

/// Patches the status when it differs from what the federation already shows.
async fn report(fed: &MeshFederation, ctx: &Context, status: &meshfed_api::MeshFederationStatus) -> Result<(), Error> {
    if !plan::status_changed(fed.status.as_ref(), status) {
        return Ok(());
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
    let ns = fed.namespace().unwrap_or_default();
    for said in plan::announcements(fed.status.as_ref(), status) {
        let secondary = said.kubeconfig.map(|secret| ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Secret".into()),
            namespace: Some(ns.clone()),
            name: Some(secret.name),
            ..Default::default()
        });
        let event = KubeEvent {
            type_: if said.warning { EventType::Warning } else { EventType::Normal },
            reason: said.reason,
            note: Some(said.note),
            action: "Reconcile".into(),
            secondary,
        };
        // An Event that cannot be written is not worth failing a reconcile over.
        if let Err(e) = ctx.recorder.publish(&event, &fed.object_ref(&())).await {
            warn!(error = %e, "cannot publish an Event");
        }
    }
    Ok(())
}

/// Runs `work` against a member within the member deadline, recording in `report` its version or what failed.
/// Returns the member and what `work` found, when everything succeeded.
async fn with_member<T, F, Fut>(
    ctx: &Context,
    fref: &FederationRef,
    report: &mut MemberReport,
    work: F,
) -> Option<(Member, T)>
where
    F: FnOnce(Member) -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    let timeout = ctx.settings.member_timeout;
    let member = match ctx.pool.member(&ctx.hub, &fref.namespace, &report.kubeconfig, timeout).await {
        Ok(m) => m,
        Err(f) => {
            report.failure = Some(f);
            return None;
        }
    };
    let key = fref.to_string();
    ctx.watches.ensure(&key, &member.id, &member.version, &member.client);
    if let Some(last) = ctx.backoff.waiting(&member) {
        report.failure = Some(last);
        return None;
    }
    let run = async {
        let asked = std::time::Instant::now();
        let version = member
            .client
            .apiserver_version()
            .await
            .map_err(|e| Failure::new("Unreachable", format!("{}: {e}", member.server)))?;
        ctx.metrics.member_answered(&key, &report.name, asked.elapsed());
        report.version = Some(version.git_version);
        work(member.clone()).await
    };
    let found = match tokio::time::timeout(timeout, run).await {
        Ok(Ok(found)) => Some((member.clone(), found)),
        Ok(Err(f)) => {
            report.failure = Some(f);
            None
        }
        Err(_) => {
            report.failure =
                Some(Failure::new("Timeout", format!("{} did not answer within {timeout:?}", member.server)));
            None
        }
    };
    let (base, max) = (ctx.settings.retry_after, ctx.settings.member_backoff_max);
    ctx.backoff.record(&member, report.failure.as_ref(), base, max);
    if let Some(f) = &report.failure {
        warn!(cluster = %report.name, reason = %f.reason, "{}", f.message);
    }
    found
}

/// Brings one member to the plan: its Istio namespace with the network label and its reader identity; returns
/// what the remote-access step needs from it.
async fn converge_member(
    ctx: &Context,
    fref: &FederationRef,
    spec: &MeshFederationSpec,
    cluster: &ClusterSpec,
) -> (MemberReport, Option<remote_access::Observed>) {
    let mut report = MemberReport::new(&cluster.name, &cluster.kubeconfig_secret_ref, false);
    let found = with_member(ctx, fref, &mut report, |member| async move {
        let w = Writer { cluster: &cluster.name, metrics: &ctx.metrics };
        let ns = &spec.istio.namespace;
        let namespaces: Api<Namespace> = Api::all(member.client.clone());
        let observed = apply::read(&namespaces, ns).await?;
        if observed.as_ref().is_some_and(|o| o.metadata.deletion_timestamp.is_some()) {
            return Err(Failure::new(
                "NamespaceTerminating",
                format!("namespace {ns} is being deleted; waiting for it to go"),
            ));
        }
        let desired = plan::istio_namespace(fref, spec, cluster, observed.as_ref());
        apply::ensure(&w, &namespaces, observed, &desired).await?;
        remote_access::observe_member(&w, fref, spec, cluster, member).await
    })
    .await;
    (report, found.map(|(_, observed)| observed))
}

/// Removes what meshfed wrote for `fref` in one member: everything labelled for it, and the Istio namespace if
/// meshfed created it; a namespace meshfed found gets back only the labels meshfed set (an empty server-side apply
/// drops every field meshfed owns).
async fn cleanup_member(
    ctx: &Context,
    fref: &FederationRef,
    spec: &MeshFederationSpec,
    name: String,
    secret: SecretKeyRef,
) -> MemberReport {
    let mut report = MemberReport::new(&name, &secret, true);
    with_member(ctx, fref, &mut report, |member| async move {
        let w = Writer { cluster: &name, metrics: &ctx.metrics };
        apply::delete_owned(&w, fref, &member).await?;
        let namespaces: Api<Namespace> = Api::all(member.client);
        let ns = &spec.istio.namespace;
        let Some(observed) = apply::read(&namespaces, ns).await? else {
            return Ok(());
        };
        if !plan::owned_by(&observed.metadata, fref, &name) || observed.metadata.deletion_timestamp.is_some() {
            return Ok(());
        }
        if plan::created_by_meshfed(&observed) {
            apply::delete(&w, &namespaces, ns).await?;
        } else {
            let release = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
            apply::apply(&w, &namespaces, ns, &release).await?;
        }
        info!(cluster = %name, "member cleaned up");
        Ok(())
    })
    .await;
    report
}
