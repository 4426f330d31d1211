//! Configuration: command-line flags, `KEYHOLE_*` environment variables and
//! a TOML file, merged with flags > environment > file into one validated
//! [`Config`].
//!
//! clap defines the flags and renders `--help`; the values themselves go
//! through one generic lookup ([`Layers`]) keyed by the flag's long name, so
//! every flag gets its environment variable and file key for free, and a
//! test can feed the environment from a map instead of the process.

pub mod cloudsql;
pub mod duration;
pub mod target;
pub mod via;

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser};

use crate::cidr::Cidr;

pub use target::Protocol;

const ENV_HELP: &str = "\
Every option can also be set with an environment variable KEYHOLE_<OPTION> \
(upper case, dashes as underscores: KEYHOLE_MAX_CONNECTIONS=100), or as a key \
in the --config TOML file (max-connections = 100). Targets: KEYHOLE_TARGETS \
(separated by spaces) or `targets = [\"postgres://...\"]`. Flags win over the \
environment, which wins over the file.

Target parameters (postgres://HOST[:PORT]?name=value&..., mysql://HOST[:PORT]?...):
  listen=ADDR:PORT     listen here instead of --address/--port
  unix-socket=DIR      listen on DIR/.s.PGSQL.<port> (Postgres) or DIR/mysql-<port>.sock
                       (MySQL); no TCP unless listen= is given
  ca-file=PATH         CA bundle that signs this server's certificate
  server-name=NAME     name to verify in the server certificate (default: HOST)
  tls-mode=MODE        verify-full (default) or verify-ca; disable only for a Postgres
                       relay on this host (a loopback address), which keyhole splices to
                       with splice(2)
  client-cert=PATH, client-key=PATH   client certificate for this server
  backend=NAME         private-ip (default): dial only private addresses;
                       public: dial only public addresses, verify-full, allow= off loopback
  destinations=CIDR,.. extra ranges private-ip may dial; the only ones public may dial
  allow=CIDR,..        clients (TCP source addresses) that may connect; default: any
  iam=aws|gcp          answer the server's password request with an RDS IAM token (aws)
                       or a Cloud SQL IAM login token (gcp); clients send no password
  region=REGION        AWS region to sign for (default: from the RDS host name, then AWS_REGION)
  user=NAME            database user for every client of this target
  iam-port=PORT        port the token is signed for, when keyhole dials a tunnel or relay
                       (the host signed for is server-name=)
  password-file=PATH   with user=: keyhole logs in with the password in PATH (cleartext,
                       md5 or SCRAM-SHA-256; MySQL: mysql_native_password), as the
                       server asks; clients send none
  pool=session|none    keep server connections keyhole logged in to (iam=, auto-iam-authn,
                       user= with password-file=) and hand them to the next client
                       of the same user, database and startup parameters (Postgres;
                       MySQL: character set and capabilities)
  pool-size=N          server connections at most, idle and in use (default 10)
  pool-idle-timeout=D  close a pooled connection idle this long (default 5m)
  pool-max-lifetime=D  never reuse a connection older than this (default 10m: under
                       the 15-minute RDS token and the hour of a Cloud SQL certificate)

Examples:
  keyhole --ca-file global-bundle.pem postgres://mydb.abc123.eu-west-1.rds.amazonaws.com
  keyhole -p 6432 'postgres://10.0.0.5?server-name=db.internal&ca-file=ca.pem'
  keyhole --ca-file ca.pem postgres://10.0.0.5 mysql://10.0.0.6   (listens on 5432 and 3306)
  keyhole --ca-file global-bundle.pem 'postgres://mydb.abc123.eu-west-1.rds.amazonaws.com?iam=aws'

Commands (each with --help):
  keyhole check-config ARGS...   validate ARGS, the environment and the file; print the result
  keyhole wait [--max 30s]       exit 0 once a running keyhole's /startup answers 200
  keyhole shutdown               ask a running keyhole (--quitquitquit) to stop gracefully
  keyhole token aws|gcp ...      print an IAM database token
  keyhole connect TARGET [-- ARGS]  keyhole for TARGET and psql/mariadb pointed at it
  keyhole completions SHELL      shell completions (bash, zsh, fish, elvish, powershell)
  keyhole man [--out-dir DIR]    the man pages (keyhole(1) on stdout, or every page into DIR)";

/// keyhole: plain Postgres on localhost, verified TLS to the database.
#[derive(Parser, Debug)]
#[command(name = "keyhole", version = crate::platform::version(), about, after_long_help = ENV_HELP, after_help = "See --help for environment variables, target parameters and examples.")]
pub struct Cli {
    /// Databases to proxy, each as postgres://HOST[:PORT][?PARAMS] or mysql://HOST[:PORT][?PARAMS].
    #[arg(value_name = "TARGET")]
    pub targets: Vec<String>,

    /// Address to listen on. [default: 127.0.0.1]
    #[arg(short = 'a', long, value_name = "ADDR")]
    pub address: Option<String>,

    /// First listen port; each further target takes the next one. [default: 5432 for Postgres, 3306 for MySQL]
    #[arg(short = 'p', long, value_name = "PORT")]
    pub port: Option<String>,

    /// Listen on a Unix socket in DIR (.s.PGSQL.<port> or mysql-<port>.sock; for a Cloud SQL instance DIR/PROJECT:REGION:INSTANCE[/.s.PGSQL.5432], as cloud-sql-proxy) instead of TCP.
    #[arg(short = 'u', long, value_name = "DIR")]
    pub unix_socket: Option<String>,

    /// PEM bundle of CAs that sign the servers' certificates. [default: the system roots]
    #[arg(long, value_name = "PATH")]
    pub ca_file: Option<String>,

    /// Client certificate (PEM) keyhole presents to servers that ask for one.
    #[arg(long, value_name = "PATH")]
    pub client_cert: Option<String>,

    /// Private key (PEM) of --client-cert.
    #[arg(long, value_name = "PATH")]
    pub client_key: Option<String>,

    /// Certificate (PEM) for TLS on the local leg; clients may then use sslmode=require.
    #[arg(long, value_name = "PATH")]
    pub listen_cert: Option<String>,

    /// Private key (PEM) of --listen-cert.
    #[arg(long, value_name = "PATH")]
    pub listen_key: Option<String>,

    /// TOML file with any of these options.
    #[arg(long, value_name = "FILE")]
    pub config: Option<String>,

    /// Reload when the --config file, or a CA, certificate or key file the configuration names, changes (checked every 2 s). SIGHUP reloads with or without it.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub watch: Option<String>,

    /// Most client connections at once, over all targets; 0 means no limit. [default: 0]
    #[arg(long, value_name = "N")]
    pub max_connections: Option<String>,

    /// Threads that carry client connections (each connection stays on one). [default: half the cores keyhole may use, rounded up]
    #[arg(long, value_name = "N")]
    pub data_threads: Option<String>,

    /// After SIGTERM/SIGINT (and --min-sigterm-delay), how long open connections may go on before they are cut. [default: 0s]
    #[arg(long, value_name = "DURATION")]
    pub max_sigterm_delay: Option<String>,

    /// How long a new client may take to send its startup packet. [default: 10s]
    #[arg(long, value_name = "DURATION")]
    pub startup_timeout: Option<String>,

    /// Limit for each TCP connect attempt to the server, and again for its TLS setup. [default: 10s]
    #[arg(long, value_name = "DURATION")]
    pub connect_timeout: Option<String>,

    /// Pipe size for splice(2) between plain legs (a Postgres relay with tls-mode=disable), in bytes, KiB or MiB (e.g. 1MiB); the kernel default (64 KiB) when unset. A size the kernel refuses (over /proc/sys/fs/pipe-max-size, or past the user's pipe pages) keeps the default, with one warning.
    #[arg(long, value_name = "BYTES")]
    pub pipe_size: Option<String>,

    /// Hand each upstream session's TLS records to the kernel (kTLS) after the handshake: auto (where the kernel offers the TLS ULP and the negotiated suite; keyhole's own record layer otherwise) or off. [default: off]
    #[arg(long, value_name = "auto|off")]
    pub kernel_tls: Option<String>,

    /// Log lines as text, json (Cloud Logging's field names: severity, time, message, labels) or cloudwatch (JSON with level, timestamp, message). Levels from RUST_LOG (default: info).
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,

    /// How keyhole may reach the databases: private-ip or public (target parameter backend=). [default: private-ip]
    #[arg(long, value_name = "NAME")]
    pub backend: Option<String>,

    /// Address ranges (CIDR, comma-separated) the backend may dial besides its own (target parameter destinations=).
    #[arg(long, value_name = "CIDRS")]
    pub destinations: Option<String>,

    /// Client source ranges (CIDR, comma-separated) that may connect; others are refused (target parameter allow=). [default: any]
    #[arg(long, value_name = "CIDRS")]
    pub allow: Option<String>,

    /// Log in with IAM tokens: aws (RDS/Aurora) or gcp (Cloud SQL) (target parameter iam=).
    #[arg(long, value_name = "PROVIDER")]
    pub iam: Option<String>,

    /// AWS region for iam=aws tokens (target parameter region=). [default: from the RDS host name, then AWS_REGION]
    #[arg(long, value_name = "REGION")]
    pub region: Option<String>,

    /// Database user for every client, whatever user it sends (target parameter user=).
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,

    /// Reach the databases through a hop: ssh://[USER@]HOST[:PORT] (an SSH bastion), socks5://[USER:PASS@]HOST:PORT, http(s)://[USER:PASS@]HOST:PORT (HTTP CONNECT), iap://PROJECT/ZONE/VM (Google IAP), ssm://INSTANCE-ID (AWS Session Manager), a cloud tunnel then ssh:// (iap://p/z/vm,ssh://user@vm), or direct (target parameter via=). [default: direct, or ALL_PROXY when it is socks5://]
    #[arg(long, value_name = "URL")]
    pub via: Option<String>,

    /// The OpenSSH client configuration for ssh:// hops, instead of ~/.ssh/config.
    #[arg(long, value_name = "FILE")]
    pub ssh_config: Option<String>,

    /// The IAP TCP forwarding endpoint for iap:// hops. [default: wss://tunnel.cloudproxy.app]
    #[arg(long, value_name = "URL")]
    pub iap_endpoint: Option<String>,

    /// Address of the HTTP server for --health-check and --prometheus. [default: 127.0.0.1]
    #[arg(long, value_name = "ADDR")]
    pub http_address: Option<String>,

    /// Port of the HTTP server for --health-check and --prometheus. [default: 9090]
    #[arg(long, value_name = "PORT")]
    pub http_port: Option<String>,

    /// Serve /startup, /liveness and /readiness on the HTTP server.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub health_check: Option<String>,

    /// Serve Prometheus metrics on the HTTP server's /metrics.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub prometheus: Option<String>,

    /// /readiness also opens a TLS connection to every target (no login) and fails if one does not answer.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub readiness_checks_upstream: Option<String>,

    /// Serve POST /quitquitquit (graceful shutdown, exit 0) on 127.0.0.1:--admin-port.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub quitquitquit: Option<String>,

    /// Port of the admin server, always on 127.0.0.1. [default: 9091]
    #[arg(long, value_name = "PORT")]
    pub admin_port: Option<String>,

    /// On SIGTERM/SIGINT, keep accepting new connections this long before draining. [default: 0s]
    #[arg(long, value_name = "DURATION")]
    pub min_sigterm_delay: Option<String>,

    /// Exit 0 after SIGTERM/SIGINT even when open connections had to be cut.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub exit_zero_on_sigterm: Option<String>,

    /// At start, open a TLS connection to every target once; exit 1 if one fails.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub run_connection_test: Option<String>,

    /// Log and skip a target whose configuration fails, instead of not starting.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub skip_failed_targets: Option<String>,

    // Cloud SQL instances (targets named PROJECT:REGION:INSTANCE), with
    // cloud-sql-proxy's own flag names.
    /// Cloud SQL: dial instances' private IP addresses (instance parameter private-ip).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", help_heading = "Cloud SQL instances")]
    pub private_ip: Option<String>,

    /// Cloud SQL: dial instances' Private Service Connect DNS names (instance parameter psc).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", help_heading = "Cloud SQL instances")]
    pub psc: Option<String>,

    /// Cloud SQL: dial the public IP address if the instance has one, else the private one (instance parameter auto-ip).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", help_heading = "Cloud SQL instances")]
    pub auto_ip: Option<String>,

    /// Cloud SQL: automatic IAM database login; clients send their IAM user name and no password (instance parameter auto-iam-authn).
    #[arg(short = 'i', long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", help_heading = "Cloud SQL instances")]
    pub auto_iam_authn: Option<String>,

    /// Cloud SQL: fetch certificates only when a connection needs one, nothing in the background (for CPU-throttled hosts such as Cloud Run); SSH bastions (via=) log in at the first client, not at start.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", help_heading = "Cloud SQL instances")]
    pub lazy_refresh: Option<String>,

    /// Cloud SQL: a service account key or user credentials file, instead of Application Default Credentials.
    #[arg(
        short = 'c',
        long,
        value_name = "PATH",
        help_heading = "Cloud SQL instances"
    )]
    pub credentials_file: Option<String>,

    /// Cloud SQL: the same credentials as JSON text.
    #[arg(
        short = 'j',
        long,
        value_name = "JSON",
        help_heading = "Cloud SQL instances"
    )]
    pub json_credentials: Option<String>,

    /// Cloud SQL: an OAuth2 access token for the SQL Admin API, instead of credentials.
    #[arg(
        short = 't',
        long,
        value_name = "TOKEN",
        help_heading = "Cloud SQL instances"
    )]
    pub token: Option<String>,

    /// Cloud SQL: with --token and --auto-iam-authn, the OAuth2 token for IAM database login.
    #[arg(long, value_name = "TOKEN", help_heading = "Cloud SQL instances")]
    pub login_token: Option<String>,

    /// Cloud SQL: act as this service account; a comma-separated chain names the target first, then delegates, the last of them acting first (as cloud-sql-proxy).
    #[arg(
        long,
        value_name = "EMAIL[,EMAIL...]",
        help_heading = "Cloud SQL instances"
    )]
    pub impersonate_service_account: Option<String>,

    /// Cloud SQL: bill SQL Admin API calls to this project (X-Goog-User-Project).
    #[arg(long, value_name = "PROJECT", help_heading = "Cloud SQL instances")]
    pub quota_project: Option<String>,

    /// Cloud SQL: the SQL Admin API's address. [default: https://sqladmin.googleapis.com, or sqladmin.UNIVERSE]
    #[arg(long, value_name = "URL", help_heading = "Cloud SQL instances")]
    pub sqladmin_api_endpoint: Option<String>,

    /// Cloud SQL: the IAM Credentials API's address, for --impersonate-service-account (keyhole's own option). [default: https://iamcredentials.googleapis.com, or iamcredentials.UNIVERSE]
    #[arg(long, value_name = "URL", help_heading = "Cloud SQL instances")]
    pub iam_credentials_endpoint: Option<String>,

    /// Cloud SQL: the Google Cloud universe domain. [default: googleapis.com]
    #[arg(long, value_name = "DOMAIN", help_heading = "Cloud SQL instances")]
    pub universe_domain: Option<String>,

    /// cloud-sql-proxy's name for --log-format json (Cloud Logging's JSON).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", help_heading = "Cloud SQL instances")]
    pub structured_logs: Option<String>,

    /// cloud-sql-proxy's name for RUST_LOG=debug.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", help_heading = "Cloud SQL instances")]
    pub debug_logs: Option<String>,

    /// cloud-sql-proxy's name for --skip-failed-targets.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", help_heading = "Cloud SQL instances")]
    pub skip_failed_instance_config: Option<String>,
}

