//! `sluice eval`: runs a labelled JSONL dataset through a route of the AI gateway (in this
//! process, from the same config file as `sluice serve --gateway`) and reports accuracy,
//! precision, recall and F1 per class and macro, usage, cost and latency per target; with
//! `--compare`, a second route or target and the difference with a 95 % confidence interval.
//! The JSON shape is documented in docs/ai-gateway.md ("Evaluations").

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Map, Value};
use sluice_server::sluice_gateway::eval::{self, Comparison, Dataset, Predicted, Run, Subject};

use crate::out;

/// How a comparison's interval is computed, as the report names it.
const CI_METHOD: &str = "paired-normal";
/// Errors listed per run in the report (all of them go to `--predictions`).
const MAX_FAILURES: usize = 10;

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Labelled examples, one JSON object per line: {"input": "...", "label": "..."}.
    #[arg(long, value_name = "FILE")]
    dataset: PathBuf,
    /// The gateway config (YAML or JSON), as for `sluice serve --gateway`.
    #[arg(long, value_name = "FILE", env = "SLUICE_GATEWAY")]
    gateway: PathBuf,
    /// The route to evaluate, or one target alone: ROUTE/TARGET (or a target name found in one
    /// route only).
    #[arg(long, value_name = "ROUTE")]
    route: String,
    /// A second route or target to run the same examples through and compare with the first.
    #[arg(long, value_name = "ROUTE_OR_TARGET")]
    compare: Option<String>,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// A system prompt put before every example (instead of the dataset header's `system`).
    #[arg(long)]
    system: Option<String>,
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Writes every example's answer and prediction to this file, one JSON object per line.
    #[arg(long, value_name = "FILE")]
    predictions: Option<PathBuf>,
}

pub async fn run(args: EvalArgs, json_out: bool) -> Result<()> {
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let text = std::fs::read_to_string(&args.dataset)
        .with_context(|| format!("cannot read the dataset {}", args.dataset.display()))?;
    let dataset = eval::dataset::parse(&text)
        .map_err(|e| anyhow::anyhow!("the dataset {} is invalid:\n{e}", args.dataset.display()))?;
    let gateway = crate::server::load_gateway(&args.gateway)?;
    let subject = Subject::resolve(&gateway, &args.route).map_err(|e| anyhow::anyhow!("--route: {e}"))?;
    let other = match &args.compare {
        Some(name) => Some(Subject::resolve(&gateway, name).map_err(|e| anyhow::anyhow!("--compare: {e}"))?),
        None => None,
    };
    let options = eval::Options {
        concurrency: args.concurrency,
        system: args.system.clone().or_else(|| dataset.system.clone()),
        temperature: args.temperature,
        max_tokens: args.max_tokens,
    };
    let mut runs = Vec::new();
    for subject in std::iter::once(subject).chain(other) {
        let progress = progress_bar(&subject.name(), dataset.examples.len());
        let run = eval::run(gateway.clone(), &subject, &dataset, &options, progress).await;
        if std::io::stderr().is_terminal() {
            eprintln!();
        }
        runs.push(run);
    }
    if let Some(path) = &args.predictions {
        write_predictions(path, &dataset, &runs)?;
    }
    let comparison = match runs.as_slice() {
        [a, b] => Some(eval::compare(&a.correct(&dataset), &b.correct(&dataset))),
        _ => None,
    };
    if json_out {
        out(&report(&args, &dataset, &runs, comparison.as_ref()).to_string());
    } else {
        print_tables(&args, &dataset, &runs, comparison.as_ref());
    }
    for run in &runs {
        let failed = run.results.iter().filter(|r| r.answer.is_err()).count();
        if failed == 0 {
            continue;
        }
        let why = failure_summary(run);
        if failed == run.results.len() {
            bail!("every call through `{}` failed: {why}", run.subject.name());
        }
        eprintln!("warning: {failed} of {} calls through `{}` failed: {why}", run.results.len(), run.subject.name());
    }
    Ok(())
}

