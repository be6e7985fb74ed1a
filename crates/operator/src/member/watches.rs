//! Watches in the members on what meshfed owns there, for two uses: drift (a deleted `cacerts`, an edited remote
//! secret, a removed network label) triggers a reconcile of the owning federation at once instead of at the next
//! resync, and a reconcile reads what a member holds from the watches' caches instead of listing every kind again.
//!
//! One watch per owned kind per member, filtered by meshfed's `managed-by` label, each keeping a cache of what it
//! saw, as JSON without `managedFields`, made once per event and shared by every reconcile that reads it; every event
//! is mapped by the object's federation labels to that federation. A
//! member's watches start when a reconcile first reaches it, restart when its kubeconfig Secret changes, and stop
//! when no federation uses the member any more. Once a reconcile that uses the member is done writing there, a kind
//! the member holds nothing of is no longer watched (a Remote on one network holds 7 of the 14 kinds): its cache
//! answers that the member holds none, and meshfed's next write of the kind starts its watch again
//! ([`MemberCache::settle`]).
//!
//! A cache is read only once it shows every write meshfed made there ([`MemberCache::wrote`]): a reconcile never
//! plans on a cache older than its own writes. A kind whose cache is not ready in time (a watch that fails, a CRD
//! that is not installed, a lagging watch) is listed instead, as before the caches.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
};

use kube::{Client, runtime::reflector::ObjectRef};
use meshfed_api::MeshFederation;
use meshfed_core::federation::label_value;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;

use super::cache::{MemberCache, Names, Source};

/// The running member watches, and which federation uses which member.
pub struct MemberWatches {
    triggers: mpsc::UnboundedSender<ObjectRef<MeshFederation>>,
    state: Mutex<State>,
    /// The federations' names by their labels (namespace, [`LABEL_FEDERATION`] value): a name over 63 characters
    /// is labelled in a shortened form, which a watch event maps back to the federation here.
    names: Names,
    /// How many members are watched, and how many kinds in all (as of the last reconcile).
    gauges: (Gauge, Gauge),
}

#[derive(Default)]
struct State {
    /// By member id, the Secret version the watches were built from, their cache and their task.
    running: HashMap<String, Running>,
    /// By federation (`namespace/name`), the ids of the members it uses.
    users: HashMap<String, BTreeSet<String>>,
}

struct Running {
    version: String,
    cache: Arc<MemberCache>,
}

impl MemberWatches {
    /// The watches, and the stream of federations their events point at (for `Controller::reconcile_on`).
    pub fn new(members: Gauge, kinds: Gauge) -> (Self, mpsc::UnboundedReceiver<ObjectRef<MeshFederation>>) {
        let (triggers, rx) = mpsc::unbounded_channel();
        (Self { triggers, state: Mutex::default(), names: Names::default(), gauges: (members, kinds) }, rx)
    }

    /// Sets the gauges from the running watches.
    fn count(&self, running: &HashMap<String, Running>) {
        self.gauges.0.set(running.len() as i64);
        self.gauges.1.set(running.values().map(|r| r.cache.watched()).sum::<usize>() as i64);
    }

    /// Makes sure `member`'s watches of Istio namespace `istio_namespace` run on `client`, built from Secret version
    /// `version`, for `federation`; returns their cache.
    pub fn ensure(
        &self,
        federation: &str,
        member: &str,
        istio_namespace: &str,
        version: &str,
        client: &Client,
    ) -> Arc<MemberCache> {
        let member = &watched(member, istio_namespace);
        if let Some((namespace, name)) = federation.split_once('/') {
            let key = (namespace.to_string(), label_value(name));
            self.names.lock().expect("names lock").insert(key, name.to_string());
        }
        let mut state = self.state.lock().expect("watches lock");
        state.users.entry(federation.into()).or_default().insert(member.into());
        if let Some(r) = state.running.get(member).filter(|r| r.version == version && r.cache.running()) {
            return r.cache.clone();
        }
        let source = Source {
            client: client.clone(),
            triggers: self.triggers.clone(),
            names: self.names.clone(),
            istio_namespace: istio_namespace.to_string(),
        };
        let cache = MemberCache::new(Some(source));
        let running = Running { version: version.to_string(), cache: cache.clone() };
        if let Some(old) = state.running.insert(member.to_string(), running) {
            old.cache.stop();
        }
        // The kinds are counted once the reconcile is done (in `used_by`), not once per member reached.
        self.gauges.0.set(state.running.len() as i64);
        cache
    }

    /// Records that `federation` now uses exactly `members` (their [`watched`] keys; none once it is gone), after a
    /// reconcile: stops the watches of members that no federation uses, and of kinds its members hold nothing of.
    /// Returns the members (their ids) some federation uses.
    pub fn used_by(&self, federation: &str, members: BTreeSet<String>) -> BTreeSet<String> {
        let mut state = self.state.lock().expect("watches lock");
        for m in &members {
            if let Some(r) = state.running.get(m) {
                r.cache.settle();
            }
        }
        if members.is_empty() {
            state.users.remove(federation);
            if let Some((namespace, name)) = federation.split_once('/') {
                self.names.lock().expect("names lock").remove(&(namespace.to_string(), label_value(name)));
            }
        } else {
            state.users.insert(federation.into(), members);
        }
        let State { running, users } = &mut *state;
        running.retain(|member, r| {
            let used = users.values().any(|m| m.contains(member));
            if !used {
                r.cache.stop();
            }
            used
        });
        self.count(running);
        users.values().flatten().map(|w| w.rsplit_once(WATCHED_IN).map_or(w.as_str(), |(m, _)| m).to_string()).collect()
    }
}

/// What one cache watches: a member (its kubeconfig Secret's id) with one Istio namespace, the namespace its
/// namespaced kinds are watched in ([`meshfed_core::kinds::home_namespace`]). Federations that reach a member through
/// one Secret with one Istio namespace share its watches.
pub fn watched(member: &str, istio_namespace: &str) -> String {
    format!("{member}{WATCHED_IN}{istio_namespace}")
}

/// Between a member's id (which a Secret's key cannot contain a space of) and its Istio namespace in [`watched`].
const WATCHED_IN: &str = " in ";

impl Drop for MemberWatches {
    fn drop(&mut self) {
        for r in self.state.lock().expect("watches lock").running.values() {
            r.cache.stop();
        }
    }
}
