//! Child processes: clean environments, the unprivileged user that runs PostgreSQL
//! when the tests run as root, commands with a time limit, and watchdogs that clean
//! up after the test process however it ends.

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

/// Strips the inherited environment of everything that would make a client or
/// server deviate from its defaults: every `PG*` variable (PGHOST, PGPORT,
/// PGSSLMODE, PGUSER, PGPASSWORD, PGDATA, ...) and the locale overrides that would
/// translate libpq's messages (tests match on them; `LC_MESSAGES=C` keeps them
/// English while the character type stays whatever the machine uses).
pub fn clean_env(cmd: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(&key);
        }
    }
    cmd.env_remove("LC_ALL")
        .env_remove("LANGUAGE")
        .env("LC_MESSAGES", "C")
}

/// Runs `cmd` to completion with stdin closed and stdout/stderr captured. Panics
/// (after killing it) if it runs longer than `limit`, so a hung client fails its
/// test instead of hanging the whole suite; panics too if it cannot be started.
pub fn output_with_timeout(cmd: &mut Command, limit: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("could not start {cmd:?}: {e}"));
    finish_with_timeout(child, &format!("{cmd:?}"), limit)
}

/// Collects the output of a child spawned with stdout and stderr piped, as
/// [`output_with_timeout`] does; `what` names it in panics.
pub fn finish_with_timeout(child: Child, what: &str, limit: Duration) -> Output {
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // The receiver only goes away if the test thread panicked already.
        let _ = tx.send(child.wait_with_output());
    });
    let result = match rx.recv_timeout(limit) {
        Ok(result) => result,
        Err(_) => {
            // The child is not reaped until wait_with_output returns, so the pid
            // still names it here.
            signal_pid(pid, libc::SIGKILL);
            let late = rx.recv().expect("waiter thread reports the killed child");
            let out = late.as_ref().map(describe_output).unwrap_or_default();
            panic!("{what} did not finish within {limit:?} and was killed\n{out}");
        }
    };
    result.unwrap_or_else(|e| panic!("waiting for {what} failed: {e}"))
}

/// Human-readable exit status, stdout and stderr of a finished command, for panics.
pub fn describe_output(out: &Output) -> String {
    format!(
        "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Sends `sig` to `pid`. The caller guarantees that `pid` still names its child
/// (not yet reaped), so the signal cannot reach a stranger.
pub fn signal_pid(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits in pid_t");
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    // ESRCH cannot happen for an unreaped child; other errors are not expected
    // for our own children, and a failed signal surfaces as a test failure later.
    unsafe { libc::kill(pid, sig) };
}

/// The unprivileged account that runs `initdb`, `pg_ctl` and `postgres`.
#[derive(Debug, Clone)]
pub struct ServerUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Who runs the PostgreSQL server programs: `None` when the tests are not root
/// (they then run as the current user); when root, the `postgres` system account
/// if there is one, else `keyhole-test`, created with `useradd` on first use.
/// PostgreSQL refuses to run as root, so there is no way around this.
pub fn server_user() -> Option<&'static ServerUser> {
    static USER: OnceLock<Option<ServerUser>> = OnceLock::new();
    USER.get_or_init(|| {
        // SAFETY: geteuid(2) cannot fail and touches no memory.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        if let Some(user) = lookup_user("postgres") {
            return Some(user);
        }
        if let Some(user) = lookup_user("keyhole-test") {
            return Some(user);
        }
        let out = output_with_timeout(
            Command::new("useradd").args([
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                "keyhole-test",
            ]),
            Duration::from_secs(60),
        );
        // Another test binary may have created it meanwhile (useradd exits 9):
        // look it up again either way and complain only if it is still missing.
        Some(lookup_user("keyhole-test").unwrap_or_else(|| {
            panic!(
                "running as root, there is no `postgres` user and `useradd keyhole-test` failed:\n{}",
                describe_output(&out)
            )
        }))
    })
    .as_ref()
}

/// Reads an account from the name service (`getent` also sees non-file sources).
fn lookup_user(name: &str) -> Option<ServerUser> {
    let out = Command::new("getent")
        .args(["passwd", name])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    // name:password:uid:gid:gecos:home:shell
    let line = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<&str> = line.trim_end().split(':').collect();
    Some(ServerUser {
        name: name.to_string(),
        uid: fields.get(2)?.parse().ok()?,
        gid: fields.get(3)?.parse().ok()?,
    })
}

/// Makes `cmd` run as the server user when the tests run as root (std drops the
/// supplementary groups too); no change otherwise.
pub fn as_server_user(cmd: &mut Command) -> &mut Command {
    if let Some(user) = server_user() {
        cmd.uid(user.uid).gid(user.gid);
    }
    cmd
}

