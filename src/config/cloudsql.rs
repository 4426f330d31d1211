//! Cloud SQL instance targets (`[cloudsql://]PROJECT:REGION:INSTANCE[?PARAMS]`)
//! and the connector's process-wide settings, with cloud-sql-proxy's names
//! and meanings. Parsing only: nothing here calls the API.
//!
//! An instance's engine comes from the Admin API, so where it listens may
//! wait for it: without a port (from `--port`, `port=` or `listen=`) the
//! first Postgres instance takes 5432 and the first MySQL one 3306, as
//! cloud-sql-proxy would, and a `--unix-socket` directory holds
//! `PROJECT:REGION:INSTANCE/.s.PGSQL.5432` (Postgres) or
//! `PROJECT:REGION:INSTANCE` (MySQL). Such a target is [`Pending`] until
//! [`settle`] is given its engine.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use super::{ConfigError, Protocol, TargetConfig};
use crate::cloudsql::name::{self, Named};
use crate::cloudsql::IpPreference;

/// Parameters an instance target may carry: cloud-sql-proxy's, and those of
/// keyhole's own that apply to an instance.
pub const INSTANCE_PARAMS: &[&str] = &[
    "port",
    "address",
    "unix-socket-path",
    "unix-socket",
    "private-ip",
    "psc",
    "auto-ip",
    "auto-iam-authn",
    "listen",
    "allow",
    "iam",
    "user",
    "via",
    "password-file",
    "pool",
    "pool-size",
    "pool-idle-timeout",
    "pool-max-lifetime",
];

/// A secret given as configuration (a token, inline credentials): never
/// shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: String) -> Secret {
        Secret(text)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Where the connector's Admin API token comes from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AdminCredentials {
    /// Application Default Credentials, found as Google's libraries find them.
    #[default]
    Default,
    /// `--credentials-file`.
    File(PathBuf),
    /// `--json-credentials`.
    Json(Secret),
    /// `--token`: a bearer token used as is.
    Token(Secret),
}

/// The connector's settings, shared by every instance target.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CloudSqlSettings {
    pub lazy_refresh: bool,
    pub credentials: AdminCredentials,
    /// `--login-token` (with `--token`).
    pub login_token: Option<Secret>,
    pub quota_project: Option<String>,
    /// `--sqladmin-api-endpoint`, else from the universe domain.
    pub api_endpoint: String,
    /// `--impersonate-service-account`, as given: the target first, then
    /// the delegates, the last of them the first hop (empty: no
    /// impersonation).
    pub impersonate: Vec<String>,
    /// `--iam-credentials-endpoint`, else from the universe domain.
    pub iam_credentials_endpoint: String,
}

/// What an instance target adds to a [`TargetConfig`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudSqlTarget {
    /// An instance connection name, or a DNS name that holds one.
    pub instance: Named,
    pub ip: IpPreference,
    /// Automatic IAM database login.
    pub auto_iam_authn: bool,
}

/// A listener that waits for the instance's engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pending {
    /// The engine's next default port, on this address.
    DefaultPort(IpAddr),
    /// cloud-sql-proxy's layout in this directory.
    SocketDir(PathBuf),
}

/// The instance-wide defaults from flags, environment and file.
pub(super) struct InstanceDefaults {
    pub ip: IpPreference,
    pub auto_iam_authn: bool,
}

pub(super) fn parse_ip_flags(
    private_ip: bool,
    psc: bool,
    auto_ip: bool,
) -> Result<IpPreference, String> {
    match (private_ip, psc, auto_ip) {
        (false, false, false) => Ok(IpPreference::Public),
        (true, false, false) => Ok(IpPreference::Private),
        (false, true, false) => Ok(IpPreference::Psc),
        (false, false, true) => Ok(IpPreference::Auto),
        _ => Err("--private-ip, --psc and --auto-ip exclude each other: give one".into()),
    }
}

