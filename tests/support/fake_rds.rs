//! A token-checking "fake RDS" (or Cloud SQL) upstream in front of the REAL
//! servers the harness starts, so keyhole's whole IAM path runs: keyhole dials
//! the fake over TLS, answers its password request with a token, the fake
//! checks the token and, if it is good, logs in to the real server on
//! keyhole's behalf and splices the rest of the connection through.
//!
//! The fake listens on 127.0.0.1 with a certificate for an RDS-like endpoint
//! name (plus `localhost` and `127.0.0.1`) from its own [`TestPki`]: give
//! keyhole `ca-file=<pki().ca>` and `server-name=<endpoint()>`. Each
//! connection runs in its own task on the fake's own runtime; a client that
//! misbehaves is logged ([`FakeRds::errors`]) and dropped. Dropping the fake
//! stops it.
//!
//! # API
//!
//! - [`TokenCheck`]: `Aws { access_key_id, secret, expected_host,
//!   expected_port, region, session_token }` (an RDS IAM token, verified with
//!   the test side's own SigV4 in [`sigv4::verify_rds_token`]; `DBUser` must
//!   be the user logging in) or `Gcp { accepted }` (the password must be one of
//!   these access tokens). `expected_port: 0` stands for the fake's own port
//!   (unknown until it listens). `check(user, password, now)`, and
//!   `TokenCheck::aws_for(&AwsCredentials, host, port, region)`. `Debug`
//!   redacts secrets.
//! - [`FakeRds::postgres`]`(real: &PgCluster, check, ask: PgAsk)` (endpoint
//!   [`DEFAULT_ENDPOINT`]) / [`FakeRds::postgres_at`]`(endpoint, ...)`:
//!   SSLRequest → `S` (GSSENCRequest → `N`; direct TLS is accepted too) →
//!   TLS → StartupMessage → [`PgAsk`]: `Cleartext` (AuthenticationCleartext-
//!   Password, as RDS asks an `rds_iam` user), `Md5` or `Scram` (what RDS asks
//!   a user without `rds_iam`: the fake records the answer as a failed check
//!   and refuses with 28P01). A bad token gets `FATAL 28P01 PAM
//!   authentication failed for user "<user>"`. A good one: TLS to the real
//!   cluster (verified with its CA, name `localhost`), the same
//!   StartupMessage, then bytes both ways: log in as `trust_user` (or
//!   `postgres`), whom the real cluster trusts. CancelRequests are forwarded.
//! - [`FakeRds::mysql`]`(real: &MariaDb, check, switch: SwitchData)` /
//!   [`FakeRds::mysql_at`]: greets with the real server's version, thread id,
//!   capabilities (plus SSL), charset and status but its own scramble and
//!   `mysql_native_password`; wants an SSLRequest (else ERR 3159); after TLS
//!   reads HandshakeResponse41 and sends an AuthSwitchRequest to
//!   `mysql_clear_password` ([`SwitchData::WithScramble`], or
//!   [`SwitchData::None`] as Aurora does); a bad token gets ERR 1045 (28000)
//!   `Access denied for user '<user>'@'<ip>' (using password: YES)`. A good
//!   one: TLS to the real server and the client's HandshakeResponse41 with an
//!   empty `mysql_native_password` auth response (so log in as [`IAM_USER`],
//!   see [`ensure_mysql_iam_user`]); the real server's OK goes to keyhole
//!   with sequence id 5, then bytes both ways.
//! - [`FakeRds`]: `port()`, `pki()`, `endpoint()`, `keyhole_target()`
//!   (`<scheme>://127.0.0.1:PORT?server-name=<endpoint>&ca-file=<ca>`),
//!   `outcomes() -> Vec<CheckOutcome>` (one per password checked, in order),
//!   `wait_for_outcomes(n, timeout)`, `errors() -> Vec<String>`,
//!   `connections()`, `set_check(TokenCheck)`.
//! - [`CheckOutcome`]`{ user, result: Result<(), String> }`, `is_ok()`: the
//!   reason names the failed check, never a secret.
//! - [`ensure_mysql_iam_user`]`(real: &MariaDb)`: creates [`IAM_USER`]`@'%'`
//!   without a password, ALL on `keyhole_test` (idempotent).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;
use keyhole::protocol::mysql::{self as my, caps};
use keyhole::protocol::postgres::{self as pg, CancelKey, StartupPacket};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

use super::certs::TestPki;
use super::cloud::{try_random_string, AwsCredentials};
use super::mariadb::{MariaDb, DATABASE};
use super::postgres::PgCluster;
use super::sigv4;

/// The endpoint name [`FakeRds::postgres`] and [`FakeRds::mysql`] present.
pub const DEFAULT_ENDPOINT: &str = "mydb.abc123.us-east-1.rds.amazonaws.com";
/// The MariaDB user the MySQL mode logs in as after a good token: no
/// password, ALL on `keyhole_test` (see [`ensure_mysql_iam_user`]).
pub const IAM_USER: &str = "iam_user";

