//! Cross-cluster discovery: the reader identity in every member, the remote secrets that let each Primary's istiod
//! read the other members, and when the short-lived reader tokens inside them are renewed (ISTIO-FACTS.md sections
//! 2 and 3).
//!
//! The flow the operator runs, per target cluster `T` (the cluster being read):
//! 1. apply [`reader_objects`] in `T`;
//! 2. gather the tokens that holders already keep for `T` ([`token_in_remote_secret`]) and let [`choose_token`]
//!    pick one that may stay; only when none may stay, ask `T`'s TokenRequest API for a new one ([`token_request`]).
//!    The token decision comes from the token's own claims, never from comparing secrets: a fresh token always
//!    differs;
//! 3. in every holder that [`remote_secret_placement`] names, the plan holds [`remote_secret`] with that token
//!    (`crate::member::member_plan`); the generic apply writes it only where it differs, and the generic prune
//!    removes the rest (a removed cluster, a Primary that became a Remote).
//!
//! A new token is written while the old one is still valid for at least a third of its lifetime, and istiod swaps
//! its client for a new kubeconfig only once that client has synced, so no moment has an expired token in place.
//!
//! Tokens are secrets: they live in [`ReaderToken`], whose `Debug` is redacted, and no error here quotes one. A
//! remote [`Secret`] holds one in its data, so never log a `Secret` with `{:?}`.

use std::{collections::BTreeMap, fmt, time::Duration};

use base64::{
    Engine as _, alphabet,
    engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig},
};
use jiff::Timestamp;
use k8s_openapi::{
    ByteString,
    api::{
        authentication::v1::{TokenRequest, TokenRequestSpec},
        core::v1::{Secret, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::config::Kubeconfig;
use meshfed_api::{ClusterRole as Role, ClusterSpec, MeshFederationSpec};
use serde::{Deserialize, Serialize};

use crate::{
    federation::FederationRef,
    istio::{CLUSTER_ANNOTATION, MULTI_CLUSTER_LABEL, remote_secret_name},
};

/// The reader ServiceAccount in every member's Istio namespace. Istio's charts use `istio-reader-service-account`;
/// meshfed keeps its own so that it never fights a chart over an object.
pub const READER_SERVICE_ACCOUNT: &str = "meshfed-reader";
/// The prefix of the reader ClusterRole's and ClusterRoleBinding's name (see [`reader_cluster_role_name`]).
pub const READER_CLUSTER_ROLE_PREFIX: &str = "meshfed-reader";
/// The longest name Kubernetes accepts for an object (a DNS-1123 subdomain), in bytes.
const MAX_NAME_LEN: usize = 253;

/// A granted lifetime may exceed the requested one by this much before the token counts as longer than asked
/// (the API server issues `exp = iat + expirationSeconds` exactly; this only absorbs rounding).
const LIFETIME_SLACK: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------------------------------
// Reader identity
// ---------------------------------------------------------------------------------------------------------------

/// The name of the reader ClusterRole and of its ClusterRoleBinding in every member:
/// `meshfed-reader.<federation namespace>.<federation name>`.
///
/// Cluster-scoped, so it carries the federation's identity: two federations (from one hub or several) that share a
/// member never write the same ClusterRole. The namespace is a DNS label (no dots) and comes first, so the first
/// dot after the prefix ends it and no two federations map to one name (with dashes, `a-b`/`c` and `a`/`b-c` would
/// collide). Should the result exceed 253 bytes (a federation name near its own 253-byte limit), the federation
/// name is cut and a 16-hex-digit FNV-1a hash of the full name is appended; the namespace is never cut.
pub fn reader_cluster_role_name(fed: &FederationRef) -> String {
    federation_scoped_name(READER_CLUSTER_ROLE_PREFIX, fed)
}

/// `<prefix>.<federation namespace>.<federation name>`, cut and hashed as [`reader_cluster_role_name`] says: a
/// cluster-scoped name that is one federation's own.
pub fn federation_scoped_name(prefix: &str, fed: &FederationRef) -> String {
    let full = format!("{prefix}.{}.{}", fed.namespace, fed.name);
    if full.len() <= MAX_NAME_LEN {
        return full;
    }
    let hash = format!("{:016x}", fnv1a64(full.as_bytes()));
    let mut keep = MAX_NAME_LEN - hash.len() - 1;
    while !full.is_char_boundary(keep) {
        keep -= 1;
    }
    // A name must end with an alphanumeric character; the hash does.
    format!("{}-{hash}", full[..keep].trim_end_matches(['.', '-']))
}

/// The reader identity of one member: the ServiceAccount whose tokens peers' istiod use, the ClusterRole with
/// Istio's reader rules, and the binding between them.
#[derive(Debug, Clone, PartialEq)]
pub struct ReaderObjects {
    pub service_account: ServiceAccount,
    pub cluster_role: ClusterRole,
    pub cluster_role_binding: ClusterRoleBinding,
}

/// The reader identity that `cluster` should hold, each object labelled with [`FederationRef::owned_labels`].
///
/// The rules are Istio 1.31's `istio-reader` rules; a Remote (served by an external istiod, which writes into it)
/// additionally gets the configmap and webhook rules of Istio's remote profile. The ServiceAccount mounts no token
/// into pods: its tokens come from the TokenRequest API only, and no `kubernetes.io/service-account-token` Secret
/// is ever created for it.
pub fn reader_objects(fed: &FederationRef, spec: &MeshFederationSpec, cluster: &ClusterSpec) -> ReaderObjects {
    let labels = fed.owned_labels(&cluster.name);
    let namespace = &spec.istio.namespace;
    let role_name = reader_cluster_role_name(fed);
    let service_account = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(READER_SERVICE_ACCOUNT.into()),
            namespace: Some(namespace.clone()),
            labels: Some(labels.clone()),
            ..Default::default()
        },
        automount_service_account_token: Some(false),
        ..Default::default()
    };
    let cluster_role = ClusterRole {
        metadata: ObjectMeta { name: Some(role_name.clone()), labels: Some(labels.clone()), ..Default::default() },
        rules: Some(reader_rules(cluster.role)),
        ..Default::default()
    };
    let cluster_role_binding = ClusterRoleBinding {
        metadata: ObjectMeta { name: Some(role_name.clone()), labels: Some(labels), ..Default::default() },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: role_name,
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: READER_SERVICE_ACCOUNT.into(),
            namespace: Some(namespace.clone()),
            api_group: None,
        }]),
    };
    ReaderObjects { service_account, cluster_role, cluster_role_binding }
}

