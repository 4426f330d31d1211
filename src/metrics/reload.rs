//! Configuration reloads (SIGHUP, `--watch`): how many were applied or
//! refused, whether the last one worked, and when the running
//! configuration was last loaded. The families appear once the proxy has
//! loaded its first configuration ([`ReloadMetrics::loaded`]), so a
//! registry that serves no proxy has none.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use super::text::{Exposition, Float, Kind};

#[derive(Debug, Default)]
pub struct ReloadMetrics {
    /// A configuration was loaded at start: the families are shown.
    shown: AtomicBool,
    ok: AtomicU64,
    refused: AtomicU64,
    /// Whether the last attempt was applied (the start counts as one).
    last_ok: AtomicBool,
    /// When the running configuration was loaded: f64 seconds since the
    /// epoch, as bits.
    last_success: AtomicU64,
}

impl ReloadMetrics {
    /// The configuration keyhole started with was loaded at `at`.
    pub fn loaded(&self, at: SystemTime) {
        self.succeeded_at(at);
        self.shown.store(true, Ordering::Release);
    }

    /// A reload was applied at `at`.
    pub fn reloaded(&self, at: SystemTime) {
        self.ok.fetch_add(1, Ordering::Relaxed);
        self.succeeded_at(at);
    }

    /// A reload was refused: the running configuration stays.
    pub fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        self.last_ok.store(false, Ordering::Relaxed);
    }

    fn succeeded_at(&self, at: SystemTime) {
        let seconds = at
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.last_success
            .store(seconds.to_bits(), Ordering::Relaxed);
        self.last_ok.store(true, Ordering::Relaxed);
    }

    /// (applied, refused) so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.ok.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
        )
    }

    pub(super) fn render(&self, exp: &mut Exposition) {
        if !self.shown.load(Ordering::Acquire) {
            return;
        }
        let (ok, refused) = self.counts();
        exp.family(
            "keyhole_config_reloads_total",
            "Configuration reloads (SIGHUP, --watch), by result: ok (applied) or refused (the running configuration stayed).",
            Kind::Counter,
            |s| {
                s.push("keyhole_config_reloads_total", &[("result", "ok")], ok);
                s.push(
                    "keyhole_config_reloads_total",
                    &[("result", "refused")],
                    refused,
                );
            },
        );
        exp.family(
            "keyhole_config_last_reload_successful",
            "Whether the last configuration reload was applied (1) or refused (0); 1 before any reload.",
            Kind::Gauge,
            |s| {
                let ok = u64::from(self.last_ok.load(Ordering::Relaxed));
                s.push("keyhole_config_last_reload_successful", &[], ok);
            },
        );
        exp.family(
            "keyhole_config_last_reload_success_timestamp_seconds",
            "When the running configuration was loaded (at start or by the last applied reload), in seconds since the epoch.",
            Kind::Gauge,
            |s| {
                let at = f64::from_bits(self.last_success.load(Ordering::Relaxed));
                s.push(
                    "keyhole_config_last_reload_success_timestamp_seconds",
                    &[],
                    Float(at),
                );
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn render(metrics: &ReloadMetrics) -> String {
        let mut exp = Exposition::default();
        metrics.render(&mut exp);
        exp.finish()
    }

    #[test]
    fn nothing_is_shown_before_a_configuration_is_loaded() {
        assert_eq!(render(&ReloadMetrics::default()), "");
    }

    #[test]
    fn reloads_are_counted_by_result_and_the_last_success_is_kept() {
        let metrics = ReloadMetrics::default();
        let start = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        metrics.loaded(start);
        let text = render(&metrics);
        assert!(text.contains("keyhole_config_reloads_total{result=\"ok\"} 0\n"));
        assert!(text.contains("keyhole_config_reloads_total{result=\"refused\"} 0\n"));
        assert!(text.contains("keyhole_config_last_reload_successful 1\n"));
        assert!(text.contains("keyhole_config_last_reload_success_timestamp_seconds 1700000000\n"));

        metrics.refused();
        let text = render(&metrics);
        assert!(text.contains("keyhole_config_reloads_total{result=\"refused\"} 1\n"));
        assert!(text.contains("keyhole_config_last_reload_successful 0\n"));
        assert!(text.contains("keyhole_config_last_reload_success_timestamp_seconds 1700000000\n"));

        metrics.reloaded(start + Duration::from_millis(1500));
        let text = render(&metrics);
        assert!(text.contains("keyhole_config_reloads_total{result=\"ok\"} 1\n"));
        assert!(text.contains("keyhole_config_last_reload_successful 1\n"));
        assert!(
            text.contains("keyhole_config_last_reload_success_timestamp_seconds 1700000001.5\n")
        );
        assert_eq!(metrics.counts(), (1, 1));
    }
}
