//! How bytes reach a database's host when keyhole cannot dial it itself
//! (`via=`, [`crate::config::via`]): through an SSH bastion, a SOCKS5 proxy
//! or an HTTP CONNECT proxy. A [`Hop`] hands back a byte stream to
//! `host:port` and nothing else: TLS to the database runs on top of it from
//! here and is verified against the database's own name, so the hop sees
//! only ciphertext, and IAM tokens are signed here for the real endpoint.
//!
//! - [`ssh`]: one OpenSSH master connection per bastion (the user's own
//!   `ssh`, so their config, keys, agent, `ProxyJump` and known_hosts all
//!   hold), and one channel on it per client connection.
//! - [`socks5`]: RFC 1928 with RFC 1929 user/password; the proxy resolves
//!   the database's name.
//! - [`http_connect`]: `CONNECT host:port`, over TLS for an `https://` proxy.
//! - [`iap`]: Google IAP TCP forwarding to a VM's port, over a WebSocket.
//! - [`ssm`]: AWS Session Manager port forwarding through an instance's agent.
//!
//! The cloud tunnels share [`wss`] (dialling `wss://`, the socket pair they
//! hand back) and [`websocket`] (a small RFC 6455 client).
//!
//! Errors say which hop failed and why ([`HopError`]), once, in words a
//! client can be shown: no password, no proxy credentials.

pub mod http_connect;
// Each cloud tunnel comes with its cloud's Cargo feature (crate::features).
// Without it, a stand-in of the same shape from without/ takes its place and
// opens nothing, so that no code below needs a cfg: the configuration has
// refused `iap://` or `ssm://` before a hop is built.
#[cfg_attr(not(feature = "gcp"), path = "without/iap.rs")]
pub mod iap;
pub mod socks5;
// SSH hops need Unix (a shared OpenSSH master over a Unix control socket, and
// passed descriptors): without it, the stand-in in without/ (src/platform/).
#[cfg_attr(not(keyhole_unix), path = "without/ssh.rs")]
pub mod ssh;
#[cfg_attr(not(feature = "aws"), path = "without/ssm.rs")]
pub mod ssm;
pub mod websocket;
pub mod wss;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::TcpStream;

use crate::config::via::{ProxyHop, Tunnel, Via};
use crate::metrics::{self, HopMetrics};
use crate::net::Socket;

/// One hop, shared by every target that names it.
pub struct Hop {
    /// The hop as a URL without credentials (`ssh://bastion`).
    name: Arc<str>,
    kind: Kind,
    metrics: Arc<HopMetrics>,
}

enum Kind {
    Ssh(Arc<ssh::Bastion>),
    Socks5(ProxyHop),
    Http(http_connect::Proxy),
    Iap(Arc<iap::Iap>),
    Ssm(Arc<ssm::Ssm>),
}

