//! The operator's HTTP endpoints: health checks and metrics on
//! `--http-address:--http-port`, and the admin port (`/quitquitquit`,
//! always on loopback). Each server runs only when a flag asks for it.

pub mod admin;
pub mod health;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use http::{Method, StatusCode};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::http::server::{Reply, ReplyFuture, Routes, Server};
use crate::lifecycle::Lifecycle;
use crate::listener::BindError;

pub use health::Health;

/// Routes of the health and metrics server.
pub struct OperatorRoutes {
    /// `None` without `--health-check`.
    pub health: Option<Health>,
    /// `--prometheus`.
    pub metrics: bool,
}

impl Routes for OperatorRoutes {
    fn route<'a>(&'a self, method: &'a Method, path: &'a str) -> ReplyFuture<'a> {
        Box::pin(async move {
            let health = self.health.as_ref();
            let known = match path {
                "/startup" | "/liveness" | "/readiness" => health.is_some(),
                "/metrics" => self.metrics,
                _ => false,
            };
            if !known {
                return Reply::not_found();
            }
            if method != Method::GET && method != Method::HEAD {
                return Reply::method_not_allowed(&Method::GET);
            }
            match (path, health) {
                ("/startup", Some(h)) => h.startup(),
                ("/liveness", Some(h)) => h.liveness(),
                ("/readiness", Some(h)) => h.readiness().await,
                // Rendering reads /proc: off the async workers.
                _ => {
                    match tokio::task::spawn_blocking(|| crate::metrics::global().render()).await {
                        Ok(body) => Reply {
                            status: StatusCode::OK,
                            content_type: crate::metrics::CONTENT_TYPE,
                            body,
                        },
                        Err(e) => Reply::text(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            format!("metrics could not be rendered: {e}"),
                        ),
                    }
                }
            }
        })
    }
}

/// Binds the servers the configuration asks for and starts serving them
/// until `stop`. Binding errors are returned: a health port in use must
/// stop the start, or the platform's probes would talk to someone else.
pub async fn start(
    config: &Config,
    health: Health,
    lifecycle: &Arc<Lifecycle>,
    stop: &CancellationToken,
) -> Result<(), BindError> {
    if config.http.enabled() {
        let addr = SocketAddr::new(config.http.address, config.http.port);
        let server = Server::bind(addr, "health and metrics")
            .await
            .map_err(|e| BindError::new(format!("{addr} (health and metrics)"), e))?;
        let routes = OperatorRoutes {
            health: config.http.health_check.then_some(health),
            metrics: config.http.prometheus,
        };
        tracing::info!(listen = %addr, health_check = config.http.health_check, prometheus = config.http.prometheus, "HTTP endpoints listening");
        tokio::spawn(server.serve(Arc::new(routes), stop.clone()));
    }
    if let Some(port) = config.admin_port {
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        let server = Server::bind(addr, "admin")
            .await
            .map_err(|e| BindError::new(format!("{addr} (admin)"), e))?;
        tracing::info!(listen = %addr, "admin endpoint listening: POST /quitquitquit stops keyhole");
        let routes = admin::AdminRoutes {
            lifecycle: lifecycle.clone(),
        };
        tokio::spawn(server.serve(Arc::new(routes), stop.clone()));
    }
    Ok(())
}
