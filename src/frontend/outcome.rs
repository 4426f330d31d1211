//! How a session ended: one classification, read by the session's
//! "connection closed" log line (its `outcome` field and its level), the
//! `keyhole_connections_closed_total{outcome}` metric and the trace.
//!
//! The question is who ended it. What a client does to its own connection
//! (it says goodbye, it vanishes without one, its socket is reset, it sends
//! what no server would take, it never finishes its login) is the client's
//! business, as it is for the database keyhole stands in front of: those
//! lines are `INFO`. What the server, a limit, a shutdown or keyhole's own
//! setup did is a `WARN`, since someone running keyhole may have to act.
//!
//! A session's end is read off the relay ([`SessionReport::first_to_end`],
//! [`SessionReport::client_said_goodbye`]). The relay already counts a
//! failure after one side ended as a clean end (MariaDB's TLS library
//! answers a vanished client's bare FIN with an alert), so who went first
//! decides.

use std::io;

use super::{Abandoned, SessionError, SessionReport};
use crate::splice::Side;

/// Who or what ended a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The client said goodbye (Terminate, COM_QUIT) and closed; or the
    /// session ended cleanly where keyhole cannot see a goodbye (splice(2)
    /// moves the bytes, or MySQL compression hides the packets).
    ClientClosed,
    /// The client closed without its goodbye: a killed process, a pool's
    /// force-close, a probe that connects and hangs up.
    ClientVanished,
    /// The client's connection was reset or failed under keyhole.
    ClientReset,
    /// The client broke the protocol, its TLS, or the startup timeout.
    ClientFault,
    /// A cancel request was passed on: the connection's whole purpose.
    CancelForwarded,
    /// The server ended the session (it closed first).
    UpstreamClosed,
    /// The server, or the way to it, failed.
    UpstreamError,
    /// A limit turned the client away (`--max-connections`, the pool).
    Limit,
    /// Cut by a shutdown's drain, or a Cloud SQL instance that moved.
    Drain,
    /// Refused by the target's policy, or keyhole's login failed.
    Refused,
}

impl Ending {
    /// Whether the end is worth a warning to whoever runs keyhole.
    pub fn is_warning(self) -> bool {
        match self {
            Ending::ClientClosed
            | Ending::ClientVanished
            | Ending::ClientReset
            | Ending::ClientFault
            | Ending::CancelForwarded
            | Ending::UpstreamClosed => false,
            Ending::UpstreamError | Ending::Limit | Ending::Drain | Ending::Refused => true,
        }
    }
}

/// A session's end as its log line, metric and trace tell it.
#[derive(Debug)]
pub struct Outcome {
    pub ending: Ending,
    /// The stable label: the log line's `outcome` and the metric's.
    pub label: &'static str,
    /// What went wrong, in the words the client saw where it could read any.
    pub error: Option<String>,
}

impl Outcome {
    /// The end of a session that returned `result`; `moved` when the
    /// session's Cloud SQL instance moved under it.
    pub fn of(result: &Result<(), SessionError>, report: &SessionReport, moved: bool) -> Outcome {
        let err = match result {
            Ok(()) if report.cancel_forwarded => {
                return Outcome {
                    ending: Ending::CancelForwarded,
                    label: "cancel_forwarded",
                    error: None,
                }
            }
            Ok(()) => return relayed(report),
            Err(e) => e,
        };
        // After the client's goodbye, what either leg did next followed
        // from it. (A failure after either side had ended is already a
        // clean end of the relay: see `splice::settle`.)
        if matches!(err, SessionError::Splice(_)) && report.client_said_goodbye {
            return relayed(report);
        }
        let (ending, label) = match err {
            SessionError::Cut if moved => {
                return Outcome {
                    ending: Ending::Drain,
                    label: "instance_moved",
                    error: Some(
                        "the DNS name now points to another Cloud SQL instance; connections to the old one are closed after --max-sigterm-delay"
                            .to_owned(),
                    ),
                }
            }
            err => classify(err),
        };
        Outcome {
            ending,
            label,
            error: Some(err.to_string()),
        }
    }
}

/// Who ended a relayed session, as the relay saw it.
fn relayed(report: &SessionReport) -> Outcome {
    let (ending, label) = match report.first_to_end {
        _ if report.client_said_goodbye => (Ending::ClientClosed, "client_closed"),
        // Nothing could see a goodbye, and a server closes first after one
        // as often as not: a clean end is taken for the client's.
        _ if !report.goodbye_watched => (Ending::ClientClosed, "client_closed"),
        Some(Side::Server) => (Ending::UpstreamClosed, "upstream_closed"),
        Some(Side::Client) | None => (Ending::ClientVanished, "client_vanished"),
    };
    Outcome {
        ending,
        label,
        error: None,
    }
}

