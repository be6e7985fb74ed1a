//! Ambient multi-network at the real istiod: with `dataPlane: Ambient`, each Primary's istiod, deployed as the Sail
//! operator deploys it from what meshfed wrote (the istiod chart rendered for the `Istio`'s ambient profile and
//! values), deploys the HBONE east-west Gateway meshfed declared, and tells a ztunnel on its network (delta xDS, WDS)
//! that a global Service's endpoints on the other network are reached through that network's gateway on 15008, at
//! the address meshfed reports, while a Service without `istio.io/global` stays in its cluster.

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::DynamicObject;
use meshfed_core::gateway::{AMBIENT_GATEWAY_NAME, GATEWAY_NAME, HBONE_PORT};
use meshfed_core::kinds::{ISTIO, KUBERNETES_GATEWAY};
use meshfed_e2e::load_balancer_ip;
use meshfed_operator::member::kinds::api_resource;

use super::*;

/// The global Service's pod, the local Service's pod and the gateway pod of each member.
fn addresses(member: &str) -> [&'static str; 3] {
    if member == "east" {
        ["10.244.2.7", "10.244.2.8", "10.244.2.20"]
    } else {
        ["10.244.1.5", "10.244.1.6", "10.244.1.20"]
    }
}

/// Plays the kubelet and the endpoint controller for the pod of Deployment `name` (which istiod deployed for the
/// Gateway) in `namespace`: a Pod with the Deployment's template, Running and Ready at `address`, and an EndpointSlice
/// of Service `name` with that ready endpoint on every port of the Service.
async fn play_pod_of(client: &kube::Client, namespace: &str, name: &str, address: &str) -> anyhow::Result<()> {
    let pp = PostParams::default();
    let deployment = until_some(&format!("istiod to deploy {name}"), async || {
        Api::<Deployment>::namespaced(client.clone(), namespace).get_opt(name).await.ok().flatten()
    })
    .await?;
    let service = until_some(&format!("istiod to create Service {name}"), async || {
        Api::<Service>::namespaced(client.clone(), namespace).get_opt(name).await.ok().flatten()
    })
    .await?;
    let template = deployment.spec.context("a Deployment spec")?.template;
    let pod_name = format!("{name}-0");
    let mut pod = Pod { metadata: template.metadata.unwrap_or_default(), spec: template.spec, status: None };
    pod.metadata.name = Some(pod_name.clone());
    run_pod(client, namespace, &pod, address).await?;
    let ports: Vec<Value> = service
        .spec
        .and_then(|s| s.ports)
        .unwrap_or_default()
        .iter()
        .map(|p| json!({"name": p.name, "port": p.port, "protocol": "TCP"}))
        .collect();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": format!("{name}-0"), "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "endpoints": [{
            "addresses": [address],
            "conditions": {"ready": true},
            "targetRef": {"kind": "Pod", "namespace": namespace, "name": pod_name},
        }],
        "ports": ports,
    }))?;
    Api::<EndpointSlice>::namespaced(client.clone(), namespace).create(&pp, &slice).await?;
    Ok(())
}

/// Polls `get` until it gives something, within [`WAIT`].
async fn until_some<T>(what: &str, get: impl AsyncFn() -> Option<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(t) = get().await {
            return Ok(t);
        }
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}

/// Creates, in namespace `sample` of the member `client` reaches, Service `name` (port 5000; labelled
/// `istio.io/global: "true"` when `global`) and its one Pod at `address`, captured by ztunnel as istio-cni marks it
/// (annotation `ambient.istio.io/redirection: enabled`), Running and Ready, with its EndpointSlice.
async fn create_service(client: &kube::Client, name: &str, global: bool, address: &str) -> anyhow::Result<()> {
    let pod = json!({"name": name, "annotations": {"ambient.istio.io/redirection": "enabled"}});
    let labels = if global { json!({"istio.io/global": "true"}) } else { json!({}) };
    create_backed_service(client, name, pod, labels, address).await
}

/// The WDS workloads of cluster `cluster` that back Service `name` of namespace `sample`.
fn backing<'a>(view: &'a Value, cluster: &str, name: &str) -> Vec<&'a Value> {
    let service = format!("sample/{name}.sample.svc.cluster.local");
    view["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|w| w["clusterId"] == cluster && w["services"].as_array().is_some_and(|s| s.contains(&json!(service))))
        .collect()
}

