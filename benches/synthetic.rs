//! A synthetic TLS-only PostgreSQL upstream and its load clients, for scripts/bench.sh:
//! the proxy's own ceiling without a database in the way, and many idle connections
//! held cheaply.
//!
//! Built with `cargo build --release --example synthetic` (an example, so that it can
//! live next to the other benchmarks without a harness of its own).
//!
//! ```text
//! synthetic upstream --listen ADDR --cert PEM --key PEM
//! synthetic stream   --connect ADDR --bytes N [--tls --ca PEM --server-name NAME]
//! synthetic idle     --connect ADDR --count N [--concurrency C] [--tls --ca PEM --server-name NAME]
//! synthetic soak     --connect ADDR --count N [--concurrency C] --duration SECS --trickle SECS
//!                    --churn PER_SEC [--tls --ca PEM --server-name NAME]
//! ```
//!
//! `upstream` speaks just enough of the PostgreSQL protocol, over TLS only: SSLRequest
//! ('S'), then any StartupMessage is logged in at once (AuthenticationOk, a few
//! ParameterStatus, BackendKeyData, ReadyForQuery). A simple Query `stream N` is
//! answered with CopyOutResponse and N bytes of CopyData (16 KiB messages, built once),
//! as fast as the connection takes them, then CopyDone, CommandComplete and
//! ReadyForQuery. A `select ...` gets one row; anything else (SET, DISCARD ALL...) an
//! empty CommandComplete. Terminate or end of stream closes the connection.
//!
//! `stream` logs in (no password: the upstream trusts everyone; a proxy in between
//! may ask for one, which is not supported), sends `stream N`, reads everything and
//! prints one line: `bytes B seconds S` (the time from sending the query to
//! ReadyForQuery).
//!
//! `idle` opens N connections (at most C opening at once), logs each in, runs
//! `select 1` on each, prints `ready N`, and holds them until its standard input
//! closes or it gets SIGTERM or SIGINT. If any connection fails it says how many were
//! up and why, and exits 1.
//!
//! `soak` (scripts/soak.sh) opens N connections as `idle` does and prints `ready N
//! seconds S`, then for SECS seconds: each held connection runs `select 1` once every
//! --trickle seconds (their first queries spread evenly over the first period, so the
//! queries trickle in instead of coming all at once), and --churn new connections a
//! second are opened, logged in, run one query and are closed with Terminate. Every
//! 10 s it prints `elapsed S held H queries Q churn C errors E`. A failed query on a
//! held connection is reported on stderr and counted, and the connection is opened
//! again (each failed attempt counted too, one a second); so is a failed churn
//! connection. At the end it prints `done elapsed ...` with the totals, closes the
//! held connections with Terminate, and exits 1 if there was any error.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// The protocol codes in the first message of a connection.
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;
const PROTOCOL_3: u32 = 3 << 16;

/// Payload bytes in one CopyData message, and messages in the block written at once.
const COPY_PAYLOAD: usize = 16 * 1024;
const BLOCK_MESSAGES: usize = 4;
/// The longest message either side accepts (the upstream never expects big ones).
const MAX_MESSAGE: usize = 1 << 20;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Result<T, E = BoxError> = std::result::Result<T, E>;

