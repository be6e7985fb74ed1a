//! The topology, derived from the clusters' roles and networks; never declared; and what it asks of each cluster.

use std::{collections::BTreeSet, fmt};

use meshfed_api::{ClusterRole, ClusterSpec, DataPlane, MeshFederationSpec};

/// Which of the four Istio multi-cluster topologies a federation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    /// Some member is a Remote served by a Primary's istiod.
    pub primary_remote: bool,
    /// The members are on more than one network.
    pub multi_network: bool,
    /// The federation runs Istio's ambient data plane (`dataPlane: Ambient`).
    pub ambient: bool,
}

impl Topology {
    pub fn of(spec: &MeshFederationSpec) -> Self {
        let networks: BTreeSet<_> = spec.clusters.iter().map(|c| c.network.as_str()).collect();
        Self {
            primary_remote: spec.clusters.iter().any(|c| c.role == ClusterRole::Remote),
            multi_network: networks.len() > 1,
            ambient: spec.data_plane == DataPlane::Ambient,
        }
    }
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let control = if self.primary_remote { "PrimaryRemote" } else { "MultiPrimary" };
        let network = if self.multi_network { "MultiNetwork" } else { "SingleNetwork" };
        write!(f, "{control}/{network}")?;
        if self.ambient { f.write_str("/Ambient") } else { Ok(()) }
    }
}

/// Whether `cluster` serves Remotes: some Remote names it as its control plane.
pub fn serves_remotes(spec: &MeshFederationSpec, cluster: &ClusterSpec) -> bool {
    cluster.role == ClusterRole::Primary
        && spec.clusters.iter().any(|c| c.control_plane.as_deref() == Some(cluster.name.as_str()))
}

/// Whether `cluster` runs an east-west gateway: every cluster of a multi-network federation (other networks reach its
/// pods through it), and a Primary that serves Remotes (they reach its istiod through it).
pub fn needs_gateway(spec: &MeshFederationSpec, cluster: &ClusterSpec) -> bool {
    Topology::of(spec).multi_network || serves_remotes(spec, cluster)
}
