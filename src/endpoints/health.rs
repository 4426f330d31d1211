//! `/startup`, `/liveness` and `/readiness`, the probes ECS, Cloud Run and
//! Kubernetes run against a sidecar.
//!
//! - `/startup`: 200 once every listener is bound (and, with
//!   `--run-connection-test`, every target answered); 503 before.
//! - `/liveness`: 200 while the process serves: if this does not answer, the
//!   runtime is stuck and a restart is the right cure.
//! - `/readiness`: 503 while starting, while draining, while
//!   `--max-connections` is reached, and (only with
//!   `--readiness-checks-upstream`) while a target does not answer a TLS
//!   connection. It never dials otherwise: a database blip should not make
//!   a platform restart or unroute every sidecar at once. A Cloud SQL
//!   instance (refreshed ahead) without a valid client certificate fails it
//!   too, naming the instance and why.
//!
//! What `/readiness` looks at is the targets served now ([`Watched`]): the
//! proxy publishes a new list after each configuration reload, and a reload
//! by itself never makes keyhole unready.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use tokio::sync::{watch, Mutex, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::cloudsql::Slot;
use crate::config::Protocol;
use crate::http::server::Reply;
use crate::lifecycle::{Lifecycle, Phase};
use crate::upstream::Upstream;

/// Upstream answers are reused this long, so a burst of probes (several
/// replicas of a checker, a retry) is one connection per target.
const UPSTREAM_CHECK_REUSE: Duration = Duration::from_secs(1);

pub struct Health {
    lifecycle: Arc<Lifecycle>,
    /// The connection limit's semaphore and its size.
    limit: Option<(Arc<Semaphore>, usize)>,
    /// `--readiness-checks-upstream`: the last answer, reused briefly.
    upstream: Option<UpstreamCheck>,
    /// The targets served now.
    watched: watch::Receiver<Arc<Watched>>,
}

/// What the served targets give `/readiness` to look at.
#[derive(Default)]
pub struct Watched {
    /// What `--readiness-checks-upstream` dials: each target's name,
    /// protocol and upstream.
    pub probes: Vec<(String, Option<Protocol>, Arc<Upstream>)>,
    /// Cloud SQL instances: `/readiness` fails while one has no valid
    /// client certificate (it asks no API, only the connector's state).
    pub instances: Vec<Arc<Slot>>,
    /// Hops (`via=`): `/readiness` fails while a bastion's last login failed
    /// and no connection to it is up.
    pub hops: Vec<Arc<crate::transport::Hop>>,
}

/// The last answer of the upstream check.
struct UpstreamCheck {
    last: Mutex<Option<(Instant, Result<(), String>)>>,
}

impl Health {
    pub fn new(lifecycle: Arc<Lifecycle>, limit: Option<(Arc<Semaphore>, usize)>) -> Health {
        Health {
            lifecycle,
            limit,
            upstream: None,
            watched: watch::channel(Arc::new(Watched::default())).1,
        }
    }

    /// `/readiness` also looks at these targets, as the proxy updates them.
    pub fn follow(mut self, watched: watch::Receiver<Arc<Watched>>) -> Health {
        self.watched = watched;
        self
    }

    /// `/readiness` also dials every target (`--readiness-checks-upstream`).
    pub fn check_upstreams(mut self) -> Health {
        self.upstream = Some(UpstreamCheck {
            last: Mutex::new(None),
        });
        self
    }

    pub fn startup(&self) -> Reply {
        match self.lifecycle.phase() {
            Phase::Starting => Reply::text(StatusCode::SERVICE_UNAVAILABLE, "starting"),
            Phase::Serving | Phase::Draining => Reply::text(StatusCode::OK, "ok"),
        }
    }

    pub fn liveness(&self) -> Reply {
        Reply::text(StatusCode::OK, "ok")
    }

