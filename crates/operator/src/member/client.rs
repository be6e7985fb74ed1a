//! Clients for member clusters, built from kubeconfig Secrets in the federation's namespace.
//!
//! A kubeconfig is checked before any client is built from it (no `exec`, auth providers or file paths), and the
//! client is cached by the Secret's uid and resourceVersion, so it is rebuilt only when the Secret changes.

use meshfed_core::conditions::Reason;
use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use jiff::{SignedDuration, Timestamp};

use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client, Config, ResourceExt,
    config::{KubeConfigOptions, Kubeconfig},
};
use meshfed_api::SecretKeyRef;
use meshfed_core::{federation::Failure, kubeconfig, status::MemberReport};

/// A member's client, with the checked kubeconfig it was built from (whose server and CA peers use too).
#[derive(Clone)]
pub struct Member {
    /// Which kubeconfig Secret (`namespace/name/key`) the client comes from, and the Secret's uid/resourceVersion.
    pub id: String,
    pub version: String,
    pub client: Client,
    pub server: String,
    pub kubeconfig: Kubeconfig,
    /// What the kubeconfig authenticates with (no secret): whether and when meshfed renews it.
    pub credential: meshfed_core::credential::Credential,
    /// How far the member's clock runs ahead of the hub's, in milliseconds, as last measured by [`Member::probe`].
    clock: Arc<AtomicI64>,
}

/// A member clock offset beyond this is worth a warning: its tokens' times are read with the offset corrected.
const SKEW_WARNING: SignedDuration = SignedDuration::from_secs(30);

impl Member {
    /// Asks the member's API server for its version, and measures its clock from the response's `Date` header
    /// against this machine's clock (the system clock, not the controller's: tests move that one for everyone).
    pub async fn probe(&self) -> Result<k8s_openapi::apimachinery::pkg::version::Info, kube::Error> {
        let request =
            http::Request::get("/version").body(kube::client::Body::empty()).map_err(kube::Error::HttpError)?;
        let sent = Timestamp::now();
        let response = self.client.send(request).await?;
        let received = Timestamp::now();
        let date = response.headers().get(http::header::DATE).and_then(|d| d.to_str().ok());
        if let Some(offset) = date.and_then(|d| meshfed_core::remote::member_clock_offset(d, sent, received)) {
            let before = SignedDuration::from_millis(self.clock.swap(offset.as_millis() as i64, Ordering::Relaxed));
            if offset.abs() >= SKEW_WARNING && before.abs() < SKEW_WARNING {
                tracing::warn!(server = %self.server, offset = %format!("{offset:#}"), "the member's clock differs from the hub's; meshfed corrects token times for it");
            }
        }
        if !response.status().is_success() {
            // The typed call reports the API's error as kube does everywhere else.
            return self.client.apiserver_version().await;
        }
        let body = response.into_body().collect_bytes().await?;
        serde_json::from_slice(&body).map_err(kube::Error::SerdeError)
    }

    /// How far the member's clock runs ahead of the hub's, as last measured by [`Member::probe`] (zero before).
    pub fn clock_offset(&self) -> SignedDuration {
        SignedDuration::from_millis(self.clock.load(Ordering::Relaxed))
    }
}

type Key = (String, String, String);

/// The id of the member whose kubeconfig is `secret` in the hub namespace `namespace`: `namespace/name/key`.
pub fn member_id(namespace: &str, secret: &SecretKeyRef) -> String {
    format!("{namespace}/{}/{}", secret.name, secret.key)
}

/// Member clients, keyed by the kubeconfig Secret they were built from.
#[derive(Default)]
pub struct ClientPool {
    cache: Mutex<HashMap<Key, (String, Member)>>,
}

