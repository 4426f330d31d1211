//! The standard Prometheus process metrics (memory, CPU time, file
//! descriptors, start time), read from `/proc` on Linux. Whatever cannot be
//! read is left out of the scrape; nothing here panics. The parsers are
//! pure functions over the files' text, so tests feed them samples.

use super::text::{Exposition, Float, Kind};

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

/// One reading of the process's metrics; `None` where a source failed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Snapshot {
    pub resident_memory_bytes: Option<u64>,
    pub virtual_memory_bytes: Option<u64>,
    pub cpu_seconds: Option<f64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub start_time_seconds: Option<f64>,
}

impl Snapshot {
    /// Reads the live process.
    pub fn read() -> Snapshot {
        let stat = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|text| parse_stat(&text));
        let ticks = clock_ticks_per_second();
        let btime = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|text| parse_btime(&text));
        Snapshot {
            resident_memory_bytes: stat
                .zip(page_size())
                .map(|(s, page)| s.rss_pages.saturating_mul(page)),
            virtual_memory_bytes: stat.map(|s| s.vsize),
            cpu_seconds: stat
                .zip(ticks)
                .map(|(s, hz)| s.utime.saturating_add(s.stime) as f64 / hz as f64),
            open_fds: open_fds(),
            max_fds: max_fds(),
            start_time_seconds: match (stat, ticks, btime) {
                (Some(s), Some(hz), Some(boot)) => {
                    Some(boot as f64 + s.starttime as f64 / hz as f64)
                }
                _ => None,
            },
        }
    }

    /// Adds the families whose value was read.
    pub(super) fn render(&self, exp: &mut Exposition) {
        let families: [(&str, &str, Kind, Option<Float>); 6] = [
            (
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds.",
                Kind::Counter,
                self.cpu_seconds.map(Float),
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                Kind::Gauge,
                self.open_fds.map(|n| Float(n as f64)),
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                Kind::Gauge,
                self.max_fds.map(|n| Float(n as f64)),
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                Kind::Gauge,
                self.virtual_memory_bytes.map(|n| Float(n as f64)),
            ),
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                Kind::Gauge,
                self.resident_memory_bytes.map(|n| Float(n as f64)),
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                Kind::Gauge,
                self.start_time_seconds.map(Float),
            ),
        ];
        for (name, help, kind, value) in families {
            exp.family(name, help, kind, |s| {
                if let Some(value) = value {
                    s.push(name, &[], value);
                }
            });
        }
    }
}

/// Entries of `/proc/self/fd` (the directory handle reading it included,
/// as other Prometheus clients count).
fn open_fds() -> Option<u64> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?;
    Some(entries.filter(|e| e.is_ok()).count() as u64)
}

#[cfg(target_os = "linux")]
fn sysconf(name: libc::c_int) -> Option<u64> {
    // SAFETY: sysconf only reads a configuration value.
    let value = unsafe { libc::sysconf(name) };
    u64::try_from(value).ok().filter(|v| *v > 0)
}

#[cfg(target_os = "linux")]
fn page_size() -> Option<u64> {
    sysconf(libc::_SC_PAGESIZE)
}

#[cfg(target_os = "linux")]
fn clock_ticks_per_second() -> Option<u64> {
    sysconf(libc::_SC_CLK_TCK)
}

/// The soft limit on open files.
#[cfg(target_os = "linux")]
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

#[cfg(not(target_os = "linux"))]
fn page_size() -> Option<u64> {
    None
}

#[cfg(not(target_os = "linux"))]
fn clock_ticks_per_second() -> Option<u64> {
    None
}

#[cfg(not(target_os = "linux"))]
fn max_fds() -> Option<u64> {
    None
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

    #[cfg(target_os = "linux")]
    #[test]
    fn the_live_process_reads_plausibly() {
        let snap = Snapshot::read();
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

    #[test]
    fn only_what_was_read_is_rendered() {
        let snap = Snapshot {
            open_fds: Some(7),
            cpu_seconds: Some(0.5),
            ..Snapshot::default()
        };
        let mut exp = Exposition::default();
        snap.render(&mut exp);
        assert_eq!(
            exp.finish(),
            "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n\
             # TYPE process_cpu_seconds_total counter\n\
             process_cpu_seconds_total 0.5\n\
             # HELP process_open_fds Number of open file descriptors.\n\
             # TYPE process_open_fds gauge\n\
             process_open_fds 7\n"
        );
    }
}
