//! Evaluation limits (a local patch): per-thread accounts that bound what one evaluation may use.
//!
//! - **Steps**: every term evaluated and every number `range` yields takes one step.
//! - **Deadline**: checked every 1,024 steps.
//! - **Stack**: the bytes of stack the evaluation has grown since it began, read from the address
//!   of a local at every step, so a recursive definition (`def f: [f]; f`) stops long before the
//!   thread's stack ends.
//! - **Memory**: the bytes allocated and not yet freed on this thread since the evaluation began,
//!   read at every step from the counting allocator ([`Counting`]) when the process installs it.
//!   Builtins that could make one huge value in a single step (string repetition, serialisation)
//!   ask [`reserve`] first.
//!
//! When a limit is passed, evaluation fails with an error instead of running on, and the limit
//! that tripped is remembered ([`tripped`]) so the caller can tell a limit from an ordinary error.
//! Steps and deadline give the same error, so a history does not depend on which one tripped
//! first.

use core::cell::Cell;
use std::alloc::{GlobalAlloc, Layout};
use std::time::Instant;

/// Which limit stopped an evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// The step budget or the deadline.
    Steps,
    /// The evaluation's stack.
    Stack,
    /// The evaluation's memory account.
    Memory,
    /// A value nested more deeply than a serialiser or parser allows.
    Depth,
}

impl Limit {
    /// The error message of an evaluation stopped by this limit.
    pub fn message(self) -> &'static str {
        match self {
            Limit::Steps => "expression exceeded its evaluation budget",
            Limit::Stack => "expression recursed too deeply",
            Limit::Memory => "expression used more memory than its limit",
            Limit::Depth => "value nests too deeply",
        }
    }
}

/// The limits of one evaluation; see [`begin`].
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Terms evaluated.
    pub steps: u64,
    /// When to stop, if ever.
    pub deadline: Option<Instant>,
    /// Bytes of stack the evaluation may grow by.
    pub stack_bytes: usize,
    /// Bytes the evaluation may hold at once (net of what it frees).
    pub memory_bytes: usize,
}

std::thread_local! {
    static FUEL: Cell<u64> = const { Cell::new(u64::MAX) };
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
    static STACK_BASE: Cell<usize> = const { Cell::new(0) };
    static STACK_LIMIT: Cell<usize> = const { Cell::new(usize::MAX) };
    static MEM_BASE: Cell<isize> = const { Cell::new(0) };
    static MEM_LIMIT: Cell<isize> = const { Cell::new(isize::MAX) };
    static TRIPPED: Cell<Option<Limit>> = const { Cell::new(None) };
    /// Bytes allocated minus bytes freed on this thread, kept by [`Counting`].
    static NET: Cell<isize> = const { Cell::new(0) };
}

#[inline(always)]
fn stack_pointer() -> usize {
    let here = 0u8;
    core::hint::black_box(&here) as *const u8 as usize
}

/// Starts an evaluation on this thread under `limits`: the stack and memory accounts start from
/// here, and nothing has tripped yet.
pub fn begin(limits: Limits) {
    FUEL.with(|f| f.set(limits.steps));
    DEADLINE.with(|d| d.set(limits.deadline));
    STACK_BASE.with(|b| b.set(stack_pointer()));
    STACK_LIMIT.with(|l| l.set(limits.stack_bytes));
    MEM_BASE.with(|b| b.set(net_bytes()));
    MEM_LIMIT.with(|l| l.set(isize::try_from(limits.memory_bytes).unwrap_or(isize::MAX)));
    TRIPPED.with(|t| t.set(None));
}

/// Ends the evaluation begun on this thread: no limits apply until the next [`begin`].
/// Returns the limit that tripped, if one did.
pub fn end() -> Option<Limit> {
    FUEL.with(|f| f.set(u64::MAX));
    DEADLINE.with(|d| d.set(None));
    STACK_LIMIT.with(|l| l.set(usize::MAX));
    MEM_LIMIT.with(|l| l.set(isize::MAX));
    TRIPPED.with(|t| t.take())
}

