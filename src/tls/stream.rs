//! The upstream TLS stream once the handshake is done: a socket (TCP to the
//! database or its hop, or the local end of an SSH channel), the
//! record layer's keys, and buffers lent from the pool only while bytes are
//! in flight.
//!
//! Two ways in: `AsyncRead`/`AsyncWrite` for the login exchange (copies, but
//! it is a handful of small messages), and the splice's [`Leg`], which reads
//! records into a pooled buffer, opens them where they lie and hands the
//! plaintext segments on, and seals the client's bytes in the buffer they
//! were read into. After the login, no record is copied and no allocation
//! is made per record.
//!
//! Post-handshake messages are handled here: TLS 1.3 session tickets go to
//! rustls (so the next connection can resume), a key update from the server
//! rekeys the receiving side (and, when asked, ours), and keyhole rekeys its
//! own side before its keys reach the suite's confidentiality limit. A
//! message split across records (TLS allows it; a server with a small
//! record size does it to its tickets) is put back together first
//! ([`Reassembly`], at most rustls's 64 KiB a message); records of another
//! type between its pieces are refused, as RFC 8446 section 5.1 requires.
//! This includes the records that arrived with the server's last handshake
//! flight: rustls stops at its Finished (see `handshake`), so a message
//! split across that read and later ones is this module's, whole.
//!
//! With `--kernel-tls=auto`, and where the kernel carries the negotiated
//! suite, the records are the kernel's instead (kTLS, [`super::ktls`]): the
//! socket then carries plaintext, and this stream reads each record with its
//! content type so that the post-handshake messages are still handled here.

use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use rustls::client::ClientConnectionData;
use rustls::kernel::KernelConnection;
use rustls::{ContentType, ExtractedSecrets, SupportedCipherSuite};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::net::Socket;

use super::ktls;
use super::record::{content, DirectionKeys, RecordError, RecordLayer};
use super::temper::Temper;
use super::KernelTls;
use crate::splice::buffer::{Chunk, Room};
use crate::splice::Leg;

const HANDSHAKE_NEW_SESSION_TICKET: u8 = 4;
const HANDSHAKE_KEY_UPDATE: u8 = 24;
const HANDSHAKE_HELLO_REQUEST: u8 = 0;
const ALERT_CLOSE_NOTIFY: u8 = 0;
const ALERT_USER_CANCELED: u8 = 90;

/// Who seals and opens the records.
// The stream is boxed already, and one variant lives as long as the
// connection: boxing the record layer too would add a pointer chase per record.
#[allow(clippy::large_enum_variant)]
enum Engine {
    /// keyhole's record layer, in place in the pooled buffers.
    User(RecordLayer),
    /// The kernel's (kTLS): the socket carries plaintext.
    Kernel {
        tls13: bool,
        /// Records the kernel has sealed under the current key (an upper
        /// bound: each write ends a record, and a record holds at most 16 KiB).
        sealed: u64,
        /// The queued record is a KeyUpdate: the kernel takes the new key
        /// once it is sent (it is sealed when sent, not when queued).
        rekey_after_send: bool,
    },
}

/// The most plaintext a TLS record carries.
const MAX_RECORD_PLAINTEXT: usize = 16 * 1024;

impl Engine {
    fn is_tls13(&self) -> bool {
        match self {
            Engine::User(records) => records.is_tls13(),
            Engine::Kernel { tls13, .. } => *tls13,
        }
    }

    /// Records sealed under the current transmit key.
    fn sealed(&self) -> u64 {
        match self {
            Engine::User(records) => records.tx.seq(),
            Engine::Kernel { sealed, .. } => *sealed,
        }
    }
}

pub struct TlsStream {
    socket: Socket,
    records: Engine,
    session: KernelConnection<ClientConnectionData>,
    /// Records sealed with one key before keyhole rekeys (TLS 1.3) or stops.
    confidentiality_limit: u64,
    /// Received bytes: opened plaintext segments, then `raw`.
    rx: Option<Chunk>,
    /// Ciphertext in `rx` not yet opened (a partial record, usually).
    raw: Range<usize>,
    /// Records of keyhole's own (writes through `AsyncWrite`, alerts, key
    /// updates) not yet written.
    tx: Option<Chunk>,
    /// The content type of the record waiting in `tx` (kernel records only).
    tx_type: u8,
    peer_closed: bool,
    /// Limits on records that carry no application data.
    temper: Temper,
    /// A post-handshake message whose first records have arrived.
    reassembly: Reassembly,
    key_update_due: bool,
    /// Whether shutting down sends close_notify before the FIN.
    close_notify: bool,
    close_notify_sent: bool,
    /// How the handshake went (for the metrics).
    handshake: Handshake,
}

