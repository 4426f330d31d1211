//! `keyhole token aws|gcp`: prints the token keyhole would log in with, for
//! a person to use by hand (`PGPASSWORD=$(keyhole token aws ...) psql ...`).
//! The token goes to stdout and nothing else does.

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};

use crate::config::{target, IamProvider, Protocol};
#[cfg(feature = "aws")]
use crate::credentials::aws;
use crate::credentials::{self, SourceContext, TokenRequest};

/// Print an IAM database token.
#[derive(Parser, Debug)]
#[command(name = "keyhole token")]
pub(crate) struct TokenCli {
    #[command(subcommand)]
    provider: Provider,
}

#[derive(Subcommand, Debug)]
enum Provider {
    /// An RDS/Aurora IAM token, signed with the credentials of the standard AWS chain.
    Aws {
        /// The database's endpoint as RDS knows it: HOST:PORT, or a target URL (postgres://HOST[:PORT]).
        endpoint: String,
        /// The database user the token is for.
        #[arg(long)]
        user: String,
        /// The region to sign for. [default: from the RDS host name, then AWS_REGION]
        #[arg(long)]
        region: Option<String>,
        /// Sign as of this time (2024-08-26T22:00:00Z, UTC), for reproducible output. [default: now]
        #[arg(long, value_name = "TIME")]
        at: Option<String>,
    },
    /// A Cloud SQL IAM login token (an OAuth2 access token) from Application Default Credentials.
    Gcp {
        /// Also print, on stderr, the database user names Cloud SQL expects for this account or email.
        #[arg(long)]
        user: Option<String>,
    },
}

const EXIT_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 2;

pub fn main(args: &[OsString]) -> ExitCode {
    let cli = match TokenCli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(EXIT_USAGE);
        }
    };
    crate::tls::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keyhole token: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.provider)) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err((code, message)) => {
            eprintln!("keyhole token: {message}");
            ExitCode::from(code)
        }
    }
}

async fn run(provider: Provider) -> Result<String, (u8, String)> {
    let usage = |m: String| (EXIT_USAGE, m);
    let failed = |m: String| (EXIT_FAILED, m);
    let mut context = SourceContext::new(crate::config::process_env(), Duration::from_secs(30));
    // Both subcommands exist in every build, so that one this build lacks
    // is refused with the feature's name (crate::features).
    // "keyhole token: aws needs keyhole built with the "aws" feature (this build has: gcp)".
    let needs = match provider {
        Provider::Aws { .. } => "aws",
        Provider::Gcp { .. } => "gcp",
    };
    crate::features::require(needs, needs).map_err(usage)?;
    match provider {
        #[cfg(not(feature = "aws"))]
        Provider::Aws { .. } => Err(usage("internal: no AWS in this build".into())),
        #[cfg(feature = "aws")]
        Provider::Aws {
            endpoint,
            user,
            region,
            at,
        } => {
            let (host, port) = parse_endpoint(&endpoint).map_err(usage)?;
            let at = at.map(|t| parse_utc(&t)).transpose().map_err(usage)?;
            let iam = crate::config::Iam {
                provider: IamProvider::Aws,
                region,
                endpoint_host: host.clone(),
                endpoint_port: port,
            };
            context.aws = Some(aws::load_config().await);
            let source = aws::source_for(&iam, &context).map_err(usage)?;
            let request = TokenRequest { host, port, user };
            let token = source
                .token_at(&request, at.unwrap_or_else(SystemTime::now))
                .await
                .map_err(|e| failed(e.to_string()))?;
            Ok(token.expose().to_owned())
        }
        Provider::Gcp { user } => {
            let iam = crate::config::Iam {
                provider: IamProvider::Gcp,
                region: None,
                endpoint_host: String::new(),
                endpoint_port: 0,
            };
            let source = credentials::build(&iam, &mut context)
                .await
                .map_err(failed)?;
            if let Some(user) = user {
                eprintln!(
                    "database user: {} (Postgres), {} (MySQL)",
                    source.database_user(&user, Protocol::Postgres),
                    source.database_user(&user, Protocol::Mysql)
                );
            }
            let request = TokenRequest {
                host: String::new(),
                port: 0,
                user: String::new(),
            };
            let token = source
                .fetch(&request)
                .await
                .map_err(|e| failed(e.to_string()))?;
            Ok(token.expose().to_owned())
        }
    }
}

/// `HOST:PORT` or a target URL (whose port defaults by protocol).
// Only `keyhole token aws` reads these two (the `aws` feature).
#[cfg_attr(not(feature = "aws"), allow(dead_code))]
fn parse_endpoint(text: &str) -> Result<(String, u16), String> {
    if text.contains("://") {
        let url = target::parse(text)?;
        let server_name = url
            .params
            .iter()
            .rev()
            .find(|(k, _)| k == "server-name")
            .map(|(_, v)| v.clone());
        return Ok((server_name.unwrap_or(url.host), url.port));
    }
    match target::split_host_port(text)? {
        (host, Some(port)) => Ok((host, port)),
        (_, None) => Err(format!(
            "'{text}' has no port: the token is signed for HOST:PORT, like mydb.abc123.eu-west-1.rds.amazonaws.com:5432"
        )),
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` (UTC) as a time.
#[cfg_attr(not(feature = "aws"), allow(dead_code))]
fn parse_utc(text: &str) -> Result<SystemTime, String> {
    let bad = || format!("'{text}' is not a UTC time like 2024-08-26T22:00:00Z");
    let b = text.as_bytes();
    if b.len() != 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'Z'
    {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, String> {
        text.get(r)
            .filter(|s| s.bytes().all(|c| c.is_ascii_digit()))
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, s) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return Err(bad());
    }
    let secs = crate::civil::days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + s;
    u64::try_from(secs)
        .map(|secs| UNIX_EPOCH + Duration::from_secs(secs))
        .map_err(|_| format!("'{text}' is before 1970"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_times() {
        let at = |t: &str| {
            parse_utc(t).map(|s| {
                s.duration_since(UNIX_EPOCH)
                    .map_or(u64::MAX, |d| d.as_secs())
            })
        };
        assert_eq!(at("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(at("2024-08-26T22:00:00Z"), Ok(1_724_709_600));
        assert_eq!(at("2000-02-29T12:00:00Z"), Ok(951_825_600));
        for bad in [
            "2024-08-26 22:00:00",
            "2024-13-01T00:00:00Z",
            "24-08-26T22:00:00Z",
            "2024-08-26T22:00:00+02:00",
        ] {
            assert!(
                parse_utc(bad).expect_err(bad).contains("not a UTC time"),
                "{bad}"
            );
        }
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            parse_endpoint("db.example:5432"),
            Ok(("db.example".into(), 5432))
        );
        assert_eq!(
            parse_endpoint("mysql://db.example"),
            Ok(("db.example".into(), 3306))
        );
        assert_eq!(
            parse_endpoint(
                "postgres://10.0.0.5:6432?server-name=mydb.abc.eu-west-1.rds.amazonaws.com"
            ),
            Ok(("mydb.abc.eu-west-1.rds.amazonaws.com".into(), 6432))
        );
        assert!(parse_endpoint("db.example")
            .expect_err("no port")
            .contains("has no port"));
    }
}
