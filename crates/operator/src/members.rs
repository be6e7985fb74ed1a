//! Clients for member clusters, built from kubeconfig Secrets in the federation's namespace.
//!
//! A kubeconfig is checked before any client is built from it (no `exec`, auth providers or file paths), and the
//! client is cached by the Secret's uid and resourceVersion, so it is rebuilt only when the Secret changes.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client, Config, ResourceExt,
    config::{KubeConfigOptions, Kubeconfig},
};
use meshfed_api::SecretKeyRef;
use meshfed_core::{kubeconfig, plan::Failure};

/// A member's client, with the checked kubeconfig it was built from (whose server and CA peers use too).
#[derive(Clone)]
pub struct Member {
    /// Which kubeconfig Secret (`namespace/name/key`) the client comes from, and the Secret's uid/resourceVersion.
    pub id: String,
    pub version: String,
    pub client: Client,
    pub server: String,
    pub kubeconfig: Kubeconfig,
}

type Key = (String, String, String);

/// The id of the member whose kubeconfig is `secret` in the hub namespace `namespace`: `namespace/name/key`.
pub fn member_id(namespace: &str, secret: &SecretKeyRef) -> String {
    format!("{namespace}/{}/{}", secret.name, secret.key)
}

/// Member clients, keyed by the kubeconfig Secret they were built from.
#[derive(Default)]
pub struct ClientPool {
    cache: Mutex<HashMap<Key, (String, Member)>>,
}

impl ClientPool {
    /// The client for the member whose kubeconfig is in `secret` of `namespace` in the hub.
    pub async fn member(
        &self,
        hub: &Client,
        namespace: &str,
        secret: &SecretKeyRef,
        connect_timeout: Duration,
    ) -> Result<Member, Failure> {
        let where_ = format!("Secret {namespace}/{} key {:?}", secret.name, secret.key);
        let s = Api::<Secret>::namespaced(hub.clone(), namespace)
            .get_opt(&secret.name)
            .await
            .map_err(|e| Failure::new("KubeconfigSecretUnreadable", format!("cannot read {where_} in the hub: {e}")))?
            .ok_or_else(|| Failure::new("KubeconfigSecretMissing", format!("{where_} does not exist")))?;
        let version = format!("{}/{}", s.uid().unwrap_or_default(), s.resource_version().unwrap_or_default());
        let key = (namespace.to_string(), secret.name.clone(), secret.key.clone());
        if let Some((v, member)) = self.cache.lock().expect("pool lock").get(&key)
            && *v == version
        {
            return Ok(member.clone());
        }
        let bytes = s
            .data
            .as_ref()
            .and_then(|d| d.get(&secret.key))
            .ok_or_else(|| Failure::new("KubeconfigKeyMissing", format!("{where_}: the Secret has no such key")))?;
        let yaml = std::str::from_utf8(&bytes.0)
            .map_err(|_| Failure::new("KubeconfigInvalid", format!("{where_}: not UTF-8 text")))?;
        let (kc, server) = kubeconfig::check(yaml).map_err(|e| Failure::new(e.reason(), format!("{where_}: {e}")))?;
        let mut config = Config::from_custom_kubeconfig(kc.clone(), &KubeConfigOptions::default())
            .await
            .map_err(|e| Failure::new("KubeconfigInvalid", format!("{where_}: {e}")))?;
        config.connect_timeout = Some(connect_timeout);
        let client =
            Client::try_from(config).map_err(|e| Failure::new("KubeconfigInvalid", format!("{where_}: {e}")))?;
        let member =
            Member { id: member_id(namespace, secret), version: version.clone(), client, server, kubeconfig: kc };
        self.cache.lock().expect("pool lock").insert(key, (version, member.clone()));
        Ok(member)
    }
}
