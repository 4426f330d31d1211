//! Test certificates, made by the same `certs/generate.sh` that users run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::process::{describe_output, output_with_timeout};

/// A CA with one server and one client certificate (EC P-256, 30 days).
#[derive(Debug)]
pub struct TestPki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// Set by [`TestPki::generate`]: deletes `dir` on drop.
    _tmp: Option<tempfile::TempDir>,
}

impl TestPki {
    /// Generates a fresh PKI into a new temporary directory (deleted on drop).
    /// The server certificate carries `names` plus localhost, 127.0.0.1 and ::1.
    pub fn generate(names: &[&str]) -> TestPki {
        let tmp = super::scratch_dir("keyhole-pki-");
        let mut pki = TestPki::generate_in(tmp.path(), names);
        pki._tmp = Some(tmp);
        pki
    }

    /// Generates a fresh PKI into `dir` (created if needed); the caller owns `dir`.
    pub fn generate_in(dir: &Path, names: &[&str]) -> TestPki {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/generate.sh");
        // Through bash rather than exec, so a lost executable bit does not matter.
        let mut cmd = Command::new("bash");
        cmd.arg(&script).arg(dir).args(names);
        let out = output_with_timeout(&mut cmd, Duration::from_secs(60));
        assert!(
            out.status.success(),
            "{} failed:\n{}",
            script.display(),
            describe_output(&out)
        );
        TestPki {
            dir: dir.to_path_buf(),
            ca: dir.join("ca.crt"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.crt"),
            client_key: dir.join("client.key"),
            _tmp: None,
        }
    }

    /// A TLS acceptor presenting the server certificate, for the tests'
    /// hand-made servers.
    pub fn tls_acceptor(&self) -> tokio_rustls::TlsAcceptor {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<_> = CertificateDer::pem_file_iter(&self.server_cert)
            .expect("read the server certificate")
            .collect::<Result<_, _>>()
            .expect("parse the server certificate");
        let key = PrivateKeyDer::from_pem_file(&self.server_key).expect("read the server key");
        let config = rustls::ServerConfig::builder_with_provider(keyhole::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("a server TLS configuration");
        tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))
    }

    /// A TLS client configuration that trusts this CA (and nothing else),
    /// offering `alpn` if given.
    pub fn tls_client_config(&self, alpn: Option<&[u8]>) -> std::sync::Arc<rustls::ClientConfig> {
        tls_client_config_trusting(&[&self.ca], alpn)
    }
}

/// A TLS client configuration (keyhole's crypto provider) trusting the CA
/// certificates in the PEM files `cas`, offering `alpn` if given.
pub fn tls_client_config_trusting(
    cas: &[&std::path::Path],
    alpn: Option<&[u8]>,
) -> std::sync::Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        let pem = std::fs::read(ca).expect("read a CA");
        for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
            roots
                .add(cert.expect("a PEM certificate"))
                .expect("add the root");
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(keyhole::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    if let Some(alpn) = alpn {
        config.alpn_protocols = vec![alpn.to_vec()];
    }
    std::sync::Arc::new(config)
}