/// `--impersonate-service-account`: a comma-separated delegation chain of
/// service account emails (the target first), checked entry by entry.
pub(super) fn parse_impersonation_chain(text: &str) -> Result<Vec<String>, String> {
    if text.trim().is_empty() {
        return Err(
            "empty: give the service account to impersonate (an email), or leave the option out"
                .into(),
        );
    }
    let entries: Vec<&str> = text.split(',').map(str::trim).collect();
    let mut chain = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        if entry.is_empty() {
            return Err(format!(
                "entry {} of {} is empty: give service account emails separated by single commas, the target first",
                i + 1,
                entries.len()
            ));
        }
        if !is_email_like(entry) {
            return Err(format!(
                "'{entry}' is not a service account email (like sa@my-project.iam.gserviceaccount.com)"
            ));
        }
        chain.push((*entry).to_owned());
    }
    Ok(chain)
}

/// `local@domain`: a local part of letters, digits and `._+-`, a domain of
/// at least two dot-separated labels of letters, digits and `-`.
fn is_email_like(text: &str) -> bool {
    let Some((local, domain)) = text.split_once('@') else {
        return false;
    };
    let local_ok = !local.is_empty()
        && local
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-'));
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && labels.iter().all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    local_ok && domain_ok
}

/// Placement decided from what the target and flags say.
pub(super) struct Placement {
    pub listen: Option<SocketAddr>,
    pub unix_socket: Option<PathBuf>,
    pub pending: Option<Pending>,
}