/// How long a client has from connecting to having its password checked
/// (and the fake to log in to the real server).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest startup-phase message or packet the fake reads.
const MAX_MESSAGE: usize = 1 << 20;
/// The plugin the MySQL mode greets with and logs in to the real server with.
const NATIVE_PLUGIN: &[u8] = b"mysql_native_password";
const CLEAR_PLUGIN: &[u8] = b"mysql_clear_password";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How the fake decides whether a password is a valid token.
#[derive(Clone)]
pub enum TokenCheck {
    /// An RDS IAM token for `expected_host:expected_port`, signed with these
    /// credentials for `region`, for the user logging in.
    Aws {
        access_key_id: String,
        secret: String,
        expected_host: String,
        /// 0: the fake's own port (known only once it listens).
        expected_port: u16,
        region: String,
        /// `Some`: the token must carry this `X-Amz-Security-Token`; `None`: none.
        session_token: Option<String>,
    },
    /// One of these OAuth2 access tokens (Cloud SQL IAM login).
    Gcp { accepted: Vec<String> },
}

impl std::fmt::Debug for TokenCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenCheck::Aws {
                access_key_id,
                expected_host,
                expected_port,
                region,
                session_token,
                ..
            } => {
                write!(
                f,
                "TokenCheck::Aws({access_key_id} for {expected_host}:{expected_port} in {region}, \
                 secret redacted, session token {})",
                if session_token.is_some() { "redacted" } else { "none" }
            )
            }
            TokenCheck::Gcp { accepted } => {
                write!(f, "TokenCheck::Gcp({} tokens, redacted)", accepted.len())
            }
        }
    }
}

impl TokenCheck {
    /// An AWS check for tokens made from `creds` (session token included).
    pub fn aws_for(creds: &AwsCredentials, host: &str, port: u16, region: &str) -> TokenCheck {
        TokenCheck::Aws {
            access_key_id: creds.access_key_id.clone(),
            secret: creds.secret_access_key.clone(),
            expected_host: host.to_owned(),
            expected_port: port,
            region: region.to_owned(),
            session_token: Some(creds.session_token.clone()),
        }
    }

    /// Whether `password` lets `user` in at `now`; the error says why not
    /// and quotes no secret.
    pub fn check(&self, user: &str, password: &str, now: SystemTime) -> Result<(), String> {
        if password.is_empty() {
            return Err("empty password".to_owned());
        }
        match self {
            TokenCheck::Aws {
                access_key_id,
                secret,
                expected_host,
                expected_port,
                region,
                session_token,
            } => sigv4::verify_rds_token(
                password,
                &sigv4::RdsExpectation {
                    access_key_id,
                    secret,
                    host: expected_host,
                    port: *expected_port,
                    region,
                    session_token: session_token.as_deref(),
                    user,
                },
                now,
            ),
            TokenCheck::Gcp { accepted } => {
                if accepted.iter().any(|t| t == password) {
                    Ok(())
                } else {
                    Err(format!(
                        "not one of the {} accepted access tokens",
                        accepted.len()
                    ))
                }
            }
        }
    }
}

/// What the Postgres mode asks the client for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgAsk {
    /// AuthenticationCleartextPassword: what RDS asks an `rds_iam` user.
    Cleartext,
    /// AuthenticationMD5Password: a user without `rds_iam` (md5 password).
    Md5,
    /// AuthenticationSASL (SCRAM-SHA-256): a user without `rds_iam`.
    Scram,
}

/// What the MySQL mode's AuthSwitchRequest carries after the plugin name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchData {
    /// The 20-byte scramble and a NUL, as RDS for MySQL sends it.
    WithScramble,
    /// Nothing at all, as Aurora sends it.
    None,
}

/// One password the fake checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOutcome {
    pub user: String,
    /// `Err` names the check that failed (never the secret).
    pub result: Result<(), String>,
}

impl CheckOutcome {
    pub fn is_ok(&self) -> bool {
        self.result.is_ok()
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Postgres(PgAsk),
    Mysql(SwitchData),
}

struct Shared {
    check: Mutex<Arc<TokenCheck>>,
    outcomes: Mutex<Vec<CheckOutcome>>,
    errors: Mutex<Vec<String>>,
    connections: AtomicUsize,
}

struct Ctx {
    shared: Arc<Shared>,
    kind: Kind,
    acceptor: TlsAcceptor,
    real_port: u16,
    real_tls: TlsConnector,
    /// The port the fake listens on.
    own_port: u16,
}

impl Ctx {
    fn check(&self, user: &str, password: &str) -> Result<(), String> {
        let mut check = TokenCheck::clone(&lock(&self.shared.check));
        if let TokenCheck::Aws { expected_port, .. } = &mut check {
            if *expected_port == 0 {
                *expected_port = self.own_port;
            }
        }
        let result = check.check(user, password, SystemTime::now());
        self.outcome(user, result.clone());
        result
    }

