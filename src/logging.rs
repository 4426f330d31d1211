//! Log output: tracing to stderr, as text or one JSON object per line.
//! Levels come from `RUST_LOG` (default `info`).
//!
//! The JSON formats are flat (every field of an event at the top level) and
//! name the three common members as each platform's log service reads them:
//!
//! - `json` (and cloud-sql-proxy's `--structured-logs`): Cloud Logging's
//!   special fields, `severity` (DEBUG, INFO, WARNING, ERROR), `message`,
//!   `time` (RFC 3339), and `logging.googleapis.com/labels` with the
//!   target's name, so Cloud Run and GKE show the level and can filter by
//!   target without a parser.
//! - `cloudwatch`: `timestamp`, `level` (DEBUG, INFO, WARN, ERROR),
//!   `message`, as AWS Lambda's JSON log format spells them; CloudWatch Logs
//!   Insights discovers every member of a JSON line by itself (ECS/Fargate
//!   with the awslogs driver).
//!
//! Libraries that see credentials are capped at `info` whatever `RUST_LOG`
//! says: aws-sigv4 logs the canonical request (session token included) and
//! the HTTP stack logs headers and bodies at debug and trace. Secrets never
//! reach a log line, not even one an operator asked for.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::Directive;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
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
        LogFormat::Json => builder.event_format(JsonLines::CloudLogging).try_init(),
        LogFormat::CloudWatch => builder.event_format(JsonLines::CloudWatch).try_init(),
    };
    if let Err(e) = result {
        eprintln!("keyhole: logging was set up already: {e}");
    }
}

/// One JSON object per event, named for a platform (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonLines {
    CloudLogging,
    CloudWatch,
}

/// Fields of an event that become Cloud Logging labels (indexed, for
/// filters such as `labels.target="orders"`).
const LABELS: &[&str] = &["target"];

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut time = String::new();
        tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(&mut time))?;
        let mut fields = Fields::default();
        event.record(&mut fields);
        writer.write_str(&self.line(*event.metadata().level(), &time, fields))?;
        writer.write_char('\n')
    }
}

impl JsonLines {
    /// The line for one event (without its newline).
    fn line(self, level: Level, time: &str, fields: Fields) -> String {
        let (level_key, time_key, level_name) = match self {
            JsonLines::CloudLogging => ("severity", "time", severity(level)),
            JsonLines::CloudWatch => ("level", "timestamp", level.as_str()),
        };
        let mut line = serde_json::Map::new();
        let reserved = [level_key, time_key, "message", GOOGLE_LABELS];
        let mut out = String::with_capacity(256);
        out.push('{');
        push_member(&mut out, level_key, &level_name.into());
        push_member(&mut out, time_key, &time.into());
        push_member(
            &mut out,
            "message",
            &fields.message.unwrap_or_default().into(),
        );
        let mut labels = serde_json::Map::new();
        for (name, value) in fields.members {
            if self == JsonLines::CloudLogging && LABELS.contains(&name.as_str()) {
                // Labels are strings.
                let text = match &value {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                labels.insert(name.clone(), text.into());
            }
            // A field named as a special member keeps its value, renamed.
            let key = if reserved.contains(&name.as_str()) {
                format!("field.{name}")
            } else {
                name
            };
            line.insert(key, value);
        }
        for (key, value) in &line {
            push_member(&mut out, key, value);
        }
        if !labels.is_empty() {
            push_member(&mut out, GOOGLE_LABELS, &serde_json::Value::Object(labels));
        }
        out.push('}');
        out
    }
}

const GOOGLE_LABELS: &str = "logging.googleapis.com/labels";

/// Cloud Logging's LogSeverity names.
fn severity(level: Level) -> &'static str {
    match level {
        Level::ERROR => "ERROR",
        Level::WARN => "WARNING",
        Level::INFO => "INFO",
        Level::DEBUG | Level::TRACE => "DEBUG",
    }
}

fn push_member(out: &mut String, key: &str, value: &serde_json::Value) {
    if out.len() > 1 {
        out.push(',');
    }
    // Serializing a string or a Value cannot fail.
    out.push_str(&serde_json::to_string(key).unwrap_or_default());
    out.push(':');
    out.push_str(&serde_json::to_string(value).unwrap_or_default());
}

/// An event's fields as JSON values, in the order they were given.
#[derive(Default)]
struct Fields {
    message: Option<String>,
    members: Vec<(String, serde_json::Value)>,
}

impl Fields {
    fn put(&mut self, field: &Field, value: serde_json::Value) {
        if field.name() == "message" {
            self.message = Some(match value {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            });
        } else {
            self.members.push((field.name().to_owned(), value));
        }
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, value.to_string().into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // `%value` fields arrive here too, formatted with Display.
        self.put(field, format!("{value:?}").into());
    }
}

#[cfg(test)]
mod json_tests {
    use super::*;

    fn fields(message: &str, members: &[(&str, serde_json::Value)]) -> Fields {
        Fields {
            message: Some(message.to_owned()),
            members: members
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        }
    }

    #[test]
    fn cloud_logging_reads_severity_time_message_and_labels() {
        let line = JsonLines::CloudLogging.line(
            Level::WARN,
            "2026-12-07T02:00:00.123456Z",
            fields(
                "connection closed",
                &[
                    ("target", "orders".into()),
                    ("bytes_to_client", 42u64.into()),
                    ("time", "shadowed".into()),
                ],
            ),
        );
        assert!(
            line.starts_with(r#"{"severity":"WARNING","time":"2026-12-07T02:00:00.123456Z","message":"connection closed","#),
            "{line}"
        );
        let value: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        assert_eq!(value["target"], "orders");
        assert_eq!(value["bytes_to_client"], 42);
        assert_eq!(value["field.time"], "shadowed", "{line}");
        assert_eq!(value["logging.googleapis.com/labels"]["target"], "orders");
    }

    #[test]
    fn cloudwatch_reads_level_timestamp_message_and_no_google_members() {
        let line = JsonLines::CloudWatch.line(
            Level::ERROR,
            "2026-12-07T02:00:00Z",
            fields("cannot bind", &[("target", "orders".into())]),
        );
        assert_eq!(
            line,
            r#"{"level":"ERROR","timestamp":"2026-12-07T02:00:00Z","message":"cannot bind","target":"orders"}"#
        );
    }

    #[test]
    fn every_level_has_its_cloud_logging_severity() {
        assert_eq!(severity(Level::TRACE), "DEBUG");
        assert_eq!(severity(Level::DEBUG), "DEBUG");
        assert_eq!(severity(Level::INFO), "INFO");
        assert_eq!(severity(Level::WARN), "WARNING");
        assert_eq!(severity(Level::ERROR), "ERROR");
    }
}
