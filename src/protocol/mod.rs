//! Wire protocols, as pure codecs: bytes in, messages out, no sockets.
//!
//! Each codec decodes from a `BytesMut` that the caller fills, returning
//! `Ok(None)` until a whole message is buffered, and bounds every length it
//! reads before it trusts it.

pub mod farewell;
pub mod mysql;
pub mod postgres;
