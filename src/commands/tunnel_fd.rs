//! `keyhole tunnel-fd SOCKET`: ssh's ProxyCommand for an SSH hop over a
//! cloud tunnel ([`crate::transport::ssh::over`]), run by keyhole's own ssh
//! master with `ProxyUseFdpass=yes`. It connects to SOCKET, where the
//! running keyhole opens a tunnel for each connection, passes the connected
//! descriptor to ssh on its standard output and exits. Not for people.

use std::ffi::OsString;
use std::process::ExitCode;

#[cfg(keyhole_unix)]
pub fn main(args: &[OsString]) -> ExitCode {
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    let [_, socket] = args else {
        eprintln!("usage: keyhole tunnel-fd SOCKET (run by keyhole's own ssh, not by people)");
        return ExitCode::from(super::EXIT_USAGE);
    };
    let stream = match UnixStream::connect(socket) {
        Ok(stream) => stream,
        Err(e) => {
            eprintln!(
                "keyhole tunnel-fd: cannot connect to {}: {e}",
                std::path::Path::new(socket).display()
            );
            return ExitCode::from(super::EXIT_FAILED);
        }
    };
    let stdout = std::io::stdout();
    match crate::transport::ssh::sys::send_fd(stdout.as_fd(), stream.as_fd()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyhole tunnel-fd: cannot pass the connection to ssh (is ProxyUseFdpass=yes set?): {e}");
            ExitCode::from(super::EXIT_FAILED)
        }
    }
}

/// SSH hops need Unix (src/platform/): there is nothing to pass here.
#[cfg(not(keyhole_unix))]
pub fn main(_args: &[OsString]) -> ExitCode {
    eprintln!("keyhole tunnel-fd: SSH hops need a Unix system");
    ExitCode::from(super::EXIT_FAILED)
}