/// Istio 1.31's reader rules (ISTIO-FACTS.md section 3), plus the external-istiod rules for a Remote.
fn reader_rules(role: Role) -> Vec<PolicyRule> {
    const READ: &[&str] = &["get", "list", "watch"];
    let mut rules = vec![
        rule(
            &[
                "config.istio.io",
                "security.istio.io",
                "networking.istio.io",
                "authentication.istio.io",
                "rbac.istio.io",
                "telemetry.istio.io",
                "extensions.istio.io",
            ],
            &["*"],
            READ,
        ),
        rule(
            &[""],
            &[
                "endpoints",
                "pods",
                "services",
                "nodes",
                "replicationcontrollers",
                "namespaces",
                "secrets",
                "configmaps",
            ],
            READ,
        ),
        rule(&["networking.istio.io"], &["workloadentries"], READ),
        rule(&["gateway.networking.k8s.io"], &["gateways"], READ),
        rule(&["apiextensions.k8s.io"], &["customresourcedefinitions"], READ),
        rule(&["discovery.k8s.io"], &["endpointslices"], READ),
        rule(&["multicluster.x-k8s.io"], &["serviceexports"], &["get", "list", "watch", "create", "delete"]),
        rule(&["multicluster.x-k8s.io"], &["serviceimports"], READ),
        rule(&["apps"], &["replicasets"], READ),
        rule(&["authentication.k8s.io"], &["tokenreviews"], &["create"]),
        rule(&["authorization.k8s.io"], &["subjectaccessreviews"], &["create"]),
    ];
    if role == Role::Remote {
        rules.extend([
            rule(&[""], &["configmaps"], &["create", "update"]),
            rule(
                &["admissionregistration.k8s.io"],
                &["mutatingwebhookconfigurations"],
                &["get", "list", "watch", "update", "patch"],
            ),
            rule(
                &["admissionregistration.k8s.io"],
                &["validatingwebhookconfigurations"],
                &["get", "list", "watch", "update"],
            ),
        ]);
    }
    rules
}

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> PolicyRule {
    let strings = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    PolicyRule {
        api_groups: Some(strings(groups)),
        resources: Some(strings(resources)),
        verbs: strings(verbs),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Placement and pruning
// ---------------------------------------------------------------------------------------------------------------

/// Which cluster holds a remote secret for which: every cluster of the spec is a key (holder), mapped to the
/// clusters it holds remote secrets for, in spec order. A Primary holds one for every other cluster of the
/// federation; a Remote (whose istiod runs elsewhere) holds none. A cluster that left the spec is no key, so it
/// holds none either.
pub fn remote_secret_placement(spec: &MeshFederationSpec) -> BTreeMap<String, Vec<String>> {
    spec.clusters
        .iter()
        .map(|h| (h.name.clone(), remote_secret_targets(spec, h).map(|t| t.name.clone()).collect()))
        .collect()
}

/// The clusters `holder` keeps a remote secret for: every other member when it is a Primary, none when a Remote.
pub fn remote_secret_targets<'a>(
    spec: &'a MeshFederationSpec,
    holder: &'a ClusterSpec,
) -> impl Iterator<Item = &'a ClusterSpec> + 'a {
    let primary = holder.role == Role::Primary;
    spec.clusters.iter().filter(move |t| primary && t.name != holder.name)
}

// ---------------------------------------------------------------------------------------------------------------
// The remote secret
// ---------------------------------------------------------------------------------------------------------------

/// How peers' istiod reach one target cluster's API server; the token comes separately.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteTarget {
    /// The target's cluster name (its Istio cluster ID): the remote secret's data key.
    pub cluster: String,
    /// The API server's URL, for example `https://east.example:6443`.
    pub server: String,
    /// The PEM bundle of CAs that sign the API server's certificate, base64-encoded as in a kubeconfig's
    /// `certificate-authority-data`. `None`: istiod verifies against its system roots.
    pub ca_data_base64: Option<String>,
    /// The name to check the server's certificate against, when it differs from the server's host.
    pub tls_server_name: Option<String>,
}

impl RemoteTarget {
    /// The target as the hub reaches it, from its checked kubeconfig ([`crate::kubeconfig::check`]): the CA data
    /// and TLS server name of the current context's cluster, and the spec's `apiServer` if set, else that cluster's
    /// server. `None` when the kubeconfig names no server for its current context. A CA file path is never copied
    /// (and `check` refuses it anyway); neither is `insecure-skip-tls-verify`.
    pub fn from_kubeconfig(cluster: &ClusterSpec, kubeconfig: &Kubeconfig) -> Option<Self> {
        let current = kubeconfig.current_context.as_deref()?;
        let context = kubeconfig.contexts.iter().find(|c| c.name == current)?.context.as_ref()?;
        let named = kubeconfig.clusters.iter().find(|c| c.name == context.cluster)?.cluster.as_ref()?;
        let server = cluster.api_server.clone().or_else(|| named.server.clone())?;
        Some(Self {
            cluster: cluster.name.clone(),
            server,
            ca_data_base64: named.certificate_authority_data.clone().filter(|d| !d.is_empty()),
            tls_server_name: named.tls_server_name.clone(),
        })
    }
}

/// The remote secret that `holder` keeps for `target`, in the Istio namespace: named
/// `istio-remote-secret-<target>`, labelled `istio/multiCluster: "true"` and with [`FederationRef::owned_labels`]
/// of the holder, annotated `networking.istio.io/cluster: <target>`, with one data key, the target's cluster
/// name, holding a kubeconfig that istiod accepts: one cluster (inline CA data, server), one context, one user
/// with the inline `token`, `current-context` set. No `exec`, no auth provider, no file path.
pub fn remote_secret(
    fed: &FederationRef,
    spec: &MeshFederationSpec,
    holder: &ClusterSpec,
    target: &RemoteTarget,
    token: &ReaderToken,
) -> Secret {
    let name = target.cluster.clone();
    let doc = KubeconfigDoc {
        api_version: "v1".into(),
        kind: "Config".into(),
        clusters: vec![NamedCluster {
            name: name.clone(),
            cluster: ClusterEntry {
                certificate_authority_data: target.ca_data_base64.clone(),
                server: target.server.clone(),
                tls_server_name: target.tls_server_name.clone(),
            },
        }],
        contexts: vec![NamedContext {
            name: name.clone(),
            context: ContextEntry { cluster: name.clone(), user: name.clone() },
        }],
        current_context: name.clone(),
        preferences: BTreeMap::new(),
        users: vec![NamedUser { name: name.clone(), user: UserEntry { token: Some(token.clone()) } }],
    };
    // Strings and maps of strings always serialize; the message names no content. Long strings (the token, the CA
    // data) stay plain one-line scalars, as kubectl writes them, rather than folded blocks.
    let options = serde_saphyr::ser_options! { folded_wrap_chars: usize::MAX };
    let yaml = serde_saphyr::to_string_with_options(&doc, options).expect("a kubeconfig of strings serializes");
    let mut labels = fed.owned_labels(&holder.name);
    labels.insert(MULTI_CLUSTER_LABEL.into(), "true".into());
    Secret {
        metadata: ObjectMeta {
            name: Some(remote_secret_name(&name)),
            namespace: Some(spec.istio.namespace.clone()),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(CLUSTER_ANNOTATION.into(), name.clone())])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(name, ByteString(yaml.into_bytes()))])),
        ..Default::default()
    }
}

