//! Apply and prune: the one write path for every kind of the owned-kinds table alike. Server-side apply with field
//! manager `meshfed`, only where the member does not already hold the plan (so a steady state writes nothing); the
//! prune deletes what is labelled for this federation and cluster that the plan does not want (cleanup is the prune
//! of an empty plan); the claim is created, never applied.

use std::sync::Arc;

use futures::future::join_all;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use meshfed_core::{
    conditions::Reason,
    federation::{FIELD_MANAGER, Failure, FederationRef},
    kinds::{self, Holdings, ObjectKey},
    member::{self, ClaimHolder, Foreign, MemberPlan, Prune, Write, claim_holder},
};
use serde::Deserialize;
use serde_json::Value;
use tracing::info;

use super::{
    cache::MemberCache,
    kinds::{api, as_json},
    read::read_failure,
};
use crate::metrics::Metrics;

/// Who writes where: every write to a member is counted by cluster and kind, and recorded in the member's cache so
/// that the next read waits for it.
pub struct Writer<'a> {
    pub cluster: &'a str,
    pub metrics: &'a Metrics,
    pub client: &'a Client,
    pub cache: &'a MemberCache,
}

/// Takes the claim on the member's Istio namespace for `cluster` of `fref`, unless it is taken: creates it (of two
/// racing writers, one wins), or reads who holds it. Writes nothing when the claim is another federation's.
pub async fn claim(
    w: &Writer<'_>,
    fref: &FederationRef,
    hub: &str,
    spec: &meshfed_api::MeshFederationSpec,
    held: &mut Holdings,
) -> Result<(), Failure> {
    let desired = member::claim(fref, hub, spec, w.cluster);
    let key = kinds::claim_key(&spec.istio.namespace);
    let current = match held.get(&key) {
        Some(v) => ConfigMap::deserialize(v.as_ref()).unwrap_or_default(),
        None => {
            let configmaps: Api<ConfigMap> = Api::namespaced(w.client.clone(), kinds::CLAIM_NAMESPACE);
            w.metrics.wrote(w.cluster, "ConfigMap", "create");
            let params = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
            match configmaps.create(&params, &desired).await {
                Ok(created) => {
                    info!(cluster = %w.cluster, claim = %key, "claimed the Istio namespace");
                    w.cache.wrote(&key, Some(&created.metadata));
                    created
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    configmaps.get(&key.name).await.map_err(|e| read_failure(&format!("reading the claim {key}"), e))?
                }
                Err(e) => return Err(write_failure(&format!("creating the claim {key}"), e)),
            }
        }
    };
    held.insert(key.clone(), Arc::new(serde_json::to_value(&current).unwrap_or_default()));
    match claim_holder(&current.metadata, fref, hub, w.cluster) {
        // Under another name of this federation: the cluster was renamed; the plan relabels the claim.
        ClaimHolder::Us | ClaimHolder::UsAs(_) => Ok(()),
        ClaimHolder::Other { federation, hub: their_hub } => {
            let whose = match their_hub == hub {
                true => String::new(),
                false => format!(
                    " in another hub ({their_hub}); if that hub is gone for good (a hub restored from a backup has a new identity), delete {key} in this cluster and this federation takes it over as it is"
                ),
            };
            Err(Failure::new(
                Reason::ClusterClaimed,
                format!(
                    "the Istio namespace {} of this cluster belongs to federation {federation}; meshfed writes nothing here until that federation lets it go (its {key}){whose}",
                    spec.istio.namespace
                ),
            ))
        }
    }
}

