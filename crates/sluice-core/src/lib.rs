//! The deterministic heart of Sluice: workflow definitions and their validation, jq expressions,
//! history events, the execution state folded from them, and `decide`, which turns a state into
//! the next events. Nothing here performs I/O, reads a clock or draws randomness.

pub mod decide;
pub mod def;
pub mod duration;
pub mod error;
pub mod event;
pub mod expr;
pub mod replay;
pub mod retry;
pub mod schema;
pub mod state;

pub use decide::decide;
pub use def::{parse_definition, Format, Step, StepKind, WorkflowDef};
pub use error::{DefError, ErrorInfo};
pub use event::{Event, EventKind};
pub use expr::{Expr, ExprError};
pub use state::{ExecState, ExecStatus, RunLimits};
