//! The fuzz targets' bodies, shared by the libFuzzer binaries in
//! `fuzz/fuzz_targets/` (nightly, `cargo fuzz`) and by the stable replay test
//! `tests/fuzz_replay.rs` (corpus plus a deterministic mutation loop, in
//! every `cargo test`).
//!
//! Each target is `pub fn run(data: &[u8])`: it must not panic on any input,
//! and it asserts invariants of the code under test (round trips, what a
//! rewrite may change, agreement with an independent implementation), so a
//! wrong answer is a crash too, not only a panic inside keyhole.

pub mod config;
pub mod input;
pub mod mysql_codec;
pub mod mysql_session;
pub mod postgres_codec;
pub mod postgres_session;
pub mod tls;
pub mod tls_differential;
pub mod tls_record;

/// A target's body.
pub type Run = fn(&[u8]);

/// Every target, by the name of its binary and corpus directory.
pub const TARGETS: &[(&str, Run)] = &[
    ("postgres_codec", postgres_codec::run),
    ("postgres_session", postgres_session::run),
    ("mysql_codec", mysql_codec::run),
    ("mysql_session", mysql_session::run),
    ("tls_record", tls_record::run),
    ("tls_differential", tls_differential::run),
    ("config", config::run),
];
