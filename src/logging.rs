//! Log output: tracing to stderr, as text or one JSON object per line.
//! Levels come from `RUST_LOG` (default `info`).
//!
//! Libraries that see credentials are capped at `info` whatever `RUST_LOG`
//! says: aws-sigv4 logs the canonical request (session token included) and
//! the HTTP stack logs headers and bodies at debug and trace. Secrets never
//! reach a log line, not even one an operator asked for.

use tracing_subscriber::filter::Directive;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Targets that handle credentials, and the most they may say.
const CAPPED: &[&str] = &[
    "aws_sigv4=info",
    "aws_config=info",
    "aws_credential_types=info",
    "aws_smithy_runtime=info",
    "aws_smithy_runtime_api=info",
    "aws_smithy_http_client=info",
    "aws_sdk_sts=info",
    "aws_sdk_sso=info",
    "aws_sdk_ssooidc=info",
    "hyper=info",
    "hyper_util=info",
    "h2=info",
    "rustls=info",
];

pub fn filter() -> EnvFilter {
    filter_from("info")
}

/// `RUST_LOG` if set, else `default`; the caps on top either way.
fn filter_from(default: &str) -> EnvFilter {
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    for cap in CAPPED {
        if let Ok(directive) = cap.parse::<Directive>() {
            filter = filter.add_directive(directive);
        }
    }
    filter
}

/// `debug`: `--debug-logs` (cloud-sql-proxy's flag): debug level unless
/// `RUST_LOG` says otherwise.
pub fn init(format: LogFormat, debug: bool) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter_from(if debug { "debug" } else { "info" }))
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    if let Err(e) = result {
        eprintln!("keyhole: logging was set up already: {e}");
    }
}
