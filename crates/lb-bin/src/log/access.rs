//! The access line, formatted fast: the same bytes tracing-subscriber's own formats write,
//! for a fraction of the work.
//!
//! # Why
//! One `lb::access` event per request, through tracing-subscriber's formatter, cost about
//! 11,000 instructions: a fifth of everything lb did for a request (callgrind). Most of it is
//! generality an access line does not need: every field goes through three `format_args!`
//! substitutions wrapped in ANSI styles that are off, and the timestamp's calendar date is
//! worked out again for every line. [`Fast`] writes `lb::access` events itself: each field's
//! name as a string, its value through one `Debug` call, and the date part of the timestamp
//! kept per thread for the second it is in. Every other event, and an access event inside a
//! span (whose format would name the span), goes to tracing-subscriber's formatter.
//!
//! The tests hold the two to the same bytes, field type by field type, in both formats.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The target of the access line (`lb_proxy`'s).
const ACCESS: &str = "lb::access";

/// tracing-subscriber's format `inner`, with the access line written by [`Fast`] itself.
pub(crate) struct Fast<F> {
    inner: F,
    json: bool,
}

impl<F> Fast<F> {
    /// Over the text format (`inner` is tracing-subscriber's `Full` format, ANSI off).
    pub(crate) const fn text(inner: F) -> Self {
        Self { inner, json: false }
    }

    /// Over the JSON format (`inner` is tracing-subscriber's `Json` format, flattened, with
    /// neither the current span nor the span list).
    pub(crate) const fn json(inner: F) -> Self {
        Self { inner, json: true }
    }
}

impl<S, N, F> FormatEvent<S, N> for Fast<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let in_span = event.parent().is_some() || ctx.lookup_current().is_some();
        if meta.target() != ACCESS || in_span || writer.has_ansi_escapes() {
            return self.inner.format_event(ctx, writer, event);
        }
        if self.json {
            json_line(&mut writer, *meta.level(), event)
        } else {
            text_line(&mut writer, *meta.level(), event)
        }
    }
}

/// `2026-12-01T16:07:01.413592Z  INFO lb::access: request method=GET …`
fn text_line(w: &mut dyn fmt::Write, level: Level, event: &Event<'_>) -> fmt::Result {
    timestamp(w)?;
    w.write_str(match level {
        Level::TRACE => " TRACE ",
        Level::DEBUG => " DEBUG ",
        Level::INFO => "  INFO ",
        Level::WARN => "  WARN ",
        Level::ERROR => " ERROR ",
    })?;
    w.write_str(event.metadata().target())?;
    w.write_str(": ")?;
    let mut fields = TextFields {
        w: &mut *w,
        first: true,
        result: Ok(()),
    };
    event.record(&mut fields);
    fields.result?;
    w.write_char('\n')
}

/// `{"timestamp":"…","level":"INFO","message":"request","method":"GET",…,"target":"lb::access"}`
fn json_line(w: &mut dyn fmt::Write, level: Level, event: &Event<'_>) -> fmt::Result {
    w.write_str("{\"timestamp\":\"")?;
    timestamp(w)?;
    w.write_str("\",\"level\":\"")?;
    w.write_str(level.as_str())?;
    w.write_char('"')?;
    let mut fields = JsonFields {
        w: &mut *w,
        result: Ok(()),
    };
    event.record(&mut fields);
    fields.result?;
    w.write_str(",\"target\":")?;
    json_str(w, event.metadata().target())?;
    w.write_str("}\n")
}

/// A field's name as tracing-subscriber shows it (raw identifiers without `r#`).
fn shown(field: &Field) -> &'static str {
    let name = field.name();
    name.strip_prefix("r#").unwrap_or(name)
}

/// tracing-subscriber's `DefaultVisitor` with ANSI off: the message bare, then ` name=value`
/// with the value's `Debug` (a `%` field's `Debug` is its `Display`).
struct TextFields<'a> {
    w: &'a mut dyn fmt::Write,
    first: bool,
    result: fmt::Result,
}

impl TextFields<'_> {
    fn field(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        self.result = (|| {
            if !std::mem::replace(&mut self.first, false) {
                self.w.write_char(' ')?;
            }
            if field.name() != "message" {
                self.w.write_str(shown(field))?;
                self.w.write_char('=')?;
            }
            write!(self.w, "{value:?}")
        })();
    }
}

