//! Trust, the IO half (the plan is `meshfed_core::trust`): the root CA from the hub, and issuing the intermediates
//! the plan asks for (key generation, off the async workers).

use jiff::Timestamp;
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{Api, Client, Resource, ResourceExt, api::PostParams};
use meshfed_api::{ClusterSpec, MeshFederation, MeshFederationSpec};
use meshfed_core::{
    conditions::Reason,
    federation::{FIELD_MANAGER, Failure, FederationRef},
    pki::{self, CertSummary, IntermediateProfile, Root},
    trust::{self, CacertsPlan, ROTATE_ROOT_ANNOTATION},
    validate::Durations,
};
use std::collections::BTreeMap;
use tracing::{info, warn};

/// The federation's root CA: the one the user brings, or the generated one, created once; `Ok(None)` when a root
/// is to be generated and none exists yet ([`mint`] makes it, once the members were looked at). A generated root
/// whose Secret disappeared while the status shows members were given intermediates from it is never replaced
/// silently.
pub async fn root(
    hub: &Client,
    fref: &FederationRef,
    fed: &MeshFederation,
    durations: &Durations,
    now: Timestamp,
) -> Result<Option<Root>, Failure> {
    let secrets: Api<Secret> = Api::namespaced(hub.clone(), &fref.namespace);
    let load = |name: &str, s: Secret| {
        pki::load_root_secret(&s.data.unwrap_or_default(), now)
            .map_err(|e| Failure::new(e.reason(), format!("root CA Secret {name}: {e}")))
    };
    let trust = &fed.spec.trust;
    if let Some(byo) = &trust.root.secret_ref {
        let s = read(&secrets, &byo.name).await?.ok_or_else(|| {
            Failure::new(Reason::RootSecretMissing, format!("trust.root.secretRef: Secret {} does not exist", byo.name))
        })?;
        return load(&byo.name, s).map(Some);
    }
    let (Some(generate), Some(validity)) = (&trust.root.generate, durations.root_validity) else {
        return Err(Failure::new(Reason::RootSourceMissing, "set trust.root.generate or trust.root.secretRef"));
    };
    let new_root = || {
        // Key generation is CPU work (seconds for RSA 4096): keep it off the async workers.
        tokio::task::block_in_place(|| pki::generate_root(generate.algorithm, validity, now))
            .map_err(|e| Failure::new(e.reason(), e.to_string()))
    };
    let name = trust::root_secret_name(&fref.name);
    let vanished =
        || Failure::new(Reason::RootSecretMissing, format!("Secret {name} vanished while meshfed wrote it; retrying"));
    let request = fed.annotations().get(ROTATE_ROOT_ANNOTATION).cloned();
    if let Some(mut s) = read(&secrets, &name).await? {
        if request.is_none() || s.annotations().get(ROTATE_ROOT_ANNOTATION) == request.as_ref() {
            return load(&name, s).map(Some);
        }
        // A rotation was asked for: a new root replaces the old one here (members keep trusting the old one until
        // the rotation is through). `replace` carries the resourceVersion read, so of two racing replicas one wins;
        // the loser uses the winner's root, never one it did not store.
        s.data = Some(trust::replaced_root_data(s.data.as_ref().unwrap_or(&BTreeMap::new()), &new_root()?));
        s.annotations_mut().insert(ROTATE_ROOT_ANNOTATION.into(), request.unwrap_or_default());
        let replaced = match secrets.replace(&name, &PostParams::default(), &s).await {
            Ok(replaced) => replaced,
            Err(kube::Error::Api(e)) if e.code == 409 => read(&secrets, &name).await?.ok_or_else(vanished)?,
            Err(e) => {
                return Err(Failure::new(Reason::RootSecretUnwritable, format!("cannot replace Secret {name}: {e}")));
            }
        };
        info!(secret = %name, "generated a new root CA on request; rotating to it");
        return load(&name, replaced).map(Some);
    }
    let previous = fed.status.as_ref().and_then(|s| s.trust.as_ref());
    if let Some(fp) = previous.and_then(|t| t.root_fingerprint.clone()).filter(|_| !trust::root_was_brought(previous)) {
        return Err(Failure::new(
            Reason::RootMissing,
            format!(
                "the generated root CA Secret {name} is gone while members hold intermediates from root {fp}; meshfed will not mint a new root behind your back: restore the Secret from a backup, or bring the root as trust.root.secretRef; deleting the federation to start over with a new root deletes the control plane in every member unless its deletionPolicy is Orphan"
            ),
        ));
    }
    Ok(None)
}

