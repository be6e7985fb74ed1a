//! Trust: istiod signs with the federation's intermediates, and an intermediate renewal and a root rotation reach
//! istiod, which serves a chain every member trusts at every sample.

use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn every_primary_istiod_signs_with_the_federation_root_not_a_self_signed_ca() -> anyhow::Result<()> {
    let mesh = Mesh::start("network1", "network2").await?;
    let hub_root = Api::<Secret>::namespaced(mesh.f.hub.clone(), NAMESPACE).get("prod-root-ca").await?;
    let root = pki::fingerprints(&hub_root.data.as_ref().unwrap()["tls.crt"].0);
    assert_eq!(root.len(), 1, "the hub holds one root");
    let status_root = mesh.fed.status.as_ref().and_then(|s| s.trust.as_ref()?.root_fingerprint.clone());
    assert_eq!(status_root.as_ref(), Some(&root[0]), "status.trust names the hub's root");

    for member in ["east", "west"] {
        let published = async || !published_roots(&mesh, member).await.is_empty();
        until(&format!("{member}'s istiod to publish its root"), WAIT, POLL, published).await?;
        // istiod falls back silently to a self-signed CA when it cannot use `cacerts`: compare, never assume.
        assert_eq!(
            published_roots(&mesh, member).await,
            root,
            "{member}'s istiod does not sign with the federation's root; its log:\n{}",
            mesh.istiod(member).log_tail()
        );
    }
    Ok(())
}

/// The chain istiod serves on its TLS xDS port (what a sidecar or a Remote verifies), as fingerprints from the
/// leaf up, and whether openssl verifies it against the roots in `ca_file` (a member's `root-cert.pem`).
async fn served_chain(istiod: &Istiod, ca_file: &std::path::Path) -> anyhow::Result<(bool, Vec<String>, String)> {
    let out = tokio::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &istiod.secure_xds_address(),
            "-alpn",
            "h2",
            "-showcerts",
            "-verify_return_error",
        ])
        .arg("-CAfile")
        .arg(ca_file)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(10), out).await??;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let verified = out.status.success() && text.contains("Verify return code: 0 (ok)");
    let why = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        text.lines().filter(|l| l.contains("erif")).collect::<Vec<_>>().join("\n")
    );
    Ok((verified, pki::fingerprints(text.as_bytes()), why))
}

/// A member's `cacerts` key, as stored.
async fn cacerts_key(mesh: &Mesh, member: &str, key: &str) -> anyhow::Result<Vec<u8>> {
    let secret = Api::<Secret>::namespaced(mesh.f.member(member).await?, ISTIO_NAMESPACE).get("cacerts").await?;
    Ok(secret.data.unwrap_or_default().remove(key).map(|v| v.0).unwrap_or_default())
}