#[derive(Parser)]
#[command(about = "Synthetic TLS PostgreSQL upstream and load clients for scripts/bench.sh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the synthetic PostgreSQL upstream (TLS only).
    Upstream {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
    /// Log in, ask for N bytes of COPY data, read them, print `bytes B seconds S`.
    Stream {
        #[command(flatten)]
        conn: ConnectArgs,
        #[arg(long)]
        bytes: u64,
    },
    /// Open N logged-in connections, print `ready N`, hold them until stdin closes.
    Idle {
        #[command(flatten)]
        conn: ConnectArgs,
        #[arg(long)]
        count: usize,
        /// How many connections may be opening at the same time.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// Hold N connections for SECS seconds with a trickle of queries on each and a churn
    /// of short connections beside them; a progress line every 10 s.
    Soak {
        #[command(flatten)]
        conn: ConnectArgs,
        #[arg(long)]
        count: usize,
        /// How many connections may be opening at the same time (at the start).
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Seconds to hold them, counted from when all are open.
        #[arg(long)]
        duration: u64,
        /// Each held connection runs `select 1` once every this many seconds.
        #[arg(long)]
        trickle: f64,
        /// New connections a second, each logged in, one query, closed (0: none).
        #[arg(long)]
        churn: f64,
    },
}

#[derive(Args, Clone)]
struct ConnectArgs {
    #[arg(long)]
    connect: SocketAddr,
    /// Speak TLS to the server (the direct path); without it, plain TCP (a proxy).
    #[arg(long, requires = "ca")]
    tls: bool,
    /// The CA that signed the server's certificate.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// The name the server's certificate must carry.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    #[arg(long, default_value = "bench")]
    user: String,
    #[arg(long, default_value = "bench")]
    database: String,
}

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let outcome = runtime.block_on(async move {
        match cli.command {
            Command::Upstream { listen, cert, key } => upstream(listen, &cert, &key).await,
            Command::Stream { conn, bytes } => stream(conn, bytes).await,
            Command::Idle {
                conn,
                count,
                concurrency,
            } => idle(conn, count, concurrency).await,
            Command::Soak {
                conn,
                count,
                concurrency,
                duration,
                trickle,
                churn,
            } => soak(conn, count, concurrency, duration, trickle, churn).await,
        }
    });
    if let Err(err) = outcome {
        eprintln!("synthetic: {err}");
        std::process::exit(1);
    }
}

// --- messages ----------------------------------------------------------------------

/// Appends a backend message: type byte, length, body.
fn message(out: &mut Vec<u8>, kind: u8, body: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
}

fn parameter_status(out: &mut Vec<u8>, name: &str, value: &str) {
    let mut body = Vec::with_capacity(name.len() + value.len() + 2);
    body.extend_from_slice(name.as_bytes());
    body.push(0);
    body.extend_from_slice(value.as_bytes());
    body.push(0);
    message(out, b'S', &body);
}

fn ready_for_query(out: &mut Vec<u8>) {
    message(out, b'Z', b"I");
}

fn command_complete(out: &mut Vec<u8>, tag: &str) {
    let mut body = tag.as_bytes().to_vec();
    body.push(0);
    message(out, b'C', &body);
}

