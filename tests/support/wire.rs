//! Raw Postgres wire bytes for tests that speak the protocol by hand:
//! startup-phase packets, and reading typed messages back.

use std::io::Read;

pub const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
pub const GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];

/// A StartupMessage of `version` with `params`.
pub fn startup_packet(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend(body);
    packet
}

/// A CancelRequest presenting `key` (pid and secret, as in BackendKeyData).
pub fn cancel_request(key: &[u8]) -> Vec<u8> {
    let mut packet = ((8 + key.len()) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&80_877_102u32.to_be_bytes());
    packet.extend_from_slice(key);
    packet
}

/// A simple Query message.
pub fn simple_query(sql: &str) -> Vec<u8> {
    let mut q = vec![b'Q'];
    q.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
    q.extend_from_slice(sql.as_bytes());
    q.push(0);
    q
}

/// Reads one typed message: its tag and body.
pub fn read_message(stream: &mut impl Read) -> (u8, Vec<u8>) {
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).expect("message header");
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let mut body = vec![0u8; len - 4];
    stream.read_exact(&mut body).expect("message body");
    (header[0], body)
}

/// One field (`C`, `M`, `S`, ...) of an ErrorResponse body.
pub fn error_field(body: &[u8], code: char) -> String {
    String::from_utf8_lossy(body)
        .split('\0')
        .find_map(|f| f.strip_prefix(code))
        .unwrap_or_default()
        .to_owned()
}

/// Reads until ReadyForQuery; returns the tags seen and the BackendKeyData
/// body (pid and secret). Panics on an ErrorResponse.
pub fn read_until_ready(stream: &mut impl Read) -> (Vec<u8>, Vec<u8>) {
    let mut tags = Vec::new();
    let mut key = Vec::new();
    loop {
        let (tag, body) = read_message(stream);
        tags.push(tag);
        match tag {
            b'K' => key = body,
            b'E' => panic!("server error: {}", error_field(&body, 'M')),
            b'Z' => return (tags, key),
            _ => {}
        }
    }
}
