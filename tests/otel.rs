//! OpenTelemetry export (cargo feature `otel`): keyhole in front of the
//! real PostgreSQL, exporting to an OTLP/HTTP receiver in the test
//! (support/otlp.rs; no collector can be installed here), which decodes the
//! requests with prost. Checked: one trace per connection with its phases
//! as child spans, the outcome and byte counts of the log line; metrics
//! with the values `/metrics` shows; the configured headers sent and never
//! logged; a collector that refuses or is down costs one warning and no
//! connection; a graceful shutdown sends the last spans; grpc is refused at
//! startup; a MySQL connection (MariaDB) has the same phases.

#![cfg(feature = "otel")]

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::clients;
use support::keyhole::{Keyhole, Ready};
use support::logs::{closed_lines, field};
use support::mariadb::{self, MariaDb, NATIVE_PASS, NATIVE_USER};
use support::otlp::{FlatSpan, Receiver};
use support::postgres::{PgCluster, MD5_PASS, MD5_USER};
use support::session::wait_until;

const SECRET: &str = "sekrit-7f3a9c";

/// keyhole in front of the shared cluster, with `env` and an admin port.
fn keyhole(pg: &PgCluster, env: &[(&str, &str)]) -> (Keyhole, u16) {
    let port = support::free_port();
    let http_port = support::free_port();
    let (port_s, http_s) = (port.to_string(), http_port.to_string());
    let ca = pg.pki.ca.to_str().expect("UTF-8 path").to_owned();
    let target = pg.keyhole_target();
    let keyhole = Keyhole::spawn(
        &[
            "--port",
            &port_s,
            "--http-port",
            &http_s,
            "--prometheus",
            "--ca-file",
            &ca,
            &target,
        ],
        env,
        Ready::Tcp(port),
    );
    (keyhole, http_port)
}

fn roots(spans: &[FlatSpan]) -> Vec<&FlatSpan> {
    spans
        .iter()
        .filter(|s| s.span.name == "keyhole.connection")
        .collect()
}

fn children<'a>(spans: &'a [FlatSpan], root: &FlatSpan) -> Vec<&'a FlatSpan> {
    spans
        .iter()
        .filter(|s| s.span.parent_span_id == root.span.span_id)
        .collect()
}

/// The value /metrics shows for `name` with `target="pg"`-like `label`.
fn scraped(http_port: u16, name: &str, label: &str) -> f64 {
    support::http::metric(http_port, name, label)
}

