//! Issue 28: a mesh built the seeds' way (openssl root and intermediates in `cacerts`, `istioctl
//! create-remote-secret` for each pair, a hand-made Sail `Istio` and east-west gateway) is reported and left alone,
//! then adopted with no moment where an istiod loses the other cluster, then let go as it runs (`deletionPolicy:
//! Orphan`) and adopted again by a new federation.

use super::*;
use meshfed_core::{federation, kinds};
use meshfed_operator::member::kinds::api;
use std::path::Path;

/// Runs openssl with whitespace-separated arguments in `dir`; fails with its output.
fn openssl(dir: &Path, args: &str) -> anyhow::Result<()> {
    let out = std::process::Command::new("openssl").args(args.split_whitespace()).current_dir(dir).output()?;
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    anyhow::ensure!(out.status.success(), "openssl {args}: {said}");
    Ok(())
}

/// The seeds' certificate procedure (Istio's `tools/certs` Makefiles): a root and, per cluster, an intermediate
/// signed by it, RSA 4096, with the seeds' extensions. Returns the root certificate and key files' directory.
fn seeds_certificates(dir: &Path, clusters: &[&str]) -> anyhow::Result<()> {
    std::fs::write(
        dir.join("root-ca.conf"),
        "[ req ]\nencrypt_key = no\nprompt = no\nutf8 = yes\ndefault_md = sha256\ndefault_bits = 4096\nreq_extensions = req_ext\nx509_extensions = req_ext\ndistinguished_name = req_dn\n[ req_ext ]\nsubjectKeyIdentifier = hash\nbasicConstraints = critical, CA:true\nkeyUsage = critical, digitalSignature, nonRepudiation, keyEncipherment, keyCertSign\n[ req_dn ]\nO = Istio\nCN = Root CA\n",
    )?;
    openssl(dir, "genrsa -out root-key.pem 4096")?;
    openssl(dir, "req -sha256 -new -key root-key.pem -config root-ca.conf -out root-cert.csr")?;
    openssl(
        dir,
        "x509 -req -sha256 -days 3650 -signkey root-key.pem -extensions req_ext -extfile root-ca.conf -in root-cert.csr -out root-cert.pem",
    )?;
    for c in clusters {
        let conf = format!(
            "[ req ]\nencrypt_key = no\nprompt = no\nutf8 = yes\ndefault_md = sha256\ndefault_bits = 4096\nreq_extensions = req_ext\nx509_extensions = req_ext\ndistinguished_name = req_dn\n[ req_ext ]\nsubjectKeyIdentifier = hash\nbasicConstraints = critical, CA:true, pathlen:0\nkeyUsage = critical, digitalSignature, nonRepudiation, keyEncipherment, keyCertSign\nsubjectAltName=@san\n[ san ]\nDNS.1 = istiod.istio-system.svc\n[ req_dn ]\nO = Istio\nCN = Intermediate CA\nL = {c}\n"
        );
        std::fs::write(dir.join(format!("{c}.conf")), conf)?;
        openssl(dir, &format!("genrsa -out {c}-ca-key.pem 4096"))?;
        openssl(dir, &format!("req -sha256 -new -config {c}.conf -key {c}-ca-key.pem -out {c}-ca.csr"))?;
        openssl(
            dir,
            &format!(
                "x509 -req -sha256 -days 730 -CA root-cert.pem -CAkey root-key.pem -CAcreateserial -extensions req_ext -extfile {c}.conf -in {c}-ca.csr -out {c}-ca-cert.pem"
            ),
        )?;
    }
    Ok(())
}