/// How a session's handshake went: what an operator reads to see whether
/// the server lets connections resume, and whether the first key share
/// keyhole sends is one the server takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    /// A full handshake.
    Full,
    /// A full handshake after a HelloRetryRequest: the server wanted
    /// another key-exchange group than the one keyhole offered first
    /// (rustls remembers the server's choice for the next connection).
    FullAfterRetry,
    /// Resumed with a session ticket (TLS 1.3 PSK) or a session id.
    Resumed,
}

impl Handshake {
    pub const ALL: [Handshake; 3] = [
        Handshake::Full,
        Handshake::FullAfterRetry,
        Handshake::Resumed,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Handshake::Full => "full",
            Handshake::FullAfterRetry => "full_after_retry",
            Handshake::Resumed => "resumed",
        }
    }

    pub(super) fn of(kind: Option<rustls::HandshakeKind>) -> Handshake {
        match kind {
            Some(rustls::HandshakeKind::Resumed) => Handshake::Resumed,
            Some(rustls::HandshakeKind::FullWithHelloRetryRequest) => Handshake::FullAfterRetry,
            _ => Handshake::Full,
        }
    }
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("socket", &self.socket)
            .field("tls13", &self.records.is_tls13())
            .field("kernel", &self.is_kernel())
            .finish_non_exhaustive()
    }
}

/// The TCP socket under kernel TLS (the kernel engine is only ever
/// installed on one).
fn kernel_socket(socket: &Socket) -> io::Result<&TcpStream> {
    match socket {
        Socket::Tcp(tcp) => Ok(tcp),
        _ => Err(io::Error::other("internal: kernel TLS on a local socket")),
    }
}

