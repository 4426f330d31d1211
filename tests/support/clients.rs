//! Real PostgreSQL clients (`psql`, `pgbench`) with libpq's default settings.
//!
//! Every command starts from a clean environment: all `PG*` variables are removed
//! (so no PGSSLMODE, PGHOST, ... leaks in from the developer's shell) and
//! `PGPASSWORD` is set only when the caller passes a password. No `sslmode` is
//! given, so libpq uses its default (`prefer`): exactly what an application
//! pointed at keyhole does.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use super::postgres::pg_bin;
use super::process::{clean_env, describe_output, output_with_timeout};

/// Longest a single `psql` may run before the test fails.
pub const PSQL_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest a single `pgbench` may run before the test fails.
pub const PGBENCH_TIMEOUT: Duration = Duration::from_secs(600);

/// psql flags used by the `psql*` helpers: no psqlrc, unaligned tuples-only quiet
/// output, stop at the first error, and never prompt for a password (`-w`; a
/// prompt would otherwise hang a test run from a terminal).
pub const PSQL_FLAGS: [&str; 7] = ["-X", "-A", "-t", "-q", "-w", "-v", "ON_ERROR_STOP=1"];

/// A client program (from the same PostgreSQL installation as the server when
/// there is one) with a clean environment and, if given, `PGPASSWORD`.
pub fn command(program: &str, password: Option<&str>) -> Command {
    let mut cmd = Command::new(pg_bin(program));
    clean_env(&mut cmd);
    if let Some(password) = password {
        cmd.env("PGPASSWORD", password);
    }
    cmd
}

/// `psql` through TCP to 127.0.0.1:`port` (usually keyhole's), database
/// `postgres`, running `sql`.
pub fn psql(port: u16, user: &str, password: Option<&str>, sql: &str) -> Output {
    let port = port.to_string();
    psql_args(
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            user,
            "-d",
            "postgres",
            "-c",
            sql,
        ],
        password,
    )
}

/// `psql` through the Unix socket `socket_dir/.s.PGSQL.<port>`.
pub fn psql_unix(
    socket_dir: &Path,
    port: u16,
    user: &str,
    password: Option<&str>,
    sql: &str,
) -> Output {
    let dir = socket_dir.to_str().expect("socket directory is UTF-8");
    let port = port.to_string();
    psql_args(
        &[
            "-h", dir, "-p", &port, "-U", user, "-d", "postgres", "-c", sql,
        ],
        password,
    )
}

/// `psql` with a full libpq connection string, e.g.
/// `"host=127.0.0.1 port=5432 user=scram_user dbname=postgres sslmode=disable"`.
pub fn psql_conninfo(conninfo: &str, password: Option<&str>, sql: &str) -> Output {
    psql_args(&["-d", conninfo, "-c", sql], password)
}

/// `psql` with [`PSQL_FLAGS`] followed by `args`.
pub fn psql_args(args: &[&str], password: Option<&str>) -> Output {
    let mut cmd = command("psql", password);
    cmd.args(PSQL_FLAGS).args(args);
    output_with_timeout(&mut cmd, PSQL_TIMEOUT)
}

/// `pgbench` with exactly `args` (give it `-h 127.0.0.1 -p PORT -U USER` yourself).
pub fn pgbench(args: &[&str], password: Option<&str>) -> Output {
    let mut cmd = command("pgbench", password);
    cmd.args(args);
    output_with_timeout(&mut cmd, PGBENCH_TIMEOUT)
}

/// The command's stdout as text, trailing newlines removed.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim_end().to_string()
}

/// The command's stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts that the command succeeded and returns its trimmed stdout; the panic
/// message names `what` and shows both output streams.
pub fn expect_success(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\n{}",
        describe_output(out)
    );
    stdout(out)
}
