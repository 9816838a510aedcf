//! The `sluice` command: run a server (`dev`, `serve`), a demo worker, and talk to a server
//! (`run`, `start`, `status`, `history`, `signal`, `cancel`, `dlq`, `workflows`, `bench`), and
//! evaluate gateway routes on a labelled dataset (`eval`).
//! Data goes to stdout (tables for people, `--json` for scripts); everything else to stderr.

mod bench;
mod bench_gateway;
mod client;
mod demo;
mod eval;
mod logs;
mod server;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use crate::client::Api;
use sluice_engine::{AllowEntry, EgressPolicy, EngineOptions};
use sluice_server::sluice_auth::{Quota, RateLimitConfig};
use sluice_server::sluice_gateway::Gateway;

// Many small, short-lived allocations per step (JSON, events): mimalloc handles them far better
// than the system allocator. Counted per thread, so that each expression evaluation has a
// memory account (`sluice_core::expr::EvalLimits`).
#[global_allocator]
static GLOBAL: sluice_core::expr::CountingAlloc<mimalloc::MiMalloc> =
    sluice_core::expr::CountingAlloc(mimalloc::MiMalloc);

#[derive(Parser)]
#[command(name = "sluice", version, about = "Durable workflows for AI pipelines, in one binary")]
struct Cli {
    /// Server to talk to.
    #[arg(long, global = true, env = "SLUICE_SERVER", default_value = "http://127.0.0.1:7233")]
    server: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// API key or session token sent to the server as `Authorization: Bearer ...`.
    #[arg(long, global = true, env = "SLUICE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Log format on stderr: text, or json (one object per line with `trace_id`; see
    /// docs/operations.md).
    #[arg(long, global = true, env = "SLUICE_LOG_FORMAT", default_value = "text")]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
pub struct ServeArgs {
    /// Port to listen on (127.0.0.1 unless --bind says otherwise).
    #[arg(long, default_value_t = 7233)]
    port: u16,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    bind: String,
    /// Where state lives: a SQLite file path, a PostgreSQL URL (`postgres://user@host/db`), or
    /// several PostgreSQL URLs separated by commas to shard executions by workflow id.
    #[arg(long, default_value = "sluice.db", env = "SLUICE_DATABASE")]
    database: String,
    /// AI gateway config (YAML or JSON): providers, routes, prices. Serves the OpenAI-compatible
    /// `/v1/chat/completions`; see docs/ai-gateway.md and examples/gateway.yaml.
    #[arg(long, value_name = "FILE", env = "SLUICE_GATEWAY")]
    gateway: Option<PathBuf>,
    /// Serve without authentication: every caller is the owner of the tenant `default`. For
    /// throwaway local servers only; logged loudly.
    #[arg(long, env = "SLUICE_INSECURE_NO_AUTH")]
    insecure_no_auth: bool,
    /// OIDC login config (YAML or JSON): issuer, client id and secret (from an environment
    /// variable or a file), redirect URL, tenant and role mapping. Serves
    /// `/v1/auth/oidc/login` and `/v1/auth/oidc/callback`; see docs/security.md.
    #[arg(long, value_name = "FILE", env = "SLUICE_OIDC")]
    oidc: Option<PathBuf>,
    /// Requests per API key, e.g. `1000/hour` (GCRA: the whole quota at once, then evenly).
    #[arg(long, value_name = "N/PERIOD", env = "SLUICE_RATE_LIMIT_PER_KEY", value_parser = parse_quota)]
    rate_limit_per_key: Option<Quota>,
    /// Requests per user of a session token, e.g. `100/hour`.
    #[arg(long, value_name = "N/PERIOD", env = "SLUICE_RATE_LIMIT_PER_USER", value_parser = parse_quota)]
    rate_limit_per_user: Option<Quota>,
    /// Requests per tenant, all its keys and users together.
    #[arg(long, value_name = "N/PERIOD", env = "SLUICE_RATE_LIMIT_PER_TENANT", value_parser = parse_quota)]
    rate_limit_per_tenant: Option<Quota>,
    /// Requests to this node from everyone, e.g. `10000/hour`.
    #[arg(long, value_name = "N/PERIOD", env = "SLUICE_RATE_LIMIT_GLOBAL", value_parser = parse_quota)]
    rate_limit_global: Option<Quota>,
    /// Most executions of one tenant running at once; a start beyond it answers 429 until one
    /// finishes. A workflow's own limit is its definition's `max_running`.
    #[arg(long, value_name = "N", env = "SLUICE_MAX_RUNNING_PER_TENANT", value_parser = clap::value_parser!(u32).range(1..))]
    max_running_per_tenant: Option<u32>,
    /// Task queues one tenant may have in use on this node at once; a poll naming a new queue
    /// past it answers 429 `too_many_queues`. Queues without tasks or pollers are freed after
    /// 10 s.
    #[arg(long, value_name = "N", default_value_t = 1_000, env = "SLUICE_MAX_QUEUES_PER_TENANT",
          value_parser = clap::value_parser!(u32).range(1..))]
    max_queues_per_tenant: u32,
    /// This node's name among the nodes sharing a database (default: BIND:PORT). A node started
    /// again under its old name takes its executions back at once; others wait for its lease
    /// to expire (10 s).
    #[arg(long, value_name = "NAME", env = "SLUICE_NODE_ID")]
    node_id: Option<String>,
    /// Let `http` steps reach this address, network (CIDR) or host name (`*.corp.example` for
    /// the names under a domain) beyond public addresses, which alone are allowed by default.
    /// Repeatable, or comma-separated in the variable; see docs/security.md, Egress policy.
    #[arg(long = "egress-allow", value_name = "CIDR_OR_HOST", env = "SLUICE_EGRESS_ALLOW", value_delimiter = ',',
          value_parser = parse_allow)]
    egress_allow: Vec<AllowEntry>,
    /// Egress config (YAML or JSON): `allow: [...]` for every tenant, and
    /// `tenants: {ID: {allow: [...]}}` for one tenant's `http` steps; adds to --egress-allow.
    #[arg(long, value_name = "FILE", env = "SLUICE_EGRESS_CONFIG")]
    egress_config: Option<PathBuf>,
    /// Largest response body an `http` step keeps; a larger one fails the step with
    /// `http.too_large`. Bytes, or with a unit: `512KiB`, `4MiB`.
    #[arg(long, value_name = "SIZE", default_value = "1MiB", env = "SLUICE_HTTP_MAX_BODY", value_parser = parse_size)]
    http_max_body: usize,
    /// Largest input an execution may start with (JSON bytes); a larger start answers 413.
    #[arg(long, value_name = "SIZE", default_value = "1MiB", env = "SLUICE_MAX_INPUT_SIZE", value_parser = parse_size)]
    max_input_size: usize,
    /// Largest payload of one signal (JSON bytes); a larger signal answers 413.
    #[arg(long, value_name = "SIZE", default_value = "256KiB", env = "SLUICE_MAX_SIGNAL_SIZE", value_parser = parse_size)]
    max_signal_size: usize,
    /// Largest output one step may record (JSON bytes); a larger one fails the step with
    /// `step.output_too_large`.
    #[arg(long, value_name = "SIZE", default_value = "1MiB", env = "SLUICE_MAX_OUTPUT_SIZE", value_parser = parse_size)]
    max_output_size: usize,
    /// Most bytes one run may hold (its input, outputs, buffered signals, map lists); past it a
    /// step fails with `execution.too_large` and a signal answers 413.
    #[arg(long, value_name = "SIZE", default_value = "64MiB", env = "SLUICE_MAX_RUN_SIZE", value_parser = parse_size)]
    max_run_size: usize,
    /// Most items a `map` step may iterate over; more fail the step with `map.too_many_items`.
    #[arg(long, value_name = "N", default_value_t = 10_000, env = "SLUICE_MAX_MAP_ITEMS")]
    max_map_items: usize,
    /// Bytes of run state the engine keeps in memory; past it the runs used least recently are
    /// dropped and reloaded from the database when needed.
    #[arg(long, value_name = "SIZE", default_value = "1GiB", env = "SLUICE_CACHE_SIZE", value_parser = parse_size)]
    cache_size: usize,
    /// Runs per second each tenant may start by `continue_as_new`, in bursts of up to ten
    /// seconds' worth; past it, the next run of a chain waits for its turn. 0: no limit.
    #[arg(long, value_name = "N", default_value_t = sluice_engine::DEFAULT_CONTINUE_RATE,
          env = "SLUICE_CONTINUE_AS_NEW_RATE")]
    continue_as_new_rate: u32,
    /// Most runs in one `continue_as_new` chain; the run after them fails with
    /// `engine.chain_too_long`. 0: no limit.
    #[arg(long, value_name = "N", default_value_t = sluice_engine::DEFAULT_MAX_CHAIN_LENGTH,
          env = "SLUICE_MAX_CHAIN_LENGTH")]
    max_chain_length: u64,
    /// Times evaluating one step may stop the server before that step fails with
    /// `engine.quarantined` instead of being tried again. 0: never.
    #[arg(long, value_name = "N", default_value_t = sluice_engine::DEFAULT_QUARANTINE_AFTER,
          env = "SLUICE_QUARANTINE_AFTER")]
    quarantine_after: u32,
    /// How long a client has to send a request's header, counted from the connection's start or
    /// from the first byte of a request that follows another; then the connection is closed.
    #[arg(long, value_name = "DURATION", default_value = "10s", env = "SLUICE_HEADER_READ_TIMEOUT",
          value_parser = parse_timeout)]
    header_read_timeout: std::time::Duration,
    /// How long a keep-alive connection may wait for its next request before it is closed.
    #[arg(long, value_name = "DURATION", default_value = "60s", env = "SLUICE_IDLE_TIMEOUT", value_parser = parse_timeout)]
    idle_timeout: std::time::Duration,
    /// HTTP connections open at once; past it a new connection is closed at once (logged, and
    /// counted in `sluice_connections_refused_total`). Lowered to what the open file limit
    /// (`ulimit -n`) allows.
    #[arg(long, value_name = "N", default_value_t = 10_000, env = "SLUICE_MAX_CONNECTIONS",
          value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// HTTP connections open at once from one client IP address; 0: no cap. Behind a proxy that
    /// connects from one address, raise it or set 0.
    #[arg(long, value_name = "N", default_value_t = 1_000, env = "SLUICE_MAX_CONNECTIONS_PER_ADDRESS")]
    max_connections_per_address: u32,
    /// Serve `/metrics` (with `/healthz` and `/readyz`) on this address, e.g. `127.0.0.1:9464`,
    /// over plain HTTP without authentication, for Prometheus; keep it off the public network.
    /// Without it, `/metrics` on the API's port needs an owner or admin credential and shows
    /// that tenant's queues only (`sluice dev` on a loopback address serves it to anyone).
    #[arg(long, value_name = "ADDR:PORT", env = "SLUICE_METRICS_ADDR")]
    metrics_addr: Option<String>,
    #[command(flatten)]
    secret: SecretArgs,
    #[command(flatten)]
    tls: TlsArgs,
}

