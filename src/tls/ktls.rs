//! Kernel TLS (kTLS): hands an established connection's record layer to Linux.
//!
//! rustls does the verified handshake; `dangerous_into_kernel_connection()`
//! then yields the traffic secrets. Where the kernel offers a TLS upper layer
//! protocol (ULP), [`install`] gives it those secrets and from then on the
//! kernel encrypts what is written to the socket and decrypts what is read
//! from it. Where it does not, the caller runs the record layer in user space.
//!
//! The pieces:
//! - [`availability`] probes once per process whether the kernel has the TLS
//!   ULP and which version/cipher pairs it accepts.
//! - [`install`] attaches the ULP (`TCP_ULP "tls"`), then sets `TLS_TX` and
//!   `TLS_RX`. Its error says whether the socket is still good for user-space
//!   TLS ([`KtlsError::connection_unusable`]).
//! - After that, plain `write(2)` sends application data records,
//!   [`recv_record`] reads one record's plaintext with its content type and
//!   [`send_control`] sends an alert or a handshake message (TLS 1.3
//!   KeyUpdate).
//! - [`update_tx`] and [`update_rx`] install the keys of a TLS 1.3 key update
//!   (Linux 6.14 and later).
//!
//! Sources: the structures and constants follow `include/uapi/linux/tls.h`;
//! the socket options and the control-message protocol follow the kernel's
//! `Documentation/networking/tls.rst`; how the kernel forms each record's
//! nonce from the structure's fields follows `net/tls` (`tls_advance_record_sn`,
//! `tls_xor_iv_with_seq`). The nonce rules themselves are RFC 5288 (TLS 1.2
//! AES-GCM), RFC 7905 (TLS 1.2 ChaCha20-Poly1305) and RFC 8446 §5.3 (TLS 1.3).
//!
//! Secrets: keys and IVs are copied into the kernel's structures only for the
//! length of one `setsockopt` call, wiped when those structures drop, and no
//! type here that holds them implements `Debug`.

use std::io;
#[cfg(keyhole_unix)]
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::OnceLock;

use rustls::{ConnectionTrafficSecrets, ContentType, ExtractedSecrets, ProtocolVersion};

// Constants from include/uapi/linux/tls.h, which libc 0.2 does not carry.
// (SOL_TLS and TCP_ULP it does: see `sys` below.)

/// `TLS_TX`: socket option (level `SOL_TLS`) that sets the transmit keys.
const TLS_TX: i32 = 1;
/// `TLS_RX`: socket option (level `SOL_TLS`) that sets the receive keys.
const TLS_RX: i32 = 2;
/// `TLS_SET_RECORD_TYPE`: cmsg type (level `SOL_TLS`) naming a sent record's content type.
#[cfg_attr(not(linux_native), allow(dead_code))]
const TLS_SET_RECORD_TYPE: i32 = 1;
/// `TLS_GET_RECORD_TYPE`: cmsg type (level `SOL_TLS`) naming a received record's content type.
#[cfg_attr(not(linux_native), allow(dead_code))]
const TLS_GET_RECORD_TYPE: i32 = 2;
/// `TLS_1_2_VERSION`: `TLS_VERSION_NUMBER(TLS_1_2)`, major 3 minor 3.
const TLS_1_2_VERSION: u16 = 0x0303;
/// `TLS_1_3_VERSION`: `TLS_VERSION_NUMBER(TLS_1_3)`, major 3 minor 4.
const TLS_1_3_VERSION: u16 = 0x0304;
/// `TLS_CIPHER_AES_GCM_128`.
const TLS_CIPHER_AES_GCM_128: u16 = 51;
/// `TLS_CIPHER_AES_GCM_256`.
const TLS_CIPHER_AES_GCM_256: u16 = 52;
/// `TLS_CIPHER_CHACHA20_POLY1305`.
const TLS_CIPHER_CHACHA20_POLY1305: u16 = 54;

/// The TLS versions the kernel's record layer carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    /// TLS 1.2.
    Tls12,
    /// TLS 1.3.
    Tls13,
}

impl TlsVersion {
    /// The kernel's version for a rustls protocol version; `None` for any
    /// version but TLS 1.2 and TLS 1.3.
    pub fn of(version: ProtocolVersion) -> Option<TlsVersion> {
        match version {
            ProtocolVersion::TLSv1_2 => Some(TlsVersion::Tls12),
            ProtocolVersion::TLSv1_3 => Some(TlsVersion::Tls13),
            _ => None,
        }
    }

    fn kernel_value(self) -> u16 {
        match self {
            TlsVersion::Tls12 => TLS_1_2_VERSION,
            TlsVersion::Tls13 => TLS_1_3_VERSION,
        }
    }

    fn name(self) -> &'static str {
        match self {
            TlsVersion::Tls12 => "TLS 1.2",
            TlsVersion::Tls13 => "TLS 1.3",
        }
    }
}

/// The AEAD ciphers keyhole can hand to the kernel (all that rustls's ring
/// provider negotiates).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cipher {
    /// AES-128-GCM.
    Aes128Gcm,
    /// AES-256-GCM.
    Aes256Gcm,
    /// ChaCha20-Poly1305.
    Chacha20Poly1305,
}

impl Cipher {
    const ALL: [Cipher; 3] = [
        Cipher::Aes128Gcm,
        Cipher::Aes256Gcm,
        Cipher::Chacha20Poly1305,
    ];

    /// The cipher of a set of traffic secrets; `None` for one this module
    /// does not know (rustls's enum is non-exhaustive).
    pub fn of(secrets: &ConnectionTrafficSecrets) -> Option<Cipher> {
        match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { .. } => Some(Cipher::Aes128Gcm),
            ConnectionTrafficSecrets::Aes256Gcm { .. } => Some(Cipher::Aes256Gcm),
            ConnectionTrafficSecrets::Chacha20Poly1305 { .. } => Some(Cipher::Chacha20Poly1305),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Cipher::Aes128Gcm => "AES-128-GCM",
            Cipher::Aes256Gcm => "AES-256-GCM",
            Cipher::Chacha20Poly1305 => "ChaCha20-Poly1305",
        }
    }
}

/// Whether this process's kernel can carry TLS records, as probed once by
/// [`availability`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Availability {
    /// The TLS ULP attaches, and the kernel accepted transmit keys for these
    /// version/cipher pairs.
    Available {
        /// The pairs the kernel accepted; never empty.
        suites: Vec<(TlsVersion, Cipher)>,
    },
    /// Kernel TLS cannot be used; `reason` says why and, where there is one,
    /// what an operator can do about it.
    Unavailable {
        /// Plain words for a log line.
        reason: String,
    },
}

impl Availability {
    /// True when the kernel accepted at least one version/cipher pair.
    pub fn is_available(&self) -> bool {
        matches!(self, Availability::Available { .. })
    }

    /// True when the kernel accepted keys for this version and cipher.
    pub fn supports(&self, version: TlsVersion, cipher: Cipher) -> bool {
        match self {
            Availability::Available { suites } => suites.contains(&(version, cipher)),
            Availability::Unavailable { .. } => false,
        }
    }
}

/// Whether the kernel offers TLS, probed on first call and remembered for the
/// life of the process.
///
/// The probe makes loopback TCP pairs, attaches the TLS ULP to one end of each
/// and sets all-zero transmit keys for each version/cipher pair; nothing is
/// sent. It takes a few system calls, blocking but brief: call it once at
/// start-up, not from a hot path.
pub fn availability() -> &'static Availability {
    static PROBED: OnceLock<Availability> = OnceLock::new();
    PROBED.get_or_init(probe)
}

