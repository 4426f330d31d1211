//! An SSH bastion, reached with the system's OpenSSH client so that
//! whatever the user's OpenSSH setup says holds for keyhole too: `HostName`,
//! `User`, `Port`, `IdentityFile`, the agent, `ProxyJump`,
//! `UserKnownHostsFile`, `StrictHostKeyChecking` (from the user's
//! `~/.ssh/config`, [`crate::platform::home::ssh_config_file`], or
//! `--ssh-config`).
//!
//! One master connection per bastion (`ssh -M -N`, a child of keyhole,
//! with its control socket in a private directory), opened once, kept
//! alive by `ServerAliveInterval`, and opened again by the next client after
//! it dies. Each client connection is a channel on it: keyhole speaks the
//! master's control protocol itself ([`mux`]), asks for a stdio forward to
//! the database's `host:port` (the bastion resolves and dials it, so a name
//! only the VPC's resolver knows works) and hands the master one end of a
//! socket pair ([`sys`]). The master then moves the bytes between that socket
//! and the channel; keyhole's TLS runs on the other end. No process is
//! started per connection, and no login.
//!
//! keyhole runs the master with `BatchMode=yes` (nothing to prompt on), so
//! an unknown or changed host key, or a key the bastion refuses, ends the
//! login with ssh's own message, which [`diagnose`] turns into a
//! [`HopError`] that says what to do. keyhole never writes known_hosts.

pub mod mux;
pub mod over;
pub(crate) mod sys;

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::UnixStream;

use super::HopError;
use crate::config::host_port;
use crate::config::via::SshHop;
use crate::metrics::HopMetrics;
use crate::net::Socket;

/// How long an SSH login may take (a `ProxyJump` chain is several logins).
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// A failed login is the answer for this long, so a burst of clients does
/// not start a burst of logins that will fail the same way.
const FAILURE_HOLD: Duration = Duration::from_secs(2);
/// Keep-alive: the master gives up on a bastion silent for 3 × 15 s.
const SERVER_ALIVE_INTERVAL: u32 = 15;
const SERVER_ALIVE_COUNT_MAX: u32 = 3;
/// Lines of the master's stderr kept for diagnosis.
const STDERR_LINES: usize = 32;

/// The private directory (mode 0700) of the control sockets, removed when
/// keyhole is done with it.
pub struct ControlDir {
    path: PathBuf,
}

