//! Self-tests of the test-side fakes, without keyhole: the cloud endpoint
//! fakes answer their documented contracts (driven by a raw TCP client) and
//! fail on demand; the SigV4 code reproduces the SDKs' known answers and
//! rejects anything else; FakeOAuth verifies a JWT signed with ring; the fake
//! RDS lets a good token through to the real servers and refuses a bad one.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use support::cloud::{
    verify_assertion, AwsCredentials, FakeEcs, FakeGcpMetadata, FakeImds, FakeOAuth, FakeSts, Mode,
    ServiceAccountKey, JWT_BEARER, SQL_LOGIN_SCOPE,
};
use support::fake_rds::{
    ensure_mysql_iam_user, FakeRds, PgAsk, SwitchData, TokenCheck, DEFAULT_ENDPOINT, IAM_USER,
};
use support::mariadb::{read_packet, MariaDb, DATABASE};
use support::postgres::{PgCluster, TRUST_USER};
use support::sigv4::{self, RdsExpectation, RdsSigner};
use support::wire;

// --- a raw HTTP client -----------------------------------------------------------

struct HttpReply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl HttpReply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One request over a fresh connection; sends exactly `headers` (plus Host
/// unless given, Content-Length and Connection: close).
fn http(port: u16, method: &str, target: &str, headers: &[(&str, &str)], body: &str) -> HttpReply {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the fake");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    let mut request = format!("{method} {target} HTTP/1.1\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        request.push_str(&format!("Host: 127.0.0.1:{port}\r\n"));
    }
    for (n, v) in headers {
        request.push_str(&format!("{n}: {v}\r\n"));
    }
    request.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    stream
        .write_all(request.as_bytes())
        .expect("send the request");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read the response");
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("a status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    HttpReply {
        status,
        headers,
        body: body.to_owned(),
    }
}

fn form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(n, v)| format!("{}={}", sigv4::uri_encode(n), sigv4::uri_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// `yyyy-mm-ddThh:mm:ssZ` → the time it names.
fn parse_iso(s: &str) -> SystemTime {
    sigv4::parse_amz_date(&s.replace(['-', ':'], "")).expect("an ISO 8601 UTC time")
}

fn assert_about_an_hour_from_now(expiration: &str) {
    let at = parse_iso(expiration);
    let left = at
        .duration_since(SystemTime::now())
        .expect("expiration in the future");
    assert!(
        left > Duration::from_secs(3500) && left <= Duration::from_secs(3600),
        "{expiration}"
    );
}

// --- SigV4 ---------------------------------------------------------------------------

struct Vector {
    akid: &'static str,
    secret: &'static str,
    date: &'static str,
    host: &'static str,
    port: u16,
    region: &'static str,
    user: &'static str,
    signature: &'static str,
}

/// REFERENCE.md's vectors A (smithy-rs), B (smithy-rs) and C (aws-sdk-js v2).
const VECTORS: [Vector; 3] = [
    Vector {
        akid: "akid",
        secret: "secret",
        date: "20240826T220000Z",
        host: "prod-instance.us-east-1.rds.amazonaws.com",
        port: 3306,
        region: "us-east-1",
        user: "peccy",
        signature: "dd0cba843009474347af724090233265628ace491ea17ce3eb3da098b983ad89",
    },
    Vector {
        akid: "ANOTREAL",
        secret: "notrealrnrELgWzOk3IfjzDKtFBhDby",
        date: "19700101T000000Z",
        host: "dontcare.fake-region-1.rds.amazonaws.com",
        port: 3306,
        region: "fake-region-1",
        user: "mydbuser",
        signature: "32562254e5a540b51186f885e7df18188f5e963133f081c95668f8ce6d17c6c1",
    },
    Vector {
        akid: "akid",
        secret: "secret",
        date: "19700101T000000Z",
        host: "db.us-east-1.amazonaws.com",
        port: 8000,
        region: "us-east-1",
        user: "test",
        signature: "6f2b4daa29668c1c264d7af7927d9d2a706768e35d92d76b461aedbaca14b6ad",
    },
];

/// Vector A's token exactly as REFERENCE.md prints it.
const VECTOR_A_TOKEN: &str = "prod-instance.us-east-1.rds.amazonaws.com:3306/?Action=connect&DBUser=peccy&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=akid%2F20240826%2Fus-east-1%2Frds-db%2Faws4_request&X-Amz-Date=20240826T220000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host&X-Amz-Signature=dd0cba843009474347af724090233265628ace491ea17ce3eb3da098b983ad89";

impl Vector {
    /// The token, written out from the documented layout (not by the signer).
    fn token(&self) -> String {
        format!(
            "{host}:{port}/?Action=connect&DBUser={user}&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={akid}%2F{day}%2F{region}%2Frds-db%2Faws4_request&X-Amz-Date={date}&X-Amz-Expires=900&X-Amz-SignedHeaders=host&X-Amz-Signature={sig}",
            host = self.host,
            port = self.port,
            user = self.user,
            akid = self.akid,
            day = &self.date[..8],
            region = self.region,
            date = self.date,
            sig = self.signature,
        )
    }

    fn signed_at(&self) -> SystemTime {
        sigv4::parse_amz_date(self.date).expect("vector date")
    }

    fn expectation(&self) -> RdsExpectation<'static> {
        RdsExpectation {
            access_key_id: self.akid,
            secret: self.secret,
            host: self.host,
            port: self.port,
            region: self.region,
            session_token: None,
            user: self.user,
        }
    }
}

#[test]
fn sigv4_signer_reproduces_the_sdk_vectors() {
    assert_eq!(
        VECTORS[0].token(),
        VECTOR_A_TOKEN,
        "the layout helper itself"
    );
    for v in &VECTORS {
        let signer = RdsSigner {
            access_key_id: v.akid.into(),
            secret_access_key: v.secret.into(),
            session_token: None,
            region: v.region.into(),
        };
        assert_eq!(
            signer.token(v.host, v.port, v.user, v.signed_at()),
            v.token(),
            "vector for {}",
            v.host
        );
    }
}

