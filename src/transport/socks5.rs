//! A SOCKS5 client (RFC 1928), with user/password login (RFC 1929) when
//! the hop names one. The database's name goes to the proxy as a domain
//! name, so the proxy resolves it (curl's `socks5h`): a name only the
//! proxy's network knows works. The messages are built and read by the
//! functions below, which do no I/O; [`connect`] drives them over TCP and
//! reads exactly the proxy's replies, so the first byte after the last one
//! is the database's.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::HopError;
use crate::config::host_port;
use crate::config::via::ProxyHop;

const VERSION: u8 = 5;
const METHOD_NONE: u8 = 0x00;
const METHOD_PASSWORD: u8 = 0x02;
const METHOD_NO_ACCEPTABLE: u8 = 0xff;
const COMMAND_CONNECT: u8 = 1;
const ATYP_IPV4: u8 = 1;
const ATYP_DOMAIN: u8 = 3;
const ATYP_IPV6: u8 = 4;

/// The method selection message: no login, plus user/password if we have one.
pub fn greeting(with_password: bool) -> Vec<u8> {
    if with_password {
        vec![VERSION, 2, METHOD_NONE, METHOD_PASSWORD]
    } else {
        vec![VERSION, 1, METHOD_NONE]
    }
}

/// What the proxy chose from [`greeting`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    None,
    Password,
}

/// Reads the method selection reply.
pub fn method(reply: [u8; 2], offered_password: bool) -> Result<Method, String> {
    match reply {
        [VERSION, METHOD_NONE] => Ok(Method::None),
        [VERSION, METHOD_PASSWORD] if offered_password => Ok(Method::Password),
        [VERSION, METHOD_NO_ACCEPTABLE] if offered_password => {
            Err("it accepts neither no login nor a user and password".into())
        }
        [VERSION, METHOD_NO_ACCEPTABLE] | [VERSION, METHOD_PASSWORD] => {
            Err("it demands a login: give the hop as socks5://USER:PASSWORD@HOST:PORT".into())
        }
        [VERSION, other] => Err(format!(
            "it chose method 0x{other:02x}, which keyhole did not offer"
        )),
        [version, _] => Err(format!("version {version} in its reply, not 5")),
    }
}

/// The RFC 1929 login. Both parts are 1 to 255 bytes (checked when the hop
/// is parsed).
pub fn login(user: &str, password: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(3 + user.len() + password.len());
    out.push(1);
    out.push(user.len().min(255) as u8);
    out.extend_from_slice(&user.as_bytes()[..user.len().min(255)]);
    out.push(password.len().min(255) as u8);
    out.extend_from_slice(&password.as_bytes()[..password.len().min(255)]);
    out
}

/// `CONNECT host:port`: an address as itself, a name as a domain name for
/// the proxy to resolve.
pub fn connect_request(host: &str, port: u16) -> Result<Vec<u8>, String> {
    let mut out = vec![VERSION, COMMAND_CONNECT, 0];
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => {
            out.push(ATYP_IPV4);
            out.extend_from_slice(&ip.octets());
        }
        Ok(std::net::IpAddr::V6(ip)) => {
            out.push(ATYP_IPV6);
            out.extend_from_slice(&ip.octets());
        }
        Err(_) => {
            let len = u8::try_from(host.len())
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| {
                    format!("the name '{host}' is longer than SOCKS5 allows (255 bytes)")
                })?;
            out.push(ATYP_DOMAIN);
            out.push(len);
            out.extend_from_slice(host.as_bytes());
        }
    }
    out.extend_from_slice(&port.to_be_bytes());
    Ok(out)
}

/// The fixed part of the CONNECT reply, and how many bytes of address and
/// port follow it.
pub fn reply_head(head: [u8; 4]) -> Result<Result<usize, Refusal>, String> {
    let [version, code, _, atyp] = head;
    if version != VERSION {
        return Err(format!("version {version} in its reply, not 5"));
    }
    if code != 0 {
        return Ok(Err(Refusal(code)));
    }
    match atyp {
        ATYP_IPV4 => Ok(Ok(4 + 2)),
        ATYP_IPV6 => Ok(Ok(16 + 2)),
        // A domain: its length byte comes first; the caller reads it.
        ATYP_DOMAIN => Ok(Ok(0)),
        other => Err(format!("address type {other} in its reply")),
    }
}

/// A reply code other than success (RFC 1928 section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal(pub u8);

impl Refusal {
    pub fn describe(self) -> String {
        let text = match self.0 {
            1 => "general SOCKS server failure",
            2 => "connection not allowed by ruleset",
            3 => "network unreachable",
            4 => "host unreachable",
            5 => "connection refused",
            6 => "TTL expired",
            7 => "command not supported",
            8 => "address type not supported",
            _ => "unassigned code",
        };
        format!("SOCKS reply {}: {text}", self.0)
    }

    /// Whether the proxy worked and the database did not answer from there.
    pub fn is_target_unreachable(self) -> bool {
        matches!(self.0, 3..=6)
    }
}

