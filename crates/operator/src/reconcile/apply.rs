//! Apply: every member's plan written in two waves, each member concurrently within its deadline; the second wave
//! also prunes. The plans come from `meshfed_core::plan::member_plan`, the same that `meshfed render` shows.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Instant,
};

use futures::future::join_all;
use meshfed_api::MeshFederationSpec;
use meshfed_core::{
    federation::{Failure, FederationRef},
    gateway::GatewayAddress,
    plan,
    status::MemberReport,
};
use tracing::{debug, warn};

use super::{Context, within};
use crate::{
    member::{
        Reached,
        write::{self, Writer},
    },
    trust::PlannedCacerts,
};

/// Applies every reached member's plan: without remote secrets when the wave has no tokens (the first wave), else
/// the complete plan followed by the prune. Returns each member's outcome.
pub(super) async fn wave(
    ctx: &Context,
    fref: &FederationRef,
    spec: &MeshFederationSpec,
    reached: &mut BTreeMap<String, Reached>,
    cacerts: &PlannedCacerts,
    shared: plan::Wave<'_>,
) -> Vec<WaveResult> {
    let tokens = shared.tokens;
    let work = reached.iter_mut().map(|(name, r)| {
        let cluster = spec.clusters.iter().find(|c| c.name == *name).expect("a member of the spec");
        let cacerts = cacerts.get(name).and_then(|c| c.as_ref().ok()).map(|(data, _)| data.clone());
        let plan_of =
            move |seen: &_| plan::member_plan(fref, &ctx.hub_id, spec, cluster, seen, cacerts.clone(), shared);
        let mut plan = plan_of(&r.seen);
        async move {
            let w = Writer { cluster: name, metrics: &ctx.metrics, client: &r.member.client, cache: &r.cache };
            let work = async {
                // An object the plan writes that is there but unlabelled changes the plan (it may be adopted).
                if write::look_up_unheld(&w, &plan, &mut r.seen.held).await? {
                    plan = plan_of(&r.seen);
                }
                let adopted = write::apply_plan(&w, fref, &plan, &mut r.seen.held).await?;
                if tokens.is_some() {
                    write::prune(&w, fref, &plan, &r.seen.held).await?;
                }
                Ok(adopted)
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
pub(super) struct WaveResult {
    name: String,
    /// What it adopted, or why it failed.
    result: Result<Vec<String>, Failure>,
    gateway: Option<Result<GatewayAddress, Failure>>,
    control_plane: Option<Failure>,
}

/// Puts each wave's outcome into its member's report and its backoff; returns the members that failed.
pub(super) fn record(
    ctx: &Context,
    fref: &FederationRef,
    reports: &mut [MemberReport],
    reached: &BTreeMap<String, Reached>,
    results: Vec<WaveResult>,
) -> BTreeSet<String> {
    let mut failed = BTreeSet::new();
    let (base, max) = (ctx.settings.retry_after, ctx.settings.member_backoff_max);
    for WaveResult { name, result, gateway, control_plane } in results {
        let Some(r) = reports.iter_mut().find(|r| r.name == name) else { continue };
        r.gateway = gateway;
        r.control_plane = Some(control_plane.map_or(Ok(()), Err));
        match result {
            Ok(adopted) => r.adopted.extend(adopted),
            Err(f) => {
                warn!(cluster = %name, reason = %f.reason, "{}", f.message);
                r.failure = Some(f);
                failed.insert(name.clone());
            }
        }
        if let Some(m) = reached.get(&name) {
            ctx.backoff.record(&fref.to_string(), &m.member, r, base, max);
        }
    }
    failed
}
