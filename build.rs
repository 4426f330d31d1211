//! Makes the one platform choice taken at build time: `cfg(linux_native)`,
//! set on Linux unless the build asks for the portable path with
//! `RUSTFLAGS="--cfg keyhole_portable"`. It turns on the Linux-only calls:
//! splice(2) between plain legs, kernel TLS, `/proc` for the process metrics
//! and the SSH child's parent-death signal. macOS and Windows never have it.
//! `src/platform/mod.rs` lists what each choice means.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(linux_native)");
    println!("cargo::rustc-check-cfg=cfg(keyhole_portable)");
    println!("cargo::rerun-if-changed=build.rs");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    let portable = std::env::var_os("CARGO_CFG_KEYHOLE_PORTABLE").is_some();
    if linux && !portable {
        println!("cargo::rustc-cfg=linux_native");
    }
}