/// The roots besides `root` (the one in use) whose keys the hub holds for a rotation, read from the Secret in which
/// meshfed keeps a copy of every root it may still need ([`trust::still_kept`] decides which), and, during a
/// rotation, the root it comes from as a generated root's Secret or the Secret the user brought it in still holds
/// it ([`previous_root`]). Brings that Secret up to date: a copy of `root` goes in before anything is signed by it,
/// so that a second rotation, or a brought root renewed in place with a new key, never loses a key the members
/// still sign with; the other roots leave it once a rotation is through. A Secret that cannot be read or written
/// is retried at the next reconcile (and said in the log): meanwhile the plan uses what was read.
pub async fn kept_roots(
    hub: &Client,
    fref: &FederationRef,
    fed: &MeshFederation,
    root: &Root,
    now: Timestamp,
) -> Vec<Root> {
    let secrets: Api<Secret> = Api::namespaced(hub.clone(), &fref.namespace);
    let name = trust::kept_roots_secret_name(&fref.name);
    let stored = match secrets.get_opt(&name).await {
        Ok(stored) => stored,
        Err(e) => {
            warn!(secret = %name, error = %e, "cannot read the kept roots; retrying at the next reconcile");
            return previous_root(hub, fref, fed, root, now).await.into_iter().collect();
        }
    };
    let old = stored.as_ref().and_then(|s| s.data.clone()).unwrap_or_default();
    let mut kept = trust::load_kept_roots(&old, now);
    kept.extend(previous_root(hub, fref, fed, root, now).await);
    let kept = trust::still_kept(root, kept, fed.status.as_ref().and_then(|s| s.trust.as_ref()));
    let data = trust::kept_roots_data(root, &kept);
    if data != old {
        let mut secret = trust::kept_roots_secret(fref, data);
        let written = match stored {
            Some(stored) => {
                secret.metadata.resource_version = stored.metadata.resource_version;
                secret.metadata.owner_references = stored.metadata.owner_references;
                secrets.replace(&name, &PostParams::default(), &secret).await
            }
            None => {
                secret.metadata.owner_references = fed.controller_owner_ref(&()).map(|o| vec![o]);
                let params = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
                secrets.create(&params, &secret).await
            }
        };
        match written {
            Ok(_) => info!(secret = %name, roots = kept.len() + 1, "kept roots updated"),
            Err(e) => warn!(secret = %name, error = %e, "cannot write the kept roots; retrying at the next reconcile"),
        }
    }
    kept
}

/// During a rotation, the root it comes from (the status's `trust.rootFingerprint`), when the hub still holds it:
/// kept by the generated root's Secret when it was replaced, or still in that Secret or in the Secret the user
/// brought it in (`trust.rootSource`).
async fn previous_root(
    hub: &Client,
    fref: &FederationRef,
    fed: &MeshFederation,
    root: &Root,
    now: Timestamp,
) -> Option<Root> {
    let status = fed.status.as_ref()?.trust.as_ref()?;
    let fingerprint = status.root_fingerprint.as_ref().filter(|f| **f != root.summary().fingerprint)?;
    let secrets: Api<Secret> = Api::namespaced(hub.clone(), &fref.namespace);
    let brought = status.root_source.as_deref().and_then(|s| s.strip_prefix("secretRef/"));
    for name in [Some(trust::root_secret_name(&fref.name).as_str()), brought].into_iter().flatten() {
        let Ok(Some(secret)) = secrets.get_opt(name).await else { continue };
        let data = secret.data.unwrap_or_default();
        for candidate in [trust::previous_root_data(&data), data] {
            match pki::load_root_secret(&candidate, now) {
                Ok(r) if r.summary().fingerprint == *fingerprint => return Some(r),
                _ => {}
            }
        }
    }
    None
}

