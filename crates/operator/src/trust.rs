//! Trust, the IO half (the plan is `meshfed_core::pki`): the root CA from the hub, and one intermediate CA per
//! member in its `cacerts` Secret, reissued only when `pki::inspect_cacerts` says so.

use std::{collections::BTreeMap, time::Duration};

use futures::future::join_all;

use jiff::Timestamp;
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ObjectMeta, PostParams},
};
use meshfed_api::{ClusterSpec, MeshFederation, MeshFederationSpec, TrustStatus};
use meshfed_core::{
    pki::{self, CacertsVerdict, CertSummary, IntermediateProfile, Root},
    plan::{Failure, FederationRef},
    rotation::{self, MemberRoots},
    validate::Durations,
};
use tracing::info;

use crate::{
    apply::{self, Writer},
    metrics::Metrics,
    remote_access::Observed,
};

/// Set on a federation with a generated root to ask for a new root: each new value starts one rotation.
pub const ROTATE_ROOT_ANNOTATION: &str = "meshfed.io/rotate-root";

/// The hub Secret that holds a generated root: `<federation>-root-ca` in the federation's namespace.
pub fn root_secret_name(federation: &str) -> String {
    format!("{federation}-root-ca")
}

/// The federation's root CA: the one the user brings, or the generated one, created once. A generated root whose
/// Secret disappeared while the status shows members were given intermediates from it is never replaced silently.
pub async fn root(hub: &Client, fed: &MeshFederation, durations: &Durations, now: Timestamp) -> Result<Root, Failure> {
    let ns = fed.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(hub.clone(), &ns);
    let load = |name: &str, s: Secret| {
        pki::load_root_secret(&s.data.unwrap_or_default(), now)
            .map_err(|e| Failure::new(e.reason(), format!("root CA Secret {name}: {e}")))
    };
    let trust = &fed.spec.trust;
    if let Some(byo) = &trust.root.secret_ref {
        let s = read(&secrets, &byo.name).await?.ok_or_else(|| {
            Failure::new("RootSecretMissing", format!("trust.root.secretRef: Secret {} does not exist", byo.name))
        })?;
        return load(&byo.name, s);
    }
    let (Some(generate), Some(validity)) = (&trust.root.generate, durations.root_validity) else {
        return Err(Failure::new("RootSourceMissing", "set trust.root.generate or trust.root.secretRef"));
    };
    let new_root = || {
        // Key generation is CPU work (seconds for RSA 4096): keep it off the async workers.
        tokio::task::block_in_place(|| pki::generate_root(generate.algorithm, validity, now))
            .map_err(|e| Failure::new(e.reason(), e.to_string()))
    };
    let name = root_secret_name(&fed.name_any());
    let request = fed.annotations().get(ROTATE_ROOT_ANNOTATION).cloned();
    if let Some(mut s) = read(&secrets, &name).await? {
        if request.is_none() || s.annotations().get(ROTATE_ROOT_ANNOTATION) == request.as_ref() {
            return load(&name, s);
        }
        // A rotation was asked for: a new root replaces the old one here (members keep trusting the old one until
        // the rotation is through). `replace` carries the resourceVersion read, so of two racing replicas one wins.
        s.data = Some(new_root()?.secret_data());
        s.annotations_mut().insert(ROTATE_ROOT_ANNOTATION.into(), request.unwrap_or_default());
        let replaced = match secrets.replace(&name, &PostParams::default(), &s).await {
            Ok(replaced) => replaced,
            Err(kube::Error::Api(e)) if e.code == 409 => read(&secrets, &name).await?.unwrap_or(s),
            Err(e) => return Err(Failure::new("RootSecretUnwritable", format!("cannot replace Secret {name}: {e}"))),
        };
        info!(secret = %name, "generated a new root CA on request; rotating to it");
        return load(&name, replaced);
    }
    if let Some(fp) = fed.status.as_ref().and_then(|s| s.trust.as_ref()?.root_fingerprint.clone()) {
        return Err(Failure::new(
            "RootMissing",
            format!(
                "the generated root CA Secret {name} is gone while members hold intermediates from root {fp}; meshfed will not mint a new root behind your back: restore the Secret from a backup, or delete and recreate the federation to start over with a new root"
            ),
        ));
    }
    let material = new_root()?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(BTreeMap::from([
                (meshfed_core::plan::MANAGED_BY.into(), meshfed_core::plan::FIELD_MANAGER.into()),
                (meshfed_core::plan::LABEL_FEDERATION.into(), fed.name_any()),
            ])),
            annotations: request.map(|r| BTreeMap::from([(ROTATE_ROOT_ANNOTATION.into(), r)])),
            owner_references: fed.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(material.secret_data()),
        ..Default::default()
    };
    // Create, not apply: of two replicas racing, one creates and the other reads the winner's root.
    match secrets
        .create(
            &PostParams { field_manager: Some(meshfed_core::plan::FIELD_MANAGER.into()), ..Default::default() },
            &secret,
        )
        .await
    {
        Ok(created) => {
            info!(secret = %name, "generated the root CA");
            load(&name, created)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let s = read(&secrets, &name)
                .await?
                .ok_or_else(|| Failure::new("RootSecretMissing", format!("Secret {name} vanished")))?;
            load(&name, s)
        }
        Err(e) => Err(Failure::new("RootSecretUnwritable", format!("cannot create Secret {name} in the hub: {e}"))),
    }
}