/// The reader token in a remote secret for `target`: the inline token of the user of the current context of the
/// kubeconfig under the data key `target`. `None` when the secret has no such key, the kubeconfig does not parse
/// (within the size cap and parser budget of [`crate::yaml`]), or its current context has no inline token.
pub fn token_in_remote_secret(secret: &Secret, target: &str) -> Option<ReaderToken> {
    token_in_kubeconfig(&secret.data.as_ref()?.get(target)?.0)
}

/// The token of a kubeconfig's current user, read within the bounds of `crate::yaml` (a kubeconfig held elsewhere
/// is data someone else wrote, so that a crafted one costs little).
pub fn token_in_kubeconfig(bytes: &[u8]) -> Option<ReaderToken> {
    let doc: KubeconfigDoc = crate::yaml::from_slice(bytes).ok()?;
    let context = doc.contexts.iter().find(|c| c.name == doc.current_context)?;
    let user = doc.users.into_iter().find(|u| u.name == context.context.user)?;
    user.user.token.filter(|t| !t.0.is_empty())
}

/// A kubeconfig as istiod reads it from a remote secret. Not `Debug`: it holds a token.
#[derive(Serialize, Deserialize, Default)]
#[serde(default)]
struct KubeconfigDoc {
    #[serde(rename = "apiVersion")]
    api_version: String,
    kind: String,
    clusters: Vec<NamedCluster>,
    contexts: Vec<NamedContext>,
    #[serde(rename = "current-context")]
    current_context: String,
    preferences: BTreeMap<String, String>,
    users: Vec<NamedUser>,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(default)]
struct NamedCluster {
    name: String,
    cluster: ClusterEntry,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(default, rename_all = "kebab-case")]
struct ClusterEntry {
    #[serde(skip_serializing_if = "Option::is_none")]
    certificate_authority_data: Option<String>,
    server: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_server_name: Option<String>,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(default)]
struct NamedContext {
    name: String,
    context: ContextEntry,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(default)]
struct ContextEntry {
    cluster: String,
    user: String,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(default)]
struct NamedUser {
    name: String,
    user: UserEntry,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(default)]
struct UserEntry {
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<ReaderToken>,
}

// ---------------------------------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------------------------------

/// A reader token (a JWT from the TokenRequest API). Its `Debug` is redacted and it has no `Display`: read it with
/// [`ReaderToken::expose`] only to hand it to the API.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ReaderToken(String);

impl ReaderToken {
    /// Wraps a token, such as `TokenRequest.status.token`.
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// The token itself. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ReaderToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReaderToken(<redacted>)")
    }
}

/// A reader token for one target, with how to reach the target and when the token expires.
#[derive(Debug, Clone)]
pub struct Token {
    pub target: RemoteTarget,
    pub token: ReaderToken,
    pub expires_at: Timestamp,
    /// When it falls due for refresh, by the hub's clock.
    pub refresh_at: Timestamp,
}

/// The TokenRequest to post to `serviceaccounts/meshfed-reader/token` in the target's Istio namespace: a token
/// for the API server's own audience, bound to no object, asking for `ttl` (whole seconds, rounded down; the API
/// server refuses less than 10 minutes, which validation already rules out, and may grant less than asked).
pub fn token_request(ttl: Duration) -> TokenRequest {
    TokenRequest {
        spec: TokenRequestSpec {
            audiences: Vec::new(),
            bound_object_ref: None,
            expiration_seconds: Some(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)),
        },
        ..Default::default()
    }
}

/// What a reader token says about itself (its JWT claims, read without checking the signature: meshfed only
/// decides when to replace a token it handed out; the API server is the one that verifies it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenClaims {
    /// When the token was issued (`iat`).
    pub issued_at: Timestamp,
    /// When the token expires (`exp`).
    pub expires_at: Timestamp,
    /// Who it authenticates as (`sub`), for example `system:serviceaccount:istio-system:meshfed-reader`.
    pub subject: Option<String>,
    /// The UID of the ServiceAccount it was issued for (`kubernetes.io.serviceaccount.uid`). A ServiceAccount that
    /// was deleted and created again has a new UID, and the API server rejects the old one's tokens.
    pub service_account_uid: Option<String>,
}

/// Why a token's claims could not be read. The messages never quote the token or its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is not a JWT (three dot-separated parts)")]
    NotJwt,
    #[error("the token's payload is not base64url")]
    NotBase64,
    #[error("the token's payload is not a JSON object of claims")]
    NotJson,
    #[error("the token has no valid `{0}` claim")]
    MissingClaim(&'static str),
}

/// Reads a token's claims from its JWT payload (base64url, no signature check).
pub fn token_claims(token: &ReaderToken) -> Result<TokenClaims, TokenError> {
    #[derive(Deserialize)]
    struct Raw {
        exp: Option<serde_json::Number>,
        iat: Option<serde_json::Number>,
        sub: Option<String>,
        #[serde(rename = "kubernetes.io")]
        kubernetes: Option<KubernetesClaims>,
    }
    #[derive(Deserialize)]
    struct KubernetesClaims {
        serviceaccount: Option<ServiceAccountClaims>,
    }
    #[derive(Deserialize)]
    struct ServiceAccountClaims {
        uid: Option<String>,
    }
    const BASE64URL: GeneralPurpose = GeneralPurpose::new(
        &alphabet::URL_SAFE,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );

    let [_header, payload, _signature] = token.0.split('.').collect::<Vec<_>>()[..] else {
        return Err(TokenError::NotJwt);
    };
    let json = BASE64URL.decode(payload).map_err(|_| TokenError::NotBase64)?;
    // serde_json's messages can quote values: keep none of them.
    let raw: Raw = serde_json::from_slice(&json).map_err(|_| TokenError::NotJson)?;
    let time = |n: Option<serde_json::Number>, claim| {
        n.and_then(|n| n.as_i64().or_else(|| n.as_f64().map(|f| f.floor() as i64)))
            .and_then(|s| Timestamp::from_second(s).ok())
            .ok_or(TokenError::MissingClaim(claim))
    };
    Ok(TokenClaims {
        issued_at: time(raw.iat, "iat")?,
        expires_at: time(raw.exp, "exp")?,
        subject: raw.sub,
        service_account_uid: raw.kubernetes.and_then(|k| k.serviceaccount).and_then(|sa| sa.uid),
    })
}

/// Whether a token issued at `issued_at` and expiring at `expires_at` should be replaced at `now`, for a spec that
/// asks for tokens living `requested_ttl`.
///
/// Yes when less than a third of the lifetime actually granted (`expires_at - issued_at`) remains: an API server
/// that granted less than asked (its `--service-account-max-token-expiration`) thus gets refreshed sooner. Yes when
/// the token has expired or its times make no sense. Yes when the granted lifetime exceeds `requested_ttl` (the
/// spec's `tokenTTL` was shortened since): the shorter lifetime takes effect at once rather than a whole old
/// lifetime later. At exactly a third remaining, no.
pub fn token_needs_refresh(
    issued_at: Timestamp,
    expires_at: Timestamp,
    requested_ttl: Duration,
    now: Timestamp,
) -> bool {
    let lifetime = expires_at.duration_since(issued_at).as_nanos();
    let remaining = expires_at.duration_since(now).as_nanos();
    let asked = i128::try_from((requested_ttl + LIFETIME_SLACK).as_nanos()).unwrap_or(i128::MAX);
    lifetime <= 0 || remaining <= 0 || remaining * 3 < lifetime || lifetime > asked
}

