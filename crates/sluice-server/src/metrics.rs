//! Prometheus metrics: request counts and latency histograms per route, engine counters, queue
//! depths, connections, the served TLS certificate. Rendered in the Prometheus text format.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;

use sluice_engine::{CallStats, Engine};
use sluice_gateway::{BreakerState, Gateway};

use crate::conn::{Gate, Refusal};
use crate::tls::Tls;

const BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Default)]
struct Hist {
    counts: [u64; 15],
    sum: f64,
}

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<HashMap<(String, String, u16), u64>>,
    latency: Mutex<HashMap<String, Hist>>,
}

impl Metrics {
    pub fn observe(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        {
            let mut r = self.requests.lock().unwrap_or_else(|p| p.into_inner());
            *r.entry((method.to_string(), route.to_string(), status)).or_default() += 1;
        }
        let mut l = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        let h = l.entry(route.to_string()).or_default();
        let i = BUCKETS.iter().position(|b| secs <= *b).unwrap_or(BUCKETS.len());
        h.counts[i] += 1;
        h.sum += secs;
    }

    /// The text of `/metrics`; `depths` are the engine's queue depths, read beforehand.
    pub fn render(
        &self,
        engine: &Engine,
        depths: &[(String, String, usize, i64)],
        gateway: Option<&Gateway>,
        tls: Option<&Tls>,
        connections: &Gate,
    ) -> String {
        let mut out = String::new();
        render_connections(&mut out, connections);
        if let Some(gateway) = gateway {
            render_gateway(&mut out, engine, gateway);
        }
        if let Some(tls) = tls {
            render_tls(&mut out, tls);
        }
        let c = engine.counters();
        let counters = [
            ("sluice_executions_started_total", "Executions started.", &c.executions_started),
            ("sluice_executions_completed_total", "Executions completed successfully.", &c.executions_completed),
            ("sluice_executions_failed_total", "Executions failed or cancelled.", &c.executions_failed),
            ("sluice_tasks_completed_total", "Task attempts completed.", &c.tasks_completed),
            ("sluice_tasks_failed_total", "Task attempts failed or timed out.", &c.tasks_failed),
            ("sluice_commits_failed_total", "Store commits that failed.", &c.commits_failed),
            (
                "sluice_runs_reconciled_total",
                "Runs whose commit had an unknown outcome (the connection dropped) and whose tasks and timers were then read back from the store.",
                &c.runs_reconciled,
            ),
            (
                "sluice_executions_taken_over_total",
                "Running executions this node took over (at its start, or from a node whose lease expired).",
                &c.runs_taken_over,
            ),
            (
                "sluice_task_answers_posted_total",
                "Workers' answers this node took for tasks not in its memory (another node's), posted for the owner.",
                &c.outcomes_posted,
            ),
            (
                "sluice_task_answers_applied_total",
                "Posted workers' answers this node recorded for the executions it owns.",
                &c.outcomes_applied,
            ),
            (
                "sluice_run_changes_posted_total",
                "Signals, cancels and redrives this node took for executions another node owns, posted for the owner.",
                &c.changes_posted,
            ),
            (
                "sluice_run_changes_applied_total",
                "Signals, cancels and redrives other nodes posted that this node applied.",
                &c.changes_applied,
            ),
            (
                "sluice_steps_quarantined_total",
                "Steps failed with engine.quarantined: evaluating them stopped the server too often.",
                &c.steps_quarantined,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Ordering::Relaxed));
        }
        let _ = writeln!(
            out,
            "# HELP sluice_node_epoch This node's fencing epoch.\n# TYPE sluice_node_epoch gauge\nsluice_node_epoch {}\n\
             # HELP sluice_node_lease_lost Whether this node lost its lease (it stops).\n# TYPE sluice_node_lease_lost gauge\n\
             sluice_node_lease_lost {}",
            engine.epoch(),
            u8::from(engine.has_lost_lease())
        );
        let _ = writeln!(
            out,
            "# HELP sluice_queue_depth Tasks ready and waiting for a worker.\n# TYPE sluice_queue_depth gauge"
        );
        for (tenant, queue, n, _) in depths {
            let _ = writeln!(out, "sluice_queue_depth{{tenant=\"{}\",queue=\"{}\"}} {n}", esc(tenant), esc(queue));
        }
        let _ = writeln!(out, "# HELP sluice_queue_oldest_task_age_seconds Age of the oldest ready task.\n# TYPE sluice_queue_oldest_task_age_seconds gauge");
        for (tenant, queue, _, age) in depths {
            let _ = writeln!(
                out,
                "sluice_queue_oldest_task_age_seconds{{tenant=\"{}\",queue=\"{}\"}} {}",
                esc(tenant),
                esc(queue),
                *age as f64 / 1000.0
            );
        }
        let _ = writeln!(
            out,
            "# HELP sluice_task_queues Task queues held in this node's memory (idle ones are freed).\n\
             # TYPE sluice_task_queues gauge\nsluice_task_queues {}",
            engine.queue_count()
        );
        let _ = writeln!(
            out,
            "# HELP sluice_timers Durable timers armed.\n# TYPE sluice_timers gauge\nsluice_timers {}",
            engine.timer_count()
        );
        let _ = writeln!(
            out,
            "# HELP sluice_cached_executions Running executions whose state is in memory.\n# TYPE sluice_cached_executions gauge\nsluice_cached_executions {}\n\
             # HELP sluice_cached_execution_bytes Bytes of execution state in memory, as counted against --cache-size.\n# TYPE sluice_cached_execution_bytes gauge\nsluice_cached_execution_bytes {}",
            engine.cached_executions(),
            engine.cached_bytes()
        );
        let _ = writeln!(out, "# HELP sluice_http_requests_total HTTP requests by route and status.\n# TYPE sluice_http_requests_total counter");
        {
            let r = self.requests.lock().unwrap_or_else(|p| p.into_inner());
            let mut rows: Vec<_> = r.iter().collect();
            rows.sort();
            for ((method, route, status), n) in rows {
                let _ = writeln!(
                    out,
                    "sluice_http_requests_total{{method=\"{method}\",route=\"{}\",status=\"{status}\"}} {n}",
                    esc(route)
                );
            }
        }
        let _ = writeln!(out, "# HELP sluice_http_request_duration_seconds HTTP request latency by route.\n# TYPE sluice_http_request_duration_seconds histogram");
        let l = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        let mut routes: Vec<_> = l.iter().collect();
        routes.sort_by(|a, b| a.0.cmp(b.0));
        for (route, h) in routes {
            let route = esc(route);
            let mut cum = 0;
            for (i, b) in BUCKETS.iter().enumerate() {
                cum += h.counts[i];
                let _ =
                    writeln!(out, "sluice_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{b}\"}} {cum}");
            }
            cum += h.counts[BUCKETS.len()];
            let _ = writeln!(out, "sluice_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {cum}");
            let _ = writeln!(out, "sluice_http_request_duration_seconds_sum{{route=\"{route}\"}} {}", h.sum);
            let _ = writeln!(out, "sluice_http_request_duration_seconds_count{{route=\"{route}\"}} {cum}");
        }
        out
    }
}

