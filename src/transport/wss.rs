//! What the two cloud tunnels (IAP, Session Manager) share: dialling a
//! `wss://` URL (TCP, verified TLS, the WebSocket upgrade) and the socket
//! pair a tunnel hands back as its stream.
//!
//! A tunnel's bytes arrive in WebSocket messages, not on a socket, so each
//! connection gets a Unix socket pair: keyhole's upstream (TLS to the
//! database) runs on one end like on any other hop's socket, and the
//! tunnel's task moves bytes between the other end and the messages. The
//! database's TLS still starts in keyhole: the tunnel carries ciphertext.

use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use super::websocket::{self, HandshakeError, Limits};
use crate::http::client::Url;

/// A byte stream a WebSocket runs on: TCP, or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub type WsReader = websocket::Reader<ReadHalf<Box<dyn Io>>>;
pub type WsWriter = websocket::Writer<WriteHalf<Box<dyn Io>>>;

/// A `ws://` or `wss://` URL, kept as the equivalent `http(s)://` one.
pub fn parse_url(text: &str) -> Result<Url, String> {
    let text = text.trim().trim_end_matches('/');
    let http = match text.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("wss") => format!("https://{rest}"),
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("ws") => format!("http://{rest}"),
        _ => return Err(format!("'{text}' is not a ws:// or wss:// URL")),
    };
    Url::parse(&http).map_err(|e| e.to_string().replace("https://", "wss://"))
}

/// Why a WebSocket did not open.
#[derive(Debug)]
pub enum DialError {
    /// DNS, TCP or TLS: the endpoint itself.
    Connect(String),
    /// The endpoint answered, but not with a WebSocket.
    Handshake(HandshakeError),
}

/// Opens a WebSocket to `url` (path and query included), within `timeout`.
pub async fn dial(
    url: &Url,
    tls: &Arc<ClientConfig>,
    headers: &[(&str, &str)],
    subprotocol: Option<&str>,
    timeout: Duration,
) -> Result<(WsReader, WsWriter), DialError> {
    let work = async {
        let addr = format!("{}:{}", bracketed(url.host()), url.port());
        let tcp = TcpStream::connect(&addr)
            .await
            .map_err(|e| DialError::Connect(format!("cannot connect to {addr}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let stream: Box<dyn Io> = if url.is_https() {
            let name = crate::tls::server_name(url.host())
                .map_err(|e| DialError::Connect(e.to_string()))?;
            let connector = tokio_rustls::TlsConnector::from(tls.clone());
            let tls = connector.connect(name, tcp).await.map_err(|e| {
                DialError::Connect(crate::tls::describe_handshake_error(&e, url.host()))
            })?;
            Box::new(tls)
        } else {
            Box::new(tcp)
        };
        let host = url.authority();
        let request = websocket::Request {
            host: &host,
            path: url.path_and_query(),
            headers,
            subprotocol,
        };
        websocket::connect(stream, &request, Limits::default())
            .await
            .map_err(DialError::Handshake)
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| {
            Err(DialError::Connect(format!(
                "{} did not answer within {}",
                url.authority(),
                crate::upstream::humanize(timeout)
            )))
        })
}

fn bracketed(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// The TLS settings for a cloud endpoint: the system's roots (which honour
/// `SSL_CERT_FILE`), plus the certificates of `extra` (a PEM file, e.g.
/// `AWS_CA_BUNDLE`) when given. `what` names the source in errors.
pub fn tls_config(extra: Option<(&str, &std::path::Path)>) -> Result<Arc<ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some((what, path)) = extra {
        let shown = path.display();
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("{what}={shown}: cannot read it: {e}"))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{what}={shown}: not a PEM certificate bundle: {e}"))?;
        if certs.is_empty() {
            return Err(format!("{what}={shown}: holds no certificate"));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("{what}={shown}: {e}"))?;
        }
    }
    if roots.is_empty() {
        return Err(
            "no trusted CA certificates: the system store is empty (set SSL_CERT_FILE)".into(),
        );
    }
    let config = ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_urls_map_to_their_http_forms() {
        let url = parse_url("wss://tunnel.cloudproxy.app").expect("valid");
        assert!(url.is_https());
        assert_eq!((url.host(), url.port()), ("tunnel.cloudproxy.app", 443));
        let url = parse_url("ws://127.0.0.1:8080/base/").expect("valid");
        assert!(!url.is_https());
        assert_eq!(
            (url.host(), url.port(), url.path_and_query()),
            ("127.0.0.1", 8080, "/base")
        );
        let err = parse_url("https://tunnel.cloudproxy.app").expect_err("not ws");
        assert!(err.contains("not a ws:// or wss:// URL"), "{err}");
    }

    #[test]
    fn a_missing_or_empty_bundle_is_named() {
        let dir = tempfile::tempdir().expect("dir");
        let missing = dir.path().join("missing.pem");
        let err = tls_config(Some(("AWS_CA_BUNDLE", &missing))).expect_err("missing");
        assert!(
            err.starts_with("AWS_CA_BUNDLE=") && err.contains("cannot read"),
            "{err}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").expect("write");
        let err = tls_config(Some(("AWS_CA_BUNDLE", &empty))).expect_err("empty");
        assert!(err.contains("holds no certificate"), "{err}");
    }
}
