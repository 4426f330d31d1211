//! A minimal, strict DER reader for the few fields keyhole needs from an
//! X.509 certificate: the subject's common name, the SAN dNSNames, notAfter
//! and the serial number.
//!
//! Certificates come from the network, so nothing here trusts a length: each
//! TLV is checked against what is left of its parent, lengths must be in
//! their minimal definite form, and every constructed value must be used up
//! exactly. The reader follows the fixed shape of a certificate (RFC 5280
//! §4.1) with straight-line code, so there is no recursion for an input to
//! exploit. Signatures and chains are webpki's business, not this module's.

use std::fmt;

use crate::civil::{civil_from_days, days_from_civil};
use std::time::{Duration, SystemTime};

/// What keyhole reads from a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The first commonName attribute of the subject, if there is one.
    pub common_name: Option<String>,
    /// The dNSName entries of the subjectAltName extension, in order.
    pub dns_names: Vec<String>,
    /// The end of the validity period.
    pub not_after: SystemTime,
    /// The serial number in lowercase hex, without the DER sign byte.
    pub serial_hex: String,
}

/// A certificate keyhole cannot read: which field, and what was wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed certificate: {field}: {problem}")]
pub struct X509Error {
    /// The certificate field being read, e.g. `validity.notAfter`.
    pub field: &'static str,
    pub problem: Problem,
}

/// What was wrong with a field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("the encoding ends early")]
    Truncated,
    #[error("expected {expected}, found tag 0x{found:02x}")]
    UnexpectedTag { expected: &'static str, found: u8 },
    #[error("multi-byte tag numbers are not used in certificates")]
    HighTagNumber,
    #[error("indefinite length (not DER)")]
    IndefiniteLength,
    #[error("length not in its shortest form (not DER)")]
    NonMinimalLength,
    #[error("length field of {0} bytes is too long")]
    LengthTooLong(usize),
    #[error("{0} unexpected bytes after the value")]
    TrailingData(usize),
    #[error("empty value")]
    Empty,
    #[error("invalid time {0:?}")]
    BadTime(String),
    #[error("invalid {0}")]
    BadText(&'static str),
    #[error("unsupported string type (tag 0x{0:02x})")]
    UnsupportedString(u8),
    #[error("the extension appears twice")]
    DuplicateExtension,
    #[error("invalid BOOLEAN")]
    BadBoolean,
}

/// DER tags (universal class unless noted).
mod tag {
    pub const BOOLEAN: u8 = 0x01;
    pub const INTEGER: u8 = 0x02;
    pub const BIT_STRING: u8 = 0x03;
    pub const OCTET_STRING: u8 = 0x04;
    pub const OID: u8 = 0x06;
    pub const UTF8_STRING: u8 = 0x0c;
    pub const PRINTABLE_STRING: u8 = 0x13;
    pub const T61_STRING: u8 = 0x14;
    pub const IA5_STRING: u8 = 0x16;
    pub const UTC_TIME: u8 = 0x17;
    pub const GENERALIZED_TIME: u8 = 0x18;
    pub const BMP_STRING: u8 = 0x1e;
    pub const SEQUENCE: u8 = 0x30;
    pub const SET: u8 = 0x31;
    /// `[0] EXPLICIT`: the TBSCertificate's version.
    pub const VERSION: u8 = 0xa0;
    /// `[1] IMPLICIT`: issuerUniqueID.
    pub const ISSUER_UID: u8 = 0x81;
    /// `[2] IMPLICIT`: subjectUniqueID.
    pub const SUBJECT_UID: u8 = 0x82;
    /// `[3] EXPLICIT`: the TBSCertificate's extensions.
    pub const EXTENSIONS: u8 = 0xa3;
    /// GeneralName `[2] IMPLICIT IA5String`: a dNSName.
    pub const DNS_NAME: u8 = 0x82;
}

/// 2.5.4.3, id-at-commonName (content octets of the OID).
const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
/// 2.5.29.17, id-ce-subjectAltName.
const OID_SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];

