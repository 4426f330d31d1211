//! The upstream connector: reach the database over TCP and upgrade to
//! verified TLS the way its protocol prescribes. Fail closed: the only
//! plaintext stream is to a relay on this host that the target names with
//! `tls-mode=disable` (loopback only, checked at startup and at every dial).

pub mod mysql;
pub mod postgres;
mod stream;

pub use stream::UpstreamStream;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::backend::Backend;
use crate::config::{host_port, Protocol, TargetConfig};
use crate::metrics::{RefusedReason, TargetMetrics};
use crate::tls::{self, TlsSetupError};

/// Where one target's database is and how to verify it.
pub struct Upstream {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    server_name_text: String,
    /// `None`: `tls-mode=disable`, a plain relay on this host.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// `--kernel-tls`: whether the kernel may carry the records after the handshake.
    kernel_tls: tls::KernelTls,
    connect_timeout: Duration,
    /// The network policy every resolved address must pass.
    backend: Arc<dyn Backend>,
    /// The target's counters: connect and handshake times, policy refusals.
    metrics: Arc<TargetMetrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("could not resolve {host}: {source}")]
    Resolve { host: String, source: io::Error },
    #[error("{host} resolved to no address")]
    NoAddress { host: String },
    #[error("keyhole will not connect to {host}: {reason}")]
    Policy { host: String, reason: String },
    #[error("connection to {addr} refused (is the database running and reachable?)")]
    Refused { addr: SocketAddr },
    #[error("connection to {addr} failed: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("connection to {addr} timed out after {}", humanize(*after))]
    ConnectTimeout { addr: SocketAddr, after: Duration },
    #[error("{addr} sent no greeting within {}", humanize(*after))]
    GreetingTimeout { addr: SocketAddr, after: Duration },
    #[error("TLS setup with {addr} timed out after {}", humanize(*after))]
    TlsTimeout { addr: SocketAddr, after: Duration },
    #[error("upstream refused TLS: {addr} does not accept encrypted connections, and keyhole never falls back to plaintext")]
    TlsRefused { addr: SocketAddr },
    #[error("{addr} answered the TLS request with byte 0x{byte:02x}: not a database server that speaks TLS")]
    NotTls { addr: SocketAddr, byte: u8 },
    #[error("{addr} sent data before the TLS handshake (possible man-in-the-middle); connection refused")]
    DataBeforeHandshake { addr: SocketAddr },
    #[error("{addr} refused the connection before TLS with MySQL error {code} (text sent before TLS is not shown)")]
    RefusedBeforeTls { addr: SocketAddr, code: u16 },
    #[error("{addr} did not greet like a MySQL server: {reason}")]
    NotMysql { addr: SocketAddr, reason: String },
    #[error("{addr} closed the connection during TLS setup")]
    ClosedDuringSetup { addr: SocketAddr },
    #[error("{message}")]
    Tls { message: String },
    #[error("connection to {addr} failed during TLS setup: {source}")]
    Io { addr: SocketAddr, source: io::Error },
}

impl UpstreamError {
    /// Whether TLS itself (not reaching the server) failed.
    pub fn is_tls(&self) -> bool {
        matches!(
            self,
            UpstreamError::TlsRefused { .. }
                | UpstreamError::Tls { .. }
                | UpstreamError::TlsTimeout { .. }
                | UpstreamError::DataBeforeHandshake { .. }
        )
    }

    /// A short stable name for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            UpstreamError::Resolve { .. } | UpstreamError::NoAddress { .. } => "upstream_resolve",
            UpstreamError::Policy { .. } => "policy_refused",
            UpstreamError::Refused { .. } | UpstreamError::Connect { .. } => "upstream_connect",
            UpstreamError::ConnectTimeout { .. }
            | UpstreamError::GreetingTimeout { .. }
            | UpstreamError::TlsTimeout { .. } => "upstream_timeout",
            UpstreamError::TlsRefused { .. } => "upstream_tls_refused",
            UpstreamError::NotTls { .. }
            | UpstreamError::NotMysql { .. }
            | UpstreamError::DataBeforeHandshake { .. } => "upstream_protocol",
            UpstreamError::RefusedBeforeTls { .. } => "upstream_refused",
            UpstreamError::Tls { .. } => "upstream_tls",
            UpstreamError::ClosedDuringSetup { .. } | UpstreamError::Io { .. } => "upstream_io",
        }
    }
}