/// Generates the federation's root and stores it in the hub, unless a member already holds an intermediate that
/// meshfed issued for this federation (`held_by`, non-empty): then the root they chain to is gone from the hub, and
/// a new one would silently replace it in every member.
pub async fn mint(
    hub: &Client,
    fref: &FederationRef,
    fed: &MeshFederation,
    durations: &Durations,
    now: Timestamp,
    held_by: &[String],
) -> Result<Root, Failure> {
    let name = trust::root_secret_name(&fref.name);
    if !held_by.is_empty() {
        return Err(Failure::new(
            Reason::RootMissing,
            format!(
                "there is no root CA Secret {name}, but members ({}) hold intermediates meshfed issued for this federation; meshfed will not mint a new root behind your back: restore the Secret from a backup, or bring the root as trust.root.secretRef; deleting the federation to start over with a new root deletes the control plane in every member unless its deletionPolicy is Orphan",
                held_by.join(", ")
            ),
        ));
    }
    let (Some(generate), Some(validity)) = (&fed.spec.trust.root.generate, durations.root_validity) else {
        return Err(Failure::new(Reason::RootSourceMissing, "set trust.root.generate or trust.root.secretRef"));
    };
    let secrets: Api<Secret> = Api::namespaced(hub.clone(), &fref.namespace);
    let load = |s: Secret| {
        pki::load_root_secret(&s.data.unwrap_or_default(), now)
            .map_err(|e| Failure::new(e.reason(), format!("root CA Secret {name}: {e}")))
    };
    let vanished =
        || Failure::new(Reason::RootSecretMissing, format!("Secret {name} vanished while meshfed wrote it; retrying"));
    let material = tokio::task::block_in_place(|| pki::generate_root(generate.algorithm, validity, now))
        .map_err(|e| Failure::new(e.reason(), e.to_string()))?;
    let request = fed.annotations().get(ROTATE_ROOT_ANNOTATION).cloned();
    let mut secret = trust::root_secret(fref, &material, request);
    secret.metadata.owner_references = fed.controller_owner_ref(&()).map(|o| vec![o]);
    // Create, not apply: of two replicas racing, one creates and the other reads the winner's root.
    let params = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    match secrets.create(&params, &secret).await {
        Ok(created) => {
            info!(secret = %name, "generated the root CA");
            load(created)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => load(read(&secrets, &name).await?.ok_or_else(vanished)?),
        Err(e) => {
            Err(Failure::new(Reason::RootSecretUnwritable, format!("cannot create Secret {name} in the hub: {e}")))
        }
    }
}

async fn read(secrets: &Api<Secret>, name: &str) -> Result<Option<Secret>, Failure> {
    secrets
        .get_opt(name)
        .await
        .map_err(|e| Failure::new(Reason::RootSecretUnreadable, format!("cannot read Secret {name} in the hub: {e}")))
}

/// A new intermediate for `cluster` from `root`, as `cacerts` data whose `root-cert.pem` also trusts `other_roots`.
pub fn issue(
    root: &Root,
    spec: &MeshFederationSpec,
    cluster: &ClusterSpec,
    durations: &Durations,
    now: Timestamp,
    other_roots: &str,
) -> Result<BTreeMap<String, ByteString>, Failure> {
    let profile = IntermediateProfile {
        cluster: &cluster.name,
        istio_namespace: &spec.istio.namespace,
        algorithm: spec.trust.intermediate.algorithm,
    };
    // Key generation is CPU work (seconds for RSA 4096): keep it off the async workers.
    tokio::task::block_in_place(|| pki::issue_intermediate(root, &profile, durations.intermediate_validity, now))
        .map(|bundle| trust::issued(bundle, other_roots))
        .map_err(|e| Failure::new(e.reason(), e.to_string()))
}

/// Per member, the `cacerts` data it should hold and its intermediate, or why it has none.
pub type PlannedCacerts = BTreeMap<String, Result<(BTreeMap<String, ByteString>, CertSummary), Failure>>;

/// Carries out the trust plan's `cacerts` steps: the data a member keeps, or a new intermediate issued as the plan
/// says, with why each was decided logged.
pub fn carry_out(
    spec: &MeshFederationSpec,
    durations: &Durations,
    planned: BTreeMap<String, Result<CacertsPlan<'_>, Failure>>,
    now: Timestamp,
) -> PlannedCacerts {
    let carried = planned.into_iter().map(|(name, step)| {
        let cluster = spec.clusters.iter().find(|c| c.name == name).expect("planned for a member of the spec");
        let held = step.and_then(|step| match step {
            CacertsPlan::Hold { data, summary, why } => {
                if let Some(why) = why {
                    info!(cluster = %name, "cacerts: {why}");
                }
                Ok((data, summary))
            }
            CacertsPlan::Issue { why, other_roots, signer } => {
                info!(cluster = %name, "cacerts: {why}");
                let data = issue(signer, spec, cluster, durations, now, &other_roots)?;
                let summary =
                    pki::summarize(&data[pki::CA_CERT].0).map_err(|e| Failure::new(e.reason(), e.to_string()))?;
                Ok((data, summary))
            }
        });
        (name, held)
    });
    carried.collect()
}

/// Keeps the federation's root and kept roots in the hub past its deletion (`deletionPolicy: Orphan`): their Secrets
/// are no longer owned by the federation, so the garbage collector leaves them, and a new federation can bring the
/// root as `trust.root.secretRef`. A Secret that is not there is fine.
pub async fn keep_roots(hub: &Client, fref: &FederationRef) -> Result<(), kube::Error> {
    let secrets: Api<Secret> = Api::namespaced(hub.clone(), &fref.namespace);
    for name in [trust::root_secret_name(&fref.name), trust::kept_roots_secret_name(&fref.name)] {
        let Some(mut secret) = secrets.get_opt(&name).await? else { continue };
        if secret.metadata.owner_references.take().is_some() {
            secrets.replace(&name, &PostParams::default(), &secret).await?;
            info!(secret = %name, "kept in the hub after the federation");
        }
    }
    Ok(())
}
