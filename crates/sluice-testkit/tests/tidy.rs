//! Cheap convention checks over the whole workspace: every source file starts with a `//!`
//! line, no trailing whitespace, and the crate dependency direction of ARCHITECTURE.md.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn every_source_file_has_a_header_and_no_trailing_whitespace() {
    let mut files = Vec::new();
    rust_files(&root().join("crates"), &mut files);
    assert!(files.len() > 20);
    let mut problems = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let rel = f.strip_prefix(root()).unwrap_or(&f).display().to_string();
        let first = text.lines().next().unwrap_or("");
        if !first.starts_with("//!") {
            problems.push(format!("{rel}: does not start with a `//!` line"));
        }
        for (i, line) in text.lines().enumerate() {
            if line.ends_with(' ') || line.ends_with('\t') {
                problems.push(format!("{rel}:{}: trailing whitespace", i + 1));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

fn deps(krate: &str) -> Vec<String> {
    let toml = std::fs::read_to_string(root().join("crates").join(krate).join("Cargo.toml")).unwrap();
    let mut section = String::new();
    let mut out = Vec::new();
    for line in toml.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            section = line.to_string();
            continue;
        }
        if section == "[dependencies]" {
            if let Some((name, _)) = line.split_once('=') {
                let name = name.trim();
                out.push(name.strip_suffix(".workspace").unwrap_or(name).to_string());
            }
        }
    }
    out
}

/// The crates in dependency order: each may depend only on crates before it.
const ORDER: &[&str] = &[
    "sluice-core",
    "sluice-store",
    "sluice-store-sqlite",
    "sluice-store-postgres",
    "sluice-gateway",
    "sluice-auth",
    "sluice-engine",
    "sluice-server",
    "sluice-worker",
    "sluice-testkit",
    "sluice-cli",
];

#[test]
fn crates_depend_only_on_crates_above_them() {
    let present: Vec<&str> = ORDER.iter().copied().filter(|k| root().join("crates").join(k).exists()).collect();
    for entry in std::fs::read_dir(root().join("crates")).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        assert!(
            ORDER.contains(&name.as_str()),
            "crate {name} is missing from the dependency order here and in ARCHITECTURE.md"
        );
    }
    for (i, krate) in ORDER.iter().enumerate() {
        if !present.contains(krate) {
            continue;
        }
        for d in deps(krate).iter().filter(|d| d.starts_with("sluice-")) {
            let pos = ORDER.iter().position(|c| c == d).unwrap_or(usize::MAX);
            assert!(pos < i, "{krate} depends on {d}, which comes after it in ARCHITECTURE.md");
        }
    }
    assert!(deps("sluice-core").iter().all(|d| !d.starts_with("sluice-")), "sluice-core depends on nothing of ours");
    for krate in &present {
        let d = deps(krate);
        if d.contains(&"axum".to_string()) {
            // The test kit serves fake vendor APIs to tests; nothing else but the server serves HTTP.
            assert!(["sluice-server", "sluice-testkit"].contains(krate), "only the server serves HTTP ({krate})");
        }
        if d.contains(&"rusqlite".to_string()) {
            assert_eq!(*krate, "sluice-store-sqlite", "only the SQLite backend knows its driver");
        }
        if d.iter().any(|x| ["postgres", "tokio-postgres", "deadpool-postgres"].contains(&x.as_str())) {
            assert_eq!(*krate, "sluice-store-postgres", "only the PostgreSQL backend knows its driver");
        }
    }
    let core = deps("sluice-core");
    for io in ["tokio", "reqwest", "rusqlite"] {
        assert!(!core.contains(&io.to_string()), "sluice-core must not do I/O ({io})");
    }
}