/// The whole configuration, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub targets: Vec<TargetConfig>,
    /// Targets left out by `--skip-failed-targets`, with why.
    pub skipped: Vec<SkippedTarget>,
    /// `None`: no limit.
    pub max_connections: Option<NonZeroUsize>,
    /// `--data-threads`; `None`: half the cores, rounded up (see
    /// `proxy::workers`).
    pub data_threads: Option<NonZeroUsize>,
    /// After a stop signal, keep accepting this long.
    pub min_sigterm_delay: Duration,
    /// Then wait this long for open connections.
    pub max_sigterm_delay: Duration,
    pub exit_zero_on_sigterm: bool,
    pub run_connection_test: bool,
    pub skip_failed_targets: bool,
    pub startup_timeout: Duration,
    pub connect_timeout: Duration,
    /// `--pipe-size`: `None` is the kernel's default.
    pub pipe_size: Option<usize>,
    /// `--kernel-tls`.
    pub kernel_tls: crate::tls::KernelTls,
    pub log_format: LogFormat,
    /// Certificate for TLS on the client leg.
    pub listen_tls: Option<CertKey>,
    pub http: HttpConfig,
    /// `--quitquitquit`: the admin server's port (on 127.0.0.1).
    pub admin_port: Option<u16>,
    /// `--config`, if a file was read.
    pub config_file: Option<PathBuf>,
    /// `--watch`: reload when a file in [`Config::files`] changes.
    pub watch: bool,
    /// Where each option that was set came from (`--flag`, `KEYHOLE_*`, the
    /// file), by its long name: for `keyhole check-config`.
    pub origins: BTreeMap<String, String>,
    /// The Cloud SQL connector's settings (used by instance targets).
    pub cloudsql: cloudsql::CloudSqlSettings,
    /// `--debug-logs`: debug level unless `RUST_LOG` says otherwise.
    pub debug_logs: bool,
    /// `--ssh-config`: the OpenSSH client configuration for `ssh://` hops.
    pub ssh_config: Option<PathBuf>,
    /// `--iap-endpoint`: where `iap://` hops open their tunnels.
    pub iap_endpoint: String,
    /// Why `ALL_PROXY` is not used, when it is set but not SOCKS5.
    pub all_proxy_ignored: Option<String>,
}

pub const DEFAULT_HTTP_PORT: u16 = 9090;
pub const DEFAULT_ADMIN_PORT: u16 = 9091;

/// The HTTP server for health checks and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    pub address: IpAddr,
    pub port: u16,
    /// `/startup`, `/liveness`, `/readiness`.
    pub health_check: bool,
    /// `/metrics`.
    pub prometheus: bool,
    /// `/readiness` dials every target.
    pub readiness_checks_upstream: bool,
}

