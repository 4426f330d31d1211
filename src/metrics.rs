//! Counters operators read to see what keyhole refused and why. One
//! process-wide registry of plain atomics: counting costs one relaxed add,
//! and nothing here ever holds a secret or a user-supplied string (labels
//! are fixed names).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Why a client connection was refused before reaching a database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedReason {
    /// Over `--max-connections`.
    Limit,
    /// The client's address is outside the target's `allow=` list.
    Allowlist,
    /// The database resolved only to addresses the backend may not dial.
    Policy,
}

impl RefusedReason {
    pub const ALL: [RefusedReason; 3] = [
        RefusedReason::Limit,
        RefusedReason::Allowlist,
        RefusedReason::Policy,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            RefusedReason::Limit => "limit",
            RefusedReason::Allowlist => "allowlist",
            RefusedReason::Policy => "policy",
        }
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    refused: [AtomicU64; 3],
    token_injections: AtomicU64,
    token_failures: AtomicU64,
}

impl Metrics {
    /// Placeholder until the Prometheus registry lands.
    pub fn render(&self) -> String {
        String::new()
    }

    pub fn refused(&self, reason: RefusedReason) {
        self.refused[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn refused_total(&self, reason: RefusedReason) -> u64 {
        self.refused[reason as usize].load(Ordering::Relaxed)
    }

    /// A token answered a server's password request.
    pub fn token_injected(&self) {
        self.token_injections.fetch_add(1, Ordering::Relaxed);
    }

    /// A session needed a token and could not have one, or the server
    /// asked for something a token cannot answer.
    pub fn token_failed(&self) {
        self.token_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn token_injections(&self) -> u64 {
        self.token_injections.load(Ordering::Relaxed)
    }

    pub fn token_failures(&self) -> u64 {
        self.token_failures.load(Ordering::Relaxed)
    }
}

/// The process's registry.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_reason_counts_on_its_own() {
        let m = Metrics::default();
        m.refused(RefusedReason::Allowlist);
        m.refused(RefusedReason::Allowlist);
        m.refused(RefusedReason::Policy);
        let counts: Vec<(&str, u64)> = RefusedReason::ALL
            .iter()
            .map(|r| (r.label(), m.refused_total(*r)))
            .collect();
        assert_eq!(counts, [("limit", 0), ("allowlist", 2), ("policy", 1)]);
    }
}
