//! The mesh's PKI: the root CA and the intermediate CA that every member's istiod reads from Secret `cacerts`
//! (Istio's plugged-in CA, ISTIO-FACTS.md section 1).
//!
//! Pure: no Kubernetes IO and no clock; the time comes in as `now`. Randomness is drawn only where a key or a
//! serial number is made. Private keys never appear in an error message or in a `Debug` output.
//!
//! The certificates follow Istio's reference tooling (`tools/certs`):
//! - root: O=Istio, CN=Root CA, critical basicConstraints `CA:TRUE` without a path length, critical keyUsage
//!   digitalSignature, nonRepudiation, keyEncipherment, keyCertSign and cRLSign;
//! - intermediate, one per member: O=Istio, CN=Intermediate CA, L=`<cluster>`, critical basicConstraints `CA:TRUE,
//!   pathlen:0`, the same keyUsage, SAN DNS `istiod.<istio namespace>.svc`, signed by the root; `cert-chain.pem` is
//!   the intermediate followed by the root.
//!
//! Keys are written as PKCS#8 (`PRIVATE KEY` PEM blocks), which istiod accepts. A root brought by the user may also
//! carry a PKCS#1 (`RSA PRIVATE KEY`) or SEC1 (`EC PRIVATE KEY`) key, as cert-manager and older openssl write them.

use std::{collections::BTreeMap, fmt, time::Duration};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::ByteString;
use meshfed_api::KeyAlgorithm;

use crate::conditions::Reason;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber,
};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use x509_parser::{
    certificate::X509Certificate, extensions::GeneralName, prelude::FromDer, public_key::PublicKey, time::ASN1Time,
    x509::SubjectPublicKeyInfo,
};

/// The Secret, in every member's Istio namespace, that holds the member's intermediate CA.
pub const CACERTS_SECRET: &str = "cacerts";
/// `cacerts` key: the member's intermediate CA certificate (PEM).
pub const CA_CERT: &str = "ca-cert.pem";
/// `cacerts` key: the intermediate CA's private key (PKCS#8 PEM).
pub const CA_KEY: &str = "ca-key.pem";
/// `cacerts` key: the federation's root CA certificate (PEM).
pub const ROOT_CERT: &str = "root-cert.pem";
/// `cacerts` key: the intermediate followed by the root (PEM).
pub const CERT_CHAIN: &str = "cert-chain.pem";
/// Every key istiod needs in `cacerts` (a partial bundle is a hard error since Istio 1.27).
pub const CACERTS_KEYS: [&str; 4] = [CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN];
/// Root CA Secret key for the certificate, in the `kubernetes.io/tls` convention (meshfed writes a generated root so).
pub const TLS_CERT: &str = "tls.crt";
/// Root CA Secret key for the private key, in the `kubernetes.io/tls` convention.
pub const TLS_KEY: &str = "tls.key";

/// How far before `now` a new certificate's validity starts (5 minutes), so that a member whose clock runs behind
/// the hub's by up to that much already accepts a freshly issued intermediate. `notAfter` is `now + validity`.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// The keyUsage of both CA profiles (Istio's reference tooling, plus cRLSign).
const CA_KEY_USAGES: [KeyUsagePurpose; 5] = [
    KeyUsagePurpose::DigitalSignature,
    KeyUsagePurpose::ContentCommitment,
    KeyUsagePurpose::KeyEncipherment,
    KeyUsagePurpose::KeyCertSign,
    KeyUsagePurpose::CrlSign,
];

/// Why a root CA cannot be used, or a certificate could not be made or read. Messages name what is wrong and never
/// quote a private key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PkiError {
    #[error("the root CA Secret has neither `tls.crt` and `tls.key` nor `ca-cert.pem` and `ca-key.pem`")]
    RootSecretIncomplete,
    #[error("the root CA {0}")]
    RootMalformed(String),
    #[error("the root CA certificate {0}")]
    RootNotCa(String),
    #[error(
        "the root CA certificate is constrained to pathlen 0: it cannot sign intermediate CAs that sign workload certificates"
    )]
    RootPathLenTooShort,
    #[error("the root CA certificate has {0}; meshfed signs with RSA (2048 to 8192 bits) or ECDSA P-256 or P-384 keys")]
    RootUnsupportedKey(String),
    #[error("the root CA's private key does not belong to its certificate")]
    RootKeyMismatch,
    #[error("the root CA certificate expired at {not_after}")]
    RootExpired { not_after: Timestamp },
    #[error("the root CA certificate is not valid before {not_before}")]
    RootNotYetValid { not_before: Timestamp },
    #[error("the certificate {0}")]
    CertificateMalformed(String),
    #[error(
        "a validity of {} cannot be used: it must be at least one second and end before the year 10000",
        humantime::format_duration(*.0)
    )]
    InvalidValidity(Duration),
    #[error("key generation or signing failed: {0}")]
    Crypto(String),
}

impl PkiError {
    /// The stable reason for conditions (`TrustReady`), Events and metrics.
    pub fn reason(&self) -> Reason {
        match self {
            Self::RootSecretIncomplete => Reason::RootSecretIncomplete,
            Self::RootMalformed(_) => Reason::RootMalformed,
            Self::RootNotCa(_) => Reason::RootNotCA,
            Self::RootPathLenTooShort => Reason::RootPathLenTooShort,
            Self::RootUnsupportedKey(_) => Reason::RootUnsupportedKey,
            Self::RootKeyMismatch => Reason::RootKeyMismatch,
            Self::RootExpired { .. } => Reason::RootExpired,
            Self::RootNotYetValid { .. } => Reason::RootNotYetValid,
            Self::CertificateMalformed(_) => Reason::CertificateMalformed,
            Self::InvalidValidity(_) => Reason::InvalidValidity,
            Self::Crypto(_) => Reason::CryptoFailed,
        }
    }
}

fn crypto(e: impl fmt::Display) -> PkiError {
    PkiError::Crypto(e.to_string())
}

/// A certificate as status shows it: never the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSummary {
    /// SHA-256 of the certificate's DER encoding, as `sha256:<64 lowercase hex digits>`.
    pub fingerprint: String,
    /// The certificate's `notAfter`: the last instant at which it is valid.
    pub not_after: Timestamp,
}

impl CertSummary {
    /// `not_after` in RFC 3339, in UTC, for example `2035-01-01T00:00:00Z`.
    pub fn not_after_rfc3339(&self) -> String {
        self.not_after.to_string()
    }
}

/// The fingerprint and expiry of the first certificate in `cert_pem`.
pub fn summarize(cert_pem: impl AsRef<[u8]>) -> Result<CertSummary, PkiError> {
    let der = pem_certs(cert_pem.as_ref()).map_err(PkiError::CertificateMalformed)?.swap_remove(0);
    let cert = parse_cert(&der).map_err(PkiError::CertificateMalformed)?;
    Ok(summary_of(&der, &cert))
}

/// When the first certificate in `cert_pem` starts and stops being valid (`notBefore`, `notAfter`).
pub fn validity(cert_pem: impl AsRef<[u8]>) -> Result<(Timestamp, Timestamp), PkiError> {
    let der = pem_certs(cert_pem.as_ref()).map_err(PkiError::CertificateMalformed)?.swap_remove(0);
    let cert = parse_cert(&der).map_err(PkiError::CertificateMalformed)?;
    Ok((asn1_timestamp(cert.validity().not_before), asn1_timestamp(cert.validity().not_after)))
}

/// A freshly generated root CA: the certificate and its key, both PEM, to be stored once in the hub.
#[derive(Clone, PartialEq, Eq)]
pub struct CaMaterial {
    /// The certificate, one `CERTIFICATE` PEM block.
    pub cert_pem: String,
    /// The private key, one PKCS#8 `PRIVATE KEY` PEM block. Secret: never log it.
    pub key_pem: String,
}

impl CaMaterial {
    /// The data of the hub Secret that keeps this root: `tls.crt` and `tls.key`.
    pub fn secret_data(&self) -> BTreeMap<String, ByteString> {
        BTreeMap::from([
            (TLS_CERT.into(), ByteString(self.cert_pem.clone().into_bytes())),
            (TLS_KEY.into(), ByteString(self.key_pem.clone().into_bytes())),
        ])
    }
}

impl fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaMaterial").field("cert_pem", &self.cert_pem).field("key_pem", &"<redacted>").finish()
    }
}

