//! OTLP's protobuf messages, encoded by hand: ExportTraceServiceRequest and
//! ExportMetricsServiceRequest (opentelemetry-proto, `collector/*/v1`).
//!
//! The wire format needs little: varints, fixed 32/64-bit numbers, and
//! length-delimited fields for strings, bytes and nested messages. Field
//! numbers are OTLP's; a field at its default (zero, empty) is left out, as
//! proto3 encoders do. Only what keyhole sends is here: spans with
//! attributes and a status, and gauges, monotonic cumulative sums and
//! explicit-bucket histograms.

/// Builds one message's bytes.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

impl Writer {
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }

    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
    }

    fn key(&mut self, field: u32, wire: u8) {
        self.varint((u64::from(field) << 3) | u64::from(wire));
    }

    /// An unsigned (or enum, or bool) field; left out at 0.
    pub fn uint(&mut self, field: u32, v: u64) {
        if v != 0 {
            self.key(field, VARINT);
            self.varint(v);
        }
    }

    pub fn fixed64(&mut self, field: u32, v: u64) {
        if v != 0 {
            self.key(field, FIXED64);
            self.buf.extend_from_slice(&v.to_le_bytes());
        }
    }

    pub fn fixed32(&mut self, field: u32, v: u32) {
        if v != 0 {
            self.key(field, FIXED32);
            self.buf.extend_from_slice(&v.to_le_bytes());
        }
    }

    /// A `double` that is written even at 0 (a member of a `oneof`, or an
    /// `optional` field, where presence means something).
    pub fn double_always(&mut self, field: u32, v: f64) {
        self.key(field, FIXED64);
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// An `sfixed64` member of a `oneof`: written even at 0.
    pub fn sfixed64_always(&mut self, field: u32, v: i64) {
        self.key(field, FIXED64);
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn bytes(&mut self, field: u32, v: &[u8]) {
        if !v.is_empty() {
            self.key(field, LEN);
            self.varint(v.len() as u64);
            self.buf.extend_from_slice(v);
        }
    }

    pub fn string(&mut self, field: u32, v: &str) {
        self.bytes(field, v.as_bytes());
    }

    /// A nested message, written even when empty (its presence can matter,
    /// as for a `oneof` member).
    pub fn message(&mut self, field: u32, fill: impl FnOnce(&mut Writer)) {
        let mut inner = Writer::default();
        fill(&mut inner);
        self.key(field, LEN);
        self.varint(inner.buf.len() as u64);
        self.buf.extend_from_slice(&inner.buf);
    }

    /// A packed `repeated fixed64` (the encoding proto3 uses by default).
    pub fn packed_fixed64(&mut self, field: u32, values: impl ExactSizeIterator<Item = u64>) {
        let n = values.len();
        if n == 0 {
            return;
        }
        self.key(field, LEN);
        self.varint(n as u64 * 8);
        for v in values {
            self.buf.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// An attribute value (`AnyValue`), of the kinds keyhole uses.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
}

/// One attribute (`KeyValue`).
#[derive(Debug, Clone, PartialEq)]
pub struct KeyValue {
    pub key: String,
    pub value: Value,
}

impl KeyValue {
    pub fn str(key: &str, value: impl Into<String>) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: Value::Str(value.into()),
        }
    }

    pub fn int(key: &str, value: i64) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: Value::Int(value),
        }
    }
}

fn key_values(w: &mut Writer, field: u32, attrs: &[KeyValue]) {
    for kv in attrs {
        w.message(field, |w| {
            w.string(1, &kv.key);
            // AnyValue's members are a oneof: written even at their default.
            w.message(2, |w| match &kv.value {
                Value::Str(s) => {
                    w.key(1, LEN);
                    w.varint(s.len() as u64);
                    w.buf.extend_from_slice(s.as_bytes());
                }
                Value::Bool(b) => {
                    w.key(2, VARINT);
                    w.varint(u64::from(*b));
                }
                Value::Int(i) => {
                    w.key(3, VARINT);
                    w.varint(*i as u64);
                }
            });
        });
    }
}

/// `Span.SpanKind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    Internal = 1,
    Server = 2,
}

/// `Status.StatusCode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusCode {
    Unset = 0,
    Error = 2,
}

/// One finished span.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    pub name: String,
    pub kind: SpanKind,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    pub attributes: Vec<KeyValue>,
    pub status: StatusCode,
    pub status_message: String,
}