#[test]
fn sigv4_verifier_accepts_the_sdk_vectors_within_their_15_minutes() {
    for v in &VECTORS {
        for after in [0, 60, 900] {
            let now = v.signed_at() + Duration::from_secs(after);
            assert_eq!(
                sigv4::verify_rds_token(&v.token(), &v.expectation(), now),
                Ok(()),
                "{} at +{after}s",
                v.host
            );
        }
        let late = v.signed_at() + Duration::from_secs(901);
        let err = sigv4::verify_rds_token(&v.token(), &v.expectation(), late).unwrap_err();
        assert!(err.contains("expired"), "{err}");
    }
}

#[test]
fn sigv4_verifier_rejects_every_one_character_change() {
    for v in &VECTORS {
        let token = v.token();
        let now = v.signed_at() + Duration::from_secs(60);
        let mut tried = 0;
        for i in 0..token.len() {
            let original = token.as_bytes()[i];
            let replacements = [
                if original == b'Q' { b'R' } else { b'Q' },
                if original == b'7' { b'8' } else { b'7' },
            ];
            let mut variants: Vec<String> = replacements
                .iter()
                .map(|&r| {
                    let mut b = token.clone().into_bytes();
                    b[i] = r;
                    String::from_utf8(b).expect("ASCII")
                })
                .collect();
            variants.push(format!("{}{}", &token[..i], &token[i + 1..]));
            for changed in variants {
                tried += 1;
                assert!(
                    sigv4::verify_rds_token(&changed, &v.expectation(), now).is_err(),
                    "accepted a changed token: {changed}"
                );
            }
        }
        assert_eq!(tried, token.len() * 3);
    }
}

#[test]
fn sigv4_verifier_checks_time_endpoint_user_key_region_and_session_token() {
    let creds = AwsCredentials::generate();
    let signer = creds.signer("eu-west-1");
    let (host, port, user) = ("mydb.abc123.eu-west-1.rds.amazonaws.com", 5432, "app");
    let now = SystemTime::now();
    let expect = RdsExpectation {
        access_key_id: &creds.access_key_id,
        secret: &creds.secret_access_key,
        host,
        port,
        region: "eu-west-1",
        session_token: Some(&creds.session_token),
        user,
    };
    let good = signer.token(host, port, user, now);
    assert_eq!(sigv4::verify_rds_token(&good, &expect, now), Ok(()));
    assert!(
        good.contains("X-Amz-Security-Token="),
        "the session token is in the token"
    );

    let fails = |token: &str, expect: &RdsExpectation, want: &str| {
        let err = sigv4::verify_rds_token(token, expect, now).expect_err(want);
        assert!(err.contains(want), "wanted '{want}', got '{err}'");
        for secret in [&creds.secret_access_key, &creds.session_token] {
            assert!(!err.contains(secret.as_str()), "a secret in '{err}'");
        }
    };
    let old = signer.token(host, port, user, now - Duration::from_secs(901));
    fails(&old, &expect, "expired");
    let future = signer.token(host, port, user, now + Duration::from_secs(600));
    fails(&future, &expect, "future");
    let long = signer.token_with_expires(host, port, user, now, 901);
    fails(&long, &expect, "X-Amz-Expires is 901");
    let elsewhere = signer.token("other.abc123.eu-west-1.rds.amazonaws.com", port, user, now);
    fails(&elsewhere, &expect, "signed for other.");
    let other_port = signer.token(host, 5433, user, now);
    fails(&other_port, &expect, "signed for");
    fails(
        &good,
        &RdsExpectation {
            user: "admin",
            ..expect
        },
        "DBUser is 'app'",
    );
    fails(
        &good,
        &RdsExpectation {
            access_key_id: "ASIAOTHER",
            ..expect
        },
        "access key",
    );
    fails(
        &good,
        &RdsExpectation {
            secret: "wrong",
            ..expect
        },
        "signature mismatch",
    );
    fails(
        &good,
        &RdsExpectation {
            region: "us-east-1",
            ..expect
        },
        "region",
    );
    fails(
        &good,
        &RdsExpectation {
            session_token: None,
            ..expect
        },
        "X-Amz-Security-Token",
    );
    fails(
        &good,
        &RdsExpectation {
            session_token: Some("other"),
            ..expect
        },
        "X-Amz-Security-Token",
    );
    let unsessioned = RdsSigner {
        session_token: None,
        ..signer.clone()
    }
    .token(host, port, user, now);
    fails(&unsessioned, &expect, "no X-Amz-Security-Token");
    fails("not a token", &expect, "host:port");
}