/// The objects the seeds' procedure makes in one member, as the admin applies them: `cacerts`, the Sail `Istio`,
/// and the east-west gateway of the Sail documentation (Service, Deployment, the `cross-network-gateway`).
fn hand_made(dir: &Path, member: &str, network: &str) -> anyhow::Result<Vec<(kinds::OwnedKind, Value)>> {
    use base64::Engine as _;
    let b64 = |f: &str| -> anyhow::Result<String> {
        Ok(base64::engine::general_purpose::STANDARD.encode(std::fs::read(dir.join(f))?))
    };
    let chain = [std::fs::read(dir.join(format!("{member}-ca-cert.pem")))?, std::fs::read(dir.join("root-cert.pem"))?];
    let labels =
        json!({"istio": "eastwestgateway", "app": "istio-eastwestgateway", "topology.istio.io/network": network});
    Ok(vec![
        (
            kinds::SECRET,
            json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "cacerts", "namespace": ISTIO_NAMESPACE},
                "data": {
                    "ca-cert.pem": b64(&format!("{member}-ca-cert.pem"))?,
                    "ca-key.pem": b64(&format!("{member}-ca-key.pem"))?,
                    "root-cert.pem": b64("root-cert.pem")?,
                    "cert-chain.pem": base64::engine::general_purpose::STANDARD.encode(chain.concat()),
                },
            }),
        ),
        (
            kinds::ISTIO,
            json!({
                "apiVersion": "sailoperator.io/v1", "kind": "Istio",
                "metadata": {"name": "default"},
                "spec": {"version": "v1.30.3", "namespace": ISTIO_NAMESPACE, "values": {"global": {
                    "meshID": "prod", "multiCluster": {"clusterName": member}, "network": network,
                }}},
            }),
        ),
        (
            kinds::SERVICE,
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "istio-eastwestgateway", "namespace": ISTIO_NAMESPACE, "labels": labels},
                "spec": {"type": "LoadBalancer", "selector": {"istio": "eastwestgateway"}, "ports": [
                    {"name": "status-port", "port": 15021, "targetPort": 15021},
                    {"name": "tls", "port": 15443, "targetPort": 15443},
                ]},
            }),
        ),
        (
            kinds::DEPLOYMENT,
            json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "istio-eastwestgateway", "namespace": ISTIO_NAMESPACE, "labels": labels},
                "spec": {"selector": {"matchLabels": {"istio": "eastwestgateway", "app": "istio-eastwestgateway"}}, "template": {
                    "metadata": {"labels": labels, "annotations": {"inject.istio.io/templates": "gateway"}},
                    "spec": {"containers": [{"name": "istio-proxy", "image": "auto"}]},
                }},
            }),
        ),
        (
            kinds::GATEWAY,
            json!({
                "apiVersion": "networking.istio.io/v1", "kind": "Gateway",
                "metadata": {"name": "cross-network-gateway", "namespace": ISTIO_NAMESPACE},
                "spec": {"selector": {"istio": "eastwestgateway"}, "servers": [{
                    "port": {"number": 15443, "name": "tls", "protocol": "TLS"},
                    "tls": {"mode": "AUTO_PASSTHROUGH"}, "hosts": ["*.local"],
                }]},
            }),
        ),
    ])
}

/// Each hand-made object as it is now: its uid, resourceVersion, labels, annotations and everything but metadata.
async fn snapshot(f: &Fixture, objects: &[(String, kinds::ObjectKey)]) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for (member, key) in objects {
        out.push(serde_json::to_value(api(&f.member(member).await?, key).get(&key.name).await?)?);
    }
    Ok(out)
}

/// What an object holds apart from its metadata and status (what runs).
fn running(o: &Value) -> Value {
    let mut o = o.clone();
    for k in ["metadata", "status"] {
        o.as_object_mut().map(|m| m.remove(k));
    }
    o
}

/// Samples, every 100 ms until `done`, whether each istiod holds the other member (synced, or syncing a rewritten
/// remote secret while the old client serves) and its `hello` endpoint; returns the gaps, if any.
async fn sample_discovery(mesh: &Mesh, done: impl AsyncFn() -> bool, bound: Duration) -> anyhow::Result<Vec<String>> {
    let started = Instant::now();
    let mut samples: BTreeMap<&str, Vec<Sample>> = BTreeMap::new();
    sample_until(started, bound, POLL, async |_, at| {
        for (me, other) in [("east", "west"), ("west", "east")] {
            let istiod = &mesh.istiods[me];
            let status = sync_status(&istiod.debug("/debug/clusterz").await.unwrap_or_default(), other);
            let shards = istiod.debug("/debug/endpointShardz").await.unwrap_or_default();
            let endpoint = endpoint_known(&shards, other, pod_address(other), &mesh.network(other));
            samples.entry(me).or_default().push(Sample { at, status, endpoint });
        }
        Ok(done().await)
    })
    .await?;
    let mut out = Vec::new();
    for (me, s) in &samples {
        // As for a token refresh: this Istio swaps a rewritten remote secret's client make-before-break, so the
        // cluster shows `syncing` for a moment (measured, printed) while the old client serves its endpoints.
        let synced = |s: &Sample| s.status.as_deref() == Some("synced");
        println!("{me}: {} samples; the other cluster not `synced` during {:?}", s.len(), gaps(s, synced));
        let ok = |s: &Sample| matches!(s.status.as_deref(), Some("synced" | "syncing")) && s.endpoint;
        out.extend(gaps(s, ok).into_iter().map(|(a, b)| {
            let first = s.iter().find(|x| x.at == a).expect("a sample");
            let seen = format!("status {:?}, endpoint {}", first.status, first.endpoint);
            format!("{me}: {a:?}..{b:?} of {} samples ({seen})", s.len())
        }));
    }
    Ok(out)
}

