//! Where the process is in its life (starting, serving, draining) and what
//! asked it to stop: the state the health endpoints read and the shutdown
//! sequence in [`crate::proxy`] drives.
//!
//! Stop requests come from signals (SIGTERM, SIGINT) and from the admin
//! port's `/quitquitquit`; all of them arrive on one channel, so the
//! shutdown sequence treats them alike: the first starts the drain, any
//! later one ends the waiting.
//!
//! Reload requests (SIGHUP, and `--watch` seeing a file change) arrive on a
//! second channel, which [`crate::proxy`] reads while it serves. A reload
//! does not change the phase: `/readiness` stays as it was.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use tokio::sync::{mpsc, Mutex};

/// The process's phase, as `/startup` and `/readiness` report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Listeners not yet bound (or the connection test not yet passed).
    Starting = 0,
    Serving = 1,
    /// A stop was requested: no longer ready, finishing what is open.
    Draining = 2,
}

/// What asked the process to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRequest {
    Terminate,
    Interrupt,
    /// `POST /quitquitquit` on the admin port.
    Quit,
}

impl StopRequest {
    /// The exit code when open connections had to be cut: 128 + the signal,
    /// as a shell reports a process killed by it; 0 for a requested quit.
    pub fn exit_code_when_cut(self) -> u8 {
        match self {
            StopRequest::Terminate => 128 + crate::platform::signals::SIGTERM,
            StopRequest::Interrupt => 128 + crate::platform::signals::SIGINT,
            StopRequest::Quit => 0,
        }
    }

    /// What the log calls it (the signal, or the Windows console event).
    pub fn name(self) -> &'static str {
        crate::platform::signals::name(self)
    }
}

/// What asked for the configuration to be read again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadCause {
    /// SIGHUP.
    Hangup,
    /// `--watch` saw these files change.
    Watch(Vec<PathBuf>),
}

impl std::fmt::Display for ReloadCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReloadCause::Hangup => f.write_str("SIGHUP"),
            ReloadCause::Watch(files) => {
                f.write_str("--watch: changed ")?;
                for (i, file) in files.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{}", file.display())?;
                }
                Ok(())
            }
        }
    }
}

/// Shared by the proxy, the health endpoints and the admin endpoint.
pub struct Lifecycle {
    phase: AtomicU8,
    requests: mpsc::UnboundedSender<StopRequest>,
    received: Mutex<mpsc::UnboundedReceiver<StopRequest>>,
    reloads: mpsc::UnboundedSender<ReloadCause>,
    reloads_received: Mutex<mpsc::UnboundedReceiver<ReloadCause>>,
    /// SIGHUP is forwarded (once per process).
    hangup_forwarded: AtomicBool,
}

impl Default for Lifecycle {
    fn default() -> Self {
        let (requests, received) = mpsc::unbounded_channel();
        let (reloads, reloads_received) = mpsc::unbounded_channel();
        Lifecycle {
            phase: AtomicU8::new(Phase::Starting as u8),
            requests,
            received: Mutex::new(received),
            reloads,
            reloads_received: Mutex::new(reloads_received),
            hangup_forwarded: AtomicBool::new(false),
        }
    }
}

