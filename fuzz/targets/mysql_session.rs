//! The MySQL frontend's connection phase, sans I/O: the decoders the
//! frontend (`src/frontend/mysql.rs`) and the upstream greeting
//! (`src/upstream/mysql.rs`) apply to the server's and the client's byte
//! streams, in their order, with their decisions.
//!
//! Server: the greeting (`decode_packet`, `parse_greeting`), passed on with
//! `with_capabilities` (`CLIENT_SSL` offered or withdrawn). Client: its first
//! packet (`parse_client_hello`: SSLRequest, then the response through TLS,
//! or the response at once), `with_user` for a user mapping, the upstream
//! SSLRequest (`ssl_request`), and the response flagged with
//! `with_client_capabilities` / `without_client_capabilities` (a Cloud SQL
//! tunnel). Then `relay_auth`: packets both ways, renumbered, the token's
//! answer to a switch to `mysql_clear_password` (`auth_switch_plugin`),
//! until OK or ERR (`parse_err`).
//!
//! The frontend is async and reads sockets; this target models its loop
//! (kept in step with the source by hand). Invariants: framing is
//! independent of read boundaries; every packet keyhole writes re-decodes
//! with the payload and sequence id meant; the greeting keyhole passes on
//! differs from the server's only in `CLIENT_SSL`; the response sent
//! upstream differs from the client's only in the user and `CLIENT_SSL`;
//! renumbering is consistent both ways.

use bytes::{Bytes, BytesMut};
use keyhole::protocol::mysql::{
    self, caps, decode_packet, parse_client_hello, parse_greeting, reply, ClientHello, Packet,
};

use super::input::{chunk_sizes, Input};
use super::mysql_codec::packet_stream;

#[derive(Debug, PartialEq)]
enum Outcome {
    Stalled,
    Refused(&'static str),
    Ok,
    ServerError(u16),
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.u8();
    let local_tls = flags & 1 != 0;
    let tunnel = flags & 2 != 0;
    let token = (flags & 4 != 0).then(|| input.name());
    let mapped_user = (flags & 8 != 0)
        .then(|| input.name())
        .filter(|u| !u.is_empty());
    let order = input.u32();
    let seed = input.u64();
    let server_len = usize::from(input.u16());
    let server = input.bytes(server_len);
    let client = input.rest();

    for stream in [server, client] {
        assert_eq!(
            chunked(stream, seed),
            packet_stream(stream, mysql::MAX_HANDSHAKE_PAYLOAD),
            "packets depend on read boundaries"
        );
    }
    let settings = Settings {
        local_tls,
        tunnel,
        token: token.as_deref(),
        mapped_user: mapped_user.as_deref(),
        order,
    };
    let outcome = session(server, client, &settings);
    assert!(!format!("{outcome:?}").is_empty());
}

/// The payloads decoded when the stream arrives in pieces.
fn chunked(stream: &[u8], seed: u64) -> Vec<Bytes> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut fed = 0;
    let mut sizes = chunk_sizes(seed, 200);
    loop {
        match decode_packet(&mut buf, mysql::MAX_HANDSHAKE_PAYLOAD) {
            Ok(Some(packet)) => out.push(packet.payload),
            Ok(None) if fed < stream.len() => {
                let n = sizes.next().expect("endless").min(stream.len() - fed);
                buf.extend_from_slice(&stream[fed..fed + n]);
                fed += n;
            }
            Ok(None) | Err(_) => return out,
        }
    }
}

struct Settings<'a> {
    local_tls: bool,
    tunnel: bool,
    token: Option<&'a str>,
    mapped_user: Option<&'a str>,
    /// Which side speaks next in the authentication relay, a bit per step.
    order: u32,
}

fn next(buf: &mut BytesMut) -> Result<Option<Packet>, ()> {
    decode_packet(buf, mysql::MAX_HANDSHAKE_PAYLOAD).map_err(|_| ())
}

/// A packet as keyhole writes it, decoded back.
fn written(seq: u8, payload: &[u8]) -> Packet {
    let mut out = BytesMut::new();
    mysql::encode_packet(&mut out, seq, payload);
    let packet = decode_packet(&mut out, mysql::MAX_PAYLOAD)
        .expect("valid")
        .expect("whole");
    assert!(out.is_empty());
    assert_eq!((packet.seq, &packet.payload[..]), (seq, payload));
    packet
}

