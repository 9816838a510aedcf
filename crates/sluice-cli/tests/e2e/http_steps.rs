//! `http` steps against local servers: the egress policy (issue #13, item 6) and the cap on
//! response bodies (issue #13, item 3).
//!
//! Only loopback is ever connected to here. The private, link-local and metadata ranges
//! (10.0.0.1, 192.168.1.1, 169.254.169.254, ...) are proven denied by the unit tests of
//! `sluice-engine`'s `egress` module, through the very check an `http` step makes before it
//! sends anything: a test that sent a request there would send packets to another network the
//! day the policy broke.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

/// What the local server answers on a path.
enum Reply {
    Text(&'static str),
    Redirect(String),
    /// This many bytes, the end of the body being the end of the connection (no length).
    Bytes(usize),
    /// A body that never ends, with this status.
    Endless(u16),
}

/// A plain HTTP/1.1 server on 127.0.0.1 that answers by path and records the path of every
/// request and how many body bytes it wrote.
struct Local {
    port: u16,
    paths: Arc<Mutex<Vec<String>>>,
    sent: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Local {
    async fn start(route: impl Fn(&str, u16) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (paths, sent) = (Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicUsize::new(0)));
        let route = Arc::new(route);
        let (seen, counted) = (Arc::clone(&paths), Arc::clone(&sent));
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let (route, seen, counted) = (Arc::clone(&route), Arc::clone(&seen), Arc::clone(&counted));
                tokio::spawn(async move {
                    let _ = answer(sock, port, &*route, &seen, &counted).await;
                });
            }
        });
        Self { port, paths, sent, task }
    }

    fn paths(&self) -> Vec<String> {
        self.paths.lock().unwrap().clone()
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    mut sock: TcpStream,
    port: u16,
    route: &(dyn Fn(&str, u16) -> Reply + Send + Sync),
    seen: &Mutex<Vec<String>>,
    sent: &AtomicUsize,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match sock.read(&mut buf).await? {
            0 => return Ok(()),
            n => head.extend_from_slice(&buf[..n]),
        }
    }
    let path = String::from_utf8_lossy(&head).split_whitespace().nth(1).unwrap_or("/").to_string();
    seen.lock().unwrap().push(path.clone());
    match route(&path, port) {
        Reply::Text(body) => {
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            sock.write_all(format!("{head}{body}").as_bytes()).await
        }
        Reply::Redirect(to) => {
            let head =
                format!("HTTP/1.1 302 Found\r\nlocation: {to}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            sock.write_all(head.as_bytes()).await
        }
        Reply::Bytes(n) => {
            sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n").await?;
            sock.write_all(&vec![b'a'; n]).await?;
            sent.fetch_add(n, Ordering::Relaxed);
            sock.shutdown().await
        }
        Reply::Endless(status) => {
            let head = format!("HTTP/1.1 {status} Whatever\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n");
            sock.write_all(head.as_bytes()).await?;
            // 64 KiB a millisecond at most: plenty past any limit, yet a server that kept it all
            // (as before the fix) grows by tens of MB a second, not GB, until its timeout.
            let chunk = vec![b'a'; 64 * 1024];
            loop {
                sock.write_all(&chunk).await?;
                sent.fetch_add(chunk.len(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

/// One `http` step calling `.input.url`, tried once.
async fn publish_call(api: &Api) {
    api.publish(&json!({"name": "call", "steps": [
        {"id": "call", "type": "http", "url": ".input.url", "retry": {"max_attempts": 1},
         "timeouts": {"start_to_close": "3s"}},
        {"id": "out", "type": "return", "output": ".steps.call"}
    ]}))
    .await;
}

/// Runs `call` on each URL (all started first) and returns each execution's final row.
async fn call_each(api: &Api, prefix: &str, urls: &[String]) -> Vec<Value> {
    for (i, url) in urls.iter().enumerate() {
        api.start("call", json!({"url": url}), Some(&format!("{prefix}-{i}"))).await;
    }
    let mut rows = Vec::new();
    for i in 0..urls.len() {
        rows.push(api.wait(&format!("{prefix}-{i}"), 30).await);
    }
    rows
}

/// Loopback on port `p`, spelled every way the URL parser or the resolver accepts. (Not
/// `localhost.`: whether it resolves depends on the machine's resolver; the policy treats it as
/// `localhost`, which the unit tests show.)
fn loopback_spellings(p: u16) -> Vec<String> {
    [
        "127.0.0.1",
        "localhost",
        "LocalHost",
        "127.1",
        "2130706433",
        "0x7f000001",
        "0x7f.1",
        "0177.0.0.1",
        "127.0.0.2",
        "0.0.0.0",
        "0",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
    ]
    .iter()
    .map(|host| format!("http://{host}:{p}/"))
    .collect()
}

fn assert_denied(url: &str, row: &Value) {
    assert_eq!(row["status"], "failed", "{url}: {row}");
    assert_eq!(row["error"]["type"], "http.egress_denied", "{url}: {row}");
}

/// Issue #13, item 6: on the default policy every spelling of loopback, a name that resolves
/// to it and the server's own `/metrics` are refused with one and the same error, before any
/// connection is made.
#[tokio::test]
async fn http_steps_cannot_reach_loopback_in_any_spelling_on_the_default_policy() {
    let dir = TempDir::new("egress-default");
    let server = ServerProcess::start(&bin(), dir.path()).await;
    let local = Local::start(|_, _| Reply::Text("reached")).await;
    let api = server.api();
    publish_call(&api).await;
    let mut urls = loopback_spellings(local.port);
    urls.push(format!("https://127.0.0.1:{}/", local.port));
    urls.push(format!("http://127.0.0.1:{}/metrics", server.port));
    urls.push(format!("http://localhost:{}/metrics", server.port));

    let rows = call_each(&api, "deny", &urls).await;
    let message = rows[0]["error"]["message"].clone();
    for (url, row) in urls.iter().zip(&rows) {
        assert_denied(url, row);
        // The same words whatever the target: nothing of its address, port or answer.
        assert_eq!(row["error"]["message"], message, "{url}");
        assert!(row["error"].get("details").is_none(), "{url}: {row}");
    }
    let message = message.as_str().unwrap();
    for leak in ["127.", "::", "localhost", &local.port.to_string(), "refused", "metrics"] {
        assert!(!message.contains(leak), "the message names `{leak}`: {message}");
    }
    assert!(local.paths().is_empty(), "requests reached the local server: {:?}", local.paths());
    assert_replays(&api).await;
}

/// An allowed network admits its addresses in every spelling (the IPv4-mapped form and a name
/// resolving into it included) and nothing else on loopback.
#[tokio::test]
async fn http_steps_reach_loopback_only_where_the_allow_list_says() {
    let dir = TempDir::new("egress-allow");
    let database = dir.path().join("sluice.db").display().to_string();
    let server =
        ServerProcess::start_with_args(&bin(), dir.path(), &database, &["--egress-allow", "127.0.0.1/32"]).await;
    let local = Local::start(|_, _| Reply::Text("reached")).await;
    let api = server.api();
    publish_call(&api).await;
    let p = local.port;
    let reached: Vec<String> = ["127.0.0.1", "localhost", "127.1", "2130706433", "0x7f000001", "[::ffff:127.0.0.1]"]
        .iter()
        .map(|h| format!("http://{h}:{p}/"))
        .collect();
    let denied: Vec<String> = ["127.0.0.2", "0.0.0.0", "[::1]"].iter().map(|h| format!("http://{h}:{p}/")).collect();

    for (url, row) in reached.iter().zip(call_each(&api, "reach", &reached).await) {
        assert_eq!(row["status"], "completed", "{url}: {row}");
        assert_eq!(row["output"], json!({"status": 200, "body": "reached"}), "{url}");
    }
    for (url, row) in denied.iter().zip(call_each(&api, "still-deny", &denied).await) {
        assert_denied(url, &row);
    }
    assert_eq!(local.paths().len(), reached.len());
    assert_replays(&api).await;
}

/// Every redirect hop is checked. A test has no allowed server off loopback to redirect from,
/// so the first hop is allowed by host name (`--egress-allow localhost`: the name, whatever it
/// resolves to) and the redirects go to loopback spelled as addresses, which no entry allows;
/// a redirect to the allowed name itself is followed.
#[tokio::test]
async fn http_step_redirects_are_checked_at_every_hop() {
    let dir = TempDir::new("egress-redirect");
    let database = dir.path().join("sluice.db").display().to_string();
    let server = ServerProcess::start_with_args(&bin(), dir.path(), &database, &["--egress-allow", "localhost"]).await;
    let local = Local::start(|path, p| match path {
        "/to-literal" => Reply::Redirect(format!("http://127.0.0.1:{p}/secret")),
        "/to-short" => Reply::Redirect(format!("http://127.1:{p}/secret")),
        "/to-mapped" => Reply::Redirect(format!("http://[::ffff:127.0.0.1]:{p}/secret")),
        "/to-zero" => Reply::Redirect(format!("http://0.0.0.0:{p}/secret")),
        "/to-name" => Reply::Redirect(format!("http://localhost:{p}/secret")),
        "/loop" => Reply::Redirect(format!("http://localhost:{p}/loop")),
        _ => Reply::Text("secret"),
    })
    .await;
    let api = server.api();
    publish_call(&api).await;
    let p = local.port;
    let denied: Vec<String> = ["to-literal", "to-short", "to-mapped", "to-zero"]
        .iter()
        .map(|r| format!("http://localhost:{p}/{r}"))
        .collect();
    for (url, row) in denied.iter().zip(call_each(&api, "hop", &denied).await) {
        assert_denied(url, &row);
    }
    let direct = call_each(&api, "direct", &[format!("http://127.0.0.1:{p}/secret")]).await;
    assert_denied("the secret by address", &direct[0]);

    let followed = call_each(&api, "follow", &[format!("http://localhost:{p}/to-name")]).await;
    assert_eq!(followed[0]["output"], json!({"status": 200, "body": "secret"}), "{}", followed[0]);
    let looped = call_each(&api, "loop", &[format!("http://localhost:{p}/loop")]).await;
    assert_eq!(looped[0]["error"]["type"], "http.connect", "{}", looped[0]);

    let secret = local.paths().iter().filter(|p| *p == "/secret").count();
    assert_eq!(secret, 1, "only the redirect to the allowed name reaches /secret: {:?}", local.paths());
    assert_replays(&api).await;
}

/// A tenant's own allow-list (in `--egress-config`) applies to its steps only.
#[tokio::test]
async fn http_steps_follow_their_tenants_allow_list() {
    let dir = TempDir::new("egress-tenant");
    let database = dir.path().join("sluice.db").display().to_string();
    let config = dir.path().join("egress.yaml");
    std::fs::write(&config, "tenants:\n  globex:\n    allow: [127.0.0.1/32]\n").unwrap();
    let server = ServerProcess::start_with_args(
        &bin(),
        dir.path(),
        &database,
        &["--egress-config", &config.display().to_string()],
    )
    .await;
    let globex =
        Api::with_key(&server.base, Some(&sluice_testkit::admin_init(&bin(), dir.path(), &database, "globex")));
    let local = Local::start(|_, _| Reply::Text("reached")).await;
    let url = [format!("http://127.0.0.1:{}/", local.port)];
    let (api, globex_api) = (server.api(), globex);
    publish_call(&api).await;
    publish_call(&globex_api).await;

    assert_denied(&url[0], &call_each(&api, "default", &url).await[0]);
    let row = &call_each(&globex_api, "globex", &url).await[0];
    assert_eq!(row["output"], json!({"status": 200, "body": "reached"}), "{row}");
    assert_eq!(local.paths().len(), 1);
    assert_replays(&api).await;
    assert_replays(&globex_api).await;
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Issue #13, item 3: an endless answer fails the step with `http.too_large` as soon as it
/// passes the limit (1 MiB by default), and the server reads no further: its memory stays put.
#[tokio::test]
async fn http_step_with_an_endless_body_fails_with_too_large_and_bounded_memory() {
    let dir = TempDir::new("http-endless");
    let database = dir.path().join("sluice.db").display().to_string();
    let server =
        ServerProcess::start_with_args(&bin(), dir.path(), &database, &["--egress-allow", "127.0.0.1/32"]).await;
    let local = Local::start(|_, _| Reply::Endless(200)).await;
    let api = server.api();
    publish_call(&api).await;
    let pid = server.pid().unwrap();
    let before = rss_kib(pid);

    let started = Instant::now();
    let urls: Vec<String> = (0..4).map(|i| format!("http://127.0.0.1:{}/endless-{i}", local.port)).collect();
    for row in call_each(&api, "endless", &urls).await {
        assert_eq!(row["status"], "failed", "{row}");
        assert_eq!(row["error"]["type"], "http.too_large", "{row}");
        assert_eq!(row["error"]["details"], json!({"limit_bytes": 1048576}), "{row}");
        assert!(row["error"]["message"].as_str().unwrap().contains("1048576"), "{row}");
    }
    // Well within the steps' 3 s timeout: the limit ended them, not the clock.
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    // The connections were dropped: the local server cannot write any more.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = local.sent.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(local.sent.load(Ordering::Relaxed), sent, "the server kept reading");
    assert!(sent < 64 << 20, "{sent} bytes were sent for 4 MiB of limits");
    let after = rss_kib(pid);
    assert!(after < before + 64 * 1024, "server memory grew from {before} KiB to {after} KiB");
    assert_replays(&api).await;
}

/// `--http-max-body` sets the limit; a body up to it is kept whole, an error answer's body is
/// cut to it (the step fails with its status, as before), a larger one fails the step.
#[tokio::test]
async fn http_max_body_sets_the_limit_and_error_bodies_are_cut_to_it() {
    let dir = TempDir::new("http-max-body");
    let database = dir.path().join("sluice.db").display().to_string();
    let args = ["--egress-allow", "127.0.0.1/32", "--http-max-body", "64KiB"];
    let server = ServerProcess::start_with_args(&bin(), dir.path(), &database, &args).await;
    let local = Local::start(|path, _| match path {
        "/fits" => Reply::Bytes(64 * 1024),
        "/over" => Reply::Bytes(64 * 1024 + 1),
        _ => Reply::Endless(500),
    })
    .await;
    let api = server.api();
    publish_call(&api).await;
    let urls: Vec<String> =
        ["fits", "over", "error"].iter().map(|p| format!("http://127.0.0.1:{}/{p}", local.port)).collect();
    let rows = call_each(&api, "max", &urls).await;

    assert_eq!(rows[0]["status"], "completed", "{}", rows[0]);
    assert_eq!(rows[0]["output"]["body"].as_str().map(str::len), Some(64 * 1024));
    assert_eq!(rows[1]["error"]["type"], "http.too_large", "{}", rows[1]);
    assert_eq!(rows[1]["error"]["details"], json!({"limit_bytes": 65536}));
    assert_eq!(rows[2]["error"]["type"], "http.500", "{}", rows[2]);
    assert_eq!(rows[2]["error"]["details"].as_str().map(str::len), Some(64 * 1024));
    assert_replays(&api).await;
}

/// `sluice dev` allows loopback, so that workflows tried locally can call local services, and
/// its banner says so.
#[tokio::test]
async fn http_steps_reach_loopback_under_sluice_dev() {
    let dir = TempDir::new("egress-dev");
    let port = sluice_testkit::free_port();
    let log = dir.path().join("dev.log");
    let dev = std::process::Command::new(bin())
        .args(["dev", "--no-worker", "--port", &port.to_string(), "--examples", "no-examples-here"])
        .arg("--database")
        .arg(dir.path().join("sluice.db"))
        .env("SLUICE_LOG_FORMAT", "text")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _dev = KillOnDrop(dev);
    let deadline = Instant::now() + Duration::from_secs(30);
    let banner = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("  gateway ") {
            break text;
        }
        assert!(Instant::now() < deadline, "no banner: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let egress = banner.lines().find(|l| l.trim_start().starts_with("egress")).unwrap_or_default();
    assert!(egress.contains("127.0.0.0/8") && egress.contains("loopback"), "{banner}");
    let key = banner.split_whitespace().find(|w| w.starts_with("slk_")).unwrap();
    let api = Api::with_key(&format!("http://127.0.0.1:{port}"), Some(key));

    let local = Local::start(|_, _| Reply::Text("reached")).await;
    publish_call(&api).await;
    let row = &call_each(&api, "dev", &[format!("http://localhost:{}/", local.port)]).await[0];
    assert_eq!(row["output"], json!({"status": 200, "body": "reached"}), "{row}");
}

/// Stops a process when the test ends, failed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
