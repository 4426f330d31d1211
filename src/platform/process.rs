//! What the operating system says about keyhole's own process, for the
//! standard process metrics ([`crate::metrics::ProcessSnapshot`]):
//!
//! - Linux (`cfg(linux_native)`): `/proc/self/stat`, `/proc/stat`,
//!   `/proc/self/fd` and getrlimit(2): every family.
//! - Other Unix (macOS, and Linux built with `--cfg keyhole_portable`):
//!   getrusage(2) for CPU time, `/dev/fd` for open descriptors, getrlimit(2)
//!   for their limit, and the start time keyhole noted itself. No memory
//!   figures: those need each kernel's own interface (Mach on macOS), and a
//!   missing family is better than a wrong one.
//! - Windows: the start time.
//!
//! What a platform cannot say stays `None`, and the scrape leaves it out.
//! The `/proc` parsers are pure functions over the files' text, so tests
//! feed them samples on any system.

use std::sync::OnceLock;

use crate::metrics::ProcessSnapshot as Snapshot;

static STARTED: OnceLock<f64> = OnceLock::new();

/// Notes the process's start time (seconds since the epoch), for systems
/// that cannot tell it later. Called first thing in `main`; later calls keep
/// the first answer.
pub fn note_start() {
    STARTED.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    });
}

/// Reads the live process.
pub fn read() -> Snapshot {
    imp::read()
}

/// The fields of `/proc/self/stat` the metrics need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// User-mode CPU time, in clock ticks.
    pub utime: u64,
    /// Kernel-mode CPU time, in clock ticks.
    pub stime: u64,
    /// When the process started, in clock ticks after boot.
    pub starttime: u64,
    /// Virtual memory size, in bytes.
    pub vsize: u64,
    /// Resident set size, in pages.
    pub rss_pages: u64,
}

/// Parses `/proc/<pid>/stat`. The second field (the command name) is in
/// parentheses and may itself hold spaces and `)`, so the fields are
/// counted from after the last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let (_, rest) = text.rsplit_once(')')?;
    // After the `)`: field 3 (state) is at index 0, so field N is at N - 3.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    Some(Stat {
        utime: field(14)?,
        stime: field(15)?,
        starttime: field(22)?,
        vsize: field(23)?,
        rss_pages: field(24)?,
    })
}

/// The boot time (seconds since the epoch) from `/proc/stat`'s `btime` line.
pub fn parse_btime(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|value| value.trim().parse().ok())
}

#[cfg(linux_native)]
mod imp {
    use super::{parse_btime, parse_stat, Snapshot};

    pub(super) fn read() -> Snapshot {
        let stat = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|text| parse_stat(&text));
        let ticks = sysconf(libc::_SC_CLK_TCK);
        let btime = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|text| parse_btime(&text));
        Snapshot {
            resident_memory_bytes: stat
                .zip(sysconf(libc::_SC_PAGESIZE))
                .map(|(s, page)| s.rss_pages.saturating_mul(page)),
            virtual_memory_bytes: stat.map(|s| s.vsize),
            cpu_seconds: stat
                .zip(ticks)
                .map(|(s, hz)| s.utime.saturating_add(s.stime) as f64 / hz as f64),
            open_fds: super::count_entries("/proc/self/fd"),
            max_fds: super::max_fds(),
            start_time_seconds: match (stat, ticks, btime) {
                (Some(s), Some(hz), Some(boot)) => {
                    Some(boot as f64 + s.starttime as f64 / hz as f64)
                }
                _ => None,
            },
        }
    }

    fn sysconf(name: libc::c_int) -> Option<u64> {
        // SAFETY: sysconf only reads a configuration value.
        let value = unsafe { libc::sysconf(name) };
        u64::try_from(value).ok().filter(|v| *v > 0)
    }
}

#[cfg(all(keyhole_unix, not(linux_native)))]
mod imp {
    use super::Snapshot;

    pub(super) fn read() -> Snapshot {
        Snapshot {
            cpu_seconds: cpu_seconds(),
            open_fds: super::count_entries("/dev/fd"),
            max_fds: super::max_fds(),
            start_time_seconds: super::STARTED.get().copied(),
            ..Snapshot::default()
        }
    }