    fn outcome(&self, user: &str, result: Result<(), String>) {
        lock(&self.shared.outcomes).push(CheckOutcome {
            user: user.to_owned(),
            result,
        });
    }
}

/// A token-checking upstream in front of a real server (see the module docs).
pub struct FakeRds {
    endpoint: String,
    port: u16,
    pki: TestPki,
    kind: Kind,
    shared: Arc<Shared>,
    runtime: Option<Runtime>,
}

impl FakeRds {
    /// Postgres mode at [`DEFAULT_ENDPOINT`].
    pub fn postgres(real: &PgCluster, check: TokenCheck, ask: PgAsk) -> FakeRds {
        FakeRds::postgres_at(DEFAULT_ENDPOINT, real, check, ask)
    }

    /// Postgres mode presenting a certificate for `endpoint`.
    pub fn postgres_at(endpoint: &str, real: &PgCluster, check: TokenCheck, ask: PgAsk) -> FakeRds {
        FakeRds::start(
            endpoint,
            Kind::Postgres(ask),
            real.port,
            &real.pki.ca,
            check,
        )
    }

    /// MySQL mode at [`DEFAULT_ENDPOINT`].
    pub fn mysql(real: &MariaDb, check: TokenCheck, switch: SwitchData) -> FakeRds {
        FakeRds::mysql_at(DEFAULT_ENDPOINT, real, check, switch)
    }

    /// MySQL mode presenting a certificate for `endpoint`.
    pub fn mysql_at(
        endpoint: &str,
        real: &MariaDb,
        check: TokenCheck,
        switch: SwitchData,
    ) -> FakeRds {
        FakeRds::start(
            endpoint,
            Kind::Mysql(switch),
            real.port(),
            &real.pki().ca,
            check,
        )
    }

