//! `ssm://` in a build without the `aws` feature: the shape of
//! the real module (`transport/ssm/`, built when the feature is on)
//! with nothing behind it, so that the transport layer has no `cfg` of its
//! own. The configuration refuses `via=ssm://` first ([`crate::features`]);
//! should anything else ask, every tunnel it is asked for is refused.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::config::via::SsmHop;
use crate::net::{Socket, TunnelEnd};
use crate::transport::HopError;

/// An `ssm://` hop that opens nothing.
pub struct Ssm {
    name: Arc<str>,
}

impl Ssm {
    pub fn new(_hop: SsmHop, name: Arc<str>, _env: HashMap<String, String>) -> Ssm {
        Ssm { name }
    }

    /// No session to end.
    pub fn stop(&self) {}

    pub async fn ended(&self) {}

    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    pub async fn open(
        self: &Arc<Self>,
        _host: &str,
        _port: u16,
        _timeout: Duration,
    ) -> Result<Socket, HopError> {
        Err(self.refused())
    }

    pub async fn open_into(
        self: &Arc<Self>,
        _host: &str,
        _port: u16,
        _end: TunnelEnd,
        _timeout: Duration,
    ) -> Result<(), HopError> {
        Err(self.refused())
    }

    fn refused(&self) -> HopError {
        HopError::Tunnel {
            hop: self.name.clone(),
            reason: crate::features::missing("via=ssm://", "aws"),
        }
    }
}
