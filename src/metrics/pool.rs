//! A target's connection pool (`pool=session`): connections idle and in
//! use, clients that had to wait and for how long, connections opened,
//! reused and closed by reason. Labelled by target only: a pool's keys
//! hold user names, which never become labels.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use super::histogram::Histogram;

#[derive(Debug, Default)]
pub struct PoolMetrics {
    /// Set once the target has a pool: only then are its families shown.
    enabled: AtomicBool,
    idle: AtomicI64,
    in_use: AtomicI64,
    waits: AtomicU64,
    pub(super) wait: Histogram,
    opened: AtomicU64,
    reused: AtomicU64,
    closed: Mutex<Vec<(&'static str, u64)>>,
}

impl PoolMetrics {
    /// The target pools its connections (shown from now on).
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::Relaxed);
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    pub fn idle_changed(&self, delta: i64) {
        self.idle.fetch_add(delta, Ordering::Relaxed);
    }

    pub fn in_use_changed(&self, delta: i64) {
        self.in_use.fetch_add(delta, Ordering::Relaxed);
    }

    /// A client found the pool full and waited.
    pub fn waited(&self) {
        self.waits.fetch_add(1, Ordering::Relaxed);
    }

    /// A wait ended (with a connection or without) after `took`.
    pub fn wait_ended(&self, took: Duration) {
        self.wait.observe(took);
    }

    /// A new server connection was logged in for the pool.
    pub fn opened(&self) {
        self.opened.fetch_add(1, Ordering::Relaxed);
    }

    /// A client got an idle connection instead of a new login.
    pub fn reused(&self) {
        self.reused.fetch_add(1, Ordering::Relaxed);
    }

    /// A pooled connection was closed for `reason`.
    pub fn closed(&self, reason: &'static str) {
        let mut closed = self.closed.lock().unwrap_or_else(PoisonError::into_inner);
        match closed.iter_mut().find(|(label, _)| *label == reason) {
            Some((_, count)) => *count += 1,
            None => closed.push((reason, 1)),
        }
    }

    pub fn idle(&self) -> u64 {
        self.idle.load(Ordering::Relaxed).max(0) as u64
    }

    pub fn in_use(&self) -> u64 {
        self.in_use.load(Ordering::Relaxed).max(0) as u64
    }

    pub fn waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }

    pub fn opened_total(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    pub fn reused_total(&self) -> u64 {
        self.reused.load(Ordering::Relaxed)
    }

    /// Closed connections per reason, in first-seen order.
    pub fn closed_counts(&self) -> Vec<(&'static str, u64)> {
        self.closed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}
