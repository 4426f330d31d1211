//! Throwaway PostgreSQL clusters: TLS-only by default, on a free port, with
//! certificates made at test time and one user per authentication method.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use super::certs::TestPki;
use super::clients;
use super::process::{
    as_server_user, chown_to_server_user, clean_env, copy_template_with_pki, describe_output,
    output_with_timeout, Watchdog,
};

/// The superuser; trusted on the Unix socket and over TLS from localhost.
pub const SUPERUSER: &str = "postgres";
/// Logs in without a password (`trust`).
pub const TRUST_USER: &str = "trust_user";
/// Password stored as md5, `md5` authentication.
pub const MD5_USER: &str = "md5_user";
pub const MD5_PASS: &str = "md5_pass";
/// Password stored as SCRAM-SHA-256, `scram-sha-256` authentication.
pub const SCRAM_USER: &str = "scram_user";
pub const SCRAM_PASS: &str = "scram_pass";

/// Names in the server certificate of every cluster (plus ::1, which
/// `generate.sh` always adds).
pub const SERVER_NAMES: [&str; 3] = ["localhost", "db.internal", "127.0.0.1"];

/// How long `pg_ctl` may take to start, stop or restart a server.
const PG_CTL_TIMEOUT: Duration = Duration::from_secs(120);

/// Where the PostgreSQL server programs are: the highest
/// `/usr/lib/postgresql/<version>/bin` holding `postgres`, else `pg_config
/// --bindir` if that holds `postgres`, else `None` (use `PATH`).
pub fn pg_bindir() -> Option<&'static Path> {
    static BINDIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    BINDIR
        .get_or_init(|| {
            let mut best: Option<(Vec<u64>, PathBuf)> = None;
            if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
                for entry in entries.flatten() {
                    let bin = entry.path().join("bin");
                    // Compare "9.6" < "15" < "16" numerically, part by part.
                    let version: Option<Vec<u64>> = entry
                        .file_name()
                        .to_string_lossy()
                        .split('.')
                        .map(|part| part.parse().ok())
                        .collect();
                    if let Some(version) = version {
                        let newer = match &best {
                            Some((v, _)) => version > *v,
                            None => true,
                        };
                        if newer && bin.join("postgres").is_file() {
                            best = Some((version, bin));
                        }
                    }
                }
            }
            if let Some((_, bin)) = best {
                return Some(bin);
            }
            let out = Command::new("pg_config").arg("--bindir").output().ok()?;
            let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            (out.status.success() && bin.join("postgres").is_file()).then_some(bin)
        })
        .as_deref()
}

/// `program` from [`pg_bindir`] if it is there, else the bare name (found on `PATH`).
pub fn pg_bin(program: &str) -> PathBuf {
    match pg_bindir() {
        Some(dir) if dir.join(program).is_file() => dir.join(program),
        _ => PathBuf::from(program),
    }
}

/// A server program, run as the server user with a clean environment, from `cwd`
/// (a directory the server user can enter: it may not be able to enter ours).
fn server_command(program: &str, cwd: &Path) -> Command {
    let mut cmd = Command::new(pg_bin(program));
    clean_env(&mut cmd).current_dir(cwd);
    as_server_user(&mut cmd);
    cmd
}

/// What kind of cluster to start.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// `true` (the default): `ssl = on`, `hostssl` rules only and every non-TLS
    /// connection rejected. `false`: `ssl = off` and plain `host` rules, for tests
    /// against a server that refuses TLS.
    pub ssl: bool,
    /// Extra `postgresql.conf` lines, written after the harness's own (so they win).
    pub extra_conf: Vec<String>,
    /// Extra `pg_hba.conf` lines, placed before the standard TCP rules (so they
    /// win, since the first matching line decides).
    pub extra_hba: Vec<String>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            ssl: true,
            extra_conf: Vec::new(),
            extra_hba: Vec::new(),
        }
    }
}

/// A running PostgreSQL cluster. Dropping it (or [`PgCluster::stop`]) stops the
/// server and deletes its scratch directory; a watchdog does the same if the test
/// process dies first.
pub struct PgCluster {
    /// TCP port on 127.0.0.1 (and the Unix socket's port number).
    pub port: u16,
    /// The CA and certificates; the server uses `server_cert`/`server_key`, and
    /// `ca` is also its `ssl_ca_file`, so `client_cert` is accepted.
    pub pki: TestPki,
    pub data_dir: PathBuf,
    /// Holds the Unix socket `.s.PGSQL.<port>` (superuser trust for setup).
    pub socket_dir: PathBuf,
    /// The server's log (`log_connections = on`).
    pub log_file: PathBuf,
    /// The directory holding all of the above.
    pub scratch_dir: PathBuf,
    pub ssl: bool,
    watchdog: Watchdog,
}

