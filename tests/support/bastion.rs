//! Real bastions inside a [`Namespace`]: OpenSSH's `sshd`, dante's `danted`
//! (SOCKS5 without authentication), `microsocks` (SOCKS5 with user name and
//! password) and `tinyproxy` (HTTP CONNECT, optional basic authentication),
//! each from its Debian package, each listening on the namespace's veth
//! address (`ns_ip`) so the host reaches it the way a laptop reaches a
//! bastion, and each able to reach the namespace's own loopback (where
//! [`Namespace::relay_to`] puts the database) and the names of
//! [`Namespace::set_hosts`].
//!
//! Every server runs in the foreground as a child of the test process with a
//! config written into its own scratch directory (deleted by a watchdog), and a
//! [`Watchdog`] that kills it and all its descendants however the test process
//! ends; dropping the handle does the same. A server is ready when the host can
//! open a TCP connection to it; if that takes more than 10 s the start panics
//! with the server's log.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::netns::{require_program, Namespace, NsExec};
use super::process::{describe_output, output_with_timeout, signal_pid, Watchdog};

/// How long a server may take to accept its first connection.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Kills `$1` and all its descendants: stopped first, so none forks meanwhile.
const KILL_TREE: &str = r#"kt() {
  kill -STOP "$1" 2>/dev/null
  for c in $(pgrep -P "$1" 2>/dev/null); do kt "$c"; done
  kill -KILL "$1" 2>/dev/null
}
kt "$1""#;

// ---------------------------------------------------------------------------
// Processes

/// The (pid, parent pid) of every process, from /proc.
fn process_table() -> Vec<(u32, u32)> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(entry.path().join("stat")).ok()?;
            // "pid (comm) state ppid ...": comm may hold anything, even ")".
            let rest = &stat[stat.rfind(')')? + 1..];
            let ppid = rest.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect()
}

/// SIGKILLs `root` (an unreaped child of ours) and every descendant. Each is
/// stopped before its children are looked up, so none can fork meanwhile.
fn kill_tree(root: u32) {
    signal_pid(root, libc::SIGSTOP);
    let mut family = vec![root];
    loop {
        let born: Vec<u32> = process_table()
            .into_iter()
            .filter(|(pid, ppid)| family.contains(ppid) && !family.contains(pid))
            .map(|(pid, _)| pid)
            .collect();
        if born.is_empty() {
            break;
        }
        for &pid in &born {
            signal_pid(pid, libc::SIGSTOP);
        }
        family.extend(born);
    }
    for pid in family {
        signal_pid(pid, libc::SIGKILL);
    }
}

/// One run of a server: the child and the watchdog that kills its tree.
struct Daemon {
    child: Child,
    exited: bool,
    watchdog: Watchdog,
}

impl Daemon {
    /// Starts `cmd` with stdout and stderr appended to `output`.
    fn spawn(what: &str, mut cmd: Command, output: &Path) -> Daemon {
        let out = File::options()
            .create(true)
            .append(true)
            .open(output)
            .unwrap_or_else(|e| panic!("open {}: {e}", output.display()));
        let err = out.try_clone().expect("clone a log file handle");
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {what} ({cmd:?}): {e}"));
        let pid = child.id().to_string();
        let watchdog = Watchdog::spawn(what, KILL_TREE, &[OsStr::new(&pid)], false);
        Daemon {
            child,
            exited: false,
            watchdog,
        }
    }

    /// `Some(description)` once the process has exited.
    fn exit_status(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.exited = true;
                Some(status.to_string())
            }
            Ok(None) => None,
            Err(e) => Some(format!("cannot be waited for: {e}")),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Kill and let the watchdog (harmless again) finish before reaping,
        // so the PID cannot name a stranger meanwhile.
        if !self.exited {
            kill_tree(self.child.id());
        }
        self.watchdog.fire();
        let _ = self.child.wait();
    }
}