fn invalid(e: RecordError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn rustls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl TlsStream {
    pub(super) fn new(
        socket: Socket,
        secrets: ExtractedSecrets,
        session: KernelConnection<ClientConnectionData>,
        leftover: &[u8],
        kernel_tls: KernelTls,
        handshake: Handshake,
    ) -> io::Result<TlsStream> {
        let records = match (kernel_tls, &socket) {
            (KernelTls::Auto, Socket::Tcp(tcp)) if leftover.is_empty() => {
                match ktls::install(tcp, session.protocol_version(), &secrets) {
                    Ok(()) => Some(Engine::Kernel {
                        tls13: session.protocol_version() == rustls::ProtocolVersion::TLSv1_3,
                        sealed: 0,
                        rekey_after_send: false,
                    }),
                    Err(e) if e.connection_unusable() => return Err(io::Error::other(e)),
                    Err(e) => {
                        tracing::debug!(reason = %e, "TLS records stay in keyhole's record layer");
                        None
                    }
                }
            }
            (KernelTls::Auto, Socket::Tcp(_)) => {
                // The kernel reads records from the socket; these are already out of it.
                tracing::debug!(
                    "TLS records stay in keyhole's record layer: the server sent records \
                     with its last handshake flight"
                );
                None
            }
            (KernelTls::Auto, _) => {
                tracing::debug!(
                    "TLS records stay in keyhole's record layer: kernel TLS needs a TCP socket, \
                     and this one is a local channel (a hop's)"
                );
                None
            }
            (KernelTls::Off, _) => None,
        };
        let records = match records {
            Some(kernel) => kernel,
            None => {
                let (rx_seq, rx) = secrets.rx;
                let (tx_seq, tx) = secrets.tx;
                Engine::User(
                    RecordLayer::new(
                        session.protocol_version(),
                        DirectionKeys::new(rx_seq, &rx).map_err(invalid)?,
                        DirectionKeys::new(tx_seq, &tx).map_err(invalid)?,
                    )
                    .map_err(invalid)?,
                )
            }
        };
        let confidentiality_limit = match session.negotiated_cipher_suite() {
            SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
            SupportedCipherSuite::Tls12(s) => s.common.confidentiality_limit,
        };
        let mut stream = TlsStream {
            socket,
            records,
            session,
            confidentiality_limit,
            rx: None,
            raw: 0..0,
            tx: None,
            tx_type: content::APPLICATION_DATA,
            peer_closed: false,
            temper: Temper::default(),
            reassembly: Reassembly::default(),
            key_update_due: false,
            close_notify: true,
            close_notify_sent: false,
            handshake,
        };
        if !leftover.is_empty() {
            let mut chunk = Chunk::take();
            if leftover.len() > chunk.bytes().len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the server sent more than a buffer of data with its handshake",
                ));
            }
            chunk.bytes_mut()[..leftover.len()].copy_from_slice(leftover);
            stream.raw = 0..leftover.len();
            stream.rx = Some(chunk);
        }
        Ok(stream)
    }

    /// Shut down with a bare FIN instead of close_notify (MySQL: a client
    /// has no half-close; see the MySQL session driver).
    pub fn without_close_notify(&mut self) {
        self.close_notify = false;
    }

    pub fn is_tls13(&self) -> bool {
        self.records.is_tls13()
    }

    /// How this session's handshake went.
    pub fn handshake(&self) -> Handshake {
        self.handshake
    }

    /// Whether the kernel seals and opens this stream's records (kTLS).
    pub fn is_kernel(&self) -> bool {
        matches!(self.records, Engine::Kernel { .. })
    }

    /// Buffers this stream holds right now (0 when idle).
    pub fn buffers_held(&self) -> usize {
        usize::from(self.rx.is_some()) + usize::from(self.tx.is_some())
    }

    fn release_rx_if_empty(&mut self) {
        if self.raw.is_empty() && self.rx.as_ref().is_none_or(Chunk::is_empty) {
            self.rx = None;
            self.raw = 0..0;
        }
    }

    /// Some(true) when plaintext waits in `rx`, Some(false) once the server
    /// has sent close_notify and it is all read.
    fn filled_or_closed(&mut self) -> Option<bool> {
        if self.rx.as_ref().is_some_and(|c| !c.is_empty()) {
            return Some(true);
        }
        if self.peer_closed {
            self.release_rx_if_empty();
            return Some(false);
        }
        None
    }

    /// Makes opened plaintext ready in `rx`: Ok(true) when there is some,
    /// Ok(false) once the server has sent close_notify.
    fn poll_fill_rx(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if self.is_kernel() {
            return self.poll_fill_rx_kernel(cx);
        }
        loop {
            if let Some(answer) = self.filled_or_closed() {
                return Poll::Ready(Ok(answer));
            }
            if self.open_records()? {
                continue;
            }
            let chunk = self.rx.get_or_insert_with(Chunk::take);
            // Every segment was taken: whole records may still wait in `raw`
            // (a read of many small records), to be opened before reading more.
            let spent = chunk.is_full();
            chunk.clear();
            // Keep what is not opened yet, at the front.
            if self.raw.start > 0 {
                chunk.bytes_mut().copy_within(self.raw.clone(), 0);
                self.raw = 0..self.raw.len();
            }
            if spent {
                continue;
            }
            let mut read_buf = ReadBuf::new(&mut chunk.bytes_mut()[self.raw.end..]);
            match Pin::new(&mut self.socket).poll_read(cx, &mut read_buf) {
                Poll::Pending => {
                    self.release_rx_if_empty();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let n = read_buf.filled().len();
                    if n == 0 {
                        let partial = !self.raw.is_empty();
                        self.rx = None;
                        self.raw = 0..0;
                        return Poll::Ready(Err(if partial {
                            // A truncation like a missing close_notify,
                            // judged the same way by the splice.
                            io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the server closed the connection in the middle of a TLS record",
                            )
                        } else {
                            closed_without_notify()
                        }));
                    }
                    self.raw.end += n;
                }
            }
        }
    }

    /// [`Self::poll_fill_rx`] with the kernel's records: one read per
    /// record type, plaintext straight into the pooled buffer.
    fn poll_fill_rx_kernel(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        loop {
            if let Some(answer) = self.filled_or_closed() {
                return Poll::Ready(Ok(answer));
            }
            let tcp = kernel_socket(&self.socket)?;
            let chunk = self.rx.get_or_insert_with(Chunk::take);
            chunk.clear();
            let read = loop {
                match tcp.poll_read_ready(cx) {
                    Poll::Pending => {
                        // Empty: nothing is held while the server is quiet.
                        self.rx = None;
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => {}
                }
                match tcp.try_io(Interest::READABLE, || {
                    ktls::recv_record(tcp, chunk.bytes_mut())
                }) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    other => break other,
                }
            };
            let (content_type, n) = match read {
                Ok(read) => read,
                Err(e) => {
                    self.rx = None;
                    return Poll::Ready(Err(e));
                }
            };
            if n == 0 {
                self.rx = None;
                return Poll::Ready(Err(closed_without_notify()));
            }
            let content_type = u8::from(content_type);
            self.reassembly.check_between_pieces(content_type)?;
            match content_type {
                content::APPLICATION_DATA => {
                    self.temper.data(n).map_err(tempered)?;
                    // The first segment of an empty chunk: always taken.
                    chunk.push(0..n);
                }
                content::ALERT => {
                    self.peer_closed = on_alert(&mut self.temper, &chunk.bytes()[..n])?
                }
                content::HANDSHAKE => {
                    let update = on_handshake(
                        &mut self.session,
                        &mut self.temper,
                        &mut self.reassembly,
                        self.records.is_tls13(),
                        &chunk.bytes()[..n],
                    )?;
                    if let Some(requested) = update {
                        let (_, secrets) = self.session.update_rx_secret().map_err(rustls_error)?;
                        ktls::update_rx(&self.socket, &secrets).map_err(io::Error::other)?;
                        self.key_update_due |= requested;
                    }
                }
                other => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("the server sent a TLS record of unexpected type {other}"),
                    )))
                }
            }
        }
    }

    /// Opens every whole record in `raw`. True if any was consumed.
    fn open_records(&mut self) -> io::Result<bool> {
        let Engine::User(records) = &mut self.records else {
            return Ok(false);
        };
        let Some(chunk) = self.rx.as_mut() else {
            return Ok(false);
        };
        let mut progressed = false;
        while !chunk.is_full() && !self.peer_closed {
            let available = &chunk.bytes()[self.raw.clone()];
            let Some(len) = RecordLayer::record_len(available).map_err(invalid)? else {
                break;
            };
            if available.len() < len {
                break;
            }
            let record = self.raw.start..self.raw.start + len;
            let opened = records
                .open(&mut chunk.bytes_mut()[record.clone()])
                .map_err(invalid)?;
            self.raw.start += len;
            progressed = true;
            let payload = record.start + opened.payload.start..record.start + opened.payload.end;
            self.reassembly.check_between_pieces(opened.content_type)?;
            match opened.content_type {
                content::APPLICATION_DATA => {
                    self.temper.data(payload.len()).map_err(tempered)?;
                    chunk.push(payload);
                }
                content::ALERT => {
                    self.peer_closed = on_alert(&mut self.temper, &chunk.bytes()[payload])?;
                }
                content::HANDSHAKE => {
                    let update = on_handshake(
                        &mut self.session,
                        &mut self.temper,
                        &mut self.reassembly,
                        records.is_tls13(),
                        &chunk.bytes()[payload],
                    )?;
                    if let Some(requested) = update {
                        let (seq, secrets) =
                            self.session.update_rx_secret().map_err(rustls_error)?;
                        records.rx = DirectionKeys::new(seq, &secrets).map_err(invalid)?;
                        self.key_update_due |= requested;
                    }
                }
                other => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("the server sent a TLS record of unexpected type {other}"),
                    ))
                }
            }
        }
        if self.raw.is_empty() {
            self.raw = 0..0;
        }
        Ok(progressed)
    }

    /// Seals `payload` as one record of keyhole's own into `tx`, which
    /// must be empty.
    /// With the kernel's records, the plaintext waits in `tx` and
    /// `tx_type` says what it is; the kernel seals it when it is sent.
    fn queue(&mut self, content_type: u8, payload: &[u8]) -> io::Result<()> {
        let chunk = self.tx.get_or_insert_with(Chunk::take);
        match &mut self.records {
            Engine::User(records) => {
                let room = records.room();
                let plain = room.head..room.head + payload.len();
                chunk.bytes_mut()[plain.clone()].copy_from_slice(payload);
                let record = records
                    .seal(content_type, chunk.bytes_mut(), plain)
                    .map_err(invalid)?;
                chunk.set_single(record);
            }
            Engine::Kernel { .. } => {
                chunk.bytes_mut()[..payload.len()].copy_from_slice(payload);
                chunk.set_single(0..payload.len());
                self.tx_type = content_type;
            }
        }
        Ok(())
    }

    /// Writes out `tx`, then gives its buffer back.
    fn poll_write_tx(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(chunk) = self.tx.as_mut() {
            if chunk.is_empty() {
                self.tx = None;
                break;
            }
            if let Engine::Kernel { sealed, .. } = &mut self.records {
                // One control record, whole (it is a few bytes).
                let record = chunk.front();
                let tcp = kernel_socket(&self.socket)?;
                let content_type = ContentType::from(self.tx_type);
                let n = loop {
                    ready!(tcp.poll_write_ready(cx))?;
                    match tcp.try_io(Interest::WRITABLE, || {
                        ktls::send_control(tcp, content_type, record)
                    }) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        other => break other?,
                    }
                };
                if n != record.len() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the kernel took part of a TLS control record",
                    )));
                }
                *sealed += 1;
                chunk.advance(n);
                continue;
            }
            let n = ready!(Pin::new(&mut self.socket).poll_write(cx, chunk.front()))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            chunk.advance(n);
        }
        Poll::Ready(Ok(()))
    }

    /// Application data to the kernel, which seals it.
    fn poll_write_kernel(&mut self, cx: &mut Context<'_>, plain: &[u8]) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.socket).poll_write(cx, plain))?;
        if let Engine::Kernel { sealed, .. } = &mut self.records {
            *sealed += n.div_ceil(MAX_RECORD_PLAINTEXT) as u64;
        }
        Poll::Ready(Ok(n))
    }

    /// Everything that must go out before more application data: our own
    /// pending records, and a key update when one is due.
    fn poll_ready_to_seal(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.poll_write_tx(cx))?;
            if let Engine::Kernel {
                sealed,
                rekey_after_send,
                ..
            } = &mut self.records
            {
                if *rekey_after_send {
                    let (_, secrets) = self.session.update_tx_secret().map_err(rustls_error)?;
                    ktls::update_tx(&self.socket, &secrets).map_err(io::Error::other)?;
                    *rekey_after_send = false;
                    *sealed = 0;
                }
            }
            if self.records.sealed() >= self.confidentiality_limit {
                if !self.records.is_tls13() {
                    return Poll::Ready(Err(invalid(RecordError::KeysExhausted)));
                }
                self.key_update_due = true;
            }
            if !self.key_update_due {
                return Poll::Ready(Ok(()));
            }
            // KeyUpdate(update_not_requested), under the old key; then the new one.
            self.queue(content::HANDSHAKE, &[HANDSHAKE_KEY_UPDATE, 0, 0, 1, 0])?;
            self.key_update_due = false;
            match &mut self.records {
                Engine::User(records) => {
                    let (seq, secrets) = self.session.update_tx_secret().map_err(rustls_error)?;
                    records.tx = DirectionKeys::new(seq, &secrets).map_err(invalid)?;
                }
                Engine::Kernel {
                    rekey_after_send, ..
                } => *rekey_after_send = true,
            }
        }
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_ready_to_seal(cx))?;
        if self.close_notify && !self.close_notify_sent {
            self.close_notify_sent = true;
            self.queue(content::ALERT, &[1, ALERT_CLOSE_NOTIFY])?;
            ready!(self.poll_write_tx(cx))?;
        }
        Pin::new(&mut self.socket).poll_shutdown(cx)
    }
}

