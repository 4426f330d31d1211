//! Data-path benchmarks: bytes through keyhole's splice loop, next to the
//! direct path and tokio's `copy_bidirectional` (what a straightforward proxy
//! would use).
//!
//! - `copy_loop/tcp`: one way over loopback TCP, plain on both legs, so the
//!   kernel's socket work is in every figure, as it is in production.
//! - `copy_loop/duplex`: the same over in-memory `tokio::io::duplex` pairs:
//!   the copy loop's own cost, without the kernel.
//!
//! Each iteration sends `SPLICE_BENCH_MIB` MiB (64 unless set) through a
//! fresh connection and stops the clock when the sink has read every byte.
//! `cargo bench --bench splice`; the end-to-end benchmark against PostgreSQL
//! and the peer proxies is `scripts/bench.sh`.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

use keyhole::splice::Splice;

/// The writer's chunk and the sink's read size.
const CHUNK: usize = 64 * 1024;
/// Each in-memory pipe holds this much before its writer waits.
const DUPLEX_BUFFER: usize = 64 * 1024;

/// Bytes sent per iteration.
fn volume() -> usize {
    let mib = std::env::var("SPLICE_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&mib| mib > 0)
        .unwrap_or(64);
    mib * 1024 * 1024
}

#[derive(Clone, Copy)]
enum Path {
    /// The client writes straight to the sink: no proxy.
    Direct,
    /// `keyhole::splice::Splice` between the two legs.
    Keyhole,
    /// `tokio::io::copy_bidirectional` between the two legs.
    CopyBidirectional,
}

impl Path {
    const ALL: [Path; 3] = [Path::Direct, Path::Keyhole, Path::CopyBidirectional];

    fn id(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Keyhole => "keyhole",
            Path::CopyBidirectional => "copy_bidirectional",
        }
    }
}

/// The proxy's part: copies between its two legs until both directions
/// end; returns the bytes it moved from client to server.
async fn relay<C, S>(path: Path, mut client: C, mut server: S) -> u64
where
    C: AsyncRead + AsyncWrite + Unpin + keyhole::splice::Leg,
    S: AsyncRead + AsyncWrite + Unpin + keyhole::splice::Leg,
{
    match path {
        Path::Keyhole => {
            let mut splice = Splice::new(&mut client, &mut server);
            (&mut splice).await.expect("the splice ends cleanly");
            splice.transferred().client_to_server
        }
        Path::CopyBidirectional => {
            tokio::io::copy_bidirectional(&mut client, &mut server)
                .await
                .expect("copy_bidirectional ends cleanly")
                .0
        }
        Path::Direct => unreachable!("the direct path has no proxy"),
    }
}

/// Writes `total` bytes (a multiple of [`CHUNK`]), then half-closes.
async fn feed<W: AsyncWrite + Unpin>(writer: &mut W, total: usize) {
    let chunk = vec![0x5au8; CHUNK];
    let mut sent = 0;
    while sent < total {
        writer.write_all(&chunk).await.expect("the client writes");
        sent += chunk.len();
    }
    writer.shutdown().await.expect("the client half-closes");
}

/// Reads to the end; returns how much arrived.
async fn drain<R: AsyncRead + Unpin>(mut reader: R) -> usize {
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0;
    loop {
        let n = reader.read(&mut buf).await.expect("the sink reads");
        if n == 0 {
            return got;
        }
        got += n;
    }
}

/// Waits for the sink and the proxy, checks every byte went through, and
/// returns the time since `started`.
async fn finish(
    started: Instant,
    total: usize,
    sink: JoinHandle<usize>,
    proxy: Option<JoinHandle<u64>>,
) -> Duration {
    let got = sink.await.expect("the sink task completes");
    let elapsed = started.elapsed();
    assert_eq!(got, total, "every byte reaches the sink");
    if let Some(proxy) = proxy {
        let moved = proxy.await.expect("the proxy task completes");
        assert_eq!(moved, total as u64, "the proxy counts every byte");
    }
    elapsed
}

/// One connection's worth over loopback TCP.
async fn tcp_once(path: Path, total: usize) -> Duration {
    let sink = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the sink");
    let sink_addr = sink.local_addr().expect("the sink's address");
    let sink_task = tokio::spawn(async move {
        let (stream, _) = sink.accept().await.expect("the sink accepts");
        drain(stream).await
    });
    let (entry, proxy_task) = match path {
        Path::Direct => (sink_addr, None),
        Path::Keyhole | Path::CopyBidirectional => {
            let proxy = TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind the proxy");
            let addr = proxy.local_addr().expect("the proxy's address");
            let task = tokio::spawn(async move {
                let (client, _) = proxy.accept().await.expect("the proxy accepts");
                let server = TcpStream::connect(sink_addr)
                    .await
                    .expect("the proxy dials");
                client.set_nodelay(true).expect("nodelay on the client leg");
                server.set_nodelay(true).expect("nodelay on the server leg");
                relay(path, client, server).await
            });
            (addr, Some(task))
        }
    };
    let started = Instant::now();
    let mut client = TcpStream::connect(entry).await.expect("the client dials");
    feed(&mut client, total).await;
    finish(started, total, sink_task, proxy_task).await
}

/// One connection's worth over in-memory pipes.
async fn duplex_once(path: Path, total: usize) -> Duration {
    let (mut client, far_end) = tokio::io::duplex(DUPLEX_BUFFER);
    let (sink_task, proxy_task) = match path {
        Path::Direct => (tokio::spawn(drain(far_end)), None),
        Path::Keyhole | Path::CopyBidirectional => {
            let (server_leg, sink) = tokio::io::duplex(DUPLEX_BUFFER);
            let sink_task = tokio::spawn(drain(sink));
            let proxy_task = tokio::spawn(relay(path, far_end, server_leg));
            (sink_task, Some(proxy_task))
        }
    };
    let started = Instant::now();
    feed(&mut client, total).await;
    finish(started, total, sink_task, proxy_task).await
}

fn runtime() -> Runtime {
    // Two workers: the proxy and the sink each get one, as on the 2-core
    // machines this project measures on; the writer runs in `block_on`.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn copy_loop(c: &mut Criterion) {
    let rt = runtime();
    let total = volume();

    let mut tcp = c.benchmark_group("copy_loop/tcp");
    tcp.throughput(Throughput::Bytes(total as u64))
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8));
    for path in Path::ALL {
        tcp.bench_function(path.id(), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut spent = Duration::ZERO;
                    for _ in 0..iters {
                        spent += tcp_once(path, total).await;
                    }
                    spent
                })
            })
        });
    }
    tcp.finish();

    let mut mem = c.benchmark_group("copy_loop/duplex");
    mem.throughput(Throughput::Bytes(total as u64))
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for path in Path::ALL {
        mem.bench_function(path.id(), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut spent = Duration::ZERO;
                    for _ in 0..iters {
                        spent += duplex_once(path, total).await;
                    }
                    spent
                })
            })
        });
    }
    mem.finish();
}

criterion_group!(benches, copy_loop);
criterion_main!(benches);
