//! One member's cache of what meshfed owns there, kept by one watch per kind of the owned-kinds table (started and
//! stopped by [`super::watches::MemberWatches`]): a reconcile reads a member from it instead of listing every kind,
//! once it shows every write meshfed made there ([`MemberCache::wrote`]); a kind the member holds nothing of is not
//! watched until meshfed writes it ([`MemberCache::settle`]).

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use futures::StreamExt;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, ObjectMeta},
    runtime::{
        WatchStreamExt,
        reflector::{Lookup, ObjectRef, Store, store::Writer},
        watcher,
    },
};
use meshfed_api::MeshFederation;
use meshfed_core::{
    federation::{FIELD_MANAGER, LABEL_FEDERATION, LABEL_FEDERATION_NAMESPACE, MANAGED_BY},
    kinds::{self, OWNED_KINDS, ObjectKey, OwnedKind},
};
use serde_json::Value;
use tokio::{
    sync::{Notify, mpsc},
    task::JoinHandle,
    time::Instant,
};

use super::kinds::{api_resource, as_json, key_of};

/// The federations' names by their labels (namespace, federation label value).
pub(super) type Names = Arc<Mutex<HashMap<(String, String), String>>>;

/// How long a read waits for a cache to be listed or to show meshfed's own writes before it lists the kind instead.
const CACHE_WAIT: Duration = Duration::from_secs(2);

/// What one member's watches have seen of everything meshfed owns there, kind by kind.
pub struct MemberCache {
    /// In the order of [`OWNED_KINDS`].
    kinds: Vec<KindCache>,
    /// Woken on every watch event.
    changed: Notify,
    /// meshfed's own writes that the caches do not show yet.
    expected: Mutex<HashMap<ObjectKey, Expected>>,
    /// What a watch starts from (none in unit tests, which play the watches' events).
    source: Option<Source>,
    /// This cache, for the watches it starts.
    me: Weak<MemberCache>,
}

/// What a member's watches start from: its client, where they send the federations of the objects that change, and
/// the federations' names by label.
pub(super) struct Source {
    pub client: Client,
    pub triggers: mpsc::UnboundedSender<ObjectRef<MeshFederation>>,
    pub names: Names,
    /// The Istio namespace: namespaced kinds are watched where meshfed writes them ([`kinds::home_namespace`]).
    pub istio_namespace: String,
}

struct KindCache {
    store: Store<Cached>,
    writer: Mutex<Writer<Cached>>,
    watch: Mutex<Watch>,
}

/// A kind's watch: where it stands, and its task.
struct Watch {
    listing: Listing,
    task: Option<JoinHandle<()>>,
}

/// An object as a watch last showed it, as JSON ([`as_json`]): made once per event, shared by every read.
#[derive(Clone)]
struct Cached(Arc<Value>);

impl Cached {
    fn meta(&self, field: &str) -> Option<Cow<'_, str>> {
        self.0["metadata"][field].as_str().map(Cow::Borrowed)
    }

    fn label(&self, key: &str) -> Option<&str> {
        self.0["metadata"]["labels"][key].as_str()
    }
}

impl Lookup for Cached {
    type DynamicType = ApiResource;

    fn kind(dyntype: &ApiResource) -> Cow<'_, str> {
        dyntype.kind.as_str().into()
    }

    fn group(dyntype: &ApiResource) -> Cow<'_, str> {
        dyntype.group.as_str().into()
    }

    fn version(dyntype: &ApiResource) -> Cow<'_, str> {
        dyntype.version.as_str().into()
    }

    fn plural(dyntype: &ApiResource) -> Cow<'_, str> {
        dyntype.plural.as_str().into()
    }

    fn name(&self) -> Option<Cow<'_, str>> {
        self.meta("name")
    }

    fn namespace(&self) -> Option<Cow<'_, str>> {
        self.meta("namespace")
    }

    fn resource_version(&self) -> Option<Cow<'_, str>> {
        self.meta("resourceVersion")
    }

    fn uid(&self) -> Option<Cow<'_, str>> {
        self.meta("uid")
    }
}

/// Where a kind's watch stands.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Listing {
    /// Its first list is under way.
    Pending,
    /// Its cache holds what the member holds (as of its last event).
    Ready,
    /// Its first list failed (a kind the member does not serve, a credential that may not watch it), or the member's
    /// watches were stopped: not cached.
    Failed,
    /// Not watched: the member held nothing of the kind and meshfed expected no write of it to show, so its cache
    /// (empty) answers until meshfed writes the kind again.
    Idle,
}