/// What issuing intermediates needs: the root, the validated durations and the time.
#[derive(Clone, Copy)]
pub struct Issuer<'a> {
    pub root: &'a Root,
    pub durations: &'a Durations,
    pub now: Timestamp,
}

async fn read(secrets: &Api<Secret>, name: &str) -> Result<Option<Secret>, Failure> {
    secrets
        .get_opt(name)
        .await
        .map_err(|e| Failure::new("RootSecretUnreadable", format!("cannot read Secret {name} in the hub: {e}")))
}

/// The trust status and each member's intermediate (or why it has none) after [`converge`].
pub struct Converged {
    pub status: TrustStatus,
    pub intermediates: BTreeMap<String, Result<CertSummary, Failure>>,
}

/// Brings every reachable member's `cacerts` to the root: renewals and repairs as `pki::inspect_cacerts` decides,
/// or, when the root differs from the one the status says members were brought to, the next step of a rotation.
pub async fn converge(
    metrics: &Metrics,
    fref: &FederationRef,
    spec: &MeshFederationSpec,
    issuer: Issuer<'_>,
    previous: Option<&TrustStatus>,
    observed: &BTreeMap<String, &Observed>,
    timeout: Duration,
) -> Converged {
    let new = issuer.root.summary();
    let from = previous.and_then(|t| t.root_fingerprint.clone()).filter(|f| *f != new.fingerprint);
    let states: Vec<Option<MemberRoots>> = spec
        .clusters
        .iter()
        .map(|c| observed.get(&c.name).map(|o| MemberRoots::of(cacerts_data(o), issuer.root.cert_pem())))
        .collect();
    let all_known = states.iter().all(Option::is_some);
    // A rotation runs while the members were last brought to another root and have not all moved on.
    let phase = from.as_ref().and_then(|_| rotation::phase(&states));
    let work = spec.clusters.iter().zip(&states).filter_map(|(cluster, state)| {
        let o = observed.get(&cluster.name)?;
        let step = phase.zip(*state).map(|(p, s)| rotation::action(p, s, all_known));
        Some(async move {
            let w = Writer { cluster: &cluster.name, metrics };
            let result = member_cacerts(&w, fref, spec, cluster, o, issuer, step, timeout).await;
            (cluster.name.clone(), result)
        })
    });
    let intermediates = join_all(work).await.into_iter().collect();
    let status = match (&phase, previous) {
        (Some(p), Some(prev)) => {
            let held = if all_known { String::new() } else { "; held until every member answers".into() };
            TrustStatus {
                rotation_phase: Some(format!(
                    "{p}: rotating from root {} to {}{held}",
                    from.unwrap_or_default(),
                    new.fingerprint
                )),
                ..prev.clone()
            }
        }
        _ => TrustStatus {
            root_fingerprint: Some(new.fingerprint.clone()),
            root_not_after: Some(new.not_after_rfc3339()),
            rotation_phase: None,
        },
    };
    Converged { status, intermediates }
}

fn cacerts_data(o: &Observed) -> Option<&BTreeMap<String, ByteString>> {
    o.cacerts.as_ref()?.data.as_ref()
}