    pub async fn readiness(&self) -> Reply {
        let unavailable = |why: String| Reply::text(StatusCode::SERVICE_UNAVAILABLE, why);
        match self.lifecycle.phase() {
            Phase::Starting => return unavailable("starting".into()),
            Phase::Draining => return unavailable("draining".into()),
            Phase::Serving => {}
        }
        if let Some((semaphore, size)) = &self.limit {
            if semaphore.available_permits() == 0 {
                return unavailable(format!("at the connection limit ({size} of {size})"));
            }
        }
        let watched = self.watched.borrow().clone();
        for slot in &watched.instances {
            let instance = slot.instance();
            if let Some(why) = instance.not_ready() {
                return unavailable(format!(
                    "instance {} has no valid client certificate: {why}",
                    instance.name
                ));
            }
        }
        for hop in &watched.hops {
            if let Some(why) = hop.not_ready() {
                return unavailable(why);
            }
        }
        if let Some(check) = &self.upstream {
            if let Err(why) = check.run(&watched.probes).await {
                return unavailable(why);
            }
        }
        Reply::text(StatusCode::OK, "ok")
    }
}

impl UpstreamCheck {
    /// Dials every target at once; the first failure in target order is the
    /// answer.
    async fn run(
        &self,
        targets: &[(String, Option<Protocol>, Arc<Upstream>)],
    ) -> Result<(), String> {
        let mut last = self.last.lock().await;
        if let Some((at, result)) = last.as_ref() {
            if at.elapsed() < UPSTREAM_CHECK_REUSE {
                return result.clone();
            }
        }
        let mut probes = JoinSet::new();
        for (index, (_, protocol, upstream)) in targets.iter().enumerate() {
            let (protocol, upstream) = (*protocol, upstream.clone());
            probes.spawn(async move { (index, upstream.probe(protocol).await) });
        }
        let mut failures = Vec::new();
        while let Some(done) = probes.join_next().await {
            match done {
                Ok((_, Ok(()))) => {}
                Ok((index, Err(e))) => failures.push((index, e.to_string())),
                Err(e) => failures.push((usize::MAX, format!("the check failed: {e}"))),
            }
        }
        failures.sort();
        let result = match failures.into_iter().next() {
            None => Ok(()),
            Some((index, error)) => {
                let name = targets.get(index).map_or("?", |t| t.0.as_str());
                tracing::warn!(target = name, %error, "readiness: a target did not answer");
                Err(format!("target {name}: {error}"))
            }
        };
        *last = Some((Instant::now(), result.clone()));
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(reply: &Reply) -> (u16, &str) {
        (reply.status.as_u16(), reply.body.trim_end())
    }

    #[tokio::test]
    async fn each_probe_follows_the_phase() {
        let lifecycle = Arc::new(Lifecycle::default());
        let health = Health::new(lifecycle.clone(), None);
        assert_eq!(body(&health.startup()), (503, "starting"));
        assert_eq!(body(&health.readiness().await), (503, "starting"));
        assert_eq!(body(&health.liveness()), (200, "ok"));

        lifecycle.advance(Phase::Serving);
        assert_eq!(body(&health.startup()), (200, "ok"));
        assert_eq!(body(&health.readiness().await), (200, "ok"));

        lifecycle.advance(Phase::Draining);
        assert_eq!(body(&health.startup()), (200, "ok"));
        assert_eq!(body(&health.readiness().await), (503, "draining"));
        assert_eq!(body(&health.liveness()), (200, "ok"));
    }

    #[tokio::test]
    async fn readiness_follows_the_targets_published_and_a_reload_keeps_it_ready() {
        let lifecycle = Arc::new(Lifecycle::default());
        lifecycle.advance(Phase::Serving);
        let (publish, watched) = watch::channel(Arc::new(Watched::default()));
        let health = Health::new(lifecycle, None).follow(watched);
        assert_eq!(body(&health.readiness().await), (200, "ok"));
        // A reload publishes the targets it serves; nothing else changes.
        publish.send_replace(Arc::new(Watched::default()));
        assert_eq!(body(&health.readiness().await), (200, "ok"));
    }

    #[tokio::test]
    async fn readiness_fails_while_the_connection_limit_is_reached() {
        let lifecycle = Arc::new(Lifecycle::default());
        lifecycle.advance(Phase::Serving);
        let limit = Arc::new(Semaphore::new(2));
        let health = Health::new(lifecycle, Some((limit.clone(), 2)));
        let first = limit.clone().try_acquire_owned().unwrap();
        assert_eq!(body(&health.readiness().await), (200, "ok"));
        let second = limit.clone().try_acquire_owned().unwrap();
        assert_eq!(
            body(&health.readiness().await),
            (503, "at the connection limit (2 of 2)")
        );
        drop((first, second));
        assert_eq!(body(&health.readiness().await), (200, "ok"));
    }
}