/// Who sends: the resource's attributes and the instrumentation scope.
#[derive(Debug, Clone, PartialEq)]
pub struct Origin {
    pub resource: Vec<KeyValue>,
    pub scope_name: &'static str,
    pub scope_version: &'static str,
}

fn resource_and_scope<T>(
    w: &mut Writer,
    origin: &Origin,
    items: &[T],
    scope_field_items: u32,
    item: impl Fn(&mut Writer, &T),
) {
    // ResourceSpans / ResourceMetrics: resource = 1, scope_* = 2.
    w.message(1, |w| {
        w.message(1, |w| key_values(w, 1, &origin.resource));
        w.message(2, |w| {
            w.message(1, |w| {
                w.string(1, origin.scope_name);
                w.string(2, origin.scope_version);
            });
            for it in items {
                w.message(scope_field_items, |w| item(w, it));
            }
        });
    });
}

/// An `ExportTraceServiceRequest` holding `spans`.
pub fn export_trace_request(origin: &Origin, spans: &[Span]) -> Vec<u8> {
    let mut w = Writer::default();
    resource_and_scope(&mut w, origin, spans, 2, encode_span);
    w.finish()
}

fn encode_span(w: &mut Writer, s: &Span) {
    w.bytes(1, &s.trace_id);
    w.bytes(2, &s.span_id);
    if let Some(parent) = &s.parent_span_id {
        w.bytes(4, parent);
    }
    w.string(5, &s.name);
    w.uint(6, s.kind as u64);
    w.fixed64(7, s.start_unix_nano);
    w.fixed64(8, s.end_unix_nano);
    key_values(w, 9, &s.attributes);
    if s.status != StatusCode::Unset || !s.status_message.is_empty() {
        w.message(15, |w| {
            w.string(2, &s.status_message);
            w.uint(3, s.status as u64);
        });
    }
    // flags: the sampled bit of the W3C trace flags (every exported span
    // was sampled), and "the parent is not remote" known (0x100).
    w.fixed32(16, 0x101);
}

/// A data point's number.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Number {
    Int(i64),
    Double(f64),
}

