//! The daemon's HTTP side: `/metrics`, `/healthz` and `/readyz` on the metrics listener, and the
//! admin API on its own listener (default 127.0.0.1), every call authenticated with a bearer
//! token compared in constant time and never logged. Handlers only translate HTTP to the
//! runtime ([`Shared`]) and back.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::config::Listeners;
// Re-exported so callers written against the pre-split `api` module still compile; new code
// imports them from `runtime`.
pub use crate::runtime::{Command, Shared};
use crate::store::StoreError;

/// The token admin calls must present, from `listeners.token_file` or `listeners.token_env`.
pub fn admin_token(listeners: &Listeners) -> Result<Option<String>, std::io::Error> {
    if let Some(path) = &listeners.token_file {
        let token = std::fs::read_to_string(path)?.trim().to_string();
        return Ok(Some(token).filter(|t| !t.is_empty()));
    }
    Ok(std::env::var(&listeners.token_env).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty()))
}

/// Starts the metrics listener and, if a token is configured, the admin listener.
pub async fn serve(shared: Shared, listeners: &Listeners) -> Result<tokio::task::JoinHandle<()>, std::io::Error> {
    let metrics = metrics_router(shared.clone());
    let metrics_listener = bind(listeners.metrics).await?;
    let admin = match admin_token(listeners)? {
        Some(token) => Some((admin_router(shared, token), bind(listeners.admin).await?)),
        None => {
            tracing::warn!(env = %listeners.token_env, "admin API disabled: no token configured (listeners.token_file or the token environment variable)");
            None
        }
    };
    Ok(tokio::spawn(async move {
        let metrics_server = axum::serve(metrics_listener, metrics);
        match admin {
            Some((router, listener)) => {
                let admin_server = axum::serve(listener, router);
                let (a, b) = tokio::join!(metrics_server, admin_server);
                for result in [a, b] {
                    if let Err(error) = result {
                        tracing::error!(%error, "HTTP listener stopped");
                    }
                }
            }
            None => {
                if let Err(error) = metrics_server.await {
                    tracing::error!(%error, "HTTP listener stopped");
                }
            }
        }
    }))
}

async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, std::io::Error> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
    tracing::info!(address = %listener.local_addr()?, "listening");
    Ok(listener)
}

/// `/metrics`, `/healthz` and `/readyz`: unauthenticated, read-only.
pub fn metrics_router(shared: Shared) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(shared)
}

/// The admin API's routes, behind the bearer-token check.
pub fn admin_router(shared: Shared, token: String) -> Router {
    let token = Arc::new(token);
    Router::new()
        .route("/v1/status", get(get_status))
        .route("/v1/plan", get(get_plan))
        .route("/v1/command", post(post_command))
        .layer(middleware::from_fn(move |request: Request, next: Next| {
            let token = token.clone();
            async move { authenticate(&token, request, next).await }
        }))
        .with_state(shared)
}

async fn authenticate(token: &str, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(presented.as_bytes().ct_eq(token.as_bytes())) {
        next.run(request).await
    } else {
        (StatusCode::UNAUTHORIZED, Json(Answer::error("missing or wrong bearer token"))).into_response()
    }
}

/// Every admin answer: a message, or an error saying why nothing was done.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Answer {
    /// Whether the command was carried out.
    pub ok: bool,
    /// What was done, or why nothing was: for the operator to read.
    pub message: String,
}

impl Answer {
    fn error(message: impl Into<String>) -> Answer {
        Answer { ok: false, message: message.into() }
    }
}

async fn render_metrics(State(shared): State<Shared>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], shared.metrics().render())
}

async fn ready(State(shared): State<Shared>) -> impl IntoResponse {
    if shared.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no controller step has completed yet\n")
    }
}

async fn get_status(State(shared): State<Shared>) -> Response {
    match shared.status().await {
        Ok(status) => Json(status).into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, Json(Answer::error(error.to_string()))).into_response(),
    }
}

async fn get_plan(State(shared): State<Shared>) -> Response {
    match shared.preview().await {
        Ok(plan) => Json(plan).into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, Json(Answer::error(error.to_string()))).into_response(),
    }
}

async fn post_command(State(shared): State<Shared>, Json(command): Json<Command>) -> Response {
    match shared.command(&command) {
        Ok(message) => Json(Answer { ok: true, message }).into_response(),
        Err(StoreError::Refused(why)) => (StatusCode::CONFLICT, Json(Answer::error(why))).into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, Json(Answer::error(error.to_string()))).into_response(),
    }
}
