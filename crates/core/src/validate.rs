//! The rules that need the whole federation, beyond what the CRD's schema and CEL rules check. A federation that
//! breaks any of them gets `Valid=False` and nothing is written to any member.

use std::{collections::BTreeMap, fmt, net::IpAddr, time::Duration};

use ipnet::IpNet;
use meshfed_api::{ClusterRole, DataPlane, ExposeMode, MAX_REVISION_LEN, MeshFederationSpec, SYSTEM_NAMESPACES};

use crate::{
    conditions::Reason,
    topology::{self, Topology},
    versions,
};

/// One broken rule: a stable reason and a message that says what to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub reason: Reason,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// The TokenRequest API refuses lifetimes under ten minutes. A token is refreshed with a third of its lifetime
/// left, so ten minutes also leave 3 min 20 s to retry a member that does not answer (every 60 s at most).
pub const MIN_TOKEN_TTL: Duration = Duration::from_secs(600);

/// The TokenRequest API refuses lifetimes over 2^32 seconds (about 136 years).
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(1 << 32);

/// An intermediate is renewed `renewBefore` ahead of its expiry, at a reconcile scheduled for then; ten minutes
/// leave room for ten retries of a member that does not answer (every 60 s at most) before it expires.
pub const MIN_RENEW_BEFORE: Duration = Duration::from_secs(600);

/// The parsed durations of a valid spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durations {
    pub root_validity: Option<Duration>,
    pub intermediate_validity: Duration,
    pub renew_before: Duration,
    pub token_ttl: Duration,
    pub workload_certificate_ttl: Duration,
}

/// A spec that passed every rule, with what validation derived from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validated {
    pub topology: Topology,
    pub durations: Durations,
}

