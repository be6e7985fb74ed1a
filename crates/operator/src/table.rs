//! The federation's state as people read it: the table `meshfed status` and the demo print.

use std::fmt::Write;

use meshfed_api::MeshFederation;

/// The federation's topology, conditions, and per cluster its role, network, reachability, gateway address, control
/// plane, Istio version, intermediate expiry, reader token expiry and the expiry of the hub's credential for it.
pub fn status_table(fed: &MeshFederation) -> String {
    let status = fed.status.clone().unwrap_or_default();
    let mut out = String::new();
    let name =
        format!("{}/{}", fed.metadata.namespace.as_deref().unwrap_or(""), fed.metadata.name.as_deref().unwrap_or(""));
    let _ = writeln!(out, "federation {name}: topology {}", status.topology.as_deref().unwrap_or("-"));
    for c in &status.conditions {
        let _ = writeln!(out, "  {:<18} {:<6} {:<24} {}", c.type_, c.status, c.reason, c.message);
    }
    let _ = writeln!(
        out,
        "\n{:<10} {:<10} {:<8} {:<10} {:<22} {:<20} {:<13} {:<21} {:<21} {:<21} READY",
        "CLUSTER",
        "NETWORK",
        "ROLE",
        "REACHABLE",
        "GATEWAY",
        "CONTROL PLANE",
        "ISTIO",
        "INTERMEDIATE UNTIL",
        "TOKEN UNTIL",
        "CREDENTIAL UNTIL"
    );
    for c in &status.clusters {
        let spec = fed.spec.clusters.iter().find(|s| s.name == c.name);
        let condition = |t: &str| c.conditions.iter().find(|x| x.type_ == t);
        let reason = |t: &str| condition(t).map_or("-".to_string(), |r| r.reason.clone());
        let gateway = match (&c.gateway_address, c.gateway_port) {
            (Some(a), Some(p)) => format!("{a}:{p}"),
            _ => reason("GatewaysReady"),
        };
        let ready = condition("Ready").map_or("-", |r| r.status.as_str());
        let _ = writeln!(
            out,
            "{:<10} {:<10} {:<8} {:<10} {gateway:<22} {:<20} {:<13} {:<21} {:<21} {:<21} {ready}",
            c.name,
            spec.map_or("-", |s| s.network.as_str()),
            spec.map(|s| format!("{:?}", s.role)).unwrap_or_else(|| "leaving".into()),
            c.reachable,
            reason("ControlPlaneReady"),
            c.istio_version.as_deref().unwrap_or("-"),
            c.intermediate_not_after.as_deref().unwrap_or("-"),
            c.reader_token_expires_at.as_deref().unwrap_or("-"),
            c.credential_expires_at.as_deref().unwrap_or("-"),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_each_clusters_expiries_under_their_headings() {
        let fed: MeshFederation = serde_saphyr::from_str(
            "metadata: {name: prod, namespace: mesh-system}\nspec:\n  meshID: prod\n  trust: {root: {generate: {}}}\n  clusters:\n  - {name: east, network: n1, kubeconfigSecretRef: {name: east}}\nstatus:\n  topology: MultiPrimary/SingleNetwork\n  clusters:\n  - {name: east, reachable: true, intermediateNotAfter: '2027-01-01T00:00:00Z', readerTokenExpiresAt: '2026-12-07T00:00:00Z', credentialExpiresAt: '2027-01-05T00:00:00Z'}\n",
        )
        .unwrap();
        let table = status_table(&fed);
        let lines: Vec<&str> = table.lines().collect();
        let header = lines.iter().find(|l| l.starts_with("CLUSTER")).unwrap();
        let row = lines.iter().find(|l| l.starts_with("east")).unwrap();
        for (heading, value) in [
            ("INTERMEDIATE UNTIL", "2027-01-01T00:00:00Z"),
            ("TOKEN UNTIL", "2026-12-07T00:00:00Z"),
            ("CREDENTIAL UNTIL", "2027-01-05T00:00:00Z"),
        ] {
            let column = header.find(heading).unwrap();
            assert_eq!(row.get(column..column + value.len()), Some(value), "{heading}:\n{table}");
        }
    }
}
