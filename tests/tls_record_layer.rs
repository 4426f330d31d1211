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
//!
//! And, with a server whose records the test seals itself
//! (`support::tls_records`): records that arrive with the server's Finished
//! (a ticket in pieces, a key update asking for keyhole's, data), handshake
//! messages split across records (reassembled, or refused where TLS forbids
//! them), and floods of records without data (cut off at temper's limits).

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
use support::tls_records::{
    handshake_message, new_session_ticket, RawServer, Sealer, ALERT, HANDSHAKE, KEY_UPDATE,
    NEW_SESSION_TICKET, USER_CANCELED,
};

/// A guard against hangs, not a timing assertion.
const LIMIT: Duration = Duration::from_secs(60);

struct Setup {
    acceptor: TlsAcceptor,
    /// The acceptor's config, for servers the test drives itself.
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    _pki: TestPki,
}

fn setup(version: &'static SupportedProtocolVersion, cipher: &str) -> Setup {
    setup_with(version, cipher, |_| {})
}

/// [`setup`], with `tweak` applied to the server's config.
fn setup_with(
    version: &'static SupportedProtocolVersion,
    cipher: &str,
    tweak: impl FnOnce(&mut ServerConfig),
) -> Setup {
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
    let mut server = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
    tweak(&mut server);
    let server = Arc::new(server);
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
        acceptor: TlsAcceptor::from(server.clone()),
        server,
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

/// A server whose records after its handshake the test writes (see
/// `support::tls_records`): `inject`'s records arrive in the same write as
/// the server's Finished, that is, in keyhole's last handshake read.
async fn connect_raw(
    setup: &Setup,
    kernel_tls: KernelTls,
    inject: impl FnOnce(&mut Sealer) -> Vec<u8> + Send + 'static,
) -> (TlsStream, RawServer) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let config = setup.server.clone();
    let server = tokio::spawn(async move { RawServer::accept(listener, &config, inject).await });
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    let client = handshake::connect(setup.client.clone(), name, tcp, kernel_tls)
        .await
        .expect("keyhole's handshake");
    let server = tokio::time::timeout(LIMIT, server)
        .await
        .expect("hang")
        .expect("join");
    (client, server)
}

async fn read_exactly(client: &mut TlsStream, n: usize) -> std::io::Result<Vec<u8>> {
    let mut got = vec![0u8; n];
    tokio::time::timeout(LIMIT, client.read_exact(&mut got))
        .await
        .expect("hang")?;
    Ok(got)
}

/// The error keyhole's next read ends with (the one the user sees).
async fn read_error(client: &mut TlsStream) -> String {
    let mut buf = [0u8; 256];
    match tokio::time::timeout(LIMIT, client.read(&mut buf))
        .await
        .expect("hang")
    {
        Ok(n) => panic!("expected an error, read {n} bytes: {:?}", &buf[..n]),
        Err(e) => e.to_string(),
    }
}

/// Issue 15, point 2: a session ticket whose first record comes with the
/// server's Finished (in keyhole's last handshake read) and whose rest
/// comes later. rustls used to decrypt that first record in place and keep
/// it, waiting for the rest; keyhole's record layer then got the plaintext
/// as if it were a record and refused it as bad_record_mac. Now rustls
/// never sees records after the Finished, and keyhole reassembles the
/// ticket.
#[tokio::test]
async fn a_ticket_split_between_the_last_flight_and_later_records_is_read_whole() {
    let setup = setup(&rustls::version::TLS13, "AES_256_GCM");
    let ticket = new_session_ticket(&[0x5a; 48]);
    let (first, rest) = ticket.split_at(20);
    let (first, rest) = (first.to_vec(), rest.to_vec());
    let (mut client, mut server) =
        connect_raw(&setup, KernelTls::Off, move |tx| tx.seal(HANDSHAKE, &first)).await;
    let mut later = server.tx.seal(HANDSHAKE, &rest[..10]);
    later.extend(server.tx.seal(HANDSHAKE, &rest[10..]));
    later.extend(server.tx.data(b"after the ticket"));
    server.send(&later).await;
    let got = read_exactly(&mut client, 16)
        .await
        .expect("the ticket is reassembled, the data read");
    assert_eq!(got, b"after the ticket");
    // Both directions still agree on the keys.
    client.write_all(b"ping").await.expect("write");
    client.flush().await.expect("flush");
    assert_eq!(
        server
            .read_exact(4)
            .await
            .expect("the server reads keyhole"),
        b"ping"
    );
}