/// The class and label of a session's error.
fn classify(err: &SessionError) -> (Ending, &'static str) {
    use Ending::*;
    match err {
        SessionError::StartupTimeout { .. } => (ClientFault, "startup_timeout"),
        SessionError::ClientClosed => (ClientVanished, "client_vanished"),
        SessionError::ClientIo(e) => client_io(e),
        SessionError::Startup(_)
        | SessionError::ClientMessage(_)
        | SessionError::ClientPacket(_)
        | SessionError::Handshake(_)
        | SessionError::UnexpectedClientMessage(_)
        | SessionError::RepeatedUpgrade(_)
        | SessionError::DataAfterUpgrade
        | SessionError::MissingAlpn => (ClientFault, "client_protocol"),
        SessionError::LocalTlsNotConfigured | SessionError::ClientTls(_) => {
            (ClientFault, "client_tls")
        }
        SessionError::UnknownCancelKey => (ClientFault, "unknown_cancel_key"),
        SessionError::TooManyConnections(_) => (Limit, "too_many_connections"),
        SessionError::Pool(crate::pool::PoolError::Exhausted { .. }) => (Limit, "pool_exhausted"),
        SessionError::Pool(crate::pool::PoolError::Closed) => (Drain, "pool_closed"),
        SessionError::Cut => (Drain, "cut_at_shutdown"),
        SessionError::NotAllowed => (Refused, "not_allowed"),
        SessionError::Credentials { .. } => (Refused, "credentials"),
        SessionError::TokenNotAsked { .. } => (Refused, "token_not_asked"),
        SessionError::OwnLogin { .. } => (Refused, "own_login"),
        SessionError::ServerRefused(_) => (Refused, "server_refused"),
        SessionError::Upstream(e) => (UpstreamError, e.label()),
        SessionError::UpstreamStalled(_) => (UpstreamError, "upstream_timeout"),
        SessionError::UpstreamClosed | SessionError::UpstreamIo(_) => {
            (UpstreamError, "upstream_io")
        }
        SessionError::UpstreamProtocol(_) | SessionError::ChannelBinding(_) => {
            (UpstreamError, "upstream_protocol")
        }
        // The client left a busy server: its doing, whatever keyhole did
        // about the statement, unless keyhole's cancel failed.
        SessionError::ClientGone(Abandoned::Cancelled) => (ClientVanished, "client_gone_cancelled"),
        SessionError::ClientGone(Abandoned::CancelFailed(_)) => {
            (UpstreamError, "client_gone_cancel_failed")
        }
        SessionError::ClientGone(_) => (ClientVanished, "client_gone"),
        SessionError::Splice(e) if e.is_truncation() => (UpstreamError, "upstream_truncated"),
        SessionError::Splice(e) => match e.side {
            Side::Client => client_io(&e.source),
            Side::Server => (UpstreamError, "upstream_io"),
        },
    }
}

