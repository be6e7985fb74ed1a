//! The harness itself: real clusters that start, serve TokenRequest under RBAC, stop, and come back on the same data.

use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::{ConfigMap, Namespace, ServiceAccount},
};
use kube::{
    Api,
    api::{ListParams, PostParams},
};
use meshfed_testenv::{Env, Options};

#[tokio::test(flavor = "multi_thread")]
async fn clusters_are_separate_serve_tokens_and_survive_a_restart() -> anyhow::Result<()> {
    let mut env = Env::start(&["one", "two"], Options::default()).await?;
    let one = env.cluster("one").client().await?;
    let two = env.cluster("two").client().await?;

    // Each cluster has its own data.
    let cm: ConfigMap =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "marker"}, "data": {"k": "v"}}))?;
    Api::<ConfigMap>::namespaced(one.clone(), "default").create(&PostParams::default(), &cm).await?;
    assert!(Api::<ConfigMap>::namespaced(two.clone(), "default").get_opt("marker").await?.is_none());

    // TokenRequest works (service-account keys are configured).
    let sas: Api<ServiceAccount> = Api::namespaced(one.clone(), "default");
    sas.create(&PostParams::default(), &serde_json::from_value(serde_json::json!({"metadata": {"name": "reader"}}))?)
        .await?;
    let req = TokenRequest {
        spec: TokenRequestSpec { expiration_seconds: Some(600), ..Default::default() },
        ..Default::default()
    };
    let token = sas.create_token_request("reader", &PostParams::default(), &req).await?;
    assert!(!token.status.unwrap().token.is_empty());

    // RBAC is on: the fresh service account may not list namespaces.
    let mut kc: serde_json::Value = serde_saphyr::from_str(env.cluster("one").kubeconfig())?;
    let user = &mut kc["users"][0]["user"];
    *user = serde_saphyr::from_str(&format!(
        "token: {}",
        sas.create_token_request("reader", &PostParams::default(), &req).await?.status.unwrap().token
    ))?;
    let reader = meshfed_testenv::client_from_kubeconfig(&serde_saphyr::to_string(&kc)?).await?;
    let err = Api::<Namespace>::all(reader).list(&ListParams::default()).await.unwrap_err();
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 403), "{err}");

    // The real Istio CRDs install and are served.
    env.cluster("two").install_istio_crds().await?;
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(two.clone());
    for name in
        ["gateways.networking.istio.io", "virtualservices.networking.istio.io", "peerauthentications.security.istio.io"]
    {
        crds.get(name).await?;
    }

    // Stop and start: unreachable meanwhile, same data after.
    env.cluster_mut("one").stop();
    assert!(Api::<ConfigMap>::namespaced(one.clone(), "default").get_opt("marker").await.is_err());
    env.cluster_mut("one").start().await?;
    let back = Api::<ConfigMap>::namespaced(env.cluster("one").client().await?, "default").get("marker").await?;
    assert_eq!(back.data.unwrap()["k"], "v");
    Ok(())
}