/// A write a cache must show before it is read: the object at this resourceVersion or later, or (`gone`) no object.
struct Expected {
    version: u64,
    gone: bool,
}

impl MemberCache {
    /// A cache whose watches run from `source`, every kind's started.
    pub(super) fn new(source: Option<Source>) -> Arc<Self> {
        let kinds = OWNED_KINDS.iter().map(|kind| {
            let writer = Writer::new(api_resource(kind));
            let watch = Watch { listing: Listing::Pending, task: None };
            KindCache { store: writer.as_reader(), writer: Mutex::new(writer), watch: Mutex::new(watch) }
        });
        let cache = Arc::new_cyclic(|me| Self {
            kinds: kinds.collect(),
            changed: Notify::new(),
            expected: Mutex::default(),
            source,
            me: me.clone(),
        });
        for index in 0..OWNED_KINDS.len() {
            cache.start(index, &mut cache.kinds[index].watch.lock().expect("watch lock"));
        }
        cache
    }

    /// Starts the watch of the kind at `index` (its cache is read once it is listed).
    fn start(&self, index: usize, watch: &mut Watch) {
        watch.listing = Listing::Pending;
        if let (Some(_), Some(me)) = (&self.source, self.me.upgrade()) {
            watch.task = Some(tokio::spawn(watch_kind(index, me)));
        }
    }

    /// Stops every watch for good: a reconcile that still holds the cache lists instead, and its writes start no
    /// watch again.
    pub(super) fn stop(&self) {
        for kind in &self.kinds {
            let mut watch = kind.watch.lock().expect("watch lock");
            watch.listing = Listing::Failed;
            if let Some(task) = watch.task.take() {
                task.abort();
            }
        }
    }

    /// How many kinds are watched.
    pub(super) fn watched(&self) -> usize {
        self.kinds.iter().filter(|k| k.watch.lock().expect("watch lock").task.is_some()).count()
    }

    /// Whether every watch that should run runs (a watch ends only when the controller stops listening).
    pub(super) fn running(&self) -> bool {
        self.kinds.iter().all(|k| !k.watch.lock().expect("watch lock").task.as_ref().is_some_and(|t| t.is_finished()))
    }

    /// Stops the watches of the kinds the member holds nothing of, with no write of meshfed's to show: called once a
    /// reconcile that uses the member is done writing. A later write of such a kind starts its watch again, and a
    /// reconcile of another federation that is about to write one finds it in [`Self::wrote`].
    pub fn settle(&self) {
        for (kind, cached) in OWNED_KINDS.iter().zip(&self.kinds) {
            let mut watch = cached.watch.lock().expect("watch lock");
            let expected = || self.expected.lock().expect("expected lock").keys().any(|k| k.kind == *kind);
            if watch.listing == Listing::Ready && cached.store.is_empty() && !expected() {
                watch.listing = Listing::Idle;
                if let Some(task) = watch.task.take() {
                    task.abort();
                }
            }
        }
    }

    /// Records that meshfed wrote `key` and the member answered with `now` (`None`: the object is gone). An object
    /// without meshfed's `managed-by` label leaves the watches' view, so its cache must no longer hold it.
    pub fn wrote(&self, key: &ObjectKey, now: Option<&ObjectMeta>) {
        let owned =
            now.is_some_and(|m| m.labels.as_ref().and_then(|l| l.get(MANAGED_BY)).is_some_and(|v| v == FIELD_MANAGER));
        let version = now.and_then(|m| m.resource_version.as_ref()?.parse().ok()).unwrap_or(u64::MAX);
        let deleting = now.is_some_and(|m| m.deletion_timestamp.is_some());
        let expected = Expected { version, gone: !owned || deleting };
        self.expected.lock().expect("expected lock").insert(key.clone(), expected);
        let Some(index) = OWNED_KINDS.iter().position(|k| *k == key.kind) else { return };
        let mut watch = self.kinds[index].watch.lock().expect("watch lock");
        if watch.listing == Listing::Idle {
            self.start(index, &mut watch);
        }
    }

