//! Evaluations: a labelled JSONL dataset run through a route (or one target), each answer read as
//! a label, and the scores (accuracy, per-class and macro precision, recall and F1), usage, cost
//! and latency per target; two runs compared with a confidence interval. `sluice eval` prints them.

pub mod answer;
pub mod compare;
pub mod dataset;
pub mod metrics;
pub mod run;

pub use compare::{compare, Comparison, Paired};
pub use dataset::{Dataset, Example, Input};
pub use metrics::{ClassScores, Predicted, Scores};
pub use run::{run, ExampleResult, Options, Run, Subject, TargetStats};
