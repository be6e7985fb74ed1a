//! Watches in the members on what meshfed owns there, so that drift (a deleted `cacerts`, an edited remote secret,
//! a removed network label) triggers a reconcile of the owning federation at once instead of at the next resync.
//!
//! One metadata-only watch per owned kind per member, filtered by meshfed's `managed-by` label; every event is
//! mapped by the object's federation labels to that federation. A member's watches start when a reconcile first
//! reaches it, and restart when its kubeconfig Secret changes.

use std::{collections::HashMap, sync::Mutex};

use futures::{StreamExt, stream::select_all};
use k8s_openapi::api::{
    core::v1::{Namespace, Secret, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    core::PartialObjectMeta,
    runtime::{WatchStreamExt, reflector::ObjectRef, watcher},
};
use meshfed_api::MeshFederation;
use meshfed_core::plan::{FIELD_MANAGER, LABEL_FEDERATION, LABEL_FEDERATION_NAMESPACE, MANAGED_BY};
use tokio::{sync::mpsc, task::JoinHandle};

/// The running member watches, keyed by member (kubeconfig Secret) with the Secret version they were built from.
pub struct MemberWatches {
    triggers: mpsc::UnboundedSender<ObjectRef<MeshFederation>>,
    running: Mutex<HashMap<String, (String, JoinHandle<()>)>>,
}

impl MemberWatches {
    /// The watches, and the stream of federations their events point at (for `Controller::reconcile_on`).
    pub fn new() -> (Self, mpsc::UnboundedReceiver<ObjectRef<MeshFederation>>) {
        let (triggers, rx) = mpsc::unbounded_channel();
        (Self { triggers, running: Mutex::default() }, rx)
    }

    /// Makes sure `member`'s watches run on `client`, built from Secret version `version`.
    pub fn ensure(&self, member: &str, version: &str, client: &Client) {
        let mut running = self.running.lock().expect("watches lock");
        if running.get(member).is_some_and(|(v, task)| v == version && !task.is_finished()) {
            return;
        }
        let task = tokio::spawn(watch_member(client.clone(), self.triggers.clone()));
        if let Some((_, old)) = running.insert(member.to_string(), (version.to_string(), task)) {
            old.abort();
        }
    }
}

impl Drop for MemberWatches {
    fn drop(&mut self) {
        for (_, task) in self.running.lock().expect("watches lock").values() {
            task.abort();
        }
    }
}

async fn watch_member(client: Client, triggers: mpsc::UnboundedSender<ObjectRef<MeshFederation>>) {
    let config = watcher::Config::default().labels(&format!("{MANAGED_BY}={FIELD_MANAGER}"));
    let streams = vec![
        owners::<Namespace>(&client, &config),
        owners::<Secret>(&client, &config),
        owners::<ServiceAccount>(&client, &config),
        owners::<ClusterRole>(&client, &config),
        owners::<ClusterRoleBinding>(&client, &config),
    ];
    let mut all = select_all(streams);
    while let Some(owner) = all.next().await {
        if triggers.send(owner).is_err() {
            return;
        }
    }
}

/// The federations that the objects of kind `K` meshfed owns in a member belong to, as they change.
fn owners<K>(
    client: &Client,
    config: &watcher::Config,
) -> futures::stream::BoxStream<'static, ObjectRef<MeshFederation>>
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    watcher(Api::<PartialObjectMeta<K>>::all(client.clone()), config.clone())
        .default_backoff()
        .touched_objects()
        .filter_map(|obj| async move {
            let obj = obj.ok()?;
            let labels = obj.labels();
            Some(ObjectRef::new(labels.get(LABEL_FEDERATION)?).within(labels.get(LABEL_FEDERATION_NAMESPACE)?))
        })
        .boxed()
}
