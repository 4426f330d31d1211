//! The background side: spans wait in a bounded queue and go out in
//! batches; metrics go out every interval; both flush once more at
//! shutdown, within a bounded time.
//!
//! Nothing here can hold up a connection: a finished connection hands its
//! spans over with `try_send` and, when the queue is full, they are
//! dropped and counted. A collector that is down or refuses costs one
//! warning per outage (and a line when it works again), never one per
//! batch; what could not be sent is dropped, not retried.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use http::Method;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::config::{Batch, Config, Protocol, Sampler, Signal};
use super::proto::{self, Data, KeyValue, Metric, Number, NumberPoint, Origin, Span};
use super::trace::unix_nanos;
use crate::http::client::{Client, Request};

/// What connections hand their spans to.
#[derive(Debug)]
pub struct Tracer {
    pub sampler: Sampler,
    queue: mpsc::Sender<Span>,
}

static QUEUE_FULL_WARNED: AtomicBool = AtomicBool::new(false);
static SPANS_EXPORTED: AtomicU64 = AtomicU64::new(0);
static SPANS_DROPPED_QUEUE_FULL: AtomicU64 = AtomicU64::new(0);
static SPANS_DROPPED_EXPORT_FAILED: AtomicU64 = AtomicU64::new(0);

impl Tracer {
    /// Queues a finished connection's spans; never waits.
    pub fn submit(&self, spans: Vec<Span>) {
        for span in spans {
            if self.queue.try_send(span).is_err() {
                SPANS_DROPPED_QUEUE_FULL.fetch_add(1, Ordering::Relaxed);
                if !QUEUE_FULL_WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!("OpenTelemetry: the span queue is full (OTEL_BSP_MAX_QUEUE_SIZE); spans are dropped and counted in keyhole_otel_spans_dropped_total, and this is said once");
                }
            }
        }
    }
}

/// The running exporter, to stop at shutdown.
#[derive(Debug)]
pub struct Handle {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Handle {
    /// Sends what is still queued and the metrics' last values, within
    /// `within` at most, then stops.
    pub async fn shutdown(self, within: Duration) {
        self.stop.cancel();
        let all = async {
            for task in self.tasks {
                let _ = task.await;
            }
        };
        if tokio::time::timeout(within, all).await.is_err() {
            tracing::warn!(
                within_secs = within.as_secs_f64(),
                "OpenTelemetry: the last export did not finish in time; what it held is lost"
            );
        }
    }
}

/// Starts the exporter's tasks on the current runtime; the returned
/// tracer is `None` when traces are not exported.
pub fn start(config: Config, env: &HashMap<String, String>) -> (Option<Tracer>, Handle) {
    let origin = Origin {
        resource: config.resource,
        scope_name: "keyhole",
        scope_version: env!("CARGO_PKG_VERSION"),
    };
    let client = std::sync::Arc::new(crate::http::client::client_for(env));
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    let mut tracer = None;
    let shown = |s: &Option<Signal>| s.as_ref().map_or("off".to_owned(), |s| s.url.to_string());
    tracing::info!(
        traces = %shown(&config.traces),
        metrics = %shown(&config.metrics),
        metric_interval_secs = config.metric_interval.as_secs_f64(),
        "OpenTelemetry: exporting over OTLP/HTTP"
    );
    if let Some(signal) = config.traces {
        let (queue, spans) = mpsc::channel(config.batch.max_queue);
        tracer = Some(Tracer {
            sampler: config.sampler,
            queue,
        });
        let sender = Sender::new(client.clone(), signal, "traces");
        tasks.push(tokio::spawn(run_traces(
            spans,
            sender,
            config.batch,
            origin.clone(),
            stop.clone(),
        )));
    }
    if let Some(signal) = config.metrics {
        let sender = Sender::new(client, signal, "metrics");
        tasks.push(tokio::spawn(run_metrics(
            sender,
            config.metric_interval,
            origin,
            stop.clone(),
        )));
    }
    (tracer, Handle { stop, tasks })
}

async fn run_traces(
    mut spans: mpsc::Receiver<Span>,
    mut sender: Sender,
    batch: Batch,
    origin: Origin,
    stop: CancellationToken,
) {
    let mut pending: Vec<Span> = Vec::new();
    let mut tick = tokio::time::interval(batch.schedule_delay);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            got = spans.recv() => match got {
                Some(span) => {
                    pending.push(span);
                    if pending.len() >= batch.max_batch {
                        send_spans(&mut sender, &origin, &mut pending).await;
                    }
                }
                None => break,
            },
            _ = tick.tick() => {
                if !pending.is_empty() {
                    send_spans(&mut sender, &origin, &mut pending).await;
                }
            }
        }
    }
    // Shutdown: every connection has ended, so the queue holds the last spans.
    while let Ok(span) = spans.try_recv() {
        pending.push(span);
    }
    while !pending.is_empty() {
        let rest = pending.split_off(pending.len().min(batch.max_batch));
        send_spans(&mut sender, &origin, &mut pending).await;
        pending = rest;
    }
}

async fn send_spans(sender: &mut Sender, origin: &Origin, pending: &mut Vec<Span>) {
    let spans = std::mem::take(pending);
    let body = match sender.signal.protocol {
        Protocol::Protobuf => proto::export_trace_request(origin, &spans),
        Protocol::Json => super::json::export_trace_request(origin, &spans),
    };
    let n = spans.len() as u64;
    if sender.send(body).await {
        SPANS_EXPORTED.fetch_add(n, Ordering::Relaxed);
    } else {
        SPANS_DROPPED_EXPORT_FAILED.fetch_add(n, Ordering::Relaxed);
    }
}

