//! The Envoy Rate Limit Service v3 over gRPC (tonic), on its own listener
//! (`[grpc] listen`), with gRPC health checking and reflection beside it.
//! Checks are decided by the same function as `/check` (docs/envoy.md).

pub mod codec;
pub mod proto;
pub mod rls;

use std::future::Future;
use std::net::SocketAddr;
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

/// Bind the gRPC listener, when one is configured.
pub async fn bind(settings: &Settings) -> anyhow::Result<Option<TcpListener>> {
    let Some(addr) = settings.grpc.listen else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (grpc.listen)"))?;
    Ok(Some(listener))
}

/// Serve the RLS, health and reflection on `listener` until `shutdown`
/// completes, then let calls in flight finish.
pub async fn serve(
    listener: TcpListener,
    app: AppState,
    settings: &Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
    announced: tokio::sync::oneshot::Sender<()>,
) -> anyhow::Result<()> {
    let addr: SocketAddr = listener.local_addr().context("reading the gRPC address")?;
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
    tracing::info!(
        event = "grpc_listening",
        addr = %addr,
        domain = %settings.grpc.domain,
        "Envoy rate limit service (gRPC) on {addr}"
    );
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