/// Reads the fields keyhole needs from one DER certificate. The whole input
/// must be exactly one certificate.
pub fn parse(der: &[u8]) -> Result<CertInfo, X509Error> {
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }
    let mut outer = Der::new(der);
    let cert = outer.expect(tag::SEQUENCE, "certificate", "Certificate")?;
    outer.finish("certificate")?;
    let mut cert = Der::new(cert);
    let tbs = cert.expect(tag::SEQUENCE, "tbsCertificate", "SEQUENCE")?;
    cert.expect(tag::SEQUENCE, "signatureAlgorithm", "SEQUENCE")?;
    cert.expect(tag::BIT_STRING, "signatureValue", "BIT STRING")?;
    cert.finish("certificate")?;

    let mut tbs = Der::new(tbs);
    if let Some(version) = tbs.optional(tag::VERSION, "version")? {
        let mut version = Der::new(version);
        nonempty(
            version.expect(tag::INTEGER, "version", "INTEGER")?,
            "version",
        )?;
        version.finish("version")?;
    }
    let serial_hex = serial_hex(tbs.expect(tag::INTEGER, "serialNumber", "INTEGER")?)?;
    tbs.expect(tag::SEQUENCE, "signature", "AlgorithmIdentifier")?;
    tbs.expect(tag::SEQUENCE, "issuer", "Name")?;
    let mut validity = Der::new(tbs.expect(tag::SEQUENCE, "validity", "SEQUENCE")?);
    time(&mut validity, "validity.notBefore")?;
    let not_after = time(&mut validity, "validity.notAfter")?;
    validity.finish("validity")?;
    let common_name = common_name(tbs.expect(tag::SEQUENCE, "subject", "Name")?)?;
    tbs.expect(tag::SEQUENCE, "subjectPublicKeyInfo", "SEQUENCE")?;
    tbs.optional(tag::ISSUER_UID, "issuerUniqueID")?;
    tbs.optional(tag::SUBJECT_UID, "subjectUniqueID")?;
    let dns_names = match tbs.optional(tag::EXTENSIONS, "extensions")? {
        Some(explicit) => {
            let mut explicit = Der::new(explicit);
            let list = explicit.expect(tag::SEQUENCE, "extensions", "SEQUENCE")?;
            explicit.finish("extensions")?;
            dns_names(list)?
        }
        None => Vec::new(),
    };
    tbs.finish("tbsCertificate")?;

    Ok(CertInfo {
        common_name,
        dns_names,
        not_after,
        serial_hex,
    })
}

/// Formats a time as `2024-05-06 07:08:09 UTC`, for messages about validity.
pub fn format_utc(t: SystemTime) -> String {
    let secs = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |s| -s),
    };
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A cursor over the TLVs of one constructed value.
struct Der<'a> {
    rest: &'a [u8],
}

impl<'a> Der<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Der { rest: bytes }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// Reads one TLV: its tag and its contents.
    fn any(&mut self, field: &'static str) -> Result<(u8, &'a [u8]), X509Error> {
        let err = |problem| X509Error { field, problem };
        let (&tag, rest) = self.rest.split_first().ok_or(err(Problem::Truncated))?;
        if tag & 0x1f == 0x1f {
            return Err(err(Problem::HighTagNumber));
        }
        let (&first, rest) = rest.split_first().ok_or(err(Problem::Truncated))?;
        let (len, rest) = match first {
            0..=0x7f => (usize::from(first), rest),
            0x80 => return Err(err(Problem::IndefiniteLength)),
            _ => {
                let n = usize::from(first & 0x7f);
                // Four bytes describe 4 GiB, far beyond any certificate.
                if n > 4 {
                    return Err(err(Problem::LengthTooLong(n)));
                }
                if rest.len() < n {
                    return Err(err(Problem::Truncated));
                }
                let (bytes, rest) = rest.split_at(n);
                if bytes[0] == 0 {
                    return Err(err(Problem::NonMinimalLength));
                }
                let len = bytes
                    .iter()
                    .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
                if len < 0x80 {
                    return Err(err(Problem::NonMinimalLength));
                }
                (len, rest)
            }
        };
        if rest.len() < len {
            return Err(err(Problem::Truncated));
        }
        let (value, rest) = rest.split_at(len);
        self.rest = rest;
        Ok((tag, value))
    }

    /// Reads one TLV that must carry `tag`; `expected` names it for errors.
    fn expect(
        &mut self,
        tag: u8,
        field: &'static str,
        expected: &'static str,
    ) -> Result<&'a [u8], X509Error> {
        let (found, value) = self.any(field)?;
        if found != tag {
            return Err(X509Error {
                field,
                problem: Problem::UnexpectedTag { expected, found },
            });
        }
        Ok(value)
    }

    /// Reads the next TLV if it carries `tag`.
    fn optional(&mut self, tag: u8, field: &'static str) -> Result<Option<&'a [u8]>, X509Error> {
        match self.rest.first() {
            Some(&t) if t == tag => self.any(field).map(|(_, value)| Some(value)),
            _ => Ok(None),
        }
    }

    /// Requires that everything has been read.
    fn finish(self, field: &'static str) -> Result<(), X509Error> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(X509Error {
                field,
                problem: Problem::TrailingData(self.rest.len()),
            })
        }
    }
}

