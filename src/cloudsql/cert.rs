//! TLS to a Cloud SQL instance's server-side proxy (port 3307): the
//! ephemeral client key, the server-certificate check, the client config.
//!
//! keyhole generates an RSA key ([`EphemeralKey`]), the SQL Admin API signs
//! its public half (`generateEphemeralCert`, read back with
//! [`parse_cert_pem`]), and keyhole presents that certificate in a TLS 1.3
//! handshake ([`client_config`]). The server's certificate must chain to the
//! instance's `serverCaCert` and name the instance ([`InstanceVerifier`]);
//! the name rule is Cloud SQL's own, not RFC 6125's, see
//! [`InstanceVerifier`].

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore,
    SignatureScheme,
};

use super::x509::{self, CertInfo, X509Error};

/// The size of the ephemeral key, as Google's connectors use.
const RSA_BITS: usize = 2048;

/// Where a certificate came from, for messages.
const SERVER_CA: &str = "instance's server CA (serverCaCert)";
const EPHEMERAL_CERT: &str = "ephemeral certificate (ephemeralCert.cert)";

/// Errors setting up Cloud SQL TLS. None of them carries key material.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot generate the ephemeral RSA key: {0}")]
    KeyGeneration(String),
    #[error("the {what} holds no PEM certificate")]
    NoCertificate { what: &'static str },
    #[error("the {what} is not valid PEM: {message}")]
    Pem { what: &'static str, message: String },
    #[error("the {what} cannot be read: {source}")]
    Malformed {
        what: &'static str,
        #[source]
        source: X509Error,
    },
    #[error("the {what} cannot be a trust anchor: {message}")]
    TrustAnchor { what: &'static str, message: String },
    #[error("TLS configuration for Cloud SQL: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The client's RSA-2048 key for one ephemeral certificate.
///
/// The `rsa` crate only generates it; every signature is made by rustls with
/// ring, from the PKCS#8 form [`EphemeralKey::private_key`] hands out.
pub struct EphemeralKey {
    /// PKCS#8 PrivateKeyInfo DER; wiped when dropped.
    pkcs8: zeroize::Zeroizing<Vec<u8>>,
    /// SubjectPublicKeyInfo (PKIX) DER.
    spki: Vec<u8>,
}

impl EphemeralKey {
    /// Generates a fresh key. This is CPU work (0.1–1 s): call it from
    /// `tokio::task::spawn_blocking`, never on a runtime thread.
    pub fn generate() -> Result<EphemeralKey, CertError> {
        // The `rsa` crate is the `gcp` feature's (super::google).
        let (pkcs8, spki) = super::google::rsa_key(RSA_BITS).map_err(CertError::KeyGeneration)?;
        Ok(EphemeralKey { pkcs8, spki })
    }

    /// The private key for rustls (a copy; rustls takes ownership).
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.pkcs8.to_vec()))
    }

    /// The public key as `generateEphemeralCert` takes it: the PKIX
    /// SubjectPublicKeyInfo DER under the PEM label `RSA PUBLIC KEY`.
    ///
    /// The label is strictly PKCS#1's, but this is exactly what Google's Go
    /// connector sends (`x509.MarshalPKIXPublicKey` in a block typed
    /// `RSA PUBLIC KEY`) and what the API is known to accept, so keyhole
    /// does the same rather than guess at the API's tolerance.
    pub fn public_key_pem(&self) -> String {
        pem("RSA PUBLIC KEY", &self.spki)
    }
}

impl fmt::Debug for EphemeralKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EphemeralKey(RSA-2048, not shown)")
    }
}