    fn start(
        endpoint: &str,
        kind: Kind,
        real_port: u16,
        real_ca: &Path,
        check: TokenCheck,
    ) -> FakeRds {
        let pki = TestPki::generate(&[endpoint, "localhost", "127.0.0.1"]);
        let alpn: &[&[u8]] = match kind {
            Kind::Postgres(_) => &[pg::ALPN],
            Kind::Mysql(_) => &[],
        };
        let runtime = super::runtime();
        let mut attempt = 0;
        let (listener, port) = loop {
            let port = super::free_port();
            match runtime.block_on(TcpListener::bind(("127.0.0.1", port))) {
                Ok(listener) => break (listener, port),
                Err(e) if attempt < 20 => {
                    attempt += 1;
                    eprintln!("fake RDS: port {port} is taken ({e}), trying another");
                }
                Err(e) => panic!("fake RDS: bind 127.0.0.1: {e}"),
            }
        };
        let shared = Arc::new(Shared {
            check: Mutex::new(Arc::new(check)),
            outcomes: Mutex::new(Vec::new()),
            errors: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
        });
        let ctx = Arc::new(Ctx {
            shared: shared.clone(),
            kind,
            acceptor: tls_acceptor(&pki, alpn),
            real_port,
            real_tls: tls_connector(real_ca),
            own_port: port,
        });
        runtime.spawn(accept_loop(listener, ctx));
        FakeRds {
            endpoint: endpoint.to_owned(),
            port,
            pki,
            kind,
            shared,
            runtime: Some(runtime),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The fake's CA and certificate (`pki().ca` is keyhole's `ca-file`).
    pub fn pki(&self) -> &TestPki {
        &self.pki
    }

    /// The endpoint name in its certificate.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A keyhole target for this fake: `postgres://` or `mysql://`
    /// `127.0.0.1:PORT?server-name=<endpoint>&ca-file=<ca>`.
    pub fn keyhole_target(&self) -> String {
        let scheme = match self.kind {
            Kind::Postgres(_) => "postgres",
            Kind::Mysql(_) => "mysql",
        };
        format!(
            "{scheme}://127.0.0.1:{}?server-name={}&ca-file={}",
            self.port,
            self.endpoint,
            self.pki.ca.display()
        )
    }

    /// Every password checked so far, in order.
    pub fn outcomes(&self) -> Vec<CheckOutcome> {
        lock(&self.shared.outcomes).clone()
    }

    /// Waits until at least `n` passwords have been checked (panics after
    /// `timeout`); returns all outcomes.
    pub fn wait_for_outcomes(&self, n: usize, timeout: Duration) -> Vec<CheckOutcome> {
        let deadline = Instant::now() + timeout;
        loop {
            let outcomes = self.outcomes();
            if outcomes.len() >= n {
                return outcomes;
            }
            assert!(
                Instant::now() < deadline,
                "fake RDS: {} of {n} checks after {timeout:?}: {outcomes:?}; errors: {:?}",
                outcomes.len(),
                self.errors()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Connections it dropped, and why (peer address first).
    pub fn errors(&self) -> Vec<String> {
        lock(&self.shared.errors).clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Checks passwords with `check` from now on.
    pub fn set_check(&self, check: TokenCheck) {
        *lock(&self.shared.check) = Arc::new(check);
    }
}

impl Drop for FakeRds {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Creates [`IAM_USER`]`@'%'` on `real` with no password (plugin
/// `mysql_native_password`) and ALL on `keyhole_test`. Idempotent.
pub fn ensure_mysql_iam_user(real: &MariaDb) {
    real.admin_sql(&format!(
        "CREATE USER IF NOT EXISTS '{IAM_USER}'@'%' IDENTIFIED VIA mysql_native_password USING ''; \
         GRANT ALL ON {DATABASE}.* TO '{IAM_USER}'@'%';"
    ));
}

fn tls_acceptor(pki: &TestPki, alpn: &[&[u8]]) -> TlsAcceptor {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&pki.server_cert)
        .expect("read the fake's certificate")
        .collect::<Result<_, _>>()
        .expect("parse the fake's certificate");
    let key = PrivateKeyDer::from_pem_file(&pki.server_key).expect("read the fake's key");
    let mut config = rustls::ServerConfig::builder_with_provider(keyhole::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("the fake's server TLS configuration");
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsAcceptor::from(Arc::new(config))
}

fn tls_connector(ca: &Path) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("read the real server's CA") {
        roots
            .add(cert.expect("parse the real server's CA"))
            .expect("add the real server's CA");
    }
    let config = rustls::ClientConfig::builder_with_provider(keyhole::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

fn io_err(what: &'static str) -> impl Fn(std::io::Error) -> String {
    move |e| format!("{what}: {e}")
}

async fn accept_loop(listener: TcpListener, ctx: Arc<Ctx>) {
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                lock(&ctx.shared.errors).push(format!("accept: {e}"));
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        ctx.shared.connections.fetch_add(1, Ordering::SeqCst);
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let result = match ctx.kind {
                Kind::Postgres(ask) => pg_connection(socket, peer, &ctx, ask).await,
                Kind::Mysql(switch) => mysql_connection(socket, peer, &ctx, switch).await,
            };
            if let Err(e) = result {
                lock(&ctx.shared.errors).push(format!("{peer}: {e}"));
            }
        });
    }
}

/// Splices `client` and `server` until both are done, as RDS's own proxy
/// layer would: each direction ends on its own (a client's close, with or
/// without close_notify, is passed on as a shutdown), and the server keeps
/// its connection, and the fake keyhole's, until it closes. A server busy
/// with a statement therefore stays busy when keyhole's client goes.
/// Errors at the end of a connection are not the fake's business.
async fn splice<C, S>(client: C, server: S)
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut server_rx, mut server_tx) = tokio::io::split(server);
    let up = async {
        let _ = tokio::io::copy(&mut client_rx, &mut server_tx).await;
        let _ = server_tx.shutdown().await;
    };
    let down = async {
        let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
        let _ = client_tx.shutdown().await;
    };
    tokio::join!(up, down);
}

async fn within<T>(fut: impl std::future::Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| Err(format!("handshake not done within {HANDSHAKE_TIMEOUT:?}")))
}

// --- Postgres ---------------------------------------------------------------------

async fn pg_connection(
    socket: TcpStream,
    peer: SocketAddr,
    ctx: &Ctx,
    ask: PgAsk,
) -> Result<(), String> {
    if let Some((client, server)) = within(pg_handshake(socket, peer, ctx, ask)).await? {
        splice(client, server).await;
    }
    Ok(())
}

/// Reads one length-prefixed startup-phase packet and decodes it.
async fn read_startup<R: AsyncRead + Unpin>(r: &mut R) -> Result<StartupPacket, String> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)
        .await
        .map_err(io_err("read a startup packet"))?;
    let n = u32::from_be_bytes(len) as usize;
    if !pg::STARTUP_PACKET_LENGTHS.contains(&n) {
        return Err(format!("startup packet length {n} out of range"));
    }
    let mut buf = BytesMut::zeroed(n);
    buf[..4].copy_from_slice(&len);
    r.read_exact(&mut buf[4..])
        .await
        .map_err(io_err("read a startup packet"))?;
    match pg::decode_startup(&mut buf) {
        Ok(Some(packet)) => Ok(packet),
        Ok(None) => Err("startup packet cut short".to_owned()),
        Err(e) => Err(format!("bad startup packet: {e}")),
    }
}

/// Reads one typed message: tag and body.
async fn read_message<R: AsyncRead + Unpin>(r: &mut R) -> Result<(u8, Vec<u8>), String> {
    let mut header = [0u8; 5];
    r.read_exact(&mut header)
        .await
        .map_err(io_err("read a message"))?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if !(4..=MAX_MESSAGE).contains(&len) {
        return Err(format!(
            "message '{}' has length {len}",
            char::from(header[0])
        ));
    }
    let mut body = vec![0u8; len - 4];
    r.read_exact(&mut body)
        .await
        .map_err(io_err("read a message"))?;
    Ok((header[0], body))
}

fn pg_message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    pg::Message {
        tag,
        body: bytes::Bytes::copy_from_slice(body),
    }
    .encode(&mut out);
    out.to_vec()
}

fn pg_auth_request(code: u32, data: &[u8]) -> Vec<u8> {
    let mut body = code.to_be_bytes().to_vec();
    body.extend_from_slice(data);
    pg_message(b'R', &body)
}

