//! meshfed's plan: validation, topology rules, the objects every member should hold, and the federation's status.
//!
//! Nothing here talks to Kubernetes, reads a clock or draws randomness: the operator observes, passes what it saw
//! (and the time) in, and applies what comes out. That keeps every rule testable with plain `#[test]`s.

pub mod conditions;
pub mod kubeconfig;
pub mod pki;
pub mod plan;
pub mod remote;
pub mod rotation;
pub mod topology;
pub mod validate;
