//! Self-tests of the Cloud SQL fakes in `support::cloudsql`, without keyhole:
//! the fake SQL Admin API answered by a tiny HTTP client, and the server-side
//! proxies reached with tokio-rustls in front of real PostgreSQL and MariaDB
//! servers. If these fail, the keyhole tests built on the fakes cannot be
//! trusted.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use support::cloudsql::{
    api_request, cert_info_pem, cert_infos_pem, client_tls_config, connect_settings_path,
    create_mysql_iam_user, create_pg_iam_user, dial, generate_ephemeral_cert_path, pg_options,
    ApiMethod, Backend, CaMode, ClientKey, CloudSqlVerifier, Failure, FakeSqlAdmin, InstanceHandle,
    InstanceSpec, IpType, ServerIdentity, SERVER_PROXY_PORT,
};
use support::mariadb::{self, MariaDb, MariaDbOptions, NATIVE_PASS, NATIVE_USER};
use support::postgres::{PgCluster, SCRAM_PASS, SCRAM_USER, TRUST_USER};

/// One RSA key for the whole binary (openssl takes a moment per key).
fn key() -> &'static ClientKey {
    static KEY: OnceLock<ClientKey> = OnceLock::new();
    KEY.get_or_init(ClientKey::generate)
}

/// A cluster whose Unix socket lets the test users in, and one IAM user.
fn cluster() -> &'static PgCluster {
    static CLUSTER: OnceLock<PgCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let cluster = PgCluster::start(pg_options(&[PG_IAM_USER]));
        create_pg_iam_user(&cluster, PG_IAM_USER);
        cluster
    })
}

const PG_IAM_USER: &str = "keyhole-sa@keyhole-test-project.iam";

/// `connectSettings` for `instance`, which must answer 200.
fn settings(fake: &FakeSqlAdmin, instance: &InstanceHandle) -> Value {
    let (status, body) = api_request(
        &fake.url(),
        "GET",
        &connect_settings_path(instance.project(), instance.name()),
        Some(&fake.admin_token()),
        None,
    )
    .expect("connectSettings");
    assert_eq!(status, 200, "connectSettings: {body}");
    body
}

/// `generateEphemeralCert` for `instance` with `key()`: (status, body).
fn generate(
    fake: &FakeSqlAdmin,
    instance: &InstanceHandle,
    public_key_pem: &str,
    access_token: Option<&str>,
) -> (u16, Value) {
    let mut body = json!({ "public_key": public_key_pem });
    if let Some(token) = access_token {
        body["access_token"] = json!(token);
    }
    api_request(
        &fake.url(),
        "POST",
        &generate_ephemeral_cert_path(instance.project(), instance.name()),
        Some(&fake.admin_token()),
        Some(&body),
    )
    .expect("generateEphemeralCert")
}

/// An ephemeral certificate PEM for `key()`, which must be issued.
fn ephemeral_cert(fake: &FakeSqlAdmin, instance: &InstanceHandle, token: Option<&str>) -> String {
    let (status, body) = generate(fake, instance, &key().public_key_pem, token);
    assert_eq!(status, 200, "generateEphemeralCert: {body}");
    body["ephemeralCert"]["cert"]
        .as_str()
        .expect("ephemeralCert.cert")
        .to_owned()
}

/// A client configuration with `cert` (and `key()`), checking the server as
/// the Go connector does for `instance`.
fn config(instance: &InstanceHandle, cert: Option<&str>) -> Arc<rustls::ClientConfig> {
    client_tls_config(
        cert.map(|c| (c, key().private_key_pem.as_str())),
        instance.server_ca_pem(),
        instance.identity(),
    )
}

fn public_addr(instance: &InstanceHandle) -> SocketAddr {
    instance.addr(IpType::Public).expect("a public address")
}

/// Asserts Google's error body with these fields.
fn assert_google_error(body: &Value, code: u16, status: &str, reason: &str) {
    let error = &body["error"];
    assert_eq!(error["code"], code, "{body}");
    assert_eq!(error["status"], status, "{body}");
    assert_eq!(error["errors"][0]["reason"], reason, "{body}");
    assert_eq!(error["errors"][0]["domain"], "global", "{body}");
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
}

/// Reads until the peer fails the connection or closes it; Err(text) if it
/// failed, Ok(bytes) if it closed.
async fn read_to_close<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Vec<u8>, String> {
    let mut all = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut all)).await;
    match read {
        Ok(Ok(_)) => Ok(all),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("nothing within 10 s".to_owned()),
    }
}

// --- the API --------------------------------------------------------------------