/// RFC 7468 PEM: base64 in 64-column lines.
fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    // Base64 is ASCII, so cutting it every 64 bytes cuts between characters.
    for line in b64.as_bytes().chunks(64) {
        out.extend(line.iter().map(|&b| char::from(b)));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Parses `ephemeralCert.cert`: the certificate chain (leaf first) and the
/// leaf's notAfter, which drives the refresh.
pub fn parse_cert_pem(pem: &str) -> Result<(Vec<CertificateDer<'static>>, SystemTime), CertError> {
    let certs = pem_certs(pem, EPHEMERAL_CERT)?;
    let leaf = x509::parse(&certs[0]).map_err(|source| CertError::Malformed {
        what: EPHEMERAL_CERT,
        source,
    })?;
    Ok((certs, leaf.not_after))
}

/// Every certificate in a PEM text; at least one.
fn pem_certs(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Pem {
            what,
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CertError::NoCertificate { what });
    }
    Ok(certs)
}

/// The names an instance's server certificate may carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceIdentity {
    /// As in the connection name, domain scope included (`example.com:proj`).
    pub project: String,
    pub instance: String,
    /// The instance's DNS names (`dnsName`/`dnsNames` from connectSettings,
    /// and one the user dialled, if any); trailing dots are fine.
    pub dns_names: Vec<String>,
}

impl InstanceIdentity {
    /// The subject CN of an instance's server certificate: `project:instance`.
    pub fn common_name(&self) -> String {
        format!("{}:{}", self.project, self.instance)
    }

    /// Cloud SQL's name rule: a SAN dNSName equal to one of the instance's
    /// DNS names, or else the CN `project:instance`.
    fn accepts(&self, cert: &CertInfo) -> bool {
        let san_matches = cert
            .dns_names
            .iter()
            .any(|san| self.dns_names.iter().any(|name| same_dns_name(san, name)));
        san_matches || cert.common_name.as_deref() == Some(self.common_name().as_str())
    }
}

/// DNS names compare case-insensitively, a trailing dot on either side
/// ignored (Cloud SQL's SANs may end with one; webpki's own name check
/// refuses such a SAN, which is why keyhole compares names itself). No
/// wildcards: an instance's SAN is its own name.
fn same_dns_name(a: &str, b: &str) -> bool {
    let (a, b) = (
        a.strip_suffix('.').unwrap_or(a),
        b.strip_suffix('.').unwrap_or(b),
    );
    !a.is_empty() && a.eq_ignore_ascii_case(b)
}

/// Why an instance's server certificate was refused, in the words
/// [`describe`] hands back to the user.
#[derive(Clone, thiserror::Error)]
pub enum ServerCertError {
    /// The chain does not lead to `serverCaCert`, or is not valid now.
    #[error("{}", chain_message(.0))]
    Chain(CertificateError),
    /// The chain is good but the certificate is another instance's.
    #[error("{0}")]
    Name(NameMismatch),
    /// webpki accepted the certificate but keyhole's reader did not.
    #[error("server certificate cannot be read: {0}")]
    Malformed(X509Error),
    /// The server offered a TLS 1.2 signature; keyhole speaks only TLS 1.3 here.
    #[error("the server signed a TLS 1.2 handshake; keyhole speaks only TLS 1.3 to Cloud SQL")]
    Tls12,
}

/// Debug shows the message: rustls renders `CertificateError::Other` with
/// `{:?}`, so this is what a plain `rustls::Error` display says too.
impl fmt::Debug for ServerCertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The names expected and the names presented.
#[derive(Debug, Clone)]
pub struct NameMismatch {
    pub expected_dns_names: Vec<String>,
    pub expected_cn: String,
    pub cn: Option<String>,
    pub sans: Vec<String>,
}

impl fmt::Display for NameMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.expected_dns_names.is_empty() {
            write!(
                f,
                "server certificate does not name project:instance {:?}",
                self.expected_cn
            )?;
        } else {
            write!(
                f,
                "server certificate names neither the instance's DNS name ({}) nor project:instance {:?}",
                self.expected_dns_names.join(", "),
                self.expected_cn
            )?;
        }
        // What the certificate says comes from the network: quoted and escaped.
        match &self.cn {
            Some(cn) => write!(f, " (CN is {cn:?}, SANs: ")?,
            None => f.write_str(" (no CN, SANs: ")?,
        }
        if self.sans.is_empty() {
            f.write_str("none)")
        } else {
            write!(f, "{})", self.sans.join(", ").escape_debug())
        }
    }
}

