//! The same engine on PostgreSQL: the server runs with `--database postgres://...` on a database
//! of its own (created here with psql; `scripts/ensure-postgres` makes sure a server answers).

use serde_json::{json, Value};

use super::backend::PgDatabase;
use super::*;

#[tokio::test]
async fn workflows_run_and_survive_a_restart_on_postgres() {
    let db = PgDatabase::create("restart");
    let dir = TempDir::new("pg");
    let mut server = ServerProcess::start_on(&bin(), dir.path(), &db.url()).await;
    let _worker = WorkerProcess::rust(&bin(), &server, &[], None);
    let api = server.api();
    api.publish_file(&repo().join("examples/hello.yaml")).await;
    api.publish_file(&repo().join("examples/fan-out.yaml")).await;
    api.publish(&json!({"name": "patient", "steps": [
        {"id": "nap", "type": "sleep", "duration": "500ms"},
        {"id": "gate", "type": "wait_signal", "signal": "go"},
        {"id": "done", "type": "transform", "expr": "{got: .steps.gate}"}
    ]}))
    .await;
    let hello = api.start("hello", json!({"name": "Ada"}), None).await;
    assert_eq!(api.wait(&hello, 20).await["output"], json!({"message": "Hello, Ada", "length": 10}));
    let fan = api.start("fan-out", json!({"items": ["a", "b", "c", "d", "e"]}), None).await;
    assert_eq!(api.wait(&fan, 20).await["output"]["count"], 5);

    let id = api.start("patient", Value::Null, Some("pg-patient")).await;
    server.restart().await;
    let api = server.api();
    api.wait_until(&id, 20, |r| r["history_length"].as_u64().unwrap_or(0) >= 4).await;
    assert_eq!(api.post(&format!("/v1/executions/{id}/signals/go"), &json!(7)).await.0, 202);
    assert_eq!(api.wait(&id, 20).await["output"], json!({"got": 7}));
    assert!(assert_replays(&api).await >= 3);
}

/// A PostgreSQL cluster of this test's own (so stopping it disturbs nothing else), dropped on drop.
struct PrivateCluster {
    version: String,
    name: String,
    port: u16,
}

impl PrivateCluster {
    fn create() -> Self {
        let version = std::fs::read_dir("/etc/postgresql")
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().to_string())
            .expect("PostgreSQL is installed (scripts/ensure-postgres)");
        let port = sluice_testkit::free_port();
        let name = format!("sluice_outage_{}", std::process::id());
        let c = Self { version, name, port };
        c.run("pg_createcluster", &[&c.version, &c.name, "-p", &port.to_string(), "--start", "--", "--auth=trust"]);
        c
    }

    fn run(&self, cmd: &str, args: &[&str]) {
        let out = std::process::Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
        assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn stop(&self) {
        self.run("pg_ctlcluster", &[&self.version, &self.name, "stop", "-m", "fast"]);
    }

    fn start(&self) {
        self.run("pg_ctlcluster", &[&self.version, &self.name, "start"]);
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new("pg_dropcluster").args(["--stop", &self.version, &self.name]).output();
    }
}