/// An alert from the server: Ok(true) for close_notify, an error for a
/// fatal one.
fn on_alert(temper: &mut Temper, payload: &[u8]) -> io::Result<bool> {
    match payload {
        [_, ALERT_CLOSE_NOTIFY] => Ok(true),
        [_, ALERT_USER_CANCELED] => temper.warning_alert().map(|()| false).map_err(tempered),
        // As rustls reports it, so that `super::is_alert` and
        // `describe_handshake_error` read it the same way (a TLS 1.3 server
        // refuses a client certificate only after our handshake finished).
        [_, code] => Err(rustls_error(rustls::Error::AlertReceived(
            rustls::AlertDescription::from(*code),
        ))),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the server sent a malformed TLS alert",
        )),
    }
}

/// The handshake messages in one record after the handshake, with what
/// earlier records left of a message. Some(requested) for a key update.
fn on_handshake(
    session: &mut KernelConnection<ClientConnectionData>,
    temper: &mut Temper,
    reassembly: &mut Reassembly,
    tls13: bool,
    fragment: &[u8],
) -> io::Result<Option<bool>> {
    let mut update = None;
    reassembly.feed(fragment, |kind, body, ends_record| {
        match (kind, tls13) {
            (HANDSHAKE_NEW_SESSION_TICKET, true) => {
                // A ticket rustls cannot use costs a resumption, nothing more.
                if let Err(e) = session.handle_new_session_ticket(body) {
                    tracing::debug!(error = %e, "ignored a TLS session ticket from the server");
                }
            }
            (HANDSHAKE_KEY_UPDATE, true) => {
                temper.key_update().map_err(tempered)?;
                // Records after a key update are under the new key: a
                // message (or part of one) sharing its record would be
                // under the old one (RFC 8446 section 5.1).
                if !ends_record {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the server sent data after a key update in the same record",
                    ));
                }
                match body {
                    [0] => update = Some(false),
                    [1] => update = Some(true),
                    _ => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "the server sent a malformed TLS key update",
                        ))
                    }
                }
            }
            // TLS 1.2 renegotiation: a client may ignore the request.
            (HANDSHAKE_HELLO_REQUEST, false) => temper.hello_request().map_err(tempered)?,
            (other, _) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("the server sent handshake message {other} after the handshake"),
                ))
            }
        }
        Ok(())
    })?;
    Ok(update)
}