fn pg_error(code: &str, message: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (field, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', code),
        (b'M', message),
    ] {
        body.push(field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    pg_message(b'E', &body)
}

async fn send<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> Result<(), String> {
    w.write_all(bytes).await.map_err(io_err("write"))?;
    w.flush().await.map_err(io_err("flush"))
}

/// A TLS connection to the real cluster (SSLRequest, then TLS verified with
/// its CA for `localhost`).
async fn connect_real_pg(ctx: &Ctx) -> Result<client::TlsStream<TcpStream>, String> {
    let mut tcp = TcpStream::connect(("127.0.0.1", ctx.real_port))
        .await
        .map_err(io_err("connect to the real server"))?;
    send(&mut tcp, &pg::SSL_REQUEST).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer)
        .await
        .map_err(io_err("read the real server's SSLRequest answer"))?;
    if answer[0] != b'S' {
        return Err(format!(
            "the real server answered the SSLRequest with {:?}",
            char::from(answer[0])
        ));
    }
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    ctx.real_tls
        .connect(name, tcp)
        .await
        .map_err(io_err("TLS to the real server"))
}

/// Passes a CancelRequest on to the real server.
async fn forward_cancel(ctx: &Ctx, key: &CancelKey) -> Result<(), String> {
    let mut server = connect_real_pg(ctx).await?;
    send(&mut server, &key.cancel_request()).await?;
    // The server closes the connection when it is done with the request.
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), server.read_to_end(&mut sink)).await;
    Ok(())
}

type PgPair = (server::TlsStream<TcpStream>, client::TlsStream<TcpStream>);

async fn pg_handshake(
    mut socket: TcpStream,
    peer: SocketAddr,
    ctx: &Ctx,
    ask: PgAsk,
) -> Result<Option<PgPair>, String> {
    // Encryption negotiation, before any startup message.
    loop {
        let mut first = [0u8; 1];
        let n = socket
            .peek(&mut first)
            .await
            .map_err(io_err("read the first byte"))?;
        if n == 0 {
            return Err("closed before sending anything".to_owned());
        }
        if first[0] == pg::TLS_HANDSHAKE_RECORD {
            break; // direct TLS (PG17+ clients)
        }
        match read_startup(&mut socket).await? {
            StartupPacket::SslRequest => {
                send(&mut socket, b"S").await?;
                break;
            }
            StartupPacket::GssEncRequest => send(&mut socket, b"N").await?,
            StartupPacket::Cancel(key) => {
                forward_cancel(ctx, &key).await?;
                return Ok(None);
            }
            StartupPacket::Startup(msg) => {
                let database = msg.database.as_deref().unwrap_or(&msg.user);
                let text = format!(
                    "no pg_hba.conf entry for host \"{}\", user \"{}\", database \"{database}\", no encryption",
                    peer.ip(),
                    msg.user
                );
                let _ = send(&mut socket, &pg_error("28000", &text)).await;
                return Err(format!("{} tried to log in without TLS", msg.user));
            }
        }
    }
    let mut tls = ctx
        .acceptor
        .accept(socket)
        .await
        .map_err(io_err("TLS handshake with the client"))?;
    let startup = match read_startup(&mut tls).await? {
        StartupPacket::Startup(msg) => msg,
        StartupPacket::Cancel(key) => {
            forward_cancel(ctx, &key).await?;
            return Ok(None);
        }
        other => return Err(format!("{other:?} inside TLS")),
    };
    let user = startup.user.clone();

    let request = match ask {
        PgAsk::Cleartext => pg_auth_request(pg::auth::CLEARTEXT_PASSWORD, &[]),
        PgAsk::Md5 => {
            let salt = try_random_string(4, b"abcdefghijklmnopqrstuvwxyz").unwrap_or_default();
            pg_auth_request(pg::auth::MD5_PASSWORD, salt.as_bytes())
        }
        PgAsk::Scram => pg_auth_request(pg::auth::SASL, b"SCRAM-SHA-256\0\0"),
    };
    send(&mut tls, &request).await?;
    let (tag, body) = match read_message(&mut tls).await {
        Ok(reply) => reply,
        Err(e) => {
            ctx.outcome(
                &user,
                Err(format!("no answer to the {ask:?} request ({e})")),
            );
            return Ok(None);
        }
    };
    if tag != pg::tag::PASSWORD_MESSAGE {
        ctx.outcome(
            &user,
            Err(format!(
                "answered with message '{}', not a password",
                char::from(tag)
            )),
        );
        let _ = send(&mut tls, &pg_error("08P01", "expected a password message")).await;
        return Ok(None);
    }
    if ask != PgAsk::Cleartext {
        ctx.outcome(
            &user,
            Err(format!(
                "asked for {ask:?}; the client answered with {} bytes",
                body.len()
            )),
        );
        let text = format!("password authentication failed for user \"{user}\"");
        let _ = send(&mut tls, &pg_error("28P01", &text)).await;
        return Ok(None);
    }
    let password = match body.strip_suffix(&[0]).map(std::str::from_utf8) {
        Some(Ok(password)) => password,
        Some(Err(_)) => {
            ctx.outcome(&user, Err("the password is not UTF-8".to_owned()));
            let _ = send(&mut tls, &pg_error("08P01", "invalid password packet")).await;
            return Ok(None);
        }
        None => {
            ctx.outcome(&user, Err("the password is not NUL-terminated".to_owned()));
            let _ = send(&mut tls, &pg_error("08P01", "invalid password packet")).await;
            return Ok(None);
        }
    };
    if ctx.check(&user, password).is_err() {
        let text = format!("PAM authentication failed for user \"{user}\"");
        let _ = send(&mut tls, &pg_error("28P01", &text)).await;
        return Ok(None);
    }

    let mut server = match connect_real_pg(ctx).await {
        Ok(server) => server,
        Err(e) => {
            let _ = send(
                &mut tls,
                &pg_error("08001", "fake RDS: the real server is unreachable"),
            )
            .await;
            return Err(e);
        }
    };
    send(&mut server, &startup.raw).await?;
    Ok(Some((tls, server)))
}

