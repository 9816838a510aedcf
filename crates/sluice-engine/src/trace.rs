//! Trace context: W3C trace and span ids, the `traceparent` header, and the tracing spans that
//! carry a trace id (and the tenant) through engine work on an execution and its tasks.
//!
//! An execution keeps the trace id of the request that started it (in its `ExecutionStarted`
//! event); its children and continued runs inherit it. Runs started before trace ids existed get
//! one derived from their run id, so their log lines still group.

use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use sluice_core::ExecState;
use sluice_store::TaskRow;
use tracing::Span;

/// The `trace-flags` sent when the caller gave none: sampled, since every line is logged.
pub const SAMPLED: u8 = 0x01;

/// A W3C trace id: 16 bytes, never all zero, kept as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId([u8; 32]);

/// A W3C span (parent) id: 8 bytes, never all zero, kept as 16 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId([u8; 16]);

/// A parsed `traceparent` header (version `00`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: TraceId,
    pub parent_id: SpanId,
    pub flags: u8,
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_into(out: &mut [u8], mut v: u128) {
    for b in out.iter_mut().rev() {
        *b = HEX[(v & 0xf) as usize];
        v >>= 4;
    }
}

/// Whether `s` is `len` lowercase hex digits, not all `0`.
fn is_lower_hex_id(s: &[u8], len: usize) -> bool {
    s.len() == len && s.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)) && s.iter().any(|b| *b != b'0')
}

fn ascii(bytes: &[u8]) -> &str {
    // Only ASCII hex digits are ever stored.
    std::str::from_utf8(bytes).unwrap_or_default()
}

impl TraceId {
    /// A fresh random trace id.
    pub fn random() -> Self {
        let (hi, lo) = (next_u64(), next_u64());
        let v = (u128::from(hi) << 64) | u128::from(lo.max(1));
        let mut out = [0u8; 32];
        hex_into(&mut out, v);
        Self(out)
    }