fn session(server: &[u8], client: &[u8], s: &Settings) -> Outcome {
    let mut server_buf = BytesMut::from(server);
    let mut client_buf = BytesMut::from(client);

    // The greeting, and the copy the client gets.
    let greeting = match next(&mut server_buf) {
        Ok(Some(p)) => p,
        Ok(None) => return Outcome::Stalled,
        Err(()) => return Outcome::Refused("greeting too large"),
    };
    let Ok(greeting) = parse_greeting(&greeting.payload) else {
        return Outcome::Refused("not a MySQL greeting");
    };
    let advertised = if s.local_tls {
        greeting.capabilities | caps::SSL
    } else {
        greeting.capabilities & !caps::SSL
    };
    let sent = written(0, &greeting.with_capabilities(advertised));
    let seen = parse_greeting(&sent.payload).expect("the client can parse what keyhole sends");
    assert_eq!(seen.capabilities, advertised);
    assert_eq!(
        seen.capabilities & !caps::SSL,
        greeting.capabilities & !caps::SSL
    );
    assert_eq!(seen.server_version, greeting.server_version);

    // The client's response (through TLS after an SSLRequest).
    let first = match next(&mut client_buf) {
        Ok(Some(p)) => p,
        Ok(None) => return Outcome::Stalled,
        Err(()) => return Outcome::Refused("client packet too large"),
    };
    let (response, hello, delta) = match parse_client_hello(&first.payload) {
        Err(_) => return Outcome::Refused("handshake response"),
        Ok(ClientHello::SslRequest { capabilities }) => {
            assert!(capabilities & caps::SSL != 0 && first.payload.len() == 32);
            if !s.local_tls {
                return Outcome::Refused("no TLS on the client leg");
            }
            let full = match next(&mut client_buf) {
                Ok(Some(p)) => p,
                Ok(None) => return Outcome::Stalled,
                Err(()) => return Outcome::Refused("client packet too large"),
            };
            match parse_client_hello(&full.payload) {
                Err(_) => return Outcome::Refused("handshake response"),
                Ok(ClientHello::SslRequest { .. }) => {
                    return Outcome::Refused("repeated SSLRequest")
                }
                Ok(ClientHello::Response(hello)) => (full, hello, 0u8),
            }
        }
        Ok(ClientHello::Response(hello)) => (first, hello, 1u8),
    };
    let user = s.mapped_user.unwrap_or(&hello.user);
    let payload = if user == hello.user {
        response.payload.clone()
    } else {
        let rewritten = mysql::with_user(&response.payload, user).expect("it parsed");
        match parse_client_hello(&rewritten) {
            Ok(ClientHello::Response(h)) => {
                assert_eq!(h.user, user);
                assert_eq!(
                    (h.capabilities, &h.database),
                    (hello.capabilities, &hello.database)
                );
            }
            other => panic!("the rewrite for {user:?} does not parse: {other:?}"),
        }
        rewritten
    };

    // Upstream: keyhole's SSLRequest carries the client's capabilities.
    let request = mysql::ssl_request(&response.payload);
    assert_eq!(
        parse_client_hello(&request),
        Ok(ClientHello::SslRequest {
            capabilities: hello.capabilities | caps::SSL
        })
    );
    let (payload, delta) = if s.tunnel {
        (
            mysql::without_client_capabilities(&payload, caps::SSL),
            delta.wrapping_sub(1),
        )
    } else {
        (mysql::with_client_capabilities(&payload, caps::SSL), delta)
    };
    let upstream = written(response.seq.wrapping_add(delta), &payload);
    match parse_client_hello(&upstream.payload) {
        Ok(ClientHello::Response(h)) => {
            assert_eq!(h.capabilities & !caps::SSL, hello.capabilities & !caps::SSL);
            assert_eq!(h.capabilities & caps::SSL != 0, !s.tunnel);
            assert_eq!((h.user.as_str(), &h.plugin), (user, &hello.plugin));
        }
        Ok(ClientHello::SslRequest { .. }) => {
            // A 32-byte payload with SSL set reads as an SSLRequest: only a
            // response with nothing after the header could, and it has a user.
            panic!("the response sent upstream reads as an SSLRequest")
        }
        Err(e) => panic!("the response sent upstream does not parse: {e:?}"),
    }
    relay_auth(&mut server_buf, &mut client_buf, delta, s)
}

fn relay_auth(
    server: &mut BytesMut,
    client: &mut BytesMut,
    mut delta: u8,
    s: &Settings,
) -> Outcome {
    let mut order = s.order;
    for _ in 0..32 {
        // The frontend reads both at once; whichever the input says comes first.
        let from_server = order & 1 == 0;
        order = order.rotate_right(1);
        let buf = if from_server {
            &mut *server
        } else {
            &mut *client
        };
        let packet = match next(buf) {
            Ok(Some(p)) => p,
            Ok(None) => {
                // This side is silent; the other may still speak.
                let other = if from_server {
                    &mut *client
                } else {
                    &mut *server
                };
                if other.is_empty() {
                    return Outcome::Stalled;
                }
                continue;
            }
            Err(()) => return Outcome::Refused("packet too large"),
        };
        if !from_server {
            let to_server = written(packet.seq.wrapping_add(delta), &packet.payload);
            assert_eq!(to_server.seq.wrapping_sub(delta), packet.seq);
            continue;
        }
        if let Some(token) = s.token {
            match packet.payload.first() {
                Some(&reply::AUTH_SWITCH) => match mysql::auth_switch_plugin(&packet.payload) {
                    Some(mysql::CLEAR_PASSWORD_PLUGIN) => {
                        let answer = mysql::clear_password_reply(token);
                        let sent = written(packet.seq.wrapping_add(1), &answer);
                        assert_eq!(&sent.payload[..token.len()], token.as_bytes());
                        delta = delta.wrapping_add(2);
                        continue;
                    }
                    Some(other) => {
                        assert_ne!(other, mysql::CLEAR_PASSWORD_PLUGIN);
                        return Outcome::Refused("token not asked for");
                    }
                    None => return Outcome::Refused("pre-4.1 switch"),
                },
                Some(&reply::AUTH_MORE_DATA) => return Outcome::Refused("more data"),
                _ => {}
            }
        }
        let to_client = written(packet.seq.wrapping_sub(delta), &packet.payload);
        assert_eq!(to_client.seq.wrapping_add(delta), packet.seq);
        match packet.payload.first() {
            Some(&reply::OK) => return Outcome::Ok,
            Some(&reply::ERR) => {
                let code = mysql::parse_err(&packet.payload).map_or(0, |(code, _, _)| code);
                return Outcome::ServerError(code);
            }
            // Anything else: the client answers next.
            _ => {}
        }
    }
    Outcome::Stalled
}
