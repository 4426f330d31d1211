//! Shared by the TLS targets: the cipher suites keyhole's record layer
//! takes, their keys, a reference record sealer and opener written from the
//! RFCs with ring's AEADs (independent of `keyhole::tls::record`), records
//! described by fuzz input, and an in-memory rustls handshake that yields a
//! rustls client connection plus the traffic keys of its receive direction.

use std::cell::RefCell;
use std::io::Read;
use std::sync::{Arc, OnceLock};

use keyhole::tls::record::{DirectionKeys, RecordLayer, HEADER_LEN, MAX_PLAINTEXT};
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use rustls::crypto::cipher::{AeadKey, Iv};
use rustls::crypto::{ring as provider, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{
    ClientConfig, ClientConnection, ConnectionTrafficSecrets, ProtocolVersion, RootCertStore,
    ServerConfig, ServerConnection, SupportedCipherSuite,
};

use super::input::Input;

const TAG_LEN: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suite {
    Tls13Aes128,
    Tls13Chacha,
    Tls13Aes256,
    Tls12Aes128,
    Tls12Chacha,
    Tls12Aes256,
}

pub const SUITES: [Suite; 6] = [
    Suite::Tls13Aes128,
    Suite::Tls13Chacha,
    Suite::Tls13Aes256,
    Suite::Tls12Aes128,
    Suite::Tls12Chacha,
    Suite::Tls12Aes256,
];

impl Suite {
    pub fn pick(byte: u8) -> Suite {
        SUITES[usize::from(byte) % SUITES.len()]
    }

    pub fn tls13(self) -> bool {
        matches!(
            self,
            Suite::Tls13Aes128 | Suite::Tls13Chacha | Suite::Tls13Aes256
        )
    }

    pub fn version(self) -> ProtocolVersion {
        if self.tls13() {
            ProtocolVersion::TLSv1_3
        } else {
            ProtocolVersion::TLSv1_2
        }
    }

    fn gcm(self) -> bool {
        !matches!(self, Suite::Tls13Chacha | Suite::Tls12Chacha)
    }

    fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            Suite::Tls13Aes128 | Suite::Tls12Aes128 => &aead::AES_128_GCM,
            Suite::Tls13Aes256 | Suite::Tls12Aes256 => &aead::AES_256_GCM,
            Suite::Tls13Chacha | Suite::Tls12Chacha => &aead::CHACHA20_POLY1305,
        }
    }

    fn rustls(self) -> SupportedCipherSuite {
        use provider::cipher_suite as cs;
        match self {
            Suite::Tls13Aes128 => cs::TLS13_AES_128_GCM_SHA256,
            Suite::Tls13Chacha => cs::TLS13_CHACHA20_POLY1305_SHA256,
            Suite::Tls13Aes256 => cs::TLS13_AES_256_GCM_SHA384,
            Suite::Tls12Aes128 => cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            Suite::Tls12Chacha => cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            Suite::Tls12Aes256 => cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        }
    }
}

/// One direction's traffic keys, both as rustls hands them to keyhole and
/// as bytes for the reference code.
pub struct Keys {
    pub suite: Suite,
    key: Vec<u8>,
    iv: [u8; NONCE_LEN],
    secrets: ConnectionTrafficSecrets,
}

impl Keys {
    pub fn from_secrets(suite: Suite, secrets: ConnectionTrafficSecrets) -> Keys {
        let (key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv }
            | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
            | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (
                key.as_ref().to_vec(),
                iv.as_ref().try_into().expect("12-byte IV"),
            ),
            _ => panic!("a suite keyhole does not take"),
        };
        assert_eq!(key.len(), suite.algorithm().key_len());
        Keys {
            suite,
            key,
            iv,
            secrets,
        }
    }

    /// Fixed keys (same every run): rustls only builds 32-byte keys from
    /// bytes, so the AES-128 suites take theirs from a handshake instead.
    fn fixed(suite: Suite) -> Keys {
        let key = AeadKey::from([0x4b; 32]);
        let iv = Iv::from([0x1f; NONCE_LEN]);
        let secrets = match suite {
            Suite::Tls13Chacha | Suite::Tls12Chacha => {
                ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv }
            }
            Suite::Tls13Aes256 | Suite::Tls12Aes256 => {
                ConnectionTrafficSecrets::Aes256Gcm { key, iv }
            }
            _ => unreachable!("AES-128 keys come from a handshake"),
        };
        Keys::from_secrets(suite, secrets)
    }

    /// keyhole's record layer with these keys both ways, at `seq`.
    pub fn layer(&self, seq: u64) -> RecordLayer {
        let keys = || DirectionKeys::new(seq, &self.secrets).expect("keyhole takes the suite");
        RecordLayer::new(self.suite.version(), keys(), keys()).expect("keyhole takes the version")
    }

    fn ring_key(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(self.suite.algorithm(), &self.key).expect("key length"))
    }

    /// The per-record nonce: IV xor the sequence number (TLS 1.3, RFC 7905).
    fn xor_nonce(&self, seq: u64) -> [u8; NONCE_LEN] {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(seq.to_be_bytes()) {
            *n ^= s;
        }
        nonce
    }
}

