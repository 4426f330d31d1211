//! Which instance a target reaches now. For an instance connection name that
//! never changes; for a DNS-named instance ([`super::dns`]) a watcher looks
//! the name up every 30 s and, when it points elsewhere, puts the new
//! instance in place for new connections at once and lets the connections
//! to the old one go on for `--max-sigterm-delay` before they are closed
//! (cloud-sql-proxy closes them at once; a drain loses no transaction that
//! finishes in time).

use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::dns;
use super::instance::Instance;
use super::name::InstanceName;

/// The instance connections go to now, and the token that closes the
/// connections made to it once it is replaced and drained.
#[derive(Clone)]
pub struct Current {
    pub instance: Arc<Instance>,
    pub generation: CancellationToken,
}

/// A target's instance, fixed or following a DNS name.
pub struct Slot {
    current: RwLock<Current>,
    /// The DNS name followed, if any.
    dns_name: Option<String>,
}

impl Slot {
    pub fn new(instance: Arc<Instance>, dns_name: Option<String>) -> Arc<Slot> {
        Arc::new(Slot {
            current: RwLock::new(Current {
                instance,
                generation: CancellationToken::new(),
            }),
            dns_name,
        })
    }

    pub fn current(&self) -> Current {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn instance(&self) -> Arc<Instance> {
        self.current().instance
    }

    /// Whether connections may be moved (a DNS-named instance).
    pub fn follows_dns(&self) -> bool {
        self.dns_name.is_some()
    }

    /// Follows the DNS name until `stop`: `start` makes and starts the
    /// instance a new answer names (its refresher ends with the token it
    /// is given), `drain` is how long connections to a replaced instance go on.
    pub fn watch(
        self: &Arc<Self>,
        server: SocketAddr,
        lookup_timeout: Duration,
        drain: Duration,
        start: impl Fn(InstanceName, CancellationToken) -> Arc<Instance> + Send + 'static,
        retire_first: CancellationToken,
        stop: CancellationToken,
    ) {
        let Some(dns_name) = self.dns_name.clone() else {
            return;
        };
        let slot = self.clone();
        tokio::spawn(async move {
            let mut retire = retire_first;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(dns::INTERVAL) => {}
                }
                let name = match dns::resolve(server, &dns_name, lookup_timeout).await {
                    Ok(name) => name,
                    Err(e) => {
                        tracing::warn!(dns_name = %dns_name, error = %e, "DNS lookup of a Cloud SQL instance failed; connections keep going to the instance it named last");
                        continue;
                    }
                };
                let old = slot.current();
                if name == old.instance.name {
                    continue;
                }
                let own_stop = stop.child_token();
                let instance = start(name.clone(), own_stop.clone());
                *slot.current.write().unwrap_or_else(PoisonError::into_inner) = Current {
                    instance,
                    generation: CancellationToken::new(),
                };
                tracing::warn!(dns_name = %dns_name, from = %old.instance.name, to = %name, drain_secs = drain.as_secs_f64(), "the DNS name points to another Cloud SQL instance: new connections go there; connections to the old one are closed after --max-sigterm-delay");
                let old_retire = std::mem::replace(&mut retire, own_stop);
                tokio::spawn(async move {
                    tokio::time::sleep(drain).await;
                    old.generation.cancel();
                    old_retire.cancel();
                });
            }
        });
    }
}