    /// 32 lowercase hex digits, not all zero (the `trace-id` of a `traceparent`).
    pub fn parse(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if !is_lower_hex_id(b, 32) {
            return None;
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(b);
        Some(Self(out))
    }

    /// An `X-Trace-ID` header value: 32 hex digits in either case, not all zero.
    pub fn parse_loose(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.len() != 32 || !b.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        let mut out = [0u8; 32];
        for (o, c) in out.iter_mut().zip(b) {
            *o = c.to_ascii_lowercase();
        }
        (out.iter().any(|c| *c != b'0')).then_some(Self(out))
    }

    /// The trace id of a run whose history has none: its run id (a UUID) as hex, or failing
    /// that a hash of it. Stable, so every line about such a run carries the same one.
    pub fn for_run(run_id: &str) -> Self {
        let mut out = [0u8; 32];
        let mut n = 0;
        for c in run_id.bytes().filter(|c| *c != b'-') {
            if n == 32 || !c.is_ascii_hexdigit() {
                n = usize::MAX;
                break;
            }
            out[n] = c.to_ascii_lowercase();
            n += 1;
        }
        if n == 32 && out.iter().any(|c| *c != b'0') {
            return Self(out);
        }
        let (mut a, mut b) = (0xcbf2_9ce4_8422_2325u64, 0x8422_2325_cbf2_9ce4u64);
        for c in run_id.bytes() {
            a = (a ^ u64::from(c)).wrapping_mul(0x0100_0000_01b3);
            b = (b.rotate_left(5) ^ u64::from(c)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
        hex_into(&mut out, (u128::from(a) << 64) | u128::from(b.max(1)));
        Self(out)
    }

    /// The trace id of a run: the one it was started with, else [`TraceId::for_run`].
    pub fn of_run(state: &ExecState) -> Self {
        state.trace_id.as_deref().and_then(Self::parse).unwrap_or_else(|| Self::for_run(&state.run_id))
    }

    /// The trace id of a task: the one stored with it, else derived from its run id.
    pub fn of_task(row: &TaskRow) -> Self {
        row.trace_id.as_deref().and_then(Self::parse).unwrap_or_else(|| Self::for_run(&row.run_id))
    }

    pub fn as_str(&self) -> &str {
        ascii(&self.0)
    }
}

impl SpanId {
    /// A fresh random span id.
    pub fn random() -> Self {
        let mut out = [0u8; 16];
        hex_into(&mut out, u128::from(next_u64().max(1)));
        Self(out)
    }

    /// 16 lowercase hex digits, not all zero.
    pub fn parse(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if !is_lower_hex_id(b, 16) {
            return None;
        }
        let mut out = [0u8; 16];
        out.copy_from_slice(b);
        Some(Self(out))
    }

    pub fn as_str(&self) -> &str {
        ascii(&self.0)
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TraceParent {
    /// Parses a `traceparent` header strictly: version `00`, a 32-digit trace id and a 16-digit
    /// parent id (lowercase hex, neither all zero) and 2 hex digits of flags, separated by `-`
    /// and nothing more. Anything else is `None`: the caller starts a new trace.
    pub fn parse(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.len() != 55 || &b[..3] != b"00-" || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let trace_id = TraceId::parse(s.get(3..35)?)?;
        let parent_id = SpanId::parse(s.get(36..52)?)?;
        let flags = s.get(53..55)?;
        if !flags.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)) {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(Self { trace_id, parent_id, flags })
    }

    /// The header value `00-<trace id>-<span id>-<flags>`.
    pub fn header(trace_id: &TraceId, span_id: &SpanId, flags: u8) -> String {
        let mut s = String::with_capacity(55);
        s.push_str("00-");
        s.push_str(trace_id.as_str());
        s.push('-');
        s.push_str(span_id.as_str());
        s.push('-');
        s.push(char::from(HEX[usize::from(flags >> 4)]));
        s.push(char::from(HEX[usize::from(flags & 0xf)]));
        s
    }

    /// A `traceparent` continuing `trace_id` from a new span: what an outgoing call or a task
    /// handed to a worker carries.
    pub fn child_of(trace_id: &TraceId) -> String {
        Self::header(trace_id, &SpanId::random(), SAMPLED)
    }
}

/// The span of engine work on one execution: its lines carry the execution's trace id and tenant.
///
/// Spans are made at `ERROR` level so that they are enabled whenever any line is logged: a
/// warning inside them carries the trace id whatever `SLUICE_LOG` says.
pub fn execution_span(tenant: &str, trace_id: &TraceId, workflow_id: &str, run_id: &str) -> Span {
    tracing::error_span!("execution", trace_id = trace_id.as_str(), tenant_id = tenant, workflow_id, run_id)
}

/// The span of one task attempt (engine-run or handed to a worker).
pub fn task_span(row: &TaskRow) -> Span {
    let trace_id = TraceId::of_task(row);
    tracing::error_span!(
        "task",
        trace_id = trace_id.as_str(),
        tenant_id = row.tenant.as_str(),
        workflow_id = row.workflow_id.as_str(),
        run_id = row.run_id.as_str(),
        step = row.step.as_str(),
        attempt = row.attempt,
    )
}

/// A process-wide generator: SplitMix64 over a counter seeded once from the OS-seeded hasher
/// keys, the clock and the process id. Every id drawn in a process is distinct (the mix is a
/// bijection of the counter) and ids of different processes do not collide in practice. Ids are
/// identifiers, not secrets.
fn next_u64() -> u64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    static SEEDED: OnceLock<()> = OnceLock::new();
    SEEDED.get_or_init(|| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        crate::now_ms().hash(&mut h);
        std::process::id().hash(&mut h);
        std::thread::current().id().hash(&mut h);
        STATE.store(h.finish(), Ordering::Relaxed);
    });
    let mut z = STATE.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

    fn check(header: &str, expect: Option<(&str, &str, u8)>) {
        let got = TraceParent::parse(header).map(|p| (p.trace_id.to_string(), p.parent_id.to_string(), p.flags));
        let expect = expect.map(|(t, p, f)| (t.to_string(), p.to_string(), f));
        assert_eq!(got, expect, "traceparent {header:?}");
    }

    #[test]
    fn traceparent_parsing_is_strict() {
        check("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", Some((TRACE, "00f067aa0ba902b7", 1)));
        check("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", Some((TRACE, "00f067aa0ba902b7", 0)));
        check("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff", Some((TRACE, "00f067aa0ba902b7", 255)));
        // Other versions, including the invalid `ff`.
        check("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None);
        check("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None);
        // All-zero ids.
        check("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None);
        check("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", None);
        // Wrong lengths.
        check("00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", None);
        check("00-4bf92f3577b34da6a3ce929d0e0e47360-00f067aa0ba902b7-01", None);
        check("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01", None);
        check("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1", None);
        check("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-011", None);
        check("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", None);
        check("", None);
        // Uppercase is not the W3C form.
        check("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", None);
        check("00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01", None);
        check("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0A", None);
        // Not hex, wrong separators, padding.
        check("00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01", None);
        check("00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01", None);
        check(" 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None);
        check("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0é", None);
        check("00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None);
    }

    #[test]
    fn x_trace_id_accepts_either_case_and_nothing_else() {
        assert_eq!(TraceId::parse_loose(TRACE).map(|t| t.to_string()).as_deref(), Some(TRACE));
        assert_eq!(TraceId::parse_loose(&TRACE.to_uppercase()).map(|t| t.to_string()).as_deref(), Some(TRACE));
        for bad in [
            "",
            "4bf92f3577b34da6a3ce929d0e0e473",
            "4bf92f3577b34da6a3ce929d0e0e47361",
            "0".repeat(32).as_str(),
            "4bf92f35-77b3-4da6-a3ce-929d0e0e4736",
            "4bf92f3577b34da6a3ce929d0e0e473z",
            " 4bf92f3577b34da6a3ce929d0e0e473",
        ] {
            assert_eq!(TraceId::parse_loose(bad), None, "{bad:?}");
        }
        // The strict form refuses uppercase.
        assert_eq!(TraceId::parse(&TRACE.to_uppercase()), None);
    }

    #[test]
    fn headers_round_trip_and_new_ids_are_valid_and_distinct() {
        let trace = TraceId::random();
        let span = SpanId::random();
        let header = TraceParent::header(&trace, &span, 0x0b);
        assert_eq!(TraceParent::parse(&header), Some(TraceParent { trace_id: trace, parent_id: span, flags: 0x0b }));
        let child = TraceParent::parse(&TraceParent::child_of(&trace)).map(|p| (p.trace_id, p.flags));
        assert_eq!(child, Some((trace, SAMPLED)));
        let ids: std::collections::HashSet<String> = (0..10_000).map(|_| TraceId::random().to_string()).collect();
        assert_eq!(ids.len(), 10_000);
        assert!(ids.iter().all(|id| TraceId::parse(id).is_some()));
        let spans: std::collections::HashSet<String> = (0..10_000).map(|_| SpanId::random().to_string()).collect();
        assert_eq!(spans.len(), 10_000);
        assert!(spans.iter().all(|id| SpanId::parse(id).is_some()));
    }

    #[test]
    fn runs_without_a_trace_id_get_a_stable_one() {
        let uuid = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b";
        assert_eq!(TraceId::for_run(uuid).as_str(), "0190a1b2c3d47e5f8a9b0c1d2e3f4a5b");
        let other = TraceId::for_run("run-1");
        assert_eq!(other, TraceId::for_run("run-1"));
        assert_ne!(other, TraceId::for_run("run-2"));
        assert!(TraceId::parse(other.as_str()).is_some());
        let mut st = ExecState::new();
        st.run_id = uuid.into();
        assert_eq!(TraceId::of_run(&st).as_str(), "0190a1b2c3d47e5f8a9b0c1d2e3f4a5b");
        st.trace_id = Some(TRACE.into());
        assert_eq!(TraceId::of_run(&st).as_str(), TRACE);
    }
}
