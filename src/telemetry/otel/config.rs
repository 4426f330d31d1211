//! The `OTEL_*` environment variables keyhole honours, read once at
//! startup. A value that cannot be used is an error naming its variable,
//! so keyhole refuses to start rather than export somewhere unexpected.
//! Header values (`OTEL_EXPORTER_OTLP_HEADERS`) are secrets (API keys,
//! bearer tokens): no error, log line or `Debug` output shows them.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use super::proto::KeyValue;
use crate::http::client::Url;

/// Why the OpenTelemetry settings cannot be used: the variable, and what
/// is wrong with it (never its value when that could be a secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable}: {reason}")]
pub struct ConfigError {
    pub variable: String,
    pub reason: String,
}

fn fail(variable: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        variable: variable.to_owned(),
        reason: reason.into(),
    }
}

/// How a signal's requests are encoded (`OTEL_EXPORTER_OTLP_PROTOCOL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `http/protobuf`, the default.
    Protobuf,
    /// `http/json`.
    Json,
}

impl Protocol {
    pub fn content_type(self) -> &'static str {
        match self {
            Protocol::Protobuf => "application/x-protobuf",
            Protocol::Json => "application/json",
        }
    }
}

/// Where and how one signal (traces or metrics) is sent.
#[derive(Clone, PartialEq)]
pub struct Signal {
    pub url: Url,
    pub protocol: Protocol,
    /// Sent with every request. The values are secrets.
    pub headers: Vec<(String, String)>,
    /// For one request.
    pub timeout: Duration,
}

impl fmt::Debug for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Header names only: their values are secrets.
        let names: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("Signal")
            .field("url", &self.url)
            .field("protocol", &self.protocol)
            .field("headers", &names)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// `OTEL_TRACES_SAMPLER`. Keyhole's connection spans are always roots (a
/// database protocol carries no trace context), so each `parentbased_*`
/// sampler decides as its root sampler does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampler {
    AlwaysOn,
    AlwaysOff,
    /// Keeps a trace when its id's last 8 bytes, as a number, fall below
    /// the ratio of 2^64 (the spec's TraceIdRatioBased).
    Ratio(f64),
}

/// The span queue and batches (`OTEL_BSP_*`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Batch {
    pub schedule_delay: Duration,
    pub max_queue: usize,
    pub max_batch: usize,
}

/// Everything the exporter needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `None`: traces are not exported.
    pub traces: Option<Signal>,
    /// `None`: metrics are not exported.
    pub metrics: Option<Signal>,
    pub resource: Vec<KeyValue>,
    pub sampler: Sampler,
    pub batch: Batch,
    pub metric_interval: Duration,
}

const DEFAULT_ENDPOINT: &str = "http://localhost:4318";

impl Config {
    /// The settings in `env`; `Ok(None)` when nothing is to be exported:
    /// `OTEL_SDK_DISABLED=true`, both signals' exporters `none`, or no
    /// endpoint set (keyhole does not send to the spec's default
    /// localhost:4318 unless an `OTEL_*_EXPORTER=otlp` asks for it).
    pub fn from_env(env: &HashMap<String, String>) -> Result<Option<Config>, ConfigError> {
        let get = |name: &str| env.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());
        match get("OTEL_SDK_DISABLED")
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("false") => {}
            Some("true") => return Ok(None),
            Some(_) => return Err(fail("OTEL_SDK_DISABLED", "must be true or false")),
        }
        for name in [
            "OTEL_EXPORTER_OTLP_CERTIFICATE",
            "OTEL_EXPORTER_OTLP_CLIENT_KEY",
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
        ] {
            if get(name).is_some() {
                return Err(fail(
                    name,
                    "not supported: keyhole verifies the collector against the system trust store",
                ));
            }
        }
        let traces = signal(env, "TRACES", "traces")?;
        let metrics = signal(env, "METRICS", "metrics")?;
        if traces.is_none() && metrics.is_none() {
            return Ok(None);
        }
        Ok(Some(Config {
            traces,
            metrics,
            resource: resource(env)?,
            sampler: sampler(env)?,
            batch: Batch {
                schedule_delay: millis(env, "OTEL_BSP_SCHEDULE_DELAY", 5000)?,
                max_queue: count(env, "OTEL_BSP_MAX_QUEUE_SIZE", 2048)?,
                max_batch: count(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)?,
            },
            metric_interval: millis(env, "OTEL_METRIC_EXPORT_INTERVAL", 60_000)?,
        }))
    }
}

