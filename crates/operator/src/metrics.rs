//! Prometheus metrics and the HTTP endpoint that serves them with liveness and readiness.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Instant,
};

use axum::{Router, http::StatusCode, response::IntoResponse, routing::get};
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
pub struct WriteLabels {
    pub cluster: String,
    pub kind: String,
    pub verb: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MemberLabels {
    pub federation: String,
    pub cluster: String,
}

/// meshfed's metrics. Cheap to clone: every field is a shared handle.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub reconciles: Counter,
    pub failures: Family<FailureLabels, Counter>,
    pub reconcile_duration: Histogram,
    pub member_writes: Family<WriteLabels, Counter>,
    pub status_writes: Counter,
    pub member_reachable: Family<MemberLabels, Gauge>,
    ready: Arc<AtomicBool>,
    writes_total: Arc<AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("meshfed");
        let reconciles = Counter::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let reconcile_duration = Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]);
        let member_writes = Family::<WriteLabels, Counter>::default();
        let status_writes = Counter::default();
        let member_reachable = Family::<MemberLabels, Gauge>::default();
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
            "member_reachable",
            "1 when the member answered at the last reconcile, else 0",
            member_reachable.clone(),
        );
        Self {
            registry: Arc::new(registry),
            reconciles,
            failures,
            reconcile_duration,
            member_writes,
            status_writes,
            member_reachable,
            ready: Arc::default(),
            writes_total: Arc::default(),
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
        ReconcileTimer { start: Instant::now(), histogram: self.reconcile_duration.clone() }
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

/// Records a reconcile's duration when dropped.
pub struct ReconcileTimer {
    start: Instant,
    histogram: Histogram,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}
