//! AWS Signature Version 4, written from the published algorithm for the test
//! side only: an RDS IAM token signer (so tests can make tokens without
//! keyhole), the token verifier the fake RDS uses, the header-signature check
//! the fake STS applies to `AssumeRole`, and the date formats AWS speaks.
//! Nothing here is shared with keyhole's own signer: the point is a second,
//! independent implementation to check it against.
//!
//! # API
//!
//! - [`RdsSigner`]`{ access_key_id, secret_access_key, session_token, region }`:
//!   `token(host, port, user, at) -> String` (15-minute token, the layout every
//!   SDK emits: `host:port/?<sorted canonical query>&X-Amz-Signature=<hex>`),
//!   `token_with_expires(host, port, user, at, expires_secs)`.
//! - [`RdsExpectation`]`{ access_key_id, secret, host, port, region,
//!   session_token, user }` and [`verify_rds_token`]`(token, &expectation, now)
//!   -> Result<(), String>`: parses the token, recomputes the signature from
//!   the token's own parameters and checks every field; the error says which
//!   check failed and never quotes a secret.
//! - [`verify_header_signature`]`(&SignedRequest, access_key_id, secret, now)
//!   -> Result<HeaderCredential, String>`, [`authorization_header`]`(...)`:
//!   SigV4 in an `Authorization` header (what AWS API calls such as STS
//!   `AssumeRole` carry).
//! - Building blocks: [`uri_encode`], [`percent_decode`], [`canonical_query`],
//!   [`sha256_hex`], [`signature`], [`amz_date`], [`parse_amz_date`],
//!   [`iso8601`], [`EMPTY_SHA256`].

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::{digest, hmac};

/// The only algorithm SigV4 (as opposed to SigV4a) names.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// The service name in an RDS IAM token's credential scope.
pub const RDS_SERVICE: &str = "rds-db";
/// The longest validity an RDS IAM token may claim (15 minutes).
pub const MAX_RDS_EXPIRES: u64 = 900;
/// How far in the future a signature's date may lie (clock skew allowance).
pub const CLOCK_SKEW: Duration = Duration::from_secs(300);
/// Hex SHA-256 of the empty string: the payload hash of a presigned GET.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Percent-encodes everything except `A-Z a-z 0-9 - _ . ~`, with upper-case
/// hex digits: SigV4's encoding for query names and values.
pub fn uri_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Decodes `%XX` escapes (either hex case); everything else, `+` included,
/// stands for itself. Errors on a malformed escape or a result that is not
/// UTF-8.
pub fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let digits = bytes
                .get(i + 1..i + 3)
                .filter(|d| d.iter().all(u8::is_ascii_hexdigit))
                .ok_or_else(|| format!("malformed percent escape at byte {i}"))?;
            let text = std::str::from_utf8(digits).map_err(|e| e.to_string())?;
            out.push(u8::from_str_radix(text, 16).map_err(|e| e.to_string())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "percent escapes do not decode to UTF-8".to_owned())
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Lower-case hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, data).as_ref())
}

fn hmac_sha256(key: &[u8], data: &str) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data.as_bytes())
        .as_ref()
        .to_vec()
}