async fn run_metrics(
    mut sender: Sender,
    interval: Duration,
    origin: Origin,
    stop: CancellationToken,
) {
    // Cumulative sums count from the process's start (the registry is
    // never reset).
    let start = unix_nanos(SystemTime::now());
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => send_metrics(&mut sender, &origin, start).await,
        }
    }
    // The values at exit, so the last interval is not lost.
    send_metrics(&mut sender, &origin, start).await;
}

async fn send_metrics(sender: &mut Sender, origin: &Origin, start: u64) {
    let mut metrics = super::metrics::from_exposition(&crate::metrics::global().render());
    metrics.extend(own_metrics());
    let now = unix_nanos(SystemTime::now());
    let body = match sender.signal.protocol {
        Protocol::Protobuf => proto::export_metrics_request(origin, &metrics, start, now),
        Protocol::Json => super::json::export_metrics_request(origin, &metrics, start, now),
    };
    sender.send(body).await;
}

/// The exporter's own counters, exported with the rest (they are not on
/// `/metrics`: a build without the feature has no such thing).
fn own_metrics() -> Vec<Metric> {
    let count =
        |v: &AtomicU64| Number::Int(i64::try_from(v.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
    vec![
        Metric {
            name: "keyhole_otel_spans_exported_total".into(),
            description: "Spans the collector accepted.".into(),
            unit: String::new(),
            data: Data::Sum(vec![NumberPoint {
                attributes: Vec::new(),
                value: count(&SPANS_EXPORTED),
            }]),
        },
        Metric {
            name: "keyhole_otel_spans_dropped_total".into(),
            description:
                "Spans dropped, by reason: queue_full (OTEL_BSP_MAX_QUEUE_SIZE) or export_failed."
                    .into(),
            unit: String::new(),
            data: Data::Sum(vec![
                NumberPoint {
                    attributes: vec![KeyValue::str("reason", "queue_full")],
                    value: count(&SPANS_DROPPED_QUEUE_FULL),
                },
                NumberPoint {
                    attributes: vec![KeyValue::str("reason", "export_failed")],
                    value: count(&SPANS_DROPPED_EXPORT_FAILED),
                },
            ]),
        },
    ]
}

/// One signal's requests, and whether its collector is failing now (so a
/// failure is logged once per outage).
struct Sender {
    client: std::sync::Arc<Client>,
    signal: Signal,
    what: &'static str,
    failing: bool,
    partial_warned: bool,
}

impl Sender {
    fn new(client: std::sync::Arc<Client>, signal: Signal, what: &'static str) -> Sender {
        Sender {
            client,
            signal,
            what,
            failing: false,
            partial_warned: false,
        }
    }

    /// POSTs one request; whether the collector took it.
    async fn send(&mut self, body: Vec<u8>) -> bool {
        let mut request = Request::new(Method::POST, self.signal.url.clone())
            .body(self.signal.protocol.content_type(), body);
        for (name, value) in &self.signal.headers {
            request = request.header_owned(name.clone(), value.clone());
        }
        let timeout = self.signal.timeout;
        // The errors name the URL without its query, never a header value.
        let result = match tokio::time::timeout(timeout, self.client.send(request)).await {
            Err(_) => Err(format!(
                "no answer within {} ms (OTEL_EXPORTER_OTLP_TIMEOUT)",
                timeout.as_millis()
            )),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(reply)) if reply.status.is_success() => Ok(reply),
            Ok(Ok(reply)) => Err(format!(
                "{}: the collector answered HTTP {}",
                self.signal.url, reply.status
            )),
        };
        match result {
            Ok(reply) => {
                if self.failing {
                    self.failing = false;
                    tracing::info!(signal = self.what, url = %self.signal.url, "OpenTelemetry: the collector takes exports again");
                }
                // A partial success is protobuf only; a JSON reply is not read.
                if self.signal.protocol == Protocol::Protobuf && !self.partial_warned {
                    if let Some((rejected, message)) = proto::partial_success(&reply.body) {
                        self.partial_warned = true;
                        tracing::warn!(signal = self.what, url = %self.signal.url, rejected, message = %message, "OpenTelemetry: the collector rejected part of an export (said once)");
                    }
                }
                true
            }
            Err(error) => {
                if !self.failing {
                    self.failing = true;
                    tracing::warn!(signal = self.what, error = %error, "OpenTelemetry: export failed; connections are not affected, what cannot be sent is dropped, and nothing more is logged until an export succeeds");
                }
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::proto::{SpanKind, StatusCode};
    use super::*;

    fn span() -> Span {
        Span {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent_span_id: None,
            name: "s".into(),
            kind: SpanKind::Internal,
            start_unix_nano: 1,
            end_unix_nano: 2,
            attributes: Vec::new(),
            status: StatusCode::Unset,
            status_message: String::new(),
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_waiting() {
        let (queue, mut spans) = mpsc::channel(2);
        let tracer = Tracer {
            sampler: Sampler::AlwaysOn,
            queue,
        };
        let before = SPANS_DROPPED_QUEUE_FULL.load(Ordering::Relaxed);
        tracer.submit(vec![span(), span(), span(), span(), span()]);
        assert_eq!(
            SPANS_DROPPED_QUEUE_FULL.load(Ordering::Relaxed) - before,
            3,
            "two fit, three are dropped"
        );
        assert!(spans.try_recv().is_ok() && spans.try_recv().is_ok());
        assert!(spans.try_recv().is_err());
        let dropped = own_metrics()
            .into_iter()
            .find(|m| m.name == "keyhole_otel_spans_dropped_total");
        assert!(
            matches!(dropped.map(|m| m.data), Some(Data::Sum(points)) if points.len() == 2),
            "both reasons are exported"
        );
    }
}