fn error_response(out: &mut Vec<u8>, code: &str, text: &str) {
    let mut body = Vec::new();
    for (field, value) in [(b'S', "ERROR"), (b'V', "ERROR"), (b'C', code), (b'M', text)] {
        body.push(field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    message(out, b'E', &body);
}

/// Reads one message with a type byte into `body`; returns the type.
async fn read_message<S: AsyncRead + Unpin>(io: &mut S, body: &mut Vec<u8>) -> Result<u8> {
    let mut header = [0u8; 5];
    io.read_exact(&mut header).await?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if !(4..=MAX_MESSAGE).contains(&len) {
        return Err(format!("message {:?} has a bad length {len}", header[0] as char).into());
    }
    body.resize(len - 4, 0);
    io.read_exact(body).await?;
    Ok(header[0])
}

/// The ErrorResponse's message text, for an error of ours.
fn server_error(body: &[u8]) -> BoxError {
    let mut severity = "ERROR".to_string();
    let mut text = "?".to_string();
    for field in body.split(|b| *b == 0).filter(|f| !f.is_empty()) {
        let value = String::from_utf8_lossy(&field[1..]).into_owned();
        match field[0] {
            b'S' => severity = value,
            b'M' => text = value,
            _ => {}
        }
    }
    format!("server said {severity}: {text}").into()
}

// --- the upstream ------------------------------------------------------------------

/// Everything the connections share: the TLS acceptor and the prebuilt COPY block.
struct Shared {
    acceptor: tokio_rustls::TlsAcceptor,
    block: Vec<u8>,
    message: Vec<u8>,
}

async fn upstream(listen: SocketAddr, cert: &Path, key: &Path) -> Result<()> {
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;

    // One CopyData message of rows of 'x' ending in newlines, and a block of them.
    let mut payload = vec![b'x'; COPY_PAYLOAD];
    for row_end in (127..COPY_PAYLOAD).step_by(128) {
        payload[row_end] = b'\n';
    }
    let mut one = Vec::with_capacity(COPY_PAYLOAD + 5);
    message(&mut one, b'd', &payload);
    let block = one.repeat(BLOCK_MESSAGES);
    let shared = Arc::new(Shared {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        block,
        message: one,
    });

    let listener = TcpListener::bind(listen).await?;
    println!("listening {}", listener.local_addr()?);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut backend_pid: u32 = 1000;
    loop {
        let (socket, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // EMFILE and the like: say so, wait a little, go on.
                    eprintln!("synthetic upstream: accept: {err}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = terminate.recv() => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        backend_pid = backend_pid.wrapping_add(1);
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            // A client that goes away mid-stream is normal; anything else is worth a line.
            if let Err(err) = serve(socket, &shared, backend_pid).await {
                let quiet = err.downcast_ref::<std::io::Error>().is_some_and(|e| {
                    matches!(
                        e.kind(),
                        std::io::ErrorKind::UnexpectedEof
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::BrokenPipe
                    )
                });
                if !quiet {
                    eprintln!("synthetic upstream: connection: {err}");
                }
            }
        });
    }
}

async fn serve(mut socket: TcpStream, shared: &Shared, backend_pid: u32) -> Result<()> {
    socket.set_nodelay(true)?;
    // Before TLS: SSLRequest ('S'), GSSENCRequest ('N', then another try), or a
    // plain StartupMessage, which a TLS-only server refuses.
    loop {
        let mut first = [0u8; 8];
        socket.read_exact(&mut first).await?;
        let len = u32::from_be_bytes([first[0], first[1], first[2], first[3]]) as usize;
        let code = u32::from_be_bytes([first[4], first[5], first[6], first[7]]);
        match code {
            SSL_REQUEST if len == 8 => {
                socket.write_all(b"S").await?;
                break;
            }
            GSSENC_REQUEST if len == 8 => socket.write_all(b"N").await?,
            CANCEL_REQUEST => return Ok(()),
            _ => {
                let mut out = Vec::new();
                error_response(
                    &mut out,
                    "28000",
                    "this server accepts TLS connections only",
                );
                socket.write_all(&out).await?;
                return Ok(());
            }
        }
    }
    let mut tls = shared.acceptor.accept(socket).await?;

    // The StartupMessage: length, protocol, parameters. Everyone is let in.
    let mut head = [0u8; 8];
    tls.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let code = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    if !(8..=MAX_MESSAGE).contains(&len) {
        return Err(format!("startup message has a bad length {len}").into());
    }
    let mut body = vec![0u8; len - 8];
    tls.read_exact(&mut body).await?;
    if code == CANCEL_REQUEST {
        return Ok(());
    }
    if code != PROTOCOL_3 {
        return Err(format!("unsupported protocol {code:#x}").into());
    }
    let mut out = Vec::with_capacity(512);
    message(&mut out, b'R', &0u32.to_be_bytes());
    for (name, value) in [
        ("server_version", "16.0 (keyhole synthetic upstream)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("TimeZone", "UTC"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
    ] {
        parameter_status(&mut out, name, value);
    }
    let mut key_data = backend_pid.to_be_bytes().to_vec();
    key_data.extend_from_slice(&backend_pid.rotate_left(16).to_be_bytes());
    message(&mut out, b'K', &key_data);
    ready_for_query(&mut out);
    tls.write_all(&out).await?;
    tls.flush().await?;
    drop(out);
    // An idle connection keeps no buffers of its own: `body` is emptied after use.
    body = Vec::new();

    loop {
        let kind = match read_message(&mut tls, &mut body).await {
            Ok(kind) => kind,
            Err(err) => {
                let eof = err
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::UnexpectedEof);
                return if eof { Ok(()) } else { Err(err) };
            }
        };
        let mut out = Vec::new();
        match kind {
            b'X' => return Ok(()),
            b'Q' => {
                let text = String::from_utf8_lossy(body.strip_suffix(b"\0").unwrap_or(&body))
                    .trim()
                    .trim_end_matches(';')
                    .to_string();
                let words: Vec<&str> = text.split_whitespace().collect();
                let first = words
                    .first()
                    .map(|w| w.to_ascii_lowercase())
                    .unwrap_or_default();
                match (first.as_str(), words.get(1)) {
                    ("stream", Some(n)) => match n.parse::<u64>() {
                        Ok(n) => {
                            stream_copy(&mut tls, shared, n).await?;
                            continue;
                        }
                        Err(_) => error_response(&mut out, "22023", "stream N: N is a byte count"),
                    },
                    ("select", _) => {
                        let mut desc = 1u16.to_be_bytes().to_vec();
                        desc.extend_from_slice(b"?column?\0");
                        desc.extend_from_slice(&0u32.to_be_bytes()); // table
                        desc.extend_from_slice(&0u16.to_be_bytes()); // column
                        desc.extend_from_slice(&23u32.to_be_bytes()); // int4
                        desc.extend_from_slice(&4i16.to_be_bytes());
                        desc.extend_from_slice(&(-1i32).to_be_bytes());
                        desc.extend_from_slice(&0u16.to_be_bytes()); // text
                        message(&mut out, b'T', &desc);
                        let mut row = 1u16.to_be_bytes().to_vec();
                        row.extend_from_slice(&1u32.to_be_bytes());
                        row.push(b'1');
                        message(&mut out, b'D', &row);
                        command_complete(&mut out, "SELECT 1");
                    }
                    ("", _) => message(&mut out, b'I', b""),
                    (word, _) => command_complete(&mut out, &word.to_ascii_uppercase()),
                }
                ready_for_query(&mut out);
            }
            // The extended protocol is not spoken here; Sync ends the failed batch.
            b'P' | b'B' | b'E' | b'D' | b'C' | b'H' => {}
            b'S' => {
                error_response(
                    &mut out,
                    "0A000",
                    "the synthetic upstream speaks simple queries only",
                );
                ready_for_query(&mut out);
            }
            other => return Err(format!("unexpected message {:?}", other as char).into()),
        }
        body = Vec::new();
        if !out.is_empty() {
            tls.write_all(&out).await?;
            tls.flush().await?;
        }
    }
}

/// CopyOutResponse, `total` bytes of CopyData, CopyDone, CommandComplete, ReadyForQuery.
async fn stream_copy<S: AsyncWrite + Unpin>(io: &mut S, shared: &Shared, total: u64) -> Result<()> {
    let mut head = Vec::new();
    // Text format, one column in text.
    message(&mut head, b'H', &[0, 0, 1, 0, 0]);
    io.write_all(&head).await?;
    let block_payload = (COPY_PAYLOAD * BLOCK_MESSAGES) as u64;
    let mut left = total;
    let mut messages: u64 = 0;
    while left >= block_payload {
        io.write_all(&shared.block).await?;
        left -= block_payload;
        messages += BLOCK_MESSAGES as u64;
    }
    while left >= COPY_PAYLOAD as u64 {
        io.write_all(&shared.message).await?;
        left -= COPY_PAYLOAD as u64;
        messages += 1;
    }
    let mut tail = Vec::new();
    if left > 0 {
        message(&mut tail, b'd', &shared.message[5..5 + left as usize]);
        messages += 1;
    }
    message(&mut tail, b'c', b"");
    command_complete(&mut tail, &format!("COPY {messages}"));
    ready_for_query(&mut tail);
    io.write_all(&tail).await?;
    io.flush().await?;
    Ok(())
}

// --- the clients -------------------------------------------------------------------

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type Conn = Box<dyn Io>;

/// The TLS client side, when `--tls` is given.
fn tls_connector(
    args: &ConnectArgs,
) -> Result<Option<(tokio_rustls::TlsConnector, ServerName<'static>)>> {
    if !args.tls {
        return Ok(None);
    }
    let ca = args.ca.as_ref().ok_or("--tls needs --ca")?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| format!("{}: {e}", ca.display()))? {
        roots.add(cert.map_err(|e| format!("{}: {e}", ca.display()))?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(args.server_name.clone())?;
    Ok(Some((
        tokio_rustls::TlsConnector::from(Arc::new(config)),
        name,
    )))
}

/// Connects (with TLS when asked) and logs in; returns at ReadyForQuery.
async fn connect(
    args: &ConnectArgs,
    tls: &Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
) -> Result<Conn> {
    let mut socket = TcpStream::connect(args.connect).await?;
    socket.set_nodelay(true)?;
    let mut conn: Conn = match tls {
        None => Box::new(socket),
        Some((connector, name)) => {
            let mut request = 8u32.to_be_bytes().to_vec();
            request.extend_from_slice(&SSL_REQUEST.to_be_bytes());
            socket.write_all(&request).await?;
            let mut answer = [0u8; 1];
            socket.read_exact(&mut answer).await?;
            if answer[0] != b'S' {
                return Err("the server does not speak TLS".into());
            }
            Box::new(connector.connect(name.clone(), socket).await?)
        }
    };
    let mut params = Vec::new();
    for (name, value) in [
        ("user", args.user.as_str()),
        ("database", args.database.as_str()),
        ("application_name", "keyhole-synthetic"),
    ] {
        params.extend_from_slice(name.as_bytes());
        params.push(0);
        params.extend_from_slice(value.as_bytes());
        params.push(0);
    }
    params.push(0);
    let mut startup = ((params.len() + 8) as u32).to_be_bytes().to_vec();
    startup.extend_from_slice(&PROTOCOL_3.to_be_bytes());
    startup.extend_from_slice(&params);
    conn.write_all(&startup).await?;
    conn.flush().await?;
    let mut body = Vec::new();
    loop {
        match read_message(&mut conn, &mut body).await? {
            b'R' => {
                let method = body
                    .get(..4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                if method != Some(0) {
                    return Err(format!(
                        "the server asks for authentication method {method:?}; only trust is supported"
                    )
                    .into());
                }
            }
            b'E' => return Err(server_error(&body)),
            b'Z' => return Ok(conn),
            _ => {}
        }
    }
}

/// Sends a simple query; reads to ReadyForQuery, returning the CopyData payload bytes.
async fn query(conn: &mut Conn, sql: &str) -> Result<u64> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    let mut out = Vec::new();
    message(&mut out, b'Q', &body);
    conn.write_all(&out).await?;
    conn.flush().await?;
    let mut copied = 0u64;
    let mut error = None;
    loop {
        match read_message(conn, &mut body).await? {
            b'd' => copied += body.len() as u64,
            b'E' => error = Some(server_error(&body)),
            b'Z' => break,
            _ => {}
        }
    }
    match error {
        Some(err) => Err(err),
        None => Ok(copied),
    }
}

async fn stream(args: ConnectArgs, bytes: u64) -> Result<()> {
    let tls = tls_connector(&args)?;
    let conn = connect(&args, &tls).await?;
    // A big read buffer, so that the count is not paid for in small reads.
    let mut conn: Conn = Box::new(tokio::io::BufReader::with_capacity(256 * 1024, conn));
    let started = Instant::now();
    let got = query(&mut conn, &format!("stream {bytes}")).await?;
    let seconds = started.elapsed().as_secs_f64();
    if got != bytes {
        return Err(format!("asked for {bytes} bytes, got {got}").into());
    }
    println!("bytes {got} seconds {seconds:.6}");
    let _ = conn.write_all(b"X\0\0\0\x04").await;
    let _ = conn.shutdown().await;
    Ok(())
}

/// Opens `count` connections (at most `concurrency` opening at once), logs each in
/// and runs `select 1` on it; fails with how many were up when one fails.
async fn open_all(
    args: &Arc<ConnectArgs>,
    tls: &Arc<Option<(tokio_rustls::TlsConnector, ServerName<'static>)>>,
    count: usize,
    concurrency: usize,
) -> Result<Vec<Conn>> {
    let gate = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut opening = JoinSet::new();
    for _ in 0..count {
        let (args, tls, gate) = (Arc::clone(args), Arc::clone(tls), Arc::clone(&gate));
        opening.spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let mut conn = connect(&args, &tls).await?;
            query(&mut conn, "select 1").await?;
            Ok::<Conn, BoxError>(conn)
        });
    }
    let mut held = Vec::with_capacity(count);
    while let Some(joined) = opening.join_next().await {
        match joined.map_err(BoxError::from).and_then(|r| r) {
            Ok(conn) => held.push(conn),
            Err(err) => {
                return Err(format!(
                    "{} of {count} connections up, then one failed: {err}",
                    held.len()
                )
                .into())
            }
        }
    }
    Ok(held)
}

/// Terminate on each, so that the other side sees a clean end.
async fn close_all(held: Vec<Conn>) {
    let mut closing = JoinSet::new();
    for conn in held {
        closing.spawn(terminate(conn));
    }
    while closing.join_next().await.is_some() {}
}

async fn terminate(mut conn: Conn) {
    let _ = conn.write_all(b"X\0\0\0\x04").await;
    let _ = conn.shutdown().await;
}

async fn idle(args: ConnectArgs, count: usize, concurrency: usize) -> Result<()> {
    let tls = Arc::new(tls_connector(&args)?);
    let held = open_all(&Arc::new(args), &tls, count, concurrency).await?;
    println!("ready {}", held.len());
    wait_for_release().await?;
    close_all(held).await;
    Ok(())
}

/// What the soak's tasks share: how to connect, and the counts.
struct Soak {
    args: ConnectArgs,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    held: AtomicUsize,
    queries: AtomicU64,
    churned: AtomicU64,
    errors: AtomicU64,
}

impl Soak {
    fn line(&self, elapsed: Duration) -> String {
        format!(
            "elapsed {} held {} queries {} churn {} errors {}",
            elapsed.as_secs(),
            self.held.load(Ordering::Relaxed),
            self.queries.load(Ordering::Relaxed),
            self.churned.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed)
        )
    }

    fn error(&self, what: &str, err: &BoxError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        eprintln!("synthetic soak: {what}: {err}");
    }
}

/// How often the soak prints its progress line.
const SOAK_REPORT: Duration = Duration::from_secs(10);

async fn soak(
    args: ConnectArgs,
    count: usize,
    concurrency: usize,
    duration: u64,
    trickle: f64,
    churn: f64,
) -> Result<()> {
    if !(trickle.is_finite() && trickle > 0.0) {
        return Err("--trickle: a number of seconds above 0".into());
    }
    if !(churn.is_finite() && churn >= 0.0) {
        return Err("--churn: connections a second, 0 or more".into());
    }
    let tls = Arc::new(tls_connector(&args)?);
    let args = Arc::new(args);
    let opening = Instant::now();
    let held = open_all(&args, &tls, count, concurrency).await?;
    println!(
        "ready {} seconds {:.1}",
        held.len(),
        opening.elapsed().as_secs_f64()
    );
    let soak = Arc::new(Soak {
        args: ConnectArgs::clone(&args),
        tls: Option::clone(&tls),
        held: AtomicUsize::new(held.len()),
        queries: AtomicU64::new(0),
        churned: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    });
    let start = tokio::time::Instant::now();
    let end = start + Duration::from_secs(duration);
    let period = Duration::from_secs_f64(trickle);

    // Connection i runs its first query i/N of a period after the start.
    let mut holding = JoinSet::new();
    for (i, conn) in held.into_iter().enumerate() {
        let first = start + period.mul_f64(i as f64 / count.max(1) as f64);
        holding.spawn(hold(Arc::clone(&soak), i, conn, first, period, end));
    }
    let churning = (churn > 0.0).then(|| {
        let period = Duration::from_secs_f64(1.0 / churn);
        tokio::spawn(churn_until(Arc::clone(&soak), start + period, period, end))
    });

    let mut report = tokio::time::interval_at(start + SOAK_REPORT, SOAK_REPORT);
    report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let finished = tokio::time::sleep_until(end);
    tokio::pin!(finished);
    loop {
        tokio::select! {
            biased;
            _ = &mut finished => break,
            now = report.tick() => println!("{}", soak.line(now - start)),
        }
    }
    if let Some(churning) = churning {
        churning.await?;
    }
    let mut kept = Vec::with_capacity(count);
    while let Some(joined) = holding.join_next().await {
        kept.extend(joined?);
    }
    println!("done {}", soak.line(start.elapsed()));
    close_all(kept).await;
    match soak.errors.load(Ordering::Relaxed) {
        0 => Ok(()),
        errors => Err(format!("{errors} errors during the soak (stderr says which)").into()),
    }
}

/// One held connection: `select 1` at `first`, then every `period` until `end`; when
/// one fails, a new connection in its place. Returns the connection it holds at the end.
async fn hold(
    soak: Arc<Soak>,
    slot: usize,
    conn: Conn,
    first: tokio::time::Instant,
    period: Duration,
    end: tokio::time::Instant,
) -> Option<Conn> {
    let mut conn = Some(conn);
    let mut next = first;
    while next < end {
        tokio::time::sleep_until(next).await;
        next += period;
        let Some(live) = conn.as_mut() else { break };
        match query(live, "select 1").await {
            Ok(_) => {
                soak.queries.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Err(err) => {
                soak.error(&format!("held connection {slot}"), &err);
                soak.held.fetch_sub(1, Ordering::Relaxed);
                conn = None;
            }
        }
        // Open it again, trying once a second until the end.
        while conn.is_none() && tokio::time::Instant::now() < end {
            match connect(&soak.args, &soak.tls).await {
                Ok(fresh) => {
                    soak.held.fetch_add(1, Ordering::Relaxed);
                    conn = Some(fresh);
                }
                Err(err) => {
                    soak.error(&format!("re-opening held connection {slot}"), &err);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
    conn
}

/// A new connection every `period` from `first` until `end`: logged in, `select 1`,
/// Terminate. Returns when the last one is closed.
async fn churn_until(
    soak: Arc<Soak>,
    first: tokio::time::Instant,
    period: Duration,
    end: tokio::time::Instant,
) {
    // (a tick that comes late is made up for at once: the rate holds over the run)
    let mut tick = tokio::time::interval_at(first, period);
    let mut running = JoinSet::new();
    while tick.tick().await < end {
        let soak = Arc::clone(&soak);
        running.spawn(async move {
            let outcome = async {
                let mut conn = connect(&soak.args, &soak.tls).await?;
                query(&mut conn, "select 1").await?;
                terminate(conn).await;
                Ok::<(), BoxError>(())
            };
            match outcome.await {
                Ok(()) => {
                    soak.churned.fetch_add(1, Ordering::Relaxed);
                }
                Err(err) => soak.error("churn connection", &err),
            }
        });
        while running.try_join_next().is_some() {}
    }
    while running.join_next().await.is_some() {}
}

/// Until standard input reaches its end (or fails), or SIGTERM or SIGINT comes.
async fn wait_for_release() -> Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // tokio's stdin needs a feature keyhole does not use: a thread reads it instead.
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 256];
        while let Ok(n) = std::io::Read::read(&mut stdin, &mut buf) {
            if n == 0 {
                break;
            }
        }
        let _ = closed_tx.send(());
    });
    tokio::select! {
        _ = closed_rx => {}
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