/// A step of setting up kernel TLS on a socket, named in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `setsockopt(SOL_TCP, TCP_ULP, "tls")`.
    TcpUlp,
    /// `setsockopt(SOL_TLS, TLS_TX, crypto_info)`.
    TlsTx,
    /// `setsockopt(SOL_TLS, TLS_RX, crypto_info)`.
    TlsRx,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::TcpUlp => "setsockopt TCP_ULP \"tls\"",
            Step::TlsTx => "setsockopt SOL_TLS TLS_TX",
            Step::TlsRx => "setsockopt SOL_TLS TLS_RX",
        })
    }
}

/// Why kernel TLS was not set up. The messages name no key material.
///
/// [`Unsupported`](KtlsError::Unsupported), [`Suite`](KtlsError::Suite) and
/// [`Setsockopt`](KtlsError::Setsockopt) leave the socket as it was: the
/// caller can carry on with the user-space record layer.
/// [`SocketUnusable`](KtlsError::SocketUnusable) and
/// [`Rekey`](KtlsError::Rekey) do not: the caller must close the connection
/// (see [`KtlsError::connection_unusable`]).
#[derive(Debug, thiserror::Error)]
pub enum KtlsError {
    /// The kernel has no TLS ULP, or does not accept this version and cipher.
    /// The socket was not changed.
    #[error("kernel TLS is unavailable: {0}")]
    Unsupported(String),
    /// The connection's version or secrets are not something kernel TLS can
    /// carry. The socket was not changed.
    #[error("kernel TLS cannot carry this connection: {0}")]
    Suite(String),
    /// Attaching the TLS ULP failed for a reason other than a missing module.
    /// The kernel refuses the option as a whole, so the socket was not changed.
    #[error("{step} failed: {source}; the socket is unchanged and user-space TLS can carry it")]
    Setsockopt {
        /// Always [`Step::TcpUlp`].
        step: Step,
        /// The operating system's error.
        source: io::Error,
    },
    /// Setting the transmit or receive keys failed after the TLS ULP was
    /// attached. The ULP cannot be detached, and after a `TLS_RX` failure the
    /// kernel already encrypts what is sent, so neither kernel nor user-space
    /// TLS can carry the connection on: close it.
    #[error(
        "{step} failed after the TLS ULP was attached: {source}; the socket can carry neither \
         kernel nor user-space TLS now, so this connection is closed (if this repeats, this \
         kernel's TLS refuses keys it claimed to accept: report it with `uname -r`)"
    )]
    SocketUnusable {
        /// [`Step::TlsTx`] or [`Step::TlsRx`].
        step: Step,
        /// The operating system's error.
        source: io::Error,
    },
    /// The kernel refused the keys of a TLS 1.3 key update. The peer has
    /// moved (or will move) to the new keys, so the connection cannot go on:
    /// close it.
    #[error(
        "the kernel refused the new TLS 1.3 traffic key ({step}: {source}){hint}; this \
         connection cannot continue and is closed",
        hint = rekey_hint(.source)
    )]
    Rekey {
        /// [`Step::TlsTx`] or [`Step::TlsRx`].
        step: Step,
        /// The operating system's error.
        source: io::Error,
    },
}

impl KtlsError {
    /// True when the socket can no longer carry the connection at all (kernel
    /// or user-space TLS) and the caller must close it; false when the socket
    /// is unchanged and the user-space record layer can take over.
    pub fn connection_unusable(&self) -> bool {
        matches!(
            self,
            KtlsError::SocketUnusable { .. } | KtlsError::Rekey { .. }
        )
    }
}

fn rekey_hint(source: &io::Error) -> &'static str {
    if source.raw_os_error() == Some(sys::EBUSY) {
        // Before Linux 6.14 a second TLS_TX/TLS_RX on a socket gives EBUSY.
        " (kernel TLS accepts TLS 1.3 key updates from Linux 6.14 on; this kernel is older)"
    } else {
        ""
    }
}

/// Hands the record layer of a connection whose handshake rustls has finished
/// to the kernel: attaches the TLS ULP, then sets the transmit keys, then the
/// receive keys, each with its record sequence number from `secrets`.
///
/// `socket` is the connected TCP socket (a tokio or std `TcpStream`).
/// `version` is the negotiated version (`KernelConnection::protocol_version`).
/// No received TLS bytes may be left in user space: the kernel reads the next
/// record from the socket's receive queue.
///
/// On error, [`KtlsError::connection_unusable`] says whether the caller can
/// fall back to the user-space record layer with the same secrets (socket
/// unchanged) or must close the connection.
pub fn install(
    socket: &impl AsFd,
    version: ProtocolVersion,
    secrets: &ExtractedSecrets,
) -> Result<(), KtlsError> {
    let version = TlsVersion::of(version).ok_or_else(|| {
        KtlsError::Suite(format!(
            "it negotiated {version:?}; the kernel carries TLS 1.2 and TLS 1.3 only"
        ))
    })?;
    let (tx_seq, tx_secrets) = &secrets.tx;
    let (rx_seq, rx_secrets) = &secrets.rx;
    let tx = CryptoInfo::from_secrets(version, *tx_seq, tx_secrets)?;
    let rx = CryptoInfo::from_secrets(version, *rx_seq, rx_secrets)?;
    if tx.cipher() != rx.cipher() {
        return Err(KtlsError::Suite(format!(
            "its transmit secrets are {} but its receive secrets are {}",
            tx.cipher().name(),
            rx.cipher().name()
        )));
    }
    match availability() {
        Availability::Unavailable { reason } => return Err(KtlsError::Unsupported(reason.clone())),
        found if !found.supports(version, tx.cipher()) => {
            return Err(KtlsError::Unsupported(format!(
                "this kernel's TLS does not accept {} with {}",
                version.name(),
                tx.cipher().name()
            )))
        }
        Availability::Available { .. } => {}
    }

    let fd = socket.as_fd();
    attach_ulp(fd).map_err(|source| {
        if source.raw_os_error() == Some(sys::ENOENT) {
            KtlsError::Unsupported(ulp_missing(&source))
        } else {
            KtlsError::Setsockopt {
                step: Step::TcpUlp,
                source,
            }
        }
    })?;
    sys::setsockopt(fd, sys::SOL_TLS, TLS_TX, tx.as_bytes()).map_err(|source| {
        KtlsError::SocketUnusable {
            step: Step::TlsTx,
            source,
        }
    })?;
    sys::setsockopt(fd, sys::SOL_TLS, TLS_RX, rx.as_bytes()).map_err(|source| {
        KtlsError::SocketUnusable {
            step: Step::TlsRx,
            source,
        }
    })?;
    Ok(())
}

/// Installs new TLS 1.3 transmit keys after a key update, on a socket set up
/// by [`install`]. `secrets` comes from `KernelConnection::update_tx_secret`
/// (its sequence number is always 0).
///
/// Order: send the KeyUpdate message with [`send_control`] under the old
/// keys first, then call this. The kernel takes the new keys from Linux 6.14
/// on; older kernels refuse (EBUSY) and the connection must be closed
/// ([`KtlsError::Rekey`]).
pub fn update_tx(socket: &impl AsFd, secrets: &ConnectionTrafficSecrets) -> Result<(), KtlsError> {
    rekey(socket.as_fd(), Step::TlsTx, secrets)
}

