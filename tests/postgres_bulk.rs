//! A gigabyte each way through keyhole with psql's COPY: every byte arrives,
//! in order, unchanged. The expected data is generated, not stored, so the
//! tests stay cheap: COPY TO STDOUT is hashed against a SHA-256 of the same
//! stream generated here, and COPY FROM STDIN is checked row by row by the
//! server against the formula that generated it.

mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use support::clients;
use support::keyhole::Keyhole;
use support::logs::closed_lines;
use support::postgres::{PgCluster, SCRAM_PASS, SCRAM_USER};
use support::process::KillAfter;

/// Rows per COPY and letters per row: 131072 rows of about 8 KiB, 1 GiB and a
/// little more in all.
const ROWS: u32 = 131_072;
const LETTERS: usize = 8_184;
/// The server builds a row's letters as `repeat(repeat(letter, RUN), LETTERS / RUN)`:
/// the same text as one `repeat(letter, LETTERS)` for a fraction of the work.
const RUN: usize = 24;
const _: () = assert!(LETTERS.is_multiple_of(RUN));

/// The longest one COPY may take before psql is killed and the test fails.
const COPY_LIMIT: Duration = Duration::from_secs(600);

/// Both tests move a gigabyte through the same server, keyhole and two cores:
/// one at a time keeps each one's duration meaningful.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Which of the 26 letters row `row` is made of (the server's `row % 26`).
fn letter_index(row: u32) -> usize {
    (row % 26) as usize
}

/// `LETTERS` copies of each of the 26 letters starting at `base`, so that
/// building a row is a memcpy even in an unoptimised test build.
fn letter_runs(base: u8) -> Vec<Vec<u8>> {
    (0..26).map(|i| vec![base + i; LETTERS]).collect()
}

/// psql through keyhole as scram_user running `sql`, with stdin and stdout
/// as the caller says and stderr piped.
fn psql_command(port: u16, sql: &str) -> Command {
    let port = port.to_string();
    let mut cmd = clients::command("psql", Some(SCRAM_PASS));
    cmd.args(clients::PSQL_FLAGS)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            SCRAM_USER,
            "-d",
            "postgres",
            "-c",
            sql,
        ])
        .stderr(Stdio::piped());
    cmd
}

/// Reads the child's stderr to the end on a thread of its own.
fn drain_stderr(child: &mut Child) -> JoinHandle<String> {
    let mut pipe = child.stderr.take().expect("stderr is piped");
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

/// Waits for psql once its pipes are done; panics if the timer killed it.
fn reap(mut child: Child, timer: KillAfter, stderr: JoinHandle<String>) -> (ExitStatus, String) {
    let stderr = stderr.join().expect("the stderr reader thread");
    let killed = timer.disarm();
    let status = child.wait().expect("wait for psql");
    assert!(
        !killed,
        "psql took longer than {COPY_LIMIT:?} and was killed:\n{stderr}"
    );
    (status, stderr)
}

/// The closed line of keyhole's only session, waited for (it is written just
/// after the client sees the end of the session).
fn session_closed_line(keyhole: &Keyhole) -> HashMap<String, String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let logs = keyhole.logs();
        if let Some(line) = closed_lines(&logs)
            .into_iter()
            .find(|f| f.get("user").map(String::as_str) == Some(SCRAM_USER))
        {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "no \"connection closed\" line for the COPY session:\n{logs}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn count(fields: &HashMap<String, String>, key: &str) -> u64 {
    fields
        .get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number {key} in {fields:?}"))
}

/// Formats `n` in decimal into `out` (no allocation per row).
fn push_decimal(out: &mut Vec<u8>, n: u32) {
    let mut digits = [0u8; 10];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

#[test]
fn copy_out_of_a_gigabyte_arrives_intact() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let started = Instant::now();
    let pg = PgCluster::shared();
    let keyhole = Keyhole::for_cluster(pg, &[]);

    // Row i: "i<TAB>" then LETTERS times the letter for i, then a newline.
    let sql = format!(
        "COPY (SELECT i, repeat(repeat(chr(97 + i % 26), {RUN}), {}) \
         FROM generate_series(1, {ROWS}) AS i) TO STDOUT",
        LETTERS / RUN
    );
    let mut psql = psql_command(keyhole.port(), &sql)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start psql");
    let timer = KillAfter::arm(psql.id(), COPY_LIMIT);
    let stderr = drain_stderr(&mut psql);
    let mut stdout = psql.stdout.take().expect("stdout is piped");
    let mut received = Sha256::new();
    let mut received_bytes = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = stdout.read(&mut buf).expect("read psql's output");
        if n == 0 {
            break;
        }
        received.update(&buf[..n]);
        received_bytes += n as u64;
    }
    let (status, stderr) = reap(psql, timer, stderr);
    assert!(
        status.success(),
        "psql COPY TO STDOUT failed ({status}):\n{stderr}\nkeyhole log:\n{}",
        keyhole.logs()
    );
    let copy_time = started.elapsed();

    let runs = letter_runs(b'a');
    let mut expected = Sha256::new();
    let mut expected_bytes = 0u64;
    let mut prefix = Vec::with_capacity(16);
    for i in 1..=ROWS {
        prefix.clear();
        push_decimal(&mut prefix, i);
        prefix.push(b'\t');
        expected.update(&prefix);
        expected.update(&runs[letter_index(i)]);
        expected.update(b"\n");
        expected_bytes += prefix.len() as u64 + LETTERS as u64 + 1;
    }
    assert_eq!(
        received_bytes, expected_bytes,
        "bytes out of COPY TO STDOUT"
    );
    assert_eq!(
        received.finalize(),
        expected.finalize(),
        "SHA-256 of COPY TO STDOUT differs from the generated rows"
    );

    // keyhole counted at least the rows (plus the protocol's framing) towards the client.
    let closed = session_closed_line(&keyhole);
    assert_eq!(
        closed.get("outcome").map(String::as_str),
        Some("client_closed")
    );
    let to_client = count(&closed, "bytes_to_client");
    assert!(
        to_client > expected_bytes,
        "bytes_to_client={to_client} for {expected_bytes} bytes of rows"
    );
    eprintln!(
        "COPY out: {expected_bytes} bytes in {copy_time:?}, {:?} with the check",
        started.elapsed()
    );
}

