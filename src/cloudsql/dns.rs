//! DNS-named instances: a name (`prod-db.example.com`) whose TXT record
//! holds an instance connection name. The connector looks it up at start
//! and every 30 s; when the answer changes (an Enterprise Plus switchover
//! moves the write endpoint this way), new connections go to the new
//! instance.
//!
//! The lookup is one TXT query over UDP to the first `nameserver` of
//! `/etc/resolv.conf` (or `KEYHOLE_DNS_SERVER=ADDR:PORT`): a small,
//! strict, sans-IO encoder and decoder, tested byte for byte.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use super::name::InstanceName;

/// How often a DNS-named instance is looked up again.
pub const INTERVAL: Duration = Duration::from_secs(30);

const TYPE_TXT: u16 = 16;
const CLASS_IN: u16 = 1;
/// The largest UDP answer keyhole reads (EDNS is not offered, so 512 is
/// the protocol's own limit; a little room for servers that ignore it).
const MAX_ANSWER: usize = 4096;

/// Why a name did not give an instance connection name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    #[error("no DNS server to ask: {0}")]
    NoServer(String),
    #[error("DNS lookup of {name} failed: {reason}")]
    Lookup { name: String, reason: String },
    #[error("{name} has no TXT record (NXDOMAIN or no answer); a DNS-named Cloud SQL instance needs one holding PROJECT:REGION:INSTANCE")]
    NoRecord { name: String },
    #[error("no TXT record of {name} is an instance connection name (found: {found})")]
    NotAnInstance { name: String, found: String },
}

/// Encodes a TXT query for `name` with `id`.
pub fn encode_query(id: u16, name: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(18 + name.len());
    out.extend_from_slice(&id.to_be_bytes());
    // Flags: a standard query, recursion desired.
    out.extend_from_slice(&[0x01, 0x00]);
    // One question, no answer, authority or additional records.
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("'{name}' is not a DNS name"));
        }
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out.extend_from_slice(&TYPE_TXT.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    Ok(out)
}

/// The TXT records in an answer to the query with `id`, each as its
/// strings joined. An error names what was wrong with the answer.
pub fn decode_answer(id: u16, packet: &[u8]) -> Result<Option<Vec<String>>, String> {
    let mut r = Reader { buf: packet, at: 0 };
    if r.u16()? != id {
        return Err("an answer to another query".into());
    }
    let flags = r.u16()?;
    if flags & 0x8000 == 0 {
        return Err("not an answer".into());
    }
    if flags & 0x0200 != 0 {
        return Err("the answer was truncated".into());
    }
    match flags & 0x000f {
        0 => {}
        3 => return Ok(None),
        code => return Err(format!("the server answered with error code {code}")),
    }
    let questions = r.u16()?;
    let answers = r.u16()?;
    r.u16()?;
    r.u16()?;
    for _ in 0..questions {
        r.skip_name()?;
        r.take(4)?;
    }
    let mut records = Vec::new();
    for _ in 0..answers {
        r.skip_name()?;
        let kind = r.u16()?;
        let class = r.u16()?;
        r.take(4)?; // TTL
        let len = usize::from(r.u16()?);
        let data = r.take(len)?;
        if kind != TYPE_TXT || class != CLASS_IN {
            // A CNAME on the way, for instance.
            continue;
        }
        let mut text = String::new();
        let mut d = Reader { buf: data, at: 0 };
        while d.at < data.len() {
            let n = usize::from(d.u8()?);
            let part = d.take(n)?;
            text.push_str(std::str::from_utf8(part).map_err(|_| "a TXT string that is not UTF-8")?);
        }
        records.push(text);
    }
    Ok((!records.is_empty()).then_some(records))
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or("the answer is cut short")?;
        let part = &self.buf[self.at..end];
        self.at = end;
        Ok(part)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    /// A name: labels up to a zero, or a compression pointer (which ends it).
    fn skip_name(&mut self) -> Result<(), String> {
        for _ in 0..128 {
            let len = self.u8()?;
            match len {
                0 => return Ok(()),
                l if l & 0xc0 == 0xc0 => {
                    self.u8()?;
                    return Ok(());
                }
                l if l & 0xc0 == 0 => {
                    self.take(usize::from(l))?;
                }
                _ => return Err("a name with a reserved label type".into()),
            }
        }
        Err("a name with too many labels".into())
    }
}

/// The server to ask: `KEYHOLE_DNS_SERVER` (ADDR:PORT), else the first
/// `nameserver` in `/etc/resolv.conf`.
pub fn server(env: &HashMap<String, String>) -> Result<SocketAddr, DnsError> {
    if let Some(text) = env.get("KEYHOLE_DNS_SERVER").filter(|t| !t.is_empty()) {
        return text.parse().map_err(|_| {
            DnsError::NoServer(format!("KEYHOLE_DNS_SERVER '{text}' is not ADDR:PORT"))
        });
    }
    let conf = std::fs::read_to_string("/etc/resolv.conf")
        .map_err(|e| DnsError::NoServer(format!("/etc/resolv.conf: {e}")))?;
    conf.lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .next()
        .ok_or_else(|| DnsError::NoServer("/etc/resolv.conf names no nameserver".into()))
}