thread_local! {
    static AES128_KEYS: RefCell<Vec<(Suite, Arc<Keys>)>> = const { RefCell::new(Vec::new()) };
}

/// Keys for `suite`: fixed, or (AES-128) from one handshake per thread.
pub fn keys(suite: Suite) -> Arc<Keys> {
    if !matches!(suite, Suite::Tls13Aes128 | Suite::Tls12Aes128) {
        return Arc::new(Keys::fixed(suite));
    }
    AES128_KEYS.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some((_, keys)) = cache.iter().find(|(s, _)| *s == suite) {
            return keys.clone();
        }
        let keys = Arc::new(handshake(suite).keys);
        cache.push((suite, keys.clone()));
        keys
    })
}

/// A record as fuzz input describes it.
#[derive(Debug, Clone)]
pub struct Spec {
    /// TLS 1.3: the inner content type (0 puts none: the last non-zero
    /// byte of the plaintext then reads as one). TLS 1.2: the header's.
    pub content_type: u8,
    pub plaintext: Vec<u8>,
    /// TLS 1.3 zero padding after the content type.
    pub padding: usize,
    /// TLS 1.3: the outer type (23 unless the input says otherwise).
    pub outer_type: u8,
    pub version: [u8; 2],
    /// TLS 1.2 AES-GCM: the explicit nonce (rustls's choice, IV xor
    /// sequence number, unless the input picks one).
    pub explicit_nonce: Option<[u8; 8]>,
}

impl Spec {
    /// Reads a record description. Lengths go past the limits on purpose;
    /// `big` counts the records near 2^14 bytes, two at most per input (they
    /// cost the most, and two reach every boundary).
    pub fn read(input: &mut Input, big: &mut u32) -> Spec {
        let flags = input.u8();
        let content_type = match flags & 7 {
            0..=3 => 23,
            4 => 21,
            5 => 22,
            _ => input.u8(),
        };
        let len = usize::from(input.u16());
        let len = if flags & 8 != 0 && *big < 2 {
            *big += 1;
            MAX_PLAINTEXT - 8 + len % 40
        } else {
            len % 600
        };
        let plaintext = if flags & 16 != 0 {
            input.bytes(len).to_vec()
        } else {
            let seed = input.u8();
            (0..len)
                .map(|i| seed.wrapping_add((i as u8).wrapping_mul(31)))
                .collect()
        };
        let padding = match flags >> 5 {
            0..=3 => 0,
            4 | 5 => usize::from(input.u8()),
            _ => usize::from(input.u16()) % 600,
        };
        let outer_type = if flags & 7 == 7 { input.u8() } else { 23 };
        let version = if flags & 7 == 6 && flags & 32 != 0 {
            [input.u8(), input.u8()]
        } else {
            [3, 3]
        };
        let explicit_nonce =
            (flags & 64 != 0 && flags & 16 != 0).then(|| input.u64().to_be_bytes());
        Spec {
            content_type,
            plaintext,
            padding,
            outer_type,
            version,
            explicit_nonce,
        }
    }
}

