//! The Envoy Rate Limit Service v3 over gRPC (tonic), on its own listener
//! (`[grpc] listen`), with gRPC health checking and reflection beside it.
//! Checks are decided by the same function as `/check` (docs/envoy.md).

pub mod codec;
pub mod proto;
pub mod rls;

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::api::{self, AppState};
use crate::settings::Settings;
use proto::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitServiceServer, SERVICE_NAME,
};

/// How often the health service follows the instance's readiness.
const HEALTH_EVERY: Duration = Duration::from_millis(500);

/// The gRPC server's threads, each with a single-threaded runtime of its own
/// accepting from the one listener: a call is read, decided and answered on
/// the thread that owns its connection, with no wake-up of another thread
/// (on the shared multi-threaded runtime that cost about a fifth of the
/// CPU of a call).
pub struct Running {
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Running {
    /// Wait for every thread, once `shutdown` has completed for each.
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Bind `[grpc] listen`, when set, and start `[grpc] threads` threads
/// serving it until each `shutdown()` completes. Returns once every thread
/// serves, having logged `grpc_listening`.
pub async fn start<F, S>(
    settings: &Settings,
    app: &AppState,
    shutdown: F,
) -> anyhow::Result<Option<Running>>
where
    F: Fn() -> S,
    S: Future<Output = ()> + Send + 'static,
{
    let Some(addr) = settings.grpc.listen else {
        return Ok(None);
    };
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot listen on {addr} (grpc.listen)"))?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let n = settings.grpc.threads.clamp(1, MAX_THREADS);
    let mut threads = Vec::with_capacity(n);
    let mut started = Vec::with_capacity(n);
    for i in 0..n {
        let listener = listener.try_clone()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a gRPC runtime")?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (app, settings, stop) = (app.clone(), settings.clone(), shutdown());
        let thread = std::thread::Builder::new()
            .name(format!("grpc-{i}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let served = match TcpListener::from_std(listener) {
                        Ok(l) => serve(l, app, &settings, stop, tx).await,
                        Err(e) => Err(e.into()),
                    };
                    if let Err(e) = served {
                        tracing::error!(event = "grpc_failed", error = %format!("{e:#}"), "the gRPC server stopped");
                    }
                });
            })
            .context("starting a gRPC thread")?;
        threads.push(thread);
        started.push(rx);
    }
    for rx in started {
        rx.await
            .context("the gRPC server did not start (grpc_failed says why)")?;
    }
    tracing::info!(
        event = "grpc_listening",
        addr = %bound,
        domain = %settings.grpc.domain,
        threads = n,
        "Envoy rate limit service (gRPC) on {bound}"
    );
    Ok(Some(Running { threads }))
}

/// Threads of the gRPC server at most.
pub const MAX_THREADS: usize = 256;

/// Serve the RLS, health and reflection on `listener` until `shutdown`
/// completes, then let calls in flight finish.
async fn serve(
    listener: TcpListener,
    app: AppState,
    settings: &Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
    announced: tokio::sync::oneshot::Sender<()>,
) -> anyhow::Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    // SERVING exactly when /readyz says ready, for the whole server ("")
    // and for the RLS.
    let readiness = {
        let app = app.clone();
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let status = if api::not_ready(&app).is_none() {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                if last != Some(status) {
                    reporter.set_service_status("", status).await;
                    reporter.set_service_status(SERVICE_NAME, status).await;
                    last = Some(status);
                }
                tokio::time::sleep(HEALTH_EVERY).await;
            }
        })
    };
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .context("building gRPC reflection")?;
    // grpcurl and older clients still ask v1alpha.
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .context("building gRPC reflection")?;
    let rls = RateLimitServiceServer::new(rls::Rls::new(app, &settings.grpc));
    let _ = announced.send(());
    // No per-call deadline layer (a timer per call): a check is bounded by
    // the state backend's budget, not by the transport.
    let result = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(rls)
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
        .context("serving gRPC");
    readiness.abort();
    result
}
