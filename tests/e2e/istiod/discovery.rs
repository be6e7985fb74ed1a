//! Discovery: each Primary's istiod syncs the other members through meshfed's remote secrets, knows their services
//! and endpoints on their networks, finds every network's gateway, and tells sidecars what they dial; a Primary
//! serves its Remote.

use super::*;

/// The multi-primary discovery scenario on the given networks: each istiod syncs the other member through meshfed's
/// remote secret, then a Service created in each member reaches the other member's istiod, with its endpoint on the
/// creating member's network, within [`DISCOVERY_BOUND`]. Prints the measured latencies.
async fn each_primary_discovers_the_other(east_network: &str, west_network: &str) -> anyhow::Result<()> {
    let mesh = Mesh::start(east_network, west_network).await?;
    for (holder, other) in [("east", "west"), ("west", "east")] {
        let istiod = mesh.istiod(holder);
        let ok = async || istiod.debug("/debug/clusterz").await.is_ok_and(|c| synced(&c, other));
        if let Err(e) = until(&format!("{holder}'s istiod to sync {other}"), WAIT, POLL, ok).await {
            let clusterz = istiod.debug("/debug/clusterz").await?;
            panic!("{e}; clusterz: {clusterz}; log:\n{}", istiod.log_tail());
        }
    }

    for (origin, observer, address) in [("west", "east", "10.244.1.5"), ("east", "west", "10.244.2.7")] {
        let istiod = mesh.istiod(observer);
        let network = mesh.network(origin);
        let started = Instant::now();
        create_hello(&mesh, origin, address).await?;
        let seen = async || {
            let (Ok(registry), Ok(shards)) =
                (istiod.debug("/debug/registryz").await, istiod.debug("/debug/endpointShardz").await)
            else {
                return false;
            };
            service_known(&registry, origin) && endpoint_known(&shards, origin, address, &network)
        };
        let what = format!("{observer}'s istiod to know {origin}'s service and its endpoint on {network}");
        if let Err(e) = until(&what, DISCOVERY_BOUND, POLL, seen).await {
            let shards = istiod.debug("/debug/endpointShardz").await?;
            panic!("{e}; endpointShardz: {shards}; log:\n{}", istiod.log_tail());
        }
        println!(
            "discovery latency ({east_network}/{west_network}): a Service created in {origin} is in {observer}'s istiod after {:?}",
            started.elapsed()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn on_two_networks_each_primary_istiod_discovers_the_other_members_services_on_its_network() -> anyhow::Result<()>
{
    each_primary_discovers_the_other("network1", "network2").await
}

#[tokio::test(flavor = "multi_thread")]
async fn on_one_network_each_primary_istiod_discovers_the_other_members_services() -> anyhow::Result<()> {
    each_primary_discovers_the_other("network1", "network1").await
}

/// The gateways `istiod` reports for `network` on `/debug/networkz`, as `address:port`.
async fn gateways(istiod: &Istiod, network: &str) -> anyhow::Result<Vec<String>> {
    let all = istiod.debug("/debug/networkz").await?;
    let mut found: Vec<String> = all
        .as_array()
        .into_iter()
        .flatten()
        .filter(|g| g["Network"] == network)
        .map(|g| format!("{}:{}", g["Addr"].as_str().unwrap_or_default(), g["Port"]))
        .collect();
    found.sort();
    Ok(found)
}

#[tokio::test(flavor = "multi_thread")]
async fn istiod_finds_every_networks_gateway_in_each_exposure_mode() -> anyhow::Result<()> {
    let mesh = Mesh::start("network1", "network2").await?;
    let west = mesh.f.member("west").await?;
    meshfed_testenv::add_node(&west, "w1", &[("gateway", "yes")], &[("ExternalIP", "198.51.100.7")]).await?;
    let yaml = |gw: &str| prod(GENERATED_ROOT, NETWORKS, &format!(", eastWestGateway: {gw}"));
    // Each mode in turn: meshfed converges, then east's istiod must report west's gateway where meshfed says it is
    // (status.clusters[].gatewayAddress and gatewayPort), and nowhere else.
    for gw in [
        "{expose: LoadBalancer}",
        "{expose: NodePort, nodeSelector: {gateway: 'yes'}}",
        "{expose: HostNetwork, nodeSelector: {gateway: 'yes'}}",
        "{expose: LoadBalancer, address: 192.0.2.50}",
    ] {
        mesh.f.apply(&yaml(gw)).await?;
        let fed = mesh.f.wait_for("prod", WAIT, is_ready).await?;
        let status = fed.status.unwrap();
        let west_status = status.clusters.iter().find(|c| c.name == "west").unwrap();
        let expected =
            format!("{}:{}", west_status.gateway_address.as_deref().unwrap(), west_status.gateway_port.unwrap());
        let seen = async || gateways(mesh.istiod("east"), "network2").await.is_ok_and(|g| g == [expected.clone()]);
        until(&format!("east's istiod to report west's gateway at {expected} ({gw})"), DISCOVERY_BOUND, POLL, seen)
            .await
            .map_err(|e| {
                let all = futures::executor::block_on(mesh.istiod("east").debug("/debug/networkz")).unwrap_or_default();
                anyhow::anyhow!("{e}; networkz: {all}; log:\n{}", mesh.istiod("east").log_tail())
            })?;
        println!("{gw}: east's istiod dials network2 at {expected}");
    }
    Ok(())
}

/// What `observer`'s istiod tells a sidecar of `observer` (on its network) about `hello`: `address:port` with
/// weight, sorted.
pub(super) async fn sidecar_view(mesh: &Mesh, observer: &str) -> anyhow::Result<Vec<String>> {
    let answer =
        mesh.istiod(observer).sidecar_endpoints(observer, &mesh.network(observer), "10.244.9.9", HELLO_CLUSTER).await?;
    let mut seen: Vec<String> = answer["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| format!("{}:{} weight {}", e["address"].as_str().unwrap_or_default(), e["port"], e["weight"]))
        .collect();
    seen.sort();
    Ok(seen)
}

/// What a sidecar of `observer` must be told about `hello` (a pod in each member) on one network: both pods.
fn told_on_one_network(_observer: &str) -> Vec<String> {
    vec![format!("{}:5000 weight 1", pod_address("west")), format!("{}:5000 weight 1", pod_address("east"))]
}

/// What a sidecar of `observer` must be told about `hello` when east and west are on two networks: its own
/// member's pod, and the other member's through that member's east-west gateway (the address meshfed reports in
/// status, the played cloud's load balancer address) at 15443, weight 1 for the one endpoint behind it.
pub(super) fn told_on_two_networks(mesh: &Mesh, observer: &str) -> Vec<String> {
    let other = if observer == "east" { "west" } else { "east" };
    let status = mesh.fed.status.as_ref().expect("a status");
    let c = status.clusters.iter().find(|c| c.name == other).expect("a member's status");
    let gateway = c.gateway_address.clone().unwrap_or_else(|| panic!("meshfed reports no gateway address for {other}"));
    let mut v = vec![format!("{}:5000 weight 1", pod_address(observer)), format!("{gateway}:15443 weight 1")];
    v.sort();
    v
}

/// The other member's pod address, which a sidecar on another network must never be told to dial.
fn other_pod(observer: &str) -> Vec<String> {
    vec![pod_address(if observer == "east" { "west" } else { "east" }).to_string()]
}

/// The sidecar scenario: once `hello` runs in both members ([`pod_address`]), a sidecar of each member asks the
/// istiod serving it over ADS and must be told exactly `expected(observer)` within [`DISCOVERY_BOUND`] of
/// `started`; no sample on the way may name an address in `never(observer)`. Prints the measured times.
async fn each_sidecar_is_told(
    mesh: &Mesh,
    started: Instant,
    expected: impl Fn(&str) -> Vec<String>,
    never: impl Fn(&str) -> Vec<String>,
) -> anyhow::Result<()> {
    for observer in ["east", "west"] {
        let (mut want, forbidden) = (expected(observer), never(observer));
        want.sort();
        let (mut last, mut error) = (Vec::new(), String::new());
        let told = sample_until(started, DISCOVERY_BOUND, POLL, async |n, _| {
            match sidecar_view(mesh, observer).await {
                Ok(view) => last = view,
                Err(e) => error = format!("; last probe error: {e:#}"),
            }
            if let Some(bad) = last.iter().find(|e| forbidden.iter().any(|f| e.starts_with(&format!("{f}:")))) {
                panic!("{observer}'s sidecar was told to dial {bad} directly (sample {n}: {last:?})");
            }
            Ok(last == want)
        })
        .await;
        let samples = told.unwrap_or_else(|e| {
            panic!(
                "{observer}'s sidecar was told {last:?}, not {want:?}: {e}{error}; log:\n{}",
                mesh.istiod(observer).log_tail()
            )
        });
        println!(
            "{observer}'s sidecar is told {want:?} by {}'s istiod for {HELLO_CLUSTER} {:?} after the Services were created ({samples} ADS samples)",
            mesh.istiod(observer).cluster_id(),
            started.elapsed()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn on_one_network_a_sidecar_is_told_the_pod_addresses_in_every_member() -> anyhow::Result<()> {
    let mesh = Mesh::start("network1", "network1").await?;
    let started = create_hellos(&mesh).await?;
    each_sidecar_is_told(&mesh, started, told_on_one_network, |_| vec![]).await
}

#[tokio::test(flavor = "multi_thread")]
async fn on_two_networks_a_sidecar_is_told_the_other_networks_gateway_never_its_pods() -> anyhow::Result<()> {
    let mesh = Mesh::start("network1", "network2").await?;
    let started = create_hellos(&mesh).await?;
    each_sidecar_is_told(&mesh, started, |o| told_on_two_networks(&mesh, o), other_pod).await
}

/// The primary-remote scenario on a `deploy/examples` federation (east the Primary, west its Remote): east's
/// istiod syncs west through meshfed's remote secret, discovers a Service created in west with its endpoint on
/// west's network, and tells a sidecar of either member (west's sidecars are served by east's istiod) what it tells
/// on that many networks. Prints the measured times.
async fn the_primary_serves_its_remote(example_name: &str) -> anyhow::Result<()> {
    let mesh = Mesh::from_yaml(&example(example_name)).await?;
    assert_eq!(mesh.istiods.keys().collect::<Vec<_>>(), ["east"], "only the Primary runs an istiod");
    let east = mesh.istiod("east");
    assert_eq!(mesh.istiod("west").cluster_id(), "east", "west is served by east's istiod");
    let started = Instant::now();
    let ok = async || east.debug("/debug/clusterz").await.is_ok_and(|c| synced(&c, "west"));
    if let Err(e) = until("east's istiod to sync its Remote west", WAIT, POLL, ok).await {
        panic!("{e}; clusterz: {}; log:\n{}", east.debug("/debug/clusterz").await?, east.log_tail());
    }
    println!(
        "{example_name}: east's istiod reports west synced {:?} after it was ready (it started in {:?}; /ready waits for remote clusters)",
        started.elapsed(),
        east.ready_after()
    );

    let network = mesh.network("west");
    let started = Instant::now();
    create_hello_pod(&mesh, "west", pod_address("west")).await?;
    let seen = async || {
        let (Ok(registry), Ok(shards)) =
            (east.debug("/debug/registryz").await, east.debug("/debug/endpointShardz").await)
        else {
            return false;
        };
        service_known(&registry, "west") && endpoint_known(&shards, "west", pod_address("west"), &network)
    };
    if let Err(e) = until("east's istiod to know west's service and endpoint", DISCOVERY_BOUND, POLL, seen).await {
        panic!("{e}; endpointShardz: {}; log:\n{}", east.debug("/debug/endpointShardz").await?, east.log_tail());
    }
    println!(
        "{example_name}: a Service created in the Remote west is in east's istiod, on {network}, after {:?}",
        started.elapsed()
    );

    let started = Instant::now();
    create_hello_pod(&mesh, "east", pod_address("east")).await?;
    if mesh.network("east") == network {
        each_sidecar_is_told(&mesh, started, told_on_one_network, |_| vec![]).await
    } else {
        each_sidecar_is_told(&mesh, started, |o| told_on_two_networks(&mesh, o), other_pod).await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn primary_remote_the_primary_istiod_syncs_and_serves_its_remote() -> anyhow::Result<()> {
    the_primary_serves_its_remote("primary-remote").await
}

#[tokio::test(flavor = "multi_thread")]
async fn primary_remote_on_two_networks_the_primary_istiod_serves_its_remote_through_gateways() -> anyhow::Result<()> {
    the_primary_serves_its_remote("primary-remote-multi-network").await
}