/// What `member` holds labelled for `cluster` of prod and what `meshfed render` says it holds, as `Kind ns/name`.
async fn held_and_rendered(f: &Fixture, fed: &MeshFederation, member: &str) -> anyhow::Result<[BTreeSet<String>; 2]> {
    let fref = meshfed_e2e::prod();
    let lp = kube::api::ListParams::default().labels(&fref.selector(member));
    let mut held = BTreeSet::new();
    for kind in kinds::OWNED_KINDS {
        let api = Api::<kube::api::DynamicObject>::all_with(
            f.member(member).await?,
            &meshfed_operator::member::kinds::api_resource(kind),
        );
        for o in api.list(&lp).await?.items {
            held.insert(kinds::ObjectKey::of(*kind, &serde_json::to_value(o)?).to_string());
        }
    }
    let rendered =
        meshfed_core::render::render(&fref, &fed.spec, Some(member)).map_err(|p| anyhow::anyhow!("{p:?}"))?;
    let rendered =
        rendered.into_iter().flat_map(|(_, o)| o).filter_map(|o| kinds::key_of(&o)).map(|k| k.to_string()).collect();
    Ok([held, rendered])
}

fn member_reason(fed: &MeshFederation, cluster: &str) -> Option<(String, String)> {
    let c = fed.status.as_ref()?.clusters.iter().find(|c| c.name == cluster)?;
    let ready = meshfed_e2e::condition(&c.conditions, "Ready")?;
    Some((ready.reason.clone(), ready.message.clone()))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mesh_built_by_hand_is_left_alone_then_adopted_without_a_gap_and_let_go_as_it_runs() -> anyhow::Result<()> {
    let options = Options { real_istiod: true, controller_manager: true };
    let f = Fixture::start(&["east", "west"], options).await?;
    let dir = tempfile::tempdir()?;
    seeds_certificates(dir.path(), &["east", "west"])?;
    // The seeds' procedure, member by member: the network label, cacerts, the Istio, the gateway.
    let mut made = Vec::new();
    for (member, network) in [("east", NETWORKS[0]), ("west", NETWORKS[1])] {
        let client = f.member(member).await?;
        let label = json!({"metadata": {"labels": {istio::NETWORK_LABEL: network}}});
        Api::<Namespace>::all(client.clone())
            .patch(ISTIO_NAMESPACE, &PatchParams::default(), &Patch::Merge(&label))
            .await?;
        for (kind, body) in hand_made(dir.path(), member, network)? {
            // Created as `kubectl create` would.
            let key = kinds::ObjectKey::of(kind, &body);
            api(&client, &key).create(&PostParams::default(), &serde_json::from_value(body)?).await?;
            made.push((member.to_string(), key));
        }
    }
    // istioctl's remote secret for each pair, made against the target and applied in the holder.
    for (holder, target) in [("east", "west"), ("west", "east")] {
        let mut secret = remote_access::istioctl_remote_secret(&f, target, target).await?;
        secret.metadata.namespace = Some(ISTIO_NAMESPACE.into());
        Api::<Secret>::namespaced(f.member(holder).await?, ISTIO_NAMESPACE)
            .create(&PostParams::default(), &secret)
            .await?;
        made.push((holder.into(), kinds::remote_secret_key(ISTIO_NAMESPACE, target)));
    }
    let started =
        futures::future::try_join_all(["east", "west"].map(|m| Istiod::start(f.env.cluster(m), m, ISTIO_NAMESPACE)))
            .await?;
    let istiods: BTreeMap<String, Istiod> = ["east", "west"].map(String::from).into_iter().zip(started).collect();
    // The root comes to the hub as the seeds keep it.
    let root = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "seeds-root", "namespace": NAMESPACE}, "stringData": {
        "tls.crt": std::fs::read_to_string(dir.path().join("root-cert.pem"))?,
        "tls.key": std::fs::read_to_string(dir.path().join("root-key.pem"))?,
    }});
    Api::<Secret>::namespaced(f.hub.clone(), NAMESPACE)
        .create(&PostParams::default(), &serde_json::from_value(root)?)
        .await?;
    let yaml = prod("  trust: {root: {secretRef: {name: seeds-root}}}\n", NETWORKS, "");
    let fed: MeshFederation = serde_saphyr::from_str(&yaml)?;
    let mut mesh = Mesh { f, fed, istiods };
    create_hellos(&mesh).await?;
    let both_synced = async || {
        let mut ok = true;
        for (me, other) in [("east", "west"), ("west", "east")] {
            let istiod = &mesh.istiods[me];
            let shards = istiod.debug("/debug/endpointShardz").await.unwrap_or_default();
            ok &= synced(&istiod.debug("/debug/clusterz").await.unwrap_or_default(), other)
                && endpoint_known(&shards, other, pod_address(other), &mesh.network(other));
        }
        ok
    };
    until("the hand-made mesh to discover both ways", DISCOVERY_BOUND, POLL, both_synced).await?;
    let before = snapshot(&mesh.f, &made).await?;

    // Without adoption: each member reports what it would take over, and nothing of it changes.
    mesh.f.apply(&yaml).await?;
    let reported = |fed: &MeshFederation| {
        ["east", "west"].iter().all(|m| member_reason(fed, m).is_some_and(|(r, _)| r == "ObjectNotOwned"))
    };
    let fed = mesh.f.wait_for("prod", WAIT, reported).await?;
    let (_, message) = member_reason(&fed, "east").unwrap();
    for named in [
        "Istio default",
        "Secret istio-system/cacerts",
        "Deployment istio-system/istio-eastwestgateway",
        "existingObjects: Adopt",
    ] {
        assert!(message.contains(named), "the message names {named}: {message}");
    }
    assert_eq!(snapshot(&mesh.f, &made).await?, before, "nothing hand-made changed");
    // `meshfed check` says what adoption would take over and change, before it is asked for.
    let now = jiff::Timestamp::now();
    let findings = meshfed_operator::check::check(&mesh.f.hub, NAMESPACE, "prod", now).await?;
    let preview = |subject: &str, what: &str| {
        findings.iter().any(|c| c.area == "ownership" && c.subject == subject && !c.ok && c.detail.contains(what))
    };
    for member in ["east", "west"] {
        assert!(
            preview(
                member,
                "Istio default was not created by meshfed and is left alone (ObjectNotOwned); `existingObjects: Adopt` would take it over, changing /spec/values"
            ),
            "{findings:#?}"
        );
        assert!(preview(member, "Secret istio-system/cacerts was not created by meshfed"), "{findings:#?}");
    }
    assert_eq!(snapshot(&mesh.f, &made).await?, before, "check wrote nothing");

    // Adoption: sampled every 100 ms, neither istiod loses the other cluster or its endpoint.
    let adopt = json!({"spec": {"existingObjects": "Adopt"}});
    mesh.f.federations().patch("prod", &PatchParams::default(), &Patch::Merge(&adopt)).await?;
    let ready = async || mesh.f.federations().get("prod").await.is_ok_and(|f| is_ready(&f));
    let gaps = match sample_discovery(&mesh, ready, WAIT * 2).await {
        Ok(gaps) => gaps,
        Err(e) => {
            let status = mesh.f.federations().get("prod").await?.status;
            anyhow::bail!("{e}; the federation's status: {}", serde_json::to_string_pretty(&status)?)
        }
    };
    assert!(gaps.is_empty(), "istiod lost the other cluster while meshfed adopted the mesh: {gaps:?}");
    let after = snapshot(&mesh.f, &made).await?;
    let fed = mesh.f.federations().get("prod").await?;
    for member in ["east", "west"] {
        let [held, rendered] = held_and_rendered(&mesh.f, &fed, member).await?;
        assert_eq!(held, rendered, "{member}: the adopted mesh holds exactly what `meshfed render` says");
    }
    for (((member, key), was), now) in made.iter().zip(&before).zip(&after) {
        assert_eq!(now["metadata"]["uid"], was["metadata"]["uid"], "{member}: {key} taken over in place");
        assert_eq!(now["metadata"]["labels"][federation::LABEL_CLUSTER], json!(member), "{member}: {key} labelled");
        assert_eq!(now["metadata"]["annotations"][federation::ANNOTATION_ADOPTED], "true", "{member}: {key} marked");
    }
    // istioctl's remote secrets now hold meshfed's TokenRequest tokens, in place; istioctl's reader is left alone.
    for (holder, target) in [("east", "west"), ("west", "east")] {
        let s = Api::<Secret>::namespaced(mesh.f.member(holder).await?, ISTIO_NAMESPACE)
            .get(&istio::remote_secret_name(target))
            .await?;
        let token = remote::token_in_remote_secret(&s, target).context("a token")?;
        assert!(
            remote_access::jwt_claims(token.expose())["exp"].is_number(),
            "{holder}: a TokenRequest token, which expires"
        );
        let reader = Api::<ServiceAccount>::namespaced(mesh.f.member(target).await?, ISTIO_NAMESPACE);
        assert!(reader.get_opt("istio-reader-service-account").await?.is_some(), "istioctl's reader stays in {target}");
    }
    let findings = meshfed_operator::check::check(&mesh.f.hub, NAMESPACE, "prod", jiff::Timestamp::now()).await?;
    assert!(
        !findings.iter().any(|c| c.area == "ownership"),
        "once adopted, everything is the federation's: {findings:#?}"
    );
    let said = |e: &k8s_openapi::api::events::v1::Event| {
        e.reason.as_deref() == Some("Adopted")
            && e.note.as_deref().is_some_and(|n| n.contains("Istio default (changed /spec/values"))
    };
    mesh.f.wait_for_event("prod", said).await?;

    // Let go as it runs: after the deletion every object is there, as it ran, without meshfed's marks.
    let orphan = json!({"spec": {"deletionPolicy": "Orphan"}});
    mesh.f.federations().patch("prod", &PatchParams::default(), &Patch::Merge(&orphan)).await?;
    mesh.f
        .wait_for("prod", WAIT, |f| is_ready(f) && f.spec.deletion_policy == meshfed_api::DeletionPolicy::Orphan)
        .await?;
    let adopted = snapshot(&mesh.f, &made).await?;
    mesh.f.delete("prod").await?;
    mesh.f.wait_gone("prod", WAIT).await?;
    let left = snapshot(&mesh.f, &made).await?;
    for (((member, key), was), now) in made.iter().zip(&adopted).zip(&left) {
        assert_eq!(now["metadata"]["uid"], was["metadata"]["uid"], "{member}: {key} still there");
        assert_eq!(running(now), running(was), "{member}: {key} runs as it ran");
        let labels = now["metadata"]["labels"].as_object().cloned().unwrap_or_default();
        let annotations = now["metadata"]["annotations"].as_object().cloned().unwrap_or_default();
        let marks: Vec<&String> =
            labels.keys().chain(annotations.keys()).filter(|k| k.starts_with("meshfed.io/")).collect();
        assert!(marks.is_empty(), "{member}: {key} keeps meshfed's {marks:?}");
    }
    for m in ["east", "west"] {
        let claim = kinds::claim_key(ISTIO_NAMESPACE);
        let cms = Api::<ConfigMap>::namespaced(mesh.f.member(m).await?, kinds::CLAIM_NAMESPACE);
        assert!(cms.get_opt(&claim.name).await?.is_none(), "{m}: the claim is given back");
    }
    until("istiod to keep discovering both ways after the federation is gone", DISCOVERY_BOUND, POLL, both_synced)
        .await?;

    // A new federation adopts it again.
    mesh.f.apply(&yaml.replace("spec:\n", "spec:\n  existingObjects: Adopt\n")).await?;
    mesh.f.wait_for("prod", WAIT, is_ready).await?;
    let again = snapshot(&mesh.f, &made).await?;
    for ((member, key), now) in made.iter().zip(&again) {
        assert_eq!(
            now["metadata"]["annotations"][federation::ANNOTATION_ADOPTED],
            "true",
            "{member}: {key} adopted again"
        );
    }
    mesh.fed = mesh.f.federations().get("prod").await?;
    Ok(())
}