/// One signal's settings: `OTEL_EXPORTER_OTLP_<SIGNAL>_*` before
/// `OTEL_EXPORTER_OTLP_*`.
fn signal(
    env: &HashMap<String, String>,
    upper: &str,
    path: &str,
) -> Result<Option<Signal>, ConfigError> {
    let get = |name: &str| {
        env.get(name)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
            .map(|v| (name.to_owned(), v))
    };
    let specific = |suffix: &str| {
        get(&format!("OTEL_EXPORTER_OTLP_{upper}_{suffix}"))
            .or_else(|| get(&format!("OTEL_EXPORTER_OTLP_{suffix}")))
    };
    let exporter_var = format!("OTEL_{upper}_EXPORTER");
    let asked = match get(&exporter_var) {
        None => false,
        Some((_, v)) if v.eq_ignore_ascii_case("none") => return Ok(None),
        Some((_, v)) if v.eq_ignore_ascii_case("otlp") => true,
        Some((name, _)) => {
            return Err(fail(
                &name,
                "keyhole exports only with otlp (or none to turn it off)",
            ))
        }
    };
    // The signal's own endpoint is used as it is; the general one gets
    // the signal's path appended (the spec's rule).
    let (var, url) = if let Some((var, url)) = get(&format!("OTEL_EXPORTER_OTLP_{upper}_ENDPOINT"))
    {
        (var, url.to_owned())
    } else if let Some((var, base)) = get("OTEL_EXPORTER_OTLP_ENDPOINT") {
        (var, format!("{}/v1/{path}", base.trim_end_matches('/')))
    } else if asked {
        (exporter_var, format!("{DEFAULT_ENDPOINT}/v1/{path}"))
    } else {
        return Ok(None);
    };
    let url = Url::parse(&url).map_err(|e| fail(&var, e.to_string()))?;
    let protocol = match specific("PROTOCOL") {
        None => Protocol::Protobuf,
        Some((_, "http/protobuf")) => Protocol::Protobuf,
        Some((_, "http/json")) => Protocol::Json,
        Some((name, "grpc")) => {
            return Err(fail(
                &name,
                "grpc is not supported: keyhole exports OTLP over HTTP; use http/protobuf (a collector's port 4318)",
            ))
        }
        Some((name, _)) => return Err(fail(&name, "must be http/protobuf or http/json")),
    };
    match specific("COMPRESSION") {
        None | Some((_, "none")) => {}
        Some((name, _)) => return Err(fail(&name, "only none is supported (no gzip)")),
    }
    let headers = match specific("HEADERS") {
        None => Vec::new(),
        Some((name, text)) => headers(text).map_err(|reason| fail(&name, reason))?,
    };
    let timeout = match specific("TIMEOUT") {
        None => Duration::from_secs(10),
        Some((name, text)) => parse_millis(&name, text)?,
    };
    Ok(Some(Signal {
        url,
        protocol,
        headers,
        timeout,
    }))
}

