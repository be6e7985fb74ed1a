//! Istio versions: which one a member runs, and what meshfed must do on it. One table of the known defects that
//! meshfed's configuration would trigger and of the features it relies on, each with the release notes it comes from
//! (ISTIO-FACTS.md section 13). Every version-dependent decision reads this module; nothing else compares versions.

use std::fmt;

use serde_json::Value;

use crate::{conditions::Reason, federation::Failure};

/// An Istio release, `v<major>.<minor>.<patch>`. Ordered as releases are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct IstioVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl IstioVersion {
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Self { major, minor, patch }
    }

    /// Parses a release, `v1.30.3` (the Sail operator's spelling) or `1.30.3`.
    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.strip_prefix('v').unwrap_or(s).split('.').map(|p| p.parse::<u32>().ok());
        let version = Self::new(parts.next()??, parts.next()??, parts.next()??);
        parts.next().is_none().then_some(version)
    }

    fn line(self) -> (u32, u32) {
        (self.major, self.minor)
    }
}

impl fmt::Display for IstioVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// What meshfed does that an Istio defect can turn into an outage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Rewriting a remote secret in place (every reader token refresh; a member joining or leaving changes the set).
    RemoteSecretUpdate,
    /// The same, in ambient mode.
    AmbientRemoteSecretUpdate,
}

/// A known Istio defect that meshfed's configuration would trigger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Defect {
    /// The Istio issue, as `istio/istio#<number>`.
    pub issue: &'static str,
    /// What users see.
    pub effect: &'static str,
    /// The first fixed release on each release line, ascending; lines after the last are fixed, lines before it
    /// without an entry are not.
    pub fixed_in: &'static [IstioVersion],
    pub trigger: Trigger,
}

impl Defect {
    /// Whether `version` has the defect.
    pub fn affects(&self, version: IstioVersion) -> bool {
        match self.fixed_in.iter().find(|f| f.line() == version.line()) {
            Some(fix) => version < *fix,
            None => self.fixed_in.last().is_some_and(|last| version < *last),
        }
    }
}

/// The defects meshfed works around, from Istio's release notes (istio.io, news/releases: 1.30.3, 1.30.4, 1.31.0).
pub const DEFECTS: &[Defect] = &[
    Defect {
        issue: "istio/istio#60612",
        effect: "istiod does not pick up an updated remote secret until it restarts: the remote cluster's registry goes stale and its old token expires under it",
        fixed_in: &[IstioVersion::new(1, 30, 3), IstioVersion::new(1, 31, 0)],
        trigger: Trigger::RemoteSecretUpdate,
    },
    Defect {
        issue: "istio/istio#61043",
        effect: "a rotated remote secret can permanently wipe the endpoints of that cluster's services until istiod restarts",
        fixed_in: &[IstioVersion::new(1, 30, 4), IstioVersion::new(1, 31, 0)],
        trigger: Trigger::RemoteSecretUpdate,
    },
    Defect {
        issue: "istio/istio#60920",
        effect: "after a credential rotation the remote cluster's network gateway can vanish from cross-network routing until istiod restarts",
        fixed_in: &[IstioVersion::new(1, 30, 4), IstioVersion::new(1, 31, 0)],
        trigger: Trigger::RemoteSecretUpdate,
    },
    Defect {
        issue: "istio/istio#60033",
        effect: "ambient: a stale remote snapshot is served after a remote secret rotation",
        fixed_in: &[IstioVersion::new(1, 31, 0)],
        trigger: Trigger::AmbientRemoteSecretUpdate,
    },
];

/// The first release with Beta ambient multicluster on several networks (Istio 1.29 release notes).
pub const AMBIENT_MULTI_NETWORK_SINCE: IstioVersion = IstioVersion::new(1, 29, 0);

/// Whether the Istio version `name` (`v1.30.3`, `1.30.3` or `v1.30-latest`) is known to be older than
/// [`AMBIENT_MULTI_NETWORK_SINCE`]: a release before it, or a `-latest` alias of an older line. `None` when `name`
/// names no release or line (then nothing is known, and nothing is refused).
pub fn before_ambient_multi_network(name: &str) -> Option<bool> {
    let since = AMBIENT_MULTI_NETWORK_SINCE;
    if let Some(release) = IstioVersion::parse(name) {
        return Some(release < since);
    }
    let line = name.strip_suffix("-latest")?;
    let release = IstioVersion::parse(&format!("{line}.{}", u32::MAX))?;
    Some(release < since)
}