    /// What the member holds of `kind` with every one of `labels`, as JSON by key, once the cache is listed and shows
    /// meshfed's own writes; `None` when it does not within [`CACHE_WAIT`] (the kind is to be listed).
    pub async fn held(
        &self,
        kind: &OwnedKind,
        labels: &BTreeMap<String, String>,
    ) -> Option<Vec<(ObjectKey, Arc<Value>)>> {
        let store = self.answering(kind).await?;
        let found = store.state_filter(|o| labels.iter().all(|(k, v)| o.label(k) == Some(v)));
        Some(found.into_iter().map(|o| (key_of(kind, &o.0), o.0.clone())).collect())
    }

    /// Object `key` as JSON, when the cache holds it (it carries meshfed's `managed-by` label), is listed and shows
    /// meshfed's own writes; `None` otherwise (it is to be read).
    pub async fn object(&self, key: &ObjectKey) -> Option<Arc<Value>> {
        let store = self.answering(&key.kind).await?;
        Some(store.get(&object_ref(key))?.0.clone())
    }

    /// The cache of `kind`, once it is listed and shows meshfed's own writes; `None` when it does not within
    /// [`CACHE_WAIT`].
    async fn answering(&self, kind: &OwnedKind) -> Option<&Store<Cached>> {
        let cached = &self.kinds[OWNED_KINDS.iter().position(|k| k == kind)?];
        let deadline = Instant::now() + CACHE_WAIT;
        loop {
            let changed = self.changed.notified();
            match cached.watch.lock().expect("watch lock").listing {
                Listing::Failed => return None,
                Listing::Idle => return Some(&cached.store),
                Listing::Ready if self.shows_writes(kind, &cached.store) => return Some(&cached.store),
                _ => {}
            }
            tokio::time::timeout_at(deadline, changed).await.ok()?;
        }
    }

    /// Takes an event of the watch of the kind at `index` (`None`: the watch failed) into its cache.
    fn saw(&self, index: usize, event: Option<watcher::Event<DynamicObject>>) {
        let json = |o| Cached(Arc::new(as_json(&OWNED_KINDS[index], o)));
        let event = event.map(|e| match e {
            watcher::Event::Apply(o) => watcher::Event::Apply(json(o)),
            watcher::Event::Delete(o) => watcher::Event::Delete(json(o)),
            watcher::Event::Init => watcher::Event::Init,
            watcher::Event::InitApply(o) => watcher::Event::InitApply(json(o)),
            watcher::Event::InitDone => watcher::Event::InitDone,
        });
        let kind = &self.kinds[index];
        let mut watch = kind.watch.lock().expect("watch lock");
        // An event of a watch that was stopped meanwhile (it was under way as `settle` or `stop` took the lock) is
        // stale: only the kind's current watch writes its cache. (Unit tests, with no source, play every event.)
        if self.source.is_some() && watch.task.as_ref().is_none_or(|t| Some(t.id()) != tokio::task::try_id()) {
            return;
        }
        match event {
            Some(event) => {
                kind.writer.lock().expect("writer lock").apply_watcher_event(&event);
                match &event {
                    watcher::Event::InitDone => watch.listing = Listing::Ready,
                    watcher::Event::Delete(o) => self.deleted(&key_of(&OWNED_KINDS[index], &o.0), o),
                    _ => {}
                }
            }
            // A cache that was listed stays readable while its watch recovers: it still shows meshfed's writes.
            None if watch.listing == Listing::Pending => watch.listing = Listing::Failed,
            None => {}
        }
        drop(watch);
        self.changed.notify_waiters();
    }

    /// Forgets a write of meshfed's to `key` that the watch showed, then the object's deletion (by someone else, or
    /// a drift): the cache's answer, that the member holds none, is as new as the write.
    fn deleted(&self, key: &ObjectKey, object: &Cached) {
        let version: Option<u64> = object.meta("resourceVersion").and_then(|v| v.parse().ok());
        let mut expected = self.expected.lock().expect("expected lock");
        if expected.get(key).is_some_and(|e| version >= Some(e.version)) {
            expected.remove(key);
        }
    }

    /// Whether the cache of `kind` shows every write meshfed made of that kind; forgets the writes it shows.
    fn shows_writes(&self, kind: &OwnedKind, store: &Store<Cached>) -> bool {
        let mut expected = self.expected.lock().expect("expected lock");
        expected.retain(|key, e| {
            key.kind != *kind || {
                let cached = store.get(&object_ref(key));
                !cached.map_or(e.gone, |o| o.meta("resourceVersion").and_then(|v| v.parse().ok()) >= Some(e.version))
            }
        });
        !expected.keys().any(|key| key.kind == *kind)
    }
}