fn nonempty<'a>(value: &'a [u8], field: &'static str) -> Result<&'a [u8], X509Error> {
    if value.is_empty() {
        Err(X509Error {
            field,
            problem: Problem::Empty,
        })
    } else {
        Ok(value)
    }
}

/// The serial's content octets in hex, less the 00 a DER INTEGER puts before
/// a positive number whose top bit is set.
fn serial_hex(value: &[u8]) -> Result<String, X509Error> {
    let value = nonempty(value, "serialNumber")?;
    let value = match value {
        [0, rest @ ..] if !rest.is_empty() => rest,
        _ => value,
    };
    Ok(value.iter().map(|b| format!("{b:02x}")).collect())
}

/// The first commonName in a Name (SEQUENCE OF SET OF AttributeTypeAndValue).
/// Every RDN is still checked for shape, so a damaged subject is an error
/// even after the common name.
fn common_name(name: &[u8]) -> Result<Option<String>, X509Error> {
    const FIELD: &str = "subject";
    let mut found = None;
    let mut rdns = Der::new(name);
    while !rdns.is_empty() {
        let mut set = Der::new(rdns.expect(tag::SET, FIELD, "SET (RelativeDistinguishedName)")?);
        nonempty(set.rest, FIELD)?;
        while !set.is_empty() {
            let mut atv =
                Der::new(set.expect(tag::SEQUENCE, FIELD, "SEQUENCE (AttributeTypeAndValue)")?);
            let oid = nonempty(atv.expect(tag::OID, FIELD, "OBJECT IDENTIFIER")?, FIELD)?;
            let (string_tag, value) = atv.any(FIELD)?;
            atv.finish(FIELD)?;
            if oid == OID_COMMON_NAME && found.is_none() {
                found = Some(text(string_tag, value, "subject.commonName")?);
            }
        }
    }
    Ok(found)
}

/// A directory string as text.
fn text(string_tag: u8, value: &[u8], field: &'static str) -> Result<String, X509Error> {
    let bad = |what| X509Error {
        field,
        problem: Problem::BadText(what),
    };
    match string_tag {
        tag::UTF8_STRING => String::from_utf8(value.to_vec()).map_err(|_| bad("UTF8String")),
        tag::PRINTABLE_STRING | tag::IA5_STRING => {
            if value.is_ascii() {
                Ok(value.iter().map(|&b| char::from(b)).collect())
            } else {
                Err(bad("ASCII string"))
            }
        }
        // T.61 proper is a tangle; every certificate in practice holds Latin-1.
        tag::T61_STRING => Ok(value.iter().map(|&b| char::from(b)).collect()),
        tag::BMP_STRING => {
            if !value.len().is_multiple_of(2) {
                return Err(bad("BMPString"));
            }
            let units = value
                .chunks_exact(2)
                .map(|pair| u16::from_be_bytes([pair[0], pair[1]]));
            char::decode_utf16(units)
                .collect::<Result<String, _>>()
                .map_err(|_| bad("BMPString"))
        }
        other => Err(X509Error {
            field,
            problem: Problem::UnsupportedString(other),
        }),
    }
}