/// `get-vanilla` and `post-x-www-form-urlencoded` from the AWS SigV4 test suite.
#[test]
fn sigv4_header_signatures_match_the_aws_test_suite() {
    let (akid, secret) = ("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY");
    let at = sigv4::parse_amz_date("20150830T123600Z").unwrap();
    let h = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    };

    let mut get_headers = h(&[
        ("Host", "example.amazonaws.com"),
        ("X-Amz-Date", "20150830T123600Z"),
    ]);
    let get = sigv4::SignedRequest {
        method: "GET",
        path: "/",
        query: "",
        headers: &get_headers,
        body: b"",
    };
    let auth = sigv4::authorization_header(
        &get,
        &["host", "x-amz-date"],
        akid,
        secret,
        ("us-east-1", "service"),
        at,
    )
    .unwrap();
    assert_eq!(auth, "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31");
    get_headers.push(("Authorization".into(), auth));
    let get = sigv4::SignedRequest {
        method: "GET",
        path: "/",
        query: "",
        headers: &get_headers,
        body: b"",
    };
    let named = sigv4::verify_header_signature(&get, akid, secret, at).expect("valid");
    assert_eq!(
        (named.region.as_str(), named.service.as_str()),
        ("us-east-1", "service")
    );

    let post_headers = h(&[
        ("Content-Type", "application/x-www-form-urlencoded"),
        ("Host", "example.amazonaws.com"),
        ("Content-Length", "13"),
        ("X-Amz-Date", "20150830T123600Z"),
        ("x-amz-content-sha256", "9095672bbd1f56dfc5b65f3e153adc8731a4a654192329106275f4c7b24d0b6e"),
        ("Authorization", "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=content-length;content-type;host;x-amz-content-sha256;x-amz-date, Signature=d3875051da38690788ef43de4db0d8f280229d82040bfac253562e56c3f20e0b"),
    ]);
    let post = sigv4::SignedRequest {
        method: "POST",
        path: "/",
        query: "",
        headers: &post_headers,
        body: b"Param1=value1",
    };
    assert!(sigv4::verify_header_signature(&post, akid, secret, at).is_ok());
    let err = sigv4::verify_header_signature(&post, akid, "wrong", at).unwrap_err();
    assert_eq!(err, "signature mismatch");
    let late = at + Duration::from_secs(3600);
    assert!(sigv4::verify_header_signature(&post, akid, secret, late).is_err());
}

#[test]
fn dates_round_trip() {
    for (amz, iso) in [
        ("19700101T000000Z", "1970-01-01T00:00:00Z"),
        ("20000229T235959Z", "2000-02-29T23:59:59Z"),
        ("20240826T220000Z", "2024-08-26T22:00:00Z"),
        ("21000301T000000Z", "2100-03-01T00:00:00Z"),
    ] {
        let t = sigv4::parse_amz_date(amz).unwrap();
        assert_eq!(sigv4::amz_date(t), amz);
        assert_eq!(sigv4::iso8601(t), iso);
    }
    assert_eq!(
        sigv4::parse_amz_date("20240826T220000Z")
            .unwrap()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
        1_724_709_600
    );
    for bad in [
        "20230229T000000Z",
        "20241301T000000Z",
        "2024082T220000Z",
        "20240826 220000Z",
        "2024082+T220000Z",
    ] {
        assert!(sigv4::parse_amz_date(bad).is_err(), "{bad}");
    }
}

// --- AWS credential endpoints -------------------------------------------------------

#[test]
fn ecs_serves_credentials_to_the_right_authorization_only() {
    let ecs = FakeEcs::start("/v2/credentials/task-1", Some("Bearer ecs-auth-token"));
    assert_eq!(
        ecs.full_uri(),
        format!("http://127.0.0.1:{}/v2/credentials/task-1", ecs.port())
    );
    let creds = ecs.credentials();

    let ok = http(
        ecs.port(),
        "GET",
        "/v2/credentials/task-1",
        &[("Authorization", "Bearer ecs-auth-token")],
        "",
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
    let json = ok.json();
    assert_eq!(json["AccessKeyId"], creds.access_key_id.as_str());
    assert_eq!(json["SecretAccessKey"], creds.secret_access_key.as_str());
    assert_eq!(json["Token"], creds.session_token.as_str());
    assert_about_an_hour_from_now(json["Expiration"].as_str().unwrap());
    assert!(creds.access_key_id.starts_with("ASIA") && creds.access_key_id.len() == 20);

    for auth in [None, Some("Bearer wrong")] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        let refused = http(ecs.port(), "GET", "/v2/credentials/task-1", &headers, "");
        assert_eq!(refused.status, 401, "{auth:?}");
    }
    assert_eq!(http(ecs.port(), "GET", "/other", &[], "").status, 404);

    let fresh = ecs.rotate();
    assert_ne!(fresh, creds);
    ecs.set_lifetime(Duration::from_secs(120));
    let json = http(
        ecs.port(),
        "GET",
        "/v2/credentials/task-1",
        &[("Authorization", "Bearer ecs-auth-token")],
        "",
    )
    .json();
    assert_eq!(json["AccessKeyId"], fresh.access_key_id.as_str());
    let left = parse_iso(json["Expiration"].as_str().unwrap())
        .duration_since(SystemTime::now())
        .unwrap();
    assert!(left <= Duration::from_secs(120), "{left:?}");

    let log = ecs.requests();
    assert_eq!(log.len(), 5);
    assert_eq!(
        (log[0].method.as_str(), log[0].path.as_str()),
        ("GET", "/v2/credentials/task-1")
    );
    assert_eq!(
        log[0].header("authorization"),
        Some("Bearer ecs-auth-token")
    );
    assert_eq!(log[1].header("Authorization"), None);
    assert!(!format!("{creds:?}").contains(&creds.secret_access_key));

    let open = FakeEcs::start("/creds", None);
    assert_eq!(http(open.port(), "GET", "/creds", &[], "").status, 200);
}