impl HttpConfig {
    /// Whether the server runs at all.
    pub fn enabled(&self) -> bool {
        self.health_check || self.prometheus
    }
}

/// A target `--skip-failed-targets` left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedTarget {
    /// As given.
    pub target: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertKey {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// One database keyhole proxies to, with where it listens for it.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetConfig {
    /// `postgres://host:port` or `PROJECT:REGION:INSTANCE`, for logs and messages.
    pub name: String,
    /// `None` only for a Cloud SQL instance whose engine is not known yet.
    pub protocol: Option<Protocol>,
    pub host: String,
    pub port: u16,
    /// TCP listen address, if any.
    pub listen: Option<SocketAddr>,
    /// Unix socket file, if any.
    pub unix_socket: Option<PathBuf>,
    pub tls: UpstreamTls,
    /// The network policy: a name in [`crate::backend::REGISTRY`].
    pub backend: String,
    /// `destinations=`: ranges the backend may dial besides (or, for
    /// `public`, instead of) its own.
    pub destinations: Vec<Cidr>,
    /// `allow=`: client source ranges that may connect; empty means any.
    pub allow: Vec<Cidr>,
    /// Token login, if the target uses it.
    pub iam: Option<Iam>,
    /// `user=`: the database user for every client.
    pub user: Option<String>,
    /// A Cloud SQL instance target: its name and connector settings.
    pub cloudsql: Option<cloudsql::CloudSqlTarget>,
    /// A listener that waits for the instance's engine ([`cloudsql::settle`]).
    pub pending: Option<cloudsql::Pending>,
    /// `via=`: the hop to the database's host, or direct.
    pub via: via::Via,
    /// `pool=session`: server connections kept and reused.
    pub pool: Option<PoolSettings>,
    /// `password-file=`: keyhole logs in as `user=` with this file's password.
    pub password_file: Option<PathBuf>,
}

/// `pool=session` and its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    /// Server connections at most, idle and in use, over every user and database.
    pub size: usize,
    /// A connection idle this long is closed.
    pub idle_timeout: Duration,
    /// A connection older than this is never handed out again.
    pub max_lifetime: Duration,
}

impl PoolSettings {
    pub const DEFAULT_SIZE: usize = 10;
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
    /// Below the 15 minutes of an RDS token and the hour of a Cloud SQL
    /// ephemeral certificate, with room for the session that holds it.
    pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(600);
}

/// Token login for a target (`iam=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iam {
    pub provider: IamProvider,
    /// `region=` (AWS); `None`: from the host name, then the environment.
    pub region: Option<String>,
    /// The host the token is for: the database's own name (`server-name=`,
    /// which defaults to the target host), whatever address keyhole dials.
    pub endpoint_host: String,
    /// The port the token is for (`iam-port=`, default the target's port).
    pub endpoint_port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IamProvider {
    /// RDS and Aurora IAM database authentication.
    Aws,
    /// Cloud SQL IAM database login.
    Gcp,
}