/// Installs new TLS 1.3 receive keys after the peer's KeyUpdate, on a socket
/// set up by [`install`]. `secrets` comes from
/// `KernelConnection::update_rx_secret` (its sequence number is always 0).
///
/// From Linux 6.14 on, the kernel pauses decryption after it passes a
/// KeyUpdate to [`recv_record`]: reads fail with `EKEYEXPIRED` and the socket
/// reports no readiness until this call. Older kernels refuse the new keys
/// (EBUSY) and the connection must be closed ([`KtlsError::Rekey`]).
pub fn update_rx(socket: &impl AsFd, secrets: &ConnectionTrafficSecrets) -> Result<(), KtlsError> {
    rekey(socket.as_fd(), Step::TlsRx, secrets)
}

fn rekey(
    fd: BorrowedFd<'_>,
    step: Step,
    secrets: &ConnectionTrafficSecrets,
) -> Result<(), KtlsError> {
    let info = CryptoInfo::from_secrets(TlsVersion::Tls13, 0, secrets)?;
    let name = if step == Step::TlsTx { TLS_TX } else { TLS_RX };
    sys::setsockopt(fd, sys::SOL_TLS, name, info.as_bytes())
        .map_err(|source| KtlsError::Rekey { step, source })
}

/// Reads the plaintext of (part of) one TLS record from a socket set up by
/// [`install`], with the record's content type.
///
/// The kernel never mixes records of different types in one read. Records
/// with no type control message are application data. `Ok((_, 0))` with a
/// non-empty `buf` is the end of the TCP stream. Errors are the system call's:
/// `WouldBlock` on a non-blocking socket with no whole record yet (use it with
/// tokio's `try_io`), `EBADMSG` for a record that fails to decrypt,
/// `EKEYEXPIRED` after a KeyUpdate until [`update_rx`].
pub fn recv_record(socket: &impl AsFd, buf: &mut [u8]) -> io::Result<(ContentType, usize)> {
    let (record_type, n) = sys::recv_record(socket.as_fd(), buf)?;
    Ok((ContentType::from(record_type), n))
}

/// Sends `data` as one TLS record of type `record_type` (for example an alert:
/// `ContentType::Alert` with `[1, 0]`, close_notify; or a TLS 1.3 KeyUpdate:
/// `ContentType::Handshake`) on a socket set up by [`install`]. The kernel
/// encrypts it.
///
/// Returns how many bytes of `data` were taken; on a non-blocking socket that
/// can be fewer than `data.len()` or `WouldBlock` (use it with tokio's
/// `try_io`). An alert must not be split across records: treat a short count
/// for one as a failed connection.
pub fn send_control(
    socket: &impl AsFd,
    record_type: ContentType,
    data: &[u8],
) -> io::Result<usize> {
    sys::send_record(socket.as_fd(), u8::from(record_type), data)
}

fn attach_ulp(fd: BorrowedFd<'_>) -> io::Result<()> {
    sys::setsockopt(fd, sys::SOL_TCP, sys::TCP_ULP, b"tls")
}

fn ulp_missing(source: &io::Error) -> String {
    format!(
        "this kernel has no TLS ULP ({}: {source}); load the tls module (modprobe tls) to \
         enable it",
        Step::TcpUlp
    )
}

fn probe() -> Availability {
    if !cfg!(linux_native) {
        return Availability::Unavailable {
            reason: "this build has the portable data path (kernel TLS is Linux-only; \
                     `--cfg keyhole_portable` leaves it out on Linux too)"
                .to_string(),
        };
    }
    let listener = match std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)) {
        Ok(listener) => listener,
        Err(e) => return probe_failed(&e),
    };
    let mut suites = Vec::new();
    let mut refusal = None;
    for version in [TlsVersion::Tls12, TlsVersion::Tls13] {
        for cipher in Cipher::ALL {
            let (client, _server) = match loopback_pair(&listener) {
                Ok(pair) => pair,
                Err(e) => return probe_failed(&e),
            };
            if let Err(e) = attach_ulp(client.as_fd()) {
                let reason = if e.raw_os_error() == Some(sys::ENOENT) {
                    ulp_missing(&e)
                } else {
                    format!("{} failed: {e}", Step::TcpUlp)
                };
                return Availability::Unavailable { reason };
            }
            let zero_key = [0u8; 32];
            let info = match CryptoInfo::new(version, 0, cipher, &zero_key, &[0u8; 12]) {
                Ok(info) => info,
                Err(e) => {
                    return Availability::Unavailable {
                        reason: e.to_string(),
                    }
                }
            };
            match sys::setsockopt(client.as_fd(), sys::SOL_TLS, TLS_TX, info.as_bytes()) {
                Ok(()) => suites.push((version, cipher)),
                Err(e) => refusal = Some(e),
            }
        }
    }
    if suites.is_empty() {
        let detail = refusal.map(|e| e.to_string()).unwrap_or_default();
        return Availability::Unavailable {
            reason: format!(
                "the TLS ULP attaches but the kernel accepts none of AES-128-GCM, AES-256-GCM, \
                 ChaCha20-Poly1305 ({}: {detail}); check that its gcm and chacha20poly1305 \
                 crypto modules are present",
                Step::TlsTx
            ),
        };
    }
    Availability::Available { suites }
}

fn probe_failed(e: &io::Error) -> Availability {
    Availability::Unavailable {
        reason: format!("could not make a loopback TCP pair to probe for kernel TLS: {e}"),
    }
}

fn loopback_pair(
    listener: &std::net::TcpListener,
) -> io::Result<(std::net::TcpStream, std::net::TcpStream)> {
    let client = std::net::TcpStream::connect(listener.local_addr()?)?;
    let (server, _) = listener.accept()?;
    Ok((client, server))
}

/// `struct tls12_crypto_info_*` from include/uapi/linux/tls.h: the common
/// header `struct tls_crypto_info { __u16 version; __u16 cipher_type; }`, then
/// `iv`, `key`, `salt` and `rec_seq` byte arrays of per-cipher sizes. The
/// `tls12_` prefix is historical: the kernel uses the same structures for
/// TLS 1.3. All fields are bytes or `u16`, so with `repr(C)` there is no
/// padding (checked below); the `u16`s are in native byte order.
#[repr(C)]
struct KernelCryptoInfo<const IV: usize, const KEY: usize, const SALT: usize> {
    version: u16,
    cipher_type: u16,
    iv: [u8; IV],
    key: [u8; KEY],
    salt: [u8; SALT],
    rec_seq: [u8; 8],
}

/// `struct tls12_crypto_info_aes_gcm_128`: `TLS_CIPHER_AES_GCM_128_IV_SIZE` 8,
/// `_KEY_SIZE` 16, `_SALT_SIZE` 4, `_REC_SEQ_SIZE` 8.
type AesGcm128Info = KernelCryptoInfo<8, 16, 4>;
/// `struct tls12_crypto_info_aes_gcm_256`: IV 8, key 32, salt 4, rec_seq 8.
type AesGcm256Info = KernelCryptoInfo<8, 32, 4>;
/// `struct tls12_crypto_info_chacha20_poly1305`: IV 12, key 32, salt 0, rec_seq 8.
type Chacha20Poly1305Info = KernelCryptoInfo<12, 32, 0>;

const _: () = assert!(std::mem::size_of::<AesGcm128Info>() == 40);
const _: () = assert!(std::mem::size_of::<AesGcm256Info>() == 56);
const _: () = assert!(std::mem::size_of::<Chacha20Poly1305Info>() == 56);

impl<const IV: usize, const KEY: usize, const SALT: usize> KernelCryptoInfo<IV, KEY, SALT> {
    fn as_bytes(&self) -> &[u8] {
        // Checked at compile time for every instance: the struct is exactly
        // its fields, with no padding.
        const { assert!(std::mem::size_of::<Self>() == 2 + 2 + IV + KEY + SALT + 8) };
        // SAFETY: `Self` is repr(C), holds only u16s and u8 arrays and has no
        // padding (asserted above), so all size_of::<Self>() bytes behind
        // `self` are initialized; the slice borrows `self` and lives no longer.
        unsafe {
            std::slice::from_raw_parts(
                (self as *const Self).cast::<u8>(),
                std::mem::size_of::<Self>(),
            )
        }
    }
}

