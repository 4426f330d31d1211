//! A small HTTP/1.1 server for keyhole's operator endpoints: health checks,
//! metrics and the admin port.
//!
//! Each endpoint answers a short text body; a [`Routes`] implementation maps
//! a method and path to a [`Reply`]. The server is built to sit next to a
//! database proxy without becoming its weak point: at most
//! [`MAX_CONNECTIONS`] probes are served at once (more are closed at
//! accept), a client gets [`HEADER_TIMEOUT`] to send its request head, and
//! request bodies are never read.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Probes served at once; a health checker needs one or two.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a client has to send its request line and headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

const TEXT: &str = "text/plain; charset=utf-8";

/// An endpoint's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    /// A one-line text answer (the newline is added).
    pub fn text(status: StatusCode, line: impl Into<String>) -> Reply {
        let mut body = line.into();
        body.push('\n');
        Reply {
            status,
            content_type: TEXT,
            body,
        }
    }

    pub fn not_found() -> Reply {
        Reply::text(StatusCode::NOT_FOUND, "not found")
    }

    pub fn method_not_allowed(allowed: &Method) -> Reply {
        Reply::text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method not allowed (use {allowed})"),
        )
    }
}

pub type ReplyFuture<'a> = Pin<Box<dyn Future<Output = Reply> + Send + 'a>>;

/// What a server answers.
pub trait Routes: Send + Sync + 'static {
    fn route<'a>(&'a self, method: &'a Method, path: &'a str) -> ReplyFuture<'a>;
}

/// A bound server, not yet serving: binding first lets the caller fail
/// (port in use) before anything else starts.
pub struct Server {
    listener: TcpListener,
    what: &'static str,
}

impl Server {
    /// `what` names the server in logs and errors ("health and metrics").
    pub async fn bind(addr: SocketAddr, what: &'static str) -> io::Result<Server> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Server { listener, what })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `stop` is cancelled. Connections in progress then finish
    /// on their own (each is one short exchange).
    pub async fn serve(self, routes: Arc<dyn Routes>, stop: CancellationToken) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let (stream, peer) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = self.listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::warn!(server = self.what, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(server = self.what, client = %peer, "too many HTTP connections at once; closing this one");
                continue;
            };
            let routes = routes.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let service = service_fn(move |request: http::Request<Incoming>| {
                    let routes = routes.clone();
                    async move {
                        let reply = routes.route(request.method(), request.uri().path()).await;
                        Ok::<_, Infallible>(into_response(reply))
                    }
                });
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                if let Err(e) = served {
                    tracing::debug!(client = %peer, error = %e, "HTTP connection ended with an error");
                }
            });
        }
    }
}

fn into_response(reply: Reply) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(reply.body)));
    *response.status_mut() = reply.status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(reply.content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::client::{send, Request, Url};

    struct Echo;

    impl Routes for Echo {
        fn route<'a>(&'a self, method: &'a Method, path: &'a str) -> ReplyFuture<'a> {
            Box::pin(async move {
                match (method, path) {
                    (&Method::GET, "/hello") => Reply::text(StatusCode::OK, "hi"),
                    (_, "/hello") => Reply::method_not_allowed(&Method::GET),
                    _ => Reply::not_found(),
                }
            })
        }
    }

    async fn start() -> (SocketAddr, CancellationToken) {
        let server = Server::bind("127.0.0.1:0".parse().unwrap(), "test")
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(server.serve(Arc::new(Echo), stop.clone()));
        (addr, stop)
    }

    fn url(addr: SocketAddr, path: &str) -> Url {
        Url::parse(&format!("http://{addr}{path}")).unwrap()
    }

    #[tokio::test]
    async fn routes_answer_with_their_status_and_a_text_line() {
        let (addr, _stop) = start().await;
        let ok = send(Request::get(url(addr, "/hello"))).await.unwrap();
        assert_eq!((ok.status, &ok.body[..]), (StatusCode::OK, &b"hi\n"[..]));
        let missing = send(Request::get(url(addr, "/nope"))).await.unwrap();
        assert_eq!(missing.status, StatusCode::NOT_FOUND);
        let wrong = send(Request::new(Method::POST, url(addr, "/hello")))
            .await
            .unwrap();
        assert_eq!(wrong.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(&wrong.body[..], b"method not allowed (use GET)\n");
    }

    #[tokio::test]
    async fn a_stopped_server_accepts_nothing_more() {
        let (addr, stop) = start().await;
        stop.cancel();
        // The accept loop ends at its next poll; give it that poll.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let refused = tokio::net::TcpStream::connect(addr).await;
        assert!(refused.is_err(), "{refused:?}");
    }
}
