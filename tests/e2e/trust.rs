//! Trust end to end: a root and one intermediate per member that openssl accepts, a root the user brings, every bad
//! root refused with its reason, a hand-made `cacerts` repaired, and a lost generated root reported, never replaced.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams},
};
use meshfed_e2e::{Fixture, NAMESPACE, condition, example, fed_condition, is_ready, sample_until};
use meshfed_testenv::Options;

const WAIT: Duration = Duration::from_secs(60);
/// How often a rotation is sampled: what must hold at every step is checked at each sample.
const SAMPLE: Duration = Duration::from_millis(100);

/// Runs openssl with whitespace-separated arguments in `dir`.
fn openssl(dir: &Path, args: &str) -> (bool, String) {
    let out =
        Command::new("openssl").args(args.split_whitespace()).current_dir(dir).output().expect("openssl is installed");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

async fn cacerts(member: &Client) -> Option<Secret> {
    Api::<Secret>::namespaced(member.clone(), "istio-system").get_opt("cacerts").await.unwrap()
}

fn write_bundle(dir: &Path, secret: &Secret) {
    for (k, v) in secret.data.as_ref().unwrap() {
        std::fs::write(dir.join(k), &v.0).unwrap();
    }
}

/// A member's cacerts verifies with openssl against `root_pem`, has Istio's intermediate profile, and signs a
/// workload (leaf) certificate that verifies too, which needs the root to allow a path below the intermediate.
fn assert_istio_intermediate(dir: &Path, secret: &Secret, cluster: &str, root_pem: &[u8]) {
    write_bundle(dir, secret);
    std::fs::write(dir.join("expected-root.pem"), root_pem).unwrap();
    let (ok, out) = openssl(dir, "verify -CAfile expected-root.pem -untrusted cert-chain.pem ca-cert.pem");
    assert!(ok, "{cluster}: the intermediate does not verify: {out}");
    let (_, text) = openssl(dir, "x509 -in ca-cert.pem -noout -text");
    assert!(text.contains("CA:TRUE, pathlen:0"), "{cluster}: {text}");
    assert!(text.contains("DNS:istiod.istio-system.svc"), "{cluster}: {text}");
    assert!(text.contains(&format!("L = {cluster}")) && text.contains("CN = Intermediate CA"), "{cluster}: {text}");
    for args in [
        "req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout leaf.key -subj /O=workload -out leaf.csr",
        "x509 -req -in leaf.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 1 -out leaf.pem",
    ] {
        let (ok, out) = openssl(dir, args);
        assert!(ok, "{cluster}: openssl {args:?}: {out}");
    }
    let (ok, out) = openssl(dir, "verify -CAfile expected-root.pem -untrusted cert-chain.pem leaf.pem");
    assert!(ok, "{cluster}: a workload certificate from the intermediate does not verify: {out}");
}

async fn hub_secret(f: &Fixture, name: &str) -> Option<Secret> {
    Api::<Secret>::namespaced(f.hub.clone(), NAMESPACE).get_opt(name).await.unwrap()
}

async fn put_hub_secret(f: &Fixture, name: &str, data: &[(&str, Vec<u8>)]) {
    let secret = Secret {
        metadata: kube::api::ObjectMeta { name: Some(name.into()), ..Default::default() },
        data: Some(data.iter().map(|(k, v)| (k.to_string(), ByteString(v.clone()))).collect()),
        ..Default::default()
    };
    let api: Api<Secret> = Api::namespaced(f.hub.clone(), NAMESPACE);
    api.patch(name, &PatchParams::apply("e2e").force(), &Patch::Apply(&secret)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_generated_root_gives_every_member_an_intermediate_that_istio_accepts() -> anyhow::Result<()> {
    let f = Fixture::start(&["east", "west", "north"], Options::default()).await?;
    // A second replica (no leader election yet) races the first one to make the root: one root must come out.
    let (hub, settings) = (f.hub.clone(), meshfed_operator::reconcile::Settings::default());
    let second = tokio::spawn(meshfed_operator::reconcile::run(hub, settings, Default::default()));
    let yaml = example("multi-primary-multi-network").replace(
        "  clusters:\n",
        "  clusters:\n  - {name: north, network: network3, kubeconfigSecretRef: {name: north-kubeconfig}}\n",
    );
    f.apply(&yaml).await?;
    let fed = f.wait_for("prod", WAIT, is_ready).await?;
    assert_eq!(fed_condition(&fed, "TrustReady").unwrap().status, "True");
    let root = hub_secret(&f, "prod-root-ca").await.expect("the generated root is in the hub");
    let root_pem = root.data.as_ref().unwrap()["tls.crt"].0.clone();
    let status = fed.status.as_ref().unwrap();
    assert!(status.trust.as_ref().unwrap().root_fingerprint.as_ref().unwrap().starts_with("sha256:"));

    let dir = tempfile::tempdir()?;
    let mut fingerprints = std::collections::BTreeSet::new();
    for cluster in ["east", "west", "north"] {
        let secret = cacerts(&f.member(cluster).await?).await.expect("cacerts");
        let keys: Vec<_> = secret.data.as_ref().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"]);
        assert_istio_intermediate(dir.path(), &secret, cluster, &root_pem);
        let c = status.clusters.iter().find(|c| c.name == cluster).unwrap();
        assert_eq!(condition(&c.conditions, "TrustReady").unwrap().status, "True");
        fingerprints.insert(c.intermediate_fingerprint.clone().unwrap());
    }
    assert_eq!(fingerprints.len(), 3, "every member has its own intermediate");
    second.abort();
    // No private key in status.
    assert!(!serde_json::to_string(&fed.status)?.contains("PRIVATE KEY"));

    // A cacerts replaced by hand with a CA of its own is repaired.
    let east = f.member("east").await?;
    let (ok, out) = openssl(
        dir.path(),
        "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout own.key -subj /CN=own -days 1 -out own.pem",
    );
    assert!(ok, "{out}");
    let own = std::fs::read(dir.path().join("own.pem"))?;
    let own_key = std::fs::read(dir.path().join("own.key"))?;
    let mut hand_made = cacerts(&east).await.unwrap();
    hand_made.metadata.managed_fields = None;
    hand_made.metadata.resource_version = None;
    hand_made.data = Some(
        [("ca-cert.pem", &own), ("ca-key.pem", &own_key), ("root-cert.pem", &own), ("cert-chain.pem", &own)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.clone())))
            .collect(),
    );
    Api::<Secret>::namespaced(east.clone(), "istio-system").replace("cacerts", &Default::default(), &hand_made).await?;
    f.poke("prod").await?;
    let repaired = async || cacerts(&east).await.unwrap().data.as_ref().unwrap()["ca-cert.pem"].0 != own;
    meshfed_e2e::until("the hand-made cacerts to be repaired", WAIT, Duration::from_millis(200), repaired).await?;
    assert_istio_intermediate(dir.path(), &cacerts(&east).await.unwrap(), "east", &root_pem);

    // A root the federation does not use, appended to east's root-cert.pem, is removed and said.
    let root_fp = meshfed_core::pki::fingerprints(&root_pem).remove(0);
    let own_fp = meshfed_core::pki::fingerprints(&own).remove(0);
    let mut appended = cacerts(&east).await.unwrap();
    appended.metadata.managed_fields = None;
    appended.metadata.resource_version = None;
    appended.data.as_mut().unwrap().get_mut("root-cert.pem").unwrap().0.extend_from_slice(&own);
    Api::<Secret>::namespaced(east.clone(), "istio-system").replace("cacerts", &Default::default(), &appended).await?;
    f.poke("prod").await?;
    let trusts_the_root_alone = async || {
        let data = cacerts(&east).await.unwrap().data.unwrap();
        meshfed_core::pki::fingerprints(&data["root-cert.pem"].0) == std::slice::from_ref(&root_fp)
    };
    meshfed_e2e::until("the unknown root removed", WAIT, Duration::from_millis(100), trusts_the_root_alone).await?;
    let said = |e: &k8s_openapi::api::events::v1::Event| {
        e.reason.as_deref() == Some("UnknownRootRemoved") && e.note.as_deref().is_some_and(|n| n.contains(&own_fp))
    };
    f.wait_for_event("prod", said).await?;

    // The generated root's Secret is lost: reported, never replaced, and the members keep their intermediates.
    let before = cacerts(&east).await.unwrap();
    Api::<Secret>::namespaced(f.hub.clone(), NAMESPACE).delete("prod-root-ca", &Default::default()).await?;
    f.poke("prod").await?;
    f.poke("prod").await?;
    let fed = f
        .wait_for("prod", WAIT, |fed| fed_condition(fed, "TrustReady").is_some_and(|c| c.reason == "RootMissing"))
        .await?;
    let trust = fed_condition(&fed, "TrustReady").unwrap();
    assert!(trust.message.contains("restore the Secret"), "{}", trust.message);
    f.poke_and_wait("prod").await?;
    assert!(hub_secret(&f, "prod-root-ca").await.is_none(), "a new root was minted");
    assert_eq!(cacerts(&east).await.unwrap().data, before.data, "a member's intermediate changed without a root");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_root_the_user_brings_is_used_and_a_bad_one_is_refused_with_its_reason() -> anyhow::Result<()> {
    let f = Fixture::start(&["east", "west"], Options::default()).await?;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    for args in [
        "req -x509 -newkey rsa:2048 -nodes -keyout root.key -subj /O=Corp/CN=Corp-Root -days 30 -addext basicConstraints=critical,CA:true -addext keyUsage=critical,keyCertSign,cRLSign -out root.pem",
        "req -x509 -newkey rsa:2048 -nodes -keyout other.key -subj /CN=Other -days 30 -addext basicConstraints=critical,CA:true -out other.pem",
        "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout leaf.key -subj /CN=leaf -days 30 -addext basicConstraints=critical,CA:false -out leaf.pem",
    ] {
        let (ok, out) = openssl(d, args);
        assert!(ok, "openssl {args:?}: {out}");
    }
    let read = |n: &str| std::fs::read(d.join(n)).unwrap();
    let yaml = example("multi-primary-multi-network")
        .replace("      generate: {algorithm: ECDSAP256, validity: 87600h}", "      secretRef: {name: corp-root}");

    // Each bad root gets its own reason, and nothing else stops: members are still labelled.
    for (data, reason) in [
        (vec![], "RootSecretMissing"),
        (vec![("tls.crt", b"not a certificate".to_vec()), ("tls.key", read("root.key"))], "RootMalformed"),
        (vec![("tls.crt", read("leaf.pem")), ("tls.key", read("leaf.key"))], "RootNotCA"),
        (vec![("tls.crt", read("root.pem")), ("tls.key", read("other.key"))], "RootKeyMismatch"),
    ] {
        if !data.is_empty() {
            put_hub_secret(&f, "corp-root", &data).await;
        }
        f.apply(&yaml).await?;
        f.poke("prod").await?;
        let fed = f
            .wait_for("prod", WAIT, |fed| fed_condition(fed, "TrustReady").is_some_and(|c| c.reason == reason))
            .await?;
        assert_eq!(fed_condition(&fed, "TrustReady").unwrap().status, "False");
        let message = &fed_condition(&fed, "TrustReady").unwrap().message;
        assert!(!message.contains("PRIVATE KEY"), "{message}");
        assert!(cacerts(&f.member("east").await?).await.is_none(), "an intermediate without a valid root");
    }
    assert!(
        Api::<k8s_openapi::api::core::v1::Namespace>::all(f.member("west").await?)
            .get_opt("istio-system")
            .await?
            .is_some()
    );

    put_hub_secret(&f, "corp-root", &[("tls.crt", read("root.pem")), ("tls.key", read("root.key"))]).await;
    f.poke("prod").await?;
    f.wait_for("prod", WAIT, is_ready).await?;
    for cluster in ["east", "west"] {
        let secret = cacerts(&f.member(cluster).await?).await.expect("cacerts");
        assert_istio_intermediate(d, &secret, cluster, &read("root.pem"));
    }
    assert!(hub_secret(&f, "prod-root-ca").await.is_none(), "a root was generated although one was brought");
    Ok(())
}

/// Each named member's `cacerts`.
async fn states(f: &Fixture, names: &[&str]) -> Vec<(String, Secret)> {
    let mut out = Vec::new();
    for name in names {
        out.push((name.to_string(), cacerts(&f.member(name).await.unwrap()).await.expect("cacerts")));
    }
    out
}

/// A workload certificate (24 h, P-256, SPIFFE URI) that `member`'s istiod would sign with its `cacerts`, with the
/// intermediate that signed it.
fn workload_leaf(dir: &Path, member: &str, cacerts: &Secret) -> (String, Vec<u8>, Vec<u8>) {
    let d = dir.join(format!("leaf-{member}"));
    std::fs::create_dir_all(&d).unwrap();
    write_bundle(&d, cacerts);
    let args = format!(
        "req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout leaf.key -subj /O=cluster.local -addext subjectAltName=URI:spiffe://cluster.local/ns/sample/sa/{member} -out leaf.csr"
    );
    let (ok, out) = openssl(&d, &args);
    assert!(ok, "{out}");
    let (ok, out) = openssl(
        &d,
        "x509 -req -in leaf.csr -CA ca-cert.pem -CAkey ca-key.pem -days 1 -copy_extensions copy -out leaf.pem",
    );
    assert!(ok, "{out}");
    (
        member.to_string(),
        std::fs::read(d.join("leaf.pem")).unwrap(),
        cacerts.data.as_ref().unwrap()["ca-cert.pem"].0.clone(),
    )
}

/// Every member's `root-cert.pem` verifies every workload leaf (leaf, then its intermediate, then a root it trusts).
fn assert_everyone_trusts_every_leaf(states: &[(String, Secret)], leaves: &[(String, Vec<u8>, Vec<u8>)]) {
    for (signer, leaf, intermediate) in leaves {
        assert!(meshfed_core::pki::issued_by(leaf, intermediate), "{signer}'s leaf is not from its intermediate");
        for (verifier, v) in states {
            let roots = meshfed_core::pki::certificates(&v.data.as_ref().unwrap()["root-cert.pem"].0);
            assert!(
                roots.iter().any(|(_, pem)| meshfed_core::pki::issued_by(intermediate, pem.as_bytes())),
                "{verifier} no longer trusts the chain of a live workload certificate of {signer}"
            );
        }
    }
}

/// Every member trusts the issuer of every member's intermediate: the invariant of a rotation without an outage.
fn assert_everyone_trusts_every_signer(states: &[(String, Secret)]) {
    for (signer, s) in states {
        let ca = &s.data.as_ref().unwrap()["ca-cert.pem"].0;
        for (verifier, v) in states {
            let roots = meshfed_core::pki::certificates(&v.data.as_ref().unwrap()["root-cert.pem"].0);
            assert!(
                roots.iter().any(|(_, pem)| meshfed_core::pki::issued_by(ca, pem.as_bytes())),
                "{verifier} does not trust the CA that signs {signer}'s intermediate"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_root_rotation_never_leaves_a_member_distrusting_a_peer_and_holds_for_a_stopped_member() -> anyhow::Result<()>
{
    let mut f = Fixture::start(&["east", "west", "north"], Options::default()).await?;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    for name in ["a", "b"] {
        let args = format!(
            "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout {name}.key -subj /O=Corp/CN=Root-{name} -days 30 -addext basicConstraints=critical,CA:true -addext keyUsage=critical,keyCertSign,cRLSign -out {name}.pem"
        );
        let (ok, out) = openssl(d, &args);
        assert!(ok, "{out}");
        put_hub_secret(
            &f,
            &format!("root-{name}"),
            &[
                ("tls.crt", std::fs::read(d.join(format!("{name}.pem")))?),
                ("tls.key", std::fs::read(d.join(format!("{name}.key")))?),
            ],
        )
        .await;
    }
    let root_b = std::fs::read(d.join("b.pem"))?;
    let fingerprint_b = meshfed_core::pki::fingerprints(&root_b).remove(0);
    let yaml = |root: &str| {
        example("multi-primary-multi-network")
            .replace(
                "      generate: {algorithm: ECDSAP256, validity: 87600h}",
                &format!("      secretRef: {{name: {root}}}"),
            )
            .replace(
                "  clusters:\n",
                "  clusters:\n  - {name: north, network: network3, kubeconfigSecretRef: {name: north-kubeconfig}}\n",
            )
    };
    f.apply(&yaml("root-a")).await?;
    f.wait_for("prod", WAIT, is_ready).await?;
    let members = ["east", "west", "north"];
    // Workloads in every member hold certificates from the intermediates of root A, valid for a day.
    let leaves: Vec<_> = states(&f, &members).await.iter().map(|(m, s)| workload_leaf(d, m, s)).collect();
    let leaves_expire = f.clock.now() + jiff::SignedDuration::from_hours(24);

    // North is down when the root changes: east and west get both roots, and the rotation holds there.
    f.env.cluster_mut("north").stop();
    f.apply(&yaml("root-b")).await?;
    let reached = sample_until(Instant::now(), WAIT, SAMPLE, async |_, _| {
        let now = states(&f, &["east", "west"]).await;
        assert_everyone_trusts_every_signer(&now);
        Ok(now.iter().all(|(_, s)| {
            meshfed_core::pki::fingerprints(&s.data.as_ref().unwrap()["root-cert.pem"].0).contains(&fingerprint_b)
        }))
    })
    .await;
    assert!(reached.is_ok(), "the new root did not reach the reachable members: {reached:?}");
    f.poke_and_wait("prod").await?;
    let fed = f.federations().get("prod").await?;
    let phase = fed.status.as_ref().unwrap().trust.as_ref().unwrap().rotation_phase.clone().unwrap_or_default();
    assert!(phase.starts_with("DistributingRoot") && phase.contains("held"), "{phase}");
    for (name, s) in states(&f, &["east", "west"]).await {
        assert!(
            !meshfed_core::pki::issued_by(&s.data.as_ref().unwrap()["ca-cert.pem"].0, &root_b),
            "{name} was reissued while north was down"
        );
    }

    // North is back: the rotation runs to the end, every member trusting every signer and every live workload
    // certificate at every step seen. Once every member signs with root B, the rotation waits for the workload
    // certificates of root A to expire: the test moves the controller's clock past them.
    f.env.cluster_mut("north").start().await?;
    let mut waited = false;
    let finished = sample_until(Instant::now(), WAIT, SAMPLE, async |_, _| {
        let now = states(&f, &members).await;
        assert_everyone_trusts_every_signer(&now);
        if f.clock.now() < leaves_expire {
            assert_everyone_trusts_every_leaf(&now, &leaves);
        }
        let fed = f.federations().get("prod").await?;
        let phase = fed.status.as_ref().and_then(|s| s.trust.as_ref()?.rotation_phase.clone()).unwrap_or_default();
        if phase.starts_with("AwaitingWorkloadCertificates") && !waited {
            assert!(phase.contains("stays trusted until"), "{phase}");
            assert!(fed.status.as_ref().unwrap().trust.as_ref().unwrap().intermediates_reissued_at.is_some());
            // It holds there: a reconcile later, every member still trusts root A.
            f.poke_and_wait("prod").await?;
            assert_everyone_trusts_every_leaf(&states(&f, &members).await, &leaves);
            f.clock.advance(Duration::from_secs(24 * 3600 + 6 * 60));
            f.poke("prod").await?;
            waited = true;
        }
        if is_ready(&fed) {
            let trust = fed.status.as_ref().unwrap().trust.clone().unwrap();
            assert!(waited, "the old root was dropped without waiting for the workload certificates");
            assert_eq!((trust.root_fingerprint.as_deref(), trust.rotation_phase), (Some(fingerprint_b.as_str()), None));
            for (name, s) in &now {
                let data = s.data.as_ref().unwrap();
                assert_eq!(
                    meshfed_core::pki::fingerprints(&data["root-cert.pem"].0),
                    std::slice::from_ref(&fingerprint_b),
                    "{name} still trusts the old root"
                );
                assert_istio_intermediate(d, s, name, &root_b);
            }
            return Ok(true);
        }
        Ok(false)
    })
    .await;
    assert!(finished.is_ok(), "the rotation did not finish: {finished:?}");
    Ok(())
}

/// Follows a rotation to its end (`done`: the trust status says it is the one awaited, and the federation is Ready):
/// at every sample (100 ms) every one of `members` trusts every signer and every workload certificate of `leaves`
/// (alive until the clock moves), and the root is never reported missing; once the rotation waits for the workload
/// certificates of the old intermediates (24 h by default; as a status of the current spec says), the controller's
/// clock moves past them, and it must have waited.
async fn rotate_to_the_end(
    f: &Fixture,
    members: &[&str],
    leaves: &[(String, Vec<u8>, Vec<u8>)],
    done: impl Fn(&meshfed_api::TrustStatus) -> bool,
) -> anyhow::Result<meshfed_api::MeshFederation> {
    let (mut waited, mut last) = (false, None);
    let finished = sample_until(Instant::now(), WAIT, SAMPLE, async |_, _| {
        let now = states(f, members).await;
        assert_everyone_trusts_every_signer(&now);
        if !waited {
            assert_everyone_trusts_every_leaf(&now, leaves);
        }
        let fed = f.federations().get("prod").await?;
        let trust = fed.status.as_ref().and_then(|s| s.trust.clone()).unwrap_or_default();
        if let Some(c) = fed_condition(&fed, "TrustReady") {
            assert_ne!(c.reason, "RootMissing", "{}", c.message);
        }
        let current = fed.status.as_ref().and_then(|s| s.observed_generation) == fed.metadata.generation;
        let awaiting = trust.rotation_phase.as_deref().is_some_and(|p| p.starts_with("AwaitingWorkloadCertificates"));
        if !waited && current && awaiting {
            waited = true;
            f.clock.advance(Duration::from_secs(24 * 3600 + 6 * 60));
            f.poke("prod").await?;
        }
        let finished = is_ready(&fed) && done(&trust);
        last = Some(fed);
        Ok(finished)
    })
    .await;
    let fed = last.expect("one sample at least");
    assert!(finished.is_ok(), "the rotation did not finish ({finished:?}): {:?}", fed.status);
    assert!(waited, "the old root was dropped without waiting for the workload certificates");
    Ok(fed)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_generated_root_is_rotated_on_request_and_every_member_ends_on_the_new_root() -> anyhow::Result<()> {
    let f = Fixture::start(&["east", "west"], Options::default()).await?;
    f.apply(&example("multi-primary-multi-network")).await?;
    let fed = f.wait_for("prod", WAIT, is_ready).await?;
    let old = fed.status.as_ref().unwrap().trust.clone().unwrap().root_fingerprint.unwrap();

    let patch = serde_json::json!({"metadata": {"annotations": {"meshfed.io/rotate-root": "2026-11-22"}}});
    f.federations().patch("prod", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    let fed = rotate_to_the_end(&f, &["east", "west"], &[], |t| t.root_fingerprint.as_ref() != Some(&old)).await?;
    let new_root = hub_secret(&f, "prod-root-ca").await.unwrap().data.unwrap()["tls.crt"].0.clone();
    let new = meshfed_core::pki::fingerprints(&new_root).remove(0);
    assert_eq!(fed.status.as_ref().unwrap().trust.as_ref().unwrap().root_fingerprint.as_ref(), Some(&new));
    let dir = tempfile::tempdir()?;
    for (name, s) in states(&f, &["east", "west"]).await {
        assert_eq!(
            meshfed_core::pki::fingerprints(&s.data.as_ref().unwrap()["root-cert.pem"].0),
            std::slice::from_ref(&new)
        );
        assert_istio_intermediate(dir.path(), &s, &name, &new_root);
    }
    // The same request is not a new one: nothing rotates again.
    f.poke_and_wait("prod").await?;
    assert_eq!(
        meshfed_core::pki::fingerprints(&hub_secret(&f, "prod-root-ca").await.unwrap().data.unwrap()["tls.crt"].0),
        [new]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hub_that_lost_the_root_and_the_status_never_mints_a_new_root_behind_the_members() -> anyhow::Result<()> {
    let f = Fixture::start(&["east", "west"], Options::default()).await?;
    f.apply(&example("multi-primary-multi-network")).await?;
    f.wait_for("prod", WAIT, is_ready).await?;
    let before: Vec<String> =
        states(&f, &["east", "west"]).await.iter().map(|(_, s)| s.resource_version().unwrap()).collect();

    // The hub is restored from Git without the root Secret and without the status (a backup without them).
    Api::<Secret>::namespaced(f.hub.clone(), NAMESPACE).delete("prod-root-ca", &Default::default()).await?;
    f.poke("prod").await?;
    let root_missing =
        |fed: &meshfed_api::MeshFederation| fed_condition(fed, "TrustReady").is_some_and(|c| c.reason == "RootMissing");
    f.wait_for("prod", WAIT, root_missing).await?;
    let cleared = serde_json::json!({"status": null});
    f.federations().patch_status("prod", &PatchParams::default(), &Patch::Merge(&cleared)).await?;
    f.poke_and_wait("prod").await?;

    let fed = f.wait_for("prod", WAIT, root_missing).await?;
    let message = &fed_condition(&fed, "TrustReady").unwrap().message;
    assert!(message.contains("members (east, west) hold intermediates"), "{message}");
    assert!(hub_secret(&f, "prod-root-ca").await.is_none(), "a new root was minted");
    let after: Vec<String> =
        states(&f, &["east", "west"]).await.iter().map(|(_, s)| s.resource_version().unwrap()).collect();
    assert_eq!(before, after, "a member's cacerts changed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_brought_root_is_replaced_by_a_generated_one_through_a_rotation() -> anyhow::Result<()> {
    let f = Fixture::start(&["east", "west"], Options::default()).await?;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let args = "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout a.key -subj /O=Corp/CN=Root-a -days 3650 -addext basicConstraints=critical,CA:true -addext keyUsage=critical,keyCertSign,cRLSign -out a.pem";
    let (ok, out) = openssl(d, args);
    assert!(ok, "{out}");
    put_hub_secret(
        &f,
        "root-a",
        &[("tls.crt", std::fs::read(d.join("a.pem"))?), ("tls.key", std::fs::read(d.join("a.key"))?)],
    )
    .await;
    let generated = example("multi-primary-multi-network");
    let brought = generated
        .replace("      generate: {algorithm: ECDSAP256, validity: 87600h}", "      secretRef: {name: root-a}");
    f.apply(&brought).await?;
    let fed = f.wait_for("prod", WAIT, is_ready).await?;
    assert_eq!(fed.status.unwrap().trust.unwrap().root_source.as_deref(), Some("secretRef/root-a"));

    // Switched to a generated root: meshfed makes one (no RootMissing: the old root was never a generated one), and
    // the members move to it by a rotation, every one trusting every signer at every sample.
    f.apply(&generated).await?;
    let fed = rotate_to_the_end(&f, &["east", "west"], &[], |t| t.root_source.as_deref() == Some("generate")).await?;
    let new_root = hub_secret(&f, "prod-root-ca").await.expect("a generated root").data.unwrap()["tls.crt"].0.clone();
    let new = meshfed_core::pki::fingerprints(&new_root).remove(0);
    assert_eq!(fed.status.unwrap().trust.unwrap().root_fingerprint, Some(new.clone()));
    for (_, s) in states(&f, &["east", "west"]).await {
        assert_eq!(
            meshfed_core::pki::fingerprints(&s.data.as_ref().unwrap()["root-cert.pem"].0),
            std::slice::from_ref(&new)
        );
    }
    Ok(())
}

/// The signer (`ca-cert.pem`) and the trusted roots (`root-cert.pem`) of a member's `cacerts`.
fn ca_and_roots(s: &Secret) -> (&[u8], Vec<String>) {
    let data = s.data.as_ref().unwrap();
    (&data["ca-cert.pem"].0, meshfed_core::pki::fingerprints(&data["root-cert.pem"].0))
}

#[tokio::test(flavor = "multi_thread")]
async fn while_a_member_holds_a_rotation_its_peers_are_renewed_and_a_joiner_signed_by_the_root_every_peer_trusts()
-> anyhow::Result<()> {
    let mut f = Fixture::start(&["east", "west", "north", "south"], Options::default()).await?;
    let short = |yaml: String| {
        yaml.replace(
            "intermediate: {algorithm: ECDSAP256, validity: 8760h, renewBefore: 720h}",
            "intermediate: {algorithm: ECDSAP256, validity: 48h, renewBefore: 24h}",
        )
    };
    let member = |name: &str, network: &str| {
        format!("  - {{name: {name}, network: {network}, kubeconfigSecretRef: {{name: {name}-kubeconfig}}}}\n")
    };
    let three = short(example("multi-primary-multi-network")) + &member("north", "network3");
    f.apply(&three).await?;
    f.wait_for("prod", WAIT, is_ready).await?;
    let old_root = hub_secret(&f, "prod-root-ca").await.unwrap().data.unwrap()["tls.crt"].0.clone();
    let old = meshfed_core::pki::fingerprints(&old_root).remove(0);

    // North is down when a new root is asked for: east and west get it beside the old one, and the rotation holds.
    f.env.cluster_mut("north").stop();
    let patch = serde_json::json!({"metadata": {"annotations": {"meshfed.io/rotate-root": "2026-11-24"}}});
    f.federations().patch("prod", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    let in_first_phase = |fed: &meshfed_api::MeshFederation| {
        let phase = fed.status.as_ref().and_then(|s| s.trust.as_ref()?.rotation_phase.clone()).unwrap_or_default();
        phase.starts_with("DistributingRoot") && phase.contains("held")
    };
    f.wait_for("prod", WAIT, in_first_phase).await?;
    let secret = hub_secret(&f, "prod-root-ca").await.unwrap().data.unwrap();
    assert_eq!(secret["previous-tls.crt"].0, old_root, "the replaced root is kept beside the new one");
    let new = meshfed_core::pki::fingerprints(&secret["tls.crt"].0).remove(0);
    let reachable = ["east", "west"];
    let before = states(&f, &reachable).await;

    // A day later the intermediates of east and west are due for renewal, north still down. They are renewed, from
    // the old root: north may not trust the new one yet.
    f.clock.advance(Duration::from_secs(25 * 3600));
    f.poke("prod").await?;
    let renewed = async || {
        let now = states(&f, &reachable).await;
        now.iter().zip(&before).all(|((_, n), (_, b))| ca_and_roots(n).0 != ca_and_roots(b).0)
    };
    meshfed_e2e::until("east and west renewed", WAIT, Duration::from_millis(100), renewed).await?;
    for (name, s) in states(&f, &reachable).await {
        let (ca, roots) = ca_and_roots(&s);
        assert!(
            meshfed_core::pki::issued_by(ca, &old_root),
            "{name} was renewed from the new root while north is down"
        );
        assert_eq!(roots, [new.clone(), old.clone()], "{name} does not trust both roots");
        let not_after = meshfed_core::pki::summarize(ca)?.not_after;
        assert!(not_after > f.clock.now() + jiff::SignedDuration::from_hours(47), "{name}: {not_after}");
    }
    let fed = f.federations().get("prod").await?;
    assert!(in_first_phase(&fed), "{:?}", fed.status);

    // South joins mid-rotation, north still down: it trusts both roots and is signed by the old one.
    let four = three + &member("south", "network4");
    f.apply(&four).await?;
    let joined = async || cacerts(&f.member("south").await.unwrap()).await.is_some();
    meshfed_e2e::until("south has cacerts", WAIT, Duration::from_millis(100), joined).await?;
    let (_, south) = states(&f, &["south"]).await.remove(0);
    let (ca, roots) = ca_and_roots(&south);
    assert!(meshfed_core::pki::issued_by(ca, &old_root), "south signs with a root north may not trust");
    assert_eq!(roots.iter().collect::<std::collections::BTreeSet<_>>(), [&old, &new].into());
    assert_everyone_trusts_every_signer(&states(&f, &["east", "west", "south"]).await);

    // North is back: the rotation runs to the end, every member trusting every signer at every sample.
    f.env.cluster_mut("north").start().await?;
    let members = ["east", "west", "north", "south"];
    rotate_to_the_end(&f, &members, &[], |t| t.root_fingerprint.as_ref() == Some(&new)).await?;
    for (name, s) in states(&f, &members).await {
        let (ca, roots) = ca_and_roots(&s);
        assert!(meshfed_core::pki::issued_by(ca, &secret["tls.crt"].0), "{name} does not sign with the new root");
        assert_eq!(roots, std::slice::from_ref(&new), "{name} still trusts the old root");
    }
    Ok(())
}

/// A root (`<name>.pem`, `<name>.key`, P-256, 30 days) made with openssl in `dir`: its certificate and key.
fn corp_root(dir: &Path, name: &str) -> (Vec<u8>, Vec<u8>) {
    let args = format!(
        "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout {name}.key -subj /O=Corp/CN=Root-{name} -days 30 -addext basicConstraints=critical,CA:true -addext keyUsage=critical,keyCertSign,cRLSign -out {name}.pem"
    );
    let (ok, out) = openssl(dir, &args);
    assert!(ok, "{out}");
    (std::fs::read(dir.join(format!("{name}.pem"))).unwrap(), std::fs::read(dir.join(format!("{name}.key"))).unwrap())
}

/// The example federation with a root brought in Secret `root`, and the members `extra` besides east and west.
fn brought(root: &str, extra: &[&str]) -> String {
    let members: String = extra
        .iter()
        .enumerate()
        .map(|(i, m)| {
            format!("  - {{name: {m}, network: network{}, kubeconfigSecretRef: {{name: {m}-kubeconfig}}}}\n", i + 3)
        })
        .collect();
    example("multi-primary-multi-network").replace(
        "      generate: {algorithm: ECDSAP256, validity: 87600h}",
        &format!("      secretRef: {{name: {root}}}"),
    ) + &members
}

/// The generated root's certificate, as the hub holds it.
async fn generated_root(f: &Fixture) -> Vec<u8> {
    hub_secret(f, "prod-root-ca").await.unwrap().data.unwrap()["tls.crt"].0.clone()
}

fn phase_of(fed: &meshfed_api::MeshFederation) -> String {
    fed.status.as_ref().and_then(|s| s.trust.as_ref()?.rotation_phase.clone()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_root_given_back_mid_rotation_is_rotated_back_to_and_every_live_workload_certificate_stays_trusted()
-> anyhow::Result<()> {
    let f = Fixture::start(&["east", "west"], Options::default()).await?;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let mut fingerprints = Vec::new();
    for name in ["a", "b"] {
        let (cert, key) = corp_root(d, name);
        fingerprints.push(meshfed_core::pki::fingerprints(&cert).remove(0));
        put_hub_secret(&f, &format!("root-{name}"), &[("tls.crt", cert), ("tls.key", key)]).await;
    }
    let members = ["east", "west"];
    f.apply(&brought("root-a", &[])).await?;
    f.wait_for("prod", WAIT, is_ready).await?;
    let mut leaves: Vec<_> = states(&f, &members).await.iter().map(|(m, s)| workload_leaf(d, m, s)).collect();

    // Rotating to b: every member signs with b, and the rotation waits for the workload certificates from a.
    f.apply(&brought("root-b", &[])).await?;
    f.wait_for("prod", WAIT, |fed| phase_of(fed).starts_with("AwaitingWorkloadCertificates")).await?;
    for (m, s) in states(&f, &members).await {
        assert!(meshfed_core::pki::issued_by(
            &s.data.as_ref().unwrap()["ca-cert.pem"].0,
            &std::fs::read(d.join("b.pem"))?
        ));
        leaves.push(workload_leaf(d, &format!("{m}-b"), &s));
    }

    // The change is reverted (Git): a rotation back to a. The certificates workloads hold from b's intermediates
    // stay trusted by every member until they expire, and the members end on a alone.
    f.apply(&brought("root-a", &[])).await?;
    let fed =
        rotate_to_the_end(&f, &members, &leaves, |t| t.root_fingerprint.as_ref() == Some(&fingerprints[0])).await?;
    assert_eq!(fed.status.unwrap().trust.unwrap().rotation_phase, None);
    for (name, s) in states(&f, &members).await {
        assert_eq!(ca_and_roots(&s).1, &fingerprints[..1], "{name} trusts another root");
        assert_istio_intermediate(d, &s, &name, &std::fs::read(d.join("a.pem"))?);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_rotation_asked_for_mid_rotation_keeps_the_key_every_member_trusts() -> anyhow::Result<()> {
    let mut f = Fixture::start(&["east", "west", "north", "south"], Options::default()).await?;
    let member = |name: &str, network: &str| {
        format!("  - {{name: {name}, network: {network}, kubeconfigSecretRef: {{name: {name}-kubeconfig}}}}\n")
    };
    let three = example("multi-primary-multi-network") + &member("north", "network3");
    f.apply(&three).await?;
    f.wait_for("prod", WAIT, is_ready).await?;
    let a = generated_root(&f).await;
    let fp = |pem: &[u8]| meshfed_core::pki::fingerprints(pem).remove(0);

    // North is down: a rotation to a new root b holds in its first phase; before it is through, another one is
    // asked for. The generated root's Secret now holds the third root, c, and b as the one it replaced.
    f.env.cluster_mut("north").stop();
    let root = async || generated_root(&f).await;
    let rotate = async |request: &str| {
        let patch = serde_json::json!({"metadata": {"annotations": {"meshfed.io/rotate-root": request}}});
        f.federations().patch("prod", &PatchParams::default(), &Patch::Merge(&patch)).await.map(|_| ())
    };
    let added = async |not: &[u8]| {
        let r = root().await;
        r != not && states(&f, &["east", "west"]).await.iter().all(|(_, s)| ca_and_roots(s).1.contains(&fp(&r)))
    };
    rotate("first").await?;
    meshfed_e2e::until("the second root reaches east and west", WAIT, Duration::from_millis(100), async || {
        added(&a).await
    })
    .await?;
    let b = root().await;
    rotate("second").await?;
    meshfed_e2e::until("the third root reaches east and west", WAIT, Duration::from_millis(100), async || {
        added(&b).await
    })
    .await?;
    let c = root().await;

    // South joins, north still down (it trusts a alone): south is signed by a, and trusts every root.
    f.apply(&(three + &member("south", "network4"))).await?;
    let joined = async || cacerts(&f.member("south").await.unwrap()).await.is_some();
    meshfed_e2e::until("south has cacerts", WAIT, Duration::from_millis(100), joined).await?;
    let (_, south) = states(&f, &["south"]).await.remove(0);
    let (ca, roots) = ca_and_roots(&south);
    assert!(meshfed_core::pki::issued_by(ca, &a), "south signs with a root north does not trust");
    assert_eq!(roots.iter().collect::<std::collections::BTreeSet<_>>(), [&fp(&a), &fp(&b), &fp(&c)].into());
    // The status says which keys the hub keeps for it.
    let fed = f.wait_for("prod", WAIT, |fed| phase_of(fed).contains(&format!(" to {}", fp(&c)))).await?;
    let phase = phase_of(&fed);
    assert!(phase.contains(&format!("the hub keeps the key of {}, {}", fp(&a), fp(&b))), "{phase}");

    // North is back: the rotation runs to its end on c; then the hub keeps c alone.
    f.env.cluster_mut("north").start().await?;
    let members = ["east", "west", "north", "south"];
    rotate_to_the_end(&f, &members, &[], |t| t.root_fingerprint.as_ref() == Some(&fp(&c))).await?;
    for (name, s) in states(&f, &members).await {
        assert_eq!(ca_and_roots(&s).1, [fp(&c)], "{name} still trusts an old root");
        assert!(meshfed_core::pki::issued_by(ca_and_roots(&s).0, &c), "{name}");
    }
    f.poke_and_wait("prod").await?;
    let kept = hub_secret(&f, "prod-kept-roots").await.expect("the kept roots").data.unwrap();
    let kept: Vec<_> = kept.iter().filter(|(k, _)| k.ends_with(".crt")).map(|(_, v)| fp(&v.0)).collect();
    assert_eq!(kept, [fp(&c)]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_brought_root_renewed_in_place_with_a_new_key_is_rotated_to_with_the_old_key_kept() -> anyhow::Result<()> {
    let mut f = Fixture::start(&["east", "west", "north"], Options::default()).await?;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let (a, a_key) = corp_root(d, "a");
    put_hub_secret(&f, "corp-root", &[("tls.crt", a.clone()), ("tls.key", a_key)]).await;
    f.apply(&brought("corp-root", &["north"])).await?;
    f.wait_for("prod", WAIT, is_ready).await?;

    // North is down when cert-manager renews the root in its Secret with a new key: the rotation holds.
    f.env.cluster_mut("north").stop();
    let (renewed, renewed_key) = corp_root(d, "renewed");
    put_hub_secret(&f, "corp-root", &[("tls.crt", renewed.clone()), ("tls.key", renewed_key)]).await;
    f.poke("prod").await?;
    let fp = |pem: &[u8]| meshfed_core::pki::fingerprints(pem).remove(0);
    let added =
        async || states(&f, &["east", "west"]).await.iter().all(|(_, s)| ca_and_roots(s).1.contains(&fp(&renewed)));
    meshfed_e2e::until("the renewed root reaches east and west", WAIT, Duration::from_millis(100), added).await?;

    // West loses its cacerts: it is signed again by the old root, which north trusts.
    let west = f.member("west").await?;
    Api::<Secret>::namespaced(west.clone(), "istio-system").delete("cacerts", &Default::default()).await?;
    f.poke("prod").await?;
    let back = async || cacerts(&west).await.is_some();
    meshfed_e2e::until("west has cacerts again", WAIT, Duration::from_millis(100), back).await?;
    let (_, s) = states(&f, &["west"]).await.remove(0);
    let (ca, roots) = ca_and_roots(&s);
    assert!(meshfed_core::pki::issued_by(ca, &a), "west signs with a root north does not trust");
    assert_eq!(roots.iter().collect::<std::collections::BTreeSet<_>>(), [&fp(&a), &fp(&renewed)].into());

    // North is back: every member ends on the renewed root.
    f.env.cluster_mut("north").start().await?;
    let members = ["east", "west", "north"];
    rotate_to_the_end(&f, &members, &[], |t| t.root_fingerprint.as_ref() == Some(&fp(&renewed))).await?;
    for (name, s) in states(&f, &members).await {
        assert_eq!(ca_and_roots(&s).1, [fp(&renewed)], "{name} still trusts the old root");
    }
    Ok(())
}
