//! Evaluation budget (a local patch): a per-thread count of evaluation steps and an optional
//! deadline. Every term evaluated and every number `range` yields takes one step; when the
//! steps run out or the deadline passes, evaluation fails with an error instead of running on.
//! Both limits give the same error, so a history does not depend on which one tripped first.

use core::cell::Cell;
use std::time::Instant;

std::thread_local! {
    static FUEL: Cell<u64> = const { Cell::new(u64::MAX) };
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Limits the evaluation steps taken on this thread from now on; `u64::MAX` is no limit.
pub fn set_steps(steps: u64) {
    FUEL.with(|f| f.set(steps));
}

/// Steps left on this thread.
pub fn steps_left() -> u64 {
    FUEL.with(Cell::get)
}

/// Makes evaluations on this thread fail once `deadline` has passed; `None` removes it.
pub fn set_deadline(deadline: Option<Instant>) {
    DEADLINE.with(|d| d.set(deadline));
}

/// Takes one step.
#[inline]
pub(crate) fn burn() -> Result<(), &'static str> {
    FUEL.with(|f| {
        let left = f.get();
        if left == 0 {
            return Err("expression exceeded its evaluation budget");
        }
        f.set(left - 1);
        if left % 1024 == 0 && DEADLINE.with(Cell::get).is_some_and(|d| Instant::now() >= d) {
            f.set(0);
            return Err("expression exceeded its evaluation budget");
        }
        Ok(())
    })
}
