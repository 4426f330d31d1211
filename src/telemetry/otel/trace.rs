//! Each connection's trace: a root span from accept to close, with a child
//! span per phase (backend dial, TLS handshake, login, splice).
//!
//! The connection task carries a [`Recorder`] in a task-local, so the
//! phases are marked where keyhole already measures them (the target's
//! connect and handshake timings, the start of the relay) without
//! threading anything through the protocol drivers. Outside a recorded
//! connection (not sampled, no exporter, a readiness probe) a mark finds no
//! recorder and does nothing.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::config::Sampler;
use super::proto::{KeyValue, Span, SpanKind, StatusCode};

tokio::task_local! {
    /// `None` in a connection that is not recorded (not sampled, or no
    /// exporter): one scope type for both, so wrapping the session costs
    /// no second copy of its future.
    static CONNECTION: Option<Arc<Mutex<Recorder>>>;
}

/// A phase keyhole marks as it happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Dial,
    Tls,
    Splice,
}

/// What a connection's task records while it runs.
#[derive(Debug)]
pub struct Recorder {
    /// (phase, start, end); a splice's end is the connection's.
    marks: Vec<(Phase, Instant, Instant, Option<&'static str>)>,
}

/// The parts of the root span known at accept.
#[derive(Debug)]
pub struct Connection {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    started: Instant,
    started_unix: u64,
    attributes: Vec<KeyValue>,
    recorder: Arc<Mutex<Recorder>>,
}

/// Marks `phase`, which took `took` and ended now, on the current
/// connection's trace (if it has one).
pub fn mark(phase: Phase, took: Duration, detail: Option<&'static str>) {
    let _ = CONNECTION.try_with(|r| {
        let Some(r) = r else {
            return;
        };
        let end = Instant::now();
        let start = end.checked_sub(took).unwrap_or(end);
        r.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .marks
            .push((phase, start, end, detail));
    });
}

impl Connection {
    /// A sampled connection's trace, or `None`.
    pub fn start(
        sampler: Sampler,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Option<Connection> {
        let trace_id = random_trace_id();
        let keep = match sampler {
            Sampler::AlwaysOn => true,
            Sampler::AlwaysOff => false,
            Sampler::Ratio(ratio) => keep_by_ratio(&trace_id, ratio),
        };
        if !keep {
            return None;
        }
        Some(Connection {
            trace_id,
            span_id: random_span_id(),
            started: Instant::now(),
            started_unix: unix_nanos(SystemTime::now()),
            attributes: attributes(),
            recorder: Arc::new(Mutex::new(Recorder { marks: Vec::new() })),
        })
    }

    /// Runs `serve` with `trace` (if any) as the task's current one.
    pub fn scope<F: Future>(
        trace: Option<&Connection>,
        serve: F,
    ) -> impl Future<Output = F::Output> {
        CONNECTION.scope(trace.map(|t| t.recorder.clone()), serve)
    }

    /// The finished spans: the root with `outcome` and the byte counts,
    /// then the phases.
    pub fn finish(
        self,
        outcome: &str,
        error: Option<&str>,
        bytes: (u64, u64),
        extra: Vec<KeyValue>,
    ) -> Vec<Span> {
        let end = Instant::now();
        let at = |t: Instant| {
            self.started_unix.saturating_add(
                u64::try_from(t.saturating_duration_since(self.started).as_nanos())
                    .unwrap_or(u64::MAX),
            )
        };
        let marks = std::mem::take(
            &mut self
                .recorder
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .marks,
        );
        let mut root_attrs = self.attributes;
        root_attrs.extend(extra);
        root_attrs.push(KeyValue::str("keyhole.outcome", outcome));
        root_attrs.push(KeyValue::int(
            "keyhole.bytes.client_to_server",
            saturating_i64(bytes.0),
        ));
        root_attrs.push(KeyValue::int(
            "keyhole.bytes.server_to_client",
            saturating_i64(bytes.1),
        ));
        let (status, message) = match error {
            Some(e) => {
                root_attrs.push(KeyValue::str("error.type", outcome));
                (StatusCode::Error, e.to_owned())
            }
            None => (StatusCode::Unset, String::new()),
        };
        let child = |name: &str, start: Instant, stop: Instant, attributes: Vec<KeyValue>| Span {
            trace_id: self.trace_id,
            span_id: random_span_id(),
            parent_span_id: Some(self.span_id),
            name: name.to_owned(),
            kind: SpanKind::Internal,
            start_unix_nano: at(start),
            end_unix_nano: at(stop),
            attributes,
            status: StatusCode::Unset,
            status_message: String::new(),
        };
        let mut spans = vec![Span {
            trace_id: self.trace_id,
            span_id: self.span_id,
            parent_span_id: None,
            name: "keyhole.connection".to_owned(),
            kind: SpanKind::Server,
            start_unix_nano: self.started_unix,
            end_unix_nano: at(end),
            attributes: root_attrs,
            status,
            status_message: message,
        }];
        // Login: from the server being reachable (dial, then TLS when
        // there is one) to the relay's start. A pooled connection reused
        // has no dial, and no login of its own.
        let mut reached: Option<Instant> = None;
        let mut splice_started: Option<Instant> = None;
        for (phase, start, stop, detail) in &marks {
            match phase {
                Phase::Dial => {
                    spans.push(child("keyhole.dial", *start, *stop, Vec::new()));
                    reached = Some(*stop);
                }
                Phase::Tls => {
                    let attrs = detail
                        .map(|kind| vec![KeyValue::str("keyhole.tls.handshake", kind)])
                        .unwrap_or_default();
                    spans.push(child("keyhole.tls", *start, *stop, attrs));
                    reached = Some(*stop);
                }
                Phase::Splice => splice_started = splice_started.or(Some(*start)),
            }
        }
        let login_end = splice_started.unwrap_or(end);
        if let Some(from) = reached.filter(|r| *r <= login_end) {
            let mut attrs = Vec::new();
            if splice_started.is_none() {
                // The session ended during the login.
                attrs.push(KeyValue::str("keyhole.outcome", outcome));
            }
            spans.push(child("keyhole.login", from, login_end, attrs));
        }
        if let Some(from) = splice_started {
            spans.push(child(
                "keyhole.splice",
                from,
                end,
                vec![
                    KeyValue::int("keyhole.bytes.client_to_server", saturating_i64(bytes.0)),
                    KeyValue::int("keyhole.bytes.server_to_client", saturating_i64(bytes.1)),
                ],
            ));
        }
        spans
    }
}

fn saturating_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The spec's TraceIdRatioBased decision: the id's last 8 bytes, as a
/// big-endian number, below `ratio` of 2^64.
fn keep_by_ratio(trace_id: &[u8; 16], ratio: f64) -> bool {
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id[8..]);
    let n = u64::from_be_bytes(low);
    if ratio >= 1.0 {
        return true;
    }
    (n as f64) < ratio * (u64::MAX as f64)
}

/// Ids: SplitMix64 over a counter seeded once from the system's random
/// source. They need to be unique and evenly spread (the ratio sampler
/// reads them), not secret; a counter step costs one atomic add.
fn next_random() -> u64 {
    static STATE: OnceLock<AtomicU64> = OnceLock::new();
    let state = STATE.get_or_init(|| {
        let mut seed = [0u8; 8];
        let seeded = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed);
        if seeded.is_err() {
            // No system randomness: the clock still makes ids differ
            // between processes.
            seed = unix_nanos(SystemTime::now()).to_le_bytes();
        }
        AtomicU64::new(u64::from_le_bytes(seed))
    });
    let mut z = state
        .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn random_trace_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&next_random().to_be_bytes());
    id[8..].copy_from_slice(&next_random().to_be_bytes());
    id
}

