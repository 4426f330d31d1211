//! Per-protocol session drivers: the client side of the startup, then the
//! hand-off to the upstream and the splice loop.

mod error;
mod legs;
pub mod mysql;
mod outcome;
pub mod postgres;

pub use error::{Abandoned, Admission, SessionError, SessionReport};
pub use outcome::{Ending, Outcome};

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::server::TlsStream;

use std::sync::Arc;

use crate::config::{IamProvider, Protocol};
use crate::credentials::{Token, TokenLogin};
use crate::metrics::TargetMetrics;
use crate::net::{Rewind, Socket};

/// How a target's clients log in to the database: as the user they send
/// (the default) or the one `user=` fixes, and with their own password or,
/// with `iam=`, a token keyhole answers the server's request with.
pub struct LoginPolicy {
    pub fixed_user: Option<String>,
    pub tokens: Option<Arc<TokenLogin>>,
    /// `password-file=`: the password of `fixed_user`, which keyhole logs
    /// in with itself (cleartext, md5 or SCRAM-SHA-256; MySQL:
    /// mysql_native_password or mysql_clear_password; as the server asks).
    pub password: Option<crate::config::cloudsql::Secret>,
    pub protocol: Protocol,
    /// The target's counters (token injections and failures).
    pub metrics: Arc<TargetMetrics>,
}

impl LoginPolicy {
    /// The database user for a client that sent `client_user`.
    pub fn database_user(&self, client_user: &str) -> String {
        let user = self.fixed_user.as_deref().unwrap_or(client_user);
        match &self.tokens {
            Some(tokens) => tokens.database_user(user, self.protocol),
            None => user.to_owned(),
        }
    }

    /// The token for `user`, if this target logs in with tokens.
    pub async fn token(&self, user: &str) -> Result<Option<Token>, SessionError> {
        let Some(tokens) = &self.tokens else {
            return Ok(None);
        };
        match tokens.token(user).await {
            Ok(token) => Ok(Some(token)),
            Err(source) => {
                self.metrics.token_failed();
                Err(SessionError::Credentials {
                    user: user.to_owned(),
                    source,
                })
            }
        }
    }

    /// Whether keyhole answers the server's authentication itself (with a
    /// password; token logins keep their own path unless pooled).
    pub fn has_password(&self) -> bool {
        self.password.is_some()
    }

    /// A token answered the server's password request.
    pub fn token_injected(&self) {
        self.metrics.token_injected();
    }

    /// The server asked for something other than the password a token
    /// answers: say what to check on the database's side.
    pub fn token_not_asked(&self, asked: String, user: &str) -> SessionError {
        self.metrics.token_failed();
        let provider = self
            .tokens
            .as_ref()
            .map_or(IamProvider::Aws, |t| t.provider());
        let hint = match (provider, self.protocol) {
            (IamProvider::Aws, Protocol::Postgres) => {
                "on RDS, the user needs GRANT rds_iam, and the instance IAM database authentication"
            }
            (IamProvider::Aws, Protocol::Mysql) => {
                "on RDS, the user must be IDENTIFIED WITH AWSAuthenticationPlugin AS 'RDS', and the instance needs IAM database authentication"
            }
            (IamProvider::Gcp, _) => {
                "on Cloud SQL, the user must be an IAM user or service account (CLOUD_IAM_USER or CLOUD_IAM_SERVICE_ACCOUNT) and the instance needs the cloudsql_iam_authentication flag"
            }
        };
        SessionError::TokenNotAsked {
            asked,
            user: user.to_owned(),
            hint,
        }
    }
}

/// The client's leg: plain, or TLS when keyhole has a local certificate.
pub enum ClientStream {
    Plain(Socket),
    Tls(Box<TlsStream<Rewind<Socket>>>),
    /// Handed to the TLS acceptor, which failed: nothing left to talk to.
    Gone,
}

crate::plain_leg!(ClientStream);

fn gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "client stream was consumed by a failed TLS handshake",
    )
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Gone => Poll::Ready(Err(gone())),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Gone => Poll::Ready(Err(gone())),
        }
    }
    /// Forwarded, not left to the default (which writes the first slice
    /// only): the splice hands a client leg every record it opened in one
    /// call, and PostgreSQL seals 8 KiB per record, so a 64 KiB read would
    /// otherwise go out in eight sends.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ClientStream::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ClientStream::Gone => Poll::Ready(Err(gone())),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            ClientStream::Plain(s) => s.is_write_vectored(),
            ClientStream::Tls(s) => s.is_write_vectored(),
            ClientStream::Gone => false,
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Gone => Poll::Ready(Err(gone())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Gone => Poll::Ready(Err(gone())),
        }
    }
}