fn chain_message(err: &CertificateError) -> String {
    let clock = |t: &UnixTime| x509::format_utc(system_time(*t));
    let not_chained =
        "server certificate does not chain to the instance's server CA (serverCaCert)";
    match err {
        CertificateError::UnknownIssuer => format!("{not_chained}: unknown issuer"),
        CertificateError::BadSignature => {
            format!("{not_chained}: a signature in the chain does not verify")
        }
        CertificateError::ExpiredContext { time, not_after } => format!(
            "server certificate (or a CA certificate above it) expired at {}; the clock here says {}",
            clock(not_after),
            clock(time)
        ),
        CertificateError::Expired => {
            "server certificate (or a CA certificate above it) has expired".to_owned()
        }
        CertificateError::NotValidYetContext { time, not_before } => format!(
            "server certificate (or a CA certificate above it) is not valid before {}; the clock here says {} (check the clock)",
            clock(not_before),
            clock(time)
        ),
        CertificateError::NotValidYet => {
            "server certificate (or a CA certificate above it) is not valid yet (check the clock)"
                .to_owned()
        }
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            "server certificate is not for TLS servers (its extended key usage)".to_owned()
        }
        CertificateError::BadEncoding => "server certificate is malformed (bad DER)".to_owned(),
        other => format!("{not_chained}: {other}"),
    }
}

fn system_time(t: UnixTime) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(t.as_secs())
}

/// A refused server certificate as the `rustls::Error` a verifier returns:
/// [`describe`] gets the text back out.
fn refuse(err: ServerCertError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(err))))
}

/// The words for a handshake error that [`InstanceVerifier`] caused; `None`
/// for any other error (which `crate::tls::describe_handshake_error` puts
/// in words).
pub fn describe(err: &rustls::Error) -> Option<String> {
    let other = match err {
        rustls::Error::InvalidCertificate(CertificateError::Other(other))
        | rustls::Error::Other(other) => other,
        _ => return None,
    };
    other
        .0
        .downcast_ref::<ServerCertError>()
        .map(ToString::to_string)
}

/// [`describe`] for the `io::Error` a handshake returns (tokio-rustls and
/// `crate::tls::handshake` put the `rustls::Error` inside it).
pub fn describe_io(err: &io::Error) -> Option<String> {
    err.get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .and_then(describe)
}

/// Verifies a Cloud SQL instance's server certificate:
///
/// 1. the chain (end entity plus the intermediates the server sent) leads to
///    one of the certificates in `serverCaCert`, for server auth, at the
///    handshake's time: webpki does this, so the rules are rustls's own;
/// 2. the name, by Cloud SQL's rule, the same for all three
///    `serverCaMode`s: a SAN dNSName equal to one of the instance's DNS
///    names, or else the subject CN `project:instance` (see
///    [`InstanceIdentity`]).
///
/// The `ServerName` the handshake was started with is ignored: the identity
/// is fixed when the verifier is built.
#[derive(Debug)]
pub struct InstanceVerifier {
    roots: RootCertStore,
    identity: InstanceIdentity,
    algorithms: WebPkiSupportedAlgorithms,
}

impl InstanceVerifier {
    /// Builds the verifier from `serverCaCert` (PEM; every certificate in it
    /// becomes a trust anchor) and the instance's names.
    pub fn new(server_ca_pem: &str, identity: InstanceIdentity) -> Result<Self, CertError> {
        let mut roots = RootCertStore::empty();
        for cert in pem_certs(server_ca_pem, SERVER_CA)? {
            roots.add(cert).map_err(|e| CertError::TrustAnchor {
                what: SERVER_CA,
                message: e.to_string(),
            })?;
        }
        Ok(InstanceVerifier {
            roots,
            identity,
            algorithms: crate::tls::provider().signature_verification_algorithms,
        })
    }

    pub fn identity(&self) -> &InstanceIdentity {
        &self.identity
    }