impl<const IV: usize, const KEY: usize, const SALT: usize> Drop
    for KernelCryptoInfo<IV, KEY, SALT>
{
    fn drop(&mut self) {
        wipe(&mut self.iv);
        wipe(&mut self.key);
        wipe(&mut self.salt);
    }
}

/// Overwrites key material with zeros in a way the compiler does not drop as
/// a dead store.
fn wipe(bytes: &mut [u8]) {
    for byte in bytes.iter_mut() {
        // SAFETY: `byte` is a valid, aligned, exclusive reference to a u8.
        unsafe { std::ptr::write_volatile(byte, 0) };
    }
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
}

/// One direction's keys in the kernel's layout for its cipher. Deliberately
/// not `Debug`.
enum CryptoInfo {
    Aes128Gcm(AesGcm128Info),
    Aes256Gcm(AesGcm256Info),
    Chacha20Poly1305(Chacha20Poly1305Info),
}

impl CryptoInfo {
    fn from_secrets(
        version: TlsVersion,
        seq: u64,
        secrets: &ConnectionTrafficSecrets,
    ) -> Result<CryptoInfo, KtlsError> {
        let (cipher, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Cipher::Aes128Gcm, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Cipher::Aes256Gcm, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (Cipher::Chacha20Poly1305, key, iv)
            }
            _ => {
                return Err(KtlsError::Suite(
                    "its cipher is not one of AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305"
                        .to_string(),
                ))
            }
        };
        let iv: &[u8; 12] = iv.as_ref().try_into().map_err(|_| {
            KtlsError::Suite(format!(
                "its {} IV is {} bytes, not 12",
                cipher.name(),
                iv.as_ref().len()
            ))
        })?;
        CryptoInfo::new(version, seq, cipher, key.as_ref(), iv)
    }

    /// Lays out one direction's keys for the kernel.
    ///
    /// `iv` is rustls's 12-byte `Iv`; rustls forms each record's nonce as
    /// `iv XOR seq` (seq big-endian in the last 8 bytes). `seq` is the
    /// sequence number of the next record in this direction.
    fn new(
        version: TlsVersion,
        seq: u64,
        cipher: Cipher,
        key: &[u8],
        iv: &[u8; 12],
    ) -> Result<CryptoInfo, KtlsError> {
        let wrong_key = || {
            KtlsError::Suite(format!(
                "its {} key is {} bytes, which does not fit the cipher",
                cipher.name(),
                key.len()
            ))
        };
        // rec_seq: the 64-bit record sequence number, big-endian (the kernel
        // counts it with a big-endian increment and puts it in the TLS 1.2
        // additional data / XORs it into the TLS 1.3 nonce as is).
        let rec_seq = seq.to_be_bytes();
        Ok(match cipher {
            Cipher::Aes128Gcm => {
                let (salt, explicit) = gcm_salt_and_iv(version, seq, iv);
                CryptoInfo::Aes128Gcm(AesGcm128Info {
                    version: version.kernel_value(),
                    cipher_type: TLS_CIPHER_AES_GCM_128,
                    iv: explicit,
                    key: key.try_into().map_err(|_| wrong_key())?,
                    salt,
                    rec_seq,
                })
            }
            Cipher::Aes256Gcm => {
                let (salt, explicit) = gcm_salt_and_iv(version, seq, iv);
                CryptoInfo::Aes256Gcm(AesGcm256Info {
                    version: version.kernel_value(),
                    cipher_type: TLS_CIPHER_AES_GCM_256,
                    iv: explicit,
                    key: key.try_into().map_err(|_| wrong_key())?,
                    salt,
                    rec_seq,
                })
            }
            // ChaCha20-Poly1305, TLS 1.2 (RFC 7905 §2) and TLS 1.3 alike: the
            // nonce is the 12-byte IV XOR the sequence number, which is what
            // the kernel does with `iv` (no salt) and `rec_seq`.
            Cipher::Chacha20Poly1305 => CryptoInfo::Chacha20Poly1305(Chacha20Poly1305Info {
                version: version.kernel_value(),
                cipher_type: TLS_CIPHER_CHACHA20_POLY1305,
                iv: *iv,
                key: key.try_into().map_err(|_| wrong_key())?,
                salt: [],
                rec_seq,
            }),
        })
    }

    fn cipher(&self) -> Cipher {
        match self {
            CryptoInfo::Aes128Gcm(_) => Cipher::Aes128Gcm,
            CryptoInfo::Aes256Gcm(_) => Cipher::Aes256Gcm,
            CryptoInfo::Chacha20Poly1305(_) => Cipher::Chacha20Poly1305,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            CryptoInfo::Aes128Gcm(info) => info.as_bytes(),
            CryptoInfo::Aes256Gcm(info) => info.as_bytes(),
            CryptoInfo::Chacha20Poly1305(info) => info.as_bytes(),
        }
    }
}

/// The kernel's `salt` and `iv` for AES-GCM from rustls's 12-byte IV.
///
/// The kernel's nonce is `salt(4) || iv(8)`:
/// - TLS 1.3 (RFC 8446 §5.3): the kernel XORs `rec_seq` into the last 8 bytes
///   of `salt || iv`, as rustls does with its IV; so `salt` is the IV's first
///   4 bytes and `iv` the other 8.
/// - TLS 1.2 (RFC 5288): `salt` is the implicit part from the key block (the
///   IV's first 4 bytes in rustls). `iv` is the explicit nonce: on transmit
///   the kernel writes it in each record and adds 1 to it (big-endian) per
///   record; on receive it reads each record's own and ignores this one.
///   rustls has already sent records `0..seq` with explicit nonces
///   `base XOR s` (base = the IV's last 8 bytes). XOR never exceeds the
///   sum, so each is at most `base + s`, below `base + seq`. Starting the
///   kernel at `base + seq` keeps it clear of all of them until its counter
///   wraps 2^64, far past the cipher's limits.
///   Starting at `base XOR seq` would not: for odd `base`, `base XOR 1` plus
///   one is `base` again, a repeated nonce.
fn gcm_salt_and_iv(version: TlsVersion, seq: u64, iv: &[u8; 12]) -> ([u8; 4], [u8; 8]) {
    let mut salt = [0u8; 4];
    let mut explicit = [0u8; 8];
    salt.copy_from_slice(&iv[..4]);
    explicit.copy_from_slice(&iv[4..]);
    if version == TlsVersion::Tls12 {
        explicit = u64::from_be_bytes(explicit).wrapping_add(seq).to_be_bytes();
    }
    (salt, explicit)
}

