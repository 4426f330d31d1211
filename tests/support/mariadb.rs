//! Throwaway MariaDB servers and the `mariadb` command-line client.
//!
//! A server is a copy of a once-per-process `mariadb-install-db` template, run by
//! `mariadbd --no-defaults` (no `/etc/mysql` or `~/.my.cnf`) on a free port of
//! 127.0.0.1, with a Unix socket, pid file, error log and `tmpdir` in its own
//! scratch directory (a starting `mariadbd` deletes every `#sql*` file in its
//! `tmpdir`: with a shared `/tmp`, servers starting in parallel destroy each
//! other's temporary tables, `mariadb-install-db` included). By default it speaks TLS with certificates made at test time and
//! `require_secure_transport=ON`; with `tls: false` it has no TLS at all (its
//! greeting lacks `CLIENT_SSL`).
//!
//! # Users
//!
//! - The administrator is `root@localhost`, authenticated by `unix_socket` over
//!   the server's Unix socket: the server maps the peer's OS user to the MariaDB
//!   user of the same name, and the tests (clients included) run as OS `root`
//!   when they run as root. The server itself runs as the unprivileged
//!   [`server_user`](super::process::server_user), which does not matter to
//!   `unix_socket` (it only reads the peer's credentials). When the tests do not
//!   run as root, everything runs as the invoking user and the template is made
//!   with `--auth-root-socket-user=<that user>`, so `<that user>@localhost` is
//!   the administrator instead. [`MariaDb::admin_sql`] hides the difference.
//! - [`NATIVE_USER`] (`mysql_native_password`) and [`ED25519_USER`] (`ed25519`,
//!   the `auth_ed25519` plugin), host `%`, with ALL on [`DATABASE`] plus the
//!   global PROCESS and CONNECTION ADMIN privileges (so each can list and
//!   `KILL [QUERY]` the other's threads; their own need nothing).
//!
//! On MariaDB 10.11 a plain TCP login to a `require_secure_transport=ON` server
//! fails with `ERROR 1045 (28000): Access denied for user ...`: MariaDB reports
//! the transport check as a failed login, not as MySQL's error 3159, and only
//! after checking the password. Nothing in the error log tells it apart from a
//! wrong password either.
//!
//! # Processes and cleanup
//!
//! `mariadbd` is a direct child of the test process, in its own process group,
//! running as the server user when the tests run as root (the harness drops the
//! privileges before `exec`, so `mariadbd` never sees root and needs no
//! `--user`). Its pid goes to a file the watchdog reads: when the test process
//! is done with the server (drop, [`MariaDb::stop`], or the process dying in any
//! way) the watchdog SIGKILLs that pid, if `/proc/<pid>/cmdline` still names this
//! server's data directory (so a recycled pid is never hit), waits for it to go
//! and deletes the scratch directory. The data is thrown away, so there is no
//! point in a clean shutdown there; [`MariaDb::restart`] does shut down cleanly
//! (SIGTERM).
//!
//! # The `mariadb` client
//!
//! [`mariadb`], [`mariadb_with_args`] and [`mariadb_command`] run the client with
//! `--no-defaults` as the first argument (no option files), every `MYSQL_*`,
//! `MARIADB_*` and `LIBMYSQL_*` variable removed, `MYSQL_PWD` set only when a
//! password is given, and a time limit. Nothing TLS-related is passed, so the
//! client's defaults apply. For mariadb-client 10.11 they are: `--ssl` on,
//! `--ssl-verify-server-cert` off. So:
//!
//! - if the server's greeting has `CLIENT_SSL`, the client upgrades to TLS and
//!   does not verify the certificate (any CA, any name);
//! - if it does not, the client carries on in plain text and says nothing;
//! - `--ssl-ca`, `--ssl-cert` and the like do not make TLS mandatory either.
//!   Only `--ssl-verify-server-cert` does: against a server without TLS it fails
//!   with `ERROR 2026 (HY000): TLS/SSL error: SSL is required, but the server does
//!   not support it`. With TLS but no `--ssl-ca` it fails with `ERROR 2026
//!   (HY000): TLS/SSL error: self-signed certificate in certificate chain`
//!   (the test CA is unknown);
//! - `--skip-ssl` never tries TLS.

