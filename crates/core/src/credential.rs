//! The hub's credential for a member: what the kubeconfig in the member's Secret in the hub authenticates with, when
//! it expires, and whether and when meshfed renews it. Pure: the operator reads the Secret, asks the member for a
//! token and writes the Secret back (`meshfed_operator::credential`); the clock comes in as an argument.
//!
//! Renewed: a token from the TokenRequest API of a ServiceAccount in the member, what `meshfed join` writes. It is
//! known by its claims, read without checking the signature (the member's API server is the one that verifies it):
//! `sub` is `system:serviceaccount:<namespace>:<name>`, it carries the `kubernetes.io` claims of a bound token, and an
//! `exp`. Once a third of its lifetime remains (the rule of the reader tokens, [`remote::token_needs_refresh`]),
//! meshfed asks the member, with that token, for a fresh one of the same lifetime for the same ServiceAccount (join
//! grants `create` on `serviceaccounts/token` for that one ServiceAccount), and replaces only the token in the
//! Secret's kubeconfig, every other byte as it was.
//!
//! Not renewed: a client certificate, a token that is not a ServiceAccount's bound token (a static or OIDC token, a
//! legacy ServiceAccount token without expiry). Status shows when it expires, where it does, and the cluster's
//! `Reachable` condition says that meshfed does not renew it; nothing more until a third of its lifetime remains.
//! From then on, as for a token whose renewal the member refuses, the cluster's `Reachable` and the federation's
//! `ClustersReachable` conditions (still True: the credential works) carry reason `CredentialNotRenewed` with a
//! Warning Event, and the message says what to do. A credential without expiry is never reported.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use crate::{
    conditions::Reason,
    federation::Failure,
    remote::{self, ReaderToken},
};

/// The shortest token lifetime the TokenRequest API grants.
const MIN_TOKEN_TTL: Duration = Duration::from_secs(600);

/// What a member's kubeconfig authenticates with (the user of its current context). Holds no secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A token from the TokenRequest API for ServiceAccount `namespace/name` in the member: renewed.
    ServiceAccountToken { namespace: String, name: String, issued_at: Timestamp, expires_at: Timestamp },
    /// A token that is not a ServiceAccount's bound token, with its `iat` and `exp` where it has both: not renewed.
    OtherToken { validity: Option<(Timestamp, Timestamp)> },
    /// A client certificate, with its `notBefore` and `notAfter` where it parses: not renewed.
    ClientCertificate { validity: Option<(Timestamp, Timestamp)> },
    /// Neither a token nor a client certificate (basic auth, or no credential).
    Unknown,
}

impl Credential {
    /// When it expires, where known.
    pub fn expires_at(&self) -> Option<Timestamp> {
        match self {
            Self::ServiceAccountToken { expires_at, .. } => Some(*expires_at),
            Self::OtherToken { validity } | Self::ClientCertificate { validity } => validity.map(|(_, end)| end),
            Self::Unknown => None,
        }
    }

    /// What it is, for a status message: never the token.
    pub fn describe(&self) -> String {
        match self {
            Self::ServiceAccountToken { namespace, name, .. } => {
                format!("a token of ServiceAccount {namespace}/{name}")
            }
            Self::OtherToken { .. } => "a token that is not a ServiceAccount's from the TokenRequest API".into(),
            Self::ClientCertificate { .. } => "a client certificate".into(),
            Self::Unknown => "neither a token nor a client certificate".into(),
        }
    }
}

