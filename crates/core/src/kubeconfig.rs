//! Checks on kubeconfigs read from Secrets, before any client is built from them.
//!
//! kube-rs runs a kubeconfig's `exec` command and reads the files it names. A kubeconfig in a Secret is data written
//! by whoever may write Secrets in the federation's namespace, so meshfed accepts only credentials carried inline.

use kube::config::Kubeconfig;

use crate::conditions::Reason;
use crate::yaml::{self, YamlError};

/// Why a kubeconfig was refused; the message names the field so that a person can fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KubeconfigError {
    #[error("the kubeconfig cannot be read: {0}")]
    Malformed(#[from] YamlError),
    #[error("the kubeconfig's documents disagree on kind or apiVersion")]
    Mismatched,
    #[error(
        "user {user:?} sets `{field}`, which would make the hub {what}; meshfed refuses it: put the credentials inline (token, or client-certificate-data and client-key-data)"
    )]
    Refused { user: String, field: &'static str, what: &'static str },
    #[error(
        "cluster {cluster:?} sets `certificate-authority`, a file path on the hub; meshfed refuses it: use certificate-authority-data"
    )]
    CaFile { cluster: String },
    #[error(
        "cluster {cluster:?} sets `insecure-skip-tls-verify`, so the hub would not authenticate the member's API server while it sends it intermediate CA keys; meshfed refuses it: give the server's CA in certificate-authority-data"
    )]
    Insecure { cluster: String },
    #[error("the kubeconfig has no current-context, or it names no cluster with a server")]
    NoServer,
}

impl KubeconfigError {
    /// The stable reason for conditions and metrics.
    pub fn reason(&self) -> Reason {
        match self {
            Self::Malformed(_) | Self::Mismatched | Self::NoServer => Reason::KubeconfigInvalid,
            Self::Refused { .. } | Self::CaFile { .. } | Self::Insecure { .. } => Reason::KubeconfigRefused,
        }
    }
}

/// Parses a kubeconfig and refuses it if any user or cluster in it would run a command or read a file on the hub,
/// or would not verify the server's certificate.
/// Returns the parsed kubeconfig and the server of its current context.
///
/// The document is read as [`crate::yaml`] reads what others hold: at most [`yaml::MAX_DOCUMENT_BYTES`], within the
/// parser's budget, and an error names a kind and a position, never a snippet (the document holds credentials).
/// Several documents merge as `kubectl` merges them (kube's `Kubeconfig::from_yaml`).
pub fn check(yaml: &str) -> Result<(Kubeconfig, String), KubeconfigError> {
    let kc = yaml::from_multiple::<Kubeconfig>(yaml)?
        .into_iter()
        .try_fold(Kubeconfig::default(), Kubeconfig::merge)
        .map_err(|_| KubeconfigError::Mismatched)?;
    for named in &kc.auth_infos {
        let Some(a) = &named.auth_info else { continue };
        let refused = |field, what| KubeconfigError::Refused { user: named.name.clone(), field, what };
        if a.exec.is_some() {
            return Err(refused("exec", "run a command"));
        }
        if a.auth_provider.is_some() {
            return Err(refused("auth-provider", "run an auth provider plugin"));
        }
        for (set, field) in [
            (a.token_file.is_some(), "tokenFile"),
            (a.client_certificate.is_some(), "client-certificate"),
            (a.client_key.is_some(), "client-key"),
        ] {
            if set {
                return Err(refused(field, "read a file"));
            }
        }
    }
    if let Some(c) = kc.clusters.iter().find(|c| c.cluster.as_ref().is_some_and(|c| c.certificate_authority.is_some()))
    {
        return Err(KubeconfigError::CaFile { cluster: c.name.clone() });
    }
    if let Some(c) =
        kc.clusters.iter().find(|c| c.cluster.as_ref().is_some_and(|c| c.insecure_skip_tls_verify == Some(true)))
    {
        return Err(KubeconfigError::Insecure { cluster: c.name.clone() });
    }
    let server = current_server(&kc).ok_or(KubeconfigError::NoServer)?;
    Ok((kc, server))
}

