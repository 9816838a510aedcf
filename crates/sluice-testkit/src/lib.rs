//! Test helpers shared by the end-to-end suites: a real `sluice serve` process on a free port
//! (that a test can SIGKILL and restart), worker processes, a JSON HTTP client, and
//! `assert_replays`, which re-runs `decide` over every history a server stores, certificates
//! for TLS tests, a fake LLM vendor and a fake OIDC issuer.

pub mod oidc;
pub mod pki;
pub mod recording;
pub mod vendor;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> Self {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("sluice-test-{label}-{}-{nanos}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

/// A `sluice serve` process with its own database file.
pub struct ServerProcess {
    bin: PathBuf,
    /// A SQLite file path or a PostgreSQL URL.
    pub database: String,
    pub port: u16,
    pub base: String,
    child: Option<Child>,
    log: PathBuf,
    /// Given to `serve` after the port and database (kept for restarts).
    extra_args: Vec<String>,
    /// The owner API key of the tenant `default` that `sluice admin init` made before the first
    /// start (none when the server runs with `--insecure-no-auth`).
    pub key: Option<String>,
    /// Checks readiness and is the client of [`ServerProcess::api`].
    http: reqwest::Client,
    /// Environment set after the defaults (`SLUICE_LOG_FORMAT=json`, `SLUICE_LOG=info`).
    env: Vec<(String, String)>,
}

impl ServerProcess {
    /// Starts `bin serve` on a free port with a SQLite file in `dir`, and waits until `/readyz`
    /// answers.
    pub async fn start(bin: &Path, dir: &Path) -> Self {
        Self::start_on(bin, dir, &dir.join("sluice.db").display().to_string()).await
    }

    /// Like `start`, on the given database (a SQLite path or a PostgreSQL URL).
    pub async fn start_on(bin: &Path, dir: &Path, database: &str) -> Self {
        Self::start_with_args(bin, dir, database, &[]).await
    }

    /// Like `start_on`, with more arguments for `serve` (e.g. `--gateway FILE`).
    pub async fn start_with_args(bin: &Path, dir: &Path, database: &str, extra_args: &[&str]) -> Self {
        Self::launch(bin, dir, database, extra_args, "http", reqwest::Client::new(), &[]).await
    }

    /// Like `start_with_args`, with environment variables that override the defaults (such as
    /// `SLUICE_LOG=debug`).
    pub async fn start_with_env(
        bin: &Path,
        dir: &Path,
        database: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        Self::launch(bin, dir, database, extra_args, "http", reqwest::Client::new(), env).await
    }

    /// Like `start_with_env`, on a port chosen beforehand (say with [`free_port`]) for a config
    /// that must name the server's own URL.
    pub async fn start_on_port(
        bin: &Path,
        dir: &Path,
        database: &str,
        port: u16,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        Self::launch_on(bin, dir, database, port, extra_args, "http", reqwest::Client::new(), env).await
    }

    /// Like `start_with_args` for a server that speaks HTTPS (`extra_args` hold its `--tls-*`
    /// flags): `client`, which must trust the server's certificate (and carry a client
    /// certificate where the server requires one), checks readiness and is the client of `api()`.
    pub async fn start_https(
        bin: &Path,
        dir: &Path,
        database: &str,
        extra_args: &[&str],
        client: reqwest::Client,
    ) -> Self {
        Self::launch(bin, dir, database, extra_args, "https", client, &[]).await
    }

    async fn launch(
        bin: &Path,
        dir: &Path,
        database: &str,
        extra_args: &[&str],
        scheme: &str,
        http: reqwest::Client,
        env: &[(&str, &str)],
    ) -> Self {
        Self::launch_on(bin, dir, database, free_port(), extra_args, scheme, http, env).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn launch_on(
        bin: &Path,
        dir: &Path,
        database: &str,
        port: u16,
        extra_args: &[&str],
        scheme: &str,
        http: reqwest::Client,
        env: &[(&str, &str)],
    ) -> Self {
        let mut s = Self {
            bin: bin.to_path_buf(),
            database: database.to_string(),
            port,
            base: format!("{scheme}://127.0.0.1:{port}"),
            child: None,
            log: dir.join("server.log"),
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            key: None,
            http,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        if !extra_args.contains(&"--insecure-no-auth") {
            s.key = Some(admin_init(bin, dir, database, "default"));
        }
        s.spawn().await;
        s
    }

    async fn spawn(&mut self) {
        self.spawn_process();
        let api = self.api();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok((200, _)) = api.try_get("/readyz").await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("server did not become ready; log: {}", self.log_text());
    }

    /// Kills and starts again on the same port and database without waiting for it to be ready:
    /// for a server expected to stop by itself (see [`ServerProcess::wait_exit`]).
    pub fn respawn(&mut self) {
        self.kill();
        self.spawn_process();
    }

    /// Waits up to `within` for the process to exit by itself; returns its exit status, or `None`
    /// if it still runs.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn spawn_process(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).ok();
        let stderr = log.map(Stdio::from).unwrap_or_else(Stdio::null);
        let mut cmd = Command::new(&self.bin);
        with_server_key(&mut cmd, &self.database);
        let child = cmd
            .args(["serve", "--port", &self.port.to_string(), "--database", &self.database])
            .args(&self.extra_args)
            .env("SLUICE_LOG_FORMAT", "json")
            .env("SLUICE_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        self.child = Some(child);
    }

    /// Kills the process with SIGKILL: no shutdown code runs.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM (a graceful stop) and waits up to `within` for the process to exit; returns
    /// how long it took, or `None` if it was still running (it is then killed).
    pub fn terminate(&mut self, within: Duration) -> Option<Duration> {
        let mut child = self.child.take()?;
        let sent = Instant::now();
        let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        assert!(status.is_ok_and(|s| s.success()), "cannot send SIGTERM to the server");
        while sent.elapsed() < within {
            if let Ok(Some(_)) = child.try_wait() {
                return Some(sent.elapsed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// Kills and starts again on the same port and database.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// The process id while it runs (to read its memory from `/proc`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A client with the owner key.
    pub fn api(&self) -> Api {
        Api { http: self.http.clone(), base: self.base.clone(), key: self.key.clone() }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The server's stderr so far, one JSON log line each; panics on a line that is not a JSON
    /// object.
    pub fn log_lines(&self) -> Vec<Value> {
        json_lines(&self.log_text())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The server key of the processes of the tests on PostgreSQL, which keep no key file beside
/// the database (on SQLite each database gets its own, made beside it).
pub const TEST_SERVER_KEY: &str = "7e57000000000000000000000000000000000000000000000000000000007e57";

/// Gives `cmd` the tests' server key when `database` is PostgreSQL and the environment has none.
fn with_server_key(cmd: &mut Command, database: &str) {
    let postgres = database.starts_with("postgres://") || database.starts_with("postgresql://");
    if postgres
        && std::env::var_os("SLUICE_SECRET_KEY").is_none()
        && std::env::var_os("SLUICE_SECRET_KEY_FILE").is_none()
    {
        cmd.env("SLUICE_SECRET_KEY", TEST_SERVER_KEY);
    }
}

/// Runs `sluice admin init` on `database` for `tenant` and returns the new owner API key.
pub fn admin_init(bin: &Path, dir: &Path, database: &str, tenant: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let file = dir.join(format!("owner-{tenant}-{nanos}.key"));
    let mut cmd = Command::new(bin);
    with_server_key(&mut cmd, database);
    let out = cmd
        .args(["admin", "init", "--database", database, "--tenant", tenant, "--key-file"])
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} admin init: {e}", bin.display()));
    assert!(out.status.success(), "sluice admin init failed: {}", String::from_utf8_lossy(&out.stderr));
    let key = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
    let _ = std::fs::remove_file(&file);
    key.trim().to_string()
}

/// A worker process, killed on drop.
pub struct WorkerProcess(Child);

impl WorkerProcess {
    /// The Rust demo worker: `sluice worker --queue ...`, with the server's key.
    pub fn rust(bin: &Path, server: &ServerProcess, queues: &[&str], record: Option<&Path>) -> Self {
        let mut cmd = Command::new(bin);
        cmd.args(["--server", &server.base, "worker"]);
        Self::spawn(cmd, server, queues, record)
    }

    /// The Python example worker (standard library only), with the server's key.
    pub fn python(repo: &Path, server: &ServerProcess, queues: &[&str], record: Option<&Path>) -> Self {
        let mut cmd = Command::new("python3");
        cmd.arg(repo.join("examples/workers/python_worker.py")).args(["--server", &server.base]);
        Self::spawn(cmd, server, queues, record)
    }

    /// The Rust demo worker writing JSON logs at `filter` (a `SLUICE_LOG` value) to `log`.
    pub fn rust_logged(
        bin: &Path,
        server: &ServerProcess,
        queues: &[&str],
        record: Option<&Path>,
        log: &Path,
        filter: &str,
    ) -> Self {
        let mut cmd = Command::new(bin);
        cmd.args(["--server", &server.base, "worker"]).env("SLUICE_LOG_FORMAT", "json").env("SLUICE_LOG", filter);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
        Self::spawn_to(cmd, server, queues, record, Stdio::from(file))
    }

    /// Both workers take the same `--queue` and `--record` options, and `SLUICE_API_KEY`.
    fn spawn(cmd: Command, server: &ServerProcess, queues: &[&str], record: Option<&Path>) -> Self {
        Self::spawn_to(cmd, server, queues, record, Stdio::null())
    }

    fn spawn_to(
        mut cmd: Command,
        server: &ServerProcess,
        queues: &[&str],
        record: Option<&Path>,
        stderr: Stdio,
    ) -> Self {
        match &server.key {
            Some(key) => cmd.env("SLUICE_API_KEY", key),
            None => cmd.env_remove("SLUICE_API_KEY"),
        };
        for q in queues {
            cmd.args(["--queue", q]);
        }
        if let Some(r) = record {
            cmd.arg("--record").arg(r);
        }
        let program = cmd.get_program().to_string_lossy().to_string();
        let child = cmd
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the worker {program}: {e}"));
        Self(child)
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Parses text of one JSON object per line; panics, naming the line, on one that is not.
pub fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .enumerate()
        .map(|(i, line)| match serde_json::from_str::<Value>(line) {
            Ok(v) if v.is_object() => v,
            Ok(_) => panic!("log line {} is JSON but not an object: {line}", i + 1),
            Err(e) => panic!("log line {} is not JSON ({e}): {line}", i + 1),
        })
        .collect()
}

/// A JSON client that returns the status with the body.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    pub base: String,
    key: Option<String>,
}

impl Api {
    /// A client without credentials.
    pub fn new(base: &str) -> Self {
        Self::with_client(base, reqwest::Client::new())
    }

    /// A client that sends `key` (an API key or a session token) as a bearer token.
    pub fn with_key(base: &str, key: Option<&str>) -> Self {
        Self { http: reqwest::Client::new(), base: base.to_string(), key: key.map(str::to_string) }
    }

    /// An API client over `http`: one configured for TLS, say.
    pub fn with_client(base: &str, http: reqwest::Client) -> Self {
        Self { http, base: base.to_string(), key: None }
    }

    /// A request to `path` with this client's credentials, for what the helpers below do not cover.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    async fn decode(r: reqwest::Response) -> (u16, Value) {
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn try_get(&self, path: &str) -> Result<(u16, Value), reqwest::Error> {
        let r = self.request(reqwest::Method::GET, path).send().await?;
        Ok(Self::decode(r).await)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.try_get(path).await.unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// Sends a request with extra headers; returns the status, the answer's headers (names in
    /// lowercase) and its body.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&Value>,
    ) -> (u16, std::collections::BTreeMap<String, String>, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap_or_else(|e| panic!("{method}: {e}"));
        let mut req = self.request(method, path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let r = req.send().await.unwrap_or_else(|e| panic!("{path}: {e}"));
        let headers = r
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_ascii_lowercase(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        let (status, body) = Self::decode(r).await;
        (status, headers, body)
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self.request(reqwest::Method::POST, path).json(body).send().await;
        Self::decode(r.unwrap_or_else(|e| panic!("POST {path}: {e}"))).await
    }

    pub async fn post_raw(&self, path: &str, content_type: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let r = self.request(reqwest::Method::POST, path).header("content-type", content_type).body(body).send().await;
        Self::decode(r.unwrap_or_else(|e| panic!("POST {path}: {e}"))).await
    }

    /// The text of `/metrics` on the API's port, read with this client's credential (an owner
    /// or admin sees the node's series and its own tenant's queues).
    pub async fn metrics(&self) -> String {
        let r = self.request(reqwest::Method::GET, "/metrics").send().await.unwrap_or_else(|e| panic!("/metrics: {e}"));
        assert_eq!(r.status().as_u16(), 200, "/metrics");
        r.text().await.unwrap_or_default()
    }

    /// Publishes a workflow given as JSON; panics unless accepted.
    pub async fn publish(&self, def: &Value) -> String {
        let (status, body) = self.post("/v1/workflows", def).await;
        assert!(status == 201 || status == 200, "publish failed: {status} {body}");
        body["version"].as_str().unwrap_or_default().to_string()
    }

    pub async fn publish_file(&self, path: &Path) -> Value {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (status, body) = self.post_raw("/v1/workflows", "application/yaml", text).await;
        assert!(status == 201 || status == 200, "publish of {} failed: {status} {body}", path.display());
        body
    }

    pub async fn start(&self, workflow: &str, input: Value, workflow_id: Option<&str>) -> String {
        let mut body = json!({"workflow": workflow, "input": input});
        if let Some(id) = workflow_id {
            body["workflow_id"] = json!(id);
        }
        let (status, resp) = self.post("/v1/executions", &body).await;
        assert!(status == 201 || status == 200, "start failed: {status} {resp}");
        resp["workflow_id"].as_str().unwrap_or_default().to_string()
    }

    /// Waits for a terminal status (not `continued_as_new`), up to `secs`.
    pub async fn wait(&self, workflow_id: &str, secs: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let (status, row) = self.get(&format!("/v1/executions/{workflow_id}/result?wait_ms=5000")).await;
            assert_eq!(status, 200, "result of {workflow_id}: {row}");
            if row["status"] != "running" {
                return row;
            }
            assert!(Instant::now() < deadline, "{workflow_id} still running after {secs}s: {row}");
        }
    }

    /// Waits until `check` holds for the execution, up to `secs`.
    pub async fn wait_until(&self, workflow_id: &str, secs: u64, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let (_, row) = self.get(&format!("/v1/executions/{workflow_id}")).await;
            if check(&row) {
                return row;
            }
            assert!(Instant::now() < deadline, "condition not met for {workflow_id} within {secs}s: {row}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A run's whole history, across pages.
    pub async fn history(&self, workflow_id: &str, run_id: Option<&str>) -> Vec<Value> {
        let run = run_id.map(|r| format!("&run_id={r}")).unwrap_or_default();
        let mut events = Vec::new();
        let mut after = 0;
        loop {
            let (status, body) =
                self.get(&format!("/v1/executions/{workflow_id}/history?limit=1000&after={after}{run}")).await;
            assert_eq!(status, 200, "history: {body}");
            events.extend(body["events"].as_array().cloned().unwrap_or_default());
            match body["next_after"].as_u64() {
                Some(next) => after = next,
                None => return events,
            }
        }
    }
}

/// Every execution the server knows, across pages.
pub async fn all_executions(api: &Api) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = cursor.as_ref().map(|c| format!("&cursor={c}")).unwrap_or_default();
        let (status, page) = api.get(&format!("/v1/executions?limit=500{q}")).await;
        assert_eq!(status, 200, "list: {page}");
        out.extend(page["executions"].as_array().cloned().unwrap_or_default());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return out,
        }
    }
}

/// Replays every stored history through `decide` and panics on the first divergence. Returns
/// how many histories were checked.
pub async fn assert_replays(api: &Api) -> usize {
    let mut checked = 0;
    for e in all_executions(api).await {
        let (name, version) = (e["workflow"].as_str().unwrap_or(""), e["version"].as_str().unwrap_or(""));
        let (status, wf) = api.get(&format!("/v1/workflows/{name}/versions/{version}")).await;
        assert_eq!(status, 200, "workflow {name}@{version}: {wf}");
        let def = sluice_core::def::parse_value(&wf["definition"])
            .unwrap_or_else(|e| panic!("stored definition invalid: {e:?}"));
        let wid = e["workflow_id"].as_str().unwrap_or("");
        let run = e["run_id"].as_str();
        let events: Vec<sluice_core::Event> = api
            .history(wid, run)
            .await
            .into_iter()
            .map(|v| serde_json::from_value(v).unwrap_or_else(|err| panic!("stored event does not parse: {err}")))
            .collect();
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        assert!(seqs.iter().enumerate().all(|(i, s)| *s == i as u64 + 1), "history of {wid} has gaps: {seqs:?}");
        // Under the limits of the engine's evaluation threads, so limits trip as they did there.
        let limits = sluice_core::expr::EvalLimits::engine(sluice_core::expr::DEFAULT_EVAL_MEMORY);
        let verdict = sluice_core::expr::run_on_eval_thread(limits, || sluice_core::replay::check(&def, &events))
            .unwrap_or_else(|e| panic!("no evaluation thread: {e}"));
        if let Err(d) = verdict {
            panic!("replay of {wid} ({name}) diverged: {d}");
        }
        checked += 1;
    }
    checked
}