pub(crate) fn humanize(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

impl Upstream {
    /// `alpn`: the protocol name to offer, if the protocol has one.
    pub fn new(
        target: &TargetConfig,
        kernel_tls: tls::KernelTls,
        connect_timeout: Duration,
        alpn: Option<&[u8]>,
        backend: Arc<dyn Backend>,
        metrics: Arc<TargetMetrics>,
    ) -> Result<Upstream, TlsSetupError> {
        let config = match target.tls.mode {
            crate::config::TlsMode::Disable => None,
            _ => Some(tls::client_config(&target.tls, alpn)?),
        };
        Ok(Upstream {
            host: target.host.clone(),
            port: target.port,
            server_name: tls::server_name(&target.tls.server_name)?,
            server_name_text: target.tls.server_name.clone(),
            tls: config,
            kernel_tls,
            connect_timeout,
            backend,
            metrics,
        })
    }

    /// Whether this target is a plain relay on this host (`tls-mode=disable`).
    pub fn is_plain(&self) -> bool {
        self.tls.is_none()
    }

    /// The name the server certificate is verified against.
    pub fn server_name(&self) -> &str {
        &self.server_name_text
    }

    /// `host:port`, for messages.
    pub fn address(&self) -> String {
        host_port(&self.host, self.port)
    }

    /// Resolves the host afresh (a failover moves the name; nothing is
    /// cached here, so no answer outlives its DNS TTL) and connects to the
    /// first address that the backend permits and that answers. An address
    /// the backend refuses is never dialled.
    pub async fn dial(&self) -> Result<(TcpStream, SocketAddr), UpstreamError> {
        let resolved: Vec<SocketAddr> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|source| UpstreamError::Resolve {
                host: self.host.clone(),
                source,
            })?
            .collect();
        let mut addrs = Vec::with_capacity(resolved.len());
        let mut refused = None;
        for addr in resolved {
            let checked = if self.tls.is_none() && !addr.ip().is_loopback() {
                Err(format!(
                    "{} is not a loopback address, and tls-mode=disable reaches only a relay on this host",
                    addr.ip()
                ))
            } else {
                self.backend.check_destination(addr.ip())
            };
            match checked {
                Ok(()) => addrs.push(addr),
                Err(reason) => {
                    tracing::warn!(host = %self.host, address = %addr.ip(), backend = self.backend.name(), %reason, "address refused by the backend's policy");
                    refused.get_or_insert(reason);
                }
            }
        }
        if addrs.is_empty() {
            if let Some(reason) = refused {
                self.metrics.refused(RefusedReason::Policy);
                return Err(UpstreamError::Policy {
                    host: self.address(),
                    reason,
                });
            }
        }
        let mut last = None;
        for addr in addrs {
            let started = Instant::now();
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(tcp)) => {
                    self.metrics.upstream_connected(started.elapsed());
                    crate::net::tune_upstream(&tcp);
                    return Ok((tcp, addr));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    last = Some(UpstreamError::Refused { addr })
                }
                Ok(Err(source)) => last = Some(UpstreamError::Connect { addr, source }),
                Err(_) => {
                    last = Some(UpstreamError::ConnectTimeout {
                        addr,
                        after: self.connect_timeout,
                    })
                }
            }
        }
        Err(last.unwrap_or_else(|| UpstreamError::NoAddress {
            host: self.host.clone(),
        }))
    }

    /// The TLS handshake over an established, already-upgraded-for-TLS stream.
    async fn handshake(&self, tcp: TcpStream) -> Result<UpstreamStream, UpstreamError> {
        let Some(config) = self.tls.clone() else {
            return Ok(UpstreamStream::Plain(tcp));
        };
        let started = Instant::now();
        let stream =
            tls::handshake::connect(config, self.server_name.clone(), tcp, self.kernel_tls)
                .await
                .map_err(|e| UpstreamError::Tls {
                    message: tls::describe_handshake_error(&e, &self.server_name_text),
                })?;
        self.metrics.tls_handshake(started.elapsed());
        Ok(UpstreamStream::Tls(Box::new(stream)))
    }

    /// The connection test (`--run-connection-test`, and `/readiness` with
    /// `--readiness-checks-upstream`): reach the server and complete
    /// verified TLS exactly as a session would, then close without logging
    /// in. (The server logs an incomplete startup; for MySQL it also counts
    /// one aborted connect toward `max_connect_errors` for this host, which
    /// the next successful login resets.)
    pub async fn probe(&self, protocol: Protocol) -> Result<(), UpstreamError> {
        let mut stream = match protocol {
            Protocol::Postgres => self.connect_postgres().await?,
            Protocol::Mysql => {
                let greeted = self.greet_mysql().await?;
                let response = crate::protocol::mysql::probe_response(&greeted.greeting);
                self.upgrade_mysql(greeted, &response).await?
            }
        };
        let _ = tokio::time::timeout(self.connect_timeout, stream.shutdown()).await;
        Ok(())
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }
}

/// Before keyhole asks for TLS the server has nothing more to say: bytes
/// waiting now were injected (or the server is broken), and must never be
/// read as if they came through TLS.
pub(crate) fn ensure_nothing_buffered(
    tcp: &TcpStream,
    addr: SocketAddr,
) -> Result<(), UpstreamError> {
    let mut probe = [0u8; 1];
    match tcp.try_read(&mut probe) {
        Ok(0) => Err(UpstreamError::ClosedDuringSetup { addr }),
        Ok(_) => Err(UpstreamError::DataBeforeHandshake { addr }),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        Err(source) => Err(UpstreamError::Io { addr, source }),
    }
}

/// Shared handle: sessions and the cancel registry both point at it.
pub type SharedUpstream = Arc<Upstream>;
