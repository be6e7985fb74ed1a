use base64::{
    Engine as _,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use jiff::{SignedDuration, Timestamp};

use super::*;
use crate::access::hub_kubeconfig;

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn jwt(claims: serde_json::Value) -> ReaderToken {
    let part = |v: &serde_json::Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
    ReaderToken::new(format!("{}.{}.c2lnbmF0dXJl", part(&serde_json::json!({"alg": "RS256"})), part(&claims)))
}

const HUB_SA: &str = "meshfed-hub.mesh-system.prod";

/// A TokenRequest token of the hub's ServiceAccount in `meshfed-system`, as `meshfed join` writes.
fn hub_token(issued: &str, expires: &str) -> ReaderToken {
    jwt(serde_json::json!({
        "iat": ts(issued).as_second(),
        "exp": ts(expires).as_second(),
        "sub": format!("system:serviceaccount:meshfed-system:{HUB_SA}"),
        "kubernetes.io": {"namespace": "meshfed-system", "serviceaccount": {"name": HUB_SA, "uid": "u-1"}},
    }))
}

fn joined(token: &ReaderToken) -> String {
    hub_kubeconfig("east", "https://east.example:6443", Some(b"CA PEM"), token.expose())
}

fn sa_credential(issued: &str, expires: &str) -> Credential {
    Credential::ServiceAccountToken {
        namespace: "meshfed-system".into(),
        name: HUB_SA.into(),
        issued_at: ts(issued),
        expires_at: ts(expires),
    }
}

/// A kubeconfig whose user holds a client certificate (rcgen's, valid `not_before`..`not_after`).
fn cert_kubeconfig(not_before: (i32, u8, u8), not_after: (i32, u8, u8)) -> String {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
    params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
    let key = rcgen::KeyPair::generate().unwrap();
    let pem = params.self_signed(&key).unwrap().pem();
    format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\ncontexts:\n- name: c\n  context: {{cluster: k, user: admin}}\nclusters:\n- name: k\n  cluster: {{server: 'https://127.0.0.1:6443'}}\nusers:\n- name: admin\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\n",
        STANDARD.encode(pem),
        STANDARD.encode(key.serialize_pem())
    )
}

#[test]
fn a_token_that_join_writes_is_the_hub_service_accounts_token_with_its_times() {
    let yaml = joined(&hub_token("2026-01-01T00:00:00Z", "2026-01-31T00:00:00Z"));
    assert_eq!(credential(&yaml), sa_credential("2026-01-01T00:00:00Z", "2026-01-31T00:00:00Z"));
    assert_eq!(credential(&yaml).expires_at(), Some(ts("2026-01-31T00:00:00Z")));
    assert_eq!(credential(&yaml).describe(), format!("a token of ServiceAccount meshfed-system/{HUB_SA}"));
}

#[test]
fn tokens_that_are_not_a_service_accounts_bound_token_and_certificates_are_told_apart() {
    // An OIDC token: a subject that is no ServiceAccount.
    let oidc = jwt(serde_json::json!({"iat": 1_767_225_600, "exp": 1_767_229_200, "sub": "alice"}));
    let validity = Some((ts("2026-01-01T00:00:00Z"), ts("2026-01-01T01:00:00Z")));
    assert_eq!(credential(&joined(&oidc)), Credential::OtherToken { validity });
    // A legacy ServiceAccount token (a token Secret's): no `kubernetes.io` claims, no expiry.
    let legacy = jwt(serde_json::json!({"iss": "kubernetes/serviceaccount",
        "sub": "system:serviceaccount:meshfed-system:admin", "kubernetes.io/serviceaccount/namespace": "meshfed-system"}));
    assert_eq!(credential(&joined(&legacy)), Credential::OtherToken { validity: None });
    // A static token.
    assert_eq!(credential(&joined(&ReaderToken::new("s3cr3t"))), Credential::OtherToken { validity: None });
    // An admin's client certificate, with its validity.
    let cert = credential(&cert_kubeconfig((2025, 1, 1), (2028, 1, 1)));
    let validity = Some((ts("2025-01-01T00:00:00Z"), ts("2028-01-01T00:00:00Z")));
    assert_eq!(cert, Credential::ClientCertificate { validity });
    assert_eq!(cert.expires_at(), Some(ts("2028-01-01T00:00:00Z")));
    let basic = "apiVersion: v1\nkind: Config\ncurrent-context: c\ncontexts:\n- {name: c, context: {cluster: k, user: u}}\nclusters:\n- {name: k, cluster: {server: 'https://127.0.0.1:6443'}}\nusers:\n- {name: u, user: {username: a, password: b}}\n";
    assert_eq!(credential(basic), Credential::Unknown);
}

