//! Report: the status patched only when it changed (server-side apply, field manager `meshfed`), and the Events
//! that tell a person what changed, published in the background.

use futures::future::join_all;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::events::{Event as KubeEvent, EventType},
};
use meshfed_api::MeshFederation;
use meshfed_core::{
    federation::FIELD_MANAGER,
    status::{self, Announcement, MemberReport},
};
use serde_json::json;
use tracing::{Instrument, warn};

use super::{Context, federation_ref};
use crate::Error;

/// The clusters released by annotation or let go as they run in this reconcile, each with what meshfed left behind
/// there; the objects adopted.
pub(super) fn released(fed: &MeshFederation, reports: &[MemberReport]) -> Vec<Announcement> {
    let fref = federation_ref(fed);
    let released = reports.iter().filter(|r| r.released).map(|r| status::released(&fref, &r.name, &r.kubeconfig));
    let orphaned = reports.iter().filter(|r| r.orphaned).map(|r| status::orphaned(&fref, &r.name, &r.kubeconfig));
    released.chain(orphaned).chain(status::adopted(reports)).collect()
}

/// Patches the status when it differs from what the federation already shows; returns what is to be said about
/// the change as Events, after `extra`.
pub(super) async fn report(
    fed: &MeshFederation,
    ctx: &Context,
    status: &meshfed_api::MeshFederationStatus,
    mut extra: Vec<status::Announcement>,
) -> Result<Vec<status::Announcement>, Error> {
    if !status::status_changed(fed.status.as_ref(), status) {
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
    let mut said = status::announcements(fed.status.as_ref(), status);
    said.append(&mut extra);
    Ok(said)
}

/// Publishes Events on the federation, concurrently and in the background: a reconcile does not wait for them. One
/// about a cluster relates to its kubeconfig Secret.
pub(super) fn publish(ctx: &Context, fed: &MeshFederation, said: Vec<status::Announcement>) {
    if said.is_empty() {
        return;
    }
    let events: Vec<KubeEvent> = said
        .into_iter()
        .map(|said| KubeEvent {
            type_: if said.warning { EventType::Warning } else { EventType::Normal },
            reason: said.reason,
            note: Some(status::event_note(said.note)),
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