/// Looks `name` up and returns the instance its TXT record names (the
/// first record that is one, in sorted order, so the choice is stable).
pub async fn resolve(
    server: SocketAddr,
    name: &str,
    timeout: Duration,
) -> Result<InstanceName, DnsError> {
    let fail = |reason: String| DnsError::Lookup {
        name: name.to_owned(),
        reason,
    };
    let id = random_id();
    let query = encode_query(id, name).map_err(&fail)?;
    let bind = if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let exchange = async {
        let socket = tokio::net::UdpSocket::bind(bind)
            .await
            .map_err(|e| fail(e.to_string()))?;
        socket
            .connect(server)
            .await
            .map_err(|e| fail(format!("{server}: {e}")))?;
        socket
            .send(&query)
            .await
            .map_err(|e| fail(format!("{server}: {e}")))?;
        let mut buf = vec![0u8; MAX_ANSWER];
        loop {
            let n = socket
                .recv(&mut buf)
                .await
                .map_err(|e| fail(format!("{server}: {e}")))?;
            match decode_answer(id, &buf[..n]) {
                // A stray datagram: wait for ours.
                Err(e) if e == "an answer to another query" => continue,
                other => return other.map_err(&fail),
            }
        }
    };
    let records = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| fail(format!("{server} did not answer within {timeout:?}")))??;
    let mut records = records.ok_or_else(|| DnsError::NoRecord {
        name: name.to_owned(),
    })?;
    records.sort();
    records
        .iter()
        .find_map(|r| InstanceName::parse(r.trim()).ok())
        .ok_or_else(|| DnsError::NotAnInstance {
            name: name.to_owned(),
            found: records.join(", "),
        })
}

fn random_id() -> u16 {
    let mut bytes = [0u8; 2];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
        // Matching on the id is a sanity check here, not a defence.
        return 0x4b48;
    }
    u16::from_be_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer to `query` with these TXT records (each one string list).
    pub(crate) fn answer(query: &[u8], records: &[&[&str]]) -> Vec<u8> {
        let mut out = query[..2].to_vec();
        out.extend_from_slice(&[0x81, 0x80]);
        out.extend_from_slice(&[0, 1]);
        out.extend_from_slice(&(records.len() as u16).to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0]);
        out.extend_from_slice(&query[12..]);
        for strings in records {
            out.extend_from_slice(&[0xc0, 0x0c, 0, 16, 0, 1, 0, 0, 0, 30]);
            let data: Vec<u8> = strings
                .iter()
                .flat_map(|s| std::iter::once(s.len() as u8).chain(s.bytes()))
                .collect();
            out.extend_from_slice(&(data.len() as u16).to_be_bytes());
            out.extend_from_slice(&data);
        }
        out
    }

    #[test]
    fn the_query_byte_for_byte() {
        let q = encode_query(0x1234, "db.example.com.").expect("valid");
        assert_eq!(
            q,
            [
                0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 2, b'd', b'b', 7, b'e', b'x', b'a',
                b'm', b'p', b'l', b'e', 3, b'c', b'o', b'm', 0, 0, 16, 0, 1
            ]
        );
        assert!(encode_query(1, "a..b").is_err());
    }

    #[test]
    fn answers_with_split_strings_other_types_and_errors() {
        let q = encode_query(7, "db.example.com").expect("valid");
        let a = answer(&q, &[&["proj:us-central1:", "db"], &["v=spf1 -all"]]);
        assert_eq!(
            decode_answer(7, &a).expect("valid"),
            Some(vec![
                "proj:us-central1:db".to_owned(),
                "v=spf1 -all".to_owned()
            ])
        );
        assert_eq!(
            decode_answer(8, &a).expect_err("id"),
            "an answer to another query"
        );
        let mut nx = answer(&q, &[]);
        nx[3] = 0x83;
        assert_eq!(decode_answer(7, &nx).expect("nxdomain"), None);
        let mut servfail = answer(&q, &[]);
        servfail[3] = 0x82;
        assert!(decode_answer(7, &servfail)
            .expect_err("servfail")
            .contains("error code 2"));
        // Every truncation is an error, never a panic.
        for cut in 0..a.len() {
            assert!(decode_answer(7, &a[..cut]).is_err(), "{cut}");
        }
    }

    #[tokio::test]
    async fn a_lookup_against_a_server_on_loopback() {
        let server = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = server.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            if let Ok((n, from)) = server.recv_from(&mut buf).await {
                let reply = answer(&buf[..n], &[&["not an instance"], &["p:us-east1:db-2"]]);
                let _ = server.send_to(&reply, from).await;
            }
        });
        let name = resolve(addr, "db.example.com", Duration::from_secs(5))
            .await
            .expect("resolved");
        assert_eq!(name.to_string(), "p:us-east1:db-2");
    }
}
