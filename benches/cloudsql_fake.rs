//! A fake Cloud SQL instance for scripts/bench.sh: the SQL Admin API's two connector
//! methods and the instance's server-side proxy, in front of a real PostgreSQL's Unix
//! socket, in one process. keyhole's connector is measured against it (new connections,
//! first-connection latency with refresh-ahead and `--lazy-refresh`, the steady-state
//! data path).
//!
//! Built with `cargo build --release --example cloudsql_fake`. The test suite has its
//! own, much fuller fakes (tests/support/cloudsql.rs, with failure injection and
//! records); this one is written from the same contract, kept small and lean, because
//! its cost is part of every figure measured through it.
//!
//! ```text
//! cloudsql_fake --socket DIR/.s.PGSQL.PORT [--api-listen ADDR] [--proxy-ip IP]
//!               [--project P] [--region R] [--instance I]
//!               [--server-ca-out PEM] [--client-key-pub PEM --client-cert-out PEM]
//! ```
//!
//! - The SQL Admin API, plain HTTP/1.1 on `--api-listen` (default 127.0.0.1, any free
//!   port), one request per connection: `GET /sql/v1beta4/projects/P/instances/I/connectSettings`
//!   (a `POSTGRES_15` instance in region R, server CA mode `GOOGLE_MANAGED_INTERNAL_CA`,
//!   one `PRIMARY` address: the proxy's) and `POST .../instances/I:generateEphemeralCert`
//!   with `{"public_key": PEM}` (a PKIX public key; `publicKey` is accepted too) →
//!   `{"ephemeralCert": {"cert": PEM, ...}}`, valid from a minute ago for an hour, signed
//!   by the instance's client CA. Any bearer token is accepted (none: 401); another
//!   project or instance: 404.
//! - The server-side proxy on `IP:3307` (`--proxy-ip`, default 127.79.0.1; when that
//!   port is taken there, the next addresses are tried): TLS 1.3 only from the first
//!   byte, a client certificate signed by the client CA required, no session tickets or
//!   resumption (every connection is a full handshake, as with PostgreSQL, which turns
//!   tickets off). The server certificate has CN `P:I` and no SAN, signed by the
//!   instance's server CA (ECDSA P-256). After the handshake, bytes are spliced both
//!   ways to `--socket` with tokio's `copy_bidirectional` and 64 KiB buffers: inside the
//!   tunnel the PostgreSQL protocol starts plain.
//! - `--server-ca-out` writes `serverCaCert.cert`; `--client-key-pub` signs a client
//!   certificate (valid 7 days) for the public key in that PEM file and writes it to
//!   `--client-cert-out`: for a stock TLS client (stunnel) on the same path.
//!
//! When it is ready it prints `api http://ADDR`, `proxy IP:3307` and `instance
//! P:R:I` (the instance connection name), one a line, on stdout; then `call METHOD
//! STATUS` for each API request that named a method. Problems go to stderr. It exits
//! on SIGTERM, SIGINT, or when its standard input closes.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SerialNumber, SubjectPublicKeyInfo,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::pki_types::PrivateKeyDer;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::RootCertStore;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio_rustls::TlsAcceptor;

/// The port of Cloud SQL's server-side proxy.
const SERVER_PROXY_PORT: u16 = 3307;
/// The proxy's copy buffers, one per direction.
const SPLICE_BUFFER: usize = 64 * 1024;
/// A client has this long to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// An API request's head and body are each at most this long.
const MAX_REQUEST: usize = 64 * 1024;
/// Ephemeral certificates from the API, and the one `--client-key-pub` asks for.
const EPHEMERAL_VALIDITY: Duration = Duration::from_secs(3600);
const STOCK_CLIENT_VALIDITY: Duration = Duration::from_secs(7 * 86_400);
/// The CAs' and the server certificate's validity; how far back notBefore lies.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86_400);
const BACKDATE: Duration = Duration::from_secs(60);
const API_PREFIX: &str = "/sql/v1beta4/projects/";

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Result<T, E = BoxError> = std::result::Result<T, E>;

