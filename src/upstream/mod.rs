//! The upstream connector: reach the database over TCP and upgrade to
//! verified TLS the way its protocol prescribes. Fail closed: the only
//! plaintext stream is to a relay on this host that the target names with
//! `tls-mode=disable` (loopback only, checked at startup and at every dial).
//!
//! Where the database is and how it is verified is the target's [`Route`]:
//! its own host, CA and name, or a Cloud SQL instance, whose address,
//! client certificate and verifier the connector ([`crate::cloudsql`])
//! answers at each dial. A Cloud SQL instance is TLS from the first byte
//! (its server-side proxy on port 3307); the protocol inside starts plain,
//! which the frontends learn from [`Upstream::is_tunnel`].
//!
//! Either route may go through a hop (`via=`, [`crate::transport`]): the
//! hop resolves and dials the name and hands back a byte stream, and
//! everything above (STARTTLS, the verified handshake, the session) runs
//! on it unchanged.

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
use crate::cloudsql::{ConnectorError, Dial, Instance, Slot};
use crate::config::{host_port, Protocol, TargetConfig};
use crate::metrics::{RefusedReason, TargetMetrics};
use crate::net::Socket;
use crate::tls::{self, TlsSetupError};
use crate::transport::{Hop, HopError};

/// Where one target's database is and how to verify it.
pub struct Upstream {
    route: Route,
    /// `via=`: the hop that carries the bytes, `None` for direct.
    hop: Option<Arc<Hop>>,
    /// `--kernel-tls`: whether the kernel may carry the records after the handshake.
    kernel_tls: tls::KernelTls,
    connect_timeout: Duration,
    /// The target's counters: connect and handshake times, policy refusals.
    metrics: Arc<TargetMetrics>,
}

/// Who answers "which address, which TLS identity".
enum Route {
    /// The target's own host, CA file and server name.
    Fixed {
        host: String,
        port: u16,
        server_name: ServerName<'static>,
        server_name_text: String,
        /// `None`: `tls-mode=disable`, a plain relay on this host.
        tls: Option<Arc<rustls::ClientConfig>>,
        /// The network policy every resolved address must pass.
        backend: Arc<dyn Backend>,
    },
    /// A Cloud SQL instance: the connector answers at each dial. Its
    /// address comes from the Admin API over verified HTTPS, so no
    /// backend's range check applies.
    CloudSql(Arc<Slot>),
}

/// Who answered at the other end of the dial, for messages: the database's
/// address, or its name and the hop that reached it (keyhole never learns
/// the address a bastion or proxy dialled).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    Addr(SocketAddr),
    Hop { target: String, hop: Arc<str> },
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Addr(addr) => addr.fmt(f),
            Peer::Hop { target, hop } => write!(f, "{target} (through {hop})"),
        }
    }
}

