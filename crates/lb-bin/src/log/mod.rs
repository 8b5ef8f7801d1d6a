//! Logging: the filter, the format, and where lines go.
//!
//! # Why a buffer per worker thread
//! The access log is one line per request, and users keep it on. Written through `stdout()`
//! as each request ends, every line cost a `write(2)` (two, through its line buffer) and the
//! workers contended for its lock (0.45 futex calls per request under load). NGINX's
//! `access_log … buffer=` shows the way: each serving thread keeps its lines in a buffer of
//! its own and writes them out in one call, so there is no lock between workers and no
//! syscall per request. The buffer is written out
//!
//! * whenever the worker runs out of work (tokio's park hook), so an idle or lightly loaded
//!   lb shows each line at once;
//! * every [`FLUSH_EVERY`] at the latest ([`flush_periodically`]): a worker kept busy (by
//!   large downloads, say) may not run out of work for minutes;
//! * when the control thread is about to log a signal or a reload ([`flush_workers`]), so
//!   that a request answered before it is logged before it;
//! * before it would pass `PIPE_BUF` bytes, so that every write holds whole lines and is
//!   atomic even on a pipe shared with the other threads;
//! * when the thread ends.
//!
//! Other threads (start-up, signals, reload, health checks) log rarely and write each line
//! at once. Lines that cannot be written (stdout closed) are reported on stderr, one notice
//! per line, as tracing-subscriber reports the lines it loses.

use std::cell::RefCell;
use std::io::{self, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use crate::cli;

mod access;

/// The HTTP libraries' own targets. They log what peers do (h2 warns once per unsolicited PING
/// ack), so any client could fill the log: they log at `error` only, unless `RUST_LOG` names
/// them.
const PEER_DRIVEN_TARGETS: [&str; 3] = ["h2", "hyper", "hyper_util"];

/// Writes of up to this many bytes to a pipe are atomic (POSIX's minimum for `PIPE_BUF`,
/// and Linux's value): lines from two threads never interleave.
const PIPE_BUF: usize = 4096;

/// The log filter: `RUST_LOG` (default `info`), with [`PEER_DRIVEN_TARGETS`] at `error`
/// unless it names them.
fn filter(rust_log: Option<&str>) -> tracing_subscriber::EnvFilter {
    use tracing_subscriber::EnvFilter;
    let (mut filter, spec) = match rust_log.map(|s| (EnvFilter::try_new(s), s)) {
        Some((Ok(filter), spec)) => (filter, spec),
        _ => (EnvFilter::new("info"), "info"),
    };
    for target in PEER_DRIVEN_TARGETS {
        if names_target(spec, target) {
            continue;
        }
        if let Ok(directive) = format!("{target}=error").parse() {
            filter = filter.add_directive(directive);
        }
    }
    filter
}

/// Whether one of the filter's directives is about `target` or a module inside it.
fn names_target(spec: &str, target: &str) -> bool {
    spec.split(',').any(|directive| {
        let name = directive.split(['=', '[']).next().unwrap_or("").trim();
        name == target
            || name
                .strip_prefix(target)
                .is_some_and(|rest| rest.starts_with("::"))
    })
}

/// Logs to stdout, filtered by [`filter`]; `--log-format json` gives one JSON object per
/// line.
pub(crate) fn init(format: cli::LogFormat) {
    use tracing_subscriber::fmt::format::{Format, JsonFields};
    let rust_log = std::env::var("RUST_LOG").ok();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(rust_log.as_deref()))
        .with_writer(|| Lines)
        .with_ansi(false);
    match format {
        cli::LogFormat::Text => builder
            .event_format(access::Fast::text(Format::default()))
            .init(),
        cli::LogFormat::Json => builder
            .fmt_fields(JsonFields::new())
            .event_format(access::Fast::json(
                Format::default()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false),
            ))
            .init(),
    }
}

/// A thread's lines not written yet; whatever is left is written when the thread ends.
struct Pending(Vec<u8>);

impl Drop for Pending {
    fn drop(&mut self) {
        write_out(&mut self.0);
    }
}

thread_local! {
    /// `Some` on the threads that [`buffer_this_thread`] made buffer their lines.
    static PENDING: RefCell<Option<Pending>> = const { RefCell::new(None) };
}