/// The server key that seals the secrets kept in the database; see docs/security.md.
#[derive(Args, Clone, Default)]
pub struct SecretArgs {
    /// The server key's file (64 hex characters), made with mode 0600 when absent. Default: the
    /// SQLite database's path with `.key` appended; a PostgreSQL database needs this or
    /// SLUICE_SECRET_KEY (the key itself), the same on every node.
    #[arg(long, value_name = "FILE", env = "SLUICE_SECRET_KEY_FILE")]
    secret_key_file: Option<PathBuf>,
}

impl ServeArgs {
    /// The engine's options; `loopback` lets `http` steps reach this machine (`sluice dev`).
    fn engine_options(&self, gateway: Option<Arc<Gateway>>, loopback: bool) -> Result<EngineOptions> {
        let defaults = EngineOptions::default();
        let node = match (&self.node_id, self.port) {
            (Some(id), _) => id.clone(),
            // Port 0 picks a free port: the name of the default is unique instead.
            (None, 0) => sluice_engine::unique_node_name(),
            (None, port) => format!("{}:{port}", self.bind),
        };
        let mut egress = match &self.egress_config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read the egress config {}", path.display()))?;
                EgressPolicy::from_yaml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
            }
            None => EgressPolicy::default(),
        };
        for entry in self.egress_allow.iter().cloned() {
            egress.server.add(entry);
        }
        if loopback {
            AllowEntry::loopback().into_iter().for_each(|e| egress.server.add(e));
        }
        // Fault injection for the test suite only; documented in docs/operations.md.
        let lose_commit_acks = match std::env::var("SLUICE_FAULT_LOSE_COMMIT_ACKS") {
            Ok(v) => v.parse().context("SLUICE_FAULT_LOSE_COMMIT_ACKS: expected a whole number")?,
            Err(_) => 0,
        };
        if lose_commit_acks > 0 {
            tracing::warn!(every = lose_commit_acks, "fault injection: commit acknowledgements will be lost");
        }
        Ok(EngineOptions {
            gateway,
            tenant_max_running: self.max_running_per_tenant,
            node,
            http_max_body: self.http_max_body,
            egress,
            lose_commit_acks,
            run_limits: sluice_core::RunLimits {
                max_output_bytes: self.max_output_size,
                max_run_bytes: self.max_run_size,
                max_map_items: self.max_map_items,
            },
            max_input_bytes: self.max_input_size,
            max_signal_bytes: self.max_signal_size,
            cache_bytes: self.cache_size,
            continue_rate: self.continue_as_new_rate,
            max_chain_length: self.max_chain_length,
            quarantine_after: self.quarantine_after,
            max_queues_per_tenant: self.max_queues_per_tenant as usize,
            ..defaults
        })
    }

    fn connections(&self) -> sluice_server::conn::Limits {
        sluice_server::conn::Limits {
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            max_connections: self.max_connections as usize,
            max_per_address: self.max_connections_per_address as usize,
        }
    }

    fn limits(&self) -> RateLimitConfig {
        RateLimitConfig {
            per_key: self.rate_limit_per_key,
            per_user: self.rate_limit_per_user,
            per_tenant: self.rate_limit_per_tenant,
            global: self.rate_limit_global,
        }
    }
}

