//! `ssh://` hops on a system without Unix (Windows): the shape of the real
//! module (`transport/ssh/`, built on every Unix) with nothing behind it.
//! keyhole's SSH hop shares one OpenSSH master per bastion over a Unix
//! control socket and takes its channels as passed descriptors, neither of
//! which OpenSSH for Windows offers. The configuration refuses `via=ssh://`
//! first ([`crate::platform::check_target`]); should anything else ask,
//! [`ControlDir::create`] refuses too, and no [`Bastion`] can exist.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::via::SshHop;
use crate::metrics::HopMetrics;
use crate::net::Socket;
use crate::transport::HopError;

/// The SSH hops' private directory: none can be made here.
pub enum ControlDir {}

impl ControlDir {
    pub fn create() -> Result<ControlDir, String> {
        Err("via=ssh:// needs a Unix system (OpenSSH's shared connections)".to_owned())
    }
}

/// An SSH bastion: none can exist here (its one field has no value).
pub struct Bastion(std::convert::Infallible);

impl Bastion {
    pub(super) fn new(
        _hop: SshHop,
        _name: Arc<str>,
        _ssh_config: Option<PathBuf>,
        dir: Arc<ControlDir>,
        _index: usize,
        _metrics: Arc<HopMetrics>,
        _under: Option<over::Under>,
    ) -> Bastion {
        match *dir {}
    }

    pub(super) async fn open(
        &self,
        _host: &str,
        _port: u16,
        _timeout: Duration,
    ) -> Result<Socket, HopError> {
        match self.0 {}
    }

    pub(super) fn session_manager(&self) -> Option<Arc<crate::transport::ssm::Ssm>> {
        match self.0 {}
    }

    pub(super) fn not_ready(&self) -> Option<String> {
        match self.0 {}
    }

    pub(super) fn login_in_background(self: Arc<Bastion>) {
        match self.0 {}
    }

    pub(super) fn shutdown(&self) {
        match self.0 {}
    }
}

pub mod over {
    //! The cloud tunnel under an SSH hop, as the real module names it.

    use std::sync::Arc;

    use crate::transport::iap::Iap;
    use crate::transport::ssm::Ssm;

    /// The cloud tunnel under an SSH hop.
    pub enum Under {
        Iap(Arc<Iap>),
        Ssm(Arc<Ssm>),
    }
}
