//! `keyhole connect [OPTIONS] TARGET [-- CLIENT-ARGS...]`: one target, one
//! client, one command (what `gcloud sql connect` and `tsh db connect` do,
//! with TLS verified end to end).
//!
//! keyhole runs as a child process for TARGET on a free port of 127.0.0.1,
//! in its own process group (so the terminal's Ctrl-C reaches only the
//! client, which uses it to cancel a query), with every option given here
//! but `connect`'s own and `--run-connection-test` (the database is reached
//! once first, so a target that cannot work fails here, and a Cloud SQL
//! instance's engine is known). Once it logs that it listens (with the
//! target's protocol), the client
//! runs in the foreground with the terminal: `psql` for PostgreSQL,
//! `mariadb` (else `mysql`) for MySQL, or `--client` / `$KEYHOLE_CLIENT`,
//! pointed at keyhole with the user and database asked for, then
//! CLIENT-ARGS; `connect` itself ignores the terminal's Ctrl-C meanwhile,
//! and keyhole ends with `connect` however it ends (Linux: the parent-death
//! signal). When the client ends, keyhole is stopped and `connect` exits
//! with the client's exit code. keyhole's warnings and errors reach the
//! terminal as they happen; if it stops before it listens, its last lines
//! are shown and `connect` exits 2.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::{EXIT_FAILED, EXIT_USAGE};

/// How long keyhole may take to listen (a Cloud SQL instance's first
/// certificate, an SSH login, a cloud session).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// keyhole's lines kept to show when it stops before it listens.
const KEPT_LINES: usize = 40;

const USAGE: &str = "usage: keyhole connect [--client PROGRAM] [--db-user NAME] [--database NAME] [KEYHOLE OPTIONS] TARGET [-- CLIENT-ARGS...]";

/// `connect`'s own options; everything else is keyhole's.
#[derive(Debug, Default, PartialEq, Eq)]
struct Options {
    client: Option<OsString>,
    db_user: Option<String>,
    database: Option<String>,
    keyhole: Vec<OsString>,
    client_args: Vec<OsString>,
}

/// Splits `args` (after `connect`) into connect's options, keyhole's and the
/// client's (after `--`).
fn split(args: &[OsString]) -> Result<Options, String> {
    let mut options = Options::default();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let text = arg.to_string_lossy();
        if text == "--" {
            options.client_args = rest.cloned().collect();
            break;
        }
        let (name, inline) = match text.split_once('=') {
            Some((name, value)) if name.starts_with("--") => {
                (name.to_owned(), Some(value.to_owned()))
            }
            _ => (text.clone().into_owned(), None),
        };
        let mut value = |what: &str| -> Result<String, String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => rest
                    .next()
                    .map(|v| v.to_string_lossy().into_owned())
                    .ok_or_else(|| format!("{what} needs a value")),
            }
        };
        match name.as_str() {
            "--client" => options.client = Some(value("--client")?.into()),
            "--db-user" => options.db_user = Some(value("--db-user")?),
            "--database" => options.database = Some(value("--database")?),
            "--port" | "--address" | "--unix-socket" | "-p" | "-a" => {
                return Err(format!(
                    "{name}: keyhole connect chooses its own address (a free port on 127.0.0.1)"
                ))
            }
            _ => options.keyhole.push(arg.clone()),
        }
    }
    Ok(options)
}

/// The client's program and its arguments for keyhole at 127.0.0.1:`port`.
fn client_command(
    protocol: &str,
    port: u16,
    options: &Options,
    env_client: Option<OsString>,
) -> Result<(OsString, Vec<OsString>), String> {
    let program = match options.client.clone().or(env_client) {
        Some(program) => program,
        None => match protocol {
            "postgres" => "psql".into(),
            "mysql" => find_program(&["mariadb", "mysql"]).unwrap_or_else(|| "mysql".into()),
            other => {
                return Err(format!(
                    "keyhole does not know which client speaks the target's protocol ({other}): give --client"
                ))
            }
        },
    };
    // The flags for port, user and database: mysql and mariadb spell them
    // -P -u -D, psql -p -U -d.
    let (port_flag, user_flag, db_flag) = match protocol {
        "mysql" => ("-P", "-u", "-D"),
        _ => ("-p", "-U", "-d"),
    };
    let mut args: Vec<OsString> = vec!["-h".into(), "127.0.0.1".into()];
    args.extend([port_flag.into(), port.to_string().into()]);
    if let Some(user) = &options.db_user {
        args.extend([user_flag.into(), user.into()]);
    }
    if let Some(db) = &options.database {
        args.extend([db_flag.into(), db.into()]);
    }
    args.extend(options.client_args.iter().cloned());
    Ok((program, args))
}

