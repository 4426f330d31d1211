//! Which upstream issued which cancel key.
//!
//! A CancelRequest arrives on a fresh connection carrying only the key the
//! server handed out in BackendKeyData. keyhole passes keys through
//! unchanged, remembers which upstream each live session's key came from, and
//! sends the cancel there over TLS. Keys of sessions that ended are gone, so
//! a stale or guessed key reaches nobody.
//!
//! A pooled server connection (`pool=session`) serves one client after
//! another, so its own key must not be the client's: a client that has left
//! would still hold a key that cancels the next client's statements. Each
//! pooled client gets a key of its own (the server's process id, a fresh
//! random secret), and the registry translates it to the server's key while
//! that client holds the connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::protocol::postgres::CancelKey;
use crate::upstream::SharedUpstream;

#[derive(Default)]
pub struct CancelRegistry {
    /// The key a client presents → where to send the cancel, and the key
    /// the server issued.
    routes: Mutex<HashMap<CancelKey, (SharedUpstream, CancelKey)>>,
}

/// Removes its key from the registry when the session ends.
pub struct Registration {
    registry: Arc<CancelRegistry>,
    key: CancelKey,
}

impl CancelRegistry {
    pub fn register(self: &Arc<Self>, key: CancelKey, upstream: SharedUpstream) -> Registration {
        self.register_as(key.clone(), key, upstream)
    }

    /// Routes `client_key` (what the client was given) to `upstream` with
    /// `server_key` (what the server issued) until the registration drops.
    pub fn register_as(
        self: &Arc<Self>,
        client_key: CancelKey,
        server_key: CancelKey,
        upstream: SharedUpstream,
    ) -> Registration {
        self.routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(client_key.clone(), (upstream, server_key));
        Registration {
            registry: self.clone(),
            key: client_key,
        }
    }

    /// Where a cancel with `key` goes, and the key to send there.
    pub fn route(&self, key: &CancelKey) -> Option<(SharedUpstream, CancelKey)> {
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