/// The canonical query string: every name and value [`uri_encode`]d, pairs
/// sorted by encoded name (then value), joined with `&`.
pub fn canonical_query(params: &[(String, String)]) -> String {
    let mut encoded: Vec<(String, String)> = params
        .iter()
        .map(|(n, v)| (uri_encode(n), uri_encode(v)))
        .collect();
    encoded.sort();
    encoded
        .iter()
        .map(|(n, v)| format!("{n}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// The hex signature of `canonical_request`, signed at `amz_date`
/// (`yyyymmddThhmmssZ`) for `region` and `service` with `secret`.
pub fn signature(
    secret: &str,
    amz_date: &str,
    region: &str,
    service: &str,
    canonical_request: &str,
) -> String {
    let date = amz_date.get(..8).unwrap_or(amz_date);
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let string_to_sign = format!(
        "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
        sha256_hex(canonical_request.as_bytes())
    );
    let mut key = hmac_sha256(format!("AWS4{secret}").as_bytes(), date);
    for part in [region, service, "aws4_request"] {
        key = hmac_sha256(&key, part);
    }
    hex(&hmac_sha256(&key, &string_to_sign))
}

// --- dates --------------------------------------------------------------------

/// Days since 1970-01-01 of a proleptic Gregorian date (`month` 1-12).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    // Count years from March so that the leap day ends the year.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The inverse of [`days_from_civil`]: (year, month 1-12, day 1-31).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// (year, month, day, hour, minute, second) of `t` in UTC (times before 1970
/// count as 1970-01-01T00:00:00).
fn utc_parts(t: SystemTime) -> (i64, i64, i64, i64, i64, i64) {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, mo, d) = civil_from_days(days);
    (y, mo, d, rem / 3600, rem % 3600 / 60, rem % 60)
}

/// `yyyymmddThhmmssZ`, SigV4's `X-Amz-Date`.
pub fn amz_date(t: SystemTime) -> String {
    let (y, mo, d, h, mi, s) = utc_parts(t);
    format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z")
}

/// ISO 8601 UTC with seconds, `yyyy-mm-ddThh:mm:ssZ` (credential expirations).
pub fn iso8601(t: SystemTime) -> String {
    let (y, mo, d, h, mi, s) = utc_parts(t);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// Parses `yyyymmddThhmmssZ` strictly (digits where digits belong, fields in
/// range, 1970 or later).
pub fn parse_amz_date(s: &str) -> Result<SystemTime, String> {
    let b = s.as_bytes();
    let digits_at = |range: std::ops::Range<usize>| -> Result<i64, String> {
        let part = b.get(range).ok_or("too short")?;
        if !part.iter().all(u8::is_ascii_digit) {
            return Err("not a digit where one belongs".to_owned());
        }
        Ok(part.iter().fold(0, |n, d| n * 10 + i64::from(d - b'0')))
    };
    let parse = || -> Result<SystemTime, String> {
        if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
            return Err("not of the form yyyymmddThhmmssZ".to_owned());
        }
        let (y, mo, d) = (digits_at(0..4)?, digits_at(4..6)?, digits_at(6..8)?);
        let (h, mi, sec) = (digits_at(9..11)?, digits_at(11..13)?, digits_at(13..15)?);
        let month_days = match mo {
            2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            1..=12 => 31,
            _ => return Err("month out of range".to_owned()),
        };
        if y < 1970 || !(1..=month_days).contains(&d) || h > 23 || mi > 59 || sec > 59 {
            return Err("field out of range".to_owned());
        }
        let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec;
        Ok(UNIX_EPOCH + Duration::from_secs(secs as u64))
    };
    parse().map_err(|e| format!("X-Amz-Date '{s}': {e}"))
}

// --- RDS IAM tokens -------------------------------------------------------------

/// Signs RDS IAM tokens from a set of AWS credentials, independently of keyhole.
#[derive(Clone)]
pub struct RdsSigner {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
    pub region: String,
}

impl std::fmt::Debug for RdsSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RdsSigner({} in {}, secret redacted, session token {})",
            self.access_key_id,
            self.region,
            if self.session_token.is_some() {
                "redacted"
            } else {
                "none"
            }
        )
    }
}

impl RdsSigner {
    /// A 15-minute token for `user` at `host:port`, dated `at`.
    pub fn token(&self, host: &str, port: u16, user: &str, at: SystemTime) -> String {
        self.token_with_expires(host, port, user, at, MAX_RDS_EXPIRES)
    }

    /// A token claiming `expires` seconds of validity (for tests of the limit).
    pub fn token_with_expires(
        &self,
        host: &str,
        port: u16,
        user: &str,
        at: SystemTime,
        expires: u64,
    ) -> String {
        let date = amz_date(at);
        let mut params: Vec<(String, String)> = [
            ("Action", "connect".to_owned()),
            ("DBUser", user.to_owned()),
            ("X-Amz-Algorithm", ALGORITHM.to_owned()),
            (
                "X-Amz-Credential",
                format!(
                    "{}/{}/{}/{RDS_SERVICE}/aws4_request",
                    self.access_key_id,
                    &date[..8],
                    self.region
                ),
            ),
            ("X-Amz-Date", date.clone()),
            ("X-Amz-Expires", expires.to_string()),
            ("X-Amz-SignedHeaders", "host".to_owned()),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_owned(), v))
        .collect();
        if let Some(token) = &self.session_token {
            params.push(("X-Amz-Security-Token".to_owned(), token.clone()));
        }
        let query = canonical_query(&params);
        let sig = signature(
            &self.secret_access_key,
            &date,
            &self.region,
            RDS_SERVICE,
            &rds_canonical_request(&query, host, port),
        );
        format!("{host}:{port}/?{query}&X-Amz-Signature={sig}")
    }
}