// --- MySQL ----------------------------------------------------------------------------

async fn mysql_connection(
    socket: TcpStream,
    peer: SocketAddr,
    ctx: &Ctx,
    switch: SwitchData,
) -> Result<(), String> {
    if let Some((client, server)) = within(mysql_handshake(socket, peer, ctx, switch)).await? {
        splice(client, server).await;
    }
    Ok(())
}

async fn read_packet<R: AsyncRead + Unpin>(r: &mut R) -> Result<(u8, Vec<u8>), String> {
    let mut header = [0u8; 4];
    r.read_exact(&mut header)
        .await
        .map_err(io_err("read a packet"))?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], 0]) as usize;
    if len > MAX_MESSAGE {
        return Err(format!("packet of {len} bytes"));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)
        .await
        .map_err(io_err("read a packet"))?;
    Ok((header[3], payload))
}

async fn write_packet<W: AsyncWrite + Unpin>(
    w: &mut W,
    seq: u8,
    payload: &[u8],
) -> Result<(), String> {
    let mut out = BytesMut::new();
    my::encode_packet(&mut out, seq, payload);
    send(w, &out).await
}

async fn write_err<W: AsyncWrite + Unpin>(w: &mut W, seq: u8, code: u16, state: &str, text: &str) {
    let mut out = BytesMut::new();
    my::encode_err(&mut out, seq, code, state, text);
    let _ = send(w, &out).await;
}

/// The parts of the real server's HandshakeV10 the fake's greeting reuses.
struct RealGreeting {
    version: Vec<u8>,
    thread_id: [u8; 4],
    capabilities: u32,
    charset: u8,
    status: [u8; 2],
    /// The 10 reserved bytes (MariaDB's extended capabilities in the last 4).
    reserved: [u8; 10],
}

fn parse_real_greeting(p: &[u8]) -> Result<RealGreeting, String> {
    if p.first() != Some(&10) {
        return Err("the real server's greeting is not protocol 10".to_owned());
    }
    let nul = p[1..]
        .iter()
        .position(|&b| b == 0)
        .ok_or("the real server's version is not NUL-terminated")?;
    let fixed = p
        .get(1 + nul + 1..1 + nul + 1 + 31)
        .ok_or("the real server's greeting is truncated")?;
    // thread id 0..4, scramble 4..12, filler 12, caps low 13..15, charset 15,
    // status 16..18, caps high 18..20, auth data length 20, reserved 21..31.
    let low = u16::from_le_bytes([fixed[13], fixed[14]]);
    let high = u16::from_le_bytes([fixed[18], fixed[19]]);
    let mut reserved = [0u8; 10];
    reserved.copy_from_slice(&fixed[21..31]);
    Ok(RealGreeting {
        version: p[1..1 + nul].to_vec(),
        thread_id: [fixed[0], fixed[1], fixed[2], fixed[3]],
        capabilities: u32::from(low) | u32::from(high) << 16,
        charset: fixed[15],
        status: [fixed[16], fixed[17]],
        reserved,
    })
}

/// The fake's HandshakeV10: the real server's identity, its own scramble.
fn fake_greeting(real: &RealGreeting, scramble: &[u8; 20]) -> Vec<u8> {
    let capabilities = real.capabilities
        | caps::PROTOCOL_41
        | caps::SSL
        | caps::SECURE_CONNECTION
        | caps::PLUGIN_AUTH;
    let mut out = vec![10];
    out.extend_from_slice(&real.version);
    out.push(0);
    out.extend_from_slice(&real.thread_id);
    out.extend_from_slice(&scramble[..8]);
    out.push(0);
    out.extend_from_slice(&(capabilities as u16).to_le_bytes());
    out.push(real.charset);
    out.extend_from_slice(&real.status);
    out.extend_from_slice(&((capabilities >> 16) as u16).to_le_bytes());
    out.push(21);
    out.extend_from_slice(&real.reserved);
    out.extend_from_slice(&scramble[8..]);
    out.push(0);
    out.extend_from_slice(NATIVE_PLUGIN);
    out.push(0);
    out
}

