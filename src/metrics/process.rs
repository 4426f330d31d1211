//! The standard Prometheus process metrics (memory, CPU time, file
//! descriptors, start time), as the platform reports them
//! ([`crate::platform::process`]: `/proc` on Linux, less elsewhere).
//! Whatever cannot be read is left out of the scrape, never reported as
//! zero; nothing here panics.

use super::text::{Exposition, Float, Kind};

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
        crate::platform::process::read()
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

#[cfg(test)]
mod tests {
    use super::*;

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
