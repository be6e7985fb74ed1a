//! Conditions in the Kubernetes convention (`metav1.Condition`, kstatus): `lastTransitionTime` moves only when a
//! condition's status flips.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// A condition's desired state, before the transition time is decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cond {
    pub type_: &'static str,
    pub ok: bool,
    pub reason: String,
    pub message: String,
}

impl Cond {
    pub fn ok(type_: &'static str, reason: &str, message: impl Into<String>) -> Self {
        Self { type_, ok: true, reason: reason.into(), message: message.into() }
    }

    pub fn failed(type_: &'static str, reason: &str, message: impl Into<String>) -> Self {
        Self { type_, ok: false, reason: reason.into(), message: message.into() }
    }
}

/// Turns desired conditions into `metav1.Condition`s, keeping each one's `lastTransitionTime` from `previous` when
/// its status did not change, and stamping `now` when it did (or when it is new).
pub fn stamp(previous: &[Condition], desired: Vec<Cond>, generation: Option<i64>, now: Timestamp) -> Vec<Condition> {
    desired
        .into_iter()
        .map(|c| {
            let status = if c.ok { "True" } else { "False" };
            let since = previous
                .iter()
                .find(|p| p.type_ == c.type_ && p.status == status)
                .map(|p| p.last_transition_time.clone())
                .unwrap_or(Time(now));
            Condition {
                type_: c.type_.into(),
                status: status.into(),
                reason: c.reason,
                message: c.message,
                observed_generation: generation,
                last_transition_time: since,
            }
        })
        .collect()
}

/// The first failing condition of `conds`, if any.
pub fn first_failure(conds: &[Cond]) -> Option<&Cond> {
    conds.iter().find(|c| !c.ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_when_the_status_flips() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-01-01T00:05:00Z".parse().unwrap();
        let first = stamp(&[], vec![Cond::failed("Ready", "Waiting", "a")], Some(1), t0);
        // Same status, new reason and message: the time stays.
        let same = stamp(&first, vec![Cond::failed("Ready", "Other", "b")], Some(2), t1);
        assert_eq!(same[0].last_transition_time, Time(t0));
        assert_eq!((same[0].reason.as_str(), same[0].observed_generation), ("Other", Some(2)));
        // A flip stamps the new time.
        let flipped = stamp(&same, vec![Cond::ok("Ready", "Converged", "")], Some(2), t1);
        assert_eq!((flipped[0].status.as_str(), &flipped[0].last_transition_time), ("True", &Time(t1)));
    }
}