/// Issue 15, point 2: a KeyUpdate asking keyhole to rekey, sent right after
/// the server's Finished. rustls used to process it during the handshake,
/// queue its answer (a KeyUpdate under the old key) and rekey; the answer
/// was dropped at the switch-over, so the server could not read keyhole's
/// next record. Now keyhole's record layer reads the KeyUpdate and answers
/// it before its next record.
#[tokio::test]
async fn a_key_update_requested_in_the_last_flight_is_answered() {
    let setup = setup(&rustls::version::TLS13, "CHACHA20");
    let (mut client, mut server) =
        connect_raw(&setup, KernelTls::Off, |tx| tx.key_update(true)).await;
    let data = server.tx.data(b"under the new key");
    server.send(&data).await;
    assert_eq!(
        read_exactly(&mut client, 17)
            .await
            .expect("keyhole follows the server's key update"),
        b"under the new key"
    );
    client.write_all(b"ping").await.expect("write");
    client.flush().await.expect("flush");
    assert_eq!(
        server
            .read_exact(4)
            .await
            .expect("keyhole announced its new key before using it"),
        b"ping"
    );
}

/// Application data right after the server's Finished (TLS 1.3 allows a
/// server to send it before the client's Finished arrives): in keyhole's
/// last handshake read, it is the record layer's first record, not a
/// handshake failure.
#[tokio::test]
async fn data_right_after_the_servers_finished_is_read() {
    let setup = setup(&rustls::version::TLS13, "AES_128_GCM");
    let (mut client, _server) =
        connect_raw(&setup, KernelTls::Off, |tx| tx.data(b"half a round trip")).await;
    assert_eq!(
        read_exactly(&mut client, 17).await.expect("read"),
        b"half a round trip"
    );
}

/// Issue 15, point 4: a server that sends records of at most 32 bytes
/// (rustls's `max_fragment_size`) splits its session tickets across
/// records; keyhole reassembles them, and the next connection resumes with
/// one. With `--kernel-tls=auto` too (the kernel's records where this
/// kernel has TLS).
#[tokio::test]
async fn session_tickets_split_across_records_are_reassembled() {
    for kernel_tls in [KernelTls::Off, KernelTls::Auto] {
        let setup = setup_with(&rustls::version::TLS13, "AES_128_GCM", |server| {
            server.max_fragment_size = Some(32);
        });
        let (mut client, mut server) = connect_with(&setup, kernel_tls).await;
        server.write_all(b"hello").await.expect("server write");
        server.flush().await.expect("flush");
        assert_eq!(
            read_exactly(&mut client, 5)
                .await
                .unwrap_or_else(|e| panic!("{kernel_tls:?}: tickets in pieces: {e}")),
            b"hello"
        );
        drop((client, server));
        let (_client, server) = connect_with(&setup, kernel_tls).await;
        assert_eq!(
            server.get_ref().1.handshake_kind(),
            Some(HandshakeKind::Resumed),
            "{kernel_tls:?}: keyhole kept a ticket that came in pieces"
        );
    }
}

/// Issue 15, point 4: a KeyUpdate split across two records is followed
/// like a whole one. With `--kernel-tls=auto` too (the kernel's records
/// where this kernel has TLS).
#[tokio::test]
async fn a_key_update_split_across_records_is_followed() {
    let setup = setup(&rustls::version::TLS13, "AES_128_GCM");
    for kernel_tls in [KernelTls::Off, KernelTls::Auto] {
        let (mut client, mut server) = connect_raw(&setup, kernel_tls, |_| Vec::new()).await;
        let update = handshake_message(KEY_UPDATE, &[1]);
        let mut records = server.tx.seal(HANDSHAKE, &update[..2]);
        records.extend(server.tx.seal(HANDSHAKE, &update[2..]));
        server.tx.rekey();
        records.extend(server.tx.data(b"rekeyed"));
        server.send(&records).await;
        let got = read_exactly(&mut client, 7)
            .await
            .unwrap_or_else(|e| panic!("{kernel_tls:?}: {e}"));
        assert_eq!(got, b"rekeyed", "{kernel_tls:?}");
        client.write_all(b"pong").await.expect("write");
        client.flush().await.expect("flush");
        let got = server
            .read_exact(4)
            .await
            .unwrap_or_else(|e| panic!("{kernel_tls:?}: the server reads keyhole: {e}"));
        assert_eq!(got, b"pong", "{kernel_tls:?}");
    }
}