#[test]
fn imds_wants_a_session_token_for_everything() {
    let imds = FakeImds::start();
    let creds_path = format!("/latest/meta-data/iam/security-credentials/{}", imds.role());

    assert_eq!(
        http(imds.port(), "PUT", "/latest/api/token", &[], "").status,
        400
    );
    assert_eq!(
        http(
            imds.port(),
            "PUT",
            "/latest/api/token",
            &[("x-aws-ec2-metadata-token-ttl-seconds", "0")],
            ""
        )
        .status,
        400
    );
    let token = http(
        imds.port(),
        "PUT",
        "/latest/api/token",
        &[("X-aws-ec2-metadata-token-ttl-seconds", "21600")],
        "",
    );
    assert_eq!(token.status, 200);
    assert_eq!(
        token.header("x-aws-ec2-metadata-token-ttl-seconds"),
        Some("21600")
    );
    let session = token.body;
    assert_eq!(imds.issued_tokens(), vec![session.clone()]);

    for headers in [vec![], vec![("x-aws-ec2-metadata-token", "forged")]] {
        let r = http(
            imds.port(),
            "GET",
            "/latest/meta-data/iam/security-credentials/",
            &headers,
            "",
        );
        assert_eq!(r.status, 401);
        assert_eq!(
            http(imds.port(), "GET", &creds_path, &headers, "").status,
            401
        );
    }
    let with = [("x-aws-ec2-metadata-token", session.as_str())];
    let role = http(
        imds.port(),
        "GET",
        "/latest/meta-data/iam/security-credentials/",
        &with,
        "",
    );
    assert_eq!(
        (role.status, role.body.as_str()),
        (200, "keyhole-test-role")
    );
    let json = http(imds.port(), "GET", &creds_path, &with, "").json();
    let creds = imds.credentials();
    assert_eq!(json["Code"], "Success");
    assert_eq!(json["Type"], "AWS-HMAC");
    assert_eq!(json["AccessKeyId"], creds.access_key_id.as_str());
    assert_eq!(json["SecretAccessKey"], creds.secret_access_key.as_str());
    assert_eq!(json["Token"], creds.session_token.as_str());
    assert_about_an_hour_from_now(json["Expiration"].as_str().unwrap());
    parse_iso(json["LastUpdated"].as_str().unwrap());
    assert_eq!(
        http(
            imds.port(),
            "GET",
            "/latest/meta-data/iam/security-credentials/other",
            &with,
            ""
        )
        .status,
        404
    );
    let region = http(
        imds.port(),
        "GET",
        "/latest/meta-data/placement/region",
        &with,
        "",
    );
    assert_eq!(region.body, imds.region());
}

#[test]
fn sts_assumes_roles_by_the_contract() {
    let sts = FakeSts::start();
    let creds = sts.credentials();
    let role = sts.role_arn();
    let xml_form = [("Content-Type", "application/x-www-form-urlencoded")];

    let body = form(&[
        ("Action", "AssumeRoleWithWebIdentity"),
        ("Version", "2011-06-15"),
        ("RoleArn", &role),
        ("RoleSessionName", "keyhole-session"),
        ("WebIdentityToken", sts.web_identity_token()),
    ]);
    let ok = http(sts.port(), "POST", "/", &xml_form, &body);
    assert_eq!(ok.status, 200, "{}", ok.body);
    for part in [
        "<AssumeRoleWithWebIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">",
        "<AssumeRoleWithWebIdentityResult>",
        &format!("<AccessKeyId>{}</AccessKeyId>", creds.access_key_id),
        &format!(
            "<SecretAccessKey>{}</SecretAccessKey>",
            creds.secret_access_key
        ),
        &format!("<SessionToken>{}</SessionToken>", creds.session_token),
        "<Arn>arn:aws:sts::123456789012:assumed-role/keyhole-test-role/keyhole-session</Arn>",
        "<Expiration>",
    ] {
        assert!(ok.body.contains(part), "no {part} in {}", ok.body);
    }
    assert_eq!(
        sts.requests()[0].form_param("RoleSessionName").as_deref(),
        Some("keyhole-session")
    );

    let dir = support::scratch_dir("keyhole-sts-");
    let file = sts.write_web_identity_token_file(dir.path());
    assert_eq!(
        std::fs::read_to_string(file).unwrap(),
        sts.web_identity_token()
    );

    let wrong_token = body.replace(&sigv4::uri_encode(sts.web_identity_token()), "forged");
    let refused = http(sts.port(), "POST", "/", &xml_form, &wrong_token);
    assert_eq!(refused.status, 400);
    assert!(
        refused.body.contains("<Code>InvalidIdentityToken</Code>"),
        "{}",
        refused.body
    );
    let no_session = form(&[
        ("Action", "AssumeRoleWithWebIdentity"),
        ("RoleArn", &role),
        ("WebIdentityToken", sts.web_identity_token()),
    ]);
    let refused = http(sts.port(), "POST", "/", &xml_form, &no_session);
    assert_eq!(refused.status, 400);
    assert!(
        refused.body.contains("<Code>MissingParameter</Code>"),
        "{}",
        refused.body
    );
    let refused = http(
        sts.port(),
        "POST",
        "/",
        &xml_form,
        "Action=GetCallerIdentity",
    );
    assert!(
        refused.status == 400 && refused.body.contains("InvalidAction"),
        "{}",
        refused.body
    );

    // AssumeRole, first unsigned and accepted, then with a signature required.
    let assume = form(&[
        ("Action", "AssumeRole"),
        ("RoleArn", &role),
        ("RoleSessionName", "s1"),
    ]);
    let ok = http(sts.port(), "POST", "/", &xml_form, &assume);
    assert!(
        ok.status == 200 && ok.body.contains("<AssumeRoleResult>"),
        "{}",
        ok.body
    );

    let source = AwsCredentials::generate();
    sts.require_signature_from(&source.access_key_id, &source.secret_access_key);
    let refused = http(sts.port(), "POST", "/", &xml_form, &assume);
    assert_eq!(refused.status, 403);
    assert!(
        refused.body.contains("MissingAuthenticationToken"),
        "{}",
        refused.body
    );

    let signed_post = |akid: &str, secret: &str| {
        let host = format!("127.0.0.1:{}", sts.port());
        let date = sigv4::amz_date(SystemTime::now());
        let mut headers: Vec<(String, String)> = vec![
            (
                "Content-Type".into(),
                "application/x-www-form-urlencoded; charset=utf-8".into(),
            ),
            ("Host".into(), host),
            ("X-Amz-Date".into(), date),
        ];
        let req = sigv4::SignedRequest {
            method: "POST",
            path: "/",
            query: "",
            headers: &headers,
            body: assume.as_bytes(),
        };
        let auth = sigv4::authorization_header(
            &req,
            &["content-type", "host", "x-amz-date"],
            akid,
            secret,
            ("us-east-1", "sts"),
            SystemTime::now(),
        )
        .unwrap();
        headers.push(("Authorization".into(), auth));
        let borrowed: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        http(sts.port(), "POST", "/", &borrowed, &assume)
    };
    let ok = signed_post(&source.access_key_id, &source.secret_access_key);
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert!(ok.body.contains(&format!(
        "<AccessKeyId>{}</AccessKeyId>",
        creds.access_key_id
    )));
    let refused = signed_post(&source.access_key_id, "wrong-secret");
    assert!(
        refused.status == 403 && refused.body.contains("SignatureDoesNotMatch"),
        "{}",
        refused.body
    );
    let refused = signed_post("ASIAOTHERKEY", &source.secret_access_key);
    assert!(
        refused.status == 403 && refused.body.contains("InvalidClientTokenId"),
        "{}",
        refused.body
    );
}

