//! Log output on stderr: text for people, or one JSON object per line (`--log-format json`).
//!
//! A JSON line has `timestamp`, `level`, `target`, `trace_id`, `tenant_id` (when a tenant is in
//! scope) and `message` first, then the event's fields, then the fields of the spans it happened
//! in, innermost first (a name already written is not repeated). `trace_id` and `tenant_id` come
//! from the event itself, else from the innermost span that has them (a request, an execution, a
//! task). A line outside all of them (startup, the listening banner, shutdown, recovery) carries
//! the process trace id, drawn once at startup and logged with the startup line.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};

use sluice_engine::TraceId;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;

static JSON: AtomicBool = AtomicBool::new(false);

/// Whether logs are JSON lines: then the CLI's own notes on stderr are log lines too.
pub fn is_json() -> bool {
    JSON.load(Ordering::Relaxed)
}

/// Installs the global subscriber; `SLUICE_LOG` (an `EnvFilter`) overrides `default_level`.
/// Returns the process trace id.
pub fn init(format: &str, default_level: &str) -> TraceId {
    let process = TraceId::random();
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let registry = tracing_subscriber::registry().with(filter);
    if format == "json" {
        JSON.store(true, Ordering::Relaxed);
        registry.with(JsonLayer::new(std::io::stderr, process)).init();
    } else {
        registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr)).init();
    }
    process
}

/// What a span contributes to the lines inside it, captured once when it is created.
#[derive(Default)]
struct SpanFields {
    trace_id: Option<TraceId>,
    tenant_id: Option<String>,
    /// The other fields' JSON values, one after the other (one allocation for them all).
    values: String,
    /// Each field's name and the end of its value in `values` (it starts where the one before
    /// ends). A field recorded again is appended anew and its old entry renamed `""`.
    fields: Vec<(&'static str, usize)>,
}

impl SpanFields {
    /// The fields with their rendered values, in the order they were recorded.
    fn iter(&self) -> impl Iterator<Item = (&'static str, &str)> + '_ {
        let mut start = 0;
        self.fields.iter().map(move |(name, end)| {
            let value = self.values.get(start..*end).unwrap_or_default();
            start = *end;
            (*name, value)
        })
    }
}

/// Writes each event as one JSON line to `W`.
pub struct JsonLayer<W> {
    writer: W,
    process: TraceId,
}

impl<W> JsonLayer<W> {
    pub fn new(writer: W, process: TraceId) -> Self {
        Self { writer, process }
    }
}

/// Keys the line itself sets from the event's metadata: a field of the same name (a gateway
/// `target`, say) is written as `fields.<name>` instead.
const RESERVED: [&str; 4] = ["timestamp", "level", "target", "message"];

/// Appends `,"name":` (or `,"fields.name":` for a reserved name).
fn key(out: &mut String, name: &str) {
    out.push_str(if RESERVED.contains(&name) { ",\"fields." } else { ",\"" });
    escape(out, name);
    out.push_str("\":");
}

impl<S, W> Layer<S> for JsonLayer<W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + 'static,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = SpanFields { fields: Vec::with_capacity(attrs.fields().len()), ..SpanFields::default() };
        attrs.record(&mut SpanVisitor(&mut fields));
        span.extensions_mut().insert(fields);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        if let Some(fields) = ext.get_mut::<SpanFields>() {
            values.record(&mut SpanVisitor(fields));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        thread_local! {
            static BUF: RefCell<(String, EventFields)> = RefCell::new((String::new(), EventFields::default()));
        }
        BUF.with(|cell| {
            // A log call made while formatting (by a `Debug` impl) finds the buffer taken; it is
            // dropped rather than panicking.
            let Ok(mut guard) = cell.try_borrow_mut() else { return };
            let (line, ev) = &mut *guard;
            line.clear();
            ev.clear();
            event.record(ev);
            self.format(line, ev, event, &ctx);
            let mut w = self.writer.make_writer_for(event.metadata());
            let _ = w.write_all(line.as_bytes());
        });
    }
}

impl<W> JsonLayer<W> {
    fn format<S>(&self, line: &mut String, ev: &mut EventFields, event: &Event<'_>, ctx: &Context<'_, S>)
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let meta = event.metadata();
        line.push_str("{\"timestamp\":\"");
        let _ = SystemTime.format_time(&mut Writer::new(line));
        line.push_str("\",\"level\":\"");
        line.push_str(meta.level().as_str());
        line.push_str("\",\"target\":");
        json_str(line, ev.log_target.as_deref().unwrap_or(meta.target()));
        // Span fields go after the event's; the spans are read once, innermost first.
        let mut trace_id = ev.trace_id.take();
        let mut tenant_id = ev.tenant_id.take();
        let mut span_part = std::mem::take(&mut ev.span_part);
        span_part.clear();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope {
                let ext = span.extensions();
                let Some(f) = ext.get::<SpanFields>() else { continue };
                if trace_id.is_none() {
                    trace_id = f.trace_id;
                }
                if tenant_id.is_none() {
                    tenant_id.clone_from(&f.tenant_id);
                }
                for (name, value) in f.iter() {
                    if !name.is_empty() && !ev.names.contains(&name) {
                        ev.names.push(name);
                        key(&mut span_part, name);
                        span_part.push_str(value);
                    }
                }
            }
        }
        line.push_str(",\"trace_id\":\"");
        line.push_str(trace_id.as_ref().unwrap_or(&self.process).as_str());
        line.push('"');
        if let Some(tenant) = &tenant_id {
            line.push_str(",\"tenant_id\":");
            json_str(line, tenant);
        }
        line.push_str(",\"message\":");
        json_str(line, &ev.message);
        line.push_str(&ev.rest);
        line.push_str(&span_part);
        line.push_str("}\n");
        ev.span_part = span_part;
    }
}