/// PostgreSQL goes away under a running server: writes answer 503 with Retry-After, reads of what
/// is cached still work, and once it is back the server reconnects by itself and nothing that was
/// accepted is lost.
#[tokio::test]
async fn a_postgres_outage_gives_503_and_loses_nothing() {
    let cluster = PrivateCluster::create();
    let dir = TempDir::new("pg-outage");
    let server = ServerProcess::start_on(&bin(), dir.path(), &cluster.url()).await;
    let api = server.api();
    api.publish(&json!({"name": "gated", "steps": [
        {"id": "gate", "type": "wait_signal", "signal": "go"},
        {"id": "done", "type": "transform", "expr": "{n: .input.n, got: .steps.gate}"}
    ]}))
    .await;
    for n in 0..20 {
        api.start("gated", json!({"n": n}), Some(&format!("gated-{n}"))).await;
    }

    cluster.stop();
    let fresh = Api::with_key(&server.base, server.key.as_deref());
    let (status, body) = fresh.post("/v1/executions", &json!({"workflow": "gated", "workflow_id": "during"})).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "storage_unavailable");
    let r =
        fresh.request(reqwest::Method::POST, "/v1/executions/gated-0/signals/go").json(&json!(0)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert!(r.headers().get("retry-after").is_some(), "503 carries Retry-After");
    assert_eq!(fresh.get("/readyz").await.0, 503, "not ready while the database is down");
    assert_eq!(fresh.get("/healthz").await.0, 200, "but alive");

    cluster.start();
    // The server reconnects by itself: keep signalling until accepted.
    for n in 0..20 {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let (status, body) = fresh.post(&format!("/v1/executions/gated-{n}/signals/go"), &json!(n * 10)).await;
            if status == 202 {
                break;
            }
            assert!(status == 503 && std::time::Instant::now() < deadline, "signal {n}: {status} {body}");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    for n in 0..20 {
        let row = fresh.wait(&format!("gated-{n}"), 20).await;
        assert_eq!(row["output"], json!({"n": n, "got": n * 10}), "gated-{n}");
    }
    assert!(assert_replays(&fresh).await >= 20);
}

/// Runs in one shard's database, read with `psql`. Under a loaded test run the server may be
/// out of connection slots for a moment: retried, and never read as zero.
fn count_runs(db: &PgDatabase) -> usize {
    let mut last = String::new();
    for _ in 0..50 {
        let out = std::process::Command::new("psql")
            .args([&db.url(), "-tA", "-c", "SELECT count(*) FROM executions"])
            .output()
            .unwrap();
        if let (true, Ok(n)) = (out.status.success(), String::from_utf8_lossy(&out.stdout).trim().parse()) {
            return n;
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("psql could not count the runs: {last}");
}

/// Two shards: executions land on both, and lookups, lists, signals and children work across
/// them.
#[tokio::test]
async fn two_shards_hold_executions_and_every_api_spans_them() {
    let (a, b) = (PgDatabase::create("shard_a"), PgDatabase::create("shard_b"));
    let dir = TempDir::new("pg-shards");
    let server = ServerProcess::start_on(&bin(), dir.path(), &format!("{},{}", a.url(), b.url())).await;
    let api = server.api();
    api.publish(&json!({"name": "kid", "steps": [{"id": "twice", "type": "transform", "expr": ".input * 2"}]})).await;
    api.publish(&json!({"name": "gated", "steps": [
        {"id": "gate", "type": "wait_signal", "signal": "go"},
        {"id": "child", "type": "child", "workflow": "kid", "input": ".steps.gate"}
    ]}))
    .await;
    for n in 0..30 {
        api.start("gated", json!(null), Some(&format!("order-{n}"))).await;
    }
    let (on_a, on_b) = (count_runs(&a), count_runs(&b));
    assert_eq!(on_a + on_b, 30);
    assert!(on_a > 0 && on_b > 0, "both shards hold executions ({on_a}, {on_b})");
    let listed = sluice_testkit::all_executions(&api).await;
    assert_eq!(listed.len(), 30, "a list spans the shards");
    for n in 0..30 {
        assert_eq!(api.post(&format!("/v1/executions/order-{n}/signals/go"), &json!(n)).await.0, 202);
    }
    for n in 0..30 {
        let row = api.wait(&format!("order-{n}"), 20).await;
        assert_eq!(row["output"], json!(n * 2), "order-{n}");
        let (status, child) = api.get(&format!("/v1/executions/order-{n}.child")).await;
        assert_eq!((status, &child["output"]), (200, &json!(n * 2)));
    }
    assert_eq!(count_runs(&a) + count_runs(&b), 60, "children live beside their parents");

    // Small pages over both shards: every run once, newest first, none skipped at a page edge.
    let (mut seen, mut cursor) = (Vec::new(), None::<String>);
    loop {
        let q = cursor.as_ref().map(|c| format!("&cursor={c}")).unwrap_or_default();
        let (status, page) = api.get(&format!("/v1/executions?limit=7{q}")).await;
        assert_eq!(status, 200, "{page}");
        let items = page["executions"].as_array().unwrap();
        assert!(items.len() <= 7);
        seen.extend(items.iter().map(|e| e["run_id"].as_str().unwrap().to_string()));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let mut sorted = seen.clone();
    sorted.sort_by(|x, y| y.cmp(x));
    sorted.dedup();
    assert_eq!(seen, sorted, "pages are in order with no run twice");
    assert_eq!(seen.len(), 60);

    // The dead-letter queue spans the shards: runs with no worker fail into it on both, are
    // listed page by page, and redrive where they live once a worker is there.
    api.publish(&json!({"name": "unserved", "steps": [
        {"id": "work", "type": "task", "queue": "echo", "input": "{n: .input}",
         "timeouts": {"schedule_to_start": "1s"}, "retry": {"max_attempts": 1}}
    ]}))
    .await;
    let dead: Vec<String> = (0..12).map(|n| format!("dead-{n}")).collect();
    for (n, id) in dead.iter().enumerate() {
        api.start("unserved", json!(n), Some(id)).await;
    }
    for id in &dead {
        let row = api.wait(id, 20).await;
        assert_eq!((row["status"].as_str(), row["dead_letter"].as_bool()), (Some("failed"), Some(true)), "{row}");
    }
    assert_eq!(count_runs(&a) + count_runs(&b), 72);
    let (mut in_dlq, mut cursor) = (Vec::new(), None::<String>);
    loop {
        let q = cursor.as_ref().map(|c| format!("&cursor={c}")).unwrap_or_default();
        let (status, page) = api.get(&format!("/v1/dlq?limit=5{q}")).await;
        assert_eq!(status, 200, "{page}");
        in_dlq.extend(
            page["executions"].as_array().unwrap().iter().map(|e| e["workflow_id"].as_str().unwrap().to_string()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    in_dlq.sort();
    let mut expected = dead.clone();
    expected.sort();
    assert_eq!(in_dlq, expected, "the dead-letter queue lists every shard's runs once");
    let _worker = WorkerProcess::rust(&bin(), &server, &["echo"], None);
    for id in &dead {
        let (status, body) = api.post(&format!("/v1/dlq/{id}/redrive"), &Value::Null).await;
        assert_eq!(status, 202, "{id}: {body}");
    }
    for (n, id) in dead.iter().enumerate() {
        let row = api.wait(id, 20).await;
        assert_eq!((row["status"].as_str(), &row["output"]), (Some("completed"), &json!({"n": n})), "{row}");
    }
    let (_, page) = api.get("/v1/dlq").await;
    assert_eq!(page["executions"], json!([]), "{page}");
    assert_eq!(assert_replays(&api).await, 72);
}

/// Two nodes on one PostgreSQL: each owns the executions it starts, under a lease with a fencing
/// epoch. While the owner lives, the other node cannot append to them (it posts signals and
/// cancels for the owner instead); when the owner is
/// SIGKILLed, the other takes them over once the lease expires and finishes them: timers fire,
/// tasks reach its workers, signals land, and every history stays one unbroken sequence.
#[tokio::test]
async fn a_killed_nodes_executions_are_taken_over_when_its_lease_expires() {
    let db = PgDatabase::create("takeover");
    let (dir_a, dir_b) = (TempDir::new("pg-node-a"), TempDir::new("pg-node-b"));
    let mut a = ServerProcess::start_on(&bin(), dir_a.path(), &db.url()).await;
    let b = ServerProcess::start_on(&bin(), dir_b.path(), &db.url()).await;
    let (api_a, api_b) = (a.api(), b.api());
    api_a.publish_file(&repo().join("examples/hello.yaml")).await;
    api_a
        .publish(&json!({"name": "napper", "steps": [
            {"id": "nap", "type": "sleep", "duration": "2s"},
            {"id": "done", "type": "transform", "expr": "{slept: true}"}
        ]}))
        .await;
    api_a
        .publish(&json!({"name": "gated", "steps": [
            {"id": "gate", "type": "wait_signal", "signal": "go"},
            {"id": "done", "type": "transform", "expr": "{got: .steps.gate}"}
        ]}))
        .await;

    // Node A starts everything; no worker listens to A, so its tasks wait there.
    let mut hellos = Vec::new();
    for i in 0..5 {
        hellos.push(api_a.start("hello", json!({"name": format!("n{i}")}), Some(&format!("hello-{i}"))).await);
    }
    let napper = api_a.start("napper", Value::Null, Some("napper-1")).await;
    let gated = api_a.start("gated", Value::Null, Some("gated-1")).await;
    let early = api_a.start("gated", Value::Null, Some("gated-0")).await;

    // B reads A's executions but cannot append to them while A holds its lease: a signal sent to
    // B is posted in the database for A, which applies it; so is a cancel.
    let (status, row) = api_b.get(&format!("/v1/executions/{gated}")).await;
    assert_eq!((status, row["status"].as_str()), (200, Some("running")), "{row}");
    let (status, body) = api_b.post(&format!("/v1/executions/{early}/signals/go"), &json!(1)).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(api_b.wait(&early, 20).await["output"], json!({"got": 1}));
    let doomed = api_a.start("gated", Value::Null, Some("gated-doomed")).await;
    let (status, body) = api_b.post(&format!("/v1/executions/{doomed}/cancel"), &json!({"reason": "via b"})).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(api_b.wait(&doomed, 20).await["status"], "cancelled");
    let counter = |text: &str, name: &str| {
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<u64>().ok()).unwrap()
    };
    assert_eq!(counter(&api_b.metrics().await, "sluice_run_changes_posted_total"), 2);
    assert_eq!(counter(&api_a.metrics().await, "sluice_run_changes_applied_total"), 2);

    a.kill();
    let _worker = WorkerProcess::rust(&bin(), &b, &[], None);
    // The lease is 10 s, renewed and checked every third of it: B takes over within ~14 s.
    for id in &hellos {
        let done = api_b.wait(id, 40).await;
        assert_eq!(done["status"], "completed", "{done}");
    }
    assert_eq!(api_b.wait(&napper, 40).await["output"], json!({"slept": true}));
    let (status, body) = api_b.post(&format!("/v1/executions/{gated}/signals/go"), &json!(7)).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(api_b.wait(&gated, 20).await["output"], json!({"got": 7}));

    // B says what it took over.
    let text = api_b.metrics().await;
    assert!(counter(&text, "sluice_executions_taken_over_total") >= 7, "{text}");

    // No history forked: each is numbered 1..n without a gap, and replays to its stored state.
    for id in hellos.iter().chain([&napper, &gated, &early]) {
        let seqs: Vec<u64> = api_b.history(id, None).await.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "{id}");
    }
    assert!(assert_replays(&api_b).await >= 8);
}

/// Three nodes on one PostgreSQL run 10,000 executions between them, each node with its own
/// worker; one node is SIGKILLed mid-run. Every acknowledged start completes, no step's
/// completion is accepted twice (judged by the workers' own records), and no history forks.
#[tokio::test]
async fn three_nodes_run_ten_thousand_executions_and_one_is_sigkilled() {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    const N: usize = 10_000;
    const KILLED: usize = 2;
    let db = PgDatabase::create("three");
    let dirs: Vec<TempDir> = (0..3).map(|i| TempDir::new(&format!("pg-three-{i}"))).collect();
    let mut nodes = Vec::new();
    for d in &dirs {
        nodes.push(ServerProcess::start_on(&bin(), d.path(), &db.url()).await);
    }
    let apis: Vec<Api> = nodes.iter().map(|n| n.api()).collect();
    let steps: Vec<Value> = (1..=2).map(|i| json!({"id": format!("s{i}"), "type": "task", "queue": "noop"})).collect();
    apis[0].publish(&json!({"name": "two", "steps": steps})).await;
    let records: Vec<_> = dirs.iter().map(|d| d.path().join("worker.jsonl")).collect();
    let _workers: Vec<WorkerProcess> =
        nodes.iter().zip(&records).map(|(n, r)| WorkerProcess::rust(&bin(), n, &["noop"], Some(r))).collect();

    // 24 clients, 8 per node; a client whose node is gone goes on with the next one (the
    // workflow id makes a repeated start answer with the execution already running).
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut starters = Vec::new();
    for c in 0..24 {
        let (apis, acked) = (apis.clone(), acked.clone());
        starters.push(tokio::spawn(async move {
            for i in (c..N).step_by(24) {
                let id = format!("three-{i}");
                let mut node = c % 3;
                loop {
                    let r = apis[node]
                        .request(reqwest::Method::POST, "/v1/executions")
                        .json(&json!({"workflow": "two", "workflow_id": id}))
                        .send()
                        .await;
                    match r {
                        Ok(resp) if resp.status().is_success() => {
                            acked.lock().unwrap().push(id.clone());
                            break;
                        }
                        _ => {
                            node = (node + 1) % 3;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            }
        }));
    }
    let completed_steps = || {
        records
            .iter()
            .map(|r| std::fs::read_to_string(r).unwrap_or_default().lines().filter(|l| l.contains("completed")).count())
            .sum::<usize>()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while completed_steps() < 4000 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    nodes[KILLED].kill();
    let done_at_kill = completed_steps();
    assert!((4000..N * 2).contains(&done_at_kill), "the kill did not land mid-run ({done_at_kill} steps done)");
    for s in starters {
        s.await.unwrap();
    }
    let ids: Vec<String> = acked.lock().unwrap().clone();
    assert_eq!(ids.iter().collect::<std::collections::HashSet<_>>().len(), N);
    let live = &apis[0];
    for id in &ids {
        let row = live.wait(id, 120).await;
        assert_eq!(row["status"], "completed", "{id}: {row}");
    }

    // The workers' records: a step's completion is accepted at most once over all workers.
    let mut accepted: HashMap<String, usize> = HashMap::new();
    for record in &records {
        for (step, n) in WorkerRecord::read(record).completed {
            *accepted.entry(step).or_default() += n;
        }
    }
    let twice: Vec<_> = accepted.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "steps whose completion was accepted twice: {twice:?}");
    // Completions lost with the killed node were done again by the others: nearly all accepted.
    assert!(accepted.len() >= N * 2 - 600, "steps accepted: {}", accepted.len());

    // No history forked: every one is numbered 1..n without a gap and replays to its state.
    let all = sluice_testkit::all_executions(live).await;
    assert_eq!(all.len(), N);
    for e in all.iter().step_by(50) {
        let id = e["workflow_id"].as_str().unwrap();
        let seqs: Vec<u64> = live.history(id, None).await.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "{id}");
    }
    assert_eq!(assert_replays(live).await, N);
}

/// Two nodes share their work queues: a worker polling only node B gets the tasks of the
/// executions node A owns (claimed in PostgreSQL with `FOR UPDATE SKIP LOCKED`), B takes its
/// answers and posts them for A, which records them; heartbeats and timeouts of those tasks work
/// across nodes, a late answer is refused, and a run that ends on A wakes result waiters on B.
#[tokio::test]
async fn a_worker_on_one_node_serves_every_nodes_executions() {
    use std::time::Duration;

    let db = PgDatabase::create("queues");
    let (dir_a, dir_b) = (TempDir::new("pg-queues-a"), TempDir::new("pg-queues-b"));
    let a = ServerProcess::start_on(&bin(), dir_a.path(), &db.url()).await;
    let b = ServerProcess::start_on(&bin(), dir_b.path(), &db.url()).await;
    let (api_a, api_b) = (a.api(), b.api());
    let steps: Vec<Value> = (1..=2).map(|i| json!({"id": format!("s{i}"), "type": "task", "queue": "noop"})).collect();
    api_a.publish(&json!({"name": "two", "steps": steps})).await;
    let record = dir_b.path().join("worker.jsonl");
    let _worker = WorkerProcess::rust(&bin(), &b, &["noop"], Some(&record));

    let mut ids = Vec::new();
    for i in 0..40 {
        let api = if i % 2 == 0 { &api_a } else { &api_b };
        ids.push(api.start("two", Value::Null, Some(&format!("two-{i}"))).await);
    }
    for id in &ids {
        assert_eq!(api_a.wait(id, 30).await["status"], "completed", "{id}");
    }
    let metric = |api: Api, name: &'static str| async move {
        let text = api.metrics().await;
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<u64>().ok()).unwrap()
    };
    // A's 20 runs had 40 tasks, all answered at B and recorded by A. (B also posts the answer
    // to one of its own tasks that reaches it before the task is in its memory, and records it.)
    assert_eq!(metric(api_a.clone(), "sluice_task_answers_applied_total").await, 40);
    let (posted, own) = (
        metric(api_b.clone(), "sluice_task_answers_posted_total").await,
        metric(api_b.clone(), "sluice_task_answers_applied_total").await,
    );
    assert_eq!(posted, 40 + own, "B posted A's 40 answers and {own} of its own");
    assert_eq!(metric(api_a.clone(), "sluice_task_answers_posted_total").await, 0);
    let completed = std::fs::read_to_string(&record).unwrap().lines().filter(|l| l.contains("\"completed\"")).count();
    assert_eq!(completed, 80, "every step answered once");

    // A workflow id that ended on A runs again through B: A forgets the result it remembers.
    let old = api_a.wait("two-0", 5).await;
    let (status, again) = api_b.post("/v1/executions", &json!({"workflow": "two", "workflow_id": "two-0"})).await;
    assert_eq!(status, 201, "{again}");
    let new_run = again["run_id"].as_str().unwrap().to_string();
    assert_ne!(old["run_id"].as_str(), Some(new_run.as_str()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, seen) = api_a.get("/v1/executions/two-0/result?wait_ms=10000").await;
    assert_eq!(seen["run_id"].as_str(), Some(new_run.as_str()), "A answers with the new run: {seen}");

    // A task of A's run, claimed through B and never answered: its 1 s limit is enforced by A,
    // which schedules attempt 2; B's late answer to attempt 1 is refused.
    api_a
        .publish(&json!({"name": "manual", "steps": [
            {"id": "pay", "type": "task", "queue": "manual",
             "retry": {"max_attempts": 3, "initial_interval": "10ms"},
             "timeouts": {"start_to_close": "1s", "heartbeat": "600ms"}}
        ]}))
        .await;
    let id = api_a.start("manual", json!({"amount": 3}), Some("manual-1")).await;
    let poll = || async {
        let (status, body) = api_b.post("/v1/tasks/poll", &json!({"queue": "manual", "wait_ms": 10_000})).await;
        assert_eq!(status, 200, "{body}");
        body["tasks"][0].clone()
    };
    let first = poll().await;
    assert_eq!((first["attempt"].as_u64(), first["workflow_id"].as_str()), (Some(1), Some(id.as_str())), "{first}");
    let token = first["task_token"].as_str().unwrap().to_string();
    let (status, beat) = api_b.post("/v1/tasks/heartbeat", &json!({"task_token": token})).await;
    assert_eq!((status, beat["cancel_requested"].as_bool()), (200, Some(false)), "{beat}");
    let second = poll().await;
    assert_eq!(second["attempt"], 2, "attempt 1 timed out on A: {second}");
    let (status, late) = api_b.post("/v1/tasks/complete", &json!({"task_token": token, "output": "late"})).await;
    assert_eq!(status, 404, "a late answer is refused: {late}");
    let (status, beat) = api_b.post("/v1/tasks/heartbeat", &json!({"task_token": token})).await;
    assert_eq!((status, beat["cancel_requested"].as_bool()), (200, Some(true)), "{beat}");
    let token2 = second["task_token"].as_str().unwrap();
    let (status, body) = api_b.post("/v1/tasks/complete", &json!({"task_token": token2, "output": {"paid": 3}})).await;
    assert_eq!(status, 200, "{body}");
    let done = api_b.wait(&id, 20).await;
    assert_eq!(done["output"], json!({"paid": 3}), "{done}");
    let history = api_a.history(&id, None).await;
    let kinds: Vec<&str> = history.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "task_completed").count(), 1, "{kinds:?}");
    assert!(
        history
            .iter()
            .any(|e| e["error"]["type"] == "timeout.start_to_close" || e["error"]["type"] == "timeout.heartbeat"),
        "{kinds:?}"
    );

    // A run that ends on A wakes a result long-poll on B at once, not at its next re-read.
    let waits = result_wake_ups(&api_a, &api_b).await;
    assert!(waits[5] < Duration::from_millis(400), "B re-reads every second; wake-ups are faster: {waits:?}");
}

/// Runs ten executions on node `a` that wait for a signal, each with a result long-poll on node
/// `b`; returns, sorted, how long after the signal each long-poll answered.
async fn result_wake_ups(a: &Api, b: &Api) -> Vec<std::time::Duration> {
    use std::time::{Duration, Instant};

    a.publish(&json!({"name": "gated", "steps": [
        {"id": "gate", "type": "wait_signal", "signal": "go"},
        {"id": "done", "type": "transform", "expr": "{got: .steps.gate}"}
    ]}))
    .await;
    let mut waits = Vec::new();
    for i in 0..10 {
        let id = a.start("gated", Value::Null, Some(&format!("gated-{i}"))).await;
        let waiter = {
            let (b, id) = (b.clone(), id.clone());
            tokio::spawn(async move {
                let (status, row) = b.get(&format!("/v1/executions/{id}/result?wait_ms=10000")).await;
                (status, row, Instant::now())
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let sent = Instant::now();
        let (status, body) = a.post(&format!("/v1/executions/{id}/signals/go"), &json!(i)).await;
        assert_eq!(status, 202, "{body}");
        let (status, row, at) = waiter.await.unwrap();
        assert_eq!((status, &row["output"]), (200, &json!({"got": i})), "{row}");
        waits.push(at.duration_since(sent));
    }
    waits.sort();
    waits
}

/// PostgreSQL is restarted while two nodes run executions on it (issue 3), and stays down
/// longer than the nodes' leases. Clients start executions on both nodes, timers fire, and one
/// worker, polling node B only, does the task steps of both (A's through the shared queue).
/// While the database is down, clients see 503 with `Retry-After` and never another error; both
/// nodes reconnect by themselves (their pools and their `LISTEN` connections) and keep their
/// executions (neither ends the other's lapsed lease on its way back); every start they
/// acknowledged completes, no step's completion is accepted twice (judged by the worker's own
/// record), a task is never handed out again after its completion was acknowledged, and every
/// history is one unbroken sequence that replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_load_gives_503s_and_loses_nothing() {
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    const N: usize = 600;
    let cluster = PrivateCluster::create();
    let (dir_a, dir_b) = (TempDir::new("pg-restart-a"), TempDir::new("pg-restart-b"));
    let a = ServerProcess::start_on(&bin(), dir_a.path(), &cluster.url()).await;
    let b = ServerProcess::start_on(&bin(), dir_b.path(), &cluster.url()).await;
    let apis = [a.api(), b.api()];
    apis[0]
        .publish(&json!({"name": "three", "steps": [
            {"id": "s1", "type": "task", "queue": "noop"},
            {"id": "nap", "type": "sleep", "duration": "50ms"},
            {"id": "s2", "type": "task", "queue": "noop"},
            {"id": "s3", "type": "task", "queue": "noop"}
        ]}))
        .await;
    let record = dir_b.path().join("worker.jsonl");
    let _worker = WorkerProcess::rust(&bin(), &b, &["noop"], Some(&record));

    // 8 clients, 4 per node, start executions and retry a refused start under the same
    // workflow id (which makes a repeated start answer with the run already there). The first
    // half is started before the database stops, the second half only once it has stopped, so
    // that starts meet the outage however fast the first half ran.
    let acked = Arc::new(Mutex::new(Vec::new()));
    let unavailable = Arc::new(AtomicUsize::new(0));
    let (stopped_tx, stopped_rx) = tokio::sync::watch::channel(false);
    let mut starters = Vec::new();
    for c in 0..8 {
        let (api, acked, unavailable) = (apis[c % 2].clone(), acked.clone(), unavailable.clone());
        let mut stopped = stopped_rx.clone();
        starters.push(tokio::spawn(async move {
            for i in (c..N).step_by(8) {
                if i >= N / 2 {
                    stopped.wait_for(|s| *s).await.expect("the test holds the sender");
                }
                let id = format!("load-{i}");
                loop {
                    let resp = api
                        .request(reqwest::Method::POST, "/v1/executions")
                        .json(&json!({"workflow": "three", "workflow_id": id}))
                        .send()
                        .await
                        .expect("the nodes stay up while their database is down");
                    let status = resp.status().as_u16();
                    if resp.status().is_success() {
                        acked.lock().unwrap().push(id.clone());
                        break;
                    }
                    let retry_after = resp.headers().get("retry-after").is_some();
                    let body: Value = resp.json().await.unwrap_or(Value::Null);
                    assert_eq!(status, 503, "a start while the database is down: {body}");
                    assert!(retry_after, "a 503 carries Retry-After: {body}");
                    assert_eq!(body["error"]["code"], "storage_unavailable", "{body}");
                    unavailable.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    let completed_steps =
        || std::fs::read_to_string(&record).unwrap_or_default().lines().filter(|l| l.contains("completed")).count();
    let deadline = Instant::now() + Duration::from_secs(60);
    while completed_steps() < 300 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cluster.stop();
    stopped_tx.send(true).unwrap();
    let done_at_stop = completed_steps();
    assert!((300..N * 3).contains(&done_at_stop), "the restart did not land mid-run ({done_at_stop} steps done)");
    // Longer than the 10 s lease, and the node's lease check every third of it.
    tokio::time::sleep(Duration::from_secs(14)).await;
    assert!(unavailable.load(Ordering::Relaxed) > 0, "starts were refused with 503 while the database was down");
    cluster.start();

    for s in starters {
        s.await.unwrap();
    }
    let ids: Vec<String> = acked.lock().unwrap().clone();
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), N);
    for id in &ids {
        let row = apis[0].wait(id, 120).await;
        assert_eq!(row["status"], "completed", "{id}: {row}");
    }

    let record = WorkerRecord::read(&record);
    record.assert_once();
    let completed = &record.completed;
    // No process died, so every step's completion reached the worker's record.
    assert_eq!(completed.len(), N * 3, "every step was completed by the worker and acknowledged once");

    let all = sluice_testkit::all_executions(&apis[1]).await;
    assert_eq!(all.len(), N);
    for e in &all {
        let id = e["workflow_id"].as_str().unwrap();
        let seqs: Vec<u64> = apis[1].history(id, None).await.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "{id}");
    }
    assert_eq!(assert_replays(&apis[0]).await, N);

    // Both nodes kept their leases: neither stopped, nor took the other's executions.
    for node in [&a, &b] {
        let text = node.api().metrics().await;
        let value =
            |name: &str| text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<u64>().ok());
        assert_eq!(value("sluice_node_lease_lost"), Some(0), "{}", node.base);
        assert_eq!(value("sluice_executions_taken_over_total"), Some(0), "{}", node.base);
    }

    // Both nodes listen again: a run that ends on A wakes a result long-poll on B at once
    // (B would otherwise learn of it at its next re-read, up to a second later).
    let waits = result_wake_ups(&apis[0], &apis[1]).await;
    assert!(waits[5] < Duration::from_millis(400), "wake-ups reach B after the restart: {waits:?}");
}
