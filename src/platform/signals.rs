//! Stop and reload requests from the operating system, turned into
//! [`StopRequest`]s and reload ticks for [`crate::lifecycle`].
//!
//! - Unix (macOS included): SIGTERM asks for a stop as a supervisor does,
//!   SIGINT as a terminal's Ctrl-C does, and SIGHUP for a reload.
//! - Windows: Ctrl-C is the interrupt; Ctrl-Break and closing the console
//!   window ask for a stop as a supervisor would (Windows ends the process a
//!   few seconds after a close, so the drain is cut short there). There is no
//!   reload signal: `--watch` reloads.
//!
//! Either way the drain and the exit codes are the same: a stop that had to
//! cut connections exits 128 + the POSIX number of the signal that stands
//! for it (143 for a stop, 130 for an interrupt), as a shell reports it.

use crate::lifecycle::StopRequest;

/// SIGTERM's number, for the exit code on every system.
pub const SIGTERM: u8 = 15;
/// SIGINT's number, for the exit code on every system.
pub const SIGINT: u8 = 2;

/// What the log calls the event behind a stop request.
pub fn name(request: StopRequest) -> &'static str {
    match request {
        StopRequest::Terminate if cfg!(windows) => "Ctrl-Break or console close",
        StopRequest::Interrupt if cfg!(windows) => "Ctrl-C",
        StopRequest::Terminate => "SIGTERM",
        StopRequest::Interrupt => "SIGINT",
        StopRequest::Quit => "quitquitquit",
    }
}

pub use imp::{ReloadSignal, StopSignals};

#[cfg(keyhole_unix)]
mod imp {
    use tokio::signal::unix::{signal, Signal, SignalKind};

    use crate::lifecycle::StopRequest;

    /// The stop signals, listened to from creation on.
    pub struct StopSignals {
        term: Signal,
        int: Signal,
    }

    impl StopSignals {
        /// Starts listening (inside a tokio runtime).
        pub fn listen() -> std::io::Result<StopSignals> {
            Ok(StopSignals {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            })
        }

        /// The next stop request; `None` once no signal can arrive.
        pub async fn recv(&mut self) -> Option<StopRequest> {
            tokio::select! {
                Some(()) = self.term.recv() => Some(StopRequest::Terminate),
                Some(()) = self.int.recv() => Some(StopRequest::Interrupt),
                else => None,
            }
        }
    }

    /// SIGHUP, listened to from creation on (its default action would end
    /// the process).
    pub struct ReloadSignal(Signal);

    impl ReloadSignal {
        /// Starts listening; `Ok(None)` where the system has no such signal.
        pub fn listen() -> std::io::Result<Option<ReloadSignal>> {
            signal(SignalKind::hangup()).map(|s| Some(ReloadSignal(s)))
        }

        /// The next reload request; `None` once no signal can arrive.
        pub async fn recv(&mut self) -> Option<()> {
            self.0.recv().await
        }
    }
}

#[cfg(not(keyhole_unix))]
mod imp {
    #[cfg(windows)]
    use tokio::signal::windows::{ctrl_break, ctrl_c, ctrl_close, CtrlBreak, CtrlC, CtrlClose};

    use crate::lifecycle::StopRequest;

    /// The console events that ask for a stop, listened to from creation on.
    /// (Built on Linux only for the Windows-shaped check, `--cfg
    /// keyhole_windows_shape`: there, Ctrl-C alone.)
    pub struct StopSignals {
        #[cfg(windows)]
        c: CtrlC,
        #[cfg(windows)]
        brk: CtrlBreak,
        #[cfg(windows)]
        close: CtrlClose,
    }

    impl StopSignals {
        /// Starts listening (inside a tokio runtime).
        pub fn listen() -> std::io::Result<StopSignals> {
            Ok(StopSignals {
                #[cfg(windows)]
                c: ctrl_c()?,
                #[cfg(windows)]
                brk: ctrl_break()?,
                #[cfg(windows)]
                close: ctrl_close()?,
            })
        }

        /// The next stop request; `None` once no event can arrive.
        pub async fn recv(&mut self) -> Option<StopRequest> {
            #[cfg(windows)]
            {
                tokio::select! {
                    Some(()) = self.c.recv() => Some(StopRequest::Interrupt),
                    Some(()) = self.brk.recv() => Some(StopRequest::Terminate),
                    Some(()) = self.close.recv() => Some(StopRequest::Terminate),
                    else => None,
                }
            }
            #[cfg(not(windows))]
            {
                tokio::signal::ctrl_c()
                    .await
                    .ok()
                    .map(|()| StopRequest::Interrupt)
            }
        }
    }

    /// There is no reload signal: this is never made.
    pub enum ReloadSignal {}

    impl ReloadSignal {
        /// Always `Ok(None)`: `--watch` is the way to reload here.
        pub fn listen() -> std::io::Result<Option<ReloadSignal>> {
            Ok(None)
        }

        pub async fn recv(&mut self) -> Option<()> {
            match *self {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_posix_numbers() {
        assert_eq!(StopRequest::Terminate.exit_code_when_cut(), 143);
        assert_eq!(StopRequest::Interrupt.exit_code_when_cut(), 130);
        assert_eq!(StopRequest::Quit.exit_code_when_cut(), 0);
    }

    #[cfg(keyhole_unix)]
    #[test]
    fn the_log_names_the_unix_signals() {
        assert_eq!(name(StopRequest::Terminate), "SIGTERM");
        assert_eq!(name(StopRequest::Interrupt), "SIGINT");
        assert_eq!(name(StopRequest::Quit), "quitquitquit");
    }
}