fn object_ref(key: &ObjectKey) -> ObjectRef<Cached> {
    let name = ObjectRef::new_with(&key.name, api_resource(&key.kind));
    match &key.namespace {
        Some(ns) => name.within(ns),
        None => name,
    }
}

/// Keeps the cache of the kind at `index` of [`OWNED_KINDS`] and sends the federation of every object that changes,
/// until the controller stops listening.
async fn watch_kind(index: usize, cache: Arc<MemberCache>) {
    let Some(Source { client, triggers, names, istio_namespace }) = &cache.source else { return };
    let (kind, client) = (&OWNED_KINDS[index], client.clone());
    let api = match kinds::home_namespace(kind, istio_namespace) {
        Some(ns) => Api::<DynamicObject>::namespaced_with(client, ns, &api_resource(kind)),
        None => Api::<DynamicObject>::all_with(client, &api_resource(kind)),
    };
    let config = watcher::Config::default().labels(&format!("{MANAGED_BY}={FIELD_MANAGER}"));
    let mut events = watcher(api, config).backoff(watch_backoff()).boxed();
    while let Some(event) = events.next().await {
        let owner = match &event {
            Ok(watcher::Event::Apply(o) | watcher::Event::Delete(o) | watcher::Event::InitApply(o)) => owner(o, names),
            _ => None,
        };
        // Into the cache first: the reconcile it triggers reads it.
        cache.saw(index, event.ok());
        if let Some(owner) = owner
            && triggers.send(owner).is_err()
        {
            return;
        }
    }
}

/// How a member's watch retries after an error: from 0.5 s, doubling, at most 2 s (jitter adds up to as much again,
/// so a member's API server that is back is watched again within 4 s). kube's default
/// grows to 30 s, so a member's API server back after a minute's outage went unwatched for up to half a minute
/// more, while its cache served the state from before the outage and a drift there waited for that (measured: 43.6 s
/// for a deleted `cacerts`, against 0.26 s on a settled member). Retrying every few seconds costs a dead member a
/// refused connection per owned kind each time; the member's reconcile backoff is separate.
fn watch_backoff() -> watcher::ExponentialBackoff {
    let builder = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(2))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times();
    builder.into()
}

/// The federation an object meshfed owns belongs to, from its labels.
fn owner(obj: &DynamicObject, names: &Names) -> Option<ObjectRef<MeshFederation>> {
    let labels = obj.metadata.labels.as_ref()?;
    let key = (labels.get(LABEL_FEDERATION_NAMESPACE)?.clone(), labels.get(LABEL_FEDERATION)?.clone());
    // A short name is its own label; a long one is known from the reconcile that reached this member.
    let name = names.lock().expect("names lock").get(&key).cloned().unwrap_or_else(|| key.1.clone());
    Some(ObjectRef::new(&name).within(&key.0))
}

#[cfg(test)]
mod tests {
    use meshfed_core::{federation::FederationRef, kinds::SECRET};
    use watcher::Event;

    use super::*;

    const SECRETS: usize = 7;

    fn labels(cluster: &str) -> BTreeMap<String, String> {
        FederationRef { namespace: "mesh".into(), name: "prod".into() }.owned_labels(cluster)
    }

    fn secret(name: &str, version: u64, cluster: &str) -> DynamicObject {
        let mut o = DynamicObject::new(name, &api_resource(&SECRET)).within("istio-system");
        o.metadata.resource_version = Some(version.to_string());
        o.metadata.labels = Some(labels(cluster));
        o
    }

    fn key(name: &str) -> ObjectKey {
        ObjectKey { kind: SECRET, namespace: Some("istio-system".into()), name: name.into() }
    }

    /// The names and versions a read returns, by name, or `None` when it gives up.
    async fn read(cache: &MemberCache, cluster: &str) -> Option<Vec<(String, String)>> {
        let held = cache.held(&SECRET, &labels(cluster)).await?;
        let mut read: Vec<(String, String)> = held
            .into_iter()
            .map(|(k, v)| (k.name, v["metadata"]["resourceVersion"].as_str().unwrap().into()))
            .collect();
        read.sort();
        Some(read)
    }

    /// The watch of Secrets lists `objects`.
    fn lists(cache: &MemberCache, objects: &[DynamicObject]) {
        assert_eq!(OWNED_KINDS[SECRETS], SECRET);
        cache.saw(SECRETS, Some(Event::Init));
        for o in objects {
            cache.saw(SECRETS, Some(Event::InitApply(o.clone())));
        }
        cache.saw(SECRETS, Some(Event::InitDone));
    }

