//! `--kernel-tls=auto` end to end, with real servers and clients: where this
//! kernel offers the TLS ULP, the sessions' records are the kernel's (the
//! debug line says `data_path="kernel TLS"`); where it does not, keyhole says
//! so once at startup and its own record layer carries the same sessions.
//! Either way every byte arrives. The record-level checks (each suite, key
//! updates, the splice) are in tls_record_layer.rs.

mod support;

use keyhole::tls::ktls::{self, Availability};
use support::clients;
use support::keyhole::{Keyhole, Ready};
use support::mariadb::{self, MariaDb, NATIVE_PASS, NATIVE_USER};
use support::postgres::{PgCluster, MD5_PASS, MD5_USER};

const ROWS: usize = 20_000;
const COPY: &str = "copy (select repeat('x', 1000) from generate_series(1, 20000)) to stdout";

/// What the sessions' debug lines and the startup log say on this kernel.
/// (The kernel carries every suite these servers pick, when it has the ULP.)
fn expected_path() -> &'static str {
    match ktls::availability() {
        Availability::Available { .. } => "data_path=\"kernel TLS\"",
        Availability::Unavailable { reason } => {
            println!("skipped: kernel TLS unavailable here: {reason}; checking the fallback only");
            "data_path=\"TLS in place\""
        }
    }
}

fn auto_keyhole(ca: &str, target: &str) -> Keyhole {
    let port = support::free_port();
    let port_text = port.to_string();
    Keyhole::spawn(
        &[
            "--port",
            &port_text,
            "--kernel-tls",
            "auto",
            "--ca-file",
            ca,
            target,
        ],
        &[("RUST_LOG", "keyhole=debug")],
        Ready::Tcp(port),
    )
}

fn assert_startup_line(keyhole: &Keyhole) {
    let logs = keyhole.logs();
    let line = if ktls::availability().is_available() {
        "kernel TLS: the kernel carries upstream TLS records"
    } else {
        "kernel TLS unavailable: keyhole's own record layer carries upstream TLS"
    };
    assert!(logs.contains(line), "the startup log says:\n{logs}");
}

#[test]
fn postgres_sessions_take_the_kernels_records_where_it_offers_them() {
    let path = expected_path();
    let pg = PgCluster::shared();
    let ca = pg.pki.ca.to_str().expect("the CA path is UTF-8");
    let keyhole = auto_keyhole(ca, &pg.keyhole_target());
    assert_startup_line(&keyhole);

    let out = clients::psql(keyhole.port(), MD5_USER, Some(MD5_PASS), COPY);
    let out = clients::expect_success(&out, "COPY through keyhole with --kernel-tls=auto");
    assert_eq!(out.lines().count(), ROWS, "every row of the COPY");
    assert!(out
        .lines()
        .all(|l| l.len() == 1000 && l.bytes().all(|b| b == b'x')));
    let sum = clients::psql(
        keyhole.port(),
        MD5_USER,
        Some(MD5_PASS),
        "select sum(length(repeat('y', g))) from generate_series(1, 3000) g",
    );
    assert_eq!(
        clients::expect_success(&sum, "a query").trim(),
        "4501500",
        "a query's answer through keyhole"
    );
    keyhole.wait_for_log(path, 2);
    keyhole.wait_for_log("outcome=\"client_closed\"", 2);
}

#[test]
fn mysql_sessions_take_the_kernels_records_where_it_offers_them() {
    let path = expected_path();
    let db = MariaDb::shared();
    let ca = db.pki().ca.to_str().expect("the CA path is UTF-8");
    let keyhole = auto_keyhole(ca, &db.keyhole_target());
    assert_startup_line(&keyhole);

    let out = mariadb::mariadb(
        keyhole.port(),
        NATIVE_USER,
        Some(NATIVE_PASS),
        "select length(group_concat(repeat('z', 1000) separator '')) from seq_1_to_300",
    );
    let text = clients::expect_success(&out, "a query through keyhole with --kernel-tls=auto");
    assert_eq!(text.trim(), "300000", "the answer through keyhole");
    keyhole.wait_for_log(path, 1);
    keyhole.wait_for_log("outcome=\"client_closed\"", 1);
}
