//! A small client for the Sluice API, for the CLI's commands.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use serde_json::{json, Value};

#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    /// A client of the server at `base`, sending `api_key` (an API key or a session token) on
    /// every request when given.
    pub fn new(base: &str, api_key: Option<&str>) -> Self {
        let headers = sluice_worker::auth_headers(api_key);
        let http = reqwest::Client::builder().default_headers(headers).build().unwrap_or_default();
        Self { http, base: base.trim_end_matches('/').to_string() }
    }

    async fn decode(&self, resp: std::result::Result<reqwest::Response, reqwest::Error>) -> Result<Value> {
        let resp = resp.map_err(|e| {
            anyhow!("cannot reach the server at {}: {e}; start one with `sluice dev` or set --server", self.base)
        })?;
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED {
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            return Err(anyhow!(
                "{} (unauthenticated): pass --api-key or set SLUICE_API_KEY (`sluice dev` prints one; \
                 `sluice admin init` makes one)",
                body["error"]["message"].as_str().unwrap_or("the server wants credentials")
            ));
        }
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_client_error() || status.is_server_error() {
            let err = &body["error"];
            let mut msg = format!(
                "{} ({})",
                err["message"].as_str().unwrap_or("request failed"),
                err["code"].as_str().unwrap_or(status.as_str())
            );
            if let Some(list) = err["details"]["errors"].as_array() {
                for e in list {
                    msg.push_str(&format!(
                        "\n  {}: {}",
                        e["path"].as_str().unwrap_or(""),
                        e["message"].as_str().unwrap_or("")
                    ));
                }
            }
            return Err(anyhow!(msg));
        }
        Ok(body)
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        let r = self.http.get(format!("{}{path}", self.base)).send().await;
        self.decode(r).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let r = self.http.post(format!("{}{path}", self.base)).json(body).send().await;
        self.decode(r).await
    }

    pub async fn publish_text(&self, text: String, yaml: bool) -> Result<Value> {
        let ctype = if yaml { "application/yaml" } else { "application/json" };
        let r =
            self.http.post(format!("{}/v1/workflows", self.base)).header("content-type", ctype).body(text).send().await;
        self.decode(r).await
    }

    pub async fn publish_file(&self, file: &Path) -> Result<Value> {
        let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
        let yaml = file.extension().is_none_or(|e| e != "json");
        self.publish_text(text, yaml).await.with_context(|| format!("{} was not published", file.display()))
    }

    /// Starts `workflow` at `version` (the latest when `None`).
    pub async fn start(
        &self,
        workflow: &str,
        version: Option<&str>,
        input: Value,
        workflow_id: Option<&str>,
    ) -> Result<Value> {
        let mut body = json!({"workflow": workflow, "input": input});
        if let Some(v) = version {
            body["version"] = json!(v);
        }
        if let Some(id) = workflow_id {
            body["workflow_id"] = json!(id);
        }
        self.post("/v1/executions", &body).await
    }

    /// Waits for a terminal status, re-polling until `timeout`.
    pub async fn wait(&self, workflow_id: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now()).as_millis().min(30_000);
            let row = self.get(&format!("/v1/executions/{workflow_id}/result?wait_ms={left}")).await?;
            if row["status"] != "running" || Instant::now() >= deadline {
                return Ok(row);
            }
        }
    }
}

/// A human summary of an execution.
pub fn describe(row: &Value) -> String {
    let mut s = format!(
        "workflow id  {}\nrun id       {}\nworkflow     {} ({})\nstatus       {}{}{}\nevents       {}",
        row["workflow_id"].as_str().unwrap_or(""),
        row["run_id"].as_str().unwrap_or(""),
        row["workflow"].as_str().unwrap_or(""),
        row["version"].as_str().unwrap_or(""),
        row["status"].as_str().unwrap_or(""),
        if row["paused"] == true { " (paused)" } else { "" },
        if row["dead_letter"] == true { " (in dead-letter queue)" } else { "" },
        row["history_length"],
    );
    if !row["error"].is_null() {
        s.push_str(&format!(
            "\nerror        {}: {}",
            row["error"]["type"].as_str().unwrap_or(""),
            row["error"]["message"].as_str().unwrap_or("")
        ));
        if let Some(step) = row["failed_step"].as_str() {
            s.push_str(&format!(" (step {step})"));
        }
    }
    if !row["output"].is_null() {
        s.push_str(&format!("\noutput       {}", row["output"]));
    }
    s
}
