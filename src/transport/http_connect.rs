//! An HTTP CONNECT tunnel (RFC 9110 section 9.3.6): `CONNECT host:port`,
//! `Proxy-Authorization: Basic` when the hop names a user, and any 2xx
//! opens the tunnel. The reply's head is read up to its blank line and not a
//! byte further (a MySQL server greets first: its greeting must stay in the
//! socket for the session).
//!
//! An `https://` proxy is TLS to the proxy (verified with the system roots
//! against its name) and the tunnel inside it; the database's own TLS then
//! runs inside that, so a local socket pair joins the two (the one hop that
//! costs a copy in keyhole).

use std::sync::Arc;

use base64::Engine as _;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::TlsConnector;

use super::HopError;
use crate::config::via::ProxyHop;
use crate::config::{host_port, TlsMode, UpstreamTls};
use crate::net::Socket;

/// The longest reply head keyhole reads.
const MAX_HEAD: usize = 8 * 1024;

pub struct Proxy {
    hop: ProxyHop,
    /// For an `https://` proxy.
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl Proxy {
    pub fn new(hop: ProxyHop) -> Result<Proxy, String> {
        let tls = if hop.tls {
            let settings = UpstreamTls {
                ca_file: None,
                server_name: hop.host.clone(),
                mode: TlsMode::VerifyFull,
                client_cert: None,
            };
            let config = crate::tls::client_config(&settings, None).map_err(|e| e.to_string())?;
            let name = crate::tls::server_name(&hop.host).map_err(|e| e.to_string())?;
            Some((TlsConnector::from(config), name))
        } else {
            None
        };
        Ok(Proxy { hop, tls })
    }

    pub fn hop(&self) -> &ProxyHop {
        &self.hop
    }

    /// A tunnel to `host:port`.
    pub async fn connect(
        &self,
        name: &Arc<str>,
        host: &str,
        port: u16,
    ) -> Result<Socket, HopError> {
        let tcp = super::dial_proxy(name, &self.hop.host, self.hop.port).await?;
        let request = request(
            host,
            port,
            self.hop
                .credentials
                .as_ref()
                .map(|(u, p)| (u.as_str(), p.expose())),
        );
        match &self.tls {
            None => {
                let mut tcp = tcp;
                tunnel(name, &mut tcp, &request, host, port).await?;
                Ok(Socket::Tcp(tcp))
            }
            Some((connector, server_name)) => {
                let mut tls = connector
                    .connect(server_name.clone(), tcp)
                    .await
                    .map_err(|e| HopError::Unreachable {
                        hop: name.clone(),
                        reason: format!(
                            "TLS to the proxy failed: {}",
                            crate::tls::describe_handshake_error(&e, &self.hop.host)
                        ),
                    })?;
                tunnel(name, &mut tls, &request, host, port).await?;
                let (ours, theirs) = crate::net::pair().map_err(|e| HopError::Unreachable {
                    hop: name.clone(),
                    reason: format!("no local socket pair: {e}"),
                })?;
                tokio::spawn(async move {
                    let mut theirs = theirs;
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut theirs).await;
                });
                Ok(ours)
            }
        }
    }
}

/// The CONNECT request.
pub fn request(host: &str, port: u16, credentials: Option<(&str, &str)>) -> Vec<u8> {
    let target = host_port(host, port);
    let mut text = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some((user, password)) = credentials {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        text.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
    }
    text.push_str("\r\n");
    text.into_bytes()
}

/// What a reply's status line says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Open,
    /// 407 (and 401, which some proxies send for a wrong password): the
    /// proxy wants (other) credentials.
    AuthRequired(String),
    /// 502, 503, 504: the proxy could not reach the target.
    Unreachable(String),
    /// Any other status.
    Refused(String),
}

