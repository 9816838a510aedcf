//! Trace ids on every request. The middleware takes the caller's trace from a valid W3C
//! `traceparent`, else from an `X-Trace-ID`, else starts a new one; runs the request inside a
//! `request` span carrying `trace_id` and `tenant_id` (recorded once the tenant is known); puts a
//! [`TraceContext`] in the request extensions for handlers; and answers with `X-Trace-ID` and a
//! `traceparent` naming the server's own span.

use axum::extract::Request;
use axum::http::header::{HeaderMap, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use sluice_engine::trace::SAMPLED;
use sluice_engine::{SpanId, TraceId, TraceParent};
use tracing::field::Empty;
use tracing::{Instrument, Span};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const X_TRACE_ID: HeaderName = HeaderName::from_static("x-trace-id");

/// The trace a request belongs to, in its extensions: `Extension<TraceContext>`.
#[derive(Clone, Debug)]
pub struct TraceContext {
    pub trace_id: TraceId,
    /// The server's span for this request (the parent id of what it calls on the caller's behalf).
    pub span_id: SpanId,
    /// The caller's span, when it sent a valid `traceparent`.
    pub parent_id: Option<SpanId>,
    /// The caller's `trace-flags`, or sampled.
    pub flags: u8,
    span: Span,
}

impl TraceContext {
    /// The trace of a request with these headers, with a new span id and no tracing span yet.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let mut parents = headers.get_all(&TRACEPARENT).iter();
        // Several `traceparent` headers are as invalid as a malformed one.
        let parent = match (parents.next(), parents.next()) {
            (Some(v), None) => v.to_str().ok().and_then(TraceParent::parse),
            _ => None,
        };
        let (trace_id, parent_id, flags) = match parent {
            Some(p) => (p.trace_id, Some(p.parent_id), p.flags),
            None => {
                let given = headers.get(&X_TRACE_ID).and_then(|v| v.to_str().ok()).and_then(TraceId::parse_loose);
                (given.unwrap_or_else(TraceId::random), None, SAMPLED)
            }
        };
        Self { trace_id, span_id: SpanId::random(), parent_id, flags, span: Span::none() }
    }

    /// The `traceparent` the server answers with: this trace, the server's span.
    pub fn traceparent(&self) -> String {
        TraceParent::header(&self.trace_id, &self.span_id, self.flags)
    }

    /// The request's span, whose lines carry `trace_id` and `tenant_id`.
    pub fn span(&self) -> &Span {
        &self.span
    }

    /// Records the tenant the request acts for on its span, from anywhere in the request
    /// (unlike [`record_tenant`], which needs the request span to be the current one).
    pub fn record_tenant(&self, tenant: &str) {
        self.span.record("tenant_id", tenant);
    }
}

/// Records the tenant on the current span: call it where the `request` span is current, such as
/// in an extractor or a middleware inside this one, once per request.
pub fn record_tenant(tenant: &str) {
    Span::current().record("tenant_id", tenant);
}