/// One instance target. `base_port` is `--port` plus the target's index,
/// when `--port` is given.
pub(super) fn instance_target(
    text: &str,
    base_port: Option<u32>,
    address: IpAddr,
    socket_dir: Option<PathBuf>,
    d: &super::TargetDefaults,
    instance_defaults: &InstanceDefaults,
) -> Result<TargetConfig, ConfigError> {
    let parsed =
        name::parse_target(text, super::target::percent_decode_text).map_err(super::invalid)?;
    let target_name = parsed.name.to_string();
    // The messages quote parameter values as written: never a URL's password.
    let in_target = |key: &str, e: String| {
        super::invalid(format!(
            "instance {target_name}: {key}: {}",
            super::via::redact(&e)
        ))
    };
    for (key, _) in &parsed.params {
        if !INSTANCE_PARAMS.contains(&key.as_str()) {
            return Err(super::invalid(format!(
                "instance {target_name}: unknown parameter '{}' (known: {})",
                super::via::redact(key),
                INSTANCE_PARAMS.join(", ")
            )));
        }
    }
    let param = |key: &str| {
        parsed
            .params
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let flag = |key: &str| -> Result<Option<bool>, ConfigError> {
        param(key)
            .map(|v| super::parse_bool(v).map_err(|e| in_target(key, e)))
            .transpose()
    };

    let ip = match (flag("private-ip")?, flag("psc")?, flag("auto-ip")?) {
        (None, None, None) => instance_defaults.ip,
        (p, s, a) => parse_ip_flags(p.unwrap_or(false), s.unwrap_or(false), a.unwrap_or(false))
            .map_err(|e| in_target("private-ip/psc/auto-ip", e.replace("--", "")))?,
    };
    let auto_iam_authn = flag("auto-iam-authn")?.unwrap_or(instance_defaults.auto_iam_authn);

    let address = match param("address") {
        Some(a) => a
            .parse::<IpAddr>()
            .map_err(|_| in_target("address", format!("'{a}' is not an IP address")))?,
        None => address,
    };
    let port_param = param("port")
        .map(|p| {
            p.parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| in_target("port", format!("'{p}' is not a port number")))
        })
        .transpose()?;
    let explicit_listen = param("listen")
        .map(|t| super::target::parse_listen(t).map_err(|e| in_target("listen", e)))
        .transpose()?;
    let socket_path = param("unix-socket-path")
        .map(|p| super::parse_path(p).map_err(|e| in_target("unix-socket-path", e)))
        .transpose()?;
    let socket_dir = match param("unix-socket") {
        Some(dir) => Some(super::parse_path(dir).map_err(|e| in_target("unix-socket", e))?),
        None => socket_dir,
    };
    let port = port_param.map(u32::from).or(base_port);
    let port = port
        .map(|p| {
            u16::try_from(p)
                .map_err(|_| in_target("port", format!("listen port {p} is out of range")))
        })
        .transpose()?;

    // As cloud-sql-proxy: a Unix socket replaces TCP unless a port or
    // address says otherwise for this instance.
    let wants_tcp =
        explicit_listen.is_some() || param("port").is_some() || param("address").is_some();
    let placement = match (explicit_listen, socket_path, socket_dir) {
        (Some(addr), path, dir) => Placement {
            listen: Some(addr),
            unix_socket: path,
            pending: dir.map(Pending::SocketDir),
        },
        (None, Some(path), _) => Placement {
            listen: if wants_tcp {
                port.map(|p| SocketAddr::new(address, p))
            } else {
                None
            },
            unix_socket: Some(path),
            pending: None,
        },
        (None, None, Some(dir)) if !wants_tcp => Placement {
            listen: None,
            unix_socket: None,
            pending: Some(Pending::SocketDir(dir)),
        },
        (None, None, _) => match port {
            Some(p) => Placement {
                listen: Some(SocketAddr::new(address, p)),
                unix_socket: None,
                pending: None,
            },
            None => Placement {
                listen: None,
                unix_socket: None,
                pending: Some(Pending::DefaultPort(address)),
            },
        },
    };

    let user = match param("user") {
        Some(u) => Some(super::parse_user(u).map_err(|e| in_target("user", e))?),
        None => d.user.clone(),
    };
    let provider = match param("iam") {
        Some(p) => super::parse_iam(p).map_err(|e| in_target("iam", e))?,
        None => d.iam,
    };
    let iam =
        match provider {
            None => None,
            Some(super::IamProvider::Gcp) => Some(super::Iam {
                provider: super::IamProvider::Gcp,
                region: None,
                endpoint_host: parsed.name.certificate_cn(),
                endpoint_port: crate::cloudsql::instance::SERVER_PROXY_PORT,
            }),
            Some(super::IamProvider::Aws) => return Err(in_target(
                "iam",
                "aws tokens are for RDS; a Cloud SQL instance takes iam=gcp or --auto-iam-authn"
                    .into(),
            )),
        };
    if iam.is_some() && auto_iam_authn {
        return Err(in_target(
            "iam",
            "iam=gcp (the token as password) and auto-iam-authn (the token in the certificate) exclude each other".into(),
        ));
    }
    let (pool, password_file) =
        super::pool_params(&param, iam.is_some() || auto_iam_authn, user.is_some())
            .map_err(|(key, e)| in_target(key, e))?;
    let allow = match param("allow") {
        Some(list) => crate::cidr::Cidr::parse_list(list).map_err(|e| in_target("allow", e))?,
        None => d.allow.clone().unwrap_or_default(),
    };
    // The tunnel to port 3307 goes through the hop like any other TCP.
    let via = match param("via") {
        Some(text) => super::via::Via::parse(text).map_err(|e| in_target("via", e))?,
        None => d
            .via
            .for_host(&target_name, crate::cloudsql::instance::SERVER_PROXY_PORT),
    };
    Ok(TargetConfig {
        name: target_name.clone(),
        protocol: None,
        host: target_name.clone(),
        port: crate::cloudsql::instance::SERVER_PROXY_PORT,
        listen: placement.listen,
        unix_socket: placement.unix_socket,
        tls: super::UpstreamTls {
            ca_file: None,
            server_name: parsed.name.certificate_cn(),
            mode: super::TlsMode::VerifyFull,
            client_cert: None,
        },
        backend: crate::backend::default_name().to_owned(),
        destinations: Vec::new(),
        allow,
        iam,
        user,
        cloudsql: Some(CloudSqlTarget {
            instance: parsed.name,
            ip,
            auto_iam_authn,
        }),
        pending: placement.pending,
        via,
        pool,
        password_file,
    })
}