/// Reads a complete reply head (`HTTP/1.x NNN reason\r\n...\r\n\r\n`).
pub fn answer(head: &[u8]) -> Result<Answer, String> {
    let line_end = head
        .windows(2)
        .position(|w| w == b"\r\n")
        .ok_or("no status line")?;
    let line =
        std::str::from_utf8(&head[..line_end]).map_err(|_| "a status line that is not text")?;
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!(
            "'{}' is not an HTTP/1 status line",
            line.chars().take(40).collect::<String>()
        ));
    }
    let code: u16 = parts
        .next()
        .and_then(|c| c.parse().ok())
        .ok_or("no status code")?;
    let reason: String = parts.next().unwrap_or("").chars().take(80).collect();
    let status = format!("HTTP {code} {reason}").trim_end().to_owned();
    Ok(match code {
        200..=299 => Answer::Open,
        401 | 407 => Answer::AuthRequired(status),
        502..=504 => Answer::Unreachable(status),
        _ => Answer::Refused(status),
    })
}

async fn tunnel<S: AsyncRead + AsyncWrite + Unpin>(
    name: &Arc<str>,
    stream: &mut S,
    request: &[u8],
    host: &str,
    port: u16,
) -> Result<(), HopError> {
    let protocol = |reason: String| HopError::Protocol {
        hop: name.clone(),
        expected: "HTTP CONNECT",
        reason,
    };
    let io = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            protocol("it closed the connection before its reply ended".into())
        }
        _ => HopError::Unreachable {
            hop: name.clone(),
            reason: e.to_string(),
        },
    };
    stream.write_all(request).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    // Byte by byte up to the blank line: a few dozen reads, once per
    // connection, and nothing of the database's is read.
    let mut head = Vec::with_capacity(128);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEAD {
            return Err(protocol(format!(
                "a reply head longer than {MAX_HEAD} bytes"
            )));
        }
        stream.read_exact(&mut byte).await.map_err(io)?;
        head.push(byte[0]);
    }
    let target = host_port(host, port);
    match answer(&head).map_err(protocol)? {
        Answer::Open => Ok(()),
        Answer::AuthRequired(status) => Err(HopError::ProxyAuth {
            hop: name.clone(),
            reason: format!(
                "{status} (give the hop as http://USER:PASSWORD@HOST:PORT, or check them)"
            ),
        }),
        Answer::Unreachable(status) => Err(HopError::TargetUnreachable {
            hop: name.clone(),
            target,
            reason: status,
        }),
        Answer::Refused(status) => Err(HopError::ProxyRefused {
            hop: name.clone(),
            target,
            reason: status,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_names_the_target_and_carries_basic_auth() {
        assert_eq!(
            request("db.internal", 5432, None),
            b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n"
        );
        let with = String::from_utf8(request("fd00::1", 3306, Some(("u", "p:w")))).expect("text");
        assert!(
            with.starts_with("CONNECT [fd00::1]:3306 HTTP/1.1\r\n"),
            "{with}"
        );
        assert!(
            with.contains("Proxy-Authorization: Basic dTpwOnc=\r\n"),
            "{with}"
        );
    }

    #[test]
    fn status_lines() {
        assert_eq!(
            answer(b"HTTP/1.1 200 Connection established\r\n\r\n"),
            Ok(Answer::Open)
        );
        assert_eq!(answer(b"HTTP/1.0 200\r\n\r\n"), Ok(Answer::Open));
        assert_eq!(
            answer(b"HTTP/1.1 407 Proxy Authentication Required\r\nX: y\r\n\r\n"),
            Ok(Answer::AuthRequired(
                "HTTP 407 Proxy Authentication Required".into()
            ))
        );
        assert_eq!(
            answer(b"HTTP/1.0 401 Unauthorized\r\n\r\n"),
            Ok(Answer::AuthRequired("HTTP 401 Unauthorized".into()))
        );
        assert_eq!(
            answer(b"HTTP/1.1 502 Bad Gateway\r\n\r\n"),
            Ok(Answer::Unreachable("HTTP 502 Bad Gateway".into()))
        );
        assert_eq!(
            answer(b"HTTP/1.1 403 Forbidden\r\n\r\n"),
            Ok(Answer::Refused("HTTP 403 Forbidden".into()))
        );
        assert!(answer(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
    }
}
