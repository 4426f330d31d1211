//! The platform seam: everything keyhole does differently per operating
//! system, and where each difference lives. One build-time choice drives it
//! (`build.rs`):
//!
//! - `cfg(linux_native)`: the Linux-only calls (splice(2), pipe2(2) and pipe
//!   sizes, kernel TLS, `/proc`, `PR_SET_PDEATHSIG`). Set on Linux unless
//!   the build says `RUSTFLAGS="--cfg keyhole_portable"`: the portable build,
//!   the path macOS and Windows users get, which CI tests on Linux.
//! - `cfg(keyhole_unix)`: what needs Unix (Unix sockets, file descriptors,
//!   signals, file modes). Set on every Unix; Windows lacks it, and so does
//!   the Windows-shaped check on Linux (`--cfg keyhole_windows_shape`),
//!   which CI compiles with `libc` out of reach and clippy denying the
//!   Unix-only parts of std and tokio (`clippy.toml`).
//!
//! | concern | Linux | macOS (and the portable build) | Windows | where |
//! |---|---|---|---|---|
//! | bytes between plain legs | splice(2) through lent pipes | the buffered copy TLS sessions use | the same | `splice/pipe.rs` (its `sys`), [`crate::splice::zero_copy_supported`] |
//! | upstream TLS records | kernel TLS where the kernel has it | rustls' record layer | the same | `tls/ktls.rs` (its `sys`) |
//! | stop and reload requests | SIGTERM, SIGINT, SIGHUP | the same | Ctrl-C, Ctrl-Break, console close; no reload signal | [`signals`] |
//! | listeners and sockets | TCP, Unix sockets | the same | TCP; a Unix-socket option is refused at start | [`check_target`], `listener.rs`, `net.rs` |
//! | a hop's local end | a Unix socket pair | the same | a pipe in memory | `net.rs` ([`crate::net::pair`]) |
//! | SSH hops (`via=ssh://`) | one OpenSSH master, descriptors passed | the same | refused at start | [`check_target`], `transport/without/ssh.rs` |
//! | processes keyhole starts | end with keyhole (parent-death signal) | end at keyhole's shutdown | the same as macOS | [`child`] |
//! | service manager | systemd notifications | the same code (no systemd there) | none | `systemd.rs`, `no_systemd.rs` |
//! | process metrics | all six from `/proc` | CPU time, descriptors, start time | start time | [`process`] |
//! | key and credential file modes | checked | checked | no modes: skipped | [`files`] |
//! | where the SDKs keep their files | `~/.aws`, `~/.config/gcloud`, `~/.ssh` | the same | `%USERPROFILE%`, `%APPDATA%` | [`home`] |
//!
//! Outside this folder, `cfg` appears only where a Unix-only type is part of
//! a value (the socket and listener enums in `net.rs`, `listener.rs`,
//! `proxy/workers.rs` and `proxy/serve.rs`, the fd-based splice in
//! `splice/`, kernel TLS's descriptors in `tls/ktls.rs`), in the one call
//! site that picks splice(2) (`frontend/postgres.rs`), and in
//! `commands/tunnel_fd.rs`, which exists for the SSH hop.

pub mod child;
pub mod files;
pub mod home;
pub mod process;
pub mod signals;

/// How bytes cross keyhole once a session is established.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPath {
    /// splice(2) between plain legs, kernel TLS for upstream records where
    /// the kernel offers it: Linux.
    SpliceKtls,
    /// One buffered copy per direction in keyhole's memory, TLS records in
    /// rustls: every other system, and Linux built with `keyhole_portable`.
    Portable,
}

impl DataPath {
    /// What this build has.
    pub const fn of_this_build() -> DataPath {
        if cfg!(linux_native) {
            DataPath::SpliceKtls
        } else {
            DataPath::Portable
        }
    }

    /// As `keyhole --version` and the startup log say it.
    pub fn name(self) -> &'static str {
        match self {
            DataPath::SpliceKtls => "splice+ktls",
            DataPath::Portable => "portable",
        }
    }
}

impl std::fmt::Display for DataPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What `keyhole --version` prints after the name: the version, the data
/// path and the cargo features, e.g. `0.1.0 (data path: splice+ktls;
/// features: aws, gcp)`.
pub fn version() -> String {
    format!(
        "{} (data path: {}; features: {})",
        env!("CARGO_PKG_VERSION"),
        DataPath::of_this_build(),
        crate::features::enabled()
    )
}

