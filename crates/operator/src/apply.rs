//! Writes to members: server-side apply with meshfed's field manager, only where the observed object does not already
//! hold what the plan wants, so that a steady state writes nothing.

use std::fmt::Debug;

use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
};
use meshfed_core::plan::{FIELD_MANAGER, Failure, holds};
use serde::{Serialize, de::DeserializeOwned};

use tracing::info;

use k8s_openapi::api::{
    core::v1::{Secret, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use kube::api::ListParams;
use meshfed_core::plan::FederationRef;

use crate::{members::Member, metrics::Metrics};

/// Who writes where: every write to a member is counted by cluster and kind.
pub struct Writer<'a> {
    pub cluster: &'a str,
    pub metrics: &'a Metrics,
}

/// Applies `desired` unless `observed` already holds it. Returns the object as it is now.
pub async fn ensure<K>(w: &Writer<'_>, api: &Api<K>, observed: Option<K>, desired: &K) -> Result<K, Failure>
where
    K: Resource<DynamicType = ()> + Serialize + DeserializeOwned + Clone + Debug,
{
    if let Some(o) = observed
        && json(&o).is_some_and(|o| json(desired).is_some_and(|d| holds(&o, &d)))
    {
        return Ok(o);
    }
    apply(w, api, &desired.name_any(), desired).await
}

/// Reads the object `desired` names, then [`ensure`]s it.
pub async fn ensure_fresh<K>(w: &Writer<'_>, api: &Api<K>, desired: &K) -> Result<K, Failure>
where
    K: Resource<DynamicType = ()> + Serialize + DeserializeOwned + Clone + Debug,
{
    let observed = read(api, &desired.name_any()).await?;
    ensure(w, api, observed, desired).await
}

/// Server-side applies `body` (which names its apiVersion and kind) as object `name`.
pub async fn apply<K, B>(w: &Writer<'_>, api: &Api<K>, name: &str, body: &B) -> Result<K, Failure>
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Clone + Debug,
    B: Serialize + Debug,
{
    let kind = K::kind(&());
    w.metrics.wrote(w.cluster, &kind, "apply");
    info!(cluster = %w.cluster, %kind, %name, "applying");
    api.patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(body))
        .await
        .map_err(|e| write_failure(&format!("applying {kind} {name}"), e))
}

/// Deletes object `name`; one that is already gone counts as deleted.
pub async fn delete<K>(w: &Writer<'_>, api: &Api<K>, name: &str) -> Result<(), Failure>
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Clone + Debug,
{
    w.metrics.wrote(w.cluster, &K::kind(&()), "delete");
    info!(cluster = %w.cluster, kind = %K::kind(&()), %name, "deleting");
    match api.delete(name, &Default::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(write_failure(&format!("deleting {} {name}", K::kind(&())), e)),
    }
}

/// Reads an object, or `None` when it does not exist.
pub async fn read<K>(api: &Api<K>, name: &str) -> Result<Option<K>, Failure>
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Clone + Debug,
{
    api.get_opt(name).await.map_err(|e| read_failure(&format!("reading {} {name}", K::kind(&())), e))
}

/// A failed write to a member's API, as a per-member failure.
pub fn write_failure(what: &str, e: kube::Error) -> Failure {
    Failure::new("WriteFailed", format!("{what}: {e}"))
}

/// A failed read from a member's API, as a per-member failure.
pub fn read_failure(what: &str, e: kube::Error) -> Failure {
    Failure::new("ReadFailed", format!("{what}: {e}"))
}

fn json<T: Serialize>(v: &T) -> Option<serde_json::Value> {
    serde_json::to_value(v).ok()
}

/// Deletes every object meshfed labelled for `fref` and this writer's cluster in a member that leaves: `cacerts`,
/// remote secrets and the reader identity (the Istio namespace is handled by the caller: it may not be meshfed's).
pub async fn delete_owned(w: &Writer<'_>, fref: &FederationRef, member: &Member) -> Result<(), Failure> {
    let client = &member.client;
    let lp = ListParams::default().labels(&fref.selector(w.cluster));
    delete_labelled(w, &Api::<Secret>::all(client.clone()), &lp, |m| Api::namespaced(client.clone(), m)).await?;
    delete_labelled(w, &Api::<ServiceAccount>::all(client.clone()), &lp, |m| Api::namespaced(client.clone(), m))
        .await?;
    delete_labelled(w, &Api::<ClusterRoleBinding>::all(client.clone()), &lp, |_| Api::all(client.clone())).await?;
    delete_labelled(w, &Api::<ClusterRole>::all(client.clone()), &lp, |_| Api::all(client.clone())).await
}

async fn delete_labelled<K>(
    w: &Writer<'_>,
    all: &Api<K>,
    lp: &ListParams,
    scoped: impl Fn(&str) -> Api<K>,
) -> Result<(), Failure>
where
    K: kube::Resource<DynamicType = ()> + serde::de::DeserializeOwned + Clone + std::fmt::Debug,
{
    let found = all.list_metadata(lp).await.map_err(|e| read_failure("listing owned objects", e))?;
    for obj in found.items {
        let api = scoped(obj.metadata.namespace.as_deref().unwrap_or_default());
        delete(w, &api, &obj.name_any()).await?;
    }
    Ok(())
}
