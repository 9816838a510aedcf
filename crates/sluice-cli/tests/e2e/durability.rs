//! Crashes and stops: the server process is SIGKILLed (or stopped with SIGTERM) and started
//! again on the same database.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::*;

on_both_backends!(
    timers_and_signals_survive_a_restart,
    sigkill_under_load_loses_nothing_and_repeats_nothing,
    sigterm_ends_long_polls_and_stops_at_once,
    lost_commit_acknowledgements_neither_stall_nor_repeat_a_step,
);

async fn timers_and_signals_survive_a_restart(backend: Backend) {
    let db = Db::new("restart", backend);
    let mut server = ServerProcess::start_on(&bin(), db.dir(), db.url()).await;
    let api = server.api();
    api.publish(&json!({"name": "patient", "steps": [
        {"id": "nap", "type": "sleep", "duration": "1500ms"},
        {"id": "gate", "type": "wait_signal", "signal": "go", "timeout": "1h"},
        {"id": "done", "type": "transform", "expr": "{slept: true, got: .steps.gate}"}
    ]}))
    .await;
    let started = Instant::now();
    let id = api.start("patient", Value::Null, Some("patient-1")).await;
    // A second one waits for a signal that arrives before the crash and must not be lost.
    let id2 = api.start("patient", Value::Null, Some("patient-2")).await;
    assert_eq!(api.post(&format!("/v1/executions/{id2}/signals/go"), &json!(2)).await.0, 202);
    server.restart().await;
    let api = server.api();
    let row = api.wait_until(&id, 20, |r| r["history_length"].as_u64().unwrap_or(0) >= 4).await;
    assert!(started.elapsed() >= Duration::from_millis(1500), "timer fired early");
    assert_eq!(row["status"], "running");
    assert_eq!(api.post(&format!("/v1/executions/{id}/signals/go"), &json!(1)).await.0, 202);
    server.restart().await;
    let api = server.api();
    assert_eq!(api.wait(&id, 20).await["output"], json!({"slept": true, "got": 1}));
    assert_eq!(api.wait(&id2, 20).await["output"], json!({"slept": true, "got": 2}));
    assert_replays(&api).await;
}

/// SIGKILL while 1,000 executions of a 5-step workflow run; after a restart all complete, no
/// acknowledged start is lost and no step's completion was accepted twice.
async fn sigkill_under_load_loses_nothing_and_repeats_nothing(backend: Backend) {
    const N: usize = 1000;
    let db = Db::new("crash", backend);
    let mut server = ServerProcess::start_on(&bin(), db.dir(), db.url()).await;
    let api = server.api();
    let steps: Vec<Value> = (1..=5).map(|i| json!({"id": format!("s{i}"), "type": "task", "queue": "noop"})).collect();
    api.publish(&json!({"name": "five", "steps": steps})).await;
    let record = db.dir().join("worker.jsonl");
    let _worker = WorkerProcess::rust(&bin(), &server, &["noop"], Some(&record));

    // Start executions from 8 concurrent clients; remember every start the server acknowledged.
    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut starters = Vec::new();
    for c in 0..8 {
        let (api, acked) = (api.clone(), acked.clone());
        starters.push(tokio::spawn(async move {
            for i in (c..N).step_by(8) {
                let id = format!("crash-{i}");
                loop {
                    let r = api
                        .request(reqwest::Method::POST, "/v1/executions")
                        .json(&json!({"workflow": "five", "workflow_id": id}))
                        .send()
                        .await;
                    match r {
                        Ok(resp) if resp.status().is_success() => {
                            acked.lock().unwrap().push(id.clone());
                            break;
                        }
                        // Server down: retry until it is back (the id makes the start idempotent).
                        _ => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            }
        }));
    }
    // Let work get under way, then kill the server mid-run.
    let deadline = Instant::now() + Duration::from_secs(60);
    let completed_steps =
        || std::fs::read_to_string(&record).unwrap_or_default().lines().filter(|l| l.contains("completed")).count();
    while completed_steps() < 1000 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill();
    let done_at_kill = completed_steps();
    assert!((1000..N * 5).contains(&done_at_kill), "kill did not land mid-run ({done_at_kill} steps done)");
    server.restart().await;
    for s in starters {
        s.await.unwrap();
    }
    let api = server.api();
    let ids: Vec<String> = acked.lock().unwrap().clone();
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), N);
    for id in &ids {
        let row = api.wait(id, 120).await;
        assert_eq!(row["status"], "completed", "{id}: {row}");
    }
    // The worker's own record: a step's completion is acknowledged at most once, and a task is
    // never handed out again once its completion was acknowledged.
    let record = WorkerRecord::read(&record);
    record.assert_once();
    let completed = &record.completed;
    // Results whose acknowledgement died with the server are not in the record (the steps are
    // done all the same): at most a few batches of the worker's 64 tasks in flight.
    assert!(completed.len() >= N * 5 - 300, "most steps were done by this worker: {}", completed.len());
    assert_eq!(assert_replays(&api).await, N);
}