/// Refuses ambient mode on a member whose Istio version is known (from `spec.istio.version` or, unset, its Sail
/// operator's default) and older than [`AMBIENT_MULTI_NETWORK_SINCE`], before anything is written there.
/// `spec.istio.version` itself is refused by validation already (`AmbientIstioTooOld`); this catches the default.
pub fn ambient_on(version: Option<&MemberVersion>) -> Result<(), Failure> {
    let Some(version) = version else { return Ok(()) };
    let old = match version.release {
        Some(release) => release < AMBIENT_MULTI_NETWORK_SINCE,
        None => before_ambient_multi_network(&version.name).unwrap_or(false),
    };
    if !old {
        return Ok(());
    }
    Err(Failure::new(
        Reason::AmbientIstioTooOld,
        format!(
            "this cluster runs Istio {} (its Sail operator's default), older than {AMBIENT_MULTI_NETWORK_SINCE}, the first with ambient multi-network; set spec.istio.version to {AMBIENT_MULTI_NETWORK_SINCE} or later, or use dataPlane Sidecar",
            version.name
        ),
    ))
}

/// The defects of `version` with `trigger`; a version that is not known has every one (the workarounds are safe on
/// any version, their absence is not).
pub fn defects(version: Option<IstioVersion>, trigger: Trigger) -> impl Iterator<Item = &'static Defect> {
    DEFECTS.iter().filter(move |d| d.trigger == trigger && version.is_none_or(|v| d.affects(v)))
}

/// The defects of `version` that an updated remote secret triggers: those of every data plane, and in ambient mode
/// (`ambient`) those of ambient too.
fn remote_secret_update_defects(version: Option<IstioVersion>, ambient: bool) -> impl Iterator<Item = &'static Defect> {
    let ambient_defects = defects(version, Trigger::AmbientRemoteSecretUpdate).filter(move |_| ambient);
    defects(version, Trigger::RemoteSecretUpdate).chain(ambient_defects)
}

/// Whether a Primary on `version` must restart istiod after the remote secrets it holds changed, so that a token
/// refresh never leaves it on a stale registry (the workaround every report of these defects names); `ambient`: the
/// federation runs in ambient mode, which has a defect of its own (fixed later).
pub fn restart_after_remote_secret_change(version: Option<IstioVersion>, ambient: bool) -> bool {
    remote_secret_update_defects(version, ambient).next().is_some()
}

/// The issues of the defects a Primary on `version` has with meshfed's token refresh, as `istio/istio#1, #2`.
pub fn remote_secret_defects(version: Option<IstioVersion>, ambient: bool) -> String {
    let issues = remote_secret_update_defects(version, ambient).enumerate();
    let issues: Vec<&str> =
        issues.map(|(i, d)| if i == 0 { d.issue } else { d.issue.trim_start_matches("istio/istio") }).collect();
    issues.join(", ")
}

/// What a member's Sail operator accepts: the `spec.version` enum of its `Istio` CRD, and the default it fills in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SailVersions {
    pub accepted: Vec<String>,
    pub default: Option<String>,
}

impl SailVersions {
    /// Reads them from the `istios.sailoperator.io` CRD as the member serves it (its storage version's schema).
    pub fn from_crd(crd: &Value) -> Option<Self> {
        let versions = crd["spec"]["versions"].as_array()?;
        let stored = versions.iter().find(|v| v["storage"] == true).or(versions.first())?;
        let field = &stored["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["version"];
        let accepted = field["enum"].as_array()?.iter().filter_map(|v| v.as_str().map(String::from)).collect();
        Some(Self { accepted, default: field["default"].as_str().map(String::from) })
    }

    /// The oldest and newest releases accepted, as `v1.21.6 to v1.30.3`.
    fn range(&self) -> String {
        let releases = || self.accepted.iter().filter_map(|v| IstioVersion::parse(v));
        match (releases().min(), releases().max()) {
            (Some(lo), Some(hi)) => format!("{lo} to {hi}"),
            _ => self.accepted.join(", "),
        }
    }
}

/// The Istio version a member runs for the federation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberVersion {
    /// As written into its `Istio` (`spec.istio.version`), or the Sail operator's default: `v1.30.3`, `v1.30-latest`.
    pub name: String,
    /// The release it names; `None` when not known (an alias the member's Sail operator does not list).
    pub release: Option<IstioVersion>,
}

