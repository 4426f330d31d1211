//! Makes the one platform choice taken at build time: `cfg(linux_native)`,
//! set on Linux unless the build asks for the portable path with
//! `RUSTFLAGS="--cfg keyhole_portable"`. It turns on the Linux-only calls:
//! splice(2) between plain legs, kernel TLS, `/proc` for the process metrics
//! and the SSH child's parent-death signal. macOS and Windows never have it.
//! `src/platform/mod.rs` lists what each choice means.
//!
//! `cfg(keyhole_unix)` marks the code that needs Unix (Unix sockets, file
//! descriptors, signals, file modes): set on every Unix, macOS included.
//! `RUSTFLAGS="--cfg keyhole_portable --cfg keyhole_windows_shape"` leaves it
//! out on Linux too, so `cargo check` there compiles the crate the way
//! Windows does (all but the few `cfg(windows)` lines), which no other
//! machine here can: this one has no Windows standard library.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(linux_native)");
    println!("cargo::rustc-check-cfg=cfg(keyhole_portable)");
    println!("cargo::rustc-check-cfg=cfg(keyhole_unix)");
    println!("cargo::rustc-check-cfg=cfg(keyhole_windows_shape)");
    println!("cargo::rerun-if-changed=build.rs");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    let portable = std::env::var_os("CARGO_CFG_KEYHOLE_PORTABLE").is_some();
    let windows_shape = std::env::var_os("CARGO_CFG_KEYHOLE_WINDOWS_SHAPE").is_some();
    let unix = std::env::var_os("CARGO_CFG_UNIX").is_some();
    if linux && !portable && !windows_shape {
        println!("cargo::rustc-cfg=linux_native");
    }
    if unix && !windows_shape {
        println!("cargo::rustc-cfg=keyhole_unix");
    }
}