/// The first of `names` on PATH.
fn find_program(names: &[&str]) -> Option<OsString> {
    let path = std::env::var_os("PATH")?;
    names.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
            .map(|_| OsString::from(name))
    })
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn main(args: &[OsString]) -> ExitCode {
    let rest = &args[1..];
    if rest.iter().any(|a| a == "--help" || a == "-h") && !rest.iter().any(|a| a == "--") {
        println!("{USAGE}\n\nRuns keyhole for TARGET on a free port of 127.0.0.1 and the client for its protocol\n(psql, mariadb or mysql; --client or KEYHOLE_CLIENT to choose), pointed at it, then\nstops keyhole and exits with the client's exit code. KEYHOLE OPTIONS are keyhole's own\n(keyhole --help).");
        return ExitCode::SUCCESS;
    }
    let options = match split(rest) {
        Ok(options) => options,
        Err(e) => {
            eprintln!("keyhole connect: {e}\n{USAGE}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match run(&options) {
        Ok(code) => code,
        Err((code, message)) => {
            eprintln!("keyhole connect: {message}");
            ExitCode::from(code)
        }
    }
}

fn run(options: &Options) -> Result<ExitCode, (u8, String)> {
    let port = free_port().map_err(|e| (EXIT_FAILED, format!("no free port on 127.0.0.1: {e}")))?;
    let exe = std::env::current_exe().map_err(|e| {
        (
            EXIT_FAILED,
            format!("cannot find keyhole's own executable: {e}"),
        )
    })?;
    let mut keyhole = Command::new(&exe);
    keyhole.args(["--address", "127.0.0.1", "--port", &port.to_string()]);
    // The database is reached once before the client starts: a target that
    // cannot work says so here, and a Cloud SQL instance's engine is known.
    if !options.keyhole.iter().any(|a| a == "--run-connection-test") {
        keyhole.arg("--run-connection-test");
    }
    keyhole
        .args(&options.keyhole)
        // Its lines are read here: the listening line, then warnings.
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .env("KEYHOLE_LOG_FORMAT", "text")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // Not in the terminal's foreground group: Ctrl-C is the client's.
        .process_group(0);
    // However `connect` ends (a closed terminal included), keyhole ends too.
    crate::transport::ssh::sys::end_with_keyhole(&mut keyhole);
    let mut child = keyhole
        .spawn()
        .map_err(|e| (EXIT_FAILED, format!("cannot start keyhole: {e}")))?;
    let Some(stderr) = child.stderr.take() else {
        stop(&mut child);
        return Err((EXIT_FAILED, "keyhole's output is not readable".into()));
    };
    let (lines_tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let protocol = match wait_listening(&mut child, &lines) {
        Ok(protocol) => protocol,
        Err(said) => {
            let status = child.wait().ok().and_then(|s| s.code());
            stop(&mut child);
            let code = match status {
                Some(c) if c > 0 && c < 256 => c as u8,
                _ => EXIT_USAGE,
            };
            return Err((code, said));
        }
    };
    // From here keyhole's warnings and errors go to the terminal.
    std::thread::spawn(move || {
        for line in lines {
            if line.contains(" WARN ") || line.contains(" ERROR ") {
                let _ = writeln!(std::io::stderr(), "keyhole: {}", line.trim());
            }
        }
    });
    let env_client = std::env::var_os("KEYHOLE_CLIENT").filter(|c| !c.is_empty());
    let (program, args) = match client_command(&protocol, port, options, env_client) {
        Ok(command) => command,
        Err(e) => {
            stop(&mut child);
            return Err((EXIT_USAGE, e));
        }
    };
    let client = Command::new(&program).args(&args).spawn();
    // The client has the terminal now: Ctrl-C and Ctrl-\ are its (psql
    // cancels the query); `connect` waits for it and stops keyhole after.
    ignore_terminal_signals();
    let status = client.and_then(|mut client| client.wait());
    stop(&mut child);
    match status {
        Ok(status) => Ok(ExitCode::from(exit_code(status))),
        Err(e) => Err((
            EXIT_FAILED,
            format!("cannot run {}: {e}", OsStr::new(&program).to_string_lossy()),
        )),
    }
}

/// Reads keyhole's lines until it listens; returns the target's protocol.
/// An error holds the lines it wrote before it stopped.
fn wait_listening(child: &mut Child, lines: &mpsc::Receiver<String>) -> Result<String, String> {
    let mut kept: VecDeque<String> = VecDeque::new();
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    loop {
        match lines.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                if let Some(protocol) = listening(&line) {
                    return Ok(protocol);
                }
                if kept.len() == KEPT_LINES {
                    kept.pop_front();
                }
                kept.push_back(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = child.wait();
                return Err(said("keyhole stopped before it listened", &kept));
            }
        }
        if std::time::Instant::now() > deadline {
            return Err(said(
                &format!(
                    "keyhole did not listen within {} s",
                    READY_TIMEOUT.as_secs()
                ),
                &kept,
            ));
        }
    }
}

fn said(what: &str, lines: &VecDeque<String>) -> String {
    let mut text = what.to_owned();
    for line in lines {
        text.push_str("\n  ");
        text.push_str(line.trim());
    }
    text
}

/// The protocol in keyhole's "listening" line, text or JSON (the user's
/// `--log-format` wins over the one asked for here).
fn listening(line: &str) -> Option<String> {
    if line.trim_start().starts_with('{') {
        let value: serde_json::Value = serde_json::from_str(line).ok()?;
        let fields = value.get("fields").unwrap_or(&value);
        if fields.get("message")?.as_str()? != "listening" {
            return None;
        }
        return fields.get("protocol")?.as_str().map(str::to_owned);
    }
    if !line.contains(" listening ") {
        return None;
    }
    field(line, "protocol")
}

/// `name=value` (or `name="value"`) in a text log line.
fn field(line: &str, name: &str) -> Option<String> {
    let start = line.find(&format!(" {name}="))? + name.len() + 2;
    let value = &line[start..];
    let value = value.split_whitespace().next()?;
    Some(value.trim_matches('"').to_owned())
}

/// SIGINT and SIGQUIT from the terminal are the client's to act on.
fn ignore_terminal_signals() {
    for signal in [libc::SIGINT, libc::SIGQUIT] {
        // SAFETY: setting a signal's disposition to SIG_IGN has no
        // preconditions; the client was spawned before, with its defaults.
        unsafe {
            libc::signal(signal, libc::SIG_IGN);
        }
    }
}

/// SIGTERM, then a bounded wait, then SIGKILL.
fn stop(child: &mut Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The client's exit code; 128 + the signal that ended it, as shells say.
fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(EXIT_FAILED),
        (None, Some(signal)) => u8::try_from(128 + signal).unwrap_or(EXIT_FAILED),
        _ => EXIT_FAILED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn connects_options_are_taken_and_the_rest_is_keyholes_or_the_clients() {
        let o = split(&os(&[
            "--db-user",
            "alice",
            "--ca-file",
            "ca.pem",
            "--database=orders",
            "postgres://db",
            "--",
            "-c",
            "select 1",
        ]))
        .expect("valid");
        assert_eq!(o.db_user.as_deref(), Some("alice"));
        assert_eq!(o.database.as_deref(), Some("orders"));
        assert_eq!(o.keyhole, os(&["--ca-file", "ca.pem", "postgres://db"]));
        assert_eq!(o.client_args, os(&["-c", "select 1"]));
        let err = split(&os(&["--port", "5432", "postgres://db"])).expect_err("own port");
        assert!(err.contains("chooses its own address"), "{err}");
        let err = split(&os(&["postgres://db", "--db-user"])).expect_err("no value");
        assert!(err.contains("--db-user needs a value"), "{err}");
    }

    #[test]
    fn each_client_is_pointed_at_keyhole_in_its_own_words() {
        let o = Options {
            db_user: Some("alice".into()),
            database: Some("orders".into()),
            client_args: os(&["-c", "select 1"]),
            ..Options::default()
        };
        let (program, args) = client_command("postgres", 6432, &o, None).expect("psql");
        assert_eq!(program, "psql");
        assert_eq!(
            args,
            os(&[
                "-h",
                "127.0.0.1",
                "-p",
                "6432",
                "-U",
                "alice",
                "-d",
                "orders",
                "-c",
                "select 1"
            ])
        );
        let (_, args) = client_command("mysql", 3307, &o, None).expect("mysql");
        assert_eq!(
            args,
            os(&[
                "-h",
                "127.0.0.1",
                "-P",
                "3307",
                "-u",
                "alice",
                "-D",
                "orders",
                "-c",
                "select 1"
            ])
        );
        let (program, _) =
            client_command("postgres", 1, &Options::default(), Some("pgcli".into())).expect("env");
        assert_eq!(program, "pgcli");
    }

    #[test]
    fn the_listening_line_gives_the_protocol() {
        let line =
            "2026-12-06T22:00:00Z  INFO listening target=p:r:i listen=127.0.0.1:5 protocol=mysql";
        assert_eq!(listening(line).as_deref(), Some("mysql"));
        let json = r#"{"timestamp":"x","level":"INFO","fields":{"message":"listening","target":"p:r:i","protocol":"postgres"}}"#;
        assert_eq!(listening(json).as_deref(), Some("postgres"));
        assert_eq!(listening("2026  INFO keyhole is ready targets=1"), None);
        assert_eq!(field(line, "listen").as_deref(), Some("127.0.0.1:5"));
        assert_eq!(field(line, "nothing"), None);
    }
}