/// The version member runs for the federation: `asked` (`spec.istio.version`) or, unset, its Sail operator's default;
/// `None` when neither is known. A version the member's Sail operator does not accept is refused, naming what it
/// accepts, before anything is written there.
pub fn member_version(asked: Option<&str>, sail: Option<&SailVersions>) -> Result<Option<MemberVersion>, Failure> {
    if let (Some(asked), Some(sail)) = (asked, sail)
        && !sail.accepted.is_empty()
        && !sail.accepted.iter().any(|v| v == asked)
    {
        return Err(Failure::new(
            Reason::IstioVersionNotAccepted,
            format!(
                "spec.istio.version {asked} is not a version the Sail operator in this cluster installs (it accepts {}, and v<major>.<minor>-latest for those lines); set one of those, or upgrade that Sail operator",
                sail.range()
            ),
        ));
    }
    let Some(name) = asked.map(String::from).or_else(|| sail?.default.clone()) else { return Ok(None) };
    let accepted = sail.map_or(&[][..], |s| &s.accepted[..]);
    Ok(Some(MemberVersion { release: resolve(&name, accepted), name }))
}

/// The release `name` installs: itself, or for `v<major>.<minor>-latest`, the newest release of that line among
/// `accepted` (what the Sail operator that accepts it installs).
fn resolve(name: &str, accepted: &[String]) -> Option<IstioVersion> {
    if let Some(release) = IstioVersion::parse(name) {
        return Some(release);
    }
    let line = name.strip_suffix("-latest")?;
    accepted
        .iter()
        .filter(|v| v.strip_prefix(line).is_some_and(|rest| rest.starts_with('.')))
        .filter_map(|v| IstioVersion::parse(v))
        .max()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn v(s: &str) -> Option<IstioVersion> {
        IstioVersion::parse(s)
    }

    #[test]
    fn releases_parse_and_order_as_releases() {
        assert_eq!(v("v1.30.3"), Some(IstioVersion::new(1, 30, 3)));
        assert_eq!(v("1.9.10"), Some(IstioVersion::new(1, 9, 10)));
        assert!(v("v1.9.10") > v("v1.9.9") && v("v1.10.0") > v("v1.9.10"));
        for bad in ["v1.30", "v1.30-latest", "v1.30.3.1", "latest", "", "v1.x.0"] {
            assert_eq!(v(bad), None, "{bad}");
        }
        assert_eq!(IstioVersion::new(1, 30, 3).to_string(), "v1.30.3");
    }

    #[test]
    fn an_updated_remote_secret_needs_an_istiod_restart_before_1_30_4_and_1_31_0() {
        let restart = |s: &str| restart_after_remote_secret_change(v(s), false);
        // Every release the Sail operator 1.30.3 installs has at least one of the three defects.
        for affected in ["v1.21.6", "v1.28.10", "v1.29.6", "v1.30.0", "v1.30.2", "v1.30.3"] {
            assert!(restart(affected), "{affected}");
        }
        for fixed in ["v1.30.4", "v1.30.10", "v1.31.0", "v1.31.2", "v1.32.0", "v2.0.0"] {
            assert!(!restart(fixed), "{fixed}");
        }
        assert!(restart_after_remote_secret_change(None, false), "a version not known gets the workaround");
        // Which defects, by release: 1.30.3 has the stale-registry fix but not the two others.
        assert_eq!(remote_secret_defects(v("v1.30.3"), false), "istio/istio#61043, #60920");
        assert_eq!(remote_secret_defects(v("v1.29.6"), false), "istio/istio#60612, #61043, #60920");
        assert_eq!(remote_secret_defects(v("v1.31.0"), false), "");
        // In ambient mode, 1.30.4 and later 1.30 releases still have #60033: istiod is restarted there too.
        assert!(restart_after_remote_secret_change(v("v1.30.4"), true));
        assert_eq!(remote_secret_defects(v("v1.30.4"), true), "istio/istio#60033");
        assert_eq!(remote_secret_defects(v("v1.30.3"), true), "istio/istio#61043, #60920, #60033");
        assert!(!restart_after_remote_secret_change(v("v1.31.0"), true));
        // The ambient defect was fixed on 1.31 only.
        assert!(defects(v("v1.30.4"), Trigger::AmbientRemoteSecretUpdate).next().is_some());
        assert!(defects(v("v1.31.0"), Trigger::AmbientRemoteSecretUpdate).next().is_none());
    }

    fn sail() -> SailVersions {
        let crd = json!({"spec": {"versions": [{"name": "v1", "storage": true, "schema": {"openAPIV3Schema": {"properties": {"spec": {"properties": {"version": {
            "default": "v1.30.3",
            "enum": ["v1.30-latest", "v1.30.3", "v1.30.2", "v1.29-latest", "v1.29.6", "v1.21.6"],
        }}}}}}}]}});
        SailVersions::from_crd(&crd).unwrap()
    }

    #[test]
    fn a_member_runs_the_version_asked_or_its_sail_operators_default() {
        let sail = sail();
        let asked = member_version(Some("v1.29.6"), Some(&sail)).unwrap().unwrap();
        assert_eq!((asked.name.as_str(), asked.release), ("v1.29.6", v("v1.29.6")));
        let default = member_version(None, Some(&sail)).unwrap().unwrap();
        assert_eq!((default.name.as_str(), default.release), ("v1.30.3", v("v1.30.3")));
        let latest = member_version(Some("v1.29-latest"), Some(&sail)).unwrap().unwrap();
        assert_eq!(latest.release, v("v1.29.6"), "an alias is the newest release of its line the Sail operator lists");
        assert_eq!(member_version(None, None), Ok(None), "nothing known");
        let unlisted = member_version(Some("v1.31.0"), None).unwrap().unwrap();
        assert_eq!(unlisted.release, v("v1.31.0"), "without the Sail CRD, what was asked");
    }

    #[test]
    fn ambient_multi_network_needs_istio_1_29_by_release_or_line() {
        for old in ["v1.28.10", "1.28.0", "v1.28-latest", "v1.9-latest", "v0.99.0"] {
            assert_eq!(before_ambient_multi_network(old), Some(true), "{old}");
        }
        for new in ["v1.29.0", "v1.29-latest", "v1.30.3", "v1.31-latest", "v2.0.0"] {
            assert_eq!(before_ambient_multi_network(new), Some(false), "{new}");
        }
        assert_eq!(before_ambient_multi_network("latest"), None, "nothing known, nothing refused");
        // A member on its Sail operator's default: refused when that default is older.
        let old_sail = SailVersions {
            accepted: vec!["v1.28.10".into(), "v1.28-latest".into()],
            default: Some("v1.28-latest".into()),
        };
        let default = member_version(None, Some(&old_sail)).unwrap();
        let refused = ambient_on(default.as_ref()).unwrap_err();
        assert_eq!(refused.reason, Reason::AmbientIstioTooOld);
        assert!(refused.message.contains("v1.28-latest") && refused.message.contains("v1.29.0"), "{}", refused.message);
        assert_eq!(ambient_on(member_version(None, Some(&sail())).unwrap().as_ref()), Ok(()));
        assert_eq!(ambient_on(None), Ok(()), "a version not known is not refused");
    }

    #[test]
    fn a_version_the_members_sail_operator_does_not_accept_is_refused_naming_what_it_accepts() {
        let refused = member_version(Some("v1.19.0"), Some(&sail())).unwrap_err();
        assert_eq!(refused.reason, Reason::IstioVersionNotAccepted);
        assert!(
            refused.message.contains("v1.19.0") && refused.message.contains("v1.21.6 to v1.30.3"),
            "{}",
            refused.message
        );
        assert!(member_version(Some("v1.31.0"), Some(&sail())).is_err(), "newer than it installs");
        let empty = SailVersions { accepted: Vec::new(), default: None };
        assert!(member_version(Some("v1.31.0"), Some(&empty)).is_ok(), "a schema without an enum accepts anything");
    }
}