#[test]
fn connect_settings_describe_an_internal_ca_instance() {
    let fake = FakeSqlAdmin::start();
    let spec = InstanceSpec {
        project: "example.com:my-proj".to_owned(),
        ..InstanceSpec::new("orders", Backend::None)
    };
    let instance = fake.add_instance(spec);
    assert_eq!(
        instance.connection_name(),
        "example.com:my-proj:us-central1:orders"
    );
    let ip = instance.public_ip().expect("a public IP");
    assert!(ip.to_string().starts_with("127.77."), "{ip}");
    assert_eq!(public_addr(&instance).port(), SERVER_PROXY_PORT);

    let body = settings(&fake, &instance);
    assert_eq!(body["kind"], "sql#connectSettings");
    assert_eq!(body["region"], "us-central1");
    assert_eq!(body["databaseVersion"], "POSTGRES_15");
    assert_eq!(body["backendType"], "SECOND_GEN");
    assert_eq!(body["pscEnabled"], false);
    assert_eq!(body["serverCaMode"], "GOOGLE_MANAGED_INTERNAL_CA");
    assert_eq!(
        body["ipAddresses"],
        json!([{"type": "PRIMARY", "ipAddress": ip.to_string()}])
    );
    assert!(
        body.get("dnsName").is_none() && body.get("dnsNames").is_none(),
        "{body}"
    );
    let ca = &body["serverCaCert"];
    assert_eq!(ca["kind"], "sql#sslCert");
    assert_eq!(ca["instance"], "orders");
    assert_eq!(ca["cert"], instance.server_ca_pem());
    let cas = cert_infos_pem(instance.server_ca_pem()).expect("serverCaCert");
    assert_eq!(cas.len(), 1);
    assert_eq!(
        cas[0].common_name.as_deref(),
        Some("Google Cloud SQL Server CA")
    );
    assert_eq!(ca["commonName"], "Google Cloud SQL Server CA");
    let expiration = ca["expirationTime"].as_str().expect("expirationTime");
    assert!(
        expiration.ends_with(".000Z") && expiration.len() == 24,
        "{expiration}"
    );

    // The project's ':' written as such is accepted too.
    let raw_path = "/sql/v1beta4/projects/example.com:my-proj/instances/orders/connectSettings";
    let (status, again) = api_request(
        &fake.url(),
        "GET",
        raw_path,
        Some(&fake.admin_token()),
        None,
    )
    .expect("connectSettings");
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["ipAddresses"], body["ipAddresses"]);
    assert_eq!(fake.calls(ApiMethod::ConnectSettings), 2);
    assert_eq!(fake.calls_for("orders", ApiMethod::ConnectSettings), 2);
    assert_eq!(fake.calls(ApiMethod::GenerateEphemeralCert), 0);
    assert_eq!(fake.requests().len(), 2);
}

#[test]
fn requests_without_an_accepted_token_get_401() {
    let fake = FakeSqlAdmin::start();
    let instance = fake.add_instance(InstanceSpec::new("auth", Backend::None));
    let path = connect_settings_path(instance.project(), instance.name());

    let (status, body) = api_request(&fake.url(), "GET", &path, None, None).expect("request");
    assert_eq!(status, 401);
    assert_google_error(&body, 401, "UNAUTHENTICATED", "required");

    let (status, body) =
        api_request(&fake.url(), "GET", &path, Some("ya29.not-a-token"), None).expect("request");
    assert_eq!(status, 401);
    assert_google_error(&body, 401, "UNAUTHENTICATED", "authError");

    // Also for the other method, before anything else is looked at.
    let (status, body) = api_request(
        &fake.url(),
        "POST",
        &generate_ephemeral_cert_path(instance.project(), instance.name()),
        None,
        Some(&json!({"public_key": "garbage"})),
    )
    .expect("request");
    assert_eq!(status, 401, "{body}");

    fake.accept_token("ya29.second-token");
    let (status, _) =
        api_request(&fake.url(), "GET", &path, Some("ya29.second-token"), None).expect("request");
    assert_eq!(status, 200);
    fake.revoke_token("ya29.second-token");
    let (status, _) =
        api_request(&fake.url(), "GET", &path, Some("ya29.second-token"), None).expect("request");
    assert_eq!(status, 401);

    let calls = fake.api_calls();
    let statuses: Vec<u16> = calls.iter().map(|c| c.status).collect();
    assert_eq!(statuses, [401, 401, 401, 200, 401]);
}