// --- Google -------------------------------------------------------------------------------

#[test]
fn gcp_metadata_wants_the_flavor_header() {
    let md = FakeGcpMetadata::start();
    let path = "/computeMetadata/v1/instance/service-accounts/default/token";
    let refused = http(md.port(), "GET", path, &[], "");
    assert_eq!(refused.status, 403);
    assert_eq!(refused.header("Metadata-Flavor"), Some("Google"));

    let flavor = [("Metadata-Flavor", "Google")];
    let ok = http(md.port(), "GET", path, &flavor, "");
    assert_eq!(ok.status, 200);
    assert_eq!(ok.header("metadata-flavor"), Some("Google"));
    let json = ok.json();
    assert_eq!(json["access_token"], md.access_token().as_str());
    assert!(md.access_token().starts_with("ya29."));
    assert_eq!(json["expires_in"], 3599);
    assert_eq!(json["token_type"], "Bearer");

    let scoped = format!("{path}?scopes={}", sigv4::uri_encode(SQL_LOGIN_SCOPE));
    assert_eq!(http(md.port(), "GET", &scoped, &flavor, "").status, 200);
    assert_eq!(
        md.scopes_requested(),
        vec![None, None, Some(SQL_LOGIN_SCOPE.to_owned())]
    );

    let email = http(
        md.port(),
        "GET",
        "/computeMetadata/v1/instance/service-accounts/default/email",
        &flavor,
        "",
    );
    assert_eq!(email.body, md.email());
    let project = http(
        md.port(),
        "GET",
        "/computeMetadata/v1/project/project-id",
        &flavor,
        "",
    );
    assert_eq!(project.body, md.project_id());
    assert_eq!(md.host(), format!("127.0.0.1:{}", md.port()));

    let old = md.access_token();
    let fresh = md.rotate();
    md.set_expires_in(60);
    let json = http(md.port(), "GET", path, &flavor, "").json();
    assert_ne!(old, fresh);
    assert_eq!(
        (json["access_token"].as_str(), json["expires_in"].as_u64()),
        (Some(fresh.as_str()), Some(60))
    );
}

#[test]
fn oauth_exchanges_a_ring_signed_jwt_and_a_refresh_token() {
    let oauth = FakeOAuth::start();
    let key = oauth.key();
    assert_eq!(
        key.ring_public_key(),
        key.public_key_der,
        "openssl's PKCS#1 DER is ring's"
    );
    let url = oauth.token_url();
    let now = SystemTime::now();
    let form_type = [("Content-Type", "application/x-www-form-urlencoded")];
    let exchange = |assertion: &str| {
        http(
            oauth.port(),
            "POST",
            "/token",
            &form_type,
            &form(&[("grant_type", JWT_BEARER), ("assertion", assertion)]),
        )
    };

    let scope = format!("https://www.googleapis.com/auth/cloud-platform {SQL_LOGIN_SCOPE}");
    let good = key.assertion(&url, &scope, now);
    assert!(verify_assertion(&good, key, &url, now).is_ok());
    let ok = exchange(&good);
    assert_eq!(ok.status, 200, "{}", ok.body);
    let json = ok.json();
    assert_eq!(json["access_token"], oauth.access_token().as_str());
    assert_eq!(json["token_type"], "Bearer");
    assert_eq!(json["expires_in"], 3599);

    let other_key = ServiceAccountKey::generate(&key.client_email);
    let iat = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let cases = [
        (key.assertion("https://oauth2.googleapis.com/token", SQL_LOGIN_SCOPE, now), "aud"),
        (key.assertion(&url, "https://www.googleapis.com/auth/cloud-platform", now), "scope"),
        (key.assertion(&url, SQL_LOGIN_SCOPE, now - Duration::from_secs(7200)), "expired"),
        (key.assertion(&url, SQL_LOGIN_SCOPE, now + Duration::from_secs(3600)), "future"),
        (
            ServiceAccountKey { private_key_id: key.private_key_id.clone(), ..other_key.clone() }
                .assertion(&url, SQL_LOGIN_SCOPE, now),
            "signature",
        ),
        (
            key.sign_jwt(&serde_json::json!({"iss": "someone@else.iam.gserviceaccount.com", "scope": SQL_LOGIN_SCOPE, "aud": url, "iat": iat, "exp": iat + 3600})),
            "iss",
        ),
        (
            key.sign_jwt(&serde_json::json!({"iss": key.client_email, "scope": SQL_LOGIN_SCOPE, "aud": url, "iat": iat, "exp": iat + 7200})),
            "at most an hour",
        ),
        (format!("{}x", &good[..good.len() - 2]), "signature"),
        ("a.b".to_owned(), "three parts"),
    ];
    for (assertion, why) in &cases {
        let refused = exchange(assertion);
        assert_eq!(refused.status, 400, "{why}: {}", refused.body);
        let json = refused.json();
        assert_eq!(json["error"], "invalid_grant", "{why}");
        let text = json["error_description"].as_str().unwrap();
        assert!(text.contains(why), "wanted {why}, got {text}");
    }

    let refresh = |id: &str, secret: &str, token: &str| {
        http(
            oauth.port(),
            "POST",
            "/token",
            &form_type,
            &form(&[
                ("grant_type", "refresh_token"),
                ("client_id", id),
                ("client_secret", secret),
                ("refresh_token", token),
            ]),
        )
    };
    let ok = refresh(
        oauth.client_id(),
        oauth.client_secret(),
        oauth.refresh_token(),
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.json()["access_token"], oauth.access_token().as_str());
    for (id, secret, token) in [
        (oauth.client_id(), "wrong", oauth.refresh_token()),
        ("wrong", oauth.client_secret(), oauth.refresh_token()),
        (oauth.client_id(), oauth.client_secret(), "wrong"),
    ] {
        let refused = refresh(id, secret, token);
        assert_eq!(
            (refused.status, refused.json()["error"].as_str()),
            (400, Some("invalid_grant"))
        );
    }
    let basic = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("{}:{}", oauth.client_id(), oauth.client_secret()),
    );
    let ok = http(
        oauth.port(),
        "POST",
        "/token",
        &[("Authorization", &format!("Basic {basic}")), form_type[0]],
        &form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", oauth.refresh_token()),
        ]),
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
    let odd = http(
        oauth.port(),
        "POST",
        "/token",
        &form_type,
        "grant_type=password",
    );
    assert_eq!(odd.json()["error"], "unsupported_grant_type");

    let dir = support::scratch_dir("keyhole-gcp-");
    let sa: Value = serde_json::from_str(
        &std::fs::read_to_string(oauth.write_service_account_json(dir.path())).unwrap(),
    )
    .unwrap();
    assert_eq!(sa["type"], "service_account");
    assert_eq!(sa["token_uri"], url.as_str());
    assert_eq!(sa["client_email"], key.client_email.as_str());
    assert_eq!(sa["private_key_id"], key.private_key_id.as_str());
    assert_eq!(sa["project_id"], "keyhole-test-project");
    assert!(sa["private_key"]
        .as_str()
        .unwrap()
        .starts_with("-----BEGIN PRIVATE KEY-----"));
    let adc: Value = serde_json::from_str(
        &std::fs::read_to_string(oauth.write_authorized_user_json(dir.path())).unwrap(),
    )
    .unwrap();
    assert_eq!(adc["type"], "authorized_user");
    assert_eq!(adc["token_uri"], url.as_str());
    assert_eq!(adc["client_id"], oauth.client_id());
    assert_eq!(adc["client_secret"], oauth.client_secret());
    assert_eq!(adc["refresh_token"], oauth.refresh_token());
    assert!(!format!("{key:?}").contains("PRIVATE"));
}