/// Generates a root CA with Istio's reference profile (see the module documentation): a fresh `algorithm` key, a
/// random 128-bit serial, valid from `now` minus [`BACKDATE`] until `now + validity` (both to the second).
pub fn generate_root(algorithm: KeyAlgorithm, validity: Duration, now: Timestamp) -> Result<CaMaterial, PkiError> {
    let (not_before, not_after) = validity_window(validity, now)?;
    let key = generate_key(algorithm)?;
    let params = ca_params(
        &[(DnType::OrganizationName, "Istio"), (DnType::CommonName, "Root CA")],
        BasicConstraints::Unconstrained,
        not_before,
        not_after,
    )?;
    let cert = params.self_signed(&key).map_err(crypto)?;
    Ok(CaMaterial { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// The federation's root CA, checked and ready to sign intermediates.
pub struct Root {
    issuer: Issuer<'static, KeyPair>,
    cert_der: Vec<u8>,
    cert_pem: String,
    summary: CertSummary,
}

impl Root {
    /// The root certificate, re-encoded as one `CERTIFICATE` PEM block (what `root-cert.pem` holds).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The root's fingerprint and expiry, for `status.trust`.
    pub fn summary(&self) -> &CertSummary {
        &self.summary
    }

    /// The certificate and key (PKCS#8), as the hub keeps a copy of a root it may still need to sign with.
    pub fn material(&self) -> CaMaterial {
        CaMaterial { cert_pem: self.cert_pem.clone(), key_pem: self.issuer.key().serialize_pem() }
    }

    /// Builds a root from a certificate's DER and its key, without the checks of [`load_root`].
    fn assemble(cert_der: Vec<u8>, key: KeyPair) -> Result<Self, PkiError> {
        let cert = parse_cert(&cert_der).map_err(PkiError::RootMalformed)?;
        let summary = summary_of(&cert_der, &cert);
        let issuer = Issuer::from_ca_cert_der(&cert_der.as_slice().into(), key)
            .map_err(|e| PkiError::RootMalformed(format!("certificate cannot be used as an issuer: {e}")))?;
        Ok(Self { issuer, cert_pem: cert_pem(&cert_der), cert_der, summary })
    }
}

impl fmt::Debug for Root {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Root")
            .field("fingerprint", &self.summary.fingerprint)
            .field("not_after", &self.summary.not_after)
            .finish_non_exhaustive()
    }
}

/// Reads a root CA: `cert_pem` must hold exactly one certificate, `key_pem` exactly one unencrypted private key
/// (PKCS#8, PKCS#1 or SEC1). Checks, in this order, each failure with its own [`PkiError`] reason: both parse; the
/// key is RSA or ECDSA P-256/P-384; the certificate is a CA (basicConstraints `CA:TRUE`, keyCertSign when keyUsage
/// is present) that may sign CAs (no `pathlen:0`); it is valid at `now`; the key belongs to the certificate. The
/// root need not be self-signed: an intermediate of a corporate PKI can serve as the mesh's root.
pub fn load_root(cert_pem: impl AsRef<[u8]>, key_pem: impl AsRef<[u8]>, now: Timestamp) -> Result<Root, PkiError> {
    let certs = pem_certs(cert_pem.as_ref()).map_err(|e| PkiError::RootMalformed(format!("certificate {e}")))?;
    let [cert_der] = <[Vec<u8>; 1]>::try_from(certs).map_err(|certs| {
        PkiError::RootMalformed(format!("certificate PEM holds {} certificates; expected one", certs.len()))
    })?;
    let cert = parse_cert(&cert_der).map_err(|e| PkiError::RootMalformed(format!("certificate {e}")))?;

    let kind = key_kind(cert.public_key());
    if !kind.signable() {
        return Err(PkiError::RootUnsupportedKey(kind.to_string()));
    }
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {
            if bc.value.path_len_constraint == Some(0) {
                return Err(PkiError::RootPathLenTooShort);
            }
        }
        Ok(_) => return Err(PkiError::RootNotCa("is not a CA: it has no basicConstraints CA:TRUE".into())),
        Err(e) => return Err(PkiError::RootMalformed(format!("certificate has unreadable basicConstraints: {e}"))),
    }
    match cert.key_usage() {
        Ok(Some(ku)) if !ku.value.key_cert_sign() => {
            return Err(PkiError::RootNotCa("may not sign certificates: its keyUsage lacks keyCertSign".into()));
        }
        Ok(_) => {}
        Err(e) => return Err(PkiError::RootMalformed(format!("certificate has an unreadable keyUsage: {e}"))),
    }
    let not_before = asn1_timestamp(cert.validity().not_before);
    let not_after = asn1_timestamp(cert.validity().not_after);
    if now < not_before {
        return Err(PkiError::RootNotYetValid { not_before });
    }
    if now > not_after {
        return Err(PkiError::RootExpired { not_after });
    }
    let key = parse_key(key_pem.as_ref(), &cert).map_err(|p| match p {
        KeyProblem::Malformed(detail) => PkiError::RootMalformed(format!("key {detail}")),
        KeyProblem::Mismatch => PkiError::RootKeyMismatch,
    })?;
    Root::assemble(cert_der, key)
}

/// Reads the root CA from a hub Secret's data: `tls.crt` and `tls.key` when both are present, else `ca-cert.pem`
/// and `ca-key.pem`. See [`load_root`] for the checks.
pub fn load_root_secret(data: &BTreeMap<String, ByteString>, now: Timestamp) -> Result<Root, PkiError> {
    let (cert, key) = [(TLS_CERT, TLS_KEY), (CA_CERT, CA_KEY)]
        .into_iter()
        .find_map(|(c, k)| Some((data.get(c)?, data.get(k)?)))
        .ok_or(PkiError::RootSecretIncomplete)?;
    load_root(&cert.0, &key.0, now)
}

/// What an intermediate CA must say for one member. When any of it changes, the intermediate is reissued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntermediateProfile<'a> {
    /// The member's name (its Istio cluster ID): the certificate's L (locality).
    pub cluster: &'a str,
    /// The namespace istiod runs in, in that member: the SAN is DNS `istiod.<istio_namespace>.svc`.
    pub istio_namespace: &'a str,
    /// The intermediate's key algorithm (`trust.intermediate.algorithm`).
    pub algorithm: KeyAlgorithm,
}

impl IntermediateProfile<'_> {
    /// The intermediate's DNS SAN: istiod's Service name in the member, `istiod.<namespace>.svc`.
    pub fn istiod_dns_name(&self) -> String {
        format!("istiod.{}.svc", self.istio_namespace)
    }
}

/// The four PEM files of a member's `cacerts` Secret.
#[derive(Clone, PartialEq, Eq)]
pub struct CacertsBundle {
    /// `ca-cert.pem`: the member's intermediate CA certificate.
    pub ca_cert_pem: String,
    /// `ca-key.pem`: its private key (PKCS#8). Secret: never log it.
    pub ca_key_pem: String,
    /// `root-cert.pem`: the federation's root certificate.
    pub root_cert_pem: String,
    /// `cert-chain.pem`: the intermediate followed by the root.
    pub cert_chain_pem: String,
}

impl CacertsBundle {
    /// The data of Secret `cacerts`, under the keys istiod reads.
    pub fn secret_data(&self) -> BTreeMap<String, ByteString> {
        [
            (CA_CERT, &self.ca_cert_pem),
            (CA_KEY, &self.ca_key_pem),
            (ROOT_CERT, &self.root_cert_pem),
            (CERT_CHAIN, &self.cert_chain_pem),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.clone().into_bytes())))
        .collect()
    }
}

impl fmt::Debug for CacertsBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacertsBundle")
            .field("ca_cert_pem", &self.ca_cert_pem)
            .field("ca_key_pem", &"<redacted>")
            .field("root_cert_pem", &self.root_cert_pem)
            .field("cert_chain_pem", &self.cert_chain_pem)
            .finish()
    }
}

/// Issues a member's intermediate CA from `root`: a fresh key of `profile.algorithm`, Istio's intermediate profile
/// (see the module documentation), a random 128-bit serial, valid from `now` minus [`BACKDATE`] until
/// `now + validity`. The intermediate is not cut short at the root's expiry: replacing an expiring root is a root
/// rotation, not an intermediate renewal.
pub fn issue_intermediate(
    root: &Root,
    profile: &IntermediateProfile<'_>,
    validity: Duration,
    now: Timestamp,
) -> Result<CacertsBundle, PkiError> {
    let (not_before, not_after) = validity_window(validity, now)?;
    let mut params = ca_params(
        &[
            (DnType::OrganizationName, "Istio"),
            (DnType::CommonName, "Intermediate CA"),
            (DnType::LocalityName, profile.cluster),
        ],
        BasicConstraints::Constrained(0),
        not_before,
        not_after,
    )?;
    let san = profile.istiod_dns_name().try_into().map_err(crypto)?;
    params.subject_alt_names = vec![SanType::DnsName(san)];
    params.use_authority_key_identifier_extension = true;
    let key = generate_key(profile.algorithm)?;
    let cert = params.signed_by(&key, &root.issuer).map_err(crypto)?;
    let ca_cert_pem = cert.pem();
    Ok(CacertsBundle {
        cert_chain_pem: format!("{ca_cert_pem}{}", root.cert_pem),
        ca_cert_pem,
        ca_key_pem: key.serialize_pem(),
        root_cert_pem: root.cert_pem.clone(),
    })
}

