//! `via=iap://PROJECT/ZONE/VM`: keyhole speaks Google IAP TCP forwarding
//! itself, in front of real PostgreSQL and MariaDB. The relay is a fake
//! written from the protocol (tests/support/fake_iap.rs), trusted through
//! `SSL_CERT_FILE` and reached with `--iap-endpoint`; the OAuth2 token comes
//! from a fake metadata server, as on a GCE VM or with ADC.
//!
//! The "VM's port" the relay connects to is the database itself (as a relay
//! on the VM listening where the database does would be): the database's
//! TLS still starts in keyhole and is verified against its name.

// Tests the IAP tunnel: only in builds with the "gcp" feature.
#![cfg(feature = "gcp")]

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use support::bastion::SshBastion;
use support::cloud::FakeGcpMetadata;
use support::fake_iap::FakeIap;
use support::keyhole::{Keyhole, Ready};
use support::mariadb::{self, MariaDb, NATIVE_PASS, NATIVE_USER};
use support::netns::Namespace;
use support::postgres::{PgCluster, TRUST_USER};
use support::{clients, scratch_dir, session};

const PROJECT: &str = "lab-proj";
const ZONE: &str = "europe-west1-b";
const VM: &str = "db-relay";

fn utf8(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

fn pg_target(pg: &PgCluster, hop: &str) -> String {
    format!(
        "postgres://localhost:{}?ca-file={}&via={hop}",
        pg.port,
        utf8(&pg.pki.ca)
    )
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A fake metadata server, the relay that accepts its token, and a home.
struct Lab {
    home: tempfile::TempDir,
    metadata: FakeGcpMetadata,
    iap: FakeIap,
}

impl Lab {
    fn start() -> Lab {
        let metadata = FakeGcpMetadata::start();
        let iap = FakeIap::start(&metadata.access_token());
        Lab {
            home: scratch_dir("keyhole-iap-home"),
            metadata,
            iap,
        }
    }

    /// A lab whose VM relays its port straight to PostgreSQL, and the
    /// target through it.
    fn for_pg() -> (Lab, &'static PgCluster, String) {
        let lab = Lab::start();
        let pg = PgCluster::shared();
        lab.iap.add_vm(PROJECT, ZONE, VM, pg.port, addr(pg.port));
        let target = pg_target(pg, &format!("iap://{PROJECT}/{ZONE}/{VM}"));
        (lab, pg, target)
    }

    /// keyhole on a free port with `args`, the metadata server's token and
    /// the relay's CA and endpoint.
    fn keyhole(&self, args: &[&str]) -> Keyhole {
        let port = support::free_port();
        let port_text = port.to_string();
        let endpoint = self.iap.endpoint();
        let mut all = vec![
            "--port",
            port_text.as_str(),
            "--iap-endpoint",
            endpoint.as_str(),
        ];
        all.extend_from_slice(args);
        let host = self.metadata.host();
        let env = [
            ("HOME", utf8(self.home.path())),
            ("RUST_LOG", "keyhole=debug"),
            ("GCE_METADATA_HOST", host.as_str()),
            ("SSL_CERT_FILE", utf8(self.iap.ca())),
        ];
        Keyhole::spawn(&all, &env, Ready::Tcp(port))
    }
}

#[test]
fn psql_reaches_postgres_through_an_iap_tunnel_with_tls_verified_end_to_end() {
    let (lab, pg, target) = Lab::for_pg();
    let (iap, metadata) = (&lab.iap, &lab.metadata);
    let kh = lab.keyhole(&[&target]);

    let out = clients::psql(
        kh.port(),
        TRUST_USER,
        None,
        "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
    );
    assert_eq!(
        clients::expect_success(&out, "psql through IAP").trim(),
        "t"
    );

    let connects = iap.connects();
    assert_eq!(connects.len(), 1, "{connects:?}");
    let param = |name: &str| {
        connects[0]
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(param("project").as_deref(), Some(PROJECT));
    assert_eq!(param("zone").as_deref(), Some(ZONE));
    assert_eq!(param("instance").as_deref(), Some(VM));
    assert_eq!(param("interface").as_deref(), Some("nic0"));
    // No ssh:// after it: the VM's port is the database's own.
    assert_eq!(param("port"), Some(pg.port.to_string()));
    let headers = &iap.headers_seen()[0];
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(header("origin"), Some("bot:iap-tunneler"));
    assert_eq!(
        header("authorization").map(str::to_owned),
        Some(format!("Bearer {}", metadata.access_token()))
    );
    assert!(
        metadata
            .scopes_requested()
            .iter()
            .flatten()
            .any(|s| s.contains("https://www.googleapis.com/auth/cloud-platform")),
        "{:?}",
        metadata.scopes_requested()
    );
    assert!(
        !kh.logs().contains(&metadata.access_token()),
        "the token reached the log"
    );
}

#[test]
fn a_large_result_streams_through_the_tunnel_byte_for_byte() {
    let (lab, pg, target) = Lab::for_pg();
    let iap = &lab.iap;
    let kh = lab.keyhole(&[&target]);
    // About 24 MB of rows; the digest is computed by the server, and here
    // from the rows psql received.
    let sql = "select encode(sha256(convert_to(string_agg(repeat(md5(i::text), 24), '' order by i), 'UTF8')), 'hex') \
               from generate_series(1, 30000) i";
    let direct = pg.psql_direct(TRUST_USER, None, sql).expect("direct");
    let rows = clients::psql(
        kh.port(),
        TRUST_USER,
        None,
        "select repeat(md5(i::text), 24) from generate_series(1, 30000) i order by i",
    );
    let rows = clients::expect_success(&rows, "rows through IAP");
    let joined: String = rows.lines().map(str::trim).collect();
    assert_eq!(sha256_hex(joined.as_bytes()), direct.trim());
    assert!(
        iap.acks_received().iter().any(|&a| a > 0),
        "keyhole's data was acknowledged by the relay"
    );
}

/// After close code 4004 (reauthentication required) the tunnel resumes on
/// a new WebSocket for the same session, with a fresh token: the client sees
/// nothing but its rows.
#[test]
fn a_tunnel_resumes_after_reauthentication_without_losing_a_byte() {
    let (lab, pg, target) = Lab::for_pg();
    let iap = &lab.iap;
    let kh = lab.keyhole(&[&target]);
    iap.set_reauth_after(Some(200_000));
    let sql = "select count(*), encode(sha256(convert_to(string_agg(md5(i::text), '' order by i), 'UTF8')), 'hex') \
               from generate_series(1, 50000) i";
    let direct = pg.psql_direct(TRUST_USER, None, sql).expect("direct");
    let rows = clients::psql(
        kh.port(),
        TRUST_USER,
        None,
        "select md5(i::text) from generate_series(1, 50000) i order by i",
    );
    assert!(
        rows.status.success(),
        "rows through a resumed tunnel: {}\nkeyhole:\n{}",
        clients::stderr(&rows),
        kh.logs()
    );
    let rows = clients::stdout(&rows);
    let lines: Vec<&str> = rows.lines().map(str::trim).collect();
    let digest = sha256_hex(lines.concat().as_bytes());
    assert_eq!(format!("{}|{digest}", lines.len()), direct.trim());
    let reconnects = iap.reconnects();
    assert_eq!(reconnects.len(), 1, "{reconnects:?}");
    let sid = reconnects[0]
        .iter()
        .find(|(k, _)| k == "sid")
        .map(|(_, v)| v.as_str());
    assert_eq!(sid, Some("fake-sid-1"));
    assert!(kh.logs().contains("resuming the tunnel"), "{}", kh.logs());
}

/// A connection left idle (a psql prompt) outlives the relay's idle
/// timeout: keyhole repeats its acknowledgement while nothing moves.
#[test]
fn an_idle_tunnel_is_kept_alive() {
    let (lab, _pg, target) = Lab::for_pg();
    lab.iap.set_idle_close(Some(Duration::from_secs(20)));
    let kh = lab.keyhole(&[&target]);
    let port = kh.port();
    let rt = support::runtime();
    let (client, _driver) = session::connect(&rt, port, "idle");
    let first = session::simple_query(&rt, &client, "select 1").expect("first");
    std::thread::sleep(Duration::from_secs(32));
    let later = session::simple_query(&rt, &client, "select 2").expect("after idling");
    assert_eq!((first, later), (vec!["1".to_owned()], vec!["2".to_owned()]));
    assert_eq!(lab.iap.idle_closes(), 0);
    assert_eq!(lab.iap.connects().len(), 1);
}

#[test]
fn mariadb_reaches_its_server_through_an_iap_tunnel_to_a_given_port() {
    let lab = Lab::start();
    let db = MariaDb::shared();
    // The relay on the VM listens on 3306; the server is elsewhere.
    lab.iap.add_vm(PROJECT, ZONE, VM, 3306, addr(db.port()));
    let target = format!(
        "mysql://localhost:{}?ca-file={}&via=iap://{PROJECT}/{ZONE}/{VM}?port=3306",
        db.port(),
        utf8(&db.pki().ca)
    );
    let kh = lab.keyhole(&[&target]);
    let out = mariadb::mariadb(
        kh.port(),
        NATIVE_USER,
        Some(NATIVE_PASS),
        "select variable_value from information_schema.session_status \
         where variable_name = 'Ssl_version'",
    );
    let version = clients::expect_success(&out, "mariadb through IAP");
    assert!(
        version.starts_with("TLSv1."),
        "keyhole's leg to the server is TLS: {version}"
    );
}

/// The relay's refusals reach the client as an error that names the hop and
/// says what to do.
#[test]
fn iap_refusals_name_the_hop_and_the_reason() {
    let (lab, pg, target) = Lab::for_pg();
    let iap = &lab.iap;
    let hop = format!("iap://{PROJECT}/{ZONE}/{VM}");
    let kh = lab.keyhole(&[&target]);
    let failing = |what: &str| {
        let out = clients::psql(kh.port(), TRUST_USER, None, "select 1");
        assert!(!out.status.success(), "{what}: psql succeeded");
        clients::stderr(&out)
    };

    iap.set_close_before_connect(Some(4033));
    let said = failing("4033");
    assert!(
        said.contains(&hop)
            && said.contains("4033")
            && said.contains("roles/iap.tunnelResourceAccessor"),
        "{said}"
    );

    iap.set_close_before_connect(Some(4003));
    let said = failing("4003");
    assert!(
        said.contains(&hop) && said.contains("could not connect to the VM's port"),
        "{said}"
    );

    iap.set_close_before_connect(None);
    iap.set_http_refusal(Some((
        403,
        r#"{"error":{"code":403,"status":"PERMISSION_DENIED","message":"IAP permission denied"}}"#,
    )));
    let said = failing("HTTP 403");
    assert!(
        said.contains("HTTP 403 (PERMISSION_DENIED)") && !said.contains("IAP permission denied"),
        "{said}"
    );

    // A VM the relay does not know.
    iap.set_http_refusal(None);
    let other = pg_target(pg, &format!("iap://{PROJECT}/{ZONE}/no-such-vm"));
    drop(kh);
    let kh = lab.keyhole(&[&other]);
    let out = clients::psql(kh.port(), TRUST_USER, None, "select 1");
    let said = clients::stderr(&out);
    assert!(
        said.contains("4047") && said.contains("instance not found"),
        "{said}"
    );
}

/// SHA-256 in hex, to compare rows with the server's own digest of them.
fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `via=iap://p/z/vm,ssh://vm`: the user's SSH bastion, reached through IAP
/// instead of a public port 22. sshd runs in a network namespace (the VPC);
/// IAP connects to its port, keyhole's ssh logs in over that tunnel, and the
/// database is a name only the namespace resolves. The failure of the
/// tunnel under ssh is reported as the tunnel's, not as an SSH riddle.
#[test]
fn an_ssh_bastion_runs_over_an_iap_tunnel() {
    let Some(ns) = Namespace::create() else {
        return;
    };
    ns.set_hosts(&[("db.internal", "127.0.0.1")]);
    let pg = PgCluster::shared();
    let relay = ns.relay_to(SocketAddr::from(([127, 0, 0, 1], pg.port)));
    let bastion = SshBastion::start(&ns);
    let lab = Lab::start();
    let iap = &lab.iap;
    iap.add_vm(PROJECT, ZONE, VM, 22, bastion.addr);
    let config = bastion.ssh_config(VM);
    let target = format!(
        "postgres://db.internal:{}?ca-file={}&via=iap://{PROJECT}/{ZONE}/{VM},ssh://{VM}",
        relay.port(),
        utf8(&pg.pki.ca)
    );
    let kh = lab.keyhole(&["--ssh-config", utf8(&config), &target]);
    for _ in 0..3 {
        let out = clients::psql(kh.port(), TRUST_USER, None, "select 40 + 2");
        assert_eq!(
            clients::expect_success(&out, "psql over ssh over IAP").trim(),
            "42"
        );
    }
    assert_eq!(
        bastion.logins(),
        1,
        "one SSH login; sshd log:\n{}",
        bastion.log()
    );
    let connects = iap.connects();
    assert_eq!(
        connects.len(),
        1,
        "one IAP tunnel carries the SSH connection: {connects:?}"
    );
    assert!(
        connects[0].iter().any(|(k, v)| k == "port" && v == "22"),
        "under ssh the VM's port is 22: {connects:?}"
    );
    drop(kh);

    // IAP refuses: the login fails with IAP's reason, naming the tunnel.
    iap.set_close_before_connect(Some(4033));
    let kh = lab.keyhole(&["--ssh-config", utf8(&config), &target]);
    let out = clients::psql(kh.port(), TRUST_USER, None, "select 1");
    let said = clients::stderr(&out);
    assert!(
        said.contains(&format!("iap://{PROJECT}/{ZONE}/{VM}")) && said.contains("4033"),
        "{said}"
    );
}
