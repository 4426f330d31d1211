//! The built binary carries the Linux-only calls exactly when its data path
//! says it does: read off its symbol table, so a portable build (the path
//! macOS and Windows users get, `RUSTFLAGS="--cfg keyhole_portable"` here)
//! cannot quietly keep splice(2) or kernel TLS. src/platform/ lists them.

use std::process::Command;

/// `nm`'s output for the test's keyhole binary.
fn nm(args: &[&str]) -> String {
    let bin = env!("CARGO_BIN_EXE_keyhole");
    let out = Command::new("nm")
        .args(args)
        .arg(bin)
        .output()
        .expect("nm runs (binutils)");
    assert!(
        out.status.success(),
        "nm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The names of the C library functions the binary imports (`splice`, not
/// `splice@GLIBC_2.5`).
fn imports() -> Vec<String> {
    nm(&["-D", "--undefined-only"])
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .map(|s| s.split('@').next().unwrap_or(s).to_owned())
        .collect()
}

#[test]
fn the_linux_only_calls_are_in_the_linux_build_and_nowhere_else() {
    let native = cfg!(linux_native);
    let imports = imports();
    let has = |name: &str| imports.iter().any(|i| i == name);
    // keyhole's own symbols, demangled: the modules that make the calls.
    let ours = nm(&["-C"]);
    let module = |path: &str| ours.lines().any(|l| l.contains(path));

    assert_eq!(has("splice"), native, "splice(2) imported: {imports:?}");
    assert_eq!(
        has("prctl"),
        native,
        "prctl(2) (the SSH child's PR_SET_PDEATHSIG)"
    );
    // pipe2(2) and fcntl's pipe sizes, and the socket options that set SOL_TLS,
    // live in these modules; the portable build has stand-ins under another name.
    assert_eq!(
        module("keyhole::splice::pipe::sys::"),
        native,
        "the splice(2) calls"
    );
    assert_eq!(
        module("keyhole::tls::ktls::sys::"),
        native,
        "the kernel TLS calls"
    );
    assert_eq!(module("keyhole::splice::pipe::unsupported::"), !native);
    assert_eq!(module("keyhole::tls::ktls::unsupported::"), !native);
}

#[test]
fn version_names_the_data_path_the_binary_has() {
    let out = Command::new(env!("CARGO_BIN_EXE_keyhole"))
        .arg("--version")
        .output()
        .expect("keyhole runs");
    assert!(out.status.success());
    let version = String::from_utf8_lossy(&out.stdout);
    let path = if cfg!(linux_native) {
        "splice+ktls"
    } else {
        "portable"
    };
    assert!(
        version.starts_with(&format!(
            "keyhole {} (data path: {path}; features: ",
            env!("CARGO_PKG_VERSION")
        )),
        "{version}"
    );
}
