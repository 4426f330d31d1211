//! The service manager's notifications where there is no systemd (Windows):
//! the same calls as `src/systemd.rs`, each doing nothing, so the proxy
//! needs no `cfg` of its own. A Windows service manager learns keyhole's
//! state from its health endpoints instead.

/// Nothing to read or remove.
pub fn init() {}

/// keyhole serves: nobody to tell.
pub fn ready(_status: &str) {}

/// A reload starts: nobody to tell.
pub fn reloading() {}

/// The drain starts: nobody to tell.
pub fn stopping(_status: &str) {}

/// No watchdog to feed.
pub fn spawn_watchdog() {}