/// The distinct errors of a run, the most frequent first (at most 3), with their counts.
fn failure_summary(run: &Run) -> String {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for error in run.results.iter().filter_map(|r| r.answer.as_ref().err()) {
        match counts.iter_mut().find(|(e, _)| *e == error.as_str()) {
            Some((_, n)) => *n += 1,
            None => counts.push((error, 1)),
        }
    }
    counts.sort_by_key(|c| std::cmp::Reverse(c.1));
    let more = counts.len().saturating_sub(3);
    let mut text = counts.iter().take(3).map(|(e, n)| format!("{n} x {e}")).collect::<Vec<_>>().join("; ");
    if more > 0 {
        text.push_str(&format!("; and {more} other errors"));
    }
    text
}

/// Counts examples on stderr when it is a terminal.
fn progress_bar(name: &str, total: usize) -> Arc<dyn Fn(usize) + Send + Sync> {
    if !std::io::stderr().is_terminal() {
        return Arc::new(|_| {});
    }
    let name = name.to_string();
    Arc::new(move |done| {
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r  {name}  {done}/{total}");
        let _ = err.flush();
    })
}

fn prediction_name(dataset: &Dataset, p: Predicted) -> &str {
    match p {
        Predicted::Label(i) => dataset.labels.get(i).map_or("(invalid)", String::as_str),
        Predicted::Invalid => "(invalid)",
        Predicted::Error => "(error)",
    }
}

fn kind(subject: &Subject) -> &'static str {
    match subject {
        Subject::Route(_) => "route",
        Subject::Target { .. } => "target",
    }
}

fn ms(d: Option<Duration>) -> Value {
    d.map_or(Value::Null, |d| json!(d.as_secs_f64() * 1000.0))
}

fn write_predictions(path: &PathBuf, dataset: &Dataset, runs: &[Run]) -> Result<()> {
    let mut text = String::new();
    for run in runs {
        for (e, r) in dataset.examples.iter().zip(&run.results) {
            let mut line = json!({
                "run": run.subject.name(),
                "id": e.id,
                "line": e.line,
                "label": dataset.labels.get(e.label),
                "prediction": prediction_name(dataset, r.predicted),
                "correct": r.predicted == Predicted::Label(e.label),
                "latency_ms": r.latency.as_secs_f64() * 1000.0,
            });
            match &r.answer {
                Ok(answer) => line["answer"] = json!(answer),
                Err(error) => line["error"] = json!(error),
            }
            text.push_str(&line.to_string());
            text.push('\n');
        }
    }
    std::fs::write(path, text).with_context(|| format!("cannot write the predictions to {}", path.display()))
}

/// The `--json` report.
fn report(args: &EvalArgs, dataset: &Dataset, runs: &[Run], comparison: Option<&Comparison>) -> Value {
    let mut report = json!({
        "dataset": {
            "path": args.dataset.display().to_string(),
            "examples": dataset.examples.len(),
            "labels": dataset.labels,
        },
        "runs": runs.iter().map(|r| run_json(dataset, r)).collect::<Vec<_>>(),
    });
    if let (Some(c), [a, b]) = (comparison, runs) {
        report["comparison"] = comparison_json(c, a, b);
    }
    report
}