#[test]
fn failures_render_as_google_errors() {
    let fake = FakeSqlAdmin::start();
    let instance = fake.add_instance(InstanceSpec::new("flaky", Backend::None));
    let settings_status = || {
        api_request(
            &fake.url(),
            "GET",
            &connect_settings_path(instance.project(), instance.name()),
            Some(&fake.admin_token()),
            None,
        )
        .expect("connectSettings")
    };
    for failure in Failure::ALL {
        fake.set_failure("flaky", Some(failure));
        let (status, body) = settings_status();
        assert_eq!(status, failure.status(), "{failure:?}: {body}");
        assert_eq!(body, failure.body(), "{failure:?}");
        assert_google_error(
            &body,
            failure.status(),
            failure.status_name(),
            failure.reason(),
        );
        let (status, body) = generate(&fake, &instance, &key().public_key_pem, None);
        assert_eq!(status, failure.status(), "{failure:?}: {body}");
        assert_eq!(body, failure.body(), "{failure:?}");
    }
    assert_eq!(
        Failure::NotFound.body()["error"]["message"],
        "The Cloud SQL instance does not exist."
    );
    assert!(Failure::Quota
        .message()
        .starts_with("Quota exceeded for quota metric"));

    // One method only.
    fake.set_failure("flaky", None);
    fake.set_method_failure(
        "flaky",
        ApiMethod::GenerateEphemeralCert,
        Some(Failure::Quota),
    );
    assert_eq!(settings_status().0, 200);
    assert_eq!(
        generate(&fake, &instance, &key().public_key_pem, None).0,
        429
    );
    fake.set_method_failure("flaky", ApiMethod::GenerateEphemeralCert, None);
    assert_eq!(
        generate(&fake, &instance, &key().public_key_pem, None).0,
        200
    );

    // An instance the fake does not have, or has under another project.
    for path in [
        connect_settings_path(instance.project(), "nosuch"),
        connect_settings_path("other-project", instance.name()),
    ] {
        let (status, body) =
            api_request(&fake.url(), "GET", &path, Some(&fake.admin_token()), None)
                .expect("request");
        assert_eq!(status, 404, "{path}");
        assert_eq!(body, Failure::NotFound.body());
    }
    // A path that names no method is not a call.
    let before = fake.api_calls().len();
    let (status, _) = api_request(
        &fake.url(),
        "GET",
        "/sql/v1beta4/projects/p/instances/flaky",
        Some(&fake.admin_token()),
        None,
    )
    .expect("request");
    assert_eq!(status, 404);
    assert_eq!(fake.api_calls().len(), before);
}

#[test]
fn ephemeral_certificates_are_for_the_key_sent() {
    let fake = FakeSqlAdmin::start();
    let instance = fake.add_instance(InstanceSpec::new("certs", Backend::None));
    let before = SystemTime::now();

    // The Go connector's label, with PKIX content; and the plain SPKI label.
    for pem in [&key().public_key_pem, &key().spki_pem] {
        let (status, body) = generate(&fake, &instance, pem, Some("ya29.login-token"));
        assert_eq!(status, 200, "{body}");
        let cert = &body["ephemeralCert"];
        assert_eq!(cert["kind"], "sql#sslCert");
        let info = cert_info_pem(cert["cert"].as_str().expect("cert")).expect("a certificate");
        assert_eq!(cert["commonName"].as_str(), info.common_name.as_deref());
        let lifetime = info
            .not_after
            .duration_since(before)
            .expect("notAfter ahead");
        assert!(
            (Duration::from_secs(3590)..=Duration::from_secs(3610)).contains(&lifetime),
            "{lifetime:?}"
        );
        let backdate = before
            .duration_since(info.not_before)
            .expect("notBefore behind");
        assert!(backdate >= Duration::from_secs(55), "{backdate:?}");
        assert_eq!(
            cert["expirationTime"].as_str(),
            Some(
                support::sigv4::iso8601(info.not_after)
                    .replace('Z', ".000Z")
                    .as_str()
            )
        );
    }
    assert_eq!(
        fake.login_tokens(),
        ["ya29.login-token", "ya29.login-token"]
    );
    let issued = fake.issued_certs();
    assert_eq!(issued.len(), 2);
    assert!(issued
        .iter()
        .all(|c| c.access_token.as_deref() == Some("ya29.login-token")));

    // Keys that are not acceptable.
    let pkcs1 = {
        let out = std::process::Command::new("openssl")
            .args(["rsa", "-pubin", "-RSAPublicKey_out"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write as _;
                child
                    .stdin
                    .take()
                    .expect("stdin")
                    .write_all(key().spki_pem.as_bytes())?;
                child.wait_with_output()
            })
            .expect("openssl rsa");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("PEM")
    };
    assert!(pkcs1.contains("BEGIN RSA PUBLIC KEY"), "{pkcs1}");
    for bad in [
        "not a PEM at all".to_owned(),
        pkcs1,
        key().spki_pem.replace("PUBLIC KEY", "CERTIFICATE"),
        "-----BEGIN PUBLIC KEY-----\n!!!!\n-----END PUBLIC KEY-----\n".to_owned(),
    ] {
        let (status, body) = generate(&fake, &instance, &bad, None);
        assert_eq!(status, 400, "{bad}: {body}");
        assert_google_error(&body, 400, "INVALID_ARGUMENT", "invalid");
    }
    let (status, body) = api_request(
        &fake.url(),
        "POST",
        &generate_ephemeral_cert_path(instance.project(), instance.name()),
        Some(&fake.admin_token()),
        None,
    )
    .expect("request");
    assert_eq!(status, 400, "{body}");
    assert_eq!(fake.calls(ApiMethod::GenerateEphemeralCert), 7);

    // A login token's expiry caps the certificate.
    let soon = SystemTime::now() + Duration::from_secs(600);
    fake.set_login_token_expiry("ya29.short", soon);
    let pem = ephemeral_cert(&fake, &instance, Some("ya29.short"));
    let info = cert_info_pem(&pem).expect("a certificate");
    assert!(info.not_after <= soon, "{info:?}");
    assert!(info.not_after + Duration::from_secs(5) >= soon, "{info:?}");
}