// --- failure modes ----------------------------------------------------------------------

#[test]
fn failure_modes_behave_and_switch_back() {
    let md = FakeGcpMetadata::start();
    let sts = FakeSts::start();
    let path = "/computeMetadata/v1/instance/service-accounts/default/token";
    let flavor = [("Metadata-Flavor", "Google")];

    md.set_mode(Mode::Status(500));
    let failed = http(md.port(), "GET", path, &flavor, "");
    assert_eq!(failed.status, 500);
    assert_eq!(failed.header("Metadata-Flavor"), Some("Google"));

    md.set_mode(Mode::Garbage);
    let garbage = http(md.port(), "GET", path, &flavor, "");
    assert_eq!(garbage.status, 200);
    assert!(
        serde_json::from_str::<Value>(&garbage.body).is_err(),
        "{}",
        garbage.body
    );
    sts.set_mode(Mode::Garbage);
    let garbage = http(
        sts.port(),
        "POST",
        "/",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        "Action=AssumeRole",
    );
    assert_eq!(garbage.status, 200);
    assert!(
        !garbage.body.trim_start().starts_with('<'),
        "{}",
        garbage.body
    );

    md.set_mode(Mode::Slow(Duration::from_millis(500)));
    let start = Instant::now();
    let slow = http(md.port(), "GET", path, &flavor, "");
    assert_eq!(slow.status, 200);
    assert!(start.elapsed() >= Duration::from_millis(500));

    md.set_mode(Mode::Down);
    let refused = TcpStream::connect(("127.0.0.1", md.port())).expect_err("nothing listens");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    md.set_mode(Mode::Down); // twice is fine

    md.set_mode(Mode::Normal);
    assert_eq!(md.mode(), Mode::Normal);
    let back = http(md.port(), "GET", path, &flavor, "");
    assert_eq!(back.status, 200);
    assert_eq!(back.json()["access_token"], md.access_token().as_str());
    assert_eq!(md.requests().len(), 4, "every answered request is logged");
    assert!(md.errors().is_empty(), "{:?}", md.errors());
}

// --- the fake RDS ---------------------------------------------------------------------------

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// TLS to the fake, trusting its CA and checking its endpoint name.
fn tls_to(fake: &FakeRds, tcp: TcpStream) -> TlsStream {
    tls_to_with_alpn(fake, tcp, None)
}

fn tls_to_with_alpn(fake: &FakeRds, tcp: TcpStream, alpn: Option<&[u8]>) -> TlsStream {
    let config = fake.pki().tls_client_config(alpn);
    let name = rustls::pki_types::ServerName::try_from(fake.endpoint().to_owned()).expect("name");
    let conn = rustls::ClientConnection::new(config, name).expect("client");
    rustls::StreamOwned::new(conn, tcp)
}

/// SSLRequest, TLS, StartupMessage for `user`: returns the session and the
/// authentication request code the fake sent.
fn pg_session(fake: &FakeRds, user: &str) -> (TlsStream, u32) {
    let mut tcp = TcpStream::connect(("127.0.0.1", fake.port())).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    tcp.write_all(&wire::SSL_REQUEST).unwrap();
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).unwrap();
    assert_eq!(answer[0], b'S');
    let mut tls = tls_to(fake, tcp);
    tls.write_all(&wire::startup_packet(
        196_608,
        &[("user", user), ("database", "postgres")],
    ))
    .unwrap();
    let (tag, body) = wire::read_message(&mut tls);
    assert_eq!(tag, b'R');
    (tls, u32::from_be_bytes(body[..4].try_into().unwrap()))
}

