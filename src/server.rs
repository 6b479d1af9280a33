//! `quotaflow serve`: the limiter, its sweeper and the HTTP sidecar wired
//! together, with graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use axum::http::StatusCode;
use tokio::net::TcpListener;

use crate::api::{self, AppState, Identity};
use crate::fingerprint::Fingerprinter;
use crate::limiter::Limiter;
use crate::metrics::Metrics;
use crate::settings::Settings;

/// Environment variable holding the bearer token for config writes.
pub const ADMIN_TOKEN_ENV: &str = "QUOTAFLOW_ADMIN_TOKEN";

/// Build the limiter and metrics from `settings`.
pub fn build_state(settings: &Settings, admin_token: Option<String>) -> anyhow::Result<AppState> {
    let fingerprinter = if settings.security.fingerprint_key.is_empty() {
        tracing::info!(
            event = "fingerprint_key_random",
            "security.fingerprint_key is empty: fingerprints are stable for this process only"
        );
        Fingerprinter::random()
    } else {
        Fingerprinter::from_secret(&settings.security.fingerprint_key)
    };
    let limiter = Limiter::new(
        settings.rules(),
        fingerprinter,
        settings.state.effective_shards(),
    )
    .context("the rate-limit config is invalid")?;
    let metrics = Metrics::new().context("registering metrics")?;
    metrics.config_version.set(limiter.rules().version as i64);
    let deny_status = StatusCode::from_u16(settings.server.forward_auth_deny_status)
        .ok()
        .filter(|s| s.is_client_error())
        .context("server.forward_auth_deny_status must be a 4xx status")?;
    Ok(AppState {
        limiter: Arc::new(limiter),
        metrics: Arc::new(metrics),
        admin_token: admin_token.filter(|t| !t.is_empty()).map(Into::into),
        identity: Arc::new(Identity {
            api_key_header: settings.server.api_key_header.to_ascii_lowercase(),
            user_id_header: settings.server.user_id_header.to_ascii_lowercase(),
            trusted_proxies: settings.server.trusted_proxies.clone(),
            deny_status,
        }),
    })
}

/// Serve until `shutdown` completes, then drain in-flight requests.
pub async fn serve(
    settings: Settings,
    admin_token: Option<String>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let state = build_state(&settings, admin_token)?;
    let listener = TcpListener::bind(settings.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.server.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let sweeper = tokio::spawn(sweep(state.clone(), settings.state.sweep_interval));
    let rules = state.limiter.rules();
    tracing::info!(
        event = "listening",
        addr = %addr,
        limits = rules.limits.len(),
        config_version = rules.version,
        admin_token = state.admin_token.is_some(),
        "quotaflow sidecar listening on http://{addr} (embedded mode: in-memory state, no Kafka, no Redis)"
    );
    axum::serve(
        listener,
        api::router(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
    .context("serving HTTP")?;
    sweeper.abort();
    tracing::info!(event = "stopped", "quotaflow stopped");
    Ok(())
}

/// Drop idle keys periodically so memory follows the active key set.
async fn sweep(state: AppState, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every.max(std::time::Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let removed = state.limiter.store().sweep(api::now_ms());
        state.metrics.keys_expired.inc_by(removed as u64);
        state
            .metrics
            .keys_tracked
            .set(state.limiter.store().len() as i64);
    }
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!(event = "shutdown", "shutdown requested; draining");
}
