//! Poison-pill quarantine: a step whose evaluation kills the server (made to with the test hook
//! `SLUICE_TEST_CRASH_ON_EXPR`) kills it twice, then fails with `engine.quarantined` instead of
//! killing it again; counted in `sluice_steps_quarantined_total` and in the audit log.

use std::time::Duration;

use serde_json::{json, Value};

use super::*;

on_both_backends!(a_step_that_kills_the_server_twice_is_quarantined,);

const MARKER: &str = "crash-here-5e1f";

async fn a_step_that_kills_the_server_twice_is_quarantined(backend: Backend) {
    let db = Db::new("quarantine", backend);
    let mut server =
        ServerProcess::start_with_env(&bin(), db.dir(), db.url(), &[], &[("SLUICE_TEST_CRASH_ON_EXPR", MARKER)]).await;
    let api = server.api();
    // A durable point first (the nap's timer), so the crashing step runs again after a restart.
    api.publish(&json!({"name": "poison", "steps": [
        {"id": "nap", "type": "sleep", "duration": "100ms"},
        {"id": "boom", "type": "transform", "expr": format!("\"{MARKER}\" | length")},
        {"id": "after", "type": "transform", "expr": "1"}
    ]}))
    .await;
    api.publish(&json!({"name": "fine", "steps": [{"id": "one", "type": "transform", "expr": ".input + 1"}]})).await;
    api.start("poison", Value::Null, Some("pill")).await;

    // The step kills the server, and kills it again once restarted.
    for crash in 1..=2 {
        let status = server.wait_exit(Duration::from_secs(20)).await;
        let status = status.unwrap_or_else(|| panic!("crash {crash}: the server still runs"));
        assert!(!status.success(), "crash {crash}: {status:?}");
        server.respawn();
    }
    // The third time the step is quarantined: the server stays up.
    assert!(server.wait_exit(Duration::from_secs(3)).await.is_none(), "the server died a third time");
    let mut ready = false;
    for _ in 0..400 {
        if let Ok((200, _)) = api.try_get("/readyz").await {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(ready, "{}", server.log_text());
    let row = api.wait("pill", 20).await;
    assert_eq!(row["status"], "failed", "{row}");
    assert_eq!(row["error"]["type"], "engine.quarantined", "{row}");
    assert_eq!(row["failed_step"], "boom", "{row}");
    assert_eq!(row["dead_letter"], true, "{row}");
    assert_eq!(row["error"]["details"], json!({"crashes": 2, "limit": 2}), "{row}");
    let history = api.history("pill", None).await;
    let aborted = of_type(&history, "step_aborted");
    assert_eq!(aborted.len(), 1, "{history:?}");
    assert_eq!(aborted[0]["step"], "boom");
    assert!(of_type(&history, "step_completed").iter().all(|e| e["step"] != "after"));

    // Counted, audited, and the server serves everything else.
    let id = api.start("fine", json!(41), None).await;
    assert_eq!(api.wait(&id, 10).await["output"], json!(42));
    let metrics = api.request(reqwest::Method::GET, "/metrics").send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("sluice_steps_quarantined_total 1"), "{metrics}");
    let mut entries = Vec::new();
    for _ in 0..100 {
        let (_, audit) = api.get("/v1/audit?actor=engine").await;
        entries = audit["entries"].as_array().cloned().unwrap_or_default();
        if !entries.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["action"], "engine.quarantined");
    let target = entries[0]["target"].as_str().unwrap();
    assert!(target.starts_with("pill/") && target.ends_with("/boom"), "{target}");
    assert_replays(&api).await;
}
