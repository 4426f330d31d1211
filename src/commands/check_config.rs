//! `keyhole check-config [ARGS]`: the configuration keyhole would run with
//! the same arguments and environment, validated and printed, with nothing
//! bound and nothing dialled.
//!
//! Checked: every flag, `KEYHOLE_*` variable and config-file key; each
//! target's parameters, backend rules, CA bundle and certificates (loaded),
//! and for token login the credential source (Google's is found from the
//! environment and files; AWS's chain is only described, as resolving it may
//! ask an instance metadata server). Printed on stdout: every option with
//! its value and where it came from, then each target as keyhole will serve
//! it. Credentials in the environment are listed with their secrets masked.
//! Exit 0 when keyhole would start, 2 (and the reason on stderr) when not.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::process::ExitCode;

use clap::CommandFactory;

use super::EXIT_USAGE;
use crate::config::cloudsql::{AdminCredentials, Pending};
use crate::config::via::Via;
use crate::config::{self, Cli, Config, ConfigError, Protocol, TargetConfig, TlsMode};
#[cfg(feature = "aws")]
use crate::credentials::aws;
#[cfg(feature = "gcp")]
use crate::credentials::gcp::GcpTokenSource;
use crate::platform::home::{self, Os};
use crate::proxy;

/// `check-config`'s command line: keyhole's own, described for completions
/// and the man page.
pub(crate) fn command() -> clap::Command {
    Cli::command()
        .name("check-config")
        .about("Validate keyhole's arguments, environment and config file; print the configuration it would run with")
        .disable_version_flag(true)
        .after_help("")
        .after_long_help("")
}