/// Why a member's `cacerts` must be (re)issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReissueReason {
    /// There is no `cacerts` Secret.
    Missing,
    /// Some of the four keys are absent (named here).
    Incomplete { missing: Vec<&'static str> },
    /// A key's value is not what it should be (not PEM, no certificate, unreadable key).
    Malformed { key: &'static str, detail: String },
    /// `ca-key.pem` is not the key of `ca-cert.pem`.
    KeyMismatch,
    /// `ca-cert.pem` is not signed by the federation's root: another root, or a root that was replaced.
    NotChainedToRoot,
    /// `root-cert.pem` lacks the root, or `cert-chain.pem` is not the intermediate followed by the root.
    ChainMismatch { key: &'static str, detail: String },
    /// The intermediate has expired.
    Expired { not_after: Timestamp },
    /// The intermediate expires within `renew_before`.
    ExpiringSoon { not_after: Timestamp, renew_before: Duration },
    /// The intermediate no longer matches its profile (algorithm, SAN/namespace, cluster, CA constraints).
    ParametersChanged { detail: String },
}

impl ReissueReason {
    /// The stable reason for conditions, Events and metrics.
    pub fn reason(&self) -> Reason {
        match self {
            Self::Missing => Reason::CacertsMissing,
            Self::Incomplete { .. } => Reason::CacertsIncomplete,
            Self::Malformed { .. } => Reason::CacertsMalformed,
            Self::KeyMismatch => Reason::IntermediateKeyMismatch,
            Self::NotChainedToRoot => Reason::NotChainedToRoot,
            Self::ChainMismatch { .. } => Reason::CacertsChainMismatch,
            Self::Expired { .. } => Reason::IntermediateExpired,
            Self::ExpiringSoon { .. } => Reason::IntermediateExpiring,
            Self::ParametersChanged { .. } => Reason::IntermediateParametersChanged,
        }
    }
}

impl fmt::Display for ReissueReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing => write!(f, "Secret {CACERTS_SECRET} does not exist"),
            Self::Incomplete { missing } => write!(f, "Secret {CACERTS_SECRET} has no {}", missing.join(", ")),
            Self::Malformed { key, detail } | Self::ChainMismatch { key, detail } => {
                write!(f, "{key} in Secret {CACERTS_SECRET} {detail}")
            }
            Self::KeyMismatch => write!(f, "{CA_KEY} in Secret {CACERTS_SECRET} is not the key of {CA_CERT}"),
            Self::NotChainedToRoot => {
                write!(f, "{CA_CERT} in Secret {CACERTS_SECRET} is not signed by the federation's root CA")
            }
            Self::Expired { not_after } => write!(f, "the intermediate CA expired at {not_after}"),
            Self::ExpiringSoon { not_after, renew_before } => write!(
                f,
                "the intermediate CA expires at {not_after}, within renewBefore ({})",
                humantime::format_duration(*renew_before)
            ),
            Self::ParametersChanged { detail } => write!(f, "the intermediate CA no longer matches the spec: {detail}"),
        }
    }
}

/// When an intermediate CA valid until `not_after` falls due for renewal: `renew_before` ahead of its expiry.
/// `None` when that lies before any representable time (then it is due at once).
pub fn renewal_at(not_after: Timestamp, renew_before: Duration) -> Option<Timestamp> {
    SignedDuration::try_from(renew_before).ok().and_then(|d| not_after.checked_sub(d).ok())
}

/// What to do with a member's `cacerts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacertsVerdict {
    /// It is complete, chains to the root, matches the profile and is not due: keep it. Its intermediate's
    /// fingerprint and expiry are for the member's status.
    Keep(CertSummary),
    /// Issue a new intermediate, for this reason.
    Reissue(ReissueReason),
}

/// Decides whether a member's `cacerts` can stay. `observed` is the Secret's data (`None` when there is no Secret).
/// The first problem found is returned, checked in this order: all four keys present; each parses; `ca-key.pem`
/// belongs to `ca-cert.pem`; `ca-cert.pem` is signed by `root`; `root-cert.pem` holds `root` and `cert-chain.pem` is
/// exactly `ca-cert.pem` then `root`; the intermediate is not expired and expires later than `renew_before` after
/// `now`; it matches `profile` and is a CA with critical basicConstraints `pathlen:0` and keyCertSign.
/// A change of `trust.intermediate.validity` alone does not cause a reissue: the new validity applies at renewal.
pub fn inspect_cacerts(
    observed: Option<&BTreeMap<String, ByteString>>,
    root: &Root,
    profile: &IntermediateProfile<'_>,
    renew_before: Duration,
    now: Timestamp,
) -> CacertsVerdict {
    match check_cacerts(observed, root, profile, renew_before, now) {
        Ok(summary) => CacertsVerdict::Keep(summary),
        Err(reason) => CacertsVerdict::Reissue(reason),
    }
}

/// Whether istiod takes a `cacerts` (`observed`, its data; `None`: no Secret) as its CA, whichever root it chains
/// to (ISTIO-FACTS.md section 1): all four keys present and readable, `ca-key.pem` the key of `ca-cert.pem`,
/// `ca-cert.pem` signed by a certificate of `root-cert.pem` (meshfed issues no deeper chains) and not expired at
/// `now`. Returns the intermediate's summary, or the first problem, in the order [`inspect_cacerts`] checks.
pub fn usable_cacerts(
    observed: Option<&BTreeMap<String, ByteString>>,
    now: Timestamp,
) -> Result<CertSummary, ReissueReason> {
    let (ca_der, root_certs, _) = read_cacerts(observed)?;
    let ca = parse_cert(&ca_der).map_err(|detail| ReissueReason::Malformed { key: CA_CERT, detail })?;
    let signed = |root: &Vec<u8>| parse_cert(root).is_ok_and(|r| ca.verify_signature(Some(r.public_key())).is_ok());
    if !root_certs.iter().any(signed) {
        return Err(ReissueReason::ChainMismatch {
            key: ROOT_CERT,
            detail: format!("holds no certificate that signed {CA_CERT}"),
        });
    }
    let summary = summary_of(&ca_der, &ca);
    if now > summary.not_after {
        return Err(ReissueReason::Expired { not_after: summary.not_after });
    }
    Ok(summary)
}

/// The DER of a complete, readable `cacerts`' intermediate, trusted roots and chain, once its key is shown to be
/// the intermediate's.
type CacertsDer = (Vec<u8>, Vec<Vec<u8>>, Vec<Vec<u8>>);

/// Reads a `cacerts`: all four keys present, each readable, `ca-cert.pem` exactly one certificate, `ca-key.pem` its
/// key.
fn read_cacerts(observed: Option<&BTreeMap<String, ByteString>>) -> Result<CacertsDer, ReissueReason> {
    let data = observed.ok_or(ReissueReason::Missing)?;
    let missing: Vec<_> = CACERTS_KEYS.into_iter().filter(|k| !data.contains_key(*k)).collect();
    if !missing.is_empty() {
        return Err(ReissueReason::Incomplete { missing });
    }
    let value = |key: &str| data.get(key).map(|v| v.0.as_slice()).unwrap_or_default();
    let malformed = |key, detail| ReissueReason::Malformed { key, detail };

    let certs = pem_certs(value(CA_CERT)).map_err(|e| malformed(CA_CERT, e))?;
    let [ca_der] = <[Vec<u8>; 1]>::try_from(certs)
        .map_err(|c| malformed(CA_CERT, format!("holds {} certificates; expected one", c.len())))?;
    let ca = parse_cert(&ca_der).map_err(|e| malformed(CA_CERT, e))?;
    let root_certs = pem_certs(value(ROOT_CERT)).map_err(|e| malformed(ROOT_CERT, e))?;
    let chain = pem_certs(value(CERT_CHAIN)).map_err(|e| malformed(CERT_CHAIN, e))?;
    parse_key(value(CA_KEY), &ca).map_err(|p| match p {
        KeyProblem::Malformed(detail) => malformed(CA_KEY, detail),
        KeyProblem::Mismatch => ReissueReason::KeyMismatch,
    })?;
    Ok((ca_der, root_certs, chain))
}

fn check_cacerts(
    observed: Option<&BTreeMap<String, ByteString>>,
    root: &Root,
    profile: &IntermediateProfile<'_>,
    renew_before: Duration,
    now: Timestamp,
) -> Result<CertSummary, ReissueReason> {
    let (ca_der, root_certs, chain) = read_cacerts(observed)?;
    let ca = parse_cert(&ca_der).map_err(|detail| ReissueReason::Malformed { key: CA_CERT, detail })?;

    let root_cert = parse_cert(&root.cert_der).map_err(|_| ReissueReason::NotChainedToRoot)?;
    ca.verify_signature(Some(root_cert.public_key())).map_err(|_| ReissueReason::NotChainedToRoot)?;
    if !root_certs.contains(&root.cert_der) {
        return Err(ReissueReason::ChainMismatch {
            key: ROOT_CERT,
            detail: "does not hold the federation's root CA certificate".into(),
        });
    }
    if chain != [ca_der.clone(), root.cert_der.clone()] {
        return Err(ReissueReason::ChainMismatch {
            key: CERT_CHAIN,
            detail: format!("is not {CA_CERT} followed by the federation's root CA certificate"),
        });
    }

    let summary = summary_of(&ca_der, &ca);
    let not_after = summary.not_after;
    if now > not_after {
        return Err(ReissueReason::Expired { not_after });
    }
    if renewal_at(not_after, renew_before).is_none_or(|at| now >= at) {
        return Err(ReissueReason::ExpiringSoon { not_after, renew_before });
    }

    if let Some(detail) = profile_mismatch(&ca, profile) {
        return Err(ReissueReason::ParametersChanged { detail });
    }
    Ok(summary)
}

/// How `cert` differs from the intermediate profile, if it does.
fn profile_mismatch(cert: &X509Certificate<'_>, profile: &IntermediateProfile<'_>) -> Option<String> {
    let kind = key_kind(cert.public_key());
    if kind.algorithm() != Some(profile.algorithm) {
        return Some(format!("its key is {kind}; the spec asks for {:?}", profile.algorithm));
    }
    let want_dns = profile.istiod_dns_name();
    let sans: Vec<Option<&str>> = match cert.subject_alternative_name() {
        Ok(Some(ext)) => ext
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(d) => Some(*d),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    if sans != [Some(want_dns.as_str())] {
        return Some(format!("its SAN is not exactly DNS {want_dns}"));
    }
    let localities: Vec<_> = cert.subject().iter_locality().map(|a| a.as_str().ok()).collect();
    if localities != [Some(profile.cluster)] {
        return Some(format!("its locality (L) is not the cluster name {:?}", profile.cluster));
    }
    let pathlen0 = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.critical && bc.value.ca && bc.value.path_len_constraint == Some(0));
    if !pathlen0 {
        return Some("it is not a CA with critical basicConstraints pathlen:0".into());
    }
    if !matches!(cert.key_usage(), Ok(Some(ku)) if ku.value.key_cert_sign()) {
        return Some("its keyUsage lacks keyCertSign".into());
    }
    None
}

