//! Which upstream issued which cancel key.
//!
//! A CancelRequest arrives on a fresh connection carrying only the key the
//! server handed out in BackendKeyData. keyhole passes keys through
//! unchanged, remembers which upstream each live session's key came from, and
//! sends the cancel there over TLS. Keys of sessions that ended are gone, so
//! a stale or guessed key reaches nobody.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::protocol::postgres::CancelKey;
use crate::upstream::SharedUpstream;

#[derive(Default)]
pub struct CancelRegistry {
    routes: Mutex<HashMap<CancelKey, SharedUpstream>>,
}

/// Removes its key from the registry when the session ends.
pub struct Registration {
    registry: Arc<CancelRegistry>,
    key: CancelKey,
}

impl CancelRegistry {
    pub fn register(self: &Arc<Self>, key: CancelKey, upstream: SharedUpstream) -> Registration {
        self.routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.clone(), upstream);
        Registration {
            registry: self.clone(),
            key,
        }
    }

    pub fn route(&self, key: &CancelKey) -> Option<SharedUpstream> {
        self.routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry
            .routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
    }
}
