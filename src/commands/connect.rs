//! `keyhole connect [OPTIONS] TARGET [-- CLIENT-ARGS...]`: one target, one
//! client, one command (what `gcloud sql connect` and `tsh db connect` do,
//! with TLS verified end to end).
//!
//! keyhole runs as a child process for TARGET on a Unix socket in a
//! directory only the user can open (with a token login, whoever reaches
//! keyhole is logged in as the user, and a loopback port is open to every
//! local user) or, with `--tcp`, on a free port of 127.0.0.1. It runs in
//! its own process group (so the terminal's Ctrl-C reaches only the client,
//! which uses it to cancel a query), with every option given here but
//! `connect`'s own, and `--run-connection-test` (the database is reached
//! once first, so a target that cannot work fails here, and a Cloud SQL
//! instance's engine is known). Once it logs its ready line (with the
//! target's protocol and address), the client
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
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::{EXIT_FAILED, EXIT_USAGE};

/// How long keyhole may take to listen (a Cloud SQL instance's first
/// certificate, an SSH login, a cloud session).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// keyhole's lines kept to show when it stops before it listens.
const KEPT_LINES: usize = 40;

const USAGE: &str = "usage: keyhole connect [--client PROGRAM] [--db-user NAME] [--database NAME] [--tcp] [KEYHOLE OPTIONS] TARGET [-- CLIENT-ARGS...]";

/// `connect`'s own options; everything else is keyhole's.
#[derive(Debug, Default, PartialEq, Eq)]
struct Options {
    client: Option<OsString>,
    db_user: Option<String>,
    database: Option<String>,
    /// `--tcp`: a free port of 127.0.0.1 rather than a private Unix socket.
    tcp: bool,
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
            "--tcp" => options.tcp = true,
            "--port" | "--address" | "--unix-socket" | "-p" | "-a" | "-u" => {
                return Err(format!(
                    "{name}: keyhole connect chooses its own address (a Unix socket in a private directory, or with --tcp a free port on 127.0.0.1)"
                ))
            }
            _ => options.keyhole.push(arg.clone()),
        }
    }
    Ok(options)
}

/// Where the client finds keyhole.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reach {
    /// 127.0.0.1 and this port.
    Tcp(u16),
    /// This socket file.
    Unix(PathBuf),
}

impl Reach {
    /// From keyhole's `listen=`: an address, or a socket file's path.
    fn from_listen(listen: &str) -> Result<Reach, String> {
        if listen.starts_with('/') {
            return Ok(Reach::Unix(PathBuf::from(listen)));
        }
        listen
            .parse::<std::net::SocketAddr>()
            .map(|a| Reach::Tcp(a.port()))
            .map_err(|_| format!("keyhole said it listens on {listen:?}, which is neither an address nor a socket path"))
    }
}

/// The client's program and its arguments for keyhole at `reach`.
fn client_command(
    protocol: &str,
    reach: &Reach,
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
    let mut args: Vec<OsString> = Vec::new();
    match reach {
        Reach::Tcp(port) => {
            args.extend(["-h".into(), "127.0.0.1".into()]);
            args.extend([port_flag.into(), port.to_string().into()]);
        }
        // mysql and mariadb take the socket file itself.
        Reach::Unix(path) if protocol == "mysql" => {
            args.extend(["-S".into(), path.clone().into_os_string()]);
        }
        // libpq takes its directory and the port in the file's name
        // (DIR/.s.PGSQL.PORT).
        Reach::Unix(path) => {
            let port = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix(".s.PGSQL."))
                .ok_or_else(|| {
                    format!(
                        "keyhole's socket {} is not where libpq looks (DIR/.s.PGSQL.PORT)",
                        path.display()
                    )
                })?;
            let dir = path.parent().unwrap_or(Path::new("/"));
            args.extend(["-h".into(), dir.as_os_str().to_owned()]);
            args.extend([port_flag.into(), port.into()]);
        }
    }
    if let Some(user) = &options.db_user {
        args.extend([user_flag.into(), user.into()]);
    }
    if let Some(db) = &options.database {
        args.extend([db_flag.into(), db.into()]);
    }
    args.extend(options.client_args.iter().cloned());
    Ok((program, args))
}

/// A directory only this user can open, for keyhole's socket; removed with
/// everything in it when dropped.
struct PrivateDir(PathBuf);

