//! Trust, the IO half (the plan is `meshfed_core::pki`): the root CA from the hub, and one intermediate CA per
//! member in its `cacerts` Secret, reissued only when `pki::inspect_cacerts` says so.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ObjectMeta, PostParams},
};
use meshfed_api::{ClusterSpec, MeshFederation, MeshFederationSpec};
use meshfed_core::{
    pki::{self, CacertsVerdict, CertSummary, IntermediateProfile, Root},
    plan::{Failure, FederationRef},
    validate::Durations,
};
use tracing::{info, warn};

use crate::apply::{self, Writer};

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
    let generate = trust.root.generate.as_ref().expect("the schema requires generate or secretRef");
    let name = root_secret_name(&fed.name_any());
    if let Some(s) = read(&secrets, &name).await? {
        return load(&name, s);
    }
    if let Some(fp) = fed.status.as_ref().and_then(|s| s.trust.as_ref()?.root_fingerprint.clone()) {
        return Err(Failure::new(
            "RootMissing",
            format!(
                "the generated root CA Secret {name} is gone while members hold intermediates from root {fp}; meshfed will not mint a new root behind your back: restore the Secret from a backup, or delete and recreate the federation to start over with a new root"
            ),
        ));
    }
    let validity = durations.root_validity.expect("a generated root has a validated validity");
    let material = tokio::task::block_in_place(|| pki::generate_root(generate.algorithm, validity, now))
        .map_err(|e| Failure::new(e.reason(), e.to_string()))?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(BTreeMap::from([
                (meshfed_core::plan::MANAGED_BY.into(), meshfed_core::plan::FIELD_MANAGER.into()),
                (meshfed_core::plan::LABEL_FEDERATION.into(), fed.name_any()),
            ])),
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
            info!(federation = %fed.name_any(), secret = %name, "generated the root CA");
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

/// Puts an intermediate CA from the root into the member's `cacerts` unless the one there may stay.
pub async fn converge_cacerts(
    w: &Writer<'_>,
    fref: &FederationRef,
    client: &Client,
    spec: &MeshFederationSpec,
    cluster: &ClusterSpec,
    issuer: Issuer<'_>,
) -> Result<CertSummary, Failure> {
    let Issuer { root, durations, now } = issuer;
    let istio_namespace = spec.istio.namespace.as_str();
    let algorithm = spec.trust.intermediate.algorithm;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), istio_namespace);
    let observed = apply::read(&secrets, pki::CACERTS_SECRET).await?;
    let profile = IntermediateProfile { cluster: &cluster.name, istio_namespace, algorithm };
    let data = observed.as_ref().and_then(|s| s.data.as_ref());
    let reason = match pki::inspect_cacerts(data, root, &profile, durations.renew_before, now) {
        CacertsVerdict::Keep(summary) => return Ok(summary),
        CacertsVerdict::Reissue(reason) => reason,
    };
    warn!(cluster = %cluster.name, reason = reason.reason(), "{reason}; issuing a new intermediate CA");
    // Key generation is CPU work (seconds for RSA 4096): keep it off the async workers.
    let bundle =
        tokio::task::block_in_place(|| pki::issue_intermediate(root, &profile, durations.intermediate_validity, now))
            .map_err(|e| Failure::new(e.reason(), e.to_string()))?;
    // Keys meshfed does not write (istiod's `istio-generated` marker, a stale CRL) would survive an apply.
    if data.is_some_and(|d| d.keys().any(|k| !pki::CACERTS_KEYS.contains(&k.as_str()))) {
        apply::delete(w, &secrets, pki::CACERTS_SECRET).await?;
    }
    let desired = Secret {
        metadata: ObjectMeta {
            name: Some(pki::CACERTS_SECRET.into()),
            namespace: Some(istio_namespace.into()),
            labels: Some(fref.owned_labels(&cluster.name)),
            ..Default::default()
        },
        data: Some(bundle.secret_data()),
        ..Default::default()
    };
    apply::apply(w, &secrets, pki::CACERTS_SECRET, &desired).await?;
    pki::summarize(&bundle.ca_cert_pem).map_err(|e| Failure::new(e.reason(), e.to_string()))
}