/// Circuit breaker states and attempt totals per route, target and outcome.
fn render_gateway(out: &mut String, engine: &Engine, gateway: &Gateway) {
    let _ = writeln!(
        out,
        "# HELP sluice_gateway_breaker_state Circuit breaker of a target: 0 closed, 1 open, 2 half-open.\n# TYPE sluice_gateway_breaker_state gauge"
    );
    for (route, target, state) in gateway.breaker_states() {
        let v = match state {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        };
        let _ =
            writeln!(out, "sluice_gateway_breaker_state{{route=\"{}\",target=\"{}\"}} {v}", esc(&route), esc(&target));
    }
    let stats = engine.call_stats();
    let series: [Series; 5] = [
        ("sluice_gateway_attempts_total", "Upstream attempts by outcome.", |s| s.attempts as f64),
        ("sluice_gateway_input_tokens_total", "Input tokens counted by upstreams.", |s| s.input_tokens as f64),
        ("sluice_gateway_output_tokens_total", "Output tokens counted by upstreams.", |s| s.output_tokens as f64),
        ("sluice_gateway_cost_usd_total", "Cost in USD from the price table.", |s| s.cost_usd),
        ("sluice_gateway_attempt_seconds_total", "Time spent in upstream attempts.", |s| s.latency_seconds),
    ];
    for (name, help, value) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for ((route, target, outcome), s) in &stats {
            let _ = writeln!(
                out,
                "{name}{{route=\"{}\",target=\"{}\",outcome=\"{}\"}} {}",
                esc(route),
                esc(target),
                esc(outcome),
                value(s)
            );
        }
    }
}