#[derive(Parser)]
#[command(
    about = "A fake Cloud SQL instance (SQL Admin API and server-side proxy) in front of PostgreSQL, for scripts/bench.sh"
)]
struct Cli {
    /// PostgreSQL's Unix socket file (DIR/.s.PGSQL.PORT), where the proxy sends the bytes.
    #[arg(long)]
    socket: PathBuf,
    /// The SQL Admin API's address (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    api_listen: SocketAddr,
    /// The instance's public IP: the server-side proxy listens on IP:3307.
    #[arg(long, default_value = "127.79.0.1")]
    proxy_ip: Ipv4Addr,
    #[arg(long, default_value = "keyhole-bench")]
    project: String,
    #[arg(long, default_value = "us-central1")]
    region: String,
    #[arg(long, default_value = "bench")]
    instance: String,
    /// Write the server CA (what connectSettings returns as serverCaCert.cert) here.
    #[arg(long)]
    server_ca_out: Option<PathBuf>,
    /// Sign a client certificate for the public key in this PEM file (PKIX).
    #[arg(long, requires = "client_cert_out")]
    client_key_pub: Option<PathBuf>,
    /// Where the certificate for --client-key-pub goes.
    #[arg(long, requires = "client_key_pub")]
    client_cert_out: Option<PathBuf>,
}

/// A CA: its certificate and key.
struct Ca {
    cert: Certificate,
    key: KeyPair,
}

/// What the API's answers need.
struct Api {
    project: String,
    region: String,
    instance: String,
    proxy_ip: IpAddr,
    server_ca: Ca,
    client_ca: Ca,
    created: SystemTime,
    expires: SystemTime,
}

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let outcome = runtime.block_on(run(cli));
    // Straight out, without waiting for the connections' tasks or the stdin thread.
    match outcome {
        Ok(()) => std::process::exit(0),
        Err(err) => {
            eprintln!("cloudsql_fake: {err}");
            std::process::exit(1);
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    if cli.project.contains(['/', '%']) || cli.instance.contains([':', '/', '%']) {
        return Err("--project and --instance must be plain names".into());
    }
    let now = SystemTime::now();
    let server_ca = make_ca("Google Cloud SQL Server CA", now)?;
    let client_ca = make_ca(
        &format!(
            "Google Cloud SQL Client CA {}:{}",
            cli.project, cli.instance
        ),
        now,
    )?;
    let acceptor = tls_acceptor(&cli, &server_ca, &client_ca, now)?;

    let proxy = bind_proxy(cli.proxy_ip)?;
    let proxy_addr = proxy.local_addr()?;
    let api_listener = TcpListener::bind(cli.api_listen)
        .await
        .map_err(|e| format!("--api-listen {}: {e}", cli.api_listen))?;
    let api_addr = api_listener.local_addr()?;

    if let Some(path) = &cli.server_ca_out {
        std::fs::write(path, server_ca.cert.pem())
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if let (Some(public), Some(out)) = (&cli.client_key_pub, &cli.client_cert_out) {
        let pem =
            std::fs::read_to_string(public).map_err(|e| format!("{}: {e}", public.display()))?;
        let (cert, _, _) = sign_client_cert(&client_ca, &pem, STOCK_CLIENT_VALIDITY)
            .map_err(|e| format!("{}: {e}", public.display()))?;
        std::fs::write(out, cert.pem()).map_err(|e| format!("{}: {e}", out.display()))?;
    }

    let api = Arc::new(Api {
        project: cli.project.clone(),
        region: cli.region.clone(),
        instance: cli.instance.clone(),
        proxy_ip: proxy_addr.ip(),
        server_ca,
        client_ca,
        created: now - BACKDATE,
        expires: now + CA_LIFETIME,
    });
    tokio::spawn(serve_api(api_listener, api));
    tokio::spawn(serve_proxy(proxy, acceptor, Arc::new(cli.socket)));

    println!("api http://{api_addr}");
    println!("proxy {proxy_addr}");
    println!("instance {}:{}:{}", cli.project, cli.region, cli.instance);

    // Standard input is read on a thread of its own (tokio's stdin is not in the build);
    // its end is the end of the process.
    let (closed_tx, closed) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut sink = [0u8; 256];
        while matches!(std::io::Read::read(&mut std::io::stdin(), &mut sink), Ok(n) if n > 0) {}
        let _ = closed_tx.send(());
    });
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = closed => {}
    }
    Ok(())
}

