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
//! own side before its keys reach the suite's confidentiality limit.
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
    key_update_due: bool,
    /// Whether shutting down sends close_notify before the FIN.
    close_notify: bool,
    close_notify_sent: bool,
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
        Socket::Unix(_) => Err(io::Error::other("internal: kernel TLS on a local socket")),
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
            (KernelTls::Auto, Socket::Unix(_)) => {
                tracing::debug!(
                    "TLS records stay in keyhole's record layer: kernel TLS needs a TCP socket, \
                     and this one is a local channel (an SSH hop)"
                );
                None
            }
            (KernelTls::Auto, Socket::Tcp(_)) => {
                // The kernel reads records from the socket; these are already out of it.
                tracing::debug!(
                    "TLS records stay in keyhole's record layer: the server sent records \
                     with its last handshake flight"
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
            key_update_due: false,
            close_notify: true,
            close_notify_sent: false,
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
                            io::Error::new(
                                io::ErrorKind::InvalidData,
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
            match u8::from(content_type) {
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

/// Handshake messages after the handshake. Some(requested) for a key update.
fn on_handshake(
    session: &mut KernelConnection<ClientConnectionData>,
    temper: &mut Temper,
    tls13: bool,
    mut messages: &[u8],
) -> io::Result<Option<bool>> {
    let mut update = None;
    while !messages.is_empty() {
        let [kind, a, b, c, rest @ ..] = messages else {
            return Err(fragmented());
        };
        let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
        if rest.len() < len {
            return Err(fragmented());
        }
        let (body, rest) = rest.split_at(len);
        messages = rest;
        match (*kind, tls13) {
            (HANDSHAKE_NEW_SESSION_TICKET, true) => {
                // A ticket rustls cannot use costs a resumption, nothing more.
                if let Err(e) = session.handle_new_session_ticket(body) {
                    tracing::debug!(error = %e, "ignored a TLS session ticket from the server");
                }
            }
            (HANDSHAKE_KEY_UPDATE, true) => {
                temper.key_update().map_err(tempered)?;
                match body {
                    [0] => update = Some(update.unwrap_or(false)),
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
        if update.is_some() && !messages.is_empty() {
            // Records after a key update are under the new key; a message
            // sharing its record would be a protocol violation.
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the server sent data after a key update in the same record",
            ));
        }
    }
    Ok(update)
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

fn fragmented() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "the server split a post-handshake TLS message across records, which keyhole does not reassemble",
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
