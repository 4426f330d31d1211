//! keyhole's HTTP client (`keyhole::http::client`: the metadata server,
//! OAuth2, the SQL Admin and IAM Credentials APIs) through a real proxy:
//! tinyproxy (the Debian package; scripts/test.sh installs it), run in the
//! foreground on a free port with a config written here, and killed when
//! the test ends.
//!
//! Shown: `HTTP_PROXY` / `HTTPS_PROXY` send a request through a CONNECT
//! tunnel (tinyproxy's log names it) unless `NO_PROXY` excludes it; proxy
//! basic authentication works, and a wrong password or a dead proxy is a
//! clear error that names the proxy and never its credentials; connections
//! are kept alive and reused, tunnels included; and the `keyhole` binary
//! reads the variables from its environment.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyhole::config::{CertKey, TlsMode, UpstreamTls};
use keyhole::http::client::{
    client_for, client_with_tls, Client, HttpError, HttpErrorKind, Request, Response, Url,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

const USER: &str = "keyhole";
const PASSWORD: &str = "s3cret.pass-word";

// ---------------------------------------------------------------------------
// tinyproxy

/// A tinyproxy in the foreground, killed on drop.
struct Tinyproxy {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

fn tinyproxy_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("tinyproxy"))
            .find(|candidate| candidate.is_file())
    });
    on_path
        .or_else(|| {
            ["/usr/bin/tinyproxy", "/usr/sbin/tinyproxy"]
                .into_iter()
                .map(PathBuf::from)
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "tinyproxy is not installed: apt-get install tinyproxy \
                 (scripts/test.sh installs it, see scripts/lib/packages.sh)"
            )
        })
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

impl Tinyproxy {
    /// Allows CONNECT to `ports` only; with `auth`, demands that user and
    /// password.
    fn start(ports: &[u16], auth: Option<(&str, &str)>) -> Tinyproxy {
        // The port was free a moment ago; another process may take it first.
        for _ in 0..5 {
            if let Some(proxy) = Tinyproxy::try_start(free_port(), ports, auth) {
                return proxy;
            }
        }
        panic!("tinyproxy did not start in five attempts");
    }

    fn try_start(port: u16, ports: &[u16], auth: Option<(&str, &str)>) -> Option<Tinyproxy> {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("tinyproxy.log");
        let mut config = format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 30\nMaxClients 50\n\
             LogFile \"{}\"\nLogLevel Info\nAllow 127.0.0.1\n",
            log.display()
        );
        for p in ports {
            config.push_str(&format!("ConnectPort {p}\n"));
        }
        if let Some((user, password)) = auth {
            config.push_str(&format!("BasicAuth {user} {password}\n"));
        }
        let file = dir.path().join("tinyproxy.conf");
        std::fs::write(&file, config).expect("write tinyproxy.conf");
        let mut child = Command::new(tinyproxy_binary())
            .arg("-d")
            .arg("-c")
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tinyproxy");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                // Most likely the port was taken.
                return None;
            }
            if StdStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(Tinyproxy {
                    child,
                    port,
                    log,
                    _dir: dir,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "tinyproxy did not listen on {port} within 10 s; its log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn url_with(&self, user: &str, password: &str) -> String {
        format!("http://{user}:{password}@127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many CONNECTs to 127.0.0.1:`port` the log shows.
    fn connects_to(&self, port: u16) -> usize {
        self.log()
            .matches(&format!("CONNECT 127.0.0.1:{port} HTTP/1.1"))
            .count()
    }

    /// Waits (5 s at most) until the log shows `count` CONNECTs to `port`.
    fn wait_for_connects(&self, port: u16, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.connects_to(port) < count {
            assert!(
                Instant::now() < deadline,
                "tinyproxy's log does not show {count} CONNECT to 127.0.0.1:{port}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Origin servers

/// An HTTP/1.1 server on 127.0.0.1 that keeps connections alive, answers
/// every request with `body`, counts the connections it accepted and keeps
/// each request head.
struct Origin {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
}

impl Origin {
    async fn start(body: &'static str) -> Origin {
        Origin::start_with(body, None).await
    }

    /// With `tls`, every connection is TLS first.
    async fn start_with(body: &'static str, tls: Option<Arc<rustls::ServerConfig>>) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (count, seen) = (accepted.clone(), heads.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let seen = seen.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => serve_connection(tcp, body, seen).await,
                        Some(config) => {
                            let acceptor = tokio_rustls::TlsAcceptor::from(config);
                            if let Ok(stream) = acceptor.accept(tcp).await {
                                serve_connection(stream, body, seen).await;
                            }
                        }
                    }
                });
            }
        });
        Origin {
            addr,
            accepted,
            heads,
        }
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().map(|h| h.clone()).unwrap_or_default()
    }
}

