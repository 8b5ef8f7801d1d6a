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
//! * [`FLUSH_EVERY`] after its first line at the latest ([`flush_periodically`]): a worker
//!   kept busy (by large downloads, say) may not run out of work for minutes. The timer runs
//!   only while lines wait, so an idle lb does not wake up for it;
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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
struct Pending {
    buf: Vec<u8>,
    /// Told when a line lands in the empty buffer: arms the thread's [`flush_periodically`].
    armed: Arc<Notify>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        write_out(&mut self.buf);
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
        p.get_or_insert_with(|| Pending {
            buf: Vec::with_capacity(PIPE_BUF),
            armed: Arc::new(Notify::new()),
        });
    });
}

/// Writes out this thread's buffered lines, if it has any.
pub(crate) fn flush_this_thread() {
    // `try_`: a line logged while the buffer is being written out (by a destructor
    // running inside the write) must not panic; it waits for the next flush.
    let _ = PENDING.try_with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            if let Some(p) = p.as_mut() {
                write_out(&mut p.buf);
            }
        }
    });
}

/// The longest a worker's line waits in its buffer while the worker is busy.
pub(crate) const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// Wakes every worker's [`flush_periodically`] now.
static FLUSH_NOW: Notify = Notify::const_new();

/// The last request of [`flush_workers`].
static FLUSH_ASKED: AtomicU64 = AtomicU64::new(0);

/// Per worker: the request of [`flush_workers`] its last flush covered.
static FLUSH_DONE: Mutex<Vec<Arc<AtomicU64>>> = Mutex::new(Vec::new());

/// Told after each flush of [`flush_periodically`], so that [`flush_workers`] goes on at once.
static FLUSHED: Notify = Notify::const_new();

/// Runs on each serving thread (after [`buffer_this_thread`]), beside its connections:
/// writes out the thread's lines [`FLUSH_EVERY`] after the first one came, and at once
/// when [`flush_workers`] asks. Waits, without a timer, while the buffer is empty.
pub(crate) async fn flush_periodically() {
    let Some(armed) = PENDING.with_borrow(|p| p.as_ref().map(|p| Arc::clone(&p.armed))) else {
        return; // not a buffering thread: its lines are written at once
    };
    let done = Arc::new(AtomicU64::new(0));
    FLUSH_DONE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(Arc::clone(&done));
    loop {
        // Listening before looking: a request made after the look still wakes us (one made
        // while we were flushing would be missed by a listener made after it).
        let asked_now = FLUSH_NOW.notified();
        tokio::pin!(asked_now);
        asked_now.as_mut().enable();
        if FLUSH_ASKED.load(Ordering::Acquire) == done.load(Ordering::Acquire) {
            tokio::select! {
                () = armed.notified() => {
                    tokio::select! {
                        () = tokio::time::sleep(FLUSH_EVERY) => {}
                        () = asked_now.as_mut() => {}
                    }
                }
                () = asked_now.as_mut() => {}
            }
        }
        // Read before the flush: every line logged before that request is in it.
        let asked = FLUSH_ASKED.load(Ordering::Acquire);
        flush_this_thread();
        done.store(asked, Ordering::Release);
        FLUSHED.notify_waiters();
    }
}

/// Has every serving thread write out its lines, and waits until each did (for
/// [`FLUSH_EVERY`] at most: a worker stuck in a long poll is not waited for).
pub(crate) async fn flush_workers() {
    let asked = FLUSH_ASKED.fetch_add(1, Ordering::AcqRel) + 1;
    FLUSH_NOW.notify_waiters();
    let all_done = || {
        FLUSH_DONE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .all(|d| d.load(Ordering::Acquire) >= asked)
    };
    let deadline = tokio::time::Instant::now() + FLUSH_EVERY;
    loop {
        let flushed = FLUSHED.notified();
        tokio::pin!(flushed);
        flushed.as_mut().enable();
        if all_done() {
            return;
        }
        tokio::select! {
            () = flushed => {}
            () = tokio::time::sleep_until(deadline) => return,
        }
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
                let Some(Pending { buf, armed }) = p.as_mut() else {
                    return false;
                };
                if !buf.is_empty() && buf.len() + line.len() > PIPE_BUF {
                    write_out(buf);
                }
                if buf.is_empty() {
                    armed.notify_one();
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
