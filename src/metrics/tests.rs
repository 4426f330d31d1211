//! The registry's scrape: exact `keyhole_` text, label escaping, and a check
//! that the whole output is valid Prometheus text.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::*;

/// The lines of `text` that belong to `keyhole_` families.
fn keyhole_lines(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| {
            l.starts_with("keyhole_")
                || l.starts_with("# HELP keyhole_")
                || l.starts_with("# TYPE keyhole_")
        })
        .collect()
}

/// The sample lines of a histogram nothing was observed in.
fn empty_histogram(name: &str, target: &str) -> String {
    let mut lines = String::new();
    for le in [
        "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1",
        "2.5", "5", "10", "+Inf",
    ] {
        lines += &format!("{name}_bucket{{target=\"{target}\",le=\"{le}\"}} 0\n");
    }
    lines += &format!("{name}_sum{{target=\"{target}\"}} 0\n");
    lines += &format!("{name}_count{{target=\"{target}\"}} 0\n");
    lines
}

#[test]
fn a_small_registry_renders_exactly() {
    let registry = Registry::new();
    let a = registry.target("a");
    let b = registry.target("b");
    assert!(Arc::ptr_eq(&a, &registry.target("a")));

    let kept = a.opened();
    drop(a.opened());
    a.closed("ok");
    a.refused(RefusedReason::Limit);
    a.add_transferred(100, 2000);
    a.upstream_connected(Duration::from_millis(3));
    a.token_injected();
    a.token_refreshed(true);
    // Expired already: the gauge stops at 0.
    a.watch_token_expiry(Arc::new(|| {
        SystemTime::now().checked_sub(Duration::from_secs(30))
    }));
    // A probe that knows no token: no sample for b.
    b.watch_token_expiry(Arc::new(|| None));
    b.refused(RefusedReason::Policy);
    b.refused(RefusedReason::Policy);

    let version = env!("CARGO_PKG_VERSION");
    let expected = format!(
        "\
# HELP keyhole_build_info keyhole's version; the value is always 1.
# TYPE keyhole_build_info gauge
keyhole_build_info{{version=\"{version}\"}} 1
# HELP keyhole_connections_open Client connections open now.
# TYPE keyhole_connections_open gauge
keyhole_connections_open{{target=\"a\"}} 1
keyhole_connections_open{{target=\"b\"}} 0
# HELP keyhole_connections_total Client connections accepted.
# TYPE keyhole_connections_total counter
keyhole_connections_total{{target=\"a\"}} 2
keyhole_connections_total{{target=\"b\"}} 0
# HELP keyhole_connections_closed_total Client connections closed, by the outcome their log line names.
# TYPE keyhole_connections_closed_total counter
keyhole_connections_closed_total{{target=\"a\",outcome=\"ok\"}} 1
# HELP keyhole_connections_refused_total Client connections refused before reaching a database, by reason.
# TYPE keyhole_connections_refused_total counter
keyhole_connections_refused_total{{target=\"a\",reason=\"limit\"}} 1
keyhole_connections_refused_total{{target=\"a\",reason=\"allowlist\"}} 0
keyhole_connections_refused_total{{target=\"a\",reason=\"policy\"}} 0
keyhole_connections_refused_total{{target=\"b\",reason=\"limit\"}} 0
keyhole_connections_refused_total{{target=\"b\",reason=\"allowlist\"}} 0
keyhole_connections_refused_total{{target=\"b\",reason=\"policy\"}} 2
# HELP keyhole_bytes_total Bytes carried between clients and databases, by direction.
# TYPE keyhole_bytes_total counter
keyhole_bytes_total{{target=\"a\",direction=\"client_to_server\"}} 100
keyhole_bytes_total{{target=\"a\",direction=\"server_to_client\"}} 2000
keyhole_bytes_total{{target=\"b\",direction=\"client_to_server\"}} 0
keyhole_bytes_total{{target=\"b\",direction=\"server_to_client\"}} 0
# HELP keyhole_upstream_connect_seconds Time to open the TCP connection to the database.
# TYPE keyhole_upstream_connect_seconds histogram
keyhole_upstream_connect_seconds_bucket{{target=\"a\",le=\"0.0005\"}} 0
keyhole_upstream_connect_seconds_bucket{{target=\"a\",le=\"0.001\"}} 0
keyhole_upstream_connect_seconds_bucket{{target=\"a\",le=\"0.0025\"}} 0
keyhole_upstream_connect_seconds_bucket{{target=\"a\",le=\"0.005\"}} 1
keyhole_upstream_connect_seconds_bucket{{target=\"a\",le=\"0.01\"}} 1
keyhole_upstream_connect_seconds_bucket{{target=\"a\",le=\"0.025\"}} 1
keyhole_upstream_connect_seconds_bucket{{target=\"a\",le=\"0.05\"}} 1
keyhole_upstream_connect_seconds_bucket{{target=\"a\",le=\"0.1\"}} 1
keyhole_upstream_connect_seconds_bucket{{target=\"a\",le=\"0.25\"}} 1
keyhole_upstream_connect_seconds_bucket{{target=\"a\",le=\"0.5\"}} 1
keyhole_upstream_connect_seconds_bucket{{target=\"a\",le=\"1\"}} 1
keyhole_upstream_connect_seconds_bucket{{target=\"a\",le=\"2.5\"}} 1
keyhole_upstream_connect_seconds_bucket{{target=\"a\",le=\"5\"}} 1
keyhole_upstream_connect_seconds_bucket{{target=\"a\",le=\"10\"}} 1
keyhole_upstream_connect_seconds_bucket{{target=\"a\",le=\"+Inf\"}} 1
keyhole_upstream_connect_seconds_sum{{target=\"a\"}} 0.003
keyhole_upstream_connect_seconds_count{{target=\"a\"}} 1
{connect_b}\
# HELP keyhole_upstream_tls_handshake_seconds Time of the TLS handshake with the database.
# TYPE keyhole_upstream_tls_handshake_seconds histogram
{tls_a}{tls_b}\
# HELP keyhole_upstream_tls_handshakes_total TLS handshakes with the database, by kind: full, full_after_retry (the server asked for another key-exchange group), resumed (a session ticket).
# TYPE keyhole_upstream_tls_handshakes_total counter
keyhole_upstream_tls_handshakes_total{{target=\"a\",kind=\"full\"}} 0
keyhole_upstream_tls_handshakes_total{{target=\"a\",kind=\"full_after_retry\"}} 0
keyhole_upstream_tls_handshakes_total{{target=\"a\",kind=\"resumed\"}} 0
keyhole_upstream_tls_handshakes_total{{target=\"b\",kind=\"full\"}} 0
keyhole_upstream_tls_handshakes_total{{target=\"b\",kind=\"full_after_retry\"}} 0
keyhole_upstream_tls_handshakes_total{{target=\"b\",kind=\"resumed\"}} 0
# HELP keyhole_token_injections_total Tokens that answered a database's password request.
# TYPE keyhole_token_injections_total counter
keyhole_token_injections_total{{target=\"a\"}} 1
keyhole_token_injections_total{{target=\"b\"}} 0
# HELP keyhole_token_failures_total Sessions that needed a token and could not use one.
# TYPE keyhole_token_failures_total counter
keyhole_token_failures_total{{target=\"a\"}} 0
keyhole_token_failures_total{{target=\"b\"}} 0
# HELP keyhole_token_refreshes_total Token fetches from the cloud provider, by result.
# TYPE keyhole_token_refreshes_total counter
keyhole_token_refreshes_total{{target=\"a\",result=\"ok\"}} 1
keyhole_token_refreshes_total{{target=\"a\",result=\"error\"}} 0
keyhole_token_refreshes_total{{target=\"b\",result=\"ok\"}} 0
keyhole_token_refreshes_total{{target=\"b\",result=\"error\"}} 0
# HELP keyhole_token_expiry_seconds Seconds until the soonest cached token expires (0 once it has).
# TYPE keyhole_token_expiry_seconds gauge
keyhole_token_expiry_seconds{{target=\"a\"}} 0
",
        connect_b = empty_histogram("keyhole_upstream_connect_seconds", "b"),
        tls_a = empty_histogram("keyhole_upstream_tls_handshake_seconds", "a"),
        tls_b = empty_histogram("keyhole_upstream_tls_handshake_seconds", "b"),
    );

    let rendered = registry.render();
    let got = keyhole_lines(&rendered);
    let want: Vec<&str> = expected.lines().collect();
    for (i, (got, want)) in got.iter().zip(&want).enumerate() {
        assert_eq!(got, want, "line {}", i + 1);
    }
    assert_eq!(got.len(), want.len(), "{rendered}");
    // Every keyhole_ line comes before the process metrics.
    assert!(rendered.starts_with(&expected), "{rendered}");
    drop(kept);
    assert_eq!(a.open(), 0);
}

#[test]
fn the_process_metrics_are_in_the_scrape() {
    // As main does: where the system cannot say when the process started.
    crate::platform::process::note_start();
    let rendered = Registry::new().render();
    for (name, kind) in [
        ("process_resident_memory_bytes", "gauge"),
        ("process_virtual_memory_bytes", "gauge"),
        ("process_cpu_seconds_total", "counter"),
        ("process_open_fds", "gauge"),
        ("process_max_fds", "gauge"),
        ("process_start_time_seconds", "gauge"),
    ] {
        // Linux reports all six (/proc); the portable build on Linux what
        // macOS would, and leaves the memory figures out rather than at zero.
        let memory = name.contains("memory");
        if cfg!(linux_native) || (cfg!(keyhole_unix) && !memory) {
            assert!(
                rendered.contains(&format!("\n# TYPE {name} {kind}\n{name} ")),
                "{name}: {rendered}"
            );
        } else if memory {
            assert!(!rendered.contains(name), "{name} is absent: {rendered}");
        }
        let sample = rendered
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '));
        if let Some(value) = sample {
            assert!(
                parse_value(value).is_some_and(|v| v >= 0.0),
                "{name} {value}"
            );
        }
    }
}

#[test]
fn an_empty_registry_has_build_info_and_no_empty_families() {
    let rendered = Registry::new().render();
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        keyhole_lines(&rendered),
        [
            "# HELP keyhole_build_info keyhole's version; the value is always 1.",
            "# TYPE keyhole_build_info gauge",
            &format!("keyhole_build_info{{version=\"{version}\"}} 1"),
        ]
    );
}

#[test]
fn target_names_are_escaped_in_labels() {
    let registry = Registry::new();
    registry
        .target("odd \"name\"\\with\nnewline")
        .opened()
        .metrics()
        .closed("ok");
    let rendered = registry.render();
    assert!(
        rendered.contains(
            "keyhole_connections_closed_total{target=\"odd \\\"name\\\"\\\\with\\nnewline\",outcome=\"ok\"} 1\n"
        ),
        "{rendered}"
    );
    assert_valid_exposition(&rendered);
}

#[test]
fn the_scrape_is_valid_prometheus_text() {
    let registry = Registry::new();
    for name in ["a", "b", "c"] {
        let t = registry.target(name);
        let _open = t.opened();
        t.closed("ok");
        t.closed("upstream_connect");
        t.upstream_connected(Duration::from_micros(1700));
        t.tls_handshake(Duration::from_secs(20), crate::tls::Handshake::Resumed);
        t.token_refreshed(false);
        t.token_injected();
        t.watch_token_expiry(Arc::new(|| {
            SystemTime::now().checked_add(Duration::from_secs(900))
        }));
    }
    assert_valid_exposition(&registry.render());
}

/// A sample value: a float, or the format's spellings of infinity and NaN.
fn parse_value(value: &str) -> Option<f64> {
    match value {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        v => v.parse().ok(),
    }
}

fn is_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Parses `name{labels} value` or `name value`; returns the name and labels.
fn parse_sample(line: &str) -> Result<(String, Vec<(String, String)>), String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    if !is_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        rest = inner;
        loop {
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = rest.find("=\"").ok_or("label without =\"")?;
            let key = &rest[..eq];
            if !is_name(key) {
                return Err(format!("bad label name {key:?}"));
            }
            rest = &rest[eq + 2..];
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let end = loop {
                match chars.next().ok_or("unterminated label value")? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next().ok_or("dangling escape")?.1 {
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        'n' => value.push('\n'),
                        c => return Err(format!("bad escape \\{c}")),
                    },
                    (_, '\n') => return Err("raw newline in a label value".into()),
                    (_, c) => value.push(c),
                }
            };
            labels.push((key.to_owned(), value));
            rest = &rest[end + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
    }
    let value = rest.strip_prefix(' ').ok_or("no space before the value")?;
    parse_value(value).ok_or(format!("bad value {value:?}"))?;
    Ok((name.to_owned(), labels))
}

/// Every non-comment line is a sample with a float value; every family has
/// exactly one `# TYPE` line (and at most one `# HELP`), before its samples,
/// which follow together; histogram buckets are cumulative and end at +Inf
/// with the count.
fn assert_valid_exposition(text: &str) {
    assert!(text.ends_with('\n'));
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helps: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    let mut finished: HashSet<String> = HashSet::new();
    let mut last_bucket: HashMap<(String, Vec<(String, String)>), f64> = HashMap::new();
    for line in text.lines() {
        if let Some(help) = line.strip_prefix("# HELP ") {
            let name = help.split(' ').next().unwrap_or_default();
            assert!(helps.insert(name.to_owned()), "two HELP lines for {name}");
            continue;
        }
        if let Some(ty) = line.strip_prefix("# TYPE ") {
            let mut parts = ty.split(' ');
            let name = parts.next().unwrap_or_default().to_owned();
            let kind = parts.next().unwrap_or_default().to_owned();
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind.as_str()),
                "{line}"
            );
            assert!(!types.contains_key(&name), "two TYPE lines for {name}");
            types.insert(name.clone(), kind);
            if let Some(previous) = current.replace(name) {
                finished.insert(previous);
            }
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment {line:?}");
        let (name, labels) = parse_sample(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        let family = current
            .clone()
            .unwrap_or_else(|| panic!("sample before any TYPE: {line}"));
        let kind = &types[&family];
        let belongs = if kind == "histogram" {
            ["_bucket", "_sum", "_count"]
                .iter()
                .any(|suffix| name == format!("{family}{suffix}"))
        } else {
            name == family
        };
        assert!(belongs, "{line:?} is not in family {family}");
        assert!(!finished.contains(&family));
        if kind == "histogram" {
            let value = line.rsplit(' ').next().and_then(parse_value);
            let others: Vec<_> = labels.iter().filter(|(k, _)| k != "le").cloned().collect();
            let series = (family.clone(), others);
            if name.ends_with("_bucket") {
                let value = value.unwrap_or(f64::NAN);
                let previous = last_bucket.insert(series, value).unwrap_or(0.0);
                assert!(value >= previous, "buckets not cumulative at {line}");
            } else if name.ends_with("_count") {
                assert_eq!(last_bucket.get(&series).copied(), value, "{line}");
            }
        }
    }
    assert!(helps.iter().all(|h| types.contains_key(h)));
}

#[test]
fn the_validator_catches_broken_text() {
    let broken = [
        "m 1\n",                                                               // no TYPE
        "# TYPE m gauge\n# TYPE m gauge\nm 1\n",                               // two TYPE lines
        "# TYPE m gauge\nm one\n",                                             // not a float
        "# TYPE m gauge\nm{a=\"x} 1\n",                                        // unterminated label
        "# TYPE m gauge\nm{a=\"\\t\"} 1\n",                                    // bad escape
        "# TYPE m gauge\n# TYPE n gauge\nn 1\nm 1\n", // m's samples after n's TYPE
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\n", // not cumulative
    ];
    for text in broken {
        let caught = std::panic::catch_unwind(|| assert_valid_exposition(text));
        assert!(caught.is_err(), "accepted {text:?}");
    }
}