/// The canonical request of an RDS token: a presigned `GET /` whose only
/// signed header is `host:<host>:<port>`.
fn rds_canonical_request(canonical_query: &str, host: &str, port: u16) -> String {
    format!("GET\n/\n{canonical_query}\nhost:{host}:{port}\n\nhost\n{EMPTY_SHA256}")
}

/// What a fake RDS expects of a token. Never printed: it holds the secret.
pub struct RdsExpectation<'a> {
    pub access_key_id: &'a str,
    pub secret: &'a str,
    /// The endpoint the token must be signed for (the RDS name, not 127.0.0.1).
    pub host: &'a str,
    pub port: u16,
    pub region: &'a str,
    /// `Some`: the token must carry exactly this `X-Amz-Security-Token`;
    /// `None`: it must carry none.
    pub session_token: Option<&'a str>,
    /// The database user of the connection (StartupMessage / HandshakeResponse).
    pub user: &'a str,
}

/// Checks an RDS IAM token as RDS would: layout, `Action=connect`, `DBUser`,
/// algorithm, signed headers, credential scope (key id, date, region,
/// `rds-db`), `X-Amz-Expires` (1 to 900) and expiry against `now` (with
/// [`CLOCK_SKEW`] for dates in the future), the signed endpoint, the session
/// token, and finally the signature, recomputed from the token's own
/// parameters. The error names the failed check and never quotes a secret.
pub fn verify_rds_token(
    token: &str,
    expect: &RdsExpectation,
    now: SystemTime,
) -> Result<(), String> {
    let (authority, query) = token
        .split_once("/?")
        .ok_or("not of the form host:port/?query")?;
    let (host, port_text) = authority
        .rsplit_once(':')
        .ok_or("the endpoint carries no port")?;
    if port_text.is_empty() || !port_text.bytes().all(|b| b.is_ascii_digit()) {
        return Err("the endpoint's port is not a number".to_owned());
    }
    let port: u16 = port_text
        .parse()
        .map_err(|_| "the endpoint's port is out of range".to_owned())?;
    if host != expect.host || port != expect.port {
        return Err(format!(
            "signed for {host}:{port}, expected {}:{}",
            expect.host, expect.port
        ));
    }

    let mut params: Vec<(String, String)> = Vec::new();
    let mut sig = None;
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').ok_or("a query parameter has no '='")?;
        let name = percent_decode(name)?;
        let value = percent_decode(value)?;
        if name == "X-Amz-Signature" {
            if sig.replace(value).is_some() {
                return Err("X-Amz-Signature appears twice".to_owned());
            }
        } else {
            if params.iter().any(|(n, _)| *n == name) {
                return Err(format!("{name} appears twice"));
            }
            params.push((name, value));
        }
    }
    let param = |name: &str| -> Result<&str, String> {
        params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .ok_or_else(|| format!("no {name}"))
    };
    let sig = sig.ok_or("no X-Amz-Signature")?;
    if sig.len() != 64 || !sig.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err("X-Amz-Signature is not 64 lower-case hex digits".to_owned());
    }
    if param("Action")? != "connect" {
        return Err("Action is not 'connect'".to_owned());
    }
    let db_user = param("DBUser")?;
    if db_user != expect.user {
        return Err(format!(
            "DBUser is '{db_user}' but the connection logs in as '{}'",
            expect.user
        ));
    }
    if param("X-Amz-Algorithm")? != ALGORITHM {
        return Err(format!("X-Amz-Algorithm is not {ALGORITHM}"));
    }
    if param("X-Amz-SignedHeaders")? != "host" {
        return Err("X-Amz-SignedHeaders is not 'host'".to_owned());
    }
    let date_text = param("X-Amz-Date")?;
    let signed_at = parse_amz_date(date_text)?;
    let expires_text = param("X-Amz-Expires")?;
    if expires_text.is_empty() || !expires_text.bytes().all(|b| b.is_ascii_digit()) {
        return Err("X-Amz-Expires is not a number".to_owned());
    }
    let expires: u64 = expires_text
        .parse()
        .map_err(|_| "X-Amz-Expires is out of range".to_owned())?;
    if !(1..=MAX_RDS_EXPIRES).contains(&expires) {
        return Err(format!(
            "X-Amz-Expires is {expires}, not between 1 and {MAX_RDS_EXPIRES}"
        ));
    }

    let credential = param("X-Amz-Credential")?;
    let scope: Vec<&str> = credential.split('/').collect();
    let [key_id, date, region, service, terminator] = scope[..] else {
        return Err("X-Amz-Credential is not key/date/region/service/aws4_request".to_owned());
    };
    if key_id != expect.access_key_id {
        return Err(format!(
            "signed with access key {key_id}, expected {}",
            expect.access_key_id
        ));
    }
    if date != &date_text[..8] {
        return Err("the credential's date is not X-Amz-Date's".to_owned());
    }
    if region != expect.region {
        return Err(format!(
            "signed for region '{region}', expected '{}'",
            expect.region
        ));
    }
    if service != RDS_SERVICE || terminator != "aws4_request" {
        return Err(format!(
            "the credential scope names service '{service}'/'{terminator}', expected {RDS_SERVICE}/aws4_request"
        ));
    }

    let token_session = params
        .iter()
        .find(|(n, _)| n == "X-Amz-Security-Token")
        .map(|(_, v)| v.as_str());
    match (token_session, expect.session_token) {
        (None, None) => {}
        (Some(got), Some(want)) if got == want => {}
        (Some(_), Some(_)) => return Err("X-Amz-Security-Token is not the expected one".to_owned()),
        (None, Some(_)) => {
            return Err("no X-Amz-Security-Token, but the credentials have one".to_owned())
        }
        (Some(_), None) => {
            return Err("an X-Amz-Security-Token, but the credentials have none".to_owned())
        }
    }

    let expiry = signed_at + Duration::from_secs(expires);
    if now > expiry {
        let late = now.duration_since(expiry).unwrap_or_default().as_secs();
        return Err(format!("expired {late} s ago"));
    }
    if signed_at > now + CLOCK_SKEW {
        return Err("X-Amz-Date is in the future".to_owned());
    }

    let expected = signature(
        expect.secret,
        date_text,
        region,
        RDS_SERVICE,
        &rds_canonical_request(&canonical_query(&params), host, port),
    );
    if expected != sig {
        return Err("signature mismatch".to_owned());
    }
    Ok(())
}