impl ControlDir {
    pub fn create() -> Result<ControlDir, String> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        // Short: a socket path has about 100 bytes on every Unix.
        let path =
            std::env::temp_dir().join(format!("keyhole-ssh-{}-{nanos:x}", std::process::id()));
        crate::platform::files::create_private_dir(&path).map_err(|e| {
            format!(
                "cannot create the SSH control directory {}: {e}",
                path.display()
            )
        })?;
        Ok(ControlDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the directory now (at shutdown; tasks may hold it longer).
    pub fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

impl Drop for ControlDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// One bastion and its master connection.
pub struct Bastion {
    hop: SshHop,
    name: Arc<str>,
    ssh_config: Option<PathBuf>,
    dir: Arc<ControlDir>,
    control_path: PathBuf,
    /// One login at a time.
    login: tokio::sync::Mutex<()>,
    state: Mutex<State>,
    stderr: Arc<Mutex<Tail>>,
    next_request: AtomicU32,
    metrics: Arc<HopMetrics>,
    /// The cloud tunnel the master's connection runs over, if any.
    over: Option<Arc<over::Bridge>>,
}

#[derive(Default)]
struct State {
    master: Option<Master>,
    last_failure: Option<(Instant, HopError)>,
    generation: u64,
    shut_down: bool,
}

struct Master {
    pid: Option<u32>,
    alive: Arc<AtomicBool>,
}

/// The master's last stderr lines, numbered.
#[derive(Default)]
struct Tail {
    lines: VecDeque<(u64, String)>,
    next: u64,
}

impl Tail {
    fn push(&mut self, line: String) {
        if self.lines.len() == STDERR_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back((self.next, line));
        self.next += 1;
    }
}

/// Why a forward did not open.
enum ForwardError {
    /// The control socket did not answer: the master is gone.
    MasterGone(String),
    Hop(HopError),
}

impl Bastion {
    pub(super) fn new(
        hop: SshHop,
        name: Arc<str>,
        ssh_config: Option<PathBuf>,
        dir: Arc<ControlDir>,
        index: usize,
        metrics: Arc<HopMetrics>,
        under: Option<over::Under>,
    ) -> Bastion {
        let control_path = dir.path().join(index.to_string());
        let over = under.map(|under| {
            Arc::new(over::Bridge::new(
                under,
                dir.path().join(format!("{index}.tunnel")),
            ))
        });
        Bastion {
            hop,
            name,
            ssh_config,
            dir,
            control_path,
            login: tokio::sync::Mutex::new(()),
            state: Mutex::new(State::default()),
            stderr: Arc::new(Mutex::new(Tail::default())),
            next_request: AtomicU32::new(1),
            metrics,
            over,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_up(&self) -> bool {
        self.state()
            .master
            .as_ref()
            .is_some_and(|m| m.alive.load(Ordering::Acquire))
    }

    /// A channel to `host:port`, resolved and dialled by the bastion.
    pub(super) async fn open(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<Socket, HopError> {
        // A master that died since the last connection is noticed here, at
        // its control socket: log in again, once.
        let mut relogged = false;
        loop {
            self.ensure_master().await?;
            let forward = tokio::time::timeout(timeout, self.forward(host, port)).await;
            match forward {
                Ok(Ok(socket)) => return Ok(socket),
                Ok(Err(ForwardError::Hop(e))) => return Err(e),
                Ok(Err(ForwardError::MasterGone(reason))) if !relogged => {
                    tracing::info!(hop = %self.name, %reason, "the SSH master connection is gone; logging in again");
                    self.forget_master();
                    relogged = true;
                }
                Ok(Err(ForwardError::MasterGone(reason))) => {
                    return Err(HopError::Ssh {
                        hop: self.name.clone(),
                        reason: format!("the SSH connection went away: {reason}"),
                    })
                }
                Err(_) => {
                    return Err(HopError::TargetUnreachable {
                        hop: self.name.clone(),
                        target: host_port(host, port),
                        reason: format!(
                            "the bastion did not connect within {}",
                            crate::upstream::humanize(timeout)
                        ),
                    })
                }
            }
        }
    }

    /// Logs in unless a master is up.
    async fn ensure_master(&self) -> Result<(), HopError> {
        if self.is_up() {
            return Ok(());
        }
        let _one = self.login.lock().await;
        if self.is_up() {
            return Ok(());
        }
        {
            let state = self.state();
            if state.shut_down {
                return Err(HopError::Ssh {
                    hop: self.name.clone(),
                    reason: "keyhole is shutting down".into(),
                });
            }
            if let Some((at, e)) = &state.last_failure {
                if at.elapsed() < FAILURE_HOLD {
                    return Err(e.clone());
                }
            }
        }
        match self.log_in().await {
            Ok(()) => {
                self.metrics.login(None);
                Ok(())
            }
            Err(e) => {
                self.metrics.login(Some(e.label()));
                tracing::warn!(hop = %self.name, error = %e, "SSH login to the bastion failed");
                self.state().last_failure = Some((Instant::now(), e.clone()));
                Err(e)
            }
        }
    }

    /// Starts the master and waits for its control socket (it appears once
    /// the login has succeeded) or its exit.
    async fn log_in(&self) -> Result<(), HopError> {
        let _ = std::fs::remove_file(&self.control_path);
        let mut args = Vec::new();
        if let Some(bridge) = &self.over {
            bridge.listen().await?;
            bridge.take_error();
            let options = bridge.ssh_options().map_err(|reason| HopError::Ssh {
                hop: self.name.clone(),
                reason,
            })?;
            for option in options {
                args.push("-o".to_owned());
                args.push(option);
            }
        }
        args.extend(self.master_args());
        let mut command = tokio::process::Command::new("ssh");
        command.args(args);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        crate::platform::child::end_with_parent(command.as_std_mut());
        let started = Instant::now();
        let mut child = command.spawn().map_err(|e| HopError::Ssh {
            hop: self.name.clone(),
            reason: format!("cannot run ssh (is the OpenSSH client installed?): {e}"),
        })?;
        tracing::info!(hop = %self.name, "opening the SSH connection to the bastion");
        let reader = child.stderr.take().map(|stderr| {
            let tail = self.stderr.clone();
            let name = self.name.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::debug!(hop = %name, ssh = %line, "ssh said");
                    tail.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(line);
                }
            })
        });
        let first_line = self.stderr_mark();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                if let Some(reader) = reader {
                    let _ = tokio::time::timeout(Duration::from_millis(500), reader).await;
                }
                // Through a cloud tunnel, ssh saw only its connection
                // close: the tunnel's own error says why.
                if let Some(e) = self.over.as_ref().and_then(|b| b.take_error()) {
                    return Err(e);
                }
                let said = self.stderr_since(first_line);
                return Err(diagnose(&self.name, &said, status.code()));
            }
            if UnixStream::connect(&self.control_path).await.is_ok() {
                break;
            }
            if started.elapsed() > LOGIN_TIMEOUT {
                let _ = child.start_kill();
                return Err(HopError::Timeout {
                    hop: self.name.clone(),
                    after: LOGIN_TIMEOUT,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let alive = Arc::new(AtomicBool::new(true));
        let generation = {
            let mut state = self.state();
            state.generation += 1;
            state.last_failure = None;
            state.master = Some(Master {
                pid: child.id(),
                alive: alive.clone(),
            });
            state.generation
        };
        tracing::info!(hop = %self.name, took_ms = started.elapsed().as_millis() as u64, "SSH connection to the bastion open");
        self.metrics.set_up(true);
        // The watcher owns the child: when the master exits, the next
        // client logs in again.
        let name = self.name.clone();
        let tail = self.stderr.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            alive.store(false, Ordering::Release);
            metrics.set_up(false);
            let last = tail
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .lines
                .back()
                .map(|(_, l)| l.clone())
                .unwrap_or_default();
            tracing::warn!(hop = %name, generation, status = ?status.ok().and_then(|s| s.code()), ssh = %last, "the SSH connection to the bastion ended; the next connection opens a new one");
        });
        Ok(())
    }

    fn master_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(config) = &self.ssh_config {
            args.push("-F".to_owned());
            args.push(config.display().to_string());
        }
        // '%' is a token in ControlPath.
        let control = self.control_path.display().to_string().replace('%', "%%");
        for option in [
            "ControlMaster=yes".to_owned(),
            format!("ControlPath={control}"),
            "ControlPersist=no".to_owned(),
            // Nothing to prompt on: a login that needs a person fails with
            // ssh's own message instead.
            "BatchMode=yes".to_owned(),
            "ClearAllForwardings=yes".to_owned(),
            // Only a connection: no remote or local command of the user's.
            "RemoteCommand=none".to_owned(),
            "PermitLocalCommand=no".to_owned(),
            format!("ServerAliveInterval={SERVER_ALIVE_INTERVAL}"),
            format!("ServerAliveCountMax={SERVER_ALIVE_COUNT_MAX}"),
            // A channel that fails to open is logged at INFO: keyhole reads why.
            "LogLevel=INFO".to_owned(),
        ] {
            args.push("-o".to_owned());
            args.push(option);
        }
        args.extend(["-N", "-T"].map(str::to_owned));
        if let Some(user) = &self.hop.user {
            args.push("-l".to_owned());
            args.push(user.clone());
        }
        if let Some(port) = self.hop.port {
            args.push("-p".to_owned());
            args.push(port.to_string());
        }
        args.push("--".to_owned());
        args.push(self.hop.host.clone());
        args
    }

    fn stderr_mark(&self) -> u64 {
        self.stderr
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .next
    }

    fn stderr_since(&self, mark: u64) -> Vec<String> {
        self.stderr
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .lines
            .iter()
            .filter(|(n, _)| *n >= mark)
            .map(|(_, l)| l.clone())
            .collect()
    }

    fn forget_master(&self) {
        let mut state = self.state();
        if let Some(master) = state.master.take() {
            master.alive.store(false, Ordering::Release);
            if let Some(pid) = master.pid {
                terminate(pid);
            }
        }
    }

    /// Asks the master for a stdio forward to `host:port`.
    async fn forward(&self, host: &str, port: u16) -> Result<Socket, ForwardError> {
        let gone = |e: std::io::Error| ForwardError::MasterGone(e.to_string());
        let mut control = UnixStream::connect(&self.control_path)
            .await
            .map_err(gone)?;
        control.write_all(&mux::hello()).await.map_err(gone)?;
        let mut buf = Vec::with_capacity(256);
        match read_reply(&mut control, &mut buf).await {
            Ok(mux::Reply::Hello {
                version: mux::VERSION,
            }) => {}
            Ok(mux::Reply::Hello { version }) => {
                return Err(ForwardError::Hop(HopError::Ssh {
                    hop: self.name.clone(),
                    reason: format!(
                        "the ssh master speaks control protocol {version}, keyhole speaks {}",
                        mux::VERSION
                    ),
                }))
            }
            Ok(other) => return Err(ForwardError::MasterGone(format!("unexpected {other:?}"))),
            Err(reason) => return Err(ForwardError::MasterGone(reason)),
        }
        let request_id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let mark = self.stderr_mark();
        control
            .write_all(&mux::stdio_forward(request_id, host, port))
            .await
            .map_err(gone)?;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(gone)?;
        for _ in 0..2 {
            loop {
                control.writable().await.map_err(gone)?;
                match control.try_io(Interest::WRITABLE, || {
                    sys::send_fd(control.as_fd(), theirs.as_fd())
                }) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(gone(e)),
                }
            }
        }
        // The master holds its own copies now.
        drop(theirs);
        let target = host_port(host, port);
        match read_reply(&mut control, &mut buf).await {
            Ok(mux::Reply::SessionOpened { .. }) => {}
            Ok(mux::Reply::Failure { reason, .. }) => {
                let said = self.open_failure_since(mark).await;
                return Err(ForwardError::Hop(HopError::TargetUnreachable {
                    hop: self.name.clone(),
                    target,
                    reason: said.unwrap_or(reason),
                }));
            }
            Ok(mux::Reply::PermissionDenied { reason, .. }) => {
                return Err(ForwardError::Hop(HopError::ProxyRefused {
                    hop: self.name.clone(),
                    target,
                    reason: format!("the ssh master refused the forward: {reason}"),
                }))
            }
            Ok(other) => return Err(ForwardError::MasterGone(format!("unexpected {other:?}"))),
            Err(reason) => return Err(ForwardError::MasterGone(reason)),
        }
        ours.set_nonblocking(true).map_err(gone)?;
        let ours = UnixStream::from_std(ours).map_err(gone)?;
        // The forward lives as long as its control connection: hold it
        // until the master closes it (the channel ended) or the master dies.
        tokio::spawn(async move {
            let mut sink = [0u8; 256];
            while matches!(control.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        Ok(Socket::Unix(ours))
    }

    /// The master's words for a channel that failed to open ("connect
    /// failed: Connection refused"), logged just before its reply.
    async fn open_failure_since(&self, mark: u64) -> Option<String> {
        for _ in 0..15 {
            let found = self.stderr_since(mark).into_iter().rev().find_map(|line| {
                line.split_once("open failed: ")
                    .map(|(_, why)| why.trim().to_owned())
            });
            if found.is_some() {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// The Session Manager hop under this bastion, if it runs over one.
    pub(super) fn session_manager(&self) -> Option<Arc<crate::transport::ssm::Ssm>> {
        self.over.as_ref().and_then(|b| b.session_manager())
    }

    /// For `/readiness`: the last login's failure, while no master is up.
    pub(super) fn not_ready(&self) -> Option<String> {
        let state = self.state();
        if state
            .master
            .as_ref()
            .is_some_and(|m| m.alive.load(Ordering::Acquire))
        {
            return None;
        }
        state.last_failure.as_ref().map(|(_, e)| e.to_string())
    }

    /// Logs in now, in the background (at start, unless lazy).
    pub(super) fn login_in_background(self: Arc<Bastion>) {
        tokio::spawn(async move {
            let _ = self.ensure_master().await;
        });
    }

    /// Ends the master connection; no new one is opened.
    pub(super) fn shutdown(&self) {
        self.state().shut_down = true;
        self.forget_master();
        let _ = std::fs::remove_file(&self.control_path);
        self.dir.remove();
    }
}

fn terminate(pid: u32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
}

/// Reads one message from the master.
async fn read_reply(control: &mut UnixStream, buf: &mut Vec<u8>) -> Result<mux::Reply, String> {
    loop {
        match mux::decode(buf) {
            Ok(Some((reply, used))) => {
                buf.drain(..used);
                return Ok(reply);
            }
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
        let mut chunk = [0u8; 512];
        match control.read(&mut chunk).await {
            Ok(0) => return Err("the ssh master closed the control connection".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// What a master that exited during login said, as the error a user can act on.
pub fn diagnose(hop: &Arc<str>, stderr: &[String], status: Option<i32>) -> HopError {
    let hop = hop.clone();
    let has = |needle: &str| stderr.iter().any(|l| l.contains(needle));
    if has("REMOTE HOST IDENTIFICATION HAS CHANGED")
        || has("has changed and you have requested strict checking")
    {
        return HopError::HostKeyChanged { hop };
    }
    if has("Host key verification failed") || has("host key is known for") {
        return HopError::HostKeyUnknown { hop };
    }
    let last = stderr
        .iter()
        .rev()
        .map(|l| l.trim())
        .find(|l| !l.is_empty() && !l.starts_with("Warning: Permanently added"))
        .unwrap_or("")
        .chars()
        .take(300)
        .collect::<String>();
    if has("Permission denied") || has("Too many authentication failures") {
        return HopError::SshAuth { hop, detail: last };
    }
    let unreachable = [
        "Could not resolve hostname",
        "Connection refused",
        "Connection timed out",
        "No route to host",
        "Network is unreachable",
        "Connection closed by",
        "Connection reset by",
        "kex_exchange_identification",
        "Operation timed out",
    ];
    if unreachable.iter().any(|n| has(n)) {
        return HopError::Unreachable { hop, reason: last };
    }
    let reason = if last.is_empty() {
        format!(
            "ssh exited with status {} and said nothing",
            status.map_or("?".into(), |s| s.to_string())
        )
    } else {
        format!("ssh exited: {last}")
    };
    HopError::Ssh { hop, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn ssh_failures_become_errors_that_say_what_to_do() {
        let hop: Arc<str> = "ssh://bastion".into();
        let changed = diagnose(&hop, &lines("@@@@@@@@@@@\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\nHost key verification failed."), Some(255));
        assert!(matches!(changed, HopError::HostKeyChanged { .. }));
        assert!(changed.to_string().contains("ssh-keygen -R"), "{changed}");
        let unknown = diagnose(&hop, &lines("No ED25519 host key is known for [10.0.0.2]:22 and you have requested strict checking.\nHost key verification failed."), Some(255));
        assert!(matches!(unknown, HopError::HostKeyUnknown { .. }));
        assert!(unknown.to_string().contains("never adds"), "{unknown}");
        let auth = diagnose(
            &hop,
            &lines("root@10.0.0.2: Permission denied (publickey)."),
            Some(255),
        );
        assert!(matches!(auth, HopError::SshAuth { .. }));
        assert!(
            auth.to_string().contains("Permission denied (publickey)"),
            "{auth}"
        );
        let down = diagnose(
            &hop,
            &lines("ssh: connect to host 10.0.0.2 port 22: Connection refused"),
            Some(255),
        );
        assert!(matches!(down, HopError::Unreachable { .. }), "{down}");
        let name = diagnose(
            &hop,
            &lines("ssh: Could not resolve hostname nowhere: Name or service not known"),
            Some(255),
        );
        assert!(matches!(name, HopError::Unreachable { .. }), "{name}");
        let quiet = diagnose(&hop, &[], Some(255));
        assert!(quiet.to_string().contains("status 255"), "{quiet}");
    }

    #[test]
    fn the_master_runs_with_the_users_config_and_keyholes_own_settings() {
        let dir = Arc::new(ControlDir::create().expect("dir"));
        let bastion = Bastion::new(
            SshHop {
                user: Some("alice".into()),
                host: "bastion".into(),
                port: Some(2222),
                over: None,
            },
            "ssh://alice@bastion:2222".into(),
            Some(PathBuf::from("/etc/keyhole/ssh_config")),
            dir.clone(),
            0,
            Arc::new(HopMetrics::new("ssh://alice@bastion:2222", "ssh")),
            None,
        );
        let args = bastion.master_args();
        let joined = args.join(" ");
        assert!(
            joined.starts_with("-F /etc/keyhole/ssh_config "),
            "{joined}"
        );
        for expected in [
            "-o ControlMaster=yes",
            "-o BatchMode=yes",
            "-N",
            "-l alice",
            "-p 2222",
        ] {
            assert!(joined.contains(expected), "{expected} in {joined}");
        }
        assert_eq!(args.last().map(String::as_str), Some("bastion"));
        assert!(joined.contains(&format!("ControlPath={}/0", dir.path().display())));
        let mode = std::fs::metadata(dir.path())
            .ok()
            .and_then(|m| crate::platform::files::mode(&m));
        assert_eq!(mode, Some(crate::platform::files::PRIVATE_DIR_MODE));
    }
}