/// A commit the database applied but whose acknowledgement was lost (the connection dropped
/// between the two, as in a PostgreSQL outage under load; injected here on every fifth commit):
/// the starts and answers it carried got `503`, yet the tasks and timers it created must be
/// delivered, and the answer it recorded must not be recorded again. Before the engine read such
/// runs back from the store, their next tasks stayed in the database only, and they never ended.
async fn lost_commit_acknowledgements_neither_stall_nor_repeat_a_step(backend: Backend) {
    const N: usize = 150;
    let db = Db::new("lost-ack", backend);
    let env = [("SLUICE_FAULT_LOSE_COMMIT_ACKS", "5")];
    let server = ServerProcess::start_with_env(&bin(), db.dir(), db.url(), &[], &env).await;
    let api = server.api();
    api.publish(&json!({"name": "steady", "steps": [
        {"id": "s1", "type": "task", "queue": "noop"},
        {"id": "nap", "type": "sleep", "duration": "20ms"},
        {"id": "s2", "type": "task", "queue": "noop"},
        {"id": "s3", "type": "task", "queue": "noop"}
    ]}))
    .await;
    let record = db.dir().join("worker.jsonl");
    let _worker = WorkerProcess::rust(&bin(), &server, &["noop"], Some(&record));
    let mut unavailable = 0;
    for i in 0..N {
        let id = format!("ack-{i}");
        loop {
            let resp = api
                .request(reqwest::Method::POST, "/v1/executions")
                .json(&json!({"workflow": "steady", "workflow_id": id}))
                .send()
                .await
                .unwrap();
            if resp.status().is_success() {
                break;
            }
            assert_eq!(resp.status().as_u16(), 503, "{:?}", resp.text().await);
            unavailable += 1;
        }
    }
    assert!(unavailable > 0, "some starts met a lost acknowledgement");
    for i in 0..N {
        let id = format!("ack-{i}");
        let row = api.wait(&id, 60).await;
        assert_eq!(row["status"], "completed", "{id}: {row}");
        // Each step's outcome is in the history once: an answer repeated after a lost
        // acknowledgement was not recorded again.
        let history = api.history(&id, None).await;
        for step in ["s1", "s2", "s3"] {
            let done = history.iter().filter(|e| e["type"] == "task_completed" && e["step"] == step).count();
            assert_eq!(done, 1, "{id} {step}: {history:?}");
        }
        let seqs: Vec<u64> = history.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "{id}");
    }
    WorkerRecord::read(&record).assert_once();
    assert_eq!(assert_replays(&api).await, N);
    let text = api.metrics().await;
    let reconciled =
        text.lines().find_map(|l| l.strip_prefix("sluice_runs_reconciled_total ")?.parse::<u64>().ok()).unwrap_or(0);
    assert!(reconciled > 0, "runs were read back after lost acknowledgements: {reconciled}");
}

/// SIGTERM stops the server at once even with long-polls in flight, as a rolling restart of
/// nodes needs: a task poll answers with no task and a result wait with the execution as it
/// is, both well before their waits would end; started again, the server has lost nothing.
async fn sigterm_ends_long_polls_and_stops_at_once(backend: Backend) {
    let db = Db::new("sigterm", backend);
    let mut server = ServerProcess::start_on(&bin(), db.dir(), db.url()).await;
    let api = server.api();
    api.publish(&json!({"name": "held", "steps": [
        {"id": "gate", "type": "wait_signal", "signal": "go"},
        {"id": "done", "type": "transform", "expr": "{got: .steps.gate}"}
    ]}))
    .await;
    let id = api.start("held", Value::Null, Some("held-1")).await;
    let poll = {
        let api = api.clone();
        tokio::spawn(async move { api.post("/v1/tasks/poll", &json!({"queue": "nobody", "wait_ms": 60_000})).await })
    };
    let result = {
        let (api, id) = (api.clone(), id.clone());
        tokio::spawn(async move { api.get(&format!("/v1/executions/{id}/result?wait_ms=60000")).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let took = tokio::task::block_in_place(|| server.terminate(Duration::from_secs(30)));
    let took = took.expect("the server exited within 30 s of SIGTERM");
    assert!(took < Duration::from_secs(5), "the server took {took:?} to stop");
    let (status, body) = poll.await.unwrap();
    assert_eq!((status, &body["tasks"]), (200, &json!([])), "{body}");
    let (status, row) = result.await.unwrap();
    assert_eq!((status, row["status"].as_str()), (200, Some("running")), "{row}");

    server.restart().await;
    let api = server.api();
    assert_eq!(api.post(&format!("/v1/executions/{id}/signals/go"), &json!(1)).await.0, 202);
    assert_eq!(api.wait(&id, 20).await["output"], json!({"got": 1}));
    assert_replays(&api).await;
}
