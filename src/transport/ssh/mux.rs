//! OpenSSH's connection-sharing protocol (`PROTOCOL.mux` in OpenSSH's
//! source), the part keyhole speaks as a client of a master connection: the
//! hello exchange and a stdio forward (`MUX_C_NEW_STDIO_FWD`, what `ssh -W`
//! asks of a master). Each message is a uint32 length, then a uint32 type
//! and its body; strings are a uint32 length and bytes. No I/O here.
//!
//! The request is followed by two file descriptors (the forward's input
//! and output), each passed alone with one byte of data
//! ([`super::fd::send_fd`]). The master opens a `direct-tcpip` channel to
//! the host and port on the bastion and answers once the bastion has
//! connected (or failed to). The forward lives as long as the control
//! connection that asked for it.

/// The protocol version keyhole speaks (OpenSSH's since 5.x).
pub const VERSION: u32 = 4;

pub const MSG_HELLO: u32 = 0x0000_0001;
pub const C_NEW_STDIO_FWD: u32 = 0x1000_0008;
pub const S_PERMISSION_DENIED: u32 = 0x8000_0002;
pub const S_FAILURE: u32 = 0x8000_0003;
pub const S_EXIT_MESSAGE: u32 = 0x8000_0004;
pub const S_SESSION_OPENED: u32 = 0x8000_0006;

/// The longest message keyhole accepts from a master (its replies are a
/// few dozen bytes).
pub const MAX_MESSAGE: usize = 64 * 1024;

fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

/// The client's hello: version 4, no extensions.
pub fn hello() -> Vec<u8> {
    let mut body = Vec::with_capacity(8);
    body.extend_from_slice(&MSG_HELLO.to_be_bytes());
    body.extend_from_slice(&VERSION.to_be_bytes());
    frame(&body)
}

/// A stdio forward to `host:port` on the bastion's side. (The port goes as
/// a uint32, as OpenSSH's client sends it, though PROTOCOL.mux says string.)
pub fn stdio_forward(request_id: u32, host: &str, port: u16) -> Vec<u8> {
    let mut body = Vec::with_capacity(20 + host.len());
    body.extend_from_slice(&C_NEW_STDIO_FWD.to_be_bytes());
    body.extend_from_slice(&request_id.to_be_bytes());
    put_string(&mut body, b""); // reserved
    put_string(&mut body, host.as_bytes());
    body.extend_from_slice(&u32::from(port).to_be_bytes());
    frame(&body)
}

/// A message from the master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Hello {
        version: u32,
    },
    SessionOpened {
        request_id: u32,
        session_id: u32,
    },
    PermissionDenied {
        request_id: u32,
        reason: String,
    },
    Failure {
        request_id: u32,
        reason: String,
    },
    Exit {
        session_id: u32,
        status: u32,
    },
    /// Any other type (ignored by keyhole).
    Other {
        kind: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MuxError {
    #[error("a {0}-byte message from the master, more than keyhole accepts")]
    TooLong(usize),
    #[error("a truncated message from the master")]
    Truncated,
}

/// Splits one whole message off the front of `buf`, if it holds one:
/// `Ok(None)` means read more. Returns the reply and the bytes it took.
pub fn decode(buf: &[u8]) -> Result<Option<(Reply, usize)>, MuxError> {
    let Some(len) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if len > MAX_MESSAGE {
        return Err(MuxError::TooLong(len));
    }
    let Some(body) = buf.get(4..4 + len) else {
        return Ok(None);
    };
    let mut r = Reader(body);
    let kind = r.u32()?;
    let reply = match kind {
        MSG_HELLO => Reply::Hello { version: r.u32()? },
        S_SESSION_OPENED => Reply::SessionOpened {
            request_id: r.u32()?,
            session_id: r.u32()?,
        },
        S_PERMISSION_DENIED => Reply::PermissionDenied {
            request_id: r.u32()?,
            reason: r.string()?,
        },
        S_FAILURE => Reply::Failure {
            request_id: r.u32()?,
            reason: r.string()?,
        },
        S_EXIT_MESSAGE => Reply::Exit {
            session_id: r.u32()?,
            status: r.u32()?,
        },
        kind => Reply::Other { kind },
    };
    Ok(Some((reply, 4 + len)))
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u32(&mut self) -> Result<u32, MuxError> {
        let (head, rest) = self.0.split_first_chunk::<4>().ok_or(MuxError::Truncated)?;
        self.0 = rest;
        Ok(u32::from_be_bytes(*head))
    }

    fn string(&mut self) -> Result<String, MuxError> {
        let len = self.u32()? as usize;
        let bytes = self.0.get(..len).ok_or(MuxError::Truncated)?;
        self.0 = &self.0[len..];
        // The master's own words, for a message: bounded and printable.
        Ok(String::from_utf8_lossy(bytes)
            .chars()
            .filter(|c| !c.is_control())
            .take(200)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_byte_for_byte() {
        assert_eq!(hello(), [0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 4]);
        let fwd = stdio_forward(7, "db", 5432);
        assert_eq!(
            fwd,
            [
                0, 0, 0, 22, // length
                0x10, 0, 0, 8, // MUX_C_NEW_STDIO_FWD
                0, 0, 0, 7, // request id
                0, 0, 0, 0, // reserved
                0, 0, 0, 2, b'd', b'b', // host
                0, 0, 0x15, 0x38, // port 5432
            ]
        );
    }

    #[test]
    fn replies_as_the_master_sends_them() {
        // The master's hello carries an "info" extension.
        let mut hello = vec![0, 0, 0, 0x15, 0, 0, 0, 1, 0, 0, 0, 4];
        hello.extend_from_slice(&[0, 0, 0, 4, b'i', b'n', b'f', b'o', 0, 0, 0, 1, b'0']);
        assert_eq!(decode(&hello[..10]), Ok(None));
        assert_eq!(
            decode(&hello),
            Ok(Some((Reply::Hello { version: 4 }, hello.len())))
        );
        let opened = [0, 0, 0, 12, 0x80, 0, 0, 6, 0, 0, 0, 7, 0, 0, 0, 3];
        assert_eq!(
            decode(&opened),
            Ok(Some((
                Reply::SessionOpened {
                    request_id: 7,
                    session_id: 3
                },
                16
            )))
        );
        let mut failure = vec![0, 0, 0, 0, 0x80, 0, 0, 3, 0, 0, 0, 7, 0, 0, 0, 28];
        failure.extend_from_slice(b"Session open refused by peer");
        let len = (failure.len() - 4) as u32;
        failure[..4].copy_from_slice(&len.to_be_bytes());
        assert_eq!(
            decode(&failure).expect("valid").map(|(r, _)| r),
            Some(Reply::Failure {
                request_id: 7,
                reason: "Session open refused by peer".into()
            })
        );
        assert_eq!(decode(&[0, 0, 0, 2, 0, 0]), Err(MuxError::Truncated));
        assert_eq!(decode(&[0, 1, 0, 1]), Err(MuxError::TooLong(65537)));
    }
}
