//! Listening sockets: TCP and Postgres-style Unix sockets, and the
//! [`Endpoint`] that names one (a target's identity across reloads). The
//! accept loop that serves them is in [`crate::proxy`].

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tokio::net::TcpListener;
#[cfg(keyhole_unix)]
use tokio::net::UnixListener;

use crate::net::Socket;

/// Where a client came from, for logs.
#[derive(Debug, Clone)]
pub enum Peer {
    Tcp(SocketAddr),
    Unix,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Tcp(addr) => write!(f, "{addr}"),
            Peer::Unix => f.write_str("unix"),
        }
    }
}

/// Where a listener listens: what identifies a target across reloads.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Endpoint {
    Tcp(SocketAddr),
    /// The socket file's path.
    Unix(PathBuf),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(addr) => write!(f, "{addr}"),
            Endpoint::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

impl Endpoint {
    /// The endpoints a target listens on: its TCP address, its Unix
    /// socket, or both.
    pub fn of(target: &crate::config::TargetConfig) -> Vec<Endpoint> {
        let tcp = target.listen.map(Endpoint::Tcp);
        let unix = target.unix_socket.clone().map(Endpoint::Unix);
        tcp.into_iter().chain(unix).collect()
    }

    pub fn bind(&self) -> Result<Listener, BindError> {
        match self {
            Endpoint::Tcp(addr) => Listener::bind_tcp(*addr),
            Endpoint::Unix(path) => Listener::bind_unix(path),
        }
    }
}

pub enum Listener {
    Tcp(TcpListener),
    /// Removes its socket file when dropped.
    #[cfg(keyhole_unix)]
    Unix(UnixListener, UnixSocketFile),
}

pub struct UnixSocketFile(PathBuf);

impl Drop for UnixSocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {what}: {source}")]
pub struct BindError {
    what: String,
    source: io::Error,
}

impl BindError {
    pub(crate) fn new(what: String, source: io::Error) -> BindError {
        BindError { what, source }
    }

    /// Whether another socket holds the address.
    pub fn is_address_in_use(&self) -> bool {
        self.source.kind() == io::ErrorKind::AddrInUse
    }
}

impl Listener {
    pub fn bind_tcp(addr: SocketAddr) -> Result<Listener, BindError> {
        let err = |source| BindError {
            what: addr.to_string(),
            source,
        };
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .map_err(err)?;
        // Rebinding past TIME_WAIT needs SO_REUSEADDR on Unix; on Windows it
        // would let another process bind the same port, and is not needed.
        #[cfg(not(windows))]
        socket.set_reuse_address(true).map_err(err)?;
        if addr.is_ipv6() {
            // [::] means IPv6 only here; bind 0.0.0.0 for IPv4.
            let _ = socket.set_only_v6(true);
        }
        socket.set_nonblocking(true).map_err(err)?;
        socket.bind(&addr.into()).map_err(err)?;
        socket.listen(1024).map_err(err)?;
        let listener = TcpListener::from_std(socket.into()).map_err(err)?;
        Ok(Listener::Tcp(listener))
    }

    /// Binds `path`, replacing a stale socket file that nobody listens on.
    #[cfg(keyhole_unix)]
    pub fn bind_unix(path: &Path) -> Result<Listener, BindError> {
        use std::os::unix::fs::FileTypeExt;
        let err = |source| BindError {
            what: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "a file that is not a socket is in the way",
                )));
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process is listening there",
                )));
            }
            std::fs::remove_file(path).map_err(err)?;
        }
        let listener = UnixListener::bind(path).map_err(err)?;
        Ok(Listener::Unix(listener, UnixSocketFile(path.to_owned())))
    }

    /// Without Unix sockets: refused (the configuration refuses such a
    /// target first, naming its option: [`crate::platform::check_target`]).
    #[cfg(not(keyhole_unix))]
    pub fn bind_unix(path: &Path) -> Result<Listener, BindError> {
        Err(BindError {
            what: path.display().to_string(),
            source: io::Error::new(
                io::ErrorKind::Unsupported,
                "this system has no Unix-socket listeners",
            ),
        })
    }

    pub async fn accept(&self) -> io::Result<(Socket, Peer)> {
        match self {
            Listener::Tcp(l) => {
                let (s, addr) = l.accept().await?;
                Ok((Socket::Tcp(s), Peer::Tcp(addr)))
            }
            #[cfg(keyhole_unix)]
            Listener::Unix(l, _) => {
                let (s, _) = l.accept().await?;
                Ok((Socket::Unix(s), Peer::Unix))
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp".into()),
            #[cfg(keyhole_unix)]
            Listener::Unix(_, file) => file.0.display().to_string(),
        }
    }
}

/// Whether an accept error is about this process's resources (back off and
/// go on) rather than one connection (go on at once).
#[cfg(keyhole_unix)]
pub fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Whether an accept error is about this process's resources: Winsock's
/// WSAEMFILE (10024) and WSAENOBUFS (10055), or memory.
#[cfg(not(keyhole_unix))]
pub fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(10024 | 10055)) || e.kind() == io::ErrorKind::OutOfMemory
}