fn pg_password(tls: &mut TlsStream, password: &str) {
    let mut msg = vec![b'p'];
    msg.extend_from_slice(&((password.len() + 5) as u32).to_be_bytes());
    msg.extend_from_slice(password.as_bytes());
    msg.push(0);
    tls.write_all(&msg).unwrap();
}

#[test]
fn fake_rds_postgres_lets_a_good_token_through_and_refuses_others() {
    let cluster = PgCluster::shared();
    let creds = AwsCredentials::generate();
    let check = TokenCheck::aws_for(&creds, DEFAULT_ENDPOINT, 0, "us-east-1");
    assert!(!format!("{check:?}").contains(&creds.secret_access_key));
    let fake = FakeRds::postgres(cluster, check, PgAsk::Cleartext);
    assert!(fake.keyhole_target().starts_with(&format!(
        "postgres://127.0.0.1:{}?server-name={DEFAULT_ENDPOINT}&ca-file=",
        fake.port()
    )));
    let signer = creds.signer("us-east-1");

    let (mut good, code) = pg_session(&fake, TRUST_USER);
    assert_eq!(code, 3, "AuthenticationCleartextPassword");
    pg_password(
        &mut good,
        &signer.token(DEFAULT_ENDPOINT, fake.port(), TRUST_USER, SystemTime::now()),
    );
    wire::read_until_ready(&mut good);
    good.write_all(&wire::simple_query("SELECT 40 + 2"))
        .unwrap();
    let mut rows = Vec::new();
    loop {
        let (tag, body) = wire::read_message(&mut good);
        match tag {
            b'D' => rows.push(String::from_utf8_lossy(&body[6..]).into_owned()),
            b'E' => panic!("query failed: {}", wire::error_field(&body, 'M')),
            b'Z' => break,
            _ => {}
        }
    }
    assert_eq!(rows, ["42"]);

    let wrong = RdsSigner {
        secret_access_key: "not-the-secret".into(),
        ..signer.clone()
    };
    for token in [
        wrong.token(DEFAULT_ENDPOINT, fake.port(), TRUST_USER, SystemTime::now()),
        signer.token(DEFAULT_ENDPOINT, 5432, TRUST_USER, SystemTime::now()),
        signer.token(DEFAULT_ENDPOINT, fake.port(), "postgres", SystemTime::now()),
    ] {
        let (mut bad, _) = pg_session(&fake, TRUST_USER);
        pg_password(&mut bad, &token);
        let (tag, body) = wire::read_message(&mut bad);
        assert_eq!(tag, b'E');
        assert_eq!(wire::error_field(&body, 'S'), "FATAL");
        assert_eq!(wire::error_field(&body, 'C'), "28P01");
        assert_eq!(
            wire::error_field(&body, 'M'),
            format!("PAM authentication failed for user \"{TRUST_USER}\"")
        );
    }
    let outcomes = fake.wait_for_outcomes(4, Duration::from_secs(10));
    let reasons: Vec<_> = outcomes.iter().map(|o| o.result.clone()).collect();
    assert_eq!(reasons[0], Ok(()));
    assert_eq!(reasons[1], Err("signature mismatch".to_owned()));
    assert!(
        reasons[2].as_ref().unwrap_err().contains(":5432, expected"),
        "{reasons:?}"
    );
    assert!(
        reasons[3].as_ref().unwrap_err().contains("DBUser"),
        "{reasons:?}"
    );
    assert!(outcomes.iter().all(|o| o.user == TRUST_USER));
    let shown = format!("{outcomes:?}");
    assert!(!shown.contains(&creds.secret_access_key) && !shown.contains(&creds.session_token));

    // A user without rds_iam: RDS asks for md5, and no answer gets in.
    let gcp = TokenCheck::Gcp {
        accepted: vec!["ya29.good".into()],
    };
    let md5 = FakeRds::postgres(cluster, gcp, PgAsk::Md5);
    let (mut session, code) = pg_session(&md5, TRUST_USER);
    assert_eq!(code, 5, "AuthenticationMD5Password");
    pg_password(&mut session, "ya29.good");
    let (tag, body) = wire::read_message(&mut session);
    assert_eq!(
        (tag, wire::error_field(&body, 'C').as_str()),
        (b'E', "28P01")
    );
    assert!(md5.wait_for_outcomes(1, Duration::from_secs(10))[0]
        .result
        .as_ref()
        .unwrap_err()
        .contains("Md5"));
}

