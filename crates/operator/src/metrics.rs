//! Prometheus metrics and the HTTP endpoint that serves them with liveness and readiness.

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Router, http::StatusCode, response::IntoResponse, routing::get};
use jiff::Timestamp;
use meshfed_api::MeshFederationStatus;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub category: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// The reason of the member's failure, as in its conditions.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    pub cluster: String,
    pub kind: String,
    pub verb: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FederationLabels {
    /// `namespace/name` of the federation.
    pub federation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MemberLabels {
    /// `namespace/name` of the federation.
    pub federation: String,
    pub cluster: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
}

/// meshfed's metrics. Cheap to clone: every field is a shared handle.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub reconciles: Counter,
    /// Reconciles that have ended (not served: the difference to `reconciles` is the one in flight). Tests wait on
    /// it to know that a reconcile ran after a change before they assert that nothing was written.
    pub reconciles_finished: Counter,
    pub failures: Family<FailureLabels, Counter>,
    pub reconcile_duration: Histogram,
    pub member_writes: Family<WriteLabels, Counter>,
    pub member_failures: Family<ReasonLabels, Counter>,
    pub status_writes: Counter,
    pub member_reachable: Family<MemberLabels, Gauge>,
    pub member_latency: HistogramFamily<MemberLabels>,
    pub root_expiry: Family<FederationLabels, Gauge>,
    pub intermediate_expiry: Family<MemberLabels, Gauge>,
    pub token_expiry: Family<MemberLabels, Gauge>,
    pub member_watches: Gauge,
    pub kind_watches: Gauge,
    pub member_lists: Family<KindLabels, Counter>,
    ready: Arc<AtomicBool>,
    writes_total: Arc<AtomicU64>,
    /// The clusters each federation has series for, so that the series of a cluster that left are removed.
    clusters: Arc<Mutex<HashMap<String, BTreeSet<String>>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("meshfed");
        let reconciles = Counter::default();
        let failures = Family::<FailureLabels, Counter>::default();
        // Every category is served from the start, at zero, so that a rate over it is defined before any failure.
        for category in crate::Error::CATEGORIES {
            let _ = failures.get_or_create(&FailureLabels { category: category.into() });
        }
        let reconcile_duration = Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]);
        let member_writes = Family::<WriteLabels, Counter>::default();
        let status_writes = Counter::default();
        let member_failures = Family::<ReasonLabels, Counter>::default();
        let member_reachable = Family::<MemberLabels, Gauge>::default();
        let member_latency: HistogramFamily<MemberLabels> = Family::new_with_constructor(latency_histogram);
        let root_expiry = Family::<FederationLabels, Gauge>::default();
        let intermediate_expiry = Family::<MemberLabels, Gauge>::default();
        let token_expiry = Family::<MemberLabels, Gauge>::default();
        let member_watches = Gauge::default();
        let kind_watches = Gauge::default();
        let member_lists = Family::<KindLabels, Counter>::default();
        // Every kind is served from the start, at zero: a steady state stays there.
        for kind in meshfed_core::kinds::OWNED_KINDS {
            let _ = member_lists.get_or_create(&KindLabels { kind: kind.kind.into() });
        }
        registry.register("reconciles", "Reconciles of MeshFederations", reconciles.clone());
        registry.register("reconcile_failures", "Failed reconciles, by error category", failures.clone());
        registry.register("reconcile_duration_seconds", "Duration of one reconcile", reconcile_duration.clone());
        registry.register(
            "member_writes",
            "Writes (apply, create, delete) meshfed made to member clusters, by cluster and kind",
            member_writes.clone(),
        );
        registry.register("status_writes", "Status patches of MeshFederations in the hub", status_writes.clone());
        registry.register(
            "member_failures",
            "Members that failed in a reconcile (unreachable, refused, a write failed, claimed, ...), by reason",
            member_failures.clone(),
        );
        registry.register(
            "member_reachable",
            "1 when the member answered at the last reconcile, else 0",
            member_reachable.clone(),
        );
        registry.register(
            "member_latency_seconds",
            "Round trip of the version probe to each member, once per reconcile",
            member_latency.clone(),
        );
        registry.register(
            "root_expiry_timestamp_seconds",
            "When the federation's root CA certificate expires (Unix time)",
            root_expiry.clone(),
        );
        registry.register(
            "intermediate_expiry_timestamp_seconds",
            "When each member's intermediate CA certificate expires (Unix time)",
            intermediate_expiry.clone(),
        );
        registry.register(
            "reader_token_expiry_timestamp_seconds",
            "When the reader token that peers use for each member expires (Unix time)",
            token_expiry.clone(),
        );
        registry.register(
            "member_watches",
            "Member clusters whose owned objects meshfed watches for drift",
            member_watches.clone(),
        );
        registry.register(
            "kind_watches",
            "Watches open on member clusters: one per kind a member holds of meshfed's, or is written",
            kind_watches.clone(),
        );
        registry.register(
            "member_lists",
            "Lists of a member's objects, by kind, where its watch's cache could not answer (not listed yet, its list failed, or not showing meshfed's own writes within 2 s)",
            member_lists.clone(),
        );
        Self {
            registry: Arc::new(registry),
            reconciles,
            reconciles_finished: Counter::default(),
            failures,
            reconcile_duration,
            member_writes,
            member_failures,
            status_writes,
            member_reachable,
            member_latency,
            root_expiry,
            intermediate_expiry,
            token_expiry,
            member_watches,
            kind_watches,
            member_lists,
            ready: Arc::default(),
            writes_total: Arc::default(),
            clusters: Arc::default(),
        }
    }
}

