//! Checks on kubeconfigs read from Secrets, before any client is built from them.
//!
//! kube-rs runs a kubeconfig's `exec` command and reads the files it names. A kubeconfig in a Secret is data written
//! by whoever may write Secrets in the federation's namespace, so meshfed accepts only credentials carried inline.

use kube::config::Kubeconfig;

use crate::conditions::Reason;

/// Why a kubeconfig was refused; the message names the field so that a person can fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KubeconfigError {
    #[error("the kubeconfig is not valid YAML: {0}")]
    Malformed(String),
    #[error(
        "user {user:?} sets `{field}`, which would make the hub {what}; meshfed refuses it: put the credentials inline (token, or client-certificate-data and client-key-data)"
    )]
    Refused { user: String, field: &'static str, what: &'static str },
    #[error(
        "cluster {cluster:?} sets `certificate-authority`, a file path on the hub; meshfed refuses it: use certificate-authority-data"
    )]
    CaFile { cluster: String },
    #[error("the kubeconfig has no current-context, or it names no cluster with a server")]
    NoServer,
}

impl KubeconfigError {
    /// The stable reason for conditions and metrics.
    pub fn reason(&self) -> Reason {
        match self {
            Self::Malformed(_) | Self::NoServer => Reason::KubeconfigInvalid,
            Self::Refused { .. } | Self::CaFile { .. } => Reason::KubeconfigRefused,
        }
    }
}

/// Parses a kubeconfig and refuses it if any user or cluster in it would run a command or read a file on the hub.
/// Returns the parsed kubeconfig and the server of its current context.
pub fn check(yaml: &str) -> Result<(Kubeconfig, String), KubeconfigError> {
    // The parser's error text can quote the document, which may hold a token: keep only its position.
    let kc = Kubeconfig::from_yaml(yaml).map_err(|e| {
        let text = e.to_string();
        let location = text.find(" at line ").map(|i| text[i + 1..].to_string());
        KubeconfigError::Malformed(location.unwrap_or_else(|| "unreadable document".into()))
    })?;
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
    fn a_malformed_kubeconfig_does_not_echo_its_content() {
        let err = check("users: [ {name: u, user: {token: s3cr3t-token}").unwrap_err();
        assert_eq!(err.reason(), "KubeconfigInvalid");
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
    }

    #[test]
    fn a_kubeconfig_without_current_context_has_no_server() {
        let yaml = kubeconfig("    token: abc\n", "").replace("current-context: c\n", "");
        assert_eq!(check(&yaml).unwrap_err(), KubeconfigError::NoServer);
    }
}