/// One member's `cacerts`: outside a rotation, kept or reissued as `pki::inspect_cacerts` says; in one, the
/// rotation's step for it.
#[allow(clippy::too_many_arguments)]
async fn member_cacerts(
    w: &Writer<'_>,
    fref: &FederationRef,
    spec: &MeshFederationSpec,
    cluster: &ClusterSpec,
    o: &Observed,
    issuer: Issuer<'_>,
    step: Option<rotation::Action>,
    timeout: Duration,
) -> Result<CertSummary, Failure> {
    let Issuer { root, durations, now } = issuer;
    let profile = IntermediateProfile {
        cluster: &cluster.name,
        istio_namespace: &spec.istio.namespace,
        algorithm: spec.trust.intermediate.algorithm,
    };
    let data = cacerts_data(o);
    let current = || {
        data.and_then(|d| d.get(pki::CA_CERT))
            .ok_or_else(|| Failure::new("CacertsUnreadable", "cacerts has no ca-cert.pem"))
            .and_then(|c| pki::summarize(&c.0).map_err(|e| Failure::new(e.reason(), e.to_string())))
    };
    let old_roots = || -> String {
        let bundle = data.and_then(|d| d.get(pki::ROOT_CERT)).map(|b| b.0.as_slice()).unwrap_or_default();
        pki::certificates(bundle)
            .into_iter()
            .filter(|(fp, _)| *fp != root.summary().fingerprint)
            .map(|(_, pem)| pem)
            .collect()
    };
    let with_roots = |roots: String| {
        let mut d = data.cloned().unwrap_or_default();
        d.insert(pki::ROOT_CERT.into(), ByteString(roots.into_bytes()));
        d
    };
    let (new_data, why) = match step {
        None => match pki::inspect_cacerts(data, root, &profile, durations.renew_before, now) {
            CacertsVerdict::Keep(summary) => return Ok(summary),
            CacertsVerdict::Reissue(reason) => (issue(root, &profile, durations, now, "")?, reason.to_string()),
        },
        Some(rotation::Action::Keep) => return current(),
        Some(rotation::Action::AddNewRoot) if current().is_ok() => {
            (with_roots(old_roots() + root.cert_pem()), "adding the new root beside the old one".into())
        }
        Some(rotation::Action::AddNewRoot | rotation::Action::ReissueTrustingBoth) => {
            (issue(root, &profile, durations, now, &old_roots())?, "issuing an intermediate from the new root".into())
        }
        Some(rotation::Action::DropOldRoots) => (with_roots(root.cert_pem().into()), "dropping the old root".into()),
    };
    info!(cluster = %cluster.name, "cacerts: {why}");
    let summary = pki::summarize(&new_data[pki::CA_CERT].0).map_err(|e| Failure::new(e.reason(), e.to_string()))?;
    let desired = Secret {
        metadata: ObjectMeta {
            name: Some(pki::CACERTS_SECRET.into()),
            namespace: Some(spec.istio.namespace.clone()),
            labels: Some(fref.owned_labels(&cluster.name)),
            ..Default::default()
        },
        data: Some(new_data),
        ..Default::default()
    };
    // The deadline covers the writes only: issuing (above) is the hub's own CPU work, seconds per RSA 4096 key.
    let secrets: Api<Secret> = Api::namespaced(o.member.client.clone(), &spec.istio.namespace);
    let write = async {
        // Keys meshfed does not write (istiod's `istio-generated` marker, a stale CRL) would survive an apply.
        if data.is_some_and(|d| d.keys().any(|k| !pki::CACERTS_KEYS.contains(&k.as_str()))) {
            apply::delete(w, &secrets, pki::CACERTS_SECRET).await?;
        }
        apply::apply(w, &secrets, pki::CACERTS_SECRET, &desired).await
    };
    match tokio::time::timeout(timeout, write).await {
        Ok(written) => written.map(|_| summary),
        Err(_) => Err(Failure::new("Timeout", format!("writing cacerts took longer than {timeout:?}"))),
    }
}

/// A new intermediate from `root`, with `root-cert.pem` trusting `other_roots` (PEM) besides `root`.
fn issue(
    root: &Root,
    profile: &IntermediateProfile<'_>,
    durations: &Durations,
    now: Timestamp,
    other_roots: &str,
) -> Result<BTreeMap<String, ByteString>, Failure> {
    // Key generation is CPU work (seconds for RSA 4096): keep it off the async workers.
    let mut bundle =
        tokio::task::block_in_place(|| pki::issue_intermediate(root, profile, durations.intermediate_validity, now))
            .map_err(|e| Failure::new(e.reason(), e.to_string()))?;
    bundle.root_cert_pem = format!("{other_roots}{}", bundle.root_cert_pem);
    Ok(bundle.secret_data())
}
