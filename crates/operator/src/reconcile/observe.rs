//! Observe: reach each member within its deadline and read what the plan needs: its version and identity, its
//! claim (taken here, before anything else is written), what it holds of the federation, and the nodes and ranges
//! the topology asks about.

use std::time::Instant;

use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use meshfed_api::{DataPlane, ExposeMode, MeshFederationSpec, SecretKeyRef};
use meshfed_core::{
    conditions::Reason,
    federation::{Failure, FederationRef},
    kinds,
    plan::{self, Observation},
    status::MemberReport,
    topology, versions,
};
use tracing::{debug, warn};

use super::{Context, within};
use crate::member::{
    Reached, read,
    write::{self, Writer},
};

/// Reaches member `name` through its kubeconfig `secret` within the member deadline: its version and identity,
/// then (when `take_claim`) its claim, and what it holds of the federation. `known_as`: the identity the status
/// last recorded for it. Failures land in the report.
pub(super) async fn observe_member(
    ctx: &Context,
    fref: &FederationRef,
    spec: &MeshFederationSpec,
    name: &str,
    secret: &SecretKeyRef,
    take_claim: bool,
    known_as: Option<&str>,
) -> (MemberReport, Option<Reached>) {
    let mut report = MemberReport::new(name, secret, !take_claim);
    let timeout = ctx.settings.member_timeout;
    let started = Instant::now();
    let member = match ctx.pool.member(&ctx.hub, &fref.namespace, secret, timeout).await {
        Ok(m) => m,
        Err(f) => {
            report.failure = Some(f);
            return (report, None);
        }
    };
    let key = fref.to_string();
    let cache = ctx.watches.ensure(&key, &member.id, &spec.istio.namespace, &member.version, &member.client);
    if let Some((last, reached)) = ctx.backoff.waiting(&key, &member) {
        (report.failure, report.version) = (Some(last), reached);
        return (report, None);
    }
    // One round trip for everything that does not depend on the rest: the probe, the identity, what the member
    // holds, and the nodes and ranges the topology needs; then the claim, which depends on what is held.
    let client_ms = started.elapsed().as_secs_f64() * 1e3;
    let run = async {
        let asked = Instant::now();
        let probe = async {
            let version = member
                .probe()
                .await
                .map_err(|e| Failure::new(Reason::Unreachable, format!("{}: {e}", member.server)))?;
            ctx.metrics.member_answered(&key, name, asked.elapsed());
            Ok(version)
        };
        let identity = async {
            Api::<Namespace>::all(member.client.clone())
                .get("kube-system")
                .await
                .map_err(|e| read::read_failure("reading namespace kube-system (the cluster's identity)", e))
        };
        let ns = &spec.istio.namespace;
        let by_name = [
            kinds::claim_key(ns),
            kinds::namespace_key(ns),
            kinds::cacerts_key(ns),
            kinds::published_roots_key(ns),
            // Cluster-wide by its revision: another federation's is seen as such, never taken over.
            kinds::istio_key(&spec.istio.revision),
        ];
        // A gateway exposed on its nodes is dialled at their addresses.
        let cluster = spec.clusters.iter().find(|c| c.name == name);
        let gw = cluster.filter(|c| take_claim && topology::needs_gateway(spec, c)).map(|c| &c.east_west_gateway);
        let nodes = async {
            match gw {
                Some(gw)
                    if gw.address.is_none() && matches!(gw.expose, ExposeMode::NodePort | ExposeMode::HostNetwork) =>
                {
                    read::nodes(&member.client, gw.node_selector.as_ref()).await
                }
                _ => Ok(Vec::new()),
            }
        };
        // Clusters that share a network route pods directly: their ranges must not overlap.
        let shares_network =
            cluster.is_some_and(|c| spec.clusters.iter().any(|o| o.name != c.name && o.network == c.network));
        let ranges =
            async { if take_claim && shares_network { read::ranges(&member.client).await } else { Vec::new() } };
        // The versions its Sail operator accepts, for a member that stays (its version is checked before writing).
        let sail = async { if take_claim { read::sail_versions(&member.client).await } else { Ok(None) } };
        let (version, identity, observed, nodes, ranges, sail) = futures::join!(
            probe,
            identity,
            read::observe(&member.client, &cache, &ctx.metrics, fref, name, ns, &by_name),
            nodes,
            ranges,
            sail
        );
        // The probe's failure says best what is wrong with a member that does not answer.
        report.version = Some(version?.git_version);
        let identity = identity?.metadata.uid;
        // A Secret that now reaches another cluster is refused before anything, the claim too, is written there.
        plan::same_cluster(known_as, identity.as_deref(), secret)?;
        report.identity = identity;
        let ((mut held, unserved), nodes, sail) = (observed?, nodes?, sail?);
        if take_claim {
            // A version its Sail operator does not install is refused before anything, the claim too, is written.
            report.istio_version = versions::member_version(spec.istio.version.as_deref(), sail.as_ref())?;
            if spec.data_plane == DataPlane::Ambient {
                versions::ambient_on(report.istio_version.as_ref())?;
            }
        }
        let reads_ms = asked.elapsed().as_secs_f64() * 1e3;
        let observed_ns = held.get(&kinds::namespace_key(ns));
        if take_claim && observed_ns.is_some_and(|n| !n["metadata"]["deletionTimestamp"].is_null()) {
            return Err(Failure::new(
                Reason::NamespaceTerminating,
                format!("namespace {ns} is being deleted; waiting for it to go"),
            ));
        }
        if take_claim {
            let w = Writer { cluster: name, metrics: &ctx.metrics, client: &member.client, cache: &cache };
            write::claim(&w, fref, &ctx.hub_id, spec, &mut held).await?;
        }
        let claim_ms = asked.elapsed().as_secs_f64() * 1e3 - reads_ms;
        debug!(target: "meshfed::timeline", cluster = %name, client_ms, reads_ms, claim_ms, "observed");
        Ok(Observation { held, unserved, nodes, ranges, sail })
    };
    match within(timeout, run).await {
        Ok(seen) => (report, Some(Reached { member, cache, seen })),
        Err(f) => {
            warn!(cluster = %name, reason = %f.reason, "{}", f.message);
            report.failure = Some(f);
            ctx.backoff.record(&key, &member, &report, ctx.settings.retry_after, ctx.settings.member_backoff_max);
            (report, None)
        }
    }
}
