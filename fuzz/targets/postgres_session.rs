//! The Postgres frontend's startup, sans I/O: the decoders the frontend
//! (`src/frontend/postgres.rs`) applies to the client's and the server's
//! byte streams, in its order, with its decisions.
//!
//! `negotiate`: `decode_startup` over the client stream, answering
//! SSLRequest and GSSENCRequest (TLS on the client leg is taken as done when
//! offered), until a StartupMessage or CancelRequest; then, for a user
//! mapping, `with_user`. `relay_auth`: `decode_message` over the server
//! stream, with `auth_code`, the token's cleartext answer,
//! `strip_channel_binding`, the client's PasswordMessage replies,
//! `backend_key` and `error_fields`, until ReadyForQuery or an error.
//!
//! The frontend itself is async and reads sockets; this target models its
//! loop (kept in step with the source by hand) so that the codecs get the
//! inputs, and the sequences of inputs, they get in a real session.
//!
//! Invariants: the decoders give the same packets however the stream is cut
//! into reads (sans-IO: no dependence on read boundaries); what keyhole
//! forwards to the client re-decodes to exactly the messages it meant to
//! forward; a stripped SASL offer has no `-PLUS` mechanism left; the token
//! answers only a cleartext request; a session ends in exactly one of the
//! outcomes the frontend has.

use bytes::BytesMut;
use keyhole::protocol::postgres::{
    self as pg, auth, decode_message, decode_startup, tag, Message, StartupPacket,
};

use super::input::{chunk_sizes, Input};
use super::postgres_codec::check_message;

