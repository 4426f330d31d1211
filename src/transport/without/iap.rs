//! `iap://` in a build without the `gcp` feature: the shape of
//! the real module (`transport/iap/`, built when the feature is on)
//! with nothing behind it, so that the transport layer has no `cfg` of its
//! own. The configuration refuses `via=iap://` first ([`crate::features`]);
//! should anything else ask, [`Iap::new`] refuses too, and no [`Iap`] can
//! exist.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::config::via::IapHop;
use crate::net::{Socket, TunnelEnd};
use crate::transport::HopError;

/// The same default as the real module's, for `--iap-endpoint`.
pub const DEFAULT_ENDPOINT: &str = "wss://tunnel.cloudproxy.app";

/// An IAP hop: none can be made in this build.
pub enum Iap {}

impl Iap {
    pub fn new(
        _hop: IapHop,
        _name: Arc<str>,
        _endpoint: &str,
        _env: HashMap<String, String>,
    ) -> Result<Iap, String> {
        Err(crate::features::missing("via=iap://", "gcp"))
    }

    pub fn vm_port(&self, _database_port: u16, _under_ssh: bool) -> u16 {
        match *self {}
    }

    pub async fn open(
        self: &Arc<Self>,
        _port: u16,
        _timeout: Duration,
    ) -> Result<Socket, HopError> {
        match **self {}
    }

    pub async fn open_into(
        self: &Arc<Self>,
        _port: u16,
        _timeout: Duration,
        _end: TunnelEnd,
    ) -> Result<(), HopError> {
        match **self {}
    }

    pub fn name(&self) -> &Arc<str> {
        match *self {}
    }
}