/// A server inside a namespace that can be killed and started again with the
/// same command line, in a scratch directory of its own.
struct Server {
    what: String,
    exec: NsExec,
    program: PathBuf,
    args: Vec<OsString>,
    addr: SocketAddr,
    dir: PathBuf,
    /// The server's own log file, if it keeps one apart from stdout/stderr.
    log_file: Option<PathBuf>,
    /// stdout and stderr.
    output: PathBuf,
    daemon: Mutex<Option<Daemon>>,
    dir_watchdog: Watchdog,
}

impl Server {
    /// A fresh scratch directory (deleted by a watchdog) for a server.
    fn scratch(prefix: &str) -> (PathBuf, Watchdog) {
        let tmp = super::scratch_dir(prefix);
        let dir = tmp.path().to_path_buf();
        let watchdog = Watchdog::spawn(
            "a bastion's scratch directory",
            r#"rm -rf "$1""#,
            &[dir.as_os_str()],
            false,
        );
        let _ = tmp.keep();
        (dir, watchdog)
    }

    fn running(&self) -> bool {
        self.daemon
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Starts the process (killing a running one first) and waits until the
    /// host can connect to `addr`.
    fn start(&self) {
        self.kill();
        let mut cmd = self.exec.command(&self.program);
        cmd.args(&self.args).current_dir(&self.dir);
        let mut daemon = Daemon::spawn(&self.what, cmd, &self.output);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = daemon.exit_status() {
                panic!(
                    "{} exited before it listened on {} ({status}); its log:\n{}",
                    self.what,
                    self.addr,
                    self.log()
                );
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(250)).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                drop(daemon);
                panic!(
                    "{} does not accept connections on {} after {READY_TIMEOUT:?}; its log:\n{}",
                    self.what,
                    self.addr,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        *self.daemon.lock().unwrap_or_else(|p| p.into_inner()) = Some(daemon);
    }

    /// Kills the process and all its descendants; nothing if it is not running.
    fn kill(&self) {
        let daemon = self.daemon.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(daemon);
    }

    /// The log file (if any), then stdout and stderr.
    fn log(&self) -> String {
        let mut text = self
            .log_file
            .as_ref()
            .map(|f| fs::read_to_string(f).unwrap_or_default())
            .unwrap_or_default();
        let output = fs::read_to_string(&self.output).unwrap_or_default();
        if !output.is_empty() {
            if !text.is_empty() {
                text.push_str("--- stdout/stderr ---\n");
            }
            text.push_str(&output);
        }
        text
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        self.dir_watchdog.fire();
    }
}

/// Writes `text` to `path`, panicking with the path on failure.
fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// A config value, double-quoted if it holds a blank.
fn quoted(value: &Path) -> String {
    let value = value.display().to_string();
    if value.contains(char::is_whitespace) {
        format!("\"{value}\"")
    } else {
        value
    }
}

// ---------------------------------------------------------------------------
// OpenSSH

/// The invoking user's login name (who the bastion lets in).
fn current_user() -> String {
    let out = output_with_timeout(Command::new("id").arg("-un"), Duration::from_secs(10));
    assert!(out.status.success(), "id -un: {}", describe_output(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `ssh-keygen` a fresh passphrase-less ed25519 key at `path` (and
/// `path.pub`); the public key line ("ssh-ed25519 AAAA...").
fn ed25519_key(path: &Path, comment: &str) -> String {
    let ssh_keygen = require_program("ssh-keygen", "openssh-client");
    let out = output_with_timeout(
        Command::new(ssh_keygen)
            .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
            .arg(path),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "ssh-keygen -f {}: {}",
        path.display(),
        describe_output(&out)
    );
    let public = fs::read_to_string(path.with_extension("pub"))
        .unwrap_or_else(|e| panic!("read {}.pub: {e}", path.display()));
    // "type base64 comment": known_hosts lines take the first two.
    public
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// sshd's version as (major, minor), from `sshd -V` (older ones print it in
/// their usage message).
fn sshd_version(sshd: &Path) -> (u32, u32) {
    let out = output_with_timeout(Command::new(sshd).arg("-V"), Duration::from_secs(10));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let version = text
        .split("OpenSSH_")
        .nth(1)
        .map(|v| {
            v.chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect::<String>()
        })
        .unwrap_or_default();
    let mut parts = version.split('.').map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// OpenSSH's sshd inside a namespace on `ns_ip:22` (or the next free port):
/// a fresh ed25519 host key, public-key authentication only, the invoking user
/// (root) allowed in with [`SshBastion::client_key`], TCP forwarding on,
/// `LogLevel VERBOSE` into [`SshBastion::log`].
pub struct SshBastion {
    /// Where the host reaches it: `ns_ip:port`.
    pub addr: SocketAddr,
    /// The authorized client key (private; `.pub` next to it).
    pub client_key: PathBuf,
    /// A known_hosts file with the host key for `ns_ip` (`[ns_ip]:port` off 22).
    pub known_hosts: PathBuf,
    /// The scratch directory holding keys, configs and logs.
    pub dir: PathBuf,
    /// The user the configs log in as (the invoking user).
    pub user: String,
    /// The host key's public line, "ssh-ed25519 AAAA...".
    pub host_public_key: String,
    /// A client key that is not authorized.
    pub wrong_key: PathBuf,
    known_hosts_empty: PathBuf,
    known_hosts_changed: PathBuf,
    log_path: PathBuf,
    server: Server,
}

impl SshBastion {
    /// Starts sshd in `ns` and waits until the host can connect to it.
    pub fn start(ns: &Namespace) -> SshBastion {
        let sshd = require_program("sshd", "openssh-server");
        let port = ns.claim_port(22);
        let addr = SocketAddr::from((ns.ns_ip, port));
        let (dir, dir_watchdog) = Server::scratch("keyhole-sshd-");
        let host_key = dir.join("ssh_host_ed25519_key");
        let client_key = dir.join("client_key");
        let wrong_key = dir.join("wrong_key");
        let host_public_key = ed25519_key(&host_key, "keyhole-test bastion host key");
        ed25519_key(&client_key, "keyhole-test client key");
        ed25519_key(&wrong_key, "keyhole-test unauthorized client key");
        let other_host_key = ed25519_key(
            &dir.join("other_host_key"),
            "keyhole-test some other host key",
        );
        let authorized = dir.join("authorized_keys");
        fs::copy(client_key.with_extension("pub"), &authorized).expect("write authorized_keys");

        let pattern = if port == 22 {
            ns.ns_ip.to_string()
        } else {
            format!("[{}]:{port}", ns.ns_ip)
        };
        let known_hosts = dir.join("known_hosts");
        let known_hosts_empty = dir.join("known_hosts_empty");
        let known_hosts_changed = dir.join("known_hosts_changed");
        write(&known_hosts, &format!("{pattern} {host_public_key}\n"));
        write(&known_hosts_empty, "");
        write(
            &known_hosts_changed,
            &format!("{pattern} {other_host_key}\n"),
        );

        // sshd re-executes itself (absolute paths only) and wants its
        // privilege separation directory.
        fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        let _ = fs::set_permissions("/run/sshd", fs::Permissions::from_mode(0o755));
        let user = current_user();
        let mut config = format!(
            "ListenAddress {addr}\n\
             HostKey {host_key}\n\
             PidFile none\n\
             UsePAM no\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             PubkeyAuthentication yes\n\
             PermitRootLogin prohibit-password\n\
             AllowUsers {user}\n\
             AuthorizedKeysFile {authorized}\n\
             StrictModes no\n\
             AllowTcpForwarding yes\n\
             AllowAgentForwarding no\n\
             X11Forwarding no\n\
             PrintMotd no\n\
             LogLevel VERBOSE\n",
            host_key = quoted(&host_key),
            authorized = quoted(&authorized),
        );
        // Since 9.8 sshd penalises sources with failed logins: the
        // wrong-key tests would lock the host out.
        if sshd_version(&sshd) >= (9, 8) {
            config.push_str("PerSourcePenalties no\n");
        }
        let config_path = dir.join("sshd_config");
        write(&config_path, &config);
        let log_path = dir.join("sshd.log");
        let mut args: Vec<OsString> = ["-D", "-e", "-f"].map(OsString::from).to_vec();
        args.push(config_path.into_os_string());
        args.push("-E".into());
        args.push(log_path.clone().into_os_string());
        let server = Server {
            what: format!("sshd in {}", ns.name),
            exec: ns.exec(),
            program: sshd,
            args,
            addr,
            log_file: Some(log_path.clone()),
            output: dir.join("sshd.out"),
            dir: dir.clone(),
            daemon: Mutex::new(None),
            dir_watchdog,
        };
        server.start();
        SshBastion {
            addr,
            client_key,
            known_hosts,
            dir,
            user,
            host_public_key,
            wrong_key,
            known_hosts_empty,
            known_hosts_changed,
            log_path,
            server,
        }
    }

    fn write_config(&self, file: &str, alias: &str, key: &Path, known_hosts: &Path) -> PathBuf {
        let text = format!(
            "Host {alias}\n  \
               HostName {ip}\n  \
               Port {port}\n  \
               User {user}\n  \
               IdentityFile {key}\n  \
               IdentitiesOnly yes\n  \
               UserKnownHostsFile {known_hosts}\n  \
               StrictHostKeyChecking yes\n  \
               BatchMode yes\n",
            ip = self.addr.ip(),
            port = self.addr.port(),
            user = self.user,
            key = quoted(key),
            known_hosts = quoted(known_hosts),
        );
        let path = self.dir.join(file);
        write(&path, &text);
        path
    }

    /// Writes `dir/ssh_config` (an `ssh -F` file, or keyhole's
    /// `--ssh-config`): `Host <alias>` with HostName `ns_ip`, Port, User,
    /// IdentityFile `client_key`, IdentitiesOnly yes, UserKnownHostsFile
    /// `known_hosts`, StrictHostKeyChecking yes, BatchMode yes. Each call
    /// rewrites the file.
    pub fn ssh_config(&self, alias: &str) -> PathBuf {
        self.write_config("ssh_config", alias, &self.client_key, &self.known_hosts)
    }

    /// As [`SshBastion::ssh_config`] (`dir/ssh_config_unknown_host`) with an
    /// empty known_hosts file: the host key is unknown.
    pub fn ssh_config_unknown_host(&self, alias: &str) -> PathBuf {
        self.write_config(
            "ssh_config_unknown_host",
            alias,
            &self.client_key,
            &self.known_hosts_empty,
        )
    }

    /// As [`SshBastion::ssh_config`] (`dir/ssh_config_changed_host_key`) with
    /// a known_hosts file holding a different ed25519 key for the host.
    pub fn ssh_config_changed_host_key(&self, alias: &str) -> PathBuf {
        self.write_config(
            "ssh_config_changed_host_key",
            alias,
            &self.client_key,
            &self.known_hosts_changed,
        )
    }

    /// As [`SshBastion::ssh_config`] (`dir/ssh_config_wrong_key`) with a
    /// client key that is not authorized.
    pub fn ssh_config_wrong_key(&self, alias: &str) -> PathBuf {
        self.write_config(
            "ssh_config_wrong_key",
            alias,
            &self.wrong_key,
            &self.known_hosts,
        )
    }

    /// Kills sshd and every session process it started: the bastion dies and
    /// so do the tunnels through it.
    pub fn kill(&self) {
        self.server.kill();
    }

    /// Starts sshd again (killing it first if it runs) with the same host
    /// key, port and authorized keys, and waits until it accepts connections.
    pub fn restart(&self) {
        self.server.start();
    }

    /// Is sshd running (started and not killed)?
    pub fn running(&self) -> bool {
        self.server.running()
    }

    /// sshd's log (`-E`), plus anything it wrote to stdout/stderr.
    pub fn log(&self) -> String {
        self.server.log()
    }

    /// The number of successful logins ("Accepted publickey") in the log.
    pub fn logins(&self) -> usize {
        fs::read_to_string(&self.log_path)
            .unwrap_or_default()
            .matches("Accepted publickey for ")
            .count()
    }
}

/// `ssh -F config -W forward_to alias`: OpenSSH's own client forwarding its
/// stdin/stdout to `forward_to` (`host:port`, resolved by the bastion) through
/// the bastion, run on the host. No agent is used.
pub fn ssh_stdio_forward(config: &Path, alias: &str, forward_to: &str) -> Command {
    let mut cmd = Command::new(require_program("ssh", "openssh-client"));
    super::process::clean_env(&mut cmd)
        .env_remove("SSH_AUTH_SOCK")
        .arg("-F")
        .arg(config)
        .args(["-W", forward_to, alias]);
    cmd
}

// ---------------------------------------------------------------------------
// SOCKS5

/// A SOCKS5 proxy inside a namespace on `ns_ip`: dante (no authentication)
/// or microsocks (user name and password). Killed on drop.
pub struct Socks5Proxy {
    /// Where the host reaches it: `ns_ip:port`.
    pub addr: SocketAddr,
    /// The user name and password it demands, if any.
    pub auth: Option<(String, String)>,
    server: Server,
}

impl Socks5Proxy {
    /// dante's `danted` on `ns_ip:1080` (or the next free port), method
    /// `none`, passing every client to every destination and logging each
    /// connection; it connects out from `ns_ip`, which reaches the namespace's
    /// loopback (the relay) as well as its veth.
    pub fn start_dante(ns: &Namespace) -> Socks5Proxy {
        let danted = require_program("danted", "dante-server");
        let port = ns.claim_port(1080);
        let addr = SocketAddr::from((ns.ns_ip, port));
        let (dir, dir_watchdog) = Server::scratch("keyhole-danted-");
        let log = dir.join("danted.log");
        let config = format!(
            "logoutput: {log}\n\
             internal: {ip} port = {port}\n\
             external: {ip}\n\
             socksmethod: none\n\
             clientmethod: none\n\
             user.privileged: root\n\
             user.unprivileged: nobody\n\
             client pass {{\n  from: 0.0.0.0/0 to: 0.0.0.0/0\n  log: connect disconnect error\n}}\n\
             socks pass {{\n  from: 0.0.0.0/0 to: 0.0.0.0/0\n  log: connect disconnect error\n}}\n",
            log = quoted(&log),
            ip = ns.ns_ip,
        );
        let config_path = dir.join("danted.conf");
        write(&config_path, &config);
        let args = vec![
            OsString::from("-f"),
            config_path.into_os_string(),
            OsString::from("-p"),
            dir.join("danted.pid").into_os_string(),
        ];
        let server = Server {
            what: format!("danted in {}", ns.name),
            exec: ns.exec(),
            program: danted,
            args,
            addr,
            log_file: Some(log),
            output: dir.join("danted.out"),
            dir,
            daemon: Mutex::new(None),
            dir_watchdog,
        };
        server.start();
        Socks5Proxy {
            addr,
            auth: None,
            server,
        }
    }

    /// `microsocks -u USER -P PASS` on `ns_ip:1080` (or the next free port).
    /// It logs each connection it makes to stderr, which [`Socks5Proxy::log`]
    /// returns.
    pub fn start_microsocks(ns: &Namespace, user: &str, pass: &str) -> Socks5Proxy {
        let microsocks = require_program("microsocks", "microsocks");
        let port = ns.claim_port(1080);
        let addr = SocketAddr::from((ns.ns_ip, port));
        let (dir, dir_watchdog) = Server::scratch("keyhole-microsocks-");
        let args = [
            "-i",
            &ns.ns_ip.to_string(),
            "-p",
            &port.to_string(),
            "-u",
            user,
            "-P",
            pass,
        ]
        .map(OsString::from)
        .to_vec();
        let server = Server {
            what: format!("microsocks in {}", ns.name),
            exec: ns.exec(),
            program: microsocks,
            args,
            addr,
            log_file: None,
            output: dir.join("microsocks.log"),
            dir,
            daemon: Mutex::new(None),
            dir_watchdog,
        };
        server.start();
        Socks5Proxy {
            addr,
            auth: Some((user.to_string(), pass.to_string())),
            server,
        }
    }

    /// `socks5h://[user:pass@]ns_ip:port` (the proxy resolves names).
    pub fn url(&self) -> String {
        match &self.auth {
            Some((user, pass)) => format!("socks5h://{user}:{pass}@{}", self.addr),
            None => format!("socks5h://{}", self.addr),
        }
    }

    /// The proxy's log.
    pub fn log(&self) -> String {
        self.server.log()
    }

    /// Kills the proxy (and its children); `restart` starts it again.
    pub fn kill(&self) {
        self.server.kill();
    }

    /// Starts it again on the same address with the same settings.
    pub fn restart(&self) {
        self.server.start();
    }
}

// ---------------------------------------------------------------------------
// HTTP CONNECT

/// tinyproxy inside a namespace on `ns_ip:3128` (or the next free port), in
/// the foreground: CONNECT to any port, clients from anywhere, optionally
/// basic authentication (then a request without credentials gets 407 and a
/// wrong password 401). Killed on drop.
pub struct HttpProxy {
    /// Where the host reaches it: `ns_ip:port`.
    pub addr: SocketAddr,
    /// The user name and password it demands, if any.
    pub auth: Option<(String, String)>,
    server: Server,
}

impl HttpProxy {
    pub fn start(ns: &Namespace, auth: Option<(&str, &str)>) -> HttpProxy {
        let tinyproxy = require_program("tinyproxy", "tinyproxy");
        let port = ns.claim_port(3128);
        let addr = SocketAddr::from((ns.ns_ip, port));
        let (dir, dir_watchdog) = Server::scratch("keyhole-tinyproxy-");
        let log = dir.join("tinyproxy.log");
        // No Allow lines: every client; no ConnectPort lines: every port.
        let mut config = format!(
            "Port {port}\nListen {ip}\nTimeout 60\nMaxClients 100\n\
             LogFile \"{log}\"\nLogLevel Info\nDisableViaHeader Yes\n",
            ip = ns.ns_ip,
            log = log.display(),
        );
        if let Some((user, pass)) = auth {
            config.push_str(&format!("BasicAuth {user} {pass}\n"));
        }
        let config_path = dir.join("tinyproxy.conf");
        write(&config_path, &config);
        let args = vec![
            OsString::from("-d"),
            OsString::from("-c"),
            config_path.into_os_string(),
        ];
        let server = Server {
            what: format!("tinyproxy in {}", ns.name),
            exec: ns.exec(),
            program: tinyproxy,
            args,
            addr,
            log_file: Some(log),
            output: dir.join("tinyproxy.out"),
            dir,
            daemon: Mutex::new(None),
            dir_watchdog,
        };
        server.start();
        HttpProxy {
            addr,
            auth: auth.map(|(u, p)| (u.to_string(), p.to_string())),
            server,
        }
    }

    /// `http://[user:pass@]ns_ip:port`.
    pub fn url(&self) -> String {
        match &self.auth {
            Some((user, pass)) => format!("http://{user}:{pass}@{}", self.addr),
            None => format!("http://{}", self.addr),
        }
    }

    /// tinyproxy's log.
    pub fn log(&self) -> String {
        self.server.log()
    }

    /// Kills the proxy; `restart` starts it again.
    pub fn kill(&self) {
        self.server.kill();
    }

    /// Starts it again on the same address with the same settings.
    pub fn restart(&self) {
        self.server.start();
    }
}