/// An event's fields: `message`, `trace_id` and `tenant_id` apart, the others rendered.
#[derive(Default)]
struct EventFields {
    message: String,
    trace_id: Option<TraceId>,
    tenant_id: Option<String>,
    log_target: Option<String>,
    /// `,"name":value` for every other field.
    rest: String,
    /// Names of the fields written so far, so that none is written twice.
    names: Vec<&'static str>,
    /// Scratch space for span fields, kept to reuse its allocation.
    span_part: String,
}

impl EventFields {
    fn clear(&mut self) {
        self.message.clear();
        self.trace_id = None;
        self.tenant_id = None;
        self.log_target = None;
        self.rest.clear();
        self.names.clear();
    }

    fn field(&mut self, name: &'static str, value: impl FnOnce(&mut String)) {
        if name.starts_with("log.") || self.names.contains(&name) {
            return;
        }
        self.names.push(name);
        key(&mut self.rest, name);
        value(&mut self.rest);
    }
}

impl Visit for EventFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message.push_str(value),
            "trace_id" => self.trace_id = TraceId::parse(value),
            "tenant_id" => self.tenant_id = Some(value.to_string()),
            "log.target" => self.log_target = Some(value.to_string()),
            name => self.field(name, |out| json_str(out, value)),
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        match field.name() {
            "message" => {
                let _ = write!(self.message, "{value:?}");
            }
            "trace_id" | "tenant_id" | "log.target" => self.record_str(field, &format!("{value:?}")),
            name => self.field(name, |out| json_debug(out, value)),
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field.name(), |out| {
            let _ = write!(out, "{value}");
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field.name(), |out| {
            let _ = write!(out, "{value}");
        });
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.field(field.name(), |out| {
            let _ = write!(out, "{value}");
        });
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.field(field.name(), |out| {
            let _ = write!(out, "{value}");
        });
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field.name(), |out| out.push_str(if value { "true" } else { "false" }));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.field(field.name(), |out| json_f64(out, value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.field(field.name(), |out| json_debug(out, &format_args!("{value}")));
    }
}

struct SpanVisitor<'a>(&'a mut SpanFields);

impl SpanVisitor<'_> {
    /// Appends the value `render` writes as field `name`'s.
    fn field(&mut self, name: &'static str, render: impl FnOnce(&mut String)) {
        let f = &mut *self.0;
        if let Some(old) = f.fields.iter_mut().find(|(n, _)| *n == name) {
            old.0 = "";
        }
        render(&mut f.values);
        f.fields.push((name, f.values.len()));
    }
}

