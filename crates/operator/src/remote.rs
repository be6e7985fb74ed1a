//! Remote access, the IO half (the plan is `meshfed_core::remote`): one short-lived reader token per member that
//! some Primary reads, shared by its holders: the freshest one they keep that may stay, or a new one from the
//! member's TokenRequest API. The remote secrets themselves are planned and written on the member path.

use meshfed_core::conditions::Reason;
use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use futures::future::join_all;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::{Api, api::PostParams};
use meshfed_api::{ClusterSpec, MeshFederationSpec};
use meshfed_core::{
    federation::Failure,
    kinds::{self, ObjectKey},
    kinds::{Holdings, typed},
    remote::{self, ReaderIdentity, ReaderToken, RemoteTarget, Token, TokenTimes},
};
use tracing::info;

use crate::{
    member::{Reached, client::Member},
    metrics::Metrics,
};

/// The token of every member of `spec` that some holder reads and that is among `targets` (members that answered
/// and hold their reader ServiceAccount, or just had it written), or why it has none. `reached` has what every
/// member that answered holds (the tokens holders keep are read from it).
pub async fn tokens(
    metrics: &Metrics,
    spec: &MeshFederationSpec,
    reached: &BTreeMap<String, Reached>,
    targets: &BTreeSet<String>,
    ttl: Duration,
    now: Timestamp,
    timeout: Duration,
) -> BTreeMap<String, Result<Token, Failure>> {
    let placement = remote::remote_secret_placement(spec);
    let read = spec.clusters.iter().filter(|c| placement.values().any(|targets| targets.contains(&c.name)));
    let work = read.filter_map(|target| {
        let r = reached.get(&target.name).filter(|_| targets.contains(&target.name))?;
        Some(async move {
            let token = token_for(metrics, spec, target, &r.member, &r.seen.held, reached, ttl, now, timeout).await;
            (target.name.clone(), token)
        })
    });
    join_all(work).await.into_iter().collect()
}

/// The token for `target`: one that holders keep and that may stay, or a new one from its TokenRequest API.
#[allow(clippy::too_many_arguments)]
async fn token_for(
    metrics: &Metrics,
    spec: &MeshFederationSpec,
    target: &ClusterSpec,
    member: &Member,
    held: &Holdings,
    reached: &BTreeMap<String, Reached>,
    ttl: Duration,
    now: Timestamp,
    timeout: Duration,
) -> Result<Token, Failure> {
    let ns = &spec.istio.namespace;
    let remote_target = RemoteTarget::from_kubeconfig(target, &member.kubeconfig).ok_or_else(|| {
        Failure::new(Reason::KubeconfigInvalid, "the kubeconfig names no server for its current context")
    })?;
    let key = kinds::remote_secret_key(ns, &target.name);
    let kept: Vec<ReaderToken> = reached
        .values()
        .filter_map(|r| typed::<Secret>(&r.seen.held, &key))
        .filter_map(|s| remote::token_in_remote_secret(&s, &target.name))
        .collect();
    let sa_key = ObjectKey {
        kind: kinds::SERVICE_ACCOUNT,
        namespace: Some(ns.clone()),
        name: remote::READER_SERVICE_ACCOUNT.into(),
    };
    let uid = typed::<ServiceAccount>(held, &sa_key).and_then(|sa| sa.metadata.uid);
    let reader = ReaderIdentity { namespace: ns, uid: uid.as_deref() };
    let member_clock = member.clock_offset();
    if let Some((token, times)) = remote::choose_token(&kept, &reader, ttl, now, member_clock) {
        let TokenTimes { expires_at, refresh_at } = times;
        return Ok(Token { target: remote_target, token: token.clone(), expires_at, refresh_at });
    }
    metrics.wrote(&target.name, "TokenRequest", "create");
    let sas: Api<ServiceAccount> = Api::namespaced(member.client.clone(), ns);
    let (params, body) = (PostParams::default(), remote::token_request(ttl));
    let request = sas.create_token_request(remote::READER_SERVICE_ACCOUNT, &params, &body);
    let refused = |detail: String| {
        Failure::new(
            Reason::TokenRequestFailed,
            format!(
                "cannot create a token for ServiceAccount {ns}/{}: {detail}; the hub's credential for this cluster needs `create` on serviceaccounts/token",
                remote::READER_SERVICE_ACCOUNT
            ),
        )
    };
    let status = match tokio::time::timeout(timeout, request).await {
        Ok(Ok(r)) => r.status.ok_or_else(|| refused("the API server returned no token".into()))?,
        Ok(Err(e)) => return Err(refused(e.to_string())),
        Err(_) => return Err(refused(format!("no answer within {timeout:?}"))),
    };
    info!(cluster = %target.name, expires = %status.expiration_timestamp.0, "requested a reader token");
    let token = ReaderToken::new(status.token);
    // Claims that do not read: as if it lived the lifetime asked for from now.
    let asked = jiff::SignedDuration::try_from(ttl).unwrap_or(jiff::SignedDuration::ZERO);
    let fallback = || remote::token_refresh_at(now, now.saturating_add(asked).unwrap_or(now));
    let refresh_at = remote::token_times(&token, member_clock).map_or_else(fallback, |t| t.refresh_at);
    Ok(Token { target: remote_target, token, expires_at: status.expiration_timestamp.0, refresh_at })
}