pub fn main(args: &[OsString]) -> ExitCode {
    // `keyhole check-config ARGS` reads ARGS as `keyhole ARGS` would.
    let mut argv: Vec<OsString> = vec!["keyhole".into()];
    argv.extend(args.iter().skip(1).cloned());
    let env = config::process_env();
    let keyhole_env: HashMap<String, String> = env
        .iter()
        .filter(|(k, _)| {
            k.starts_with("KEYHOLE_")
                || k.starts_with("CSQL_PROXY_")
                || config::via::PROXY_VARIABLES.contains(&k.as_str())
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let config = match Config::load(argv, &keyhole_env) {
        Ok(config) => config,
        Err(ConfigError::Cli(e)) if !e.use_stderr() => e.exit(),
        Err(e) => {
            eprintln!("keyhole check-config: {}", e.one_line());
            return ExitCode::from(EXIT_USAGE);
        }
    };
    crate::tls::install_crypto_provider();
    match check(&config, &env) {
        Ok(report) => {
            for name in unknown_variables(&keyhole_env) {
                eprintln!(
                    "keyhole check-config: warning: {name} is not a keyhole option and is ignored"
                );
            }
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("keyhole check-config: {message}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// Checks every target offline and renders the report; `Err` is what stops
/// keyhole from starting.
pub fn check(config: &Config, env: &HashMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# keyhole {}: effective configuration (valid)",
        env!("CARGO_PKG_VERSION")
    );
    let _ = writeln!(
        out,
        "# each option: value, then where it came from (flag, KEYHOLE_* variable, config file, or default)"
    );
    out.push('\n');
    render_options(&mut out, config, env);

    let mut skipped: Vec<(String, String)> = config
        .skipped
        .iter()
        .map(|s| (s.target.clone(), s.reason.clone()))
        .collect();
    let mut served = 0;
    for target in &config.targets {
        let metrics = crate::metrics::global().target(&target.name);
        let checked = if target.cloudsql.is_some() {
            // The connector's settings are checked below; the instance itself
            // is not asked (no API call).
            token_login(target, env, config.connect_timeout)
        } else {
            proxy::connectors(config, target, metrics, None)
                .map_err(|e| match e {
                    proxy::PrepareError::Target { reason, .. } => reason,
                    other => other.to_string(),
                })
                .and_then(|_| token_login(target, env, config.connect_timeout))
        };
        match checked {
            Ok(login) => {
                served += 1;
                out.push('\n');
                render_target(&mut out, target, login.as_deref());
            }
            Err(reason) if config.skip_failed_targets => {
                skipped.push((target.name.clone(), reason));
            }
            Err(reason) => return Err(format!("target {}: {reason}", target.name)),
        }
    }
    if served == 0 {
        return Err("no target left to serve".into());
    }
    for (target, reason) in &skipped {
        let _ = writeln!(
            out,
            "\n# skipped (--skip-failed-targets): {target}\n#   {reason}"
        );
    }
    if let Some(why) = &config.all_proxy_ignored {
        let _ = writeln!(out, "\n# {why}");
    }
    if config.targets.iter().any(|t| t.iam.is_some()) {
        render_credentials_env(&mut out, env);
    }
    Ok(out)
}

/// Options whose effect is shown in each target's section, not as a line of
/// their own.
const PER_TARGET_OPTIONS: &[&str] = &[
    "address",
    "port",
    "unix-socket",
    "ca-file",
    "client-cert",
    "client-key",
    "destinations",
    "allow",
    "iam",
    "region",
    "user",
    "private-ip",
    "psc",
    "auto-ip",
    "auto-iam-authn",
    "via",
];

fn render_options(out: &mut String, config: &Config, env: &HashMap<String, String>) {
    let duration = |d: std::time::Duration| crate::upstream::humanize(d);
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let first = config.targets.first();
    let options: Vec<(&str, String)> = vec![
        (
            "config",
            or_dash(config.config_file.as_ref().map(|p| p.display().to_string())),
        ),
        (
            "max-connections",
            config
                .max_connections
                .map_or("0 (no limit)".into(), |n| n.to_string()),
        ),
        (
            "data-threads",
            config.data_threads.map_or_else(
                || {
                    format!(
                        "{} (half the cores, rounded up)",
                        crate::proxy::default_data_threads()
                    )
                },
                |n| n.to_string(),
            ),
        ),
        ("min-sigterm-delay", duration(config.min_sigterm_delay)),
        ("max-sigterm-delay", duration(config.max_sigterm_delay)),
        (
            "exit-zero-on-sigterm",
            config.exit_zero_on_sigterm.to_string(),
        ),
        ("startup-timeout", duration(config.startup_timeout)),
        ("connect-timeout", duration(config.connect_timeout)),
        (
            "pipe-size",
            config
                .pipe_size
                .map_or("kernel default".into(), |n| format!("{n} bytes")),
        ),
        ("kernel-tls", kernel_tls(config.kernel_tls)),
        (
            "log-format",
            format!("{:?}", config.log_format).to_ascii_lowercase(),
        ),
        (
            "listen-cert",
            or_dash(
                config
                    .listen_tls
                    .as_ref()
                    .map(|c| c.cert.display().to_string()),
            ),
        ),
        (
            "listen-key",
            or_dash(
                config
                    .listen_tls
                    .as_ref()
                    .map(|c| c.key.display().to_string()),
            ),
        ),
        ("http-address", config.http.address.to_string()),
        ("http-port", config.http.port.to_string()),
        ("health-check", config.http.health_check.to_string()),
        ("prometheus", config.http.prometheus.to_string()),
        (
            "readiness-checks-upstream",
            config.http.readiness_checks_upstream.to_string(),
        ),
        ("quitquitquit", config.admin_port.is_some().to_string()),
        (
            "admin-port",
            config
                .admin_port
                .map_or("- (admin server off)".into(), |p| p.to_string()),
        ),
        (
            "run-connection-test",
            config.run_connection_test.to_string(),
        ),
        (
            "skip-failed-targets",
            config.skip_failed_targets.to_string(),
        ),
        ("watch", config.watch.to_string()),
        ("backend", or_dash(first.map(|t| t.backend.clone()))),
        (
            "structured-logs",
            (config.log_format == config::LogFormat::Json).to_string(),
        ),
        ("debug-logs", config.debug_logs.to_string()),
        (
            "ssh-config",
            config.ssh_config.as_ref().map_or_else(
                || {
                    let file = home::ssh_config_shown(Os::current(), &home::map_env(env));
                    format!("- ({file}, as ssh reads it)")
                },
                |p| p.display().to_string(),
            ),
        ),
        ("iap-endpoint", config.iap_endpoint.clone()),
        (
            "skip-failed-instance-config",
            config.skip_failed_targets.to_string(),
        ),
        ("lazy-refresh", config.cloudsql.lazy_refresh.to_string()),
        (
            "credentials-file",
            match &config.cloudsql.credentials {
                AdminCredentials::File(path) => path.display().to_string(),
                _ => "-".into(),
            },
        ),
        (
            "json-credentials",
            match &config.cloudsql.credentials {
                AdminCredentials::Json(_) => "(set, not shown)".into(),
                _ => "-".into(),
            },
        ),
        (
            "token",
            match &config.cloudsql.credentials {
                AdminCredentials::Token(_) => "(set, not shown)".into(),
                _ => "-".into(),
            },
        ),
        (
            "login-token",
            config
                .cloudsql
                .login_token
                .as_ref()
                .map_or("-".into(), |_| "(set, not shown)".into()),
        ),
        (
            "impersonate-service-account",
            if config.cloudsql.impersonate.is_empty() {
                "-".into()
            } else {
                config.cloudsql.impersonate.join(",")
            },
        ),
        (
            "quota-project",
            or_dash(config.cloudsql.quota_project.clone()),
        ),
        (
            "sqladmin-api-endpoint",
            config.cloudsql.api_endpoint.clone(),
        ),
        (
            "iam-credentials-endpoint",
            config.cloudsql.iam_credentials_endpoint.clone(),
        ),
        (
            "universe-domain",
            config
                .origins
                .get("universe-domain")
                .map_or("googleapis.com".into(), |_| {
                    config
                        .cloudsql
                        .api_endpoint
                        .trim_start_matches("https://sqladmin.")
                        .to_owned()
                }),
        ),
    ];
    let width = options.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (key, value) in options {
        let origin = config.origins.get(key).map_or("default", String::as_str);
        let _ = writeln!(out, "{key:<width$} = {value}    # {origin}");
    }
    // Options that only feed the targets are shown per target; list where
    // they were set, so a value that came from a stray variable is visible.
    for &key in PER_TARGET_OPTIONS {
        if let Some(origin) = config.origins.get(key) {
            let _ = writeln!(out, "# {key}: set by {origin} (see the targets below)");
        }
    }
}

fn render_target(out: &mut String, t: &TargetConfig, login: Option<&str>) {
    let _ = writeln!(out, "[target {}]", t.name);
    let mut line = |key: &str, value: String| {
        let _ = writeln!(out, "  {key:<12} {value}");
    };
    let listeners: Vec<String> = t
        .listen
        .iter()
        .map(|a| a.to_string())
        .chain(
            t.unix_socket
                .iter()
                .map(|p| format!("unix:{}", p.display())),
        )
        .collect();
    if !listeners.is_empty() || t.pending.is_none() {
        line("listen", listeners.join(", "));
    }
    if let Some(pending) = &t.pending {
        line(
            "listen",
            match pending {
                Pending::DefaultPort(addr) => format!(
                    "{addr}, the engine's next default port (5432 Postgres, 3306 MySQL), learned at start"
                ),
                Pending::SocketDir(dir) => format!(
                    "unix:{}/{}[/.s.PGSQL.5432], by the engine learned at start",
                    dir.display(),
                    t.name
                ),
            },
        );
    }
    let protocol = match t.protocol {
        Some(Protocol::Postgres) => "postgres",
        Some(Protocol::Mysql) => "mysql",
        None => "the instance's engine (from the SQL Admin API)",
    };
    line("protocol", protocol.into());
    let auto_iam = match &t.cloudsql {
        Some(instance) => {
            line(
                "dials",
                format!(
                    "Cloud SQL instance {}: its {} on port 3307, TLS 1.3 with an ephemeral client certificate, verified against the instance's server CA",
                    instance.instance,
                    instance.ip.describe()
                ),
            );
            render_path(&mut line, t, &format!("{} (port 3307)", instance.instance));
            instance.auto_iam_authn
        }
        None => {
            render_fixed_route(&mut line, t);
            false
        }
    };
    line(
        "allow",
        if t.allow.is_empty() {
            "any client".into()
        } else {
            crate::cidr::join(&t.allow)
        },
    );
    line(
        "user",
        t.user
            .clone()
            .unwrap_or_else(|| "the one each client sends".into()),
    );
    let login = if auto_iam {
        "automatic IAM database login (the token goes into the certificate; clients send no password)"
    } else {
        login.unwrap_or("the client's own password")
    };
    line("login", login.into());
}

/// Where a target with its own host goes, and how TLS to it is checked.
/// The way there: `keyhole → ssh://bastion → db.internal:5432`.
fn render_path(line: &mut impl FnMut(&str, String), t: &TargetConfig, database: &str) {
    match &t.via {
        Via::Direct => line("path", format!("keyhole → {database} (direct)")),
        via @ Via::Iap(_) => line(
            "path",
            format!(
                "keyhole → iap {via} → the VM's port (it reaches {database}; TLS and token login run from keyhole, end to end)"
            ),
        ),
        via => line(
            "path",
            format!(
                "keyhole → {} {via} → {database} (the {} resolves and dials the name; TLS and token login run from keyhole, end to end)",
                via.kind(),
                match via {
                    Via::Ssh(_) => "bastion",
                    Via::Ssm(_) => "instance's SSM agent",
                    _ => "proxy",
                },
            ),
        ),
    }
}

fn render_fixed_route(line: &mut impl FnMut(&str, String), t: &TargetConfig) {
    line("dials", config::host_port(&t.host, t.port));
    render_path(line, t, &config::host_port(&t.host, t.port));
    let mode = match t.tls.mode {
        TlsMode::VerifyFull => "verify-full",
        TlsMode::VerifyCa => "verify-ca",
        TlsMode::Disable => "disable (plain, to a relay on this host)",
    };
    let ca = t
        .tls
        .ca_file
        .as_ref()
        .map_or("the system roots".into(), |p| p.display().to_string());
    line(
        "tls",
        format!("{mode}, server name {}, CA {ca}", t.tls.server_name),
    );
    if let Some(ck) = &t.tls.client_cert {
        line(
            "client cert",
            format!("{} (key {})", ck.cert.display(), ck.key.display()),
        );
    }
    if t.via.is_direct() {
        line("backend", t.backend.clone());
    } else {
        // keyhole never resolves the name: the address is the hop's to check.
        line(
            "backend",
            format!(
                "{} (not checked here: through {} the hop resolves and dials the name, so which addresses it may reach is the bastion's or proxy's policy)",
                t.backend, t.via
            ),
        );
    }
    if !t.destinations.is_empty() {
        line("destinations", crate::cidr::join(&t.destinations));
    }
}

/// How the target's token login would work, found without the network.
fn token_login(
    t: &TargetConfig,
    env: &HashMap<String, String>,
    timeout: std::time::Duration,
) -> Result<Option<String>, String> {
    let Some(iam) = &t.iam else {
        return Ok(None);
    };
    // A provider this build lacks was refused with the configuration.
    crate::features::check_iam(iam.provider)?;
    match iam.provider {
        #[cfg(feature = "aws")]
        config::IamProvider::Aws => {
            let endpoint = config::host_port(&iam.endpoint_host, iam.endpoint_port);
            let region = match (&iam.region, aws::region_from_host(&iam.endpoint_host)) {
                (Some(r), _) => format!("{r} (region=)"),
                (None, Some(r)) => format!("{r} (from the host name)"),
                (None, None) => match ["AWS_REGION", "AWS_DEFAULT_REGION"]
                    .iter()
                    .find_map(|k| env.get(*k).map(|v| (k, v)))
                {
                    Some((k, v)) => format!("{v} ({k})"),
                    None => "from the AWS profile or instance metadata, found at start".into(),
                },
            };
            Ok(Some(format!(
                "RDS IAM token for {endpoint}, region {region}, credentials from the AWS chain ({})",
                aws_source(env)
            )))
        }
        #[cfg(feature = "gcp")]
        config::IamProvider::Gcp => {
            let source = GcpTokenSource::discover(env, timeout).map_err(|e| e.to_string())?;
            Ok(Some(format!(
                "Cloud SQL IAM login token, credentials from {}",
                source.describe()
            )))
        }
        #[allow(unreachable_patterns)]
        _ => {
            let _ = (env, timeout);
            Ok(None)
        }
    }
}

/// The first source of the AWS chain the environment points at; profiles
/// with the files they are in on this system.
#[cfg(feature = "aws")]
fn aws_source(env: &HashMap<String, String>) -> String {
    aws_source_on(Os::current(), env)
}

#[cfg(feature = "aws")]
fn aws_source_on(os: Os, env: &HashMap<String, String>) -> String {
    let set = |k: &str| env.get(k).is_some_and(|v| !v.is_empty());
    let files = || home::aws_files_shown(os, &home::map_env(env));
    if set("AWS_ACCESS_KEY_ID") {
        "environment variables".into()
    } else if set("AWS_PROFILE") {
        format!("the AWS_PROFILE profile in {}", files())
    } else if set("AWS_WEB_IDENTITY_TOKEN_FILE") {
        "web identity".into()
    } else if set("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
        || set("AWS_CONTAINER_CREDENTIALS_FULL_URI")
    {
        "the ECS container endpoint".into()
    } else {
        format!("the default profile in {}, else instance metadata", files())
    }
}

/// Variables credential sources read, in the order they are listed.
/// `true`: a secret, never shown.
const CREDENTIAL_VARIABLES: &[(&str, bool)] = &[
    ("AWS_REGION", false),
    ("AWS_DEFAULT_REGION", false),
    ("AWS_PROFILE", false),
    ("AWS_CONFIG_FILE", false),
    ("AWS_SHARED_CREDENTIALS_FILE", false),
    ("AWS_ACCESS_KEY_ID", false),
    ("AWS_SECRET_ACCESS_KEY", true),
    ("AWS_SESSION_TOKEN", true),
    ("AWS_WEB_IDENTITY_TOKEN_FILE", false),
    ("AWS_ROLE_ARN", false),
    ("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", false),
    ("AWS_CONTAINER_CREDENTIALS_FULL_URI", false),
    ("AWS_CONTAINER_AUTHORIZATION_TOKEN", true),
    ("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", false),
    ("GOOGLE_APPLICATION_CREDENTIALS", false),
    ("CLOUDSDK_CONFIG", false),
    ("GCE_METADATA_HOST", false),
];

fn render_credentials_env(out: &mut String, env: &HashMap<String, String>) {
    let set: Vec<_> = CREDENTIAL_VARIABLES
        .iter()
        .filter_map(|(k, secret)| env.get(*k).map(|v| (*k, v, *secret)))
        .collect();
    let _ = writeln!(
        out,
        "\n# credential variables in the environment (secrets masked)"
    );
    if set.is_empty() {
        let _ = writeln!(out, "#   none");
    }
    for (name, value, secret) in set {
        let _ = writeln!(out, "#   {name}={}", mask(name, value, secret));
    }
}

/// Secrets show only their length; an access key ID its first and last
/// four characters (enough to tell keys apart); a URL loses its query.
fn mask(name: &str, value: &str, secret: bool) -> String {
    if secret {
        return format!("**** ({} characters)", value.chars().count());
    }
    if name == "AWS_ACCESS_KEY_ID" {
        let chars: Vec<char> = value.chars().collect();
        if chars.len() <= 8 {
            return "****".into();
        }
        let head: String = chars[..4].iter().collect();
        let tail: String = chars[chars.len() - 4..].iter().collect();
        return format!("{head}****{tail}");
    }
    match value.split_once('?') {
        Some((before, _)) => format!("{before}?****"),
        None => value.to_owned(),
    }
}

/// `KEYHOLE_*` variables that name no option: most likely a typo.
fn unknown_variables(env: &HashMap<String, String>) -> Vec<String> {
    let known: Vec<String> = Cli::command()
        .get_arguments()
        .filter_map(|a| a.get_long())
        .map(config::env_name)
        .chain(["KEYHOLE_TARGETS".to_owned()])
        .collect();
    let mut unknown: Vec<String> = env
        .keys()
        .filter(|k| !known.contains(k) && !config::via::PROXY_VARIABLES.contains(&k.as_str()))
        .cloned()
        .collect();
    unknown.sort();
    unknown
}

/// `--kernel-tls`, and with `auto` whether this kernel would take the
/// records (the probe makes a loopback TCP pair; nothing leaves the host).
fn kernel_tls(mode: crate::tls::KernelTls) -> String {
    use crate::tls::ktls::{availability, Availability};
    match mode {
        crate::tls::KernelTls::Off => "off".into(),
        crate::tls::KernelTls::Auto => match availability() {
            Availability::Available { suites } => {
                let names: Vec<String> =
                    suites.iter().map(|(v, c)| format!("{v:?} {c:?}")).collect();
                format!("auto (this kernel takes {})", names.join(", "))
            }
            Availability::Unavailable { reason } => {
                format!("auto (unavailable here, keyhole's record layer carries TLS: {reason})")
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(args: &[&str], env: &[(&str, &str)]) -> (Config, HashMap<String, String>) {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let keyhole_env = env
            .iter()
            .filter(|(k, _)| k.starts_with("KEYHOLE_"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let config = Config::load(
            std::iter::once("keyhole").chain(args.iter().copied()),
            &keyhole_env,
        )
        .unwrap();
        (config, env)
    }

    #[test]
    fn options_show_their_value_and_where_it_came_from() {
        let (config, env) = load(
            &[
                "--health-check",
                "--max-sigterm-delay",
                "25s",
                "postgres://10.0.0.5",
            ],
            &[("KEYHOLE_HTTP_PORT", "9191")],
        );
        let report = check(&config, &env).unwrap();
        let line = |key: &str| {
            report
                .lines()
                .find(|l| l.starts_with(&format!("{key} ")))
                .unwrap_or_else(|| panic!("no {key} in\n{report}"))
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(line("health-check"), "health-check = true # --health-check");
        assert_eq!(line("http-port"), "http-port = 9191 # KEYHOLE_HTTP_PORT");
        assert_eq!(
            line("max-sigterm-delay"),
            "max-sigterm-delay = 25s # --max-sigterm-delay"
        );
        assert_eq!(line("prometheus"), "prometheus = false # default");
        assert!(
            report.contains("[target postgres://10.0.0.5:5432]"),
            "{report}"
        );
        assert!(
            report.contains("  listen       127.0.0.1:5432\n"),
            "{report}"
        );
    }

    // Its configuration has iam=aws: the `aws` feature's.
    #[cfg(feature = "aws")]
    #[test]
    fn credentials_in_the_environment_are_masked() {
        let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
        let session = "FwoGZXIvYXdzEXAMPLESESSIONTOKEN";
        let (config, env) = load(
            &["postgres://db.abc123.eu-west-1.rds.amazonaws.com?iam=aws"],
            &[
                ("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE"),
                ("AWS_SECRET_ACCESS_KEY", secret),
                ("AWS_SESSION_TOKEN", session),
                (
                    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                    "http://127.0.0.1:1/creds?sig=abc123",
                ),
            ],
        );
        let report = check(&config, &env).unwrap();
        for hidden in [secret, session, "AKIAIOSFODNN7EXAMPLE", "sig=abc123"] {
            assert!(!report.contains(hidden), "{hidden} shown in\n{report}");
        }
        assert!(
            report.contains("AWS_ACCESS_KEY_ID=AKIA****MPLE"),
            "{report}"
        );
        assert!(
            report.contains("AWS_SECRET_ACCESS_KEY=**** (40 characters)"),
            "{report}"
        );
        assert!(
            report.contains("region eu-west-1 (from the host name), credentials from the AWS chain (environment variables)"),
            "{report}"
        );
    }

    #[cfg(feature = "aws")]
    #[test]
    fn aws_profiles_are_named_with_their_files_on_each_system() {
        let env = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let unix = env(&[("HOME", "/home/ana")]);
        assert_eq!(
            aws_source_on(Os::Linux, &unix),
            "the default profile in /home/ana/.aws/{config,credentials}, else instance metadata"
        );
        let windows = env(&[
            ("USERPROFILE", "C:\\Users\\ana"),
            ("AWS_PROFILE", "dev"),
            ("AWS_SHARED_CREDENTIALS_FILE", "D:\\aws\\credentials"),
        ]);
        assert_eq!(
            aws_source_on(Os::Windows, &windows),
            "the AWS_PROFILE profile in C:\\Users\\ana\\.aws\\config and D:\\aws\\credentials"
        );
        assert_eq!(
            aws_source_on(Os::MacOs, &env(&[("AWS_PROFILE", "dev")])),
            "the AWS_PROFILE profile in ~/.aws (no home directory: HOME is unset)"
        );
        assert_eq!(
            aws_source_on(Os::Linux, &env(&[("AWS_ACCESS_KEY_ID", "AKIA")])),
            "environment variables"
        );
    }

    #[test]
    fn the_ssh_config_line_names_the_users_file() {
        let (config, env) = load(&["postgres://10.0.0.5"], &[("HOME", "/home/ana")]);
        let report = check(&config, &env).unwrap();
        let expected = home::ssh_config_shown(Os::current(), &home::map_env(&env));
        if Os::current() != Os::Windows {
            assert_eq!(expected, "/home/ana/.ssh/config");
        }
        assert!(
            report.contains(&format!("- ({expected}, as ssh reads it)")),
            "{report}"
        );
        let (config, env) = load(
            &["--ssh-config", "/etc/keyhole/ssh", "postgres://10.0.0.5"],
            &[],
        );
        let report = check(&config, &env).unwrap();
        assert!(
            report
                .lines()
                .any(|l| l.starts_with("ssh-config ") && l.contains("= /etc/keyhole/ssh ")),
            "{report}"
        );
    }

    #[test]
    fn a_target_whose_files_are_missing_fails_or_is_skipped() {
        let (config, env) = load(&["postgres://10.0.0.5?ca-file=/nonexistent/ca.pem"], &[]);
        let error = check(&config, &env).unwrap_err();
        assert!(
            error.starts_with("target postgres://10.0.0.5:5432: "),
            "{error}"
        );
        assert!(error.contains("/nonexistent/ca.pem"), "{error}");

        let (config, env) = load(
            &[
                "--skip-failed-targets",
                "postgres://10.0.0.5?ca-file=/nonexistent/ca.pem",
                "mysql://10.0.0.6",
            ],
            &[],
        );
        let report = check(&config, &env).unwrap();
        assert!(
            report.contains("[target mysql://10.0.0.6:3306]"),
            "{report}"
        );
        assert!(
            report.contains("# skipped (--skip-failed-targets): postgres://10.0.0.5:5432"),
            "{report}"
        );
    }

    /// A flag added to keyhole without a line here would leave check-config
    /// silent about it: every option is either a line of its own or shown
    /// per target.
    #[test]
    fn every_option_is_shown() {
        let (config, env) = load(&["postgres://10.0.0.5"], &[]);
        let report = check(&config, &env).unwrap();
        for arg in Cli::command().get_arguments() {
            let Some(key) = arg.get_long() else { continue };
            if key == "help" || key == "version" {
                continue;
            }
            let own_line = report.lines().any(|l| l.starts_with(&format!("{key} ")));
            assert!(
                own_line || PER_TARGET_OPTIONS.contains(&key),
                "--{key} is not in check-config's report:\n{report}"
            );
        }
    }

    // Its configuration has a Cloud SQL instance target: the `gcp` feature's.
    #[cfg(feature = "gcp")]
    #[test]
    fn the_impersonation_chain_and_its_endpoint_are_shown() {
        let line = |report: &str, key: &str| {
            report
                .lines()
                .find(|l| l.starts_with(&format!("{key} ")))
                .unwrap_or_else(|| panic!("no {key} in\n{report}"))
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        let (config, env) = load(
            &[
                "--token",
                "SECRET-token",
                "--impersonate-service-account",
                "t@p.iam.gserviceaccount.com,d@p.iam.gserviceaccount.com",
                "p:r:i?port=6000",
            ],
            &[("KEYHOLE_IAM_CREDENTIALS_ENDPOINT", "http://127.0.0.1:9")],
        );
        let report = check(&config, &env).unwrap();
        assert_eq!(
            line(&report, "impersonate-service-account"),
            "impersonate-service-account = t@p.iam.gserviceaccount.com,d@p.iam.gserviceaccount.com # --impersonate-service-account"
        );
        assert_eq!(
            line(&report, "iam-credentials-endpoint"),
            "iam-credentials-endpoint = http://127.0.0.1:9 # KEYHOLE_IAM_CREDENTIALS_ENDPOINT"
        );
        assert!(!report.contains("SECRET"), "{report}");
        let (config, env) = load(&["p:r:i?port=6000"], &[]);
        let report = check(&config, &env).unwrap();
        assert_eq!(
            line(&report, "impersonate-service-account"),
            "impersonate-service-account = - # default"
        );
        assert_eq!(
            line(&report, "iam-credentials-endpoint"),
            "iam-credentials-endpoint = https://iamcredentials.googleapis.com # default"
        );
    }

    #[test]
    fn a_misspelt_variable_is_reported() {
        let env: HashMap<String, String> = [("KEYHOLE_HELTH_CHECK", "true"), ("KEYHOLE_PORT", "1")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(unknown_variables(&env), ["KEYHOLE_HELTH_CHECK"]);
    }
}