use std::ffi::{OsStr, OsString};
use std::fs::{self, OpenOptions};
use std::io::Read;
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use super::certs::TestPki;
use super::clients;
use super::process::{
    as_server_user, chown_to_server_user, clean_env, copy_template_with_pki, describe_output,
    output_with_timeout, signal_pid, KillAfter, Watchdog,
};

/// `mysql_native_password` user (host `%`).
pub const NATIVE_USER: &str = "native_user";
pub const NATIVE_PASS: &str = "native_pass";
/// `ed25519` user (host `%`).
pub const ED25519_USER: &str = "ed25519_user";
pub const ED25519_PASS: &str = "ed25519_pass";
/// The database the test users own; [`mariadb`] and [`MariaDb::mariadb_direct`]
/// connect to it.
pub const DATABASE: &str = "keyhole_test";

/// Names in the server certificate of every server (plus ::1, which
/// `generate.sh` always adds).
pub const SERVER_NAMES: [&str; 3] = ["localhost", "db.internal", "127.0.0.1"];

/// `CLIENT_SSL` in the capability flags of the server greeting.
pub const CLIENT_SSL: u32 = 0x0800;

/// Longest a single `mariadb` client may run before the test fails.
pub const MARIADB_TIMEOUT: Duration = Duration::from_secs(300);

/// Flags the [`mariadb_with_args`] helpers put right after `--no-defaults`:
/// tab-separated rows without a header line. Batch mode escapes tabs, newlines
/// and backslashes in values (`\t`, `\n`, `\\`); add `--raw` to get them as
/// they are.
pub const MARIADB_FLAGS: [&str; 2] = ["--batch", "--skip-column-names"];

/// How long `mariadbd` may take to be ready for connections, or to shut down.
const SERVER_TIMEOUT: Duration = Duration::from_secs(120);

/// Buffer pool and redo log settings, given to `mariadb-install-db` as well so
/// the template's redo log already has the size the servers want.
const INNODB_ARGS: [&str; 2] = [
    "--innodb-buffer-pool-size=64M",
    "--innodb-log-file-size=32M",
];

/// What the error log says once the server accepts connections.
const READY_LINE: &str = "ready for connections";

/// The server program: `/usr/sbin/mariadbd` (Debian's place, off the `PATH` of
/// ordinary users) if it is there, else `mariadbd` from `PATH`.
pub fn mariadbd_bin() -> PathBuf {
    let debian = Path::new("/usr/sbin/mariadbd");
    if debian.is_file() {
        debian.to_path_buf()
    } else {
        PathBuf::from("mariadbd")
    }
}

/// Removes everything from the environment that would make a MariaDB program
/// deviate from its defaults: what [`clean_env`] removes plus every `MYSQL_*`
/// (MYSQL_PWD, MYSQL_HOST, MYSQL_TCP_PORT, MYSQL_UNIX_PORT, MYSQL_HOME...),
/// `MARIADB_*` and `LIBMYSQL_*` variable.
pub fn mariadb_clean_env(cmd: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars_os() {
        let name = key.to_string_lossy();
        if ["MYSQL_", "MARIADB_", "LIBMYSQL_"]
            .iter()
            .any(|prefix| name.starts_with(prefix))
        {
            cmd.env_remove(&key);
        }
    }
    clean_env(cmd)
}

/// The `mariadb` client with a clean environment, `MYSQL_PWD` if a password is
/// given, and `--no-defaults` already in place as its first argument (it only
/// works there). Add the rest of the arguments.
pub fn mariadb_command(password: Option<&str>) -> Command {
    let mut cmd = Command::new("mariadb");
    mariadb_clean_env(&mut cmd);
    if let Some(password) = password {
        cmd.env("MYSQL_PWD", password);
    }
    cmd.arg("--no-defaults");
    cmd
}