/// How long a renewal may take to reach istiod: meshfed's next reconcile (poked) writes `cacerts`, the Secret
/// volume projects it, istiod's file watch reloads after 100 ms.
const RENEWAL_BOUND: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread")]
async fn an_intermediate_renewal_reaches_istiod_which_serves_a_chain_every_member_trusts_at_every_sample()
-> anyhow::Result<()> {
    // Intermediates valid 2h, renewed 116 minutes before expiry: due 4 minutes after issue. The controller's clock is
    // advanced 4.5 minutes, within the 5 minutes new certificates are backdated, so the renewed intermediate is
    // already valid for the API servers and istiod, which keep real time.
    let trust = "  trust: {root: {generate: {}}, intermediate: {validity: 2h, renewBefore: 116m}}\n";
    let mesh = Mesh::from_yaml(&prod(trust, NETWORKS, "")).await?;
    let members = ["east", "west"];
    let dir = tempfile::tempdir()?;
    let mut initial = BTreeMap::new();
    for m in members {
        let (ok, chain, why) = served_chain(mesh.istiod(m), &{
            let f = dir.path().join(format!("{m}-root.pem"));
            std::fs::write(&f, cacerts_key(&mesh, m, "root-cert.pem").await?)?;
            f
        })
        .await?;
        assert!(ok && chain.len() >= 2, "{m}'s istiod serves no verified chain before the renewal: {why}");
        assert_eq!(chain[1], pki::fingerprints(&cacerts_key(&mesh, m, "ca-cert.pem").await?)[0], "{m}'s intermediate");
        initial.insert(m, chain[1].clone());
    }

    mesh.f.clock.advance(Duration::from_secs(270));
    let started = Instant::now();
    mesh.f.poke("prod").await?;
    let (mut renewed_at, mut served_at) = (BTreeMap::new(), BTreeMap::new());
    let mut verifications = 0;
    let sampled = sample_until(started, RENEWAL_BOUND, POLL, async |samples, elapsed| {
        // The roots each member trusts now, from its own cacerts (the files a sidecar there would get).
        let mut ca_files = Vec::new();
        for m in members {
            let f = dir.path().join(format!("{m}-root.pem"));
            std::fs::write(&f, cacerts_key(&mesh, m, "root-cert.pem").await?)?;
            ca_files.push((m, f));
        }
        for m in members {
            let intermediate = pki::fingerprints(&cacerts_key(&mesh, m, "ca-cert.pem").await?)[0].clone();
            if intermediate != initial[m] {
                renewed_at.entry(m).or_insert_with(|| started.elapsed());
            }
            let istiod = mesh.istiod(m);
            let checks = futures::future::try_join_all(ca_files.iter().map(|(_, f)| served_chain(istiod, f))).await?;
            for ((truster, _), (ok, chain, why)) in ca_files.iter().zip(checks) {
                verifications += 1;
                assert!(
                    ok,
                    "sample {samples} at {elapsed:?}: {m}'s istiod serves a chain {truster} does not trust ({chain:?}): {why}\nlog:\n{}",
                    istiod.log_tail()
                );
                if chain.get(1).is_some_and(|c| *c != initial[m]) {
                    assert_eq!(chain[1], intermediate, "{m}'s istiod serves an intermediate that is not in cacerts");
                    served_at.entry(m).or_insert_with(|| started.elapsed());
                }
            }
            // And the root it publishes to workloads is one every member trusts.
            let published = published_roots(&mesh, m).await;
            assert!(!published.is_empty(), "sample {samples}: {m}'s istiod publishes no root");
            for (truster, f) in &ca_files {
                let trusted = pki::fingerprints(&std::fs::read(f)?);
                assert!(
                    published.iter().all(|p| trusted.contains(p)),
                    "sample {samples} at {elapsed:?}: {m}'s istiod publishes a root {truster} does not trust"
                );
            }
        }
        // Done once both istiods serve their new intermediate and a second more of samples held.
        Ok(served_at.len() == members.len() && served_at.values().all(|t| elapsed > *t + Duration::from_secs(1)))
    })
    .await;
    let samples = sampled.unwrap_or_else(|e| {
        panic!(
            "{e}: cacerts renewed at {renewed_at:?}, istiods serving the new intermediate at {served_at:?}; east's log:\n{}",
            mesh.istiod("east").log_tail()
        )
    });
    for m in members {
        let projections = mesh.istiod(m).cacerts_projected_at();
        assert_eq!(projections.len(), 2, "{m}'s cacerts projected at start and once renewed");
        println!(
            "intermediate renewal in {m}: cacerts seen rewritten {:?} after the poke, projected into ROOT_CA_DIR at {:?}, new chain seen served by istiod at {:?}",
            renewed_at[m],
            projections[1].saturating_duration_since(started),
            served_at[m]
        );
    }
    println!(
        "{samples} samples over {:?} (one every {:?} on average), {verifications} chain verifications: every one to a root every member trusts",
        started.elapsed(),
        started.elapsed() / samples
    );
    Ok(())
}

/// The certificates istiod serves on its TLS xDS port, leaf first, as PEM (unverified).
async fn served_certs(istiod: &Istiod) -> anyhow::Result<Vec<String>> {
    let out = tokio::process::Command::new("openssl")
        .args(["s_client", "-connect", &istiod.secure_xds_address(), "-alpn", "h2", "-showcerts"])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(10), out).await??;
    Ok(pki::certificates(&out.stdout).into_iter().map(|(_, pem)| pem).collect())
}

/// Whether `chain` (leaf, intermediate, ...) chains to a root of `bundle`: the leaf is signed by the intermediate,
/// and the intermediate by a certificate of the bundle.
fn chains_to(chain: &[String], bundle: &[u8]) -> bool {
    let [leaf, intermediate, ..] = chain else { return false };
    pki::issued_by(leaf.as_bytes(), intermediate.as_bytes())
        && pki::certificates(bundle).iter().any(|(_, root)| pki::issued_by(intermediate.as_bytes(), root.as_bytes()))
}