/// From now on, this thread's log lines wait in its own buffer until [`flush_this_thread`]
/// (or the buffer is full, or the thread ends). For serving threads, whose runtime calls
/// [`flush_this_thread`] each time it runs out of work.
pub(crate) fn buffer_this_thread() {
    PENDING.with_borrow_mut(|p| {
        p.get_or_insert_with(|| Pending(Vec::with_capacity(PIPE_BUF)));
    });
}

/// Writes out this thread's buffered lines, if it has any.
pub(crate) fn flush_this_thread() {
    // `try_`: a line logged while the buffer is being written out (by a destructor
    // running inside the write) must not panic; it waits for the next flush.
    let _ = PENDING.try_with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            if let Some(p) = p.as_mut() {
                write_out(&mut p.0);
            }
        }
    });
}

/// The longest a worker's line waits in its buffer while the worker is busy.
pub(crate) const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// Wakes every worker's [`flush_periodically`] now.
static FLUSH_NOW: Notify = Notify::const_new();

/// Flushes done by [`flush_periodically`], over all workers.
static FLUSHES: AtomicUsize = AtomicUsize::new(0);

/// Runs on each serving thread, beside its connections: writes out the thread's lines every
/// [`FLUSH_EVERY`], and when [`flush_workers`] asks.
pub(crate) async fn flush_periodically() {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = FLUSH_NOW.notified() => {}
        }
        flush_this_thread();
        FLUSHES.fetch_add(1, Ordering::AcqRel);
    }
}

/// Has the `workers` serving threads write out their lines, and waits until they did (for
/// [`FLUSH_EVERY`] at most: a worker stuck in a long poll is not waited for).
pub(crate) async fn flush_workers(workers: usize) {
    let before = FLUSHES.load(Ordering::Acquire);
    FLUSH_NOW.notify_waiters();
    let deadline = tokio::time::Instant::now() + FLUSH_EVERY;
    while FLUSHES.load(Ordering::Acquire) < before + workers
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Writes `buf` to stdout in one call and empties it. A failed write (stdout closed, say)
/// drops the lines, said on stderr: the log must never stop the proxy.
fn write_out(buf: &mut Vec<u8>) {
    if buf.is_empty() {
        return;
    }
    if let Err(e) = io::stdout().lock().write_all(buf) {
        lost(buf, &e);
    }
    buf.clear();
}

/// Reports the lines in `buf` that could not be written, one notice each (as
/// tracing-subscriber does); stderr failing too is ignored.
fn lost(buf: &[u8], e: &io::Error) {
    let lines = buf.iter().filter(|&&b| b == b'\n').count().max(1);
    let mut err = io::stderr().lock();
    for _ in 0..lines {
        let _ = writeln!(err, "[lb] Unable to write an event to stdout! Error: {e}");
    }
}

/// Where the formatter puts each line (it hands over one whole line per `write`).
struct Lines;

impl Write for Lines {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let buffered = PENDING
            .try_with(|p| {
                let Ok(mut p) = p.try_borrow_mut() else {
                    return false;
                };
                let Some(Pending(buf)) = p.as_mut() else {
                    return false;
                };
                if !buf.is_empty() && buf.len() + line.len() > PIPE_BUF {
                    write_out(buf);
                }
                buf.extend_from_slice(line);
                if buf.len() >= PIPE_BUF {
                    // A line as long as a pipe's atomic write goes out alone.
                    write_out(buf);
                }
                true
            })
            .unwrap_or(false);
        if !buffered {
            // tracing-subscriber reports the failure on stderr.
            io::stdout().lock().write_all(line)?;
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::names_target;

    #[test]
    fn a_filter_names_a_target_only_by_a_directive_for_it() {
        assert!(!names_target("info", "h2"));
        assert!(!names_target("debug,lb=trace", "hyper"));
        assert!(!names_target("hyper_util=debug", "hyper"));
        assert!(!names_target("h2c=debug", "h2"));
        assert!(names_target("info,h2=warn", "h2"));
        assert!(names_target("h2", "h2"));
        assert!(names_target("h2::proto::ping_pong=debug", "h2"));
        assert!(names_target("hyper[conn]=debug", "hyper"));
        assert!(names_target("info, hyper_util = debug", "hyper_util"));
    }
}
