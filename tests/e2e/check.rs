//! `meshfed check` end to end: it passes on a converged federation, names the member or pair of every fault it is
//! shown (a revoked reader token, a foreign CA in `cacerts`, a stopped member, a spec the operator has not seen),
//! and passes again once the operator repaired what it can and the member is back.

use std::time::{Duration, Instant};

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use meshfed_api::KeyAlgorithm;
use meshfed_core::{pki, trust};
use meshfed_e2e::{Fixture, NAMESPACE, example, is_ready};
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
    let deadline = Instant::now() + Duration::from_secs(30);
    let fails = loop {
        let fails = failing(&check::check(&f.hub, NAMESPACE, "prod", now()).await?);
        if revoked(&fails) || Instant::now() > deadline {
            break fails;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!("{fails:#?}");
    let has = |prefix: &str| fails.iter().any(|f| f.starts_with(prefix));
    assert!(revoked(&fails), "{fails:?}");
    assert!(
        fails.iter().any(|f| f.starts_with("remote access east -> west") && f.contains("Unauthorized")),
        "{fails:?}"
    );
    assert!(has("trust east: its intermediate does not chain"), "{fails:?}");
    assert!(has("trust root set: members trust different roots"), "{fails:?}");
    assert!(has("members north:"), "{fails:?}");
    assert!(has("operator prod: the status describes generation 1 but the spec is at 2"), "{fails:?}");

    // The operator and north are back: check turns green once the operator repaired the reader and cacerts.
    f.env.cluster_mut("north").start().await?;
    let operator = f.run_operator(f.metrics.clone()).await?;
    let deadline = Instant::now() + WAIT;
    let started = Instant::now();
    loop {
        let findings = check::check(&f.hub, NAMESPACE, "prod", now()).await?;
        if check::passed(&findings) {
            println!("check passed again {:?} after the operator came back", started.elapsed());
            break;
        }
        assert!(Instant::now() < deadline, "still failing: {:?}", failing(&findings));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    operator.abort();
    Ok(())
}
