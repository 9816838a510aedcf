//! The Sluice HTTP API: workflows, executions, signals, queries, the dead-letter queue and the
//! worker protocol under `/v1`, the OpenAI-compatible `/v1/chat/completions` of the AI gateway,
//! plus `/healthz`, `/readyz`, `/metrics` and `/openapi.json`, over plain TCP or TLS (mutual TLS
//! included). Only this crate serves HTTP.

pub mod auth;
pub mod body;
pub mod conn;
pub mod error;
pub mod loopback;
pub mod metrics;
pub mod nul;
pub mod peer;
pub mod routes;
pub mod tls;
pub mod trace;
pub mod x509;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::serve::{ListenerExt, TapIo};
use axum::Router;
use sluice_auth::oidc::Oidc;
use sluice_auth::{Auditor, Directory, RateLimitConfig};
use sluice_engine::Engine;
use sluice_gateway::Gateway;
use tokio::net::{TcpListener, TcpStream};

/// The identity library, for callers that open the [`Directory`] given in [`Options`].
pub use sluice_auth;
/// The gateway library, for callers that build the [`Gateway`] given to [`router_with`].
pub use sluice_gateway;

use crate::auth::Security;
use crate::error::ApiError;
pub use crate::peer::{ClientCert, Peer};
use crate::routes::{chat, executions, identity, oidc, ops, sharing, tasks, usage, workflows};

#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    pub metrics: Arc<metrics::Metrics>,
    /// The AI gateway behind `/v1/chat/completions`; without one that route answers 404.
    pub gateway: Option<Arc<Gateway>>,
    pub security: Arc<Security>,
    /// The TLS state when the server speaks HTTPS, for `/metrics`.
    pub tls: Option<tls::Tls>,
    /// The connections of the server, for `/metrics`.
    pub connections: Arc<conn::Gate>,
    /// Who may read `/metrics` on the API's listener.
    pub metrics_access: MetricsAccess,
}

/// Who may read `/metrics` on the API's listener. The metrics name every tenant and queue of the
/// node, so by default only a tenant's owners and admins read them there, and only their own
/// tenant's queues; Prometheus is meant to scrape a separate listener (`--metrics-addr`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MetricsAccess {
    /// A credential with the `manage` permission (owner, admin); the queue series are those of
    /// its tenant.
    #[default]
    Admin,
    /// Anyone, every series (`sluice dev` on a loopback address).
    Public,
    /// Nobody: the metrics are served on a separate listener.
    Elsewhere,
}

/// What a server serves besides the engine.
#[derive(Default, Clone)]
pub struct Options {
    pub gateway: Option<Arc<Gateway>>,
    /// Who may call: `None` switches authentication off (every caller is the owner of the
    /// tenant `default`), which only `--insecure-no-auth` asks for.
    pub directory: Option<Arc<Directory>>,
    /// OIDC login against an issuer (`--oidc FILE`); needs `directory`.
    pub oidc: Option<Arc<Oidc>>,
    pub limits: RateLimitConfig,
    /// Serve HTTPS (and mutual TLS) with these certificates; `None`: plain HTTP.
    pub tls: Option<tls::Tls>,
    /// Timeouts and caps of the connections.
    pub connections: conn::Limits,
    /// Who may read `/metrics` on the API's listener ([`serve_with_metrics`] sets
    /// [`MetricsAccess::Elsewhere`] when it serves them on a listener of their own).
    pub metrics_access: MetricsAccess,
}

/// Every route of the API, without an AI gateway and with authentication off (for tests of the
/// engine's API).
pub fn router(engine: Engine) -> Router {
    router_with(engine, Options::default())
}

/// Every route of the API. The OpenAPI document lists the same paths (a test keeps them equal).
/// Needs a Tokio runtime (the audit writer starts here).
pub fn router_with(engine: Engine, opts: Options) -> Router {
    let gate = Arc::new(conn::Gate::new(opts.connections.clone()));
    app_with(engine, opts, gate).0
}