/// Whether listeners (and `keyhole connect`) can use Unix sockets: every
/// Unix, macOS included. Windows refuses a Unix-socket option at start.
pub const UNIX_SOCKETS: bool = cfg!(keyhole_unix);

/// What a target may ask of the operating system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Unix-socket listeners (`unix-socket=`, `unix-socket-path=`).
    pub unix_sockets: bool,
    /// `via=ssh://`: one shared OpenSSH master per bastion, reached over a
    /// Unix control socket and handed descriptors (`SCM_RIGHTS`).
    pub ssh_hops: bool,
}

impl Capabilities {
    /// This system's.
    pub const THIS: Capabilities = Capabilities {
        unix_sockets: UNIX_SOCKETS,
        ssh_hops: cfg!(keyhole_unix),
    };
    /// Windows', for tests on any system.
    pub const WINDOWS: Capabilities = Capabilities {
        unix_sockets: false,
        ssh_hops: false,
    };
}

/// A target that asks for what this system lacks is a configuration error
/// naming the option, given before anything is bound.
pub fn check_target(target: &crate::config::TargetConfig) -> Result<(), String> {
    check_target_on(target, Capabilities::THIS)
}

/// [`check_target`] against any system's capabilities.
pub fn check_target_on(
    target: &crate::config::TargetConfig,
    can: Capabilities,
) -> Result<(), String> {
    if let (Some(path), false) = (&target.unix_socket, can.unix_sockets) {
        return Err(format!(
            "unix-socket: this system has no Unix-socket listeners (asked for {}); \
             listen on TCP instead (--address and --port, or the target's listen=)",
            path.display()
        ));
    }
    if matches!(target.via, crate::config::via::Via::Ssh(_)) && !can.ssh_hops {
        return Err(
            "via=ssh://: SSH hops need OpenSSH's shared connections (ControlMaster), \
                    which OpenSSH for Windows lacks; use a SOCKS5 hop (via=socks5://, e.g. \
                    `ssh -D`) or run keyhole under WSL"
                .to_owned(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::Config;

    fn target(spec: &str) -> crate::config::TargetConfig {
        let config = Config::load(["keyhole", spec], &HashMap::new()).expect("a valid target");
        config.targets.into_iter().next().expect("one target")
    }

    #[test]
    fn windows_refuses_a_unix_socket_by_its_option_name() {
        let t = target("postgres://db.internal:5432?unix-socket=/run/keyhole");
        let e = check_target_on(&t, Capabilities::WINDOWS).expect_err("refused");
        assert!(e.starts_with("unix-socket: "), "{e}");
        assert!(e.contains("/run/keyhole/.s.PGSQL."), "{e}");
        assert!(e.contains("--address and --port"), "{e}");
        assert_eq!(
            check_target_on(
                &t,
                Capabilities {
                    unix_sockets: true,
                    ssh_hops: false
                }
            ),
            Ok(())
        );
    }

    #[test]
    fn windows_refuses_an_ssh_hop_and_says_what_works_instead() {
        let t = target("postgres://db.internal:5432?via=ssh://bastion");
        let e = check_target_on(&t, Capabilities::WINDOWS).expect_err("refused");
        assert!(e.starts_with("via=ssh://: "), "{e}");
        assert!(e.contains("via=socks5://"), "{e}");
        let tcp = target("postgres://db.internal:5432?via=socks5://127.0.0.1:1080");
        assert_eq!(check_target_on(&tcp, Capabilities::WINDOWS), Ok(()));
    }

    #[cfg(keyhole_unix)]
    #[test]
    fn every_unix_keeps_unix_sockets_and_ssh_hops() {
        assert_eq!(
            Capabilities::THIS,
            Capabilities {
                unix_sockets: true,
                ssh_hops: true
            }
        );
        let t = target("postgres://db.internal:5432?unix-socket=/run/keyhole&via=ssh://bastion");
        assert_eq!(check_target(&t), Ok(()));
    }

    #[test]
    fn the_version_names_the_data_path_and_the_features() {
        let v = version();
        assert!(
            v.starts_with(concat!(env!("CARGO_PKG_VERSION"), " (data path: ")),
            "{v}"
        );
        let expected = if cfg!(linux_native) {
            "splice+ktls"
        } else {
            "portable"
        };
        assert!(v.contains(&format!("data path: {expected};")), "{v}");
        assert!(
            v.ends_with(&format!("features: {})", crate::features::enabled())),
            "{v}"
        );
    }
}