impl Visit for SpanVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "trace_id" => self.0.trace_id = TraceId::parse(value),
            "tenant_id" => self.0.tenant_id = Some(value.to_string()),
            name => self.field(name, |out| json_str(out, value)),
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        match field.name() {
            "trace_id" | "tenant_id" => self.record_str(field, &format!("{value:?}")),
            name => self.field(name, |out| json_debug(out, value)),
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field.name(), |out| {
            let _ = write!(out, "{value}");
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field.name(), |out| {
            let _ = write!(out, "{value}");
        });
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field.name(), |out| out.push_str(if value { "true" } else { "false" }));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.field(field.name(), |out| json_f64(out, value));
    }
}

/// Appends `s` as a JSON string.
fn json_str(out: &mut String, s: &str) {
    out.push('"');
    escape(out, s);
    out.push('"');
}

/// Appends `s` escaped for the inside of a JSON string. Only ASCII bytes need escaping, and
/// those never occur inside a multi-byte character, so the scan is over bytes.
fn escape(out: &mut String, s: &str) {
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let esc = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(s.get(start..i).unwrap_or_default());
        if esc.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(esc);
        }
        start = i + 1;
    }
    out.push_str(s.get(start..).unwrap_or_default());
}

/// Appends the `Debug` form of `value` as a JSON string, escaping as it is written.
fn json_debug(out: &mut String, value: &dyn fmt::Debug) {
    struct Escaper<'a>(&'a mut String);
    impl fmt::Write for Escaper<'_> {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            escape(self.0, s);
            Ok(())
        }
    }
    out.push('"');
    let _ = write!(Escaper(out), "{value:?}");
    out.push('"');
}

