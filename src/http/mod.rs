//! HTTP on both sides of keyhole's operator surface: a small client (credential
//! endpoints, and the `wait` and `shutdown` commands) and a small server (health
//! checks, metrics and the admin port).

pub mod client;
pub mod server;
