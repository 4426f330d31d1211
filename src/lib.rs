//! keyhole: a database connection proxy. Clients speak plain Postgres to it
//! on localhost; it reaches the database over verified TLS and splices the
//! bytes through.
//!
//! Where a byte goes: [`listener`] accepts it, [`frontend`] drives the
//! protocol startup with [`protocol`]'s codecs, [`upstream`] opens the
//! verified TLS connection, and [`splice`] carries everything after.
//! [`proxy`] ties these together, runs the lifecycle ([`lifecycle`]) and
//! reloads the configuration live (SIGHUP, `--watch`);
//! [`endpoints`] serve health checks, [`metrics`] and the admin port to operators;
//! [`telemetry`] exports traces and metrics over OpenTelemetry (cargo feature `otel`).
//! The clouds' parts are Cargo features (`aws`, `gcp`): [`features`] lists them.

// Unix-only APIs (clippy.toml) are allowed on Unix (Cargo.toml's [lints]); the
// Windows-shaped check denies them outside the Unix code.
#![cfg_attr(
    keyhole_windows_shape,
    deny(clippy::disallowed_types, clippy::disallowed_methods)
)]

pub mod backend;
pub mod cancel;
pub mod cidr;
pub mod civil;
pub mod cloudsql;
pub mod commands;
pub mod config;
pub mod credentials;
pub mod endpoints;
pub mod features;
pub mod frontend;
pub mod http;
pub mod lifecycle;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod platform;
pub mod pool;
pub mod protocol;
pub mod proxy;
pub mod splice;
// sd_notify needs a Unix datagram socket; elsewhere the calls do nothing.
#[cfg_attr(not(keyhole_unix), path = "platform/no_systemd.rs")]
pub mod systemd;
pub mod telemetry;
pub mod tls;
pub mod transport;
pub mod upstream;
