//! keyhole's upstream TLS record layer against an independent
//! implementation: a rustls server (tokio-rustls, rustls's own buffered
//! record layer) for every cipher suite keyhole offers, TLS 1.3 and 1.2.
//! The real PostgreSQL and MariaDB servers (OpenSSL) are the other check:
//! every session in the other test files goes through this layer.
//!
//! Covered here: data both ways through `AsyncRead`/`AsyncWrite` and through
//! the splice, records of every size up to the maximum, a key update the
//! server asks for mid-stream (keyhole answers and rekeys its own side),
//! session tickets (a second connection resumes), close_notify both ways,
//! a tampered or unprotected record from the server ending the connection
//! with a clear error, and no buffer held by an idle connection.

mod support;

use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, HandshakeKind, RootCertStore, ServerConfig, SupportedProtocolVersion};
use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream as ServerTls;
use tokio_rustls::TlsAcceptor;

use keyhole::splice::Splice;
use keyhole::tls::ktls::{self, Availability};
use keyhole::tls::{handshake, KernelTls, TlsStream};
use support::certs::TestPki;

/// A guard against hangs, not a timing assertion.
const LIMIT: Duration = Duration::from_secs(60);

struct Setup {
    acceptor: TlsAcceptor,
    client: Arc<ClientConfig>,
    _pki: TestPki,
}

fn setup(version: &'static SupportedProtocolVersion, cipher: &str) -> Setup {
    let pki = TestPki::generate(&[]);
    let base = rustls::crypto::ring::default_provider();
    let suites: Vec<_> = base
        .cipher_suites
        .iter()
        .copied()
        .filter(|s| s.version() == version && format!("{:?}", s.suite()).contains(cipher))
        .collect();
    assert!(!suites.is_empty(), "no {cipher} suite for {version:?}");
    let provider = Arc::new(CryptoProvider {
        cipher_suites: suites,
        ..base
    });
    let certs = CertificateDer::pem_file_iter(&pki.server_cert)
        .expect("server cert")
        .collect::<Result<Vec<_>, _>>()
        .expect("server cert");
    let key = PrivateKeyDer::from_pem_file(&pki.server_key).expect("server key");
    let server = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&pki.ca).expect("ca") {
        roots.add(ca.expect("ca")).expect("add ca");
    }
    let mut client = ClientConfig::builder_with_provider(keyhole::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.enable_secret_extraction = true;
    Setup {
        acceptor: TlsAcceptor::from(Arc::new(server)),
        client: Arc::new(client),
        _pki: pki,
    }
}

async fn connect(setup: &Setup) -> (TlsStream, ServerTls<TcpStream>) {
    connect_with(setup, KernelTls::Off).await
}

async fn connect_with(setup: &Setup, kernel_tls: KernelTls) -> (TlsStream, ServerTls<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = setup.acceptor.clone();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        acceptor.accept(tcp).await.expect("server handshake")
    });
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    let client = handshake::connect(setup.client.clone(), name, tcp, kernel_tls)
        .await
        .expect("keyhole's handshake");
    (client, server.await.expect("join"))
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

const SUITES: [(&str, &str); 5] = [
    ("1.3", "AES_128_GCM"),
    ("1.3", "AES_256_GCM"),
    ("1.3", "CHACHA20"),
    ("1.2", "AES_256_GCM"),
    ("1.2", "CHACHA20"),
];

fn version(name: &str) -> &'static SupportedProtocolVersion {
    if name == "1.3" {
        &rustls::version::TLS13
    } else {
        &rustls::version::TLS12
    }
}

#[tokio::test]
async fn every_suite_carries_data_both_ways_and_closes_cleanly() {
    for (v, cipher) in SUITES {
        let setup = setup(version(v), cipher);
        let (client, server) = connect(&setup).await;
        assert!(
            !client.is_kernel(),
            "--kernel-tls=off keeps keyhole's records"
        );
        exchange_and_close(v, cipher, client, server).await;
    }
}

