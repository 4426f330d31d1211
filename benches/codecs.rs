//! Micro-benchmarks of the startup codecs in `keyhole::protocol`: the
//! per-connection work keyhole does before the splice loop takes over, on
//! the bytes a real login exchanges.
//!
//! `cargo bench --bench codecs` runs them all; a filter such as
//! `cargo bench --bench codecs -- mysql/` runs a part. Each input is checked
//! once before it is timed, so `cargo bench --bench codecs -- --test` also
//! proves the fixtures decode as intended.

use std::hint::black_box;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

use keyhole::protocol::mysql as my;
use keyhole::protocol::postgres as pg;

// ---- PostgreSQL fixtures ------------------------------------------------

/// The client's user: a Google service account, as a user writes it.
const PG_CLIENT_USER: &str = "billing@orders-prod.iam.gserviceaccount.com";
/// The database user keyhole logs in as on the IAM path.
const PG_IAM_USER: &str = "billing@orders-prod.iam";

/// A StartupMessage shaped like libpq's: user, database, application name
/// and the settings drivers add.
fn pg_startup() -> Bytes {
    let params = [
        ("user", PG_CLIENT_USER),
        ("database", "orders"),
        ("application_name", "billing-worker"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO"),
        ("TimeZone", "UTC"),
        ("extra_float_digits", "2"),
    ];
    let mut out = BytesMut::new();
    out.put_u32(0);
    out.put_u32(pg::ProtocolVersion::V3_0.0);
    for (name, value) in params {
        out.put_slice(name.as_bytes());
        out.put_u8(0);
        out.put_slice(value.as_bytes());
        out.put_u8(0);
    }
    out.put_u8(0);
    let len = out.len() as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out.freeze()
}

fn decode_startup_message(raw: &[u8]) -> pg::StartupMessage {
    let mut buf = BytesMut::from(raw);
    match pg::decode_startup(&mut buf) {
        Ok(Some(pg::StartupPacket::Startup(msg))) => msg,
        other => panic!("the fixture is not a StartupMessage: {other:?}"),
    }
}

/// An RDS IAM token's shape and length: a presigned URL of about 1.3 KB.
fn iam_token() -> String {
    let session_token: String = (0..880)
        .map(|i| {
            char::from(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"[i % 62])
        })
        .collect();
    let signature: String = (0..64)
        .map(|i| char::from(b"0123456789abcdef"[(i * 7) % 16]))
        .collect();
    format!(
        "orders.cluster-example.eu-west-1.rds.amazonaws.com:5432/?Action=connect\
         &DBUser=billing&X-Amz-Algorithm=AWS4-HMAC-SHA256\
         &X-Amz-Credential=ASIAEXAMPLEEXAMPLE00%2F20250101%2Feu-west-1%2Frds-db%2Faws4_request\
         &X-Amz-Date=20250101T000000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host\
         &X-Amz-Security-Token={session_token}&X-Amz-Signature={signature}"
    )
}

fn put_pg_message(out: &mut BytesMut, tag: u8, body: &[u8]) {
    pg::Message {
        tag,
        body: Bytes::copy_from_slice(body),
    }
    .encode(out);
}

/// What a PostgreSQL 16 server sends after the password is accepted:
/// AuthenticationOk, its ParameterStatus messages, BackendKeyData and
/// ReadyForQuery.
fn pg_login_stream() -> Bytes {
    let mut out = BytesMut::new();
    put_pg_message(
        &mut out,
        pg::tag::AUTHENTICATION,
        &pg::auth::OK.to_be_bytes(),
    );
    let status = [
        ("application_name", "billing-worker"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("default_transaction_read_only", "off"),
        ("in_hot_standby", "off"),
        ("integer_datetimes", "on"),
        ("IntervalStyle", "postgres"),
        ("is_superuser", "off"),
        ("scram_iterations", "4096"),
        ("server_encoding", "UTF8"),
        ("server_version", "16.4"),
        ("session_authorization", PG_IAM_USER),
        ("standard_conforming_strings", "on"),
        ("TimeZone", "UTC"),
    ];
    for (name, value) in status {
        let mut body = Vec::new();
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
        put_pg_message(&mut out, b'S', &body);
    }
    let mut key = Vec::new();
    key.extend_from_slice(&48_213u32.to_be_bytes());
    key.extend_from_slice(&0x5eed_cafe_u32.to_be_bytes());
    put_pg_message(&mut out, pg::tag::BACKEND_KEY_DATA, &key);
    put_pg_message(&mut out, pg::tag::READY_FOR_QUERY, b"I");
    out.freeze()
}

/// What keyhole's driver does with the login's server messages: decode
/// each, read the ones it acts on, re-encode them all for the client.
fn relay_login(buf: &mut BytesMut) -> (BytesMut, Option<pg::CancelKey>) {
    let mut to_client = BytesMut::with_capacity(1024);
    let mut key = None;
    while let Some(msg) = pg::decode_message(buf, pg::MAX_STARTUP_PHASE_MESSAGE_LEN)
        .expect("the login stream decodes")
    {
        match msg.tag {
            pg::tag::AUTHENTICATION => {
                let code = pg::auth_code(&msg).expect("an authentication code");
                black_box(pg::auth_expects_reply(code));
            }
            pg::tag::BACKEND_KEY_DATA => key = pg::backend_key(&msg),
            _ => {}
        }
        msg.encode(&mut to_client);
        if msg.tag == pg::tag::READY_FOR_QUERY {
            break;
        }
    }
    (to_client, key)
}

/// A refusal keyhole renders itself.
const PG_ERROR_TEXT: &str = "keyhole could not get an IAM token for database user \
     \"billing@orders-prod.iam\": the metadata server did not answer within 5s; \
     check that the workload identity is bound to this service account";

fn postgres(c: &mut Criterion) {
    let startup = pg_startup();
    let parsed = decode_startup_message(&startup);
    assert_eq!(parsed.user, PG_CLIENT_USER);
    assert_eq!(parsed.database.as_deref(), Some("orders"));
    assert_eq!(parsed.application_name.as_deref(), Some("billing-worker"));
    let rewritten = parsed.with_user(PG_IAM_USER);
    assert_eq!(decode_startup_message(&rewritten.raw).user, PG_IAM_USER);

    let token = iam_token();
    let login = pg_login_stream();
    {
        let mut buf = BytesMut::from(&login[..]);
        let (relayed, key) = relay_login(&mut buf);
        assert_eq!(&relayed[..], &login[..], "the login relays byte for byte");
        assert!(buf.is_empty());
        assert_eq!(key.expect("BackendKeyData gives a key").pid(), 48_213);
    }
    let mut rendered = BytesMut::new();
    pg::encode_error_response(
        &mut rendered,
        pg::sqlstate::CANNOT_CONNECT_NOW,
        PG_ERROR_TEXT,
    );

    let mut g = c.benchmark_group("postgres");
    g.throughput(Throughput::Bytes(startup.len() as u64));
    g.bench_function("startup/parse", |b| {
        b.iter_batched(
            || BytesMut::from(&startup[..]),
            |mut buf| pg::decode_startup(black_box(&mut buf)),
            BatchSize::SmallInput,
        )
    });
    g.throughput(Throughput::Bytes(rewritten.raw.len() as u64));
    g.bench_function("startup/rewrite_user", |b| {
        b.iter(|| black_box(&parsed).with_user(black_box(PG_IAM_USER)))
    });
    g.throughput(Throughput::Bytes(6 + token.len() as u64));
    g.bench_function("password_message/encode", |b| {
        b.iter(|| {
            let token = black_box(token.as_str());
            let mut out = BytesMut::with_capacity(6 + token.len());
            pg::encode_password_message(&mut out, token);
            out
        })
    });
    g.throughput(Throughput::Bytes(login.len() as u64));
    g.bench_function("login/relay", |b| {
        b.iter_batched(
            || BytesMut::from(&login[..]),
            |mut buf| relay_login(black_box(&mut buf)),
            BatchSize::SmallInput,
        )
    });
    g.throughput(Throughput::Bytes(rendered.len() as u64));
    g.bench_function("error_response/encode", |b| {
        b.iter(|| {
            let mut out = BytesMut::new();
            pg::encode_error_response(
                &mut out,
                black_box(pg::sqlstate::CANNOT_CONNECT_NOW),
                black_box(PG_ERROR_TEXT),
            );
            out
        })
    });
    g.finish();
}

// ---- MySQL fixtures -----------------------------------------------------

const MY_CLIENT_USER: &str = "billing@orders-prod.iam.gserviceaccount.com";
const MY_IAM_USER: &str = "billing";
const CACHING_SHA2: &[u8] = b"caching_sha2_password";

/// A MySQL 8.0 HandshakeV10 payload offering TLS.
fn my_greeting() -> Bytes {
    let capabilities: u32 = 0xdfff_ffff;
    let mut p = BytesMut::new();
    p.put_u8(10);
    p.put_slice(b"8.0.39\0");
    p.put_u32_le(1_187); // connection id
    p.put_slice(b"\x1f\x4b\x2a\x63\x5d\x08\x31\x77"); // auth data, part 1
    p.put_u8(0);
    p.put_u16_le(capabilities as u16);
    p.put_u8(255); // utf8mb4_0900_ai_ci
    p.put_u16_le(0x0002); // SERVER_STATUS_AUTOCOMMIT
    p.put_u16_le((capabilities >> 16) as u16);
    p.put_u8(21);
    p.put_slice(&[0; 10]);
    p.put_slice(b"\x3c\x11\x6e\x05\x7a\x40\x19\x52\x2d\x66\x0b\x48\0"); // part 2
    p.put_slice(CACHING_SHA2);
    p.put_u8(0);
    p.freeze()
}

fn put_lenenc_str(out: &mut Vec<u8>, s: &[u8]) {
    assert!(s.len() < 251, "one-byte lengths only in these fixtures");
    out.push(s.len() as u8);
    out.extend_from_slice(s);
}

/// A HandshakeResponse41 payload shaped like the mysql client's: a
/// caching_sha2 scramble, a database, the plugin name and connection
/// attributes.
fn my_handshake_response() -> Bytes {
    let capabilities = my::caps::LONG_PASSWORD
        | my::caps::LONG_FLAG
        | my::caps::CONNECT_WITH_DB
        | my::caps::LOCAL_FILES
        | my::caps::PROTOCOL_41
        | my::caps::INTERACTIVE
        | my::caps::TRANSACTIONS
        | my::caps::SECURE_CONNECTION
        | my::caps::MULTI_STATEMENTS
        | my::caps::MULTI_RESULTS
        | my::caps::PS_MULTI_RESULTS
        | my::caps::PLUGIN_AUTH
        | my::caps::CONNECT_ATTRS
        | my::caps::PLUGIN_AUTH_LENENC_CLIENT_DATA
        | my::caps::SESSION_TRACK
        | my::caps::DEPRECATE_EOF;
    let mut p = Vec::new();
    p.extend_from_slice(&capabilities.to_le_bytes());
    p.extend_from_slice(&(16u32 << 20).to_le_bytes());
    p.push(255);
    p.extend_from_slice(&[0; 23]);
    p.extend_from_slice(MY_CLIENT_USER.as_bytes());
    p.push(0);
    let scramble: Vec<u8> = (0u8..32).map(|i| i.wrapping_mul(37) ^ 0xa5).collect();
    put_lenenc_str(&mut p, &scramble);
    p.extend_from_slice(b"orders\0");
    p.extend_from_slice(CACHING_SHA2);
    p.push(0);
    let mut attrs = Vec::new();
    for (k, v) in [
        ("_pid", "48213"),
        ("_platform", "x86_64"),
        ("_os", "Linux"),
        ("_client_name", "libmysql"),
        ("os_user", "billing"),
        ("_client_version", "8.0.39"),
        ("program_name", "mysql"),
    ] {
        put_lenenc_str(&mut attrs, k.as_bytes());
        put_lenenc_str(&mut attrs, v.as_bytes());
    }
    put_lenenc_str(&mut p, &attrs);
    Bytes::from(p)
}

/// What RDS and Cloud SQL send to take an IAM token.
const MY_AUTH_SWITCH: &[u8] = b"\xfemysql_clear_password\0";

const MY_ERROR_TEXT: &str = "keyhole could not get an IAM token for database user \
     \"billing\": the metadata server did not answer within 5s";

fn mysql(c: &mut Criterion) {
    let greeting = my_greeting();
    let parsed = my::parse_greeting(&greeting).expect("the greeting parses");
    assert_eq!(parsed.server_version, "8.0.39");
    assert_eq!(parsed.charset, 255);
    assert!(parsed.capabilities & my::caps::SSL != 0);
    assert_eq!(parsed.mariadb_capabilities, None);

    let response = my_handshake_response();
    match my::parse_client_hello(&response).expect("the response parses") {
        my::ClientHello::Response(hello) => {
            assert_eq!(hello.user, MY_CLIENT_USER);
            assert_eq!(hello.database.as_deref(), Some("orders"));
            assert_eq!(hello.plugin.as_deref(), Some("caching_sha2_password"));
        }
        other => panic!("the fixture is not a HandshakeResponse41: {other:?}"),
    }
    let rewritten = my::with_user(&response, MY_IAM_USER).expect("the response rewrites");
    match my::parse_client_hello(&rewritten).expect("the rewritten response parses") {
        my::ClientHello::Response(hello) => assert_eq!(hello.user, MY_IAM_USER),
        other => panic!("the rewrite is not a HandshakeResponse41: {other:?}"),
    }
    assert_eq!(
        my::auth_switch_plugin(MY_AUTH_SWITCH),
        Some(my::CLEAR_PASSWORD_PLUGIN)
    );
    let mut rendered = BytesMut::new();
    my::encode_err(
        &mut rendered,
        2,
        my::code::ACCESS_DENIED,
        "28000",
        MY_ERROR_TEXT,
    );
    assert_eq!(
        my::parse_err(&rendered[4..]).map(|(code, _, _)| code),
        Some(my::code::ACCESS_DENIED)
    );

    let mut g = c.benchmark_group("mysql");
    g.throughput(Throughput::Bytes(greeting.len() as u64));
    g.bench_function("greeting/parse", |b| {
        b.iter(|| my::parse_greeting(black_box(&greeting)))
    });
    g.throughput(Throughput::Bytes(response.len() as u64));
    g.bench_function("handshake_response/parse", |b| {
        b.iter(|| my::parse_client_hello(black_box(&response)))
    });
    g.throughput(Throughput::Bytes(rewritten.len() as u64));
    g.bench_function("handshake_response/rewrite_user", |b| {
        b.iter(|| my::with_user(black_box(&response), black_box(MY_IAM_USER)))
    });
    g.throughput(Throughput::Bytes(MY_AUTH_SWITCH.len() as u64));
    g.bench_function("auth_switch/parse", |b| {
        b.iter(|| my::auth_switch_plugin(black_box(MY_AUTH_SWITCH)))
    });
    g.throughput(Throughput::Bytes(rendered.len() as u64));
    g.bench_function("err/encode", |b| {
        b.iter(|| {
            let mut out = BytesMut::new();
            my::encode_err(
                &mut out,
                black_box(2),
                black_box(my::code::ACCESS_DENIED),
                black_box("28000"),
                black_box(MY_ERROR_TEXT),
            );
            out
        })
    });
    g.finish();
}

criterion_group! {
    name = codecs;
    // Nanosecond-scale functions settle fast: short windows keep the whole
    // run near half a minute.
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    targets = postgres, mysql
}
criterion_main!(codecs);
