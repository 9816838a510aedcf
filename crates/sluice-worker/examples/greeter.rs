//! An example worker: serves the `greet` queue of `examples/hello.yaml`.
//!
//! ```sh
//! cargo run -p sluice-worker --example greeter -- http://127.0.0.1:7233
//! ```
#![allow(clippy::print_stdout)]

use serde_json::json;
use sluice_worker::{TaskError, Worker};

#[tokio::main]
async fn main() -> Result<(), sluice_worker::Error> {
    let server = std::env::args().nth(1).unwrap_or_else(|| "http://127.0.0.1:7233".into());
    println!("greeter polling `greet` on {server}");
    Worker::new(&server)
        .concurrency(16)
        .queue("greet", |task| async move {
            let Some(name) = task.input["name"].as_str() else {
                // Not worth retrying: the input will not change.
                return Err(TaskError::new("bad_input", "input.name must be a string").non_retryable());
            };
            Ok(json!({ "greeting": format!("Hello, {name}") }))
        })
        .run(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}
