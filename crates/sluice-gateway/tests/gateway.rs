//! The gateway against fake vendors on real sockets: wire formats, fallback, retries with
//! `Retry-After`, circuit breakers, cost records, precision tiers, experiments and structured
//! output.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use sluice_gateway::experiment::Error as ExperimentError;
use sluice_gateway::structured::Error as StructuredError;
use sluice_gateway::{
    BreakerState, CallError, CallOptions, ChatRequest, Clock, Config, Error, ExperimentArm, FinishReason, Gateway,
    ManualClock, Message, Outcome, StreamEvent, UpstreamError, Usage,
};
use sluice_testkit::vendor::{FakeVendor, Reply};

/// A gateway over `yaml`, whose `{a}` and `{b}` stand for the two vendors' base URLs. Keys are
/// `key-of-<VAR>`; retries are fast unless the route says otherwise.
fn gateway(yaml: &str, a: &FakeVendor, b: &FakeVendor, clock: Arc<ManualClock>) -> Gateway {
    let yaml = yaml.replace("{a}", &a.base_url()).replace("{b}", &b.base_url());
    let config = Config::from_yaml(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    Gateway::from_config_with(&config, |var| Some(format!("key-of-{var}")), clock).unwrap()
}

const TWO_OPENAI: &str = "
providers:
  a: {kind: openai, base_url: '{a}', api_key_env: A_KEY}
  b: {kind: openai, base_url: '{b}', api_key_env: B_KEY}
routes:
  r:
    retry: {max_attempts: 1, initial_backoff_ms: 1, jitter: 0}
    targets:
      - {provider: a, model: model-a, timeout_ms: 2000}
      - {provider: b, model: model-b, timeout_ms: 2000}
prices:
  model-a: {input_per_mtok: 2.5, output_per_mtok: 10}
  model-b: {input_per_mtok: 0.15, output_per_mtok: 0.6}
breaker: {failure_threshold: 100, cool_down_ms: 10000}
";

async fn two() -> (FakeVendor, FakeVendor) {
    (FakeVendor::start().await, FakeVendor::start().await)
}

fn hello() -> ChatRequest {
    ChatRequest::new(vec![Message::system("be brief"), Message::user("hello")])
}

fn outcomes(call: &sluice_gateway::Call) -> Vec<(String, Outcome)> {
    call.usage.iter().map(|r| (r.target.clone(), r.outcome)).collect()
}

fn o(target: &str, outcome: Outcome) -> (String, Outcome) {
    (target.to_string(), outcome)
}

#[tokio::test]
async fn openai_wire_format_carries_key_model_and_usage() {
    let (a, b) = two().await;
    a.push(Reply::text("hi there", 12, 34));
    let gw = gateway(TWO_OPENAI, &a, &b, Arc::default());
    let mut req = hello();
    req.temperature = Some(0.5);
    req.max_tokens = Some(64);
    let call = gw.chat("r", &req).await;
    let resp = call.result.unwrap();
    assert_eq!(resp.text, "hi there");
    assert_eq!(resp.model, "model-a");
    assert_eq!(resp.finish_reason, FinishReason::Stop);
    assert_eq!(resp.usage, Usage { input_tokens: 12, output_tokens: 34 });
    assert_eq!((call.usage[0].input_tokens, call.usage[0].output_tokens), (12, 34));
    let got = &a.received()[0];
    assert_eq!(got.path, "/v1/chat/completions");
    assert_eq!(got.headers["authorization"], "Bearer key-of-A_KEY");
    assert_eq!(
        got.body,
        json!({
            "model": "model-a",
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
            "temperature": 0.5,
            "max_tokens": 64,
            "stream": false
        })
    );
}

const ANTHROPIC_FIRST: &str = "
providers:
  claude: {kind: anthropic, base_url: '{a}', api_key_env: ANTHROPIC_KEY}
  gpt: {kind: openai, base_url: '{b}', api_key_env: OPENAI_KEY}
routes:
  r:
    retry: {max_attempts: 1}
    targets: [{provider: claude, model: claude-x, timeout_ms: 2000}, {provider: gpt, model: gpt-x}]
prices:
  claude-x: {input_per_mtok: 3, output_per_mtok: 15}
";

#[tokio::test]
async fn anthropic_wire_format_carries_key_version_and_usage() {
    let (a, b) = two().await;
    a.push(Reply::text("bonjour", 21, 8));
    let gw = gateway(ANTHROPIC_FIRST, &a, &b, Arc::default());
    let call = gw.chat("r", &hello()).await;
    let resp = call.result.unwrap();
    assert_eq!((resp.text.as_str(), resp.model.as_str()), ("bonjour", "claude-x"));
    assert_eq!(resp.usage, Usage { input_tokens: 21, output_tokens: 8 });
    let got = &a.received()[0];
    assert_eq!(got.path, "/v1/messages");
    assert_eq!(got.headers["x-api-key"], "key-of-ANTHROPIC_KEY");
    assert_eq!(got.headers["anthropic-version"], "2023-06-01");
    assert!(!got.headers.contains_key("authorization"));
    assert_eq!(got.body["system"], "be brief");
    assert_eq!(got.body["messages"], json!([{"role": "user", "content": [{"type": "text", "text": "hello"}]}]));
    assert_eq!(b.requests(), 0);
}

#[tokio::test]
async fn tool_calls_come_back_from_both_wire_formats() {
    let (a, b) = two().await;
    let tool_call = |id: &str| Reply::ToolCall {
        id: id.to_string(),
        name: "weather".into(),
        arguments: json!({"city": "Oslo"}),
        input_tokens: 5,
        output_tokens: 6,
    };
    a.push(tool_call("toolu_1"));
    b.push(tool_call("call_1"));
    let gw = gateway(ANTHROPIC_FIRST, &a, &b, Arc::default());
    let from_anthropic = gw.chat("r", &hello()).await.result.unwrap();
    a.push(Reply::status(503));
    let from_openai = gw.chat("r", &hello()).await.result.unwrap();
    for (resp, id) in [(from_anthropic, "toolu_1"), (from_openai, "call_1")] {
        assert_eq!(resp.finish_reason, FinishReason::ToolCalls);
        assert_eq!(resp.tool_calls.len(), 1);
        assert_eq!((resp.tool_calls[0].id.as_str(), resp.tool_calls[0].name.as_str()), (id, "weather"));
        let args: serde_json::Value = serde_json::from_str(&resp.tool_calls[0].arguments).unwrap();
        assert_eq!(args, json!({"city": "Oslo"}));
        assert_eq!(resp.usage, Usage { input_tokens: 5, output_tokens: 6 });
    }
}

/// Which status codes fall back to the next target and which are the caller's to fix.
#[tokio::test]
async fn fallback_depends_on_the_status_code() {
    let check = |status: u16, falls_back: bool| async move {
        let (a, b) = two().await;
        a.set_default(Reply::status(status));
        b.push(Reply::text("from b", 1, 1));
        let gw = gateway(TWO_OPENAI, &a, &b, Arc::default());
        let call = gw.chat("r", &hello()).await;
        if falls_back {
            assert_eq!(call.result.as_ref().map(|r| r.text.as_str()).ok(), Some("from b"), "{status}");
            assert_eq!(
                outcomes(&call),
                vec![o("a/model-a", Outcome::HttpError(status)), o("b/model-b", Outcome::Success)]
            );
        } else {
            match call.result {
                Err(Error::Rejected { target, source: UpstreamError::Status { status: s, message, .. }, .. }) => {
                    assert_eq!((target.as_str(), s), ("a/model-a", status));
                    assert_eq!(message, format!("fake vendor error {status}"));
                }
                other => panic!("{status}: expected a rejection, got {other:?}"),
            }
            assert_eq!(b.requests(), 0, "{status} must not fall back");
        }
        assert_eq!(a.requests(), 1, "{status}: max_attempts is 1");
    };
    for status in [500, 502, 503, 504, 529, 429, 408] {
        check(status, true).await;
    }
    for status in [400, 401, 403, 404, 422] {
        check(status, false).await;
    }
}

#[tokio::test]
async fn fallback_on_500_is_served_by_the_next_target() {
    let (a, b) = two().await;
    a.set_default(Reply::status(500));
    b.push(Reply::text("from b", 3, 4));
    let gw = gateway(TWO_OPENAI, &a, &b, Arc::default());
    let call = gw.chat("r", &hello()).await;
    assert_eq!(call.result.unwrap().text, "from b");
    assert_eq!((a.requests(), b.requests()), (1, 1));
}

#[tokio::test]
async fn fallback_on_429_is_served_by_the_next_target() {
    let (a, b) = two().await;
    a.set_default(Reply::rate_limited("1"));
    b.push(Reply::text("from b", 3, 4));
    let gw = gateway(TWO_OPENAI, &a, &b, Arc::default());
    let call = gw.chat("r", &hello()).await;
    assert_eq!(call.result.as_ref().unwrap().text, "from b");
    assert_eq!(outcomes(&call), vec![o("a/model-a", Outcome::HttpError(429)), o("b/model-b", Outcome::Success)]);
}

#[tokio::test]
async fn fallback_on_timeout_is_served_by_the_next_target() {
    let (a, b) = two().await;
    a.push(Reply::Hang);
    b.push(Reply::text("from b", 3, 4));
    let gw =
        gateway(&TWO_OPENAI.replace("model-a, timeout_ms: 2000", "model-a, timeout_ms: 300"), &a, &b, Arc::default());
    let started = Instant::now();
    let call = gw.chat("r", &hello()).await;
    assert_eq!(call.result.as_ref().unwrap().text, "from b");
    assert!(started.elapsed() < Duration::from_secs(2), "the 300 ms timeout cut the hang");
    assert_eq!(outcomes(&call), vec![o("a/model-a", Outcome::Timeout), o("b/model-b", Outcome::Success)]);
    assert!(call.usage[0].latency >= Duration::from_millis(300));
}

#[tokio::test]
async fn a_slow_answer_within_the_timeout_is_no_failure() {
    let (a, b) = two().await;
    a.push(Reply::slow(Duration::from_millis(100), Reply::text("late but fine", 1, 1)));
    let gw = gateway(TWO_OPENAI, &a, &b, Arc::default());
    let call = gw.chat("r", &hello()).await;
    assert_eq!(call.result.unwrap().text, "late but fine");
    assert!(call.usage[0].latency >= Duration::from_millis(100));
    assert_eq!(b.requests(), 0);
}

#[tokio::test]
async fn malformed_json_and_refused_connections_fall_back() {
    let (a, b) = two().await;
    a.push(Reply::Malformed);
    let gw = gateway(TWO_OPENAI, &a, &b, Arc::default());
    let call = gw.chat("r", &hello()).await;
    assert_eq!(outcomes(&call), vec![o("a/model-a", Outcome::Malformed), o("b/model-b", Outcome::Success)]);

    let closed = format!("http://127.0.0.1:{}/v1", sluice_testkit::free_port());
    let yaml = TWO_OPENAI.replace("'{a}'", &format!("'{closed}'"));
    let gw = gateway(&yaml, &a, &b, Arc::default());
    let call = gw.chat("r", &hello()).await;
    assert_eq!(outcomes(&call), vec![o("a/model-a", Outcome::Connect), o("b/model-b", Outcome::Success)]);
}

const RETRYING: &str = "
providers:
  a: {kind: openai, base_url: '{a}'}
  b: {kind: anthropic, base_url: '{b}'}
routes:
  r:
    retry: {max_attempts: 2, initial_backoff_ms: 1, jitter: 0, max_retry_after_ms: 5000}
    targets: [{provider: a, model: model-a}, {provider: b, model: model-b}]
";

#[tokio::test]
async fn retries_honour_retry_after_in_seconds() {
    let (a, b) = two().await;
    a.push(Reply::rate_limited("1")).push(Reply::text("second try", 1, 1));
    let gw = gateway(RETRYING, &a, &b, Arc::default());
    let started = Instant::now();
    let call = gw.chat("r", &hello()).await;
    assert_eq!(call.result.unwrap().text, "second try");
    assert!(started.elapsed() >= Duration::from_secs(1), "waited {:?}", started.elapsed());
    assert_eq!((a.requests(), b.requests()), (2, 0));
    assert_eq!(call.usage.iter().map(|r| r.attempt).collect::<Vec<_>>(), vec![1, 2]);
}

#[tokio::test]
async fn retries_honour_retry_after_as_an_http_date() {
    let (a, b) = two().await;
    // A date in the past means "now": the retry follows the (1 ms) backoff.
    a.push(Reply::rate_limited("Sun, 06 Nov 1994 08:49:37 GMT")).push(Reply::text("second try", 1, 1));
    let gw = gateway(RETRYING, &a, &b, Arc::default());
    let started = Instant::now();
    let call = gw.chat("r", &hello()).await;
    assert_eq!(call.result.unwrap().text, "second try");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!((a.requests(), b.requests()), (2, 0));
}

#[tokio::test]
async fn a_retry_after_beyond_the_limit_falls_back_at_once() {
    let (a, b) = two().await;
    a.push(Reply::rate_limited("120"));
    let gw = gateway(RETRYING, &a, &b, Arc::default());
    let started = Instant::now();
    let call = gw.chat("r", &hello()).await;
    assert!(call.result.is_ok());
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!((a.requests(), b.requests()), (1, 1));
}

#[tokio::test]
async fn when_every_target_fails_each_failure_is_reported() {
    let (a, b) = two().await;
    a.set_default(Reply::status(500));
    b.set_default(Reply::status(503));
    let gw = gateway(RETRYING, &a, &b, Arc::default());
    let call = gw.chat("r", &hello()).await;
    match call.result {
        Err(Error::Exhausted { route, failures }) => {
            assert_eq!(route, "r");
            let got: Vec<_> = failures.iter().map(|(t, e)| (t.as_str(), Outcome::of(e))).collect();
            assert_eq!(got, vec![("a/model-a", Outcome::HttpError(500)), ("b/model-b", Outcome::HttpError(503))]);
        }
        other => panic!("expected exhaustion, got {other:?}"),
    }
    assert_eq!((a.requests(), b.requests()), (2, 2), "two attempts each");
    assert_eq!(call.usage.len(), 4);
}

const BREAKER: &str = "
providers:
  a: {kind: openai, base_url: '{a}'}
  b: {kind: openai, base_url: '{b}'}
routes:
  r:
    retry: {max_attempts: 1}
    targets:
      - {provider: a, model: model-a, breaker: {failure_threshold: 2, cool_down_ms: 10000}}
      - {provider: b, model: model-b}
";

#[tokio::test]
async fn the_breaker_opens_at_its_threshold_rejects_without_calling_then_half_opens() {
    let (a, b) = two().await;
    a.set_default(Reply::status(500));
    let clock = Arc::new(ManualClock::new());
    let gw = gateway(BREAKER, &a, &b, clock.clone());
    let state = || gw.route("r").unwrap().targets[0].breaker().state(clock.now());

    for _ in 0..2 {
        assert!(gw.chat("r", &hello()).await.result.is_ok(), "b serves while a fails");
    }
    assert_eq!(state(), BreakerState::Open);
    assert_eq!(a.requests(), 2);

    let call = gw.chat("r", &hello()).await;
    assert!(call.result.is_ok());
    assert_eq!(a.requests(), 2, "an open breaker does not call the upstream");
    assert_eq!(outcomes(&call), vec![o("a/model-a", Outcome::CircuitOpen), o("b/model-b", Outcome::Success)]);

    clock.advance(Duration::from_secs(9));
    gw.chat("r", &hello()).await;
    assert_eq!(a.requests(), 2, "still cooling down");

    clock.advance(Duration::from_secs(1));
    assert_eq!(state(), BreakerState::HalfOpen);
    a.set_default(Reply::text("a is back", 1, 1));
    let call = gw.chat("r", &hello()).await;
    assert_eq!(call.result.unwrap().text, "a is back");
    assert_eq!(a.requests(), 3, "one trial went through");
    assert_eq!(state(), BreakerState::Closed);
}

#[tokio::test]
async fn a_failed_trial_reopens_the_breaker() {
    let (a, b) = two().await;
    a.set_default(Reply::status(500));
    let clock = Arc::new(ManualClock::new());
    let gw = gateway(BREAKER, &a, &b, clock.clone());
    let state = || gw.route("r").unwrap().targets[0].breaker().state(clock.now());
    gw.chat("r", &hello()).await;
    gw.chat("r", &hello()).await;
    clock.advance(Duration::from_secs(10));
    gw.chat("r", &hello()).await;
    assert_eq!(a.requests(), 3, "the trial called the upstream");
    assert_eq!(state(), BreakerState::Open);
    gw.chat("r", &hello()).await;
    assert_eq!(a.requests(), 3, "open again for a full cool-down");
}

#[tokio::test]
async fn recorded_cost_equals_price_table_times_tokens() {
    let (a, b) = two().await;
    a.push(Reply::text("a", 1_200, 345));
    b.push(Reply::text("b", 10_000, 2_000));
    let gw = gateway(TWO_OPENAI, &a, &b, Arc::default());
    let call = gw.chat("r", &hello()).await;
    let expected = (1_200.0 * 2.5 + 345.0 * 10.0) / 1e6;
    assert_eq!(call.usage[0].cost_usd, Some(expected));
    assert_eq!(call.cost_usd(), Some(expected));

    a.push(Reply::status(500));
    let call = gw.chat("r", &hello()).await;
    let expected_b = (10_000.0 * 0.15 + 2_000.0 * 0.6) / 1e6;
    assert_eq!(call.usage.iter().map(|r| r.cost_usd).collect::<Vec<_>>(), vec![None, Some(expected_b)]);
    assert_eq!(call.cost_usd(), Some(expected_b), "a failed attempt used no tokens");
    assert_eq!((call.usage[1].route.as_str(), call.usage[1].provider.as_str()), ("r", "b"));
    assert_eq!(call.usage[1].model, "model-b");
}

#[tokio::test]
async fn a_model_without_a_price_has_no_cost_rather_than_zero() {
    let (a, b) = two().await;
    a.push(Reply::text("b", 10, 20));
    let gw = gateway(ANTHROPIC_FIRST.replace("claude-x: {", "other: {").as_str(), &a, &b, Arc::default());
    let call = gw.chat("r", &hello()).await;
    assert_eq!((call.usage[0].input_tokens, call.usage[0].cost_usd), (10, None));
    assert_eq!(call.cost_usd(), None);
}

#[tokio::test]
async fn a_weighted_route_spreads_first_picks_by_weight() {
    let (a, b) = two().await;
    let weighted = |wa: u32, wb: u32| {
        TWO_OPENAI
            .replace("    retry:", "    policy: weighted\n    retry:")
            .replace(
                "timeout_ms: 2000}\n      - {provider: b",
                &format!("timeout_ms: 2000, weight: {wa}}}\n      - {{provider: b"),
            )
            .replace("model: model-b, timeout_ms: 2000}", &format!("model: model-b, timeout_ms: 2000, weight: {wb}}}"))
    };
    let gw = gateway(&weighted(0, 1), &a, &b, Arc::default());
    for _ in 0..20 {
        gw.chat("r", &hello()).await.result.unwrap();
    }
    assert_eq!((a.requests(), b.requests()), (0, 20));

    let gw = gateway(&weighted(1, 1), &a, &b, Arc::default());
    for _ in 0..200 {
        gw.chat("r", &hello()).await.result.unwrap();
    }
    let (to_a, to_b) = (a.requests(), b.requests() - 20);
    assert_eq!(to_a + to_b, 200);
    // Binomial(200, 0.5): below 50 on either side is more than 7 standard deviations out.
    assert!(to_a > 50 && to_b > 50, "a {to_a}, b {to_b}");
}

#[tokio::test]
async fn an_unknown_route_is_an_error_without_usage() {
    let (a, b) = two().await;
    let gw = gateway(TWO_OPENAI, &a, &b, Arc::default());
    let call = gw.chat("nope", &hello()).await;
    assert_eq!(call.result, Err(Error::UnknownRoute("nope".into())));
    assert!(call.usage.is_empty());
}

/// Reads a whole stream: the texts, then the final event or error.
async fn drain(
    stream: &mut sluice_gateway::RouteStream<'_>,
) -> (Vec<String>, Result<sluice_gateway::ChatResponse, UpstreamError>) {
    let mut texts = Vec::new();
    loop {
        match stream.next().await {
            Some(Ok(StreamEvent::Text(t))) => texts.push(t),
            Some(Ok(StreamEvent::Done(resp))) => {
                assert!(stream.next().await.is_none(), "nothing after Done");
                return (texts, Ok(resp));
            }
            Some(Err(e)) => {
                assert!(stream.next().await.is_none(), "nothing after an error");
                return (texts, Err(e));
            }
            None => panic!("a stream must end with Done or an error, never just stop"),
        }
    }
}

#[tokio::test]
async fn streams_from_both_wire_formats_end_with_the_whole_answer_and_usage() {
    let (a, b) = two().await;
    a.push(Reply::stream(&["Bon", "jour"], 21, 8));
    b.push(Reply::stream(&["Hel", "lo", "!"], 13, 5));
    let gw = gateway(ANTHROPIC_FIRST, &a, &b, Arc::default());

    let mut stream = gw.chat_stream("r", &hello()).await.unwrap();
    assert_eq!(stream.target(), "claude/claude-x");
    let (texts, done) = drain(&mut stream).await;
    let done = done.unwrap();
    assert_eq!((texts, done.text.as_str()), (vec!["Bon".to_string(), "jour".to_string()], "Bonjour"));
    assert_eq!((done.usage, done.finish_reason), (Usage { input_tokens: 21, output_tokens: 8 }, FinishReason::Stop));
    let record = stream.usage().last().unwrap();
    assert_eq!(record.outcome, Outcome::Success);
    assert_eq!(record.cost_usd, Some((21.0 * 3.0 + 8.0 * 15.0) / 1e6));
    assert_eq!(a.received()[0].body["stream"], true);

    a.push(Reply::status(503));
    let mut stream = gw.chat_stream("r", &hello()).await.unwrap();
    assert_eq!(stream.target(), "gpt/gpt-x", "a stream falls back before its first token");
    let (texts, done) = drain(&mut stream).await;
    let done = done.unwrap();
    assert_eq!((texts.len(), done.text.as_str(), done.model.as_str()), (3, "Hello!", "gpt-x"));
    assert_eq!(done.usage, Usage { input_tokens: 13, output_tokens: 5 });
    let outcomes: Vec<_> = stream.usage().iter().map(|r| r.outcome).collect();
    assert_eq!(outcomes, vec![Outcome::HttpError(503), Outcome::Success]);
    let body = &b.received()[0].body;
    assert_eq!((&body["stream"], &body["stream_options"]), (&json!(true), &json!({"include_usage": true})));
}

#[tokio::test]
async fn a_stream_cut_after_tokens_ends_with_an_error_not_a_clean_end() {
    let (a, b) = two().await;
    a.push(Reply::cut_stream(&["Bon", "jo"]));
    b.push(Reply::cut_stream(&["Hel"]));
    let gw = gateway(ANTHROPIC_FIRST, &a, &b, Arc::default());
    let cut = |expected: Vec<&'static str>| {
        let gw = &gw;
        async move {
            let mut stream = gw.chat_stream("r", &hello()).await.unwrap();
            let (texts, end) = drain(&mut stream).await;
            assert_eq!(texts, expected);
            assert!(matches!(end, Err(UpstreamError::StreamCut(_))), "{end:?}");
            assert_eq!(stream.usage().last().unwrap().outcome, Outcome::StreamCut);
        }
    };
    cut(vec!["Bon", "jo"]).await; // Anthropic: no message_stop
    a.push(Reply::status(500));
    cut(vec!["Hel"]).await; // OpenAI: no [DONE]
    assert_eq!(b.requests(), 1, "a cut stream is not replayed elsewhere: its tokens were already sent");
}

