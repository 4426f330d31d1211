//! Data-path benchmark: bytes through keyhole's splice loop over loopback
//! TCP, side by side with the direct path and with tokio's
//! `copy_bidirectional` (what a straightforward proxy would use), in one run,
//! reported as ratios of the direct path.
//!
//! `cargo bench --bench splice` (set SPLICE_BENCH_MIB to change the volume).
//! The end-to-end benchmark against PostgreSQL and the peer proxies is
//! `scripts/bench.sh`.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use keyhole::splice::Splice;

#[derive(Clone, Copy)]
enum Path {
    Direct,
    Splice,
    CopyBidirectional,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Splice => "keyhole splice",
            Path::CopyBidirectional => "tokio copy_bidirectional",
        }
    }
}

/// Sends `total` bytes from a client to a sink through `path`; returns the time.
async fn run(path: Path, total: usize) -> Duration {
    let sink = TcpListener::bind("127.0.0.1:0").await.expect("bind sink");
    let sink_addr = sink.local_addr().expect("addr");
    let sink_task = tokio::spawn(async move {
        let (mut s, _) = sink.accept().await.expect("accept sink");
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0usize;
        loop {
            let n = s.read(&mut buf).await.expect("read sink");
            if n == 0 {
                break;
            }
            got += n;
        }
        got
    });
    let entry = match path {
        Path::Direct => sink_addr,
        Path::Splice | Path::CopyBidirectional => {
            let proxy = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
            let addr = proxy.local_addr().expect("addr");
            tokio::spawn(async move {
                let (mut client, _) = proxy.accept().await.expect("accept proxy");
                let mut server = TcpStream::connect(sink_addr).await.expect("dial sink");
                client.set_nodelay(true).expect("nodelay");
                server.set_nodelay(true).expect("nodelay");
                match path {
                    Path::Splice => Splice::new(&mut client, &mut server).await.expect("splice"),
                    _ => {
                        tokio::io::copy_bidirectional(&mut client, &mut server)
                            .await
                            .expect("copy");
                    }
                }
            });
            addr
        }
    };
    let chunk = vec![0x5au8; 64 * 1024];
    let started = Instant::now();
    let mut client = TcpStream::connect(entry).await.expect("dial entry");
    let mut sent = 0;
    while sent < total {
        client.write_all(&chunk).await.expect("write");
        sent += chunk.len();
    }
    client.shutdown().await.expect("shutdown");
    let got = sink_task.await.expect("sink");
    assert_eq!(got, sent, "every byte arrives");
    started.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let mib: usize = std::env::var("SPLICE_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let total = mib * 1024 * 1024;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let paths = [Path::Direct, Path::Splice, Path::CopyBidirectional];
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); paths.len()];
    // Interleave the paths so drift in the machine hits all alike.
    for _ in 0..5 {
        for (i, path) in paths.iter().enumerate() {
            times[i].push(runtime.block_on(run(*path, total)));
        }
    }
    let medians: Vec<Duration> = times.into_iter().map(median).collect();
    let direct = medians[0].as_secs_f64();
    println!("{mib} MiB one way over loopback TCP, median of 5:");
    for (path, t) in paths.iter().zip(&medians) {
        let secs = t.as_secs_f64();
        println!(
            "  {:<26} {:>7.2} GiB/s   {:.2}x direct",
            path.name(),
            (total as f64 / (1u64 << 30) as f64) / secs,
            direct / secs
        );
    }
}