#[derive(Debug, Clone, PartialEq)]
pub struct NumberPoint {
    pub attributes: Vec<KeyValue>,
    pub value: Number,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HistogramPoint {
    pub attributes: Vec<KeyValue>,
    pub count: u64,
    pub sum: f64,
    /// Per bucket, not cumulative: one more than `bounds`.
    pub bucket_counts: Vec<u64>,
    pub bounds: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    Gauge(Vec<NumberPoint>),
    /// Monotonic and cumulative: a Prometheus counter.
    Sum(Vec<NumberPoint>),
    /// Cumulative, explicit buckets.
    Histogram(Vec<HistogramPoint>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    pub name: String,
    pub description: String,
    pub unit: String,
    pub data: Data,
}

const CUMULATIVE: u64 = 2;

/// An `ExportMetricsServiceRequest` holding `metrics`, every point taken
/// at `time` and (for sums and histograms) counted since `start`.
pub fn export_metrics_request(
    origin: &Origin,
    metrics: &[Metric],
    start: u64,
    time: u64,
) -> Vec<u8> {
    let mut w = Writer::default();
    resource_and_scope(&mut w, origin, metrics, 2, |w, m| {
        w.string(1, &m.name);
        w.string(2, &m.description);
        w.string(3, &m.unit);
        let number = |w: &mut Writer, p: &NumberPoint, start: u64| {
            w.fixed64(2, start);
            w.fixed64(3, time);
            match p.value {
                Number::Double(d) => w.double_always(4, d),
                Number::Int(i) => w.sfixed64_always(6, i),
            }
            key_values(w, 7, &p.attributes);
        };
        match &m.data {
            Data::Gauge(points) => w.message(5, |w| {
                for p in points {
                    w.message(1, |w| number(w, p, 0));
                }
            }),
            Data::Sum(points) => w.message(7, |w| {
                for p in points {
                    w.message(1, |w| number(w, p, start));
                }
                w.uint(2, CUMULATIVE);
                w.uint(3, 1);
            }),
            Data::Histogram(points) => w.message(9, |w| {
                for p in points {
                    w.message(1, |w| {
                        w.fixed64(2, start);
                        w.fixed64(3, time);
                        w.fixed64(4, p.count);
                        // `optional double sum`: present even at 0.
                        w.double_always(5, p.sum);
                        w.packed_fixed64(6, p.bucket_counts.iter().copied());
                        w.packed_fixed64(7, p.bounds.iter().map(|b| b.to_bits()));
                        key_values(w, 9, &p.attributes);
                    });
                }
                w.uint(2, CUMULATIVE);
            }),
        }
    });
    w.finish()
}

/// `ExportTraceServiceResponse` / `ExportMetricsServiceResponse`: the
/// `partial_success` field (1), its count of rejected items (1) and error
/// message (2). Returns `None` when the reply holds no partial success.
/// Only what a warning needs is read; anything malformed reads as nothing.
pub fn partial_success(reply: &[u8]) -> Option<(i64, String)> {
    let inner = find_len_field(reply, 1)?;
    let mut rejected = 0i64;
    let mut message = String::new();
    let mut r = Reader { buf: inner };
    while let Some((field, wire)) = r.key() {
        match (field, wire) {
            (1, VARINT) => rejected = r.varint()? as i64,
            (2, LEN) => message = String::from_utf8_lossy(r.len_delimited()?).into_owned(),
            _ => r.skip(wire)?,
        }
    }
    (rejected != 0 || !message.is_empty()).then_some((rejected, message))
}

fn find_len_field(buf: &[u8], want: u32) -> Option<&[u8]> {
    let mut r = Reader { buf };
    while let Some((field, wire)) = r.key() {
        if field == want && wire == LEN {
            return r.len_delimited();
        }
        r.skip(wire)?;
    }
    None
}

/// Just enough of a reader to find a field in a collector's reply.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.buf.split_first()?;
            self.buf = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Some(v);
            }
        }
        None
    }

    fn key(&mut self) -> Option<(u32, u8)> {
        if self.buf.is_empty() {
            return None;
        }
        let k = self.varint()?;
        Some(((k >> 3) as u32, (k & 7) as u8))
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Some(head)
    }

    fn len_delimited(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.varint()?).ok()?;
        self.take(n)
    }

    fn skip(&mut self, wire: u8) -> Option<()> {
        match wire {
            VARINT => self.varint().map(drop),
            FIXED64 => self.take(8).map(drop),
            LEN => self.len_delimited().map(drop),
            FIXED32 => self.take(4).map(drop),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_defaults() {
        let mut w = Writer::default();
        w.uint(1, 0); // left out
        w.uint(1, 150);
        w.uint(2, u64::MAX); // an int64 -1: ten bytes
        w.string(3, "");
        w.string(3, "hi");
        assert_eq!(
            w.finish(),
            [
                0x08, 0x96, 0x01, // field 1 varint 150
                0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, // -1
                0x1a, 0x02, b'h', b'i',
            ]
        );
    }

    #[test]
    fn a_small_span_request_byte_for_byte() {
        let origin = Origin {
            resource: vec![KeyValue::str("service.name", "k")],
            scope_name: "s",
            scope_version: "1",
        };
        let span = Span {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent_span_id: None,
            name: "c".into(),
            kind: SpanKind::Server,
            start_unix_nano: 1,
            end_unix_nano: 2,
            attributes: vec![KeyValue::int("n", 5)],
            status: StatusCode::Error,
            status_message: "x".into(),
        };
        let got = export_trace_request(&origin, &[span]);
        let mut expected = vec![
            0x0a, 108, // resource_spans, 108 bytes
            0x0a, 21, // resource, 21 bytes
            0x0a, 19, // attributes: KeyValue, 19 bytes
            0x0a, 12, // key
        ];
        expected.extend_from_slice(b"service.name");
        expected.extend_from_slice(&[0x12, 3, 0x0a, 1, b'k']); // value: AnyValue{string "k"}
        expected.extend_from_slice(&[
            0x12, 83, // scope_spans, 83 bytes
            0x0a, 6, 0x0a, 1, b's', 0x12, 1, b'1', // scope {name "s", version "1"}
            0x12, 73, // spans, 73 bytes
            0x0a, 16, // trace_id
        ]);
        expected.extend_from_slice(&[1; 16]);
        expected.extend_from_slice(&[0x12, 8]); // span_id
        expected.extend_from_slice(&[2; 8]);
        expected.extend_from_slice(&[0x2a, 1, b'c']); // name
        expected.extend_from_slice(&[0x30, 2]); // kind SERVER
        expected.extend_from_slice(&[0x39, 1, 0, 0, 0, 0, 0, 0, 0]); // start (fixed64)
        expected.extend_from_slice(&[0x41, 2, 0, 0, 0, 0, 0, 0, 0]); // end
        expected.extend_from_slice(&[0x4a, 7, 0x0a, 1, b'n', 0x12, 2, 0x18, 5]); // n = int 5
        expected.extend_from_slice(&[0x7a, 5, 0x12, 1, b'x', 0x18, 2]); // status {msg "x", ERROR}
        expected.extend_from_slice(&[0x85, 0x01, 0x01, 0x01, 0, 0]); // flags (fixed32 0x101)
        assert_eq!(got, expected);
    }

    #[test]
    fn a_sum_and_a_histogram_byte_for_byte() {
        let origin = Origin {
            resource: vec![],
            scope_name: "",
            scope_version: "",
        };
        let metrics = [
            Metric {
                name: "c".into(),
                description: String::new(),
                unit: String::new(),
                data: Data::Sum(vec![NumberPoint {
                    attributes: vec![],
                    value: Number::Int(0),
                }]),
            },
            Metric {
                name: "h".into(),
                description: String::new(),
                unit: String::new(),
                data: Data::Histogram(vec![HistogramPoint {
                    attributes: vec![],
                    count: 1,
                    sum: 0.5,
                    bucket_counts: vec![1, 0],
                    bounds: vec![1.0],
                }]),
            },
        ];
        let got = export_metrics_request(&origin, &metrics, 7, 9);
        let sum_point: Vec<u8> = [
            &[0x11u8, 7, 0, 0, 0, 0, 0, 0, 0][..], // start
            &[0x19, 9, 0, 0, 0, 0, 0, 0, 0],       // time
            &[0x31, 0, 0, 0, 0, 0, 0, 0, 0],       // as_int 0, present
        ]
        .concat();
        let mut sum_metric = vec![0x0a, 1, b'c', 0x3a, 33, 0x0a, 27];
        sum_metric.extend_from_slice(&sum_point);
        sum_metric.extend_from_slice(&[0x10, 2, 0x18, 1]); // CUMULATIVE, monotonic
        let mut hist_point: Vec<u8> = [
            &[0x11u8, 7, 0, 0, 0, 0, 0, 0, 0][..],
            &[0x19, 9, 0, 0, 0, 0, 0, 0, 0],
            &[0x21, 1, 0, 0, 0, 0, 0, 0, 0], // count
        ]
        .concat();
        hist_point.push(0x29);
        hist_point.extend_from_slice(&0.5f64.to_le_bytes()); // sum
        hist_point.extend_from_slice(&[0x32, 16, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        hist_point.extend_from_slice(&[0x3a, 8]);
        hist_point.extend_from_slice(&1.0f64.to_le_bytes());
        let mut hist_metric = vec![0x0a, 1, b'h', 0x4a, 68, 0x0a, 64];
        hist_metric.extend_from_slice(&hist_point);
        hist_metric.extend_from_slice(&[0x10, 2]);
        let scope_metrics_len = 2 + 2 + sum_metric.len() + 2 + hist_metric.len();
        let mut expected = vec![0x0a, (2 + 2 + scope_metrics_len) as u8, 0x0a, 0, 0x12];
        expected.push(scope_metrics_len as u8);
        expected.extend_from_slice(&[0x0a, 0]); // empty scope
        expected.extend_from_slice(&[0x12, sum_metric.len() as u8]);
        expected.extend_from_slice(&sum_metric);
        expected.extend_from_slice(&[0x12, hist_metric.len() as u8]);
        expected.extend_from_slice(&hist_metric);
        assert_eq!(got, expected);
    }

    #[test]
    fn a_partial_success_is_read() {
        // {partial_success: {rejected: 3, error_message: "no"}}
        let reply = [0x0a, 6, 0x08, 3, 0x12, 2, b'n', b'o'];
        assert_eq!(partial_success(&reply), Some((3, "no".to_owned())));
        assert_eq!(partial_success(&[]), None);
        assert_eq!(partial_success(&[0x0a, 0]), None);
        assert_eq!(partial_success(&[0x0a, 9, 1]), None, "truncated");
    }
}