/// The mariadb CLI over TCP to 127.0.0.1:`port` as `user`, with `extra`
/// arguments after those (see [`mariadb_with_args`]).
pub fn mariadb_tcp(port: &str, user: &str, password: Option<&str>, extra: &[&str]) -> Output {
    let mut args = vec!["-h", "127.0.0.1", "-P", port, "-u", user];
    args.extend_from_slice(extra);
    mariadb_with_args(&args, password)
}

/// `mariadb --no-defaults --batch --skip-column-names ARGS...` with the client's
/// default TLS behaviour (see the module docs), run to completion within
/// [`MARIADB_TIMEOUT`].
pub fn mariadb_with_args(args: &[&str], password: Option<&str>) -> Output {
    let mut cmd = mariadb_command(password);
    cmd.args(MARIADB_FLAGS).args(args);
    output_with_timeout(&mut cmd, MARIADB_TIMEOUT)
}

/// The `mariadb` client over TCP to 127.0.0.1:`port` (usually keyhole's),
/// database [`DATABASE`], running `sql` with default TLS settings.
pub fn mariadb(port: u16, user: &str, password: Option<&str>, sql: &str) -> Output {
    let port = port.to_string();
    mariadb_tcp(&port, user, password, &["-D", DATABASE, "-e", sql])
}

/// The first packet a MySQL-protocol server sends (protocol version 10).
#[derive(Debug, Clone)]
pub struct Greeting {
    pub protocol_version: u8,
    pub server_version: String,
    pub connection_id: u32,
    /// Lower and upper capability flags as one number (see [`CLIENT_SSL`]).
    pub capabilities: u32,
    /// The default authentication plugin, if the greeting names one.
    pub auth_plugin: Option<String>,
}

/// The 20-byte scramble of a MySQL greeting (auth data parts 1 and 2).
pub fn greeting_scramble(payload: &[u8]) -> Vec<u8> {
    let nul = payload[1..]
        .iter()
        .position(|&b| b == 0)
        .expect("server version")
        + 1;
    let rest = &payload[nul + 1..];
    // connection id (4), part 1 (8), filler (1), caps (2), charset (1),
    // status (2), caps (2), auth length (1), reserved (10), part 2 (12 + NUL).
    let mut scramble = rest[4..12].to_vec();
    scramble.extend_from_slice(&rest[31..43]);
    scramble
}

/// Reads one packet from a hand-made client's socket: its sequence id and
/// payload.
pub fn read_packet(stream: &mut impl Read) -> (u8, Vec<u8>) {
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).expect("a packet header");
    let len = u32::from_le_bytes([header[0], header[1], header[2], 0]) as usize;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).expect("a whole packet");
    (header[3], payload)
}

/// `payload` framed as one packet with sequence id `seq`, for hand-made
/// clients and servers.
pub fn packet(seq: u8, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("a short payload");
    assert!(len < 1 << 24, "one packet holds less than 16 MiB");
    let mut out = len.to_le_bytes()[..3].to_vec();
    out.push(seq);
    out.extend_from_slice(payload);
    out
}

/// The fixed part of a hand-made HandshakeResponse41 with `capabilities`
/// (an SSLRequest is exactly this): a 16 MiB packet limit, utf8mb4.
pub fn response_header(capabilities: u32) -> Vec<u8> {
    let mut p = capabilities.to_le_bytes().to_vec();
    p.extend_from_slice(&(16u32 << 20).to_le_bytes()); // max packet size
    p.push(45); // utf8mb4_general_ci
    p.extend_from_slice(&[0; 23]);
    p
}

/// mysql_async options for native_user on `DATABASE` through `port` on
/// 127.0.0.1. Without `prefer_socket(false)` the driver would look up the
/// server's Unix socket and reconnect there, around keyhole.
pub fn native_driver_opts(port: u16) -> mysql_async::Opts {
    mysql_async::OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(port)
        .user(Some(NATIVE_USER))
        .pass(Some(NATIVE_PASS))
        .db_name(Some(DATABASE))
        .prefer_socket(false)
        .into()
}