fn run_json(dataset: &Dataset, run: &Run) -> Value {
    let s = &run.scores;
    let mut confusion = Map::new();
    let columns: Vec<&str> = dataset.labels.iter().map(String::as_str).chain(["(invalid)", "(error)"]).collect();
    for (label, row) in dataset.labels.iter().zip(&s.confusion) {
        let cells: Map<String, Value> = columns.iter().zip(row).map(|(c, n)| (c.to_string(), json!(n))).collect();
        confusion.insert(label.clone(), Value::Object(cells));
    }
    let failures: Vec<Value> = dataset
        .examples
        .iter()
        .zip(&run.results)
        .filter_map(|(e, r)| r.answer.as_ref().err().map(|err| json!({"id": e.id, "line": e.line, "error": err})))
        .take(MAX_FAILURES)
        .collect();
    json!({
        "subject": run.subject.name(),
        "kind": kind(&run.subject),
        "examples": s.examples,
        "correct": s.correct,
        "accuracy": s.accuracy,
        "invalid": s.invalid,
        "errors": s.errors,
        "macro": {"precision": s.macro_precision, "recall": s.macro_recall, "f1": s.macro_f1},
        "classes": s.classes.iter().map(|c| json!({
            "label": c.label,
            "precision": c.precision,
            "recall": c.recall,
            "f1": c.f1,
            "support": c.support,
            "predicted": c.predicted,
        })).collect::<Vec<_>>(),
        "confusion": confusion,
        "cost_usd": run.cost_usd,
        "unpriced_calls": run.unpriced_calls,
        "latency_ms": {"p50": ms(run.latency_p50), "p95": ms(run.latency_p95)},
        "seconds": run.elapsed.as_secs_f64(),
        "targets": run.targets.iter().map(|t| json!({
            "route": t.route,
            "target": t.target,
            "provider": t.provider,
            "model": t.model,
            "calls": t.calls,
            "failed": t.failed,
            "skipped": t.skipped,
            "input_tokens": t.input_tokens,
            "output_tokens": t.output_tokens,
            "cost_usd": t.cost_usd,
            "latency_ms": {"p50": ms(t.latency_p50), "p95": ms(t.latency_p95)},
        })).collect::<Vec<_>>(),
        "failures": failures,
    })
}

fn difference(a: Option<f64>, b: Option<f64>) -> Value {
    json!({"a": a, "b": b, "difference": a.zip(b).map(|(a, b)| b - a)})
}

fn millis(d: Option<Duration>) -> Option<f64> {
    d.map(|d| d.as_secs_f64() * 1000.0)
}

fn comparison_json(c: &Comparison, a: &Run, b: &Run) -> Value {
    json!({
        "a": a.subject.name(),
        "b": b.subject.name(),
        "accuracy": {
            "a": c.accuracy_a,
            "b": c.accuracy_b,
            "difference": c.difference,
            "ci95": [c.ci95.0, c.ci95.1],
            "method": CI_METHOD,
        },
        "mcnemar": {
            "both_correct": c.paired.both_correct,
            "only_a": c.paired.only_a,
            "only_b": c.paired.only_b,
            "both_wrong": c.paired.both_wrong,
            "p_value": c.p_value,
        },
        "cost_usd": difference(a.cost_usd, b.cost_usd),
        "latency_ms": {
            "p50": difference(millis(a.latency_p50), millis(b.latency_p50)),
            "p95": difference(millis(a.latency_p95), millis(b.latency_p95)),
        },
    })
}

fn print_tables(args: &EvalArgs, dataset: &Dataset, runs: &[Run], comparison: Option<&Comparison>) {
    out(&format!(
        "dataset {}: {} examples, labels {}",
        args.dataset.display(),
        dataset.examples.len(),
        dataset.labels.join(", ")
    ));
    for run in runs {
        print_run(dataset, run);
    }
    if let (Some(c), [a, b]) = (comparison, runs) {
        print_comparison(c, a, b);
    }
}

fn usd(cost: Option<f64>) -> String {
    cost.map_or("-".to_string(), |c| format!("{c:.6}"))
}

fn ms_text(d: Option<Duration>) -> String {
    millis(d).map_or("-".to_string(), |m| format!("{m:.2}"))
}