    /// Both checks, with a typed error for [`refuse`].
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<CertInfo, ServerCertError> {
        let chain_error = |e: rustls::Error| match e {
            rustls::Error::InvalidCertificate(cert) => ServerCertError::Chain(cert),
            other => ServerCertError::Chain(CertificateError::Other(OtherError(Arc::new(other)))),
        };
        let parsed = ParsedCertificate::try_from(end_entity).map_err(chain_error)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )
        .map_err(chain_error)?;

        let info = x509::parse(end_entity).map_err(ServerCertError::Malformed)?;
        if self.identity.accepts(&info) {
            Ok(info)
        } else {
            Err(ServerCertError::Name(NameMismatch {
                expected_dns_names: self.identity.dns_names.clone(),
                expected_cn: self.identity.common_name(),
                cn: info.common_name,
                sans: info.dns_names,
            }))
        }
    }
}

impl ServerCertVerifier for InstanceVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let info = self.check(end_entity, intermediates, now).map_err(refuse)?;
        tracing::debug!(
            instance = %self.identity.common_name(),
            server_cert = %info,
            "Cloud SQL server certificate accepted"
        );
        Ok(ServerCertVerified::assertion())
    }

    /// Never: the config is TLS 1.3 only, and this refuses should that change.
    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::Other(OtherError(Arc::new(
            ServerCertError::Tls12,
        ))))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The client config for one instance and one ephemeral certificate.