// --- the proxies ----------------------------------------------------------------

/// A PostgreSQL StartupMessage (protocol 3.0) without SSLRequest.
fn startup_message(user: &str) -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for (k, v) in [("user", user), ("database", "postgres")] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = u32::try_from(body.len() + 4)
        .expect("short")
        .to_be_bytes()
        .to_vec();
    msg.extend(body);
    msg
}

/// Sends a StartupMessage for `user` and expects AuthenticationOk.
async fn expect_pg_auth_ok<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, user: &str) {
    stream
        .write_all(&startup_message(user))
        .await
        .expect("send the StartupMessage");
    let mut reply = [0u8; 9];
    stream.read_exact(&mut reply).await.expect("read the reply");
    assert_eq!(
        reply,
        [b'R', 0, 0, 0, 8, 0, 0, 0, 0],
        "AuthenticationOk for {user}, got {:?}",
        String::from_utf8_lossy(&reply)
    );
}

#[test]
fn postgres_through_the_proxy_in_every_ca_mode() {
    let pg = cluster();
    let fake = FakeSqlAdmin::start();
    let rt = support::runtime();
    for (name, mode) in [
        ("pg-internal", CaMode::GoogleManagedInternal),
        ("pg-cas", CaMode::GoogleManagedCas),
        ("pg-customer", CaMode::CustomerManagedCas),
    ] {
        let instance = fake.add_instance(InstanceSpec {
            ca_mode: mode,
            ..InstanceSpec::postgres(name, pg)
        });
        let body = settings(&fake, &instance);
        assert_eq!(body["serverCaMode"], mode.as_api_str());
        let cert = ephemeral_cert(&fake, &instance, None);
        let config = config(&instance, Some(&cert));
        rt.block_on(async {
            let mut tls = dial(public_addr(&instance), config.clone())
                .await
                .unwrap_or_else(|e| panic!("{name}: TLS to the proxy: {e}"));
            let (_, conn) = tls.get_ref();
            assert_eq!(
                conn.protocol_version(),
                Some(rustls::ProtocolVersion::TLSv1_3)
            );
            expect_pg_auth_ok(&mut tls, TRUST_USER).await;

            // A whole SCRAM login and a query, by tokio-postgres over the tunnel.
            let tls = dial(public_addr(&instance), config.clone())
                .await
                .expect("TLS to the proxy");
            let (client, connection) = tokio_postgres::Config::new()
                .user(SCRAM_USER)
                .password(SCRAM_PASS)
                .dbname("postgres")
                .ssl_mode(tokio_postgres::config::SslMode::Disable)
                .connect_raw(tls, tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("{name}: scram_user through the proxy: {e}"));
            let task = tokio::spawn(connection);
            let row = client
                .query_one(
                    "SELECT current_user::text, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                    &[],
                )
                .await
                .expect("a query through the proxy");
            assert_eq!(row.get::<_, String>(0), SCRAM_USER);
            // The backend sees a local (socket) connection.
            assert!(!row.get::<_, bool>(1));
            drop(client);
            let _ = task.await;
        });
        let connections = fake.wait_for_connections(name, 2, Duration::from_secs(10));
        for c in &connections {
            assert_eq!(c.handshake, Ok(()), "{c:?}");
            assert!(c.issued_by_fake, "{c:?}");
            assert_eq!(c.access_token, None, "{c:?}");
            assert_eq!(c.ip_type, IpType::Public);
            assert_eq!(c.local, public_addr(&instance));
        }
        let issued = cert_info_pem(&cert).expect("the ephemeral certificate");
        assert_eq!(
            connections[0].client_cert_serial.as_deref(),
            Some(issued.serial.as_str())
        );
        assert_eq!(connections[0].client_cert_not_after, Some(issued.not_after));
        assert!(fake.handshake_errors(name).is_empty());
    }
}