fn print_run(dataset: &Dataset, run: &Run) {
    let s = &run.scores;
    out("");
    out(&format!(
        "{} {}  ({} examples in {:.2} s)",
        kind(&run.subject),
        run.subject.name(),
        s.examples,
        run.elapsed.as_secs_f64()
    ));
    out(&format!(
        "  accuracy  {:.4}  ({}/{})   invalid answers {}   errors {}",
        s.accuracy, s.correct, s.examples, s.invalid, s.errors
    ));
    out(&format!(
        "  macro     precision {:.4}   recall {:.4}   f1 {:.4}",
        s.macro_precision, s.macro_recall, s.macro_f1
    ));
    let width = dataset.labels.iter().map(String::len).max().unwrap_or(0).max(16);
    out("");
    out(&format!(
        "  {:<width$}  {:>9}  {:>9}  {:>9}  {:>7}  {:>9}",
        "CLASS", "PRECISION", "RECALL", "F1", "SUPPORT", "PREDICTED"
    ));
    for c in &s.classes {
        out(&format!(
            "  {:<width$}  {:>9.4}  {:>9.4}  {:>9.4}  {:>7}  {:>9}",
            c.label, c.precision, c.recall, c.f1, c.support, c.predicted
        ));
    }
    out("");
    let mut header = format!("  {:<width$}", "TRUE \\ PREDICTED");
    let columns: Vec<&str> = dataset.labels.iter().map(String::as_str).chain(["(invalid)", "(error)"]).collect();
    for c in &columns {
        header.push_str(&format!("  {c:>9}"));
    }
    out(&header);
    for (label, row) in dataset.labels.iter().zip(&s.confusion) {
        let mut line = format!("  {label:<width$}");
        for n in row {
            line.push_str(&format!("  {n:>9}"));
        }
        out(&line);
    }
    out("");
    let names: Vec<String> = run.targets.iter().map(|t| format!("{}/{}", t.route, t.target)).collect();
    let tw = names.iter().map(String::len).max().unwrap_or(0).max(6);
    out(&format!(
        "  {:<tw$}  {:>6}  {:>6}  {:>10}  {:>10}  {:>10}  {:>8}  {:>8}",
        "TARGET", "CALLS", "FAILED", "IN TOKENS", "OUT TOKENS", "COST USD", "P50 MS", "P95 MS"
    ));
    for (t, name) in run.targets.iter().zip(&names) {
        out(&format!(
            "  {name:<tw$}  {:>6}  {:>6}  {:>10}  {:>10}  {:>10}  {:>8}  {:>8}",
            t.calls,
            t.failed + t.skipped,
            t.input_tokens,
            t.output_tokens,
            usd(t.cost_usd),
            ms_text(t.latency_p50),
            ms_text(t.latency_p95)
        ));
    }
    let unpriced = if run.unpriced_calls > 0 {
        format!(" ({} calls of models without a price not counted)", run.unpriced_calls)
    } else {
        String::new()
    };
    out(&format!(
        "  total cost {} USD{unpriced}   latency per example p50 {} ms  p95 {} ms",
        usd(run.cost_usd),
        ms_text(run.latency_p50),
        ms_text(run.latency_p95)
    ));
}

fn signed(v: Option<f64>, decimals: usize) -> String {
    v.map_or("-".to_string(), |v| format!("{v:+.decimals$}"))
}

fn print_comparison(c: &Comparison, a: &Run, b: &Run) {
    out("");
    out(&format!("comparison  A = {}   B = {}   (differences are B - A)", a.subject.name(), b.subject.name()));
    out(&format!(
        "  accuracy    A {:.4}   B {:.4}   difference {:+.4}   95% CI [{:+.4}, {:+.4}]",
        c.accuracy_a, c.accuracy_b, c.difference, c.ci95.0, c.ci95.1
    ));
    out(&format!(
        "              paired normal interval; McNemar: only A right {}, only B right {}, both right {}, both wrong {}, exact p = {:.4}",
        c.paired.only_a, c.paired.only_b, c.paired.both_correct, c.paired.both_wrong, c.p_value
    ));
    let cost = a.cost_usd.zip(b.cost_usd).map(|(a, b)| b - a);
    out(&format!("  cost USD    A {}   B {}   difference {}", usd(a.cost_usd), usd(b.cost_usd), signed(cost, 6)));
    for (name, da, db) in [("p50", a.latency_p50, b.latency_p50), ("p95", a.latency_p95, b.latency_p95)] {
        let diff = millis(da).zip(millis(db)).map(|(a, b)| b - a);
        out(&format!(
            "  latency {name} A {} ms   B {} ms   difference {} ms",
            ms_text(da),
            ms_text(db),
            signed(diff, 2)
        ));
    }
}
