//! Remote access, the IO half (the plan is `meshfed_core::remote`): the reader identity in every member, one
//! short-lived token per member read, and the remote secrets that every Primary holds for every other member.
//!
//! It runs in two steps. Per member, with the rest of that member's work: apply the reader identity and read the
//! remote secrets the member already holds. Then across members: pick or request one token per member read, and
//! write and prune remote secrets where they differ from the plan. A member that is down keeps what it holds; its
//! peers' secrets for it stay in place until their tokens expire.

use std::{collections::BTreeMap, time::Duration};

use futures::future::join_all;
use jiff::Timestamp;
use k8s_openapi::api::{
    core::v1::{Secret, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use kube::{
    Api, ResourceExt,
    api::{ListParams, PostParams},
};
use meshfed_api::{ClusterSpec, MeshFederationSpec};
use meshfed_core::{
    pki,
    plan::{Failure, FederationRef},
    remote::{self, ReaderIdentity, ReaderToken, RemoteTarget},
};
use tracing::info;

use crate::{
    apply::{self, Writer},
    members::Member,
    metrics::Metrics,
};

/// What the remote-access step needs from one reachable member.
pub struct Observed {
    pub member: Member,
    reader_uid: Option<String>,
    /// The remote secrets meshfed wrote into this member for this federation, in any namespace.
    remote_secrets: Vec<Secret>,
    /// The member's `cacerts`, if any.
    pub cacerts: Option<Secret>,
}

/// The remote-access result for one member.
#[derive(Debug, Default)]
pub struct Outcome {
    pub failure: Option<Failure>,
    pub token_expires_at: Option<Timestamp>,
}

/// Applies the member's reader identity and reads the remote secrets it holds.
pub async fn observe_member(
    w: &Writer<'_>,
    fref: &FederationRef,
    spec: &MeshFederationSpec,
    cluster: &ClusterSpec,
    member: Member,
) -> Result<Observed, Failure> {
    let reader = remote::reader_objects(fref, spec, cluster);
    let client = member.client.clone();
    let sa = apply::ensure_fresh(w, &Api::namespaced(client.clone(), &spec.istio.namespace), &reader.service_account)
        .await?;
    apply::ensure_fresh(w, &Api::<ClusterRole>::all(client.clone()), &reader.cluster_role).await?;
    apply::ensure_fresh(w, &Api::<ClusterRoleBinding>::all(client.clone()), &reader.cluster_role_binding).await?;
    let lp = ListParams::default().labels(&remote::remote_secret_selector(fref, &cluster.name));
    let remote_secrets =
        Api::<Secret>::all(client).list(&lp).await.map_err(|e| apply::read_failure("listing remote secrets", e))?.items;
    let cacerts =
        apply::read(&Api::namespaced(member.client.clone(), &spec.istio.namespace), pki::CACERTS_SECRET).await?;
    Ok(Observed { member, reader_uid: sa.uid(), remote_secrets, cacerts })
}

/// Gives every holder the remote secrets the topology asks for, each with a valid token, and removes the rest.
/// `observed` holds the members that answered; `ttl` is the spec's token lifetime.
pub async fn converge(
    metrics: &Metrics,
    fref: &FederationRef,
    spec: &MeshFederationSpec,
    observed: &BTreeMap<String, &Observed>,
    ttl: Duration,
    timeout: Duration,
    now: Timestamp,
) -> BTreeMap<String, Outcome> {
    let placement = remote::remote_secret_placement(spec);
    let mut outcomes: BTreeMap<String, Outcome> = BTreeMap::new();

    // One token per member that some holder reads: the freshest one the holders keep, or a new one.
    let readable = spec.clusters.iter().filter(|c| placement.values().any(|targets| targets.contains(&c.name)));
    let tokens = join_all(readable.filter_map(|target| {
        let o = observed.get(&target.name)?;
        Some(async move { (target, token_for(metrics, spec, target, o, observed, ttl, now, timeout).await) })
    }))
    .await;
    let mut ready: BTreeMap<&str, (RemoteTarget, ReaderToken)> = BTreeMap::new();
    for (target, result) in tokens {
        let outcome = outcomes.entry(target.name.clone()).or_default();
        match result {
            Ok((remote_target, token, expires_at)) => {
                outcome.token_expires_at = Some(expires_at);
                ready.insert(&target.name, (remote_target, token));
            }
            Err(f) => outcome.failure = Some(f),
        }
    }

    // Every holder: write what differs, delete what the topology no longer asks for.
    let ready = &ready;
    let writes = spec.clusters.iter().filter_map(|holder| {
        let o = observed.get(&holder.name)?;
        let targets = placement.get(&holder.name).cloned().unwrap_or_default();
        Some(async move {
            let w = Writer { cluster: &holder.name, metrics };
            let work = write_holder(&w, fref, spec, holder, o, &targets, ready);
            let result = match tokio::time::timeout(timeout, work).await {
                Ok(r) => r,
                Err(_) => Err(Failure::new("Timeout", format!("writing remote secrets took longer than {timeout:?}"))),
            };
            (holder.name.clone(), result)
        })
    });
    for (holder, result) in join_all(writes).await {
        if let Err(f) = result {
            outcomes.entry(holder).or_default().failure.get_or_insert(f);
        }
    }
    outcomes
}

/// The token for `target`: one that holders keep and that may stay, or a new one from its TokenRequest API.
#[allow(clippy::too_many_arguments)]
async fn token_for(
    metrics: &Metrics,
    spec: &MeshFederationSpec,
    target: &ClusterSpec,
    o: &Observed,
    observed: &BTreeMap<String, &Observed>,
    ttl: Duration,
    now: Timestamp,
    timeout: Duration,
) -> Result<(RemoteTarget, ReaderToken, Timestamp), Failure> {
    let ns = &spec.istio.namespace;
    let remote_target = RemoteTarget::from_kubeconfig(target, &o.member.kubeconfig)
        .ok_or_else(|| Failure::new("KubeconfigInvalid", "the kubeconfig names no server for its current context"))?;
    let secret_name = remote::remote_secret_name(&target.name);
    let held: Vec<ReaderToken> = observed
        .values()
        .flat_map(|h| &h.remote_secrets)
        .filter(|s| s.metadata.name.as_deref() == Some(&secret_name) && s.metadata.namespace.as_deref() == Some(ns))
        .filter_map(|s| remote::token_in_remote_secret(s, &target.name))
        .collect();
    let reader = ReaderIdentity { namespace: ns, uid: o.reader_uid.as_deref() };
    if let Some((token, expires_at)) = remote::choose_token(&held, &reader, ttl, now) {
        return Ok((remote_target, token.clone(), expires_at));
    }
    metrics.wrote(&target.name, "TokenRequest", "create");
    let sas: Api<ServiceAccount> = Api::namespaced(o.member.client.clone(), ns);
    let (params, body) = (PostParams::default(), remote::token_request(ttl));
    let request = sas.create_token_request(remote::READER_SERVICE_ACCOUNT, &params, &body);
    let refused = |detail: String| {
        Failure::new(
            "TokenRequestFailed",
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
    let token = ReaderToken::new(status.token);
    info!(cluster = %target.name, expires = %status.expiration_timestamp.0, "requested a reader token");
    Ok((remote_target, token, status.expiration_timestamp.0))
}

/// Writes the remote secrets `holder` should hold and deletes the ones it should not.
async fn write_holder(
    w: &Writer<'_>,
    fref: &FederationRef,
    spec: &MeshFederationSpec,
    holder: &ClusterSpec,
    o: &Observed,
    targets: &[String],
    ready: &BTreeMap<&str, (RemoteTarget, ReaderToken)>,
) -> Result<(), Failure> {
    let ns = &spec.istio.namespace;
    let secrets: Api<Secret> = Api::namespaced(o.member.client.clone(), ns);
    for target in targets {
        let Some((remote_target, token)) = ready.get(target.as_str()) else { continue };
        let desired = remote::remote_secret(fref, spec, holder, remote_target, token);
        let name = desired.name_any();
        let current = o
            .remote_secrets
            .iter()
            .find(|s| s.metadata.name == desired.metadata.name && s.metadata.namespace.as_deref() == Some(ns));
        if !current.is_some_and(|c| remote::remote_secret_holds(c, &desired)) {
            apply::apply(w, &secrets, &name, &desired)
                .await
                .map_err(|f| Failure::new("RemoteSecretWriteFailed", f.message))?;
        }
    }
    let stale =
        remote::remote_secrets_to_prune(fref, &holder.name, ns, targets, o.remote_secrets.iter().map(|s| &s.metadata));
    for meta in stale {
        let api: Api<Secret> = Api::namespaced(o.member.client.clone(), meta.namespace.as_deref().unwrap_or(ns));
        apply::delete(w, &api, meta.name.as_deref().unwrap_or_default()).await?;
    }
    Ok(())
}