/// Makes the member hold every object of `plan`, writing only what differs from `held` (updated with what was
/// written): stage by stage ([`member::apply_stage`]), the objects of a stage concurrently. An object that is not this
/// federation's (another's, or one meshfed did not create and does not adopt) stops the plan before anything is
/// written, and every such object is named; a failure stops before the next stage, once every write of its own stage
/// has ended. Returns what was adopted: each object taken over, with what taking it over changed.
pub async fn apply_plan(
    w: &Writer<'_>,
    fref: &FederationRef,
    plan: &MemberPlan,
    held: &mut Holdings,
) -> Result<Vec<String>, Failure> {
    let mut writes = Vec::new();
    let (mut theirs, mut nobodys) = (Vec::new(), Vec::new());
    for desired in &plan.objects {
        match member::write_for(fref, held.get(&desired.key).map(Arc::as_ref), desired) {
            Ok(write) => writes.push((desired, write)),
            Err(Foreign { owner: Some(owner) }) => theirs.push(member::held_by_another(&desired.key, &owner)),
            Err(Foreign { owner: None }) => nobodys.push(desired.key.to_string()),
        }
    }
    if !theirs.is_empty() {
        let message = format!("{}; meshfed leaves it alone", theirs.join("; "));
        return Err(Failure::new(Reason::OwnedByAnotherFederation, message));
    }
    if !nobodys.is_empty() {
        return Err(Failure::new(
            Reason::ObjectNotOwned,
            format!(
                "already there and not created by meshfed, so left alone: {}; nothing is written to this cluster. To let this federation take such objects over, set `existingObjects: Adopt` (`meshfed check` lists what that would change)",
                nobodys.join(", ")
            ),
        ));
    }
    let adopted: Vec<String> = writes
        .iter()
        .filter(|(d, write)| *write != Write::Nothing && member::adopts(held.get(&d.key).map(Arc::as_ref), d))
        .map(|(d, _)| {
            let changes = member::adoption_changes(&held[&d.key], &d.body);
            match changes.is_empty() {
                true => format!("{} (labelled only)", d.key),
                false => format!("{} (changed {})", d.key, changes.join(", ")),
            }
        })
        .collect();
    for stage in 0..member::APPLY_STAGES {
        let stage_writes = writes
            .iter()
            .filter(|(desired, write)| member::apply_stage(&desired.key.kind) == stage && *write != Write::Nothing)
            .map(|(desired, write)| async move {
                if *write == Write::Recreate {
                    delete(w, &desired.key).await?;
                }
                Ok::<_, Failure>((desired.key.clone(), apply(w, &desired.key, &desired.body).await?))
            });
        let mut failure = None;
        for done in join_all(stage_writes).await {
            match done {
                Ok((key, now)) => _ = held.insert(key, now),
                Err(f) => _ = failure.get_or_insert(f),
            }
        }
        if let Some(f) = failure {
            return Err(f);
        }
    }
    Ok(adopted)
}

/// Reads by name every object of `plan` that `held` lacks (the watches see only what meshfed labelled), into
/// `held`, so that one that is there but not this federation's is seen before anything is written over it; says
/// whether one was found. Once everything is in place, every object of the plan is held, and nothing is read.
pub async fn look_up_unheld(w: &Writer<'_>, plan: &MemberPlan, held: &mut Holdings) -> Result<bool, Failure> {
    let unheld = plan.objects.iter().filter(|d| !held.contains_key(&d.key)).map(|d| async move {
        match api(w.client, &d.key).get_opt(&d.key.name).await {
            Ok(found) => Ok(found.map(|o| (d.key.clone(), Arc::new(as_json(&d.key.kind, o))))),
            Err(e) => Err(read_failure(&format!("reading {}", d.key), e)),
        }
    });
    let mut any = false;
    for found in join_all(unheld).await {
        if let Some((key, object)) = found? {
            held.insert(key, object);
            any = true;
        }
    }
    Ok(any)
}

/// Deletes (or, for a namespace meshfed did not create, releases) what `held` has of `fref` and this writer's cluster
/// that `plan` does not want.
pub async fn prune(w: &Writer<'_>, fref: &FederationRef, plan: &MemberPlan, held: &Holdings) -> Result<(), Failure> {
    carry_out(w, member::to_prune(fref, w.cluster, plan, held.iter().map(|(k, v)| (k, v.as_ref())))).await
}

