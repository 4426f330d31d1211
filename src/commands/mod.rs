//! `keyhole COMMAND ...`: tools beside the proxy itself, dispatched on the
//! first argument (a target is a URL, so no target is ever taken for one).
//!
//! - `token`: print an IAM database token.
//! - `wait`: wait for a running keyhole's `/startup` (container health checks,
//!   postStart hooks).
//! - `shutdown`: ask a running keyhole to stop (preStop hooks, jobs).
//! - `check-config`: validate a configuration and print it, without binding
//!   or dialling anything.
//! - `connect`: keyhole for one target and the right client pointed at it.
//! - `tunnel-fd`: the ProxyCommand of keyhole's own ssh over a cloud tunnel.
//! - `completions`, `man`: shell completions and man pages, from [`cli`].

pub mod check_config;
pub mod connect;
pub mod reference;
pub mod shutdown;
pub mod token;
pub mod tunnel_fd;
pub mod wait;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;

/// Exit code for a command that ran and failed.
const EXIT_FAILED: u8 = 1;
/// Exit code for a command line or configuration that cannot work.
const EXIT_USAGE: u8 = 2;

/// Runs the command the arguments name, or `None` if they name none (then
/// they are the proxy's own).
pub fn dispatch(args: &[OsString]) -> Option<ExitCode> {
    match args.get(1).and_then(|a| a.to_str()) {
        Some("token") => Some(token::main(&args[1..])),
        Some("wait") => Some(wait::main(&args[1..])),
        Some("shutdown") => Some(shutdown::main(&args[1..])),
        Some("check-config") => Some(check_config::main(&args[1..])),
        Some("connect") => Some(connect::main(&args[1..])),
        Some("tunnel-fd") => Some(tunnel_fd::main(&args[1..])),
        Some("completions") => Some(reference::completions(&args[1..])),
        Some("man") => Some(reference::man(&args[1..])),
        _ => None,
    }
}

/// Parses a command's arguments; `--help` exits 0, a bad command line
/// prints clap's message and gives the usage exit code.
fn parse<C: Parser>(args: &[OsString]) -> Result<C, ExitCode> {
    match C::try_parse_from(args) {
        Ok(cli) => Ok(cli),
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let _ = e.print();
            Err(ExitCode::from(EXIT_USAGE))
        }
    }
}

/// A runtime for a command's few requests.
fn runtime(command: &str) -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("keyhole {command}: cannot start the runtime: {e}");
            ExitCode::FAILURE
        })
}

/// An option of a command that a running keyhole also reads (`--http-port`
/// and friends): the flag, else its `KEYHOLE_*` variable, so a health check
/// run inside keyhole's container finds the port keyhole was given.
fn flag_or_env(flag: Option<String>, key: &str) -> Option<String> {
    flag.or_else(|| std::env::var(crate::config::env_name(key)).ok())
}

/// The whole command line as one clap tree: the proxy's options, then each
/// command as a subcommand. The commands are dispatched by hand (above), so
/// this tree only describes them, for `keyhole completions`, `keyhole man`
/// and the flag reference's test; each command's own parser is the same
/// definition (`connect`, which parses by hand, has a test that the two
/// agree), so they cannot disagree.
pub fn cli() -> clap::Command {
    use clap::CommandFactory;
    crate::config::Cli::command()
        .disable_help_subcommand(true)
        .subcommand(check_config::command())
        .subcommand(connect::command())
        .subcommand(wait::WaitCli::command().name("wait"))
        .subcommand(shutdown::ShutdownCli::command().name("shutdown"))
        .subcommand(token::TokenCli::command().name("token"))
        .subcommand(reference::completions_command())
        .subcommand(reference::man_command())
    // `tunnel-fd` is left out: keyhole's own ssh runs it, not people.
}