fn json_f64(out: &mut String, value: f64) {
    if value.is_finite() {
        let _ = write!(out, "{value}");
    } else {
        json_str(out, &value.to_string());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::{Arc, Mutex};

    use serde_json::{json, Value};
    use tracing::field::Empty;

    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Runs `f` under a JSON layer at `debug` and returns what it wrote and the process trace id.
    fn run(f: impl FnOnce()) -> (TraceId, String) {
        let sink = Sink::default();
        let out = sink.0.clone();
        let process = TraceId::random();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_subscriber::EnvFilter::new("debug"))
            .with(JsonLayer::new(move || sink.clone(), process));
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        (process, text)
    }

    fn raw_lines(f: impl FnOnce()) -> String {
        run(f).1
    }

    /// Runs `f` under a JSON layer at `debug` and returns the lines it logged, parsed.
    fn capture(f: impl FnOnce()) -> (TraceId, Vec<Value>) {
        let (process, text) = run(f);
        let lines =
            text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}"))).collect();
        (process, lines)
    }

    #[test]
    fn lines_outside_spans_carry_the_process_trace_id() {
        let (process, lines) = capture(|| tracing::info!(port = 7233, "sluice serving"));
        let line = &lines[0];
        assert_eq!(line["trace_id"], process.as_str());
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["target"], module_path!());
        assert_eq!(line["message"], "sluice serving");
        assert_eq!(line["port"], 7233);
        assert!(line.get("tenant_id").is_none());
        let ts = line["timestamp"].as_str().unwrap();
        assert!(ts.len() >= 20 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{ts}");
    }

    #[test]
    fn the_innermost_span_with_a_trace_id_wins_and_the_tenant_can_come_later() {
        let other = TraceId::random();
        let (_, lines) = capture(|| {
            let request = tracing::error_span!("request", trace_id = TRACE, tenant_id = Empty);
            let _r = request.enter();
            tracing::info!("before the tenant is known");
            request.record("tenant_id", "acme");
            let handler = tracing::info_span!("start", workflow = "hello");
            let _h = handler.enter();
            tracing::warn!(workflow_id = "w1", "inside the handler");
            let exec = tracing::error_span!(
                "execution",
                trace_id = other.as_str(),
                tenant_id = "acme",
                workflow_id = "w2",
                run_id = "r2"
            );
            let _e = exec.enter();
            tracing::debug!(step = "s1", "inside the execution");
        });
        assert_eq!(lines[0]["trace_id"], TRACE);
        assert!(lines[0].get("tenant_id").is_none(), "{}", lines[0]);
        assert_eq!(lines[1]["trace_id"], TRACE);
        assert_eq!(lines[1]["tenant_id"], "acme");
        assert_eq!((&lines[1]["workflow"], &lines[1]["workflow_id"]), (&json!("hello"), &json!("w1")));
        assert_eq!(lines[2]["trace_id"], other.as_str());
        assert_eq!(lines[2]["tenant_id"], "acme");
        assert_eq!(
            (&lines[2]["step"], &lines[2]["workflow_id"], &lines[2]["run_id"], &lines[2]["workflow"]),
            (&json!("s1"), &json!("w2"), &json!("r2"), &json!("hello")),
            "event fields, then the innermost span's, then outer ones"
        );
    }

    #[test]
    fn field_values_are_json_whatever_they_hold() {
        let (process, lines) = capture(|| {
            let err = std::io::Error::other("disk \"full\"");
            tracing::error!(
                text = "line\nbreak \"quoted\" \\ \u{1}",
                shown = %"display\tvalue",
                debugged = ?vec!["a"],
                n = -3i64,
                big = u64::MAX,
                ok = true,
                ratio = 0.5,
                nan = f64::NAN,
                error = &err as &dyn std::error::Error,
                "message with {} and \"quotes\"", 42
            );
            // An invalid trace id in an event is ignored, not copied.
            tracing::info!(trace_id = "not-a-trace", tenant_id = "t", "explicit fields");
        });
        let l = &lines[0];
        assert_eq!(l["message"], "message with 42 and \"quotes\"");
        assert_eq!(l["text"], "line\nbreak \"quoted\" \\ \u{1}");
        assert_eq!(l["shown"], "display\tvalue");
        assert_eq!(l["debugged"], "[\"a\"]");
        assert_eq!(
            (&l["n"], &l["big"], &l["ok"], &l["ratio"]),
            (&json!(-3), &json!(u64::MAX), &json!(true), &json!(0.5))
        );
        assert_eq!(l["nan"], "NaN");
        assert_eq!(l["error"], "disk \"full\"");
        assert_eq!(lines[1]["trace_id"], process.as_str());
        assert_eq!(lines[1]["tenant_id"], "t");
    }

    #[test]
    fn span_fields_keep_their_last_value_and_any_text() {
        let (_, lines) = capture(|| {
            let span = tracing::error_span!("task", trace_id = Empty, step = "a", attempt = 1u32, note = Empty);
            span.record("trace_id", TRACE);
            span.record("step", "b\u{e9}\u{2713}\"\n");
            span.record("note", tracing::field::display("shown"));
            let _s = span.enter();
            tracing::info!("x");
        });
        let l = &lines[0];
        assert_eq!(l["trace_id"], TRACE);
        assert_eq!(
            (&l["step"], &l["attempt"], &l["note"]),
            (&json!("b\u{e9}\u{2713}\"\n"), &json!(1), &json!("shown"))
        );
    }

    #[test]
    fn no_name_is_written_twice() {
        let (_, lines) = capture(|| {
            let outer = tracing::error_span!("outer", trace_id = TRACE, workflow_id = "outer", level = "span level");
            let _o = outer.enter();
            let inner = tracing::info_span!("inner", workflow_id = "inner");
            let _i = inner.enter();
            tracing::info!(workflow_id = "event", "x");
        });
        assert_eq!(lines[0]["workflow_id"], "event");
        assert_eq!(lines[0]["level"], "INFO");
        assert_eq!(lines[0]["fields.level"], "span level", "a field named like a key of the line is kept apart");
        // serde_json keeps the last of duplicate keys: count them in the raw line.
        let raw = raw_lines(|| {
            let outer = tracing::error_span!("outer", trace_id = TRACE, workflow_id = "outer");
            let _o = outer.enter();
            let inner = tracing::info_span!("inner", workflow_id = "inner");
            let _i = inner.enter();
            tracing::info!(workflow_id = "event", target = "gateway target", "x");
        });
        assert_eq!(raw.matches("workflow_id").count(), 1, "{raw}");
        assert_eq!(raw.matches("\"target\"").count(), 1, "{raw}");
        assert!(raw.contains("\"fields.target\":\"gateway target\""), "{raw}");
    }
}