impl From<SocketAddr> for Peer {
    fn from(addr: SocketAddr) -> Peer {
        Peer::Addr(addr)
    }
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
    Refused { addr: Peer },
    #[error("connection to {addr} failed: {source}")]
    Connect { addr: Peer, source: io::Error },
    #[error("connection to {addr} timed out after {}", humanize(*after))]
    ConnectTimeout { addr: Peer, after: Duration },
    #[error("{addr} sent no greeting within {}", humanize(*after))]
    GreetingTimeout { addr: Peer, after: Duration },
    #[error("TLS setup with {addr} timed out after {}", humanize(*after))]
    TlsTimeout { addr: Peer, after: Duration },
    #[error("upstream refused TLS: {addr} does not accept encrypted connections, and keyhole never falls back to plaintext")]
    TlsRefused { addr: Peer },
    #[error("{addr} answered the TLS request with byte 0x{byte:02x}: not a database server that speaks TLS")]
    NotTls { addr: Peer, byte: u8 },
    #[error("{addr} sent data before the TLS handshake (possible man-in-the-middle); connection refused")]
    DataBeforeHandshake { addr: Peer },
    #[error("{addr} refused the connection before TLS with MySQL error {code} (text sent before TLS is not shown)")]
    RefusedBeforeTls { addr: Peer, code: u16 },
    #[error("{addr} did not greet like a MySQL server: {reason}")]
    NotMysql { addr: Peer, reason: String },
    #[error("{addr} closed the connection during TLS setup")]
    ClosedDuringSetup { addr: Peer },
    #[error("{message}")]
    Tls { message: String },
    #[error("{0}")]
    CloudSql(#[from] ConnectorError),
    /// The hop (`via=`) failed: which hop, and why, in its own words.
    #[error("{0}")]
    Hop(#[from] HopError),
    #[error("connection to {addr} failed during TLS setup: {source}")]
    Io { addr: Peer, source: io::Error },
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
        ) || matches!(
            self,
            UpstreamError::CloudSql(ConnectorError::Certificate(_))
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
            UpstreamError::CloudSql(e) => e.label(),
            UpstreamError::Hop(e) => e.label(),
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
            route: Route::Fixed {
                host: target.host.clone(),
                port: target.port,
                server_name: tls::server_name(&target.tls.server_name)?,
                server_name_text: target.tls.server_name.clone(),
                tls: config,
                backend,
            },
            hop: None,
            kernel_tls,
            connect_timeout,
            metrics,
        })
    }

    /// A Cloud SQL instance's upstream.
    pub fn cloudsql(
        slot: Arc<Slot>,
        kernel_tls: tls::KernelTls,
        connect_timeout: Duration,
        metrics: Arc<TargetMetrics>,
    ) -> Upstream {
        Upstream {
            route: Route::CloudSql(slot),
            hop: None,
            kernel_tls,
            connect_timeout,
            metrics,
        }
    }

    /// Sends every connection through `hop` (`via=`).
    pub fn through(mut self, hop: Option<Arc<Hop>>) -> Upstream {
        self.hop = hop;
        self
    }

    /// Whether this target is a plain relay on this host (`tls-mode=disable`).
    pub fn is_plain(&self) -> bool {
        matches!(&self.route, Route::Fixed { tls: None, .. })
    }

    /// Whether the connection is TLS from its first byte and the database
    /// protocol inside starts plain (a Cloud SQL instance): no STARTTLS.
    pub fn is_tunnel(&self) -> bool {
        matches!(self.route, Route::CloudSql(_))
    }

    /// The Cloud SQL instance's slot, if this is one.
    pub fn slot(&self) -> Option<&Arc<Slot>> {
        match &self.route {
            Route::CloudSql(slot) => Some(slot),
            Route::Fixed { .. } => None,
        }
    }

    /// The Cloud SQL instance connections go to now, if this is one.
    pub fn instance(&self) -> Option<Arc<Instance>> {
        self.slot().map(|slot| slot.instance())
    }

    /// The name the server certificate is verified against.
    pub fn server_name(&self) -> String {
        match &self.route {
            Route::Fixed {
                server_name_text, ..
            } => server_name_text.clone(),
            Route::CloudSql(slot) => slot.instance().name.certificate_cn(),
        }
    }

    /// `host:port`, for messages.
    pub fn address(&self) -> String {
        match &self.route {
            Route::Fixed { host, port, .. } => host_port(host, *port),
            Route::CloudSql(slot) => slot.instance().name.to_string(),
        }
    }

    /// Resolves the host afresh (a failover moves the name; nothing is
    /// cached here, so no answer outlives its DNS TTL) and connects to the
    /// first address that the backend permits and that answers. An address
    /// the backend refuses is never dialled.
    ///
    /// Through a hop, the hop resolves and dials the name (a name only the
    /// VPC's resolver knows works), so no backend's address check applies
    /// here: that is the hop's side of the network.
    pub async fn dial(&self) -> Result<(Socket, Peer), UpstreamError> {
        let Route::Fixed {
            host,
            port,
            tls,
            backend,
            ..
        } = &self.route
        else {
            let (socket, peer, _, _) = self.dial_instance().await?;
            return Ok((socket, peer));
        };
        if let Some(hop) = &self.hop {
            return self.through_hop(hop, host, *port).await;
        }
        let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), *port))
            .await
            .map_err(|source| UpstreamError::Resolve {
                host: host.clone(),
                source,
            })?
            .collect();
        let mut addrs = Vec::with_capacity(resolved.len());
        let mut refused = None;
        for addr in resolved {
            let checked = if tls.is_none() && !addr.ip().is_loopback() {
                Err(format!(
                    "{} is not a loopback address, and tls-mode=disable reaches only a relay on this host",
                    addr.ip()
                ))
            } else {
                backend.check_destination(addr.ip())
            };
            match checked {
                Ok(()) => addrs.push(addr),
                Err(reason) => {
                    tracing::warn!(host = %host, address = %addr.ip(), backend = backend.name(), %reason, "address refused by the backend's policy");
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
        self.connect_first(host, addrs).await
    }

    /// Asks the hop for a byte stream to `host:port`.
    async fn through_hop(
        &self,
        hop: &Hop,
        host: &str,
        port: u16,
    ) -> Result<(Socket, Peer), UpstreamError> {
        let started = Instant::now();
        let socket = hop.open(host, port, self.connect_timeout).await?;
        self.metrics.upstream_connected(started.elapsed());
        Ok((
            socket,
            Peer::Hop {
                target: host_port(host, port),
                hop: hop.name(),
            },
        ))
    }

    /// Connects to the first of `addrs` that answers.
    async fn connect_first(
        &self,
        host: &str,
        addrs: Vec<SocketAddr>,
    ) -> Result<(Socket, Peer), UpstreamError> {
        let mut last = None;
        for addr in addrs {
            let started = Instant::now();
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(tcp)) => {
                    self.metrics.upstream_connected(started.elapsed());
                    crate::net::tune_upstream(&tcp);
                    return Ok((Socket::Tcp(tcp), Peer::Addr(addr)));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    last = Some(UpstreamError::Refused { addr: addr.into() })
                }
                Ok(Err(source)) => {
                    last = Some(UpstreamError::Connect {
                        addr: addr.into(),
                        source,
                    })
                }
                Err(_) => {
                    last = Some(UpstreamError::ConnectTimeout {
                        addr: addr.into(),
                        after: self.connect_timeout,
                    })
                }
            }
        }
        Err(last.unwrap_or_else(|| UpstreamError::NoAddress {
            host: host.to_owned(),
        }))
    }

    /// A Cloud SQL instance: its current address on port 3307, and the TLS
    /// configuration (client certificate, verifier) to use there.
    ///
    /// Also returns the name rustls is given: the address (or, through a hop
    /// to a DNS-named instance, that name). The instance's verifier checks
    /// the instance's own names whatever it is, and SNI is off.
    async fn dial_instance(
        &self,
    ) -> Result<(Socket, Peer, Arc<rustls::ClientConfig>, ServerName<'static>), UpstreamError> {
        let Route::CloudSql(slot) = &self.route else {
            return Err(UpstreamError::Tls {
                message: "internal: not a Cloud SQL target".into(),
            });
        };
        let instance = slot.instance();
        let info = instance.connect_info().await?;
        let port = crate::cloudsql::instance::SERVER_PROXY_PORT;
        if let Some(hop) = &self.hop {
            let (host, name) = match &info.dial {
                Dial::Ip(ip) => (ip.to_string(), ServerName::IpAddress((*ip).into())),
                Dial::Name(name) => (
                    name.clone(),
                    tls::server_name(name).map_err(|e| UpstreamError::Tls {
                        message: e.to_string(),
                    })?,
                ),
            };
            return match self.through_hop(hop, &host, port).await {
                Ok((socket, peer)) => Ok((socket, peer, info.tls.clone(), name)),
                Err(e) => {
                    if matches!(&e, UpstreamError::Hop(h) if h.is_target_unreachable()) {
                        instance.invalidate();
                    }
                    Err(e)
                }
            };
        }
        let (host, addrs) = match &info.dial {
            Dial::Ip(ip) => (ip.to_string(), vec![SocketAddr::new(*ip, port)]),
            Dial::Name(name) => {
                let resolved = tokio::net::lookup_host((name.as_str(), port))
                    .await
                    .map_err(|source| UpstreamError::Resolve {
                        host: name.clone(),
                        source,
                    })?
                    .collect();
                (name.clone(), resolved)
            }
        };
        match self.connect_first(&host, addrs).await {
            Ok((socket, Peer::Addr(addr))) => Ok((
                socket,
                Peer::Addr(addr),
                info.tls.clone(),
                ServerName::IpAddress(addr.ip().into()),
            )),
            // A direct dial names its address; a hop was handled above.
            Ok((_, peer @ Peer::Hop { .. })) => Err(UpstreamError::Tls {
                message: format!("internal: a direct dial answered as {peer}"),
            }),
            Err(e) => {
                // The address may have moved: ask for fresh settings.
                instance.invalidate();
                Err(e)
            }
        }
    }

    /// A Cloud SQL instance: dial and complete TLS 1.3 from the first byte.
    pub async fn connect_tunnel(&self) -> Result<UpstreamStream, UpstreamError> {
        Ok(self.connect_tunnel_at().await?.0)
    }

    /// [`Upstream::connect_tunnel`], with the address it reached.
    pub(crate) async fn connect_tunnel_at(&self) -> Result<(UpstreamStream, Peer), UpstreamError> {
        let (socket, addr, config, name) = self.dial_instance().await?;
        let after = self.connect_timeout;
        let handshake = async {
            let started = Instant::now();
            let stream = tls::handshake::connect(config, name, socket, self.kernel_tls)
                .await
                .map_err(|e| UpstreamError::Tls {
                    message: crate::cloudsql::cert::describe_io(&e).map_or_else(
                        || tls::describe_handshake_error(&e, &self.server_name()),
                        |why| format!("Cloud SQL server certificate refused: {why}"),
                    ),
                })?;
            self.metrics
                .tls_handshake(started.elapsed(), stream.handshake());
            Ok(UpstreamStream::Tls(Box::new(stream)))
        };
        let result = match tokio::time::timeout(after, handshake).await {
            Ok(result) => result.map(|stream| (stream, addr)),
            Err(_) => Err(UpstreamError::TlsTimeout { addr, after }),
        };
        if result.is_err() {
            if let Route::CloudSql(slot) = &self.route {
                slot.instance().invalidate();
            }
        }
        result
    }

    /// The TLS handshake over an established, already-upgraded-for-TLS stream.
    async fn handshake(&self, tcp: Socket) -> Result<UpstreamStream, UpstreamError> {
        let (config, server_name, server_name_text) = match &self.route {
            Route::Fixed {
                tls: Some(config),
                server_name,
                server_name_text,
                ..
            } => (config, server_name, server_name_text),
            Route::Fixed { tls: None, .. } => return Ok(UpstreamStream::Plain(tcp)),
            // Its TLS starts at the first byte, in `connect_tunnel`.
            Route::CloudSql(_) => {
                return Err(UpstreamError::Tls {
                    message: "internal: a Cloud SQL connection has no STARTTLS".into(),
                })
            }
        };
        let started = Instant::now();
        let stream =
            tls::handshake::connect(config.clone(), server_name.clone(), tcp, self.kernel_tls)
                .await
                .map_err(|e| UpstreamError::Tls {
                    message: tls::describe_handshake_error(&e, server_name_text),
                })?;
        self.metrics
            .tls_handshake(started.elapsed(), stream.handshake());
        Ok(UpstreamStream::Tls(Box::new(stream)))
    }

    /// The connection test (`--run-connection-test`, and `/readiness` with
    /// `--readiness-checks-upstream`): reach the server and complete
    /// verified TLS exactly as a session would, then close without logging
    /// in. (The server logs an incomplete startup; for MySQL it also counts
    /// one aborted connect toward `max_connect_errors` for this host, which
    /// the next successful login resets.)
    pub async fn probe(&self, protocol: Option<Protocol>) -> Result<(), UpstreamError> {
        let protocol = match (protocol, &self.route) {
            (Some(protocol), _) => protocol,
            (None, Route::CloudSql(slot)) => slot.instance().protocol().await?,
            (None, Route::Fixed { .. }) => Protocol::Postgres,
        };
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
    socket: &mut Socket,
    addr: &Peer,
) -> Result<(), UpstreamError> {
    let mut probe = [0u8; 1];
    let read = socket.try_read_now(&mut probe);
    let addr = addr.clone();
    match read {
        Ok(0) => Err(UpstreamError::ClosedDuringSetup { addr }),
        Ok(_) => Err(UpstreamError::DataBeforeHandshake { addr }),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        Err(source) => Err(UpstreamError::Io { addr, source }),
    }
}

/// Shared handle: sessions and the cancel registry both point at it.
pub type SharedUpstream = Arc<Upstream>;