/// The dNSNames of the subjectAltName extension, from the Extensions SEQUENCE.
fn dns_names(extensions: &[u8]) -> Result<Vec<String>, X509Error> {
    const FIELD: &str = "extensions";
    const SAN: &str = "subjectAltName";
    let mut names = None;
    let mut list = Der::new(extensions);
    while !list.is_empty() {
        // Extension ::= SEQUENCE { extnID, critical BOOLEAN DEFAULT FALSE, extnValue OCTET STRING }
        let mut ext = Der::new(list.expect(tag::SEQUENCE, FIELD, "SEQUENCE (Extension)")?);
        let oid = nonempty(ext.expect(tag::OID, FIELD, "OBJECT IDENTIFIER")?, FIELD)?;
        if let Some(critical) = ext.optional(tag::BOOLEAN, FIELD)? {
            // DER: one byte, 0x00 or 0xff (and DEFAULT FALSE is never encoded).
            if critical != [0xff] {
                return Err(X509Error {
                    field: FIELD,
                    problem: Problem::BadBoolean,
                });
            }
        }
        let value = ext.expect(tag::OCTET_STRING, FIELD, "OCTET STRING")?;
        ext.finish(FIELD)?;
        if oid != OID_SUBJECT_ALT_NAME {
            continue;
        }
        if names.is_some() {
            return Err(X509Error {
                field: SAN,
                problem: Problem::DuplicateExtension,
            });
        }
        // GeneralNames ::= SEQUENCE SIZE (1..MAX) OF GeneralName
        let mut outer = Der::new(value);
        let mut general = Der::new(nonempty(
            outer.expect(tag::SEQUENCE, SAN, "SEQUENCE (GeneralNames)")?,
            SAN,
        )?);
        outer.finish(SAN)?;
        let mut found = Vec::new();
        while !general.is_empty() {
            let (name_tag, name) = general.any(SAN)?;
            if name_tag == tag::DNS_NAME {
                found.push(text(tag::IA5_STRING, name, "subjectAltName.dNSName")?);
            }
        }
        names = Some(found);
    }
    Ok(names.unwrap_or_default())
}

/// Reads a UTCTime or GeneralizedTime in the forms RFC 5280 §4.1.2.5 allows:
/// `YYMMDDHHMMSSZ` and `YYYYMMDDHHMMSSZ`.
fn time(validity: &mut Der<'_>, field: &'static str) -> Result<SystemTime, X509Error> {
    let (time_tag, value) = validity.any(field)?;
    let bad = || X509Error {
        field,
        problem: Problem::BadTime(String::from_utf8_lossy(value).into_owned()),
    };
    let (year, rest) = match (time_tag, value.len()) {
        (tag::UTC_TIME, 13) => {
            let yy = digits(&value[..2]).ok_or_else(bad)?;
            // RFC 5280: 50..=99 are 19xx, 00..=49 are 20xx.
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &value[2..])
        }
        (tag::GENERALIZED_TIME, 15) => (digits(&value[..4]).ok_or_else(bad)?, &value[4..]),
        (tag::UTC_TIME | tag::GENERALIZED_TIME, _) => return Err(bad()),
        (found, _) => {
            return Err(X509Error {
                field,
                problem: Problem::UnexpectedTag {
                    expected: "UTCTime or GeneralizedTime",
                    found,
                },
            })
        }
    };
    // `rest` is MMDDHHMMSSZ: 11 bytes in both forms.
    if rest[10] != b'Z' {
        return Err(bad());
    }
    let field_at = |i: usize| digits(&rest[i..i + 2]).ok_or_else(bad);
    let (month, day) = (field_at(0)?, field_at(2)?);
    let (hour, minute, second) = (field_at(4)?, field_at(6)?, field_at(8)?);
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return Err(bad());
    }
    let days = days_from_civil(i64::from(year), i64::from(month), i64::from(day));
    let secs = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second);
    let epoch = SystemTime::UNIX_EPOCH;
    let t = if secs >= 0 {
        epoch.checked_add(Duration::from_secs(secs.unsigned_abs()))
    } else {
        epoch.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    };
    t.ok_or_else(bad)
}

