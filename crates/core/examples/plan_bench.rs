//! The cost of planning, without API servers: validation and every member's plan (render's placeholders for keys,
//! tokens and gateway addresses) for N primaries on N networks, so each holds N-1 remote secrets and a gateway.
//! The plan writes N² remote secrets, so its time per member should grow linearly with N and no faster.
//! Run: `cargo run --release -p meshfed-core --example plan_bench -- 100 200`.

use std::time::Instant;

use meshfed_api::MeshFederationSpec;
use meshfed_core::{federation::FederationRef, render::render};

fn main() {
    let sizes: Vec<usize> = std::env::args().skip(1).filter_map(|n| n.parse().ok()).collect();
    let fref = FederationRef { namespace: "mesh-system".into(), name: "prod".into() };
    for members in if sizes.is_empty() { vec![100, 200] } else { sizes } {
        let clusters: String = (0..members)
            .map(|i| format!("- {{name: m{i}, network: n{i}, kubeconfigSecretRef: {{name: m{i}}}}}\n"))
            .collect();
        let spec: MeshFederationSpec =
            serde_saphyr::from_str(&format!("meshID: m\ntrust: {{root: {{generate: {{}}}}}}\nclusters:\n{clusters}"))
                .expect("a valid spec");
        let t = Instant::now();
        let rendered = render(&fref, &spec, None).expect("a valid federation");
        let took = t.elapsed();
        let objects: usize = rendered.iter().map(|(_, o)| o.len()).sum();
        println!(
            "{members} members: {objects} objects planned in {took:.2?} ({:.2?} per member, {:.1?} per object)",
            took / members as u32,
            took / objects as u32
        );
    }
}