// --- certificates ------------------------------------------------------------------

/// 16 random bytes as a positive serial number.
fn random_serial() -> Result<u128> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "no randomness")?;
    bytes[0] = (bytes[0] & 0x7f).max(1);
    Ok(u128::from_be_bytes(bytes))
}

fn set_validity(params: &mut CertificateParams, from: SystemTime, until: SystemTime) {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + Duration::from_secs(unix_secs(from));
    params.not_after = epoch + Duration::from_secs(unix_secs(until));
}

fn google_name(cn: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CountryName, "US");
    name.push(DnType::OrganizationName, "Google, Inc");
    name.push(DnType::CommonName, cn);
    name
}

/// A self-signed CA called `cn` (ECDSA P-256).
fn make_ca(cn: &str, now: SystemTime) -> Result<Ca> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = google_name(cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()?.to_be_bytes()));
    set_validity(&mut params, now - BACKDATE, now + CA_LIFETIME);
    let cert = params.self_signed(&key)?;
    Ok(Ca { cert, key })
}

/// The proxy's TLS: the server certificate (CN `project:instance`, as Cloud SQL's
/// internal CA mode has it), TLS 1.3 only, a client certificate from `client_ca`
/// required, no resumption.
fn tls_acceptor(cli: &Cli, server_ca: &Ca, client_ca: &Ca, now: SystemTime) -> Result<TlsAcceptor> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = google_name(&format!("{}:{}", cli.project, cli.instance));
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()?.to_be_bytes()));
    set_validity(&mut params, now - BACKDATE, now + CA_LIFETIME);
    let leaf = params.signed_by(&key, &server_ca.cert, &server_ca.key)?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots.add(client_ca.cert.der().clone())?;
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![leaf.der().clone()],
            PrivateKeyDer::try_from(key.serialize_der())?,
        )?;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A client certificate for the public key in `public_key_pem`, signed by `ca`:
/// (the certificate, its common name, its serial number).
fn sign_client_cert(
    ca: &Ca,
    public_key_pem: &str,
    validity: Duration,
) -> Result<(Certificate, String, u128)> {
    let key = SubjectPublicKeyInfo::from_pem(public_key_pem)
        .map_err(|e| format!("not a PKIX public key: {e}"))?;
    let serial = random_serial()?;
    let common_name = format!("cloudsql-ephemeral-{serial:032x}");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name.as_str());
    params.serial_number = Some(SerialNumber::from_slice(&serial.to_be_bytes()));
    let now = SystemTime::now();
    set_validity(&mut params, now - BACKDATE, now + validity);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &ca.cert, &ca.key)?;
    Ok((cert, common_name, serial))
}