impl IamProvider {
    pub fn name(self) -> &'static str {
        match self {
            IamProvider::Aws => "aws",
            IamProvider::Gcp => "gcp",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    /// `None`: the system trust store.
    pub ca_file: Option<PathBuf>,
    /// The name the server certificate must carry.
    pub server_name: String,
    pub mode: TlsMode,
    pub client_cert: Option<CertKey>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Chain to a trusted CA and name match.
    VerifyFull,
    /// Chain to a trusted CA; any name.
    VerifyCa,
    /// No TLS: only to a relay on this host (a loopback address) that
    /// speaks Postgres and does its own TLS onward. Both legs are then
    /// plain and bytes move with splice(2).
    Disable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    /// JSON named for Cloud Logging (`severity`, `time`, labels).
    Json,
    /// JSON named for CloudWatch (`level`, `timestamp`).
    CloudWatch,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--help`, `--version` or a malformed command line: clap renders it.
    #[error("{0}")]
    Cli(#[from] clap::Error),
    #[error("{0}")]
    Invalid(String),
}

impl ConfigError {
    /// The error as one line for stderr: clap's message without its
    /// "error: " prefix and usage block, pointing at `--help`.
    pub fn one_line(&self) -> String {
        match self {
            ConfigError::Cli(e) => {
                let text = e.render().to_string();
                let first = text.lines().next().unwrap_or("invalid command line");
                format!(
                    "{} (see keyhole --help)",
                    first.trim_start_matches("error: ")
                )
            }
            ConfigError::Invalid(message) => message.clone(),
        }
    }
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

/// Where a value came from, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Flag,
    Env,
    /// cloud-sql-proxy's `CSQL_PROXY_*` variable.
    CsqlEnv,
    File,
}

/// The three sources, each a map from an option's long name to its text.
struct Layers {
    flags: HashMap<String, String>,
    env: HashMap<String, String>,
    file: BTreeMap<String, String>,
    file_path: Option<PathBuf>,
}

impl Layers {
    fn get(&self, key: &str) -> Option<(String, Origin)> {
        if let Some(v) = self.flags.get(key) {
            return Some((v.clone(), Origin::Flag));
        }
        if let Some(v) = self.env.get(&env_name(key)) {
            return Some((v.clone(), Origin::Env));
        }
        if let Some(v) = self.env.get(&csql_env_name(key)) {
            return Some((v.clone(), Origin::CsqlEnv));
        }
        self.file.get(key).map(|v| (v.clone(), Origin::File))
    }

    fn describe(&self, key: &str, origin: Origin) -> String {
        match origin {
            Origin::Flag => format!("--{key}"),
            Origin::Env => env_name(key),
            Origin::CsqlEnv => csql_env_name(key),
            Origin::File => format!(
                "'{key}' in {}",
                self.file_path
                    .as_deref()
                    .unwrap_or(Path::new("the config file"))
                    .display()
            ),
        }
    }

    /// Where every option that was set came from.
    fn origins(&self) -> BTreeMap<String, String> {
        let keys = self.flags.keys().chain(self.file.keys()).cloned().chain(
            self.env
                .keys()
                .filter_map(|k| {
                    k.strip_prefix("KEYHOLE_")
                        .or_else(|| k.strip_prefix("CSQL_PROXY_"))
                })
                .map(|k| k.to_ascii_lowercase().replace('_', "-")),
        );
        keys.filter_map(|key| {
            let (_, origin) = self.get(&key)?;
            let shown = self.describe(&key, origin);
            Some((key, shown))
        })
        .collect()
    }

    /// Looks `key` up and parses it, naming the source in any error.
    fn parse<T>(
        &self,
        key: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some((text, origin)) => parse(&text)
                .map(Some)
                .map_err(|e| invalid(format!("{}: {e}", self.describe(key, origin)))),
        }
    }
}

/// The process environment as text (variables that are not UTF-8 are
/// skipped): what configuration and credential sources read.
pub fn process_env() -> HashMap<String, String> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect()
}

/// `max-connections` → `KEYHOLE_MAX_CONNECTIONS`.
pub fn env_name(key: &str) -> String {
    format!("KEYHOLE_{}", key.to_ascii_uppercase().replace('-', "_"))
}

/// `private-ip` → `CSQL_PROXY_PRIVATE_IP`: cloud-sql-proxy's variables work
/// too, below keyhole's own.
pub fn csql_env_name(key: &str) -> String {
    format!("CSQL_PROXY_{}", key.to_ascii_uppercase().replace('-', "_"))
}

impl Config {
    /// Reads the process's own arguments and environment.
    pub fn from_process() -> Result<Config, ConfigError> {
        let env: HashMap<String, String> = process_env()
            .into_iter()
            .filter(|(k, _)| {
                k.starts_with("KEYHOLE_")
                    || k.starts_with("CSQL_PROXY_")
                    || via::PROXY_VARIABLES.contains(&k.as_str())
            })
            .collect();
        Config::load(std::env::args_os(), &env)
    }

    /// Parses `args` (program name first) against `env`, reading the config
    /// file if one is named.
    pub fn load<I, T>(args: I, env: &HashMap<String, String>) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let command = Cli::command();
        let known: Vec<String> = command
            .get_arguments()
            .filter_map(|a| a.get_long().map(str::to_owned))
            .filter(|l| l != "help" && l != "version")
            .collect();
        let matches = command.try_get_matches_from(args)?;
        let cli = Cli::from_arg_matches(&matches)?;

        let mut flags = HashMap::new();
        for key in &known {
            let id = key.replace('-', "_");
            if let Ok(Some(v)) = matches.try_get_one::<String>(&id) {
                flags.insert(key.clone(), v.clone());
            }
        }
        let mut layers = Layers {
            flags,
            env: env.clone(),
            file: BTreeMap::new(),
            file_path: None,
        };
        let mut file_targets = Vec::new();
        if let Some((path, _)) = layers.get("config") {
            let path = PathBuf::from(path);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| invalid(format!("cannot read config file {}: {e}", path.display())))?;
            let (values, targets) = parse_file(&text, &known)
                .map_err(|e| invalid(format!("config file {}: {e}", path.display())))?;
            layers.file = values;
            file_targets = targets;
            layers.file_path = Some(path);
        }

        let targets: Vec<String> = if !cli.targets.is_empty() {
            cli.targets
        } else if let Some(t) = env.get("KEYHOLE_TARGETS") {
            t.split_whitespace().map(str::to_owned).collect()
        } else if let Some(t) = csql_instances(env) {
            t
        } else {
            file_targets
        };
        build(&layers, &targets)
    }

    /// `keyhole ARGS` with an empty environment, for tests that need a
    /// valid configuration.
    #[cfg(test)]
    pub(crate) fn from_test_args(args: &[&str]) -> Config {
        Config::load(
            std::iter::once("keyhole").chain(args.iter().copied()),
            &HashMap::new(),
        )
        .expect("a valid configuration")
    }
}

impl Config {
    /// Every file this configuration is read from or names for TLS: the
    /// `--config` file, then each CA bundle, client certificate and key, and
    /// the listen certificate and key, each once. What `--watch` polls, and
    /// what a reload reads afresh.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self.config_file.iter().cloned().collect();
        let mut add = |path: &Path| {
            if !files.iter().any(|f| f == path) {
                files.push(path.to_owned());
            }
        };
        for target in &self.targets {
            for path in target.tls_files() {
                add(path);
            }
            if let Some(path) = &target.password_file {
                add(path);
            }
        }
        if let Some(ck) = &self.listen_tls {
            add(&ck.cert);
            add(&ck.key);
        }
        files
    }
}

impl TargetConfig {
    /// The files this target's upstream TLS reads: its CA bundle, client
    /// certificate and key (none for a Cloud SQL instance or `tls-mode=disable`).
    pub fn tls_files(&self) -> Vec<&Path> {
        if self.cloudsql.is_some() || self.tls.mode == TlsMode::Disable {
            return Vec::new();
        }
        let ca = self.tls.ca_file.as_deref();
        let client = self
            .tls
            .client_cert
            .iter()
            .flat_map(|ck| [ck.cert.as_path(), ck.key.as_path()]);
        ca.into_iter().chain(client).collect()
    }
}

/// cloud-sql-proxy's `CSQL_PROXY_INSTANCE_CONNECTION_NAME`, then
/// `..._NAME_0`, `..._NAME_1`, ... while they go on.
fn csql_instances(env: &HashMap<String, String>) -> Option<Vec<String>> {
    const NAME: &str = "CSQL_PROXY_INSTANCE_CONNECTION_NAME";
    let mut found: Vec<String> = env.get(NAME).into_iter().cloned().collect();
    for i in 0.. {
        match env.get(&format!("{NAME}_{i}")) {
            Some(v) => found.push(v.clone()),
            None => break,
        }
    }
    (!found.is_empty()).then_some(found)
}

/// The TOML file: option keys as in the flags, plus `targets`.
fn parse_file(
    text: &str,
    known: &[String],
) -> Result<(BTreeMap<String, String>, Vec<String>), String> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| e.message().to_owned())?;
    let mut values = BTreeMap::new();
    let mut targets = Vec::new();
    for (key, value) in table {
        if key == "targets" {
            let list = value
                .as_array()
                .ok_or("'targets' must be a list of strings")?;
            for t in list {
                targets.push(
                    t.as_str()
                        .ok_or("'targets' must be a list of strings")?
                        .to_owned(),
                );
            }
            continue;
        }
        if key == "config" || !known.contains(&key) {
            return Err(format!(
                "unknown key '{key}' (known: targets, {})",
                known.join(", ")
            ));
        }
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            _ => return Err(format!("'{key}' must be a string or a number")),
        };
        values.insert(key, text);
    }
    Ok((values, targets))
}

fn parse_bool(text: &str) -> Result<bool, String> {
    match text.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("'{text}' is not true or false")),
    }
}

/// `65536`, `64KiB`, `1MiB` (also `K`/`M`, `KB`/`MB` as binary units).
fn parse_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        _ => {
            return Err(format!(
                "'{text}' is not a size (bytes, or with KiB or MiB)"
            ))
        }
    };
    number
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("'{text}' is not a size (bytes, or with KiB or MiB)"))
}

fn parse_path(text: &str) -> Result<PathBuf, String> {
    if text.is_empty() {
        Err("empty path".into())
    } else {
        Ok(PathBuf::from(text))
    }
}

fn parse_tls_mode(text: &str) -> Result<TlsMode, String> {
    match text {
        "verify-full" => Ok(TlsMode::VerifyFull),
        "verify-ca" => Ok(TlsMode::VerifyCa),
        "disable" => Ok(TlsMode::Disable),
        other => Err(format!(
            "'{other}' is not a TLS mode (verify-full, verify-ca, or disable for a relay on this host)"
        )),
    }
}

/// `tls-mode=disable` sends everything, passwords and tokens included, in
/// the clear: only to a relay on this host, and only for Postgres (a MySQL
/// login without TLS would change the capabilities keyhole negotiates).
fn check_plain_relay(host: &str, protocol: Protocol) -> Result<(), String> {
    if protocol != Protocol::Postgres {
        return Err("disable is for Postgres relays only; MySQL targets always use TLS".into());
    }
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback {
        Ok(())
    } else {
        Err(format!(
            "disable sends passwords in the clear, so keyhole allows it only to a relay on this host              (localhost, 127.0.0.0/8, ::1), not to {host}"
        ))
    }
}

fn parse_backend(text: &str) -> Result<String, String> {
    match crate::backend::find(text) {
        Some(r) => Ok(r.name.to_owned()),
        None => Err(format!(
            "unknown backend '{text}' (known: {})",
            crate::backend::names()
        )),
    }
}

fn parse_iam(text: &str) -> Result<Option<IamProvider>, String> {
    match text {
        "aws" => Ok(Some(IamProvider::Aws)),
        "gcp" => Ok(Some(IamProvider::Gcp)),
        "none" | "" => Ok(None),
        other => Err(format!(
            "'{other}' is not a token provider (aws for RDS/Aurora, gcp for Cloud SQL, or none)"
        )),
    }
}

fn parse_region(text: &str) -> Result<String, String> {
    let ok = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(text.to_owned())
    } else {
        Err(format!("'{text}' is not an AWS region like eu-west-1"))
    }
}

fn parse_user(text: &str) -> Result<String, String> {
    if text.is_empty() || text.contains('\0') {
        Err("a user name must be non-empty text".into())
    } else {
        Ok(text.to_owned())
    }
}

fn cert_key(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    what: &str,
) -> Result<Option<CertKey>, ConfigError> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(CertKey { cert, key })),
        (None, None) => Ok(None),
        _ => Err(invalid(format!(
            "{what}-cert and {what}-key go together: give both or neither"
        ))),
    }
}

fn build(layers: &Layers, targets: &[String]) -> Result<Config, ConfigError> {
    if targets.is_empty() {
        return Err(invalid(
            "no target given: name at least one database, like keyhole postgres://db.internal:5432 or mysql://db.internal:3306",
        ));
    }
    let address: IpAddr = layers
        .parse("address", |t| {
            t.parse::<IpAddr>()
                .map_err(|_| format!("'{t}' is not an IP address"))
        })?
        .unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let base_port: Option<u16> = layers.parse("port", |t| {
        t.parse::<u16>()
            .map_err(|_| format!("'{t}' is not a port number"))
    })?;
    let unix_socket = layers.parse("unix-socket", parse_path)?;
    let ca_file = layers.parse("ca-file", parse_path)?;
    let client_cert = cert_key(
        layers.parse("client-cert", parse_path)?,
        layers.parse("client-key", parse_path)?,
        "client",
    )?;
    let listen_tls = cert_key(
        layers.parse("listen-cert", parse_path)?,
        layers.parse("listen-key", parse_path)?,
        "listen",
    )?;
    let max_connections = layers
        .parse("max-connections", |t| {
            t.parse::<usize>()
                .map_err(|_| format!("'{t}' is not a number"))
        })?
        .and_then(NonZeroUsize::new);
    let data_threads = layers.parse("data-threads", |t| {
        t.parse::<NonZeroUsize>()
            .map_err(|_| format!("'{t}' is not a number of threads (1 or more)"))
    })?;
    let max_sigterm_delay = layers
        .parse("max-sigterm-delay", duration::parse)?
        .unwrap_or(Duration::ZERO);
    let startup_timeout = layers
        .parse("startup-timeout", duration::parse)?
        .unwrap_or(Duration::from_secs(10));
    let connect_timeout = layers
        .parse("connect-timeout", duration::parse)?
        .unwrap_or(Duration::from_secs(10));
    let pipe_size = layers.parse("pipe-size", parse_size)?;
    let kernel_tls = layers
        .parse("kernel-tls", |t| match t {
            "auto" => Ok(crate::tls::KernelTls::Auto),
            "off" => Ok(crate::tls::KernelTls::Off),
            other => Err(format!("'{other}' is not a kernel TLS mode (auto or off)")),
        })?
        .unwrap_or_default();
    let structured_logs = layers
        .parse("structured-logs", parse_bool)?
        .unwrap_or(false);
    let log_format = layers
        .parse("log-format", |t| match t {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            "cloudwatch" => Ok(LogFormat::CloudWatch),
            other => Err(format!(
                "'{other}' is not a log format (text, json or cloudwatch)"
            )),
        })?
        .unwrap_or(if structured_logs {
            LogFormat::Json
        } else {
            LogFormat::Text
        });
    let backend = layers.parse("backend", parse_backend)?;
    let destinations = layers.parse("destinations", Cidr::parse_list)?;
    let allow = layers.parse("allow", Cidr::parse_list)?;
    let iam = layers.parse("iam", parse_iam)?.flatten();
    let region = layers.parse("region", parse_region)?;
    let user = layers.parse("user", parse_user)?;
    let via = via::DefaultVia::from_env(layers.parse("via", via::Via::parse)?, &layers.env);
    let ssh_config = layers.parse("ssh-config", parse_path)?;
    let iap_endpoint = layers
        .parse("iap-endpoint", |t| {
            crate::transport::wss::parse_url(t).map(|_| t.trim().trim_end_matches('/').to_owned())
        })?
        .unwrap_or_else(|| crate::transport::iap::DEFAULT_ENDPOINT.to_owned());
    let min_sigterm_delay = layers
        .parse("min-sigterm-delay", duration::parse)?
        .unwrap_or(Duration::ZERO);
    let flag = |key: &str| -> Result<bool, ConfigError> {
        Ok(layers.parse(key, parse_bool)?.unwrap_or(false))
    };
    let port_of = |key: &str, default: u16| -> Result<u16, ConfigError> {
        Ok(layers
            .parse(key, |t| {
                t.parse::<u16>()
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(|| format!("'{t}' is not a port number"))
            })?
            .unwrap_or(default))
    };
    let http = HttpConfig {
        address: layers
            .parse("http-address", |t| {
                t.parse::<IpAddr>()
                    .map_err(|_| format!("'{t}' is not an IP address"))
            })?
            .unwrap_or(IpAddr::from([127, 0, 0, 1])),
        port: port_of("http-port", DEFAULT_HTTP_PORT)?,
        health_check: flag("health-check")?,
        prometheus: flag("prometheus")?,
        readiness_checks_upstream: flag("readiness-checks-upstream")?,
    };
    let admin_port = port_of("admin-port", DEFAULT_ADMIN_PORT)?;
    let admin_port = flag("quitquitquit")?.then_some(admin_port);
    let skip_failed_targets = flag("skip-failed-targets")? || flag("skip-failed-instance-config")?;
    let cloudsql_settings = cloudsql_settings(layers)?;
    let instance_defaults = cloudsql::InstanceDefaults {
        ip: cloudsql::parse_ip_flags(flag("private-ip")?, flag("psc")?, flag("auto-ip")?)
            .map_err(invalid)?,
        auto_iam_authn: flag("auto-iam-authn")?,
    };
    if startup_timeout.is_zero() || connect_timeout.is_zero() {
        return Err(invalid(
            "startup-timeout and connect-timeout must be more than zero",
        ));
    }

    let defaults = TargetDefaults {
        address,
        unix_socket,
        ca_file,
        client_cert,
        backend,
        destinations,
        allow,
        iam,
        region,
        user,
        via,
    };
    let mut built: Vec<TargetConfig> = Vec::with_capacity(targets.len());
    let mut skipped = Vec::new();
    // Without --port each protocol counts from its own default port
    // (5432, 5433, ... and 3306, 3307, ...); with it, all count from there.
    // A skipped target keeps its place: the others' ports do not move.
    let mut per_protocol: Vec<(Protocol, u32)> = Vec::new();
    for (index, text) in targets.iter().enumerate() {
        if crate::cloudsql::name::is_instance_target(text) {
            let result = cloudsql::instance_target(
                text,
                base_port.map(|base| u32::from(base) + index as u32),
                defaults.address,
                defaults.unix_socket.clone(),
                &defaults,
                &instance_defaults,
            )
            .and_then(|target| {
                check_features(&target)?;
                check_distinct_listener(&target, &built)?;
                Ok(target)
            });
            match result {
                Ok(target) => built.push(target),
                Err(e) if skip_failed_targets => skipped.push(SkippedTarget {
                    target: text.clone(),
                    reason: e.to_string(),
                }),
                Err(e) => return Err(e),
            }
            continue;
        }
        let result = target::parse(text).map_err(invalid).and_then(|url| {
            let port = match base_port {
                Some(base) => u32::from(base) + index as u32,
                None => {
                    let seen = per_protocol.iter_mut().find(|(p, _)| *p == url.protocol);
                    let nth = match seen {
                        Some((_, n)) => {
                            *n += 1;
                            *n
                        }
                        None => {
                            per_protocol.push((url.protocol, 0));
                            0
                        }
                    };
                    u32::from(url.protocol.default_port()) + nth
                }
            };
            let target = target_config(url, port, &defaults)?;
            check_features(&target)?;
            check_distinct_listener(&target, &built)?;
            Ok(target)
        });
        match result {
            Ok(target) => built.push(target),
            Err(e) if skip_failed_targets => skipped.push(SkippedTarget {
                target: text.clone(),
                reason: e.to_string(),
            }),
            Err(e) => return Err(e),
        }
    }
    if built.is_empty() {
        return Err(invalid(format!(
            "no target left to serve: {}",
            skipped
                .iter()
                .map(|s| s.reason.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        )));
    }
    Ok(Config {
        targets: built,
        skipped,
        max_connections,
        data_threads,
        min_sigterm_delay,
        max_sigterm_delay,
        exit_zero_on_sigterm: flag("exit-zero-on-sigterm")?,
        run_connection_test: flag("run-connection-test")?,
        skip_failed_targets,
        startup_timeout,
        pipe_size,
        kernel_tls,
        connect_timeout,
        log_format,
        listen_tls,
        http,
        admin_port,
        origins: layers.origins(),
        config_file: layers.file_path.clone(),
        watch: flag("watch")?,
        cloudsql: cloudsql_settings,
        debug_logs: flag("debug-logs")?,
        ssh_config,
        iap_endpoint,
        all_proxy_ignored: defaults.via.ignored.clone(),
    })
}

/// The connector's process-wide settings.
fn cloudsql_settings(layers: &Layers) -> Result<cloudsql::CloudSqlSettings, ConfigError> {
    use cloudsql::{AdminCredentials, Secret};
    let secret = |key: &str| -> Result<Option<Secret>, ConfigError> {
        layers.parse(key, |t| {
            if t.is_empty() {
                Err("empty".to_owned())
            } else {
                Ok(Secret::new(t.to_owned()))
            }
        })
    };
    let file = layers.parse("credentials-file", parse_path)?;
    let json = secret("json-credentials")?;
    let token = secret("token")?;
    let credentials =
        match (file, json, token) {
            (None, None, None) => AdminCredentials::Default,
            (Some(path), None, None) => AdminCredentials::File(path),
            (None, Some(json), None) => AdminCredentials::Json(json),
            (None, None, Some(token)) => AdminCredentials::Token(token),
            _ => return Err(invalid(
                "--credentials-file, --json-credentials and --token exclude each other: give one",
            )),
        };
    let login_token = secret("login-token")?;
    if login_token.is_some() && !matches!(credentials, AdminCredentials::Token(_)) {
        return Err(invalid(
            "--login-token goes with --token (the Admin API token); with credentials keyhole mints login tokens itself",
        ));
    }
    let impersonate = layers
        .parse(
            "impersonate-service-account",
            cloudsql::parse_impersonation_chain,
        )?
        .unwrap_or_default();
    if login_token.is_some() && !impersonate.is_empty() {
        return Err(invalid(
            "--login-token and --impersonate-service-account exclude each other: with impersonation keyhole mints the login token for the impersonated service account",
        ));
    }
    let universe = layers
        .parse("universe-domain", |t| {
            let ok = !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
            ok.then(|| t.to_owned())
                .ok_or_else(|| format!("'{t}' is not a domain"))
        })?
        .unwrap_or_else(|| "googleapis.com".to_owned());
    let api_endpoint = layers
        .parse("sqladmin-api-endpoint", |t| {
            crate::http::client::check_url(t).map(|()| t.trim_end_matches('/').to_owned())
        })?
        .unwrap_or_else(|| format!("https://sqladmin.{universe}"));
    let iam_credentials_endpoint = layers
        .parse("iam-credentials-endpoint", |t| {
            crate::http::client::check_url(t).map(|()| t.trim_end_matches('/').to_owned())
        })?
        .unwrap_or_else(|| format!("https://iamcredentials.{universe}"));
    Ok(cloudsql::CloudSqlSettings {
        lazy_refresh: layers.parse("lazy-refresh", parse_bool)?.unwrap_or(false),
        credentials,
        login_token,
        quota_project: layers.parse("quota-project", |t| {
            if t.is_empty() {
                Err("empty".to_owned())
            } else {
                Ok(t.to_owned())
            }
        })?,
        api_endpoint,
        impersonate,
        iam_credentials_endpoint,
    })
}

/// Settings every target takes unless its own parameters say otherwise.
pub(super) struct TargetDefaults {
    address: IpAddr,
    unix_socket: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    client_cert: Option<CertKey>,
    backend: Option<String>,
    destinations: Option<Vec<Cidr>>,
    allow: Option<Vec<Cidr>>,
    iam: Option<IamProvider>,
    region: Option<String>,
    user: Option<String>,
    /// `--via`, else `ALL_PROXY` (SOCKS5) for hosts `NO_PROXY` does not name.
    pub(super) via: via::DefaultVia,
}

/// One target from its URL, the port it takes by default, and the options
/// its parameters do not override.
fn target_config(
    url: target::TargetUrl,
    port: u32,
    d: &TargetDefaults,
) -> Result<TargetConfig, ConfigError> {
    let name = format!(
        "{}://{}",
        url.protocol.scheme(),
        host_port(&url.host, url.port)
    );
    let protocol = url.protocol;
    let param = |key: &str| {
        url.params
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let in_target = |key: &str, e: String| invalid(format!("target {name}: {key}: {e}"));

    let port = u16::try_from(port)
        .map_err(|_| invalid(format!("target {name}: listen port {port} is out of range")))?;
    let explicit_listen = param("listen")
        .map(|t| target::parse_listen(t).map_err(|e| in_target("listen", e)))
        .transpose()?;
    let socket_dir = match param("unix-socket") {
        Some(dir) => Some(parse_path(dir).map_err(|e| in_target("unix-socket", e))?),
        None => d.unix_socket.clone(),
    };
    let listen_port = explicit_listen.map_or(port, |a| a.port());
    let unix_path = socket_dir.map(|dir| dir.join(url.protocol.socket_file(listen_port)));
    let listen = match (explicit_listen, &unix_path) {
        (Some(addr), _) => Some(addr),
        (None, Some(_)) => None,
        (None, None) => Some(SocketAddr::new(d.address, port)),
    };
    let tls = UpstreamTls {
        ca_file: match param("ca-file") {
            Some(p) => Some(parse_path(p).map_err(|e| in_target("ca-file", e))?),
            None => d.ca_file.clone(),
        },
        server_name: param("server-name").unwrap_or(&url.host).to_owned(),
        mode: param("tls-mode")
            .map(|m| parse_tls_mode(m).map_err(|e| in_target("tls-mode", e)))
            .transpose()?
            .unwrap_or(TlsMode::VerifyFull),
        client_cert: match cert_key(
            param("client-cert").map(PathBuf::from),
            param("client-key").map(PathBuf::from),
            "client",
        )? {
            Some(ck) => Some(ck),
            None => d.client_cert.clone(),
        },
    };
    let via = match param("via") {
        Some(text) => via::Via::parse(text).map_err(|e| in_target("via", e))?,
        None => d.via.for_host(&url.host, url.port),
    };
    if tls.mode == TlsMode::Disable {
        check_plain_relay(&url.host, url.protocol).map_err(|e| in_target("tls-mode", e))?;
        if !via.is_direct() {
            return Err(in_target(
                "tls-mode",
                format!("tls-mode=disable reaches only a relay on this host, never through {via} (use via=direct)"),
            ));
        }
    }
    let backend = match param("backend") {
        Some(b) => parse_backend(b).map_err(|e| in_target("backend", e))?,
        None => d
            .backend
            .clone()
            .unwrap_or_else(|| crate::backend::default_name().to_owned()),
    };
    let ranges = |key: &str, default: &Option<Vec<Cidr>>| match param(key) {
        Some(list) => Cidr::parse_list(list).map_err(|e| in_target(key, e)),
        None => Ok(default.clone().unwrap_or_default()),
    };
    let destinations = ranges("destinations", &d.destinations)?;
    let allow = ranges("allow", &d.allow)?;
    let user = match param("user") {
        Some(u) => Some(parse_user(u).map_err(|e| in_target("user", e))?),
        None => d.user.clone(),
    };
    let provider = match param("iam") {
        Some(p) => parse_iam(p).map_err(|e| in_target("iam", e))?,
        None => d.iam,
    };
    let region = match param("region") {
        Some(r) => Some(parse_region(r).map_err(|e| in_target("region", e))?),
        None => d.region.clone(),
    };
    let iam_port = param("iam-port")
        .map(|p| {
            p.parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| in_target("iam-port", format!("'{p}' is not a port number")))
        })
        .transpose()?;
    let (pool, password_file) = pool_params(&param, provider.is_some(), user.is_some())
        .map_err(|(key, e)| in_target(key, e))?;
    let iam = match provider {
        None if param("region").is_some() || param("iam-port").is_some() => {
            return Err(invalid(format!(
                "target {name}: region= and iam-port= apply only with iam=aws or iam=gcp"
            )))
        }
        None => None,
        Some(provider) => Some(Iam {
            provider,
            region: if provider == IamProvider::Aws {
                region
            } else {
                None
            },
            endpoint_host: tls.server_name.clone(),
            endpoint_port: iam_port.unwrap_or(url.port),
        }),
    };
    Ok(TargetConfig {
        name,
        protocol: Some(protocol),
        host: url.host,
        port: url.port,
        listen,
        unix_socket: unix_path,
        tls,
        backend,
        destinations,
        allow,
        iam,
        user,
        cloudsql: None,
        pending: None,
        via,
        pool,
        password_file,
    })
}

/// `pool=session` settings (if pooled) and the password file (if any).
pub(super) type PoolParams = (Option<PoolSettings>, Option<PathBuf>);

/// `pool=`, its limits and `password-file=`, checked against how the target
/// logs in: a pool holds only connections keyhole logged in to itself
/// (`iam=`, `auto-iam-authn`, or `user=` with `password-file=`), since a
/// connection a client authenticated belongs to that client (Postgres and
/// MySQL alike). Errors name the parameter.
pub(super) fn pool_params<'a>(
    param: &dyn Fn(&str) -> Option<&'a str>,
    token_login: bool,
    fixed_user: bool,
) -> Result<PoolParams, (&'static str, String)> {
    let password_file = param("password-file")
        .map(|p| parse_path(p).map_err(|e| ("password-file", e)))
        .transpose()?;
    if password_file.is_some() {
        if !fixed_user {
            return Err((
                "password-file",
                "password-file= needs user=: the password is that user's".into(),
            ));
        }
        if token_login {
            return Err((
                "password-file",
                "password-file= and token login (iam=, auto-iam-authn) exclude each other: keyhole logs in with one or the other".into(),
            ));
        }
    }
    let pooled = match param("pool") {
        None | Some("none") | Some("") => false,
        Some("session") => true,
        Some(other) => {
            return Err((
                "pool",
                format!("'{other}' is not a pool mode (session, or none)"),
            ))
        }
    };
    let limits = ["pool-size", "pool-idle-timeout", "pool-max-lifetime"];
    if !pooled {
        if let Some(key) = limits.into_iter().find(|k| param(k).is_some()) {
            return Err((key, format!("{key}= applies only with pool=session")));
        }
        return Ok((None, password_file));
    }
    if !token_login && password_file.is_none() {
        return Err((
            "pool",
            "pool=session needs keyhole to log in itself (iam=aws, iam=gcp, auto-iam-authn, or user= with password-file=): a connection a client logged in to with its own password is that client's, never another's".into(),
        ));
    }
    let size = match param("pool-size") {
        None => PoolSettings::DEFAULT_SIZE,
        Some(n) => n
            .parse::<usize>()
            .ok()
            .filter(|&n| (1..=10_000).contains(&n))
            .ok_or_else(|| {
                (
                    "pool-size",
                    format!("'{n}' is not a number from 1 to 10000"),
                )
            })?,
    };
    let duration = |key: &'static str, default: Duration| match param(key) {
        None => Ok(default),
        Some(t) => duration::parse(t)
            .and_then(|d| {
                if d.is_zero() {
                    Err("must be more than 0".to_owned())
                } else {
                    Ok(d)
                }
            })
            .map_err(|e| (key, e)),
    };
    Ok((
        Some(PoolSettings {
            size,
            idle_timeout: duration("pool-idle-timeout", PoolSettings::DEFAULT_IDLE_TIMEOUT)?,
            max_lifetime: duration("pool-max-lifetime", PoolSettings::DEFAULT_MAX_LIFETIME)?,
        }),
        password_file,
    ))
}

/// A target that needs a part this build lacks (a Cargo feature, see
/// [`crate::features`]) is a configuration error of that target.
/// So is one that asks for what this operating system lacks
/// ([`crate::platform::check_target`]: Unix sockets and SSH hops on Windows).
fn check_features(target: &TargetConfig) -> Result<(), ConfigError> {
    crate::features::check_target(target)
        .and_then(|()| crate::platform::check_target(target))
        .map_err(|e| invalid(format!("target {}: {e}", target.name)))
}

/// A second target on a listener another already has is a configuration
/// error (of the second one, so `--skip-failed-targets` keeps the first).
fn check_distinct_listener(
    target: &TargetConfig,
    before: &[TargetConfig],
) -> Result<(), ConfigError> {
    for b in before {
        if target.listen.is_some() && target.listen == b.listen {
            return Err(invalid(format!(
                "targets {} and {} both listen on {}",
                b.name,
                target.name,
                target.listen.map(|l| l.to_string()).unwrap_or_default()
            )));
        }
        if target.unix_socket.is_some() && target.unix_socket == b.unix_socket {
            return Err(invalid(format!(
                "targets {} and {} share a Unix socket",
                b.name, target.name
            )));
        }
    }
    Ok(())
}

pub fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(args: &[&str], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load(std::iter::once("keyhole").chain(args.iter().copied()), &env)
    }

    // iam=aws: the `aws` feature's.
    #[cfg(feature = "aws")]
    #[test]
    fn token_login_signs_for_the_server_name_and_takes_flags_env_and_params() {
        let c = load(
            &["postgres://127.0.0.1:15432?server-name=mydb.abc.eu-west-1.rds.amazonaws.com&iam=aws&iam-port=5432&user=app"],
            &[],
        )
        .expect("valid");
        let t = &c.targets[0];
        assert_eq!(
            t.iam,
            Some(Iam {
                provider: IamProvider::Aws,
                region: None,
                endpoint_host: "mydb.abc.eu-west-1.rds.amazonaws.com".into(),
                endpoint_port: 5432,
            })
        );
        assert_eq!(t.user.as_deref(), Some("app"));
        // Environment for every target, a parameter for one.
        let c = load(
            &[
                "postgres://a",
                "mysql://b?iam=none",
                "postgres://c?region=eu-central-1",
            ],
            &[("KEYHOLE_IAM", "aws"), ("KEYHOLE_REGION", "us-east-2")],
        )
        .expect("valid");
        let regions: Vec<_> = c
            .targets
            .iter()
            .map(|t| {
                t.iam
                    .as_ref()
                    .map(|i| (i.provider, i.region.clone(), i.endpoint_port))
            })
            .collect();
        assert_eq!(
            regions,
            [
                Some((IamProvider::Aws, Some("us-east-2".into()), 5432)),
                None,
                Some((IamProvider::Aws, Some("eu-central-1".into()), 5432)),
            ]
        );
        assert!(message(load(&["postgres://a?iam=azure"], &[]))
            .contains("'azure' is not a token provider"));
        assert!(message(load(&["postgres://a?region=eu-west-1"], &[]))
            .contains("apply only with iam=aws or iam=gcp"));
        assert!(message(load(&["--region", "EU West", "postgres://a"], &[]))
            .contains("--region: 'EU West' is not an AWS region"));
        assert!(message(load(&["postgres://a?allow=10.0.0.1/8"], &[]))
            .contains("did you mean 10.0.0.0/8"));
        assert!(message(load(&["--backend", "vpn", "postgres://a"], &[]))
            .contains("--backend: unknown backend 'vpn'"));
    }

    fn message(r: Result<Config, ConfigError>) -> String {
        match r {
            Err(ConfigError::Invalid(m)) => m,
            Err(ConfigError::Cli(e)) => e.to_string(),
            Ok(c) => panic!("expected an error, got {c:?}"),
        }
    }

    #[test]
    fn pipe_size_takes_bytes_and_binary_units() {
        assert_eq!(
            load(&["postgres://db"], &[]).expect("valid").pipe_size,
            None
        );
        for (text, bytes) in [
            ("65536", 65536),
            ("64KiB", 65536),
            ("1MiB", 1 << 20),
            ("2M", 2 << 20),
        ] {
            let c = load(&["--pipe-size", text, "postgres://db"], &[]).expect(text);
            assert_eq!(c.pipe_size, Some(bytes), "{text}");
        }
        let err = load(&["postgres://db"], &[("KEYHOLE_PIPE_SIZE", "lots")])
            .expect_err("not a size")
            .to_string();
        assert!(
            err.contains("KEYHOLE_PIPE_SIZE: 'lots' is not a size"),
            "{err}"
        );
    }

    #[test]
    fn watch_is_a_flag_a_variable_or_a_file_key() {
        assert!(!load(&["postgres://db"], &[]).expect("valid").watch);
        assert!(
            load(&["--watch", "postgres://db"], &[])
                .expect("valid")
                .watch
        );
        let c = load(&["postgres://db"], &[("KEYHOLE_WATCH", "true")]).expect("valid");
        assert!(c.watch);
        let dir = tempfile::tempdir().expect("a scratch directory");
        let file = dir.path().join("keyhole.toml");
        std::fs::write(&file, "watch = true\ntargets = [\"postgres://db\"]\n").expect("write");
        let c = load(&["--config", file.to_str().expect("UTF-8")], &[]).expect("valid");
        assert!(c.watch);
    }

    #[test]
    fn the_files_a_configuration_names_are_listed_once() {
        let c = load(
            &[
                "--ca-file",
                "/etc/ca.pem",
                "--listen-cert",
                "/etc/l.crt",
                "--listen-key",
                "/etc/l.key",
                "postgres://db",
                "postgres://db2?ca-file=/etc/other.pem&client-cert=/etc/c.crt&client-key=/etc/c.key",
                "postgres://127.0.0.1:6432?tls-mode=disable&ca-file=/etc/unused.pem",
                "postgres://db3",
            ],
            &[],
        )
        .expect("valid");
        let files: Vec<String> = c.files().iter().map(|p| p.display().to_string()).collect();
        assert_eq!(
            files,
            [
                "/etc/ca.pem",
                "/etc/other.pem",
                "/etc/c.crt",
                "/etc/c.key",
                "/etc/l.crt",
                "/etc/l.key"
            ]
        );
    }

    #[test]
    fn kernel_tls_is_off_unless_asked_for() {
        use crate::tls::KernelTls;
        let c = load(&["postgres://db"], &[]).expect("valid");
        assert_eq!(c.kernel_tls, KernelTls::Off);
        let c = load(&["--kernel-tls", "auto", "postgres://db"], &[]).expect("valid");
        assert_eq!(c.kernel_tls, KernelTls::Auto);
        let c = load(&["postgres://db"], &[("KEYHOLE_KERNEL_TLS", "off")]).expect("valid");
        assert_eq!(c.kernel_tls, KernelTls::Off);
        let err = load(&["--kernel-tls", "on", "postgres://db"], &[])
            .expect_err("not a mode")
            .to_string();
        assert!(
            err.contains("'on' is not a kernel TLS mode (auto or off)"),
            "{err}"
        );
    }

    #[test]
    fn tls_mode_disable_is_only_for_a_postgres_relay_on_this_host() {
        for host in ["127.0.0.1:6432", "localhost", "[::1]:6432", "127.0.0.9"] {
            let c = load(&[&format!("postgres://{host}?tls-mode=disable")], &[])
                .unwrap_or_else(|e| panic!("{host}: {e}"));
            assert_eq!(c.targets[0].tls.mode, TlsMode::Disable);
        }
        let err = load(&["postgres://10.0.0.5?tls-mode=disable"], &[])
            .expect_err("a remote host")
            .to_string();
        assert!(
            err.contains("only to a relay on this host") && err.contains("not to 10.0.0.5"),
            "{err}"
        );
        let err = load(&["mysql://127.0.0.1?tls-mode=disable"], &[])
            .expect_err("mysql")
            .to_string();
        assert!(err.contains("MySQL targets always use TLS"), "{err}");
        let err = load(&["postgres://127.0.0.1?tls-mode=off"], &[])
            .expect_err("unknown mode")
            .to_string();
        assert!(err.contains("'off' is not a TLS mode"), "{err}");
    }

    #[test]
    fn data_threads_is_a_number_of_one_or_more() {
        let c = load(&["--data-threads", "3", "postgres://db"], &[]).expect("valid");
        assert_eq!(c.data_threads.map(NonZeroUsize::get), Some(3));
        let c = load(&["postgres://db"], &[("KEYHOLE_DATA_THREADS", "1")]).expect("valid");
        assert_eq!(c.data_threads.map(NonZeroUsize::get), Some(1));
        assert_eq!(
            load(&["postgres://db"], &[]).expect("valid").data_threads,
            None
        );
        for bad in ["0", "two", "-1"] {
            let flag = format!("--data-threads={bad}");
            let err = load(&[flag.as_str(), "postgres://db"], &[])
                .expect_err("refused")
                .to_string();
            assert!(
                err.contains("data-threads") && err.contains("is not a number of threads"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn defaults_for_one_target() {
        let c = load(&["postgres://db.internal"], &[]).expect("valid");
        let t = &c.targets[0];
        assert_eq!(t.name, "postgres://db.internal:5432");
        assert_eq!(t.listen, Some("127.0.0.1:5432".parse().expect("addr")));
        assert_eq!(t.unix_socket, None);
        assert_eq!(t.tls.server_name, "db.internal");
        assert_eq!(t.tls.mode, TlsMode::VerifyFull);
        assert_eq!(t.tls.ca_file, None);
        assert_eq!(c.max_connections, None);
        assert_eq!(c.max_sigterm_delay, Duration::ZERO);
        assert_eq!(c.startup_timeout, Duration::from_secs(10));
        assert_eq!(c.log_format, LogFormat::Text);
    }

    #[test]
    fn further_targets_take_the_next_ports_and_params_override() {
        let c = load(
            &[
                "-a",
                "::1",
                "-p",
                "7000",
                "--ca-file",
                "global.pem",
                "postgres://a",
                "postgres://b?ca-file=b.pem&server-name=b.example&tls-mode=verify-ca",
                "postgres://c?listen=127.0.0.2:9000",
            ],
            &[],
        )
        .expect("valid");
        let listens: Vec<_> = c
            .targets
            .iter()
            .map(|t| t.listen.map(|l| l.to_string()))
            .collect();
        assert_eq!(
            listens,
            [
                Some("[::1]:7000".into()),
                Some("[::1]:7001".into()),
                Some("127.0.0.2:9000".into())
            ]
        );
        assert_eq!(c.targets[0].tls.ca_file, Some("global.pem".into()));
        assert_eq!(c.targets[1].tls.ca_file, Some("b.pem".into()));
        assert_eq!(c.targets[1].tls.server_name, "b.example");
        assert_eq!(c.targets[1].tls.mode, TlsMode::VerifyCa);
    }

    #[test]
    fn each_protocol_counts_from_its_own_default_port() {
        let c = load(
            &["postgres://a", "mysql://b", "postgres://c", "mysql://d"],
            &[],
        )
        .expect("valid");
        let ports: Vec<_> = c
            .targets
            .iter()
            .map(|t| t.listen.map(|l| l.port()))
            .collect();
        assert_eq!(ports, [Some(5432), Some(3306), Some(5433), Some(3307)]);
        let c = load(&["-p", "7000", "postgres://a", "mysql://b"], &[]).expect("valid");
        let ports: Vec<_> = c
            .targets
            .iter()
            .map(|t| t.listen.map(|l| l.port()))
            .collect();
        assert_eq!(ports, [Some(7000), Some(7001)]);
        let c = load(&["--unix-socket", "/run/k", "mysql://b"], &[]).expect("valid");
        assert_eq!(
            c.targets[0].unix_socket,
            Some("/run/k/mysql-3306.sock".into())
        );
        assert_eq!(c.targets[0].protocol, Some(Protocol::Mysql));
    }

    #[test]
    fn unix_socket_replaces_tcp_unless_listen_is_explicit() {
        let c = load(
            &[
                "--unix-socket",
                "/run/keyhole",
                "-p",
                "6000",
                "postgres://a",
                "postgres://b?listen=127.0.0.1:7000",
            ],
            &[],
        )
        .expect("valid");
        assert_eq!(c.targets[0].listen, None);
        assert_eq!(
            c.targets[0].unix_socket,
            Some("/run/keyhole/.s.PGSQL.6000".into())
        );
        assert_eq!(
            c.targets[1].listen,
            Some("127.0.0.1:7000".parse().expect("addr"))
        );
        assert_eq!(
            c.targets[1].unix_socket,
            Some("/run/keyhole/.s.PGSQL.7000".into())
        );
    }

    #[test]
    fn flags_beat_env_which_beats_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("keyhole.toml");
        std::fs::write(
            &file,
            "targets = [\"postgres://from-file\"]\nport = 1000\nmax-connections = 7\nlog-format = \"json\"\nstartup-timeout = \"3s\"\n",
        )
        .expect("write");
        let path = file.to_str().expect("utf-8 path");
        let env = [
            ("KEYHOLE_CONFIG", path),
            ("KEYHOLE_PORT", "2000"),
            ("KEYHOLE_MAX_CONNECTIONS", "8"),
        ];

        let c = load(&[], &env).expect("valid");
        assert_eq!(c.targets[0].host, "from-file");
        assert_eq!(c.targets[0].listen.map(|l| l.port()), Some(2000));
        assert_eq!(c.max_connections.map(|n| n.get()), Some(8));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.startup_timeout, Duration::from_secs(3));

        let c = load(&["--port", "3000", "postgres://from-flag"], &env).expect("valid");
        assert_eq!(c.targets[0].host, "from-flag");
        assert_eq!(c.targets[0].listen.map(|l| l.port()), Some(3000));

        let mut with_targets = env.to_vec();
        with_targets.push(("KEYHOLE_TARGETS", "postgres://e1 postgres://e2"));
        let c = load(&[], &with_targets).expect("valid");
        assert_eq!(c.targets.len(), 2);
        assert_eq!(c.targets[1].host, "e2");
    }

    #[test]
    fn errors_name_the_source_of_the_bad_value() {
        assert_eq!(
            message(load(&["postgres://a"], &[("KEYHOLE_PORT", "http")])),
            "KEYHOLE_PORT: 'http' is not a port number"
        );
        assert_eq!(
            message(load(&["--max-sigterm-delay", "soon", "postgres://a"], &[])),
            "--max-sigterm-delay: 'soon' is not a duration (examples: 30s, 500ms, 2m, 1h30m)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("k.toml");
        std::fs::write(&file, "max-conections = 3\n").expect("write");
        let m = message(load(
            &["--config", file.to_str().expect("utf-8"), "postgres://a"],
            &[],
        ));
        assert!(m.contains("unknown key 'max-conections'"), "{m}");
        std::fs::write(&file, "port = \"x\"\n").expect("write");
        let m = message(load(
            &["--config", file.to_str().expect("utf-8"), "postgres://a"],
            &[],
        ));
        assert_eq!(
            m,
            format!("'port' in {}: 'x' is not a port number", file.display())
        );
    }

    #[test]
    fn invalid_combinations_are_refused() {
        assert!(message(load(&[], &[])).starts_with("no target given"));
        assert!(
            message(load(&["--listen-cert", "c.pem", "postgres://a"], &[])).contains("go together")
        );
        assert!(message(load(&["postgres://a?tls-mode=disable"], &[]))
            .contains("only to a relay on this host"));
        assert!(message(load(
            &[
                "postgres://a?listen=127.0.0.1:9",
                "postgres://b?listen=127.0.0.1:9"
            ],
            &[]
        ))
        .contains("both listen on 127.0.0.1:9"));
        assert!(
            message(load(&["-p", "65535", "postgres://a", "postgres://b"], &[]))
                .contains("out of range")
        );
        assert!(message(load(&["--log-format", "xml", "postgres://a"], &[]))
            .contains("text, json or cloudwatch"));
        // clap's own errors (exit code 2 like ours).
        assert!(matches!(
            load(&["--no-such-flag", "postgres://a"], &[]),
            Err(ConfigError::Cli(_))
        ));
    }

    /// The refusal of a target that needs `feature`, in this build: a
    /// configuration error (exit 2) naming the feature and what the build has.
    #[cfg(not(all(feature = "aws", feature = "gcp")))]
    fn refused_for_feature(args: &[&str], env: &[(&str, &str)], what: &str, feature: &str) {
        let result = load(args, env);
        assert!(matches!(result, Err(ConfigError::Invalid(_))), "{args:?}");
        let m = message(result);
        let expected = format!(
            "{what} needs keyhole built with the \"{feature}\" feature (this build has: {})",
            crate::features::enabled()
        );
        assert!(m.contains(&expected), "{args:?}: {m}");
        assert!(!m.contains('\n'), "one line: {m}");
    }

    // scripts/test.sh runs these under `--no-default-features` and each
    // feature alone (`cargo test --lib ... feature_refusal`).
    #[cfg(not(feature = "aws"))]
    #[test]
    fn feature_refusal_of_iam_aws_and_ssm_without_aws() {
        let refused = |args: &[&str], env: &[(&str, &str)], what: &str| {
            refused_for_feature(args, env, what, "aws")
        };
        refused(&["postgres://db?iam=aws"], &[], "iam=aws");
        refused(&["--iam", "aws", "mysql://db"], &[], "iam=aws");
        refused(&["postgres://db"], &[("KEYHOLE_IAM", "aws")], "iam=aws");
        refused(&["postgres://db?via=ssm://i-0abc"], &[], "via=ssm://");
        refused(
            &["--via", "ssm://i-0abc", "postgres://db"],
            &[],
            "via=ssm://",
        );
        refused(
            &["postgres://db?via=ssm://i-0abc,ssh://ec2-user@i-0abc"],
            &[],
            "via=ssm://",
        );
        // --skip-failed-targets leaves out only the target that needs it.
        let config = load(
            &[
                "--skip-failed-targets",
                "postgres://a?iam=aws",
                "postgres://b",
            ],
            &[],
        )
        .expect("one target left");
        assert_eq!(config.targets.len(), 1);
        assert!(config.skipped[0].reason.contains("\"aws\" feature"));
    }

    #[cfg(not(feature = "gcp"))]
    #[test]
    fn feature_refusal_of_iam_gcp_cloud_sql_and_iap_without_gcp() {
        let refused = |args: &[&str], env: &[(&str, &str)], what: &str| {
            refused_for_feature(args, env, what, "gcp")
        };
        refused(&["postgres://db?iam=gcp"], &[], "iam=gcp");
        refused(&["--iam", "gcp", "postgres://db"], &[], "iam=gcp");
        refused(
            &["my-project:europe-west1:db"],
            &[],
            "a Cloud SQL instance target",
        );
        refused(
            &["my-project:europe-west1:db?port=5432"],
            &[],
            "a Cloud SQL instance target",
        );
        refused(&["postgres://db?via=iap://p/z/vm"], &[], "via=iap://");
        refused(
            &["postgres://db"],
            &[("KEYHOLE_VIA", "iap://p/z/vm")],
            "via=iap://",
        );
        refused(
            &["postgres://db?via=iap://p/z/vm,ssh://me@vm"],
            &[],
            "via=iap://",
        );
    }

    /// Every build accepts what needs no optional part.
    #[test]
    fn feature_refusal_spares_what_needs_no_feature() {
        for args in [
            &["postgres://db"][..],
            &["mysql://db?via=ssh://me@bastion"],
            &["postgres://db?via=socks5://proxy:1080"],
        ] {
            load(args, &[]).expect("no feature needed");
        }
    }
}