#[test]
fn each_connection_is_a_trace_with_its_phases_and_metrics_match_the_scrape() {
    let pg = PgCluster::shared();
    let receiver = Receiver::start();
    let endpoint = receiver.endpoint();
    let headers = format!("authorization=Bearer%20{SECRET},x-tenant=t1");
    let (keyhole, http_port) = keyhole(
        pg,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_HEADERS", &headers),
            ("OTEL_SERVICE_NAME", "keyhole-under-test"),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=ci"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "200"),
            ("RUST_LOG", "keyhole=debug"),
        ],
    );
    let port = keyhole.port();

    for _ in 0..2 {
        let out = clients::psql(port, MD5_USER, Some(MD5_PASS), "select repeat('x', 5000)");
        clients::expect_success(&out, "a query through keyhole");
    }
    let refused = clients::psql(port, MD5_USER, Some("not-the-password"), "select 1");
    assert!(!refused.status.success(), "a wrong password fails");
    let logs = keyhole.wait_for_log(" connection closed ", 3);

    wait_until(
        "three connection spans at the receiver",
        Duration::from_secs(20),
        || roots(&receiver.spans()).len() >= 3,
        || format!("{:#?}\n{}", receiver.requests().len(), keyhole.logs()),
    );
    let spans = receiver.spans();
    let closed = closed_lines(&logs);
    assert_eq!(closed.len(), 3, "{logs}");
    for line in &closed {
        let conn = field(line, "conn");
        let root = roots(&spans)
            .into_iter()
            .find(|r| {
                r.attributes
                    .get("keyhole.connection.id")
                    .map(String::as_str)
                    == Some(conn)
            })
            .unwrap_or_else(|| panic!("no span for connection {conn}: {spans:#?}"));
        let a = &root.attributes;
        let outcome = field(line, "outcome");
        assert_eq!(a["keyhole.outcome"], outcome);
        assert_eq!(a["keyhole.target"], field(line, "target"));
        assert_eq!(
            a["keyhole.bytes.client_to_server"],
            field(line, "bytes_from_client")
        );
        assert_eq!(
            a["keyhole.bytes.server_to_client"],
            field(line, "bytes_to_client")
        );
        assert_eq!(a["db.system.name"], "postgresql");
        assert_eq!(a["server.address"], "127.0.0.1");
        assert_eq!(a["server.port"], pg.port.to_string());
        assert_eq!(a["network.peer.address"], "127.0.0.1");
        assert_eq!(root.span.kind, 2, "SERVER");
        assert_eq!(root.span.trace_id.len(), 16);
        assert!(root.span.parent_span_id.is_empty());
        assert!(root.span.start_time_unix_nano > 0);
        assert!(root.span.end_time_unix_nano >= root.span.start_time_unix_nano);
        assert_eq!(root.resource["service.name"], "keyhole-under-test");
        assert_eq!(root.resource["deployment.environment.name"], "ci");

        let kids = children(&spans, root);
        let names: Vec<&str> = kids.iter().map(|k| k.span.name.as_str()).collect();
        for kid in &kids {
            assert_eq!(kid.span.trace_id, root.span.trace_id);
            assert!(kid.span.start_time_unix_nano >= root.span.start_time_unix_nano);
            assert!(kid.span.end_time_unix_nano <= root.span.end_time_unix_nano);
        }
        if outcome == "client_closed" {
            assert_eq!(
                names,
                [
                    "keyhole.dial",
                    "keyhole.tls",
                    "keyhole.login",
                    "keyhole.splice"
                ],
                "{kids:#?}"
            );
            assert_eq!(root.status.code, 0, "UNSET on success");
            let splice = kids[3];
            assert_eq!(
                splice.attributes["keyhole.bytes.server_to_client"],
                field(line, "bytes_to_client")
            );
            assert!(
                field(line, "bytes_to_client").parse::<u64>().unwrap_or(0) > 5000,
                "the 5000-byte row came back: {line:?}"
            );
        } else {
            // The server refused the password: an error span, no splice.
            assert_eq!(root.status.code, 2, "ERROR: {root:#?}");
            assert_eq!(a["error.type"], outcome);
            assert!(!root.status.message.is_empty());
            assert!(!names.contains(&"keyhole.splice"), "{names:?}");
            assert!(names.contains(&"keyhole.login"), "{names:?}");
        }
    }

    // Metrics: the next export after the last connection shows what a scrape shows.
    let label = "target=\"";
    let total = scraped(http_port, "keyhole_connections_total", label);
    let bytes_down = scraped(
        http_port,
        "keyhole_bytes_total",
        "direction=\"server_to_client\"",
    );
    let connects = scraped(http_port, "keyhole_upstream_connect_seconds_count", label);
    assert_eq!(total, 3.0);
    let exported = |name: &str| receiver.last_metrics().and_then(|m| m.get(name).cloned());
    wait_until(
        "an export with the scrape's keyhole_connections_total",
        Duration::from_secs(20),
        || {
            exported("keyhole_connections_total")
                .and_then(|m| m.sum)
                .is_some_and(|s| s.data_points.first().map(|p| p.as_f64()) == Some(total))
        },
        || format!("{:?}", exported("keyhole_connections_total")),
    );
    // Every request carried the headers; none of their values reached the log.
    let requests = receiver.requests();
    assert!(requests.iter().any(|r| r.path == "/v1/metrics"));
    for r in &requests {
        assert_eq!(
            r.headers.get("authorization").map(String::as_str),
            Some(format!("Bearer {SECRET}").as_str())
        );
        assert_eq!(r.headers.get("x-tenant").map(String::as_str), Some("t1"));
        assert_eq!(
            r.headers.get("content-type").map(String::as_str),
            Some("application/x-protobuf")
        );
    }

    let metrics = receiver.last_metrics().unwrap_or_default();
    let sum = metrics["keyhole_connections_total"]
        .sum
        .clone()
        .unwrap_or_default();
    assert!(sum.is_monotonic);
    assert_eq!(sum.aggregation_temporality, 2, "CUMULATIVE");
    let target = field(&closed[0], "target");
    assert_eq!(
        sum.data_points[0].attrs().get("target").map(String::as_str),
        Some(target)
    );
    let bytes = metrics["keyhole_bytes_total"]
        .sum
        .clone()
        .unwrap_or_default();
    let down = bytes
        .data_points
        .iter()
        .find(|p| p.attrs().get("direction").map(String::as_str) == Some("server_to_client"))
        .map(|p| p.as_f64());
    assert_eq!(down, Some(bytes_down));
    let histogram = metrics["keyhole_upstream_connect_seconds"]
        .histogram
        .clone()
        .unwrap_or_default();
    let point = &histogram.data_points[0];
    assert_eq!(point.count as f64, connects);
    assert_eq!(point.bucket_counts.iter().sum::<u64>(), point.count);
    assert_eq!(point.bucket_counts.len(), point.explicit_bounds.len() + 1);
    assert_eq!(metrics["keyhole_upstream_connect_seconds"].unit, "s");
    assert!(metrics.contains_key("keyhole_build_info"));
    assert!(metrics.contains_key("keyhole_otel_spans_exported_total"));

    let logs = keyhole.logs();
    assert!(
        !logs.contains(SECRET),
        "a header value reached the log:\n{logs}"
    );
    assert!(!logs.contains("OpenTelemetry: export failed"), "{logs}");
}