/// The largest post-handshake message keyhole reassembles: the body of a
/// handshake message, as rustls limits it during the handshake (a session
/// ticket is a few hundred bytes).
const MAX_HANDSHAKE_MESSAGE: usize = 0xffff;
const HANDSHAKE_HEADER_LEN: usize = 4;

/// Post-handshake handshake messages put back together across records.
///
/// TLS lets a sender split a handshake message over several records (a
/// server with a small record size does it to its session tickets), and
/// put several in one. The usual case, whole messages in one record, is
/// read where the record was opened; only a message's first pieces are
/// copied here, in a buffer the size of the message (as its header says),
/// freed when the message is whole, and never larger than the header plus
/// [`MAX_HANDSHAKE_MESSAGE`] (a header announcing more is refused at once).
/// No other record may come between the pieces (RFC 8446 section 5.1):
/// [`Reassembly::check_between_pieces`] refuses one.
#[derive(Debug, Default)]
struct Reassembly {
    /// The first pieces of a message (empty: none pending).
    partial: Vec<u8>,
}

impl Reassembly {
    /// Whether a message is waiting for its next piece.
    fn is_pending(&self) -> bool {
        !self.partial.is_empty()
    }

    /// A record of `content_type` arrives: refused when it is not the next
    /// piece of a pending message.
    fn check_between_pieces(&self, content_type: u8) -> io::Result<()> {
        if !self.is_pending() || content_type == content::HANDSHAKE {
            return Ok(());
        }
        let what = match content_type {
            content::APPLICATION_DATA => "application data".to_owned(),
            content::ALERT => "an alert".to_owned(),
            other => format!("a record of type {other}"),
        };
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the server sent {what} in the middle of a handshake message split across \
                 records (TLS forbids it, RFC 8446 section 5.1)"
            ),
        ))
    }

    /// Takes one record's handshake bytes: calls `each(type, body,
    /// ends_record)` for every message they complete, in order, and keeps
    /// the first pieces of one they do not.
    fn feed(
        &mut self,
        mut fragment: &[u8],
        mut each: impl FnMut(u8, &[u8], bool) -> io::Result<()>,
    ) -> io::Result<()> {
        if fragment.is_empty() {
            // RFC 8446 section 5.1, RFC 5246 section 6.2.1; and each would
            // cost a record's work for nothing.
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the server sent an empty TLS handshake record, which TLS forbids",
            ));
        }
        // The rest of a pending message, from the front of this record.
        while self.is_pending() && !fragment.is_empty() {
            let want = match message_len(&self.partial)? {
                Some(total) => {
                    // Once, to the message's size: no doubling past it, and
                    // no copy per piece.
                    self.partial.reserve_exact(total - self.partial.len());
                    total - self.partial.len()
                }
                None => HANDSHAKE_HEADER_LEN - self.partial.len(),
            };
            let (piece, rest) = fragment.split_at(want.min(fragment.len()));
            self.partial.extend_from_slice(piece);
            fragment = rest;
            if message_len(&self.partial)? == Some(self.partial.len()) {
                let message = std::mem::take(&mut self.partial);
                each(
                    message[0],
                    &message[HANDSHAKE_HEADER_LEN..],
                    fragment.is_empty(),
                )?;
            }
        }
        // Whole messages where they lie; the start of one that goes on.
        while !fragment.is_empty() {
            match message_len(fragment)? {
                Some(total) if total <= fragment.len() => {
                    let (message, rest) = fragment.split_at(total);
                    fragment = rest;
                    each(
                        message[0],
                        &message[HANDSHAKE_HEADER_LEN..],
                        fragment.is_empty(),
                    )?;
                }
                unfinished => {
                    let mut partial =
                        Vec::with_capacity(unfinished.unwrap_or(HANDSHAKE_HEADER_LEN));
                    partial.extend_from_slice(fragment);
                    self.partial = partial;
                    break;
                }
            }
        }
        Ok(())
    }
}