// ---- building certificates ----

/// The parameters both CA profiles share: the subject `dn` (in this order), CA constraints, Istio's keyUsage, a
/// random serial and the validity window.
fn ca_params(
    dn: &[(DnType, &str)],
    constraints: BasicConstraints,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    for (ty, value) in dn {
        params.distinguished_name.push(ty.clone(), *value);
    }
    params.is_ca = IsCa::Ca(constraints);
    params.key_usages = CA_KEY_USAGES.to_vec();
    params.serial_number = Some(random_serial()?);
    params.not_before = not_before;
    params.not_after = not_after;
    Ok(params)
}

/// `(notBefore, notAfter)`: `now` truncated to the second, minus [`BACKDATE`], and plus `validity`.
fn validity_window(validity: Duration, now: Timestamp) -> Result<(OffsetDateTime, OffsetDateTime), PkiError> {
    let invalid = || PkiError::InvalidValidity(validity);
    if validity < Duration::from_secs(1) {
        return Err(invalid());
    }
    let start = Timestamp::from_second(now.as_second()).map_err(|_| invalid())?;
    let shift = |d: Duration, sign: i32| {
        let d = SignedDuration::try_from(d).ok()? * sign;
        start.checked_add(d).ok().and_then(|t| OffsetDateTime::from_unix_timestamp(t.as_second()).ok())
    };
    let not_after = shift(validity, 1).filter(|t| t.year() <= 9999).ok_or_else(invalid)?;
    let not_before = shift(BACKDATE, -1).ok_or_else(invalid)?;
    Ok((not_before, not_after))
}

/// A positive serial number of 16 random bytes (at most 127 bits of entropy, well above RFC 5280's 64).
fn random_serial() -> Result<SerialNumber, PkiError> {
    use rsa::rand_core::{OsRng, RngCore};
    let mut bytes = [0u8; 16];
    OsRng.try_fill_bytes(&mut bytes).map_err(crypto)?;
    bytes[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&bytes))
}

/// A fresh key. ECDSA comes from ring (through rcgen); ring cannot generate RSA keys, so those come from the
/// pure-Rust `rsa` crate and are handed to ring as PKCS#8. Signatures use SHA-256.
fn generate_key(algorithm: KeyAlgorithm) -> Result<KeyPair, PkiError> {
    let bits = match algorithm {
        KeyAlgorithm::ECDSAP256 => return KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(crypto),
        KeyAlgorithm::RSA2048 => 2048,
        KeyAlgorithm::RSA4096 => 4096,
    };
    use rsa::pkcs8::EncodePrivateKey;
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, bits).map_err(crypto)?;
    let der = key.to_pkcs8_der().map_err(crypto)?;
    KeyPair::try_from(der.as_bytes()).map_err(crypto)
}

// ---- reading certificates and keys ----

/// The DER of every `CERTIFICATE` block of `pem`, each checked to parse; an error (a phrase to follow the thing's
/// name) when there is none or one does not parse.
/// The certificates of a PEM bundle, each as its fingerprint and PEM; unreadable blocks are skipped.
pub fn certificates(pem: &[u8]) -> Vec<(String, String)> {
    pem_certs(pem).unwrap_or_default().iter().map(|der| (fingerprint_der(der), cert_pem(der))).collect()
}

/// The fingerprints of the certificates in a PEM bundle.
pub fn fingerprints(pem: &[u8]) -> Vec<String> {
    certificates(pem).into_iter().map(|(fp, _)| fp).collect()
}

/// Whether the (first) certificate in `cert_pem` carries a valid signature by the key of the (first)
/// certificate in `issuer_pem`.
pub fn issued_by(cert_pem: &[u8], issuer_pem: &[u8]) -> bool {
    let (Some(cert), Some(issuer)) = (
        pem_certs(cert_pem).ok().and_then(|c| c.into_iter().next()),
        pem_certs(issuer_pem).ok().and_then(|c| c.into_iter().next()),
    ) else {
        return false;
    };
    match (parse_cert(&cert), parse_cert(&issuer)) {
        (Ok(c), Ok(i)) => c.verify_signature(Some(i.public_key())).is_ok(),
        _ => false,
    }
}

fn pem_certs(pem: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let blocks = pem::parse_many(pem).map_err(|_| "is not valid PEM".to_string())?;
    let certs: Vec<_> = blocks.into_iter().filter(|b| b.tag() == "CERTIFICATE").map(|b| b.into_contents()).collect();
    if certs.is_empty() {
        return Err("holds no CERTIFICATE PEM block".into());
    }
    for der in &certs {
        parse_cert(der)?;
    }
    Ok(certs)
}

fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, String> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err("holds a certificate followed by stray bytes".into()),
        Err(e) => Err(format!("holds a certificate that cannot be parsed ({e})")),
    }
}

fn summary_of(der: &[u8], cert: &X509Certificate<'_>) -> CertSummary {
    CertSummary { fingerprint: fingerprint_der(der), not_after: asn1_timestamp(cert.validity().not_after) }
}

/// `sha256:<hex>` of some bytes (a DER certificate's are its fingerprint).
pub fn fingerprint_der(der: &[u8]) -> String {
    Sha256::digest(der).iter().fold(String::from("sha256:"), |mut s, b| {
        use std::fmt::Write;
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// An X.509 time as a timestamp; beyond jiff's range (year 9999's last day) it is clamped.
fn asn1_timestamp(t: ASN1Time) -> Timestamp {
    Timestamp::from_second(t.timestamp()).unwrap_or(if t.timestamp() < 0 { Timestamp::MIN } else { Timestamp::MAX })
}

fn cert_pem(der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new("CERTIFICATE", der), config)
}

/// DER content bytes of the object identifiers meshfed looks for.
const OID_RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];

/// A certificate's public key, as far as meshfed cares.
#[derive(Debug, Clone, PartialEq, Eq)]
enum KeyKind {
    Rsa { bits: usize },
    EcP256,
    EcP384,
    Other(String),
}

impl KeyKind {
    /// Whether ring (through rcgen) can sign with the matching private key.
    fn signable(&self) -> bool {
        match self {
            Self::Rsa { bits } => (2048..=8192).contains(bits),
            Self::EcP256 | Self::EcP384 => true,
            Self::Other(_) => false,
        }
    }

    /// The spec's name for this kind of key, if it has one.
    fn algorithm(&self) -> Option<KeyAlgorithm> {
        match self {
            Self::Rsa { bits: 2048 } => Some(KeyAlgorithm::RSA2048),
            Self::Rsa { bits: 4096 } => Some(KeyAlgorithm::RSA4096),
            Self::EcP256 => Some(KeyAlgorithm::ECDSAP256),
            _ => None,
        }
    }
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rsa { bits } => write!(f, "an RSA {bits}-bit key"),
            Self::EcP256 => write!(f, "an ECDSA P-256 key"),
            Self::EcP384 => write!(f, "an ECDSA P-384 key"),
            Self::Other(what) => f.write_str(what),
        }
    }
}

fn key_kind(spki: &SubjectPublicKeyInfo<'_>) -> KeyKind {
    let algorithm = spki.algorithm.algorithm.as_bytes();
    if algorithm == OID_RSA_ENCRYPTION {
        return match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => {
                let modulus: &[u8] = rsa.modulus;
                let start = modulus.iter().position(|b| *b != 0).unwrap_or(modulus.len());
                let significant = &modulus[start..];
                let bits = significant.first().map_or(0, |b| significant.len() * 8 - b.leading_zeros() as usize);
                KeyKind::Rsa { bits }
            }
            _ => KeyKind::Other("an unreadable RSA key".into()),
        };
    }
    if algorithm == OID_EC_PUBLIC_KEY {
        let curve = spki.algorithm.parameters.as_ref().map(|p| p.data);
        return match curve {
            Some(c) if c == OID_P256 => KeyKind::EcP256,
            Some(c) if c == OID_P384 => KeyKind::EcP384,
            _ => KeyKind::Other("an elliptic-curve key on a curve other than P-256 and P-384".into()),
        };
    }
    KeyKind::Other(format!("a key of algorithm {}, neither RSA nor ECDSA", spki.algorithm.algorithm))
}

/// Why a private key cannot be used with a certificate. The detail never quotes the key.
enum KeyProblem {
    /// A phrase to follow the key's name: "is not valid PEM", ...
    Malformed(String),
    Mismatch,
}