/// Lets this writer's cluster go as it runs (`deletionPolicy: Orphan`): removes meshfed's labels and annotations
/// from what `held` has of `fref`, and gives the claim back.
pub async fn release(w: &Writer<'_>, fref: &FederationRef, held: &Holdings) -> Result<(), Failure> {
    carry_out(w, member::to_release(fref, w.cluster, held.iter().map(|(k, v)| (k, v.as_ref())))).await
}

/// Carries out a prune's decisions in order.
async fn carry_out(w: &Writer<'_>, prunes: Vec<Prune>) -> Result<(), Failure> {
    for p in prunes {
        match p {
            Prune::Delete(key) => delete(w, &key).await?,
            Prune::Release(key, body) => _ = apply(w, &key, &body).await?,
            Prune::Unlabel(key, patch) => unlabel(w, &key, &patch).await?,
        }
    }
    Ok(())
}

/// Merge-patches object `key` with `patch`, which removes meshfed's marks; one that is already gone is let go.
async fn unlabel(w: &Writer<'_>, key: &ObjectKey, patch: &Value) -> Result<(), Failure> {
    w.metrics.wrote(w.cluster, key.kind.kind, "unlabel");
    info!(cluster = %w.cluster, object = %key, "letting go");
    let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    match api(w.client, key).patch(&key.name, &params, &Patch::Merge(patch)).await {
        Ok(now) => w.cache.wrote(key, Some(&now.metadata)),
        Err(kube::Error::Api(s)) if s.code == 404 => w.cache.wrote(key, None),
        Err(e) => return Err(write_failure(&format!("letting go of {key}"), e)),
    }
    Ok(())
}

/// Server-side applies `body` as object `key`; returns the object as it is now.
async fn apply(w: &Writer<'_>, key: &ObjectKey, body: &Value) -> Result<Arc<Value>, Failure> {
    w.metrics.wrote(w.cluster, key.kind.kind, "apply");
    info!(cluster = %w.cluster, object = %key, "applying");
    let now = api(w.client, key)
        .patch(&key.name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(body))
        .await
        .map_err(|e| {
            let escalation = matches!(&e, kube::Error::Api(s) if s.code == 403)
                && matches!(key.kind, kinds::CLUSTER_ROLE | kinds::CLUSTER_ROLE_BINDING);
            let mut f = write_failure(&format!("applying {key}"), e);
            if escalation {
                f.message.push_str(&format!(
                    "; the reader's ClusterRole grants what the hub does not hold: the hub's credential needs `escalate` and `bind` on clusterroles named {} (what `meshfed join` grants)",
                    key.name
                ));
            }
            f
        })?;
    w.cache.wrote(key, Some(&now.metadata));
    Ok(Arc::new(as_json(&key.kind, now)))
}

/// Deletes object `key`; one that is already gone counts as deleted.
async fn delete(w: &Writer<'_>, key: &ObjectKey) -> Result<(), Failure> {
    w.metrics.wrote(w.cluster, key.kind.kind, "delete");
    info!(cluster = %w.cluster, object = %key, "deleting");
    let last = match api(w.client, key).delete(&key.name, &Default::default()).await {
        // Gone, unless finalizers hold it: then it stays, marked for deletion, until they let it go.
        Ok(done) => done.left().filter(|o| o.metadata.deletion_timestamp.is_some()),
        Err(kube::Error::Api(s)) if s.code == 404 => None,
        Err(e) => return Err(write_failure(&format!("deleting {key}"), e)),
    };
    w.cache.wrote(key, last.as_ref().map(|o| &o.metadata));
    Ok(())
}

/// A failed write to a member's API, as a per-member failure.
fn write_failure(what: &str, e: kube::Error) -> Failure {
    Failure::new(Reason::WriteFailed, format!("{what}: {e}"))
}