fn current_server(kc: &Kubeconfig) -> Option<String> {
    let current = kc.current_context.as_deref()?;
    let ctx = kc.contexts.iter().find(|c| c.name == current)?.context.as_ref()?;
    let cluster = kc.clusters.iter().find(|c| c.name == ctx.cluster)?.cluster.as_ref()?;
    cluster.server.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kubeconfig(user: &str, cluster: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: c\ncontexts:\n- name: c\n  context: {{cluster: k, user: u}}\nclusters:\n- name: k\n  cluster:\n    server: https://127.0.0.1:6443\n{cluster}users:\n- name: u\n  user:\n{user}"
        )
    }

    #[test]
    fn inline_credentials_are_accepted_and_the_server_found() {
        let yaml = kubeconfig("    token: abc\n", "    certificate-authority-data: Zm9v\n");
        let (_, server) = check(&yaml).unwrap();
        assert_eq!(server, "https://127.0.0.1:6443");
    }

    #[test]
    fn exec_is_refused_naming_the_field_and_user() {
        let yaml =
            kubeconfig("    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: touch\n", "");
        let err = check(&yaml).unwrap_err();
        assert_eq!(err.reason(), "KubeconfigRefused");
        let text = err.to_string();
        assert!(text.contains("`exec`") && text.contains("\"u\""), "{text}");
    }

    #[test]
    fn file_paths_and_auth_providers_are_refused() {
        for (user, field) in [
            ("    tokenFile: /var/run/token\n", "tokenFile"),
            ("    client-certificate: /tmp/c.pem\n    client-key-data: Zm9v\n", "client-certificate"),
            ("    client-certificate-data: Zm9v\n    client-key: /tmp/k.pem\n", "client-key"),
            ("    auth-provider:\n      name: gcp\n", "auth-provider"),
        ] {
            let err = check(&kubeconfig(user, "")).unwrap_err();
            assert!(err.to_string().contains(&format!("`{field}`")), "{field}: {err}");
        }
        let err = check(&kubeconfig("    token: abc\n", "    certificate-authority: /etc/ca.pem\n")).unwrap_err();
        assert_eq!(err, KubeconfigError::CaFile { cluster: "k".into() });
    }

    #[test]
    fn a_kubeconfig_that_skips_tls_verification_is_refused() {
        let insecure = "    insecure-skip-tls-verify: true\n";
        let err = check(&kubeconfig("    token: abc\n", insecure)).unwrap_err();
        assert_eq!(err, KubeconfigError::Insecure { cluster: "k".into() });
        assert_eq!(err.reason(), "KubeconfigRefused");
        assert!(err.to_string().contains("`insecure-skip-tls-verify`"), "{err}");
        let verified = "    insecure-skip-tls-verify: false\n    certificate-authority-data: Zm9v\n";
        assert!(check(&kubeconfig("    token: abc\n", verified)).is_ok());
    }

    #[test]
    fn a_malformed_kubeconfig_does_not_echo_its_content() {
        let token = "s3cr3t-token";
        let user = |u: &str| kubeconfig(u, "    certificate-authority-data: Zm9v\n");
        for (what, yaml) in [
            ("unclosed flow", format!("users: [ {{name: u, user: {{token: {token}}}")),
            (
                "a token where a list belongs",
                user("    token: abc\n")
                    .replace("users:\n- name: u\n  user:\n    token: abc", &format!("users: {token}")),
            ),
            ("a token as a map key", user(&format!("    {token}: [\n"))),
            ("a token in an alias", user(&format!("    token: *{token}\n"))),
            ("a repeated key", user(&format!("    token: {token}\n    token: {token}\n"))),
            ("a token in a bad indentation", user(&format!("    token: abc\n  {token}: x\n   y: z\n"))),
            ("a token in a wrong type", user(&format!("    token: [{token}]\n"))),
            ("a token under a wrong tag", user(&format!("    token: !!int {token}\n"))),
        ] {
            let err = check(&yaml).expect_err(what);
            assert_eq!(err.reason(), "KubeconfigInvalid", "{what}: {err}");
            let text = err.to_string();
            assert!(!text.contains("s3cr3t") && !text.contains("abc"), "{what}: {text}");
        }
    }

    #[test]
    fn an_error_says_where_the_kubeconfig_breaks() {
        let err = check("apiVersion: v1\nusers: [\n").unwrap_err();
        assert!(err.to_string().contains("line "), "{err}");
    }

    #[test]
    fn a_kubeconfig_over_the_size_cap_is_refused_unread() {
        let yaml = format!("{}#{}\n", kubeconfig("    token: abc\n", ""), "x".repeat(crate::yaml::MAX_DOCUMENT_BYTES));
        let err = check(&yaml).unwrap_err();
        assert!(matches!(err, KubeconfigError::Malformed(YamlError::TooLarge { .. })), "{err}");
        assert!(err.to_string().contains("more than the 262144 bytes meshfed reads"), "{err}");
    }

    #[test]
    fn a_kubeconfig_without_current_context_has_no_server() {
        let yaml = kubeconfig("    token: abc\n", "").replace("current-context: c\n", "");
        assert_eq!(check(&yaml).unwrap_err(), KubeconfigError::NoServer);
    }
}