// --- signatures in an Authorization header ----------------------------------------

/// An HTTP request as a SigV4 header verifier needs it.
pub struct SignedRequest<'a> {
    pub method: &'a str,
    /// The path, `/` for STS.
    pub path: &'a str,
    /// The raw query string (without `?`), empty if none.
    pub query: &'a str,
    /// Header names in any case; repeated names are joined with `,`.
    pub headers: &'a [(String, String)],
    pub body: &'a [u8],
}

/// What a valid `Authorization` header named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderCredential {
    pub access_key_id: String,
    pub region: String,
    pub service: String,
    pub signed_headers: Vec<String>,
}

fn canonical_header_value(value: &str) -> String {
    value.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn header_canonical_request(
    req: &SignedRequest,
    signed_headers: &[String],
) -> Result<String, String> {
    let mut query_params = Vec::new();
    for pair in req.query.split('&').filter(|p| !p.is_empty()) {
        let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
        query_params.push((percent_decode(n)?, percent_decode(v)?));
    }
    let mut canonical_headers = String::new();
    for name in signed_headers {
        let values: Vec<String> = req
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| canonical_header_value(v))
            .collect();
        if values.is_empty() {
            return Err(format!(
                "signed header '{name}' is missing from the request"
            ));
        }
        let _ = writeln!(canonical_headers, "{name}:{}", values.join(","));
    }
    let payload_hash = req
        .headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("x-amz-content-sha256"))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_else(|| sha256_hex(req.body));
    let path = req
        .path
        .split('/')
        .map(|seg| uri_encode(&percent_decode(seg).unwrap_or_else(|_| seg.to_owned())))
        .collect::<Vec<_>>()
        .join("/");
    Ok(format!(
        "{}\n{}\n{}\n{canonical_headers}\n{}\n{payload_hash}",
        req.method,
        if path.is_empty() { "/" } else { &path },
        canonical_query(&query_params),
        signed_headers.join(";")
    ))
}

