//! Tracing setup from the `log:` section; `RUST_LOG` overrides the level.
//!
//! Lines go to standard error. On the request workers they are gathered in a
//! per-thread buffer and written in batches (when the buffer fills, and every
//! [`FLUSH_EVERY`] from the worker itself), so an access log costs its
//! formatting, not a system call per request. Elsewhere each line is written
//! at once.

use std::cell::RefCell;
use std::io::Write;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat, LogLevel};

/// How long a buffered line may wait before it is written.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// A buffer this full is written at once.
const FLUSH_AT: usize = 32 * 1024;

pub fn init(config: &LogConfig) {
    let level = match config.level {
        LogLevel::Error => "error",
        LogLevel::Warn => "warn",
        LogLevel::Info => "info",
        LogLevel::Debug => "debug",
        LogLevel::Trace => "trace",
    };
    // Access lines are emitted only when `log.access` is on, whatever the level.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(level))
        .add_directive("access=info".parse().expect("a valid directive"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(Stderr);
    // A second init (tests starting several proxies) keeps the first subscriber.
    let _ = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

thread_local! {
    /// This thread's pending lines; `None` on threads that write at once.
    static BUFFER: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

/// From now on this thread's log lines are buffered; the thread must call
/// [`flush_this_thread`] every [`FLUSH_EVERY`] and before it ends.
pub fn buffer_this_thread() {
    BUFFER.with(|buffer| *buffer.borrow_mut() = Some(Vec::with_capacity(FLUSH_AT)));
}

/// Writes this thread's pending lines.
pub fn flush_this_thread() {
    BUFFER.with(|buffer| {
        if let Some(buffer) = buffer.borrow_mut().as_mut() {
            write_out(buffer);
        }
    });
}

fn write_out(buffer: &mut Vec<u8>) {
    if !buffer.is_empty() {
        let _ = std::io::stderr().lock().write_all(buffer);
        buffer.clear();
    }
}

/// Standard error, through this thread's buffer when it has one.
struct Stderr;

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = StderrLine;

    fn make_writer(&'a self) -> StderrLine {
        StderrLine
    }
}

struct StderrLine;

impl Write for StderrLine {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let buffered = BUFFER.with(|buffer| match buffer.borrow_mut().as_mut() {
            Some(buffer) => {
                buffer.extend_from_slice(line);
                if buffer.len() >= FLUSH_AT {
                    write_out(buffer);
                }
                true
            }
            None => false,
        });
        if buffered {
            Ok(line.len())
        } else {
            std::io::stderr().write(line)
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