/// Starts an istiod in east and in west as the Sail operator starts it ([`Istiod::start_as_sail`]) once meshfed wrote
/// the member's CA and Sail `Istio`.
async fn start_istiods_as_sail(f: &Fixture) -> anyhow::Result<BTreeMap<String, Istiod>> {
    let members = ["east", "west"];
    for member in members {
        let client = f.member(member).await?;
        until_some(&format!("meshfed to write {member}'s cacerts and Sail Istio"), async || {
            let cacerts = Api::<Secret>::namespaced(client.clone(), ISTIO_NAMESPACE).get_opt("cacerts").await;
            let istio = Api::<DynamicObject>::all_with(client.clone(), &api_resource(&ISTIO)).get_opt("default").await;
            (cacerts.ok().flatten().is_some() && istio.ok().flatten().is_some()).then_some(())
        })
        .await?;
    }
    let started =
        futures::future::try_join_all(members.map(|m| Istiod::start_as_sail(f.env.cluster(m), m, ISTIO_NAMESPACE)))
            .await?;
    Ok(members.iter().map(|m| m.to_string()).zip(started).collect())
}

/// Plays, in east and west, the pod of the ambient east-west Gateway once istiod deployed it and knows its Service
/// (a real pod takes seconds to start; played at once, it can be ready before istiod's informer holds its own Service,
/// and istiod then reports the other cluster's gateway address, from the Service of the same name there, in this
/// Gateway's status: seen on a loaded machine). The played cloud gives the Service an address, which istiod then
/// reports in the Gateway's status.
async fn play_ambient_gateways(f: &Fixture, istiods: &BTreeMap<String, Istiod>) -> anyhow::Result<()> {
    let hostname = format!("{AMBIENT_GATEWAY_NAME}.{ISTIO_NAMESPACE}.svc.cluster.local");
    for member in ["east", "west"] {
        let client = f.member(member).await?;
        let istiod = &istiods[member];
        let knows = async || {
            let registry = istiod.debug("/debug/registryz").await.unwrap_or_default();
            registry
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| s["hostname"] == hostname.as_str() && !s["clusterVIPs"]["Addresses"][member].is_null())
        };
        until(&format!("{member}'s istiod to know its gateway Service"), WAIT, POLL, knows).await?;
        play_pod_of(&client, ISTIO_NAMESPACE, AMBIENT_GATEWAY_NAME, addresses(member)[2]).await?;
    }
    Ok(())
}

/// An ambient federation `prod` of east and west, converged, with each Primary's istiod started as the Sail operator
/// starts it, the Gateways it deploys played, each istiod synced with the other member, and in each member a Service
/// `local` and then a global Service `hello`.
async fn ambient_mesh() -> anyhow::Result<Mesh> {
    let f = Fixture::start(&["east", "west"], Options { real_istiod: true, ..Options::default() }).await?;
    f.apply(&prod(&format!("{GENERATED_ROOT}  dataPlane: Ambient\n"), NETWORKS, "")).await?;
    let istiods = start_istiods_as_sail(&f).await?;
    play_ambient_gateways(&f, &istiods).await?;
    let fed = f.wait_for("prod", WAIT, is_ready).await?;
    let mesh = Mesh { f, fed, istiods };
    for (holder, other) in [("east", "west"), ("west", "east")] {
        let istiod = mesh.istiod(holder);
        let ok = async || istiod.debug("/debug/clusterz").await.is_ok_and(|c| synced(&c, other));
        if let Err(e) = until(&format!("{holder}'s istiod to sync {other}"), WAIT, POLL, ok).await {
            panic!("{e}; clusterz: {}; log:\n{}", istiod.debug("/debug/clusterz").await?, istiod.log_tail());
        }
    }
    // Each member: a Service without the global label first, then a global one.
    for member in ["east", "west"] {
        let client = mesh.f.member(member).await?;
        let [global, local, _] = addresses(member);
        create_service(&client, "local", false, local).await?;
        create_service(&client, "hello", true, global).await?;
    }
    Ok(mesh)
}

/// The address and port meshfed reports for `member`'s gateway.
fn reported(mesh: &Mesh, member: &str) -> (String, i32) {
    let status = mesh.fed.status.as_ref().expect("a status");
    let cluster = status.clusters.iter().find(|c| c.name == member).expect("the member's status");
    (cluster.gateway_address.clone().expect("a gateway address"), cluster.gateway_port.expect("a gateway port"))
}