#[test]
fn fake_rds_postgres_takes_direct_tls_and_forwards_cancel_requests() {
    let cluster = PgCluster::shared();
    let creds = AwsCredentials::generate();
    let check = TokenCheck::aws_for(&creds, DEFAULT_ENDPOINT, 0, "us-east-1");
    let fake = FakeRds::postgres(cluster, check, PgAsk::Cleartext);
    let signer = creds.signer("us-east-1");

    // PG17-style direct TLS, ALPN "postgresql".
    let tcp = TcpStream::connect(("127.0.0.1", fake.port())).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut session = tls_to_with_alpn(&fake, tcp, Some(b"postgresql"));
    session
        .write_all(&wire::startup_packet(
            196_608,
            &[("user", TRUST_USER), ("database", "postgres")],
        ))
        .unwrap();
    let (tag, body) = wire::read_message(&mut session);
    assert_eq!((tag, &body[..]), (b'R', &[0, 0, 0, 3][..]));
    assert_eq!(session.conn.alpn_protocol(), Some(&b"postgresql"[..]));
    pg_password(
        &mut session,
        &signer.token(DEFAULT_ENDPOINT, fake.port(), TRUST_USER, SystemTime::now()),
    );
    let (_, key) = wire::read_until_ready(&mut session);

    // A long query, cancelled through the fake (inside TLS, as keyhole does).
    session
        .write_all(&wire::simple_query("SELECT pg_sleep(60)"))
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut tcp = TcpStream::connect(("127.0.0.1", fake.port())).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    tcp.write_all(&wire::SSL_REQUEST).unwrap();
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).unwrap();
    let mut cancel = tls_to(&fake, tcp);
    cancel.write_all(&wire::cancel_request(&key)).unwrap();
    let mut rest = Vec::new();
    let _ = cancel.read_to_end(&mut rest);
    loop {
        let (tag, body) = wire::read_message(&mut session);
        if tag == b'E' {
            assert_eq!(wire::error_field(&body, 'C'), "57014", "query_canceled");
            break;
        }
        assert_ne!(tag, b'Z', "the query finished uncancelled");
    }
    assert_eq!(fake.outcomes().len(), 1, "a cancel request is not a login");
    assert!(fake.errors().is_empty(), "{:?}", fake.errors());
}

// MySQL by hand: just enough of the client side of the connection phase.

fn write_packet(stream: &mut impl Write, seq: u8, payload: &[u8]) {
    let mut packet = (payload.len() as u32).to_le_bytes()[..3].to_vec();
    packet.push(seq);
    packet.extend_from_slice(payload);
    stream.write_all(&packet).expect("write a packet");
}

/// Greeting, SSLRequest, TLS, HandshakeResponse41 for `user`: returns the
/// session, the greeting and the AuthSwitchRequest payload.
fn mysql_session(fake: &FakeRds, user: &str) -> (TlsStream, Vec<u8>, Vec<u8>) {
    use keyhole::protocol::mysql::caps;
    let mut tcp = TcpStream::connect(("127.0.0.1", fake.port())).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let (seq, greeting) = read_packet(&mut tcp);
    assert_eq!(seq, 0);
    let flags = caps::PROTOCOL_41
        | caps::SECURE_CONNECTION
        | caps::PLUGIN_AUTH
        | caps::CONNECT_WITH_DB
        | caps::SSL
        | caps::TRANSACTIONS;
    let mut head = flags.to_le_bytes().to_vec();
    head.extend_from_slice(&(16u32 << 20).to_le_bytes());
    head.push(45); // utf8mb4_general_ci
    head.extend_from_slice(&[0u8; 23]);
    write_packet(&mut tcp, 1, &head);
    let mut tls = tls_to(fake, tcp);
    let mut response = head;
    response.extend_from_slice(user.as_bytes());
    response.extend_from_slice(&[0, 0]); // user NUL, empty auth response
    response.extend_from_slice(DATABASE.as_bytes());
    response.push(0);
    response.extend_from_slice(b"mysql_native_password\0");
    write_packet(&mut tls, 2, &response);
    let (seq, switch) = read_packet(&mut tls);
    assert_eq!(seq, 3);
    (tls, greeting, switch)
}

#[test]
fn fake_rds_mysql_lets_a_good_token_through_and_refuses_others() {
    let real = MariaDb::shared();
    ensure_mysql_iam_user(real);
    ensure_mysql_iam_user(real); // idempotent
    let token = "ya29.a-good-access-token";
    let check = TokenCheck::Gcp {
        accepted: vec![token.to_owned()],
    };
    let fake = FakeRds::mysql(real, check.clone(), SwitchData::WithScramble);

    let (mut good, greeting, switch) = mysql_session(&fake, IAM_USER);
    let parsed = support::mariadb::parse_greeting(&greeting).expect("greeting");
    let real_greeting = support::mariadb::read_greeting(real.port()).expect("real greeting");
    assert_eq!(parsed.server_version, real_greeting.server_version);
    assert_eq!(parsed.auth_plugin.as_deref(), Some("mysql_native_password"));
    assert_ne!(parsed.capabilities & support::mariadb::CLIENT_SSL, 0);
    assert_eq!(&switch[..22], b"\xfemysql_clear_password\0");
    assert_eq!(switch.len(), 22 + 21, "scramble and NUL");
    write_packet(&mut good, 4, format!("{token}\0").as_bytes());
    let (seq, ok) = read_packet(&mut good);
    assert_eq!((seq, ok[0]), (5, 0x00), "OK with sequence id 5: {ok:?}");
    write_packet(&mut good, 0, b"\x03SELECT CURRENT_USER()");
    let mut packets = Vec::new();
    for _ in 0..5 {
        packets.push(read_packet(&mut good).1);
    }
    let row = &packets[3];
    assert_eq!(&row[1..], format!("{IAM_USER}@%").as_bytes(), "{packets:?}");

    let (mut bad, _, _) = mysql_session(&fake, IAM_USER);
    write_packet(&mut bad, 4, b"ya29.forged\0");
    let (seq, err) = read_packet(&mut bad);
    assert_eq!(seq, 5);
    let (code, state, message) = keyhole::protocol::mysql::parse_err(&err).expect("ERR");
    assert_eq!((code, state.as_str()), (1045, "28000"));
    assert_eq!(
        message,
        format!("Access denied for user '{IAM_USER}'@'127.0.0.1' (using password: YES)")
    );

    let outcomes = fake.wait_for_outcomes(2, Duration::from_secs(10));
    assert!(outcomes[0].is_ok() && !outcomes[1].is_ok(), "{outcomes:?}");
    assert!(!format!("{outcomes:?}").contains(token));

    // Aurora's AuthSwitchRequest carries no plugin data.
    let aurora = FakeRds::mysql(real, check, SwitchData::None);
    let (_, _, switch) = mysql_session(&aurora, IAM_USER);
    assert_eq!(switch, b"\xfemysql_clear_password\0");
}
