//! Which version runs: `sluice run FILE` runs exactly the version of FILE, `start --version`
//! exactly the version named, and publishing a content makes it the latest, also when that content
//! was published before.

use serde_json::{json, Value};

use super::*;

on_both_backends!(run_and_start_run_exactly_the_version_named, publishing_again_makes_a_version_the_latest,);

/// A workflow `greeter` whose result names its variant.
fn greeter(variant: &str) -> String {
    format!("name: greeter\nsteps:\n  - id: say\n    type: transform\n    expr: '\"{variant}\"'\n")
}

/// Runs the CLI against `server`; returns (success, stdout, stderr).
fn cli(server: &ServerProcess, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(bin())
        .args(["--server", &server.base])
        .args(args)
        .env("SLUICE_API_KEY", server.key.as_deref().unwrap())
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

async fn run_and_start_run_exactly_the_version_named(backend: Backend) {
    let db = Db::new("run-version", backend);
    let server = ServerProcess::start_on(&bin(), db.dir(), db.url()).await;
    let api = server.api();
    let (a, b) = (db.dir().join("a.yaml"), db.dir().join("b.yaml"));
    std::fs::write(&a, greeter("a")).unwrap();
    std::fs::write(&b, greeter("b")).unwrap();
    let va = api.publish_file(&a).await["version"].as_str().unwrap().to_string();
    let vb = api.publish_file(&b).await["version"].as_str().unwrap().to_string();
    assert_ne!(va, vb);

    // `b` is the latest; running the file of `a` runs `a`.
    let (ok, stdout, stderr) = cli(&server, &["--json", "run", a.to_str().unwrap(), "--workflow-id", "run-a"]);
    assert!(ok, "{stderr}");
    let row: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(row["output"], json!("a"), "{row}");
    assert_eq!(row["version"], json!(va), "{row}");
    assert!(stderr.contains(&format!("published greeter version {va}")), "{stderr}");

    // `start --version` runs the version named, whichever is the latest.
    for (version, output) in [(&vb, "b"), (&va, "a")] {
        let id = format!("start-{output}");
        let (ok, stdout, stderr) =
            cli(&server, &["--json", "start", "greeter", "--version", version, "--workflow-id", &id]);
        assert!(ok, "{stderr}");
        let started: Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(started["version"], json!(version), "{started}");
        let row = api.wait(&id, 20).await;
        assert_eq!((&row["version"], &row["output"]), (&json!(version), &json!(output)), "{row}");
    }

    // And so does the API; an unknown version is not found.
    let (status, body) =
        api.post("/v1/executions", &json!({"workflow": "greeter", "version": vb, "workflow_id": "api-b"})).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["version"], json!(vb), "{body}");
    assert_eq!(api.wait("api-b", 20).await["output"], json!("b"));
    let (status, body) = api.post("/v1/executions", &json!({"workflow": "greeter", "version": "000000000000"})).await;
    assert_eq!(status, 404, "{body}");
    let (ok, _, stderr) = cli(&server, &["start", "greeter", "--version", "000000000000"]);
    assert!(!ok && stderr.contains("not_found"), "{stderr}");
    assert_replays(&api).await;
}

async fn publishing_again_makes_a_version_the_latest(backend: Backend) {
    let db = Db::new("republish", backend);
    let server = ServerProcess::start_on(&bin(), db.dir(), db.url()).await;
    let api = server.api();
    let (a, b) = (db.dir().join("a.yaml"), db.dir().join("b.yaml"));
    std::fs::write(&a, greeter("a")).unwrap();
    std::fs::write(&b, greeter("b")).unwrap();
    let latest = || async { api.get("/v1/workflows/greeter").await.1["latest_version"].clone() };
    for round in 0..2 {
        let pa = api.publish_file(&a).await;
        assert_eq!(pa["created"], json!(round == 0), "{pa}");
        assert_eq!(latest().await, pa["version"], "round {round}: `a` published last");
        let id = api.start("greeter", Value::Null, None).await;
        assert_eq!(api.wait(&id, 20).await["output"], json!("a"));

        let pb = api.publish_file(&b).await;
        assert_eq!(latest().await, pb["version"], "round {round}: `b` published last");
        let id = api.start("greeter", Value::Null, None).await;
        assert_eq!(api.wait(&id, 20).await["output"], json!("b"));
    }
    // Published again, the old content keeps its place in the list of versions: two in all.
    let (_, wf) = api.get("/v1/workflows/greeter").await;
    assert_eq!(wf["versions"].as_array().map(Vec::len), Some(2), "{wf}");
    assert_replays(&api).await;
}