#[test]
fn a_certificate_issued_with_a_login_token_is_recorded_as_such() {
    let pg = cluster();
    let fake = FakeSqlAdmin::start();
    let instance = fake.add_instance(InstanceSpec::postgres("pg-iam", pg));
    let cert = ephemeral_cert(&fake, &instance, Some("ya29.iam-login"));
    let rt = support::runtime();
    rt.block_on(async {
        let mut tls = dial(public_addr(&instance), config(&instance, Some(&cert)))
            .await
            .expect("TLS to the proxy");
        expect_pg_auth_ok(&mut tls, PG_IAM_USER).await;
    });
    let c = &fake.wait_for_connections("pg-iam", 1, Duration::from_secs(10))[0];
    assert_eq!(c.access_token.as_deref(), Some("ya29.iam-login"), "{c:?}");
    assert_eq!(fake.login_tokens(), ["ya29.iam-login"]);
}

/// One MySQL packet: (sequence id, payload).
async fn read_packet<S: AsyncRead + Unpin>(stream: &mut S) -> (u8, Vec<u8>) {
    let mut header = [0u8; 4];
    stream
        .read_exact(&mut header)
        .await
        .expect("a packet header");
    let len = usize::from(header[0]) | usize::from(header[1]) << 8 | usize::from(header[2]) << 16;
    let mut payload = vec![0u8; len];
    stream
        .read_exact(&mut payload)
        .await
        .expect("a packet payload");
    (header[3], payload)
}

/// `mysql_native_password`: SHA1(pw) XOR SHA1(scramble + SHA1(SHA1(pw))).
fn native_password(password: &str, scramble: &[u8]) -> Vec<u8> {
    let sha1 = |parts: &[&[u8]]| {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
        for part in parts {
            ctx.update(part);
        }
        ctx.finish().as_ref().to_vec()
    };
    let stage1 = sha1(&[password.as_bytes()]);
    let stage2 = sha1(&[&stage1]);
    let mix = sha1(&[scramble, &stage2]);
    stage1.iter().zip(mix).map(|(a, b)| a ^ b).collect()
}

/// Reads the greeting and logs in as `user` with `password` by
/// `mysql_native_password`; the first byte of the server's answer (0 = OK).
async fn mysql_login<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    user: &str,
    password: &str,
) -> Vec<u8> {
    let (_, greeting) = read_packet(stream).await;
    let parsed = mariadb::parse_greeting(&greeting).expect("a greeting");
    assert_eq!(parsed.protocol_version, 10);
    let auth = if password.is_empty() {
        Vec::new()
    } else {
        native_password(password, &mariadb::greeting_scramble(&greeting))
    };
    // LONG_PASSWORD | CONNECT_WITH_DB | PROTOCOL_41 | SECURE_CONNECTION | PLUGIN_AUTH
    let caps: u32 = 0x1 | 0x8 | 0x200 | 0x8000 | 0x8_0000;
    let mut payload = caps.to_le_bytes().to_vec();
    payload.extend_from_slice(&(16u32 << 20).to_le_bytes());
    payload.push(45); // utf8mb4_general_ci
    payload.extend_from_slice(&[0u8; 23]);
    payload.extend_from_slice(user.as_bytes());
    payload.push(0);
    payload.push(u8::try_from(auth.len()).expect("short"));
    payload.extend_from_slice(&auth);
    payload.extend_from_slice(mariadb::DATABASE.as_bytes());
    payload.push(0);
    payload.extend_from_slice(b"mysql_native_password\0");
    let len = u32::try_from(payload.len()).expect("short").to_le_bytes();
    let mut packet = vec![len[0], len[1], len[2], 1];
    packet.extend(payload);
    stream.write_all(&packet).await.expect("send the login");
    read_packet(stream).await.1
}

