//! Packaging: the chart lints; the plain manifests in `deploy/` are exactly what it renders and install into a real
//! API server with strict field validation; the Argo CD health check the README documents says what each state of a
//! federation means.

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};
use meshfed_e2e::{apply_manifests, manifests};
use meshfed_testenv::{Env, Options};
use serde_json::{Value, json};

fn repo() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Runs one of the repository's scripts; returns its standard output.
fn script(path: &str, args: &[&str]) -> Result<String> {
    let out = Command::new("bash").arg(path).args(args).current_dir(repo()).output().context(path.to_string())?;
    if !out.status.success() {
        bail!(
            "{path} {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

#[test]
fn the_chart_lints_and_the_plain_manifests_are_what_it_renders() -> Result<()> {
    let lint = script("hack/helm.sh", &["--", "lint", "--strict", "charts/meshfed"])?;
    assert!(lint.contains("0 chart(s) failed"), "{lint}");
    let rendered = script("hack/render-manifests.sh", &["--stdout"])?;
    assert!(
        rendered == manifests(),
        "deploy/meshfed.yaml is not what the chart renders; run `hack/render-manifests.sh` and commit the result"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_plain_manifests_install_into_a_real_hub() -> Result<()> {
    let env = Env::start(&["hub"], Options::default()).await?;
    let hub = env.cluster("hub").client().await?;
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "meshfed-system"}});
    apply_manifests(&hub, &serde_saphyr::to_string(&ns)?, |_| true).await?;
    let applied = apply_manifests(&hub, &manifests(), |_| true).await?;
    for want in [
        "CustomResourceDefinition/meshfederations.meshfed.io",
        "ServiceAccount/meshfed",
        "ClusterRole/meshfed",
        "ClusterRoleBinding/meshfed",
        "Role/meshfed-leader",
        "RoleBinding/meshfed-leader",
        "Deployment/meshfed",
        "Service/meshfed-metrics",
    ] {
        assert!(applied.iter().any(|a| a == want), "{want} is not in deploy/meshfed.yaml: {applied:?}");
    }
    Ok(())
}

const HEALTH: &str = include_str!("../../deploy/argocd/health.lua");

/// Runs the health check on `obj` as Argo CD does (Lua 5.1, `obj` global): its status and message.
fn health(obj: Value) -> (String, String) {
    use mlua::LuaSerdeExt;
    let lua = mlua::Lua::new();
    lua.globals().set("obj", lua.to_value(&obj).unwrap()).unwrap();
    let hs: mlua::Table = lua.load(HEALTH).eval().unwrap();
    (hs.get("status").unwrap(), hs.get("message").unwrap())
}

fn federation(generation: i64, status: Option<Value>) -> Value {
    let mut obj = json!({"metadata": {"name": "prod", "generation": generation}, "spec": {}});
    if let Some(status) = status {
        obj["status"] = status;
    }
    obj
}

fn conditions(observed: i64, conditions: &[(&str, &str, &str, &str)]) -> Value {
    let conditions: Vec<Value> =
        conditions.iter().map(|(t, s, r, m)| json!({"type": t, "status": s, "reason": r, "message": m})).collect();
    json!({"observedGeneration": observed, "conditions": conditions})
}

#[test]
fn the_argo_cd_health_check_reads_the_conditions() {
    let (status, _) = health(federation(1, None));
    assert_eq!(status, "Progressing", "no status yet");

    let ready = [("Valid", "True", "Valid", "ok"), ("Ready", "True", "Converged", "2 of 2 clusters ready")];
    assert_eq!(health(federation(2, Some(conditions(1, &ready)))).0, "Progressing", "an older generation");
    assert_eq!(health(federation(2, Some(conditions(2, &ready)))), ("Healthy".into(), "2 of 2 clusters ready".into()));

    let invalid = [
        ("Valid", "False", "DuplicateClusterName", "cluster east is listed twice"),
        ("Ready", "False", "Invalid", "the spec is invalid"),
    ];
    assert_eq!(
        health(federation(3, Some(conditions(3, &invalid)))),
        ("Degraded".into(), "Invalid: cluster east is listed twice".into())
    );

    let unreachable =
        [("Valid", "True", "Valid", "ok"), ("Ready", "False", "ClustersUnreachable", "west did not answer")];
    assert_eq!(
        health(federation(3, Some(conditions(3, &unreachable)))),
        ("Degraded".into(), "ClustersUnreachable: west did not answer".into())
    );

    let mut deleting = federation(3, Some(conditions(3, &ready)));
    deleting["metadata"]["deletionTimestamp"] = json!("2026-11-23T00:00:00Z");
    assert_eq!(health(deleting).0, "Progressing", "being deleted");
}

#[test]
fn the_readme_shows_the_health_check_as_it_is_tested() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let indented: String =
        HEALTH.lines().map(|l| if l.is_empty() { "\n".into() } else { format!("    {l}\n") }).collect();
    assert!(readme.contains(&indented), "README.md must carry deploy/argocd/health.lua, indented by four spaces");
}

/// The plan and API crates stay pure by construction: Cargo does not compile a runtime, an HTTP stack or kube's
/// controller runtime into them (each crate names its own kube features; the workspace entry names none).
#[test]
fn the_plan_and_api_crates_compile_no_tokio_hyper_or_kube_runtime() -> Result<()> {
    for krate in ["meshfed-core", "meshfed-api"] {
        let out = Command::new(env!("CARGO"))
            .args(["tree", "--offline", "-e", "normal", "--prefix", "none", "-p", krate])
            .current_dir(repo())
            .output()?;
        anyhow::ensure!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
        let tree = String::from_utf8(out.stdout)?;
        anyhow::ensure!(tree.contains("k8s-openapi"), "{krate}: an actual dependency tree:\n{tree}");
        for banned in ["tokio ", "hyper ", "kube-runtime "] {
            anyhow::ensure!(!tree.lines().any(|l| l.starts_with(banned)), "{krate} compiles {banned}:\n{tree}");
        }
    }
    Ok(())
}
