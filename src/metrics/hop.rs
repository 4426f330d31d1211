//! One hop's counters (`via=`): connections opened through it and why the
//! others failed, and for an SSH bastion its logins and whether its
//! connection is up. Labelled by the hop as a URL without credentials.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI8, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

#[derive(Debug)]
pub struct HopMetrics {
    name: String,
    kind: &'static str,
    opened: AtomicU64,
    failed: Mutex<BTreeMap<&'static str, u64>>,
    logins: Mutex<BTreeMap<&'static str, u64>>,
    /// -1: no connection of its own (a proxy), 0: down, 1: up.
    up: AtomicI8,
}

impl HopMetrics {
    pub fn new(name: &str, kind: &'static str) -> HopMetrics {
        HopMetrics {
            name: name.to_owned(),
            kind,
            opened: AtomicU64::new(0),
            failed: Mutex::new(BTreeMap::new()),
            logins: Mutex::new(BTreeMap::new()),
            up: AtomicI8::new(-1),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// A stream to a database opened through the hop.
    pub fn opened(&self) {
        self.opened.fetch_add(1, Ordering::Relaxed);
    }

    /// A stream the hop could not open, by the error's label.
    pub fn failed(&self, reason: &'static str) {
        *self
            .failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(reason)
            .or_default() += 1;
    }

    /// An SSH login: `None` succeeded, else the failure's label.
    pub fn login(&self, failure: Option<&'static str>) {
        *self
            .logins
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(failure.unwrap_or("ok"))
            .or_default() += 1;
        if failure.is_some() {
            self.up.store(0, Ordering::Relaxed);
        }
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(i8::from(up), Ordering::Relaxed);
    }

    /// ("ok", opened), then each failure label with its count.
    pub fn connections(&self) -> Vec<(&'static str, u64)> {
        let mut out = vec![("ok", self.opened.load(Ordering::Relaxed))];
        out.extend(
            self.failed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .map(|(k, v)| (*k, *v)),
        );
        out
    }

    pub fn logins(&self) -> Vec<(&'static str, u64)> {
        self.logins
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect()
    }

    /// `Some(up)` for a hop with a connection of its own (an SSH bastion).
    pub fn up(&self) -> Option<bool> {
        match self.up.load(Ordering::Relaxed) {
            -1 => None,
            v => Some(v == 1),
        }
    }
}
