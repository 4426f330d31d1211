//! `tls-mode=disable`: keyhole in front of a plain Postgres relay on this
//! host (here a PostgreSQL with TLS off). Both legs are plain, so the bytes
//! go socket → pipe → socket with splice(2), never through keyhole's memory;
//! clients over TCP and over a Unix socket see every byte, and the session's
//! debug line names the data path. A remote host is refused at startup.

mod support;

use std::time::Duration;

use support::clients;
use support::keyhole::{Keyhole, Ready};
use support::postgres::{PgCluster, PgOptions, MD5_PASS, MD5_USER};

const ROWS: usize = 20_000;
const COPY: &str = "copy (select repeat('x', 1000) from generate_series(1, 20000)) to stdout";

#[test]
fn a_plain_relay_on_this_host_is_spliced_by_the_kernel_for_tcp_and_unix_clients() {
    let pg = PgCluster::start(PgOptions {
        ssl: false,
        ..PgOptions::default()
    });
    let port = support::free_port();
    let sockets = support::scratch_dir("keyhole-relay-sock-");
    let target = format!(
        "postgres://127.0.0.1:{}?tls-mode=disable&listen=127.0.0.1:{port}&unix-socket={}",
        pg.port,
        sockets.path().display()
    );
    let keyhole = Keyhole::spawn(
        &["--pipe-size", "256KiB", &target],
        &[("RUST_LOG", "keyhole=debug")],
        Ready::Tcp(port),
    );

    let tcp = clients::psql(port, MD5_USER, Some(MD5_PASS), COPY);
    let out = clients::expect_success(&tcp, "COPY through keyhole over TCP");
    assert_eq!(out.lines().count(), ROWS, "every row of the COPY over TCP");
    assert!(out
        .lines()
        .all(|l| l.len() == 1000 && l.bytes().all(|b| b == b'x')));

    let unix = clients::psql_unix(sockets.path(), port, MD5_USER, Some(MD5_PASS), COPY);
    let out = clients::expect_success(&unix, "COPY through keyhole over a Unix socket");
    assert_eq!(out.lines().count(), ROWS, "every row over a Unix socket");
    assert!(out
        .lines()
        .all(|l| l.len() == 1000 && l.bytes().all(|b| b == b'x')));

    // Both sessions took the splice(2) path; the portable build (macOS,
    // Windows, `--cfg keyhole_portable`) has none and copies through its buffers.
    let path = if cfg!(linux_native) {
        "splice(2)"
    } else {
        "plain"
    };
    keyhole.wait_for_log(&format!("data_path=\"{path}\""), 2);
    drop(keyhole);
    drop(pg);
}

#[test]
fn plaintext_to_a_remote_host_is_refused_before_anything_listens() {
    let (status, log) = Keyhole::start_expect_exit(
        &["postgres://10.1.2.3:5432?tls-mode=disable"],
        Duration::from_secs(20),
    );
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("only to a relay on this host") && log.contains("not to 10.1.2.3"),
        "what the operator reads:\n{log}"
    );
}