impl Visit for TextFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.field(field, &format_args!("{value}"));
        } else {
            self.field(field, &value);
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        // The access line has no error fields; an error's own text, as a fallback.
        self.field(field, &format_args!("{value}"));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, value);
    }
}

/// tracing-serde's map visitor: strings and `Debug` values as JSON strings, numbers and
/// booleans as themselves.
struct JsonFields<'a> {
    w: &'a mut dyn fmt::Write,
    result: fmt::Result,
}

impl JsonFields<'_> {
    fn entry(&mut self, field: &Field, value: impl FnOnce(&mut dyn fmt::Write) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        self.result = (|| {
            self.w.write_char(',')?;
            json_str(self.w, field.name())?;
            self.w.write_char(':')?;
            value(self.w)
        })();
    }
}

impl Visit for JsonFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.entry(field, |w| json_str(w, value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.entry(field, |w| write!(w, "{value}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.entry(field, |w| write!(w, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.entry(field, |w| write!(w, "{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // serde_json's own number (its float formatting differs from `Debug`'s at the edges).
        self.entry(field, |w| {
            let text = serde_json::to_string(&value).map_err(|_| fmt::Error)?;
            w.write_str(&text)
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.entry(field, |w| {
            w.write_char('"')?;
            write!(JsonEscaped(w), "{value:?}")?;
            w.write_char('"')
        });
    }
}

/// `s` as a JSON string, escaped as serde_json escapes.
fn json_str(w: &mut dyn fmt::Write, s: &str) -> fmt::Result {
    w.write_char('"')?;
    JsonEscaped(w).write_str(s)?;
    w.write_char('"')
}

/// Escapes what is written through it as serde_json does inside a string: `"`, `\` and the
/// control characters below U+0020 (short forms where JSON has them, else `\u00XX`).
struct JsonEscaped<'a>(&'a mut dyn fmt::Write);

impl fmt::Write for JsonEscaped<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut plain = 0;
        for (i, b) in s.bytes().enumerate() {
            let escape: Option<&str> = match b {
                b'"' => Some("\\\""),
                b'\\' => Some("\\\\"),
                b'\n' => Some("\\n"),
                b'\r' => Some("\\r"),
                b'\t' => Some("\\t"),
                0x08 => Some("\\b"),
                0x0c => Some("\\f"),
                0..=0x1f => None,
                _ => continue,
            };
            self.0.write_str(&s[plain..i])?;
            match escape {
                Some(e) => self.0.write_str(e)?,
                None => write!(self.0, "\\u{b:04x}")?,
            }
            plain = i + 1;
        }
        self.0.write_str(&s[plain..])
    }
}

thread_local! {
    /// The second the date part below is for, and `YYYY-MM-DDTHH:MM:SS`.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// The wall-clock time as tracing-subscriber's `SystemTime` writes it (RFC 3339, UTC,
/// microseconds): `2026-12-01T16:07:01.413592Z`.
fn timestamp(w: &mut dyn fmt::Write) -> fmt::Result {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    SECOND.with_borrow_mut(|(at, date)| {
        if *at != secs {
            let whole = UNIX_EPOCH + std::time::Duration::from_secs(secs);
            let full = humantime::format_rfc3339_seconds(whole).to_string();
            date.clear();
            // `YYYY-MM-DDTHH:MM:SSZ` without its `Z`.
            date.push_str(full.strip_suffix('Z').unwrap_or(&full));
            *at = secs;
        }
        w.write_str(date)
    })?;
    write!(w, ".{:06}Z", now.subsec_micros())
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::format::{Format, JsonFields};

    use super::*;

    /// Collects what a subscriber writes.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// Every kind of field an event can carry, with values that need escaping.
    fn events() {
        let odd = "quote\" back\\slash\ttab\nnl\u{1}ctl é ünï";
        tracing::info!(
            target: "lb::access",
            method = %"GET",
            path = %"/a b?c=\"d\"",
            status = 200u16,
            backend = %"127.0.0.1:8080",
            attempts = 2usize,
            duration = %"6.613ms",
            duration_ms = 6.613,
            trace = %"127.0.0.1:8080 reset retry, 127.0.0.1:8081 status 200 relay",
            "request"
        );
        tracing::info!(target: "lb::access", s = odd, d = ?odd, n = -7i64, b = true, f = 1e-7, g = 3.0, h = 1e21, "x {}", 5);
        tracing::warn!(target: "lb::access", r#type = "raw", "warned");
        tracing::info!(target: "lb::access", ms = f64::NAN, "nan");
        // A message bare, as written (a newline in it would split the line for both).
        let one_line = odd.replace('\n', " ");
        tracing::error!(target: "lb::access", "only a message {one_line}");
    }

    /// The line without its timestamp, which differs by when it was taken.
    fn without_time(line: &str, json: bool) -> String {
        if json {
            let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
            let ts = v["timestamp"].as_str().unwrap().to_owned();
            assert_rfc3339_micros(&ts);
            v["timestamp"] = serde_json::Value::Null;
            // Key order matters to people reading the log: compare the raw text too.
            let raw_without = line.replacen(&ts, "", 1);
            format!("{raw_without}\n{v}")
        } else {
            let (ts, rest) = line.split_once(' ').unwrap();
            assert_rfc3339_micros(ts);
            rest.to_owned()
        }
    }

    fn assert_rfc3339_micros(ts: &str) {
        assert_eq!(ts.len(), 27, "{ts}");
        assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T' && ts.as_bytes()[19] == b'.');
        assert!(humantime::parse_rfc3339(ts).is_ok(), "{ts}");
    }

    fn lines(sink: &Sink, json: bool) -> Vec<String> {
        sink.text().lines().map(|l| without_time(l, json)).collect()
    }

    /// What `events` write through a subscriber with `fields` and `format`.
    fn written<N, E>(fields: N, format: E) -> Sink
    where
        N: for<'w> FormatFields<'w> + Send + Sync + 'static,
        E: FormatEvent<tracing_subscriber::Registry, N> + Send + Sync + 'static,
    {
        let sink = Sink::default();
        let s = sink.clone();
        let sub = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(Level::TRACE)
            .fmt_fields(fields)
            .event_format(format)
            .with_writer(move || s.clone())
            .finish();
        tracing::subscriber::with_default(sub, events);
        sink
    }

    #[test]
    fn text_lines_are_tracing_subscribers_own() {
        use tracing_subscriber::fmt::format::DefaultFields;
        let ours = written(DefaultFields::new(), Fast::text(Format::default()));
        let theirs = written(DefaultFields::new(), Format::default());
        assert_eq!(lines(&ours, false), lines(&theirs, false));
        assert_eq!(ours.text().lines().count(), 5);
    }

    #[test]
    fn json_lines_are_tracing_subscribers_own() {
        let json = || {
            Format::default()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
        };
        let ours = written(JsonFields::new(), Fast::json(json()));
        let theirs = written(JsonFields::new(), json());
        assert_eq!(lines(&ours, true), lines(&theirs, true));
        assert_eq!(ours.text().lines().count(), 5);
    }

    #[test]
    fn an_access_event_in_a_span_keeps_the_spans_format() {
        let sink = Sink::default();
        let s = sink.clone();
        let sub = tracing_subscriber::fmt()
            .with_ansi(false)
            .event_format(Fast::text(Format::default()))
            .with_writer(move || s.clone())
            .finish();
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!("conn", id = 3);
            let _in = span.enter();
            tracing::info!(target: "lb::access", status = 200u16, "request");
        });
        assert!(
            sink.text()
                .contains(" conn{id=3}: lb::access: request status=200"),
            "{}",
            sink.text()
        );
    }

    #[test]
    fn json_escaping_is_serde_jsons() {
        let all: String = (0u8..=0x7f)
            .map(char::from)
            .chain("é\u{2028}😀".chars())
            .collect();
        let mut ours = String::new();
        json_str(&mut ours, &all).unwrap();
        assert_eq!(ours, serde_json::to_string(&all).unwrap());
    }

    #[test]
    fn timestamps_match_the_clock_across_seconds() {
        for _ in 0..3 {
            let before = SystemTime::now();
            let mut ours = String::new();
            timestamp(&mut ours).unwrap();
            let after = SystemTime::now();
            let parsed = humantime::parse_rfc3339(&ours).unwrap();
            // Microseconds, truncated: within the two readings.
            assert!(
                parsed + std::time::Duration::from_micros(1) > before,
                "{ours}"
            );
            assert!(parsed <= after, "{ours}");
            std::thread::sleep(std::time::Duration::from_millis(600));
        }
    }
}
