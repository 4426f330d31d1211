//! The same requests as [`super::proto`], in OTLP's JSON encoding
//! (`http/json`): the protobuf JSON mapping with OTLP's exceptions: trace
//! and span ids as hex strings, enums as numbers. 64-bit integers are
//! strings, as the mapping writes them.

use serde_json::{json, Map, Value as Json};

use super::proto::{Data, KeyValue, Metric, Number, NumberPoint, Origin, Span, StatusCode, Value};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attributes(attrs: &[KeyValue]) -> Json {
    Json::Array(
        attrs
            .iter()
            .map(|kv| {
                let value = match &kv.value {
                    Value::Str(s) => json!({ "stringValue": s }),
                    Value::Int(i) => json!({ "intValue": i.to_string() }),
                    Value::Bool(b) => json!({ "boolValue": b }),
                };
                json!({ "key": kv.key, "value": value })
            })
            .collect(),
    )
}

fn resource_and_scope(origin: &Origin, items_key: &str, items: Vec<Json>) -> Json {
    let mut scoped = Map::new();
    scoped.insert(
        "scope".into(),
        json!({ "name": origin.scope_name, "version": origin.scope_version }),
    );
    scoped.insert(items_key.into(), Json::Array(items));
    json!({
        "resource": { "attributes": attributes(&origin.resource) },
        "scoped": Json::Object(scoped),
    })
}

/// The outer object: `{"resourceSpans": [{"resource": ..., "scopeSpans": [...]}]}`.
fn request(outer: &str, scoped_key: &str, inner: Json) -> Vec<u8> {
    let mut resource = match inner {
        Json::Object(map) => map,
        _ => Map::new(),
    };
    if let Some(scoped) = resource.remove("scoped") {
        resource.insert(scoped_key.into(), Json::Array(vec![scoped]));
    }
    let mut top = Map::new();
    top.insert(outer.into(), Json::Array(vec![Json::Object(resource)]));
    Json::Object(top).to_string().into_bytes()
}

pub fn export_trace_request(origin: &Origin, spans: &[Span]) -> Vec<u8> {
    let spans = spans
        .iter()
        .map(|s| {
            let mut span = json!({
                "traceId": hex(&s.trace_id),
                "spanId": hex(&s.span_id),
                "name": s.name,
                "kind": s.kind as u8,
                "startTimeUnixNano": s.start_unix_nano.to_string(),
                "endTimeUnixNano": s.end_unix_nano.to_string(),
                "attributes": attributes(&s.attributes),
                "flags": 0x101,
            });
            if let Some(parent) = &s.parent_span_id {
                span["parentSpanId"] = json!(hex(parent));
            }
            if s.status != StatusCode::Unset {
                span["status"] = json!({ "code": s.status as u8, "message": s.status_message });
            }
            span
        })
        .collect();
    request(
        "resourceSpans",
        "scopeSpans",
        resource_and_scope(origin, "spans", spans),
    )
}

pub fn export_metrics_request(
    origin: &Origin,
    metrics: &[Metric],
    start: u64,
    time: u64,
) -> Vec<u8> {
    let number = |p: &NumberPoint, start: Option<u64>| {
        let mut point = json!({
            "attributes": attributes(&p.attributes),
            "timeUnixNano": time.to_string(),
        });
        if let Some(start) = start {
            point["startTimeUnixNano"] = json!(start.to_string());
        }
        match p.value {
            Number::Int(i) => point["asInt"] = json!(i.to_string()),
            // JSON has no NaN or infinities: such a point goes as 0 with
            // the "no recorded value" flag.
            Number::Double(d) if d.is_finite() => point["asDouble"] = json!(d),
            Number::Double(_) => {
                point["asDouble"] = json!(0.0);
                point["flags"] = json!(1);
            }
        }
        point
    };
    let metrics = metrics
        .iter()
        .map(|m| {
            let mut metric = json!({ "name": m.name, "description": m.description, "unit": m.unit });
            match &m.data {
                Data::Gauge(points) => {
                    metric["gauge"] = json!({
                        "dataPoints": points.iter().map(|p| number(p, None)).collect::<Vec<_>>()
                    });
                }
                Data::Sum(points) => {
                    metric["sum"] = json!({
                        "dataPoints": points.iter().map(|p| number(p, Some(start))).collect::<Vec<_>>(),
                        "aggregationTemporality": 2,
                        "isMonotonic": true,
                    });
                }
                Data::Histogram(points) => {
                    let points: Vec<Json> = points
                        .iter()
                        .map(|p| {
                            json!({
                                "attributes": attributes(&p.attributes),
                                "startTimeUnixNano": start.to_string(),
                                "timeUnixNano": time.to_string(),
                                "count": p.count.to_string(),
                                "sum": if p.sum.is_finite() { p.sum } else { 0.0 },
                                "bucketCounts": p.bucket_counts.iter().map(u64::to_string).collect::<Vec<_>>(),
                                "explicitBounds": p.bounds,
                            })
                        })
                        .collect();
                    metric["histogram"] = json!({ "dataPoints": points, "aggregationTemporality": 2 });
                }
            }
            metric
        })
        .collect();
    request(
        "resourceMetrics",
        "scopeMetrics",
        resource_and_scope(origin, "metrics", metrics),
    )
}

#[cfg(test)]
mod tests {
    use super::super::proto::SpanKind;
    use super::*;

    #[test]
    fn a_span_in_json() {
        let origin = Origin {
            resource: vec![KeyValue::str("service.name", "k")],
            scope_name: "s",
            scope_version: "1",
        };
        let span = Span {
            trace_id: [0xab; 16],
            span_id: [1; 8],
            parent_span_id: Some([2; 8]),
            name: "c".into(),
            kind: SpanKind::Internal,
            start_unix_nano: 1,
            end_unix_nano: 2,
            attributes: vec![KeyValue::int("n", 5)],
            status: StatusCode::Unset,
            status_message: String::new(),
        };
        let body = export_trace_request(&origin, &[span]);
        let parsed: Json = serde_json::from_slice(&body).unwrap_or_default();
        let s = &parsed["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(s["traceId"], "abababababababababababababababab");
        assert_eq!(s["parentSpanId"], "0202020202020202");
        assert_eq!(s["kind"], 1);
        assert_eq!(s["startTimeUnixNano"], "1");
        assert_eq!(s["attributes"][0]["value"]["intValue"], "5");
        assert_eq!(
            parsed["resourceSpans"][0]["resource"]["attributes"][0]["value"]["stringValue"],
            "k"
        );
        assert_eq!(
            parsed["resourceSpans"][0]["scopeSpans"][0]["scope"]["name"],
            "s"
        );
    }
}
