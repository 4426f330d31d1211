//! A tokio-postgres session through keyhole, driven from a synchronous test:
//! open it, query it, close it, and wait for things in between.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use tokio::runtime::Runtime;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use super::postgres::{SCRAM_PASS, SCRAM_USER};

/// Longest a query may take to answer before the test fails.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(20);

/// A session through keyhole on `port` as scram_user, tagged with
/// `application_name = app` so the server's pg_stat_activity can find it.
/// The returned task drives the connection; its errors show up on the
/// client's next request.
pub fn connect(rt: &Runtime, port: u16, app: &str) -> (Client, JoinHandle<()>) {
    let conninfo = format!(
        "host=127.0.0.1 port={port} user={SCRAM_USER} password={SCRAM_PASS} dbname=postgres \
         application_name={app} connect_timeout=20"
    );
    let (client, connection) = rt
        .block_on(tokio_postgres::connect(&conninfo, NoTls))
        .unwrap_or_else(|e| panic!("connecting through keyhole on port {port} failed: {e}"));
    let task = rt.spawn(async move {
        let _ = connection.await;
    });
    (client, task)
}

/// Runs `sql` and returns the first column of every row.
pub fn simple_query(
    rt: &Runtime,
    client: &Client,
    sql: &str,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let answer = rt
        .block_on(async { tokio::time::timeout(ANSWER_WITHIN, client.simple_query(sql)).await })
        .unwrap_or_else(|_| panic!("`{sql}` got no answer within {ANSWER_WITHIN:?}"))?;
    Ok(answer
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .collect())
}

/// Calls `done` until it returns true; panics with `what` and `context()`
/// after `limit`.
pub fn wait_until(
    what: &str,
    limit: Duration,
    mut done: impl FnMut() -> bool,
    context: impl Fn() -> String,
) {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() >= deadline {
            panic!("{what}: still not the case after {limit:?}\n{}", context());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The exit code of a process that exited; panics if a signal killed it.
pub fn exit_code(status: ExitStatus) -> Option<i32> {
    assert!(
        status.signal().is_none(),
        "the process was killed by signal {:?} instead of exiting",
        status.signal()
    );
    status.code()
}