/// The router of [`router_with`], whose `/metrics` report the connections of `gate`, and its
/// state.
fn app_with(engine: Engine, opts: Options, connections: Arc<conn::Gate>) -> (Router, AppState) {
    let auditor = Auditor::start(Arc::clone(engine.store()));
    let shares = sluice_auth::Shares::new(engine.store().clone(), std::time::Duration::from_secs(5));
    let security = Arc::new(Security::new(opts.directory, opts.oidc, opts.limits, auditor, shares));
    auth::spawn_housekeeping(&security);
    let metrics = Arc::new(metrics::Metrics::default());
    let state = AppState {
        engine,
        metrics,
        gateway: opts.gateway,
        security,
        tls: opts.tls,
        connections,
        metrics_access: opts.metrics_access,
    };
    let app = Router::new()
        .route("/v1/auth/login", post(identity::login))
        .route("/v1/auth/oidc/login", get(oidc::login))
        .route("/v1/auth/oidc/callback", get(oidc::callback))
        .route("/v1/auth/whoami", get(identity::whoami))
        .route("/v1/users", get(identity::list_users).post(identity::create_user))
        .route("/v1/users/{email}", delete(identity::delete_user))
        .route("/v1/api-keys", get(identity::list_keys).post(identity::create_key))
        .route("/v1/api-keys/{id}", delete(identity::revoke_key))
        .route("/v1/audit", get(identity::audit))
        .route("/v1/workflows", post(workflows::publish).get(workflows::list))
        .route("/v1/workflows/{name}", get(workflows::get))
        .route("/v1/workflows/{name}/versions/{version}", get(workflows::get_version))
        .route("/v1/workflows/{name}/sharing", get(sharing::get).put(sharing::put))
        .route("/v1/schemas/workflow", get(workflows::schema))
        .route("/v1/executions", post(executions::start).get(executions::list))
        .route("/v1/executions/{workflow_id}", get(executions::get))
        .route("/v1/executions/{workflow_id}/result", get(executions::result))
        .route("/v1/executions/{workflow_id}/history", get(executions::history))
        .route("/v1/executions/{workflow_id}/signals/{name}", post(executions::signal))
        .route("/v1/executions/{workflow_id}/queries/{name}", get(executions::query))
        .route("/v1/executions/{workflow_id}/cancel", post(executions::cancel))
        .route("/v1/dlq", get(executions::dlq))
        .route("/v1/dlq/{workflow_id}/redrive", post(executions::redrive))
        .route("/v1/tasks/poll", post(tasks::poll))
        .route("/v1/tasks/complete", post(tasks::complete))
        .route("/v1/tasks/fail", post(tasks::fail))
        .route("/v1/tasks/heartbeat", post(tasks::heartbeat))
        .route("/v1/tasks/complete-batch", post(tasks::complete_batch))
        .route("/v1/chat/completions", post(chat::completions))
        .route("/v1/usage", get(usage::list))
        .route("/v1/budgets", get(usage::budgets))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body::MAX_BODY_BYTES))
        .layer(middleware::map_response(close_after_too_large))
        .layer(middleware::from_fn(nul::refuse_in_url))
        .layer(middleware::from_fn_with_state(state.clone(), auth::authenticate))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(middleware::from_fn(trace::middleware))
        .with_state(state.clone());
    (app, state)
}

async fn not_found() -> ApiError {
    ApiError::new("not_found", "no such route; see /openapi.json for the API")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new("method_not_allowed", "this route does not accept that method; see /openapi.json")
}

/// Records metrics and logs every request with its route, status and latency (inside the
/// request's span, so with its trace id).
async fn observe(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().as_str().to_string();
    let route =
        req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let resp = next.run(req).await.into_response();
    let status = resp.status().as_u16();
    let elapsed = start.elapsed();
    app.metrics.observe(&method, &route, status, elapsed);
    if status >= 500 {
        tracing::warn!(method = %method, route = %route, status, elapsed_us = elapsed.as_micros() as u64, "request failed");
    } else {
        tracing::debug!(method = %method, route = %route, status, elapsed_us = elapsed.as_micros() as u64, "request");
    }
    resp
}

