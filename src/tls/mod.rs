//! rustls configuration: one crypto provider (ring), the upstream client
//! configs (verify-full or verify-ca, CA file or system roots, optional
//! client certificate), the local-leg server config, and the plain-language
//! rendering of a failed handshake.

use std::io;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};

use crate::config::{CertKey, TlsMode, UpstreamTls};

pub mod handshake;
pub mod ktls;
pub mod record;
mod stream;
mod temper;

pub use stream::{Handshake, TlsStream};

/// `--kernel-tls`: whether an upstream session's records may be handed to the
/// kernel (kTLS) once rustls has finished the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KernelTls {
    /// keyhole's own record layer always (the default; see docs/architecture.md).
    #[default]
    Off,
    /// The kernel's where it offers the negotiated suite, keyhole's otherwise.
    Auto,
}

/// The one crypto provider keyhole uses, built once.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Makes [`provider`] the process default too, so nothing can pick another.
pub fn install_crypto_provider() {
    // Err means it is installed already, which is what we want.
    let _ = CryptoProvider::install_default(provider().as_ref().clone());
}

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: io::Error,
    },
    #[error("{what} {path} holds no PEM certificate")]
    NoCertificate { what: &'static str, path: String },
    #[error("{what} {path}: {message}")]
    Invalid {
        what: &'static str,
        path: String,
        message: String,
    },
    #[error("no CA file given and the system trust store is empty or unreadable; pass --ca-file")]
    NoSystemRoots,
    #[error("'{0}' is not a valid server name for TLS verification")]
    ServerName(String),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn load_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| TlsSetupError::Read {
        what,
        path: shown.clone(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsSetupError::Invalid {
            what,
            path: shown.clone(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsSetupError::NoCertificate { what, path: shown });
    }
    Ok(certs)
}

fn load_key(path: &Path, what: &'static str) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| TlsSetupError::Read {
        what,
        path: shown.clone(),
        source,
    })?;
    // The parse error names the PEM problem only: never key material.
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsSetupError::Invalid {
        what,
        path: shown,
        message: format!("no usable private key ({e})"),
    })
}

fn roots(ca_file: Option<&Path>) -> Result<RootCertStore, TlsSetupError> {
    let mut store = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in load_certs(path, "CA file")? {
                store.add(cert).map_err(|e| TlsSetupError::Invalid {
                    what: "CA file",
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                // The system store holds odd certificates; skip what webpki cannot use.
                let _ = store.add(cert);
            }
            if store.is_empty() {
                return Err(TlsSetupError::NoSystemRoots);
            }
        }
    }
    Ok(store)
}

/// The verification name: a DNS name or an IP address.
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsSetupError> {
    ServerName::try_from(name.to_owned()).map_err(|_| TlsSetupError::ServerName(name.to_owned()))
}

/// The client config for one upstream.
pub fn client_config(
    tls: &UpstreamTls,
    alpn: Option<&[u8]>,
) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let roots = Arc::new(roots(tls.ca_file.as_deref())?);
    let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| TlsSetupError::Invalid {
            what: "CA file",
            path: tls
                .ca_file
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "(system roots)".into()),
            message: e.to_string(),
        })?;
    let verifier: Arc<dyn ServerCertVerifier> = match tls.mode {
        // (Disable never gets here: such a target has no TLS config.)
        TlsMode::VerifyFull | TlsMode::Disable => webpki,
        TlsMode::VerifyCa => Arc::new(ChainOnly(webpki)),
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match &tls.client_cert {
        Some(ck) => builder.with_client_auth_cert(
            load_certs(&ck.cert, "client certificate")?,
            load_key(&ck.key, "client key")?,
        )?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.into_iter().map(<[u8]>::to_vec).collect();
    // After the handshake, keyhole's record layer (or the kernel's) takes
    // over with the traffic keys rustls hands out (see `stream`).
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// The server config for TLS on the client leg.
pub fn server_config(
    ck: &CertKey,
    alpn: Option<&[u8]>,
) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            load_certs(&ck.cert, "listen certificate")?,
            load_key(&ck.key, "listen key")?,
        )?;
    config.alpn_protocols = alpn.into_iter().map(<[u8]>::to_vec).collect();
    Ok(Arc::new(config))
}

/// verify-ca: the chain must lead to a trusted CA; the name may be anything.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain first and the name last, so a name error
        // means the chain itself was good.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Whether an I/O error is a TLS alert from the peer.
pub fn is_alert(err: &io::Error) -> bool {
    matches!(
        err.get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::AlertReceived(_))
    )
}

/// A failed upstream handshake, in words a person can act on.
pub fn describe_handshake_error(err: &io::Error, server_name: &str) -> String {
    let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return format!("TLS handshake with the server failed: {err}");
    };
    match tls {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!("upstream certificate not valid for {server_name} (set server-name= to the name the certificate carries)")
            }
            CertificateError::UnknownIssuer => format!(
                "upstream certificate for {server_name} is not signed by a trusted CA (check --ca-file / ca-file=)"
            ),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                format!("upstream certificate for {server_name} has expired")
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                format!("upstream certificate for {server_name} is not valid yet (check the clock)")
            }
            other => format!("upstream certificate for {server_name} rejected: {other:?}"),
        },
        rustls::Error::AlertReceived(alert) => format!(
            "the server rejected keyhole's TLS handshake ({alert:?}); if it requires a client certificate, \
             check that --client-cert and --client-key are set and signed by a CA the server trusts"
        ),
        other => format!("TLS handshake with the server failed: {other}"),
    }
}
