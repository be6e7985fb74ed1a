//! `meshfed render`: the objects meshfed would hold in each member of a federation, from the same plan the operator
//! applies, without any cluster. What only the clusters can tell (keys, tokens, gateway addresses, the hub's
//! identity) is a placeholder, and Secret data is redacted, so the output can be reviewed and diffed.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use meshfed_api::MeshFederationSpec;
use serde_json::Value;

use crate::{
    federation::FederationRef,
    gateway::{self, GatewayAddress},
    pki,
    plan::{self, Observation},
    remote::{self, ReaderToken, RemoteTarget, Token},
    topology,
    validate::{Problem, validate},
};

/// What a redacted value reads.
pub const REDACTED: &str = "<redacted>";

/// Every object each member (by cluster name, in spec order) would hold for `spec`, in apply order; Secret data
/// redacted. `only` limits it to one cluster. An invalid spec renders nothing: its problems, as `Valid` would say.
pub fn render(
    fref: &FederationRef,
    spec: &MeshFederationSpec,
    only: Option<&str>,
) -> Result<Vec<(String, Vec<Value>)>, Vec<Problem>> {
    validate(spec)?;
    let gateways: BTreeMap<String, _> = spec
        .clusters
        .iter()
        .filter(|c| topology::needs_gateway(spec, c))
        .map(|c| {
            let address = c.east_west_gateway.address.clone().unwrap_or(format!("<gateway address of {}>", c.name));
            (c.name.clone(), Ok(GatewayAddress { addresses: vec![address], port: gateway::CROSS_NETWORK_PORT }))
        })
        .collect();
    let redacted = || ByteString(REDACTED.as_bytes().to_vec());
    let cacerts = [pki::CA_CERT, pki::CA_KEY, pki::ROOT_CERT, pki::CERT_CHAIN].map(|k| (k.to_string(), redacted()));
    let out = spec
        .clusters
        .iter()
        .filter(|c| only.is_none_or(|o| o == c.name))
        .map(|cluster| {
            let tokens = remote::remote_secret_targets(spec, cluster)
                .map(|target| {
                    let server = target.api_server.clone().unwrap_or(format!("<API server of {}>", target.name));
                    let to = RemoteTarget {
                        cluster: target.name.clone(),
                        server,
                        ca_data_base64: None,
                        tls_server_name: None,
                    };
                    let (token, never) = (ReaderToken::new(REDACTED), jiff::Timestamp::UNIX_EPOCH);
                    let token = Token { target: to, token, expires_at: never, refresh_at: never };
                    (target.name.clone(), Ok(token))
                })
                .collect();
            let (seen, cacerts) = (Observation::default(), Some(cacerts.clone().into()));
            let (restarts, held_over) = (BTreeMap::new(), std::collections::BTreeSet::new());
            let wave =
                plan::Wave { tokens: Some(&tokens), gateways: &gateways, restarts: &restarts, held_over: &held_over };
            let plan = plan::member_plan(fref, "<hub>", spec, cluster, &seen, cacerts, wave);
            let objects = plan.objects.into_iter().map(|d| redact(d.body)).collect();
            (cluster.name.clone(), objects)
        })
        .collect();
    Ok(out)
}

/// `object` with every value of its `data` replaced by [`REDACTED`] when it is a Secret.
fn redact(mut object: Value) -> Value {
    if object["kind"] == "Secret"
        && let Some(data) = object["data"].as_object_mut()
    {
        data.values_mut().for_each(|v| *v = REDACTED.into());
    }
    object
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_primary_remote_federation_renders_every_object_with_placeholders_and_no_secret_data() {
        let spec: MeshFederationSpec = serde_saphyr::from_str(
            "meshID: m\ntrust: {root: {generate: {}}}\nclusters:\n- {name: east, network: n1, kubeconfigSecretRef: {name: e}}\n- {name: west, network: n2, role: Remote, controlPlane: east, kubeconfigSecretRef: {name: w}}\n",
        )
        .unwrap();
        let fref = FederationRef { namespace: "mesh-system".into(), name: "prod".into() };
        let rendered = render(&fref, &spec, None).unwrap();
        assert_eq!(rendered.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>(), ["east", "west"]);
        let (_, west) = &rendered[1];
        let istio = west.iter().find(|o| o["kind"] == "Istio").unwrap();
        assert_eq!(istio["spec"]["values"]["global"]["remotePilotAddress"], "<gateway address of east>");
        for (_, objects) in &rendered {
            for secret in objects.iter().filter(|o| o["kind"] == "Secret") {
                assert!(secret["data"].as_object().unwrap().values().all(|v| v == REDACTED), "{secret}");
            }
        }
        let east_secrets: Vec<&str> = rendered[0]
            .1
            .iter()
            .filter(|o| o["kind"] == "Secret")
            .map(|o| o["metadata"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(east_secrets, ["cacerts", "istio-remote-secret-west"]);
        assert_eq!(render(&fref, &spec, Some("west")).unwrap().len(), 1);
        let invalid: MeshFederationSpec = serde_saphyr::from_str(
            "meshID: m\ntrust: {root: {generate: {}}}\nclusters:\n- {name: e, network: n1, kubeconfigSecretRef: {name: e}}\n- {name: e, network: n1, kubeconfigSecretRef: {name: f}}\n",
        )
        .unwrap();
        assert_eq!(
            render(&fref, &invalid, None).unwrap_err()[0].reason,
            crate::conditions::Reason::DuplicateClusterName
        );
    }
}
