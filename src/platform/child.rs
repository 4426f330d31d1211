//! The processes keyhole starts (the SSH master, `keyhole connect`'s keyhole
//! and client) and how they end, per operating system.
//!
//! | | Linux | other Unix (macOS) | Windows |
//! |---|---|---|---|
//! | [`end_with_parent`] | `PR_SET_PDEATHSIG` (SIGTERM) | nothing: ended at shutdown or on drop | nothing: the same |
//! | [`away_from_the_terminal`] | own process group | own process group | own console process group |
//! | [`leave_interrupts_to_the_client`] | SIGINT, SIGQUIT ignored | the same | nothing (std has no call for it) |
//! | [`stop`] | SIGTERM, up to 10 s, then kill | the same | kill |
//! | [`exit_code`] | the code, else 128 + the signal | the same | the code |

use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

/// How long a stopped child may take to drain before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Arranges for the process `command` starts to end however its parent
/// ends (Linux only: elsewhere keyhole ends it at shutdown, or when its
/// handle is dropped).
#[cfg(linux_native)]
pub fn end_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs in the child
    // before exec.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// See [`end_with_parent`]: nothing to arrange on this system.
#[cfg(not(linux_native))]
pub fn end_with_parent(_command: &mut Command) {}

/// Starts the process in a group of its own, so the terminal's Ctrl-C
/// reaches the client and not it.
pub fn away_from_the_terminal(command: &mut Command) {
    #[cfg(keyhole_unix)]
    {
        use std::os::unix::process::CommandExt;
        command.process_group(0);
    }
    #[cfg(windows)]
    {
        use std::os::windows::process::CommandExt;
        /// `CREATE_NEW_PROCESS_GROUP` (winbase.h).
        const CREATE_NEW_PROCESS_GROUP: u32 = 0x0000_0200;
        command.creation_flags(CREATE_NEW_PROCESS_GROUP);
    }
    #[cfg(not(any(keyhole_unix, windows)))]
    let _ = command;
}

/// From now on the terminal's interrupts (SIGINT, SIGQUIT) are the
/// client's to act on; this process waits for it. (Windows: std has no
/// call for it; a Ctrl-C there ends `keyhole connect` with its client.)
pub fn leave_interrupts_to_the_client() {
    #[cfg(keyhole_unix)]
    for signal in [libc::SIGINT, libc::SIGQUIT] {
        // SAFETY: setting a signal's disposition to SIG_IGN has no
        // preconditions; the client was spawned before, with its defaults.
        unsafe {
            libc::signal(signal, libc::SIG_IGN);
        }
    }
}

/// Asks the child to stop (SIGTERM: keyhole drains), waits up to 10 s, then
/// kills it. Where there is no SIGTERM (Windows), kills it.
pub fn stop(child: &mut Child) {
    #[cfg(keyhole_unix)]
    {
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = std::time::Instant::now() + STOP_GRACE;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    #[cfg(not(keyhole_unix))]
    let _ = STOP_GRACE;
    let _ = child.kill();
    let _ = child.wait();
}

/// A child's exit code as a shell reports it: its code, else 128 + the
/// signal that ended it; `failed` when neither is known.
pub fn exit_code(status: ExitStatus, failed: u8) -> u8 {
    #[cfg(keyhole_unix)]
    let signal = {
        use std::os::unix::process::ExitStatusExt;
        status.signal()
    };
    #[cfg(not(keyhole_unix))]
    let signal: Option<i32> = None;
    match (status.code(), signal) {
        (Some(code), _) => u8::try_from(code).unwrap_or(failed),
        (None, Some(signal)) => u8::try_from(128 + signal).unwrap_or(failed),
        _ => failed,
    }
}

#[cfg(all(test, keyhole_unix))]
mod tests {
    use super::*;

    #[test]
    fn a_signal_death_is_128_plus_the_signal_and_a_code_is_itself() {
        let killed = Command::new("sh")
            .args(["-c", "kill -TERM $$"])
            .status()
            .expect("sh runs");
        assert_eq!(exit_code(killed, 1), 143);
        let three = Command::new("sh")
            .args(["-c", "exit 3"])
            .status()
            .expect("sh runs");
        assert_eq!(exit_code(three, 1), 3);
    }

    #[test]
    fn stop_lets_a_child_end_on_sigterm() {
        let mut child = Command::new("sleep").arg("30").spawn().expect("sleep runs");
        let started = std::time::Instant::now();
        stop(&mut child);
        assert!(child.try_wait().expect("wait").is_some(), "the child ended");
        assert!(
            started.elapsed() < STOP_GRACE,
            "on SIGTERM, not after the grace"
        );
    }
}