/// `key=value,key=value` (the W3C baggage form the spec uses): values
/// percent-decoded. The reason never quotes the text: it holds secrets.
fn headers(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (i, entry) in text.split(',').enumerate() {
        if entry.trim().is_empty() {
            continue;
        }
        let Some((name, value)) = entry.split_once('=') else {
            return Err(format!("entry {} is not name=value", i + 1));
        };
        let name = name.trim();
        let valid_name = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !valid_name {
            return Err(format!(
                "entry {}: the name is not a valid HTTP header name",
                i + 1
            ));
        }
        let value = percent_decode(value.trim())
            .filter(|v| v.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80))
            .ok_or_else(|| {
                format!(
                    "entry {} ({name}): the value is not valid (bad percent-encoding or a control character)",
                    i + 1
                )
            })?;
        out.push((name.to_ascii_lowercase(), value));
    }
    Ok(out)
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The resource: `OTEL_RESOURCE_ATTRIBUTES`, then `service.name` from
/// `OTEL_SERVICE_NAME` (which wins) or `keyhole`, and keyhole's version.
fn resource(env: &HashMap<String, String>) -> Result<Vec<KeyValue>, ConfigError> {
    const VAR: &str = "OTEL_RESOURCE_ATTRIBUTES";
    let mut attrs: Vec<KeyValue> = Vec::new();
    if let Some(text) = env.get(VAR) {
        for (i, entry) in text.split(',').enumerate() {
            if entry.trim().is_empty() {
                continue;
            }
            let (key, value) = entry
                .split_once('=')
                .ok_or_else(|| fail(VAR, format!("entry {} is not key=value", i + 1)))?;
            let key = key.trim();
            if key.is_empty() {
                return Err(fail(VAR, format!("entry {} has an empty key", i + 1)));
            }
            let value = percent_decode(value.trim()).ok_or_else(|| {
                fail(
                    VAR,
                    format!("entry {} ({key}): bad percent-encoding", i + 1),
                )
            })?;
            attrs.retain(|kv| kv.key != key);
            attrs.push(KeyValue::str(key, value));
        }
    }
    let service = env
        .get("OTEL_SERVICE_NAME")
        .map(|s| s.trim())
        .filter(|s| !s.is_empty());
    let has_service = attrs.iter().any(|kv| kv.key == "service.name");
    if service.is_some() || !has_service {
        attrs.retain(|kv| kv.key != "service.name");
        attrs.insert(
            0,
            KeyValue::str("service.name", service.unwrap_or("keyhole")),
        );
    }
    if !attrs.iter().any(|kv| kv.key == "service.version") {
        attrs.push(KeyValue::str("service.version", env!("CARGO_PKG_VERSION")));
    }
    for (key, value) in [
        ("telemetry.sdk.name", "keyhole"),
        ("telemetry.sdk.language", "rust"),
        ("telemetry.sdk.version", env!("CARGO_PKG_VERSION")),
    ] {
        attrs.retain(|kv| kv.key != key);
        attrs.push(KeyValue::str(key, value));
    }
    Ok(attrs)
}

fn sampler(env: &HashMap<String, String>) -> Result<Sampler, ConfigError> {
    let get = |name: &str| env.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());
    let ratio = || -> Result<f64, ConfigError> {
        const ARG: &str = "OTEL_TRACES_SAMPLER_ARG";
        match get(ARG) {
            None => Ok(1.0),
            Some(text) => match text.parse::<f64>() {
                Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
                _ => Err(fail(ARG, "must be a number from 0 to 1")),
            },
        }
    };
    match get("OTEL_TRACES_SAMPLER") {
        None | Some("always_on" | "parentbased_always_on") => Ok(Sampler::AlwaysOn),
        Some("always_off" | "parentbased_always_off") => Ok(Sampler::AlwaysOff),
        Some("traceidratio" | "parentbased_traceidratio") => Ok(Sampler::Ratio(ratio()?)),
        Some(_) => Err(fail(
            "OTEL_TRACES_SAMPLER",
            "must be always_on, always_off, traceidratio or parentbased_ of one of them",
        )),
    }
}

fn millis(
    env: &HashMap<String, String>,
    name: &str,
    default: u64,
) -> Result<Duration, ConfigError> {
    match env.get(name).map(|v| v.trim()).filter(|v| !v.is_empty()) {
        None => Ok(Duration::from_millis(default)),
        Some(text) => parse_millis(name, text),
    }
}

fn parse_millis(name: &str, text: &str) -> Result<Duration, ConfigError> {
    match text.parse::<u64>() {
        Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
        _ => Err(fail(
            name,
            "must be a whole number of milliseconds, more than 0",
        )),
    }
}