/// When [`token_needs_refresh`] first says yes for a token issued at `issued_at` and expiring at `expires_at` (of
/// the lifetime asked for): once less than a third of its lifetime remains, plus a second so that a reconcile
/// scheduled for then finds it due.
pub fn token_refresh_at(issued_at: Timestamp, expires_at: Timestamp) -> Timestamp {
    let lifetime = expires_at.duration_since(issued_at);
    shift(shift(expires_at, -(lifetime / 3)), jiff::SignedDuration::from_secs(1))
}

/// How far a member's clock is ahead of the hub's (negative: behind), from the `Date` header of one of its API
/// server's responses (RFC 9110, whole seconds) and the hub's clock when the request was `sent` and its response
/// `received`. The header's second is truncated, so half a second is added; the round trip's midpoint stands for
/// the instant the member stamped. `None` when the header does not parse.
pub fn member_clock_offset(date: &str, sent: Timestamp, received: Timestamp) -> Option<jiff::SignedDuration> {
    let stamped = jiff::fmt::rfc2822::parse(date.trim()).ok()?.timestamp();
    let midpoint = shift(sent, received.duration_since(sent) / 2);
    Some(stamped.duration_since(midpoint) + jiff::SignedDuration::from_millis(500))
}

/// The ServiceAccount a reader token must authenticate as: [`READER_SERVICE_ACCOUNT`] in `namespace` (the target's
/// Istio namespace), and when known, the UID it has now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReaderIdentity<'a> {
    pub namespace: &'a str,
    /// The observed ServiceAccount's `metadata.uid`; `None` when not observed (then only the name is checked).
    pub uid: Option<&'a str>,
}

impl ReaderIdentity<'_> {
    /// The token subject of this ServiceAccount.
    pub fn subject(&self) -> String {
        format!("system:serviceaccount:{}:{READER_SERVICE_ACCOUNT}", self.namespace)
    }
}

/// Why a token is to be replaced; [`RefreshReason::as_str`] is a stable string for Events and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshReason {
    /// There is no token yet.
    Missing,
    /// The token's claims do not parse.
    Unreadable,
    /// The token is for another ServiceAccount, or for an earlier one of the same name.
    OtherServiceAccount,
    /// Less than a third of its lifetime remains, it expired, or it lives longer than the spec now asks.
    Expiring,
}

impl RefreshReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Missing => "TokenMissing",
            Self::Unreadable => "TokenUnreadable",
            Self::OtherServiceAccount => "TokenForOtherServiceAccount",
            Self::Expiring => "TokenExpiring",
        }
    }
}

/// When a token that may stay expires, and when it falls due for refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenTimes {
    /// Its `exp` claim (what status reports, never the token).
    pub expires_at: Timestamp,
    /// By the hub's clock, when [`token_needs_refresh`] will say yes: the next reconcile is due then at the latest.
    pub refresh_at: Timestamp,
}

/// A token's times by the hub's clock: its `iat` and `exp` claims were stamped by the member's clock, which runs
/// `member_clock` ahead of the hub's (see [`member_clock_offset`]; zero when unknown).
fn hub_times(claims: &TokenClaims, member_clock: jiff::SignedDuration) -> (Timestamp, Timestamp) {
    (shift(claims.issued_at, -member_clock), shift(claims.expires_at, -member_clock))
}

/// `t + by`, saturating at the ends of the representable times.
fn shift(t: Timestamp, by: jiff::SignedDuration) -> Timestamp {
    t.saturating_add(by).unwrap_or(t)
}

/// The [`TokenTimes`] of a token just issued, from its claims; `None` when they do not read.
pub fn token_times(token: &ReaderToken, member_clock: jiff::SignedDuration) -> Option<TokenTimes> {
    let claims = token_claims(token).ok()?;
    let (issued_at, expires_at) = hub_times(&claims, member_clock);
    Some(TokenTimes { expires_at: claims.expires_at, refresh_at: token_refresh_at(issued_at, expires_at) })
}

/// Whether an existing token (from [`token_in_remote_secret`]) may stay at `now`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenDecision {
    /// The token may stay.
    Keep(TokenTimes),
    /// Request a new token.
    Refresh(RefreshReason),
}

/// Decides on one existing token: it stays only when it reads, authenticates as `reader`, and
/// [`token_needs_refresh`] says no.
///
/// `now` is the hub's clock and the token's claims the member's: `member_clock` (how far the member's clock runs
/// ahead of the hub's, measured by [`member_clock_offset`]) moves the claims onto the hub's clock first. A member
/// whose clock runs behind thus does not make every fresh token look old (with a 10-minute lifetime and a clock 7
/// minutes behind, each new token would otherwise be due at once: a loop of TokenRequests and writes).
pub fn decide_token(
    existing: Option<&ReaderToken>,
    reader: &ReaderIdentity<'_>,
    requested_ttl: Duration,
    now: Timestamp,
    member_clock: jiff::SignedDuration,
) -> TokenDecision {
    let Some(token) = existing else { return TokenDecision::Refresh(RefreshReason::Missing) };
    let Ok(claims) = token_claims(token) else { return TokenDecision::Refresh(RefreshReason::Unreadable) };
    let uid_differs =
        matches!((reader.uid, claims.service_account_uid.as_deref()), (Some(want), Some(has)) if want != has);
    if claims.subject.as_deref() != Some(reader.subject().as_str()) || uid_differs {
        return TokenDecision::Refresh(RefreshReason::OtherServiceAccount);
    }
    let (issued_at, expires_at) = hub_times(&claims, member_clock);
    if token_needs_refresh(issued_at, expires_at, requested_ttl, now) {
        return TokenDecision::Refresh(RefreshReason::Expiring);
    }
    TokenDecision::Keep(TokenTimes {
        expires_at: claims.expires_at,
        refresh_at: token_refresh_at(issued_at, expires_at),
    })
}

/// Of the tokens that holders keep for one target, the one to keep using everywhere: of those that may stay
/// ([`decide_token`]), the one that expires last, with its times. `None`: request a new token. Sharing one token
/// per target means one TokenRequest per target and lifetime, and a new Primary gets the current token without
/// asking for one.
pub fn choose_token<'a>(
    candidates: impl IntoIterator<Item = &'a ReaderToken>,
    reader: &ReaderIdentity<'_>,
    requested_ttl: Duration,
    now: Timestamp,
    member_clock: jiff::SignedDuration,
) -> Option<(&'a ReaderToken, TokenTimes)> {
    candidates
        .into_iter()
        .filter_map(|t| match decide_token(Some(t), reader, requested_ttl, now, member_clock) {
            TokenDecision::Keep(times) => Some((t, times)),
            TokenDecision::Refresh(_) => None,
        })
        .max_by_key(|(_, times)| times.expires_at)
}