impl ClientPool {
    /// The client for the member whose kubeconfig is in `secret` of `namespace` in the hub.
    pub async fn member(
        &self,
        hub: &Client,
        namespace: &str,
        secret: &SecretKeyRef,
        connect_timeout: Duration,
    ) -> Result<Member, Failure> {
        let where_ = format!("Secret {namespace}/{} key {:?}", secret.name, secret.key);
        let s = Api::<Secret>::namespaced(hub.clone(), namespace)
            .get_opt(&secret.name)
            .await
            .map_err(|e| {
                Failure::new(Reason::KubeconfigSecretUnreadable, format!("cannot read {where_} in the hub: {e}"))
            })?
            .ok_or_else(|| Failure::new(Reason::KubeconfigSecretMissing, format!("{where_} does not exist")))?;
        let version = format!("{}/{}", s.uid().unwrap_or_default(), s.resource_version().unwrap_or_default());
        let key = (namespace.to_string(), secret.name.clone(), secret.key.clone());
        if let Some((v, member)) = self.cache.lock().expect("pool lock").get(&key)
            && *v == version
        {
            return Ok(member.clone());
        }
        let bytes = s.data.as_ref().and_then(|d| d.get(&secret.key)).ok_or_else(|| {
            Failure::new(Reason::KubeconfigKeyMissing, format!("{where_}: the Secret has no such key"))
        })?;
        let yaml = std::str::from_utf8(&bytes.0)
            .map_err(|_| Failure::new(Reason::KubeconfigInvalid, format!("{where_}: not UTF-8 text")))?;
        let (kc, server) = kubeconfig::check(yaml).map_err(|e| Failure::new(e.reason(), format!("{where_}: {e}")))?;
        let mut config = Config::from_custom_kubeconfig(kc.clone(), &KubeConfigOptions::default())
            .await
            .map_err(|e| Failure::new(Reason::KubeconfigInvalid, format!("{where_}: {e}")))?;
        config.connect_timeout = Some(connect_timeout);
        let client = multiplexed_client(config)
            .map_err(|e| Failure::new(Reason::KubeconfigInvalid, format!("{where_}: {e}")))?;
        let member = Member {
            id: member_id(namespace, secret),
            version: version.clone(),
            client,
            server,
            kubeconfig: kc,
            credential: meshfed_core::credential::credential(yaml),
            clock: Arc::default(),
        };
        self.cache.lock().expect("pool lock").insert(key, (version, member.clone()));
        Ok(member)
    }

    /// Drops the clients of members that no federation uses (by member id): their connections close.
    pub fn retain(&self, used: &BTreeSet<String>) {
        self.cache.lock().expect("pool lock").retain(|_, (_, m)| used.contains(&m.id));
    }
}

/// A client that speaks HTTP/2 where the API server does (every Kubernetes API server does), so that every request
/// and every watch to a cluster (a member, or the hub) share one connection: one TLS handshake per member instead of one per concurrent
/// request, and one connection's memory instead of one per watch. Otherwise as kube's own client: the kubeconfig's
/// TLS, authentication and headers, and retries of 429, 503 and 504. A connection that stops answering is found by HTTP/2 pings and replaced.
pub fn multiplexed_client(config: Config) -> Result<Client, kube::Error> {
    use hyper_util::{
        client::legacy::{Client as HttpClient, connect::HttpConnector},
        rt::{TokioExecutor, TokioTimer},
    };
    use kube::client::{ConfigExt, retry::RetryPolicy};
    use tower::retry::RetryLayer;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(config.connect_timeout);
    // HTTP/2 writes a request as several frames: Nagle's algorithm would hold the last one for the peer's delayed ACK.
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config.rustls_client_config()?)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http);
    let connection = HttpClient::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .http2_keep_alive_interval(Duration::from_secs(30))
        .http2_keep_alive_timeout(Duration::from_secs(10))
        .http2_keep_alive_while_idle(true)
        .build(https);
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.default_retry.then(|| RetryLayer::new(RetryPolicy::server_retry())))
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(tower::BoxError::from)
        .service(connection);
    Ok(Client::new(service, config.default_namespace))
}

/// Backoff for members that fail, per federation (a failure such as a claim held by another federation is one
/// federation's own): after `n` failures in a row a member is not contacted again for
/// `base * 2^(n-1)`, at most `max`, and keeps reporting its last failure meanwhile (and, when that contact reached it,
/// its Kubernetes version: a member that refused a write is still reachable). A success, or a change of its
/// kubeconfig Secret, ends it. Reconciles that other members trigger meanwhile do not wait on it.
#[derive(Default)]
pub struct Backoff {
    failing: Mutex<HashMap<(String, String), Failing>>,
}

struct Failing {
    version: String,
    failures: u32,
    retry_at: Instant,
    last: Failure,
    /// The member's Kubernetes version, when the failing contact reached it.
    reached: Option<String>,
}

impl Backoff {
    /// The failure to report to `federation` instead of contacting `member` (built from Secret `version`), while
    /// it waits, and the member's Kubernetes version when that failure came from a member that answered.
    pub fn waiting(&self, federation: &str, member: &Member) -> Option<(Failure, Option<String>)> {
        let failing = self.failing.lock().expect("backoff lock");
        let f = failing.get(&(federation.to_string(), member.id.clone()))?;
        (f.version == member.version && Instant::now() < f.retry_at).then(|| (f.last.clone(), f.reached.clone()))
    }

    /// Records how contacting `member` for `federation` went, as `report` says.
    pub fn record(&self, federation: &str, member: &Member, report: &MemberReport, base: Duration, max: Duration) {
        let mut failing = self.failing.lock().expect("backoff lock");
        let key = (federation.to_string(), member.id.clone());
        let Some(failure) = &report.failure else {
            failing.remove(&key);
            return;
        };
        let failures = match failing.get(&key) {
            Some(f) if f.version == member.version => f.failures + 1,
            _ => 1,
        };
        let retry_at = Instant::now() + delay(failures, base, max);
        let last = failure.clone();
        let entry =
            Failing { version: member.version.clone(), failures, retry_at, last, reached: report.version.clone() };
        failing.insert(key, entry);
    }
}

