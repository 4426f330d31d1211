//! Shared harness for keyhole's integration tests: real PostgreSQL servers, real
//! clients, the real `keyhole` binary. Every test file includes it with
//! `mod support;` and becomes its own test binary whose tests run in parallel
//! threads, so everything here is thread-safe and picks its own ports and
//! scratch directories.
//!
//! # API
//!
//! - [`free_port`]`() -> u16`: a TCP port on 127.0.0.1 that was free a moment ago
//!   (never the same one twice in one process).
//! - [`certs::TestPki`]: `TestPki::generate(names: &[&str]) -> TestPki` runs
//!   `certs/generate.sh` into a fresh temporary directory (deleted on drop);
//!   `TestPki::generate_in(dir, names)` writes into a directory you own;
//!   `tls_acceptor()` presents the server certificate. Fields
//!   `dir, ca, ca_key, server_cert, server_key, client_cert, client_key: PathBuf`.
//! - [`postgres::PgCluster`]:
//!   - `PgCluster::start(PgOptions { ssl, extra_conf, extra_hba }) -> PgCluster`
//!     (`PgOptions::default()` is a TLS-only cluster), `PgCluster::shared() ->
//!     &'static PgCluster` (one TLS cluster per test binary, started lazily);
//!   - fields `port: u16`, `pki: TestPki` (server SANs localhost, db.internal,
//!     127.0.0.1, ::1), `data_dir`, `socket_dir`, `log_file`, `scratch_dir`;
//!   - `psql_direct(user, password: Option<&str>, sql) -> Result<String, String>`
//!     (verify-full TLS straight to the server), `admin_sql(sql) -> String`
//!     (superuser over the Unix socket, panics on error), `keyhole_target() ->
//!     String`, `logs()`, `log_tail(lines)`, `restart()`, `shutdown_server()`,
//!     `start_server()`, `stop()`.
//!   - Users: `postgres` (superuser, trust), `trust_user` (trust), `md5_user` /
//!     `md5_pass` (md5), `scram_user` / `scram_pass` (scram-sha-256); any other
//!     role needs scram-sha-256. See the constants in [`postgres`].
//! - [`mariadb::MariaDb`]:
//!   - `MariaDb::start(MariaDbOptions { tls, extra_conf }) -> MariaDb`
//!     (`MariaDbOptions::default()` is a TLS server with
//!     `require_secure_transport=ON`; `tls: false` offers no TLS at all;
//!     `extra_conf` entries are `mariadbd` options, `--` optional),
//!     `MariaDb::shared() -> &'static MariaDb` (one TLS server per test binary,
//!     started lazily);
//!   - `port()`, `pki()` (same SANs as PostgreSQL's), `tls()`, `socket_path()`,
//!     `data_dir()`, `scratch_dir()`, `log_path()`, `pid()`, `logs()`,
//!     `log_tail(lines)`;
//!   - `mariadb_direct(user, password, sql) -> Result<String, String>`
//!     (`--ssl-verify-server-cert` against the server's CA, straight to the
//!     server), `admin_sql(sql) -> String` (administrator over the Unix socket by
//!     `unix_socket` authentication, panics on error), `keyhole_target() ->
//!     String` (`mysql://127.0.0.1:PORT?server-name=localhost`), `restart()`,
//!     `shutdown_server()`, `start_server()`, `stop()`;
//!   - Users: `native_user` / `native_pass` (mysql_native_password),
//!     `ed25519_user` / `ed25519_pass` (ed25519), host `%`, ALL on database
//!     `keyhole_test`, plus PROCESS and CONNECTION ADMIN. See the constants in
//!     [`mariadb`]; its module docs say what the `mariadb` client does about TLS
//!     by default and how a refused plain login looks.
//!   - Client: `mariadb::mariadb(port, user, password: Option<&str>, sql) ->
//!     Output` (TCP to 127.0.0.1, database `keyhole_test`),
//!     `mariadb_tcp(port, user, password, extra)`, `mariadb_with_args(args, password)`, `mariadb_command(password) ->
//!     Command`; `--no-defaults` comes first, then `--batch --skip-column-names`;
//!     `MYSQL_*`/`MARIADB_*` variables are removed and `MYSQL_PWD` is set only
//!     when a password is given; no TLS option, so the client's defaults apply.
//!     Every command has a time limit. `read_greeting(port) -> Greeting` reads a
//!     server's greeting (capability flags, see `CLIENT_SSL`) and hangs up.
//!     `native_driver_opts(port)`: mysql_async options for native_user over TCP.
//! - [`keyhole::Keyhole`]: `Keyhole::start(args) -> Keyhole` picks a free port
//!   and *prepends* `--port <port>` itself (callers never pass `--port` to
//!   `start`/`start_on`), retrying on another port if that one was taken
//!   meanwhile; `Keyhole::start_on(port, args)`; `Keyhole::spawn(args, env,
//!   Ready)` passes the arguments verbatim, adds `env` (e.g. `KEYHOLE_*`
//!   settings) and waits for whatever [`keyhole::Ready`] says (`Tcp(port)`,
//!   `Unix(path)`, `Nothing`); `Keyhole::start_expect_exit(args, timeout) ->
//!   (ExitStatus, String)` for configuration errors (`start_expect_exit_with(args,
//!   env, timeout)` with extra environment). Readiness means "this
//!   process has a listening socket there" (read from /proc, no probe
//!   connection). Methods: `port()` (the first target's port), `pid()`,
//!   `logs()`, `log_path()`, `signal(libc::SIGTERM)`, `wait_exit(timeout) ->
//!   Option<ExitStatus>`. Drop kills it. With several targets keyhole also
//!   listens on the next ports; `start` retries if one of those is taken.
//! - [`clients`]: `psql(port, user, password: Option<&str>, sql) -> Output`
//!   (TCP to 127.0.0.1, database `postgres`), `psql_unix(socket_dir, port, user,
//!   password, sql)`, `psql_conninfo(conninfo, password, sql)`,
//!   `psql_args(args, password)`, `pgbench(args, password)`, `command(program,
//!   password) -> Command`, and `stdout`/`stderr`/`expect_success` helpers.
//!   Clients run with libpq defaults (no sslmode): every `PG*` variable is
//!   removed and `PGPASSWORD` is set only when a password is given. psql gets
//!   `-X -A -t -q -w -v ON_ERROR_STOP=1`. Every command has a time limit.
//! - [`cloudsql`]: `FakeSqlAdmin::start()`, a fake Cloud SQL Admin API
//!   (`connectSettings`, `generateEphemeralCert`, bearer tokens, Google's
//!   error bodies, failure injection) whose `add_instance(InstanceSpec) ->
//!   InstanceHandle` starts that instance's server-side proxy on its own
//!   `127.77.x.y:3307` (TLS 1.3, client certificate required, then the real
//!   server's Unix socket); a PostgreSQL cluster behind it needs
//!   `cloudsql::pg_options(iam_users)`. See its module docs.
//! - [`netns`]: `Namespace::create() -> Option<Namespace>` (`None`, after a
//!   loud "SKIPPED" on stderr, where namespaces cannot be made: not root, no
//!   iproute2; `KEYHOLE_REQUIRE_NETNS=1` panics instead), a network namespace
//!   standing in for a VPC: fields `name`, `host_ip` (10.213.N.1, the host's
//!   end of a veth pair), `ns_ip` (10.213.N.2, the namespace's end);
//!   `set_hosts(&[(name, addr)])` (`/etc/netns/<name>/hosts`, seen by every
//!   process started inside, not by the host), `command(program) -> Command`
//!   (`ip netns exec`), `relay_to(addr) -> Relay` (listens on the namespace's
//!   own 127.0.0.1:`relay.port()` and forwards to the host's loopback; the
//!   namespace has no other way there; `connections()`, `cut_all()`),
//!   `claim_port(preferred)`, `pids()`, `kill_all()`. Drop (or the watchdog)
//!   kills everything inside and deletes the namespace and veth pair.
//! - [`bastion`]: real servers inside a namespace on `ns_ip`, killed with
//!   their children on drop: `SshBastion::start(&ns)` (OpenSSH sshd on port
//!   22, key-only; fields `addr`, `client_key`, `known_hosts`, `dir`, `user`;
//!   `ssh_config(alias) -> PathBuf` and the failing `ssh_config_unknown_host`,
//!   `ssh_config_changed_host_key`, `ssh_config_wrong_key`; `kill()`,
//!   `restart()`, `log()`, `logins()`), `Socks5Proxy::start_dante(&ns)` (no
//!   authentication) and `Socks5Proxy::start_microsocks(&ns, user, pass)`
//!   (`addr`, `url()`, `log()`, `kill()`, `restart()`), `HttpProxy::start(&ns,
//!   auth: Option<(user, pass)>)` (tinyproxy, CONNECT to any port; same
//!   methods); `ssh_stdio_forward(config, alias, "host:port") -> Command`
//!   (`ssh -F config -W host:port alias`).
//! - [`fake_ssm`]: AWS Session Manager (the JSON 1.1 API and a fake agent on
//!   the data channel, its own encoding of the messages and of smux):
//!   `FakeSsm::start(creds)`, `env()` (endpoint, CA bundle, region, keys),
//!   fault knobs (`set_faults`, `set_api_failure`, `close_channels`,
//!   `route`), counters and records. Its module docs list the rest.
//! - [`fake_iap`]: the Google IAP TCP forwarding relay: `FakeIap::start(token)`,
//!   `endpoint()`, `ca()`, `add_vm(project, zone, instance, port, addr)`,
//!   refusals (`set_close_before_connect`, `set_http_refusal`), 4004 and
//!   reconnect (`set_reauth_after`), records (`connects`, `reconnects`,
//!   `headers_seen`, `acks_received`).
//! - [`process`]: `output_with_timeout`, `finish_with_timeout(child, what,
//!   limit)`, `Watchdog`, `server_user`, `clean_env`.
//! - [`logs`]: `text_fields(line)`, `closed_lines(log)` (the fields of each
//!   "connection closed" line), `field(fields, key)`.
//! - [`session`]: a tokio-postgres session through keyhole as scram_user:
//!   `connect(rt, port, app)`, `simple_query(rt, client, sql)`; and
//!   `wait_until(what, limit, done, context)`, `exit_code(status)`.
//! - [`otlp`] (feature `otel` only): an OTLP/HTTP receiver that decodes what
//!   keyhole exports with prost: `Receiver::start()`, `endpoint()`,
//!   `set_status(503)`, `stop()`, `requests()`, `spans()`, `last_metrics()`.
//! - [`http`]: a blocking HTTP/1.1 client for keyhole's endpoints (one
//!   request per connection, `Connection: close`): `get(port, path)` and
//!   `post(port, path)` on 127.0.0.1 return `Result<(status, body), String>`,
//!   `request(addr, method, path) -> Result<Reply, String>` adds any address
//!   and the headers (`Reply { status, headers, body }`, `reply.header(name)`);
//!   `Err` says clearly that nothing listens (or what was malformed), so a test
//!   can poll a port that is not bound yet. `accepts(addr)`: does anything
//!   accept TCP connections there?
//!
//! # Cleanup
//!
//! Every long-lived process has a [`process::Watchdog`]: a small `sh` that waits
//! on a pipe only the test process holds and cleans up when that pipe closes,
//! which happens on drop and also when the test process panics, exits or is
//! killed. PostgreSQL clusters are stopped with `pg_ctl stop` and their scratch
//! directory deleted; keyhole processes are killed and their log directory
//! deleted. Statics (the shared cluster, the initdb template) are never dropped:
//! their watchdogs clean up right after the test binary exits.
//!
//! # Root
//!
//! `initdb`, `pg_ctl` and `postgres` refuse to run as root. When the tests run as
//! root (as CI does), those programs run as the `postgres` system user if it
//! exists, else as `keyhole-test` (created with `useradd`), and the scratch
//! directories are handed to that user. Scratch directories live under the
//! standard temporary directory (`TMPDIR`), which that user must be able to
//! traverse. Clients and keyhole run as the invoking user.

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod bastion;
pub mod certs;
pub mod clients;
pub mod cloud;
pub mod cloudsql;
pub mod fake_iap;
pub mod fake_rds;
pub mod fake_ssm;
pub mod fault_proxy;
pub mod http;
pub mod keyhole;
pub mod logs;
pub mod mariadb;
pub mod netns;
#[cfg(feature = "otel")]
pub mod otlp;
pub mod postgres;
pub mod process;
pub mod session;
pub mod sigv4;
pub mod tls_records;
pub mod wire;

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::Mutex;

/// A TCP port on 127.0.0.1 that the kernel had free a moment ago. Within one test
/// process no port is handed out twice; another process may still grab it before
/// the caller binds it, which is why the starters in this module retry on
/// "address in use".
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local address").port();
        drop(listener);
        let mut guard = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
        if guard.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
}

/// A fresh, empty directory under the temporary directory, deleted when the
/// returned handle drops (call `.keep()` to hand that job to a watchdog).
pub fn scratch_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("create a scratch directory")
}

/// A small multi-threaded runtime for tokio-postgres and byte-level peers:
/// its one worker keeps connections and peers going while the test thread
/// blocks on psql, admin SQL or keyhole.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("build a tokio runtime")
}

/// Listens on a fresh port on 127.0.0.1 and runs `each` on every connection
/// that comes, in a task of its own on `rt`: the skeleton of the tests'
/// hand-made servers. Returns the port.
pub fn serve_each<F, Fut>(rt: &tokio::runtime::Runtime, each: F) -> u16
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind a test server on 127.0.0.1");
    let port = listener
        .local_addr()
        .expect("the test server's address")
        .port();
    rt.spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(each(socket));
        }
    });
    port
}