#[test]
fn a_collector_that_refuses_or_is_down_costs_one_warning_and_no_connection() {
    let pg = PgCluster::shared();
    let receiver = Receiver::start();
    receiver.set_status(503);
    let endpoint = receiver.endpoint();
    let (keyhole, _) = keyhole(
        pg,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_HEADERS", &format!("api-key={SECRET}")),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "100"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "1000"),
        ],
    );
    let port = keyhole.port();
    let run = |n: usize| {
        for _ in 0..n {
            let out = clients::psql(port, MD5_USER, Some(MD5_PASS), "select 42");
            assert_eq!(
                clients::expect_success(&out, "a query while the collector fails"),
                "42"
            );
        }
    };
    let traces = || {
        receiver
            .requests()
            .iter()
            .filter(|r| r.path == "/v1/traces")
            .count()
    };
    run(3);
    wait_until(
        "refused exports of both signals",
        Duration::from_secs(20),
        || {
            traces() >= 1
                && receiver
                    .requests()
                    .iter()
                    .filter(|r| r.path == "/v1/metrics")
                    .count()
                    >= 3
        },
        || keyhole.logs(),
    );
    // Spans made after a refusal go out (and are refused) again: a second
    // trace export, still without a second warning. (Three quick
    // connections may all fit in the first batch.)
    run(1);
    wait_until(
        "a second refused trace export",
        Duration::from_secs(20),
        || traces() >= 2,
        || keyhole.logs(),
    );
    // Down: nothing listens there any more.
    receiver.stop();
    run(2);
    std::thread::sleep(Duration::from_millis(600));
    let logs = keyhole.logs();
    let warnings: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("OpenTelemetry: export failed"))
        .collect();
    let per_signal = |s: &str| {
        warnings
            .iter()
            .filter(|l| l.contains(&format!("signal=\"{s}\"")))
            .count()
    };
    assert_eq!(per_signal("traces"), 1, "{logs}");
    assert_eq!(per_signal("metrics"), 1, "{logs}");
    assert!(warnings[0].contains("503"), "the warning says why: {logs}");
    assert!(!logs.contains(SECRET), "{logs}");
    let closed = closed_lines(&logs);
    assert_eq!(closed.len(), 6, "{logs}");
    assert!(
        closed
            .iter()
            .all(|l| field(l, "outcome") == "client_closed"),
        "{logs}"
    );
}

#[test]
fn a_graceful_shutdown_sends_the_last_spans_and_metrics() {
    let pg = PgCluster::shared();
    let receiver = Receiver::start();
    let endpoint = receiver.endpoint();
    // Nothing would go out for ten minutes but for the shutdown.
    let (mut keyhole, _) = keyhole(
        pg,
        &[
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                &format!("{endpoint}/v1/traces"),
            ),
            (
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                &format!("{endpoint}/v1/metrics"),
            ),
            ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "600000"),
        ],
    );
    let out = clients::psql(keyhole.port(), MD5_USER, Some(MD5_PASS), "select 1");
    clients::expect_success(&out, "a query through keyhole");
    keyhole.wait_for_log(" connection closed ", 1);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        receiver.requests().is_empty(),
        "nothing is sent before the shutdown"
    );
    keyhole.signal(libc::SIGTERM);
    let status = keyhole.wait_exit(Duration::from_secs(20));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", keyhole.logs());
    let spans = receiver.spans();
    assert_eq!(roots(&spans).len(), 1, "{spans:#?}");
    assert_eq!(
        roots(&spans)[0].attributes["keyhole.outcome"],
        "client_closed"
    );
    let metrics: HashMap<_, _> = receiver.last_metrics().unwrap_or_default();
    let total = metrics
        .get("keyhole_connections_total")
        .and_then(|m| m.sum.clone())
        .and_then(|s| s.data_points.first().map(|p| p.as_f64()));
    assert_eq!(total, Some(1.0));
}