/// Seals `spec` as record `seq` under `keys`, as a conforming peer would,
/// except for what the spec puts out of bounds. Lengths that do not fit
/// the 16-bit field are cut down to fit.
pub fn seal(keys: &Keys, seq: u64, spec: &Spec) -> Vec<u8> {
    let key = keys.ring_key();
    let fit = |n: usize| n.min(usize::from(u16::MAX) - 64);
    if keys.suite.tls13() {
        let mut inner = spec.plaintext.clone();
        inner.truncate(fit(inner.len()));
        inner.push(spec.content_type);
        inner.resize(fit(inner.len() + spec.padding), 0);
        let len = (inner.len() + TAG_LEN) as u16;
        let [hi, lo] = len.to_be_bytes();
        let header = [spec.outer_type, spec.version[0], spec.version[1], hi, lo];
        let nonce = Nonce::assume_unique_for_key(keys.xor_nonce(seq));
        key.seal_in_place_append_tag(nonce, Aad::from(header), &mut inner)
            .expect("seal");
        [&header[..], &inner].concat()
    } else {
        let mut body = spec.plaintext.clone();
        body.truncate(fit(body.len()));
        let aad = tls12_aad(seq, spec.content_type, spec.version, body.len());
        let (nonce, explicit) = if keys.suite.gcm() {
            let explicit = spec
                .explicit_nonce
                .unwrap_or_else(|| keys.xor_nonce(seq)[4..].try_into().expect("8 bytes"));
            let mut nonce = [0u8; NONCE_LEN];
            nonce[..4].copy_from_slice(&keys.iv[..4]);
            nonce[4..].copy_from_slice(&explicit);
            (nonce, explicit.to_vec())
        } else {
            (keys.xor_nonce(seq), Vec::new())
        };
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut body,
        )
        .expect("seal");
        let len = ((explicit.len() + body.len()) as u16).to_be_bytes();
        let header = [
            spec.content_type,
            spec.version[0],
            spec.version[1],
            len[0],
            len[1],
        ];
        [&header[..], &explicit, &body].concat()
    }
}

/// RFC 5246 section 6.2.3.3: seq_num, type, version, length.
fn tls12_aad(seq: u64, content_type: u8, version: [u8; 2], len: usize) -> [u8; 13] {
    let mut aad = [0u8; 13];
    aad[..8].copy_from_slice(&seq.to_be_bytes());
    aad[8] = content_type;
    aad[9..11].copy_from_slice(&version);
    aad[11..].copy_from_slice(&(len as u16).to_be_bytes());
    aad
}

/// The body length a record header announces, and whether it is over the
/// ciphertext limit (RFC 8446 section 5.2: 2^14 + 256; RFC 5246 section
/// 6.2.3: 2^14 + 2048).
pub fn reference_length(suite: Suite, header: &[u8]) -> (usize, bool) {
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    let limit = MAX_PLAINTEXT + if suite.tls13() { 256 } else { 2048 };
    (len, len > limit)
}

/// Opens one whole record as RFC 8446 (section 5) and RFC 5246 (section
/// 6.2.3.3, with RFC 5288 and RFC 7905) say: the content type and the
/// plaintext, or why not.
pub fn reference_open(keys: &Keys, seq: u64, record: &[u8]) -> Result<(u8, Vec<u8>), &'static str> {
    let header: [u8; HEADER_LEN] = record[..HEADER_LEN].try_into().expect("a header");
    let (len, over) = reference_length(keys.suite, &header);
    assert_eq!(record.len(), HEADER_LEN + len);
    if over {
        return Err("record_overflow (ciphertext)");
    }
    let key = keys.ring_key();
    let mut body = record[HEADER_LEN..].to_vec();
    if keys.suite.tls13() {
        // "The outer opaque_type field ... is always set to ... 23."
        if header[0] != 23 {
            return Err("unexpected_message (unprotected record)");
        }
        let nonce = Nonce::assume_unique_for_key(keys.xor_nonce(seq));
        let inner = key
            .open_in_place(nonce, Aad::from(header), &mut body)
            .map_err(|_| "bad_record_mac")?;
        // Section 5.4: the full TLSInnerPlaintext MUST NOT exceed 2^14 + 1.
        if inner.len() > MAX_PLAINTEXT + 1 {
            return Err("record_overflow (inner plaintext)");
        }
        let end = inner
            .iter()
            .rposition(|&b| b != 0)
            .ok_or("unexpected_message (no content type)")?;
        Ok((inner[end], inner[..end].to_vec()))
    } else {
        let (nonce, body) = if keys.suite.gcm() {
            if body.len() < 8 {
                return Err("bad_record_mac (no explicit nonce)");
            }
            let mut nonce = [0u8; NONCE_LEN];
            nonce[..4].copy_from_slice(&keys.iv[..4]);
            nonce[4..].copy_from_slice(&body[..8]);
            (nonce, &mut body[8..])
        } else {
            (keys.xor_nonce(seq), &mut body[..])
        };
        if body.len() < TAG_LEN {
            return Err("bad_record_mac (shorter than a tag)");
        }
        let plain_len = body.len() - TAG_LEN;
        let aad = tls12_aad(seq, header[0], [header[1], header[2]], plain_len);
        let plain = key
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), body)
            .map_err(|_| "bad_record_mac")?;
        if plain.len() > MAX_PLAINTEXT {
            return Err("record_overflow (plaintext)");
        }
        Ok((header[0], plain.to_vec()))
    }
}