/// Issue 15, point 4: what keyhole refuses while a handshake message is in
/// pieces: data between its pieces (RFC 8446 section 5.1), a message larger
/// than 64 KiB, and a key update that does not end its record. With
/// `--kernel-tls=auto` too.
#[tokio::test]
async fn split_handshake_messages_are_refused_where_tls_forbids_them() {
    let setup = setup(&rustls::version::TLS13, "AES_256_GCM");
    let ticket = new_session_ticket(&[7; 40]);
    for kernel_tls in [KernelTls::Off, KernelTls::Auto] {
        let (mut client, mut server) = connect_raw(&setup, kernel_tls, |_| Vec::new()).await;
        let mut records = server.tx.seal(HANDSHAKE, &ticket[..30]);
        records.extend(server.tx.data(b"interleaved"));
        records.extend(server.tx.seal(HANDSHAKE, &ticket[30..]));
        server.send(&records).await;
        let err = read_error(&mut client).await;
        assert!(
            err.contains(
                "the server sent application data in the middle of a handshake message split \
                 across records"
            ),
            "{kernel_tls:?}: error the user sees: {err}"
        );

        let (mut client, mut server) = connect_raw(&setup, kernel_tls, |_| Vec::new()).await;
        // A header announcing 65536 bytes: refused before they arrive.
        let record = server
            .tx
            .seal(HANDSHAKE, &[NEW_SESSION_TICKET, 1, 0, 0, 0, 0]);
        server.send(&record).await;
        let err = read_error(&mut client).await;
        assert!(
            err.contains("post-handshake TLS message (type 4) of 65536 bytes")
                && err.contains("at most 65535"),
            "{kernel_tls:?}: error the user sees: {err}"
        );

        let (mut client, mut server) = connect_raw(&setup, kernel_tls, |_| Vec::new()).await;
        let mut both = handshake_message(KEY_UPDATE, &[0]);
        both.extend(&ticket[..10]);
        let record = server.tx.seal(HANDSHAKE, &both);
        server.send(&record).await;
        let err = read_error(&mut client).await;
        assert!(
            err.contains("data after a key update in the same record"),
            "{kernel_tls:?}: error the user sees: {err}"
        );
    }
}

/// Issue 15, point 3, live: a server that sends only records without data
/// is cut off with the limit's own words, right at the limit; so is a
/// record with more than 2^14 bytes of plaintext (record_overflow). (Each
/// flood is sent after keyhole has read the data before it: an error ends
/// the read, data opened with it or not.)
#[tokio::test]
async fn a_server_flooding_records_without_data_is_cut_off_with_a_clear_error() {
    let setup = setup(&rustls::version::TLS13, "AES_128_GCM");

    // 32 empty records in a row are tolerated; data resets the count; 33 are not.
    let (mut client, mut server) = connect_raw(&setup, KernelTls::Off, |_| Vec::new()).await;
    let mut records = Vec::new();
    for _ in 0..32 {
        records.extend(server.tx.data(b""));
    }
    records.extend(server.tx.data(b"x"));
    server.send(&records).await;
    assert_eq!(read_exactly(&mut client, 1).await.expect("read"), b"x");
    let mut records = Vec::new();
    for _ in 0..33 {
        records.extend(server.tx.data(b""));
    }
    server.send(&records).await;
    let err = read_error(&mut client).await;
    assert!(
        err.contains("more than 32 empty TLS records in a row"),
        "error the user sees: {err}"
    );

    // Warning alerts: four in the whole connection, data between them or not.
    let (mut client, mut server) = connect_raw(&setup, KernelTls::Off, |_| Vec::new()).await;
    let mut records = Vec::new();
    for _ in 0..4 {
        records.extend(server.tx.seal(ALERT, &USER_CANCELED));
        records.extend(server.tx.data(b"y"));
    }
    server.send(&records).await;
    assert_eq!(read_exactly(&mut client, 4).await.expect("read"), b"yyyy");
    let alert = server.tx.seal(ALERT, &USER_CANCELED);
    server.send(&alert).await;
    let err = read_error(&mut client).await;
    assert!(
        err.contains("more than 4 TLS warning alerts"),
        "error the user sees: {err}"
    );

    // Key updates: 32 between two records of data, not 33.
    let (mut client, mut server) = connect_raw(&setup, KernelTls::Off, |_| Vec::new()).await;
    let mut records = Vec::new();
    for _ in 0..32 {
        records.extend(server.tx.key_update(false));
    }
    records.extend(server.tx.data(b"z"));
    server.send(&records).await;
    assert_eq!(read_exactly(&mut client, 1).await.expect("read"), b"z");
    let mut records = Vec::new();
    for _ in 0..33 {
        records.extend(server.tx.key_update(false));
    }
    server.send(&records).await;
    let err = read_error(&mut client).await;
    assert!(
        err.contains("more than 32 TLS key updates without data between them"),
        "error the user sees: {err}"
    );

    // 2^14 bytes of plaintext are fine; one more is record_overflow.
    let (mut client, mut server) = connect_raw(&setup, KernelTls::Off, |_| Vec::new()).await;
    let full = server.tx.data(&pattern(16 * 1024, 9));
    server.send(&full).await;
    assert!(read_exactly(&mut client, 16 * 1024).await.expect("read") == pattern(16 * 1024, 9));
    let over = server.tx.data(&pattern(16 * 1024 + 1, 9));
    server.send(&over).await;
    let err = read_error(&mut client).await;
    assert!(
        err.contains("record_overflow"),
        "error the user sees: {err}"
    );
}