impl PgCluster {
    /// One TLS-only cluster per test binary, started on first use and shared by
    /// all its tests. Do not stop or restart it; start your own for that.
    pub fn shared() -> &'static PgCluster {
        static SHARED: OnceLock<PgCluster> = OnceLock::new();
        SHARED.get_or_init(|| PgCluster::start(PgOptions::default()))
    }

    /// Starts a new cluster: copy of a once-per-process `initdb`, fresh
    /// certificates, a free port, the test users. Panics (with the server log)
    /// if anything fails.
    pub fn start(opts: PgOptions) -> PgCluster {
        let tmp = super::scratch_dir("keyhole-pg-");
        let scratch = tmp.path().to_path_buf();
        let (pki_dir, socket_dir) = (scratch.join("pki"), scratch.join("sock"));
        for dir in [&pki_dir, &socket_dir] {
            fs::create_dir(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        }
        chown_to_server_user(&scratch);

        // From here on the watchdog owns the scratch directory: it stops
        // whatever server runs on the data directory, then deletes everything.
        let data_dir = scratch.join("data");
        let pg_ctl = pg_bin("pg_ctl");
        let watchdog = Watchdog::spawn(
            "a PostgreSQL cluster",
            r#""$1" -D "$2" stop -m fast -w -t 60 >/dev/null 2>&1 ||
               "$1" -D "$2" stop -m immediate -w -t 60 >/dev/null 2>&1
               rm -rf "$3""#,
            &[
                pg_ctl.as_os_str(),
                data_dir.as_os_str(),
                scratch.as_os_str(),
            ],
            true,
        );
        let _ = tmp.keep();

        let template = template_data_dir();
        let pki = copy_template_with_pki(
            "initdb",
            template,
            &scratch,
            &data_dir,
            pki_dir,
            &SERVER_NAMES,
        );

        let mut cluster = PgCluster {
            port: 0,
            pki,
            log_file: scratch.join("server.log"),
            data_dir,
            socket_dir,
            scratch_dir: scratch,
            ssl: opts.ssl,
            watchdog,
        };
        cluster.write_hba(&opts);

        let base_conf = fs::read_to_string(template.join("postgresql.conf"))
            .expect("read the template's postgresql.conf");
        // The port is only known to be free once the server has bound it; a
        // parallel test (or another process) may take it first, so retry.
        let mut attempt = 0;
        loop {
            attempt += 1;
            cluster.port = super::free_port();
            cluster.write_conf(&base_conf, &opts);
            let log_before = fs::metadata(&cluster.log_file).map_or(0, |m| m.len());
            match cluster.pg_ctl(&["start"]) {
                Ok(()) => break,
                Err(err) => {
                    let log = cluster.logs();
                    let new_log = log.get(log_before as usize..).unwrap_or(&log);
                    if attempt < 5 && new_log.contains("Address already in use") {
                        continue;
                    }
                    panic!(
                        "starting PostgreSQL failed: {err}\n--- server log ---\n{}",
                        cluster.log_tail(60)
                    );
                }
            }
        }
        cluster.create_roles();
        cluster
    }

    /// `psql` over TLS straight to the server (no keyhole): host=localhost
    /// (dialled as 127.0.0.1, the only address it listens on), sslmode=verify-full
    /// against the cluster's CA. Ok(trimmed stdout) or
    /// Err(stderr and stdout).
    pub fn psql_direct(
        &self,
        user: &str,
        password: Option<&str>,
        sql: &str,
    ) -> Result<String, String> {
        let conninfo = format!(
            "host=localhost hostaddr=127.0.0.1 port={} user={user} dbname=postgres sslmode=verify-full sslrootcert={}",
            self.port,
            self.pki.ca.display()
        );
        let out = clients::psql_conninfo(&conninfo, password, sql);
        if out.status.success() {
            Ok(clients::stdout(&out))
        } else {
            Err(describe_output(&out))
        }
    }

    /// Runs `sql` as the superuser over the Unix socket and returns the trimmed
    /// output; panics with the server log tail on error.
    pub fn admin_sql(&self, sql: &str) -> String {
        let out = clients::psql_unix(&self.socket_dir, self.port, SUPERUSER, None, sql);
        assert!(
            out.status.success(),
            "admin SQL failed: {sql}\n{}\n--- server log ---\n{}",
            describe_output(&out),
            self.log_tail(40)
        );
        clients::stdout(&out)
    }

    /// The target URL for keyhole's command line (`server-name=localhost`; give
    /// keyhole `--ca-file` with `self.pki.ca`).
    pub fn keyhole_target(&self) -> String {
        format!("postgres://127.0.0.1:{}?server-name=localhost", self.port)
    }

    /// The whole server log.
    pub fn logs(&self) -> String {
        fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.logs();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// `pg_ctl restart -m fast`, returning once the server accepts connections
    /// again. Every open connection is cut.
    pub fn restart(&self) {
        self.pg_ctl_or_panic(&["restart", "-m", "fast"]);
    }

    /// Stops the server (fast shutdown) but keeps its files; see `start_server`.
    pub fn shutdown_server(&self) {
        self.pg_ctl_or_panic(&["stop", "-m", "fast"]);
    }

    /// Starts the server again after `shutdown_server`, on the same port.
    pub fn start_server(&self) {
        self.pg_ctl_or_panic(&["start"]);
    }

    /// Stops the server and deletes the scratch directory (what drop does).
    pub fn stop(&self) {
        self.watchdog.fire();
    }

    fn pg_ctl_or_panic(&self, args: &[&str]) {
        if let Err(err) = self.pg_ctl(args) {
            panic!(
                "pg_ctl {} failed: {err}\n--- server log ---\n{}",
                args.join(" "),
                self.log_tail(60)
            );
        }
    }

    /// `pg_ctl ARGS` on this cluster, waiting (`-w`) for the server to be ready
    /// or gone.
    fn pg_ctl(&self, args: &[&str]) -> Result<(), String> {
        let mut cmd = server_command("pg_ctl", &self.scratch_dir);
        cmd.arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log_file)
            .args(["-w", "-t", "60"])
            .args(args);
        let out = output_with_timeout(&mut cmd, PG_CTL_TIMEOUT);
        if out.status.success() {
            Ok(())
        } else {
            Err(describe_output(&out))
        }
    }

    fn write_conf(&self, base: &str, opts: &PgOptions) {
        let q = |p: &Path| quote_conf(&p.to_string_lossy());
        let mut conf = format!(
            "{base}\n\
             # --- keyhole test harness ---\n\
             listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = {sock}\n\
             max_connections = 300\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             shared_buffers = 64MB\n\
             client_connection_check_interval = 500ms\n\
             log_connections = on\n",
            port = self.port,
            sock = q(&self.socket_dir),
        );
        if opts.ssl {
            conf.push_str(&format!(
                "ssl = on\nssl_cert_file = {}\nssl_key_file = {}\nssl_ca_file = {}\n",
                q(&self.pki.server_cert),
                q(&self.pki.server_key),
                q(&self.pki.ca),
            ));
        } else {
            conf.push_str("ssl = off\n");
        }
        for line in &opts.extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
        self.write_server_file("postgresql.conf", &conf);
    }

    fn write_hba(&self, opts: &PgOptions) {
        let host = if opts.ssl { "hostssl" } else { "host" };
        let mut hba =
            String::from("# TYPE DATABASE USER ADDRESS METHOD\nlocal all postgres trust\n");
        for line in &opts.extra_hba {
            hba.push_str(line);
            hba.push('\n');
        }
        for (user, method) in [
            (SUPERUSER, "trust"),
            (TRUST_USER, "trust"),
            (MD5_USER, "md5"),
            (SCRAM_USER, "scram-sha-256"),
            ("all", "scram-sha-256"),
        ] {
            for addr in ["127.0.0.1/32", "::1/128"] {
                hba.push_str(&format!("{host} all {user} {addr} {method}\n"));
            }
        }
        if opts.ssl {
            hba.push_str("hostnossl all all 0.0.0.0/0 reject\nhostnossl all all ::/0 reject\n");
        }
        self.write_server_file("pg_hba.conf", &hba);
    }

    /// Writes a file into the data directory, owned by the server user.
    fn write_server_file(&self, name: &str, contents: &str) {
        let path = self.data_dir.join(name);
        fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        chown_to_server_user(&path);
    }

    fn create_roles(&self) {
        // md5_user's password must be stored as md5 for md5 authentication to
        // be exercised as such (with a SCRAM secret the server would run SCRAM).
        self.admin_sql(&format!(
            "SET password_encryption = 'md5';
             CREATE ROLE {MD5_USER} LOGIN PASSWORD '{MD5_PASS}';
             SET password_encryption = 'scram-sha-256';
             CREATE ROLE {SCRAM_USER} LOGIN PASSWORD '{SCRAM_PASS}';
             CREATE ROLE {TRUST_USER} LOGIN;
             GRANT ALL ON SCHEMA public TO PUBLIC;
             GRANT pg_signal_backend, pg_read_all_stats TO {TRUST_USER}, {MD5_USER}, {SCRAM_USER};"
        ));
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.watchdog.fire();
    }
}

/// Quotes a value for postgresql.conf.
fn quote_conf(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// The data directory of this process's `initdb` template, made on first use
/// (about a second) and copied for every cluster. Removed by a watchdog when the
/// process ends.
fn template_data_dir() -> &'static Path {
    struct Template {
        data: PathBuf,
        _watchdog: Watchdog,
    }
    static TEMPLATE: OnceLock<Template> = OnceLock::new();
    &TEMPLATE
        .get_or_init(|| {
            let tmp = super::scratch_dir("keyhole-pg-template-");
            chown_to_server_user(tmp.path());
            let watchdog = Watchdog::spawn(
                "the initdb template",
                r#"rm -rf "$1""#,
                &[OsStr::new(tmp.path())],
                false,
            );
            let dir = tmp.keep();
            let data = dir.join("data");
            let mut cmd = server_command("initdb", &dir);
            cmd.arg("-D").arg(&data).args([
                "-A",
                "trust",
                "-U",
                SUPERUSER,
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-instructions",
            ]);
            let out = output_with_timeout(&mut cmd, Duration::from_secs(300));
            assert!(
                out.status.success(),
                "initdb failed:\n{}",
                describe_output(&out)
            );
            Template {
                data,
                _watchdog: watchdog,
            }
        })
        .data
}