/// How long the server has to end its session after the client has gone
/// (a Postgres server that was idle exits at once on the client's EOF)
/// before keyhole takes it to be busy with the client's last statement.
pub const CLIENT_GONE_GRACE: Duration = Duration::from_secs(1);

/// The session's last stage, the same for every protocol: the relay runs
/// until either side ends it or the session is cut (shutdown, a limit), and
/// its byte counts go into the report either way. When the client has gone
/// and the server has not followed within [`CLIENT_GONE_GRACE`], the relay
/// ends with [`SessionError::ClientGone`]: the server is busy with a
/// statement nobody will read, and the protocol driver decides what to do
/// about it.
async fn relay_until_cut(
    mut relay: impl crate::splice::Relay,
    cut: &tokio_util::sync::CancellationToken,
    report: &mut SessionReport,
) -> Result<(), SessionError> {
    // The trace's splice phase starts here (the login has ended).
    #[cfg(feature = "otel")]
    crate::telemetry::otel::mark(crate::telemetry::otel::Phase::Splice, Duration::ZERO, None);
    let mut grace: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let relayed = std::future::poll_fn(|cx| {
        if let Poll::Ready(result) = Pin::new(&mut relay).poll(cx) {
            return Poll::Ready(result.map_err(SessionError::from));
        }
        // A client that said goodbye first meant its last statements to
        // run to their end, as they would without keyhole.
        if relay.client_gone() && !relay.client_said_goodbye() {
            let sleep =
                grace.get_or_insert_with(|| Box::pin(tokio::time::sleep(CLIENT_GONE_GRACE)));
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(SessionError::ClientGone(Abandoned::Noticed)));
            }
        }
        Poll::Pending
    });
    let result = tokio::select! {
        r = relayed => r,
        _ = cut.cancelled() => Err(SessionError::Cut),
    };
    report.transferred = relay.delivered();
    report.metered = relay.reported();
    report.client_said_goodbye = relay.client_said_goodbye();
    report.goodbye_watched = relay.watches_goodbye();
    report.first_to_end = relay.first_to_end();
    result
}

/// After the relay: whether the client left a busy server behind. Either
/// the relay said so, or the client's leg failed (a reset) and the server,
/// shut down now, does not close within [`CLIENT_GONE_GRACE`] (what it
/// still sends is read and dropped meanwhile).
async fn left_busy<S>(
    result: &Result<(), SessionError>,
    report: &SessionReport,
    server: &mut S,
) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if report.client_said_goodbye {
        return false;
    }
    match result {
        Err(SessionError::ClientGone(_)) => true,
        Err(SessionError::Splice(e)) if e.side == crate::splice::Side::Client => {
            let settled = async {
                let _ = server.shutdown().await;
                // On the heap: an array here would sit in every session's
                // future (8 KiB per connection), used or not.
                let mut sink = vec![0u8; 8192];
                while matches!(server.read(&mut sink).await, Ok(n) if n > 0) {}
            };
            tokio::time::timeout(CLIENT_GONE_GRACE, settled)
                .await
                .is_err()
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::IoSlice;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connected loopback pair: (keyhole's end, the peer's).
    async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let (connected, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        (connected.expect("connect"), accepted.expect("accept").0)
    }

    #[tokio::test]
    async fn a_plain_client_leg_writes_every_slice_in_one_call() {
        let (ours, mut peer) = tcp_pair().await;
        let mut client = ClientStream::Plain(Socket::Tcp(ours));
        assert!(client.is_write_vectored());
        let slices = [
            IoSlice::new(b"one "),
            IoSlice::new(b"two "),
            IoSlice::new(b"three"),
        ];
        let n = client.write_vectored(&slices).await.expect("write");
        assert_eq!(
            n, 13,
            "one call takes every slice (the default takes the first only)"
        );
        drop(client);
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"one two three");
    }

    #[tokio::test]
    async fn a_rewound_socket_writes_every_slice_in_one_call() {
        let (ours, mut peer) = tcp_pair().await;
        let mut rewound = Rewind::new(bytes::Bytes::new(), Socket::Tcp(ours));
        assert!(rewound.is_write_vectored());
        let slices = [IoSlice::new(b"ab"), IoSlice::new(b"cd")];
        assert_eq!(rewound.write_vectored(&slices).await.expect("write"), 4);
        drop(rewound);
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"abcd");
    }
}
