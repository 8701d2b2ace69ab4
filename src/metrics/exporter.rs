//! The HTTP side of `[metrics] listen`: `GET /metrics` answers with the
//! OpenMetrics text of the node's metrics; anything else is a 404.
//!
//! The endpoint carries no secrets but is unauthenticated: bind it to a
//! management address. It holds at most [`MAX_CONNECTIONS`] connections,
//! and a client gets [`HEADER_TIMEOUT`] to send its request headers, so a
//! stray scanner cannot tie the daemon up.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::Instrument;

/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 16;

/// How long a client has to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The content type of the OpenMetrics text format.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds the endpoint's address; done first, so that an address that is
/// taken or invalid fails the daemon's start before it changes anything.
pub async fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await
}

/// Serves scrapes on `listener` for ever; `render` produces the text of one.
pub fn serve<R, F>(listener: TcpListener, render: R) -> impl Future<Output = ()> + Send
where
    R: Fn() -> F + Send + Sync + 'static,
    F: Future<Output = String> + Send,
{
    let render = Arc::new(render);
    async move {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let render = Arc::clone(&render);
            let service = service_fn(move |request: Request<Incoming>| {
                let render = Arc::clone(&render);
                async move { Ok::<_, Infallible>(answer(&request, || render()).await) }
            });
            tokio::spawn(
                async move {
                    let served = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_TIMEOUT)
                        .keep_alive(false)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    if let Err(e) = served {
                        tracing::debug!(%peer, error = %e, "metrics connection ended");
                    }
                    drop(slot);
                }
                .in_current_span(),
            );
        }
    }
}

async fn answer<R, F>(request: &Request<Incoming>, render: R) -> Response<Full<Bytes>>
where
    R: FnOnce() -> F,
    F: Future<Output = String>,
{
    let reply = |status: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => reply(StatusCode::OK, CONTENT_TYPE, render().await),
        (&Method::GET, _) => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "vmsync serves its metrics at /metrics\n".into(),
        ),
        _ => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        ),
    }
}