/// Connects through the proxy to `host:port`.
pub async fn connect(
    name: &Arc<str>,
    proxy: &ProxyHop,
    host: &str,
    port: u16,
) -> Result<TcpStream, HopError> {
    let protocol = |reason: String| HopError::Protocol {
        hop: name.clone(),
        expected: "SOCKS5",
        reason,
    };
    let io = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => protocol("it closed the connection".into()),
        _ => HopError::Unreachable {
            hop: name.clone(),
            reason: e.to_string(),
        },
    };
    let mut tcp = super::dial_proxy(name, &proxy.host, proxy.port).await?;
    let with_password = proxy.credentials.is_some();
    tcp.write_all(&greeting(with_password)).await.map_err(io)?;
    let mut choice = [0u8; 2];
    tcp.read_exact(&mut choice).await.map_err(io)?;
    match method(choice, with_password) {
        Ok(Method::None) => {}
        Ok(Method::Password) => {
            let Some((user, password)) = &proxy.credentials else {
                return Err(protocol(
                    "it asked for a password keyhole did not offer".into(),
                ));
            };
            tcp.write_all(&login(user, password.expose()))
                .await
                .map_err(io)?;
            let mut status = [0u8; 2];
            tcp.read_exact(&mut status).await.map_err(io)?;
            if status[1] != 0 {
                return Err(HopError::ProxyAuth {
                    hop: name.clone(),
                    reason: "it refused the user and password".into(),
                });
            }
        }
        Err(reason) if choice[1] == METHOD_NO_ACCEPTABLE || choice[1] == METHOD_PASSWORD => {
            return Err(HopError::ProxyAuth {
                hop: name.clone(),
                reason,
            })
        }
        Err(reason) => return Err(protocol(reason)),
    }
    let request = connect_request(host, port).map_err(|reason| HopError::ProxyRefused {
        hop: name.clone(),
        target: host_port(host, port),
        reason,
    })?;
    tcp.write_all(&request).await.map_err(io)?;
    let mut head = [0u8; 4];
    tcp.read_exact(&mut head).await.map_err(io)?;
    let rest = match reply_head(head).map_err(protocol)? {
        Ok(rest) => rest,
        Err(refusal) if refusal.is_target_unreachable() => {
            return Err(HopError::TargetUnreachable {
                hop: name.clone(),
                target: host_port(host, port),
                reason: refusal.describe(),
            })
        }
        Err(refusal) => {
            return Err(HopError::ProxyRefused {
                hop: name.clone(),
                target: host_port(host, port),
                reason: refusal.describe(),
            })
        }
    };
    let rest = if rest == 0 {
        let mut len = [0u8; 1];
        tcp.read_exact(&mut len).await.map_err(io)?;
        usize::from(len[0]) + 2
    } else {
        rest
    };
    // The address the proxy bound: nothing keyhole needs.
    let mut bound = [0u8; 255 + 2];
    tcp.read_exact(&mut bound[..rest]).await.map_err(io)?;
    Ok(tcp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_byte_for_byte() {
        assert_eq!(greeting(false), [5, 1, 0]);
        assert_eq!(greeting(true), [5, 2, 0, 2]);
        assert_eq!(login("ab", "xyz"), [1, 2, b'a', b'b', 3, b'x', b'y', b'z']);
        assert_eq!(
            connect_request("db.internal", 5432).expect("name"),
            [&[5, 1, 0, 3, 11][..], b"db.internal", &[0x15, 0x38]].concat()
        );
        assert_eq!(
            connect_request("10.0.0.5", 3306).expect("v4"),
            [5, 1, 0, 1, 10, 0, 0, 5, 0x0c, 0xea]
        );
        let v6 = connect_request("fd00::1", 5432).expect("v6");
        assert_eq!((v6[3], v6.len()), (4, 4 + 16 + 2));
        assert!(connect_request(&"x".repeat(256), 1)
            .expect_err("long")
            .contains("255"));
    }

    #[test]
    fn method_replies() {
        assert_eq!(method([5, 0], false), Ok(Method::None));
        assert_eq!(method([5, 2], true), Ok(Method::Password));
        assert!(method([5, 0xff], false)
            .expect_err("login")
            .contains("demands a login"));
        assert!(method([5, 0xff], true)
            .expect_err("none")
            .contains("neither"));
        assert!(method([4, 0], false).expect_err("v4").contains("version 4"));
    }

    #[test]
    fn reply_codes() {
        assert_eq!(reply_head([5, 0, 0, 1]), Ok(Ok(6)));
        assert_eq!(reply_head([5, 0, 0, 4]), Ok(Ok(18)));
        assert_eq!(reply_head([5, 0, 0, 3]), Ok(Ok(0)));
        let refused = reply_head([5, 5, 0, 1])
            .expect("valid")
            .expect_err("refused");
        assert!(refused.is_target_unreachable());
        assert_eq!(refused.describe(), "SOCKS reply 5: connection refused");
        let ruleset = reply_head([5, 2, 0, 1])
            .expect("valid")
            .expect_err("ruleset");
        assert!(!ruleset.is_target_unreachable());
        assert!(reply_head([5, 0, 0, 9]).is_err());
    }
}