/// Why a hop could not give a stream to the database, by hop.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HopError {
    #[error("{hop} is unreachable: {reason}")]
    Unreachable { hop: Arc<str>, reason: String },
    #[error("{hop} refused the SSH login: {detail}; check the user, the key (IdentityFile) and that your ssh-agent holds it")]
    SshAuth { hop: Arc<str>, detail: String },
    #[error("the SSH host key of {hop} is not in known_hosts, and keyhole never adds one by itself: check the bastion's fingerprint with whoever runs it, then add the key (connect once with ssh, or ssh-keyscan into known_hosts)")]
    HostKeyUnknown { hop: Arc<str> },
    #[error("the SSH host key of {hop} has CHANGED since it was recorded in known_hosts: the bastion was rebuilt, or someone is intercepting the connection. Confirm with whoever runs it, then remove the old key (ssh-keygen -R HOST); keyhole never updates known_hosts by itself")]
    HostKeyChanged { hop: Arc<str> },
    #[error("{hop}: {reason}")]
    Ssh { hop: Arc<str>, reason: String },
    #[error("{hop} refused keyhole's login: {reason}")]
    ProxyAuth { hop: Arc<str>, reason: String },
    #[error("{hop} refused to connect to {target}: {reason}")]
    ProxyRefused {
        hop: Arc<str>,
        target: String,
        reason: String,
    },
    #[error("{target} is unreachable from {hop}: {reason}")]
    TargetUnreachable {
        hop: Arc<str>,
        target: String,
        reason: String,
    },
    #[error("{hop} did not answer within {}", crate::upstream::humanize(*after))]
    Timeout { hop: Arc<str>, after: Duration },
    #[error("{hop} did not answer as a {expected} proxy: {reason}")]
    Protocol {
        hop: Arc<str>,
        expected: &'static str,
        reason: String,
    },
    /// The cloud refused keyhole's credentials the permission it needs.
    #[error("{hop}: permission denied: {reason}")]
    Denied { hop: Arc<str>, reason: String },
    /// No credentials for a cloud tunnel.
    #[error("{hop}: no token for the tunnel: {reason}")]
    Credentials { hop: Arc<str>, reason: String },
    /// A cloud tunnel failed for another reason it gave.
    #[error("{hop}: {reason}")]
    Tunnel { hop: Arc<str>, reason: String },
}

impl HopError {
    /// A short stable name for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            HopError::Unreachable { .. } => "hop_unreachable",
            HopError::SshAuth { .. } => "hop_ssh_auth",
            HopError::HostKeyUnknown { .. } => "hop_host_key_unknown",
            HopError::HostKeyChanged { .. } => "hop_host_key_changed",
            HopError::Ssh { .. } => "hop_ssh",
            HopError::ProxyAuth { .. } => "hop_proxy_auth",
            HopError::ProxyRefused { .. } => "hop_refused",
            HopError::TargetUnreachable { .. } => "hop_target_unreachable",
            HopError::Timeout { .. } => "hop_timeout",
            HopError::Protocol { .. } => "hop_protocol",
            HopError::Denied { .. } => "hop_denied",
            HopError::Credentials { .. } => "hop_credentials",
            HopError::Tunnel { .. } => "hop_tunnel",
        }
    }

    /// Whether the hop itself worked and the database's address did not
    /// answer from there.
    pub fn is_target_unreachable(&self) -> bool {
        matches!(self, HopError::TargetUnreachable { .. })
    }
}

impl Hop {
    /// The hop as a URL without credentials.
    pub fn name(&self) -> Arc<str> {
        self.name.clone()
    }

    /// `ssh`, `socks5` or `http`.
    pub fn kind(&self) -> &'static str {
        match &self.kind {
            Kind::Ssh(_) => "ssh",
            Kind::Socks5(_) => "socks5",
            Kind::Http(_) => "http",
            Kind::Iap(_) => "iap",
            Kind::Ssm(_) => "ssm",
        }
    }

    /// A byte stream to `host:port`, resolved and dialled by the hop, within
    /// `timeout` (an SSH login the bastion needs first has its own limit).
    pub async fn open(&self, host: &str, port: u16, timeout: Duration) -> Result<Socket, HopError> {
        let result = match &self.kind {
            Kind::Ssh(bastion) => bastion.open(host, port, timeout).await,
            Kind::Socks5(proxy) => {
                let dial = socks5::connect(&self.name, proxy, host, port);
                within(&self.name, timeout, dial).await.map(Socket::Tcp)
            }
            Kind::Http(proxy) => {
                within(&self.name, timeout, proxy.connect(&self.name, host, port)).await
            }
            Kind::Iap(iap) => iap.open(iap.vm_port(port, false), timeout).await,
            Kind::Ssm(ssm) => ssm.open(host, port, timeout).await,
        };
        match &result {
            Ok(_) => self.metrics.opened(),
            Err(e) => {
                tracing::debug!(hop = %self.name, error = %e, "the hop gave no stream");
                self.metrics.failed(e.label());
            }
        }
        result
    }

    /// For `/readiness`: why this hop cannot serve now, if it knows (a
    /// bastion whose last login failed).
    pub fn not_ready(&self) -> Option<String> {
        match &self.kind {
            Kind::Ssh(bastion) => bastion.not_ready(),
            _ => None,
        }
    }

    /// Ends the hop's cloud sessions (Session Manager's, terminated at the
    /// service) at once; the future is done when they have ended.
    pub fn close(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let ssm = match &self.kind {
            Kind::Ssm(ssm) => Some(ssm.clone()),
            Kind::Ssh(bastion) => bastion.session_manager(),
            _ => None,
        };
        if let Some(ssm) = &ssm {
            ssm.stop();
        }
        async move {
            if let Some(ssm) = ssm {
                ssm.ended().await;
            }
        }
    }

    /// An SSH bastion's login, started now (the first client needs none
    /// then); other hops have nothing to open ahead.
    pub fn warm_up(self: &Arc<Hop>) {
        if let Kind::Ssh(bastion) = &self.kind {
            bastion.clone().login_in_background();
        }
    }
}

