//! `sluice bench` smoke tests: the workflow bench keeps its flags, and `bench gateway` reports
//! the gateway's added latency in its JSON shape with every request answered.

use serde_json::Value;

use super::*;

async fn sluice_json(args: &[&str]) -> Value {
    let out = tokio::process::Command::new(bin()).args(args).output().await.unwrap();
    assert!(out.status.success(), "sluice {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[tokio::test]
async fn bench_gateway_reports_direct_and_via_sluice_latencies() {
    let r = sluice_json(&["bench", "gateway", "--rps", "200", "--duration", "1s", "--warmup", "200ms", "--json"]).await;
    assert_eq!((r["bench"].as_str(), r["unit"].as_str()), (Some("gateway"), Some("us")), "{r}");
    assert_eq!(r["latency_from"], "scheduled_send");
    let rates = r["rates"].as_array().unwrap();
    assert_eq!(rates.len(), 1, "{r}");
    let rate = &rates[0];
    assert_eq!(rate["rps"], 200);
    for path in ["direct", "via_sluice"] {
        let p = &rate[path];
        assert_eq!((p["requests"].as_u64(), p["failed"].as_u64()), (Some(200), Some(0)), "{path}: {p}");
        let (p50, p99, max) = (p["p50"].as_f64().unwrap(), p["p99"].as_f64().unwrap(), p["max"].as_f64().unwrap());
        assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{path}: {p}");
    }
    let added = rate["via_sluice"]["p50"].as_f64().unwrap() - rate["direct"]["p50"].as_f64().unwrap();
    assert!((rate["added"]["p50"].as_f64().unwrap() - added).abs() < 1e-9, "{rate}");
    assert!(rate["added"]["p99"].is_f64() && rate["send_lag"]["p99"].is_f64(), "{rate}");
    // The gateway's own exchange with the upstream, from the usage ledger, lies inside each call.
    let upstream = rate["gateway_to_upstream"]["p50"].as_f64().unwrap();
    assert!(0.0 < upstream && upstream < rate["via_sluice"]["p50"].as_f64().unwrap(), "{rate}");
}

#[tokio::test]
async fn the_workflow_bench_keeps_its_flags() {
    let dir = TempDir::new("bench");
    let db = dir.path().join("bench.db").display().to_string();
    let args = ["bench", "--executions", "20", "--steps", "2", "--concurrency", "4", "--database", &db, "--json"];
    let r = sluice_json(&args).await;
    assert_eq!((r["completed"].as_u64(), r["failed"].as_u64()), (Some(20), Some(0)), "{r}");
    assert_eq!(r["steps_per_execution"], 2);
}

#[tokio::test]
async fn the_bench_compares_authentication_on_and_off_in_one_run() {
    let args = ["bench", "--auth", "both", "--rounds", "2", "--executions", "40", "--steps", "1", "--json"];
    let r = sluice_json(&args).await;
    let runs = r["runs"].as_array().unwrap();
    let auth: Vec<bool> = runs.iter().map(|x| x["auth"].as_bool().unwrap()).collect();
    assert_eq!(auth, [false, true, false, true], "{r}");
    assert!(runs.iter().all(|x| x["completed"] == 40 && x["failed"] == 0), "{r}");
    let m = &r["median"];
    let (off, on) = (m["p99_ms"]["off"].as_f64().unwrap(), m["p99_ms"]["on"].as_f64().unwrap());
    assert!(off > 0.0 && on > 0.0, "{m}");
    assert!((m["p99_auth_on_over_off"].as_f64().unwrap() - on / off).abs() < 1e-9, "{m}");
}