/// Reads the one private key of `key_pem` and checks that it belongs to `cert`. Accepts PKCS#8, PKCS#1 (RSA) and
/// SEC1 (EC) PEM blocks, unencrypted; other blocks (such as openssl's `EC PARAMETERS`) are ignored.
fn parse_key(key_pem: &[u8], cert: &X509Certificate<'_>) -> Result<KeyPair, KeyProblem> {
    let malformed = |s: &str| KeyProblem::Malformed(s.into());
    // The PEM parser's errors can quote bytes of the input: none of them reaches a message.
    let blocks = pem::parse_many(key_pem).map_err(|_| malformed("is not valid PEM"))?;
    let mut keys = blocks.iter().filter(|b| b.tag().ends_with("PRIVATE KEY"));
    let (Some(block), None) = (keys.next(), keys.next()) else {
        return Err(malformed("must hold exactly one private key PEM block"));
    };
    if block.tag().starts_with("ENCRYPTED") || block.headers().get("Proc-Type").is_some_and(|v| v.contains("ENCRYPTED"))
    {
        return Err(malformed("is encrypted; meshfed needs an unencrypted key"));
    }
    let contents = block.contents();
    let candidates: Vec<Vec<u8>> = match block.tag() {
        "PRIVATE KEY" => vec![contents.to_vec()],
        "RSA PRIVATE KEY" => {
            vec![pkcs8(&der(0x30, &[der(0x06, OID_RSA_ENCRYPTION), vec![0x05, 0x00]].concat()), contents)]
        }
        "EC PRIVATE KEY" => {
            // SEC1 names its curve only optionally: try the certificate's curve first, then the ones ring knows.
            let cert_curve = cert.public_key().algorithm.parameters.as_ref().map(|p| p.data);
            cert_curve
                .into_iter()
                .chain([OID_P256, OID_P384])
                .map(|curve| pkcs8(&der(0x30, &[der(0x06, OID_EC_PUBLIC_KEY), der(0x06, curve)].concat()), contents))
                .collect()
        }
        _ => return Err(malformed("holds a private key block of a kind meshfed cannot read")),
    };
    let key = candidates.iter().find_map(|c| KeyPair::try_from(c.as_slice()).ok()).ok_or_else(|| {
        malformed("is not an RSA (2048 to 8192 bits) or ECDSA P-256 or P-384 key that meshfed can read")
    })?;
    if key.public_key_raw() != cert.public_key().subject_public_key.data.as_ref() {
        return Err(KeyProblem::Mismatch);
    }
    Ok(key)
}

/// A PKCS#8 `PrivateKeyInfo` (version 0) around a PKCS#1 or SEC1 private key.
fn pkcs8(algorithm_identifier: &[u8], private_key: &[u8]) -> Vec<u8> {
    der(0x30, &[&[0x02, 0x01, 0x00][..], algorithm_identifier, &der(0x04, private_key)].concat())
}

/// One DER tag-length-value.
fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    match u8::try_from(content.len()) {
        Ok(len) if len < 0x80 => out.push(len),
        _ => {
            let len = content.len().to_be_bytes();
            let skip = len.iter().take_while(|b| **b == 0).count();
            out.push(0x80 | (len.len() - skip) as u8);
            out.extend_from_slice(&len[skip..]);
        }
    }
    out.extend_from_slice(content);
    out
}

#[cfg(test)]
mod tests {
    use std::{path::Path, process::Command};

