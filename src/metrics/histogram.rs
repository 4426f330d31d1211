//! A latency histogram of plain atomics: fixed buckets sized for connecting
//! to a database on a LAN or in a cloud region (half a millisecond to ten
//! seconds). Observing costs two relaxed adds (one bucket, the sum); a
//! scrape renders the buckets cumulative, as Prometheus expects.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::text::{with, Float, Labels, Samples};

/// Upper bounds (inclusive) in nanoseconds, with their `le` labels. The
/// `+Inf` bucket follows them.
const BOUNDS: [(u64, &str); 14] = [
    (500_000, "0.0005"),
    (1_000_000, "0.001"),
    (2_500_000, "0.0025"),
    (5_000_000, "0.005"),
    (10_000_000, "0.01"),
    (25_000_000, "0.025"),
    (50_000_000, "0.05"),
    (100_000_000, "0.1"),
    (250_000_000, "0.25"),
    (500_000_000, "0.5"),
    (1_000_000_000, "1"),
    (2_500_000_000, "2.5"),
    (5_000_000_000, "5"),
    (10_000_000_000, "10"),
];

/// Observations of one duration, e.g. how long a TCP connect took.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per bucket (not cumulative); the last one is `+Inf`.
    buckets: [AtomicU64; BOUNDS.len() + 1],
    /// The sum of every observation, in nanoseconds.
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, took: Duration) {
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let bucket = BOUNDS
            .iter()
            .position(|(bound, _)| nanos <= *bound)
            .unwrap_or(BOUNDS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// How many observations so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// Writes `<name>_bucket{...,le=...}` for every bucket, `<name>_sum`
    /// (seconds) and `<name>_count`. The count is the `+Inf` bucket's, so
    /// the two agree even when an observation races the scrape.
    pub(super) fn render(&self, samples: &mut Samples, name: &str, labels: &Labels) {
        let bucket_name = format!("{name}_bucket");
        let mut cumulative = 0u64;
        for (i, count) in self.buckets.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            let le = BOUNDS.get(i).map_or("+Inf", |(_, label)| label);
            samples.push(&bucket_name, &with(labels, "le", le), cumulative);
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        samples.push(&format!("{name}_sum"), labels, Float(sum));
        samples.push(&format!("{name}_count"), labels, cumulative);
    }
}

#[cfg(test)]
mod tests {
    use super::super::text::{Exposition, Kind};
    use super::*;

    fn rendered(h: &Histogram) -> Vec<String> {
        let mut exp = Exposition::default();
        exp.family("h", "help", Kind::Histogram, |s| {
            h.render(s, "h", &[("target", "t")])
        });
        exp.finish()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn labels_are_inclusive_upper_bounds_in_seconds() {
        for (nanos, label) in BOUNDS {
            let seconds: f64 = label.parse().unwrap_or(f64::NAN);
            assert_eq!(nanos as f64 / 1e9, seconds, "{label}");
        }
        assert!(BOUNDS.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn buckets_are_cumulative_with_sum_and_count() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500)); // on the 0.0005 bound: counts there
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60)); // only +Inf
        assert_eq!(h.count(), 4);
        let lines = rendered(&h);
        let expected = [
            "h_bucket{target=\"t\",le=\"0.0005\"} 1",
            "h_bucket{target=\"t\",le=\"0.001\"} 1",
            "h_bucket{target=\"t\",le=\"0.0025\"} 1",
            "h_bucket{target=\"t\",le=\"0.005\"} 3",
            "h_bucket{target=\"t\",le=\"0.01\"} 3",
            "h_bucket{target=\"t\",le=\"0.025\"} 3",
            "h_bucket{target=\"t\",le=\"0.05\"} 3",
            "h_bucket{target=\"t\",le=\"0.1\"} 3",
            "h_bucket{target=\"t\",le=\"0.25\"} 3",
            "h_bucket{target=\"t\",le=\"0.5\"} 3",
            "h_bucket{target=\"t\",le=\"1\"} 3",
            "h_bucket{target=\"t\",le=\"2.5\"} 3",
            "h_bucket{target=\"t\",le=\"5\"} 3",
            "h_bucket{target=\"t\",le=\"10\"} 3",
            "h_bucket{target=\"t\",le=\"+Inf\"} 4",
            "h_sum{target=\"t\"} 60.0065",
            "h_count{target=\"t\"} 4",
        ];
        assert_eq!(lines, expected);
    }

    #[test]
    fn an_empty_histogram_renders_zeros() {
        let lines = rendered(&Histogram::default());
        assert_eq!(lines.len(), BOUNDS.len() + 3);
        assert!(lines.iter().all(|l| l.ends_with(" 0")), "{lines:?}");
    }
}
