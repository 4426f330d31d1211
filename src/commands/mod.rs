//! `keyhole COMMAND ...`: tools beside the proxy itself, dispatched on the
//! first argument (a target is a URL, so no target is ever taken for one).

pub mod token;

use std::ffi::OsString;
use std::process::ExitCode;

/// Runs the command the arguments name, or `None` if they name none (then
/// they are the proxy's own).
pub fn dispatch(args: &[OsString]) -> Option<ExitCode> {
    match args.get(1).and_then(|a| a.to_str()) {
        Some("token") => Some(token::main(&args[1..])),
        _ => None,
    }
}