/// ASCII decimal digits as a number (at most four of them here).
fn digits(bytes: &[u8]) -> Option<u32> {
    bytes.iter().try_fold(0u32, |acc, &b| {
        b.is_ascii_digit().then(|| acc * 10 + u32::from(b - b'0'))
    })
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400)) => {
            29
        }
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

impl fmt::Display for CertInfo {
    /// A one-line summary for logs: CN, SANs, serial and expiry.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.common_name {
            Some(cn) => write!(f, "CN {cn:?}")?,
            None => f.write_str("no CN")?,
        }
        if self.dns_names.is_empty() {
            f.write_str(", no DNS SANs")?;
        } else {
            write!(f, ", SANs {}", self.dns_names.join(", ").escape_debug())?;
        }
        write!(
            f,
            ", serial {}, expires {}",
            self.serial_hex,
            format_utc(self.not_after)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        date_time_ymd, CertificateParams, DnType, DnValue, KeyPair, SanType, SerialNumber,
    };

    fn at(unix: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(unix)
    }

    /// A certificate from `params`, plus what rcgen itself reads back from
    /// it (through x509-parser): a second opinion on every field.
    fn make(params: CertificateParams) -> (Vec<u8>, CertificateParams) {
        let key = KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("cert");
        let der = cert.der().to_vec();
        let reparsed = CertificateParams::from_ca_cert_der(cert.der()).expect("reparse");
        (der, reparsed)
    }

    fn params(cn: Option<&str>, sans: &[&str]) -> CertificateParams {
        let mut p = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("params");
        p.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            p.distinguished_name
                .push(DnType::OrganizationName, "Google, Inc");
            p.distinguished_name.push(DnType::CommonName, cn);
        }
        p.serial_number = Some(SerialNumber::from_slice(&[0x8f, 0x01, 0x02, 0x03]));
        p.not_before = date_time_ymd(2024, 1, 1);
        p.not_after = date_time_ymd(2034, 2, 28);
        p
    }

    /// Checks our reading against rcgen's.
    fn agree(info: &CertInfo, reparsed: &CertificateParams) {
        let theirs_cn = match reparsed.distinguished_name.get(&DnType::CommonName) {
            Some(DnValue::Utf8String(s)) => Some(s.clone()),
            Some(DnValue::PrintableString(s)) => Some(s.as_str().to_owned()),
            None => None,
            Some(other) => panic!("unexpected CN type {other:?}"),
        };
        assert_eq!(info.common_name, theirs_cn);
        let theirs_sans: Vec<String> = reparsed
            .subject_alt_names
            .iter()
            .filter_map(|s| match s {
                SanType::DnsName(n) => Some(n.as_str().to_owned()),
                _ => None,
            })
            .collect();
        assert_eq!(info.dns_names, theirs_sans);
        let theirs_after = reparsed.not_after.unix_timestamp();
        assert_eq!(
            info.not_after,
            at(theirs_after.try_into().expect("after 1970"))
        );
        let theirs_serial: String = reparsed
            .serial_number
            .as_ref()
            .expect("serial")
            .to_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(info.serial_hex, theirs_serial);
    }

    #[test]
    fn cn_only() {
        let (der, reparsed) = make(params(Some("my-project:my-instance"), &[]));
        let info = parse(&der).expect("parse");
        assert_eq!(info.common_name.as_deref(), Some("my-project:my-instance"));
        assert!(info.dns_names.is_empty());
        // 2034-02-28T00:00:00Z
        assert_eq!(info.not_after, at(2_024_697_600));
        assert_eq!(info.serial_hex, "8f010203");
        agree(&info, &reparsed);
    }

    #[test]
    fn sans_only() {
        let (der, reparsed) = make(params(None, &["inst.abc.us-central1.sql.goog"]));
        let info = parse(&der).expect("parse");
        assert_eq!(info.common_name, None);
        assert_eq!(info.dns_names, ["inst.abc.us-central1.sql.goog"]);
        agree(&info, &reparsed);
    }

    #[test]
    fn cn_and_several_sans_among_other_names() {
        let mut p = params(
            Some("example.com:proj:inst"),
            &["a.sql.goog", "B.Example.Invalid.", "c.example.invalid"],
        );
        // Non-DNS names are skipped, wherever they are.
        p.subject_alt_names
            .insert(1, SanType::IpAddress(std::net::IpAddr::from([10, 0, 0, 1])));
        p.subject_alt_names
            .push(SanType::URI("spiffe://x/y".try_into().expect("uri")));
        let (der, reparsed) = make(p);
        let info = parse(&der).expect("parse");
        assert_eq!(info.common_name.as_deref(), Some("example.com:proj:inst"));
        assert_eq!(
            info.dns_names,
            ["a.sql.goog", "B.Example.Invalid.", "c.example.invalid"]
        );
        agree(&info, &reparsed);
    }

    #[test]
    fn printable_and_t61_common_names() {
        let mut p = params(None, &[]);
        p.distinguished_name.push(
            DnType::CommonName,
            DnValue::PrintableString("first".try_into().expect("printable")),
        );
        let (mut der, _) = make(p);
        assert_eq!(
            parse(&der).expect("parse").common_name.as_deref(),
            Some("first")
        );
        // Retag the CN value: an unsupported string type is refused by name,
        // T61String is read as Latin-1.
        // (The last "first": the issuer, the same name, comes before the subject.)
        let pos = der.windows(5).rposition(|w| w == b"first").expect("cn") - 2;
        der[pos] = 0x1c; // UniversalString
        let err = parse(&der).expect_err("universal string");
        assert_eq!(err.field, "subject.commonName");
        assert_eq!(err.problem, Problem::UnsupportedString(0x1c));
        der[pos] = tag::T61_STRING;
        assert_eq!(
            parse(&der).expect("t61").common_name.as_deref(),
            Some("first")
        );
    }

    #[test]
    fn first_common_name_wins() {
        // Name: RDN{O=x}, RDN{CN=a, CN=b}, RDN{CN=c}
        let atv = |oid: &[u8], v: &[u8]| {
            let mut a = vec![0x30, (4 + oid.len() + v.len()) as u8, 0x06, oid.len() as u8];
            a.extend_from_slice(oid);
            a.extend([tag::UTF8_STRING, v.len() as u8]);
            a.extend_from_slice(v);
            a
        };
        let set = |atvs: Vec<Vec<u8>>| {
            let body = atvs.concat();
            [vec![tag::SET, body.len() as u8], body].concat()
        };
        let name = [
            set(vec![atv(&[0x55, 0x04, 0x0a], b"x")]),
            set(vec![atv(OID_COMMON_NAME, b"a"), atv(OID_COMMON_NAME, b"b")]),
            set(vec![atv(OID_COMMON_NAME, b"c")]),
        ]
        .concat();
        assert_eq!(common_name(&name), Ok(Some("a".to_owned())));
        // A damaged RDN after the CN is still an error, and an empty RDN too.
        let mut damaged = name.clone();
        damaged.extend([tag::SET, 0x02, 0x05, 0x00]);
        assert!(common_name(&damaged).is_err());
        assert_eq!(
            common_name(&[tag::SET, 0x00])
                .expect_err("empty rdn")
                .problem,
            Problem::Empty
        );
        assert_eq!(common_name(&[]), Ok(None));
    }

    #[test]
    fn text_decodings() {
        assert_eq!(
            text(tag::T61_STRING, b"caf\xe9", "f"),
            Ok("café".to_owned())
        );
        assert_eq!(
            text(tag::BMP_STRING, b"\x00p\x00:\x00i", "f"),
            Ok("p:i".to_owned())
        );
        assert!(text(tag::BMP_STRING, b"\x00p\x00", "f").is_err());
        assert!(text(tag::IA5_STRING, b"\xff", "f").is_err());
        assert!(text(tag::UTF8_STRING, b"\xc3", "f").is_err());
    }

    #[test]
    fn generalized_time_after_2050() {
        let mut p = params(Some("p:i"), &["x.sql.goog"]);
        p.not_after = date_time_ymd(2061, 3, 1);
        let (der, reparsed) = make(p);
        // rcgen switches to GeneralizedTime from 2050 on, as RFC 5280 says.
        assert!(find(&der, b"20610301000000Z").is_some());
        let info = parse(&der).expect("parse");
        // 2061-03-01T00:00:00Z
        assert_eq!(info.not_after, at(2_876_860_800));
        assert_eq!(format_utc(info.not_after), "2061-03-01 00:00:00 UTC");
        agree(&info, &reparsed);
    }

    #[test]
    fn utc_time_century_rule() {
        let t = |v: &[u8]| {
            let mut tlv = vec![tag::UTC_TIME, v.len() as u8];
            tlv.extend_from_slice(v);
            time(&mut Der::new(&tlv), "t")
        };
        assert_eq!(
            format_utc(t(b"500101000000Z").expect("1950")),
            "1950-01-01 00:00:00 UTC"
        );
        assert_eq!(
            format_utc(t(b"491231235959Z").expect("2049")),
            "2049-12-31 23:59:59 UTC"
        );
        assert_eq!(
            format_utc(t(b"240229120000Z").expect("leap")),
            "2024-02-29 12:00:00 UTC"
        );
        for bad in [
            &b"230229120000Z"[..], // not a leap year
            b"241301000000Z",
            b"240100000000Z",
            b"240101240000Z",
            b"240101006000Z",
            b"240101000060Z",
            b"2401010000Z", // no seconds
            b"240101000000+0100",
            b"24010100000aZ",
            b"240101000000z",
        ] {
            assert!(
                matches!(
                    t(bad),
                    Err(X509Error {
                        problem: Problem::BadTime(_),
                        ..
                    })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn before_1970() {
        let mut tlv = vec![tag::GENERALIZED_TIME, 15];
        tlv.extend_from_slice(b"19691231235959Z");
        let t = time(&mut Der::new(&tlv), "t").expect("1969");
        assert_eq!(
            SystemTime::UNIX_EPOCH
                .duration_since(t)
                .expect("before")
                .as_secs(),
            1
        );
        assert_eq!(format_utc(t), "1969-12-31 23:59:59 UTC");
    }

    #[test]
    fn every_prefix_is_an_error() {
        let (der, _) = make(params(Some("p:i"), &["a.sql.goog", "b.sql.goog."]));
        assert!(parse(&der).is_ok());
        for len in 0..der.len() {
            let err = parse(&der[..len]).expect_err("prefix must not parse");
            assert_eq!(err.problem, Problem::Truncated, "prefix of {len} bytes");
        }
    }

    #[test]
    fn corrupted_bytes_never_panic() {
        let (der, _) = make(params(Some("p:i"), &["a.sql.goog"]));
        for i in 0..der.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut bad = der.clone();
                bad[i] ^= flip;
                // Err or (for a byte inside a value, e.g. the signature) Ok: never a panic.
                let _ = parse(&bad);
            }
        }
    }

    #[test]
    fn trailing_data_is_refused() {
        let (mut der, _) = make(params(Some("p:i"), &[]));
        der.push(0);
        let err = parse(&der).expect_err("trailing");
        assert_eq!(err.field, "certificate");
        assert_eq!(err.problem, Problem::TrailingData(1));
        assert_eq!(
            err.to_string(),
            "malformed certificate: certificate: 1 unexpected bytes after the value"
        );
    }

    #[test]
    fn length_encodings() {
        let read = |bytes: &[u8]| Der::new(bytes).any("x").map(|(t, v)| (t, v.len()));
        assert_eq!(read(&[0x04, 0x01, 0xaa]), Ok((0x04, 1)));
        assert_eq!(
            read(&[0x04, 0x81, 0x80]).map_err(|e| e.problem),
            Err(Problem::Truncated)
        );
        let mut long = vec![0x04, 0x81, 0x80];
        long.extend([0u8; 0x80]);
        assert_eq!(read(&long), Ok((0x04, 0x80)));
        let problem = |bytes: &[u8]| read(bytes).expect_err("bad").problem;
        assert_eq!(
            problem(&[0x04, 0x80, 0x00, 0x00]),
            Problem::IndefiniteLength
        );
        assert_eq!(
            problem(&[0x04, 0x81, 0x05, 0, 0, 0, 0, 0]),
            Problem::NonMinimalLength
        );
        assert_eq!(
            problem(&[0x04, 0x82, 0x00, 0x80]),
            Problem::NonMinimalLength
        );
        assert_eq!(
            problem(&[0x04, 0x85, 1, 0, 0, 0, 0]),
            Problem::LengthTooLong(5)
        );
        assert_eq!(
            problem(&[0x04, 0x84, 0xff, 0xff, 0xff, 0xff]),
            Problem::Truncated
        );
        assert_eq!(problem(&[0x1f, 0x01, 0x00]), Problem::HighTagNumber);
        assert_eq!(problem(&[0x04]), Problem::Truncated);
    }

    #[test]
    fn wrong_outer_tag_is_named() {
        let (mut der, _) = make(params(Some("p:i"), &[]));
        der[0] = tag::SET;
        let err = parse(&der).expect_err("set");
        assert_eq!(
            err.to_string(),
            "malformed certificate: certificate: expected Certificate, found tag 0x31"
        );
    }

    #[test]
    fn duplicate_san_extension_is_refused() {
        let (der, _) = make(params(None, &["a.sql.goog"]));
        // Splice a second copy of the SAN extension into the extensions list.
        let info_ok = parse(&der).expect("parse");
        assert_eq!(info_ok.dns_names, ["a.sql.goog"]);
        let ext = san_extension(b"b.sql.goog");
        let err = dns_names(&[ext.clone(), ext].concat()).expect_err("dup");
        assert_eq!(err.problem, Problem::DuplicateExtension);
    }

    #[test]
    fn san_extension_shapes() {
        assert_eq!(
            dns_names(&san_extension(b"x.sql.goog")),
            Ok(vec!["x.sql.goog".to_owned()])
        );
        // Empty GeneralNames is not allowed (SIZE 1..MAX).
        let empty = [
            0x30, 0x09, 0x06, 0x03, 0x55, 0x1d, 0x11, 0x04, 0x02, 0x30, 0x00,
        ];
        assert_eq!(
            dns_names(&empty).expect_err("empty").problem,
            Problem::Empty
        );
        // A critical flag must be DER TRUE.
        let mut critical = vec![0x30, 0x0c, 0x06, 0x03, 0x55, 0x1d, 0x11, 0x01, 0x01, 0x01];
        critical.extend([0x04, 0x02, 0x30, 0x00]);
        assert_eq!(
            dns_names(&critical).expect_err("bool").problem,
            Problem::BadBoolean
        );
        // A dNSName that is not ASCII.
        let mut bad = san_extension(b"x.sql.goog");
        let last = bad.len() - 1;
        bad[last] = 0xe9;
        assert_eq!(
            dns_names(&bad).expect_err("ascii").problem,
            Problem::BadText("ASCII string")
        );
    }

    /// A DER subjectAltName extension holding one dNSName (short names only).
    fn san_extension(name: &[u8]) -> Vec<u8> {
        let n = name.len() as u8;
        let mut v = vec![
            0x30,
            11 + n,
            0x06,
            0x03,
            0x55,
            0x1d,
            0x11,
            0x04,
            4 + n,
            0x30,
            2 + n,
            0x82,
            n,
        ];
        v.extend_from_slice(name);
        v
    }

    fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
        haystack.windows(needle.len()).position(|w| w == needle)
    }

    #[test]
    fn display_summary() {
        let info = CertInfo {
            common_name: Some("p:i".into()),
            dns_names: vec!["a.sql.goog".into()],
            not_after: at(0),
            serial_hex: "01".into(),
        };
        assert_eq!(
            info.to_string(),
            "CN \"p:i\", SANs a.sql.goog, serial 01, expires 1970-01-01 00:00:00 UTC"
        );
    }
}
