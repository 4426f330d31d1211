//! Chooses the data path at build time: `cfg(linux_fast_path)` (splice(2) and
//! kernel TLS) on Linux, unless the build asks for the portable path with
//! `RUSTFLAGS="--cfg keyhole_portable"`. macOS and Windows always get the
//! portable path. `src/platform/mod.rs` says what each choice means.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(linux_fast_path)");
    println!("cargo::rustc-check-cfg=cfg(keyhole_portable)");
    println!("cargo::rerun-if-changed=build.rs");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    let portable = std::env::var_os("CARGO_CFG_KEYHOLE_PORTABLE").is_some();
    if linux && !portable {
        println!("cargo::rustc-cfg=linux_fast_path");
    }
}