/// Checks every rule and returns all problems found, in spec order, not just the first.
pub fn validate(spec: &MeshFederationSpec) -> Result<Validated, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut problem = |reason, message: String| problems.push(Problem { reason, message });

    let namespace = &spec.istio.namespace;
    if SYSTEM_NAMESPACES.contains(&namespace.as_str()) {
        problem(
            Reason::SystemNamespace,
            format!(
                "istio.namespace {namespace:?} is a namespace of Kubernetes itself; meshfed labels the Istio namespace with a network and writes cacerts, the east-west gateway and RBAC into it: use a namespace of its own, such as istio-system"
            ),
        );
    }
    let revision = &spec.istio.revision;
    if revision.len() > MAX_REVISION_LEN {
        problem(
            Reason::RevisionTooLong,
            format!(
                "istio.revision {revision:?} has {} characters; istiod's Service is istiod-<revision>, which a Service name of at most 63 characters cannot hold: use at most {MAX_REVISION_LEN}",
                revision.len()
            ),
        );
    }

    let mut seen = BTreeMap::new();
    for c in &spec.clusters {
        if seen.insert(c.name.as_str(), c).is_some() {
            problem(
                Reason::DuplicateClusterName,
                format!(
                    "cluster name {:?} is used more than once; names are Istio cluster IDs and must be unique",
                    c.name
                ),
            );
        }
    }
    let mut kubeconfigs = BTreeMap::new();
    for c in &spec.clusters {
        if let Some(other) = kubeconfigs.insert(&c.kubeconfig_secret_ref, c.name.as_str()) {
            problem(
                Reason::DuplicateKubeconfig,
                format!(
                    "clusters {other:?} and {:?} use the same kubeconfig (Secret {} key {}); each member needs its own",
                    c.name, c.kubeconfig_secret_ref.name, c.kubeconfig_secret_ref.key
                ),
            );
        }
    }
    for c in spec.clusters.iter().filter(|c| c.role == ClusterRole::Remote) {
        let Some(cp) = c.control_plane.as_deref() else {
            problem(Reason::MissingControlPlane, format!("cluster {:?} is a Remote but names no controlPlane", c.name));
            continue;
        };
        match seen.get(cp) {
            None => problem(
                Reason::UnknownControlPlane,
                format!("cluster {:?} names controlPlane {cp:?}, which is not a cluster of this federation", c.name),
            ),
            Some(p) if p.role != ClusterRole::Primary => problem(
                Reason::ControlPlaneNotPrimary,
                format!(
                    "cluster {:?} names controlPlane {cp:?}, which is a Remote; a controlPlane must be a Primary",
                    c.name
                ),
            ),
            Some(_) => {}
        }
    }

    let mut duration = |field: &str, value: &str| match humantime::parse_duration(value) {
        Ok(d) if !d.is_zero() => Some(d),
        _ => {
            problem(
                Reason::InvalidDuration,
                format!("{field} {value:?} is not a positive duration; write it like 24h, 90m or 8760h"),
            );
            None
        }
    };
    let root_validity =
        spec.trust.root.generate.as_ref().map(|g| duration("trust.root.generate.validity", &g.validity));
    let intermediate_validity = duration("trust.intermediate.validity", &spec.trust.intermediate.validity);
    let renew_before = duration("trust.intermediate.renewBefore", &spec.trust.intermediate.renew_before);
    let token_ttl = duration("remoteAccess.tokenTTL", &spec.remote_access.token_ttl);
    let workload_ttl = duration("trust.workloadCertificateTTL", &spec.trust.workload_certificate_ttl);
    if let (Some(v), Some(r)) = (intermediate_validity, renew_before)
        && r >= v
    {
        problem(
            Reason::InvalidDuration,
            format!(
                "trust.intermediate.renewBefore ({}) must be shorter than trust.intermediate.validity ({})",
                spec.trust.intermediate.renew_before, spec.trust.intermediate.validity
            ),
        );
    }
    if let Some(r) = renew_before
        && r < MIN_RENEW_BEFORE
    {
        problem(
            Reason::InvalidDuration,
            format!(
                "trust.intermediate.renewBefore ({}) must be at least 10m: meshfed renews an intermediate that long before it expires and needs the time to retry a member that does not answer",
                spec.trust.intermediate.renew_before
            ),
        );
    }
    if let Some(t) = token_ttl
        && t < MIN_TOKEN_TTL
    {
        problem(
            Reason::InvalidDuration,
            format!(
                "remoteAccess.tokenTTL ({}) must be at least 10m, the shortest token the TokenRequest API issues",
                spec.remote_access.token_ttl
            ),
        );
    }
    if let Some(t) = token_ttl
        && t > MAX_TOKEN_TTL
    {
        problem(
            Reason::InvalidDuration,
            format!(
                "remoteAccess.tokenTTL ({}) must be at most 2^32 seconds (about 136 years), the longest token the TokenRequest API issues",
                spec.remote_access.token_ttl
            ),
        );
    }

    let topology = Topology::of(spec);
    for c in spec.clusters.iter().filter(|c| c.east_west_gateway.address.is_none()) {
        let expose = c.east_west_gateway.expose;
        if topology.multi_network && expose == ExposeMode::ClusterIP {
            problem(
                Reason::ExposeModeUnsupported,
                format!(
                    "cluster {:?} exposes its east-west gateway as ClusterIP, which other networks cannot reach; use LoadBalancer, NodePort or HostNetwork, or give the address of a proxy in front of it",
                    c.name
                ),
            );
        }
        if expose == ExposeMode::NodePort && topology::serves_remotes(spec, c) {
            problem(
                Reason::ExposeModeUnsupported,
                format!(
                    "cluster {:?} serves Remotes, which reach its istiod at ports 15012 and 15017 of its gateway address; a NodePort gateway answers on node ports only: use LoadBalancer or HostNetwork, or give the address of a proxy that forwards those ports",
                    c.name
                ),
            );
        }
    }
    for c in &spec.clusters {
        if let Some(address) = &c.east_west_gateway.address
            && !is_address(address)
        {
            problem(
                Reason::InvalidGatewayAddress,
                format!(
                    "cluster {:?} eastWestGateway.address {address:?} is not an IP address or a DNS name (such as 203.0.113.7 or gw.example.com): give the address alone, without scheme, port or path; peers dial the gateway's own ports there (15443, and 15012 and 15017 for Remotes)",
                    c.name
                ),
            );
        }
        if let Some(server) = &c.api_server
            && let Some(why) = api_server_problem(server)
        {
            problem(Reason::InvalidAPIServer, format!("cluster {:?} apiServer {why}", c.name));
        }
    }
    if spec.data_plane == DataPlane::Ambient {
        ambient_problems(spec, topology, &mut problem);
    }
    cidr_problems(spec, &mut problem);

    match (problems.is_empty(), intermediate_validity, renew_before, token_ttl, workload_ttl) {
        (true, Some(intermediate_validity), Some(renew_before), Some(token_ttl), Some(workload_certificate_ttl)) => {
            Ok(Validated {
                topology,
                durations: Durations {
                    root_validity: root_validity.flatten(),
                    intermediate_validity,
                    renew_before,
                    token_ttl,
                    workload_certificate_ttl,
                },
            })
        }
        _ => Err(problems),
    }
}

