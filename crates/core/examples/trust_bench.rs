//! The cost of the trust step: a root, and an intermediate for each of N members, then the steady-state check of N
//! `cacerts` that need nothing. Run: `cargo run --release -p meshfed-core --example trust_bench -- 20`.

use std::time::{Duration, Instant};

use jiff::Timestamp;
use meshfed_api::KeyAlgorithm;
use meshfed_core::pki::{self, CacertsVerdict, IntermediateProfile};

fn main() {
    let members: usize = std::env::args().nth(1).and_then(|n| n.parse().ok()).unwrap_or(20);
    let now = Timestamp::now();
    for algorithm in [KeyAlgorithm::ECDSAP256, KeyAlgorithm::RSA4096] {
        let t = Instant::now();
        let material = pki::generate_root(algorithm, Duration::from_secs(87600 * 3600), now).expect("root");
        let root = pki::load_root(&material.cert_pem, &material.key_pem, now).expect("load");
        let root_time = t.elapsed();
        let names: Vec<String> = (0..members).map(|i| format!("m{i}")).collect();
        let t = Instant::now();
        let bundles: Vec<_> = names
            .iter()
            .map(|n| {
                let profile = IntermediateProfile { cluster: n, istio_namespace: "istio-system", algorithm };
                pki::issue_intermediate(&root, &profile, Duration::from_secs(8760 * 3600), now).expect("issue")
            })
            .collect();
        let issue_time = t.elapsed();
        let t = Instant::now();
        for (n, b) in names.iter().zip(&bundles) {
            let profile = IntermediateProfile { cluster: n, istio_namespace: "istio-system", algorithm };
            let verdict =
                pki::inspect_cacerts(Some(&b.secret_data()), &root, &profile, Duration::from_secs(720 * 3600), now);
            assert!(matches!(verdict, CacertsVerdict::Keep(_)));
        }
        let check_time = t.elapsed();
        println!(
            "{algorithm:?}: root {root_time:.2?}; {members} intermediates {issue_time:.2?} ({:.2?} each); steady-state check of {members} cacerts {check_time:.2?}",
            issue_time / members as u32
        );
    }
}
