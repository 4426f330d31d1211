//! `keyhole wait [--max DURATION]`: polls a running keyhole's `/startup`
//! until it answers 200 (exit 0) or the time is up (exit 1, saying what it
//! last saw). For container health checks and postStart hooks: the image
//! has no shell or curl, and needs none.

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use http::StatusCode;
use tokio::time::Instant;

use super::{flag_or_env, EXIT_FAILED, EXIT_USAGE};
use crate::config::{duration, DEFAULT_HTTP_PORT};
use crate::http::client::{send, Request, Url};
use crate::upstream::humanize;

/// Wait until a running keyhole has started (its /startup answers 200; needs --health-check).
#[derive(Parser, Debug)]
#[command(name = "keyhole wait")]
pub(crate) struct WaitCli {
    /// Give up after this long. [default: 30s]
    #[arg(long, value_name = "DURATION")]
    max: Option<String>,
    /// keyhole's --http-address (0.0.0.0 and :: are polled on loopback). [default: KEYHOLE_HTTP_ADDRESS, else 127.0.0.1]
    #[arg(long, value_name = "ADDR")]
    http_address: Option<String>,
    /// keyhole's --http-port. [default: KEYHOLE_HTTP_PORT, else 9090]
    #[arg(long, value_name = "PORT")]
    http_port: Option<String>,
}

/// Time between two polls.
const POLL_EVERY: Duration = Duration::from_millis(250);
/// Bound on one poll.
const POLL_TIMEOUT: Duration = Duration::from_secs(1);

pub fn main(args: &[OsString]) -> ExitCode {
    let cli: WaitCli = match super::parse(args) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let (url, max) = match settings(cli) {
        Ok(s) => s,
        Err(message) => {
            eprintln!("keyhole wait: {message}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let runtime = match super::runtime("wait") {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(poll(url, max)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("keyhole wait: {message}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn settings(cli: WaitCli) -> Result<(Url, Duration), String> {
    let max = match cli.max {
        Some(text) => duration::parse(&text).map_err(|e| format!("--max: {e}"))?,
        None => Duration::from_secs(30),
    };
    let address = match flag_or_env(cli.http_address, "http-address") {
        Some(text) => text
            .parse::<IpAddr>()
            .map_err(|_| format!("'{text}' is not an IP address (--http-address)"))?,
        None => IpAddr::V4(Ipv4Addr::LOCALHOST),
    };
    let address = match address {
        IpAddr::V4(a) if a.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(a) if a.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => other,
    };
    let port = match flag_or_env(cli.http_port, "http-port") {
        Some(text) => text
            .parse::<u16>()
            .map_err(|_| format!("'{text}' is not a port number (--http-port)"))?,
        None => DEFAULT_HTTP_PORT,
    };
    let authority = std::net::SocketAddr::new(address, port);
    let url = Url::parse(&format!("http://{authority}/startup")).map_err(|e| e.to_string())?;
    Ok((url, max))
}

async fn poll(url: Url, max: Duration) -> Result<(), String> {
    let deadline = Instant::now() + max;
    let mut last;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left.min(POLL_TIMEOUT), send(Request::get(url.clone()))).await {
            Ok(Ok(reply)) if reply.status == StatusCode::OK => return Ok(()),
            Ok(Ok(reply)) => {
                let body = String::from_utf8_lossy(&reply.body);
                last = format!("{} {}", reply.status.as_u16(), body.trim());
            }
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = format!("no answer within {}", humanize(POLL_TIMEOUT.min(left))),
        }
        if Instant::now() + POLL_EVERY >= deadline {
            return Err(format!(
                "keyhole has not started after {} (last: {last})",
                humanize(max)
            ));
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}
