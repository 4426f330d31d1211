//! The service manager's notification protocol (systemd's `sd_notify`),
//! spoken without libsystemd: one datagram per state change to the Unix
//! socket `$NOTIFY_SOCKET` names.
//!
//! - `READY=1` once every listener is bound (and, with
//!   `--run-connection-test`, after the test passed), so a unit with
//!   `Type=notify` is "started" exactly when keyhole serves; again after
//!   each reload, which `RELOADING=1` announced.
//! - `STOPPING=1` when the drain starts.
//! - `WATCHDOG=1` every half of `WatchdogSec` while the runtime runs
//!   (a stuck runtime stops the pings, and systemd restarts keyhole).
//! - `STATUS=...`: one line for `systemctl status`.
//!
//! Outside systemd (`NOTIFY_SOCKET` unset) every call does nothing. The
//! variable is removed from the environment at start, so processes keyhole
//! runs (ssh, clients of `keyhole connect`) cannot speak for it.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

/// Where notifications go, read once at start.
static NOTIFIER: OnceLock<Option<Notifier>> = OnceLock::new();

struct Notifier {
    socket: UnixDatagram,
    to: Destination,
    /// `WATCHDOG_USEC`, if the watchdog is on and meant for this process.
    watchdog: Option<Duration>,
}

enum Destination {
    Path(PathBuf),
    /// `@name`: Linux's abstract namespace.
    #[cfg(target_os = "linux")]
    Abstract(Vec<u8>),
}

/// Reads `NOTIFY_SOCKET` and the watchdog's variables, then removes them
/// from the environment. Call once, before any thread or child process.
pub fn init() {
    let notifier = from_env(
        std::env::var_os("NOTIFY_SOCKET"),
        std::env::var("WATCHDOG_USEC").ok(),
        std::env::var("WATCHDOG_PID").ok(),
        std::process::id(),
    );
    for name in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
        std::env::remove_var(name);
    }
    let _ = NOTIFIER.set(notifier);
}

fn from_env(
    socket: Option<std::ffi::OsString>,
    watchdog_usec: Option<String>,
    watchdog_pid: Option<String>,
    pid: u32,
) -> Option<Notifier> {
    let socket = socket.filter(|s| !s.is_empty())?;
    let to = destination(socket)?;
    // The watchdog is this process's only if WATCHDOG_PID is unset or ours.
    let ours = watchdog_pid.is_none_or(|p| p.trim().parse::<u32>() == Ok(pid));
    let watchdog = watchdog_usec
        .and_then(|u| u.trim().parse::<u64>().ok())
        .filter(|&u| u > 0 && ours)
        .map(Duration::from_micros);
    let socket = match UnixDatagram::unbound() {
        Ok(socket) => socket,
        Err(e) => {
            eprintln!("keyhole: cannot tell the service manager anything: {e}");
            return None;
        }
    };
    Some(Notifier {
        socket,
        to,
        watchdog,
    })
}

fn destination(socket: std::ffi::OsString) -> Option<Destination> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = socket.as_bytes();
    match bytes.first() {
        Some(b'/') => Some(Destination::Path(PathBuf::from(socket))),
        #[cfg(target_os = "linux")]
        Some(b'@') => Some(Destination::Abstract(bytes[1..].to_vec())),
        _ => {
            // vsock: and relative paths are not for a local service.
            eprintln!(
                "keyhole: NOTIFY_SOCKET={} is not a socket keyhole can reach; no notifications",
                socket.to_string_lossy()
            );
            None
        }
    }
}

impl Notifier {
    fn send(&self, state: &str) -> std::io::Result<()> {
        match &self.to {
            Destination::Path(path) => self.socket.send_to(state.as_bytes(), path).map(drop),
            #[cfg(target_os = "linux")]
            Destination::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                self.socket.send_to_addr(state.as_bytes(), &addr).map(drop)
            }
        }
    }
}

fn notify(state: &str) {
    if let Some(Some(notifier)) = NOTIFIER.get() {
        if let Err(e) = notifier.send(state) {
            tracing::warn!(error = %e, "cannot notify the service manager");
        }
    }
}

/// keyhole serves: every listener is bound.
pub fn ready(status: &str) {
    notify(&format!("READY=1\nSTATUS={}", one_line(status)));
}

/// A reload starts; [`ready`] ends it.
pub fn reloading() {
    notify(&format!(
        "RELOADING=1\nMONOTONIC_USEC={}",
        monotonic_usec().unwrap_or(0)
    ));
}

/// The drain starts.
pub fn stopping(status: &str) {
    notify(&format!("STOPPING=1\nSTATUS={}", one_line(status)));
}

/// Pings the watchdog every half of `WatchdogSec` from a task of the
/// current runtime, if systemd asked for it.
pub fn spawn_watchdog() {
    let Some(Some(Notifier {
        watchdog: Some(every),
        ..
    })) = NOTIFIER.get()
    else {
        return;
    };
    let every = *every / 2;
    tracing::info!(
        every_ms = every.as_millis() as u64,
        "pinging the systemd watchdog"
    );
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            notify("WATCHDOG=1");
        }
    });
}

/// A status on one line (systemd shows the first line only).
fn one_line(status: &str) -> String {
    status.replace('\n', " ")
}

/// CLOCK_MONOTONIC in microseconds, as systemd wants it with RELOADING=1.
fn monotonic_usec() -> Option<u64> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    if rc != 0 {
        return None;
    }
    let secs = u64::try_from(now.tv_sec).ok()?;
    let nanos = u64::try_from(now.tv_nsec).ok()?;
    Some(secs * 1_000_000 + nanos / 1_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_socket_path_or_abstract_name_is_used() {
        assert!(from_env(None, None, None, 1).is_none());
        assert!(from_env(Some("".into()), None, None, 1).is_none());
        assert!(from_env(Some("vsock:2:1".into()), None, None, 1).is_none());
        assert!(from_env(Some("relative/path".into()), None, None, 1).is_none());
        assert!(from_env(Some("/run/systemd/notify".into()), None, None, 1).is_some());
        #[cfg(target_os = "linux")]
        assert!(matches!(
            from_env(Some("@abstract".into()), None, None, 1).map(|n| n.to),
            Some(Destination::Abstract(name)) if name == b"abstract"
        ));
    }

    #[test]
    fn the_watchdog_is_ours_only_when_its_pid_is_ours_or_unset() {
        let watchdog = |usec: Option<&str>, pid: Option<&str>| {
            from_env(
                Some("/run/n".into()),
                usec.map(str::to_owned),
                pid.map(str::to_owned),
                42,
            )
            .and_then(|n| n.watchdog)
        };
        assert_eq!(
            watchdog(Some("30000000"), None),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            watchdog(Some("30000000"), Some("42")),
            Some(Duration::from_secs(30))
        );
        assert_eq!(watchdog(Some("30000000"), Some("7")), None);
        assert_eq!(watchdog(Some("0"), None), None);
        assert_eq!(watchdog(Some("soon"), None), None);
        assert_eq!(watchdog(None, None), None);
    }

    #[test]
    fn a_status_stays_on_one_line() {
        assert_eq!(one_line("a\nb"), "a b");
        assert!(monotonic_usec().is_some_and(|u| u > 0));
    }
}