/// A failure on the client's leg: a reset, or another I/O error.
fn client_io(e: &io::Error) -> (Ending, &'static str) {
    match e.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => (Ending::ClientReset, "client_reset"),
        // A TLS client that closed without close_notify, or whose host
        // stopped answering keepalives: gone without a word.
        io::ErrorKind::UnexpectedEof | io::ErrorKind::TimedOut => {
            (Ending::ClientVanished, "client_vanished")
        }
        _ => (Ending::ClientReset, "client_io"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::splice::SpliceError;

    fn report(first: Option<Side>, watched: bool, goodbye: bool) -> SessionReport {
        SessionReport {
            first_to_end: first,
            goodbye_watched: watched,
            client_said_goodbye: goodbye,
            ..SessionReport::default()
        }
    }

    fn splice(side: Side, kind: io::ErrorKind) -> Result<(), SessionError> {
        Err(SessionError::Splice(SpliceError {
            side,
            source: io::Error::new(kind, "test"),
        }))
    }

    /// (ending, label, whether the line has an error field).
    fn seen(
        result: Result<(), SessionError>,
        report: &SessionReport,
    ) -> (Ending, &'static str, bool) {
        let o = Outcome::of(&result, report, false);
        (o.ending, o.label, o.error.is_some())
    }

    #[test]
    fn relayed_sessions_end_by_whoever_went_first() {
        let cases = [
            (
                report(Some(Side::Client), true, true),
                (Ending::ClientClosed, "client_closed", false),
            ),
            // Terminate, then the server closed before the client's FIN.
            (
                report(Some(Side::Server), true, true),
                (Ending::ClientClosed, "client_closed", false),
            ),
            (
                report(Some(Side::Client), true, false),
                (Ending::ClientVanished, "client_vanished", false),
            ),
            // splice(2), compression: no goodbye to see, so a clean end,
            // whoever closed first, is taken for the client's.
            (
                report(Some(Side::Client), false, false),
                (Ending::ClientClosed, "client_closed", false),
            ),
            (
                report(Some(Side::Server), false, false),
                (Ending::ClientClosed, "client_closed", false),
            ),
            (
                report(Some(Side::Server), true, false),
                (Ending::UpstreamClosed, "upstream_closed", false),
            ),
        ];
        for (report, want) in cases {
            assert_eq!(seen(Ok(()), &report), want, "{report:?}");
        }
    }

    #[test]
    fn a_server_failure_under_the_session_is_an_upstream_warning() {
        // (Once the client has gone, the relay ends cleanly instead: the
        // splice's own tests show it.)
        // The same error with the client still in session is the server's.
        let there = report(None, true, false);
        let o = Outcome::of(
            &splice(Side::Server, io::ErrorKind::InvalidData),
            &there,
            false,
        );
        assert_eq!((o.ending, o.label), (Ending::UpstreamError, "upstream_io"));
        assert!(o.ending.is_warning());
        let truncated = Err(SessionError::Splice(crate::splice::truncation()));
        assert_eq!(
            seen(truncated, &there),
            (Ending::UpstreamError, "upstream_truncated", true)
        );
    }

    #[test]
    fn client_leg_failures_are_the_clients_and_not_warnings() {
        let there = report(None, true, false);
        for (kind, want) in [
            (
                io::ErrorKind::ConnectionReset,
                (Ending::ClientReset, "client_reset"),
            ),
            (
                io::ErrorKind::BrokenPipe,
                (Ending::ClientReset, "client_reset"),
            ),
            (
                io::ErrorKind::UnexpectedEof,
                (Ending::ClientVanished, "client_vanished"),
            ),
            (
                io::ErrorKind::TimedOut,
                (Ending::ClientVanished, "client_vanished"),
            ),
            (
                io::ErrorKind::InvalidData,
                (Ending::ClientReset, "client_io"),
            ),
        ] {
            let o = Outcome::of(&splice(Side::Client, kind), &there, false);
            assert_eq!((o.ending, o.label), want, "{kind:?}");
            assert!(!o.ending.is_warning());
        }
        // After its goodbye, a reset is how a client closes.
        let said = report(None, true, true);
        assert_eq!(
            seen(splice(Side::Client, io::ErrorKind::ConnectionReset), &said),
            (Ending::ClientClosed, "client_closed", false)
        );
    }

    #[test]
    fn limits_drains_and_refusals_are_warnings_client_faults_are_not() {
        let none = SessionReport::default();
        let cases: [(SessionError, Ending, &str); 6] = [
            (
                SessionError::TooManyConnections(1),
                Ending::Limit,
                "too_many_connections",
            ),
            (SessionError::Cut, Ending::Drain, "cut_at_shutdown"),
            (SessionError::NotAllowed, Ending::Refused, "not_allowed"),
            (
                SessionError::ClientClosed,
                Ending::ClientVanished,
                "client_vanished",
            ),
            (
                SessionError::DataAfterUpgrade,
                Ending::ClientFault,
                "client_protocol",
            ),
            (
                SessionError::UnknownCancelKey,
                Ending::ClientFault,
                "unknown_cancel_key",
            ),
        ];
        for (err, ending, label) in cases {
            let o = Outcome::of(&Err(err), &none, false);
            assert_eq!((o.ending, o.label), (ending, label));
            assert_eq!(
                o.ending.is_warning(),
                matches!(ending, Ending::Limit | Ending::Drain | Ending::Refused)
            );
        }
        let o = Outcome::of(&Err(SessionError::Cut), &none, true);
        assert_eq!((o.ending, o.label), (Ending::Drain, "instance_moved"));
        let o = Outcome::of(
            &Ok(()),
            &SessionReport {
                cancel_forwarded: true,
                ..none
            },
            false,
        );
        assert_eq!(
            (o.ending, o.label),
            (Ending::CancelForwarded, "cancel_forwarded")
        );
    }
}