    /// User plus system CPU time, from getrusage(2).
    fn cpu_seconds() -> Option<f64> {
        // SAFETY: all-zero is a valid `rusage` (plain integers).
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage writes into the struct we own and hand it.
        let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
        let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        (rc == 0).then(|| seconds(usage.ru_utime) + seconds(usage.ru_stime))
    }
}

#[cfg(not(keyhole_unix))]
mod imp {
    use super::Snapshot;

    pub(super) fn read() -> Snapshot {
        Snapshot {
            start_time_seconds: super::STARTED.get().copied(),
            ..Snapshot::default()
        }
    }
}

/// Entries of a directory of descriptors (`/proc/self/fd`, `/dev/fd`), the
/// handle reading it included, as other Prometheus clients count.
#[cfg(keyhole_unix)]
fn count_entries(dir: &str) -> Option<u64> {
    let entries = std::fs::read_dir(dir).ok()?;
    Some(entries.filter(|e| e.is_ok()).count() as u64)
}

/// The soft limit on open files.
#[cfg(keyhole_unix)]
fn max_fds() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own and hand it.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    // rlim_t is u64 here but narrower on some 32-bit targets.
    #[allow(clippy::unnecessary_cast)]
    let soft = limit.rlim_cur as u64;
    (rc == 0).then_some(soft)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_count_from_the_last_parenthesis() {
        // comm is "a) b (c) d": spaces and ')' inside the parentheses.
        let line = "4242 (a) b (c) d) S 1 4242 4242 0 -1 4194560 1200 0 3 0 \
                    150 37 0 0 20 0 9 0 123456 987654321 2048 18446744073709551615 \
                    1 1 0 0 0 0 0 4096 17990 0 0 0 17 3 0 0 0 0 0\n";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                utime: 150,
                stime: 37,
                starttime: 123456,
                vsize: 987654321,
                rss_pages: 2048,
            })
        );
    }

    #[test]
    fn a_truncated_or_garbled_stat_is_none() {
        assert_eq!(parse_stat(""), None);
        assert_eq!(parse_stat("4242 (no closing paren S 1 2 3"), None);
        assert_eq!(parse_stat("4242 (x) S 1 2 3"), None);
        assert_eq!(
            parse_stat("1 (x) S 1 1 1 0 -1 0 0 0 0 0 abc 37 0 0 20 0 9 0 1 2 3"),
            None
        );
    }

    #[test]
    fn btime_is_read_from_its_line() {
        let text = "cpu  1 2 3 4\nintr 5 6\nctxt 77\nbtime 1700000000\nprocesses 99\n";
        assert_eq!(parse_btime(text), Some(1_700_000_000));
        assert_eq!(parse_btime("cpu 1 2 3\n"), None);
    }

    #[cfg(keyhole_unix)]
    #[test]
    fn the_live_process_reads_plausibly() {
        note_start();
        let snap = Snapshot::read();
        if cfg!(linux_native) {
            assert!(
                snap.resident_memory_bytes.is_some_and(|n| n > 0),
                "{snap:?}"
            );
            assert!(
                snap.virtual_memory_bytes
                    .zip(snap.resident_memory_bytes)
                    .is_some_and(|(v, r)| v >= r),
                "{snap:?}"
            );
        } else {
            // Not reported as zero: left out.
            assert_eq!(snap.resident_memory_bytes, None, "{snap:?}");
            assert_eq!(snap.virtual_memory_bytes, None, "{snap:?}");
        }
        assert!(snap.open_fds.is_some_and(|n| n > 0), "{snap:?}");
        assert!(snap.max_fds.is_some_and(|n| n > 0), "{snap:?}");
        assert!(snap.cpu_seconds.is_some_and(|s| s >= 0.0), "{snap:?}");
        // Started after 2020 and not in the future.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        assert!(
            snap.start_time_seconds
                .is_some_and(|t| t > 1_577_836_800.0 && t <= now + 1.0),
            "{snap:?}"
        );
    }
}