#[test]
fn a_service_account_token_is_renewed_for_its_own_lifetime_once_a_third_of_it_remains() {
    // 30 days: due once less than 10 days remain, at day 20 (and a second).
    let token = sa_credential("2026-01-01T00:00:00Z", "2026-01-31T00:00:00Z");
    let zero = SignedDuration::ZERO;
    let renew_at = ts("2026-01-21T00:00:01Z");
    assert_eq!(decide(&token, ts("2026-01-02T00:00:00Z"), zero), Renewal::Keep { renew_at });
    assert_eq!(decide(&token, ts("2026-01-21T00:00:00Z"), zero), Renewal::Keep { renew_at }, "exactly a third left");
    let renew = Renewal::Renew {
        namespace: "meshfed-system".into(),
        name: HUB_SA.into(),
        ttl: Duration::from_secs(30 * 86400),
    };
    assert_eq!(decide(&token, renew_at, zero), renew, "the same ServiceAccount, the same lifetime");
    assert_eq!(decide(&token, ts("2026-02-01T00:00:00Z"), zero), renew, "an expired one too");
}

#[test]
fn a_members_clock_is_corrected_before_a_token_is_judged() {
    // The member's clock runs an hour ahead: its token's times are an hour later than by the hub's clock.
    let token = sa_credential("2026-01-01T01:00:00Z", "2026-01-31T01:00:00Z");
    let ahead = SignedDuration::from_hours(1);
    assert_eq!(
        decide(&token, ts("2026-01-21T00:00:00Z"), ahead),
        Renewal::Keep { renew_at: ts("2026-01-21T00:00:01Z") }
    );
    assert!(matches!(decide(&token, ts("2026-01-21T00:00:01Z"), ahead), Renewal::Renew { .. }));
}

#[test]
fn a_short_token_asks_for_no_less_than_the_token_request_apis_minimum() {
    let token = sa_credential("2026-01-01T00:00:00Z", "2026-01-01T00:06:00Z");
    let Renewal::Renew { ttl, .. } = decide(&token, ts("2026-01-01T00:05:00Z"), SignedDuration::ZERO) else { panic!() };
    assert_eq!(ttl, Duration::from_secs(600));
}

#[test]
fn a_credential_meshfed_does_not_renew_is_reported_once_a_third_of_its_lifetime_remains() {
    let cert =
        Credential::ClientCertificate { validity: Some((ts("2025-01-01T00:00:00Z"), ts("2028-01-01T00:00:00Z"))) };
    let renewal = decide(&cert, ts("2026-01-01T00:00:00Z"), SignedDuration::ZERO);
    let alarm_at = ts("2027-01-01T00:00:01Z");
    assert_eq!(renewal, Renewal::NotRenewed { alarm_at: Some(alarm_at) });
    // Long before expiry: said, no alarm, and a reconcile due when the alarm starts.
    let quiet = report("east", &cert, &renewal, ts("2026-01-01T00:00:00Z"));
    assert_eq!(quiet.note, "the hub's credential is a client certificate, which meshfed does not renew");
    assert_eq!(
        (quiet.warning, quiet.expires_at, quiet.due_at),
        (None, Some(ts("2028-01-01T00:00:00Z")), Some(alarm_at))
    );
    // A third of its lifetime left: reported, with what to do.
    let loud = report("east", &cert, &renewal, alarm_at);
    let warning = loud.warning.unwrap();
    assert_eq!(warning.reason, Reason::CredentialNotRenewed);
    assert!(warning.message.contains("expires at 2028-01-01T00:00:00Z"), "{}", warning.message);
    assert!(warning.message.contains("meshfed join east --context"), "{}", warning.message);
    assert_eq!(loud.due_at, None);
    // Without expiry: never reported.
    let forever = Credential::OtherToken { validity: None };
    let renewal = decide(&forever, ts("2099-01-01T00:00:00Z"), SignedDuration::ZERO);
    assert_eq!(renewal, Renewal::NotRenewed { alarm_at: None });
    let said = report("east", &forever, &renewal, ts("2099-01-01T00:00:00Z"));
    assert_eq!((said.warning, said.expires_at, said.due_at), (None, None, None));
}