fn random_span_id() -> [u8; 8] {
    loop {
        let id = next_random().to_be_bytes();
        // All zeros is the invalid span id.
        if id != [0; 8] {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_sampling_follows_the_low_bytes() {
        let mut id = [0u8; 16];
        assert!(keep_by_ratio(&id, 0.5));
        id[8] = 0xff;
        assert!(!keep_by_ratio(&id, 0.5));
        assert!(keep_by_ratio(&id, 1.0));
        assert!(!keep_by_ratio(&[0; 16], 0.0));
        let kept = (0..10_000)
            .filter(|_| keep_by_ratio(&random_trace_id(), 0.25))
            .count();
        assert!((2000..3000).contains(&kept), "{kept}");
    }

    #[tokio::test]
    async fn phases_become_child_spans() {
        let Some(conn) = Connection::start(Sampler::AlwaysOn, || {
            vec![KeyValue::str("keyhole.target", "t")]
        }) else {
            panic!("always_on keeps every trace");
        };
        // Outside the scope: no recorder, nothing happens.
        mark(Phase::Dial, Duration::from_millis(1), None);
        Connection::scope(Some(&conn), async {
            mark(Phase::Dial, Duration::from_millis(2), None);
            mark(Phase::Tls, Duration::from_millis(1), Some("full"));
            tokio::time::sleep(Duration::from_millis(5)).await;
            mark(Phase::Splice, Duration::ZERO, None);
        })
        .await;
        let spans = conn.finish("ok", None, (10, 20), Vec::new());
        let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "keyhole.connection",
                "keyhole.dial",
                "keyhole.tls",
                "keyhole.login",
                "keyhole.splice"
            ]
        );
        let root = &spans[0];
        assert_eq!(root.status, StatusCode::Unset);
        assert!(root
            .attributes
            .contains(&KeyValue::int("keyhole.bytes.server_to_client", 20)));
        for child in &spans[1..] {
            assert_eq!(child.trace_id, root.trace_id);
            assert_eq!(child.parent_span_id, Some(root.span_id));
            assert!(child.start_unix_nano >= root.start_unix_nano);
            assert!(child.end_unix_nano <= root.end_unix_nano);
            assert!(child.start_unix_nano <= child.end_unix_nano);
        }
        assert!(Connection::start(Sampler::AlwaysOff, Vec::new).is_none());
    }

    #[test]
    fn an_error_sets_the_status_and_error_type() {
        let Some(conn) = Connection::start(Sampler::AlwaysOn, Vec::new) else {
            panic!("always_on");
        };
        let spans = conn.finish(
            "upstream_refused",
            Some("connection refused"),
            (0, 0),
            Vec::new(),
        );
        assert_eq!(spans.len(), 1, "no phase was reached");
        assert_eq!(spans[0].status, StatusCode::Error);
        assert_eq!(spans[0].status_message, "connection refused");
        assert!(spans[0]
            .attributes
            .contains(&KeyValue::str("error.type", "upstream_refused")));
    }
}
