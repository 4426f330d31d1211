//! The admin port: `POST /quitquitquit` starts a graceful shutdown that ends
//! with exit code 0 (for preStop hooks and jobs whose main work is done).
//! It listens on loopback only: anything that can reach it can stop keyhole.

use std::sync::Arc;

use http::{Method, StatusCode};

use crate::http::server::{Reply, ReplyFuture, Routes};
use crate::lifecycle::{Lifecycle, StopRequest};

pub struct AdminRoutes {
    pub lifecycle: Arc<Lifecycle>,
}

impl Routes for AdminRoutes {
    fn route<'a>(&'a self, method: &'a Method, path: &'a str) -> ReplyFuture<'a> {
        Box::pin(async move {
            match (method, path) {
                (&Method::POST, "/quitquitquit") => {
                    tracing::info!("quitquitquit received on the admin port");
                    self.lifecycle.request_stop(StopRequest::Quit);
                    Reply::text(StatusCode::OK, "shutting down")
                }
                (_, "/quitquitquit") => Reply::method_not_allowed(&Method::POST),
                _ => Reply::not_found(),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_a_post_asks_for_the_stop() {
        let lifecycle = Arc::new(Lifecycle::default());
        let routes = AdminRoutes {
            lifecycle: lifecycle.clone(),
        };
        let get = routes.route(&Method::GET, "/quitquitquit").await;
        assert_eq!(get.status, StatusCode::METHOD_NOT_ALLOWED);
        let other = routes.route(&Method::POST, "/quit").await;
        assert_eq!(other.status, StatusCode::NOT_FOUND);
        let post = routes.route(&Method::POST, "/quitquitquit").await;
        assert_eq!(
            (post.status, post.body.as_str()),
            (StatusCode::OK, "shutting down\n")
        );
        assert_eq!(lifecycle.next_stop().await, StopRequest::Quit);
    }
}