/// With `--kernel-tls=auto` the kernel takes the records of each suite it
/// carries, and keyhole's record layer the rest; either way the bytes,
/// key updates and closes are the same. Where this kernel has no TLS ULP
/// only the fallback runs, and the test says so.
#[tokio::test]
async fn kernel_tls_auto_takes_the_suites_the_kernel_offers_and_falls_back_for_the_rest() {
    let available = ktls::availability();
    if let Availability::Unavailable { reason } = available {
        println!("skipped: kernel TLS unavailable here: {reason}; only the fallback to keyhole's record layer is checked");
    }
    for (v, cipher) in SUITES {
        let kernel_version = if v == "1.3" {
            ktls::TlsVersion::Tls13
        } else {
            ktls::TlsVersion::Tls12
        };
        let kernel_cipher = match cipher {
            "AES_128_GCM" => ktls::Cipher::Aes128Gcm,
            "AES_256_GCM" => ktls::Cipher::Aes256Gcm,
            _ => ktls::Cipher::Chacha20Poly1305,
        };
        let setup = setup(version(v), cipher);
        let (client, server) = connect_with(&setup, KernelTls::Auto).await;
        assert_eq!(
            client.is_kernel(),
            available.supports(kernel_version, kernel_cipher),
            "TLS {v} {cipher}: the kernel carries exactly the suites it offers"
        );
        exchange_and_close(v, cipher, client, server).await;
    }
    for (v, cipher) in [("1.3", "AES_256_GCM"), ("1.2", "AES_128_GCM")] {
        splice_both_ways(v, cipher, KernelTls::Auto).await;
    }
    key_updates_both_ways(KernelTls::Auto).await;
}

async fn exchange_and_close(
    v: &str,
    cipher: &str,
    mut client: TlsStream,
    mut server: ServerTls<TcpStream>,
) {
    // Sizes around the record boundaries, and one of several records.
    for len in [1, 100, 16 * 1024 - 1, 16 * 1024, 16 * 1024 + 1, 200_000] {
        let sent = pattern(len, len as u8);
        client.write_all(&sent).await.expect("client write");
        client.flush().await.expect("flush");
        let mut got = vec![0u8; len];
        server.read_exact(&mut got).await.expect("server read");
        assert!(got == sent, "TLS {v} {cipher}: {len} bytes to the server");
        server.write_all(&got).await.expect("server write");
        server.flush().await.expect("flush");
        let mut back = vec![0u8; len];
        tokio::time::timeout(LIMIT, client.read_exact(&mut back))
            .await
            .expect("hang")
            .expect("client read");
        assert!(back == sent, "TLS {v} {cipher}: {len} bytes back");
    }
    assert_eq!(
        client.buffers_held(),
        0,
        "TLS {v} {cipher}: an idle stream holds no buffer"
    );
    // close_notify from keyhole: the server sees a clean end.
    client.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    server
        .read_to_end(&mut rest)
        .await
        .unwrap_or_else(|e| panic!("TLS {v} {cipher}: not a clean close: {e}"));
    assert!(rest.is_empty());
    // close_notify from the server: keyhole reads the end of the stream.
    server.shutdown().await.expect("server shutdown");
    let mut tail = Vec::new();
    client
        .read_to_end(&mut tail)
        .await
        .unwrap_or_else(|e| panic!("TLS {v} {cipher}: server's close: {e}"));
    assert!(tail.is_empty());
}

/// More small records in one read than a buffer has segments: every one is
/// opened, none waits for more bytes from a server that has nothing more
/// to say.
#[tokio::test]
async fn a_read_of_many_small_records_delivers_every_one() {
    let setup = setup(&rustls::version::TLS13, "AES_128_GCM");
    let (mut client, mut server) = connect(&setup).await;
    let sent = pattern(100 * 10, 3);
    for piece in sent.chunks(10) {
        server.write_all(piece).await.expect("server write");
        server.flush().await.expect("flush: one record per piece");
    }
    let mut got = vec![0u8; sent.len()];
    tokio::time::timeout(LIMIT, client.read_exact(&mut got))
        .await
        .expect("keyhole waited for bytes it already had")
        .expect("client read");
    assert!(got == sent, "100 records of 10 bytes, in order");
}

#[tokio::test]
async fn the_splice_moves_records_in_place_both_ways() {
    for (v, cipher) in [("1.3", "AES_256_GCM"), ("1.2", "AES_128_GCM")] {
        splice_both_ways(v, cipher, KernelTls::Off).await;
    }
}