#[test]
fn http_json_is_sent_as_json() {
    let pg = PgCluster::shared();
    let receiver = Receiver::start();
    let endpoint = receiver.endpoint();
    let (keyhole, _) = keyhole(
        pg,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_METRICS_EXPORTER", "none"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let out = clients::psql(keyhole.port(), MD5_USER, Some(MD5_PASS), "select 1");
    clients::expect_success(&out, "a query through keyhole");
    wait_until(
        "a JSON traces request",
        Duration::from_secs(20),
        || !receiver.requests().is_empty(),
        || keyhole.logs(),
    );
    let requests = receiver.requests();
    assert!(
        requests.iter().all(|r| r.path == "/v1/traces"),
        "metrics are off"
    );
    let r = &requests[0];
    assert_eq!(r.headers["content-type"], "application/json");
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
    let spans = &body["resourceSpans"][0]["scopeSpans"][0]["spans"];
    let names: Vec<&str> = spans
        .as_array()
        .map(|a| a.iter().filter_map(|s| s["name"].as_str()).collect())
        .unwrap_or_default();
    assert!(names.contains(&"keyhole.connection"), "{body}");
    assert!(names.contains(&"keyhole.splice"), "{body}");
    assert_eq!(
        spans[0]["traceId"].as_str().map(str::len),
        Some(32),
        "{body}"
    );
}

#[test]
fn bad_otel_settings_stop_keyhole_at_startup_with_one_line() {
    for (var, value, says) in [
        (
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            "grpc",
            "grpc is not supported",
        ),
        ("OTEL_TRACES_SAMPLER", "sometimes", "must be always_on"),
        (
            "OTEL_EXPORTER_OTLP_HEADERS",
            "no-equals-sign",
            "not name=value",
        ),
    ] {
        let (status, logs) = Keyhole::start_expect_exit_with(
            &["postgres://127.0.0.1:5432"],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
                (var, value),
            ],
            Duration::from_secs(20),
        );
        assert_eq!(status.code(), Some(2), "{var}={value}: {logs}");
        let line = format!("keyhole: {var}: ");
        assert!(
            logs.contains(&line) && logs.contains(says),
            "{var}={value}: {logs}"
        );
        assert_eq!(logs.trim_end().lines().count(), 1, "one line: {logs}");
    }
}

#[test]
fn a_mysql_connection_is_traced_with_its_phases() {
    let db = MariaDb::shared();
    let receiver = Receiver::start();
    let endpoint = receiver.endpoint();
    let port = support::free_port();
    let port_s = port.to_string();
    let ca = db.pki().ca.to_str().expect("UTF-8 path").to_owned();
    let target = db.keyhole_target();
    let keyhole = Keyhole::spawn(
        &["--port", &port_s, "--ca-file", &ca, &target],
        &[
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                &format!("{endpoint}/v1/traces"),
            ),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
        Ready::Tcp(port),
    );
    let out = mariadb::mariadb(port, NATIVE_USER, Some(NATIVE_PASS), "select 42");
    assert_eq!(
        clients::expect_success(&out, "a MySQL query through keyhole"),
        "42"
    );
    let logs = keyhole.wait_for_log(" connection closed ", 1);
    wait_until(
        "the MySQL connection's spans",
        Duration::from_secs(20),
        || roots(&receiver.spans()).len() == 1,
        || keyhole.logs(),
    );
    let spans = receiver.spans();
    let root = roots(&spans)[0];
    let line = &closed_lines(&logs)[0];
    assert_eq!(root.attributes["db.system.name"], "mysql");
    assert_eq!(root.attributes["keyhole.outcome"], field(line, "outcome"));
    assert_eq!(
        root.attributes["keyhole.bytes.server_to_client"],
        field(line, "bytes_to_client")
    );
    let names: Vec<&str> = children(&spans, root)
        .iter()
        .map(|k| k.span.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "keyhole.dial",
            "keyhole.tls",
            "keyhole.login",
            "keyhole.splice"
        ]
    );
}
