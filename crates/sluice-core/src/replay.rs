//! Replay: run `decide` again over a stored history and check it makes the same decisions.
//!
//! Used by tests over every history they store, and by `sluice replay` to prove that a new engine
//! build still agrees with what an older one recorded.

use crate::decide::decide;
use crate::def::WorkflowDef;
use crate::event::{Event, EventKind};
use crate::state::ExecState;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("replay diverged at seq {seq}: recorded {recorded:?}, decide now gives {produced:?}")]
pub struct Divergence {
    pub seq: u64,
    pub recorded: Vec<EventKind>,
    pub produced: Vec<EventKind>,
}

/// Checks that after every run of events from the world, `decide` yields exactly the run of
/// decision events that follows it in `history`, and nothing more at the end.
pub fn check(def: &WorkflowDef, history: &[Event]) -> Result<(), Divergence> {
    let mut st = ExecState::new();
    let mut i = 0;
    loop {
        while i < history.len() && !history[i].kind.is_decision() {
            st.apply(&history[i]);
            i += 1;
        }
        let start = i;
        while i < history.len() && history[i].kind.is_decision() {
            i += 1;
        }
        let recorded: Vec<EventKind> = history[start..i].iter().map(|e| e.kind.clone()).collect();
        let produced: Vec<EventKind> = decide(def, &mut st).into_iter().map(|e| e.kind).collect();
        if recorded != produced {
            let seq = history.get(start).map(|e| e.seq).unwrap_or(st.next_seq);
            return Err(Divergence { seq, recorded, produced });
        }
        // `st` now holds the decisions as applied by `decide`; fold the recorded copies' times.
        if let Some(last) = history[..i].last() {
            st.last_at_ms = last.at_ms;
        }
        if i >= history.len() {
            return Ok(());
        }
    }
}

/// The state after every event: what a time-travel view shows.
pub fn states(history: &[Event]) -> Vec<ExecState> {
    let mut st = ExecState::new();
    history
        .iter()
        .map(|e| {
            st.apply(e);
            st.clone()
        })
        .collect()
}