async fn splice_both_ways(v: &str, cipher: &str, kernel_tls: KernelTls) {
    let setup = setup(version(v), cipher);
    let (mut tls, mut server) = connect_with(&setup, kernel_tls).await;
    let (mut app, mut app_leg) = duplex(256 * 1024);
    let splice = tokio::spawn(async move {
        let mut s = Splice::new(&mut app_leg, &mut tls);
        let r = (&mut s).await;
        (r.map_err(|e| e.to_string()), s.transferred())
    });
    let up = pattern(3_000_000, 1);
    let down = pattern(5_000_000, 2);
    let up_sent = up.clone();
    let writer = tokio::spawn(async move {
        app.write_all(&up_sent).await.expect("app write");
        app.shutdown().await.expect("app shutdown");
        let mut got = Vec::new();
        app.read_to_end(&mut got).await.expect("app read");
        got
    });
    let mut got = Vec::new();
    server.read_to_end(&mut got).await.expect("server read");
    assert!(got == up, "TLS {v} {cipher}: client to server");
    server.write_all(&down).await.expect("server write");
    server.shutdown().await.expect("server shutdown");
    let back = tokio::time::timeout(LIMIT, writer)
        .await
        .expect("hang")
        .expect("join");
    assert!(back == down, "TLS {v} {cipher}: server to client");
    let (result, transferred) = splice.await.expect("join");
    result.expect("a clean end");
    assert_eq!(transferred.client_to_server, up.len() as u64);
    assert_eq!(transferred.server_to_client, down.len() as u64);
}

#[tokio::test]
async fn a_key_update_the_server_asks_for_is_followed_both_ways() {
    key_updates_both_ways(KernelTls::Off).await;
}

async fn key_updates_both_ways(kernel_tls: KernelTls) {
    let setup = setup(&rustls::version::TLS13, "AES_256_GCM");
    let (mut client, mut server) = connect_with(&setup, kernel_tls).await;
    for round in 0..3u8 {
        // The server rekeys and asks keyhole to do the same.
        server
            .get_mut()
            .1
            .refresh_traffic_keys()
            .expect("key update");
        let down = pattern(40_000, round);
        server.write_all(&down).await.expect("server write");
        server.flush().await.expect("flush");
        let mut got = vec![0u8; down.len()];
        tokio::time::timeout(LIMIT, client.read_exact(&mut got))
            .await
            .expect("hang")
            .expect("read after the server's key update");
        assert!(
            got == down,
            "round {round}: data under the server's new key"
        );
        // keyhole's next write goes out after its own key update.
        let up = pattern(30_000, round + 7);
        client.write_all(&up).await.expect("client write");
        client.flush().await.expect("flush");
        let mut got = vec![0u8; up.len()];
        tokio::time::timeout(LIMIT, server.read_exact(&mut got))
            .await
            .expect("hang")
            .expect("the server reads keyhole's data under keyhole's new key");
        assert!(got == up, "round {round}: data under keyhole's new key");
    }
}

#[tokio::test]
async fn session_tickets_let_the_next_connection_resume() {
    let setup = setup(&rustls::version::TLS13, "AES_128_GCM");
    let (mut client, mut server) = connect(&setup).await;
    assert_eq!(
        server.get_ref().1.handshake_kind(),
        Some(HandshakeKind::Full)
    );
    // The tickets arrive after the handshake; one exchange reads them.
    server.write_all(b"hello").await.expect("server write");
    server.flush().await.expect("flush");
    let mut got = [0u8; 5];
    client.read_exact(&mut got).await.expect("read");
    drop((client, server));
    let (_client, server) = connect(&setup).await;
    assert_eq!(
        server.get_ref().1.handshake_kind(),
        Some(HandshakeKind::Resumed),
        "keyhole kept the server's ticket and resumed with it"
    );
}

#[tokio::test]
async fn a_tampered_record_ends_the_connection_with_a_clear_error() {
    let setup = setup(&rustls::version::TLS13, "AES_256_GCM");
    let (mut client, mut server) = connect(&setup).await;
    // A record header that claims application data, and bytes no key made.
    let (tcp, _) = server.get_mut();
    let mut forged = vec![23u8, 3, 3, 0, 40];
    forged.extend(std::iter::repeat_n(0xab, 40));
    tcp.write_all(&forged).await.expect("raw write");
    let err = tokio::time::timeout(LIMIT, client.read(&mut [0u8; 64]))
        .await
        .expect("hang")
        .expect_err("a forged record must not be read");
    assert!(
        err.to_string().contains("does not decrypt"),
        "error the user sees: {err}"
    );

    let (mut client, mut server) = connect(&setup).await;
    let (tcp, _) = server.get_mut();
    tcp.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        .await
        .expect("raw write");
    let err = tokio::time::timeout(LIMIT, client.read(&mut [0u8; 64]))
        .await
        .expect("hang")
        .expect_err("plaintext must not be read as TLS");
    let text = err.to_string();
    assert!(
        text.contains("more than TLS allows") || text.contains("unprotected record"),
        "error the user sees: {text}"
    );
}