/// Connections open, accepted, refused at a cap, and closed by a timeout.
fn render_connections(out: &mut String, gate: &Gate) {
    let _ = writeln!(
        out,
        "# HELP sluice_connections_open HTTP connections open now.\n# TYPE sluice_connections_open gauge\n\
         sluice_connections_open {}\n\
         # HELP sluice_connections_max The cap on HTTP connections open at once.\n# TYPE sluice_connections_max gauge\n\
         sluice_connections_max {}\n\
         # HELP sluice_connections_accepted_total HTTP connections accepted.\n# TYPE sluice_connections_accepted_total counter\n\
         sluice_connections_accepted_total {}",
        gate.open(),
        gate.max_connections(),
        gate.accepted()
    );
    let _ = writeln!(
        out,
        "# HELP sluice_connections_refused_total HTTP connections closed at once because a cap was reached.\n\
         # TYPE sluice_connections_refused_total counter\n\
         sluice_connections_refused_total{{cap=\"total\"}} {}\n\
         sluice_connections_refused_total{{cap=\"per_address\"}} {}",
        gate.refused(Refusal::Total),
        gate.refused(Refusal::PerAddress)
    );
    let (header, idle) = gate.timeouts();
    let _ = writeln!(
        out,
        "# HELP sluice_connections_timed_out_total HTTP connections closed because a request header did not \
         arrive in time, or because they stayed idle.\n# TYPE sluice_connections_timed_out_total counter\n\
         sluice_connections_timed_out_total{{timeout=\"header\"}} {header}\n\
         sluice_connections_timed_out_total{{timeout=\"idle\"}} {idle}"
    );
}

/// The served certificate's expiry, and how reloads and handshakes went.
fn render_tls(out: &mut String, tls: &Tls) {
    let _ = writeln!(
        out,
        "# HELP sluice_tls_certificate_expiry_timestamp_seconds When the served certificate expires (its notAfter), as Unix time.\n# TYPE sluice_tls_certificate_expiry_timestamp_seconds gauge\nsluice_tls_certificate_expiry_timestamp_seconds {}",
        tls.not_after_unix()
    );
    let counters = [
        (
            "sluice_tls_certificate_reloads_total",
            "Changes to the certificate files that took effect without a restart.",
            tls.reloads(),
        ),
        (
            "sluice_tls_certificate_reload_failures_total",
            "Changes to the certificate files that could not be used; the previous certificate stayed.",
            tls.reload_failures(),
        ),
        (
            "sluice_tls_handshake_failures_total",
            "TLS handshakes that failed or timed out, refused client certificates included.",
            tls.handshake_failures(),
        ),
    ];
    for (name, help, v) in counters {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
    }
}

/// A counter of gateway attempts: its name, its help and how to read it from the totals.
type Series = (&'static str, &'static str, fn(&CallStats) -> f64);

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
