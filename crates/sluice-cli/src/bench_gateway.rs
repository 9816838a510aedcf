//! `sluice bench gateway`: the latency the AI gateway adds over calling the same upstream
//! directly. Starts a stand-in upstream (a fixed chat completion, answered at once) and a Sluice
//! server whose gateway routes to it, both in this process on 127.0.0.1, then sends an open-loop
//! load: requests at fixed times, alternating direct and through Sluice, each timed from its
//! scheduled send time (so a slow answer cannot hide the queue behind it). The usage ledger's
//! latency of each gateway call (the gateway's own exchange with the upstream) splits the added
//! latency into that second exchange and the rest.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};
use sluice_engine::Engine;
use sluice_server::sluice_gateway::{Config as GatewayConfig, Gateway};
use sluice_store::UsageFilter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::out;

pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    sluice_core::duration::Duration::parse(text).map(|d| Duration::from_millis(d.as_millis()))
}

#[derive(Args, Debug)]
pub struct GatewayBenchArgs {
    /// Request rates, comma-separated: each path (direct, and through Sluice) gets this many
    /// requests per second, interleaved, so the upstream sees twice as many.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
    rps: Vec<u32>,
    /// How long each rate is measured.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Load before each measurement that is not measured (connections, caches, allocator).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
}

/// Latencies of one path, in microseconds, sorted.
#[derive(Default)]
struct Samples {
    ok: Vec<f64>,
    failed: usize,
}

impl Samples {
    fn percentile(&self, p: f64) -> f64 {
        if self.ok.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * self.ok.len() as f64).ceil() as usize;
        self.ok[rank.clamp(1, self.ok.len()) - 1]
    }

    fn summary(&self) -> Value {
        json!({
            "requests": self.ok.len() + self.failed,
            "failed": self.failed,
            "p50": self.percentile(50.0),
            "p90": self.percentile(90.0),
            "p99": self.percentile(99.0),
            "max": self.ok.last().copied().unwrap_or(0.0),
        })
    }
}

/// What one rate measured.
struct Measured {
    rps: u32,
    direct: Samples,
    via: Samples,
    /// How late the load generator sent, in microseconds, sorted.
    lag: Samples,
    /// The gateway's exchanges with the upstream as its usage ledger timed them, sorted.
    upstream: Samples,
    seconds: f64,
}

const BODY: &str = r#"{"model":"bench","messages":[{"role":"user","content":"Say ok."}],"max_tokens":4}"#;

