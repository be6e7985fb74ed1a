//! Watches in the members on what meshfed owns there, so that drift (a deleted `cacerts`, an edited remote secret,
//! a removed network label) triggers a reconcile of the owning federation at once instead of at the next resync.
//!
//! One metadata-only watch per owned kind per member, filtered by meshfed's `managed-by` label; every event is
//! mapped by the object's federation labels to that federation. A member's watches start when a reconcile first
//! reaches it, restart when its kubeconfig Secret changes, and stop when no federation uses the member any more.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
};

use futures::{StreamExt, stream::select_all};
use kube::{
    Api, Client, ResourceExt,
    api::DynamicObject,
    core::PartialObjectMeta,
    runtime::{WatchStreamExt, reflector::ObjectRef, watcher},
};
use meshfed_api::MeshFederation;
use meshfed_core::{
    member::{OWNED_KINDS, OwnedKind},
    plan::{FIELD_MANAGER, LABEL_FEDERATION, LABEL_FEDERATION_NAMESPACE, MANAGED_BY, label_value},
};
use prometheus_client::metrics::gauge::Gauge;
use tokio::{sync::mpsc, task::JoinHandle};

/// The running member watches, and which federation uses which member.
pub struct MemberWatches {
    triggers: mpsc::UnboundedSender<ObjectRef<MeshFederation>>,
    state: Mutex<State>,
    /// The federations' names by their labels (namespace, [`LABEL_FEDERATION`] value): a name over 63 characters
    /// is labelled in a shortened form, which a watch event maps back to the federation here.
    names: Names,
    /// How many members are watched.
    gauge: Gauge,
}

type Names = Arc<Mutex<HashMap<(String, String), String>>>;

#[derive(Default)]
struct State {
    /// By member id, the Secret version the watches were built from and their task.
    running: HashMap<String, (String, JoinHandle<()>)>,
    /// By federation (`namespace/name`), the ids of the members it uses.
    users: HashMap<String, BTreeSet<String>>,
}

impl MemberWatches {
    /// The watches, and the stream of federations their events point at (for `Controller::reconcile_on`).
    pub fn new(gauge: Gauge) -> (Self, mpsc::UnboundedReceiver<ObjectRef<MeshFederation>>) {
        let (triggers, rx) = mpsc::unbounded_channel();
        (Self { triggers, state: Mutex::default(), names: Names::default(), gauge }, rx)
    }

    /// Makes sure `member`'s watches run on `client`, built from Secret version `version`, for `federation`.
    pub fn ensure(&self, federation: &str, member: &str, version: &str, client: &Client) {
        if let Some((namespace, name)) = federation.split_once('/') {
            let key = (namespace.to_string(), label_value(name));
            self.names.lock().expect("names lock").insert(key, name.to_string());
        }
        let mut state = self.state.lock().expect("watches lock");
        state.users.entry(federation.into()).or_default().insert(member.into());
        if state.running.get(member).is_some_and(|(v, task)| v == version && !task.is_finished()) {
            return;
        }
        let task = tokio::spawn(watch_member(client.clone(), self.triggers.clone(), self.names.clone()));
        if let Some((_, old)) = state.running.insert(member.to_string(), (version.to_string(), task)) {
            old.abort();
        }
        self.gauge.set(state.running.len() as i64);
    }

    /// Records that `federation` now uses exactly `members` (none once it is gone), and stops the watches of
    /// members that no federation uses.
    pub fn used_by(&self, federation: &str, members: BTreeSet<String>) {
        let mut state = self.state.lock().expect("watches lock");
        if members.is_empty() {
            state.users.remove(federation);
            if let Some((namespace, name)) = federation.split_once('/') {
                self.names.lock().expect("names lock").remove(&(namespace.to_string(), label_value(name)));
            }
        } else {
            state.users.insert(federation.into(), members);
        }
        let State { running, users } = &mut *state;
        running.retain(|member, (_, task)| {
            let used = users.values().any(|m| m.contains(member));
            if !used {
                task.abort();
            }
            used
        });
        self.gauge.set(running.len() as i64);
    }
}

impl Drop for MemberWatches {
    fn drop(&mut self) {
        for (_, task) in self.state.lock().expect("watches lock").running.values() {
            task.abort();
        }
    }
}

async fn watch_member(client: Client, triggers: mpsc::UnboundedSender<ObjectRef<MeshFederation>>, names: Names) {
    let config = watcher::Config::default().labels(&format!("{MANAGED_BY}={FIELD_MANAGER}"));
    let mut all = select_all(OWNED_KINDS.iter().map(|kind| owners(&client, kind, &config, names.clone())));
    while let Some(owner) = all.next().await {
        if triggers.send(owner).is_err() {
            return;
        }
    }
}

/// The federations that the objects of `kind` meshfed owns in a member belong to, as they change.
fn owners(
    client: &Client,
    kind: &OwnedKind,
    config: &watcher::Config,
    names: Names,
) -> futures::stream::BoxStream<'static, ObjectRef<MeshFederation>> {
    let api = Api::<PartialObjectMeta<DynamicObject>>::all_with(client.clone(), &crate::apply::api_resource(kind));
    watcher(api, config.clone())
        .default_backoff()
        .touched_objects()
        .filter_map(move |obj| {
            let owner = obj.ok().and_then(|obj| {
                let labels = obj.labels();
                let key = (labels.get(LABEL_FEDERATION_NAMESPACE)?.clone(), labels.get(LABEL_FEDERATION)?.clone());
                // A short name is its own label; a long one is known from the reconcile that reached this member.
                let name = names.lock().expect("names lock").get(&key).cloned().unwrap_or_else(|| key.1.clone());
                Some(ObjectRef::new(&name).within(&key.0))
            });
            futures::future::ready(owner)
        })
        .boxed()
}
