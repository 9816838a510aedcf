//! A stand-in upstream for benchmarks: answers every `POST /v1/chat/completions` at once with the
//! same small OpenAI chat completion, so that what is measured around it is the gateway itself.

use std::future::Future;

use axum::body::Bytes;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use tokio::net::TcpListener;

/// The answer to every request.
pub const ANSWER: &str = r#"{"id":"chatcmpl-loopback","object":"chat.completion","created":1700000000,"model":"loopback","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":8,"completion_tokens":1,"total_tokens":9}}"#;

pub fn router() -> Router {
    Router::new().route("/v1/chat/completions", post(answer))
}

/// Reads the request's body (as a real upstream would) and answers [`ANSWER`].
async fn answer(_body: Bytes) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], ANSWER)
}

/// Serves the stand-in upstream on `listener` until `shutdown` resolves.
pub async fn serve(listener: TcpListener, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
    axum::serve(crate::tuned(listener), router().into_make_service()).with_graceful_shutdown(shutdown).await
}