/// Gives instance `index` its engine and, if its listener waited for it,
/// its place: the engine's next default port after every target that has
/// one already, or cloud-sql-proxy's socket layout.
pub fn settle(
    targets: &mut [TargetConfig],
    index: usize,
    protocol: Protocol,
) -> Result<(), ConfigError> {
    let Some(target) = targets.get_mut(index) else {
        return Ok(());
    };
    target.protocol = Some(protocol);
    let Some(pending) = target.pending.take() else {
        return Ok(());
    };
    match pending {
        Pending::SocketDir(dir) => {
            let base = dir.join(&target.name);
            target.unix_socket = Some(match protocol {
                Protocol::Postgres => base.join(".s.PGSQL.5432"),
                Protocol::Mysql => base,
            });
        }
        Pending::DefaultPort(address) => {
            let default = protocol.default_port();
            let mut port = default;
            while targets.iter().enumerate().any(|(i, t)| {
                i != index
                    && t.listen
                        .is_some_and(|l| l.port() == port && l.ip() == address)
            }) {
                port = port.checked_add(1).ok_or_else(|| {
                    super::invalid(format!(
                        "instance {}: no free listen port above {default}",
                        targets[index].name
                    ))
                })?;
            }
            targets[index].listen = Some(SocketAddr::new(address, port));
        }
    }
    let (before, rest) = targets.split_at(index);
    let (this, after) = rest.split_at(1);
    let others: Vec<TargetConfig> = before.iter().chain(after).cloned().collect();
    super::check_distinct_listener(&this[0], &others)
}

// Instance targets are the `gcp` feature's: a build without it refuses them.
#[cfg(all(test, feature = "gcp"))]
mod tests {
    use super::*;
    use crate::config::{Config, LogFormat};
    use std::collections::HashMap;

    fn load(args: &[&str], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load(std::iter::once("keyhole").chain(args.iter().copied()), &env)
    }

    fn err(args: &[&str]) -> String {
        match load(args, &[]) {
            Err(e) => e.one_line(),
            Ok(c) => panic!("expected an error, got {c:?}"),
        }
    }

    #[test]
    fn an_instance_without_a_port_waits_for_its_engine() {
        let c = load(&["my-proj:us-central1:pg", "my-proj:us-central1:my"], &[]).expect("valid");
        let t = &c.targets[0];
        assert_eq!(t.name, "my-proj:us-central1:pg");
        assert_eq!(t.protocol, None);
        assert_eq!(t.listen, None);
        assert_eq!(
            t.pending,
            Some(Pending::DefaultPort("127.0.0.1".parse().expect("ip")))
        );
        let cs = t.cloudsql.as_ref().expect("an instance");
        assert_eq!(cs.ip, IpPreference::Public);
        assert!(!cs.auto_iam_authn);
        // Engines learned: each takes its engine's first default port.
        let mut targets = c.targets.clone();
        settle(&mut targets, 0, Protocol::Postgres).expect("settle");
        settle(&mut targets, 1, Protocol::Mysql).expect("settle");
        assert_eq!(targets[0].listen.map(|l| l.port()), Some(5432));
        assert_eq!(targets[1].listen.map(|l| l.port()), Some(3306));
        // Two Postgres instances: 5432, then 5433.
        let mut targets = c.targets;
        settle(&mut targets, 0, Protocol::Postgres).expect("settle");
        settle(&mut targets, 1, Protocol::Postgres).expect("settle");
        assert_eq!(targets[1].listen.map(|l| l.port()), Some(5433));
    }

