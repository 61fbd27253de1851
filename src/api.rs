//! The daemon's HTTP side: `/metrics`, `/healthz` and `/readyz` on the metrics listener, and the
//! admin API on its own listener (default 127.0.0.1), every call authenticated with a bearer
//! token compared in constant time and never logged. Handlers only translate HTTP to the
//! daemon's accounts ([`Fleet`]) and back: a call about one account names it with
//! `?account=<id>` (optional when the daemon has one account).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::config::Listeners;
use crate::fleet::{AccountChoice, Fleet};
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
pub async fn serve(fleet: Fleet, listeners: &Listeners) -> Result<tokio::task::JoinHandle<()>, std::io::Error> {
    let metrics = metrics_router(fleet.clone());
    let metrics_listener = bind(listeners.metrics).await?;
    let admin = match admin_token(listeners)? {
        Some(token) => Some((admin_router(fleet, token), bind(listeners.admin).await?)),
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
pub fn metrics_router(fleet: Fleet) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(fleet)
}

/// The admin API's routes, behind the bearer-token check.
pub fn admin_router(fleet: Fleet, token: String) -> Router {
    let token = Arc::new(token);
    Router::new()
        .route("/v1/accounts", get(get_accounts))
        .route("/v1/status", get(get_status))
        .route("/v1/plan", get(get_plan))
        .route("/v1/command", post(post_command))
        .layer(middleware::from_fn(move |request: Request, next: Next| {
            let token = token.clone();
            async move { authenticate(&token, request, next).await }
        }))
        .with_state(fleet)
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

/// Which account a call is about: `?account=<id>`.
#[derive(Debug, Default, Deserialize)]
struct Which {
    account: Option<String>,
}

impl Which {
    /// The account's runtime, or why there is none.
    fn pick<'a>(&self, fleet: &'a Fleet) -> Result<&'a Shared, AccountChoice> {
        fleet.account(self.account.as_deref())
    }
}

/// A call about an account the daemon cannot pick: 400, with why.
fn unpicked(why: AccountChoice) -> Response {
    (StatusCode::BAD_REQUEST, Json(Answer::error(why.to_string()))).into_response()
}

async fn render_metrics(State(fleet): State<Fleet>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], fleet.render_metrics())
}

async fn ready(State(fleet): State<Fleet>) -> impl IntoResponse {
    if fleet.is_ready().await {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no controller step has completed yet in every account\n")
    }
}

async fn get_accounts(State(fleet): State<Fleet>) -> Response {
    match fleet.summary().await {
        Ok(summary) => Json(summary).into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, Json(Answer::error(error.to_string()))).into_response(),
    }
}

async fn get_status(State(fleet): State<Fleet>, Query(which): Query<Which>) -> Response {
    let shared = match which.pick(&fleet) {
        Ok(shared) => shared,
        Err(why) => return unpicked(why),
    };
    match shared.status().await {
        Ok(status) => Json(status).into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, Json(Answer::error(error.to_string()))).into_response(),
    }
}

async fn get_plan(State(fleet): State<Fleet>, Query(which): Query<Which>) -> Response {
    let shared = match which.pick(&fleet) {
        Ok(shared) => shared,
        Err(why) => return unpicked(why),
    };
    match shared.preview().await {
        Ok(plan) => Json(plan).into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, Json(Answer::error(error.to_string()))).into_response(),
    }
}

/// A command for one account; `pause` and `resume` without an account act in every account
/// (the brake an operator reaches for first); a user named `<account>/<name>` picks the account.
async fn post_command(
    State(fleet): State<Fleet>,
    Query(mut which): Query<Which>,
    Json(mut command): Json<Command>,
) -> Response {
    if let Command::Hold { user, .. } | Command::Release { user, .. } = &mut command
        && let Some((account, name)) = user.split_once('/')
    {
        if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) || name.is_empty() || name.contains('/')
        {
            let why = format!("user {user:?}: write <12-digit account ID>/<IAM user name>");
            return (StatusCode::BAD_REQUEST, Json(Answer::error(why))).into_response();
        }
        which.account = Some(account.to_string());
        *user = name.to_string();
    }
    let everywhere = which.account.is_none() && matches!(command, Command::Pause { .. } | Command::Resume { .. });
    let targets: Vec<&Shared> = if everywhere {
        fleet.accounts().iter().collect()
    } else {
        match which.pick(&fleet) {
            Ok(shared) => vec![shared],
            Err(why) => return unpicked(why),
        }
    };
    // In an organisation every answer names its account.
    let several = fleet.accounts().len() > 1;
    let mut messages = Vec::new();
    for shared in targets {
        match shared.command(&command) {
            Ok(message) if several => messages.push(format!("{}: {message}", shared.account())),
            Ok(message) => messages.push(message),
            Err(StoreError::Refused(why)) => return (StatusCode::CONFLICT, Json(Answer::error(why))).into_response(),
            Err(error) => {
                return (StatusCode::INTERNAL_SERVER_ERROR, Json(Answer::error(error.to_string()))).into_response();
            }
        }
    }
    Json(Answer { ok: true, message: messages.join("; ") }).into_response()
}
