//! An SSH bastion reached through a cloud tunnel
//! (`via=iap://p/z/vm,ssh://user@vm`, `via=ssm://i-1,ssh://ec2-user@i-1`):
//! the user's bastion layout, with IAP or Session Manager in place of a
//! public port 22.
//!
//! The master `ssh` is given `ProxyCommand=KEYHOLE tunnel-fd SOCKET` with
//! `ProxyUseFdpass=yes`. That command (this binary, [`crate::commands`])
//! connects to SOCKET, a Unix socket keyhole listens on in the control
//! directory, hands the connected descriptor to ssh and exits; ssh then
//! speaks SSH over that socket, and keyhole moves its bytes into a fresh
//! tunnel to the VM's SSH port. No process stays behind per login, and the
//! tunnel's credentials never leave keyhole.
//!
//! When the tunnel cannot open, ssh only sees its connection close; the
//! tunnel's own error (naming the `iap://`/`ssm://` hop) is kept here and
//! is what the failed login reports.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::UnixListener;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::transport::iap::Iap;
use crate::transport::ssm::Ssm;
use crate::transport::HopError;

/// How long one tunnel may take to open.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// The cloud tunnel under an SSH hop.
pub enum Under {
    Iap(Arc<Iap>),
    Ssm(Arc<Ssm>),
}

impl Under {
    fn name(&self) -> Arc<str> {
        match self {
            Under::Iap(iap) => iap.name().clone(),
            Under::Ssm(ssm) => ssm.name().clone(),
        }
    }

    async fn open_into(&self, end: crate::net::TunnelEnd) -> Result<(), HopError> {
        match self {
            Under::Iap(iap) => {
                iap.open_into(iap.vm_port(22, true), OPEN_TIMEOUT, end)
                    .await
            }
            // The instance's own SSH port, as AWS documents SSH over
            // Session Manager.
            Under::Ssm(ssm) => ssm.open_into("localhost", 22, end, OPEN_TIMEOUT).await,
        }
    }
}

/// The listening socket ssh's ProxyCommand connects to.
pub struct Bridge {
    under: Arc<Under>,
    path: PathBuf,
    listening: tokio::sync::Mutex<Option<DropGuard>>,
    last_error: Arc<Mutex<Option<HopError>>>,
}

impl Bridge {
    pub fn new(under: Under, path: PathBuf) -> Bridge {
        Bridge {
            under: Arc::new(under),
            path,
            listening: tokio::sync::Mutex::new(None),
            last_error: Arc::new(Mutex::new(None)),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The Session Manager hop, when that is the tunnel.
    pub fn session_manager(&self) -> Option<Arc<Ssm>> {
        match self.under.as_ref() {
            Under::Ssm(ssm) => Some(ssm.clone()),
            Under::Iap(_) => None,
        }
    }

    /// The tunnel's URL (`iap://p/z/vm`).
    pub fn name(&self) -> Arc<str> {
        self.under.name()
    }

    /// Listens (once); each connection gets a tunnel of its own.
    pub async fn listen(&self) -> Result<(), HopError> {
        let mut listening = self.listening.lock().await;
        if listening.is_some() {
            return Ok(());
        }
        let _ = std::fs::remove_file(&self.path);
        let listener = UnixListener::bind(&self.path).map_err(|e| HopError::Tunnel {
            hop: self.name(),
            reason: format!("cannot listen on {}: {e}", self.path.display()),
        })?;
        let stop = CancellationToken::new();
        let (under, errors, done) = (self.under.clone(), self.last_error.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    () = done.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(e) => {
                            tracing::warn!(hop = %under.name(), error = %e, "the SSH tunnel socket failed");
                            return;
                        }
                    },
                };
                let (under, errors) = (under.clone(), errors.clone());
                tokio::spawn(async move {
                    let result = under.open_into(stream).await;
                    let mut last = errors.lock().unwrap_or_else(PoisonError::into_inner);
                    match result {
                        Ok(()) => *last = None,
                        Err(e) => {
                            tracing::warn!(hop = %under.name(), error = %e, "no tunnel for the SSH connection");
                            *last = Some(e);
                        }
                    }
                });
            }
        });
        *listening = Some(stop.drop_guard());
        Ok(())
    }

    /// The error of the last tunnel that failed to open, taken.
    pub fn take_error(&self) -> Option<HopError> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// The ssh options that send the master through this bridge.
    pub fn ssh_options(&self) -> Result<Vec<String>, String> {
        let exe = std::env::current_exe().map_err(|e| {
            format!("cannot find keyhole's own executable for ssh's ProxyCommand: {e}")
        })?;
        let command = format!(
            "{} tunnel-fd {}",
            shell_quote(&exe.display().to_string()),
            shell_quote(&self.path.display().to_string())
        );
        // '%' is a token in ProxyCommand.
        Ok(vec![
            format!("ProxyCommand={}", command.replace('%', "%%")),
            "ProxyUseFdpass=yes".to_owned(),
        ])
    }
}

/// `text` in single quotes for `sh -c` (ssh runs ProxyCommand with the
/// user's shell).
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_quoted_for_the_shell() {
        assert_eq!(shell_quote("/usr/bin/keyhole"), "'/usr/bin/keyhole'");
        assert_eq!(shell_quote("/tmp/it's here"), r"'/tmp/it'\''s here'");
    }
}