fn parse_quota(s: &str) -> Result<Quota, String> {
    Quota::parse(s)
}

fn parse_allow(s: &str) -> Result<AllowEntry, String> {
    s.parse()
}

/// `1048576`, `512KiB`, `4MiB`, `1GiB`.
/// A timeout: a duration such as `500ms`, `10s` or `2m`, more than zero.
fn parse_timeout(s: &str) -> Result<std::time::Duration, String> {
    match bench_gateway::parse_duration(s)? {
        d if d.is_zero() => Err("expected a duration of more than zero, such as 10s".into()),
        d => Ok(d),
    }
}

fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let unit: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => return Err(format!("unknown unit `{other}`: use bytes, KiB, MiB or GiB")),
    };
    let n: usize = digits.parse().map_err(|_| format!("`{s}` is not a size such as 1048576 or 4MiB"))?;
    match n.checked_mul(unit) {
        Some(0) | None => Err(format!("`{s}` is not a size between 1 byte and the memory of this machine")),
        Some(bytes) => Ok(bytes),
    }
}

/// HTTPS and mutual TLS; see docs/operations.md.
#[derive(Args, Clone)]
pub struct TlsArgs {
    /// Serve HTTPS with this certificate chain (PEM, leaf first); reloaded when the file changes.
    #[arg(long, value_name = "FILE", env = "SLUICE_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE", env = "SLUICE_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// CA certificates (PEM) that sign client certificates: turns on mutual TLS.
    #[arg(long, value_name = "FILE", env = "SLUICE_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
    /// Client certificates: none, optional or required (the default with --tls-client-ca).
    #[arg(long, value_name = "MODE", env = "SLUICE_TLS_CLIENT_AUTH")]
    tls_client_auth: Option<sluice_server::tls::ClientAuth>,
    /// How often the TLS files are checked for changes (`0s`: never).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = bench_gateway::parse_duration,
          env = "SLUICE_TLS_RELOAD_INTERVAL")]
    tls_reload_interval: std::time::Duration,
}