#[derive(Debug, PartialEq)]
enum Outcome {
    /// The client's stream ended first (the frontend would wait, then time out).
    ClientStalled,
    ServerStalled,
    Refused(&'static str),
    Cancel,
    Ready {
        key: bool,
    },
    ServerError,
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.u8();
    let local_tls = flags & 1 != 0;
    let token = (flags & 2 != 0).then(|| input.name());
    let mapped_user = (flags & 4 != 0)
        .then(|| input.name())
        .filter(|u| !u.is_empty());
    let seed = input.u64();
    let client_len = usize::from(input.u16());
    let client = input.bytes(client_len);
    let server = input.rest();

    // Read boundaries change nothing the decoders say.
    assert_eq!(
        startup_packets(client, None),
        startup_packets(client, Some(seed)),
        "startup packets depend on read boundaries"
    );
    assert_eq!(
        messages(server, None),
        messages(server, Some(seed ^ 0x9e37_79b9)),
        "messages depend on read boundaries"
    );

    let outcome = session(
        client,
        server,
        local_tls,
        token.as_deref(),
        mapped_user.as_deref(),
    );
    // Every session ends in one of these; the Debug form is what a report names.
    assert!(!format!("{outcome:?}").is_empty());
}

/// Decodes startup packets from `stream`, fed whole or in pieces; stops at
/// the first error, as the frontend does. Returns (packet, bytes) pairs.
fn startup_packets(stream: &[u8], seed: Option<u64>) -> Vec<Result<Vec<u8>, String>> {
    let mut out = Vec::new();
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let mut sizes = chunk_sizes(seed.unwrap_or(0), 64);
    loop {
        match decode_startup(&mut buf) {
            Ok(Some(packet)) => {
                out.push(Ok(format!("{packet:?}").into_bytes()));
                if matches!(packet, StartupPacket::Startup(_) | StartupPacket::Cancel(_)) {
                    return out;
                }
            }
            Ok(None) if fed == stream.len() => return out,
            Ok(None) => {
                let n = match seed {
                    Some(_) => sizes.next().expect("endless").min(stream.len() - fed),
                    None => stream.len() - fed,
                };
                buf.extend_from_slice(&stream[fed..fed + n]);
                fed += n;
            }
            Err(e) => {
                out.push(Err(e.to_string()));
                return out;
            }
        }
    }
}

fn messages(stream: &[u8], seed: Option<u64>) -> Vec<Result<Message, String>> {
    let mut out = Vec::new();
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let mut sizes = chunk_sizes(seed.unwrap_or(0), 300);
    loop {
        match decode_message(&mut buf, pg::MAX_STARTUP_PHASE_MESSAGE_LEN) {
            Ok(Some(msg)) => out.push(Ok(msg)),
            Ok(None) if fed == stream.len() => return out,
            Ok(None) => {
                let n = match seed {
                    Some(_) => sizes.next().expect("endless").min(stream.len() - fed),
                    None => stream.len() - fed,
                };
                buf.extend_from_slice(&stream[fed..fed + n]);
                fed += n;
            }
            Err(e) => {
                out.push(Err(e.to_string()));
                return out;
            }
        }
    }
}

/// The frontend's `negotiate` then `relay_auth`, on whole streams.
fn session(
    client: &[u8],
    server: &[u8],
    local_tls: bool,
    token: Option<&str>,
    mapped_user: Option<&str>,
) -> Outcome {
    let mut client_buf = BytesMut::from(client);
    let mut ssl_requested = false;
    let mut gss_requested = false;
    let mut tls_active = false;
    if client.first() == Some(&pg::TLS_HANDSHAKE_RECORD) {
        // Direct TLS: rustls's acceptor takes the bytes; nothing of ours to fuzz.
        return Outcome::Refused("direct TLS");
    }
    let startup = loop {
        let packet = match decode_startup(&mut client_buf) {
            Ok(Some(p)) => p,
            Ok(None) => return Outcome::ClientStalled,
            Err(_) => return Outcome::Refused("startup packet"),
        };
        match packet {
            StartupPacket::SslRequest => {
                if ssl_requested || tls_active {
                    return Outcome::Refused("repeated SSLRequest");
                }
                ssl_requested = true;
                if local_tls {
                    // The handshake happens here; what follows in the stream
                    // is taken as what came through TLS. (Bytes buffered
                    // before the handshake are refused by the frontend; when
                    // they arrived is a matter of timing, not modelled.)
                    tls_active = true;
                }
            }
            StartupPacket::GssEncRequest => {
                if gss_requested || tls_active {
                    return Outcome::Refused("repeated GSSENCRequest");
                }
                gss_requested = true;
            }
            StartupPacket::Cancel(key) => {
                assert!(key.cancel_request().len() >= 16);
                return Outcome::Cancel;
            }
            StartupPacket::Startup(startup) => break startup,
        }
    };
    let startup = match mapped_user {
        Some(user) if user != startup.user => {
            let rewritten = startup.with_user(user);
            assert_eq!(rewritten.user, user);
            rewritten
        }
        _ => startup,
    };
    // keyhole sends startup.raw upstream: the server decodes it as keyhole did.
    if pg::STARTUP_PACKET_LENGTHS.contains(&startup.raw.len()) {
        let mut sent = BytesMut::from(&startup.raw[..]);
        match decode_startup(&mut sent) {
            Ok(Some(StartupPacket::Startup(seen))) => assert_eq!(seen, startup),
            other => panic!("the startup keyhole sends does not decode: {other:?}"),
        }
    }
    relay_auth(client_buf, server, token)
}

fn relay_auth(mut client_buf: BytesMut, server: &[u8], token: Option<&str>) -> Outcome {
    let mut server_buf = BytesMut::from(server);
    let mut to_client = BytesMut::new();
    let mut forwarded: Vec<Message> = Vec::new();
    let mut key = None;
    let mut forward = |msg: Message, to_client: &mut BytesMut| {
        msg.encode(to_client);
        forwarded.push(msg);
    };
    let outcome = loop {
        let msg = match decode_message(&mut server_buf, pg::MAX_STARTUP_PHASE_MESSAGE_LEN) {
            Ok(Some(msg)) => msg,
            Ok(None) => break Outcome::ServerStalled,
            Err(_) => break Outcome::Refused("server message"),
        };
        check_message(&msg);
        match msg.tag {
            tag::AUTHENTICATION => {
                let Some(code) = pg::auth_code(&msg) else {
                    break Outcome::Refused("authentication request without a code");
                };
                if let Some(token) = token {
                    if code == auth::CLEARTEXT_PASSWORD {
                        let mut out = BytesMut::new();
                        pg::encode_password_message(&mut out, token);
                        let answer = decode_message(&mut out, usize::MAX)
                            .expect("valid")
                            .expect("whole");
                        assert_eq!(answer.tag, tag::PASSWORD_MESSAGE);
                        assert_eq!(&answer.body[..answer.body.len() - 1], token.as_bytes());
                        continue;
                    }
                    if pg::auth_expects_reply(code) {
                        break Outcome::Refused("token not asked for");
                    }
                }
                let msg = if code == auth::SASL {
                    match pg::strip_channel_binding(&msg) {
                        Ok(Some(stripped)) => {
                            assert!(!stripped.body[4..]
                                .split(|&b| b == 0)
                                .any(|n| n.ends_with(b"-PLUS")));
                            stripped
                        }
                        Ok(None) => msg,
                        Err(_) => break Outcome::Refused("channel binding"),
                    }
                } else {
                    msg
                };
                forward(msg, &mut to_client);
                if pg::auth_expects_reply(code) {
                    // The client's answer, as read by `read_message`.
                    let reply =
                        match decode_message(&mut client_buf, pg::MAX_STARTUP_PHASE_MESSAGE_LEN) {
                            Ok(Some(reply)) => reply,
                            Ok(None) => break Outcome::ClientStalled,
                            Err(_) => break Outcome::Refused("client message"),
                        };
                    if reply.tag != tag::PASSWORD_MESSAGE {
                        break Outcome::Refused("unexpected client message");
                    }
                    let mut out = BytesMut::new();
                    reply.encode(&mut out);
                    let again = decode_message(&mut out, pg::MAX_STARTUP_PHASE_MESSAGE_LEN)
                        .expect("valid")
                        .expect("whole");
                    assert_eq!(again, reply, "the reply goes upstream unchanged");
                }
            }
            tag::BACKEND_KEY_DATA => {
                key = pg::backend_key(&msg);
                forward(msg, &mut to_client);
            }
            tag::READY_FOR_QUERY => {
                forward(msg, &mut to_client);
                break Outcome::Ready { key: key.is_some() };
            }
            tag::ERROR_RESPONSE => {
                let _sqlstate = pg::error_fields(&msg)
                    .into_iter()
                    .find(|(f, _)| *f == b'C')
                    .map(|(_, v)| v)
                    .unwrap_or_default();
                forward(msg, &mut to_client);
                break Outcome::ServerError;
            }
            _ => forward(msg, &mut to_client),
        }
    };
    // The client sees exactly the messages keyhole forwarded, framed as
    // its own decoder (and libpq's) frames them.
    let mut seen = Vec::new();
    while let Some(msg) =
        decode_message(&mut to_client, pg::MAX_STARTUP_PHASE_MESSAGE_LEN).expect("valid framing")
    {
        seen.push(msg);
    }
    assert!(
        to_client.is_empty(),
        "a partial message left for the client"
    );
    assert_eq!(seen, forwarded);
    outcome
}
