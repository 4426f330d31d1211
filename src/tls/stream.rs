//! The upstream TLS stream once the handshake is done: a `TcpStream`, the
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

use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use rustls::client::ClientConnectionData;
use rustls::kernel::KernelConnection;
use rustls::{ExtractedSecrets, SupportedCipherSuite};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::record::{content, DirectionKeys, RecordError, RecordLayer};
use crate::splice::buffer::{Chunk, Room};
use crate::splice::Leg;

const HANDSHAKE_NEW_SESSION_TICKET: u8 = 4;
const HANDSHAKE_KEY_UPDATE: u8 = 24;
const HANDSHAKE_HELLO_REQUEST: u8 = 0;
const ALERT_CLOSE_NOTIFY: u8 = 0;
const ALERT_USER_CANCELED: u8 = 90;

pub struct TlsStream {
    tcp: TcpStream,
    records: RecordLayer,
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
    peer_closed: bool,
    key_update_due: bool,
    /// Whether shutting down sends close_notify before the FIN.
    close_notify: bool,
    close_notify_sent: bool,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("tcp", &self.tcp)
            .field("tls13", &self.records.is_tls13())
            .finish_non_exhaustive()
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
        tcp: TcpStream,
        secrets: ExtractedSecrets,
        session: KernelConnection<ClientConnectionData>,
        leftover: &[u8],
    ) -> io::Result<TlsStream> {
        let (rx_seq, rx) = secrets.rx;
        let (tx_seq, tx) = secrets.tx;
        let records = RecordLayer::new(
            session.protocol_version(),
            DirectionKeys::new(rx_seq, &rx).map_err(invalid)?,
            DirectionKeys::new(tx_seq, &tx).map_err(invalid)?,
        )
        .map_err(invalid)?;
        let confidentiality_limit = match session.negotiated_cipher_suite() {
            SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
            SupportedCipherSuite::Tls12(s) => s.common.confidentiality_limit,
        };
        let mut stream = TlsStream {
            tcp,
            records,
            session,
            confidentiality_limit,
            rx: None,
            raw: 0..0,
            tx: None,
            peer_closed: false,
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

    /// Makes opened plaintext ready in `rx`: Ok(true) when there is some,
    /// Ok(false) once the server has sent close_notify.
    fn poll_fill_rx(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        loop {
            if self.rx.as_ref().is_some_and(|c| !c.is_empty()) {
                return Poll::Ready(Ok(true));
            }
            if self.peer_closed {
                self.release_rx_if_empty();
                return Poll::Ready(Ok(false));
            }
            if self.open_records()? {
                continue;
            }
            let chunk = self.rx.get_or_insert_with(Chunk::take);
            chunk.clear();
            // Keep the partial record, at the front.
            if self.raw.start > 0 {
                chunk.bytes_mut().copy_within(self.raw.clone(), 0);
                self.raw = 0..self.raw.len();
            }
            let mut read_buf = ReadBuf::new(&mut chunk.bytes_mut()[self.raw.end..]);
            match Pin::new(&mut self.tcp).poll_read(cx, &mut read_buf) {
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
                            io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the server closed the connection without close_notify",
                            )
                        }));
                    }
                    self.raw.end += n;
                }
            }
        }
    }

    /// Opens every whole record in `raw`. True if any was consumed.
    fn open_records(&mut self) -> io::Result<bool> {
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
            let opened = self
                .records
                .open(&mut chunk.bytes_mut()[record.clone()])
                .map_err(invalid)?;
            self.raw.start += len;
            progressed = true;
            let payload = record.start + opened.payload.start..record.start + opened.payload.end;
            match opened.content_type {
                content::APPLICATION_DATA => {
                    chunk.push(payload);
                }
                content::ALERT => {
                    self.peer_closed = on_alert(&chunk.bytes()[payload])?;
                }
                content::HANDSHAKE => {
                    let update = on_handshake(
                        &mut self.session,
                        self.records.is_tls13(),
                        &chunk.bytes()[payload],
                    )?;
                    if let Some(requested) = update {
                        let (seq, secrets) =
                            self.session.update_rx_secret().map_err(rustls_error)?;
                        self.records.rx = DirectionKeys::new(seq, &secrets).map_err(invalid)?;
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
    fn queue(&mut self, content_type: u8, payload: &[u8]) -> io::Result<()> {
        let room = self.records.room();
        let chunk = self.tx.get_or_insert_with(Chunk::take);
        let plain = room.head..room.head + payload.len();
        chunk.bytes_mut()[plain.clone()].copy_from_slice(payload);
        let record = self
            .records
            .seal(content_type, chunk.bytes_mut(), plain)
            .map_err(invalid)?;
        chunk.set_single(record);
        Ok(())
    }

    /// Writes out `tx`, then gives its buffer back.
    fn poll_write_tx(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(chunk) = self.tx.as_mut() {
            if chunk.is_empty() {
                self.tx = None;
                break;
            }
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, chunk.front()))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            chunk.advance(n);
        }
        Poll::Ready(Ok(()))
    }

    /// Everything that must go out before more application data: our own
    /// pending records, and a key update when one is due.
    fn poll_ready_to_seal(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_write_tx(cx))?;
        if self.records.tx.seq() >= self.confidentiality_limit {
            if !self.records.is_tls13() {
                return Poll::Ready(Err(invalid(RecordError::KeysExhausted)));
            }
            self.key_update_due = true;
        }
        if self.key_update_due {
            // KeyUpdate(update_not_requested), under the old key; then the new one.
            self.queue(content::HANDSHAKE, &[HANDSHAKE_KEY_UPDATE, 0, 0, 1, 0])?;
            let (seq, secrets) = self.session.update_tx_secret().map_err(rustls_error)?;
            self.records.tx = DirectionKeys::new(seq, &secrets).map_err(invalid)?;
            self.key_update_due = false;
            ready!(self.poll_write_tx(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_ready_to_seal(cx))?;
        if self.close_notify && !self.close_notify_sent {
            self.close_notify_sent = true;
            self.queue(content::ALERT, &[1, ALERT_CLOSE_NOTIFY])?;
            ready!(self.poll_write_tx(cx))?;
        }
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// An alert from the server: Ok(true) for close_notify, an error for a
/// fatal one.
fn on_alert(payload: &[u8]) -> io::Result<bool> {
    match payload {
        [_, ALERT_CLOSE_NOTIFY] => Ok(true),
        [_, ALERT_USER_CANCELED] => Ok(false),
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
            (HANDSHAKE_KEY_UPDATE, true) => match body {
                [0] => update = Some(update.unwrap_or(false)),
                [1] => update = Some(true),
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the server sent a malformed TLS key update",
                    ))
                }
            },
            // TLS 1.2 renegotiation: a client may ignore the request.
            (HANDSHAKE_HELLO_REQUEST, false) => {}
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
        let n = buf.len().min(this.records.room().max);
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
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_close(cx)
    }
}

impl Leg for TlsStream {
    fn room(&self) -> Room {
        self.records.room()
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
            if !chunk.framed {
                ready!(self.poll_ready_to_seal(cx))?;
                let room = self.records.room();
                let capacity = chunk.bytes().len();
                match chunk.single() {
                    // The usual case: read with room around it, sealed where it lies.
                    Some(plain)
                        if plain.start >= room.head
                            && plain.end + room.tail <= capacity
                            && plain.len() <= room.max =>
                    {
                        let record = self
                            .records
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
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, chunk.front()))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            chunk.advance(n);
        }
    }

    fn poll_flush_leg(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_ready_to_seal(cx))?;
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown_leg(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_close(cx)
    }
}
