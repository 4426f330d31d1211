//! A TLS 1.3 server whose records the test writes itself, for what a
//! well-behaved TLS stack never sends: records appended to the server's
//! last handshake flight, handshake messages split across records where the
//! test chooses, floods of empty records, alerts and key updates, records
//! with more plaintext than TLS allows.
//!
//! rustls (the buffered `ServerConnection`) does the server's side of the
//! handshake, so keyhole meets a real TLS 1.3 server up to the server's
//! Finished. The server config's key log hands this module the server's
//! application traffic secret the moment rustls derives it (before the
//! client's Finished arrives), and [`Sealer`] seals records under it with
//! ring (RFC 8446 section 5.2: nonce = IV xor sequence number, the inner
//! content type after the plaintext, the header as additional data; keys
//! and IVs by HKDF-Expand-Label, section 7.3). rustls itself sends nothing
//! after its flight (no session tickets: their sequence numbers would clash
//! with the test's), and still reads what the client sends, key updates
//! included, so [`RawServer::read_exact`] checks keyhole's records with an
//! independent implementation.
//!
//! - [`RawServer::accept`]`(listener, config, inject)`: the handshake, with
//!   `inject(&mut sealer)`'s records written in the same write as the
//!   server's flight (so they arrive with its Finished); returns once the
//!   client's Finished is read.
//! - `server.tx`: the [`Sealer`] for the server's later records;
//!   [`RawServer::send`] writes bytes as they are.
//! - [`handshake_message`], [`new_session_ticket`]: handshake messages to
//!   seal whole or in pieces.

use std::sync::{Arc, Mutex};

use ring::{aead, hkdf};
use rustls::{CipherSuite, KeyLog, ServerConfig, ServerConnection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const ALERT: u8 = 21;
pub const HANDSHAKE: u8 = 22;
pub const APPLICATION_DATA: u8 = 23;
pub const NEW_SESSION_TICKET: u8 = 4;
pub const KEY_UPDATE: u8 = 24;
/// Alert level warning, description user_canceled: the one warning TLS 1.3 has.
pub const USER_CANCELED: [u8; 2] = [1, 90];

/// Every secret rustls logs, in order (one connection per config).
#[derive(Debug, Default)]
pub struct SecretLog {
    secrets: Mutex<Vec<(String, Vec<u8>)>>,
}

impl KeyLog for SecretLog {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        self.secrets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((label.to_owned(), secret.to_vec()));
    }

    fn will_log(&self, _label: &str) -> bool {
        true
    }
}

impl SecretLog {
    pub fn latest(&self, label: &str) -> Option<Vec<u8>> {
        self.secrets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .rev()
            .find(|(l, _)| l == label)
            .map(|(_, s)| s.clone())
    }
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-Expand-Label (RFC 8446 section 7.1) with an empty context.
fn expand_label(alg: hkdf::Algorithm, secret: &[u8], label: &[u8], len: usize) -> Vec<u8> {
    let full = [&b"tls13 "[..], label].concat();
    let info = [
        &(len as u16).to_be_bytes()[..],
        &[full.len() as u8],
        &full,
        &[0u8],
    ]
    .concat();
    let mut out = vec![0u8; len];
    hkdf::Prk::new_less_safe(alg, secret)
        .expand(&[&info], Len(len))
        .expect("HKDF output length")
        .fill(&mut out)
        .expect("HKDF fill");
    out
}

/// One direction of TLS 1.3 records: traffic secret, key, IV, sequence number.
pub struct Sealer {
    aead: &'static aead::Algorithm,
    hkdf: hkdf::Algorithm,
    secret: Vec<u8>,
    key: aead::LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
}

impl Sealer {
    pub fn tls13(suite: CipherSuite, secret: &[u8]) -> Sealer {
        let (aead, hkdf) = match suite {
            CipherSuite::TLS13_AES_128_GCM_SHA256 => (&aead::AES_128_GCM, hkdf::HKDF_SHA256),
            CipherSuite::TLS13_AES_256_GCM_SHA384 => (&aead::AES_256_GCM, hkdf::HKDF_SHA384),
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => {
                (&aead::CHACHA20_POLY1305, hkdf::HKDF_SHA256)
            }
            other => panic!("not a TLS 1.3 suite: {other:?}"),
        };
        let (key, iv) = Self::derive(aead, hkdf, secret);
        Sealer {
            aead,
            hkdf,
            secret: secret.to_vec(),
            key,
            iv,
            seq: 0,
        }
    }

    fn derive(
        alg: &'static aead::Algorithm,
        hkdf: hkdf::Algorithm,
        secret: &[u8],
    ) -> (aead::LessSafeKey, [u8; aead::NONCE_LEN]) {
        let key = expand_label(hkdf, secret, b"key", alg.key_len());
        let iv = expand_label(hkdf, secret, b"iv", aead::NONCE_LEN);
        let key = aead::LessSafeKey::new(aead::UnboundKey::new(alg, &key).expect("key"));
        (key, iv.try_into().expect("12-byte IV"))
    }

    /// One record of `content_type` with `payload`, whatever its length
    /// (a test may well want one TLS forbids).
    pub fn seal(&mut self, content_type: u8, payload: &[u8]) -> Vec<u8> {
        let mut inner = payload.to_vec();
        inner.push(content_type);
        let body = inner.len() + self.aead.tag_len();
        let header = [APPLICATION_DATA, 3, 3, (body >> 8) as u8, body as u8];
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.key
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(header),
                &mut inner,
            )
            .expect("seal");
        self.seq += 1;
        [&header[..], &inner].concat()
    }

