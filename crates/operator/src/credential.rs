//! The hub's credential for a member, the IO half of `meshfed_core::credential`: a ServiceAccount token that falls
//! due is renewed with itself (a TokenRequest for its own ServiceAccount in the member), and only that token is
//! replaced in the member's kubeconfig Secret in the hub, by an update that holds the resourceVersion the member's
//! client was built from (the hub permission meshfed already has on Secrets: `update`). A Secret changed meanwhile
//! is left as it is and decided on again at the next reconcile, with the client built from it.

use std::time::Duration;

use anyhow::Context as _;
use jiff::Timestamp;
use k8s_openapi::{
    ByteString,
    api::core::v1::{Secret, ServiceAccount},
};
use kube::{Api, Client, ResourceExt, api::PostParams};
use meshfed_api::SecretKeyRef;
use meshfed_core::{
    credential::{self, Credential, CredentialReport, Renewal},
    federation::FIELD_MANAGER,
    remote::{self, ReaderToken},
};
use tracing::{info, warn};

use crate::member::client::Member;

/// A token of ServiceAccount `namespace/name` from `client`'s TokenRequest API, asking for `ttl`.
pub async fn service_account_token(
    client: &Client,
    namespace: &str,
    name: &str,
    ttl: Duration,
) -> anyhow::Result<ReaderToken> {
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let status = sas
        .create_token_request(name, &PostParams::default(), &remote::token_request(ttl))
        .await
        .with_context(|| format!("requesting a token for ServiceAccount {namespace}/{name}"))?
        .status
        .context("the API server returned no token")?;
    Ok(ReaderToken::new(status.token))
}

/// Renews the credential of `member` (cluster `cluster`, reached with kubeconfig `secret` of the hub namespace
/// `namespace`) when it is due at `now`, within `timeout`; returns what status says of it.
pub async fn renew(
    hub: &Client,
    namespace: &str,
    cluster: &str,
    secret: &SecretKeyRef,
    member: &Member,
    now: Timestamp,
    timeout: Duration,
) -> CredentialReport {
    let renewal = credential::decide(&member.credential, now, member.clock_offset());
    let Renewal::Renew { namespace: sa_namespace, name, ttl } = &renewal else {
        return credential::report(cluster, &member.credential, &renewal, now);
    };
    let renewed = renew_token(hub, namespace, secret, member, sa_namespace, name, *ttl);
    match tokio::time::timeout(timeout, renewed).await {
        Ok(Ok(Some(renewed))) => {
            let expires = renewed.expires_at().map(|t| t.to_string()).unwrap_or_default();
            info!(cluster, %expires, "renewed the hub's credential for the member");
            let renewal = credential::decide(&renewed, now, member.clock_offset());
            credential::report(cluster, &renewed, &renewal, now)
        }
        // The Secret changed since its client was built: decided on again with the new one.
        Ok(Ok(None)) => credential::report(cluster, &member.credential, &renewal, now),
        Ok(Err(e)) => {
            let detail = format!("{e:#}");
            warn!(cluster, "cannot renew the hub's credential for the member: {detail}");
            credential::refused(cluster, &member.credential, &detail)
        }
        Err(_) => credential::refused(cluster, &member.credential, &format!("no answer within {timeout:?}")),
    }
}

/// Requests a token for `sa_namespace/name` in the member and puts it in place of the one in `secret`; the
/// credential the Secret now holds, or `None` when the Secret is no longer the one `member` was built from.
async fn renew_token(
    hub: &Client,
    namespace: &str,
    secret: &SecretKeyRef,
    member: &Member,
    sa_namespace: &str,
    name: &str,
    ttl: Duration,
) -> anyhow::Result<Option<Credential>> {
    let secrets: Api<Secret> = Api::namespaced(hub.clone(), namespace);
    let where_ = format!("Secret {namespace}/{}", secret.name);
    let mut held = secrets.get(&secret.name).await.with_context(|| format!("reading {where_} in the hub"))?;
    let version = format!("{}/{}", held.uid().unwrap_or_default(), held.resource_version().unwrap_or_default());
    if version != member.version {
        return Ok(None);
    }
    let token = service_account_token(&member.client, sa_namespace, name, ttl).await?;
    let data = held.data.get_or_insert_default();
    let yaml = data.get(&secret.key).and_then(|b| std::str::from_utf8(&b.0).ok()).unwrap_or_default();
    let rewritten = credential::with_token(yaml, &token).with_context(|| format!("{where_} key {:?}", secret.key))?;
    let renewed = credential::credential(&rewritten);
    data.insert(secret.key.clone(), ByteString(rewritten.into_bytes()));
    let params = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    match secrets.replace(&secret.name, &params, &held).await {
        Ok(_) => Ok(Some(renewed)),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
        Err(e) => Err(e).with_context(|| {
            format!("writing {where_} in the hub (meshfed's hub permissions need `update` on secrets)")
        }),
    }
}