/// Connects to 127.0.0.1:`port`, reads the server greeting and hangs up without
/// answering it. Err if the server sends an error packet instead (too many
/// connections, host blocked...) or something unparsable. The server logs the
/// hang-up as an aborted connection.
pub fn read_greeting(port: u16) -> Result<Greeting, String> {
    let mut stream =
        TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect to {port}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| format!("set a read timeout: {e}"))?;
    let mut header = [0u8; 4];
    stream
        .read_exact(&mut header)
        .map_err(|e| format!("read the greeting's header: {e}"))?;
    let len = usize::from(header[0]) | usize::from(header[1]) << 8 | usize::from(header[2]) << 16;
    let mut payload = vec![0u8; len];
    stream
        .read_exact(&mut payload)
        .map_err(|e| format!("read the greeting ({len} bytes): {e}"))?;
    parse_greeting(&payload)
}

/// Parses a greeting packet's payload (what [`read_greeting`] reads).
pub fn parse_greeting(payload: &[u8]) -> Result<Greeting, String> {
    let short = || format!("greeting too short: {payload:02x?}");
    let protocol_version = *payload.first().ok_or_else(short)?;
    if protocol_version == 0xff {
        return Err(format!(
            "the server sent an error instead of a greeting: {}",
            String::from_utf8_lossy(payload.get(3..).unwrap_or_default())
        ));
    }
    if protocol_version != 10 {
        return Err(format!("unexpected protocol version {protocol_version}"));
    }
    let rest = &payload[1..];
    let nul = rest.iter().position(|&b| b == 0).ok_or_else(short)?;
    let server_version = String::from_utf8_lossy(&rest[..nul]).into_owned();
    let rest = &rest[nul + 1..];
    // connection id (4), auth data part 1 (8), filler (1), capabilities low (2).
    let fixed = rest.get(..15).ok_or_else(short)?;
    let connection_id = u32::from_le_bytes([fixed[0], fixed[1], fixed[2], fixed[3]]);
    let mut capabilities = u32::from(u16::from_le_bytes([fixed[13], fixed[14]]));
    let mut auth_plugin = None;
    // character set (1), status (2), capabilities high (2), auth data length (1),
    // reserved (10; MariaDB's extended capabilities in the last 4), auth data
    // part 2 (at least 13), plugin name (NUL-terminated).
    if let Some(more) = rest.get(15..) {
        if more.len() >= 16 {
            capabilities |= u32::from(u16::from_le_bytes([more[3], more[4]])) << 16;
            let auth_len = usize::from(more[5]);
            let part2 = auth_len.saturating_sub(8).max(13);
            if let Some(name) = more.get(16 + part2..) {
                let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                auth_plugin = Some(String::from_utf8_lossy(&name[..end]).into_owned());
            }
        }
    }
    Ok(Greeting {
        protocol_version,
        server_version,
        connection_id,
        capabilities,
        auth_plugin,
    })
}

/// What kind of server to start.
#[derive(Debug, Clone)]
pub struct MariaDbOptions {
    /// `true` (the default): TLS with the server's [`TestPki`] and
    /// `require_secure_transport=ON`. `false`: no TLS options at all, so the
    /// server has no TLS (`have_ssl = DISABLED`) and does not offer it.
    pub tls: bool,
    /// Extra server options, after the harness's own (so they win). Either
    /// command-line form (`--wait-timeout=5`) or option-file form
    /// (`wait_timeout=5`, which gets the `--` put in front).
    pub extra_conf: Vec<String>,
}

impl Default for MariaDbOptions {
    fn default() -> Self {
        MariaDbOptions {
            tls: true,
            extra_conf: Vec::new(),
        }
    }
}