/// Hands `path` and everything below it to the server user (no-op when not root),
/// so the server can read its key and the watchdog, running as that user, can
/// delete the whole tree. Symlinks themselves are changed, never followed.
pub fn chown_to_server_user(path: &Path) {
    let Some(user) = server_user() else { return };
    let meta =
        std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    if meta.uid() != user.uid || meta.gid() != user.gid {
        std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid))
            .unwrap_or_else(|e| panic!("chown {} to {}: {e}", path.display(), user.name));
    }
    if meta.is_dir() {
        let entries =
            std::fs::read_dir(path).unwrap_or_else(|e| panic!("list {}: {e}", path.display()));
        for entry in entries {
            let entry = entry.unwrap_or_else(|e| panic!("list {}: {e}", path.display()));
            chown_to_server_user(&entry.path());
        }
    }
}

/// A small `sh` process that runs a cleanup script once the test process is done
/// with a resource, however the test process ends.
///
/// The shell waits on a pipe whose write end only this struct holds. Dropping the
/// struct, calling [`Watchdog::fire`], or the test process dying in any way (panic,
/// `exit`, SIGKILL) closes the pipe; the shell then runs the cleanup. The shell
/// ignores INT/TERM/HUP/QUIT and sits in its own process group, so neither Ctrl-C
/// nor a test runner killing the test's process group stops it before it cleans.
pub struct Watchdog {
    what: String,
    state: Mutex<Option<(Child, ChildStdin)>>,
}

impl Watchdog {
    /// Starts `sh -c CLEANUP watchdog ARGS...`: CLEANUP sees ARGS as `$1`, `$2`...
    /// and runs when the pipe closes; `as_server` runs the shell (and so the
    /// cleanup) as [`server_user`]. `what` names the resource in panic messages.
    pub fn spawn(what: &str, cleanup: &str, args: &[&OsStr], as_server: bool) -> Watchdog {
        let script = format!("trap '' INT TERM HUP QUIT\nread -r _ || true\n{cleanup}\n");
        let mut cmd = Command::new("sh");
        clean_env(&mut cmd)
            .arg("-c")
            .arg(script)
            .arg("watchdog")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Somewhere the server user can enter: pg_ctl fails when it cannot
            // resolve its current directory (say, a checkout in root's home directory).
            .current_dir("/")
            .process_group(0);
        if as_server {
            as_server_user(&mut cmd);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("could not start the watchdog for {what}: {e}"));
        let stdin = child.stdin.take().expect("watchdog stdin is piped");
        Watchdog {
            what: what.to_string(),
            state: Mutex::new(Some((child, stdin))),
        }
    }

    /// Runs the cleanup now and waits until it has finished. Later calls do nothing.
    pub fn fire(&self) {
        // A panic elsewhere while the lock was held must not stop the cleanup.
        let taken = match self.state.lock() {
            Ok(mut guard) => guard.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some((mut child, stdin)) = taken {
            drop(stdin);
            if let Err(e) = child.wait() {
                eprintln!("waiting for the watchdog of {} failed: {e}", self.what);
            }
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.fire();
    }
}

/// Kills a child that outlives its time limit. The child must not be reaped
/// before [`KillAfter::disarm`] returns, so its PID cannot name a stranger.
pub struct KillAfter {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<bool>,
}

impl KillAfter {
    pub fn arm(pid: u32, limit: Duration) -> KillAfter {
        let (stop, stopped) = mpsc::channel();
        let thread = std::thread::spawn(move || match stopped.recv_timeout(limit) {
            Err(mpsc::RecvTimeoutError::Timeout) => {
                signal_pid(pid, libc::SIGKILL);
                true
            }
            _ => false,
        });
        KillAfter { stop, thread }
    }

    /// Stops the timer; true if it had fired.
    pub fn disarm(self) -> bool {
        let _ = self.stop.send(());
        self.thread.join().expect("the kill timer thread")
    }
}

/// Copies a server's data-directory `template` to `data_dir` (as the server
/// user, sparse: templates are mostly zeros) while the server's certificates
/// are generated into `pki_dir` for `names`; then hands the certificates to
/// the server user, which must own its key (mode 0600). `what` names the
/// template in a failure message.
pub fn copy_template_with_pki(
    what: &str,
    template: &Path,
    scratch: &Path,
    data_dir: &Path,
    pki_dir: std::path::PathBuf,
    names: &'static [&'static str],
) -> crate::support::certs::TestPki {
    let pki =
        std::thread::spawn(move || crate::support::certs::TestPki::generate_in(&pki_dir, names));
    let mut cp = Command::new("cp");
    as_server_user(&mut cp)
        .current_dir(scratch)
        .args(["-a", "--sparse=always"])
        .arg(template)
        .arg(data_dir);
    let out = output_with_timeout(&mut cp, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "copying the {what} template failed:\n{}",
        describe_output(&out)
    );
    let pki = pki
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    chown_to_server_user(&pki.dir);
    pki
}