// --- times and text ----------------------------------------------------------------

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// RFC 3339 in UTC with milliseconds, as Google writes timestamps.
fn rfc3339(t: SystemTime) -> String {
    let secs = unix_secs(t);
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.000Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

fn sha1_hex(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `%XX` decoded (a connector may write `:` as `%3A`); bad escapes stay as they are.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

// --- the SQL Admin API -------------------------------------------------------------

async fn serve_api(listener: TcpListener, api: Arc<Api>) {
    loop {
        match listener.accept().await {
            Ok((socket, _)) => {
                let api = Arc::clone(&api);
                tokio::spawn(async move {
                    if let Err(err) = api_connection(socket, &api).await {
                        eprintln!("cloudsql_fake: API connection: {err}");
                    }
                });
            }
            Err(err) => {
                eprintln!("cloudsql_fake: API accept: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One request, one answer, then the connection closes.
async fn api_connection(mut socket: TcpStream, api: &Api) -> Result<()> {
    let mut buf = Vec::with_capacity(4096);
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if buf.len() > MAX_REQUEST {
            return Err("request head too long".into());
        }
        if socket.read_buf(&mut buf).await? == 0 {
            // Closed before a whole request: nothing to answer.
            return Ok(());
        }
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| "request head not UTF-8")?;
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let verb = request_line.next().unwrap_or_default().to_owned();
    let target = request_line.next().unwrap_or_default().to_owned();
    let mut length = 0usize;
    let mut bearer = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse().map_err(|_| "bad Content-Length")?;
        } else if name.eq_ignore_ascii_case("authorization") {
            bearer = value.split_once(' ').is_some_and(|(scheme, token)| {
                scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty()
            });
        }
    }
    if length > MAX_REQUEST {
        return Err("request body too long".into());
    }
    while buf.len() < head_end + length {
        if socket.read_buf(&mut buf).await? == 0 {
            return Err("the client closed the connection mid-request".into());
        }
    }
    let body = &buf[head_end..head_end + length];

    let (status, answer) = answer(api, &verb, &target, bearer, body);
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        _ => "Not Found",
    };
    let text = answer.to_string();
    let reply = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=UTF-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    socket.write_all(reply.as_bytes()).await?;
    socket.shutdown().await?;
    Ok(())
}

fn google_error(code: u16, status: &str, reason: &str, message: &str) -> (u16, Value) {
    let body = json!({"error": {
        "code": code,
        "message": message,
        "errors": [{"message": message, "domain": "global", "reason": reason}],
        "status": status,
    }});
    (code, body)
}

/// The status and JSON answer to a request.
fn answer(api: &Api, verb: &str, target: &str, bearer: bool, body: &[u8]) -> (u16, Value) {
    let not_found = || google_error(404, "NOT_FOUND", "notFound", "Method not found.");
    let path = percent_decode(target.split('?').next().unwrap_or_default());
    let Some(rest) = path.strip_prefix(API_PREFIX) else {
        return not_found();
    };
    let Some((project, rest)) = rest.split_once("/instances/") else {
        return not_found();
    };
    let (method, instance) = if let Some(i) = rest.strip_suffix("/connectSettings") {
        ("connectSettings", i)
    } else if let Some(i) = rest.strip_suffix(":generateEphemeralCert") {
        ("generateEphemeralCert", i)
    } else {
        return not_found();
    };
    let wanted = if method == "connectSettings" {
        "GET"
    } else {
        "POST"
    };
    if verb != wanted {
        return not_found();
    }
    let (status, value) = answer_call(api, method, project, instance, bearer, body);
    println!("call {method} {status}");
    (status, value)
}

fn answer_call(
    api: &Api,
    method: &str,
    project: &str,
    instance: &str,
    bearer: bool,
    body: &[u8],
) -> (u16, Value) {
    if !bearer {
        return google_error(
            401,
            "UNAUTHENTICATED",
            "required",
            "Request is missing required authentication credential.",
        );
    }
    if project != api.project || instance != api.instance {
        return google_error(
            404,
            "NOT_FOUND",
            "instanceDoesNotExist",
            "The Cloud SQL instance does not exist.",
        );
    }
    if method == "connectSettings" {
        let ca_der = api.server_ca.cert.der();
        let settings = json!({
            "kind": "sql#connectSettings",
            "serverCaCert": {
                "kind": "sql#sslCert",
                "certSerialNumber": "0",
                "cert": api.server_ca.cert.pem(),
                "commonName": "Google Cloud SQL Server CA",
                "sha1Fingerprint": sha1_hex(ca_der),
                "instance": api.instance,
                "createTime": rfc3339(api.created),
                "expirationTime": rfc3339(api.expires),
            },
            "ipAddresses": [{"type": "PRIMARY", "ipAddress": api.proxy_ip.to_string()}],
            "region": api.region,
            "databaseVersion": "POSTGRES_15",
            "backendType": "SECOND_GEN",
            "pscEnabled": false,
            "serverCaMode": "GOOGLE_MANAGED_INTERNAL_CA",
        });
        return (200, settings);
    }
    let request: Value = match serde_json::from_slice(body) {
        Ok(value @ Value::Object(_)) => value,
        _ => {
            return google_error(
                400,
                "INVALID_ARGUMENT",
                "badRequest",
                "Invalid JSON payload received. Expected a JSON object.",
            )
        }
    };
    let Some(pem) = request
        .get("public_key")
        .or_else(|| request.get("publicKey"))
        .and_then(Value::as_str)
    else {
        return google_error(
            400,
            "INVALID_ARGUMENT",
            "invalid",
            "Invalid request: public_key is required.",
        );
    };
    match sign_client_cert(&api.client_ca, pem, EPHEMERAL_VALIDITY) {
        Ok((cert, common_name, serial)) => {
            let now = SystemTime::now();
            (
                200,
                json!({"ephemeralCert": {
                    "kind": "sql#sslCert",
                    "certSerialNumber": serial.to_string(),
                    "cert": cert.pem(),
                    "commonName": common_name,
                    "sha1Fingerprint": sha1_hex(cert.der()),
                    "instance": api.instance,
                    "createTime": rfc3339(now),
                    "expirationTime": rfc3339(now + EPHEMERAL_VALIDITY),
                }}),
            )
        }
        Err(why) => google_error(
            400,
            "INVALID_ARGUMENT",
            "invalid",
            &format!("Invalid request: invalid public key ({why})."),
        ),
    }
}

// --- the server-side proxy ---------------------------------------------------------

/// A listener on `ip:3307`, or on the next addresses when that one is taken.
fn bind_proxy(ip: Ipv4Addr) -> Result<TcpListener> {
    let base = u32::from(ip);
    let mut last = String::new();
    for step in 0..64u32 {
        let candidate = Ipv4Addr::from(base.wrapping_add(step << 8));
        if !candidate.is_loopback() {
            break;
        }
        match std::net::TcpListener::bind((candidate, SERVER_PROXY_PORT)) {
            Ok(listener) => {
                listener.set_nonblocking(true)?;
                return Ok(TcpListener::from_std(listener)?);
            }
            Err(err) => last = format!("{candidate}:{SERVER_PROXY_PORT}: {err}"),
        }
    }
    Err(format!("no free loopback address for the server-side proxy; last: {last}").into())
}

async fn serve_proxy(listener: TcpListener, acceptor: TlsAcceptor, socket: Arc<PathBuf>) {
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                let acceptor = acceptor.clone();
                let socket = Arc::clone(&socket);
                tokio::spawn(async move {
                    if let Err(err) = proxy_connection(client, &acceptor, &socket).await {
                        let quiet = err.downcast_ref::<std::io::Error>().is_some_and(|e| {
                            matches!(
                                e.kind(),
                                std::io::ErrorKind::UnexpectedEof
                                    | std::io::ErrorKind::ConnectionReset
                                    | std::io::ErrorKind::BrokenPipe
                            )
                        });
                        if !quiet {
                            eprintln!("cloudsql_fake: proxy connection from {peer}: {err}");
                        }
                    }
                });
            }
            Err(err) => {
                // EMFILE and the like: say so, wait a little, go on.
                eprintln!("cloudsql_fake: proxy accept: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn proxy_connection(
    client: TcpStream,
    acceptor: &TlsAcceptor,
    socket: &std::path::Path,
) -> Result<()> {
    client.set_nodelay(true)?;
    let mut tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(client))
        .await
        .map_err(|_| format!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}"))??;
    let mut backend = UnixStream::connect(socket)
        .await
        .map_err(|e| format!("connect to {}: {e}", socket.display()))?;
    tokio::io::copy_bidirectional_with_sizes(&mut tls, &mut backend, SPLICE_BUFFER, SPLICE_BUFFER)
        .await?;
    Ok(())
}
