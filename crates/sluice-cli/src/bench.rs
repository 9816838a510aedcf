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
    /// Use the server named by --server instead of starting one.
    #[arg(long)]
    external: bool,
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

pub async fn run(args: BenchArgs, server: &str, json_out: bool) -> Result<()> {
    if let Some(BenchMode::Gateway(gateway)) = args.mode {
        return crate::bench_gateway::run(gateway, json_out).await;
    }
    if args.executions == 0 || args.steps == 0 || args.concurrency == 0 {
        bail!("--executions, --steps and --concurrency must be at least 1");
    }
    let mut _tmp_db = None;
    let base = if args.external {
        server.to_string()
    } else {
        let db = match &args.database {
            Some(p) => p.clone(),
            None => {
                let p = std::env::temp_dir().join(format!("sluice-bench-{}.db", std::process::id()));
                _tmp_db = Some(p.clone());
                p.display().to_string()
            }
        };
        let (engine, listener, addr) = crate::server::start(&db, "127.0.0.1", 0, None).await?;
        tokio::spawn(sluice_server::serve(listener, engine, std::future::pending()));
        format!("http://{addr}")
    };
    let api = Api::new(&base);
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
        for _ in 0..args.workers {
            let stop = stop.clone();
            let w = sluice_worker::Worker::new(&base).concurrency(256).queue("bench", |t| async move { Ok(t.input) });
            tokio::spawn(w.run(async move { stop.notified().await }));
        }
    }

    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let started_at = Instant::now();
    let mut loaders = Vec::new();
    for _ in 0..args.concurrency.min(args.executions) {
        let (api, next, failed, name, n) = (api.clone(), next.clone(), failed.clone(), name.clone(), args.executions);
        loaders.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let t0 = Instant::now();
                let ok = async {
                    let s = api.start(&name, json!({"n": 1}), None).await?;
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
    if let Some(p) = _tmp_db {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", p.display()));
        }
    }
    if json_out {
        out(&report.to_string());
    } else {
        out(&format!(
            "{} executions x {} {} steps, concurrency {}, workers {}\n  {:.2} s  {:.0} executions/s  {:.0} steps/s\n  start->result ms  p50 {:.2}  p95 {:.2}  p99 {:.2}  max {:.2}\n  failed {}",
            args.executions, args.steps, report["step_kind"].as_str().unwrap_or(""), args.concurrency, args.workers,
            elapsed, report["executions_per_s"].as_f64().unwrap_or(0.0), report["steps_per_s"].as_f64().unwrap_or(0.0),
            report["latency_ms"]["p50"].as_f64().unwrap_or(0.0), report["latency_ms"]["p95"].as_f64().unwrap_or(0.0),
            report["latency_ms"]["p99"].as_f64().unwrap_or(0.0), report["latency_ms"]["max"].as_f64().unwrap_or(0.0),
            report["failed"]
        ));
    }
    if failed.load(Ordering::Relaxed) > 0 {
        bail!("{} executions did not complete", failed.load(Ordering::Relaxed));
    }
    Ok(())
}