/// A rustls client that has finished its handshake with a rustls server
/// in memory, and the server's sending keys (the client's receiving ones).
pub struct Session {
    pub client: ClientConnection,
    pub keys: Keys,
    /// The sequence number of the next record the server would send.
    pub seq: u64,
}

struct Configs {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

fn configs(suite: Suite) -> &'static Configs {
    static CERT: OnceLock<(CertificateDer<'static>, Vec<u8>)> = OnceLock::new();
    static CONFIGS: OnceLock<Vec<Configs>> = OnceLock::new();
    let configs = CONFIGS.get_or_init(|| {
        let (cert, key) = CERT.get_or_init(|| {
            let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
                .expect("self-signed certificate");
            (made.cert.der().clone(), made.key_pair.serialize_der())
        });
        SUITES
            .iter()
            .map(|&suite| {
                let provider = Arc::new(CryptoProvider {
                    cipher_suites: vec![suite.rustls()],
                    ..provider::default_provider()
                });
                let versions: &[&rustls::SupportedProtocolVersion] = if suite.tls13() {
                    &[&rustls::version::TLS13]
                } else {
                    &[&rustls::version::TLS12]
                };
                let mut server = ServerConfig::builder_with_provider(provider.clone())
                    .with_protocol_versions(versions)
                    .expect("versions")
                    .with_no_client_auth()
                    .with_single_cert(
                        vec![cert.clone()],
                        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.clone())),
                    )
                    .expect("server config");
                server.enable_secret_extraction = true;
                // One ticket (TLS 1.3; TLS 1.2 resumes by session ID): every
                // handshake after a suite's first resumes, with no
                // certificate and no signature, for speed. The record
                // layer is the same either way.
                server.send_tls13_tickets = 1;
                let mut roots = RootCertStore::empty();
                roots.add(cert.clone()).expect("root");
                let client = ClientConfig::builder_with_provider(provider)
                    .with_protocol_versions(versions)
                    .expect("versions")
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                Configs {
                    server: Arc::new(server),
                    client: Arc::new(client),
                }
            })
            .collect()
    });
    &configs[SUITES.iter().position(|&s| s == suite).expect("listed")]
}

/// A handshake between a rustls client and server in memory (the first
/// of a suite full, later ones resumed), and the server's first records
/// after it (its session ticket) delivered to the client.
pub fn handshake(suite: Suite) -> Session {
    let configs = configs(suite);
    let name = ServerName::try_from("localhost").expect("name");
    let mut client = ClientConnection::new(configs.client.clone(), name).expect("client");
    let mut server = ServerConnection::new(configs.server.clone()).expect("server");
    let mut wire = Vec::new();
    for _ in 0..16 {
        while client.wants_write() {
            client.write_tls(&mut wire).expect("client writes");
        }
        feed(&mut server, &wire);
        wire.clear();
        server.process_new_packets().expect("server handshake");
        while server.wants_write() {
            server.write_tls(&mut wire).expect("server writes");
        }
        feed(&mut client, &wire);
        wire.clear();
        client.process_new_packets().expect("client handshake");
        let settled = !client.is_handshaking()
            && !server.is_handshaking()
            && !client.wants_write()
            && !server.wants_write();
        if settled {
            let secrets = server.dangerous_extract_secrets().expect("secrets");
            let (seq, tx) = secrets.tx;
            return Session {
                client,
                keys: Keys::from_secrets(suite, tx),
                seq,
            };
        }
    }
    panic!("the in-memory handshake did not finish");
}

fn feed<C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>, D>(
    conn: &mut C,
    mut bytes: &[u8],
) {
    while !bytes.is_empty() {
        conn.read_tls(&mut bytes).expect("read_tls");
    }
}

/// What rustls made of one record: the application data it delivered, or
/// its error.
pub fn rustls_receive(
    client: &mut ClientConnection,
    record: &[u8],
) -> Result<Vec<u8>, rustls::Error> {
    let mut bytes = record;
    while !bytes.is_empty() {
        match client.read_tls(&mut bytes) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                return Err(rustls::Error::General(format!("read_tls: {e}")));
            }
        }
    }
    client.process_new_packets()?;
    let mut data = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match client.reader().read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => data.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(rustls::Error::General(format!("reader: {e}"))),
        }
    }
    Ok(data)
}