    pub fn data(&mut self, payload: &[u8]) -> Vec<u8> {
        self.seal(APPLICATION_DATA, payload)
    }

    /// A KeyUpdate in a record of its own, after which this side's records
    /// are under the next secret.
    pub fn key_update(&mut self, requested: bool) -> Vec<u8> {
        let record = self.seal(
            HANDSHAKE,
            &handshake_message(KEY_UPDATE, &[u8::from(requested)]),
        );
        self.rekey();
        record
    }

    /// The next traffic secret (RFC 8446 section 7.2), sequence number 0.
    pub fn rekey(&mut self) {
        self.secret = expand_label(
            self.hkdf,
            &self.secret,
            b"traffic upd",
            hkdf::KeyType::len(&self.hkdf),
        );
        let (key, iv) = Self::derive(self.aead, self.hkdf, &self.secret);
        self.key = key;
        self.iv = iv;
        self.seq = 0;
    }
}

/// A handshake message: type, 24-bit length, body.
pub fn handshake_message(kind: u8, body: &[u8]) -> Vec<u8> {
    let len = (body.len() as u32).to_be_bytes();
    [&[kind, len[1], len[2], len[3]][..], body].concat()
}

/// A well-formed TLS 1.3 NewSessionTicket (RFC 8446 section 4.6.1) with an
/// opaque `ticket` (no server will take it back; the client only stores it).
pub fn new_session_ticket(ticket: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend(3600u32.to_be_bytes()); // ticket_lifetime
    body.extend(0x0102_0304u32.to_be_bytes()); // ticket_age_add
    body.extend([1, 0]); // ticket_nonce: one byte
    body.extend((ticket.len() as u16).to_be_bytes());
    body.extend(ticket);
    body.extend([0, 0]); // no extensions
    handshake_message(NEW_SESSION_TICKET, &body)
}

/// The server's end: rustls for the handshake and for reading, the test's
/// [`Sealer`] for writing.
pub struct RawServer {
    pub tcp: TcpStream,
    pub conn: ServerConnection,
    /// Seals the server's records after its Finished.
    pub tx: Sealer,
}

impl RawServer {
    /// Accepts one connection on `listener` and does the server's handshake
    /// with `config` (TLS 1.3 only; its key log and ticket count are
    /// replaced). The records `inject` returns follow the server's Finished
    /// in the same write.
    pub async fn accept(
        listener: TcpListener,
        config: &ServerConfig,
        inject: impl FnOnce(&mut Sealer) -> Vec<u8>,
    ) -> RawServer {
        let log = Arc::new(SecretLog::default());
        let mut config = config.clone();
        config.key_log = log.clone();
        config.send_tls13_tickets = 0;
        let (mut tcp, _) = listener.accept().await.expect("accept");
        let mut conn = ServerConnection::new(Arc::new(config)).expect("server connection");
        while !conn.wants_write() {
            read_some(&mut tcp, &mut conn)
                .await
                .expect("the client's hello");
        }
        let mut flight = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut flight).expect("the server's flight");
        }
        let suite = conn
            .negotiated_cipher_suite()
            .expect("a negotiated suite")
            .suite();
        let secret = log
            .latest("SERVER_TRAFFIC_SECRET_0")
            .expect("rustls logged the server's traffic secret with its Finished");
        let mut tx = Sealer::tls13(suite, &secret);
        flight.extend(inject(&mut tx));
        tcp.write_all(&flight).await.expect("write the flight");
        while conn.is_handshaking() {
            read_some(&mut tcp, &mut conn)
                .await
                .expect("the client's Finished");
        }
        RawServer { tcp, conn, tx }
    }

    /// Writes `bytes` (records sealed by `tx`, or anything else) as they are.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).await.expect("raw write");
    }

    /// `n` bytes of the client's application data, through rustls's record
    /// layer (which follows the client's key updates); Err with rustls's
    /// words when a record does not open or the client hangs up first.
    pub async fn read_exact(&mut self, n: usize) -> Result<Vec<u8>, String> {
        let mut got = Vec::with_capacity(n);
        let mut buf = vec![0u8; n];
        while got.len() < n {
            match std::io::Read::read(&mut self.conn.reader(), &mut buf[..n - got.len()]) {
                Ok(0) => return Err("the client closed the connection".into()),
                Ok(k) => got.extend_from_slice(&buf[..k]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    read_some(&mut self.tcp, &mut self.conn).await?
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(got)
    }
}

/// One read from the socket into rustls, and rustls's processing of it.
async fn read_some(tcp: &mut TcpStream, conn: &mut ServerConnection) -> Result<(), String> {
    let mut buf = vec![0u8; 32 * 1024];
    let n = tcp.read(&mut buf).await.map_err(|e| e.to_string())?;
    if n == 0 {
        return Err("the client closed the connection".into());
    }
    let mut unread = &buf[..n];
    while !unread.is_empty() {
        conn.read_tls(&mut unread).map_err(|e| e.to_string())?;
        conn.process_new_packets().map_err(|e| e.to_string())?;
    }
    Ok(())
}