pub async fn run(args: GatewayBenchArgs, json_out: bool) -> Result<()> {
    if args.rps.is_empty() || args.rps.contains(&0) {
        bail!("--rps takes request rates above 0, such as --rps 1000,5000");
    }
    if args.duration.is_zero() {
        bail!("--duration must be above 0, such as --duration 10s");
    }
    let upstream = TcpListener::bind("127.0.0.1:0").await.context("cannot listen on 127.0.0.1")?;
    let upstream_addr = upstream.local_addr()?;
    tokio::spawn(sluice_server::loopback::serve(upstream, std::future::pending()));

    // One target, no retries, a breaker that never opens: every call is one upstream call.
    let config = GatewayConfig::from_yaml(&format!(
        "
providers:
  loopback: {{kind: openai, base_url: 'http://{upstream_addr}/v1'}}
routes:
  bench:
    retry: {{max_attempts: 1}}
    targets: [{{provider: loopback, model: loopback, timeout_ms: 10000}}]
breaker: {{failure_threshold: 1000000000, cool_down_ms: 1}}
"
    ))
    .map_err(|e| anyhow::anyhow!("the bench's gateway config: {e}"))?;
    let gateway = Arc::new(Gateway::from_config(&config).map_err(|e| anyhow::anyhow!("{e}"))?);
    let db = std::env::temp_dir().join(format!("sluice-bench-gateway-{}.db", std::process::id()));
    let started = crate::server::start(
        &db.display().to_string(),
        "127.0.0.1",
        0,
        sluice_engine::EngineOptions { gateway: Some(gateway.clone()), ..Default::default() },
        false,
    )
    .await;
    let result = match started {
        Ok((engine, listener, addr)) => {
            // Authentication off: this measures the gateway's own cost (`sluice bench --auth both`
            // measures authentication's).
            let opts = sluice_server::Options {
                gateway: Some(gateway),
                connections: crate::bench::own_clients(),
                ..sluice_server::Options::default()
            };
            tokio::spawn(sluice_server::serve_with(listener, engine.clone(), opts, std::future::pending()));
            measure_all(&args, [upstream_addr, addr], &engine).await
        }
        Err(e) => Err(e),
    };
    crate::server::remove_sqlite_files(&db);
    let measured = result?;
    let report = json!({
        "bench": "gateway",
        "duration_s": args.duration.as_secs_f64(),
        "warmup_s": args.warmup.as_secs_f64(),
        "latency_from": "scheduled_send",
        "unit": "us",
        "rates": measured.iter().map(|m| json!({
            "rps": m.rps,
            "seconds": m.seconds,
            "direct": m.direct.summary(),
            "via_sluice": m.via.summary(),
            "added": {
                "p50": m.via.percentile(50.0) - m.direct.percentile(50.0),
                "p99": m.via.percentile(99.0) - m.direct.percentile(99.0),
            },
            "send_lag": {"p50": m.lag.percentile(50.0), "p99": m.lag.percentile(99.0)},
            "gateway_to_upstream": {"p50": m.upstream.percentile(50.0), "p99": m.upstream.percentile(99.0)},
        })).collect::<Vec<_>>(),
    });
    if json_out {
        out(&report.to_string());
    } else {
        out(&format!(
            "gateway overhead over a loopback upstream: open loop, {:.1} s per rate, latency in µs from the scheduled send",
            args.duration.as_secs_f64()
        ));
        out(&format!(
            "{:>7}  {:>9} {:>9}  {:>9} {:>9}  {:>9} {:>9}  {:>9} {:>9}  {:>8}  {:>6}",
            "RPS",
            "DIRECT50",
            "DIRECT99",
            "SLUICE50",
            "SLUICE99",
            "ADDED50",
            "ADDED99",
            "UPSTRM50",
            "UPSTRM99",
            "LAG99",
            "FAILED"
        ));
        for m in &measured {
            out(&format!(
                "{:>7}  {:>9.1} {:>9.1}  {:>9.1} {:>9.1}  {:>9.1} {:>9.1}  {:>9.1} {:>9.1}  {:>8.1}  {:>6}",
                m.rps,
                m.direct.percentile(50.0),
                m.direct.percentile(99.0),
                m.via.percentile(50.0),
                m.via.percentile(99.0),
                m.via.percentile(50.0) - m.direct.percentile(50.0),
                m.via.percentile(99.0) - m.direct.percentile(99.0),
                m.upstream.percentile(50.0),
                m.upstream.percentile(99.0),
                m.lag.percentile(99.0),
                m.direct.failed + m.via.failed
            ));
        }
    }
    let failed: usize = measured.iter().map(|m| m.direct.failed + m.via.failed).sum();
    if failed > 0 {
        bail!("{failed} requests failed");
    }
    Ok(())
}

async fn measure_all(args: &GatewayBenchArgs, targets: [SocketAddr; 2], engine: &Engine) -> Result<Vec<Measured>> {
    let clients = Arc::new(targets.map(Client::new));
    let mut measured = Vec::new();
    for &rps in &args.rps {
        if !args.warmup.is_zero() {
            load(&clients, rps, args.warmup).await;
        }
        let since_ms = sluice_engine::now_ms();
        let mut m = load(&clients, rps, args.duration).await;
        m.upstream = upstream_latencies(engine, since_ms).await?;
        measured.push(m);
    }
    Ok(measured)
}