/// The credential of kubeconfig `yaml` (as [`crate::kubeconfig::check`] accepts it): the current context's user's.
pub fn credential(yaml: &str) -> Credential {
    if let Some(token) = remote::token_in_kubeconfig(yaml.as_bytes()) {
        let Ok(claims) = remote::token_claims(&token) else { return Credential::OtherToken { validity: None } };
        let account = claims.subject.as_deref().and_then(|s| s.strip_prefix("system:serviceaccount:"));
        return match account.and_then(|a| a.split_once(':')) {
            Some((namespace, name)) if claims.service_account_uid.is_some() => Credential::ServiceAccountToken {
                namespace: namespace.into(),
                name: name.into(),
                issued_at: claims.issued_at,
                expires_at: claims.expires_at,
            },
            _ => Credential::OtherToken { validity: Some((claims.issued_at, claims.expires_at)) },
        };
    }
    let Ok((kc, _)) = crate::kubeconfig::check(yaml) else { return Credential::Unknown };
    let current = kc.current_context.as_deref();
    let context = kc.contexts.iter().find(|c| Some(c.name.as_str()) == current).and_then(|c| c.context.as_ref());
    let user = context.and_then(|c| c.user.as_deref());
    let auth = kc.auth_infos.iter().find(|a| Some(a.name.as_str()) == user).and_then(|a| a.auth_info.as_ref());
    match auth.and_then(|a| a.client_certificate_data.as_deref()) {
        Some(data) => {
            use base64::Engine as _;
            let pem = base64::engine::general_purpose::STANDARD.decode(data.trim()).ok();
            Credential::ClientCertificate { validity: pem.and_then(|p| crate::pki::validity(p).ok()) }
        }
        None => Credential::Unknown,
    }
}

/// What to do with a member's credential now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewal {
    /// Ask the member for a token of ServiceAccount `namespace/name` living `ttl` (the held token's lifetime), and
    /// put it in place of the held one.
    Renew { namespace: String, name: String, ttl: Duration },
    /// Keep it; it falls due at `renew_at` (by the hub's clock).
    Keep { renew_at: Timestamp },
    /// meshfed does not renew it; it is reported from `alarm_at` (once a third of its lifetime remains; `None`: it
    /// does not expire, or its times are unknown).
    NotRenewed { alarm_at: Option<Timestamp> },
}

/// Decides on `credential` at `now` (the hub's clock). A token's `iat` and `exp` were stamped by the member's clock,
/// which runs `member_clock` ahead of the hub's ([`remote::member_clock_offset`]): they are moved onto the hub's
/// clock first, as the reader tokens' are.
pub fn decide(credential: &Credential, now: Timestamp, member_clock: SignedDuration) -> Renewal {
    let shift = |t: Timestamp| t.saturating_sub(member_clock).unwrap_or(t);
    match credential {
        Credential::ServiceAccountToken { namespace, name, issued_at, expires_at } => {
            let (issued_at, expires_at) = (shift(*issued_at), shift(*expires_at));
            let ttl = expires_at.duration_since(issued_at).unsigned_abs().max(MIN_TOKEN_TTL);
            if remote::token_needs_refresh(issued_at, expires_at, ttl, now) {
                Renewal::Renew { namespace: namespace.clone(), name: name.clone(), ttl }
            } else {
                Renewal::Keep { renew_at: remote::token_refresh_at(issued_at, expires_at) }
            }
        }
        Credential::OtherToken { validity } | Credential::ClientCertificate { validity } => {
            Renewal::NotRenewed { alarm_at: validity.map(|(start, end)| remote::token_refresh_at(start, end)) }
        }
        Credential::Unknown => Renewal::NotRenewed { alarm_at: None },
    }
}

/// What status says of the hub's credential for a member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialReport {
    /// When it expires, where known.
    pub expires_at: Option<Timestamp>,
    /// When a reconcile is due for it: its renewal point, or when its alarm starts; `None` when nothing is.
    pub due_at: Option<Timestamp>,
    /// What it is and whether meshfed renews it, for the cluster's `Reachable` condition.
    pub note: String,
    /// Why it is reported (`CredentialNotRenewed`), if it is.
    pub warning: Option<Failure>,
}

/// What to tell a person whose credential for `cluster` cannot be renewed.
fn what_to_do(cluster: &str) -> String {
    format!(
        "run `meshfed join {cluster} --context <the member's context>` again (it writes a ServiceAccount token that meshfed renews, and grants what renewing it needs)"
    )
}