#[test]
fn mariadb_through_the_proxy() {
    let db = MariaDb::start(MariaDbOptions::default());
    create_mysql_iam_user(&db, "keyhole-sa");
    // The template has no anonymous accounts to catch socket logins.
    assert_eq!(
        db.admin_sql("SELECT COUNT(*) FROM mysql.user WHERE user = ''"),
        "0"
    );
    // A password login over the socket works despite require_secure_transport.
    let socket = db.socket_path().to_str().expect("UTF-8").to_owned();
    let out = mariadb::mariadb_with_args(
        &[
            "--socket",
            &socket,
            "-u",
            NATIVE_USER,
            "-e",
            "SELECT CURRENT_USER()",
        ],
        Some(NATIVE_PASS),
    );
    assert!(
        out.status.success(),
        "{}",
        support::process::describe_output(&out)
    );
    assert_eq!(support::clients::stdout(&out), "native_user@%");

    let fake = FakeSqlAdmin::start();
    let instance = fake.add_instance(InstanceSpec::mysql("my", &db));
    assert_eq!(settings(&fake, &instance)["databaseVersion"], "MYSQL_8_0");
    let cert = ephemeral_cert(&fake, &instance, None);
    let config = config(&instance, Some(&cert));
    let rt = support::runtime();
    rt.block_on(async {
        let mut tls = dial(public_addr(&instance), config.clone())
            .await
            .expect("TLS to the proxy");
        let (seq, greeting) = read_packet(&mut tls).await;
        assert_eq!(seq, 0);
        assert_eq!(greeting[0], 10, "protocol version 10");

        for (user, password) in [(NATIVE_USER, NATIVE_PASS), ("keyhole-sa", "")] {
            let mut tls = dial(public_addr(&instance), config.clone())
                .await
                .expect("TLS to the proxy");
            let answer = mysql_login(&mut tls, user, password).await;
            assert_eq!(
                answer[0],
                0,
                "OK for {user}, got {:?}",
                String::from_utf8_lossy(&answer)
            );
        }
        // A wrong password is refused by the real server.
        let mut tls = dial(public_addr(&instance), config.clone())
            .await
            .expect("TLS to the proxy");
        let answer = mysql_login(&mut tls, NATIVE_USER, "wrong").await;
        assert_eq!(answer[0], 0xff, "{:?}", String::from_utf8_lossy(&answer));
    });
    let connections = fake.wait_for_connections("my", 4, Duration::from_secs(10));
    assert!(connections
        .iter()
        .all(|c| c.handshake.is_ok() && c.issued_by_fake));
}

// --- refusals -------------------------------------------------------------------

#[test]
fn a_client_without_a_certificate_is_refused() {
    let fake = FakeSqlAdmin::start();
    let instance = fake.add_instance(InstanceSpec::new("nocert", Backend::Echo));
    let rt = support::runtime();
    let outcome = rt.block_on(async {
        // TLS 1.3: the client's handshake ends before the server has judged
        // its (missing) certificate; the refusal arrives as an alert.
        match dial(public_addr(&instance), config(&instance, None)).await {
            Err(e) => Err(e.to_string()),
            Ok(mut tls) => {
                let _ = tls.write_all(b"hello").await;
                read_to_close(&mut tls).await
            }
        }
    });
    let err = outcome.expect_err("the proxy refuses a client without a certificate");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    fake.wait_for_connections("nocert", 1, Duration::from_secs(10));
    let errors = fake.handshake_errors("nocert");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("no certificates"), "{errors:?}");
}

#[test]
fn tls_1_2_is_refused() {
    let fake = FakeSqlAdmin::start();
    let instance = fake.add_instance(InstanceSpec::new("tls12", Backend::Echo));
    let cert = ephemeral_cert(&fake, &instance, None);
    let chain: Vec<rustls::pki_types::CertificateDer<'static>> =
        rustls::pki_types::pem::PemObject::pem_slice_iter(cert.as_bytes())
            .collect::<Result<_, _>>()
            .expect("the certificate");
    let key = rustls::pki_types::pem::PemObject::from_pem_slice(key().private_key_pem.as_bytes())
        .expect("the key");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .expect("TLS 1.2")
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(CloudSqlVerifier::new(
        instance.server_ca_pem(),
        instance.identity(),
    )))
    .with_client_auth_cert(chain, key)
    .expect("the client certificate");
    let rt = support::runtime();
    let err = rt
        .block_on(dial(public_addr(&instance), Arc::new(config)))
        .expect_err("a TLS 1.2 client is refused");
    assert!(err.to_string().contains("ProtocolVersion"), "{err}");
    fake.wait_for_connections("tls12", 1, Duration::from_secs(10));
    let errors = fake.handshake_errors("tls12");
    assert!(
        errors.len() == 1 && errors[0].contains("Tls12NotOffered"),
        "{errors:?}"
    );
}