/// The limit that stopped the current evaluation, if any.
pub fn tripped() -> Option<Limit> {
    TRIPPED.with(Cell::get)
}

/// Records that `limit` was passed: the next step fails, and [`end`] reports it.
pub fn trip(limit: Limit) {
    TRIPPED.with(|t| {
        if t.get().is_none() {
            t.set(Some(limit));
        }
    });
}

/// Bytes allocated and not yet freed on this thread (0 without the counting allocator).
pub fn net_bytes() -> isize {
    NET.try_with(Cell::get).unwrap_or(0)
}

/// Bytes the current evaluation holds, by the memory account.
pub fn used_bytes() -> isize {
    net_bytes() - MEM_BASE.with(Cell::get)
}

/// Bytes the current evaluation may still allocate (`isize::MAX` when none is running).
pub fn remaining_bytes() -> isize {
    let limit = MEM_LIMIT.with(Cell::get);
    if limit == isize::MAX {
        return isize::MAX;
    }
    limit.saturating_sub(used_bytes()).max(0)
}

/// Asks for `bytes` more of the memory account before one builtin makes a large value in a
/// single step. Fails (and trips the memory limit) when they would not fit.
pub fn reserve(bytes: usize) -> Result<(), &'static str> {
    let limit = MEM_LIMIT.with(Cell::get);
    if limit == isize::MAX {
        return Ok(());
    }
    let want = isize::try_from(bytes).unwrap_or(isize::MAX);
    if used_bytes().saturating_add(want) > limit {
        trip(Limit::Memory);
        return Err(Limit::Memory.message());
    }
    Ok(())
}

/// Takes one step, checking every limit.
#[inline]
pub(crate) fn burn() -> Result<(), &'static str> {
    FUEL.with(|f| {
        let left = f.get();
        if left == 0 {
            trip(Limit::Steps);
            return Err(Limit::Steps.message());
        }
        f.set(left - 1);
        if left % 1024 == 0 && DEADLINE.with(Cell::get).is_some_and(|d| Instant::now() >= d) {
            f.set(0);
            trip(Limit::Steps);
            return Err(Limit::Steps.message());
        }
        Ok(())
    })?;
    if let Some(limit) = tripped() {
        return Err(limit.message());
    }
    let grown = STACK_BASE.with(Cell::get).saturating_sub(stack_pointer());
    if grown > STACK_LIMIT.with(Cell::get) {
        trip(Limit::Stack);
        return Err(Limit::Stack.message());
    }
    if used_bytes() > MEM_LIMIT.with(Cell::get) {
        trip(Limit::Memory);
        return Err(Limit::Memory.message());
    }
    Ok(())
}

/// A global allocator that keeps, per thread, the bytes allocated and not yet freed, for the
/// memory account. Wraps another allocator:
/// `#[global_allocator] static A: Counting<System> = Counting(System);`
pub struct Counting<A>(pub A);

#[inline(always)]
fn count(delta: isize) {
    // `try_with`: the allocator also runs while thread-locals are torn down.
    let _ = NET.try_with(|n| n.set(n.get().wrapping_add(delta)));
}

// The one `unsafe` item of the crate (it denies the rest).
// SAFETY: every call is passed to the wrapped allocator unchanged; the counting only touches a
// thread-local `Cell` whose initialiser is const and which has no destructor, so it neither
// allocates nor unwinds.
#[allow(unsafe_code)]
unsafe impl<A: GlobalAlloc> GlobalAlloc for Counting<A> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = self.0.alloc(layout);
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = self.0.alloc_zeroed(layout);
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        self.0.dealloc(ptr, layout);
        count(-(layout.size() as isize));
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = self.0.realloc(ptr, layout, new_size);
        if !p.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        p
    }
}