    #[test]
    fn cloud_sql_proxy_flags_and_instance_parameters() {
        let c = load(
            &[
                "--private-ip",
                "-i",
                "--lazy-refresh",
                "-p",
                "6000",
                "-a",
                "0.0.0.0",
                "--sqladmin-api-endpoint",
                "http://127.0.0.1:9/",
                "--quota-project",
                "billing",
                "--structured-logs",
                "cloudsql://example.com:proj:europe-west1:a",
                "proj:europe-west1:b?port=7000&address=127.0.0.2&psc=true&auto-iam-authn=false",
            ],
            &[],
        )
        .expect("valid");
        let (a, b) = (&c.targets[0], &c.targets[1]);
        assert_eq!(a.listen, Some("0.0.0.0:6000".parse().expect("addr")));
        assert_eq!(a.pending, None);
        let acs = a.cloudsql.as_ref().expect("instance");
        assert_eq!(acs.instance.to_string(), "example.com:proj:europe-west1:a");
        assert_eq!((acs.ip, acs.auto_iam_authn), (IpPreference::Private, true));
        assert_eq!(b.listen, Some("127.0.0.2:7000".parse().expect("addr")));
        let bcs = b.cloudsql.as_ref().expect("instance");
        assert_eq!((bcs.ip, bcs.auto_iam_authn), (IpPreference::Psc, false));
        assert!(c.cloudsql.lazy_refresh);
        assert_eq!(c.cloudsql.api_endpoint, "http://127.0.0.1:9");
        assert_eq!(c.cloudsql.quota_project.as_deref(), Some("billing"));
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn csql_proxy_variables_work_below_keyhole_s_own() {
        let c = load(
            &[],
            &[
                ("CSQL_PROXY_INSTANCE_CONNECTION_NAME", "p:r:a"),
                ("CSQL_PROXY_INSTANCE_CONNECTION_NAME_0", "p:r:b"),
                ("CSQL_PROXY_PORT", "6100"),
                ("CSQL_PROXY_AUTO_IP", "true"),
                ("CSQL_PROXY_TOKEN", "secret-token-value"),
            ],
        )
        .expect("valid");
        assert_eq!(c.targets.len(), 2);
        assert_eq!(c.targets[1].listen.map(|l| l.port()), Some(6101));
        assert_eq!(
            c.targets[0].cloudsql.as_ref().map(|t| t.ip),
            Some(IpPreference::Auto)
        );
        assert!(!format!("{c:?}").contains("secret-token-value"));
        let c = load(
            &["p:r:a"],
            &[("CSQL_PROXY_PORT", "6100"), ("KEYHOLE_PORT", "6200")],
        )
        .expect("valid");
        assert_eq!(c.targets[0].listen.map(|l| l.port()), Some(6200));
    }

    #[test]
    fn unix_sockets_as_cloud_sql_proxy_lays_them_out() {
        let c = load(&["-u", "/cloudsql", "p:r:pg", "p:r:my"], &[]).expect("valid");
        let mut targets = c.targets;
        assert_eq!(targets[0].listen, None);
        settle(&mut targets, 0, Protocol::Postgres).expect("settle");
        settle(&mut targets, 1, Protocol::Mysql).expect("settle");
        assert_eq!(
            targets[0].unix_socket.as_deref(),
            Some(std::path::Path::new("/cloudsql/p:r:pg/.s.PGSQL.5432"))
        );
        assert_eq!(
            targets[1].unix_socket.as_deref(),
            Some(std::path::Path::new("/cloudsql/p:r:my"))
        );
        let c = load(&["p:r:pg?unix-socket-path=/tmp/pg.sock"], &[]).expect("valid");
        assert_eq!(
            c.targets[0].unix_socket.as_deref(),
            Some(std::path::Path::new("/tmp/pg.sock"))
        );
        assert_eq!((c.targets[0].listen, &c.targets[0].pending), (None, &None));
    }

    #[test]
    fn clear_errors_for_what_an_instance_target_cannot_be() {
        assert!(err(&["p:r:i?sslmode=disable"]).contains("unknown parameter 'sslmode'"));
        assert!(err(&["p:r:i?port=0"]).contains("port: '0' is not a port number"));
        assert!(err(&["--private-ip", "--psc", "p:r:i"]).contains("exclude each other"));
        assert!(err(&["p:r:i?iam=aws"]).contains("aws tokens are for RDS"));
        assert!(err(&["-i", "p:r:i?iam=gcp"]).contains("exclude each other"));
        assert!(err(&["-t", "a", "-c", "/f.json", "p:r:i"]).contains("exclude each other"));
        assert!(err(&["--login-token", "x", "p:r:i"]).contains("goes with --token"));
        assert!(err(&["cloudsql://db"]).contains("nor a DNS name"));
        assert!(err(&["P:r:i"]).contains("project 'P'"));
        // A flag cloud-sql-proxy has and keyhole does not is refused by name.
        assert!(err(&["--fuse", "/x", "p:r:i"]).contains("--fuse"));
    }

    #[test]
    fn instance_target_errors_never_show_a_password() {
        for (target, says) in [
            ("cloudsql://me:hunter2@p:r:i", "carries no user or password"),
            ("p:r:i?listen=ssh://me:hunter2@h", "listen:"),
            ("p:r:i?address=http://me:hunter2@h", "not an IP address"),
            (
                "p:r:i?http://me:hunter2@h",
                "unknown parameter 'http://***@h'",
            ),
        ] {
            let e = err(&[target]);
            assert!(e.contains(says), "{target}: {e}");
            assert!(!e.contains("hunter2"), "{target}: {e}");
        }
    }

    #[test]
    fn an_impersonation_chain_is_kept_in_the_order_given() {
        let c = load(
            &[
                "--impersonate-service-account",
                "target@p.iam.gserviceaccount.com, d1@p.iam.gserviceaccount.com,d2@p.iam.gserviceaccount.com",
                "p:r:i",
            ],
            &[],
        )
        .expect("valid");
        assert_eq!(
            c.cloudsql.impersonate,
            [
                "target@p.iam.gserviceaccount.com",
                "d1@p.iam.gserviceaccount.com",
                "d2@p.iam.gserviceaccount.com"
            ]
        );
        assert_eq!(
            c.cloudsql.iam_credentials_endpoint,
            "https://iamcredentials.googleapis.com"
        );
        // cloud-sql-proxy's variable, keyhole's endpoint option, the universe.
        let c = load(
            &["--universe-domain", "example.test", "p:r:i"],
            &[(
                "CSQL_PROXY_IMPERSONATE_SERVICE_ACCOUNT",
                "sa@p.iam.gserviceaccount.com",
            )],
        )
        .expect("valid");
        assert_eq!(c.cloudsql.impersonate, ["sa@p.iam.gserviceaccount.com"]);
        assert_eq!(
            c.cloudsql.iam_credentials_endpoint,
            "https://iamcredentials.example.test"
        );
        let c = load(
            &["p:r:i"],
            &[("KEYHOLE_IAM_CREDENTIALS_ENDPOINT", "http://127.0.0.1:9/")],
        )
        .expect("valid");
        assert_eq!(c.cloudsql.iam_credentials_endpoint, "http://127.0.0.1:9");
        assert!(c.cloudsql.impersonate.is_empty());
        // With --token, the impersonated account's login token is minted:
        // --auto-iam-authn needs no --login-token.
        let c = load(
            &[
                "-t",
                "base",
                "-i",
                "--impersonate-service-account",
                "sa@p.iam",
                "p:r:i",
            ],
            &[],
        )
        .expect("valid");
        assert_eq!(c.cloudsql.impersonate, ["sa@p.iam"]);
    }

    #[test]
    fn a_bad_impersonation_chain_is_refused_with_the_reason() {
        let flag = |chain: &str| err(&["--impersonate-service-account", chain, "p:r:i"]);
        assert_eq!(
            flag(""),
            "--impersonate-service-account: empty: give the service account to impersonate (an email), or leave the option out"
        );
        assert_eq!(
            flag("a@p.iam.gserviceaccount.com,,b@p.iam.gserviceaccount.com"),
            "--impersonate-service-account: entry 2 of 3 is empty: give service account emails separated by single commas, the target first"
        );
        assert!(flag("a@p.iam.gserviceaccount.com,").contains("entry 2 of 2 is empty"));
        for bad in [
            "sa",
            "sa@",
            "@p.iam",
            "sa@p",
            "sa@@p.iam",
            "s a@p.iam",
            "sa@p..iam",
            "sa@p.iam/x",
        ] {
            assert!(
                flag(bad).ends_with(&format!(
                    "'{}' is not a service account email (like sa@my-project.iam.gserviceaccount.com)",
                    bad.trim()
                )),
                "{bad}: {}",
                flag(bad)
            );
        }
        assert!(err(&[
            "--iam-credentials-endpoint",
            "iamcredentials.googleapis.com",
            "p:r:i"
        ])
        .starts_with("--iam-credentials-endpoint: "));
        assert_eq!(
            err(&[
                "-t",
                "a",
                "--login-token",
                "b",
                "--impersonate-service-account",
                "sa@p.iam.gserviceaccount.com",
                "p:r:i"
            ]),
            "--login-token and --impersonate-service-account exclude each other: with impersonation keyhole mints the login token for the impersonated service account"
        );
    }
}
