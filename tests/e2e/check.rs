//! `meshfed check` end to end: it passes on a converged federation, names the member or pair of every fault it is
//! shown (a revoked reader token, a foreign CA in `cacerts`, a stopped member, a spec the operator has not seen),
//! and passes again once the operator repaired what it can and the member is back. It judges a `cacerts` as istiod
//! and the operator do: mid-rotation members pass, a bundle istiod would refuse fails.

use std::time::{Duration, Instant};

use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use meshfed_api::KeyAlgorithm;
use meshfed_core::{pki, trust};
use meshfed_e2e::{Fixture, NAMESPACE, example, is_ready, sample_until};
use meshfed_operator::check::{self, Finding};
use meshfed_testenv::Options;

const WAIT: Duration = Duration::from_secs(60);

fn failing(findings: &[Finding]) -> Vec<String> {
    findings.iter().filter(|f| !f.ok).map(|f| format!("{} {}: {}", f.area, f.subject, f.detail)).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn check_passes_on_a_converged_mesh_names_every_fault_and_passes_again_once_repaired() -> anyhow::Result<()> {
    let mut f = Fixture::clusters(&["east", "west", "north"], Options::default()).await?;
    let operator = f.run_operator(f.metrics.clone()).await?;
    let three = example("multi-primary-multi-network").replace(
        "  clusters:\n",
        "  clusters:\n  - {name: north, network: network3, kubeconfigSecretRef: {name: north-kubeconfig}}\n",
    );
    f.apply(&three).await?;
    f.wait_for("prod", WAIT, is_ready).await?;
    let now = || jiff::Timestamp::now();

    let findings = check::check(&f.hub, NAMESPACE, "prod", now()).await?;
    print!("{}", check::report(&findings));
    assert!(check::passed(&findings), "{:?}", failing(&findings));
    // Every member, every holder -> target pair of the three primaries, and the trust set are looked at.
    let subjects: Vec<&str> = findings.iter().map(|f| f.subject.as_str()).collect();
    for s in ["east", "west", "north", "east -> west", "west -> north", "north -> east", "root set", "west gateway"] {
        assert!(subjects.contains(&s), "no finding about {s}: {subjects:?}");
    }
    // JSON holds the same results.
    let json = serde_json::to_value(&findings)?;
    assert_eq!(json.as_array().map(Vec::len), Some(findings.len()));
    assert!(!serde_json::to_string(&findings)?.contains("eyJ"), "no token is ever printed");

    // With the operator stopped, four faults: west's reader revoked (its ServiceAccount deleted), a foreign CA in
    // east's cacerts, north stopped, and a spec the operator has not seen.
    operator.abort();
    let west = f.member("west").await?;
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(west, "istio-system");
    sas.delete("meshfed-reader", &DeleteParams::default()).await?;
    let foreign = pki::generate_root(KeyAlgorithm::ECDSAP256, Duration::from_secs(24 * 3600), now())?;
    let foreign = pki::load_root_secret(&foreign.secret_data(), now())?;
    let profile = pki::IntermediateProfile {
        cluster: "east",
        istio_namespace: "istio-system",
        algorithm: KeyAlgorithm::ECDSAP256,
    };
    let data = trust::issued(pki::issue_intermediate(&foreign, &profile, Duration::from_secs(3600), now())?, "");
    let cacerts: Api<Secret> = Api::namespaced(f.member("east").await?, "istio-system");
    let patch = serde_json::json!({"data": data.iter().map(|(k, v): (&String, &ByteString)| (k.clone(), serde_json::to_value(v).unwrap())).collect::<serde_json::Map<_, _>>()});
    cacerts.patch("cacerts", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    f.env.cluster_mut("north").stop();
    f.apply(&three.replace("tokenTTL: 24h", "tokenTTL: 23h")).await?;

    // The API server keeps accepting a token it authenticated for up to 10 s after its ServiceAccount is gone (its
    // token cache): check again until the revocation shows.
    let revoked =
        |fails: &[String]| fails.iter().any(|f| f.starts_with("remote access east -> west: listing services"));
    let mut fails = Vec::new();
    let every = Duration::from_millis(500);
    let _ = sample_until(Instant::now(), Duration::from_secs(30), every, async |_, _| {
        fails = failing(&check::check(&f.hub, NAMESPACE, "prod", now()).await?);
        Ok(revoked(&fails))
    })
    .await;
    println!("{fails:#?}");
    let has = |prefix: &str| fails.iter().any(|f| f.starts_with(prefix));
    assert!(revoked(&fails), "{fails:?}");
    assert!(
        fails.iter().any(|f| f.starts_with("remote access east -> west") && f.contains("Unauthorized")),
        "{fails:?}"
    );
    assert!(has("trust east: ca-cert.pem in Secret cacerts is not signed by the federation's root CA"), "{fails:?}");
    assert!(has("trust root set: members trust different roots"), "{fails:?}");
    assert!(has("members north:"), "{fails:?}");
    assert!(has("operator prod: the status describes generation 1 but the spec is at 2"), "{fails:?}");

    // The operator and north are back: check turns green once the operator repaired the reader and cacerts.
    f.env.cluster_mut("north").start().await?;
    let operator = f.run_operator(f.metrics.clone()).await?;
    let (started, mut findings) = (Instant::now(), Vec::new());
    let passed = sample_until(started, WAIT, every, async |_, _| {
        findings = check::check(&f.hub, NAMESPACE, "prod", now()).await?;
        Ok(check::passed(&findings))
    })
    .await;
    assert!(passed.is_ok(), "still failing: {:?}", failing(&findings));
    println!("check passed again {:?} after the operator came back", started.elapsed());
    operator.abort();
    Ok(())
}

/// Sets `keys` of Secret `name` in `secrets` (a key set to `None` is removed).
async fn set_data(secrets: &Api<Secret>, name: &str, keys: &[(&str, Option<&[u8]>)]) -> anyhow::Result<()> {
    let data: serde_json::Map<_, _> = keys
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                v.map_or(serde_json::Value::Null, |v| serde_json::to_value(ByteString(v.to_vec())).unwrap()),
            )
        })
        .collect();
    secrets.patch(name, &PatchParams::default(), &Patch::Merge(&serde_json::json!({"data": data}))).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn check_judges_cacerts_as_istiod_and_the_operator_do_mid_rotation_included() -> anyhow::Result<()> {
    let f = Fixture::clusters(&["east", "west"], Options::default()).await?;
    let operator = f.run_operator(f.metrics.clone()).await?;
    f.apply(&example("multi-primary-multi-network")).await?;
    f.wait_for("prod", WAIT, is_ready).await?;
    let now = || jiff::Timestamp::now();
    let findings = check::check(&f.hub, NAMESPACE, "prod", now()).await?;
    assert!(check::passed(&findings), "{:?}", failing(&findings));
    operator.abort();

    // Mid-rotation, as the operator leaves it between two steps: the hub holds a new root b and keeps the old one a,
    // both members trust both (in either order) and still sign with a.
    let hub_secrets: Api<Secret> = Api::namespaced(f.hub.clone(), NAMESPACE);
    let name = trust::root_secret_name("prod");
    let old = hub_secrets.get(&name).await?.data.unwrap_or_default();
    let a = pki::load_root_secret(&old, now())?;
    let b = pki::generate_root(KeyAlgorithm::ECDSAP256, Duration::from_secs(10 * 24 * 3600), now())?;
    let replaced = trust::replaced_root_data(&old, &b);
    let keys: Vec<(&str, Option<&[u8]>)> = replaced.iter().map(|(k, v)| (k.as_str(), Some(&v.0[..]))).collect();
    set_data(&hub_secrets, &name, &keys).await?;
    let east: Api<Secret> = Api::namespaced(f.member("east").await?, "istio-system");
    let west: Api<Secret> = Api::namespaced(f.member("west").await?, "istio-system");
    let (ab, ba) = (format!("{}{}", a.cert_pem(), b.cert_pem), format!("{}{}", b.cert_pem, a.cert_pem()));
    set_data(&east, "cacerts", &[(pki::ROOT_CERT, Some(ab.as_bytes()))]).await?;
    set_data(&west, "cacerts", &[(pki::ROOT_CERT, Some(ba.as_bytes()))]).await?;
    // The played istiod publishes both roots to workloads, as a real one does once it reloaded its cacerts.
    for (member, roots) in [("east", &ab), ("west", &ba)] {
        let published: Api<ConfigMap> = Api::namespaced(f.member(member).await?, "istio-system");
        meshfed_e2e::until("the new root is published", WAIT, Duration::from_millis(100), async || {
            let cm = published.get_opt("istio-ca-root-cert").await.ok().flatten();
            cm.and_then(|c| c.data?.remove("root-cert.pem")).as_ref() == Some(roots)
        })
        .await?;
    }
    let findings = check::check(&f.hub, NAMESPACE, "prod", now()).await?;
    print!("{}", check::report(&findings));
    assert!(check::passed(&findings), "{:?}", failing(&findings));
    let detail =
        |subject: &str| findings.iter().find(|f| f.area == "trust" && f.subject == subject).unwrap().detail.clone();
    assert!(detail("east").contains("root rotation ReissuingIntermediates"), "{}", detail("east"));

    // What istiod would refuse fails: a bundle without its key, an expired intermediate.
    set_data(&east, "cacerts", &[(pki::CA_KEY, None)]).await?;
    let profile = pki::IntermediateProfile {
        cluster: "west",
        istio_namespace: "istio-system",
        algorithm: KeyAlgorithm::ECDSAP256,
    };
    let expired =
        pki::issue_intermediate(&a, &profile, Duration::from_secs(3600), now() - jiff::SignedDuration::from_hours(3))?;
    let expired = trust::issued(expired, b.cert_pem.as_str());
    let keys: Vec<(&str, Option<&[u8]>)> = expired.iter().map(|(k, v)| (k.as_str(), Some(&v.0[..]))).collect();
    set_data(&west, "cacerts", &keys).await?;
    let fails = failing(&check::check(&f.hub, NAMESPACE, "prod", now()).await?);
    println!("{fails:#?}");
    assert!(fails.iter().any(|f| f.starts_with("trust east: Secret cacerts has no ca-key.pem")), "{fails:?}");
    assert!(fails.iter().any(|f| f.starts_with("trust west: the intermediate CA expired at")), "{fails:?}");
    Ok(())
}
