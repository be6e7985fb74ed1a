//! Conditions in the Kubernetes convention (`metav1.Condition`, kstatus): `lastTransitionTime` moves only when a
//! condition's status flips.

//!
//! Every condition type and every reason meshfed reports (in conditions, Events and the member failure metric) is a
//! variant of [`ConditionType`] or [`Reason`] here, and nowhere else; a test checks that the README documents each.

use std::fmt;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// An enum of names that are reported as strings: each variant's name is its string.
macro_rules! names {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum $name { $($(#[$vmeta])* $variant,)* }

        impl $name {
            /// Every variant.
            pub const ALL: &[$name] = &[$($name::$variant,)*];

            pub const fn as_str(self) -> &'static str {
                match self { $($name::$variant => stringify!($variant),)* }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    };
}

names! {
    /// The type of a condition, of the federation or of one of its clusters.
    pub enum ConditionType {
        Ready,
        Valid,
        ClustersReachable,
        MembersConverged,
        TrustReady,
        RemoteAccessReady,
        GatewaysReady,
        ControlPlaneReady,
        Reachable,
        // kstatus: abnormal-true conditions, present only while true.
        Stalled,
        Reconciling,
    }
}

impl Reason {
    /// Whether only a person can clear a failure of this reason (an edit of the spec, a Secret, a member's other
    /// federation, the Sail operator's installation): the federation is `Stalled`, not `Reconciling`.
    pub fn needs_a_person(self) -> bool {
        use Reason::*;
        matches!(
            self,
            DuplicateClusterName
                | DuplicateKubeconfig
                | MissingControlPlane
                | UnknownControlPlane
                | ControlPlaneNotPrimary
                | InvalidDuration
                | InvalidCIDR
                | OverlappingCIDRs
                | ExposeModeUnsupported
                | SystemNamespace
                | RevisionTooLong
                | InvalidGatewayAddress
                | InvalidAPIServer
                | AmbientWithRemotes
                | AmbientSingleNetwork
                | AmbientIstioTooOld
                | KubeconfigSecretMissing
                | KubeconfigKeyMissing
                | KubeconfigInvalid
                | KubeconfigRefused
                | ClusterClaimed
                | DuplicateCluster
                | OwnedByAnotherFederation
                | ObjectNotOwned
                | IstioVersionNotAccepted
                | ClusterChanged
                | RootSourceMissing
                | RootSecretMissing
                | RootSecretIncomplete
                | RootMissing
                | RootMalformed
                | RootNotCA
                | RootPathLenTooShort
                | RootUnsupportedKey
                | RootKeyMismatch
                | RootExpired
                | TokenRequestFailed
                | SailOperatorMissing
                | SailAmbientKindsMissing
                | GatewayAPIMissing
        )
    }
}

names! {
    /// Why a condition is as it is, or why an Event was emitted.
    pub enum Reason {
        // True
        Converged,
        ObjectsInPlace,
        Valid,
        AllReachable,
        Reachable,
        IntermediatesValid,
        RootExpiring,
        IntermediateValid,
        RemoteSecretsInPlace,
        GatewaysAddressed,
        NoGatewayNeeded,
        ControlPlanesReady,
        IstioReady,
        // Valid=False
        DuplicateClusterName,
        DuplicateKubeconfig,
        MissingControlPlane,
        UnknownControlPlane,
        ControlPlaneNotPrimary,
        InvalidDuration,
        InvalidCIDR,
        OverlappingCIDRs,
        ExposeModeUnsupported,
        SystemNamespace,
        RevisionTooLong,
        InvalidGatewayAddress,
        InvalidAPIServer,
        AmbientWithRemotes,
        AmbientSingleNetwork,
        AmbientIstioTooOld,
        // Reaching a member
        Unreachable,
        Timeout,
        KubeconfigSecretUnreadable,
        KubeconfigSecretMissing,
        KubeconfigKeyMissing,
        KubeconfigInvalid,
        KubeconfigRefused,
        CredentialNotRenewed,
        // Writing a member
        WriteFailed,
        ReadFailed,
        NamespaceTerminating,
        ClusterClaimed,
        DuplicateCluster,
        OwnedByAnotherFederation,
        ObjectNotOwned,
        IstioVersionNotAccepted,
        ClusterChanged,
        CleanupPending,
        // Trust
        RootRotationInProgress,
        RootUnknown,
        RootUnavailable,
        RootSourceMissing,
        RootSecretMissing,
        RootSecretUnreadable,
        RootSecretUnwritable,
        RootSecretIncomplete,
        RootMissing,
        RootMalformed,
        RootNotCA,
        RootPathLenTooShort,
        RootUnsupportedKey,
        RootKeyMismatch,
        RootExpired,
        RootNotYetValid,
        CertificateMalformed,
        InvalidValidity,
        CryptoFailed,
        CacertsUnreadable,
        CacertsMissing,
        CacertsIncomplete,
        CacertsMalformed,
        CacertsChainMismatch,
        IntermediateKeyMismatch,
        NotChainedToRoot,
        IntermediateExpired,
        IntermediateExpiring,
        IntermediateParametersChanged,
        // Remote access
        TokenRequestFailed,
        TokenNotRefreshed,
        // Gateways
        AwaitingLoadBalancer,
        AwaitingGatewayService,
        NoNodeAddresses,
        NoSchedulableNodes,
        IstioCRDsMissing,
        GatewayAPIMissing,
        // Control planes
        SailOperatorMissing,
        SailAmbientKindsMissing,
        AwaitingPrimaryGateway,
        IstioNotReady,
        // Events only
        ClusterAdded,
        ClusterRemoved,
        ClusterReleased,
        IntermediateIssued,
        UnknownRootRemoved,
        RootRotation,
        RootRotated,
        IstiodRestarted,
        Adopted,
        ClusterOrphaned,
    }
}

/// A condition's desired state, before the transition time is decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cond {
    pub type_: ConditionType,
    pub ok: bool,
    pub reason: Reason,
    pub message: String,
}

impl Cond {
    pub fn ok(type_: ConditionType, reason: Reason, message: impl Into<String>) -> Self {
        Self { type_, ok: true, reason, message: message.into() }
    }

    pub fn failed(type_: ConditionType, reason: Reason, message: impl Into<String>) -> Self {
        Self { type_, ok: false, reason, message: message.into() }
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
                .find(|p| c.type_ == p.type_.as_str() && p.status == status)
                .map(|p| p.last_transition_time.clone())
                .unwrap_or(Time(now));
            Condition {
                type_: c.type_.as_str().into(),
                status: status.into(),
                reason: c.reason.as_str().into(),
                message: c.message,
                observed_generation: generation,
                last_transition_time: since,
            }
        })
        .collect()
}

/// The kstatus conditions that go with `ready`, a federation's `Ready` over its other conditions `conds`: `Stalled`
/// (with the reason) while a failure only a person can clear holds it, `Reconciling` while meshfed works towards the
/// spec, neither once it is ready. So Flux, kpt and `kubectl wait` tell a federation that will converge from one that
/// will not.
pub fn kstatus(ready: &Cond, conds: &[Cond]) -> Option<Cond> {
    if ready.ok {
        return None;
    }
    Some(match conds.iter().find(|c| !c.ok && c.reason.needs_a_person()) {
        Some(c) => Cond::ok(ConditionType::Stalled, c.reason, format!("{} is False: {}", c.type_, c.message)),
        None => Cond::ok(ConditionType::Reconciling, ready.reason, ready.message.clone()),
    })
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
        let first = stamp(&[], vec![Cond::failed(ConditionType::Ready, Reason::Unreachable, "a")], Some(1), t0);
        // Same status, new reason and message: the time stays.
        let same = stamp(&first, vec![Cond::failed(ConditionType::Ready, Reason::Timeout, "b")], Some(2), t1);
        assert_eq!(same[0].last_transition_time, Time(t0));
        assert_eq!((same[0].reason.as_str(), same[0].observed_generation), ("Timeout", Some(2)));
        // A flip stamps the new time.
        let flipped = stamp(&same, vec![Cond::ok(ConditionType::Ready, Reason::Converged, "")], Some(2), t1);
        assert_eq!((flipped[0].status.as_str(), &flipped[0].last_transition_time), ("True", &Time(t1)));
    }
}