/// Polls what `holder`'s istiod tells a ztunnel of its network until `other`'s global Service `hello` is in it.
async fn wds_with_the_others_hello(mesh: &Mesh, holder: &str, other: &str) -> anyhow::Result<Value> {
    let network = mesh.network(holder);
    let istiod = mesh.istiod(holder);
    let ztunnel_ip = if holder == "east" { "10.244.2.30" } else { "10.244.1.30" };
    let view = async || istiod.ztunnel_view(holder, &network, ztunnel_ip).await.ok();
    let crossed = async || view().await.filter(|v| !backing(v, other, "hello").is_empty());
    let what = format!("{holder}'s istiod to tell a ztunnel of {other}'s global Service");
    match until_some(&what, crossed).await {
        Ok(v) => Ok(v),
        Err(e) => panic!(
            "{e}; WDS: {}; log:\n{}",
            istiod.ztunnel_view(holder, &network, ztunnel_ip).await?,
            istiod.log_tail()
        ),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn in_ambient_mode_a_ztunnel_reaches_the_other_networks_global_services_through_its_gateway_and_no_local_one()
-> anyhow::Result<()> {
    let mesh = ambient_mesh().await?;
    for (i, member) in ["east", "west"].iter().enumerate() {
        let (address, port) = reported(&mesh, member);
        assert_eq!(
            (address.as_str(), port),
            (load_balancer_ip(i).as_str(), HBONE_PORT),
            "{member}'s gateway is its load balancer's"
        );
    }

    for (holder, other) in [("east", "west"), ("west", "east")] {
        let (network, other_network) = (mesh.network(holder), mesh.network(other));
        let istiod = mesh.istiod(holder);
        let gateway = format!("{other_network}/{}", reported(&mesh, other).0);
        // The global Service's endpoint in the other member, behind that member's gateway.
        let view = wds_with_the_others_hello(&mesh, holder, other).await?;
        println!("{holder}'s ztunnel is told (WDS): {view:#}");
        let [remote] = backing(&view, other, "hello")[..] else {
            panic!("one workload of {other} for hello: {view:#}")
        };
        assert_eq!(remote["network"], other_network.as_str(), "{remote:#}");
        assert_eq!(remote["gateway"], gateway.as_str(), "reached through {other}'s gateway at meshfed's address");
        assert_eq!(remote["gatewayPort"], HBONE_PORT, "{remote:#}");
        assert_eq!(remote["tunnelProtocol"], "HBONE", "{remote:#}");
        assert_eq!(remote["addresses"], json!([]), "no pod address of another network: {remote:#}");
        // Its own member's endpoint, directly.
        let [own] = backing(&view, holder, "hello")[..] else { panic!("one workload of {holder} for hello: {view:#}") };
        assert_eq!(own["addresses"], json!([addresses(holder)[0]]), "{own:#}");
        // The Service without the global label, created before the global one, did not cross; no pod address of the
        // other member is anywhere.
        assert!(backing(&view, other, "local").is_empty(), "{other}'s local Service crossed: {view:#}");
        assert_eq!(backing(&view, holder, "local").len(), 1, "{holder}'s own local Service: {view:#}");
        let text = view.to_string();
        for address in &addresses(other)[..2] {
            assert!(!text.contains(&format!("\"{address}\"")), "{other}'s pod address {address} in {holder}'s WDS");
        }
        // Every network's gateway is known, at the address meshfed reports.
        let networkz = istiod.debug("/debug/networkz").await?;
        for (member, net) in [(holder, &network), (other, &other_network)] {
            let listed = networkz
                .as_array()
                .into_iter()
                .flatten()
                .any(|g| g["Network"] == net.as_str() && g["Addr"] == reported(&mesh, member).0.as_str());
            assert!(listed, "{holder}'s istiod lists {member}'s gateway on {net}: {networkz}");
        }
    }
    Ok(())
}

/// What east's sidecar or ztunnel is told of `hello` over a stretch of time: each distinct view with when it was first
/// seen (since `from`).
#[derive(Default)]
struct Timeline(Vec<(Duration, Vec<String>)>);

impl Timeline {
    fn record(&mut self, from: Instant, view: Vec<String>) {
        if self.0.last().is_none_or(|(_, last)| *last != view) {
            self.0.push((from.elapsed(), view));
        }
    }

    /// Records `view()` every [`POLL`] until `until` has passed since `from`.
    async fn sample_through(&mut self, from: Instant, until: Duration, view: impl AsyncFn() -> Vec<String>) {
        while from.elapsed() < until {
            let sampled = Instant::now();
            self.record(from, view().await);
            tokio::time::sleep(POLL.saturating_sub(sampled.elapsed())).await;
        }
    }

    /// Records `view()` every [`POLL`] until `old()` says west's gateway of the mode switched from is pruned, which
    /// must not happen before `new()` says the new mode's is written: when the prune was seen, since `from`.
    async fn record_until_pruned(
        &mut self,
        from: Instant,
        view: impl AsyncFn() -> Vec<String>,
        old: &impl AsyncFn() -> anyhow::Result<bool>,
        new: &impl AsyncFn() -> anyhow::Result<bool>,
    ) -> anyhow::Result<Duration> {
        loop {
            let sampled = Instant::now();
            self.record(from, view().await);
            if !old().await? {
                assert!(new().await?, "west's old gateway was pruned before the new one was written: {self}");
                return Ok(from.elapsed());
            }
            anyhow::ensure!(from.elapsed() < WAIT, "west's old gateway still there after {WAIT:?}: {self}");
            tokio::time::sleep(POLL.saturating_sub(sampled.elapsed())).await;
        }
    }

    fn views(&self) -> Vec<&Vec<String>> {
        self.0.iter().map(|(_, v)| v).collect()
    }
}

impl std::fmt::Display for Timeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (at, view) in &self.0 {
            writeln!(f, "  {:>6.2}s {view:?}", at.as_secs_f64())?;
        }
        Ok(())
    }
}