#[test]
fn copy_in_of_a_gigabyte_arrives_intact() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let started = Instant::now();
    let pg = PgCluster::shared();
    let keyhole = Keyhole::for_cluster(pg, &[]);
    let table = "keyhole_bulk_in";
    // Set up directly, so the COPY is keyhole's only session. lz4 keeps the
    // server's share of the work small (pglz if the server has no lz4).
    pg.admin_sql(&format!(
        "DROP TABLE IF EXISTS {table};
         DO $$ BEGIN
             CREATE UNLOGGED TABLE {table} (id int, line text COMPRESSION lz4);
         EXCEPTION WHEN feature_not_supported THEN
             CREATE UNLOGGED TABLE {table} (id int, line text);
         END $$;
         GRANT INSERT ON {table} TO {SCRAM_USER}"
    ));

    // Row i: "i<TAB>i:" then LETTERS times the letter for i, then a newline.
    let mut psql = psql_command(keyhole.port(), &format!("COPY {table} FROM STDIN"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start psql");
    let timer = KillAfter::arm(psql.id(), COPY_LIMIT);
    let stderr = drain_stderr(&mut psql);
    let mut stdin = psql.stdin.take().expect("stdin is piped");
    let runs = letter_runs(b'A');
    let mut sent_bytes = 0u64;
    let mut line_bytes = 0u64;
    let mut chunk = Vec::with_capacity(1 << 20);
    let mut write_error = None;
    for i in 1..=ROWS {
        let row_start = chunk.len();
        push_decimal(&mut chunk, i);
        chunk.push(b'\t');
        let line_start = chunk.len();
        push_decimal(&mut chunk, i);
        chunk.push(b':');
        chunk.extend_from_slice(&runs[letter_index(i)]);
        line_bytes += (chunk.len() - line_start) as u64;
        chunk.push(b'\n');
        sent_bytes += (chunk.len() - row_start) as u64;
        if chunk.len() >= (1 << 20) - LETTERS - 32 || i == ROWS {
            if let Err(e) = stdin.write_all(&chunk) {
                write_error = Some(e);
                break;
            }
            chunk.clear();
        }
    }
    drop(stdin);
    let (status, stderr) = reap(psql, timer, stderr);
    assert!(
        status.success() && write_error.is_none(),
        "psql COPY FROM STDIN failed ({status}, writing: {write_error:?}):\n{stderr}\n\
         keyhole log:\n{}",
        keyhole.logs()
    );
    let copy_time = started.elapsed();

    // Straight to the server: every row is there once and equals the formula.
    let verdict = pg.admin_sql(&format!(
        "SELECT count(*), count(DISTINCT id), min(id), max(id), sum(octet_length(line)), \
                count(*) FILTER (WHERE line IS DISTINCT FROM \
                                 id || ':' || repeat(repeat(chr(65 + id % 26), {RUN}), {})) \
         FROM {table}",
        LETTERS / RUN
    ));
    assert_eq!(
        verdict,
        format!("{ROWS}|{ROWS}|1|{ROWS}|{line_bytes}|0"),
        "rows|distinct ids|min id|max id|bytes of text|rows that differ from what was sent"
    );
    pg.admin_sql(&format!("DROP TABLE {table}"));

    let closed = session_closed_line(&keyhole);
    assert_eq!(
        closed.get("outcome").map(String::as_str),
        Some("client_closed")
    );
    let from_client = count(&closed, "bytes_from_client");
    assert!(
        from_client > sent_bytes,
        "bytes_from_client={from_client} for {sent_bytes} bytes of rows"
    );
    eprintln!(
        "COPY in: {sent_bytes} bytes in {copy_time:?}, {:?} with the check",
        started.elapsed()
    );
}
