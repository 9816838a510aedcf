//! `sluice bench`: a load generator. Starts its own server on a temporary SQLite file (or uses
//! `--server` when given), publishes a K-step workflow, runs W workers, starts N executions with
//! C in flight, and reports executions/s, steps/s and start-to-result latency percentiles.
//! `sluice bench gateway` measures the AI gateway instead (`bench_gateway.rs`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value};
use tokio::sync::Notify;

use sluice_server::sluice_auth::{NewApiKey, Role};

use sluice_engine::EngineOptions;

use crate::client::Api;
use crate::out;

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum, Debug)]
pub enum StepKind {
    /// Steps done by external workers over HTTP.
    Task,
    /// jq steps evaluated inside the engine.
    Transform,
}

#[derive(Subcommand, Debug)]
pub enum BenchMode {
    /// The latency the AI gateway adds over calling a loopback upstream directly (open loop).
    Gateway(crate::bench_gateway::GatewayBenchArgs),
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    /// Without a mode: the workflow bench, with the flags below.
    #[command(subcommand)]
    mode: Option<BenchMode>,
    #[arg(long, default_value_t = 1000)]
    executions: usize,
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Executions in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Worker clients in this process (each polls with up to 256 tasks in flight); 0 to rely on
    /// external workers serving the `bench` queue (`sluice worker --queue bench`).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    #[arg(long, value_enum, default_value_t = StepKind::Task)]
    step_kind: StepKind,
    /// Database of the bench's own server: a SQLite file (a temporary one by default) or a
    /// PostgreSQL URL.
    #[arg(long)]
    database: Option<String>,
    /// Use the server named by --server instead of starting one (with --api-key when it needs
    /// one).
    #[arg(long)]
    external: bool,
    /// Authentication on the bench's own server: `on` (an API key per request, as in
    /// production), `off`, or `both`: off then on, in this process, and the ratio of their P99.
    #[arg(long, value_enum, default_value_t = AuthMode::On)]
    auth: AuthMode,
    /// With `--auth both`: alternate off and on this many times and compare the medians, so that
    /// a noisy neighbour spreads over both.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Nodes of the bench's own cluster, all on `--database` (PostgreSQL), each with its own
    /// connection pool, workers and share of the load; executions belong to the node that
    /// started them.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum, Debug)]
pub enum AuthMode {
    On,
    Off,
    Both,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub async fn run(args: BenchArgs, server: &str, api_key: Option<&str>, json_out: bool) -> Result<()> {
    if let Some(BenchMode::Gateway(gateway)) = args.mode {
        return crate::bench_gateway::run(gateway, json_out).await;
    }
    if args.executions == 0 || args.steps == 0 || args.concurrency == 0 || args.nodes == 0 {
        bail!("--executions, --steps, --concurrency and --nodes must be at least 1");
    }
    let postgres =
        args.database.as_deref().is_some_and(|d| d.starts_with("postgres://") || d.starts_with("postgresql://"));
    if args.nodes > 1 && !postgres {
        bail!("--nodes above 1 needs a PostgreSQL --database: nodes share one database over the network");
    }
    if args.external {
        let report = measure(&args, &[server.to_string()], api_key).await?;
        return finish(&args, vec![report], json_out);
    }
    let modes: Vec<bool> = match args.auth {
        AuthMode::On => vec![true],
        AuthMode::Off => vec![false],
        AuthMode::Both => [false, true].repeat(args.rounds.max(1)),
    };
    let mut reports = Vec::new();
    for auth in modes {
        let mut tmp_db = None;
        let db = match &args.database {
            Some(p) => p.clone(),
            None => {
                let p = std::env::temp_dir().join(format!("sluice-bench-{}-{auth}.db", std::process::id()));
                tmp_db = Some(p.clone());
                p.display().to_string()
            }
        };
        let mut key = None;
        let mut bases = Vec::new();
        let mut servers = Vec::new();
        for _ in 0..args.nodes {
            let opts = EngineOptions { node: sluice_engine::unique_node_name(), ..EngineOptions::default() };
            let (engine, listener, addr) = crate::server::start(&db, "127.0.0.1", 0, opts, true).await?;
            let directory = if auth {
                // A scratch database of its own gets a key of its own, forgotten with it.
                let server_key = match &tmp_db {
                    Some(_) => sluice_server::sluice_auth::ServerKey::generate()?.0,
                    None => crate::server::server_key(&db, &crate::SecretArgs::default())?,
                };
                let dir = crate::server::open_directory(engine.store(), server_key).await?;
                if key.is_none() {
                    dir.create_tenant(sluice_server::routes::DEFAULT_TENANT, "Default").await?;
                    let new = NewApiKey {
                        name: "bench".into(),
                        role: Role::Admin,
                        expires_in: None,
                        client_cert_sha256: None,
                        presented_cert_sha256: None,
                    };
                    key = Some(dir.create_api_key(sluice_server::routes::DEFAULT_TENANT, None, new).await?.1);
                }
                Some(dir)
            } else {
                None
            };
            let opts =
                sluice_server::Options { directory, connections: own_clients(), ..sluice_server::Options::default() };
            let (stop_server, stopped) = tokio::sync::oneshot::channel::<()>();
            servers.push((
                stop_server,
                tokio::spawn(sluice_server::serve_with(listener, engine, opts, async move {
                    let _ = stopped.await;
                })),
            ));
            bases.push(format!("http://{addr}"));
        }
        let mut report = measure(&args, &bases, key.as_deref()).await;
        if let Ok(r) = &mut report {
            r["auth"] = json!(auth);
            r["nodes"] = json!(args.nodes);
        }
        for (stop_server, server) in servers {
            let _ = stop_server.send(());
            let _ = server.await;
        }
        if let Some(p) = tmp_db {
            crate::server::remove_sqlite_files(&p);
        }
        reports.push(report?);
    }
    finish(&args, reports, json_out)
}

/// The median of the reports' `latency_ms[field]` among runs with `auth`.
fn median(reports: &[Value], auth: bool, field: &str) -> f64 {
    let mut v: Vec<f64> = reports
        .iter()
        .filter(|r| r["auth"].as_bool() == Some(auth))
        .filter_map(|r| r["latency_ms"][field].as_f64())
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    percentile(&v, 50.0)
}

fn bases_of(report: &Value) -> u64 {
    report["nodes"].as_u64().unwrap_or(1)
}

/// Prints the reports (and, with both modes, the medians and the ratio of auth on to off); fails
/// when executions failed.
fn finish(args: &BenchArgs, reports: Vec<Value>, json_out: bool) -> Result<()> {
    let both = reports.iter().any(|r| r["auth"] == true) && reports.iter().any(|r| r["auth"] == false);
    let summary = both.then(|| {
        let (off, on) = (median(&reports, false, "p99"), median(&reports, true, "p99"));
        json!({
            "p50_ms": {"off": median(&reports, false, "p50"), "on": median(&reports, true, "p50")},
            "p99_ms": {"off": off, "on": on},
            "p99_auth_on_over_off": if off > 0.0 { on / off } else { 0.0 },
        })
    });
    if json_out {
        match summary {
            Some(summary) => out(&json!({"runs": reports, "median": summary}).to_string()),
            None => out(&reports[0].to_string()),
        }
    } else {
        for report in &reports {
            out(&format!(
                "{} executions x {} {} steps, concurrency {}, nodes {}, workers {} per node, auth {}\n  {:.2} s  {:.0} executions/s  {:.0} steps/s\n  start->result ms  p50 {:.2}  p95 {:.2}  p99 {:.2}  max {:.2}\n  failed {}",
                args.executions, args.steps, report["step_kind"].as_str().unwrap_or(""), args.concurrency, bases_of(report), args.workers,
                match report["auth"].as_bool() { Some(true) => "on", Some(false) => "off", None => "as the server has it" },
                report["seconds"].as_f64().unwrap_or(0.0), report["executions_per_s"].as_f64().unwrap_or(0.0),
                report["steps_per_s"].as_f64().unwrap_or(0.0),
                report["latency_ms"]["p50"].as_f64().unwrap_or(0.0), report["latency_ms"]["p95"].as_f64().unwrap_or(0.0),
                report["latency_ms"]["p99"].as_f64().unwrap_or(0.0), report["latency_ms"]["max"].as_f64().unwrap_or(0.0),
                report["failed"]
            ));
        }
        if let Some(m) = summary {
            out(&format!(
                "median of {} rounds: p50 off {:.2} on {:.2} ms, p99 off {:.2} on {:.2} ms; p99 on/off {:.3}",
                args.rounds.max(1),
                m["p50_ms"]["off"].as_f64().unwrap_or(0.0),
                m["p50_ms"]["on"].as_f64().unwrap_or(0.0),
                m["p99_ms"]["off"].as_f64().unwrap_or(0.0),
                m["p99_ms"]["on"].as_f64().unwrap_or(0.0),
                m["p99_auth_on_over_off"].as_f64().unwrap_or(0.0)
            ));
        }
    }
    let failed: u64 = reports.iter().map(|r| r["failed"].as_u64().unwrap_or(0)).sum();
    if failed > 0 {
        bail!("{failed} executions did not complete");
    }
    Ok(())
}

/// One run against the nodes at `bases`: each gets its workers and an equal share of the load.
async fn measure(args: &BenchArgs, bases: &[String], api_key: Option<&str>) -> Result<Value> {
    let apis: Vec<Api> = bases.iter().map(|b| Api::new(b, api_key)).collect();
    let api = apis[0].clone();
    let name = format!(
        "bench-{}-{}",
        match args.step_kind {
            StepKind::Task => "task",
            StepKind::Transform => "transform",
        },
        args.steps
    );
    let steps: Vec<Value> = (1..=args.steps)
        .map(|i| match args.step_kind {
            StepKind::Task => json!({"id": format!("s{i}"), "type": "task", "queue": "bench", "input": ".input"}),
            StepKind::Transform => json!({"id": format!("s{i}"), "type": "transform", "expr": ".input.n + 1"}),
        })
        .collect();
    api.publish_text(json!({"name": name, "steps": steps}).to_string(), false).await?;

    let stop = Arc::new(Notify::new());
    if args.step_kind == StepKind::Task {
        for base in bases {
            for _ in 0..args.workers {
                let stop = stop.clone();
                let w = sluice_worker::Worker::new(base)
                    .api_key(api_key)
                    .concurrency(256)
                    .queue("bench", |t| async move { Ok(t.input) });
                tokio::spawn(w.run(async move { stop.notified().await }));
            }
        }
    }

    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let started_at = Instant::now();
    let mut loaders = Vec::new();
    for i in 0..args.concurrency.min(args.executions) {
        let api = apis[i % apis.len()].clone();
        let (next, failed, name, n) = (next.clone(), failed.clone(), name.clone(), args.executions);
        loaders.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let t0 = Instant::now();
                let ok = async {
                    let s = api.start(&name, None, json!({"n": 1}), None).await?;
                    let wid = s["workflow_id"].as_str().unwrap_or_default().to_string();
                    api.wait(&wid, Duration::from_secs(120)).await
                }
                .await;
                match ok {
                    Ok(row) if row["status"] == "completed" => lat.push(t0.elapsed().as_secs_f64() * 1000.0),
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for l in loaders {
        lat.extend(l.await?);
    }
    let elapsed = started_at.elapsed().as_secs_f64();
    stop.notify_waiters();
    lat.sort_by(|a, b| a.total_cmp(b));
    let done = lat.len();
    let report = json!({
        "workflow": name,
        "step_kind": format!("{:?}", args.step_kind).to_lowercase(),
        "executions": args.executions,
        "completed": done,
        "failed": failed.load(Ordering::Relaxed),
        "steps_per_execution": args.steps,
        "concurrency": args.concurrency,
        "workers": args.workers,
        "seconds": elapsed,
        "executions_per_s": done as f64 / elapsed,
        "steps_per_s": (done * args.steps) as f64 / elapsed,
        "latency_ms": {"p50": percentile(&lat, 50.0), "p95": percentile(&lat, 95.0), "p99": percentile(&lat, 99.0), "max": lat.last().copied().unwrap_or(0.0)},
        "rss_mib": rss_kib().map(|k| k as f64 / 1024.0),
        "server": if args.external { "external" } else { "in-process" },
    });
    Ok(report)
}

/// The connection limits of a bench's own server: its clients all connect from one address,
/// however many they are.
pub(crate) fn own_clients() -> sluice_server::conn::Limits {
    sluice_server::conn::Limits { max_per_address: 0, ..sluice_server::conn::Limits::default() }
}