/// Serves the API on `listener` until `shutdown` resolves, with authentication off.
pub async fn serve(
    listener: TcpListener,
    engine: Engine,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, engine, Options::default(), shutdown).await
}

/// Like [`serve`], with the gateway, authentication and limits of `opts`.
pub async fn serve_with(
    listener: TcpListener,
    engine: Engine,
    opts: Options,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with_metrics(listener, None, engine, opts, shutdown).await
}

/// Like [`serve_with`]; with `metrics`, `/metrics` (and `/healthz`, `/readyz`) are served there
/// as well, over plain HTTP and without authentication, for Prometheus, and no longer on the
/// API's listener.
pub async fn serve_with_metrics(
    listener: TcpListener,
    metrics: Option<TcpListener>,
    engine: Engine,
    mut opts: Options,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let ledger = engine.clone();
    // Long-polls in flight end when the shutdown begins, so that draining the connections takes
    // moments, not the length of the longest wait.
    let waits = engine.clone();
    let (stopped_tx, stopped) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        waits.stop_waiting();
        stopped_tx.send_replace(true);
    };
    if metrics.is_some() {
        opts.metrics_access = MetricsAccess::Elsewhere;
    }
    let gate = Arc::new(conn::Gate::new(opts.connections.clone()));
    let tls = opts.tls.clone();
    let (app, state) = app_with(engine, opts, Arc::clone(&gate));
    let scrape = metrics.map(|listener| {
        let app = Router::new()
            .route("/metrics", get(ops::metrics_of_node))
            .route("/healthz", get(ops::healthz))
            .route("/readyz", get(ops::readyz))
            .fallback(not_found)
            .with_state(state);
        let gate = Arc::new(conn::Gate::new(conn::Limits::default()));
        let mut stopped = stopped.clone();
        tokio::spawn(conn::serve(listener, app, None, gate, async move {
            let _ = stopped.wait_for(|s| *s).await;
        }))
    });
    let served = match tls {
        Some(tls) => tls::serve_with(listener, app, tls, gate, shutdown).await,
        None => conn::serve(listener, app, None, gate, shutdown).await,
    };
    if let Some(scrape) = scrape {
        let _ = scrape.await;
    }
    // Chat calls answered before the shutdown have their usage rows queued: write them now.
    if let Err(e) = ledger.flush_usage().await {
        tracing::error!(error = %e, "usage rows of answered chat calls could not be written at shutdown");
    }
    served
}

/// Serves `app` over plain TCP (with `TCP_NODELAY`) until `shutdown` resolves, with the default
/// connection limits. Handlers see each connection's [`Peer`] as `ConnectInfo<Peer>`, as they do
/// over TLS.
pub async fn serve_router(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    conn::serve(listener, app, None, Arc::new(conn::Gate::new(conn::Limits::default())), shutdown).await
}

/// The listener with `TCP_NODELAY` on every accepted connection: an answer written in more than
/// one piece (a streamed chunk, a large body) goes out at once instead of waiting, under Nagle's
/// algorithm, for the peer's delayed ACK (up to 40 ms).
pub fn tuned(listener: TcpListener) -> TapIo<TcpListener, fn(&mut TcpStream)> {
    listener.tap_io(set_nodelay as fn(&mut TcpStream))
}

pub(crate) fn set_nodelay(tcp: &mut TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
}

/// A `413` may leave the rest of the request's body unread on the connection: the answer says
/// the connection closes, so that no client sends its next request on it (and sees it reset).
async fn close_after_too_large(mut response: Response) -> Response {
    if response.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        response.headers_mut().insert(axum::http::header::CONNECTION, axum::http::HeaderValue::from_static("close"));
    }
    response
}