async fn serve_connection<S>(mut stream: S, body: &'static str, seen: Arc<Mutex<Vec<String>>>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let length = head
                .to_ascii_lowercase()
                .lines()
                .find_map(|l| l.strip_prefix("content-length:").map(str::to_owned))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() < end + 4 + length {
                break;
            }
            buf.drain(..end + 4 + length);
            if let Ok(mut heads) = seen.lock() {
                heads.push(head);
            }
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            if stream.write_all(reply.as_bytes()).await.is_err() {
                return;
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The project's test PKI (certs/generate.sh) in `dir`: the server config,
/// and a client config that trusts its CA.
fn test_pki(dir: &Path) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/generate.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(dir)
        .output()
        .expect("run certs/generate.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let server = keyhole::tls::server_config(
        &CertKey {
            cert: dir.join("server.crt"),
            key: dir.join("server.key"),
        },
        None,
    )
    .expect("server config");
    let client = keyhole::tls::client_config(
        &UpstreamTls {
            ca_file: Some(dir.join("ca.crt")),
            server_name: "127.0.0.1".into(),
            mode: TlsMode::VerifyFull,
            client_cert: None,
        },
        None,
    )
    .expect("client config");
    (server, client)
}

// ---------------------------------------------------------------------------
// The client

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn url(text: &str) -> Url {
    Url::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

/// One GET, bounded so a hang fails the test.
async fn get(client: &Client, target: &str) -> Result<Response, HttpError> {
    tokio::time::timeout(
        Duration::from_secs(10),
        client.send(Request::get(url(target))),
    )
    .await
    .expect("an answer within 10 s")
}

#[tokio::test]
async fn http_proxy_tunnels_http_requests_and_keeps_the_tunnel() {
    let origin = Origin::start("hello").await;
    let proxy = Tinyproxy::start(&[origin.port()], None);
    let client = client_for(&env(&[("HTTP_PROXY", &proxy.url()), ("NO_PROXY", "")]));

    let target = format!("http://127.0.0.1:{}/v1/hello?token=SECRET", origin.port());
    let response = get(&client, &target)
        .await
        .expect("a reply through the proxy");
    assert_eq!(response.status, 200);
    assert_eq!(&response.body[..], b"hello");
    proxy.wait_for_connects(origin.port(), 1);
    // The origin saw tinyproxy's connection, and the request in origin form.
    let heads = origin.heads();
    assert!(
        heads[0].starts_with("GET /v1/hello?token=SECRET HTTP/1.1\r\n"),
        "{heads:?}"
    );

    // The second request goes through the same tunnel.
    get(&client, &target).await.expect("a second reply");
    assert_eq!(origin.heads().len(), 2);
    assert_eq!(proxy.connects_to(origin.port()), 1, "{}", proxy.log());
    assert_eq!(origin.accepted(), 1);
}

#[tokio::test]
async fn https_proxy_tunnels_https_requests_verified_end_to_end() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (server, trusting) = test_pki(dir.path());
    let secure = Origin::start_with(r#"{"ok":true}"#, Some(server)).await;
    let plain = Origin::start("plain").await;
    let proxy = Tinyproxy::start(&[secure.port(), plain.port()], None);
    let proxies = env(&[("HTTPS_PROXY", &proxy.url())]);

    let client = client_with_tls(&proxies, trusting);
    let response = get(
        &client,
        &format!("https://127.0.0.1:{}/token", secure.port()),
    )
    .await
    .expect("a reply over TLS through the proxy");
    assert_eq!(&response.body[..], br#"{"ok":true}"#);
    proxy.wait_for_connects(secure.port(), 1);

    // HTTPS_PROXY is for https:// only: an http:// URL goes direct.
    get(&client, &format!("http://127.0.0.1:{}/", plain.port()))
        .await
        .expect("a direct reply");
    assert_eq!(plain.heads().len(), 1);
    // Through the proxy, TLS is still verified: the system trust store does
    // not know the test CA.
    let err = get(
        &client_for(&proxies),
        &format!("https://127.0.0.1:{}/token", secure.port()),
    )
    .await
    .expect_err("an untrusted server");
    assert!(matches!(err.kind(), HttpErrorKind::Tls(_)), "{err:?}");
    proxy.wait_for_connects(secure.port(), 2);
    assert_eq!(proxy.connects_to(plain.port()), 0, "{}", proxy.log());
}

#[tokio::test]
async fn no_proxy_sends_requests_around_the_proxy() {
    let excluded = Origin::start("direct").await;
    let proxied = Origin::start("proxied").await;
    let proxy = Tinyproxy::start(&[excluded.port(), proxied.port()], None);
    let excluded_url = format!("http://127.0.0.1:{}/", excluded.port());
    let proxied_url = format!("http://127.0.0.1:{}/", proxied.port());

    for no_proxy in [
        "127.0.0.1".to_owned(),
        "localhost, 127.0.0.0/8".to_owned(),
        "*".to_owned(),
        format!("127.0.0.1:{}", excluded.port()),
    ] {
        let client = client_for(&env(&[
            ("HTTP_PROXY", &proxy.url()),
            ("NO_PROXY", &no_proxy),
        ]));
        let response = get(&client, &excluded_url)
            .await
            .unwrap_or_else(|e| panic!("NO_PROXY={no_proxy}: {e}"));
        assert_eq!(&response.body[..], b"direct");
    }
    // An entry with another port does not exclude it; lower case works too.
    let client = client_for(&env(&[
        ("http_proxy", &proxy.url()),
        ("no_proxy", &format!("127.0.0.1:{}", excluded.port())),
    ]));
    let response = get(&client, &proxied_url).await.expect("through the proxy");
    assert_eq!(&response.body[..], b"proxied");

    // tinyproxy logged the proxied request, and never the excluded ones.
    proxy.wait_for_connects(proxied.port(), 1);
    assert_eq!(proxy.connects_to(excluded.port()), 0, "{}", proxy.log());
    assert_eq!(excluded.heads().len(), 4);
}

#[tokio::test]
async fn proxy_basic_authentication() {
    let origin = Origin::start("authenticated").await;
    let proxy = Tinyproxy::start(&[origin.port()], Some((USER, PASSWORD)));
    let target = format!("http://127.0.0.1:{}/token", origin.port());
    let named = format!("the proxy {} (HTTP_PROXY)", proxy.url());

    let client = client_for(&env(&[("HTTP_PROXY", &proxy.url_with(USER, PASSWORD))]));
    let response = get(&client, &target)
        .await
        .expect("a reply with credentials");
    assert_eq!(&response.body[..], b"authenticated");
    proxy.wait_for_connects(origin.port(), 1);

    let client = client_for(&env(&[(
        "HTTP_PROXY",
        &proxy.url_with(USER, "wrong-password"),
    )]));
    // tinyproxy answers a wrong password with 401 (a missing one with 407);
    // hyper-util's tunnel keeps neither, so the client asks again.
    let err = get(&client, &target).await.expect_err("a wrong password");
    assert!(matches!(err.kind(), HttpErrorKind::Proxy(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "{target}: {named} refused the user name and password in HTTP_PROXY \
             (401 Unauthorized)"
        )
    );
    assert!(!format!("{err} {err:?}").contains("wrong-password"));
    assert!(!format!("{err} {err:?}").contains(&format!("{USER}:")));

    let client = client_for(&env(&[("HTTP_PROXY", &proxy.url())]));
    let err = get(&client, &target).await.expect_err("no credentials");
    assert_eq!(
        err.to_string(),
        format!(
            "{target}: {named} requires a user name and password (407 Proxy Authentication \
             Required); give them in HTTP_PROXY as http://USER:PASSWORD@HOST:PORT"
        )
    );
    assert_eq!(origin.heads().len(), 1);
}

#[tokio::test]
async fn a_dead_proxy_is_a_clear_error_naming_it_without_credentials() {
    let origin = Origin::start("unreached").await;
    let proxy = Tinyproxy::start(&[origin.port()], None);
    let (dead_url, dead_port) = (proxy.url(), proxy.port);
    let with_credentials = proxy.url_with(USER, PASSWORD);
    drop(proxy);

    let client = client_for(&env(&[
        ("HTTPS_PROXY", &with_credentials),
        ("HTTP_PROXY", &with_credentials),
    ]));
    for (target, variable) in [
        (
            format!(
                "http://127.0.0.1:{}/token?refresh_token=SECRET",
                origin.port()
            ),
            "HTTP_PROXY",
        ),
        (
            "https://oauth2.googleapis.com/token".to_owned(),
            "HTTPS_PROXY",
        ),
    ] {
        let err = get(&client, &target).await.expect_err("a dead proxy");
        assert!(matches!(err.kind(), HttpErrorKind::Proxy(_)), "{err:?}");
        let shown = target.split('?').next().unwrap_or_default();
        assert_eq!(
            err.to_string(),
            format!(
                "{shown}: cannot reach the proxy {dead_url} ({variable}): \
                 connection to 127.0.0.1:{dead_port} refused"
            )
        );
        let all = format!("{err} {err:?}");
        for secret in [PASSWORD, "SECRET", "keyhole:"] {
            assert!(!all.contains(secret), "{all}");
        }
    }
    assert_eq!(origin.accepted(), 0);
}

#[tokio::test]
async fn connections_are_kept_alive_and_reused() {
    let origin = Origin::start("{}").await;
    let client = client_for(&HashMap::new());
    let target = format!("http://127.0.0.1:{}/computeMetadata/v1/x", origin.port());
    for _ in 0..3 {
        let response = get(&client, &target).await.expect("a reply");
        assert_eq!(&response.body[..], b"{}");
    }
    assert_eq!(origin.heads().len(), 3);
    assert_eq!(origin.accepted(), 1, "three requests, one connection");
    // No request asks the server to close.
    for head in origin.heads() {
        assert!(
            !head.to_ascii_lowercase().contains("connection: close"),
            "{head}"
        );
    }
}

// ---------------------------------------------------------------------------
// The binary

/// `keyhole token gcp` against a fake metadata server, in a clean
/// environment plus `extra`; the token it printed, or its stderr.
fn keyhole_token_gcp(metadata: SocketAddr, extra: &[(&str, &str)]) -> Result<String, String> {
    let home = tempfile::tempdir().expect("temp dir");
    let mut command = Command::new(env!("CARGO_BIN_EXE_keyhole"));
    command
        .args(["token", "gcp"])
        .env_clear()
        .env("HOME", home.path())
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GCE_METADATA_HOST", metadata.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in extra {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("run keyhole token gcp");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("keyhole token gcp ran for more than 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("keyhole's output");
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(stderr)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_binary_takes_its_proxy_from_the_environment() {
    const TOKEN: &str =
        r#"{"access_token":"ya29.through-the-proxy","expires_in":3599,"token_type":"Bearer"}"#;
    let metadata = Origin::start(TOKEN).await;
    let proxy = Tinyproxy::start(&[metadata.port()], Some((USER, PASSWORD)));
    let through = proxy.url_with(USER, PASSWORD);

    let token = tokio::task::spawn_blocking(move || {
        keyhole_token_gcp(metadata.addr, &[("HTTP_PROXY", &through), ("NO_PROXY", "")])
    });
    let token = token.await.expect("the command").expect("a token");
    assert_eq!(token, "ya29.through-the-proxy");
    proxy.wait_for_connects(metadata.port(), 1);

    // NO_PROXY in the environment takes it around the proxy.
    let through = proxy.url_with(USER, PASSWORD);
    let token = tokio::task::spawn_blocking(move || {
        keyhole_token_gcp(
            metadata.addr,
            &[("http_proxy", &through), ("no_proxy", "127.0.0.1")],
        )
    });
    let token = token.await.expect("the command").expect("a token");
    assert_eq!(token, "ya29.through-the-proxy");

    // A wrong password: the error names the proxy and not the password.
    let wrong = proxy.url_with(USER, "wrong-password");
    let err = tokio::task::spawn_blocking(move || {
        keyhole_token_gcp(metadata.addr, &[("HTTP_PROXY", &wrong)])
    });
    let err = err
        .await
        .expect("the command")
        .expect_err("a wrong password");
    assert!(
        err.contains(&format!(
            "the proxy {} (HTTP_PROXY) refused the user name and password",
            proxy.url()
        )),
        "{err}"
    );
    assert!(!err.contains("wrong-password"), "{err}");
    // One CONNECT for the first token; none for the second; two for the
    // wrong password (the tunnel, then the client asking for the status).
    proxy.wait_for_connects(metadata.port(), 3);
    assert_eq!(proxy.connects_to(metadata.port()), 3, "{}", proxy.log());
}