#[derive(Subcommand)]
enum Command {
    /// Server + embedded SQLite + the examples published + a demo worker, for trying Sluice.
    Dev {
        #[command(flatten)]
        serve: ServeArgs,
        /// Folder of example workflows to publish at start.
        #[arg(long, default_value = "examples")]
        examples: PathBuf,
        /// Do not run the built-in demo worker.
        #[arg(long)]
        no_worker: bool,
    },
    /// Run the server.
    Serve {
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Run the built-in demo worker (queues greet, enrich, flaky, echo, noop).
    Worker {
        /// Queues to serve; all demo queues by default.
        #[arg(long = "queue")]
        queues: Vec<String>,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Append a JSON line per task received and per result acknowledged to this file.
        #[arg(long)]
        record: Option<PathBuf>,
    },
    /// Publish a workflow file, start it, wait for the result and print it.
    Run {
        file: PathBuf,
        #[arg(long, default_value = "null")]
        input: String,
        #[arg(long)]
        workflow_id: Option<String>,
        /// Seconds to wait for the result.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Start an execution of a published workflow.
    Start {
        workflow: String,
        /// The version to run (as `workflows` lists it); the latest when not given.
        #[arg(long = "version", value_name = "VERSION")]
        version: Option<String>,
        #[arg(long, default_value = "null")]
        input: String,
        #[arg(long)]
        workflow_id: Option<String>,
    },
    /// Show an execution.
    Status { workflow_id: String },
    /// Show an execution's event history.
    History { workflow_id: String },
    /// Re-run the deterministic core over a stored history: prove this build makes the same
    /// decisions, and show the state after every event (time travel).
    Replay {
        workflow_id: String,
        #[arg(long)]
        run_id: Option<String>,
    },
    /// Send a signal (pause, resume, cancel or a custom name) with an optional JSON payload.
    Signal {
        workflow_id: String,
        name: String,
        #[arg(long)]
        payload: Option<String>,
    },
    /// Cancel an execution.
    Cancel {
        workflow_id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// The dead-letter queue.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// List or publish workflows.
    Workflows {
        #[command(subcommand)]
        action: Option<WorkflowsAction>,
    },
    /// Load generator: executions/s, steps/s and start-to-result latency percentiles;
    /// `bench gateway`: the latency the AI gateway adds over a loopback upstream.
    Bench(bench::BenchArgs),
    /// Administration straight on the database (no server needed): tenants and their first keys.
    Admin {
        #[command(subcommand)]
        action: AdminAction,
    },
    /// Run a labelled JSONL dataset through a gateway route: accuracy, precision, recall and F1,
    /// cost and latency per target; `--compare` another route with a confidence interval.
    Eval(eval::EvalArgs),
}

#[derive(Subcommand)]
enum AdminAction {
    /// Create a tenant (if absent) and a new owner API key for it, printed once on stdout. With
    /// `--email`, also an owner user whose password is read from SLUICE_ADMIN_PASSWORD.
    Init {
        #[arg(long, default_value = "sluice.db", env = "SLUICE_DATABASE")]
        database: String,
        #[arg(long, default_value = "default")]
        tenant: String,
        /// Name of the key.
        #[arg(long, default_value = "admin")]
        key_name: String,
        /// Also create an owner user with this email.
        #[arg(long)]
        email: Option<String>,
        /// Write the key to this file (created with mode 0600) instead of stdout.
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// Make an API key of a tenant, optionally bound to a client certificate (an operator's
    /// binding: over the API, only a connection that presents the certificate may bind it).
    /// Prints the key once on stdout.
    Key {
        #[arg(long, default_value = "sluice.db", env = "SLUICE_DATABASE")]
        database: String,
        #[arg(long, default_value = "default")]
        tenant: String,
        /// Name of the key.
        #[arg(long)]
        name: String,
        /// owner, admin, editor, viewer or worker.
        #[arg(long, default_value = "worker")]
        role: String,
        /// Bind the key to this client certificate (SHA-256 of its DER, hex; colons allowed).
        #[arg(long, value_name = "HEX")]
        client_cert_sha256: Option<String>,
        /// Write the key to this file (created with mode 0600) instead of stdout.
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// List the tenants.
    Tenants {
        #[arg(long, default_value = "sluice.db", env = "SLUICE_DATABASE")]
        database: String,
    },
}

#[derive(Subcommand)]
enum DlqAction {
    /// Executions parked in the dead-letter queue.
    List,
    /// Retry a dead-lettered execution from its failed step.
    Redrive { workflow_id: String },
}

#[derive(Subcommand)]
enum WorkflowsAction {
    List,
    /// Publish a workflow file (YAML or JSON).
    Publish {
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Dev { .. } | Command::Serve { .. } => "info",
        // `eval` and `bench` count their failed calls themselves; a warning per attempt would
        // bury the report.
        Command::Eval(_) | Command::Bench(_) => "error",
        _ => "warn",
    };
    let process_trace = logs::init(&cli.log_format, default_level);
    if let Command::Dev { serve, .. } | Command::Serve { serve } = &cli.command {
        if let Err(e) = server::tls_options(&serve.tls) {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            failed(&format!("cannot start the runtime: {e}"));
            return ExitCode::from(1);
        }
    };
    match rt.block_on(dispatch(cli, process_trace)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            failed(&format!("{e:#}"));
            ExitCode::from(1)
        }
    }
}

/// Reports the error that ends the command: a JSON log line when logs are JSON, so that every
/// line of a JSON log parses.
fn failed(message: &str) {
    if logs::is_json() {
        tracing::error!("{message}");
    } else {
        eprintln!("error: {message}");
    }
}

fn parse_json_arg(what: &str, text: &str) -> Result<Value> {
    serde_json::from_str(text)
        .with_context(|| format!("{what} is not valid JSON (example: --{what} '{{\"name\": \"Ada\"}}')"))
}

/// Writes data to stdout; a closed pipe ends quietly.
pub fn out(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if writeln!(stdout, "{text}").is_err() {
        std::process::exit(0);
    }
}

async fn dispatch(cli: Cli, process_trace: sluice_engine::TraceId) -> Result<()> {
    let api = Api::new(&cli.server, cli.api_key.as_deref());
    let json = cli.json;
    match cli.command {
        Command::Dev { serve, examples, no_worker } => server::dev(serve, examples, !no_worker, process_trace).await,
        Command::Serve { serve } => server::serve(serve, process_trace).await,
        Command::Admin { action: AdminAction::Init { database, tenant, key_name, email, key_file, secret } } => {
            let init = server::AdminInit {
                tenant: &tenant,
                key_name: &key_name,
                email: email.as_deref(),
                key_file: key_file.as_deref(),
            };
            server::admin_init(&database, &secret, init).await
        }
        Command::Admin {
            action: AdminAction::Key { database, tenant, name, role, client_cert_sha256, key_file, secret },
        } => {
            let key = server::AdminKey {
                tenant: &tenant,
                name: &name,
                role: &role,
                client_cert_sha256,
                key_file: key_file.as_deref(),
            };
            server::admin_key(&database, &secret, key).await
        }
        Command::Admin { action: AdminAction::Tenants { database } } => {
            for t in server::tenants(&database).await? {
                out(&t);
            }
            Ok(())
        }
        Command::Worker { queues, concurrency, record } => {
            demo::run_worker(&cli.server, cli.api_key.as_deref(), queues, concurrency, record, std::future::pending())
                .await
        }
        Command::Run { file, input, workflow_id, timeout } => {
            let input = parse_json_arg("input", &input)?;
            let published = api.publish_file(&file).await?;
            let name = published["name"].as_str().unwrap_or_default().to_string();
            let version = published["version"].as_str().unwrap_or_default().to_string();
            eprintln!("published {name} version {version}");
            // Exactly the version just published, whatever else was published meanwhile.
            let started = api.start(&name, Some(&version), input, workflow_id.as_deref()).await?;
            eprintln!("running version {}", started["version"].as_str().unwrap_or(&version));
            let wid = started["workflow_id"].as_str().unwrap_or_default().to_string();
            eprintln!("started {wid}, waiting for the result");
            let row = api.wait(&wid, std::time::Duration::from_secs(timeout)).await?;
            print_result(&row, json)
        }
        Command::Start { workflow, version, input, workflow_id } => {
            let input = parse_json_arg("input", &input)?;
            let started = api.start(&workflow, version.as_deref(), input, workflow_id.as_deref()).await?;
            if json {
                out(&started.to_string());
            } else {
                out(&format!(
                    "{}\t{}",
                    started["workflow_id"].as_str().unwrap_or(""),
                    started["run_id"].as_str().unwrap_or("")
                ));
            }
            Ok(())
        }
        Command::Status { workflow_id } => {
            let row = api.get(&format!("/v1/executions/{workflow_id}")).await?;
            if json {
                out(&row.to_string());
            } else {
                out(&client::describe(&row));
            }
            Ok(())
        }
        Command::History { workflow_id } => {
            // Every page: the server answers a page at a time.
            let mut h = api.get(&format!("/v1/executions/{workflow_id}/history?limit=1000")).await?;
            let run = h["run_id"].as_str().unwrap_or_default().to_string();
            while let Some(after) = h["next_after"].as_u64() {
                let page = api
                    .get(&format!("/v1/executions/{workflow_id}/history?run_id={run}&after={after}&limit=1000"))
                    .await?;
                let more = page["events"].as_array().cloned().unwrap_or_default();
                if let Some(events) = h["events"].as_array_mut() {
                    events.extend(more);
                }
                h["next_after"] = page["next_after"].clone();
            }
            if json {
                out(&h.to_string());
            } else {
                for e in h["events"].as_array().into_iter().flatten() {
                    let mut rest = e.clone();
                    if let Some(o) = rest.as_object_mut() {
                        o.remove("seq");
                        o.remove("at_ms");
                        o.remove("type");
                    }
                    out(&format!("{:>4}  {:<28} {}", e["seq"], e["type"].as_str().unwrap_or(""), rest));
                }
            }
            Ok(())
        }
        Command::Replay { workflow_id, run_id } => replay(&api, &workflow_id, run_id.as_deref(), json).await,
        Command::Signal { workflow_id, name, payload } => {
            let payload = match payload {
                Some(p) => parse_json_arg("payload", &p)?,
                None => Value::Null,
            };
            api.post(&format!("/v1/executions/{workflow_id}/signals/{name}"), &payload).await?;
            eprintln!("signal {name} delivered to {workflow_id}");
            Ok(())
        }
        Command::Cancel { workflow_id, reason } => {
            api.post(&format!("/v1/executions/{workflow_id}/cancel"), &serde_json::json!({"reason": reason})).await?;
            eprintln!("cancelled {workflow_id}");
            Ok(())
        }
        Command::Dlq { action: DlqAction::List } => {
            let page = api.get("/v1/dlq?limit=500").await?;
            print_executions(&page, json);
            Ok(())
        }
        Command::Dlq { action: DlqAction::Redrive { workflow_id } } => {
            let r = api.post(&format!("/v1/dlq/{workflow_id}/redrive"), &Value::Null).await?;
            if json {
                out(&r.to_string());
            }
            eprintln!("redriven {workflow_id}");
            Ok(())
        }
        Command::Workflows { action } => match action {
            None | Some(WorkflowsAction::List) => {
                let list = api.get("/v1/workflows").await?;
                if json {
                    out(&list.to_string());
                } else {
                    out(&format!("{:<32} {:<14} {:>8}", "NAME", "LATEST", "VERSIONS"));
                    for w in list["workflows"].as_array().into_iter().flatten() {
                        out(&format!(
                            "{:<32} {:<14} {:>8}",
                            w["name"].as_str().unwrap_or(""),
                            w["latest_version"].as_str().unwrap_or(""),
                            w["versions"]
                        ));
                    }
                }
                Ok(())
            }
            Some(WorkflowsAction::Publish { file }) => {
                let p = api.publish_file(&file).await?;
                if json {
                    out(&p.to_string());
                } else {
                    out(&format!("{}\t{}", p["name"].as_str().unwrap_or(""), p["version"].as_str().unwrap_or("")));
                }
                Ok(())
            }
        },
        Command::Bench(args) => bench::run(args, &cli.server, cli.api_key.as_deref(), json).await,
        Command::Eval(args) => eval::run(args, json).await,
    }
}

async fn replay(api: &Api, workflow_id: &str, run_id: Option<&str>, json: bool) -> Result<()> {
    let q = run_id.map(|r| format!("?run_id={r}")).unwrap_or_default();
    let row = api.get(&format!("/v1/executions/{workflow_id}{q}")).await?;
    let (name, version, run) = (
        row["workflow"].as_str().unwrap_or_default(),
        row["version"].as_str().unwrap_or_default(),
        row["run_id"].as_str().unwrap_or_default(),
    );
    let wf = api.get(&format!("/v1/workflows/{name}/versions/{version}")).await?;
    let def = sluice_core::def::parse_value(&wf["definition"])
        .map_err(|e| anyhow::anyhow!("the stored definition no longer validates: {e:?}"))?;
    let mut events: Vec<sluice_core::Event> = Vec::new();
    loop {
        let page = api
            .get(&format!("/v1/executions/{workflow_id}/history?run_id={run}&after={}&limit=1000", events.len()))
            .await?;
        let batch: Vec<sluice_core::Event> =
            serde_json::from_value(page["events"].clone()).context("history does not parse")?;
        if batch.is_empty() {
            break;
        }
        events.extend(batch);
    }
    // Under the limits of the engine's evaluation threads (with the default memory), so that an
    // expression that tripped a limit there trips it here too.
    let limits = sluice_core::expr::EvalLimits::engine(sluice_core::expr::DEFAULT_EVAL_MEMORY);
    let verdict = sluice_core::expr::run_on_eval_thread(limits, || sluice_core::replay::check(&def, &events))
        .context("cannot start a thread to replay on")?;
    let states = sluice_core::replay::states(&events);
    if json {
        let timeline: Vec<Value> = events
            .iter()
            .zip(&states)
            .map(|(e, st)| {
                serde_json::json!({"event": e, "status": st.status.as_str(), "paused": st.paused,
                    "state": sluice_core::expr::from_val(&st.query_context())})
            })
            .collect();
        out(&serde_json::json!({"run_id": run, "matches": verdict.is_ok(),
            "divergence": verdict.as_ref().err().map(|d| d.to_string()), "timeline": timeline})
        .to_string());
    } else {
        for (e, st) in events.iter().zip(&states) {
            let done =
                st.steps.values().filter(|s| matches!(s.status, sluice_core::state::StepStatus::Completed)).count();
            out(&format!("{:>4}  {:<28} status {:<10} steps done {done}", e.seq, e.kind.name(), st.status.as_str()));
        }
    }
    match verdict {
        Ok(()) => {
            eprintln!("replay of {} events matches: this build makes the same decisions", events.len());
            Ok(())
        }
        Err(d) => bail!("replay diverged: {d}"),
    }
}

fn print_result(row: &Value, json: bool) -> Result<()> {
    if json {
        out(&row.to_string());
    } else if row["status"] == "completed" {
        out(&serde_json::to_string_pretty(&row["output"]).unwrap_or_default());
    } else {
        out(&client::describe(row));
    }
    match row["status"].as_str() {
        Some("completed") => Ok(()),
        Some("running") => bail!(
            "the execution is still running; check it with `sluice status {}`",
            row["workflow_id"].as_str().unwrap_or("")
        ),
        Some(other) => bail!("the execution ended {other}: {}", row["error"]["message"].as_str().unwrap_or("")),
        None => bail!("unexpected answer from the server"),
    }
}

fn print_executions(page: &Value, json: bool) {
    if json {
        out(&page.to_string());
        return;
    }
    out(&format!("{:<40} {:<20} {:<10} {}", "WORKFLOW ID", "WORKFLOW", "STATUS", "ERROR"));
    for e in page["executions"].as_array().into_iter().flatten() {
        out(&format!(
            "{:<40} {:<20} {:<10} {}",
            e["workflow_id"].as_str().unwrap_or(""),
            e["workflow"].as_str().unwrap_or(""),
            e["status"].as_str().unwrap_or(""),
            e["error"]["message"].as_str().unwrap_or("")
        ));
    }
}
