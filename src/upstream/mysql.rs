//! MySQL STARTTLS, in two steps because the server speaks first and the
//! client's capabilities must go into keyhole's SSLRequest:
//!
//! 1. [`Upstream::greet_mysql`]: dial, read the server's HandshakeV10, and
//!    require it to offer TLS (no plaintext fallback, ever).
//! 2. [`Upstream::upgrade_mysql`]: once the client has answered, send the
//!    SSLRequest made of the client's own first 32 bytes and complete
//!    verified TLS. MySQL and MariaDB fix a session's capabilities, charset
//!    and (MariaDB) extended capabilities from the SSLRequest and do not
//!    re-read them from the response that follows, so they must be the
//!    client's, not a guess.
//!
//! The greeting comes before TLS, by the protocol's design (there is no
//! second greeting inside TLS), so anything on the path can write it. keyhole
//! trusts it for nothing that matters to security: a greeting without TLS is
//! refused (failing closed), the capabilities keyhole sends the server are
//! the client's, and what the client is shown is checked first: a server
//! version that is not a printable version number is refused rather than
//! passed on (`protocol::mysql::parse_greeting`). Behind a Cloud SQL
//! instance's TLS-first port the greeting is inside TLS.

use std::io;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Peer, Upstream, UpstreamError, UpstreamStream};
use crate::credentials::Token;
use crate::net::Socket;
use crate::protocol::mysql::{self, caps, Greeting};

/// A server connection that has greeted and awaits keyhole's SSLRequest,
/// or (a Cloud SQL instance) greeted inside TLS and needs none.
pub struct Greeted {
    conn: Conn,
    /// The greeting's sequence id (the SSLRequest takes the next one).
    seq: u8,
    pub greeting: Greeting,
}

enum Conn {
    /// Plain TCP before keyhole's SSLRequest.
    Starttls { tcp: Socket, addr: Peer },
    /// Already TLS from the first byte: the greeting came through it.
    Tunnel(UpstreamStream),
}

impl Greeted {
    /// The greeting's sequence id (usually 0).
    pub fn seq(&self) -> u8 {
        self.seq
    }
}

impl Upstream {
    /// Connects and reads the greeting; refuses a server without TLS.
    pub async fn greet_mysql(&self) -> Result<Greeted, UpstreamError> {
        if self.is_tunnel() {
            return self.greet_in_tunnel().await;
        }
        let (mut tcp, addr) = self.dial().await?;
        let after = self.connect_timeout();
        let (seq, payload) = tokio::time::timeout(after, read_one_packet(&mut tcp, &addr))
            .await
            .map_err(|_| UpstreamError::GreetingTimeout {
                addr: addr.clone(),
                after,
            })??;
        let greeting = greeting_from(&addr, &payload)?;
        if greeting.capabilities & caps::SSL == 0 {
            return Err(UpstreamError::TlsRefused { addr });
        }
        Ok(Greeted {
            conn: Conn::Starttls { tcp, addr },
            seq,
            greeting,
        })
    }

    /// A Cloud SQL instance: TLS first, then the server's greeting through
    /// it. The session is already encrypted, so the greeting need not offer
    /// TLS, and keyhole never asks for it again.
    async fn greet_in_tunnel(&self) -> Result<Greeted, UpstreamError> {
        let (mut stream, addr) = self.connect_tunnel_at().await?;
        let after = self.connect_timeout();
        let (seq, payload) = tokio::time::timeout(after, read_one_packet(&mut stream, &addr))
            .await
            .map_err(|_| UpstreamError::GreetingTimeout {
                addr: addr.clone(),
                after,
            })??;
        let greeting = greeting_from(&addr, &payload)?;
        Ok(Greeted {
            conn: Conn::Tunnel(stream),
            seq,
            greeting,
        })
    }

    /// Sends the SSLRequest built from the client's HandshakeResponse41
    /// payload and completes verified TLS.
    pub async fn upgrade_mysql(
        &self,
        greeted: Greeted,
        client_response: &[u8],
    ) -> Result<UpstreamStream, UpstreamError> {
        let (mut tcp, addr, seq) = match greeted.conn {
            Conn::Starttls { tcp, addr } => (tcp, addr, greeted.seq),
            // Nothing to upgrade: the response goes through the tunnel as is.
            Conn::Tunnel(stream) => return Ok(stream),
        };
        // Nothing may arrive between the greeting and our SSLRequest.
        super::ensure_nothing_buffered(&mut tcp, &addr)?;
        let mut request = BytesMut::with_capacity(4 + mysql::SSL_REQUEST_LEN);
        mysql::encode_packet(
            &mut request,
            seq.wrapping_add(1),
            &mysql::ssl_request(client_response),
        );
        let after = self.connect_timeout();
        let upgrade = async {
            tcp.write_all(&request)
                .await
                .map_err(|source| UpstreamError::Io {
                    addr: addr.clone(),
                    source,
                })?;
            self.handshake(tcp).await
        };
        tokio::time::timeout(after, upgrade)
            .await
            .map_err(|_| UpstreamError::TlsTimeout { addr, after })?
    }
}

impl Upstream {
    /// Stops the statement running in session `connection_id` with
    /// `KILL QUERY` on a side connection, logged in as `user` with `token`
    /// (the session's client has gone; see the MySQL session driver). Only a
    /// token login can do this: keyhole never holds a user's password. The
    /// server lets a user kill only its own sessions' statements.
    pub async fn kill_query(
        &self,
        connection_id: u32,
        user: &str,
        token: &Token,
    ) -> Result<(), UpstreamError> {
        let after = self.connect_timeout();
        tokio::time::timeout(after, self.kill_query_now(connection_id, user, token))
            .await
            .unwrap_or_else(|_| {
                Err(UpstreamError::Tls {
                    message: format!("the KILL QUERY connection took more than {after:?}"),
                })
            })
    }