/// The length (header included) of the handshake message at the start of
/// `bytes`, once its header is there; an error for one keyhole will not
/// buffer.
fn message_len(bytes: &[u8]) -> io::Result<Option<usize>> {
    let [kind, a, b, c, ..] = *bytes else {
        return Ok(None);
    };
    let body = u32::from_be_bytes([0, a, b, c]) as usize;
    if body > MAX_HANDSHAKE_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the server sent a post-handshake TLS message (type {kind}) of {body} bytes; \
                 keyhole accepts at most {MAX_HANDSHAKE_MESSAGE}"
            ),
        ));
    }
    Ok(Some(HANDSHAKE_HEADER_LEN + body))
}

/// A limit of [`Temper`]'s, as the stream's error.
fn tempered(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

fn closed_without_notify() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the server closed the connection without close_notify",
    )
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !ready!(this.poll_fill_rx(cx))? {
            return Poll::Ready(Ok(()));
        }
        if let Some(chunk) = this.rx.as_mut() {
            while buf.remaining() > 0 && !chunk.is_empty() {
                let front = chunk.front();
                let n = front.len().min(buf.remaining());
                buf.put_slice(&front[..n]);
                chunk.advance(n);
            }
        }
        this.release_rx_if_empty();
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_ready_to_seal(cx))?;
        let max = match &this.records {
            Engine::User(records) => records.room().max,
            Engine::Kernel { .. } => return this.poll_write_kernel(cx, buf),
        };
        let n = buf.len().min(max);
        this.queue(content::APPLICATION_DATA, &buf[..n])?;
        // Start writing; what does not fit now goes out on the next call or flush.
        if let Poll::Ready(Err(e)) = this.poll_write_tx(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_ready_to_seal(cx))?;
        Pin::new(&mut this.socket).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_close(cx)
    }
}

impl Leg for TlsStream {
    fn room(&self) -> Room {
        match &self.records {
            Engine::User(records) => records.room(),
            Engine::Kernel { .. } => Room::NONE,
        }
    }

    fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        _slot: &mut Option<Chunk>,
        _room: Room,
    ) -> Poll<io::Result<bool>> {
        self.poll_fill_rx(cx)
    }

    fn filled<'s>(&'s mut self, _slot: &'s mut Option<Chunk>) -> Option<&'s mut Chunk> {
        self.rx.as_mut()
    }

    fn release(&mut self, _slot: &mut Option<Chunk>) {
        self.release_rx_if_empty();
    }

    fn poll_send(&mut self, cx: &mut Context<'_>, chunk: &mut Chunk) -> Poll<io::Result<()>> {
        loop {
            if chunk.is_empty() {
                return Poll::Ready(Ok(()));
            }
            if self.is_kernel() {
                ready!(self.poll_ready_to_seal(cx))?;
                let n = ready!(self.poll_write_kernel(cx, chunk.front()))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                chunk.advance(n);
                continue;
            }
            if !chunk.framed {
                ready!(self.poll_ready_to_seal(cx))?;
                let Engine::User(records) = &mut self.records else {
                    continue;
                };
                let room = records.room();
                let capacity = chunk.bytes().len();
                match chunk.single() {
                    // The usual case: read with room around it, sealed where it lies.
                    Some(plain)
                        if plain.start >= room.head
                            && plain.end + room.tail <= capacity
                            && plain.len() <= room.max =>
                    {
                        let record = records
                            .seal(content::APPLICATION_DATA, chunk.bytes_mut(), plain)
                            .map_err(invalid)?;
                        chunk.set_single(record);
                        chunk.framed = true;
                    }
                    // Bytes without room (never from keyhole's own legs):
                    // copied into a record of our own, a piece at a time.
                    _ => {
                        let n = chunk.front().len().min(room.max);
                        self.queue(content::APPLICATION_DATA, &chunk.front()[..n])?;
                        chunk.advance(n);
                        ready!(self.poll_write_tx(cx))?;
                        continue;
                    }
                }
            }
            let n = ready!(Pin::new(&mut self.socket).poll_write(cx, chunk.front()))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            chunk.advance(n);
        }
    }

    fn poll_flush_leg(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_ready_to_seal(cx))?;
        Pin::new(&mut self.socket).poll_flush(cx)
    }

    fn poll_shutdown_leg(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A completed message: type, body, whether it ended its record.
    type Message = (u8, Vec<u8>, bool);

    /// Feeds `records` one at a time; returns the messages completed.
    fn reassemble(records: &[&[u8]]) -> io::Result<(Vec<Message>, Reassembly)> {
        let mut reassembly = Reassembly::default();
        let mut got = Vec::new();
        for record in records {
            reassembly.feed(record, |kind, body, ends| {
                got.push((kind, body.to_vec(), ends));
                Ok(())
            })?;
        }
        Ok((got, reassembly))
    }

    fn message(kind: u8, body: &[u8]) -> Vec<u8> {
        let len = (body.len() as u32).to_be_bytes();
        [&[kind, len[1], len[2], len[3]][..], body].concat()
    }

    #[test]
    fn whole_messages_are_read_where_they_lie_several_to_a_record() {
        let ticket = message(HANDSHAKE_NEW_SESSION_TICKET, &[9; 40]);
        let update = message(HANDSHAKE_KEY_UPDATE, &[1]);
        let record = [ticket.clone(), ticket.clone(), update].concat();
        let (got, reassembly) = reassemble(&[&record]).expect("whole");
        assert_eq!(
            got,
            vec![
                (HANDSHAKE_NEW_SESSION_TICKET, vec![9; 40], false),
                (HANDSHAKE_NEW_SESSION_TICKET, vec![9; 40], false),
                (HANDSHAKE_KEY_UPDATE, vec![1], true),
            ]
        );
        assert!(!reassembly.is_pending());
        // Nothing was copied: no buffer was ever made.
        assert_eq!(reassembly.partial.capacity(), 0);
    }

    #[test]
    fn a_message_split_anywhere_even_inside_its_header_is_put_back_together() {
        let ticket = message(HANDSHAKE_NEW_SESSION_TICKET, &(0..200).collect::<Vec<u8>>());
        for cuts in [vec![1], vec![3], vec![4], vec![5, 100], vec![2, 3, 150]] {
            let mut pieces = Vec::new();
            let mut from = 0;
            for &cut in cuts.iter().chain([ticket.len()].iter()) {
                pieces.push(&ticket[from..cut]);
                from = cut;
            }
            let (got, reassembly) = reassemble(&pieces).expect("reassembled");
            assert_eq!(
                got,
                vec![(HANDSHAKE_NEW_SESSION_TICKET, ticket[4..].to_vec(), true)],
                "cut at {cuts:?}"
            );
            assert!(!reassembly.is_pending());
            assert_eq!(reassembly.partial.capacity(), 0, "freed once whole");
        }
    }

    #[test]
    fn a_record_can_end_one_message_and_start_the_next() {
        let a = message(HANDSHAKE_NEW_SESSION_TICKET, &[1; 30]);
        let b = message(HANDSHAKE_NEW_SESSION_TICKET, &[2; 30]);
        let c = message(HANDSHAKE_KEY_UPDATE, &[0]);
        let stream = [a, b, c].concat();
        // Byte by byte: every message ends its (one-byte) record.
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        let (got, _) = reassemble(&bytes).expect("byte by byte");
        assert_eq!(
            got,
            vec![
                (HANDSHAKE_NEW_SESSION_TICKET, vec![1; 30], true),
                (HANDSHAKE_NEW_SESSION_TICKET, vec![2; 30], true),
                (HANDSHAKE_KEY_UPDATE, vec![0], true),
            ]
        );
        // Cut in the middle of the first and of the second.
        let (got, reassembly) =
            reassemble(&[&stream[..10], &stream[10..50], &stream[50..]]).expect("in three");
        assert_eq!(
            got,
            vec![
                (HANDSHAKE_NEW_SESSION_TICKET, vec![1; 30], false),
                (HANDSHAKE_NEW_SESSION_TICKET, vec![2; 30], false),
                (HANDSHAKE_KEY_UPDATE, vec![0], true),
            ]
        );
        assert!(!reassembly.is_pending());
        // A record that ends the first and starts the second leaves a piece pending.
        let (_, reassembly) = reassemble(&[&stream[..10], &stream[10..40]]).expect("pending");
        assert!(reassembly.is_pending());
        assert_eq!(reassembly.partial, stream[34..40]);
    }

    #[test]
    fn messages_over_64_kib_are_refused_from_their_header() {
        let err = reassemble(&[&[HANDSHAKE_NEW_SESSION_TICKET, 1, 0, 0, 0]]).expect_err("refused");
        assert_eq!(
            err.to_string(),
            "the server sent a post-handshake TLS message (type 4) of 65536 bytes; \
             keyhole accepts at most 65535"
        );
        // The header itself in pieces: refused when it is whole.
        let err = reassemble(&[&[HANDSHAKE_NEW_SESSION_TICKET, 0xff], &[0xff, 0xff]])
            .expect_err("refused");
        assert!(err.to_string().contains("16777215 bytes"), "{err}");
        // 65535 bytes of body in 16 KiB records: accepted, and nothing more kept.
        let big = message(
            HANDSHAKE_NEW_SESSION_TICKET,
            &vec![7; MAX_HANDSHAKE_MESSAGE],
        );
        let pieces: Vec<&[u8]> = big.chunks(16 * 1024).collect();
        let (got, reassembly) = reassemble(&pieces).expect("at the limit");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1.len(), MAX_HANDSHAKE_MESSAGE);
        assert!(!reassembly.is_pending());
    }

    #[test]
    fn empty_handshake_records_are_refused() {
        let err = reassemble(&[&[]]).expect_err("refused");
        assert!(
            err.to_string().contains("empty TLS handshake record"),
            "{err}"
        );
    }

    #[test]
    fn other_records_between_the_pieces_of_a_message_are_refused() {
        let mut reassembly = Reassembly::default();
        // Nothing pending: anything may come.
        for content_type in [
            content::APPLICATION_DATA,
            content::ALERT,
            content::HANDSHAKE,
        ] {
            reassembly
                .check_between_pieces(content_type)
                .expect("no message pending");
        }
        reassembly
            .feed(
                &[HANDSHAKE_NEW_SESSION_TICKET, 0, 0, 10, 1, 2],
                |_, _, _| panic!("not whole yet"),
            )
            .expect("first piece");
        reassembly
            .check_between_pieces(content::HANDSHAKE)
            .expect("the next piece");
        let err = reassembly
            .check_between_pieces(content::APPLICATION_DATA)
            .expect_err("data between pieces");
        assert_eq!(
            err.to_string(),
            "the server sent application data in the middle of a handshake message split \
             across records (TLS forbids it, RFC 8446 section 5.1)"
        );
        let err = reassembly
            .check_between_pieces(content::ALERT)
            .expect_err("an alert between pieces");
        assert!(
            err.to_string().contains("sent an alert in the middle"),
            "{err}"
        );
    }

    #[test]
    fn an_error_from_a_message_stops_the_record() {
        let record = [
            message(HANDSHAKE_KEY_UPDATE, &[0]),
            message(HANDSHAKE_NEW_SESSION_TICKET, &[1; 8]),
        ]
        .concat();
        let mut seen = 0;
        let err = Reassembly::default()
            .feed(&record, |_, _, ends_record| {
                seen += 1;
                if ends_record {
                    Ok(())
                } else {
                    Err(io::Error::other("key update before the end of its record"))
                }
            })
            .expect_err("refused");
        assert_eq!(seen, 1);
        assert!(err.to_string().contains("key update"), "{err}");
    }
}