/// An upstream on a raw socket that sends one SSE event of an unfinished stream, then goes
/// silent (or hangs up, with `hang_up`).
async fn stalling_upstream(hang_up: bool) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let _ = socket.read(&mut buf).await;
        let event = "data: {\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"partial\"}}]}\n\n";
        let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
        let reply = format!("{head}{:x}\r\n{event}\r\n", event.len());
        socket.write_all(reply.as_bytes()).await.unwrap();
        if hang_up {
            drop(socket);
        } else {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
    });
    format!("http://{addr}/v1")
}

#[tokio::test]
async fn a_stream_that_stalls_or_hangs_up_mid_answer_ends_with_an_error() {
    for hang_up in [false, true] {
        let (a, b) = two().await;
        let upstream = stalling_upstream(hang_up).await;
        let yaml = TWO_OPENAI
            .replace("'{a}'", &format!("'{upstream}'"))
            .replace("model-a, timeout_ms: 2000", "model-a, timeout_ms: 300");
        let gw = gateway(&yaml, &a, &b, Arc::default());
        let started = Instant::now();
        let mut stream = gw.chat_stream("r", &hello()).await.unwrap();
        let (texts, end) = drain(&mut stream).await;
        assert_eq!(texts, vec!["partial"]);
        match end {
            Err(UpstreamError::StreamCut(why)) => {
                assert_eq!(why.starts_with("no data for"), !hang_up, "{why}");
            }
            other => panic!("expected a cut, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(b.requests(), 0);
    }
}

#[tokio::test]
async fn a_stream_that_cannot_open_anywhere_reports_every_attempt() {
    let (a, b) = two().await;
    a.set_default(Reply::status(500));
    b.set_default(Reply::status(400));
    let gw = gateway(TWO_OPENAI, &a, &b, Arc::default());
    let failure = gw.chat_stream("r", &hello()).await.err().unwrap();
    assert!(
        matches!(failure.error, Error::Rejected { ref target, .. } if target == "b/model-b"),
        "{:?}",
        failure.error
    );
    let outcomes: Vec<_> = failure.usage.iter().map(|r| r.outcome).collect();
    assert_eq!(outcomes, vec![Outcome::HttpError(500), Outcome::HttpError(400)]);
}

const TIERS: &str = "
providers:
  a: {kind: openai, base_url: '{a}', api_key_env: A_KEY}
  b: {kind: openai, base_url: '{b}', api_key_env: B_KEY}
routes:
  fast:
    precision: precise
    retry: {max_attempts: 2, initial_backoff_ms: 1, jitter: 0}
    targets: [{provider: a, model: model-a, timeout_ms: 2000}]
  precise:
    retry: {max_attempts: 1}
    targets: [{provider: b, model: model-b, timeout_ms: 2000}]
experiments:
  tone:
    arms:
      - {name: control, route: fast, weight: 3}
      - {name: treatment, route: precise, weight: 1}
";

fn precise() -> CallOptions {
    CallOptions { precision: true, ..CallOptions::default() }
}

#[tokio::test]
async fn the_precision_tier_serves_only_callers_who_ask_for_it() {
    let (a, b) = two().await;
    let gw = gateway(TIERS, &a, &b, Arc::default());
    let plain = gw.chat("fast", &hello()).await;
    assert_eq!(plain.result.unwrap().model, "model-a");
    let same = gw.chat_with("fast", &hello(), &CallOptions::default()).await;
    assert_eq!(same.result.unwrap().model, "model-a");
    let tier = gw.chat_with("fast", &hello(), &precise()).await;
    assert_eq!(tier.result.unwrap().model, "model-b");
    assert_eq!((tier.usage[0].route.as_str(), tier.usage[0].target.as_str()), ("precise", "b/model-b"));
    // A route that names no precision tier is its own.
    let own = gw.chat_with("precise", &hello(), &precise()).await;
    assert_eq!(own.result.unwrap().model, "model-b");
    assert_eq!((a.requests(), b.requests()), (2, 2));
    let unknown = gw.chat_with("nope", &hello(), &precise()).await;
    assert_eq!(unknown.result, Err(CallError::Route(Error::UnknownRoute("nope".into()))));
}

fn arm_of(gw: &Gateway, key: &str) -> String {
    gw.experiment("tone").and_then(|e| e.assign(key)).map(|a| a.name.clone()).unwrap()
}

/// With weights 3:1, each key lands on the control with p = 0.75 if the hash spreads keys
/// evenly; over 1,000 keys the count's standard deviation is sqrt(1000 * 0.75 * 0.25) ≈ 13.7,
/// so ±60 (over 4 sigma) fails only for a hash that is biased, not by bad luck. The hash has no
/// randomness, so the count is the same on every run.
#[tokio::test]
async fn experiment_keys_split_by_weight_and_keep_their_arm() {
    let (a, b) = two().await;
    let gw = gateway(TIERS, &a, &b, Arc::default());
    // A second gateway stands for another process or a restart.
    let other = gateway(TIERS, &a, &b, Arc::default());
    let keys: Vec<String> = (0..1000).map(|i| format!("user-{i}")).collect();
    let arms: Vec<String> = keys.iter().map(|k| arm_of(&gw, k)).collect();
    let control = arms.iter().filter(|a| *a == "control").count();
    assert!((690..=810).contains(&control), "{control} of 1000 keys on the control, expected 750 ± 60");
    assert_eq!(arms.iter().filter(|a| *a == "treatment").count(), 1000 - control);
    for (key, arm) in keys.iter().zip(&arms) {
        assert_eq!(&arm_of(&gw, key), arm, "{key} changed arm");
        assert_eq!(&arm_of(&other, key), arm, "{key} has another arm in another gateway");
    }
}

#[tokio::test]
async fn experiment_calls_go_to_the_arms_route_and_every_usage_record_carries_the_arm() {
    let (a, b) = two().await;
    let gw = gateway(TIERS, &a, &b, Arc::default());
    let keys: Vec<String> = (0..50).map(|i| format!("user-{i}")).collect();
    let on = |arm: &str| keys.iter().find(|k| arm_of(&gw, k) == arm).cloned().unwrap();
    let (control_key, treatment_key) = (on("control"), on("treatment"));

    a.push(Reply::status(500));
    let answer = gw.chat_experiment("tone", &control_key, &hello()).await;
    assert_eq!(answer.result.unwrap().model, "model-a");
    let tag = Some(ExperimentArm { experiment: "tone".into(), arm: "control".into() });
    assert_eq!(answer.arm, tag);
    assert_eq!(
        outcomes_of(&answer.usage),
        vec![o("a/model-a", Outcome::HttpError(500)), o("a/model-a", Outcome::Success)]
    );
    assert!(answer.usage.iter().all(|r| r.experiment == tag), "{:?}", answer.usage);

    let answer = gw.chat_experiment("tone", &treatment_key, &hello()).await;
    assert_eq!(answer.result.unwrap().model, "model-b");
    assert_eq!(answer.usage.len(), 1);
    assert_eq!(answer.usage[0].experiment.as_ref().map(|t| t.arm.as_str()), Some("treatment"));

    // Plain calls carry no arm.
    assert_eq!(gw.chat("fast", &hello()).await.usage[0].experiment, None);
    let unknown = gw.chat_experiment("nope", "user-1", &hello()).await;
    let expect = Err(CallError::Experiment(ExperimentError::UnknownExperiment("nope".into())));
    assert_eq!((unknown.result, unknown.usage.len()), (expect, 0));
}

#[tokio::test]
async fn a_paused_experiment_sends_everyone_to_the_control_until_resumed() {
    let (a, b) = two().await;
    let gw = gateway(TIERS, &a, &b, Arc::default());
    let keys: Vec<String> = (0..1000).map(|i| format!("user-{i}")).collect();
    let before: Vec<String> = keys.iter().map(|k| arm_of(&gw, k)).collect();
    let treatment_key = keys.iter().zip(&before).find(|(_, a)| *a == "treatment").map(|(k, _)| k.clone()).unwrap();

    gw.pause_experiment("tone").unwrap();
    assert!(keys.iter().all(|k| arm_of(&gw, k) == "control"));
    let answer = gw.chat_experiment("tone", &treatment_key, &hello()).await;
    assert_eq!(answer.result.unwrap().model, "model-a");
    assert_eq!(answer.usage[0].experiment.as_ref().map(|t| t.arm.as_str()), Some("control"));
    assert_eq!(b.requests(), 0);

    gw.resume_experiment("tone").unwrap();
    let after: Vec<String> = keys.iter().map(|k| arm_of(&gw, k)).collect();
    assert_eq!(after, before, "resuming restores every assignment");
    assert_eq!(gw.pause_experiment("nope"), Err(ExperimentError::UnknownExperiment("nope".into())));
}

fn outcomes_of(usage: &[sluice_gateway::UsageRecord]) -> Vec<(String, Outcome)> {
    usage.iter().map(|r| (r.target.clone(), r.outcome)).collect()
}

fn label_schema() -> CallOptions {
    let schema = json!({
        "type": "object",
        "required": ["label", "score"],
        "properties": {"label": {"enum": ["spam", "ham"]}, "score": {"type": "number"}},
        "additionalProperties": false,
    });
    CallOptions { schema: Some(schema), ..CallOptions::default() }
}

#[tokio::test]
async fn structured_output_valid_the_first_time_takes_one_call() {
    let (a, b) = two().await;
    a.push(Reply::text(r#"{"label": "spam", "score": 0.9}"#, 10, 5));
    let gw = gateway(TWO_OPENAI, &a, &b, Arc::default());
    let answer = gw.chat_with("r", &hello(), &label_schema()).await;
    assert!(answer.result.is_ok(), "{:?}", answer.result);
    assert_eq!(answer.json, Some(json!({"label": "spam", "score": 0.9})));
    assert_eq!(answer.usage.len(), 1);
    assert_eq!(a.requests(), 1);
}

#[tokio::test]
async fn invalid_structured_output_is_repaired_once_with_the_validation_errors() {
    let (a, b) = two().await;
    let bad = r#"{"label": "eggs", "score": 0.9}"#;
    a.push(Reply::text(bad, 10, 5));
    a.push(Reply::text(r#"{"label": "ham", "score": 0.2}"#, 30, 6));
    let gw = gateway(TWO_OPENAI, &a, &b, Arc::default());
    let answer = gw.chat_with("r", &hello(), &label_schema()).await;
    assert_eq!(answer.json, Some(json!({"label": "ham", "score": 0.2})));
    assert_eq!(answer.result.unwrap().text, r#"{"label": "ham", "score": 0.2}"#);
    let tokens: Vec<(u64, u64)> = answer.usage.iter().map(|r| (r.input_tokens, r.output_tokens)).collect();
    assert_eq!(tokens, vec![(10, 5), (30, 6)], "both calls are accounted");

    let received = a.received();
    assert_eq!(received.len(), 2);
    let messages = received[1].body["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 4, "{messages:?}");
    assert_eq!(&messages[..2], received[0].body["messages"].as_array().unwrap().as_slice());
    assert_eq!(messages[2], json!({"role": "assistant", "content": bad}));
    assert_eq!(messages[3]["role"], "user");
    let repair = messages[3]["content"].as_str().unwrap();
    assert!(repair.contains("- at `/label`: \"eggs\" is not one of"), "{repair}");
    assert!(repair.contains("corrected JSON only"), "{repair}");
}

#[tokio::test]
async fn structured_output_invalid_twice_fails_with_the_problems() {
    let (a, b) = two().await;
    a.push(Reply::text(r#"{"label": "eggs"}"#, 1, 1));
    a.push(Reply::text(r#"{"label": "spam", "score": "high", "why": "because"}"#, 1, 1));
    let gw = gateway(TWO_OPENAI, &a, &b, Arc::default());
    let answer = gw.chat_with("r", &hello(), &label_schema()).await;
    let Err(CallError::Structured(StructuredError::Invalid { errors, answer: last })) = &answer.result else {
        panic!("{:?}", answer.result)
    };
    assert_eq!(last, r#"{"label": "spam", "score": "high", "why": "because"}"#);
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors.iter().any(|e| e.starts_with("at `/score`: \"high\" is not of type \"number\"")), "{errors:?}");
    assert!(
        errors.contains(&"at the root: Additional properties are not allowed ('why' was unexpected)".to_string()),
        "{errors:?}"
    );
    let message = answer.result.as_ref().err().map(ToString::to_string).unwrap_or_default();
    assert!(message.contains("/score") && message.contains("even after one repair"), "{message}");
    assert_eq!((answer.json, answer.usage.len(), a.requests()), (None, 2, 2), "one repair, no more");
}

#[tokio::test]
async fn a_non_json_answer_counts_as_invalid() {
    let (a, b) = two().await;
    a.push(Reply::text("Sure! The label is spam.", 1, 1));
    a.push(Reply::text(r#"{"label": "spam", "score": 1}"#, 1, 1));
    let gw = gateway(TWO_OPENAI, &a, &b, Arc::default());
    let answer = gw.chat_with("r", &hello(), &label_schema()).await;
    assert_eq!(answer.json, Some(json!({"label": "spam", "score": 1})));
    let repair = a.received()[1].body["messages"][3]["content"].as_str().unwrap().to_string();
    assert!(repair.contains("- the answer is not JSON: expected value at line 1 column 1"), "{repair}");

    a.push(Reply::text("no", 1, 1));
    a.push(Reply::text("still no", 1, 1));
    let answer = gw.chat_with("r", &hello(), &label_schema()).await;
    let Err(CallError::Structured(StructuredError::Invalid { errors, .. })) = &answer.result else {
        panic!("{:?}", answer.result)
    };
    assert_eq!(errors.len(), 1);
    assert!(errors[0].starts_with("the answer is not JSON"), "{errors:?}");
}

#[tokio::test]
async fn a_bad_schema_or_a_failed_call_is_reported_as_such() {
    let (a, b) = two().await;
    let gw = gateway(TWO_OPENAI, &a, &b, Arc::default());
    let options = CallOptions { schema: Some(json!({"type": "no-such-type"})), ..CallOptions::default() };
    let answer = gw.chat_with("r", &hello(), &options).await;
    assert!(matches!(answer.result, Err(CallError::Structured(StructuredError::BadSchema(_)))), "{:?}", answer.result);
    assert_eq!((answer.usage.len(), a.requests()), (0, 0), "nothing is sent with a bad schema");

    a.set_default(Reply::status(400));
    let answer = gw.chat_with("r", &hello(), &label_schema()).await;
    assert!(matches!(answer.result, Err(CallError::Route(Error::Rejected { .. }))), "{:?}", answer.result);
    assert_eq!(answer.usage.len(), 1, "an upstream failure is not repaired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eval_run_counts_failed_calls_and_invalid_answers_and_keeps_the_dataset_order() {
    use sluice_gateway::eval::{self, Predicted, Subject};
    let (a, b) = two().await;
    let gw = Arc::new(gateway(TWO_OPENAI, &a, &b, Arc::default()));
    let text = "{\"id\": \"x\", \"input\": \"I love it\", \"label\": \"positive\"}
{\"id\": \"y\", \"input\": \"meh\", \"label\": \"neutral\"}
{\"id\": \"z\", \"input\": \"what?\", \"label\": \"negative\"}
{\"id\": \"w\", \"input\": \"awful\", \"label\": \"negative\"}";
    let dataset = eval::dataset::parse(text).unwrap();
    // One target alone: the 400 is not served by `b`, and the run goes on after it.
    let subject = Subject::resolve(&gw, "r/a/model-a").unwrap();
    assert_eq!(subject, Subject::Target { route: "r".into(), target: "a/model-a".into() });
    a.push(Reply::text("Positive.", 10, 1)).push(Reply::status(400)).push(Reply::text("no idea", 10, 2));
    a.push(Reply::text("negative", 10, 1));
    let options = eval::Options { concurrency: 1, ..eval::Options::default() };
    let run = eval::run(gw.clone(), &subject, &dataset, &options, Arc::new(|_| {})).await;
    let predicted: Vec<Predicted> = run.results.iter().map(|r| r.predicted).collect();
    // Labels sorted: negative, neutral, positive.
    assert_eq!(predicted, [Predicted::Label(2), Predicted::Error, Predicted::Invalid, Predicted::Label(0)]);
    assert!(run.results[1].answer.as_ref().is_err_and(|e| e.contains("refused the request")), "{:?}", run.results[1]);
    assert_eq!((run.scores.correct, run.scores.errors, run.scores.invalid), (2, 1, 1));
    assert_eq!(b.requests(), 0, "a target alone does not fall back");
    let t = &run.targets[0];
    assert_eq!((t.calls, t.failed, t.input_tokens, t.output_tokens), (4, 1, 30, 4));
    // model-a: $2.5 in, $10 out per million.
    assert!((run.cost_usd.unwrap() - (30.0 * 2.5 + 4.0 * 10.0) / 1e6).abs() < 1e-12, "{:?}", run.cost_usd);

    assert!(matches!(Subject::resolve(&gw, "zzz"), Err(eval::run::Error::Unknown { .. })));
    assert_eq!(Subject::resolve(&gw, "r").unwrap(), Subject::Route("r".into()));
    assert_eq!(
        Subject::resolve(&gw, "b/model-b").unwrap(),
        Subject::Target { route: "r".into(), target: "b/model-b".into() }
    );
}