#[test]
fn an_expired_certificate_is_refused() {
    let fake = FakeSqlAdmin::start();
    let instance = fake.add_instance(InstanceSpec::new("expiry", Backend::Echo));
    fake.set_cert_validity("expiry", Duration::from_secs(1));
    let cert = ephemeral_cert(&fake, &instance, None);
    std::thread::sleep(Duration::from_secs(2));
    let rt = support::runtime();
    let outcome = rt.block_on(async {
        match dial(public_addr(&instance), config(&instance, Some(&cert))).await {
            Err(e) => Err(e.to_string()),
            Ok(mut tls) => {
                let _ = tls.write_all(b"hello").await;
                read_to_close(&mut tls).await
            }
        }
    });
    let err = outcome.expect_err("the proxy refuses an expired certificate");
    assert!(err.to_lowercase().contains("expired"), "{err}");
    fake.wait_for_connections("expiry", 1, Duration::from_secs(10));
    let errors = fake.handshake_errors("expiry");
    assert!(
        errors.len() == 1 && errors[0].to_lowercase().contains("expired"),
        "{errors:?}"
    );
}

#[test]
fn a_certificate_for_another_instance_is_refused() {
    let fake = FakeSqlAdmin::start();
    let a = fake.add_instance(InstanceSpec::new("inst-a", Backend::Echo));
    let b = fake.add_instance(InstanceSpec::new("inst-b", Backend::Echo));
    assert_ne!(a.public_ip(), b.public_ip());
    let cert_a = ephemeral_cert(&fake, &a, None);
    let rt = support::runtime();
    let outcome = rt.block_on(async {
        match dial(public_addr(&b), config(&b, Some(&cert_a))).await {
            Err(e) => Err(e.to_string()),
            Ok(mut tls) => {
                let _ = tls.write_all(b"hello").await;
                read_to_close(&mut tls).await
            }
        }
    });
    outcome.expect_err("instance B's proxy refuses instance A's certificate");
    fake.wait_for_connections("inst-b", 1, Duration::from_secs(10));
    let errors = fake.handshake_errors("inst-b");
    assert!(
        errors.len() == 1 && errors[0].contains("UnknownIssuer"),
        "{errors:?}"
    );
}

// --- names and addresses --------------------------------------------------------

#[test]
fn server_certificates_carry_the_documented_names() {
    let fake = FakeSqlAdmin::start();
    let rt = support::runtime();
    let echo = |instance: &InstanceHandle, identity: ServerIdentity| {
        let cert = ephemeral_cert(&fake, instance, None);
        let config = client_tls_config(
            Some((&cert, &key().private_key_pem)),
            instance.server_ca_pem(),
            identity,
        );
        rt.block_on(async {
            let mut tls = dial(public_addr(instance), config)
                .await
                .map_err(|e| e.to_string())?;
            tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
            let mut back = [0u8; 4];
            tls.read_exact(&mut back).await.map_err(|e| e.to_string())?;
            assert_eq!(&back, b"ping");
            Ok::<(), String>(())
        })
    };

    // CAS: a SAN with the DNS name; serverCaCert = intermediate + root.
    let cas = fake.add_instance(InstanceSpec {
        ca_mode: CaMode::GoogleManagedCas,
        ..InstanceSpec::new("cas", Backend::Echo)
    });
    let dns = cas
        .dns_name()
        .expect("a CAS instance has a DNS name")
        .to_owned();
    assert!(
        dns.starts_with("cas.") && dns.ends_with(".us-central1.sql.goog"),
        "{dns}"
    );
    let body = settings(&fake, &cas);
    assert_eq!(body["dnsName"], dns.as_str());
    assert_eq!(
        body["dnsNames"],
        json!([{"name": dns, "connectionType": "PUBLIC", "dnsScope": "INSTANCE"}])
    );
    let chain = cert_infos_pem(cas.server_ca_pem()).expect("serverCaCert");
    assert_eq!(chain.len(), 2, "intermediate and root");
    assert_eq!(
        chain[1].common_name.as_deref(),
        Some("Google Cloud SQL Root CA")
    );
    let leaf = cert_info_pem(cas.server_cert_pem()).expect("the server certificate");
    assert_eq!(leaf.dns_names, vec![dns.clone()]);
    assert_eq!(leaf.common_name.as_deref(), Some(dns.as_str()));
    echo(&cas, cas.identity()).expect("the DNS name matches");
    // Only the SAN matches: the CN fallback alone would fail.
    let err = echo(
        &cas,
        ServerIdentity {
            dns_name: Some("elsewhere.example.com".to_owned()),
            instance_cn: cas.instance_cn(),
        },
    )
    .expect_err("no SAN for another name, and the CN is not project:instance");
    assert!(err.contains("is not for"), "{err}");

    // A SAN written with a trailing dot, and an API name with one.
    let dotted = fake.add_instance(InstanceSpec {
        ca_mode: CaMode::CustomerManagedCas,
        dns_name: Some("dotted.example.internal".to_owned()),
        san_trailing_dot: true,
        api_trailing_dot: true,
        ..InstanceSpec::new("dotted", Backend::Echo)
    });
    assert_eq!(
        settings(&fake, &dotted)["dnsName"],
        "dotted.example.internal."
    );
    let chain = cert_infos_pem(dotted.server_ca_pem()).expect("serverCaCert");
    assert!(chain[1]
        .common_name
        .as_deref()
        .is_some_and(|cn| cn.contains("Customer Root CA")));
    let leaf = cert_info_pem(dotted.server_cert_pem()).expect("the server certificate");
    assert_eq!(leaf.dns_names, ["dotted.example.internal."]);
    echo(&dotted, dotted.identity()).expect("a trailing dot is no mismatch");

    // Internal CA: the CN is project:instance, no SAN.
    let internal = fake.add_instance(InstanceSpec::new("internal", Backend::Echo));
    let leaf = cert_info_pem(internal.server_cert_pem()).expect("the server certificate");
    assert!(leaf.dns_names.is_empty(), "{leaf:?}");
    assert_eq!(
        leaf.common_name.as_deref(),
        Some("keyhole-test-project:internal")
    );
    echo(&internal, internal.identity()).expect("the CN matches");

    // Wrong names are refused in every mode.
    for (name, mode) in [
        ("wrong-internal", CaMode::GoogleManagedInternal),
        ("wrong-cas", CaMode::GoogleManagedCas),
    ] {
        let wrong = fake.add_instance(InstanceSpec {
            ca_mode: mode,
            wrong_name: true,
            ..InstanceSpec::new(name, Backend::Echo)
        });
        let leaf = cert_info_pem(wrong.server_cert_pem()).expect("the server certificate");
        assert_eq!(leaf.dns_names, ["other.example.invalid"]);
        let err = echo(&wrong, wrong.identity()).expect_err("a certificate for another instance");
        assert!(err.contains("some-other-instance"), "{err}");
    }
}

