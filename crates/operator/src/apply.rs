//! The one path for everything meshfed owns in a member, for every kind of [`OWNED_KINDS`] alike (built-in or CRD):
//! observe (by label, from the member's watch caches, or a list where a cache cannot answer), take the claim, apply
//! (server-side, field manager `meshfed`, only where the member does not already hold the plan, so a steady state
//! writes nothing) and prune (what is labelled for this federation and cluster that the plan does not want; cleanup
//! is the prune of an empty plan).

use meshfed_core::conditions::Reason;
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use futures::future::{join_all, try_join_all};
use k8s_openapi::api::{
    core::v1::{ConfigMap, Node},
    networking::v1::ServiceCIDR,
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams},
};
use meshfed_core::{
    member::{self, ClaimHolder, Foreign, MemberPlan, OWNED_KINDS, ObjectKey, OwnedKind, Prune, Write, claim_holder},
    plan::{FIELD_MANAGER, Failure, FederationRef},
};
use serde::Deserialize;
use serde_json::Value;
use tracing::info;

use crate::{
    members::Member,
    metrics::{KindLabels, Metrics},
    watches::MemberCache,
};

/// Who writes where: every write to a member is counted by cluster and kind, and recorded in the member's cache so
/// that the next read waits for it.
pub struct Writer<'a> {
    pub cluster: &'a str,
    pub metrics: &'a Metrics,
    pub client: &'a Client,
    pub cache: &'a MemberCache,
}

/// What a member holds, by key, as JSON (shared with the member's watch caches): everything labelled for one
/// federation and cluster, and the objects read by name whatever their labels (the Istio namespace and `cacerts`,
/// which may predate meshfed, the claim, the `Istio`).
pub type Holdings = BTreeMap<ObjectKey, Arc<Value>>;

/// A member that answered this reconcile: its client, what it holds of the federation, the kinds of the table its
/// API does not serve (CRDs not installed), and the nodes its gateway may run on (read where the gateway's address
/// is a node's).
pub struct Reached {
    pub member: Member,
    pub cache: Arc<MemberCache>,
    pub held: Holdings,
    pub unserved: BTreeSet<OwnedKind>,
    pub nodes: Vec<Node>,
    /// The pod and service ranges its API shows (read where another cluster shares its network).
    pub ranges: Vec<String>,
}

/// The API resource of an owned kind.
pub fn api_resource(kind: &OwnedKind) -> ApiResource {
    ApiResource {
        group: kind.group.into(),
        version: kind.version.into(),
        api_version: kind.api_version(),
        kind: kind.kind.into(),
        plural: kind.plural.into(),
    }
}

fn api(client: &Client, key: &ObjectKey) -> Api<DynamicObject> {
    let ar = api_resource(&key.kind);
    match &key.namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    }
}

/// An object as JSON, with the `apiVersion` and `kind` that list items lack, and without `managedFields`, which no
/// plan reads and which are often the larger part of an object held through a reconcile.
pub(crate) fn as_json(kind: &OwnedKind, mut obj: DynamicObject) -> Value {
    obj.metadata.managed_fields = None;
    let mut v = serde_json::to_value(obj).unwrap_or_default();
    v["apiVersion"] = kind.api_version().into();
    v["kind"] = kind.kind.into();
    v
}

/// The key of an object of `kind`, as JSON.
pub(crate) fn key_of(kind: &OwnedKind, obj: &Value) -> ObjectKey {
    let meta = |field: &str| obj["metadata"][field].as_str().map(String::from);
    ObjectKey { kind: *kind, namespace: meta("namespace"), name: meta("name").unwrap_or_default() }
}

/// An object of `kind` as shared JSON, keyed.
fn keyed(kind: &OwnedKind, obj: DynamicObject) -> (ObjectKey, Arc<Value>) {
    let json = as_json(kind, obj);
    (key_of(kind, &json), Arc::new(json))
}