impl Lifecycle {
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Starting,
            1 => Phase::Serving,
            _ => Phase::Draining,
        }
    }

    /// Moves forward only: a draining process never reports serving again.
    pub fn advance(&self, to: Phase) {
        self.phase.fetch_max(to as u8, Ordering::AcqRel);
    }

    pub fn request_stop(&self, request: StopRequest) {
        // The receiver lives as long as `self`: this cannot fail.
        let _ = self.requests.send(request);
    }

    /// The next stop request (the first starts the shutdown; later ones cut
    /// its waits short).
    pub async fn next_stop(&self) -> StopRequest {
        let mut received = self.received.lock().await;
        match received.recv().await {
            Some(request) => request,
            // Unreachable while `self.requests` exists; wait forever then.
            None => std::future::pending().await,
        }
    }

    pub fn request_reload(&self, cause: ReloadCause) {
        // The receiver lives as long as `self`: this cannot fail.
        let _ = self.reloads.send(cause);
    }

    /// The next reload request, and any others already waiting (one reload
    /// reads everything afresh, so it answers them all).
    pub async fn next_reload(&self) -> Vec<ReloadCause> {
        let mut received = self.reloads_received.lock().await;
        let Some(first) = received.recv().await else {
            // Unreachable while `self.reloads` exists; wait forever then.
            return std::future::pending().await;
        };
        let mut causes = vec![first];
        while let Ok(more) = received.try_recv() {
            if !causes.contains(&more) {
                causes.push(more);
            }
        }
        causes
    }

    /// Turns SIGHUP into reload requests, for the life of the runtime.
    /// Installed as early as possible (SIGHUP's default action ends the
    /// process); a second call does nothing. Without Unix signals (Windows)
    /// there is no SIGHUP: `--watch` still reloads.
    pub fn forward_reload_signal(self: &std::sync::Arc<Self>) -> std::io::Result<()> {
        if self.hangup_forwarded.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let mut hangup = match crate::platform::signals::ReloadSignal::listen() {
            Ok(Some(hangup)) => hangup,
            Ok(None) => return Ok(()),
            Err(e) => {
                self.hangup_forwarded.store(false, Ordering::Release);
                return Err(e);
            }
        };
        let me = self.clone();
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                me.request_reload(ReloadCause::Hangup);
            }
        });
        Ok(())
    }

    /// Turns SIGTERM and SIGINT (on Windows Ctrl-C, Ctrl-Break and console
    /// close: [`crate::platform::signals`]) into stop requests, for the life
    /// of the runtime. Installed before any port opens: a supervisor may signal as
    /// soon as one does.
    pub fn forward_signals(self: &std::sync::Arc<Self>) -> std::io::Result<()> {
        let mut signals = crate::platform::signals::StopSignals::listen()?;
        let me = self.clone();
        tokio::spawn(async move {
            while let Some(request) = signals.recv().await {
                me.request_stop(request);
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_phase_only_moves_forward() {
        let life = Lifecycle::default();
        assert_eq!(life.phase(), Phase::Starting);
        life.advance(Phase::Serving);
        life.advance(Phase::Draining);
        life.advance(Phase::Serving);
        assert_eq!(life.phase(), Phase::Draining);
    }

    #[tokio::test]
    async fn stop_requests_arrive_in_order() {
        let life = Lifecycle::default();
        life.request_stop(StopRequest::Quit);
        life.request_stop(StopRequest::Terminate);
        assert_eq!(life.next_stop().await, StopRequest::Quit);
        assert_eq!(life.next_stop().await, StopRequest::Terminate);
    }

    #[tokio::test]
    async fn reload_requests_waiting_together_are_answered_by_one_reload() {
        let life = Lifecycle::default();
        life.request_reload(ReloadCause::Hangup);
        life.request_reload(ReloadCause::Watch(vec!["/etc/keyhole/ca.pem".into()]));
        life.request_reload(ReloadCause::Hangup);
        assert_eq!(
            life.next_reload().await,
            vec![
                ReloadCause::Hangup,
                ReloadCause::Watch(vec!["/etc/keyhole/ca.pem".into()])
            ]
        );
        life.request_reload(ReloadCause::Hangup);
        assert_eq!(life.next_reload().await, vec![ReloadCause::Hangup]);
    }

    #[test]
    fn a_reload_cause_says_what_happened() {
        assert_eq!(ReloadCause::Hangup.to_string(), "SIGHUP");
        let files = vec!["/a/ca.pem".into(), "/a/keyhole.toml".into()];
        assert_eq!(
            ReloadCause::Watch(files).to_string(),
            "--watch: changed /a/ca.pem, /a/keyhole.toml"
        );
    }

    #[test]
    fn a_quit_exits_zero_and_a_signal_as_a_shell_would_report_it() {
        assert_eq!(StopRequest::Quit.exit_code_when_cut(), 0);
        assert_eq!(StopRequest::Terminate.exit_code_when_cut(), 143);
        assert_eq!(StopRequest::Interrupt.exit_code_when_cut(), 130);
    }
}