impl PrivateDir {
    /// Under `$XDG_RUNTIME_DIR` (already private, cleaned at logout), else
    /// the temporary directory. The name is short: a socket's path has a
    /// limit of about 100 bytes, and a Cloud SQL instance's name goes in it.
    fn create() -> Result<PrivateDir, String> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|d| d.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let pid = std::process::id();
        let mut last = None;
        for attempt in 0..100u32 {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let dir = base.join(format!("keyhole-{pid}-{:x}", nanos ^ attempt));
            // mode 0700 from the start: no moment where others may enter.
            match crate::platform::files::create_private_dir(&dir) {
                Ok(()) => return Ok(PrivateDir(dir)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => {
                    return Err(format!(
                        "cannot create a private directory in {}: {e}",
                        base.display()
                    ))
                }
            }
        }
        Err(format!(
            "cannot create a private directory in {}: {}",
            base.display(),
            last.map_or_else(String::new, |e| e.to_string())
        ))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
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

/// keyhole's options `connect` refuses: it chooses where keyhole listens.
const OWN_ADDRESS: &[&str] = &["port", "address", "unix-socket"];

/// `connect`'s command line as clap describes it, for `--help`, completions
/// and the man page. [`split`] parses it (keyhole's options pass through
/// untouched, so they are parsed once, by keyhole); a test checks the two
/// agree on `connect`'s own options.
pub(crate) fn command() -> clap::Command {
    use clap::{Arg, ArgAction, CommandFactory};
    let mut command = clap::Command::new("connect")
        .about("Run keyhole for one target and psql or mariadb pointed at it; exit with the client's exit code")
        .long_about(
            "Runs keyhole for TARGET on a Unix socket in a private directory (--tcp: a free port of \
             127.0.0.1) and the client for its protocol \
             (psql, mariadb or mysql; --client or KEYHOLE_CLIENT to choose), pointed at it, then stops \
             keyhole and exits with the client's exit code. Every other option is keyhole's own \
             (keyhole --help); CLIENT-ARGS after -- go to the client.",
        )
        .override_usage(USAGE.trim_start_matches("usage: "))
        .arg(
            Arg::new("client")
                .long("client")
                .value_name("PROGRAM")
                .help("The client to run. [default: KEYHOLE_CLIENT, else psql for Postgres, mariadb or mysql for MySQL]"),
        )
        .arg(
            Arg::new("db-user")
                .long("db-user")
                .value_name("NAME")
                .help("The database user the client logs in as (psql -U, mariadb -u)."),
        )
        .arg(
            Arg::new("database")
                .long("database")
                .value_name("NAME")
                .help("The database the client opens (psql -d, mariadb -D)."),
        )
        .arg(
            Arg::new("tcp")
                .long("tcp")
                .action(ArgAction::SetTrue)
                .help("Listen on a free port of 127.0.0.1 instead of a Unix socket in a private directory (which only your user can open: with a token login, whoever reaches keyhole is logged in as you)."),
        );
    for arg in crate::config::Cli::command().get_arguments() {
        let refused = arg.get_long().is_some_and(|l| OWN_ADDRESS.contains(&l));
        if refused || matches!(arg.get_id().as_str(), "help" | "version") {
            continue;
        }
        command = command.arg(arg.clone());
    }
    command.arg(
        Arg::new("client-args")
            .value_name("CLIENT-ARGS")
            .action(ArgAction::Append)
            .last(true)
            .help("Arguments for the client, after --."),
    )
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn main(args: &[OsString]) -> ExitCode {
    let rest = &args[1..];
    if rest.iter().any(|a| a == "--help" || a == "-h") && !rest.iter().any(|a| a == "--") {
        let mut command = command().bin_name("keyhole connect");
        let _ = command.print_long_help();
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
    let exe = std::env::current_exe().map_err(|e| {
        (
            EXIT_FAILED,
            format!("cannot find keyhole's own executable: {e}"),
        )
    })?;
    let mut keyhole = Command::new(&exe);
    // Kept until keyhole has stopped: its socket is in it.
    let mut _private: Option<PrivateDir> = None;
    // Without Unix sockets (Windows) a loopback port is the only way.
    if options.tcp || !crate::platform::UNIX_SOCKETS {
        let port =
            free_port().map_err(|e| (EXIT_FAILED, format!("no free port on 127.0.0.1: {e}")))?;
        keyhole.args(["--address", "127.0.0.1", "--port", &port.to_string()]);
    } else {
        let dir = PrivateDir::create().map_err(|e| (EXIT_FAILED, e))?;
        keyhole.arg("--unix-socket").arg(&dir.0);
        _private = Some(dir);
    }
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
        .stderr(Stdio::piped());
    // Not in the terminal's foreground group: Ctrl-C is the client's.
    crate::platform::child::away_from_the_terminal(&mut keyhole);
    // However `connect` ends (a closed terminal included), keyhole ends too.
    crate::platform::child::end_with_parent(&mut keyhole);
    let mut child = keyhole
        .spawn()
        .map_err(|e| (EXIT_FAILED, format!("cannot start keyhole: {e}")))?;
    let Some(stderr) = child.stderr.take() else {
        crate::platform::child::stop(&mut child);
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
    let ready = match wait_listening(&mut child, &lines) {
        Ok(ready) => ready,
        Err(said) => {
            let status = child.wait().ok().and_then(|s| s.code());
            crate::platform::child::stop(&mut child);
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
    let command = Reach::from_listen(&ready.listen)
        .and_then(|reach| client_command(&ready.protocol, &reach, options, env_client));
    let (program, args) = match command {
        Ok(command) => command,
        Err(e) => {
            crate::platform::child::stop(&mut child);
            return Err((EXIT_USAGE, e));
        }
    };
    let client = Command::new(&program).args(&args).spawn();
    // The client has the terminal now: Ctrl-C and Ctrl-\ are its (psql
    // cancels the query); `connect` waits for it and stops keyhole after.
    crate::platform::child::leave_interrupts_to_the_client();
    let status = client.and_then(|mut client| client.wait());
    crate::platform::child::stop(&mut child);
    match status {
        Ok(status) => Ok(ExitCode::from(crate::platform::child::exit_code(
            status,
            EXIT_FAILED,
        ))),
        Err(e) => Err((
            EXIT_FAILED,
            format!("cannot run {}: {e}", OsStr::new(&program).to_string_lossy()),
        )),
    }
}

/// What keyhole's ready line says.
#[derive(Debug, PartialEq, Eq)]
struct Ready {
    protocol: String,
    listen: String,
}

/// Reads keyhole's lines until it listens; returns where and what.
/// An error holds the lines it wrote before it stopped.
fn wait_listening(child: &mut Child, lines: &mpsc::Receiver<String>) -> Result<Ready, String> {
    let mut kept: VecDeque<String> = VecDeque::new();
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    loop {
        match lines.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                if let Some(ready) = listening(&line) {
                    return Ok(ready);
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

/// keyhole's ready line ([`crate::proxy`] logs one per listener, with the
/// fields `listen` and `protocol`), text or JSON (the user's `--log-format`
/// wins over the one asked for here).
fn listening(line: &str) -> Option<Ready> {
    if line.trim_start().starts_with('{') {
        let value: serde_json::Value = serde_json::from_str(line).ok()?;
        let fields = value.get("fields").unwrap_or(&value);
        let text = |name: &str| fields.get(name)?.as_str().map(str::to_owned);
        return Some(Ready {
            protocol: text("protocol")?,
            listen: text("listen")?,
        });
    }
    if !line.contains(" INFO ") {
        return None;
    }
    Some(Ready {
        protocol: field(line, "protocol")?,
        listen: field(line, "listen")?,
    })
}

/// `name=value` (or `name="value"`) in a text log line.
fn field(line: &str, name: &str) -> Option<String> {
    let start = line.find(&format!(" {name}="))? + name.len() + 2;
    let value = &line[start..];
    let value = value.split_whitespace().next()?;
    Some(value.trim_matches('"').to_owned())
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
        let (program, args) =
            client_command("postgres", &Reach::Tcp(6432), &o, None).expect("psql");
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
        let (_, args) = client_command("mysql", &Reach::Tcp(3307), &o, None).expect("mysql");
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
        let (program, _) = client_command(
            "postgres",
            &Reach::Tcp(1),
            &Options::default(),
            Some("pgcli".into()),
        )
        .expect("env");
        assert_eq!(program, "pgcli");
    }

    #[test]
    fn on_a_unix_socket_libpq_gets_the_directory_and_mariadb_the_file() {
        let o = Options {
            db_user: Some("alice".into()),
            ..Options::default()
        };
        let pg = Reach::Unix("/run/user/1/keyhole-1-a/p:r:i/.s.PGSQL.5432".into());
        let (_, args) = client_command("postgres", &pg, &o, None).expect("psql");
        assert_eq!(
            args,
            os(&[
                "-h",
                "/run/user/1/keyhole-1-a/p:r:i",
                "-p",
                "5432",
                "-U",
                "alice"
            ])
        );
        let my = Reach::Unix("/tmp/keyhole-1-a/mysql-3306.sock".into());
        let (_, args) = client_command("mysql", &my, &o, None).expect("mariadb");
        assert_eq!(
            args,
            os(&["-S", "/tmp/keyhole-1-a/mysql-3306.sock", "-u", "alice"])
        );
        let odd = Reach::Unix("/tmp/x/db.sock".into());
        let err = client_command("postgres", &odd, &o, None).expect_err("not libpq's name");
        assert!(err.contains("DIR/.s.PGSQL.PORT"), "{err}");
    }

    #[test]
    fn the_private_directory_is_the_users_alone_and_goes_with_connect() {
        use crate::platform::files;
        let dir = PrivateDir::create().expect("created");
        let path = dir.0.clone();
        let mode = files::mode(&std::fs::metadata(&path).expect("exists"));
        assert_eq!(mode, Some(files::PRIVATE_DIR_MODE), "{}", path.display());
        std::fs::write(path.join(".s.PGSQL.5432"), b"").expect("writable");
        drop(dir);
        assert!(!path.exists(), "{} left behind", path.display());
    }

    #[test]
    fn the_ready_line_gives_the_protocol_and_the_address() {
        let line = "2026-12-06T22:00:00Z  INFO mysql p:r:i ready on 127.0.0.1:5 (mariadb -h 127.0.0.1 -P 5) target=p:r:i listen=127.0.0.1:5 protocol=mysql";
        let ready = listening(line).expect("ready");
        assert_eq!(ready.protocol, "mysql");
        assert_eq!(Reach::from_listen(&ready.listen), Ok(Reach::Tcp(5)));
        let json = r#"{"timestamp":"x","level":"INFO","fields":{"message":"postgres p:r:i ready on /d/.s.PGSQL.5432","target":"p:r:i","listen":"/d/.s.PGSQL.5432","protocol":"postgres"}}"#;
        assert_eq!(
            listening(json),
            Some(Ready {
                protocol: "postgres".into(),
                listen: "/d/.s.PGSQL.5432".into()
            })
        );
        assert_eq!(listening("2026  INFO keyhole is ready targets=1"), None);
        assert_eq!(
            listening("2026  WARN something listen=1 protocol=x"),
            None,
            "only the INFO ready line"
        );
        assert!(Reach::from_listen("tcp").is_err());
        assert_eq!(field(line, "nothing"), None);
    }

    /// Every option `split` takes is in the clap description (help,
    /// completions, man page), and the other way round.
    #[test]
    fn the_described_options_are_the_parsed_ones() {
        let keyhole: Vec<String> = <crate::config::Cli as clap::CommandFactory>::command()
            .get_arguments()
            .filter_map(|a| a.get_long().map(str::to_owned))
            .collect();
        let own: Vec<String> = command()
            .get_arguments()
            .filter_map(|a| a.get_long().map(str::to_owned))
            .filter(|l| !keyhole.contains(l))
            .collect();
        assert_eq!(own, ["client", "db-user", "database", "tcp"]);
        for long in &own {
            let flag = format!("--{long}");
            let args = if long == "tcp" {
                os(&[&flag, "postgres://db"])
            } else {
                os(&[&flag, "v", "postgres://db"])
            };
            let o = split(&args).expect("parsed");
            assert_eq!(o.keyhole, os(&["postgres://db"]), "{flag} is connect's own");
        }
        for refused in OWN_ADDRESS {
            assert!(
                !command()
                    .get_arguments()
                    .any(|a| a.get_long() == Some(refused)),
                "--{refused} is described but refused"
            );
            assert!(split(&os(&[&format!("--{refused}"), "x"])).is_err());
        }
    }
}
