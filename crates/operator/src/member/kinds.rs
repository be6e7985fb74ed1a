//! The member's API for every kind of the owned-kinds table alike (built-in or CRD), as JSON: the pair of
//! `meshfed_core::kinds` on the IO side.

use std::sync::Arc;

use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject},
};
use meshfed_core::kinds::{ObjectKey, OwnedKind};
use serde_json::Value;

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

/// The member's API for object `key`'s kind, in its namespace.
pub fn api(client: &Client, key: &ObjectKey) -> Api<DynamicObject> {
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
    ObjectKey::of(*kind, obj)
}

/// An object of `kind` as shared JSON, keyed.
pub(crate) fn keyed(kind: &OwnedKind, obj: DynamicObject) -> (ObjectKey, Arc<Value>) {
    let json = as_json(kind, obj);
    (key_of(kind, &json), Arc::new(json))
}
