//! The sidecar's HTTP/1 server: axum's router behind an accept loop that
//! bounds what a client can hold. `axum::serve` has no timeouts and no
//! connection cap, so a few hundred silent connections could exhaust the
//! process's file descriptors and a half-sent request could hold a
//! shutdown open past Kubernetes' grace period (losing the final
//! checkpoints).
//!
//! - **headers**: a request's headers must arrive within `header_timeout`;
//!   the same timer closes a keep-alive connection idle that long, and one
//!   that never sends a byte (hyper starts it whenever it waits for a head);
//! - **request**: a request (body included) must be read and answered
//!   within `request_timeout`, else `408`;
//! - **connections**: at most `max_connections` at once; past that a new
//!   connection is closed at once and counted, so the process never runs
//!   out of file descriptors, and new connections (health probes too) get
//!   through again as soon as others close — which the timeouts bound;
//! - **accept errors** (such as running out of file descriptors) are logged
//!   once a second at most, with a short pause before accepting again;
//! - **shutdown**: stop accepting, let requests in flight finish for
//!   `shutdown_grace`, then close whatever is left.
//!
//! Not bounded here: a client that never reads its response holds its
//! connection until the kernel's send buffer and TCP give up (responses are
//! small, so this takes many connections, which the cap then bounds).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt as _;

/// Bounds on what one client can hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub request_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
}

/// Pause after an accept error, so a process out of file descriptors does
/// not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Answer `408` for a request (its body included) not done in time.
pub fn with_request_timeout(router: Router, timeout: Duration) -> Router {
    router.layer(axum::middleware::from_fn(
        move |req: Request, next: Next| async move {
            match tokio::time::timeout(timeout, next.run(req)).await {
                Ok(response) => response,
                Err(_) => crate::api::problem(
                    StatusCode::REQUEST_TIMEOUT,
                    "about:blank",
                    "Request Timeout",
                    format!(
                        "the request was not received and answered within {} ms",
                        timeout.as_millis()
                    ),
                    serde_json::json!({}),
                ),
            }
        },
    ))
}

/// Serve `router` on `listener` until `shutdown` completes, then drain.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    metrics: Arc<quotaflow_adapters::metrics::Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let router = with_request_timeout(router, limits.request_timeout);
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    // Every connection's task, so that those still open after the grace
    // can be ended; finished ones are reaped as connections come in.
    let mut tasks = tokio::task::JoinSet::new();
    let mut last_error_log: Option<Instant> = None;
    let mut refused_since_log = 0u64;
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(v) => v,
            Err(e) => {
                metrics.http_accept_errors.inc();
                if last_error_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    last_error_log = Some(Instant::now());
                    tracing::error!(event = "accept_failed", error = %e, "cannot accept connections (file descriptors exhausted?); retrying");
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics.http_connections_refused.inc();
            refused_since_log += 1;
            if last_error_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                last_error_log = Some(Instant::now());
                tracing::warn!(
                    event = "connections_refused",
                    refused = refused_since_log,
                    max_connections = limits.max_connections,
                    "connection cap reached; closing new connections"
                );
                refused_since_log = 0;
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            router.clone().oneshot(req)
        });
        let conn = http.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        let open = metrics.http_connections_open.clone();
        open.inc();
        while tasks.try_join_next().is_some() {}
        tasks.spawn(async move {
            // Errors here are clients going away or timing out.
            let _ = conn.await;
            open.dec();
            drop(permit);
        });
    }
    drop(listener);
    let in_flight = permits.available_permits();
    tracing::info!(
        event = "http_draining",
        open_connections = limits.max_connections.saturating_sub(in_flight),
        grace_ms = limits.shutdown_grace.as_millis() as u64,
        "no longer accepting; letting requests in flight finish"
    );
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            event = "http_drain_timeout",
            open_connections = tasks.len(),
            "connections still open after the shutdown grace; closing them"
        );
    }
    // Ended, not left serving while the stream processor drains.
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    metrics.http_connections_open.set(0);
}