/// What upstream Istio does not support in ambient mode (ISTIO-FACTS.md section 14): Remotes (primary-remote ambient
/// is not supported), one network (alpha upstream: meshfed refuses it), a version before ambient multi-network, and
/// a gateway that istiod cannot expose itself (it deploys the ambient east-west gateway as a LoadBalancer). An
/// `istio-remote` Gateway cannot stand for a fixed address or a node port here: each member's istiod also discovers
/// the peer's own `istio-east-west` Gateway through the remote secret, and with two gateways for one network istiod
/// tells ztunnels either one (ISTIO-FACTS.md 14a, measured).
fn ambient_problems(spec: &MeshFederationSpec, topology: Topology, problem: &mut impl FnMut(Reason, String)) {
    for c in spec.clusters.iter().filter(|c| c.role == ClusterRole::Remote) {
        problem(
            Reason::AmbientWithRemotes,
            format!(
                "cluster {:?} is a Remote, and Istio does not support ambient mode with primary-remote (istio/istio#60343): make every cluster a Primary, or use dataPlane Sidecar",
                c.name
            ),
        );
    }
    if !topology.multi_network {
        problem(
            Reason::AmbientSingleNetwork,
            "every cluster is on one network, and ambient multicluster on one network is alpha in Istio (only multi-network is Beta): put the clusters on different networks, or use dataPlane Sidecar".into(),
        );
    }
    if let Some(version) = &spec.istio.version
        && versions::before_ambient_multi_network(version) == Some(true)
    {
        problem(
            Reason::AmbientIstioTooOld,
            format!(
                "istio.version {version} is older than {}, the first Istio with ambient multi-network: set {} or later, or use dataPlane Sidecar",
                versions::AMBIENT_MULTI_NETWORK_SINCE,
                versions::AMBIENT_MULTI_NETWORK_SINCE
            ),
        );
    }
    for c in spec.clusters.iter().filter(|c| c.east_west_gateway.address.is_some()) {
        problem(
            Reason::ExposeModeUnsupported,
            format!(
                "cluster {:?} gives its east-west gateway a fixed address; in ambient mode every other member's istiod reads the gateway's address from the Gateway istiod deploys (its load balancer's), and an istio-remote Gateway declaring the fixed address beside it would be a second gateway for the network, of which istiod uses either one (istio/istio#56960): remove eastWestGateway.address",
                c.name
            ),
        );
    }
    for c in spec.clusters.iter().filter(|c| c.east_west_gateway.expose != ExposeMode::LoadBalancer) {
        problem(
            Reason::ExposeModeUnsupported,
            format!(
                "cluster {:?} exposes its east-west gateway as {:?}; in ambient mode istiod deploys the gateway as a LoadBalancer and every other member's istiod reads its address from there (an istio-remote Gateway for a node port would be a second gateway for the network, of which istiod uses either one: istio/istio#56960): use LoadBalancer",
                c.name, c.east_west_gateway.expose
            ),
        );
    }
}

/// Whether `address` is what a gateway address must be: an IP address, or a DNS name (lowercase, as a Service's
/// `externalName` must be: a Remote's istiod Service becomes one for a name) whose last label is not all digits.
fn is_address(address: &str) -> bool {
    if address.parse::<IpAddr>().is_ok() {
        return true;
    }
    let label = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    address.len() <= 253
        && address.split('.').all(label)
        && !address.rsplit('.').next().is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
}