impl Backoff {
    /// Forgets the failures of `federation`'s members other than `used` (members that left it, or all of them once
    /// it is gone).
    pub fn retain(&self, federation: &str, used: &BTreeSet<String>) {
        self.failing.lock().expect("backoff lock").retain(|(f, m), _| f != federation || used.contains(m));
    }
}

/// `base * 2^(failures-1)`, at most `max`.
fn delay(failures: u32, base: Duration, max: Duration) -> Duration {
    base.saturating_mul(1 << failures.saturating_sub(1).min(16)).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(version: &str) -> Member {
        let config = Config::new("https://127.0.0.1:1".parse().unwrap());
        Member {
            id: "mesh-system/east-kubeconfig/kubeconfig".into(),
            version: version.into(),
            client: Client::try_from(config).unwrap(),
            server: "https://127.0.0.1:1".into(),
            kubeconfig: Kubeconfig::default(),
            credential: meshfed_core::credential::Credential::Unknown,
            clock: Arc::default(),
        }
    }

    #[tokio::test]
    async fn a_failing_member_waits_until_its_time_a_success_or_a_new_secret() {
        let backoff = Backoff::default();
        let (base, max) = (Duration::from_millis(500), Duration::from_secs(60));
        let down = Failure::new(Reason::Unreachable, "connection refused");
        let mut report =
            MemberReport::new("east", &SecretKeyRef { name: "east".into(), key: "kubeconfig".into() }, false);
        report.failure = Some(down.clone());
        let east = member("uid/1");
        assert_eq!(backoff.waiting("ns/prod", &east), None, "a member that never failed is tried");
        backoff.record("ns/prod", &east, &report, base, max);
        assert_eq!(backoff.waiting("ns/prod", &east), Some((down.clone(), None)), "it reports its last failure");
        assert_eq!(backoff.waiting("ns/staging", &east), None, "to the federation that saw it fail only");
        assert_eq!(backoff.waiting("ns/prod", &member("uid/2")), None, "a changed kubeconfig Secret is tried at once");
        tokio::time::sleep(base).await;
        assert_eq!(backoff.waiting("ns/prod", &east), None, "tried again once the wait is over");
        report.version = Some("v1.34.2".into());
        backoff.record("ns/prod", &east, &report, base, max);
        tokio::time::sleep(base).await;
        let waiting = backoff.waiting("ns/prod", &east);
        assert_eq!(
            waiting,
            Some((down, Some("v1.34.2".into()))),
            "twice as long; a member that answered stays reached"
        );
        report.failure = None;
        backoff.record("ns/prod", &east, &report, base, max);
        assert_eq!(backoff.waiting("ns/prod", &east), None, "a success ends the backoff");
    }

    #[tokio::test]
    async fn what_is_kept_for_members_no_longer_used_is_released() {
        let (backoff, pool) = (Backoff::default(), ClientPool::default());
        let east = member("uid/1");
        let mut report =
            MemberReport::new("east", &SecretKeyRef { name: "east".into(), key: "kubeconfig".into() }, false);
        report.failure = Some(Failure::new(Reason::Unreachable, "down"));
        let hour = Duration::from_secs(3600);
        for federation in ["ns/prod", "ns/staging"] {
            backoff.record(federation, &east, &report, hour, hour);
        }
        let key = ("mesh-system".to_string(), "east-kubeconfig".to_string(), "kubeconfig".to_string());
        pool.cache.lock().unwrap().insert(key, ("uid/1".into(), east.clone()));
        let used = BTreeSet::from([east.id.clone()]);
        // Still used: all kept.
        backoff.retain("ns/prod", &used);
        pool.retain(&used);
        assert!(backoff.waiting("ns/prod", &east).is_some() && pool.cache.lock().unwrap().len() == 1);
        // Prod no longer uses east: its backoff goes, staging's stays; once no federation uses it, its client goes.
        backoff.retain("ns/prod", &BTreeSet::new());
        assert!(backoff.waiting("ns/prod", &east).is_none() && backoff.waiting("ns/staging", &east).is_some());
        pool.retain(&BTreeSet::new());
        assert!(pool.cache.lock().unwrap().is_empty());
    }

    #[test]
    fn the_delay_doubles_from_the_base_up_to_the_cap() {
        let (base, max) = (Duration::from_secs(5), Duration::from_secs(60));
        let delays: Vec<u64> = (1..=7).map(|n| delay(n, base, max).as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 60, 60, 60]);
        assert_eq!(delay(u32::MAX, base, max), max);
    }
}