#[test]
fn every_ip_type_has_its_own_address_and_proxy() {
    let fake = FakeSqlAdmin::start();
    let instance = fake.add_instance(InstanceSpec {
        private_ip: true,
        psc: true,
        ..InstanceSpec::new("everywhere", Backend::Echo)
    });
    let (public, private, psc) = (
        instance.public_ip().expect("public"),
        instance.private_ip().expect("private"),
        instance.psc_ip().expect("psc"),
    );
    assert!(public != private && private != psc && public != psc);
    let body = settings(&fake, &instance);
    assert_eq!(
        body["ipAddresses"],
        json!([
            {"type": "PRIMARY", "ipAddress": public.to_string()},
            {"type": "PRIVATE", "ipAddress": private.to_string()},
        ])
    );
    assert_eq!(body["pscEnabled"], true);
    assert_eq!(instance.psc_dns_name(), Some(psc.to_string().as_str()));
    assert_eq!(
        body["dnsNames"],
        json!([{"name": psc.to_string(), "connectionType": "PRIVATE_SERVICE_CONNECT", "dnsScope": "INSTANCE"}])
    );
    assert_eq!(body["dnsName"], psc.to_string());

    let cert = ephemeral_cert(&fake, &instance, None);
    let config = config(&instance, Some(&cert));
    let rt = support::runtime();
    for kind in [IpType::Public, IpType::Private, IpType::Psc] {
        let addr = instance.addr(kind).expect("an address");
        rt.block_on(async {
            let mut tls = dial(addr, config.clone()).await.expect("TLS to the proxy");
            tls.write_all(b"echo").await.expect("write");
            let mut back = [0u8; 4];
            tls.read_exact(&mut back).await.expect("read");
            assert_eq!(&back, b"echo");
        });
    }
    let connections = fake.wait_for_connections("everywhere", 3, Duration::from_secs(10));
    let kinds: Vec<IpType> = connections.iter().map(|c| c.ip_type).collect();
    assert_eq!(kinds, [IpType::Public, IpType::Private, IpType::Psc]);

    // A public-only instance has no PRIVATE entry, no PSC and no names.
    let plain = fake.add_instance(InstanceSpec::new("plain", Backend::None));
    let body = settings(&fake, &plain);
    assert_eq!(body["ipAddresses"].as_array().map(Vec::len), Some(1));
    assert!(plain.private_ip().is_none() && plain.psc_ip().is_none());
    assert!(body.get("dnsNames").is_none());
}