/// A HandshakeResponse41 taken apart where the fake needs to change it.
struct ClientResponse<'a> {
    /// Capabilities, max packet size, charset, filler (MariaDB's extended
    /// capabilities in the last 4 bytes): kept verbatim.
    head: &'a [u8],
    capabilities: u32,
    user: &'a [u8],
    database: Option<&'a [u8]>,
    /// Everything after the plugin name (connection attributes).
    tail: &'a [u8],
}

fn take_cstr<'a>(rest: &mut &'a [u8], what: &str) -> Result<&'a [u8], String> {
    let end = rest
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| format!("{what} is not NUL-terminated"))?;
    let s = &rest[..end];
    *rest = &rest[end + 1..];
    Ok(s)
}

fn take<'a>(rest: &mut &'a [u8], n: usize, what: &str) -> Result<&'a [u8], String> {
    if rest.len() < n {
        return Err(format!("{what} is truncated"));
    }
    let (taken, tail) = rest.split_at(n);
    *rest = tail;
    Ok(taken)
}

fn take_lenenc(rest: &mut &[u8]) -> Result<usize, String> {
    let first = take(rest, 1, "a length")?[0];
    let width = match first {
        0..=0xfa => return Ok(usize::from(first)),
        0xfc => 2,
        0xfd => 3,
        0xfe => 8,
        _ => return Err(format!("bad length-encoded integer prefix {first:#x}")),
    };
    let bytes = take(rest, width, "a length")?;
    let mut value = 0u64;
    for (i, b) in bytes.iter().enumerate() {
        value |= u64::from(*b) << (8 * i);
    }
    usize::try_from(value).map_err(|_| "length out of range".to_owned())
}

fn parse_client_response(p: &[u8]) -> Result<ClientResponse<'_>, String> {
    if p.len() <= my::SSL_REQUEST_LEN {
        return Err("the handshake response is too short".to_owned());
    }
    let capabilities = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
    if capabilities & caps::PROTOCOL_41 == 0 {
        return Err("the client does not speak protocol 4.1".to_owned());
    }
    let (head, mut rest) = p.split_at(my::SSL_REQUEST_LEN);
    let user = take_cstr(&mut rest, "the user name")?;
    if capabilities & caps::PLUGIN_AUTH_LENENC_CLIENT_DATA != 0 {
        let n = take_lenenc(&mut rest)?;
        take(&mut rest, n, "the auth response")?;
    } else if capabilities & caps::SECURE_CONNECTION != 0 {
        let n = take(&mut rest, 1, "the auth response length")?[0];
        take(&mut rest, usize::from(n), "the auth response")?;
    } else {
        take_cstr(&mut rest, "the auth response")?;
    }
    let database = if capabilities & caps::CONNECT_WITH_DB != 0 && !rest.is_empty() {
        Some(take_cstr(&mut rest, "the database name")?)
    } else {
        None
    };
    if capabilities & caps::PLUGIN_AUTH != 0 && !rest.is_empty() {
        take_cstr(&mut rest, "the plugin name")?;
    }
    Ok(ClientResponse {
        head,
        capabilities,
        user,
        database,
        tail: rest,
    })
}

impl ClientResponse<'_> {
    /// The response for the real server: the same, but an empty auth response
    /// for `mysql_native_password`.
    fn for_real_server(&self) -> Vec<u8> {
        let mut out = self.head.to_vec();
        out.extend_from_slice(self.user);
        out.push(0);
        // An empty auth response is one zero byte in all three encodings.
        out.push(0);
        if self.capabilities & caps::CONNECT_WITH_DB != 0 {
            out.extend_from_slice(self.database.unwrap_or_default());
            out.push(0);
        }
        if self.capabilities & caps::PLUGIN_AUTH != 0 {
            out.extend_from_slice(NATIVE_PLUGIN);
            out.push(0);
        }
        out.extend_from_slice(self.tail);
        out
    }
}

type MyPair = (server::TlsStream<TcpStream>, client::TlsStream<TcpStream>);