impl Metrics {
    /// Counts one write to a member.
    pub fn wrote(&self, cluster: &str, kind: &str, verb: &str) {
        let labels = WriteLabels { cluster: cluster.into(), kind: kind.into(), verb: verb.into() };
        self.member_writes.get_or_create(&labels).inc();
        self.writes_total.fetch_add(1, Ordering::Relaxed);
    }

    /// The total of writes to members so far, over every label.
    pub fn member_writes_total(&self) -> u64 {
        self.writes_total.load(Ordering::Relaxed)
    }

    /// Records one round trip to a member.
    pub fn member_answered(&self, federation: &str, cluster: &str, took: Duration) {
        let labels = MemberLabels { federation: federation.into(), cluster: cluster.into() };
        self.member_latency.get_or_create(&labels).observe(took.as_secs_f64());
        // Tracked at once, so that a member reached by a reconcile on an outdated status (one that still lists it as
        // leaving) loses this series too when the next status leaves it out.
        let mut clusters = self.clusters.lock().expect("metrics lock");
        clusters.entry(federation.into()).or_default().insert(cluster.into());
    }

    /// Sets the per-federation and per-member gauges from the status a reconcile computed (`federation` is
    /// `namespace/name`), and removes the series of clusters that are no longer in it.
    pub fn observe_status(&self, federation: &str, status: &MeshFederationStatus) {
        let fed = FederationLabels { federation: federation.into() };
        set_or_remove(&self.root_expiry, &fed, status.trust.as_ref().and_then(|t| t.root_not_after.as_deref()));
        for c in &status.clusters {
            let labels = MemberLabels { federation: federation.into(), cluster: c.name.clone() };
            self.member_reachable.get_or_create(&labels).set(i64::from(c.reachable));
            set_or_remove(&self.intermediate_expiry, &labels, c.intermediate_not_after.as_deref());
            set_or_remove(&self.token_expiry, &labels, c.reader_token_expires_at.as_deref());
        }
        self.keep_clusters(federation, status.clusters.iter().map(|c| c.name.clone()).collect());
    }

    /// Counts the failures of one reconcile's members, by reason.
    pub fn members_failed<'a>(&self, failures: impl IntoIterator<Item = &'a meshfed_core::federation::Failure>) {
        for f in failures {
            self.member_failures.get_or_create(&ReasonLabels { reason: f.reason.to_string() }).inc();
        }
    }

    /// Removes every series of a federation that is gone.
    pub fn forget(&self, federation: &str) {
        self.root_expiry.remove(&FederationLabels { federation: federation.into() });
        self.keep_clusters(federation, BTreeSet::new());
    }

    fn keep_clusters(&self, federation: &str, now: BTreeSet<String>) {
        let mut clusters = self.clusters.lock().expect("metrics lock");
        let before = clusters.remove(federation).unwrap_or_default();
        for gone in before.difference(&now) {
            let labels = MemberLabels { federation: federation.into(), cluster: gone.clone() };
            self.member_reachable.remove(&labels);
            self.member_latency.remove(&labels);
            self.intermediate_expiry.remove(&labels);
            self.token_expiry.remove(&labels);
        }
        if !now.is_empty() {
            clusters.insert(federation.into(), now);
        }
    }

    /// Marks the controller ready (its watch is running).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    /// Times a reconcile; the duration is recorded when the guard drops.
    pub fn time_reconcile(&self) -> ReconcileTimer {
        self.reconciles.inc();
        ReconcileTimer {
            start: Instant::now(),
            histogram: self.reconcile_duration.clone(),
            finished: self.reconciles_finished.clone(),
        }
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until the future is dropped.
    pub async fn serve(self, addr: SocketAddr) -> anyhow::Result<()> {
        let metrics = self.clone();
        let ready = self.ready.clone();
        let app = Router::new()
            .route("/metrics", get(move || async move { metrics.render() }))
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/readyz",
                get(move || async move {
                    if ready.load(Ordering::Relaxed) {
                        (StatusCode::OK, "ok").into_response()
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "starting").into_response()
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind(addr).await?;
        axum::serve(listener, app).await?;
        Ok(())
    }
}

/// Sets a timestamp gauge to an RFC 3339 time in Unix seconds, or removes it when there is none.
fn set_or_remove<L: Clone + std::hash::Hash + Eq>(family: &Family<L, Gauge>, labels: &L, time: Option<&str>) {
    match time.and_then(|t| t.parse::<Timestamp>().ok()) {
        Some(t) => {
            family.get_or_create(labels).set(t.as_second());
        }
        None => {
            family.remove(labels);
        }
    }
}

/// Records a reconcile's duration when dropped.
pub struct ReconcileTimer {
    start: Instant,
    histogram: Histogram,
    finished: Counter,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
        self.finished.inc();
    }
}