fn count(env: &HashMap<String, String>, name: &str, default: usize) -> Result<usize, ConfigError> {
    match env.get(name).map(|v| v.trim()).filter(|v| !v.is_empty()) {
        None => Ok(default),
        Some(text) => match text.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(fail(name, "must be a whole number, more than 0")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn load(pairs: &[(&str, &str)]) -> Result<Option<Config>, ConfigError> {
        Config::from_env(&env(pairs))
    }

    fn loaded(pairs: &[(&str, &str)]) -> Config {
        match load(pairs) {
            Ok(Some(c)) => c,
            other => panic!("{pairs:?}: {other:?}"),
        }
    }

    fn error(pairs: &[(&str, &str)]) -> ConfigError {
        match load(pairs) {
            Err(e) => e,
            other => panic!("{pairs:?}: expected an error, got {other:?}"),
        }
    }

    const BASE: (&str, &str) = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/");

    #[test]
    fn nothing_set_means_no_export() {
        assert_eq!(load(&[]), Ok(None));
        assert_eq!(load(&[BASE, ("OTEL_SDK_DISABLED", "TRUE")]), Ok(None));
        assert_eq!(
            load(&[
                BASE,
                ("OTEL_TRACES_EXPORTER", "none"),
                ("OTEL_METRICS_EXPORTER", "none")
            ]),
            Ok(None)
        );
        assert_eq!(
            error(&[BASE, ("OTEL_SDK_DISABLED", "yes")]).variable,
            "OTEL_SDK_DISABLED"
        );
    }

    #[test]
    fn endpoints_general_and_per_signal() {
        let c = loaded(&[BASE]);
        let traces = c.traces.as_ref().map(|s| s.url.to_string());
        let metrics = c.metrics.as_ref().map(|s| s.url.to_string());
        assert_eq!(traces.as_deref(), Some("http://collector:4318/v1/traces"));
        assert_eq!(metrics.as_deref(), Some("http://collector:4318/v1/metrics"));

        let c = loaded(&[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "https://t.example/custom",
        )]);
        assert_eq!(
            c.traces.map(|s| s.url.to_string()).as_deref(),
            Some("https://t.example/custom")
        );
        assert!(c.metrics.is_none(), "only the traces endpoint was set");

        let c = loaded(&[
            BASE,
            ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://m:9/x"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ]);
        assert!(c.traces.is_none());
        assert_eq!(
            c.metrics.map(|s| s.url.to_string()).as_deref(),
            Some("http://m:9/x")
        );

        // An explicit otlp exporter without an endpoint: the spec's default.
        let c = loaded(&[("OTEL_METRICS_EXPORTER", "otlp")]);
        assert_eq!(
            c.metrics.map(|s| s.url.to_string()).as_deref(),
            Some("http://localhost:4318/v1/metrics")
        );

        let e = error(&[("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "ftp://x")]);
        assert_eq!(e.variable, "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT");
        assert_eq!(
            error(&[BASE, ("OTEL_TRACES_EXPORTER", "zipkin")]).variable,
            "OTEL_TRACES_EXPORTER"
        );
    }

    #[test]
    fn protocol_json_protobuf_and_grpc_refused() {
        assert_eq!(
            loaded(&[BASE]).traces.map(|s| s.protocol),
            Some(Protocol::Protobuf)
        );
        let c = loaded(&[BASE, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]);
        assert_eq!(c.traces.map(|s| s.protocol), Some(Protocol::Json));
        let c = loaded(&[
            BASE,
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/protobuf"),
        ]);
        assert_eq!(c.metrics.map(|s| s.protocol), Some(Protocol::Protobuf));
        let e = error(&[BASE, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]);
        assert_eq!(e.variable, "OTEL_EXPORTER_OTLP_PROTOCOL");
        assert!(e.to_string().contains("grpc is not supported"), "{e}");
        assert!(!e.to_string().contains('\n'));
        let e = error(&[BASE, ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "thrift")]);
        assert_eq!(e.variable, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL");
        let e = error(&[BASE, ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")]);
        assert_eq!(e.variable, "OTEL_EXPORTER_OTLP_COMPRESSION");
        let e = error(&[BASE, ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/ca.pem")]);
        assert_eq!(e.variable, "OTEL_EXPORTER_OTLP_CERTIFICATE");
    }

    #[test]
    fn headers_are_decoded_and_errors_never_show_values() {
        let c = loaded(&[
            BASE,
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "Authorization=Bearer%20s3cret, x-tenant = a=b ,",
            ),
            ("OTEL_EXPORTER_OTLP_METRICS_HEADERS", "x-only=metrics"),
        ]);
        let traces = c.traces.expect("traces");
        assert_eq!(
            traces.headers,
            [
                ("authorization".to_owned(), "Bearer s3cret".to_owned()),
                ("x-tenant".to_owned(), "a=b".to_owned())
            ]
        );
        assert!(!format!("{traces:?}").contains("s3cret"));
        assert_eq!(
            c.metrics.expect("metrics").headers,
            [("x-only".to_owned(), "metrics".to_owned())]
        );

        for bad in ["novalue", "bad name=s3cret", "k=s3cret%zz", "k=s3cret%0A"] {
            let e = error(&[BASE, ("OTEL_EXPORTER_OTLP_HEADERS", bad)]);
            assert_eq!(e.variable, "OTEL_EXPORTER_OTLP_HEADERS");
            assert!(!e.to_string().contains("s3cret"), "{e}");
        }
    }

    #[test]
    fn timeouts_and_intervals_in_milliseconds() {
        let c = loaded(&[
            BASE,
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "100"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "1000"),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "10"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "5"),
        ]);
        assert_eq!(
            c.traces.map(|s| s.timeout),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            c.metrics.map(|s| s.timeout),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(c.metric_interval, Duration::from_secs(1));
        assert_eq!(
            c.batch,
            Batch {
                schedule_delay: Duration::from_millis(200),
                max_queue: 10,
                max_batch: 5
            }
        );
        assert_eq!(loaded(&[BASE]).metric_interval, Duration::from_secs(60));
        for var in [
            "OTEL_EXPORTER_OTLP_TIMEOUT",
            "OTEL_METRIC_EXPORT_INTERVAL",
            "OTEL_BSP_SCHEDULE_DELAY",
            "OTEL_BSP_MAX_QUEUE_SIZE",
        ] {
            for bad in ["0", "-1", "1.5", "soon"] {
                assert_eq!(error(&[BASE, (var, bad)]).variable, var, "{var}={bad}");
            }
        }
    }

    #[test]
    fn service_name_and_resource_attributes() {
        let value = |c: &Config, key: &str| {
            c.resource
                .iter()
                .find(|kv| kv.key == key)
                .map(|kv| kv.value.clone())
        };
        let s = |v: &str| Some(super::super::proto::Value::Str(v.to_owned()));
        let c = loaded(&[BASE]);
        assert_eq!(value(&c, "service.name"), s("keyhole"));
        let c = loaded(&[
            BASE,
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "service.name=from-attrs,deployment.environment.name=prod%2Ceu",
            ),
        ]);
        assert_eq!(value(&c, "service.name"), s("from-attrs"));
        assert_eq!(value(&c, "deployment.environment.name"), s("prod,eu"));
        let c = loaded(&[
            BASE,
            ("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attrs"),
            ("OTEL_SERVICE_NAME", "edge"),
        ]);
        assert_eq!(value(&c, "service.name"), s("edge"));
        assert_eq!(
            error(&[BASE, ("OTEL_RESOURCE_ATTRIBUTES", "a=1,oops")]).variable,
            "OTEL_RESOURCE_ATTRIBUTES"
        );
    }

    #[test]
    fn samplers() {
        let sampler = |pairs: &[(&str, &str)]| loaded(&[&[BASE][..], pairs].concat()).sampler;
        assert_eq!(sampler(&[]), Sampler::AlwaysOn);
        assert_eq!(
            sampler(&[("OTEL_TRACES_SAMPLER", "always_off")]),
            Sampler::AlwaysOff
        );
        assert_eq!(
            sampler(&[("OTEL_TRACES_SAMPLER", "parentbased_always_on")]),
            Sampler::AlwaysOn
        );
        assert_eq!(
            sampler(&[("OTEL_TRACES_SAMPLER", "traceidratio")]),
            Sampler::Ratio(1.0)
        );
        assert_eq!(
            sampler(&[
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.25")
            ]),
            Sampler::Ratio(0.25)
        );
        assert_eq!(
            error(&[
                BASE,
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "2")
            ])
            .variable,
            "OTEL_TRACES_SAMPLER_ARG"
        );
        assert_eq!(
            error(&[BASE, ("OTEL_TRACES_SAMPLER", "jaeger_remote")]).variable,
            "OTEL_TRACES_SAMPLER"
        );
    }
}