/// What east's sidecar is told of `hello`: `address:port weight w`, sorted.
async fn sidecar_now(mesh: &Mesh) -> Vec<String> {
    super::discovery::sidecar_view(mesh, "east").await.unwrap_or_else(|e| vec![format!("error: {e:#}")])
}

/// What east's ztunnel is told of west's `hello`: each workload as `via <gateway>:<port>` or its addresses.
async fn ztunnel_now(mesh: &Mesh) -> Vec<String> {
    match mesh.istiod("east").ztunnel_view("east", "network1", "10.244.2.30").await {
        Ok(view) => backing(&view, "west", "hello")
            .iter()
            .map(|w| match w["gateway"].as_str() {
                Some(gateway) => format!("via {gateway}:{}", w["gatewayPort"]),
                None => format!("direct {}", w["addresses"]),
            })
            .collect(),
        Err(e) => vec![format!("error: {e:#}")],
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn switching_a_running_mesh_to_ambient_and_back_what_sidecars_and_ztunnels_are_told_at_each_moment()
-> anyhow::Result<()> {
    let f = Fixture::start(&["east", "west"], Options { real_istiod: true, ..Options::default() }).await?;
    f.apply(&prod(GENERATED_ROOT, NETWORKS, "")).await?;
    let fed = f.wait_for("prod", WAIT, is_ready).await?;
    let istiods = start_istiods_as_sail(&f).await?;
    let mut mesh = Mesh { f, fed, istiods };
    create_hellos(&mesh).await?;
    // Prepared for ambient: `hello` is global (sidecar mode does not read the label).
    for member in ["east", "west"] {
        let services = Api::<Service>::namespaced(mesh.f.member(member).await?, "sample");
        let global = json!({"metadata": {"labels": {"istio.io/global": "true"}}});
        services.patch("hello", &PatchParams::default(), &Patch::Merge(&global)).await?;
    }
    let sidecar_mode = super::discovery::told_on_two_networks(&mesh, "east");
    let ok = async || super::discovery::sidecar_view(&mesh, "east").await.is_ok_and(|v| v == sidecar_mode);
    until("east's sidecar to be told west's hello through west's gateway", WAIT, POLL, ok).await?;

    // The switch, as a GitOps tool would apply it.
    let applied = Instant::now();
    let mut timeline = Timeline::default();
    timeline.record(applied, sidecar_now(&mesh).await);
    mesh.f.apply(&prod(&format!("{GENERATED_ROOT}  dataPlane: Ambient\n"), NETWORKS, "")).await?;
    let west = mesh.f.member("west").await?;
    let services = Api::<Service>::namespaced(west.clone(), ISTIO_NAMESPACE);
    let gateways =
        Api::<DynamicObject>::namespaced_with(west.clone(), ISTIO_NAMESPACE, &api_resource(&KUBERNETES_GATEWAY));
    // Until west's sidecar-mode gateway is pruned: the ambient objects are there first.
    let sidecar_gateway = async || anyhow::Ok(services.get_opt(GATEWAY_NAME).await?.is_some());
    let hbone_gateway = async || anyhow::Ok(gateways.get_opt(AMBIENT_GATEWAY_NAME).await?.is_some());
    let pruned = timeline
        .record_until_pruned(applied, async || sidecar_now(&mesh).await, &sidecar_gateway, &hbone_gateway)
        .await?;
    // The old istiod keeps running (the Sail operator rolls it only now): a few seconds of what it tells.
    timeline.sample_through(applied, pruned + Duration::from_secs(2), async || sidecar_now(&mesh).await).await;

    // The Sail operator rolls istiod onto the ambient profile (the test plays it: new istiods, then the old go).
    let restarted = applied.elapsed();
    mesh.istiods = start_istiods_as_sail(&mesh.f).await?;
    play_ambient_gateways(&mesh.f, &mesh.istiods).await?;
    mesh.fed = mesh.f.wait_for("prod", WAIT, is_ready).await?;
    let ready = applied.elapsed();
    timeline.sample_through(applied, ready + Duration::from_secs(3), async || sidecar_now(&mesh).await).await;
    println!(
        "east's sidecar, told of hello, from the switch's apply (west's sidecar gateway pruned at {:.2}s, istiod rolled at {:.2}s, Ready at {:.2}s):\n{timeline}",
        pruned.as_secs_f64(),
        restarted.as_secs_f64(),
        ready.as_secs_f64()
    );
    // What the README says a running sidecar sees, in this order and nothing else. Until the prune, west's endpoint
    // through west's sidecar-mode gateway. Once the prune reaches the old istiod (which found network2's gateway by
    // its Service's network label), it knows no gateway for network2 and tells the sidecar west's pod address itself,
    // which another network cannot reach. The ambient istiod tells it east's own pod only: sidecars no longer cross.
    let own = format!("{}:5000 weight 1", pod_address("east"));
    let direct = format!("{}:5000 weight 1", pod_address("west"));
    assert_eq!(timeline.views(), [&sidecar_mode, &vec![direct, own.clone()], &vec![own]], "{timeline}");
    // A ztunnel is told west's global hello through west's HBONE gateway, at the address meshfed reports.
    let view = wds_with_the_others_hello(&mesh, "east", "west").await?;
    let gateway = format!("network2/{}", reported(&mesh, "west").0);
    assert!(backing(&view, "west", "hello").iter().all(|w| w["gateway"] == gateway.as_str()), "{view:#}");

    // And back to sidecars: what east's ztunnel is told, until the Sail operator rolls istiod off the ambient profile.
    let back = Instant::now();
    let mut ztunnel = Timeline::default();
    ztunnel.record(back, ztunnel_now(&mesh).await);
    mesh.f.apply(&prod(GENERATED_ROOT, NETWORKS, "")).await?;
    let hbone_pruned =
        ztunnel.record_until_pruned(back, async || ztunnel_now(&mesh).await, &hbone_gateway, &sidecar_gateway).await?;
    ztunnel.sample_through(back, hbone_pruned + Duration::from_secs(2), async || ztunnel_now(&mesh).await).await;
    mesh.istiods = start_istiods_as_sail(&mesh.f).await?;
    mesh.fed = mesh.f.wait_for("prod", WAIT, is_ready).await?;
    let rolled = mesh.istiod("east").ztunnel_view("east", "network1", "10.244.2.30").await;
    println!(
        "east's ztunnel, told of west's hello, from the switch back (west's HBONE Gateway pruned at {:.2}s):\n{ztunnel}",
        hbone_pruned.as_secs_f64()
    );
    // Through west's HBONE gateway, then nothing of west once meshfed pruned it, and never a pod address. In between
    // (from the sidecar gateway's Service, a second gateway for network2 that istiod may take first, until the prune)
    // the view may flap between the two. The istiod without the ambient profile refuses ztunnels.
    let via = vec![format!("via {gateway}:{HBONE_PORT}")];
    let views = ztunnel.views();
    assert_eq!((views.first(), views.last()), (Some(&&via), Some(&&vec![])), "{ztunnel}");
    assert!(views.iter().all(|v| **v == via || v.is_empty()), "{ztunnel}");
    let refused = rolled.expect_err("istiod without the ambient profile answered a ztunnel").to_string();
    assert!(refused.contains("ztunnel requires PILOT_ENABLE_AMBIENT=true"), "{refused}");
    // Sidecars cross again through west's sidecar gateway, from the istiod without the ambient profile.
    let sidecar_mode = super::discovery::told_on_two_networks(&mesh, "east");
    let ok = async || sidecar_now(&mesh).await == sidecar_mode;
    until("east's sidecar to be told west's hello through west's gateway again", WAIT, POLL, ok).await?;
    Ok(())
}