/// The system calls, Linux only.
#[cfg(linux_native)]
mod sys {
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd};

    pub(super) use libc::{EBUSY, ENOENT};

    /// `SOL_TCP` is `IPPROTO_TCP` (include/linux/socket.h).
    pub(super) const SOL_TCP: i32 = libc::IPPROTO_TCP;
    /// `TCP_ULP` (include/uapi/linux/tcp.h), in libc.
    pub(super) const TCP_ULP: i32 = libc::TCP_ULP;
    /// `SOL_TLS` (include/linux/socket.h), in libc.
    pub(super) const SOL_TLS: i32 = libc::SOL_TLS;

    /// Room for one control message carrying one byte, aligned for `cmsghdr`.
    #[repr(C)]
    union ControlBuffer {
        bytes: [u8; 32],
        _align: libc::cmsghdr,
    }

    /// `CMSG_SPACE(1)`: what one record-type control message takes.
    fn cmsg_space_one() -> usize {
        // SAFETY: CMSG_SPACE only computes a size from its argument.
        unsafe { libc::CMSG_SPACE(1) as usize }
    }

    pub(super) fn setsockopt(
        fd: BorrowedFd<'_>,
        level: i32,
        name: i32,
        value: &[u8],
    ) -> io::Result<()> {
        let len = libc::socklen_t::try_from(value.len())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `value` is `len` readable bytes for the length of the call;
        // the kernel copies them and keeps no pointer.
        let rc =
            unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, value.as_ptr().cast(), len) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    pub(super) fn recv_record(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(u8, usize)> {
        let mut control = ControlBuffer { bytes: [0; 32] };
        let space = cmsg_space_one();
        debug_assert!(space <= 32);
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain data for which all-zero bytes are valid
        // (null pointers, zero lengths); zeroing also covers the private
        // padding fields some libcs declare.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = (&mut control as *mut ControlBuffer).cast();
        msg.msg_controllen = space as _;
        // SAFETY: `msg` points at `iov` (which points at `buf`, writable for
        // `buf.len()` bytes) and at `control` (writable for `space` bytes);
        // all outlive the call, which keeps no pointer.
        let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the kernel's control message for a TLS record did not fit",
            ));
        }
        // application_data: the kernel sends no control message for it.
        let mut record_type = 23;
        // SAFETY: `msg` is the header recvmsg just filled; CMSG_FIRSTHDR reads
        // its control pointer and length only.
        let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        while !cmsg.is_null() {
            // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR return null or a pointer to a
            // whole, aligned cmsghdr inside `control`.
            let header = unsafe { &*cmsg };
            if header.cmsg_level == SOL_TLS && header.cmsg_type == super::TLS_GET_RECORD_TYPE {
                // SAFETY: this message is the kernel's record type, whose
                // data is one byte inside `control` (MSG_CTRUNC unset).
                record_type = unsafe { *libc::CMSG_DATA(cmsg) };
            }
            // SAFETY: `cmsg` is a valid header within `msg`'s control buffer.
            cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
        }
        Ok((record_type, n as usize))
    }

    pub(super) fn send_record(
        fd: BorrowedFd<'_>,
        record_type: u8,
        data: &[u8],
    ) -> io::Result<usize> {
        let mut control = ControlBuffer { bytes: [0; 32] };
        let space = cmsg_space_one();
        debug_assert!(space <= 32);
        let mut iov = libc::iovec {
            iov_base: data.as_ptr().cast_mut().cast(),
            iov_len: data.len(),
        };
        // SAFETY: as in recv_record: all-zero is a valid msghdr.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = (&mut control as *mut ControlBuffer).cast();
        msg.msg_controllen = space as _;
        // SAFETY: `msg` has a control buffer of CMSG_SPACE(1) bytes, so
        // CMSG_FIRSTHDR returns a non-null header inside `control`.
        let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        if cmsg.is_null() {
            return Err(io::Error::other(
                "no room for the TLS record type control message",
            ));
        }
        // SAFETY: `cmsg` points at a writable, aligned cmsghdr inside
        // `control`, followed by room for one data byte (CMSG_SPACE(1)).
        unsafe {
            (*cmsg).cmsg_level = SOL_TLS;
            (*cmsg).cmsg_type = super::TLS_SET_RECORD_TYPE;
            (*cmsg).cmsg_len = libc::CMSG_LEN(1) as _;
            *libc::CMSG_DATA(cmsg) = record_type;
        }
        // SAFETY: `msg` points at `iov` (at `data`, readable for its length;
        // the kernel only reads it) and at `control`; all outlive the call.
        let n = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

// Without the Linux-only calls (src/platform/) the stand-ins answer for
// `sys`, under their own name, so a symbol table tells which a build has.
#[cfg(not(linux_native))]
use unsupported as sys;

/// Stand-ins where there is no kernel TLS: every call fails as unsupported.
#[cfg(not(linux_native))]
mod unsupported {
    use std::io;

    use super::BorrowedFd;

    // Never compared with a real error (every call fails as Unsupported):
    // POSIX's numbers, without asking libc for them.
    pub(super) const EBUSY: i32 = 16;
    pub(super) const ENOENT: i32 = 2;
    pub(super) const SOL_TCP: i32 = 0;
    pub(super) const TCP_ULP: i32 = 0;
    pub(super) const SOL_TLS: i32 = 0;

    fn unsupported() -> io::Error {
        io::Error::new(io::ErrorKind::Unsupported, "kernel TLS is a Linux feature")
    }

    pub(super) fn setsockopt(_: BorrowedFd<'_>, _: i32, _: i32, _: &[u8]) -> io::Result<()> {
        Err(unsupported())
    }

    pub(super) fn recv_record(_: BorrowedFd<'_>, _: &mut [u8]) -> io::Result<(u8, usize)> {
        Err(unsupported())
    }

    pub(super) fn send_record(_: BorrowedFd<'_>, _: u8, _: &[u8]) -> io::Result<usize> {
        Err(unsupported())
    }
}

// Without file descriptors (Windows) kernel TLS is never installed; these
// stand-ins for std's let the calls above compile there, and the calls fail.
#[cfg(not(keyhole_unix))]
use no_fds::{AsFd, BorrowedFd};

#[cfg(not(keyhole_unix))]
mod no_fds {
    use std::marker::PhantomData;

    /// Names no descriptor.
    #[derive(Debug, Clone, Copy)]
    pub struct BorrowedFd<'a>(PhantomData<&'a ()>);

    pub trait AsFd {
        fn as_fd(&self) -> BorrowedFd<'_> {
            BorrowedFd(PhantomData)
        }
    }

    impl AsFd for std::net::TcpStream {}
    impl AsFd for tokio::net::TcpStream {}
    impl AsFd for crate::net::Socket {}
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::Arc;

    use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
    use rustls::crypto::cipher::{AeadKey, Iv};
    use rustls::crypto::{ring, CryptoProvider};
    use rustls::kernel::KernelConnection;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use rustls::unbuffered::{ConnectionState, UnbufferedStatus};
    use rustls::{
        ClientConfig, RootCertStore, ServerConfig, ServerConnection, StreamOwned,
        SupportedCipherSuite,
    };

    use super::*;

    const KEY: [u8; 32] = [
        0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e,
        0x1f, 0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28, 0x29, 0x2a, 0x2b, 0x2c, 0x2d,
        0x2e, 0x2f,
    ];
    const IV: [u8; 12] = [
        0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xab,
    ];
    const SEQ: u64 = 0x0102_0304_0506_0708;

    fn header(version: u16, cipher: u16) -> Vec<u8> {
        let mut bytes = version.to_ne_bytes().to_vec();
        bytes.extend_from_slice(&cipher.to_ne_bytes());
        bytes
    }

    fn layout(version: TlsVersion, seq: u64, cipher: Cipher, key: &[u8]) -> Vec<u8> {
        let info = match CryptoInfo::new(version, seq, cipher, key, &IV) {
            Ok(info) => info,
            Err(e) => panic!("laying out {cipher:?}: {e}"),
        };
        info.as_bytes().to_vec()
    }

    #[test]
    fn structures_have_the_kernels_sizes() {
        // include/uapi/linux/tls.h: 2 + 2 + iv + key + salt + rec_seq.
        assert_eq!(std::mem::size_of::<AesGcm128Info>(), 2 + 2 + 8 + 16 + 4 + 8);
        assert_eq!(std::mem::size_of::<AesGcm128Info>(), 40);
        assert_eq!(std::mem::size_of::<AesGcm256Info>(), 56);
        assert_eq!(std::mem::size_of::<Chacha20Poly1305Info>(), 56);
        assert_eq!(std::mem::align_of::<AesGcm128Info>(), 2);
    }

    #[test]
    fn tls13_aes_128_gcm_puts_each_field_where_the_header_says() {
        let bytes = layout(TlsVersion::Tls13, SEQ, Cipher::Aes128Gcm, &KEY[..16]);
        assert_eq!(bytes.len(), 40);
        assert_eq!(bytes[0..4], header(0x0304, 51)[..]);
        assert_eq!(bytes[4..12], IV[4..12], "iv: the nonce's last 8 bytes");
        assert_eq!(bytes[12..28], KEY[..16], "key");
        assert_eq!(bytes[28..32], IV[0..4], "salt: the nonce's first 4 bytes");
        assert_eq!(
            bytes[32..40],
            [1, 2, 3, 4, 5, 6, 7, 8],
            "rec_seq, big-endian"
        );
    }

    #[test]
    fn tls13_aes_256_gcm_layout() {
        let bytes = layout(TlsVersion::Tls13, 0, Cipher::Aes256Gcm, &KEY);
        assert_eq!(bytes.len(), 56);
        assert_eq!(bytes[0..4], header(0x0304, 52)[..]);
        assert_eq!(bytes[4..12], IV[4..12]);
        assert_eq!(bytes[12..44], KEY);
        assert_eq!(bytes[44..48], IV[0..4]);
        assert_eq!(bytes[48..56], [0; 8]);
    }

    #[test]
    fn chacha20_poly1305_takes_the_whole_iv_and_no_salt_in_both_versions() {
        for (version, value) in [(TlsVersion::Tls12, 0x0303), (TlsVersion::Tls13, 0x0304)] {
            let bytes = layout(version, SEQ, Cipher::Chacha20Poly1305, &KEY);
            assert_eq!(bytes.len(), 56);
            assert_eq!(bytes[0..4], header(value, 54)[..]);
            assert_eq!(bytes[4..16], IV, "iv: all 12 bytes, as rustls has it");
            assert_eq!(bytes[16..48], KEY);
            assert_eq!(bytes[48..56], SEQ.to_be_bytes());
        }
    }

    #[test]
    fn tls12_aes_gcm_salt_is_the_implicit_part_and_the_explicit_nonce_starts_past_rustls() {
        let bytes = layout(TlsVersion::Tls12, 1, Cipher::Aes128Gcm, &KEY[..16]);
        assert_eq!(bytes[0..4], header(0x0303, 51)[..]);
        assert_eq!(bytes[28..32], IV[0..4], "salt");
        let base = u64::from_be_bytes([0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xab]);
        assert_eq!(
            bytes[4..12],
            (base + 1).to_be_bytes(),
            "explicit nonce base + seq"
        );
        assert_eq!(bytes[32..40], 1u64.to_be_bytes());

        let bytes = layout(TlsVersion::Tls12, 7, Cipher::Aes256Gcm, &KEY);
        assert_eq!(bytes[0..4], header(0x0303, 52)[..]);
        assert_eq!(bytes[4..12], (base + 7).to_be_bytes());
        assert_eq!(bytes[12..44], KEY);
        assert_eq!(bytes[44..48], IV[0..4]);
    }

    #[test]
    fn tls12_explicit_nonces_never_repeat_one_rustls_used() {
        // rustls sent records 0..seq with explicit nonce base ^ s; the kernel
        // sends start, start + 1, ... Check odd and even bases, a carry and
        // the top of the range.
        for base in [
            0u64,
            1,
            0xfe,
            0xff,
            0x1234_5678_9abc_def1,
            u64::MAX - 2,
            u64::MAX,
        ] {
            for seq in 1u64..5 {
                let mut iv = [0u8; 12];
                iv[4..].copy_from_slice(&base.to_be_bytes());
                let (_, start) = gcm_salt_and_iv(TlsVersion::Tls12, seq, &iv);
                let start = u64::from_be_bytes(start);
                for k in 0..1000u64 {
                    let sent = start.wrapping_add(k);
                    for s in 0..seq {
                        assert_ne!(sent, base ^ s, "base {base:#x}, seq {seq}, record {k}");
                    }
                }
            }
        }
    }

    #[test]
    fn secrets_from_rustls_are_laid_out_like_raw_ones() {
        let secrets = ConnectionTrafficSecrets::Aes256Gcm {
            key: AeadKey::from(KEY),
            iv: Iv::from(IV),
        };
        let from_secrets = match CryptoInfo::from_secrets(TlsVersion::Tls13, SEQ, &secrets) {
            Ok(info) => info.as_bytes().to_vec(),
            Err(e) => panic!("{e}"),
        };
        assert_eq!(
            from_secrets,
            layout(TlsVersion::Tls13, SEQ, Cipher::Aes256Gcm, &KEY)
        );
    }

    #[test]
    fn a_key_of_the_wrong_length_is_a_suite_error_not_a_panic() {
        // AeadKey::from makes 32-byte keys only: one under an AES-128 label.
        let secrets = ConnectionTrafficSecrets::Aes128Gcm {
            key: AeadKey::from(KEY),
            iv: Iv::from(IV),
        };
        match CryptoInfo::from_secrets(TlsVersion::Tls13, 0, &secrets) {
            Err(e @ KtlsError::Suite(_)) => {
                let text = e.to_string();
                assert!(text.contains("AES-128-GCM key is 32 bytes"), "{text}");
                assert!(!e.connection_unusable());
            }
            Err(e) => panic!("expected a suite error, got {e}"),
            Ok(_) => panic!("a 32-byte AES-128 key was accepted"),
        }
    }

    fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let client = TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        (client, server)
    }

    fn assert_plain_tcp_works(a: &mut TcpStream, b: &mut TcpStream) {
        a.write_all(b"still plain").expect("write after fallback");
        let mut got = [0u8; 11];
        b.read_exact(&mut got).expect("read after fallback");
        assert_eq!(&got, b"still plain");
        b.write_all(b"back").expect("write back");
        let mut got = [0u8; 4];
        a.read_exact(&mut got).expect("read back");
        assert_eq!(&got, b"back");
    }

    fn secrets(seq: u64) -> ExtractedSecrets {
        let traffic = || ConnectionTrafficSecrets::Chacha20Poly1305 {
            key: AeadKey::from(KEY),
            iv: Iv::from(IV),
        };
        ExtractedSecrets {
            tx: (seq, traffic()),
            rx: (seq, traffic()),
        }
    }

    #[test]
    fn availability_reports_what_this_kernel_offers() {
        match availability() {
            Availability::Unavailable { reason } => {
                // A kernel without the TLS module, or a build without the call.
                let why = if cfg!(linux_native) {
                    "TCP_ULP"
                } else {
                    "portable data path"
                };
                assert!(reason.contains(why), "reason: {reason}");
                assert!(!availability().is_available());
                assert!(!availability().supports(TlsVersion::Tls13, Cipher::Aes128Gcm));
                eprintln!("kernel TLS unavailable here: {reason}");
            }
            Availability::Available { suites } => {
                assert!(!suites.is_empty());
                assert!(availability().is_available());
                eprintln!("kernel TLS available here for {suites:?}");
            }
        }
        // Probed once: the same answer, the same allocation.
        assert!(std::ptr::eq(availability(), availability()));
    }

    #[test]
    fn install_without_kernel_tls_is_unsupported_and_leaves_the_socket_alone() {
        if let Availability::Available { .. } = availability() {
            eprintln!(
                "skipped: kernel TLS is available here, so install would succeed; the \
                 end-to-end test covers it"
            );
            return;
        }
        let (mut client, mut server) = tcp_pair();
        match install(&client, ProtocolVersion::TLSv1_3, &secrets(0)) {
            Err(e @ KtlsError::Unsupported(_)) => {
                assert!(!e.connection_unusable());
                assert!(
                    e.to_string().starts_with("kernel TLS is unavailable: "),
                    "{e}"
                );
            }
            Err(e) => panic!("expected Unsupported, got {e}"),
            Ok(()) => panic!("install succeeded on a kernel reported without kernel TLS"),
        }
        // The ULP step itself also refuses and changes nothing.
        match attach_ulp(client.as_fd()) {
            Err(e) => eprintln!("{}", ulp_missing(&e)),
            Ok(()) => panic!("the TLS ULP attached on a kernel reported without it"),
        }
        assert_plain_tcp_works(&mut client, &mut server);
    }

    #[test]
    fn install_refuses_other_versions_and_mixed_ciphers_before_touching_the_socket() {
        let (mut client, mut server) = tcp_pair();
        match install(&client, ProtocolVersion::TLSv1_1, &secrets(0)) {
            Err(KtlsError::Suite(reason)) => assert!(reason.contains("TLSv1_1"), "{reason}"),
            other => panic!("expected a suite error, got {:?}", other.err()),
        }
        let mixed = ExtractedSecrets {
            tx: (
                0,
                ConnectionTrafficSecrets::Aes256Gcm {
                    key: AeadKey::from(KEY),
                    iv: Iv::from(IV),
                },
            ),
            rx: secrets(0).rx,
        };
        match install(&client, ProtocolVersion::TLSv1_3, &mixed) {
            Err(KtlsError::Suite(reason)) => {
                assert!(
                    reason.contains("AES-256-GCM") && reason.contains("ChaCha20"),
                    "{reason}"
                )
            }
            other => panic!("expected a suite error, got {:?}", other.err()),
        }
        assert_plain_tcp_works(&mut client, &mut server);
    }

    // recvmsg(2) and the cmsg walk are the Linux build's.
    #[cfg(linux_native)]
    #[test]
    fn recv_record_on_a_plain_socket_reads_application_data_and_would_block() {
        // No kernel TLS: no control message, so every read is application
        // data; this exercises the recvmsg and cmsg walk on any kernel.
        let (client, mut server) = tcp_pair();
        server.write_all(b"hello").expect("write");
        let mut buf = [0u8; 16];
        let (kind, n) = recv_record(&client, &mut buf).expect("recv_record");
        assert_eq!(
            (kind, &buf[..n]),
            (ContentType::ApplicationData, &b"hello"[..])
        );
        client.set_nonblocking(true).expect("non-blocking");
        match recv_record(&client, &mut buf) {
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::WouldBlock),
            Ok(got) => panic!("expected WouldBlock, got {got:?}"),
        }
        drop(server);
        client.set_nonblocking(false).expect("blocking");
        assert_eq!(recv_record(&client, &mut buf).expect("eof").1, 0);
    }

    #[test]
    fn errors_say_what_to_do_and_which_ones_end_the_connection() {
        let busy = KtlsError::Rekey {
            step: Step::TlsRx,
            source: io::Error::from_raw_os_error(sys::EBUSY),
        };
        let text = busy.to_string();
        assert!(text.contains("setsockopt SOL_TLS TLS_RX"), "{text}");
        assert!(text.contains("Linux 6.14"), "{text}");
        assert!(text.contains("closed"), "{text}");
        assert!(busy.connection_unusable());

        let broken = KtlsError::SocketUnusable {
            step: Step::TlsTx,
            source: io::Error::from_raw_os_error(sys::ENOENT),
        };
        assert!(broken.connection_unusable());
        assert!(broken
            .to_string()
            .contains("setsockopt SOL_TLS TLS_TX failed"));

        let ulp = KtlsError::Setsockopt {
            step: Step::TcpUlp,
            source: io::Error::from_raw_os_error(sys::ENOENT),
        };
        assert!(!ulp.connection_unusable());
        assert!(ulp.to_string().contains("socket is unchanged"));

        let missing = ulp_missing(&io::Error::from_raw_os_error(sys::ENOENT));
        assert!(missing.contains("setsockopt TCP_ULP \"tls\""), "{missing}");
        assert!(missing.contains("modprobe tls"), "{missing}");
    }

    // ---- End to end, where the kernel has TLS -------------------------------

    struct Pki {
        _dir: tempfile::TempDir,
        roots: RootCertStore,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    }

    /// A CA and a localhost server certificate from the project's own script.
    fn pki() -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/generate.sh");
        let out = std::process::Command::new("bash")
            .arg(&script)
            .arg(dir.path())
            .output()
            .expect("run certs/generate.sh");
        assert!(
            out.status.success(),
            "certs/generate.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(dir.path().join("ca.crt")).expect("ca.crt") {
            roots.add(ca.expect("CA certificate")).expect("add CA");
        }
        let chain = CertificateDer::pem_file_iter(dir.path().join("server.crt"))
            .expect("server.crt")
            .collect::<Result<Vec<_>, _>>()
            .expect("server certificate");
        let key = PrivateKeyDer::from_pem_file(dir.path().join("server.key")).expect("server.key");
        Pki {
            _dir: dir,
            roots,
            chain,
            key,
        }
    }

    fn only(suite: SupportedCipherSuite) -> Arc<CryptoProvider> {
        Arc::new(CryptoProvider {
            cipher_suites: vec![suite],
            ..ring::default_provider()
        })
    }

    /// Drives the client handshake to WriteTraffic over a blocking socket and
    /// turns the connection into secrets plus a kernel connection.
    fn client_handshake(
        config: Arc<ClientConfig>,
        tcp: &mut TcpStream,
    ) -> (ExtractedSecrets, KernelConnection<ClientConnectionData>) {
        let name = ServerName::try_from("localhost").expect("server name");
        let mut conn = UnbufferedClientConnection::new(config, name).expect("client connection");
        let (mut incoming, mut used) = (vec![0u8; 64 * 1024], 0);
        let mut outgoing = vec![0u8; 64 * 1024];
        loop {
            let UnbufferedStatus { discard, state } =
                conn.process_tls_records(&mut incoming[..used]);
            let (mut read_more, mut done) = (false, false);
            match state.expect("client handshake") {
                ConnectionState::EncodeTlsData(mut data) => {
                    let n = data.encode(&mut outgoing).expect("encode handshake");
                    tcp.write_all(&outgoing[..n]).expect("send handshake");
                }
                ConnectionState::TransmitTlsData(data) => data.done(),
                ConnectionState::BlockedHandshake => read_more = true,
                ConnectionState::WriteTraffic(_) => done = true,
                other => panic!("unexpected handshake state {other:?}"),
            }
            incoming.copy_within(discard..used, 0);
            used -= discard;
            if done {
                // The kernel reads the next record from the socket: nothing
                // may be left over here.
                assert_eq!(used, 0, "TLS bytes left in user space after the handshake");
                break;
            }
            if read_more {
                let n = tcp.read(&mut incoming[used..]).expect("read handshake");
                assert!(n > 0, "server closed during the handshake");
                used += n;
            }
        }
        conn.dangerous_into_kernel_connection()
            .expect("into kernel connection")
    }

    /// An echo server: each read is written back; "rekey" first makes the
    /// server start a TLS 1.3 key update (update_requested).
    fn echo_server(
        config: Arc<ServerConfig>,
        listener: TcpListener,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let Ok((tcp, _)) = listener.accept() else {
                return;
            };
            let Ok(conn) = ServerConnection::new(config) else {
                return;
            };
            let mut tls = StreamOwned::new(conn, tcp);
            let mut buf = [0u8; 4096];
            while let Ok(n) = tls.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if &buf[..n] == b"rekey" && tls.conn.refresh_traffic_keys().is_err() {
                    break;
                }
                if tls.write_all(&buf[..n]).and_then(|()| tls.flush()).is_err() {
                    break;
                }
            }
            tls.conn.send_close_notify();
            let _ = tls.flush();
        })
    }

    /// Reads records until `want` bytes of application data arrived, handling
    /// TLS 1.3 post-handshake messages. Returns false when a key update could
    /// not be installed (kernel older than 6.14), after saying so.
    fn read_echo(
        tcp: &TcpStream,
        kernel: &mut KernelConnection<ClientConnectionData>,
        want: &[u8],
    ) -> bool {
        let mut got = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        while got.len() < want.len() {
            let (kind, n) = recv_record(tcp, &mut buf).expect("recv_record");
            assert!(n > 0, "server closed before echoing {want:?}");
            match kind {
                ContentType::ApplicationData => got.extend_from_slice(&buf[..n]),
                ContentType::Handshake => {
                    let mut messages = &buf[..n];
                    while messages.len() >= 4 {
                        let len = usize::from(messages[1]) << 16
                            | usize::from(messages[2]) << 8
                            | usize::from(messages[3]);
                        assert!(messages.len() >= 4 + len, "truncated handshake message");
                        let (message, rest) = messages.split_at(4 + len);
                        messages = rest;
                        // 24: key_update (RFC 8446 §4.6.3); 4: new_session_ticket, ignored.
                        if message.first() != Some(&24) {
                            continue;
                        }
                        let (_, rx) = kernel.update_rx_secret().expect("new rx secret");
                        if let Err(e) = update_rx(tcp, &rx) {
                            assert!(e.connection_unusable());
                            eprintln!("skipped key update: {e}");
                            return false;
                        }
                        if message.get(4) == Some(&1) {
                            // update_requested: answer with our own KeyUpdate
                            // under the old key, then switch.
                            let answer = [24, 0, 0, 1, 0];
                            let sent = send_control(tcp, ContentType::Handshake, &answer)
                                .expect("send KeyUpdate");
                            assert_eq!(sent, answer.len());
                            let (_, tx) = kernel.update_tx_secret().expect("new tx secret");
                            update_tx(tcp, &tx).expect("install new tx key");
                        }
                    }
                }
                other => panic!("unexpected {other:?} record"),
            }
        }
        assert_eq!(got, want);
        true
    }

    /// A server and a client config that both offer only `suite`; the client
    /// verifies the server against the test CA and allows secret extraction.
    fn configs(pki: &Pki, suite: SupportedCipherSuite) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
        let version = suite.version();
        let server_config = ServerConfig::builder_with_provider(only(suite))
            .with_protocol_versions(&[version])
            .expect("server versions")
            .with_no_client_auth()
            .with_single_cert(pki.chain.clone(), pki.key.clone_key())
            .expect("server certificate");
        let mut client_config = ClientConfig::builder_with_provider(only(suite))
            .with_protocol_versions(&[version])
            .expect("client versions")
            .with_root_certificates(pki.roots.clone())
            .with_no_client_auth();
        client_config.enable_secret_extraction = true;
        (Arc::new(server_config), Arc::new(client_config))
    }

    /// Every suite keyhole's ring provider negotiates with an EC server key.
    fn suites() -> [SupportedCipherSuite; 6] {
        use ring::cipher_suite::*;
        [
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
            TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        ]
    }

    #[test]
    fn rustls_handshakes_yield_secrets_the_kernel_layout_takes() {
        // Runs on any kernel: the real handshake driver, real extracted
        // secrets, their sequence numbers and their layout; no kernel TLS.
        let pki = pki();
        for suite in suites() {
            let (server_config, client_config) = configs(&pki, suite);
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let mut tcp =
                TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
            let server = echo_server(server_config, listener);
            let (secrets, kernel) = client_handshake(client_config, &mut tcp);
            let version = TlsVersion::of(kernel.protocol_version()).expect("TLS 1.2 or 1.3");
            // TLS 1.2's encrypted Finished used sequence 0 in each direction;
            // TLS 1.3 application traffic keys start at 0.
            let next = if version == TlsVersion::Tls12 { 1 } else { 0 };
            for (seq, traffic) in [&secrets.tx, &secrets.rx] {
                assert_eq!(*seq, next, "{:?}", suite.suite());
                assert_eq!(Cipher::of(traffic), kernel_cipher(suite));
                if let Err(e) = CryptoInfo::from_secrets(version, *seq, traffic) {
                    panic!("{:?}: {e}", suite.suite());
                }
            }
            drop(tcp);
            let _ = server.join();
        }
    }

    fn round_trip(pki: &Pki, suite: SupportedCipherSuite) {
        let (server_config, client_config) = configs(pki, suite);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut tcp = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let server = echo_server(server_config, listener);

        let (secrets, mut kernel) = client_handshake(client_config, &mut tcp);
        install(&tcp, kernel.protocol_version(), &secrets).expect("install kernel TLS");

        (&tcp).write_all(b"hello over kernel TLS").expect("write");
        read_echo(&tcp, &mut kernel, b"hello over kernel TLS");
        let big = vec![0x5a; 40_000]; // spans several records each way
        (&tcp).write_all(&big).expect("write big");
        read_echo(&tcp, &mut kernel, &big);

        let mut rekeyed = false;
        if kernel.protocol_version() == ProtocolVersion::TLSv1_3 {
            (&tcp).write_all(b"rekey").expect("write rekey");
            if read_echo(&tcp, &mut kernel, b"rekey") {
                (&tcp)
                    .write_all(b"after the key update")
                    .expect("write after rekey");
                rekeyed = read_echo(&tcp, &mut kernel, b"after the key update");
            }
        }
        if rekeyed || kernel.protocol_version() == ProtocolVersion::TLSv1_2 {
            send_control(&tcp, ContentType::Alert, &[1, 0]).expect("close_notify");
            let _ = server.join();
        }
        eprintln!("kernel TLS round trip ok: {:?}", suite.suite());
    }

    #[test]
    fn kernel_tls_round_trips_with_a_rustls_server() {
        if let Availability::Unavailable { reason } = availability() {
            eprintln!("skipped: kernel TLS unavailable here: {reason}");
            return;
        }
        let pki = pki();
        for suite in suites() {
            let version = match suite.version().version {
                ProtocolVersion::TLSv1_2 => TlsVersion::Tls12,
                _ => TlsVersion::Tls13,
            };
            let Some(cipher) = kernel_cipher(suite) else {
                panic!("no kernel cipher for {:?}", suite.suite());
            };
            if !availability().supports(version, cipher) {
                eprintln!(
                    "skipped {:?}: this kernel's TLS does not accept it",
                    suite.suite()
                );
                continue;
            }
            round_trip(&pki, suite);
        }
    }

    fn kernel_cipher(suite: SupportedCipherSuite) -> Option<Cipher> {
        let name = format!("{:?}", suite.suite());
        if name.contains("AES_128_GCM") {
            Some(Cipher::Aes128Gcm)
        } else if name.contains("AES_256_GCM") {
            Some(Cipher::Aes256Gcm)
        } else if name.contains("CHACHA20_POLY1305") {
            Some(Cipher::Chacha20Poly1305)
        } else {
            None
        }
    }
}
