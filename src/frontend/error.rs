//! What can end a session before or during the splice, with one stable
//! label for logs and metrics and one client-safe rendering per protocol
//! (a Postgres ErrorResponse or a MySQL ERR packet).

use std::io;
use std::time::Duration;

use crate::credentials::CredentialsError;
use crate::protocol::mysql::{self, PacketError, ResponseError};
use crate::protocol::postgres::{sqlstate, MessageError, SaslError, StartupError};
use crate::splice::{Side, SpliceError, Transferred};
use crate::upstream::{humanize, UpstreamError};

/// Whether the connection fits under `--max-connections`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    OverLimit,
    /// The client's address is outside the target's `allow=` list.
    NotAllowed,
}

impl Admission {
    /// The refusal a client gets in place of a session, if any; `limit` is
    /// the configured `--max-connections`, for the message.
    pub fn check(self, limit: Option<usize>) -> Result<(), SessionError> {
        match self {
            Admission::Admitted => Ok(()),
            Admission::OverLimit => Err(SessionError::TooManyConnections(limit.unwrap_or(0))),
            Admission::NotAllowed => Err(SessionError::NotAllowed),
        }
    }
}

/// How a session went, for its log line.
#[derive(Debug, Default)]
pub struct SessionReport {
    pub user: Option<String>,
    pub database: Option<String>,
    pub transferred: Transferred,
    /// The part of `transferred` already counted in the target's metrics
    /// while the session ran.
    pub metered: Transferred,
    /// Set when the session ended with a cancel request forwarded.
    pub cancel_forwarded: bool,
    /// The client's last message in the session was its goodbye
    /// (Terminate, COM_QUIT): what it sent before, it meant to see through.
    pub client_said_goodbye: bool,
    /// Whether keyhole could see the goodbye: not where the kernel moves
    /// the bytes (splice(2)) or compression hides the messages.
    pub goodbye_watched: bool,
    /// The side that ended the session first, once it was relayed.
    pub first_to_end: Option<Side>,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("client sent no {what} within {} (--startup-timeout)", humanize(*.waited))]
    StartupTimeout {
        what: &'static str,
        waited: Duration,
    },
    #[error("client closed the connection during startup")]
    ClientClosed,
    #[error("client connection failed: {0}")]
    ClientIo(io::Error),
    #[error("invalid startup packet: {0}")]
    Startup(#[from] StartupError),
    #[error("invalid message from client: {0}")]
    ClientMessage(MessageError),
    #[error("invalid packet from client: {0}")]
    ClientPacket(PacketError),
    #[error("invalid handshake response: {0}")]
    Handshake(ResponseError),
    #[error("unexpected message '{}' from client during authentication", char::from(*.0))]
    UnexpectedClientMessage(u8),
    #[error("{0} sent twice or after TLS was set up")]
    RepeatedUpgrade(&'static str),
    #[error("client sent data after SSLRequest before the TLS handshake")]
    DataAfterUpgrade,
    #[error(
        "client asked for TLS, but keyhole has no --listen-cert: connect without TLS to keyhole"
    )]
    LocalTlsNotConfigured,
    #[error("direct TLS requires ALPN \"postgresql\"")]
    MissingAlpn,
    #[error("TLS handshake with the client failed: {0}")]
    ClientTls(io::Error),
    #[error("too many connections: keyhole allows {0} at once (--max-connections)")]
    TooManyConnections(usize),
    #[error("this client's address is not in the target's allow list (allow=)")]
    NotAllowed,
    #[error("keyhole could not get an IAM token for user \"{user}\": {source}")]
    Credentials {
        user: String,
        source: CredentialsError,
    },
    #[error("the server asked for {asked} for user \"{user}\", not for the password an IAM token answers: {hint}")]
    TokenNotAsked {
        asked: String,
        user: String,
        hint: &'static str,
    },
    /// keyhole's own login (`password-file=`, or a pooled connection) met
    /// a request it cannot answer, or the exchange failed.
    #[error("keyhole could not log in to the server as \"{user}\": {reason}")]
    OwnLogin { user: String, reason: String },
    /// `pool=session`: no pooled connection to be had.
    #[error("{0}")]
    Pool(#[from] crate::pool::PoolError),
    #[error("{0}")]
    Upstream(#[from] UpstreamError),
    /// The login as a whole ran past the startup timeout on the server's side.
    #[error("the server did not finish authentication within {} (--startup-timeout)", humanize(*.0))]
    UpstreamStalled(Duration),
    #[error("the server closed the connection during authentication")]
    UpstreamClosed,
    #[error("connection to the server failed during authentication: {0}")]
    UpstreamIo(io::Error),
    #[error("the server sent an invalid message during authentication: {0}")]
    UpstreamProtocol(String),
    #[error("{0}")]
    ChannelBinding(SaslError),
    #[error("the server refused the session ({0})")]
    ServerRefused(String),
    #[error("no session with that cancel key is open through keyhole")]
    UnknownCancelKey,
    #[error("cut at shutdown")]
    Cut,
    /// The client left while the server was still busy with its statement.
    #[error("the client went away while the server was still busy{0}")]
    ClientGone(Abandoned),
    #[error(transparent)]
    Splice(#[from] SpliceError),
}

/// What keyhole did about a statement whose client went away.
#[derive(Debug)]
pub enum Abandoned {
    /// Not yet decided (the relay has just noticed).
    Noticed,
    /// A cancel request for it reached the server (Postgres).
    Cancelled,
    /// The cancel request failed.
    CancelFailed(String),
    /// Nothing can stop it but the server itself (MySQL without the
    /// session's credentials): the bare close is all it gets.
    Left,
}

impl std::fmt::Display for Abandoned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Abandoned::Noticed => Ok(()),
            Abandoned::Cancelled => f.write_str("; keyhole cancelled its statement"),
            Abandoned::CancelFailed(e) => {
                write!(
                    f,
                    "; keyhole's cancel request for its statement failed: {e}"
                )
            }
            Abandoned::Left => {
                f.write_str("; its statement runs until the server notices the closed connection")
            }
        }
    }
}