/// Reads what the member holds of `fref` for `cluster`: every owned kind by label, from `cache` or else listed, and
/// `by_name` whatever their labels (from `cache` when meshfed labelled them, else read); and which kinds the member
/// does not serve (a CRD that is not installed lists as not found).
pub async fn observe(
    client: &Client,
    cache: &MemberCache,
    metrics: &Metrics,
    fref: &FederationRef,
    cluster: &str,
    by_name: &[ObjectKey],
) -> Result<(Holdings, BTreeSet<OwnedKind>), Failure> {
    let labels = fref.owned_labels(cluster);
    let lp = ListParams::default().labels(&fref.selector(cluster));
    let lists = OWNED_KINDS.iter().map(|kind| {
        let (lp, labels) = (&lp, &labels);
        async move {
            if let Some(held) = cache.held(kind, labels).await {
                return Ok(Ok(held));
            }
            metrics.member_lists.get_or_create(&KindLabels { kind: kind.kind.into() }).inc();
            match Api::<DynamicObject>::all_with(client.clone(), &api_resource(kind)).list(lp).await {
                Ok(found) => Ok(Ok(found.items.into_iter().map(|o| keyed(kind, o)).collect())),
                Err(kube::Error::Api(e)) if e.code == 404 => Ok(Err(*kind)),
                Err(e) => Err(read_failure(&format!("listing {}s", kind.kind), e)),
            }
        }
    });
    let reads = by_name.iter().map(|key| async move {
        // One that meshfed labelled is in its watch's cache; one it did not label (yet) is read.
        if let Some(held) = cache.object(key).await {
            return Ok(Some((key.clone(), held)));
        }
        let found = match api(client, key).get_opt(&key.name).await {
            Ok(found) => found,
            // A kind the member does not serve (a CRD not installed) holds nothing.
            Err(kube::Error::Api(e)) if e.code == 404 => None,
            Err(e) => return Err(read_failure(&format!("reading {key}"), e)),
        };
        Ok(found.map(|o| (key.clone(), Arc::new(as_json(&key.kind, o)))))
    });
    let (lists, reads) = futures::try_join!(try_join_all(lists), try_join_all(reads))?;
    let (lists, unserved): (Vec<Result<Vec<_>, _>>, Vec<_>) = lists.into_iter().partition(Result::is_ok);
    let held = lists.into_iter().flatten().flatten().chain(reads.into_iter().flatten()).collect();
    Ok((held, unserved.into_iter().filter_map(Result::err).collect()))
}

/// The pod and service ranges the member's API shows: its nodes' `podCIDRs` and its `ServiceCIDR`s. A list the
/// credential may not read, or an API that does not serve it, shows nothing.
pub async fn ranges(client: &Client) -> Vec<String> {
    let lp = ListParams::default();
    let (nodes, services) = (Api::<Node>::all(client.clone()), Api::<ServiceCIDR>::all(client.clone()));
    let (nodes, services) = futures::join!(nodes.list(&lp), services.list(&lp));
    let pods =
        nodes.into_iter().flat_map(|l| l.items).flat_map(|n| n.spec.and_then(|s| s.pod_cidrs).unwrap_or_default());
    let services =
        services.into_iter().flat_map(|l| l.items).flat_map(|c| c.spec.and_then(|s| s.cidrs).unwrap_or_default());
    pods.chain(services).collect()
}

/// The member's schedulable nodes that match `selector` (all nodes without one).
pub async fn nodes(client: &Client, selector: Option<&BTreeMap<String, String>>) -> Result<Vec<Node>, Failure> {
    let labels = selector.into_iter().flatten().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
    let found = Api::<Node>::all(client.clone())
        .list(&ListParams::default().labels(&labels))
        .await
        .map_err(|e| read_failure("listing the nodes the gateway may run on", e))?;
    Ok(found.items)
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
            let whose = if their_hub == hub { String::new() } else { format!(" in another hub ({their_hub})") };
            Err(Failure::new(
                Reason::ClusterClaimed,
                format!(
                    "the Istio namespace {} of this cluster belongs to federation {federation}{whose}; meshfed writes nothing here until that federation lets it go (its {key})",
                    spec.istio.namespace
                ),
            ))
        }
    }
}

/// Makes the member hold every object of `plan`, writing only what differs from `held` (updated with what was
/// written): stage by stage ([`member::apply_stage`]), the objects of a stage concurrently. An object that belongs to
/// another federation stops the plan before anything is written; a failure stops before the next stage, once every
/// write of its own stage has ended.
pub async fn apply_plan(
    w: &Writer<'_>,
    fref: &FederationRef,
    plan: &MemberPlan,
    held: &mut Holdings,
) -> Result<(), Failure> {
    let writes = plan
        .objects
        .iter()
        .map(|desired| match member::write_for(fref, held.get(&desired.key).map(Arc::as_ref), desired) {
            Ok(write) => Ok((desired, write)),
            Err(Foreign { owner }) => Err(Failure::new(
                Reason::OwnedByAnotherFederation,
                format!("{} belongs to federation {owner}; meshfed leaves it alone", desired.key),
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
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
    Ok(())
}

/// Deletes (or, for a namespace meshfed did not create, releases) what `held` has of `fref` and this writer's cluster
/// that `plan` does not want.
pub async fn prune(w: &Writer<'_>, fref: &FederationRef, plan: &MemberPlan, held: &Holdings) -> Result<(), Failure> {
    for p in member::to_prune(fref, w.cluster, plan, held.iter().map(|(k, v)| (k, v.as_ref()))) {
        match p {
            Prune::Delete(key) => delete(w, &key).await?,
            Prune::Release(key, body) => _ = apply(w, &key, &body).await?,
        }
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
        .map_err(|e| write_failure(&format!("applying {key}"), e))?;
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

/// A failed read from a member's API, as a per-member failure.
pub fn read_failure(what: &str, e: kube::Error) -> Failure {
    Failure::new(Reason::ReadFailed, format!("{what}: {e}"))
}

/// A held object as its typed form, if the member holds it.
pub fn typed<K: serde::de::DeserializeOwned>(held: &Holdings, key: &ObjectKey) -> Option<K> {
    held.get(key).and_then(|v| K::deserialize(v.as_ref()).ok())
}