/// What is wrong with an `apiServer`, as the rest of a sentence, if anything. It goes into every peer's remote
/// secret as the `server` istiod dials: an `https://` URL with a host, and no credential (user info) or query. A
/// path is fine (API proxies such as Rancher's serve a cluster under one). The value is not repeated when it holds
/// user info.
fn api_server_problem(server: &str) -> Option<String> {
    let Some(rest) = server.strip_prefix("https://") else {
        return Some(format!("{server:?} is not an https:// URL such as https://east.example:6443"));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if let Some((_, host)) = authority.rsplit_once('@') {
        return Some(format!(
            "carries user info (a user name or password before @ in https://{host}): it would be copied into every peer's remote secret; remove it, peers authenticate with meshfed's reader tokens"
        ));
    }
    let Some(uri) = server.parse::<http::Uri>().ok().filter(|u| u.host().is_some_and(|h| !h.is_empty())) else {
        return Some(if authority.is_empty() || authority.starts_with(':') {
            format!("{server:?} names no host; write it like https://east.example:6443")
        } else {
            format!("{server:?} is not a URL such as https://east.example:6443")
        });
    };
    if uri.query().is_some() {
        return Some(format!("{server:?} has a query (?...), which a Kubernetes API server URL does not take"));
    }
    None
}

/// Clusters on one network route pods to each other directly, so their declared pod and service ranges must not
/// overlap.
fn cidr_problems(spec: &MeshFederationSpec, problem: &mut impl FnMut(Reason, String)) {
    let mut ranges: Vec<(&str, &str, IpNet)> = Vec::new();
    for c in &spec.clusters {
        for (field, cidr) in
            c.pod_cidrs.iter().map(|r| ("podCIDRs", r)).chain(c.service_cidrs.iter().map(|r| ("serviceCIDRs", r)))
        {
            match cidr.parse::<IpNet>() {
                Ok(net) => ranges.push((c.name.as_str(), c.network.as_str(), net)),
                Err(_) => problem(
                    Reason::InvalidCIDR,
                    format!("cluster {:?} {field} entry {cidr:?} is not a CIDR such as 10.10.0.0/16", c.name),
                ),
            }
        }
    }
    overlaps(&ranges, "", problem);
}

/// Reports every two ranges of different clusters on one network that overlap; `whence` says where the ranges
/// were read.
fn overlaps(ranges: &[(&str, &str, IpNet)], whence: &str, problem: &mut impl FnMut(Reason, String)) {
    for (i, (a, net_a, ra)) in ranges.iter().enumerate() {
        for (b, net_b, rb) in &ranges[i + 1..] {
            if a != b && net_a == net_b && (ra.contains(&rb.network()) || rb.contains(&ra.network())) {
                problem(
                    Reason::OverlappingCIDRs,
                    format!(
                        "clusters {a:?} ({ra}) and {b:?} ({rb}) are both on network {net_a:?} and their ranges overlap{whence}; clusters on one network need disjoint pod and service ranges"
                    ),
                );
            }
        }
    }
}

/// The preflight of clusters on one network against what their API servers show (node `podCIDRs`, `ServiceCIDR`s;
/// `observed`, by cluster), beside what the spec declares: every overlap between two clusters, named.
pub fn observed_overlaps(spec: &MeshFederationSpec, observed: &BTreeMap<String, Vec<String>>) -> Vec<Problem> {
    let mut ranges: Vec<(&str, &str, IpNet)> = Vec::new();
    for c in &spec.clusters {
        let declared = c.pod_cidrs.iter().chain(&c.service_cidrs);
        let seen = observed.get(&c.name).into_iter().flatten();
        let mut nets: Vec<IpNet> = declared.chain(seen).filter_map(|r| r.parse().ok()).collect();
        nets.sort();
        nets.dedup();
        ranges.extend(nets.into_iter().map(|n| (c.name.as_str(), c.network.as_str(), n)));
    }
    let mut problems = Vec::new();
    let whence = " (as their API servers show them: node podCIDRs and ServiceCIDRs)";
    overlaps(&ranges, whence, &mut |reason, message| problems.push(Problem { reason, message }));
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshfed_api::MeshFederationSpec;

    /// A spec from its clusters (one flow-style YAML list item per line) and extra top-level YAML.
    fn spec_with(clusters: &str, extra: &str) -> MeshFederationSpec {
        serde_saphyr::from_str(&format!(
            "meshID: m\ntrust: {{root: {{generate: {{}}}}}}\n{extra}\nclusters:\n{clusters}"
        ))
        .unwrap()
    }

    fn spec(clusters: &str) -> MeshFederationSpec {
        spec_with(clusters, "")
    }

    fn reasons(spec: &MeshFederationSpec) -> Vec<Reason> {
        validate(spec).err().unwrap_or_default().into_iter().map(|p| p.reason).collect()
    }

    const EAST: &str = r#"- {"name": "east", "network": "n1", "kubeconfigSecretRef": {"name": "east"}}"#;
    const WEST: &str = r#"- {"name": "west", "network": "n2", "kubeconfigSecretRef": {"name": "west"}}"#;

    #[test]
    fn a_valid_multi_primary_spec_passes_with_its_topology_and_durations() {
        let v = validate(&spec(&format!("{EAST}\n{WEST}"))).unwrap();
        assert_eq!(v.topology.to_string(), "MultiPrimary/MultiNetwork");
        assert_eq!(v.durations.token_ttl, Duration::from_secs(24 * 3600));
        assert_eq!(v.durations.root_validity, Some(Duration::from_secs(87600 * 3600)));
    }

    #[test]
    fn duplicate_cluster_names_are_refused() {
        let dup = WEST.replace("west\", \"network", "east\", \"network");
        assert_eq!(reasons(&spec(&format!("{EAST}\n{dup}"))), ["DuplicateClusterName"]);
    }

    #[test]
    fn two_clusters_sharing_one_kubeconfig_are_refused() {
        let same = WEST.replace(r#"{"name": "west"}"#, r#"{"name": "east"}"#);
        assert_eq!(reasons(&spec(&format!("{EAST}\n{same}"))), ["DuplicateKubeconfig"]);
    }

    #[test]
    fn a_remote_must_name_an_existing_primary() {
        let remote = |cp: &str| {
            format!(
                r#"- {{"name": "r", "network": "n1", "role": "Remote", "controlPlane": "{cp}", "kubeconfigSecretRef": {{"name": "r"}}}}"#
            )
        };
        assert_eq!(reasons(&spec(&format!("{EAST}\n{}", remote("nowhere")))), ["UnknownControlPlane"]);
        let second = remote("r").replace("\"r\"", "\"r2\"");
        assert_eq!(reasons(&spec(&format!("{EAST}\n{}\n{second}", remote("east")))), ["ControlPlaneNotPrimary"]);
        let v = validate(&spec(&format!("{EAST}\n{}", remote("east")))).unwrap();
        assert_eq!(v.topology.to_string(), "PrimaryRemote/SingleNetwork");
    }

    #[test]
    fn unparsable_or_inconsistent_durations_are_refused() {
        let s = spec_with(EAST, "remoteAccess: {tokenTTL: tomorrow}");
        let problems = validate(&s).unwrap_err();
        assert_eq!(problems[0].reason, "InvalidDuration");
        assert!(problems[0].message.contains("remoteAccess.tokenTTL \"tomorrow\""), "{}", problems[0]);
        assert_eq!(reasons(&spec_with(EAST, "remoteAccess: {tokenTTL: 5m}")), ["InvalidDuration"]);
        let mut s = spec(EAST);
        s.trust.intermediate.renew_before = "9000h".into();
        assert!(validate(&s).unwrap_err()[0].message.contains("must be shorter"));
    }

    #[test]
    fn lifetimes_too_short_to_renew_in_time_are_refused_naming_the_bound() {
        let mut s = spec(EAST);
        s.trust.intermediate.renew_before = "5m".into();
        let problems = validate(&s).unwrap_err();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].reason, "InvalidDuration");
        assert!(problems[0].message.contains("renewBefore (5m) must be at least 10m"), "{}", problems[0]);
        s.trust.intermediate.renew_before = "10m".into();
        assert!(validate(&s).is_ok());
        let problems = validate(&spec_with(EAST, "remoteAccess: {tokenTTL: 9m59s}")).unwrap_err();
        assert!(problems[0].message.contains("tokenTTL (9m59s) must be at least 10m"), "{}", problems[0]);
        assert!(validate(&spec_with(EAST, "remoteAccess: {tokenTTL: 10m}")).is_ok());
    }

    #[test]
    fn overlapping_ranges_on_one_network_are_refused_naming_both_clusters() {
        let a =
            r#"- {"name": "a", "network": "n1", "podCIDRs": ["10.0.0.0/16"], "kubeconfigSecretRef": {"name": "a"}}"#;
        let b =
            r#"- {"name": "b", "network": "n1", "podCIDRs": ["10.0.128.0/17"], "kubeconfigSecretRef": {"name": "b"}}"#;
        let problems = validate(&spec(&format!("{a}\n{b}"))).unwrap_err();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].reason, "OverlappingCIDRs");
        assert!(problems[0].message.contains("\"a\" (10.0.0.0/16) and \"b\" (10.0.128.0/17)"), "{}", problems[0]);
        // The same ranges on different networks are fine.
        assert!(validate(&spec(&format!("{a}\n{}", b.replace("n1", "n2")))).is_ok());
        let bad = a.replace("10.0.0.0/16", "10.0.0.0/33");
        assert_eq!(reasons(&spec(&bad)), ["InvalidCIDR"]);
    }

    #[test]
    fn cluster_ip_exposure_is_refused_across_networks() {
        let west = WEST.replace(
            r#""kubeconfigSecretRef""#,
            r#""eastWestGateway": {"expose": "ClusterIP"}, "kubeconfigSecretRef""#,
        );
        assert_eq!(reasons(&spec(&format!("{EAST}\n{west}"))), ["ExposeModeUnsupported"]);
        assert!(validate(&spec(&format!("{EAST}\n{}", west.replace("n2", "n1")))).is_ok());
        let proxied = west.replace(r#""expose": "ClusterIP""#, r#""expose": "ClusterIP", "address": "proxy.example""#);
        assert!(validate(&spec(&format!("{EAST}\n{proxied}"))).is_ok());
    }

    #[test]
    fn ambient_is_refused_where_upstream_istio_does_not_support_it() {
        let ambient = |clusters: &str, extra: &str| spec_with(clusters, &format!("dataPlane: Ambient\n{extra}"));
        let v = validate(&ambient(&format!("{EAST}\n{WEST}"), "istio: {version: v1.29.0}")).unwrap();
        assert_eq!(v.topology.to_string(), "MultiPrimary/MultiNetwork/Ambient");
        // Primary-remote.
        let remote = r#"- {"name": "r", "network": "n2", "role": "Remote", "controlPlane": "east", "kubeconfigSecretRef": {"name": "r"}}"#;
        let problems = validate(&ambient(&format!("{EAST}\n{remote}"), "")).unwrap_err();
        assert_eq!(problems.iter().map(|p| p.reason).collect::<Vec<_>>(), [Reason::AmbientWithRemotes]);
        assert!(problems[0].message.contains("\"r\" is a Remote") && problems[0].message.contains("Sidecar"));
        // One network.
        let problems = validate(&ambient(&format!("{EAST}\n{}", WEST.replace("n2", "n1")), "")).unwrap_err();
        assert_eq!(problems.iter().map(|p| p.reason).collect::<Vec<_>>(), [Reason::AmbientSingleNetwork]);
        // A version before 1.29, by release or by line.
        for old in ["v1.28.10", "v1.28-latest"] {
            let problems =
                validate(&ambient(&format!("{EAST}\n{WEST}"), &format!("istio: {{version: {old}}}"))).unwrap_err();
            assert_eq!(problems[0].reason, Reason::AmbientIstioTooOld, "{old}");
            assert!(problems[0].message.contains(old) && problems[0].message.contains("v1.29.0"), "{}", problems[0]);
        }
        // A gateway istiod does not expose itself.
        let node_port = WEST
            .replace(r#""kubeconfigSecretRef""#, r#""eastWestGateway": {"expose": "NodePort"}, "kubeconfigSecretRef""#);
        assert_eq!(reasons(&ambient(&format!("{EAST}\n{node_port}"), "")), ["ExposeModeUnsupported"]);
        let fixed = WEST.replace(
            r#""kubeconfigSecretRef""#,
            r#""eastWestGateway": {"address": "gw.example"}, "kubeconfigSecretRef""#,
        );
        assert_eq!(reasons(&ambient(&format!("{EAST}\n{fixed}"), "")), ["ExposeModeUnsupported"]);
        // None of it applies to sidecars, today's default.
        assert!(validate(&spec_with(&format!("{EAST}\n{remote}"), "istio: {version: v1.28.10}")).is_ok());
        assert!(validate(&spec(&format!("{EAST}\n{node_port}"))).is_ok());
    }

    #[test]
    fn a_primary_that_serves_remotes_cannot_be_exposed_on_node_ports() {
        let east = EAST
            .replace(r#""kubeconfigSecretRef""#, r#""eastWestGateway": {"expose": "NodePort"}, "kubeconfigSecretRef""#);
        let remote = r#"- {"name": "r", "network": "n1", "role": "Remote", "controlPlane": "east", "kubeconfigSecretRef": {"name": "r"}}"#;
        let problems = validate(&spec(&format!("{east}\n{remote}"))).unwrap_err();
        assert_eq!(problems[0].reason, Reason::ExposeModeUnsupported);
        assert!(problems[0].message.contains("15012"), "{}", problems[0].message);
        // Without Remotes, or behind a proxy that forwards 15012 and 15017, NodePort is fine.
        assert!(validate(&spec(&east)).is_ok());
        let proxied = east.replace(r#""expose": "NodePort""#, r#""expose": "NodePort", "address": "proxy.example""#);
        assert!(validate(&spec(&format!("{proxied}\n{remote}"))).is_ok());
    }

    #[test]
    fn ranges_the_members_show_are_checked_with_the_declared_ones() {
        let west = WEST.replace("n2", "n1");
        let s = spec(&format!("{EAST}\n{west}"));
        let seen = |e: &[&str], w: &[&str]| {
            BTreeMap::from([
                ("east".to_string(), e.iter().map(|r| r.to_string()).collect()),
                ("west".to_string(), w.iter().map(|r| r.to_string()).collect()),
            ])
        };
        assert!(observed_overlaps(&s, &seen(&["10.244.0.0/24", "10.96.0.0/16"], &["10.245.0.0/24"])).is_empty());
        let clash = observed_overlaps(&s, &seen(&["10.244.0.0/16"], &["10.244.3.0/24", "not a range"]));
        assert_eq!(clash.len(), 1);
        assert_eq!(clash[0].reason, Reason::OverlappingCIDRs);
        assert!(
            clash[0].message.contains(r#""east" (10.244.0.0/16) and "west" (10.244.3.0/24)"#),
            "{}",
            clash[0].message
        );
        // On two networks the same ranges are fine: the gateways route between them.
        let split = spec(&format!("{EAST}\n{WEST}"));
        assert!(observed_overlaps(&split, &seen(&["10.244.0.0/16"], &["10.244.3.0/24"])).is_empty());
    }

    /// `EAST` with `field` (a JSON member) set.
    fn east_with(field: &str) -> String {
        EAST.replace(r#""kubeconfigSecretRef""#, &format!(r#"{field}, "kubeconfigSecretRef""#))
    }

    #[test]
    fn a_gateway_address_is_an_ip_or_a_dns_name_alone() {
        for good in ["203.0.113.7", "2001:db8::7", "gw.example.com", "gw-1.eu-west-1.elb.amazonaws.com", "proxy"] {
            let s = spec(&east_with(&format!(r#""eastWestGateway": {{"address": "{good}"}}"#)));
            assert!(validate(&s).is_ok(), "{good}: {:?}", validate(&s));
        }
        for bad in [
            "203.0.113.7:15443",
            "gw.example.com:15443",
            "[2001:db8::7]:15443",
            "https://gw.example.com",
            "gw.example.com/",
            "gw.example.com/path",
            "not an address!",
            "GW.example.com",
            "gw..example.com",
            "-gw.example.com",
            "1.2.3.999",
            "",
        ] {
            let s = spec(&east_with(&format!(r#""eastWestGateway": {{"address": "{bad}"}}"#)));
            let problems = validate(&s).expect_err(bad);
            assert_eq!(problems.len(), 1, "{bad}: {problems:?}");
            assert_eq!(problems[0].reason, Reason::InvalidGatewayAddress, "{bad}");
            let message = &problems[0].message;
            assert!(
                message.contains(&format!("{bad:?}")) && message.contains("without scheme, port or path"),
                "{message}"
            );
        }
    }

    #[test]
    fn an_api_server_is_an_https_url_with_a_host_and_no_credential() {
        for good in [
            "https://east.example:6443",
            "https://203.0.113.7",
            "https://[2001:db8::7]:6443",
            "https://rancher.example/k8s/clusters/c-1",
        ] {
            let s = spec(&east_with(&format!(r#""apiServer": "{good}""#)));
            assert!(validate(&s).is_ok(), "{good}: {:?}", validate(&s));
        }
        for (bad, says) in [
            ("https://", "names no host"),
            ("https://:6443", "names no host"),
            ("http://east.example:6443", "not an https:// URL"),
            ("https://east example", "is not a URL"),
            ("east.example:6443", "not an https:// URL"),
            ("https://east.example:6443?x=1", "has a query"),
        ] {
            let problems = validate(&spec(&east_with(&format!(r#""apiServer": "{bad}""#)))).expect_err(bad);
            assert_eq!(problems.len(), 1, "{bad}: {problems:?}");
            assert_eq!(problems[0].reason, Reason::InvalidAPIServer, "{bad}");
            assert!(problems[0].message.contains(says), "{bad}: {}", problems[0].message);
        }
        // A credential in the URL is refused, and not repeated in the message (it goes into the status).
        let problems =
            validate(&spec(&east_with(r#""apiServer": "https://admin:s3cret@east.example:6443""#))).unwrap_err();
        assert_eq!(problems[0].reason, Reason::InvalidAPIServer);
        let message = &problems[0].message;
        assert!(message.contains("user info") && message.contains("https://east.example:6443"), "{message}");
        assert!(!message.contains("s3cret") && !message.contains("admin"), "{message}");
    }

    #[test]
    fn the_istio_namespace_may_not_be_one_of_kubernetes_itself() {
        for ns in ["kube-system", "default", "kube-public", "kube-node-lease"] {
            let problems = validate(&spec_with(EAST, &format!("istio: {{namespace: {ns}}}"))).expect_err(ns);
            assert_eq!(problems.len(), 1, "{ns}: {problems:?}");
            assert_eq!(problems[0].reason, Reason::SystemNamespace, "{ns}");
            assert!(problems[0].message.contains(&format!("istio.namespace {ns:?}")), "{}", problems[0].message);
        }
        assert!(validate(&spec_with(EAST, "istio: {namespace: istio-mesh1}")).is_ok());
    }

    #[test]
    fn a_revision_too_long_for_istiods_service_name_is_refused() {
        let revision = |n: usize| spec_with(EAST, &format!("istio: {{revision: {}}}", "r".repeat(n)));
        assert!(validate(&revision(56)).is_ok(), "istiod-<56 characters> is 63");
        for n in [57, 63] {
            let problems = validate(&revision(n)).unwrap_err();
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert_eq!(problems[0].reason, Reason::RevisionTooLong);
            assert!(problems[0].message.contains(&format!("has {n} characters")), "{}", problems[0].message);
            assert!(problems[0].message.contains("at most 56"), "{}", problems[0].message);
        }
    }

    #[test]
    fn a_token_lifetime_the_token_request_api_refuses_is_refused() {
        // 2^32 seconds is 1193046h 28m 16s.
        assert!(validate(&spec_with(EAST, "remoteAccess: {tokenTTL: 1193046h 28m 16s}")).is_ok());
        for ttl in ["1193046h 28m 17s", "200years"] {
            let problems = validate(&spec_with(EAST, &format!("remoteAccess: {{tokenTTL: {ttl}}}"))).unwrap_err();
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert_eq!(problems[0].reason, Reason::InvalidDuration);
            assert!(problems[0].message.contains("at most 2^32 seconds"), "{}", problems[0].message);
        }
    }

    #[test]
    fn every_problem_is_reported_not_just_the_first() {
        let dup = EAST.to_string();
        let s = spec_with(&format!("{EAST}\n{dup}"), "remoteAccess: {tokenTTL: x}");
        assert_eq!(reasons(&s), ["DuplicateClusterName", "DuplicateKubeconfig", "InvalidDuration"]);
    }
}