/// The `Authorization` header value for `req`, signed over `signed_headers`
/// (lower-case, sorted; they must be in `req.headers`, `x-amz-date` among
/// them with `amz_date(at)`).
pub fn authorization_header(
    req: &SignedRequest,
    signed_headers: &[&str],
    access_key_id: &str,
    secret: &str,
    (region, service): (&str, &str),
    at: SystemTime,
) -> Result<String, String> {
    let names: Vec<String> = signed_headers.iter().map(|s| (*s).to_owned()).collect();
    let date = amz_date(at);
    let sig = signature(
        secret,
        &date,
        region,
        service,
        &header_canonical_request(req, &names)?,
    );
    Ok(format!(
        "{ALGORITHM} Credential={access_key_id}/{}/{region}/{service}/aws4_request, SignedHeaders={}, Signature={sig}",
        &date[..8],
        names.join(";")
    ))
}

/// Checks the SigV4 `Authorization` header of `req`: signed by
/// `access_key_id`/`secret`, `x-amz-date` present, signed and within 15
/// minutes of `now`, `host` signed, signature right. Returns what the header
/// named (region and service are whatever the signer chose).
pub fn verify_header_signature(
    req: &SignedRequest,
    access_key_id: &str,
    secret: &str,
    now: SystemTime,
) -> Result<HeaderCredential, String> {
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    };
    let auth = header("authorization").ok_or("no Authorization header")?;
    let rest = auth
        .strip_prefix(ALGORITHM)
        .and_then(|r| r.strip_prefix(' '))
        .ok_or("the Authorization header is not AWS4-HMAC-SHA256")?;
    let (mut credential, mut signed, mut sig) = (None, None, None);
    for part in rest.split(',') {
        let (k, v) = part
            .trim()
            .split_once('=')
            .ok_or("malformed Authorization header")?;
        match k {
            "Credential" => credential = Some(v),
            "SignedHeaders" => signed = Some(v),
            "Signature" => sig = Some(v),
            _ => return Err(format!("unknown Authorization component '{k}'")),
        }
    }
    let credential = credential.ok_or("no Credential")?;
    let signed_headers: Vec<String> = signed
        .ok_or("no SignedHeaders")?
        .split(';')
        .map(str::to_owned)
        .collect();
    let sig = sig.ok_or("no Signature")?;
    let scope: Vec<&str> = credential.split('/').collect();
    let [key_id, date, region, service, "aws4_request"] = scope[..] else {
        return Err("Credential is not key/date/region/service/aws4_request".to_owned());
    };
    if key_id != access_key_id {
        return Err(format!(
            "signed with access key {key_id}, expected {access_key_id}"
        ));
    }
    if !signed_headers.iter().any(|h| h == "host") {
        return Err("the host header is not signed".to_owned());
    }
    if !signed_headers.iter().any(|h| h == "x-amz-date") {
        return Err("x-amz-date is not signed".to_owned());
    }
    if header("x-amz-security-token").is_some()
        && !signed_headers.iter().any(|h| h == "x-amz-security-token")
    {
        return Err("x-amz-security-token is sent but not signed".to_owned());
    }
    let amz = header("x-amz-date").ok_or("no x-amz-date header")?;
    let at = parse_amz_date(amz)?;
    if !amz.starts_with(date) {
        return Err("the credential's date is not x-amz-date's".to_owned());
    }
    let (early, late) = (now.duration_since(at).ok(), at.duration_since(now).ok());
    if early.is_some_and(|d| d > Duration::from_secs(900)) || late.is_some_and(|d| d > CLOCK_SKEW) {
        return Err("x-amz-date is too far from now".to_owned());
    }
    let expected = signature(
        secret,
        amz,
        region,
        service,
        &header_canonical_request(req, &signed_headers)?,
    );
    if expected != sig {
        return Err("signature mismatch".to_owned());
    }
    Ok(HeaderCredential {
        access_key_id: key_id.to_owned(),
        region: region.to_owned(),
        service: service.to_owned(),
        signed_headers,
    })
}