#[test]
fn a_kept_token_is_due_at_its_renewal_point_and_a_refused_renewal_says_what_to_do() {
    let token = sa_credential("2026-01-01T00:00:00Z", "2026-01-31T00:00:00Z");
    let renewal = decide(&token, ts("2026-01-02T00:00:00Z"), SignedDuration::ZERO);
    let kept = report("east", &token, &renewal, ts("2026-01-02T00:00:00Z"));
    assert_eq!(kept.due_at, Some(ts("2026-01-21T00:00:01Z")));
    assert_eq!(kept.expires_at, Some(ts("2026-01-31T00:00:00Z")));
    assert_eq!(kept.warning, None);
    assert!(kept.note.ends_with("renewed before it expires"), "{}", kept.note);
    // Renewed and still due (a clock far ahead): nothing due, no loop.
    let still = report(
        "east",
        &token,
        &decide(&token, ts("2026-03-01T00:00:00Z"), SignedDuration::ZERO),
        ts("2026-03-01T00:00:00Z"),
    );
    assert_eq!((still.due_at, still.warning), (None, None));
    let forbidden = "serviceaccounts \"x\" is forbidden: cannot create resource \"serviceaccounts/token\"";
    let refused = refused("east", &token, forbidden);
    let warning = refused.warning.unwrap();
    assert_eq!(warning.reason, Reason::CredentialNotRenewed);
    for part in ["expires at 2026-01-31T00:00:00Z", forbidden, "`create` on serviceaccounts/token", "meshfed join east"]
    {
        assert!(warning.message.contains(part), "{part}: {}", warning.message);
    }
    assert_eq!(refused.due_at, None, "retried at the next resync, not in a loop");
}

#[test]
fn renewing_replaces_only_the_token_every_other_byte_as_it_was() {
    let old = hub_token("2026-01-01T00:00:00Z", "2026-01-31T00:00:00Z");
    let new = hub_token("2026-01-21T00:00:00Z", "2026-02-20T00:00:00Z");
    // A hand-written kubeconfig, with comments, quotes and other users: all kept.
    let yaml = format!(
        "# the hub's access to east\napiVersion: v1\nkind: Config\ncurrent-context: east\npreferences: {{}}\nclusters:\n- name: east\n  cluster:\n    server: \"https://east.example:6443\"\n    certificate-authority-data: Q0E=\ncontexts:\n- name: east\n  context: {{cluster: east, user: hub}}\nusers:\n- name: other\n  user: {{username: a, password: b}}\n- name: hub\n  user:\n    token: '{}'   # join's\n",
        old.expose()
    );
    let rewritten = with_token(&yaml, &new).unwrap();
    assert_eq!(rewritten, yaml.replace(old.expose(), new.expose()));
    assert_eq!(remote::token_in_kubeconfig(rewritten.as_bytes()), Some(new.clone()));
    // What join writes, too.
    let joined = joined(&old);
    assert_eq!(with_token(&joined, &new).unwrap(), joined.replace(old.expose(), new.expose()));
}

#[test]
fn a_kubeconfig_whose_token_cannot_be_replaced_alone_is_left_as_it_is() {
    let old = hub_token("2026-01-01T00:00:00Z", "2026-01-31T00:00:00Z");
    let new = hub_token("2026-01-21T00:00:00Z", "2026-02-20T00:00:00Z");
    let twice = format!("{}# also: {}\n", joined(&old), old.expose());
    assert_eq!(with_token(&twice, &new), Err(RewriteError::Ambiguous));
    assert_eq!(with_token(&cert_kubeconfig((2025, 1, 1), (2028, 1, 1)), &new), Err(RewriteError::NoToken));
    assert_eq!(with_token(&joined(&old), &ReaderToken::new("a b\n")), Err(RewriteError::NotJwt));
    // The messages never quote a token.
    for e in [RewriteError::NoToken, RewriteError::Ambiguous, RewriteError::NotJwt, RewriteError::NotReplaced] {
        assert!(!e.to_string().contains("eyJ"));
    }
}