    use rcgen::{ExtendedKeyUsagePurpose, PKCS_ED25519};

    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);
    const EAST: IntermediateProfile<'static> =
        IntermediateProfile { cluster: "east", istio_namespace: "istio-system", algorithm: KeyAlgorithm::ECDSAP256 };

    fn now() -> Timestamp {
        "2026-03-01T12:00:00Z".parse().unwrap()
    }

    fn at(offset: Duration) -> Timestamp {
        now().checked_add(SignedDuration::try_from(offset).unwrap()).unwrap()
    }

    fn root(algorithm: KeyAlgorithm) -> Root {
        let m = generate_root(algorithm, 87600 * HOUR, now()).unwrap();
        load_root(&m.cert_pem, &m.key_pem, now()).unwrap()
    }

    fn der_of(pem: &str) -> Vec<u8> {
        pem_certs(pem.as_bytes()).unwrap().swap_remove(0)
    }

    /// The key usages of a parsed certificate, in openssl's words.
    fn key_usages(cert: &X509Certificate<'_>) -> (bool, Vec<&'static str>) {
        let ku = cert.key_usage().unwrap().expect("keyUsage present");
        let v = ku.value;
        let all = [
            (v.digital_signature(), "digitalSignature"),
            (v.non_repudiation(), "nonRepudiation"),
            (v.key_encipherment(), "keyEncipherment"),
            (v.data_encipherment(), "dataEncipherment"),
            (v.key_agreement(), "keyAgreement"),
            (v.key_cert_sign(), "keyCertSign"),
            (v.crl_sign(), "cRLSign"),
        ];
        (ku.critical, all.into_iter().filter(|(set, _)| *set).map(|(_, name)| name).collect())
    }

    fn subject(cert: &X509Certificate<'_>) -> String {
        cert.subject().to_string()
    }

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, ByteString> {
        pairs.iter().map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec()))).collect()
    }

    fn reason(v: CacertsVerdict) -> &'static str {
        match v {
            CacertsVerdict::Keep(_) => "Keep",
            CacertsVerdict::Reissue(r) => r.reason().as_str(),
        }
    }

    /// Signs `params` (with a fresh P-256 key) by the CA in `ca_cert_pem`/`ca_key_pem`, as istiod would.
    fn sign(params: &CertificateParams, ca_cert_pem: &str, ca_key_pem: &str) -> String {
        let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, KeyPair::from_pem(ca_key_pem).unwrap()).unwrap();
        params.signed_by(&KeyPair::generate().unwrap(), &issuer).unwrap().pem()
    }

    /// A workload certificate as istiod issues it: not a CA, empty subject, SPIFFE URI SAN.
    fn workload_params() -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI("spiffe://cluster.local/ns/default/sa/default".try_into().unwrap())];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        p.use_authority_key_identifier_extension = true;
        p.serial_number = Some(random_serial().unwrap());
        p.not_before = OffsetDateTime::from_unix_timestamp(now().as_second() - 60).unwrap();
        p.not_after = OffsetDateTime::from_unix_timestamp(now().as_second() + 24 * 3600).unwrap();
        p
    }

    /// Whether the openssl binary is here; tests that shell out to it say so and pass when it is not.
    fn have_openssl() -> bool {
        let found = Command::new("openssl").arg("version").output().is_ok_and(|o| o.status.success());
        if !found {
            eprintln!("openssl not found: skipping the openssl part of this test");
        }
        found
    }

    fn openssl(dir: &Path, args: &[&str]) {
        let out = Command::new("openssl").current_dir(dir).args(args).output().unwrap();
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// `openssl verify -x509_strict -CAfile root -untrusted chain cert` at `when`.
    fn openssl_verify(root_pem: &str, untrusted_pem: &str, cert_pem: &str, when: Timestamp) -> Result<(), String> {
        let dir = tempfile::tempdir().unwrap();
        for (name, pem) in [("root.pem", root_pem), ("chain.pem", untrusted_pem), ("cert.pem", cert_pem)] {
            std::fs::write(dir.path().join(name), pem).unwrap();
        }
        let attime = when.as_second().to_string();
        let out = Command::new("openssl")
            .current_dir(dir.path())
            .args(["verify", "-x509_strict", "-attime", &attime, "-CAfile", "root.pem", "-untrusted", "chain.pem"])
            .arg("cert.pem")
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if out.status.success() { Ok(()) } else { Err(text) }
    }

    // ---- the root ----

    #[test]
    fn a_generated_root_has_istios_root_profile_and_the_requested_validity() {
        let validity = 87600 * HOUR;
        let m = generate_root(KeyAlgorithm::ECDSAP256, validity, now()).unwrap();
        let der = der_of(&m.cert_pem);
        let cert = parse_cert(&der).unwrap();

        assert_eq!(subject(&cert), "O=Istio, CN=Root CA");
        assert_eq!(cert.issuer().to_string(), "O=Istio, CN=Root CA");
        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(bc.critical && bc.value.ca, "critical CA:TRUE");
        assert_eq!(bc.value.path_len_constraint, None, "a root is unconstrained");
        assert_eq!(
            key_usages(&cert),
            (true, vec!["digitalSignature", "nonRepudiation", "keyEncipherment", "keyCertSign", "cRLSign"])
        );
        assert_eq!(key_kind(cert.public_key()), KeyKind::EcP256);
        cert.verify_signature(None).expect("self-signed");

        assert_eq!(asn1_timestamp(cert.validity().not_after), at(validity));
        assert_eq!(
            asn1_timestamp(cert.validity().not_before),
            now().checked_sub(SignedDuration::from_mins(5)).unwrap()
        );
        assert!(m.key_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "PKCS#8, which istiod reads");
    }

    #[test]
    fn two_generated_roots_differ_in_serial_and_key() {
        let a = generate_root(KeyAlgorithm::ECDSAP256, HOUR, now()).unwrap();
        let b = generate_root(KeyAlgorithm::ECDSAP256, HOUR, now()).unwrap();
        let (da, db) = (der_of(&a.cert_pem), der_of(&b.cert_pem));
        let (ca, cb) = (parse_cert(&da).unwrap(), parse_cert(&db).unwrap());
        assert_ne!(ca.raw_serial(), cb.raw_serial());
        assert!(ca.raw_serial().len() >= 8, "at least 64 bits of serial");
        assert_ne!(ca.public_key().raw, cb.public_key().raw);
        assert_ne!(a.key_pem, b.key_pem);
    }

    #[test]
    fn the_validity_is_taken_to_the_second_and_must_fit_a_certificate() {
        let now = now().checked_add(SignedDuration::from_millis(900)).unwrap();
        let m = generate_root(KeyAlgorithm::ECDSAP256, 10 * HOUR, now).unwrap();
        assert_eq!(summarize(&m.cert_pem).unwrap().not_after, at(10 * HOUR));
        for bad in [Duration::ZERO, Duration::from_millis(999), Duration::from_secs(10_000 * 365 * 24 * 3600)] {
            let e = generate_root(KeyAlgorithm::ECDSAP256, bad, now).unwrap_err();
            assert_eq!(e.reason(), "InvalidValidity", "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_loaded_root_reports_its_fingerprint_and_expiry() {
        let m = generate_root(KeyAlgorithm::ECDSAP256, 87600 * HOUR, now()).unwrap();
        let root = load_root(&m.cert_pem, &m.key_pem, now()).unwrap();
        let expected: String = Sha256::digest(der_of(&m.cert_pem)).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(root.summary().fingerprint, format!("sha256:{expected}"));
        assert_eq!(root.summary().fingerprint.len(), "sha256:".len() + 64);
        assert_eq!(root.summary().not_after_rfc3339(), "2036-02-27T12:00:00Z");
        assert_eq!(summarize(&m.cert_pem).unwrap(), *root.summary());
        assert_eq!(root.cert_pem(), m.cert_pem, "root-cert.pem is the root, re-encoded canonically");

        let secret = m.secret_data();
        assert_eq!(secret.keys().collect::<Vec<_>>(), ["tls.crt", "tls.key"]);
        assert_eq!(load_root_secret(&secret, now()).unwrap().summary(), root.summary());
    }

    #[test]
    fn a_root_secret_may_use_istios_key_names_and_must_hold_a_pair() {
        let m = generate_root(KeyAlgorithm::ECDSAP256, HOUR, now()).unwrap();
        let istio = data(&[(CA_CERT, &m.cert_pem), (CA_KEY, &m.key_pem)]);
        assert!(load_root_secret(&istio, now()).is_ok());
        for half in [data(&[(TLS_CERT, &m.cert_pem), (CA_KEY, &m.key_pem)]), BTreeMap::new()] {
            assert_eq!(load_root_secret(&half, now()).unwrap_err(), PkiError::RootSecretIncomplete);
        }
    }

    #[test]
    fn each_unusable_root_gets_its_own_reason() {
        let good = generate_root(KeyAlgorithm::ECDSAP256, 10 * HOUR, now()).unwrap();
        let other = generate_root(KeyAlgorithm::ECDSAP256, 10 * HOUR, now()).unwrap();
        let self_signed = |params: CertificateParams, key: &KeyPair| params.self_signed(key).unwrap().pem();
        let window = validity_window(HOUR, now()).unwrap();
        let istio_root = |bc| ca_params(&[(DnType::CommonName, "x")], bc, window.0, window.1).unwrap();

        let p256 = KeyPair::generate().unwrap();
        let mut leaf = istio_root(BasicConstraints::Unconstrained);
        leaf.is_ca = IsCa::ExplicitNoCa;
        let leaf = self_signed(leaf, &p256);
        let mut no_bc = istio_root(BasicConstraints::Unconstrained);
        no_bc.is_ca = IsCa::NoCa;
        let no_bc = self_signed(no_bc, &p256);
        let mut no_cert_sign = istio_root(BasicConstraints::Unconstrained);
        no_cert_sign.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign];
        let no_cert_sign = self_signed(no_cert_sign, &p256);
        let pathlen0 = self_signed(istio_root(BasicConstraints::Constrained(0)), &p256);
        let ed = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        let ed25519 = self_signed(istio_root(BasicConstraints::Unconstrained), &ed);
        let p256_pem = p256.serialize_pem();
        let encrypted = "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n";
        let two_certs = format!("{}{}", good.cert_pem, other.cert_pem);
        let two_keys = format!("{}{}", good.key_pem, other.key_pem);

        let cases: Vec<(&str, &str, &str, Timestamp, &str)> = vec![
            ("garbage certificate", "not a certificate", &good.key_pem, now(), "RootMalformed"),
            ("a key where the certificate goes", &good.key_pem, &good.key_pem, now(), "RootMalformed"),
            ("two certificates", &two_certs, &good.key_pem, now(), "RootMalformed"),
            (
                "garbage key",
                &good.cert_pem,
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                now(),
                "RootMalformed",
            ),
            ("no key at all", &good.cert_pem, &good.cert_pem, now(), "RootMalformed"),
            ("two keys", &good.cert_pem, &two_keys, now(), "RootMalformed"),
            ("an encrypted key", &good.cert_pem, encrypted, now(), "RootMalformed"),
            ("a leaf (CA:FALSE)", &leaf, &p256_pem, now(), "RootNotCA"),
            ("no basicConstraints", &no_bc, &p256_pem, now(), "RootNotCA"),
            ("keyUsage without keyCertSign", &no_cert_sign, &p256_pem, now(), "RootNotCA"),
            ("pathlen 0", &pathlen0, &p256_pem, now(), "RootPathLenTooShort"),
            ("an Ed25519 root", &ed25519, &p256_pem, now(), "RootUnsupportedKey"),
            ("another root's key", &good.cert_pem, &other.key_pem, now(), "RootKeyMismatch"),
            ("after notAfter", &good.cert_pem, &good.key_pem, at(10 * HOUR + Duration::from_secs(1)), "RootExpired"),
            (
                "before notBefore",
                &good.cert_pem,
                &good.key_pem,
                at(Duration::ZERO) - SignedDuration::from_mins(6),
                "RootNotYetValid",
            ),
        ];
        for (what, cert, key, when, want) in cases {
            let e = load_root(cert, key, when).unwrap_err();
            assert_eq!(e.reason(), want, "{what}: {e}");
            for text in [e.to_string(), format!("{e:?}")] {
                assert!(!text.contains("PRIVATE KEY") && !text.contains("AAAA"), "{what}: {text}");
            }
        }
        assert!(load_root(&good.cert_pem, &good.key_pem, at(10 * HOUR)).is_ok(), "valid through notAfter");
    }

    #[test]
    fn nothing_secret_shows_in_debug_output() {
        let m = generate_root(KeyAlgorithm::ECDSAP256, HOUR, now()).unwrap();
        let root = load_root(&m.cert_pem, &m.key_pem, now()).unwrap();
        let bundle = issue_intermediate(&root, &EAST, HOUR, now()).unwrap();
        let key_bodies = [&m.key_pem, &bundle.ca_key_pem].map(|k| k.lines().nth(1).unwrap().to_string());
        for text in [format!("{m:?}"), format!("{root:?}"), format!("{bundle:?}")] {
            assert!(!text.contains("PRIVATE KEY"), "{text}");
            assert!(key_bodies.iter().all(|b| !text.contains(b.as_str())), "{text}");
        }
        assert!(format!("{root:?}").contains(&root.summary().fingerprint));
    }

    // ---- intermediates ----

    #[test]
    fn an_intermediate_has_istios_intermediate_profile() {
        let root = root(KeyAlgorithm::ECDSAP256);
        let profile =
            IntermediateProfile { cluster: "east", istio_namespace: "mesh", algorithm: KeyAlgorithm::ECDSAP256 };
        let b = issue_intermediate(&root, &profile, 8760 * HOUR, now()).unwrap();
        let der = der_of(&b.ca_cert_pem);
        let cert = parse_cert(&der).unwrap();

        assert_eq!(subject(&cert), "O=Istio, CN=Intermediate CA, L=east");
        assert_eq!(cert.issuer().to_string(), "O=Istio, CN=Root CA");
        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(bc.critical && bc.value.ca, "critical CA:TRUE");
        assert_eq!(bc.value.path_len_constraint, Some(0));
        assert_eq!(
            key_usages(&cert),
            (true, vec!["digitalSignature", "nonRepudiation", "keyEncipherment", "keyCertSign", "cRLSign"])
        );
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(san.value.general_names, [GeneralName::DNSName("istiod.mesh.svc")]);
        assert_eq!(asn1_timestamp(cert.validity().not_after), at(8760 * HOUR));

        let root_der = der_of(root.cert_pem());
        let root_cert = parse_cert(&root_der).unwrap();
        cert.verify_signature(Some(root_cert.public_key())).expect("signed by the root");
        let ski = |c: &X509Certificate<'_>| {
            c.iter_extensions().find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
                _ => None,
            })
        };
        let aki = cert.iter_extensions().find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        });
        assert_eq!(aki, ski(&root_cert), "the AKI names the root's key");

        assert_eq!(
            pem_certs(b.cert_chain_pem.as_bytes()).unwrap(),
            [der.clone(), root_der.clone()],
            "intermediate, then root"
        );
        assert_eq!(b.root_cert_pem, root.cert_pem());
        assert!(b.ca_key_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert_eq!(
            parse_key(b.ca_key_pem.as_bytes(), &cert).ok().map(|k| k.public_key_raw().to_vec()),
            Some(cert.public_key().subject_public_key.data.to_vec())
        );
        assert_eq!(
            b.secret_data().keys().collect::<Vec<_>>(),
            ["ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"]
        );
        assert_ne!(
            der_of(&issue_intermediate(&root, &profile, HOUR, now()).unwrap().ca_cert_pem),
            der,
            "fresh each time"
        );
    }

    #[test]
    fn openssl_accepts_the_chain_and_the_workload_certificates_it_signs() {
        if !have_openssl() {
            return;
        }
        let root = root(KeyAlgorithm::ECDSAP256);
        let b = issue_intermediate(&root, &EAST, 8760 * HOUR, now()).unwrap();
        openssl_verify(&b.root_cert_pem, &b.cert_chain_pem, &b.ca_cert_pem, now()).expect("intermediate verifies");
        let leaf = sign(&workload_params(), &b.ca_cert_pem, &b.ca_key_pem);
        openssl_verify(&b.root_cert_pem, &b.cert_chain_pem, &leaf, now()).expect("workload certificate verifies");

        // pathlen:0 is enforced: a CA under the intermediate cannot vouch for a workload.
        let mut sub = CertificateParams::default();
        sub.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        sub.key_usages = CA_KEY_USAGES.to_vec();
        sub.use_authority_key_identifier_extension = true;
        sub.not_before = workload_params().not_before;
        let sub_key = KeyPair::generate().unwrap();
        let issuer = Issuer::from_ca_cert_pem(&b.ca_cert_pem, KeyPair::from_pem(&b.ca_key_pem).unwrap()).unwrap();
        let sub_pem = sub.signed_by(&sub_key, &issuer).unwrap().pem();
        let under_sub = sign(&workload_params(), &sub_pem, &sub_key.serialize_pem());
        let e =
            openssl_verify(&b.root_cert_pem, &format!("{}{sub_pem}", b.cert_chain_pem), &under_sub, now()).unwrap_err();
        assert!(e.contains("path length"), "{e}");
    }

    #[test]
    fn a_root_constrained_to_pathlen_0_would_break_workload_certificates() {
        if !have_openssl() {
            return;
        }
        // What load_root refuses with RootPathLenTooShort, built anyway to show why.
        let (nb, na) = validity_window(HOUR, now()).unwrap();
        let params = ca_params(&[(DnType::CommonName, "Root CA")], BasicConstraints::Constrained(0), nb, na).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let bad_root = Root::assemble(cert.der().to_vec(), key).unwrap();
        let b = issue_intermediate(&bad_root, &EAST, HOUR, now()).unwrap();
        openssl_verify(&b.root_cert_pem, &b.cert_chain_pem, &b.ca_cert_pem, now())
            .expect("istiod's start-up check passes");
        let leaf = sign(&workload_params(), &b.ca_cert_pem, &b.ca_key_pem);
        let e = openssl_verify(&b.root_cert_pem, &b.cert_chain_pem, &leaf, now()).unwrap_err();
        assert!(e.contains("path length"), "{e}");
    }

    #[test]
    fn rsa_2048_roots_and_intermediates_work_and_a_pkcs1_root_key_is_read() {
        let m = generate_root(KeyAlgorithm::RSA2048, 87600 * HOUR, now()).unwrap();
        let cert_der = der_of(&m.cert_pem);
        assert_eq!(key_kind(parse_cert(&cert_der).unwrap().public_key()), KeyKind::Rsa { bits: 2048 });
        assert!(m.key_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));

        use rsa::pkcs1::EncodeRsaPrivateKey;
        use rsa::pkcs8::DecodePrivateKey;
        let pkcs1 =
            rsa::RsaPrivateKey::from_pkcs8_pem(&m.key_pem).unwrap().to_pkcs1_pem(rsa::pkcs8::LineEnding::LF).unwrap();
        assert!(pkcs1.starts_with("-----BEGIN RSA PRIVATE KEY-----"));
        let root = load_root(&m.cert_pem, pkcs1.as_bytes(), now()).unwrap();

        let profile = IntermediateProfile { algorithm: KeyAlgorithm::RSA2048, ..EAST };
        let b = issue_intermediate(&root, &profile, 8760 * HOUR, now()).unwrap();
        let ca_der = der_of(&b.ca_cert_pem);
        assert_eq!(key_kind(parse_cert(&ca_der).unwrap().public_key()), KeyKind::Rsa { bits: 2048 });
        let data = b.secret_data();
        assert_eq!(reason(inspect_cacerts(Some(&data), &root, &profile, 720 * HOUR, now())), "Keep");
        assert_eq!(
            reason(inspect_cacerts(Some(&data), &root, &EAST, 720 * HOUR, now())),
            "IntermediateParametersChanged"
        );
        if have_openssl() {
            let leaf = sign(&workload_params(), &b.ca_cert_pem, &b.ca_key_pem);
            openssl_verify(&b.root_cert_pem, &b.cert_chain_pem, &leaf, now()).expect("RSA chain verifies");
        }
    }

    #[test]
    fn an_rsa_4096_intermediate_can_be_issued() {
        let root = root(KeyAlgorithm::ECDSAP256);
        let profile = IntermediateProfile { algorithm: KeyAlgorithm::RSA4096, ..EAST };
        let b = issue_intermediate(&root, &profile, HOUR, now()).unwrap();
        assert_eq!(key_kind(parse_cert(&der_of(&b.ca_cert_pem)).unwrap().public_key()), KeyKind::Rsa { bits: 4096 });
        assert_eq!(reason(inspect_cacerts(Some(&b.secret_data()), &root, &profile, Duration::ZERO, now())), "Keep");
    }

    #[test]
    fn a_root_made_with_openssl_and_a_traditional_key_serves_as_the_mesh_root() {
        if !have_openssl() {
            return;
        }
        for (keygen, convert) in [
            (
                vec!["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "k0.pem"],
                vec!["rsa", "-in", "k0.pem", "-traditional", "-out", "key.pem"],
            ),
            (vec!["ecparam", "-name", "prime256v1", "-genkey", "-out", "key.pem"], vec![]),
            (vec!["ecparam", "-name", "secp384r1", "-genkey", "-noout", "-out", "key.pem"], vec![]),
        ] {
            let dir = tempfile::tempdir().unwrap();
            openssl(dir.path(), &keygen);
            if !convert.is_empty() {
                openssl(dir.path(), &convert);
            }
            openssl(
                dir.path(),
                &[
                    "req",
                    "-x509",
                    "-new",
                    "-key",
                    "key.pem",
                    "-out",
                    "cert.pem",
                    "-days",
                    "30",
                    "-subj",
                    "/O=Corp/CN=Corp Mesh Root",
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                ],
            );
            let cert_pem = std::fs::read_to_string(dir.path().join("cert.pem")).unwrap();
            let key_pem = std::fs::read_to_string(dir.path().join("key.pem")).unwrap();
            assert!(
                key_pem.contains("-----BEGIN RSA PRIVATE KEY-----")
                    || key_pem.contains("-----BEGIN EC PRIVATE KEY-----"),
                "{keygen:?}"
            );

            let now = Timestamp::now(); // openssl dated the certificate by the real clock, just before
            let root = load_root(&cert_pem, &key_pem, now).unwrap_or_else(|e| panic!("{keygen:?}: {e}"));
            let b = issue_intermediate(&root, &EAST, HOUR, now).unwrap();
            assert_eq!(reason(inspect_cacerts(Some(&b.secret_data()), &root, &EAST, Duration::ZERO, now)), "Keep");
            openssl_verify(&b.root_cert_pem, &b.cert_chain_pem, &b.ca_cert_pem, now).expect("intermediate verifies");
            let mut leaf = workload_params();
            leaf.not_before = OffsetDateTime::from_unix_timestamp(now.as_second() - 60).unwrap();
            leaf.not_after = OffsetDateTime::from_unix_timestamp(now.as_second() + 3600).unwrap();
            let leaf = sign(&leaf, &b.ca_cert_pem, &b.ca_key_pem);
            openssl_verify(&b.root_cert_pem, &b.cert_chain_pem, &leaf, now).expect("workload certificate verifies");

            let other = generate_root(KeyAlgorithm::ECDSAP256, HOUR, now).unwrap();
            assert_eq!(load_root(&cert_pem, &other.key_pem, now).unwrap_err(), PkiError::RootKeyMismatch);
        }
    }

    // ---- when to reissue ----

    #[test]
    fn a_fresh_cacerts_is_kept_and_summarized() {
        let root = root(KeyAlgorithm::ECDSAP256);
        let b = issue_intermediate(&root, &EAST, 8760 * HOUR, now()).unwrap();
        let verdict = inspect_cacerts(Some(&b.secret_data()), &root, &EAST, 720 * HOUR, now());
        assert_eq!(verdict, CacertsVerdict::Keep(summarize(&b.ca_cert_pem).unwrap()));
        let CacertsVerdict::Keep(summary) = verdict else { unreachable!() };
        assert_eq!(summary.not_after_rfc3339(), "2027-03-01T12:00:00Z");
    }

    #[test]
    fn a_missing_or_incomplete_cacerts_is_issued() {
        let root = root(KeyAlgorithm::ECDSAP256);
        assert_eq!(inspect_cacerts(None, &root, &EAST, HOUR, now()), CacertsVerdict::Reissue(ReissueReason::Missing));
        let mut data = issue_intermediate(&root, &EAST, 8760 * HOUR, now()).unwrap().secret_data();
        data.remove(CA_KEY);
        data.remove(CERT_CHAIN);
        let CacertsVerdict::Reissue(r) = inspect_cacerts(Some(&data), &root, &EAST, HOUR, now()) else { panic!() };
        assert_eq!(r, ReissueReason::Incomplete { missing: vec![CA_KEY, CERT_CHAIN] });
        assert_eq!(r.to_string(), "Secret cacerts has no ca-key.pem, cert-chain.pem");
    }

    #[test]
    fn garbage_in_any_key_is_malformed_and_never_echoed() {
        let root = root(KeyAlgorithm::ECDSAP256);
        let good = issue_intermediate(&root, &EAST, 8760 * HOUR, now()).unwrap().secret_data();
        for key in CACERTS_KEYS {
            for garbage in [
                b"hello".to_vec(),
                vec![0xff, 0xfe, 0x00],
                b"-----BEGIN PRIVATE KEY-----\nQUJD!!\n-----END PRIVATE KEY-----\n".to_vec(),
            ] {
                let mut data = good.clone();
                data.insert(key.into(), ByteString(garbage));
                let CacertsVerdict::Reissue(r) = inspect_cacerts(Some(&data), &root, &EAST, HOUR, now()) else {
                    panic!("{key}")
                };
                assert_eq!(r.reason(), "CacertsMalformed", "{key}: {r}");
                assert!(matches!(r, ReissueReason::Malformed { key: k, .. } if k == key), "{r:?}");
                assert!(!r.to_string().contains("QUJD") && !r.to_string().contains("PRIVATE KEY"), "{r}");
            }
        }
    }

    #[test]
    fn a_key_of_another_intermediate_does_not_pass() {
        let root = root(KeyAlgorithm::ECDSAP256);
        let mut data = issue_intermediate(&root, &EAST, 8760 * HOUR, now()).unwrap().secret_data();
        let other = issue_intermediate(&root, &EAST, 8760 * HOUR, now()).unwrap();
        data.insert(CA_KEY.into(), ByteString(other.ca_key_pem.into_bytes()));
        assert_eq!(reason(inspect_cacerts(Some(&data), &root, &EAST, HOUR, now())), "IntermediateKeyMismatch");
    }

    #[test]
    fn an_intermediate_of_another_root_is_reissued() {
        let (old, new) = (root(KeyAlgorithm::ECDSAP256), root(KeyAlgorithm::ECDSAP256));
        let data = issue_intermediate(&old, &EAST, 8760 * HOUR, now()).unwrap().secret_data();
        let verdict = inspect_cacerts(Some(&data), &new, &EAST, HOUR, now());
        assert_eq!(verdict, CacertsVerdict::Reissue(ReissueReason::NotChainedToRoot));

        // Even when root-cert.pem and cert-chain.pem were edited to name the new root.
        let mut data = data;
        data.insert(ROOT_CERT.into(), ByteString(new.cert_pem().as_bytes().to_vec()));
        assert_eq!(reason(inspect_cacerts(Some(&data), &new, &EAST, HOUR, now())), "NotChainedToRoot");
    }

    #[test]
    fn istiod_takes_a_complete_unexpired_bundle_whose_roots_include_its_signer_whichever_root_that_is() {
        let (a, b) = (root(KeyAlgorithm::ECDSAP256), root(KeyAlgorithm::ECDSAP256));
        let bundle = issue_intermediate(&a, &EAST, 10 * HOUR, now()).unwrap();
        let summary = summarize(&bundle.ca_cert_pem).unwrap();
        let with_roots = |roots: String| {
            let mut data = bundle.secret_data();
            data.insert(ROOT_CERT.into(), ByteString(roots.into_bytes()));
            data
        };
        for roots in [
            a.cert_pem().to_string(),
            format!("{}{}", a.cert_pem(), b.cert_pem()),
            format!("{}{}", b.cert_pem(), a.cert_pem()),
        ] {
            assert_eq!(usable_cacerts(Some(&with_roots(roots)), now()), Ok(summary.clone()));
        }
        let unusable = |data: &BTreeMap<String, ByteString>, at| usable_cacerts(Some(data), at).unwrap_err().reason();
        assert_eq!(unusable(&with_roots(b.cert_pem().into()), now()), "CacertsChainMismatch");
        let expired = now() + SignedDuration::from_hours(11);
        assert_eq!(unusable(&bundle.secret_data(), expired), "IntermediateExpired");
        for key in [CA_KEY, CERT_CHAIN] {
            let mut data = bundle.secret_data();
            data.remove(key);
            assert_eq!(unusable(&data, now()), "CacertsIncomplete", "{key}");
        }
        let mut data = bundle.secret_data();
        let other = issue_intermediate(&a, &EAST, 10 * HOUR, now()).unwrap();
        data.insert(CA_KEY.into(), ByteString(other.ca_key_pem.into_bytes()));
        assert_eq!(unusable(&data, now()), "IntermediateKeyMismatch");
        assert_eq!(usable_cacerts(None, now()), Err(ReissueReason::Missing));
    }

    #[test]
    fn a_bundle_that_does_not_carry_the_root_or_is_out_of_order_is_repaired() {
        let (root, stranger) = (root(KeyAlgorithm::ECDSAP256), root(KeyAlgorithm::ECDSAP256));
        let b = issue_intermediate(&root, &EAST, 8760 * HOUR, now()).unwrap();

        let mut wrong_root = b.secret_data();
        wrong_root.insert(ROOT_CERT.into(), ByteString(stranger.cert_pem().as_bytes().to_vec()));
        let CacertsVerdict::Reissue(r) = inspect_cacerts(Some(&wrong_root), &root, &EAST, HOUR, now()) else {
            panic!()
        };
        assert_eq!(
            (r.reason(), r.to_string().starts_with("root-cert.pem")),
            (Reason::CacertsChainMismatch, true),
            "{r}"
        );

        let mut bundle_of_roots = b.secret_data();
        bundle_of_roots
            .insert(ROOT_CERT.into(), ByteString(format!("{}{}", stranger.cert_pem(), root.cert_pem()).into_bytes()));
        assert_eq!(
            reason(inspect_cacerts(Some(&bundle_of_roots), &root, &EAST, HOUR, now())),
            "Keep",
            "a bundle of roots may hold ours"
        );

        for chain in [format!("{}{}", b.root_cert_pem, b.ca_cert_pem), b.ca_cert_pem.clone()] {
            let mut data = b.secret_data();
            data.insert(CERT_CHAIN.into(), ByteString(chain.into_bytes()));
            let CacertsVerdict::Reissue(r) = inspect_cacerts(Some(&data), &root, &EAST, HOUR, now()) else { panic!() };
            assert_eq!(
                (r.reason(), r.to_string().starts_with("cert-chain.pem")),
                (Reason::CacertsChainMismatch, true),
                "{r}"
            );
        }
    }

    #[test]
    fn an_intermediate_is_renewed_from_renew_before_its_expiry() {
        let root = root(KeyAlgorithm::ECDSAP256);
        let data = issue_intermediate(&root, &EAST, 100 * HOUR, now()).unwrap().secret_data();
        let renew_before = 10 * HOUR;
        let check = |when| inspect_cacerts(Some(&data), &root, &EAST, renew_before, when);

        assert_eq!(reason(check(at(90 * HOUR - Duration::from_secs(1)))), "Keep");
        assert_eq!(
            check(at(90 * HOUR)),
            CacertsVerdict::Reissue(ReissueReason::ExpiringSoon { not_after: at(100 * HOUR), renew_before })
        );
        assert_eq!(reason(check(at(100 * HOUR))), "IntermediateExpiring", "valid through notAfter");
        assert_eq!(
            check(at(100 * HOUR + Duration::from_secs(1))),
            CacertsVerdict::Reissue(ReissueReason::Expired { not_after: at(100 * HOUR) })
        );
        assert_eq!(reason(inspect_cacerts(Some(&data), &root, &EAST, 200 * HOUR, now())), "IntermediateExpiring");
    }

    #[test]
    fn a_changed_namespace_cluster_or_algorithm_reissues() {
        let root = root(KeyAlgorithm::ECDSAP256);
        let data = issue_intermediate(&root, &EAST, 8760 * HOUR, now()).unwrap().secret_data();
        let changed = [
            IntermediateProfile { istio_namespace: "istio-prod", ..EAST },
            IntermediateProfile { cluster: "west", ..EAST },
            IntermediateProfile { algorithm: KeyAlgorithm::RSA2048, ..EAST },
        ];
        for profile in changed {
            let CacertsVerdict::Reissue(r) = inspect_cacerts(Some(&data), &root, &profile, 720 * HOUR, now()) else {
                panic!("{profile:?}")
            };
            assert_eq!(r.reason(), "IntermediateParametersChanged", "{profile:?}");
        }
        let validity_only = inspect_cacerts(Some(&data), &root, &EAST, 720 * HOUR, now());
        assert_eq!(reason(validity_only), "Keep", "a new validity waits for the next renewal");
    }

    #[test]
    fn a_cacerts_that_is_not_a_pathlen_0_ca_is_reissued() {
        let root = root(KeyAlgorithm::ECDSAP256);
        let (nb, na) = validity_window(8760 * HOUR, now()).unwrap();
        let mut params = ca_params(
            &[
                (DnType::OrganizationName, "Istio"),
                (DnType::CommonName, "Intermediate CA"),
                (DnType::LocalityName, "east"),
            ],
            BasicConstraints::Unconstrained,
            nb,
            na,
        )
        .unwrap();
        params.subject_alt_names = vec![SanType::DnsName("istiod.istio-system.svc".try_into().unwrap())];
        let key = KeyPair::generate().unwrap();
        let ca_cert_pem = params.signed_by(&key, &root.issuer).unwrap().pem();
        let bundle = CacertsBundle {
            cert_chain_pem: format!("{ca_cert_pem}{}", root.cert_pem()),
            ca_cert_pem,
            ca_key_pem: key.serialize_pem(),
            root_cert_pem: root.cert_pem().into(),
        };
        let CacertsVerdict::Reissue(r) = inspect_cacerts(Some(&bundle.secret_data()), &root, &EAST, HOUR, now()) else {
            panic!()
        };
        assert_eq!(r.reason(), "IntermediateParametersChanged");
        assert!(r.to_string().contains("pathlen:0"), "{r}");
    }
}
