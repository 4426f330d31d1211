//! The real `keyhole` binary, started as a child process.
//!
//! Its stdout and stderr go to a log file in a private temporary directory
//! ([`Keyhole::logs`]). `PG*` and `KEYHOLE_*` variables are removed from its
//! environment so only the arguments (and any `env` the test passes) configure it;
//! `RUST_LOG` is inherited, to debug a test with more verbose logs.
//!
//! The process is never reaped before drop: [`Keyhole::wait_exit`] looks at its
//! exit without collecting it (`waitid` with `WNOWAIT`), so its PID cannot be
//! reused while the watchdog might still signal it.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::process::{clean_env, signal_pid, Watchdog};

/// How long keyhole may take to start listening.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// What [`Keyhole::spawn`] waits for before returning.
#[derive(Debug, Clone)]
pub enum Ready {
    /// keyhole listens on this TCP port (on any local address).
    Tcp(u16),
    /// keyhole listens on the Unix socket at this path.
    Unix(PathBuf),
    /// Do not wait.
    Nothing,
}

/// A running keyhole process; dropping it kills it.
pub struct Keyhole {
    child: Child,
    port: Option<u16>,
    log_path: PathBuf,
    exit: Option<ExitStatus>,
    /// Kills the process and deletes the log directory.
    watchdog: Watchdog,
}