    fn listed(objects: &[DynamicObject]) -> Arc<MemberCache> {
        let cache = MemberCache::new(None);
        lists(&cache, objects);
        cache
    }

    fn pair(name: &str, version: &str) -> (String, String) {
        (name.into(), version.into())
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_returns_only_the_clusters_objects_and_never_a_cache_older_than_meshfeds_own_writes() {
        let cache = listed(&[secret("a", 5, "west"), secret("b", 6, "west"), secret("c", 6, "east")]);
        assert_eq!(read(&cache, "west").await, Some(vec![pair("a", "5"), pair("b", "6")]));

        // meshfed rewrites a (the member answers with version 7) and deletes b: until the watch shows both, a read
        // waits, and gives up (the kind is then listed) rather than return what meshfed already changed.
        cache.wrote(&key("a"), Some(&secret("a", 7, "west").metadata));
        cache.wrote(&key("b"), None);
        let started = Instant::now();
        assert_eq!(read(&cache, "west").await, None);
        assert_eq!(started.elapsed(), CACHE_WAIT);

        // The events come while a read waits: it returns as soon as the cache shows both writes.
        let events = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            cache.saw(SECRETS, Some(Event::Apply(secret("a", 7, "west"))));
            tokio::time::sleep(Duration::from_millis(100)).await;
            cache.saw(SECRETS, Some(Event::Delete(secret("b", 8, "west"))));
        };
        let started = Instant::now();
        let (held, ()) = tokio::join!(read(&cache, "west"), events);
        assert_eq!(held, Some(vec![pair("a", "7")]));
        assert_eq!(started.elapsed(), Duration::from_millis(200));

        // A later change by someone else (version 9) shows too; the writes it follows are forgotten.
        cache.saw(SECRETS, Some(Event::Apply(secret("a", 9, "west"))));
        assert_eq!(read(&cache, "west").await, Some(vec![pair("a", "9")]));
        assert!(cache.expected.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_object_is_read_by_name_from_the_cache_only_when_it_holds_it_as_meshfed_wrote_it() {
        let cache = listed(&[secret("a", 5, "west")]);
        let version = |v: Option<Arc<Value>>| v.map(|v| v["metadata"]["resourceVersion"].clone());
        assert_eq!(version(cache.object(&key("a")).await), Some("5".into()));
        assert_eq!(cache.object(&key("cacerts")).await, None, "not in the cache: it may be there unlabelled");
        cache.wrote(&key("a"), Some(&secret("a", 7, "west").metadata));
        assert_eq!(cache.object(&key("a")).await, None, "older than meshfed's write");
        cache.saw(SECRETS, Some(Event::Apply(secret("a", 7, "west"))));
        assert_eq!(version(cache.object(&key("a")).await), Some("7".into()));
    }

    #[tokio::test(start_paused = true)]
    async fn an_object_released_or_held_by_finalizers_is_shown_as_the_member_answered() {
        let cache = listed(&[secret("a", 5, "west"), secret("b", 5, "west")]);
        // Released: meshfed's labels are gone, so the watch drops it.
        let mut released = secret("a", 6, "west");
        released.metadata.labels = None;
        cache.wrote(&key("a"), Some(&released.metadata));
        // Deleted while a finalizer holds it: it stays, marked, at a later version.
        let mut deleting = secret("b", 7, "west");
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::UNIX_EPOCH));
        cache.wrote(&key("b"), Some(&deleting.metadata));
        assert_eq!(read(&cache, "west").await, None, "a at 5 and b at 5 are older than the writes");

        cache.saw(SECRETS, Some(Event::Delete(released)));
        cache.saw(SECRETS, Some(Event::Apply(deleting)));
        assert_eq!(read(&cache, "west").await, Some(vec![pair("b", "7")]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_waits_for_the_first_list_and_gives_up_at_once_on_a_watch_that_failed_it() {
        let cache = MemberCache::new(None);
        let list = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            lists(&cache, &[secret("a", 5, "west")]);
        };
        let (held, ()) = tokio::join!(read(&cache, "west"), list);
        assert_eq!(held, Some(vec![pair("a", "5")]));

        // Another kind whose first list fails (not served, or not allowed): read at once by a list instead.
        let cache = MemberCache::new(None);
        cache.saw(SECRETS, None);
        let started = Instant::now();
        assert_eq!(read(&cache, "west").await, None);
        assert_eq!(started.elapsed(), Duration::ZERO);
        // A later list that works makes the cache readable.
        lists(&cache, &[]);
        assert_eq!(read(&cache, "west").await, Some(vec![]));
    }

    fn listing(cache: &MemberCache, index: usize) -> Listing {
        cache.kinds[index].watch.lock().unwrap().listing
    }

    #[tokio::test(start_paused = true)]
    async fn a_kind_the_member_holds_nothing_of_is_not_watched_until_meshfed_writes_it() {
        // Listed empty, and no write of meshfed's to show: no longer watched; its cache answers at once that the
        // member holds none. A kind not listed yet is left alone.
        let cache = listed(&[]);
        cache.settle();
        assert_eq!(listing(&cache, SECRETS), Listing::Idle);
        assert_eq!(listing(&cache, 0), Listing::Pending);
        let started = Instant::now();
        assert_eq!(read(&cache, "west").await, Some(vec![]));
        assert_eq!(started.elapsed(), Duration::ZERO);

        // meshfed writes the kind: its watch starts again, and a read waits for the list that shows the write.
        cache.wrote(&key("a"), Some(&secret("a", 5, "west").metadata));
        assert_eq!(listing(&cache, SECRETS), Listing::Pending);
        let list = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            lists(&cache, &[secret("a", 5, "west")]);
        };
        let (held, ()) = tokio::join!(read(&cache, "west"), list);
        assert_eq!(held, Some(vec![pair("a", "5")]));
        assert_eq!(started.elapsed(), Duration::from_millis(100));

        // Watched while the member holds something of the kind, or a write of meshfed's is still to show.
        cache.settle();
        assert_eq!(listing(&cache, SECRETS), Listing::Ready);
        cache.saw(SECRETS, Some(Event::Delete(secret("a", 6, "west"))));
        cache.wrote(&key("b"), Some(&secret("b", 7, "west").metadata));
        cache.settle();
        assert_eq!(listing(&cache, SECRETS), Listing::Ready);
        cache.saw(SECRETS, Some(Event::Apply(secret("b", 7, "west"))));
        cache.saw(SECRETS, Some(Event::Delete(secret("b", 8, "west"))));
        assert_eq!(read(&cache, "west").await, Some(vec![]));
        cache.settle();
        assert_eq!(listing(&cache, SECRETS), Listing::Idle);

        // Once the member's watches are stopped (no federation uses it), a reconcile that still writes there (its
        // cleanup) lists, and starts no watch again.
        cache.stop();
        cache.wrote(&key("a"), None);
        assert_eq!(listing(&cache, SECRETS), Listing::Failed);
        assert_eq!(read(&cache, "west").await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_kinds_current_watch_writes_its_cache() {
        // A cache whose watches run (against an address nothing answers at): events that do not come from a kind's
        // current watch task, such as one still under way from a watch stopped meanwhile, change nothing.
        let (triggers, _rx) = mpsc::unbounded_channel();
        let client = Client::try_from(kube::Config::new("https://127.0.0.1:1".parse().unwrap())).unwrap();
        let source = Source { client, triggers, names: Names::default(), istio_namespace: "istio-system".into() };
        let cache = MemberCache::new(Some(source));
        lists(&cache, &[secret("a", 5, "west")]);
        assert_eq!(listing(&cache, SECRETS), Listing::Pending);
        assert!(cache.kinds[SECRETS].store.is_empty());
        // The same events from the task that is the kind's current watch are written: the filter lets them through.
        let me = cache.clone();
        let current = tokio::spawn(async move {
            tokio::task::yield_now().await;
            lists(&me, &[secret("a", 5, "west")]);
        });
        let replaced = cache.kinds[SECRETS].watch.lock().expect("watch lock").task.replace(current);
        replaced.into_iter().for_each(|t| t.abort());
        for _ in 0..100 {
            if !cache.kinds[SECRETS].store.is_empty() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(cache.kinds[SECRETS].store.state().len(), 1, "the current watch's list is in the cache");
        cache.stop();
        lists(&cache, &[secret("a", 6, "west")]);
        assert_eq!(listing(&cache, SECRETS), Listing::Failed);
        let held = cache.kinds[SECRETS].store.get(&object_ref(&key("a"))).expect("still the current watch's");
        assert_eq!(held.meta("resourceVersion").as_deref(), Some("5"), "a stopped watch's list changes nothing");
    }
}
