//! Cleanup: what meshfed wrote in a member that leaves the spec, or in every member of a federation being deleted,
//! is removed by the prune of an empty plan, unless the federation plan says the member is the same cluster renamed
//! or is held by another federation or hub ([`plan::leave`]).

use futures::future::join_all;
use kube::{Resource, ResourceExt, runtime::controller::Action};
use meshfed_api::{DeletionPolicy, MeshFederation, SecretKeyRef};
use meshfed_core::{
    federation::RELEASE_ANNOTATION,
    member::MemberPlan,
    plan::{self, Leave},
    status::{self, MemberReport},
};
use tracing::info;

use super::{Context, federation_ref, observe::observe_member, report, within};
use crate::{
    Error,
    member::{
        Reached,
        write::{self, Writer},
    },
};

/// Removes what meshfed wrote in every member; keeps the finalizer while any member could not be cleaned.
pub(super) async fn cleanup(fed: &MeshFederation, ctx: &Context) -> Result<Action, Error> {
    let fref = federation_ref(fed);
    let mut members: Vec<(String, SecretKeyRef)> =
        fed.spec.clusters.iter().map(|c| (c.name.clone(), c.kubeconfig_secret_ref.clone())).collect();
    members.extend(plan::leaving_members(&fed.spec, fed.status.as_ref()));
    let reports = join_all(members.into_iter().map(|(name, secret)| leave(ctx, fed, name, secret, &[]))).await;
    ctx.metrics.members_failed(reports.iter().flat_map(|r| &r.failure));
    let pending: Vec<_> = reports.iter().filter(|r| r.failure.is_some()).cloned().collect();
    if pending.is_empty() {
        if fed.spec.deletion_policy == DeletionPolicy::Orphan {
            crate::trust::keep_roots(&ctx.hub, &fref).await.map_err(Error::KeepRoots)?;
        }
        report::publish(ctx, fed, report::released(fed, &reports));
        info!("members cleaned up; releasing the finalizer");
        let key = fref.to_string();
        ctx.metrics.forget(&key);
        ctx.members_used(&key, Default::default(), &fed.spec.istio.namespace);
        return Ok(Action::await_change());
    }
    let status =
        status::deletion_status(fed.status.as_ref(), fed.meta().generation, &pending, ctx.settings.clock.now());
    ctx.metrics.observe_status(&fref.to_string(), &status);
    let said = report::report(fed, ctx, &status, report::released(fed, &reports)).await?;
    report::publish(ctx, fed, said);
    Err(Error::CleanupPending(pending.iter().map(|p| p.name.clone()).collect::<Vec<_>>().join(", ")))
}

/// Lets member `name` go: observes it, and removes what meshfed wrote there for the federation as
/// [`plan::leave`] decides (`staying`: the members that stay in the spec, none when the federation is deleted). A
/// member that was never reached holds nothing of the federation, and one named in [`RELEASE_ANNOTATION`] is let go
/// as it is: neither holds the cleanup up.
pub(super) async fn leave(
    ctx: &Context,
    fed: &MeshFederation,
    name: String,
    secret: SecretKeyRef,
    staying: &[MemberReport],
) -> MemberReport {
    let fref = federation_ref(fed);
    let (mut report, reached) = observe_member(ctx, &fref, &fed.spec, &name, &secret, false, None).await;
    if let Some(Reached { member, cache, seen }) = reached {
        match plan::leave(&fref, &ctx.hub_id, &fed.spec, &report, &seen, staying) {
            Leave::Clean => {
                let w = Writer { cluster: &name, metrics: &ctx.metrics, client: &member.client, cache: &cache };
                let orphan = fed.spec.deletion_policy == DeletionPolicy::Orphan;
                let work = async {
                    match orphan {
                        true => write::release(&w, &fref, &seen.held).await,
                        false => write::prune(&w, &fref, &MemberPlan::default(), &seen.held).await,
                    }
                };
                match within(ctx.settings.member_timeout, work).await {
                    Ok(()) if orphan => {
                        info!(cluster = %name, "member let go as it runs");
                        report.orphaned = true;
                    }
                    Ok(()) => info!(cluster = %name, "member cleaned up"),
                    Err(f) => report.failure = Some(f),
                }
            }
            Leave::Renamed(to) => {
                info!(cluster = %name, renamed = %to, "the same cluster stays as {to}: nothing removed")
            }
            Leave::ClaimedBy(holder) => {
                info!(cluster = %name, %holder, "held by {holder}: nothing of this federation to remove")
            }
        }
        let (base, max) = (ctx.settings.retry_after, ctx.settings.member_backoff_max);
        ctx.backoff.record(&fref.to_string(), &member, &report, base, max);
    }
    plan::let_go_after_failure(&mut report, fed.status.as_ref(), fed.annotations().get(RELEASE_ANNOTATION));
    report
}