/// FNV-1a, 64 bits: a hash that stays the same across Rust versions (unlike `DefaultHasher`), for stable names.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;
    fn owned_by(meta: &ObjectMeta, fed: &FederationRef, cluster: &str) -> bool {
        crate::member::labelled_for(&serde_json::json!({"metadata": meta}), fed, cluster)
    }
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use jiff::SignedDuration;
    use std::collections::BTreeSet;

    fn fed() -> FederationRef {
        FederationRef { namespace: "mesh-system".into(), name: "prod".into() }
    }

    /// A spec from `name:network:role[:controlPlane]` entries.
    fn spec(clusters: &[&str]) -> MeshFederationSpec {
        let items: String = clusters
            .iter()
            .map(|c| {
                let parts: Vec<&str> = c.split(':').collect();
                let cp = parts.get(3).map(|cp| format!(", controlPlane: {cp}")).unwrap_or_default();
                format!(
                    "- {{name: {0}, network: {1}, role: {2}{cp}, kubeconfigSecretRef: {{name: {0}}}}}\n",
                    parts[0], parts[1], parts[2]
                )
            })
            .collect();
        serde_saphyr::from_str(&format!("meshID: m\ntrust: {{root: {{generate: {{}}}}}}\nclusters:\n{items}")).unwrap()
    }

    fn placement(clusters: &[&str]) -> Vec<(String, Vec<String>)> {
        remote_secret_placement(&spec(clusters)).into_iter().collect()
    }

    fn p(holder: &str, targets: &[&str]) -> (String, Vec<String>) {
        (holder.into(), targets.iter().map(|t| t.to_string()).collect())
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    const SUBJECT: &str = "system:serviceaccount:istio-system:meshfed-reader";

    /// A JWT shaped like the TokenRequest API's, with an unchecked signature.
    fn jwt(claims: serde_json::Value) -> ReaderToken {
        let part = |v: &serde_json::Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
        ReaderToken::new(format!("{}.{}.c2lnbmF0dXJl", part(&serde_json::json!({"alg": "RS256"})), part(&claims)))
    }

    fn token(issued: &str, expires: &str) -> ReaderToken {
        token_for(issued, expires, SUBJECT, "uid-1")
    }

    fn token_for(issued: &str, expires: &str, sub: &str, uid: &str) -> ReaderToken {
        jwt(serde_json::json!({
            "iss": "https://kubernetes.default.svc",
            "aud": ["https://kubernetes.default.svc"],
            "iat": ts(issued).as_second(),
            "nbf": ts(issued).as_second(),
            "exp": ts(expires).as_second(),
            "sub": sub,
            "kubernetes.io": {"namespace": "istio-system", "serviceaccount": {"name": "meshfed-reader", "uid": uid}},
        }))
    }

    const READER: ReaderIdentity<'static> = ReaderIdentity { namespace: "istio-system", uid: Some("uid-1") };
    /// A member whose clock agrees with the hub's.
    const SAME: SignedDuration = SignedDuration::ZERO;
    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn target(name: &str) -> RemoteTarget {
        RemoteTarget {
            cluster: name.into(),
            server: format!("https://{name}.example:6443"),
            ca_data_base64: Some("Q0EgUEVN".into()),
            tls_server_name: None,
        }
    }

    fn kubeconfig_of(secret: &Secret, key: &str) -> serde_json::Value {
        serde_saphyr::from_slice(&secret.data.as_ref().unwrap()[key].0).unwrap()
    }

    // Reader identity

    #[test]
    fn reader_names_carry_the_federation_and_never_collide_across_federations() {
        assert_eq!(reader_cluster_role_name(&fed()), "meshfed-reader.mesh-system.prod");
        let a = FederationRef { namespace: "a-b".into(), name: "c".into() };
        let b = FederationRef { namespace: "a".into(), name: "b-c".into() };
        assert_ne!(reader_cluster_role_name(&a), reader_cluster_role_name(&b));
    }

    #[test]
    fn a_reader_name_over_253_bytes_is_cut_and_hashed_keeping_the_namespace() {
        let long = |tail: &str| FederationRef { namespace: "ns".into(), name: format!("{}{tail}", "x".repeat(300)) };
        let (one, two) = (reader_cluster_role_name(&long("1")), reader_cluster_role_name(&long("2")));
        assert_eq!(one.len(), 253);
        assert!(one.starts_with("meshfed-reader.ns.xxx"), "{one}");
        assert_ne!(one, two);
        assert_eq!(one, reader_cluster_role_name(&long("1")), "stable");
    }

    #[test]
    fn reader_objects_are_owned_named_by_meshfed_and_bound_together() {
        let s = spec(&["east:n1:Primary"]);
        let r = reader_objects(&fed(), &s, &s.clusters[0]);
        for meta in [&r.service_account.metadata, &r.cluster_role.metadata, &r.cluster_role_binding.metadata] {
            assert!(owned_by(meta, &fed(), "east"), "{:?}", meta.name);
            assert!(!meta.name.as_deref().unwrap().starts_with("istio-reader"));
        }
        assert_eq!(r.service_account.metadata.name.as_deref(), Some("meshfed-reader"));
        assert_eq!(r.service_account.metadata.namespace.as_deref(), Some("istio-system"));
        assert_eq!(r.service_account.automount_service_account_token, Some(false));
        let binding = &r.cluster_role_binding;
        assert_eq!(binding.role_ref.name, r.cluster_role.metadata.name.clone().unwrap());
        assert_eq!(
            (binding.role_ref.kind.as_str(), binding.role_ref.api_group.as_str()),
            ("ClusterRole", "rbac.authorization.k8s.io")
        );
        let subject = &binding.subjects.as_ref().unwrap()[0];
        assert_eq!(
            (subject.kind.as_str(), subject.name.as_str(), subject.namespace.as_deref()),
            ("ServiceAccount", "meshfed-reader", Some("istio-system"))
        );
    }

    /// `(group, resource) -> verbs`, merged over all rules.
    fn permissions(role: &ClusterRole) -> BTreeMap<(String, String), BTreeSet<String>> {
        let mut out: BTreeMap<_, BTreeSet<String>> = BTreeMap::new();
        for r in role.rules.as_ref().unwrap() {
            for g in r.api_groups.as_ref().unwrap() {
                for res in r.resources.as_ref().unwrap() {
                    out.entry((g.clone(), res.clone())).or_default().extend(r.verbs.iter().cloned());
                }
            }
        }
        out
    }

    fn verbs(perms: &BTreeMap<(String, String), BTreeSet<String>>, group: &str, resource: &str) -> Vec<String> {
        perms.get(&(group.into(), resource.into())).map(|v| v.iter().cloned().collect()).unwrap_or_default()
    }

    #[test]
    fn a_primary_reader_has_istios_reader_rules_and_nothing_more() {
        let s = spec(&["east:n1:Primary"]);
        let perms = permissions(&reader_objects(&fed(), &s, &s.clusters[0]).cluster_role);
        let read = ["get", "list", "watch"];
        for g in ["config", "security", "networking", "authentication", "rbac", "telemetry", "extensions"] {
            assert_eq!(verbs(&perms, &format!("{g}.istio.io"), "*"), read, "{g}");
        }
        for res in
            ["endpoints", "pods", "services", "nodes", "replicationcontrollers", "namespaces", "secrets", "configmaps"]
        {
            assert_eq!(verbs(&perms, "", res), read, "{res}");
        }
        assert_eq!(verbs(&perms, "networking.istio.io", "workloadentries"), read);
        assert_eq!(verbs(&perms, "gateway.networking.k8s.io", "gateways"), read);
        assert_eq!(verbs(&perms, "apiextensions.k8s.io", "customresourcedefinitions"), read);
        assert_eq!(verbs(&perms, "discovery.k8s.io", "endpointslices"), read);
        assert_eq!(
            verbs(&perms, "multicluster.x-k8s.io", "serviceexports"),
            ["create", "delete", "get", "list", "watch"]
        );
        assert_eq!(verbs(&perms, "multicluster.x-k8s.io", "serviceimports"), read);
        assert_eq!(verbs(&perms, "apps", "replicasets"), read);
        assert_eq!(verbs(&perms, "authentication.k8s.io", "tokenreviews"), ["create"]);
        assert_eq!(verbs(&perms, "authorization.k8s.io", "subjectaccessreviews"), ["create"]);
        assert_eq!(perms.len(), 7 + 8 + 9, "no rule beyond Istio's reader rules");
        assert!(verbs(&perms, "admissionregistration.k8s.io", "mutatingwebhookconfigurations").is_empty());
    }

    #[test]
    fn a_remote_reader_also_gets_what_an_external_istiod_writes() {
        let s = spec(&["east:n1:Primary", "west:n1:Remote:east"]);
        let perms = permissions(&reader_objects(&fed(), &s, &s.clusters[1]).cluster_role);
        assert_eq!(verbs(&perms, "", "configmaps"), ["create", "get", "list", "update", "watch"]);
        assert_eq!(
            verbs(&perms, "admissionregistration.k8s.io", "mutatingwebhookconfigurations"),
            ["get", "list", "patch", "update", "watch"]
        );
        assert_eq!(
            verbs(&perms, "admissionregistration.k8s.io", "validatingwebhookconfigurations"),
            ["get", "list", "update", "watch"]
        );
        assert_eq!(verbs(&perms, "", "secrets"), ["get", "list", "watch"]);
    }

    // Placement

    #[test]
    fn multi_primary_on_one_network_every_primary_holds_every_other_cluster() {
        assert_eq!(
            placement(&["east:n1:Primary", "west:n1:Primary", "north:n1:Primary"]),
            [p("east", &["west", "north"]), p("north", &["east", "west"]), p("west", &["east", "north"])]
        );
    }

    #[test]
    fn multi_primary_on_several_networks_is_placed_the_same_way() {
        assert_eq!(placement(&["east:n1:Primary", "west:n2:Primary"]), [p("east", &["west"]), p("west", &["east"])]);
    }

    #[test]
    fn primary_remote_on_one_network_the_primary_holds_the_remote_and_the_remote_holds_none() {
        assert_eq!(placement(&["east:n1:Primary", "west:n1:Remote:east"]), [p("east", &["west"]), p("west", &[])]);
    }

    #[test]
    fn primary_remote_on_several_networks_every_primary_holds_every_remote_and_each_other() {
        assert_eq!(
            placement(&["east:n1:Primary", "west:n2:Remote:east", "south:n3:Primary", "north:n3:Remote:south"]),
            [
                p("east", &["west", "south", "north"]),
                p("north", &[]),
                p("south", &["east", "west", "north"]),
                p("west", &[]),
            ]
        );
    }

    // The remote secret

    #[test]
    fn a_remote_secret_has_istios_name_label_annotation_and_an_inline_kubeconfig() {
        let s = spec(&["east:n1:Primary", "west:n2:Primary"]);
        let t = token("2026-11-22T10:00:00Z", "2026-11-23T10:00:00Z");
        let secret = remote_secret(&fed(), &s, &s.clusters[0], &target("west"), &t);
        assert_eq!(secret.metadata.name.as_deref(), Some("istio-remote-secret-west"));
        assert_eq!(secret.metadata.namespace.as_deref(), Some("istio-system"));
        assert_eq!(secret.metadata.labels.as_ref().unwrap()[MULTI_CLUSTER_LABEL], "true");
        assert!(owned_by(&secret.metadata, &fed(), "east"), "owned by the holder");
        assert_eq!(secret.metadata.annotations.as_ref().unwrap()[CLUSTER_ANNOTATION], "west");
        assert_eq!(secret.data.as_ref().unwrap().keys().collect::<Vec<_>>(), ["west"]);

        let kc = kubeconfig_of(&secret, "west");
        assert_eq!(kc["current-context"], "west");
        assert_eq!(kc["clusters"].as_array().unwrap().len(), 1);
        assert_eq!(kc["clusters"][0]["cluster"]["server"], "https://west.example:6443");
        assert_eq!(kc["clusters"][0]["cluster"]["certificate-authority-data"], "Q0EgUEVN");
        assert_eq!(kc["contexts"][0]["context"]["cluster"], "west");
        assert_eq!(kc["users"][0]["user"]["token"].as_str(), Some(t.expose()));
        assert_eq!(kc["users"][0]["user"].as_object().unwrap().len(), 1, "an inline token and nothing else");
        // What istiod refuses, meshfed's own kubeconfig check refuses too: the secret passes it.
        let yaml = std::str::from_utf8(&secret.data.as_ref().unwrap()["west"].0).unwrap();
        assert!(yaml.contains(&format!("token: {}\n", t.expose())), "the token is one plain line: {}", yaml.len());
        let (_, server) = crate::kubeconfig::check(yaml).unwrap();
        assert_eq!(server, "https://west.example:6443");
        assert_eq!(token_in_remote_secret(&secret, "west"), Some(t));
    }

    #[test]
    fn the_target_comes_from_the_hubs_kubeconfig_unless_the_spec_names_an_api_server() {
        let kc = Kubeconfig::from_yaml(
            "apiVersion: v1\nkind: Config\ncurrent-context: c\ncontexts:\n- {name: c, context: {cluster: k, user: u}}\nclusters:\n- {name: k, cluster: {server: 'https://10.0.0.1:6443', certificate-authority-data: Q0E=, tls-server-name: api.west}}\nusers:\n- {name: u, user: {token: hub-admin}}\n",
        )
        .unwrap();
        let mut s = spec(&["west:n1:Primary"]);
        let t = RemoteTarget::from_kubeconfig(&s.clusters[0], &kc).unwrap();
        assert_eq!(
            t,
            RemoteTarget {
                cluster: "west".into(),
                server: "https://10.0.0.1:6443".into(),
                ca_data_base64: Some("Q0E=".into()),
                tls_server_name: Some("api.west".into()),
            }
        );
        s.clusters[0].api_server = Some("https://west.example:6443".into());
        assert_eq!(RemoteTarget::from_kubeconfig(&s.clusters[0], &kc).unwrap().server, "https://west.example:6443");
    }

    #[test]
    fn no_token_is_found_in_a_secret_without_its_key_or_with_garbage() {
        let s = spec(&["east:n1:Primary", "west:n2:Primary"]);
        let secret = remote_secret(
            &fed(),
            &s,
            &s.clusters[0],
            &target("west"),
            &token("2026-11-22T10:00:00Z", "2026-11-23T10:00:00Z"),
        );
        assert_eq!(token_in_remote_secret(&secret, "north"), None);
        let garbage = Secret {
            data: Some(BTreeMap::from([("west".into(), ByteString(b"users: [".to_vec()))])),
            ..Default::default()
        };
        assert_eq!(token_in_remote_secret(&garbage, "west"), None);
    }

    // Tokens

    #[test]
    fn a_token_never_shows_in_debug_output_or_errors() {
        let t = token("2026-11-22T10:00:00Z", "2026-11-23T10:00:00Z");
        let debug = format!("{:?}", (&t, Some(&t)));
        assert!(!debug.contains(t.expose()) && !debug.contains("eyJ"), "{debug}");
        let bad = ReaderToken::new("s3cr3t.bm90IGpzb24.sig");
        let err = token_claims(&bad).unwrap_err();
        assert_eq!(err, TokenError::NotJson);
        assert!(!err.to_string().contains("s3cr3t") && !err.to_string().contains("not json"), "{err}");
    }

    #[test]
    fn claims_are_read_from_the_jwt_payload() {
        let c = token_claims(&token("2026-11-22T10:00:00Z", "2026-11-23T10:00:00Z")).unwrap();
        assert_eq!(c.issued_at, ts("2026-11-22T10:00:00Z"));
        assert_eq!(c.expires_at, ts("2026-11-23T10:00:00Z"));
        assert_eq!(c.subject.as_deref(), Some(SUBJECT));
        assert_eq!(c.service_account_uid.as_deref(), Some("uid-1"));
        assert_eq!(token_claims(&ReaderToken::new("nodots")), Err(TokenError::NotJwt));
        assert_eq!(token_claims(&ReaderToken::new("a.!!!.c")), Err(TokenError::NotBase64));
        assert_eq!(token_claims(&jwt(serde_json::json!({"iat": 1}))), Err(TokenError::MissingClaim("exp")));
    }

    #[test]
    fn the_token_request_asks_for_the_ttl_in_seconds_for_the_api_servers_audience() {
        let r = token_request(DAY);
        assert_eq!(r.spec.expiration_seconds, Some(86_400));
        assert!(r.spec.audiences.is_empty() && r.spec.bound_object_ref.is_none());
    }

    #[test]
    fn a_token_is_refreshed_only_once_less_than_a_third_of_its_lifetime_remains() {
        let (issued, expires) = (ts("2026-11-22T00:00:00Z"), ts("2026-11-23T00:00:00Z"));
        let third_left = ts("2026-11-22T16:00:00Z");
        let second = SignedDuration::from_secs(1);
        assert!(!token_needs_refresh(issued, expires, DAY, issued));
        assert!(!token_needs_refresh(issued, expires, DAY, third_left - second));
        assert!(!token_needs_refresh(issued, expires, DAY, third_left));
        assert!(token_needs_refresh(issued, expires, DAY, third_left + second));
        assert!(token_needs_refresh(issued, expires, DAY, expires));
        assert!(token_needs_refresh(issued, expires, DAY, expires + second));
    }

    #[test]
    fn a_lifetime_shortened_by_the_api_server_is_refreshed_sooner_not_in_a_loop() {
        // Asked for a day, granted an hour: refresh at 40 minutes, not at once (a third of a day is more than an hour).
        let (issued, expires) = (ts("2026-11-22T00:00:00Z"), ts("2026-11-22T01:00:00Z"));
        assert!(!token_needs_refresh(issued, expires, DAY, issued));
        assert!(!token_needs_refresh(issued, expires, DAY, ts("2026-11-22T00:39:59Z")));
        assert!(token_needs_refresh(issued, expires, DAY, ts("2026-11-22T00:40:01Z")));
    }

    #[test]
    fn a_token_longer_than_the_spec_now_asks_is_replaced_at_once() {
        let (issued, expires) = (ts("2026-11-22T00:00:00Z"), ts("2026-11-23T00:00:00Z"));
        assert!(token_needs_refresh(issued, expires, Duration::from_secs(3600), ts("2026-11-22T00:00:01Z")));
        // ...but a token the length asked for is not.
        assert!(!token_needs_refresh(issued, expires, DAY, ts("2026-11-22T00:00:01Z")));
    }

    #[test]
    fn a_token_with_nonsensical_times_is_refreshed() {
        let t = ts("2026-11-22T00:00:00Z");
        assert!(token_needs_refresh(t, t, DAY, t - SignedDuration::from_hours(1)));
        assert!(token_needs_refresh(t + SignedDuration::from_hours(2), t, DAY, t - SignedDuration::from_hours(1)));
    }

    #[test]
    fn the_decision_on_an_existing_token_comes_from_its_claims() {
        let now = ts("2026-11-22T12:00:00Z");
        let good = token("2026-11-22T10:00:00Z", "2026-11-23T10:00:00Z");
        assert_eq!(
            decide_token(Some(&good), &READER, DAY, now, SAME),
            TokenDecision::Keep(TokenTimes {
                expires_at: ts("2026-11-23T10:00:00Z"),
                refresh_at: ts("2026-11-23T02:00:01Z")
            })
        );
        assert_eq!(decide_token(None, &READER, DAY, now, SAME), TokenDecision::Refresh(RefreshReason::Missing));
        assert_eq!(
            decide_token(Some(&ReaderToken::new("garbage")), &READER, DAY, now, SAME),
            TokenDecision::Refresh(RefreshReason::Unreadable)
        );
        let old = token("2026-11-21T12:00:00Z", "2026-11-22T12:00:00Z");
        assert_eq!(decide_token(Some(&old), &READER, DAY, now, SAME), TokenDecision::Refresh(RefreshReason::Expiring));
    }

    #[test]
    fn a_token_of_a_recreated_or_different_service_account_is_refreshed() {
        let now = ts("2026-11-22T12:00:00Z");
        let stale_uid = token_for("2026-11-22T10:00:00Z", "2026-11-23T10:00:00Z", SUBJECT, "uid-0");
        let other = token_for(
            "2026-11-22T10:00:00Z",
            "2026-11-23T10:00:00Z",
            "system:serviceaccount:x:meshfed-reader",
            "uid-1",
        );
        for t in [&stale_uid, &other] {
            assert_eq!(
                decide_token(Some(t), &READER, DAY, now, SAME),
                TokenDecision::Refresh(RefreshReason::OtherServiceAccount)
            );
        }
        // Without an observed UID only the name is checked.
        let unobserved = ReaderIdentity { uid: None, ..READER };
        assert!(matches!(decide_token(Some(&stale_uid), &unobserved, DAY, now, SAME), TokenDecision::Keep { .. }));
    }

    #[test]
    fn a_restarted_operator_reuses_the_freshest_valid_token_the_holders_keep() {
        let now = ts("2026-11-22T12:00:00Z");
        let s = spec(&["east:n1:Primary", "west:n2:Primary", "north:n3:Primary"]);
        let older = token("2026-11-22T08:00:00Z", "2026-11-23T08:00:00Z");
        let newer = token("2026-11-22T10:00:00Z", "2026-11-23T10:00:00Z");
        let expired = token("2026-11-21T00:00:00Z", "2026-11-22T00:00:00Z");
        let held: Vec<Secret> = [(&s.clusters[1], &older), (&s.clusters[2], &newer)]
            .into_iter()
            .map(|(holder, t)| remote_secret(&fed(), &s, holder, &target("east"), t))
            .collect();
        let found: Vec<ReaderToken> = held.iter().filter_map(|h| token_in_remote_secret(h, "east")).collect();
        let candidates = found.iter().chain([&expired]);
        assert_eq!(
            choose_token(candidates, &READER, DAY, now, SAME),
            Some((
                &newer,
                TokenTimes { expires_at: ts("2026-11-23T10:00:00Z"), refresh_at: ts("2026-11-23T02:00:01Z") }
            ))
        );
        assert_eq!(choose_token([&expired], &READER, DAY, now, SAME), None);
        assert_eq!(choose_token([], &READER, DAY, now, SAME), None);
    }

    // Deadlines and clock skew

    /// A token as a member whose clock reads `issued` stamps it, living `ttl`.
    fn token_at(issued: Timestamp, ttl: Duration) -> ReaderToken {
        let exp = issued + SignedDuration::try_from(ttl).unwrap();
        token_for(&issued.to_string(), &exp.to_string(), SUBJECT, "uid-1")
    }

    #[test]
    fn the_refresh_time_is_the_first_instant_the_refresh_rule_says_yes() {
        let second = SignedDuration::from_secs(1);
        for (issued, expires) in [
            (ts("2026-11-22T00:00:00Z"), ts("2026-11-23T00:00:00Z")),
            (ts("2026-11-22T00:00:00Z"), ts("2026-11-22T00:10:00Z")),
            (ts("2026-11-22T00:00:00Z"), ts("2026-11-22T01:00:00Z")),
        ] {
            let at = token_refresh_at(issued, expires);
            assert!(!token_needs_refresh(issued, expires, DAY, at - second), "{at}");
            assert!(token_needs_refresh(issued, expires, DAY, at), "{at}");
        }
        assert_eq!(
            token_refresh_at(ts("2026-11-22T00:00:00Z"), ts("2026-11-22T00:10:00Z")),
            ts("2026-11-22T00:06:41Z")
        );
    }

    #[test]
    fn a_members_clock_is_read_from_its_date_header() {
        let sent = ts("2026-11-24T08:17:13.000Z");
        let received = ts("2026-11-24T08:17:13.200Z");
        // Seven minutes behind: the member stamped 08:10:13 (and some fraction of that second).
        let offset = member_clock_offset("Tue, 24 Nov 2026 08:10:13 GMT", sent, received).unwrap();
        assert!((offset + SignedDuration::from_mins(7)).abs() <= SignedDuration::from_secs(1), "{offset:?}");
        let offset = member_clock_offset("Tue, 24 Nov 2026 08:17:13 GMT", sent, received).unwrap();
        assert!(offset.abs() <= SignedDuration::from_secs(1), "{offset:?}");
        assert_eq!(member_clock_offset("yesterday", sent, received), None);
    }

    /// Reconciles every 5 s for 30 minutes against a member whose clock runs `member_clock` ahead of the hub's
    /// (negative: behind), with tokens of `ttl`; meshfed corrects by `measured`. Returns how many tokens were
    /// requested, and fails if meshfed ever keeps a token that the member already considers expired.
    fn token_requests_over_30_minutes(ttl: Duration, member_clock: SignedDuration, measured: SignedDuration) -> usize {
        let start = ts("2026-11-24T08:00:00Z");
        let (mut held, mut requests) = (None, 0);
        for step in 0..(30 * 60 / 5) {
            let now = start + SignedDuration::from_secs(5 * step);
            match decide_token(held.as_ref(), &READER, ttl, now, measured) {
                TokenDecision::Refresh(_) => {
                    requests += 1;
                    held = Some(token_at(now + member_clock, ttl));
                }
                TokenDecision::Keep(times) => {
                    assert!(now + member_clock < times.expires_at, "kept an expired token at {now}");
                }
            }
        }
        requests
    }

    #[test]
    fn a_member_clock_seven_minutes_off_causes_no_loop_of_token_requests() {
        let ttl = Duration::from_secs(600);
        let seven = SignedDuration::from_mins(7);
        // A refresh every 6 min 40 s: five tokens in 30 minutes, whatever the member's clock says once measured.
        for member_clock in [SignedDuration::ZERO, -seven, seven] {
            assert_eq!(token_requests_over_30_minutes(ttl, member_clock, member_clock), 5, "{member_clock:?}");
        }
        // Read on the hub's clock alone, a member 7 minutes behind makes every fresh 10-minute token look due:
        // a TokenRequest (and a write to every holder) at every reconcile. This is what the correction prevents.
        assert_eq!(token_requests_over_30_minutes(ttl, -seven, SignedDuration::ZERO), 360);
    }

    #[test]
    fn a_ten_minute_token_never_expires_when_reconciles_follow_the_deadline() {
        // A converged federation reconciles at `plan::next_deadline`; sampled every second over 30 minutes, the
        // token the holders keep is never expired. With only the 5-minute resync it would be (due at 6 min 40 s,
        // looked at again at 10 min: expired).
        let ttl = Duration::from_secs(600);
        let resync = Duration::from_secs(300);
        let start = ts("2026-11-24T08:00:00Z");
        let end = start + SignedDuration::from_mins(30);
        let kubeconfig = meshfed_api::SecretKeyRef { name: "west".into(), key: "kubeconfig".into() };
        let (mut now, mut held, mut requests) = (start, None::<ReaderToken>, 0);
        while now < end {
            let times = match decide_token(held.as_ref(), &READER, ttl, now, SAME) {
                TokenDecision::Keep(times) => times,
                TokenDecision::Refresh(_) => {
                    requests += 1;
                    let t = token_at(now, ttl);
                    let times = token_times(&t, SAME).unwrap();
                    held = Some(t);
                    times
                }
            };
            let mut report = crate::status::MemberReport::new("west", &kubeconfig, false);
            report.token_refresh_at = Some(times.refresh_at);
            let next = now + SignedDuration::try_from(crate::plan::next_deadline(&[report], DAY, now, resync)).unwrap();
            let mut sample = now;
            while sample < next {
                assert!(
                    sample < times.expires_at,
                    "the token expired at {} and was in use at {sample}",
                    times.expires_at
                );
                sample += SignedDuration::from_secs(1);
            }
            now = next;
        }
        assert_eq!(requests, 5);
    }
}