    async fn kill_query_now(
        &self,
        connection_id: u32,
        user: &str,
        token: &Token,
    ) -> Result<(), UpstreamError> {
        let greeted = self.greet_mysql().await?;
        let login = mysql::own_login(&greeted.greeting, user);
        let tunnel = matches!(greeted.conn, Conn::Tunnel(_));
        // Sequence ids: greeting 0, keyhole's SSLRequest 1, the login 2;
        // inside a Cloud SQL tunnel there is no SSLRequest.
        let (mut seq, login) = if tunnel {
            (greeted.seq.wrapping_add(1), login)
        } else {
            (
                greeted.seq.wrapping_add(2),
                mysql::with_client_capabilities(&login, caps::SSL),
            )
        };
        let mut stream = self.upgrade_mysql(greeted, &login).await?;
        let failed = |what: &str| UpstreamError::Tls {
            message: format!("the KILL QUERY connection failed: {what}"),
        };
        let io = |e: io::Error| failed(&e.to_string());
        send_packet(&mut stream, seq, &login).await.map_err(io)?;
        loop {
            let (got, payload) = read_side_packet(&mut stream).await.map_err(io)?;
            match payload.first() {
                Some(&mysql::reply::OK) => break,
                Some(&mysql::reply::ERR) => {
                    let code = mysql::parse_err(&payload).map_or(0, |(code, _, _)| code);
                    return Err(failed(&format!(
                        "the login was refused with MySQL error {code}"
                    )));
                }
                Some(&mysql::reply::AUTH_SWITCH)
                    if mysql::auth_switch_plugin(&payload)
                        == Some(mysql::CLEAR_PASSWORD_PLUGIN) =>
                {
                    seq = got.wrapping_add(1);
                    let answer = mysql::clear_password_reply(token.expose());
                    send_packet(&mut stream, seq, &answer).await.map_err(io)?;
                }
                _ => return Err(failed("the server asked for more than a token answers")),
            }
        }
        let mut query = vec![COM_QUERY];
        query.extend_from_slice(format!("KILL QUERY {connection_id}").as_bytes());
        send_packet(&mut stream, 0, &query).await.map_err(io)?;
        let (_, payload) = read_side_packet(&mut stream).await.map_err(io)?;
        let _ = send_packet(&mut stream, 0, &[COM_QUIT]).await;
        match payload.first() {
            Some(&mysql::reply::OK) => Ok(()),
            _ => {
                let code = mysql::parse_err(&payload).map_or(0, |(code, _, _)| code);
                Err(failed(&format!(
                    "KILL QUERY was refused with MySQL error {code}"
                )))
            }
        }
    }
}

const COM_QUIT: u8 = 0x01;
const COM_QUERY: u8 = 0x03;

async fn send_packet(stream: &mut UpstreamStream, seq: u8, payload: &[u8]) -> io::Result<()> {
    let mut out = BytesMut::with_capacity(4 + payload.len());
    mysql::encode_packet(&mut out, seq, payload);
    stream.write_all(&out).await?;
    stream.flush().await
}

/// One packet on keyhole's side connection (small ones only: OK, ERR, a switch).
async fn read_side_packet(stream: &mut UpstreamStream) -> io::Result<(u8, Bytes)> {
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).await?;
    let len = usize::from(header[0]) | usize::from(header[1]) << 8 | usize::from(header[2]) << 16;
    if len > mysql::MAX_HANDSHAKE_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a packet of {len} bytes"),
        ));
    }
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await?;
    Ok((header[3], Bytes::from(payload)))
}

/// The server's first packet as a greeting, or the refusal it is. An ERR's
/// text is not shown: before STARTTLS it came from a peer nobody has
/// verified, and a Cloud SQL server-side proxy's refusal is reported the
/// same way (by its code).
fn greeting_from(addr: &Peer, payload: &Bytes) -> Result<Greeting, UpstreamError> {
    if payload.first() == Some(&mysql::reply::ERR) {
        let code = mysql::parse_err(payload).map_or(0, |(code, _, _)| code);
        return Err(UpstreamError::RefusedBeforeTls {
            addr: addr.clone(),
            code,
        });
    }
    mysql::parse_greeting(payload).map_err(|e| UpstreamError::NotMysql {
        addr: addr.clone(),
        reason: e.to_string(),
    })
}

/// Reads exactly one packet, nothing past it.
async fn read_one_packet(
    tcp: &mut (impl tokio::io::AsyncRead + Unpin),
    addr: &Peer,
) -> Result<(u8, Bytes), UpstreamError> {
    let io_err = |source: io::Error| match source.kind() {
        io::ErrorKind::UnexpectedEof => UpstreamError::ClosedDuringSetup { addr: addr.clone() },
        _ => UpstreamError::Io {
            addr: addr.clone(),
            source,
        },
    };
    let mut header = [0u8; 4];
    tcp.read_exact(&mut header).await.map_err(io_err)?;
    let len = usize::from(header[0]) | usize::from(header[1]) << 8 | usize::from(header[2]) << 16;
    if len > mysql::MAX_HANDSHAKE_PAYLOAD {
        return Err(UpstreamError::NotMysql {
            addr: addr.clone(),
            reason: format!("a first packet of {len} bytes"),
        });
    }
    let mut payload = vec![0u8; len];
    tcp.read_exact(&mut payload).await.map_err(io_err)?;
    Ok((header[3], Bytes::from(payload)))
}