/// A running MariaDB server. Dropping it (or [`MariaDb::stop`]) kills the server
/// and deletes its scratch directory; a watchdog does the same if the test
/// process dies first.
pub struct MariaDb {
    port: u16,
    pki: TestPki,
    tls: bool,
    scratch_dir: PathBuf,
    data_dir: PathBuf,
    socket_path: PathBuf,
    /// `--log-error`.
    log_file: PathBuf,
    /// The server's stdout and stderr (the few lines written before the error
    /// log is open).
    out_file: PathBuf,
    /// The server's pid, written by the harness for the watchdog.
    pid_file: PathBuf,
    extra_conf: Vec<String>,
    child: Mutex<Option<Child>>,
    watchdog: Watchdog,
}

impl MariaDb {
    /// One TLS server per test binary, started on first use and shared by all
    /// its tests. Do not stop or restart it; start your own for that.
    pub fn shared() -> &'static MariaDb {
        static SHARED: OnceLock<MariaDb> = OnceLock::new();
        SHARED.get_or_init(|| MariaDb::start(MariaDbOptions::default()))
    }

    /// Starts a new server: copy of the once-per-process template, fresh
    /// certificates, a free port, the test users. Panics (with the server log)
    /// if anything fails.
    pub fn start(opts: MariaDbOptions) -> MariaDb {
        let tmp = super::scratch_dir("keyhole-mariadb-");
        let scratch = tmp.path().to_path_buf();
        let (pki_dir, tmp_dir) = (scratch.join("pki"), scratch.join("tmp"));
        for dir in [&pki_dir, &tmp_dir] {
            fs::create_dir(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        }
        chown_to_server_user(&scratch);

        let socket_path = scratch.join("mysqld.sock");
        // sun_path holds 108 bytes including the NUL.
        assert!(
            socket_path.as_os_str().len() <= 107,
            "the socket path {} is too long for a Unix socket: use a shorter TMPDIR",
            socket_path.display()
        );
        let data_dir = scratch.join("data");
        let pid_file = scratch.join("harness.pid");

        // From here on the watchdog owns the scratch directory.
        let watchdog = Watchdog::spawn(
            "a MariaDB server",
            r#"pid=$(cat "$1" 2>/dev/null) data=$2 scratch=$3
               # Still this server (a zombie's cmdline is empty)?
               ours() {
                   [ -n "$pid" ] &&
                   tr '\000' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qxF -e "--datadir=$data"
               }
               if ours; then
                   kill -KILL "$pid" 2>/dev/null
                   i=0
                   while ours && [ "$i" -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
               fi
               rm -rf "$scratch""#,
            &[
                pid_file.as_os_str(),
                data_dir.as_os_str(),
                scratch.as_os_str(),
            ],
            true,
        );
        let _ = tmp.keep();

        let pki = copy_template_with_pki(
            "mariadb-install-db",
            template_data_dir(),
            &scratch,
            &data_dir,
            pki_dir,
            &SERVER_NAMES,
        );

        let mut server = MariaDb {
            port: 0,
            pki,
            tls: opts.tls,
            log_file: scratch.join("server.log"),
            out_file: scratch.join("mariadbd.out"),
            pid_file,
            socket_path,
            data_dir,
            scratch_dir: scratch,
            extra_conf: opts.extra_conf,
            child: Mutex::new(None),
            watchdog,
        };

        // The port is only known to be free once the server has bound it; a
        // parallel test (or another process) may take it first, so retry.
        let mut attempt = 0;
        loop {
            attempt += 1;
            server.port = super::free_port();
            match server.launch() {
                Ok(()) => break,
                Err(err) if attempt < 5 && err.contains("Address already in use") => continue,
                Err(err) => panic!("starting MariaDB failed: {err}"),
            }
        }
        server.create_users();
        server
    }

    /// TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The CA and certificates; the server uses `server_cert`/`server_key` and
    /// trusts `ca` (`--ssl-ca`), which also signed `client_cert`.
    pub fn pki(&self) -> &TestPki {
        &self.pki
    }

    /// Whether the server has TLS (and requires it).
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// The server's Unix socket (administrator access, see [`MariaDb::admin_sql`]).
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The directory holding everything of this server.
    pub fn scratch_dir(&self) -> &Path {
        &self.scratch_dir
    }

    /// The error log (`--log-error`).
    pub fn log_path(&self) -> &Path {
        &self.log_file
    }

    /// The server's pid, if it is running (as far as the harness knows).
    pub fn pid(&self) -> Option<u32> {
        self.child_guard().as_ref().map(Child::id)
    }

    /// The whole error log.
    pub fn logs(&self) -> String {
        fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// The last `lines` lines of the error log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.logs(), lines)
    }

    /// Runs `sql` as the administrator over the Unix socket (`unix_socket`
    /// authentication, no password) and returns the trimmed output (batch mode,
    /// no column names); panics with the log tail on error.
    pub fn admin_sql(&self, sql: &str) -> String {
        let socket = self.socket_path.to_str().expect("socket path is UTF-8");
        let out = mariadb_with_args(&["--socket", socket, "-u", admin_user(), "-e", sql], None);
        assert!(
            out.status.success(),
            "admin SQL failed: {sql}\n{}\n--- server log ---\n{}",
            describe_output(&out),
            self.log_tail(40)
        );
        clients::stdout(&out)
    }

    /// The `mariadb` client straight to the server (no keyhole) over verified
    /// TLS: 127.0.0.1 (an IP name in the certificate), `--ssl-ca` the server's
    /// CA, `--ssl-verify-server-cert`, database [`DATABASE`]. Ok(trimmed stdout)
    /// or Err(status, stdout and stderr). Always fails against a `tls: false`
    /// server.
    pub fn mariadb_direct(&self, user: &str, password: &str, sql: &str) -> Result<String, String> {
        let port = self.port.to_string();
        let ca = format!("--ssl-ca={}", self.pki.ca.display());
        let out = mariadb_tcp(
            &port,
            user,
            Some(password),
            &[
                "-D",
                DATABASE,
                "--ssl",
                &ca,
                "--ssl-verify-server-cert",
                "-e",
                sql,
            ],
        );
        if out.status.success() {
            Ok(clients::stdout(&out))
        } else {
            Err(describe_output(&out))
        }
    }

    /// The target URL for keyhole's command line (`server-name=localhost`; give
    /// keyhole `--ca-file` with `self.pki().ca`).
    pub fn keyhole_target(&self) -> String {
        format!("mysql://127.0.0.1:{}?server-name=localhost", self.port)
    }

    /// Shuts the server down cleanly (SIGTERM) and starts it again on the same
    /// port and data, returning once it accepts connections. Every open
    /// connection is cut.
    pub fn restart(&self) {
        self.shutdown_server();
        self.start_server();
    }

    /// Shuts the server down cleanly (SIGTERM) and waits for it to exit, keeping
    /// its files; see [`MariaDb::start_server`].
    pub fn shutdown_server(&self) {
        let mut guard = self.child_guard();
        let Some(mut child) = guard.take() else {
            panic!("shutdown_server: the MariaDB server is not running");
        };
        signal_pid(child.id(), libc::SIGTERM);
        let timer = KillAfter::arm(child.id(), SERVER_TIMEOUT);
        let status = child.wait();
        let killed = timer.disarm();
        drop(guard);
        let status = status.unwrap_or_else(|e| panic!("waiting for mariadbd failed: {e}"));
        assert!(
            !killed,
            "mariadbd did not shut down within {SERVER_TIMEOUT:?} and was killed\n--- server log ---\n{}",
            self.log_tail(40)
        );
        assert!(
            status.success(),
            "mariadbd exited with {status} on shutdown\n--- server log ---\n{}",
            self.log_tail(40)
        );
    }

    /// Starts the server again after [`MariaDb::shutdown_server`], on the same
    /// port.
    pub fn start_server(&self) {
        if let Err(err) = self.launch() {
            panic!("restarting MariaDB failed: {err}");
        }
    }

    /// Kills the server and deletes the scratch directory (what drop does).
    pub fn stop(&self) {
        self.watchdog.fire();
        // Reap the child the watchdog killed (killing it here if the watchdog
        // somehow did not: it is not reaped yet, so its pid is still its own).
        if let Some(mut child) = self.child_guard().take() {
            if !matches!(child.try_wait(), Ok(Some(_))) {
                signal_pid(child.id(), libc::SIGKILL);
                let _ = child.wait();
            }
        }
    }

    fn child_guard(&self) -> MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every `mariadbd` argument.
    fn server_args(&self) -> Vec<OsString> {
        let path_arg = |name: &str, path: &Path| {
            let mut arg = OsString::from(format!("--{name}="));
            arg.push(path);
            arg
        };
        let mut args: Vec<OsString> = vec![
            // Only as the first argument; no /etc/mysql, no ~/.my.cnf.
            "--no-defaults".into(),
            path_arg("datadir", &self.data_dir),
            format!("--port={}", self.port).into(),
            "--bind-address=127.0.0.1".into(),
            path_arg("socket", &self.socket_path),
            path_arg("pid-file", &self.scratch_dir.join("mariadbd.pid")),
            path_arg("log-error", &self.log_file),
            // Its own: a starting server deletes every `#sql*` file in its
            // tmpdir, which in a shared /tmp would be other servers' temporary
            // tables.
            path_arg("tmpdir", &self.scratch_dir.join("tmp")),
            "--skip-name-resolve".into(),
            "--max-connections=300".into(),
            "--max-allowed-packet=256M".into(),
            "--local-infile=1".into(),
            // What Debian's packaged configuration sets; the built-in default is latin1.
            "--character-set-server=utf8mb4".into(),
            "--skip-log-bin".into(),
            "--innodb-flush-log-at-trx-commit=0".into(),
            "--skip-innodb-doublewrite".into(),
        ];
        args.extend(INNODB_ARGS.iter().map(OsString::from));
        if self.tls {
            args.push(path_arg("ssl-ca", &self.pki.ca));
            args.push(path_arg("ssl-cert", &self.pki.server_cert));
            args.push(path_arg("ssl-key", &self.pki.server_key));
            args.push("--require-secure-transport=ON".into());
        } else {
            args.push("--require-secure-transport=OFF".into());
        }
        for extra in &self.extra_conf {
            if extra.starts_with("--") {
                args.push(extra.into());
            } else {
                args.push(format!("--{extra}").into());
            }
        }
        args
    }

    /// Starts `mariadbd` on `self.port` and waits until it is ready. Err (with
    /// the logs) if it exits first or takes too long (it is killed then).
    fn launch(&self) -> Result<(), String> {
        let mut guard = self.child_guard();
        assert!(guard.is_none(), "mariadbd is already running");
        let log_before = fs::metadata(&self.log_file).map_or(0, |m| m.len());
        let out_before = fs::metadata(&self.out_file).map_or(0, |m| m.len());
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.out_file)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.out_file.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("duplicate {}: {e}", self.out_file.display()));

        let mut cmd = Command::new(mariadbd_bin());
        mariadb_clean_env(&mut cmd)
            .args(self.server_args())
            .current_dir(&self.scratch_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            // Out of the test's process group: a Ctrl-C there leaves the
            // server to the watchdog.
            .process_group(0);
        as_server_user(&mut cmd);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {}: {e}", mariadbd_bin().display()));
        // Not `--pid-file`: the server writes that only once it is nearly up.
        fs::write(&self.pid_file, format!("{}\n", child.id()))
            .unwrap_or_else(|e| panic!("write {}: {e}", self.pid_file.display()));

        let deadline = Instant::now() + SERVER_TIMEOUT;
        let new_text = |path: &Path, from: u64| {
            let text = fs::read_to_string(path).unwrap_or_default();
            text.get(from as usize..).unwrap_or(&text).to_string()
        };
        loop {
            if new_text(&self.log_file, log_before).contains(READY_LINE) {
                *guard = Some(child);
                return Ok(());
            }
            let exited = child
                .try_wait()
                .unwrap_or_else(|e| panic!("waiting for mariadbd failed: {e}"));
            let late = Instant::now() > deadline;
            if late {
                signal_pid(child.id(), libc::SIGKILL);
                let _ = child.wait();
            }
            if exited.is_some() || late {
                let what = match exited {
                    Some(status) => format!("mariadbd exited with {status}"),
                    None => format!("mariadbd was not ready within {SERVER_TIMEOUT:?}"),
                };
                return Err(format!(
                    "{what}\n--- server log ---\n{}\n--- stdout/stderr ---\n{}",
                    tail(&new_text(&self.log_file, log_before), 60),
                    tail(&new_text(&self.out_file, out_before), 20)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn create_users(&self) {
        let users = format!("{NATIVE_USER}@'%', {ED25519_USER}@'%'");
        self.admin_sql(&format!(
            "INSTALL SONAME 'auth_ed25519';
             CREATE DATABASE {DATABASE};
             CREATE USER {NATIVE_USER}@'%'
                 IDENTIFIED VIA mysql_native_password USING PASSWORD('{NATIVE_PASS}');
             CREATE USER {ED25519_USER}@'%'
                 IDENTIFIED VIA ed25519 USING PASSWORD('{ED25519_PASS}');
             GRANT ALL ON {DATABASE}.* TO {users};
             GRANT PROCESS, CONNECTION ADMIN ON *.* TO {users};"
        ));
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        self.stop();
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The MariaDB account that `unix_socket` maps the tests' OS user to: `root`
/// when the tests run as root, else the invoking user's name (the template's
/// `--auth-root-socket-user`).
fn admin_user() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        // SAFETY: geteuid(2) cannot fail and touches no memory.
        if unsafe { libc::geteuid() } == 0 {
            return "root".to_string();
        }
        let out = output_with_timeout(Command::new("id").arg("-un"), Duration::from_secs(30));
        assert!(
            out.status.success(),
            "`id -un` failed:\n{}",
            describe_output(&out)
        );
        clients::stdout(&out)
    })
}

/// The data directory of this process's `mariadb-install-db` template, made on
/// first use and copied for every server. Removed by a watchdog when the process
/// ends.
fn template_data_dir() -> &'static Path {
    struct Template {
        data: PathBuf,
        _watchdog: Watchdog,
    }
    static TEMPLATE: OnceLock<Template> = OnceLock::new();
    &TEMPLATE
        .get_or_init(|| {
            let tmp = super::scratch_dir("keyhole-mariadb-template-");
            // The bootstrap server's own tmpdir, for the reason in `server_args`.
            let tmp_dir = tmp.path().join("tmp");
            fs::create_dir(&tmp_dir)
                .unwrap_or_else(|e| panic!("create {}: {e}", tmp_dir.display()));
            chown_to_server_user(tmp.path());
            let watchdog = Watchdog::spawn(
                "the mariadb-install-db template",
                r#"rm -rf "$1""#,
                &[OsStr::new(tmp.path())],
                false,
            );
            let dir = tmp.keep();
            let data = dir.join("data");
            let mut datadir = OsString::from("--datadir=");
            datadir.push(&data);
            let mut tmpdir = OsString::from("--tmpdir=");
            tmpdir.push(&tmp_dir);
            let mut cmd = Command::new("mariadb-install-db");
            mariadb_clean_env(&mut cmd)
                .current_dir(&dir)
                .arg("--no-defaults")
                .arg(datadir)
                .arg(tmpdir)
                .arg(format!("--auth-root-socket-user={}", admin_user()))
                .args(["--skip-test-db", "--skip-name-resolve"])
                .args(INNODB_ARGS);
            as_server_user(&mut cmd);
            let out = output_with_timeout(&mut cmd, Duration::from_secs(300));
            assert!(
                out.status.success(),
                "mariadb-install-db failed:\n{}",
                describe_output(&out)
            );
            Template {
                data,
                _watchdog: watchdog,
            }
        })
        .data
}
