//! Writes to members: server-side apply with meshfed's field manager, only where the observed object does not already
//! hold what the plan wants, so that a steady state writes nothing.

use std::fmt::Debug;

use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
};
use meshfed_core::plan::{FIELD_MANAGER, Failure, holds};
use serde::{Serialize, de::DeserializeOwned};

/// Applies `desired` unless `observed` already holds it. Returns whether it wrote.
pub async fn ensure<K>(api: &Api<K>, observed: Option<&K>, desired: &K) -> Result<bool, Failure>
where
    K: Resource<DynamicType = ()> + Serialize + DeserializeOwned + Clone + Debug,
{
    let unchanged = observed.is_some_and(|o| json(o).is_some_and(|o| json(desired).is_some_and(|d| holds(&o, &d))));
    if unchanged {
        return Ok(false);
    }
    let name = desired.name_any();
    api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(desired))
        .await
        .map_err(|e| write_failure(&format!("applying {} {name}", K::kind(&())), e))?;
    Ok(true)
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