/// A root rotation (requested with `meshfed.io/rotate-root`), sampled every 100 ms until it finished and both
/// istiods serve a chain to the new root: at every sample, the chain each istiod serves on its TLS xDS port chains
/// to what every member trusts, both the roots in its `cacerts` and the roots its istiod publishes to its workloads
/// (signatures checked; one openssl handshake per istiod per sample keeps the samples 100 ms apart). Panics at the
/// first sample that breaks.
async fn root_rotation_holds_at_every_sample(mesh: &Mesh) -> anyhow::Result<()> {
    let members = ["east", "west"];
    for m in members {
        let published = async || !published_roots(mesh, m).await.is_empty();
        until(&format!("{m}'s istiod to publish its root"), WAIT, POLL, published).await?;
    }
    let old = mesh.fed.status.as_ref().unwrap().trust.clone().unwrap().root_fingerprint.unwrap();
    let patch = json!({"metadata": {"annotations": {"meshfed.io/rotate-root": "2026-11-24"}}});
    mesh.f.federations().patch("prod", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    // One client per member for the whole run: a new one per read costs a TLS handshake and slows the samples.
    let mut secrets = BTreeMap::new();
    let mut config_maps = BTreeMap::new();
    for m in members {
        let client = mesh.f.member(m).await?;
        secrets.insert(m, Api::<Secret>::namespaced(client.clone(), ISTIO_NAMESPACE));
        config_maps.insert(m, Api::<ConfigMap>::namespaced(client, ISTIO_NAMESPACE));
    }
    let cacerts_key = async |m: &str, key: &str| -> anyhow::Result<Vec<u8>> {
        let secret = secrets[m].get("cacerts").await?;
        Ok(secret.data.unwrap_or_default().remove(key).map(|v| v.0).unwrap_or_default())
    };
    let published_bundle = async |m: &str| -> anyhow::Result<String> {
        let cm = config_maps[m].get_opt("istio-ca-root-cert").await?;
        Ok(cm.and_then(|cm| cm.data?.get("root-cert.pem").cloned()).unwrap_or_default())
    };
    let started = Instant::now();
    let mut phases = Vec::new();
    let sampled = sample_until(started, RENEWAL_BOUND, POLL, async |samples, _| {
        let fed = mesh.f.federations().get("prod").await?;
        let trust = fed.status.as_ref().and_then(|s| s.trust.clone()).unwrap_or_default();
        let phase = format!("{:?}", trust.rotation_phase);
        if phases.last() != Some(&phase) {
            phases.push(phase.clone());
            println!("root rotation: phase {phase} at {:?}", started.elapsed());
            // Workload certificates from the old intermediates live a day: the controller's clock moves past them.
            if phase.contains("AwaitingWorkloadCertificates") {
                mesh.f.clock.advance(Duration::from_secs(24 * 3600 + 6 * 60));
                mesh.f.poke("prod").await?;
            }
        }
        let (served, bundles) = futures::join!(
            futures::future::try_join_all(members.map(|m| served_certs(mesh.istiod(m)))),
            futures::future::try_join_all(members.map(async |m| -> anyhow::Result<_> {
                Ok([
                    (format!("{m}'s cacerts"), cacerts_key(m, "root-cert.pem").await?),
                    (format!("{m}'s published roots"), published_bundle(m).await?.into_bytes()),
                ])
            })),
        );
        let (served, bundles) = (served?, bundles?);
        let mut done = is_ready(&fed) && trust.root_fingerprint.as_ref() != Some(&old);
        for (m, chain) in members.iter().zip(&served) {
            for (truster, bundle) in bundles.iter().flatten() {
                assert!(
                    chains_to(chain, bundle),
                    "sample {samples} at {:?} (phase {phase}): {m}'s istiod serves a chain ({:?}) that {truster} ({:?}) does not trust; log:\n{}",
                    started.elapsed(),
                    chain.iter().flat_map(|c| pki::fingerprints(c.as_bytes())).collect::<Vec<_>>(),
                    pki::fingerprints(bundle),
                    mesh.istiod(m).log_tail()
                );
            }
            // Finished for this istiod once it serves its member's current intermediate and publishes only the
            // new root.
            let intermediate = pki::fingerprints(&cacerts_key(m, "ca-cert.pem").await?);
            let published = pki::fingerprints(published_bundle(m).await?.as_bytes());
            done &= chain.get(1).map(|c| pki::fingerprints(c.as_bytes())) == Some(intermediate)
                && trust.root_fingerprint.as_ref().is_some_and(|r| published == [r.clone()]);
        }
        Ok(done)
    })
    .await;
    let samples = sampled.unwrap_or_else(|e| {
        panic!(
            "the rotation did not reach both istiods: {e} (phases {phases:?}); east's log:\n{}",
            mesh.istiod("east").log_tail()
        )
    });
    println!(
        "root rotation: finished and served by both istiods after {:?}; {samples} samples (one every {:?}), every served chain trusted by every member's cacerts and published roots",
        started.elapsed(),
        started.elapsed() / samples
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_root_rotation_reaches_istiod_which_serves_a_chain_every_member_trusts_at_every_sample() -> anyhow::Result<()>
{
    // istiod takes a new root bundle from its files only with ISTIO_MULTIROOT_MESH=true (else it logs "Multi root is
    // disabled, updating new ROOT-CA not supported" and keeps the old one): meshfed sets it in every Primary's
    // Sail values (`pilot.env`), which the test's istiod gets as the Sail operator would give it.
    let mesh = Mesh::from_yaml(&prod(GENERATED_ROOT, NETWORKS, "")).await?;
    root_rotation_holds_at_every_sample(&mesh).await?;
    Ok(())
}
