//! meshfed's plan: validation, topology rules, the objects every member should hold, and the federation's status.
//!
//! Nothing here talks to Kubernetes or reads a clock: the operator observes, passes what it saw (and the time) in,
//! and applies what comes out. That keeps every rule testable with plain `#[test]`s. The one place that draws
//! randomness is `pki`, where keys and serial numbers are generated, and its functions say so in their names
//! (`generate_root`, `issue_intermediate`); every decision about when to call them is pure.

pub mod access;
pub mod conditions;
pub mod control_plane;
pub mod credential;
pub mod federation;
pub mod gateway;
pub mod istio;
pub mod kinds;
pub mod kubeconfig;
pub mod member;
pub mod pki;
pub mod plan;
pub mod redact;
pub mod remote;
pub mod render;
pub mod rotation;
pub mod status;
pub mod topology;
pub mod trust;
pub mod validate;
pub mod versions;
pub mod yaml;
