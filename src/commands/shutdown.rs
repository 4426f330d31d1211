//! `keyhole shutdown [--admin-port PORT]`: asks a running keyhole (started
//! with `--quitquitquit`) to shut down gracefully, through its admin port on
//! loopback. For preStop hooks and for jobs whose main container is done.

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use http::{Method, StatusCode};

use super::{flag_or_env, EXIT_FAILED, EXIT_USAGE};
use crate::config::DEFAULT_ADMIN_PORT;
use crate::http::client::{send, Request, Url};

/// Ask a running keyhole to shut down gracefully (needs --quitquitquit).
#[derive(Parser, Debug)]
#[command(name = "keyhole shutdown")]
pub(crate) struct ShutdownCli {
    /// keyhole's --admin-port. [default: KEYHOLE_ADMIN_PORT, else 9091]
    #[arg(long, value_name = "PORT")]
    admin_port: Option<String>,
}

const TIMEOUT: Duration = Duration::from_secs(5);

pub fn main(args: &[OsString]) -> ExitCode {
    let cli: ShutdownCli = match super::parse(args) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let port = match flag_or_env(cli.admin_port, "admin-port") {
        None => DEFAULT_ADMIN_PORT,
        Some(text) => match text.parse::<u16>() {
            Ok(port) => port,
            Err(_) => {
                eprintln!("keyhole shutdown: '{text}' is not a port number (--admin-port)");
                return ExitCode::from(EXIT_USAGE);
            }
        },
    };
    let runtime = match super::runtime("shutdown") {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(quit(port)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("keyhole shutdown: {message}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

async fn quit(port: u16) -> Result<(), String> {
    let url =
        Url::parse(&format!("http://127.0.0.1:{port}/quitquitquit")).map_err(|e| e.to_string())?;
    let request = Request::new(Method::POST, url);
    match tokio::time::timeout(TIMEOUT, send(request)).await {
        Ok(Ok(reply)) if reply.status == StatusCode::OK => Ok(()),
        Ok(Ok(reply)) => Err(format!(
            "the admin port answered {} {}",
            reply.status.as_u16(),
            String::from_utf8_lossy(&reply.body).trim()
        )),
        Ok(Err(e)) => Err(format!(
            "{e} (is keyhole running with --quitquitquit and --admin-port {port}?)"
        )),
        Err(_) => Err(format!("no answer from 127.0.0.1:{port} within 5s")),
    }
}