async fn within<T>(
    hop: &Arc<str>,
    after: Duration,
    work: impl std::future::Future<Output = Result<T, HopError>>,
) -> Result<T, HopError> {
    tokio::time::timeout(after, work).await.unwrap_or_else(|_| {
        Err(HopError::Timeout {
            hop: hop.clone(),
            after,
        })
    })
}

/// TCP to a proxy (SOCKS5 or HTTP), each of its addresses in turn.
async fn dial_proxy(name: &Arc<str>, host: &str, port: u16) -> Result<TcpStream, HopError> {
    let unreachable = |reason: String| HopError::Unreachable {
        hop: name.clone(),
        reason,
    };
    let addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| unreachable(format!("could not resolve {host}: {e}")))?;
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(tcp) => {
                let _ = tcp.set_nodelay(true);
                return Ok(tcp);
            }
            Err(e) => last = Some(format!("connection to {addr} failed: {e}")),
        }
    }
    Err(unreachable(last.unwrap_or_else(|| {
        format!("{host} resolved to no address")
    })))
}

/// What the cloud tunnels need from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudSettings {
    /// The process environment: credential sources, endpoint variables.
    pub env: HashMap<String, String>,
    /// `--iap-endpoint`.
    pub iap_endpoint: String,
}

impl Default for CloudSettings {
    fn default() -> CloudSettings {
        CloudSettings {
            env: HashMap::new(),
            iap_endpoint: iap::DEFAULT_ENDPOINT.to_owned(),
        }
    }
}

/// Every hop the targets name, built once: targets that name the same
/// bastion share its one SSH connection.
pub struct Transports {
    ssh_config: Option<PathBuf>,
    cloud: CloudSettings,
    /// The private directory for the SSH control sockets, made on first use.
    control: Mutex<Option<Arc<ssh::ControlDir>>>,
    hops: Mutex<Vec<Arc<Hop>>>,
    registry: &'static metrics::Registry,
}

impl Transports {
    /// `ssh_config`: `--ssh-config`, else (`None`) the file `ssh` reads
    /// by itself, the user's `~/.ssh/config`
    /// ([`crate::platform::home::ssh_config_file`] says where that is).
    pub fn new(ssh_config: Option<PathBuf>, cloud: CloudSettings) -> Transports {
        Transports::with_registry(ssh_config, cloud, metrics::global())
    }

    pub fn with_registry(
        ssh_config: Option<PathBuf>,
        cloud: CloudSettings,
        registry: &'static metrics::Registry,
    ) -> Transports {
        Transports {
            ssh_config,
            cloud,
            control: Mutex::new(None),
            hops: Mutex::new(Vec::new()),
            registry,
        }
    }

