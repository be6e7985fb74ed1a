//! Observe: what a member holds of a federation, for every kind of the owned-kinds table alike, from the member's
//! watch caches or a list where a cache cannot answer; and the nodes and ranges the topology needs.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use futures::future::try_join_all;
use k8s_openapi::{
    api::{core::v1::Node, networking::v1::ServiceCIDR},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client,
    api::{DynamicObject, ListParams},
};
use meshfed_core::{
    conditions::Reason,
    federation::{Failure, FederationRef},
    istio::SAIL_ISTIO_CRD,
    kinds::{self, CONFIG_MAP, Holdings, OWNED_KINDS, ObjectKey, OwnedKind},
    versions::SailVersions,
};

use super::{
    cache::MemberCache,
    kinds::{api, api_resource, as_json, keyed},
};
use crate::metrics::{KindLabels, Metrics};

/// Reads what the member holds of `fref` for `cluster`: every owned kind by label, where meshfed writes it
/// ([`kinds::home_namespace`]: the Istio namespace `istio_namespace`, `kube-system` for the claims, cluster-wide for
/// cluster-scoped kinds), from `cache` or else listed, and `by_name` whatever their labels (from `cache` when meshfed
/// labelled them, else read); and which kinds the member does not serve (a CRD that is not installed lists as not
/// found). The claims come first: every Istio namespace they name is read too, so that the objects of a namespace
/// the spec moved away from are seen, and pruned.
#[allow(clippy::too_many_arguments)]
pub async fn observe(
    client: &Client,
    cache: &MemberCache,
    metrics: &Metrics,
    fref: &FederationRef,
    cluster: &str,
    istio_namespace: &str,
    by_name: &[ObjectKey],
) -> Result<(Holdings, BTreeSet<OwnedKind>), Failure> {
    let labels = fref.owned_labels(cluster);
    let lp = ListParams::default().labels(&fref.selector(cluster));
    let held_in = |kind: &'static OwnedKind, namespace: Option<String>| {
        let (lp, labels) = (&lp, &labels);
        async move {
            // The watches keep the kind where meshfed writes it now; elsewhere (a namespace left) it is listed.
            if namespace.as_deref() == kinds::home_namespace(kind, istio_namespace)
                && let Some(held) = cache.held(kind, labels).await
            {
                return Ok(Ok(held));
            }
            metrics.member_lists.get_or_create(&KindLabels { kind: kind.kind.into() }).inc();
            let ar = api_resource(kind);
            let api = match &namespace {
                Some(ns) => Api::<DynamicObject>::namespaced_with(client.clone(), ns, &ar),
                None => Api::<DynamicObject>::all_with(client.clone(), &ar),
            };
            match api.list(lp).await {
                Ok(found) => Ok(Ok(found.items.into_iter().map(|o| keyed(kind, o)).collect::<Vec<_>>())),
                Err(kube::Error::Api(e)) if e.code == 404 => Ok(Err(*kind)),
                Err(e) => {
                    let where_ = namespace.map(|ns| format!(" in namespace {ns}")).unwrap_or_default();
                    Err(read_failure(&format!("listing {}s{where_}", kind.kind), e))
                }
            }
        }
    };
    let claims = held_in(&CONFIG_MAP, kinds::home_namespace(&CONFIG_MAP, istio_namespace).map(Into::into)).await?;
    let mut namespaces = BTreeSet::from([istio_namespace.to_string()]);
    for (_, claim) in claims.iter().flatten() {
        namespaces.extend(claim["data"]["istioNamespace"].as_str().map(String::from));
    }
    let lists = OWNED_KINDS.iter().filter(|k| **k != CONFIG_MAP).flat_map(|kind| {
        let wheres: BTreeSet<Option<&str>> = namespaces.iter().map(|ns| kinds::home_namespace(kind, ns)).collect();
        wheres.into_iter().map(|ns| held_in(kind, ns.map(Into::into))).collect::<Vec<_>>()
    });
    let reads = by_name.iter().map(|key| async move {
        // One that meshfed labelled is in its watch's cache; one it did not label (yet) is read.
        if let Some(held) = cache.object(key).await {
            return Ok(Some((key.clone(), held)));
        }
        let found = match api(client, key).get_opt(&key.name).await {
            Ok(found) => found,
            // A kind the member does not serve (a CRD not installed) holds nothing.
            Err(kube::Error::Api(e)) if e.code == 404 => None,
            Err(e) => return Err(read_failure(&format!("reading {key}"), e)),
        };
        Ok(found.map(|o| (key.clone(), Arc::new(as_json(&key.kind, o)))))
    });
    let (lists, reads) = futures::try_join!(try_join_all(lists), try_join_all(reads))?;
    let (lists, unserved): (Vec<Result<Vec<_>, _>>, Vec<_>) =
        std::iter::once(claims).chain(lists).partition(Result::is_ok);
    let held = lists.into_iter().flatten().flatten().chain(reads.into_iter().flatten()).collect();
    Ok((held, unserved.into_iter().filter_map(Result::err).collect()))
}

/// The pod and service ranges the member's API shows: its nodes' `podCIDRs` and its `ServiceCIDR`s. A list the
/// credential may not read, or an API that does not serve it, shows nothing.
pub async fn ranges(client: &Client) -> Vec<String> {
    let lp = ListParams::default();
    let (nodes, services) = (Api::<Node>::all(client.clone()), Api::<ServiceCIDR>::all(client.clone()));
    let (nodes, services) = futures::join!(nodes.list(&lp), services.list(&lp));
    let pods =
        nodes.into_iter().flat_map(|l| l.items).flat_map(|n| n.spec.and_then(|s| s.pod_cidrs).unwrap_or_default());
    let services =
        services.into_iter().flat_map(|l| l.items).flat_map(|c| c.spec.and_then(|s| s.cidrs).unwrap_or_default());
    pods.chain(services).collect()
}

/// The member's schedulable nodes that match `selector` (all nodes without one).
pub async fn nodes(client: &Client, selector: Option<&BTreeMap<String, String>>) -> Result<Vec<Node>, Failure> {
    let labels = selector.into_iter().flatten().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
    let found = Api::<Node>::all(client.clone())
        .list(&ListParams::default().labels(&labels))
        .await
        .map_err(|e| read_failure("listing the nodes the gateway may run on", e))?;
    Ok(found.items)
}

/// The Istio versions the member's Sail operator accepts, from its `Istio` CRD; `None` where that CRD is not
/// installed.
pub async fn sail_versions(client: &Client) -> Result<Option<SailVersions>, Failure> {
    let crd = Api::<CustomResourceDefinition>::all(client.clone()).get_opt(SAIL_ISTIO_CRD).await.map_err(|e| {
        read_failure(
            &format!(
                "reading CustomResourceDefinition {SAIL_ISTIO_CRD} (the Istio versions its Sail operator accepts)"
            ),
            e,
        )
    })?;
    Ok(crd.and_then(|crd| SailVersions::from_crd(&serde_json::to_value(crd).unwrap_or_default())))
}

/// A failed read from a member's API, as a per-member failure.
pub fn read_failure(what: &str, e: kube::Error) -> Failure {
    Failure::new(Reason::ReadFailed, format!("{what}: {e}"))
}