/// The middleware: see the module documentation.
pub async fn middleware(mut req: Request, next: Next) -> Response {
    let mut ctx = TraceContext::from_headers(req.headers());
    // ERROR level: enabled whenever any line is, so every line of the request carries its trace.
    ctx.span = tracing::error_span!("request", trace_id = ctx.trace_id.as_str(), tenant_id = Empty);
    // The authentication middleware, inside this one, records the caller's tenant on the span.
    let span = ctx.span.clone();
    let trace_id = HeaderValue::from_str(ctx.trace_id.as_str()).ok();
    let traceparent = HeaderValue::from_str(&ctx.traceparent()).ok();
    req.extensions_mut().insert(ctx);
    let mut resp = next.run(req).instrument(span).await;
    let headers = resp.headers_mut();
    if let Some(v) = trace_id {
        headers.insert(X_TRACE_ID, v);
    }
    if let Some(v) = traceparent {
        headers.insert(TRACEPARENT, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use axum::routing::get;
    use axum::{Extension, Json, Router};
    use serde_json::{json, Value};

    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";

    async fn echo(Extension(ctx): Extension<TraceContext>) -> Json<Value> {
        Json(json!({
            "trace_id": ctx.trace_id.to_string(),
            "span_id": ctx.span_id.to_string(),
            "parent_id": ctx.parent_id.map(|p| p.to_string()),
            "flags": ctx.flags,
        }))
    }

    /// A server with the middleware on 127.0.0.1; returns its base URL.
    async fn serve() -> String {
        let app = Router::new()
            .route("/v1/echo", get(echo))
            .fallback(|| async { (axum::http::StatusCode::NOT_FOUND, "nothing here") })
            .layer(axum::middleware::from_fn(middleware));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    struct Answer {
        status: u16,
        x_trace_id: String,
        traceparent: TraceParent,
        body: Value,
    }

    async fn call(base: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
        let mut req = reqwest::Client::new().get(format!("{base}{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.unwrap();
        let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let x_trace_id = header("x-trace-id");
        let traceparent = TraceParent::parse(&header("traceparent"))
            .unwrap_or_else(|| panic!("no valid traceparent in the answer: {:?}", resp.headers()));
        let status = resp.status().as_u16();
        let body = resp.json().await.unwrap_or(Value::Null);
        Answer { status, x_trace_id, traceparent, body }
    }

    /// Checks that the answer continues `trace` from the server's own span.
    fn check(a: &Answer, trace: &str, parent: Option<&str>, flags: u8) {
        assert_eq!(a.x_trace_id, trace);
        assert_eq!(a.traceparent.trace_id.as_str(), trace);
        assert_eq!(a.traceparent.flags, flags);
        assert_eq!(a.body["trace_id"], trace);
        assert_eq!(a.body["span_id"], a.traceparent.parent_id.as_str(), "the answer names the server's span");
        assert_eq!(a.body["parent_id"], json!(parent));
        assert_ne!(Some(a.traceparent.parent_id.as_str()), parent, "the server's span is its own");
    }

    #[tokio::test]
    async fn a_valid_traceparent_is_continued() {
        let base = serve().await;
        let a = call(&base, "/v1/echo", &[("traceparent", &format!("00-{TRACE}-{PARENT}-01"))]).await;
        check(&a, TRACE, Some(PARENT), 1);
        // Flags are kept; a valid traceparent wins over X-Trace-ID.
        let other = "0af7651916cd43dd8448eb211c80319c";
        let a = call(&base, "/v1/echo", &[("traceparent", &format!("00-{TRACE}-{PARENT}-00")), ("x-trace-id", other)])
            .await;
        check(&a, TRACE, Some(PARENT), 0);
    }

    #[tokio::test]
    async fn an_invalid_traceparent_is_ignored() {
        let base = serve().await;
        let other = "0af7651916cd43dd8448eb211c80319c";
        for bad in [
            format!("01-{TRACE}-{PARENT}-01"),
            format!("00-{}-{PARENT}-01", "0".repeat(32)),
            format!("00-{TRACE}-{}-01", "0".repeat(16)),
            format!("00-{}-{PARENT}-01", TRACE.to_uppercase()),
            format!("00-{TRACE}-{PARENT}-1"),
            "garbage".to_string(),
        ] {
            // With an X-Trace-ID, that one is used...
            let a = call(&base, "/v1/echo", &[("traceparent", &bad), ("x-trace-id", other)]).await;
            check(&a, other, None, SAMPLED);
            // ...without, a new trace starts.
            let a = call(&base, "/v1/echo", &[("traceparent", &bad)]).await;
            assert_ne!(a.x_trace_id, TRACE, "{bad}");
            check(&a, &a.x_trace_id.clone(), None, SAMPLED);
            assert!(TraceId::parse(&a.x_trace_id).is_some());
        }
        // Two traceparent headers are refused too.
        let resp = reqwest::Client::new()
            .get(format!("{base}/v1/echo"))
            .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
            .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
            .send()
            .await
            .unwrap();
        let body: Value = resp.json().await.unwrap();
        assert_ne!(body["trace_id"], TRACE);
    }

    #[tokio::test]
    async fn x_trace_id_is_taken_in_either_case_and_checked() {
        let base = serve().await;
        let a = call(&base, "/v1/echo", &[("x-trace-id", TRACE)]).await;
        check(&a, TRACE, None, SAMPLED);
        let a = call(&base, "/v1/echo", &[("x-trace-id", &TRACE.to_uppercase())]).await;
        check(&a, TRACE, None, SAMPLED);
        for bad in
            ["", "abc", &TRACE[1..], &format!("{TRACE}0"), &"0".repeat(32), "4bf92f35-77b3-4da6-a3ce-929d0e0e4736"]
        {
            let a = call(&base, "/v1/echo", &[("x-trace-id", bad)]).await;
            assert_ne!(a.x_trace_id, bad.to_lowercase(), "{bad:?} was taken");
            assert!(TraceId::parse(&a.x_trace_id).is_some(), "{bad:?}: answered {}", a.x_trace_id);
        }
    }

    #[tokio::test]
    async fn every_answer_carries_the_headers_and_new_traces_differ() {
        let base = serve().await;
        let a = call(&base, "/v1/echo", &[]).await;
        let b = call(&base, "/v1/echo", &[]).await;
        assert_ne!(a.x_trace_id, b.x_trace_id);
        check(&a, &a.x_trace_id.clone(), None, SAMPLED);
        // Unknown routes too, whatever their body.
        let a = call(&base, "/nothing", &[("x-trace-id", TRACE)]).await;
        assert_eq!((a.status, a.x_trace_id.as_str(), a.traceparent.trace_id.as_str()), (404, TRACE, TRACE));
    }
}