    /// The hop for `via`, `None` for direct. Errors are configuration
    /// errors (the control directory, the proxy's TLS setup).
    pub fn hop(&self, via: &Via) -> Result<Option<Arc<Hop>>, String> {
        if via.is_direct() {
            return Ok(None);
        }
        let name: Arc<str> = via.to_string().into();
        let mut hops = self.hops.lock().unwrap_or_else(PoisonError::into_inner);
        // Same URL, same hop; a different password is a different proxy login.
        if let Some(existing) = hops
            .iter()
            .find(|h| h.name == name && same_credentials(&h.kind, via))
        {
            return Ok(Some(existing.clone()));
        }
        let metrics = self.registry.hop(&name, via.kind());
        let kind = match via {
            Via::Direct => return Ok(None),
            Via::Ssh(ssh_hop) => {
                let dir = self.control_dir()?;
                let index = hops.len();
                let under = match &ssh_hop.over {
                    None => None,
                    Some(tunnel @ Tunnel::Iap(iap_hop)) => {
                        Some(ssh::over::Under::Iap(Arc::new(iap::Iap::new(
                            iap_hop.clone(),
                            tunnel.to_string().into(),
                            &self.cloud.iap_endpoint,
                            self.cloud.env.clone(),
                        )?)))
                    }
                    Some(tunnel @ Tunnel::Ssm(ssm_hop)) => {
                        Some(ssh::over::Under::Ssm(Arc::new(ssm::Ssm::new(
                            ssm_hop.clone(),
                            tunnel.to_string().into(),
                            self.cloud.env.clone(),
                        ))))
                    }
                };
                Kind::Ssh(Arc::new(ssh::Bastion::new(
                    ssh_hop.clone(),
                    name.clone(),
                    self.ssh_config.clone(),
                    dir,
                    index,
                    metrics.clone(),
                    under,
                )))
            }
            Via::Socks5(proxy) => Kind::Socks5(proxy.clone()),
            Via::Http(proxy) => Kind::Http(http_connect::Proxy::new(proxy.clone())?),
            Via::Iap(iap_hop) => Kind::Iap(Arc::new(iap::Iap::new(
                iap_hop.clone(),
                name.clone(),
                &self.cloud.iap_endpoint,
                self.cloud.env.clone(),
            )?)),
            Via::Ssm(ssm_hop) => Kind::Ssm(Arc::new(ssm::Ssm::new(
                ssm_hop.clone(),
                name.clone(),
                self.cloud.env.clone(),
            ))),
        };
        let hop = Arc::new(Hop {
            name,
            kind,
            metrics,
        });
        hops.push(hop.clone());
        Ok(Some(hop))
    }

    fn control_dir(&self) -> Result<Arc<ssh::ControlDir>, String> {
        let mut control = self.control.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(dir) = control.as_ref() {
            return Ok(dir.clone());
        }
        let dir = Arc::new(ssh::ControlDir::create()?);
        *control = Some(dir.clone());
        Ok(dir)
    }

    /// Every hop built so far.
    pub fn hops(&self) -> Vec<Arc<Hop>> {
        self.hops
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Ends every SSH master connection (open channels end with them).
    pub fn shutdown(&self) {
        for hop in self.hops() {
            if let Kind::Ssh(bastion) = &hop.kind {
                bastion.shutdown();
            }
        }
    }
}

fn same_credentials(kind: &Kind, via: &Via) -> bool {
    match (kind, via) {
        (Kind::Ssh(_), Via::Ssh(_)) => true,
        (Kind::Socks5(a), Via::Socks5(b)) => a.credentials == b.credentials,
        (Kind::Http(a), Via::Http(b)) => a.hop().credentials == b.credentials,
        (Kind::Iap(_), Via::Iap(_)) | (Kind::Ssm(_), Via::Ssm(_)) => true,
        _ => false,
    }
}

impl Drop for Transports {
    fn drop(&mut self) {
        self.shutdown();
    }
}
