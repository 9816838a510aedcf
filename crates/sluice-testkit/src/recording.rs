//! A plain HTTP server on 127.0.0.1 that records every request it gets (method, path, headers,
//! body) and answers `200 {"ok": true}`: the far end of `http` steps in tests.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde_json::{json, Value};

/// One request as the server received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// Header names in lowercase; of a repeated header, the values joined with `, `.
    pub headers: BTreeMap<String, String>,
    /// The JSON body (`Value::Null` if it did not parse).
    pub body: Value,
}

type Log = Arc<Mutex<Vec<Recorded>>>;

/// The running server; it stops when this is dropped.
pub struct RecordingServer {
    base_url: String,
    log: Log,
    server: tokio::task::JoinHandle<()>,
}

impl RecordingServer {
    pub async fn start() -> Self {
        let log = Log::default();
        let app = Router::new().fallback(record).with_state(log.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("recording server cannot bind: {e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("recording server has no address: {e}"));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { base_url: format!("http://{addr}"), log, server }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    pub fn received(&self) -> Vec<Recorded> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for RecordingServer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn record(State(log): State<Log>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let bytes: Bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap_or_default();
    let headers = join_headers(&parts.headers);
    log.lock().unwrap_or_else(|p| p.into_inner()).push(Recorded {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        headers,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    });
    Json(json!({"ok": true})).into_response()
}

fn join_headers(headers: &HeaderMap) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in headers {
        let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
        out.entry(k.as_str().to_ascii_lowercase()).and_modify(|old| *old = format!("{old}, {v}")).or_insert(v);
    }
    out
}