/// The latencies (µs, sorted) of the gateway's calls recorded in the usage ledger since `since_ms`.
async fn upstream_latencies(engine: &Engine, since_ms: i64) -> Result<Samples> {
    engine.flush_usage().await.map_err(|e| anyhow::anyhow!("cannot write the usage rows: {e}"))?;
    let mut samples = Samples::default();
    let mut cursor = None;
    loop {
        let filter = UsageFilter { since_ms: Some(since_ms), cursor, limit: 1000, ..UsageFilter::default() };
        let page = engine.store().list_usage("default", filter).await.context("cannot read the usage ledger")?;
        samples.ok.extend(page.items.iter().map(|u| u.latency_us as f64));
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    samples.ok.sort_by(f64::total_cmp);
    Ok(samples)
}

/// Sends `rps` requests per second on each path for `duration`, alternating the paths, from a
/// thread of its own that sleeps until each send time, so that sending never waits for answers.
async fn load(clients: &Arc<[Client; 2]>, rps: u32, duration: Duration) -> Measured {
    let interval = Duration::from_secs_f64(1.0 / (2.0 * f64::from(rps)));
    let total = (2.0 * f64::from(rps) * duration.as_secs_f64()).round() as usize;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Option<f64>)>();
    let handle = tokio::runtime::Handle::current();
    let clients = clients.clone();
    let start = Instant::now() + Duration::from_millis(5);
    let sender = std::thread::spawn(move || {
        let mut lag = Vec::with_capacity(total);
        for i in 0..total {
            let at = start + interval.mul_f64(i as f64);
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            lag.push(at.elapsed().as_secs_f64() * 1e6);
            let path = i % 2;
            let (clients, tx) = (clients.clone(), tx.clone());
            handle.spawn(async move {
                let ok = matches!(
                    tokio::time::timeout(REQUEST_TIMEOUT, clients[path].call()).await,
                    Ok(Ok(status)) if status == 200
                );
                let _ = tx.send((path, ok.then(|| at.elapsed().as_secs_f64() * 1e6)));
            });
        }
        lag
    });
    let mut paths = [Samples::default(), Samples::default()];
    for _ in 0..total {
        match rx.recv().await {
            Some((path, Some(us))) => paths[path].ok.push(us),
            Some((path, None)) => paths[path].failed += 1,
            None => break,
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let lag = tokio::task::spawn_blocking(move || sender.join().unwrap_or_default()).await.unwrap_or_default();
    let mut lag = Samples { ok: lag, failed: 0 };
    lag.ok.sort_by(f64::total_cmp);
    let [mut direct, mut via] = paths;
    direct.ok.sort_by(f64::total_cmp);
    via.ok.sort_by(f64::total_cmp);
    Measured { rps, direct, via, lag, upstream: Samples::default(), seconds }
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A minimal HTTP/1.1 client with a pool of keep-alive connections to one address, sending one
/// fixed request. The load generator shares the machine with what it measures; this costs a
/// fraction of a general client's work per request (no URL parsing, no redirect policy), and
/// both paths use it alike.
struct Client {
    addr: SocketAddr,
    request: Vec<u8>,
    idle: std::sync::Mutex<Vec<TcpStream>>,
}

impl Client {
    fn new(addr: SocketAddr) -> Self {
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{BODY}",
            BODY.len()
        );
        Self { addr, request: request.into_bytes(), idle: std::sync::Mutex::new(Vec::new()) }
    }

    /// Sends the request and reads the whole answer; returns its status.
    async fn call(&self) -> std::io::Result<u16> {
        let pooled = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        if let Some(conn) = pooled {
            // A pooled connection the server has closed fails before any byte is read: retry once
            // on a fresh one.
            match self.exchange(conn).await {
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
                done => return done,
            }
        }
        let conn = TcpStream::connect(self.addr).await?;
        conn.set_nodelay(true)?;
        self.exchange(conn).await
    }

    async fn exchange(&self, mut conn: TcpStream) -> std::io::Result<u16> {
        conn.write_all(&self.request).await?;
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 4096];
        let (head_end, status, length) = loop {
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let (status, length) = parse_head(&buf[..end])?;
                break (end + 4, status, length);
            }
        };
        while buf.len() < head_end + length {
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::Error::other("the connection closed inside the answer"));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
        Ok(status)
    }
}

/// The status and `content-length` of an answer's head.
fn parse_head(head: &[u8]) -> std::io::Result<(u16, usize)> {
    let bad = |what: &str| std::io::Error::other(format!("bad answer: {what}"));
    let text = std::str::from_utf8(head).map_err(|_| bad("head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status =
        lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).ok_or_else(|| bad("no status"))?;
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .ok_or_else(|| bad("no content-length"))?;
    Ok((status, length))
}