async fn mysql_handshake(
    mut socket: TcpStream,
    peer: SocketAddr,
    ctx: &Ctx,
    switch: SwitchData,
) -> Result<Option<MyPair>, String> {
    // The real server first: its greeting shapes the fake's.
    let mut real = TcpStream::connect(("127.0.0.1", ctx.real_port))
        .await
        .map_err(io_err("connect to the real server"))?;
    let (_, greeting) = read_packet(&mut real).await?;
    if greeting.first() == Some(&my::reply::ERR) {
        let _ = write_packet(&mut socket, 0, &greeting).await;
        return Err(format!(
            "the real server sent an error instead of a greeting: {:?}",
            my::parse_err(&greeting)
        ));
    }
    let real_greeting = parse_real_greeting(&greeting)?;
    let scramble_text = try_random_string(
        20,
        b"!#$%&()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[]^_abcdefghijklmnopqrstuvwxyz{|}~",
    )
    .ok_or("no randomness for the scramble")?;
    let mut scramble = [0u8; 20];
    scramble.copy_from_slice(scramble_text.as_bytes());
    write_packet(&mut socket, 0, &fake_greeting(&real_greeting, &scramble)).await?;

    // SSLRequest, then TLS.
    let (seq, hello) = read_packet(&mut socket).await?;
    let hello_caps = match hello.get(..4) {
        Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        None => 0,
    };
    if hello.len() != my::SSL_REQUEST_LEN || hello_caps & caps::SSL == 0 {
        write_err(
            &mut socket,
            seq.wrapping_add(1),
            my::code::TLS_ERROR,
            "HY000",
            "Connections using insecure transport are prohibited while --require_secure_transport=ON.",
        )
        .await;
        return Err("the client did not ask for TLS".to_owned());
    }
    if seq != 1 {
        return Err(format!("the SSLRequest has sequence id {seq}, not 1"));
    }
    let mut tls = ctx
        .acceptor
        .accept(socket)
        .await
        .map_err(io_err("TLS handshake with the client"))?;

    let (seq, response) = read_packet(&mut tls).await?;
    if seq != 2 {
        write_err(
            &mut tls,
            seq.wrapping_add(1),
            1156,
            "08S01",
            "Got packets out of order",
        )
        .await;
        return Err(format!(
            "the handshake response has sequence id {seq}, not 2"
        ));
    }
    let parsed = match parse_client_response(&response) {
        Ok(parsed) => parsed,
        Err(e) => {
            write_err(
                &mut tls,
                3,
                my::code::BAD_HANDSHAKE,
                "08S01",
                "Bad handshake",
            )
            .await;
            return Err(e);
        }
    };
    let user = String::from_utf8_lossy(parsed.user).into_owned();

    // Switch to mysql_clear_password: the token comes back in clear, over TLS.
    let mut switch_request = vec![my::reply::AUTH_SWITCH];
    switch_request.extend_from_slice(CLEAR_PLUGIN);
    switch_request.push(0);
    if switch == SwitchData::WithScramble {
        switch_request.extend_from_slice(&scramble);
        switch_request.push(0);
    }
    write_packet(&mut tls, 3, &switch_request).await?;
    let (seq, reply) = match read_packet(&mut tls).await {
        Ok(reply) => reply,
        Err(e) => {
            ctx.outcome(
                &user,
                Err(format!("no answer to the AuthSwitchRequest ({e})")),
            );
            return Ok(None);
        }
    };
    if seq != 4 {
        ctx.outcome(
            &user,
            Err(format!("the password has sequence id {seq}, not 4")),
        );
        write_err(
            &mut tls,
            seq.wrapping_add(1),
            1156,
            "08S01",
            "Got packets out of order",
        )
        .await;
        return Ok(None);
    }
    let password = reply.strip_suffix(&[0]).unwrap_or(&reply);
    let Ok(password) = std::str::from_utf8(password) else {
        ctx.outcome(&user, Err("the password is not UTF-8".to_owned()));
        write_err(&mut tls, 5, 1045, "28000", "Access denied").await;
        return Ok(None);
    };
    if ctx.check(&user, password).is_err() {
        let text = format!(
            "Access denied for user '{user}'@'{}' (using password: YES)",
            peer.ip()
        );
        write_err(&mut tls, 5, 1045, "28000", &text).await;
        return Ok(None);
    }

    // Log in to the real server on the client's behalf.
    write_packet(&mut real, 1, &my::ssl_request(&response)).await?;
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let mut real = match ctx.real_tls.connect(name, real).await {
        Ok(real) => real,
        Err(e) => {
            write_err(
                &mut tls,
                5,
                2026,
                "HY000",
                "fake RDS: TLS to the real server failed",
            )
            .await;
            return Err(format!("TLS to the real server: {e}"));
        }
    };
    write_packet(&mut real, 2, &parsed.for_real_server()).await?;
    for _ in 0..4 {
        let (seq, answer) = read_packet(&mut real).await?;
        match answer.first() {
            Some(&my::reply::OK) => {
                write_packet(&mut tls, 5, &answer).await?;
                return Ok(Some((tls, real)));
            }
            Some(&my::reply::ERR) => {
                let _ = write_packet(&mut tls, 5, &answer).await;
                return Err(format!(
                    "the real server refused {user}: {:?}",
                    my::parse_err(&answer)
                ));
            }
            Some(&my::reply::AUTH_SWITCH) => {
                // Whatever it switches to, the password is empty.
                write_packet(&mut real, seq.wrapping_add(1), &[]).await?;
            }
            other => {
                write_err(
                    &mut tls,
                    5,
                    1045,
                    "28000",
                    "fake RDS: unexpected reply from the real server",
                )
                .await;
                return Err(format!("unexpected reply {other:?} from the real server"));
            }
        }
    }
    write_err(
        &mut tls,
        5,
        1045,
        "28000",
        "fake RDS: the real server keeps switching plugins",
    )
    .await;
    Err("the real server kept switching authentication plugins".to_owned())
}