/// What a client gets instead of a session, if it can still read anything.
enum Answer {
    /// Postgres SQLSTATE; MySQL error code and SQLSTATE.
    Send {
        sqlstate: &'static str,
        mysql_code: u16,
        mysql_sqlstate: &'static str,
    },
    /// An ERR packet for a MySQL client; nothing for a Postgres one.
    MysqlOnly {
        mysql_code: u16,
        mysql_sqlstate: &'static str,
    },
    /// The client is gone, mid-TLS, already has the server's own error, or
    /// (cancel) expects nothing by protocol; or PostgreSQL itself would close
    /// without a word here (a startup length out of its range, which is what
    /// a typed message before the startup packet looks like, or a
    /// CancelRequest of the wrong length), and keyhole, standing in for it,
    /// does the same: its log line says why, as the server's log would.
    Nothing,
}

impl SessionError {
    fn answer(&self) -> Answer {
        use mysql::code;
        let client_fault = Answer::Send {
            sqlstate: sqlstate::PROTOCOL_VIOLATION,
            mysql_code: code::BAD_HANDSHAKE,
            mysql_sqlstate: "08S01",
        };
        // What PostgreSQL answers a protocol version it does not speak with;
        // a repeated SSLRequest or GSSENCRequest is one, since the server
        // reads its code as a version once the request was answered.
        let unsupported = Answer::Send {
            sqlstate: sqlstate::FEATURE_NOT_SUPPORTED,
            mysql_code: code::BAD_HANDSHAKE,
            mysql_sqlstate: "08S01",
        };
        match self {
            // What a MySQL server answers a packet over its
            // max_allowed_packet, or one out of sequence.
            SessionError::ClientPacket(PacketError::TooLarge { .. }) => Answer::Send {
                sqlstate: sqlstate::PROTOCOL_VIOLATION,
                mysql_code: code::PACKET_TOO_LARGE,
                mysql_sqlstate: "08S01",
            },
            SessionError::ClientPacket(PacketError::OutOfOrder { .. }) => Answer::Send {
                sqlstate: sqlstate::PROTOCOL_VIOLATION,
                mysql_code: code::PACKETS_OUT_OF_ORDER,
                mysql_sqlstate: "08S01",
            },
            // A MySQL server answers a failed TLS handshake in plain text
            // (the client may still read it); a Postgres client gets nothing
            // it could read in the middle of TLS.
            SessionError::ClientTls(_) => Answer::MysqlOnly {
                mysql_code: code::BAD_HANDSHAKE,
                mysql_sqlstate: "08S01",
            },
            SessionError::Startup(e) => match e {
                StartupError::BadLength(_) | StartupError::BadCancelLength(_) => Answer::Nothing,
                StartupError::OldVersion(_) | StartupError::UnsupportedVersion(_) => unsupported,
                StartupError::NoUser => Answer::Send {
                    sqlstate: sqlstate::INVALID_AUTHORIZATION,
                    mysql_code: code::BAD_HANDSHAKE,
                    mysql_sqlstate: "08S01",
                },
                StartupError::Malformed(_) => client_fault,
            },
            SessionError::RepeatedUpgrade(_) => unsupported,
            SessionError::StartupTimeout { .. }
            | SessionError::ClientMessage(_)
            | SessionError::Handshake(_)
            | SessionError::UnexpectedClientMessage(_)
            | SessionError::DataAfterUpgrade
            | SessionError::MissingAlpn => client_fault,
            // Over plain text (MySQL: before any TLS): still readable.
            SessionError::LocalTlsNotConfigured => client_fault,
            SessionError::TooManyConnections(_) => Answer::Send {
                sqlstate: sqlstate::TOO_MANY_CONNECTIONS,
                mysql_code: code::TOO_MANY_CONNECTIONS,
                mysql_sqlstate: "08004",
            },
            SessionError::NotAllowed => Answer::Send {
                sqlstate: sqlstate::INVALID_AUTHORIZATION,
                mysql_code: code::HOST_NOT_ALLOWED,
                mysql_sqlstate: "HY000",
            },
            SessionError::Credentials { .. } => Answer::Send {
                sqlstate: sqlstate::UNABLE_TO_CONNECT,
                mysql_code: code::CANNOT_CONNECT,
                mysql_sqlstate: "08S01",
            },
            SessionError::TokenNotAsked { .. } | SessionError::OwnLogin { .. } => Answer::Send {
                sqlstate: sqlstate::INVALID_AUTHORIZATION,
                mysql_code: code::ACCESS_DENIED,
                mysql_sqlstate: "28000",
            },
            SessionError::Pool(crate::pool::PoolError::Exhausted { .. }) => Answer::Send {
                sqlstate: sqlstate::TOO_MANY_CONNECTIONS,
                mysql_code: code::TOO_MANY_CONNECTIONS,
                mysql_sqlstate: "08004",
            },
            SessionError::Pool(crate::pool::PoolError::Closed) => Answer::Send {
                sqlstate: sqlstate::CANNOT_CONNECT_NOW,
                mysql_code: code::CANNOT_CONNECT,
                mysql_sqlstate: "08S01",
            },
            SessionError::Upstream(e) => Answer::Send {
                sqlstate: sqlstate::UNABLE_TO_CONNECT,
                mysql_code: if e.is_tls() {
                    code::TLS_ERROR
                } else {
                    code::CANNOT_CONNECT
                },
                mysql_sqlstate: "08S01",
            },
            SessionError::ChannelBinding(_) => Answer::Send {
                sqlstate: sqlstate::UNABLE_TO_CONNECT,
                mysql_code: code::CANNOT_CONNECT,
                mysql_sqlstate: "08S01",
            },
            SessionError::UpstreamClosed
            | SessionError::UpstreamStalled(_)
            | SessionError::UpstreamIo(_)
            | SessionError::UpstreamProtocol(_) => Answer::Send {
                sqlstate: sqlstate::CONNECTION_FAILURE,
                mysql_code: code::SERVER_LOST,
                mysql_sqlstate: "08S01",
            },
            SessionError::ClientClosed
            | SessionError::ClientIo(_)
            | SessionError::ServerRefused(_)
            | SessionError::UnknownCancelKey
            | SessionError::Cut
            | SessionError::ClientGone(_)
            | SessionError::Splice(_) => Answer::Nothing,
        }
    }

    /// The SQLSTATE of the ErrorResponse a Postgres client should get.
    pub fn postgres_answer(&self) -> Option<&'static str> {
        match self.answer() {
            Answer::Send { sqlstate, .. } => Some(sqlstate),
            Answer::MysqlOnly { .. } | Answer::Nothing => None,
        }
    }

    /// The error code and SQLSTATE of the ERR packet a MySQL client should get.
    pub fn mysql_answer(&self) -> Option<(u16, &'static str)> {
        match self.answer() {
            Answer::Send {
                mysql_code,
                mysql_sqlstate,
                ..
            }
            | Answer::MysqlOnly {
                mysql_code,
                mysql_sqlstate,
            } => Some((mysql_code, mysql_sqlstate)),
            Answer::Nothing => None,
        }
    }
}