///
/// TLS 1.3 only, no ALPN, the ephemeral certificate as the client
/// certificate, and no SNI: Cloud SQL's server-side proxy does not need it,
/// and the names keyhole could send (`project:instance`) are not DNS names.
/// Callers pass a `ServerName::IpAddress` (the address dialled), which
/// [`InstanceVerifier`] ignores anyway. Secret extraction is on, so that
/// `crate::tls::handshake::connect` can hand the session to keyhole's record
/// layer as it does for every other upstream.
pub fn client_config(
    verifier: Arc<InstanceVerifier>,
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ClientConfig, CertError> {
    let mut config = ClientConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(cert_chain, key)?;
    config.enable_sni = false;
    config.enable_secret_extraction = true;
    Ok(config)
}

// The tests need a client key, which `rsa` makes: the `gcp` feature's.
#[cfg(all(test, feature = "gcp"))]
mod tests {
    use super::*;
    use rcgen::{
        date_time_ymd, BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
        KeyPair, KeyUsagePurpose, SanType,
    };
    use rustls::pki_types::IpAddr as PkiIpAddr;
    use rustls::server::WebPkiClientVerifier;
    use rustls::ServerConfig;
    use std::sync::OnceLock;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One RSA key for all tests: generating is the slow part.
    fn ephemeral() -> &'static EphemeralKey {
        static KEY: OnceLock<EphemeralKey> = OnceLock::new();
        KEY.get_or_init(|| EphemeralKey::generate().expect("generate"))
    }

    struct Ca {
        cert: rcgen::Certificate,
        key: KeyPair,
    }

    fn ca_params(cn: &str) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p
    }

    fn root(cn: &str) -> Ca {
        let key = KeyPair::generate().expect("key");
        let cert = ca_params(cn).self_signed(&key).expect("root");
        Ca { cert, key }
    }

    fn intermediate(parent: &Ca, cn: &str) -> Ca {
        let key = KeyPair::generate().expect("key");
        let cert = ca_params(cn)
            .signed_by(&key, &parent.cert, &parent.key)
            .expect("intermediate");
        Ca { cert, key }
    }

    /// A server certificate with the given CN and SANs.
    fn server_leaf(
        issuer: &Ca,
        cn: Option<&str>,
        sans: &[&str],
    ) -> (CertificateDer<'static>, KeyPair) {
        let mut p = leaf_params(cn, sans);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &issuer.cert, &issuer.key).expect("leaf");
        (cert.der().clone(), key)
    }

    fn leaf_params(cn: Option<&str>, sans: &[&str]) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            p.distinguished_name.push(DnType::CommonName, cn);
        }
        p.subject_alt_names = sans
            .iter()
            .map(|s| SanType::DnsName((*s).try_into().expect("ia5")))
            .collect();
        p.not_before = date_time_ymd(2020, 1, 1);
        p.not_after = date_time_ymd(2090, 1, 1);
        p
    }

    fn identity(project: &str, instance: &str, dns: &[&str]) -> InstanceIdentity {
        InstanceIdentity {
            project: project.into(),
            instance: instance.into(),
            dns_names: dns.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn verifier(cas: &[&Ca], id: InstanceIdentity) -> InstanceVerifier {
        let pem: String = cas.iter().map(|ca| ca.cert.pem()).collect();
        InstanceVerifier::new(&pem, id).expect("verifier")
    }

    fn any_ip() -> ServerName<'static> {
        ServerName::IpAddress(PkiIpAddr::from(std::net::IpAddr::from([10, 0, 0, 1])))
    }

    fn verify(
        v: &InstanceVerifier,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<ServerCertVerified, rustls::Error> {
        v.verify_server_cert(leaf, intermediates, &any_ip(), &[], UnixTime::now())
    }

    fn refused_with(result: Result<ServerCertVerified, rustls::Error>) -> String {
        let err = result.expect_err("must be refused");
        describe(&err).unwrap_or_else(|| panic!("not ours: {err:?}"))
    }

    #[test]
    fn internal_ca_accepts_cn() {
        let ca = root("Google Cloud SQL Server CA");
        let (leaf, _) = server_leaf(&ca, Some("proj:inst"), &[]);
        let v = verifier(&[&ca], identity("proj", "inst", &["inst.abc.sql.goog."]));
        assert!(verify(&v, &leaf, &[]).is_ok());
    }

    #[test]
    fn domain_scoped_project_cn() {
        let ca = root("Google Cloud SQL Server CA");
        let (leaf, _) = server_leaf(&ca, Some("example.com:proj:inst"), &[]);
        let v = verifier(&[&ca], identity("example.com:proj", "inst", &[]));
        assert!(verify(&v, &leaf, &[]).is_ok());
        let v = verifier(&[&ca], identity("proj", "inst", &[]));
        assert!(verify(&v, &leaf, &[]).is_err());
    }

    /// GOOGLE_MANAGED_CAS_CA and CUSTOMER_MANAGED_CAS_CA: root → intermediate
    /// → leaf, the server sends leaf + intermediate, serverCaCert holds both CAs.
    #[test]
    fn cas_chain_accepts_san() {
        let root_ca = root("Google Cloud SQL Root CA");
        let inter = intermediate(&root_ca, "Google Cloud SQL Intermediate CA");
        let (leaf, _) = server_leaf(&inter, None, &["inst.abc.us-central1.sql.goog"]);
        let id = identity("proj", "inst", &["inst.abc.us-central1.sql.goog."]);
        let v = verifier(&[&inter, &root_ca], id.clone());
        assert!(verify(&v, &leaf, &[inter.cert.der().clone()]).is_ok());
        // serverCaCert with the root alone still works: the server sends the intermediate.
        let v = verifier(&[&root_ca], id.clone());
        assert!(verify(&v, &leaf, &[inter.cert.der().clone()]).is_ok());
        // Case does not matter.
        let v = verifier(
            &[&root_ca],
            identity("proj", "inst", &["INST.abc.US-central1.sql.goog"]),
        );
        assert!(verify(&v, &leaf, &[inter.cert.der().clone()]).is_ok());
    }

    #[test]
    fn san_with_trailing_dot() {
        let ca = root("CAS root");
        let (leaf, _) = server_leaf(&ca, None, &["other.example.invalid", "inst.abc.sql.goog."]);
        let v = verifier(&[&ca], identity("proj", "inst", &["inst.abc.sql.goog"]));
        assert!(verify(&v, &leaf, &[]).is_ok());
        let v = verifier(&[&ca], identity("proj", "inst", &["inst.abc.sql.goog."]));
        assert!(verify(&v, &leaf, &[]).is_ok());
    }

    #[test]
    fn wrong_san_right_cn_falls_back_to_cn() {
        let ca = root("CA");
        let (leaf, _) = server_leaf(&ca, Some("proj:inst"), &["other.example.invalid"]);
        let v = verifier(&[&ca], identity("proj", "inst", &["inst.abc.sql.goog"]));
        assert!(verify(&v, &leaf, &[]).is_ok());
    }

    #[test]
    fn wrong_names_are_refused_with_both() {
        let ca = root("CA");
        let (leaf, _) = server_leaf(&ca, Some("p:other"), &["other.example.invalid"]);
        let v = verifier(&[&ca], identity("p", "inst", &["x.sql.goog"]));
        assert_eq!(
            refused_with(verify(&v, &leaf, &[])),
            "server certificate names neither the instance's DNS name (x.sql.goog) nor \
             project:instance \"p:inst\" (CN is \"p:other\", SANs: other.example.invalid)"
        );
        let (leaf, _) = server_leaf(&ca, Some("p:other"), &[]);
        let v = verifier(&[&ca], identity("p", "inst", &[]));
        assert_eq!(
            refused_with(verify(&v, &leaf, &[])),
            "server certificate does not name project:instance \"p:inst\" (CN is \"p:other\", SANs: none)"
        );
        // A SAN of just "." never matches an empty name.
        let (leaf, _) = server_leaf(&ca, None, &["."]);
        let v = verifier(&[&ca], identity("p", "inst", &[""]));
        assert!(verify(&v, &leaf, &[]).is_err());
    }

    #[test]
    fn other_ca_is_refused() {
        let ours = root("Our CA");
        let theirs = root("Their CA");
        let (leaf, _) = server_leaf(&theirs, Some("proj:inst"), &[]);
        let v = verifier(&[&ours], identity("proj", "inst", &[]));
        let err = verify(&v, &leaf, &[]).expect_err("refused");
        assert_eq!(
            describe(&err).as_deref(),
            Some("server certificate does not chain to the instance's server CA (serverCaCert): unknown issuer")
        );
        // The rustls error's own text carries the same words.
        assert_eq!(
            err.to_string(),
            "invalid peer certificate: Other(OtherError(server certificate does not chain \
             to the instance's server CA (serverCaCert): unknown issuer))"
        );
    }

    #[test]
    fn expired_leaf_is_refused() {
        let ca = root("CA");
        let mut p = leaf_params(Some("proj:inst"), &[]);
        p.not_before = date_time_ymd(2019, 1, 1);
        p.not_after = date_time_ymd(2021, 1, 1);
        let key = KeyPair::generate().expect("key");
        let leaf = p.signed_by(&key, &ca.cert, &ca.key).expect("leaf");
        let v = verifier(&[&ca], identity("proj", "inst", &[]));
        let text = refused_with(verify(&v, leaf.der(), &[]));
        assert!(
            text.starts_with(
                "server certificate (or a CA certificate above it) expired at 2021-01-01 00:00:00 UTC; the clock here says "
            ),
            "{text}"
        );
    }

    #[test]
    fn tls12_signatures_are_refused() {
        use rustls::internal::msgs::codec::Codec;
        let ca = root("CA");
        let (leaf, _) = server_leaf(&ca, Some("proj:inst"), &[]);
        let v = verifier(&[&ca], identity("proj", "inst", &[]));
        // rsa_pss_rsae_sha256, a two-byte signature.
        let dss =
            DigitallySignedStruct::read_bytes(&[0x08, 0x04, 0x00, 0x02, 0xaa, 0xbb]).expect("dss");
        let err = v
            .verify_tls12_signature(b"message", &leaf, &dss)
            .expect_err("TLS 1.2");
        assert_eq!(
            describe(&err).as_deref(),
            Some("the server signed a TLS 1.2 handshake; keyhole speaks only TLS 1.3 to Cloud SQL")
        );
        assert!(!v.supported_verify_schemes().is_empty());
    }

    #[test]
    fn bad_server_ca_pem() {
        let id = identity("p", "i", &[]);
        let err = InstanceVerifier::new("", id.clone()).expect_err("empty");
        assert_eq!(
            err.to_string(),
            "the instance's server CA (serverCaCert) holds no PEM certificate"
        );
        let err = InstanceVerifier::new(
            "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
            id.clone(),
        )
        .expect_err("bad base64");
        assert!(
            err.to_string()
                .starts_with("the instance's server CA (serverCaCert) is not valid PEM: "),
            "{err}"
        );
        let garbage = pem("CERTIFICATE", b"\x30\x03\x02\x01\x01");
        let err = InstanceVerifier::new(&garbage, id).expect_err("not a certificate");
        assert!(
            err.to_string()
                .starts_with("the instance's server CA (serverCaCert) cannot be a trust anchor: "),
            "{err}"
        );
    }

    #[test]
    fn ephemeral_key_is_usable_by_ring_and_rustls() {
        let key = ephemeral();
        let PrivateKeyDer::Pkcs8(pkcs8) = key.private_key() else {
            panic!("not PKCS#8");
        };
        let pair = ring::signature::RsaKeyPair::from_pkcs8(pkcs8.secret_pkcs8_der())
            .expect("ring accepts the key");
        assert_eq!(pair.public().modulus_len(), 256);
        assert_eq!(format!("{key:?}"), "EphemeralKey(RSA-2048, not shown)");

        let pem_text = key.public_key_pem();
        let lines: Vec<&str> = pem_text.lines().collect();
        assert_eq!(lines.first(), Some(&"-----BEGIN RSA PUBLIC KEY-----"));
        assert_eq!(lines.last(), Some(&"-----END RSA PUBLIC KEY-----"));
        let body = &lines[1..lines.len() - 1];
        assert!(body[..body.len() - 1].iter().all(|l| l.len() == 64));
        assert!(body.last().is_some_and(|l| !l.is_empty() && l.len() <= 64));
        let der = base64::engine::general_purpose::STANDARD
            .decode(body.concat())
            .expect("base64");
        assert_eq!(der, key.spki);
        // PKIX SubjectPublicKeyInfo with rsaEncryption (1.2.840.113549.1.1.1), not PKCS#1.
        assert!(der
            .windows(11)
            .any(|w| w == [0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01]));

        // The public key is ring's too.
        let spki = rcgen::SubjectPublicKeyInfo::from_pem(&pem_text).expect("spki");
        use rcgen::PublicKeyData;
        assert_eq!(spki.der_bytes(), pair.public().as_ref());

        let ca = root("CA");
        let (chain, _) = ephemeral_cert(&ca);
        let v = Arc::new(verifier(&[&ca], identity("p", "i", &[])));
        let config = client_config(v, chain, key.private_key()).expect("client config");
        assert!(!config.enable_sni);
        assert!(config.alpn_protocols.is_empty());
    }

    /// An ephemeral certificate for [`ephemeral`]'s public key, as the API
    /// would make, through [`parse_cert_pem`].
    fn ephemeral_cert(client_ca: &Ca) -> (Vec<CertificateDer<'static>>, SystemTime) {
        let spki =
            rcgen::SubjectPublicKeyInfo::from_pem(&ephemeral().public_key_pem()).expect("spki");
        let mut p = leaf_params(Some("ephemeral"), &[]);
        p.not_after = date_time_ymd(2080, 6, 30);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p
            .signed_by(&spki, &client_ca.cert, &client_ca.key)
            .expect("ephemeral cert");
        parse_cert_pem(&cert.pem()).expect("parse_cert_pem")
    }

    #[test]
    fn parse_cert_pem_reads_chain_and_expiry() {
        let ca = root("CA");
        let (chain, not_after) = ephemeral_cert(&ca);
        assert_eq!(chain.len(), 1);
        assert_eq!(x509::format_utc(not_after), "2080-06-30 00:00:00 UTC");
        assert!(matches!(
            parse_cert_pem("no pem here"),
            Err(CertError::NoCertificate { .. })
        ));
        let err = parse_cert_pem(&pem("CERTIFICATE", b"\x30\x03\x02\x01")).expect_err("bad");
        assert!(
            err.to_string().starts_with(
                "the ephemeral certificate (ephemeralCert.cert) cannot be read: malformed certificate: "
            ),
            "{err}"
        );
    }

    /// A Cloud SQL-like server: TLS 1.3, a client certificate from
    /// `client_ca` required. Returns what it saw of the client.
    async fn serve(
        io: tokio::io::DuplexStream,
        chain: Vec<CertificateDer<'static>>,
        key: &KeyPair,
        client_ca: &Ca,
    ) -> Result<(Option<String>, usize), io::Error> {
        let mut roots = RootCertStore::empty();
        roots.add(client_ca.cert.der().clone()).expect("client CA");
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), crate::tls::provider())
                .build()
                .expect("client verifier");
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let config = ServerConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("versions")
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain, key)
            .expect("server config");
        let mut tls = tokio_rustls::TlsAcceptor::from(Arc::new(config))
            .accept(io)
            .await?;
        let (_, conn) = tls.get_ref();
        let sni = conn.server_name().map(str::to_owned);
        let client_certs = conn.peer_certificates().map_or(0, <[_]>::len);
        let mut ping = [0u8; 4];
        tls.read_exact(&mut ping).await?;
        tls.write_all(b"pong").await?;
        tls.shutdown().await?;
        Ok((sni, client_certs))
    }

    async fn handshake(
        server_cert_cn: &str,
        id: InstanceIdentity,
    ) -> (io::Result<()>, io::Result<(Option<String>, usize)>) {
        let server_root = root("Cloud SQL root");
        let server_inter = intermediate(&server_root, "Cloud SQL intermediate");
        let (leaf, leaf_key) = server_leaf(
            &server_inter,
            Some(server_cert_cn),
            &["inst.abc.us-central1.sql.goog."],
        );
        let client_ca = root("Cloud SQL ephemeral CA");
        let (client_chain, _) = ephemeral_cert(&client_ca);

        let v = Arc::new(verifier(&[&server_inter, &server_root], id));
        let config = client_config(v, client_chain, ephemeral().private_key()).expect("config");
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server_chain = vec![leaf, server_inter.cert.der().clone()];
        let server = async { serve(server_io, server_chain, &leaf_key, &client_ca).await };
        let client = async {
            let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(any_ip(), client_io)
                .await?;
            tls.write_all(b"ping").await?;
            let mut pong = [0u8; 4];
            tls.read_exact(&mut pong).await?;
            assert_eq!(&pong, b"pong");
            Ok(())
        };
        tokio::join!(client, server)
    }

    #[tokio::test]
    async fn end_to_end_handshake_succeeds() {
        let id = identity("proj", "inst", &["inst.abc.us-central1.sql.goog"]);
        let (client, server) = handshake("proj:inst", id).await;
        client.expect("client");
        let (sni, client_certs) = server.expect("server");
        assert_eq!(sni, None, "no SNI is sent");
        assert_eq!(client_certs, 1, "the ephemeral certificate was presented");
    }

    #[tokio::test]
    async fn end_to_end_wrong_name_fails_with_words() {
        let id = identity("proj", "inst", &["inst.xyz.us-central1.sql.goog"]);
        let (client, server) = handshake("proj:other", id).await;
        let err = client.expect_err("wrong instance");
        assert_eq!(
            describe_io(&err).as_deref(),
            Some(
                "server certificate names neither the instance's DNS name \
                 (inst.xyz.us-central1.sql.goog) nor project:instance \"proj:inst\" \
                 (CN is \"proj:other\", SANs: inst.abc.us-central1.sql.goog.)"
            )
        );
        assert!(server.is_err(), "the server sees the handshake fail too");
    }
}