/// The report on `credential` of `cluster`, held as `renewal` decided at `now`: kept, or not renewed by meshfed.
/// A token that [`decide`] would renew at once (one just renewed, on a clock running far ahead) is reported as it
/// is, with nothing due, so that no reconcile loop follows.
pub fn report(cluster: &str, credential: &Credential, renewal: &Renewal, now: Timestamp) -> CredentialReport {
    let expires_at = credential.expires_at();
    let what = credential.describe();
    match renewal {
        Renewal::Keep { renew_at } => CredentialReport {
            expires_at,
            due_at: Some(*renew_at),
            note: format!("the hub's credential is {what}, renewed before it expires"),
            warning: None,
        },
        Renewal::Renew { .. } => CredentialReport {
            expires_at,
            due_at: None,
            note: format!("the hub's credential is {what}, renewed before it expires"),
            warning: None,
        },
        Renewal::NotRenewed { alarm_at } => {
            let note = format!("the hub's credential is {what}, which meshfed does not renew");
            let warning = match (alarm_at, expires_at) {
                (Some(at), Some(expiry)) if *at <= now => Some(Failure::new(
                    Reason::CredentialNotRenewed,
                    format!(
                        "the hub's credential for cluster {cluster} is {what}, which meshfed does not renew, and it expires at {expiry}: {}",
                        what_to_do(cluster)
                    ),
                )),
                _ => None,
            };
            CredentialReport { expires_at, due_at: alarm_at.filter(|at| *at > now), note, warning }
        }
    }
}

/// The report on a token of `cluster` that was due for renewal and could not be renewed, because of `detail`.
pub fn refused(cluster: &str, credential: &Credential, detail: &str) -> CredentialReport {
    let what = credential.describe();
    let expiry = credential.expires_at().map_or_else(|| "?".into(), |t| t.to_string());
    CredentialReport {
        expires_at: credential.expires_at(),
        // Retried at the next resync, not at once: a refusal stays until a person acts.
        due_at: None,
        note: format!("the hub's credential is {what}, renewed before it expires"),
        warning: Some(Failure::new(
            Reason::CredentialNotRenewed,
            format!(
                "the hub's credential for cluster {cluster} ({what}) expires at {expiry} and could not be renewed: {detail}; grant it `create` on serviceaccounts/token for itself, or {}",
                what_to_do(cluster)
            ),
        )),
    }
}

/// Why a kubeconfig's token could not be replaced. The messages never quote a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    #[error("the kubeconfig's current user has no inline token")]
    NoToken,
    #[error("the kubeconfig holds its token more than once")]
    Ambiguous,
    #[error("the new token is not a JWT (letters, digits, `-`, `_` and dots only)")]
    NotJwt,
    #[error("the kubeconfig does not hold the new token where the old one was")]
    NotReplaced,
}

/// Kubeconfig `yaml` with `token` in place of its current user's token, every other byte as it was. The old token
/// must appear exactly once; the new one is a JWT, which YAML takes as it is, quoted or not.
pub fn with_token(yaml: &str, token: &ReaderToken) -> Result<String, RewriteError> {
    let old = remote::token_in_kubeconfig(yaml.as_bytes()).ok_or(RewriteError::NoToken)?;
    let new = token.expose();
    if new.is_empty() || !new.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        return Err(RewriteError::NotJwt);
    }
    if yaml.matches(old.expose()).count() != 1 {
        return Err(RewriteError::Ambiguous);
    }
    let rewritten = yaml.replacen(old.expose(), new, 1);
    match remote::token_in_kubeconfig(rewritten.as_bytes()) {
        Some(held) if held == *token => Ok(rewritten),
        _ => Err(RewriteError::NotReplaced),
    }
}

#[cfg(test)]
#[path = "credential_tests.rs"]
mod tests;
