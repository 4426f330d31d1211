//! The platform seam: everything keyhole does differently per operating
//! system, one place per concern. The rest of the crate asks this module
//! (or the one file it names) and carries no `cfg` of its own for the OS.
//!
//! | concern | Linux build | portable build (macOS, Windows, `--cfg keyhole_portable`) | where |
//! |---|---|---|---|
//! | data path between plain legs | splice(2) through lent pipes | the buffered copy TLS sessions use | `splice/pipe.rs` (its `sys`) |
//! | upstream TLS records | kernel TLS where the kernel has it | rustls' record layer | `tls/ktls.rs` (its `sys`) |
//! | stop and reload requests | SIGTERM, SIGINT, SIGHUP | Unix: the same; Windows: Ctrl-C, Ctrl-Break, console close | [`signals`] |
//! | Unix-socket listeners | yes | every Unix; Windows refuses them at start | [`UNIX_SOCKETS`], `listener.rs` |
//! | process metrics | `/proc` | what the OS reports; the rest absent | [`process`] |
//! | key and credential file modes | checked | checked on every Unix; Windows has no modes | [`files`] |
//! | where the SDKs keep their files | `~/.aws`, `~/.config/gcloud`, `~/.ssh` | the same on macOS; `%USERPROFILE%`, `%APPDATA%` on Windows | [`home`] |
//!
//! `build.rs` makes the one choice: `cfg(linux_fast_path)` is set on Linux
//! unless the build says `RUSTFLAGS="--cfg keyhole_portable"`. That flag lets
//! Linux (and CI) build and test exactly the path macOS and Windows users get.

pub mod files;
pub mod home;

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
        if cfg!(linux_fast_path) {
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

/// Whether listeners (and `keyhole connect`) can use Unix sockets: every
/// Unix, macOS included. Windows refuses a Unix-socket option at start.
pub const UNIX_SOCKETS: bool = cfg!(unix);