#[cfg(test)]
mod kstatus_tests {
    use super::*;

    #[test]
    fn a_federation_is_stalled_only_by_what_a_person_must_fix_and_reconciling_otherwise() {
        let ready = Cond::ok(ConditionType::Ready, Reason::Converged, "");
        assert_eq!(kstatus(&ready, &[]), None, "neither once Ready");
        let waiting = Cond::failed(ConditionType::Ready, Reason::Unreachable, "west: refused");
        let unreachable = Cond::failed(ConditionType::ClustersReachable, Reason::Unreachable, "west: refused");
        let reconciling = kstatus(&waiting, std::slice::from_ref(&unreachable)).unwrap();
        assert_eq!(
            (reconciling.type_, reconciling.ok, reconciling.reason),
            (ConditionType::Reconciling, true, Reason::Unreachable)
        );
        let claimed = Cond::failed(ConditionType::MembersConverged, Reason::ClusterClaimed, "east: taken");
        let stalled = kstatus(&waiting, &[unreachable, claimed]).unwrap();
        assert_eq!((stalled.type_, stalled.reason), (ConditionType::Stalled, Reason::ClusterClaimed));
        assert_eq!(stalled.message, "MembersConverged is False: east: taken");
    }
}

#[cfg(test)]
mod readme {
    use std::collections::BTreeSet;

    use super::*;

    /// Every name written in backticks in the README's section on conditions (and Events).
    fn documented() -> BTreeSet<&'static str> {
        let readme = include_str!("../../../README.md");
        let section = readme.split("\n## Status conditions").nth(1).expect("the README has a section on conditions");
        let section = section.split("\n## ").next().unwrap();
        section.split('`').skip(1).step_by(2).collect()
    }

    #[test]
    fn the_readme_documents_every_condition_type_and_reason() {
        let documented = documented();
        let missing: Vec<_> = ConditionType::ALL
            .iter()
            .map(|t| t.as_str())
            .chain(Reason::ALL.iter().map(|r| r.as_str()))
            .filter(|n| !documented.contains(n))
            .collect();
        assert!(missing.is_empty(), "README.md does not document {missing:?}");
    }

    #[test]
    fn every_reason_the_readme_names_exists() {
        let known: BTreeSet<_> =
            ConditionType::ALL.iter().map(|t| t.as_str()).chain(Reason::ALL.iter().map(|r| r.as_str())).collect();
        // Names in backticks that look like a reason (one CamelCase word), apart from Event types.
        let unknown: Vec<_> = documented()
            .into_iter()
            .filter(|n| n.starts_with(|c: char| c.is_ascii_uppercase()) && n.chars().all(|c| c.is_ascii_alphanumeric()))
            .filter(|n| !["Normal", "Warning", "True", "False"].contains(n) && !known.contains(n))
            .collect();
        assert!(unknown.is_empty(), "README.md names reasons meshfed does not have: {unknown:?}");
    }
}