impl Keyhole {
    /// Starts keyhole as `keyhole --port <free port> ARGS...` and waits until it
    /// listens there. If it exits first because the port was taken in the
    /// meantime, retries on another port; otherwise panics with its log.
    pub fn start(args: &[&str]) -> Keyhole {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = super::free_port();
            let mut keyhole = Keyhole::launch(&with_port(port, args), &[]);
            keyhole.port = Some(port);
            match keyhole.wait_ready(&Ready::Tcp(port), START_TIMEOUT) {
                Ok(()) => return keyhole,
                Err(log) if attempt < 5 && is_address_in_use(&log) => continue,
                Err(log) => panic!("keyhole {args:?} did not start:\n{log}"),
            }
        }
    }

    /// Starts keyhole as `keyhole --port PORT ARGS...` and waits until it listens.
    pub fn start_on(port: u16, args: &[&str]) -> Keyhole {
        let args = with_port(port, args);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Keyhole::spawn(&args, &[], Ready::Tcp(port))
    }

    /// Starts keyhole with exactly `args` and the extra environment `env`, and
    /// waits for `ready`. Panics with the log if it exits or is not ready in 20 s.
    pub fn spawn(args: &[&str], env: &[(&str, &str)], ready: Ready) -> Keyhole {
        let mut keyhole = Keyhole::launch(args, env);
        if let Ready::Tcp(port) = ready {
            keyhole.port = Some(port);
        }
        if let Err(log) = keyhole.wait_ready(&ready, START_TIMEOUT) {
            panic!("keyhole {args:?} did not start:\n{log}");
        }
        keyhole
    }

    /// Runs keyhole with exactly `args`, expecting it to exit on its own within
    /// `timeout` (a configuration error, `--help`, ...). Returns its exit status
    /// and everything it printed. Panics, after killing it, if it keeps running.
    pub fn start_expect_exit(args: &[&str], timeout: Duration) -> (ExitStatus, String) {
        Keyhole::start_expect_exit_with(args, &[], timeout)
    }

    /// [`Keyhole::start_expect_exit`] with the extra environment `env`.
    pub fn start_expect_exit_with(
        args: &[&str],
        env: &[(&str, &str)],
        timeout: Duration,
    ) -> (ExitStatus, String) {
        let mut keyhole = Keyhole::launch(args, env);
        match keyhole.wait_exit(timeout) {
            Some(status) => (status, keyhole.logs()),
            None => panic!(
                "keyhole {args:?} was expected to exit but still runs after {timeout:?}:\n{}",
                keyhole.logs()
            ),
        }
    }

    /// The TCP port keyhole was told to listen on.
    pub fn port(&self) -> u16 {
        self.port
            .expect("this keyhole was started without a TCP port")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// keyhole in front of `pg` (its CA, its target), with `extra` options
    /// before the usual ones.
    pub fn for_cluster(pg: &crate::support::postgres::PgCluster, extra: &[&str]) -> Keyhole {
        let ca = pg.pki.ca.to_str().expect("the CA path is UTF-8").to_owned();
        let target = pg.keyhole_target();
        let mut args: Vec<&str> = extra.to_vec();
        args.extend(["--ca-file", ca.as_str(), target.as_str()]);
        Keyhole::start(&args)
    }

    /// Everything keyhole wrote to stdout and stderr so far.
    pub fn logs(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits (up to 20 s) until `needle` occurs at least `count` times in the
    /// log, and returns the log. keyhole writes a connection's closed line
    /// after the client has seen the end of it, so tests that check a line
    /// must wait for it. Panics with the log if it never comes.
    pub fn wait_for_log(&self, needle: &str, count: usize) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let logs = self.logs();
            if logs.matches(needle).count() >= count {
                return logs;
            }
            if std::time::Instant::now() > deadline {
                panic!("keyhole never logged {needle:?} {count} time(s); its log:\n{logs}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Path of the log file (stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Sends `sig` (e.g. `libc::SIGTERM`). Harmless once keyhole has exited: the
    /// unreaped process cannot be replaced by another with the same PID.
    pub fn signal(&self, sig: libc::c_int) {
        signal_pid(self.pid(), sig);
    }

    /// Waits up to `timeout` for keyhole to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.peek_exit() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Has keyhole exited? Looks without reaping (see the module docs).
    fn peek_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_some() {
            return self.exit;
        }
        let pid = libc::id_t::try_from(self.pid()).expect("pid fits in id_t");
        // SAFETY: siginfo_t is plain old data; all-zero is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid, writable siginfo_t for the whole call.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        assert_eq!(rc, 0, "waitid: {}", std::io::Error::last_os_error());
        // SAFETY: waitid filled `info` for a child-state change (SIGCHLD layout);
        // with WNOHANG and no change it left si_pid at zero.
        let (pid, code, status) = unsafe { (info.si_pid(), info.si_code, info.si_status()) };
        if pid == 0 {
            return None;
        }
        // Rebuild the wait(2) status word that ExitStatus wraps.
        let raw = match code {
            libc::CLD_EXITED => (status & 0xff) << 8,
            libc::CLD_KILLED => status,
            libc::CLD_DUMPED => status | 0x80,
            _ => return None,
        };
        self.exit = Some(ExitStatus::from_raw(raw));
        self.exit
    }

    /// Spawns the process and its watchdog; does not wait for anything.
    fn launch<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &str)]) -> Keyhole {
        let tmp = super::scratch_dir("keyhole-log-");
        let log_path = tmp.path().join("keyhole.log");
        let log = File::create(&log_path).expect("create the keyhole log file");
        let log2 = log.try_clone().expect("clone the keyhole log file handle");

        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyhole"));
        clean_env(&mut cmd);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("KEYHOLE_") {
                cmd.env_remove(&key);
            }
        }
        cmd.args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {cmd:?}: {e}"));
        let pid = child.id().to_string();
        let watchdog = Watchdog::spawn(
            "a keyhole process",
            r#"kill -KILL "$1" 2>/dev/null; rm -rf "$2""#,
            &[OsStr::new(&pid), tmp.path().as_os_str()],
            false,
        );
        let _ = tmp.keep();
        Keyhole {
            child,
            port: None,
            log_path,
            exit: None,
            watchdog,
        }
    }

    /// Waits until keyhole listens as `ready` says. Err(log) if it exits first
    /// or does not get there within `timeout`.
    fn wait_ready(&mut self, ready: &Ready, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.peek_exit() {
                return Err(format!(
                    "keyhole exited ({status}); its log:\n{}",
                    self.logs()
                ));
            }
            let listening = match ready {
                Ready::Nothing => true,
                Ready::Tcp(port) => listens_tcp(self.pid(), *port),
                Ready::Unix(path) => listens_unix(self.pid(), path),
            };
            if listening {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "keyhole is not listening as {ready:?} after {timeout:?}; its log:\n{}",
                    self.logs()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Keyhole {
    fn drop(&mut self) {
        // Kill, let the watchdog (kill again: harmless on a zombie) delete the
        // log directory, and only then reap, so the PID stays ours throughout.
        if self.exit.is_none() {
            let _ = self.child.kill();
        }
        self.watchdog.fire();
        let _ = self.child.wait();
    }
}

/// `--port PORT` followed by `args`.
fn with_port(port: u16, args: &[&str]) -> Vec<String> {
    let mut all = vec!["--port".to_string(), port.to_string()];
    all.extend(args.iter().map(|a| a.to_string()));
    all
}

/// Does a log say that the listening address was taken?
fn is_address_in_use(log: &str) -> bool {
    let log = log.to_ascii_lowercase();
    log.contains("address already in use") || log.contains("addrinuse")
}

/// Does process `pid` hold a listening TCP socket on `port`? Checked in
/// /proc rather than by connecting: a connection would show up in keyhole's
/// logs and counters, and another process that happens to listen on the port
/// would answer it too. Falls back to connecting if /proc is not readable.
pub fn listens_tcp(pid: u32, port: u16) -> bool {
    let mut inodes = Vec::new();
    let mut readable = false;
    for table in ["tcp", "tcp6"] {
        let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        readable = true;
        // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let local_port = local
                .rsplit(':')
                .next()
                .and_then(|hex| u16::from_str_radix(hex, 16).ok());
            // State 0A is TCP_LISTEN.
            if local_port == Some(port) && *state == "0A" {
                inodes.push(inode.to_string());
            }
        }
    }
    if !readable {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        return TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok();
    }
    owns_socket_inode(pid, &inodes)
}

/// Does `pid` listen on the Unix socket `path`?
pub fn listens_unix(pid: u32, path: &Path) -> bool {
    let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/unix")) else {
        return std::os::unix::net::UnixStream::connect(path).is_ok();
    };
    let want = path.to_string_lossy();
    // Num RefCount Protocol Flags Type St Inode Path; flag 00010000 = accepting.
    let inodes: Vec<String> = text
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let listening = fields.get(3) == Some(&"00010000");
            (listening && fields.get(7) == Some(&want.as_ref()))
                .then(|| fields.get(6).map(|s| s.to_string()))
                .flatten()
        })
        .collect();
    owns_socket_inode(pid, &inodes)
}

/// Is one of `inodes` a socket among the open files of `pid`?
fn owns_socket_inode(pid: u32, inodes: &[String]) -> bool {
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        fs::read_link(fd.path()).is_ok_and(|target| {
            let target = target.to_string_lossy();
            inodes
                .iter()
                .any(|inode| target == format!("socket:[{inode}]"))
        })
    })
}
