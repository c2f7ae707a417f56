//! Logging from the `log:` section: tracing for events (`RUST_LOG` overrides
//! the level), and the access log, whose lines are written here by hand.
//!
//! Events go to `log.file`, or standard error; access lines to
//! `log.access_file`, or where events go. SIGUSR1 reopens both files (after
//! logrotate moved them), and a reload applies a new level, format or file.
//! On the request workers lines are gathered in per-thread buffers and written
//! in batches (when a buffer fills, and every [`FLUSH_EVERY`] from the worker
//! itself), so an access log costs its formatting, not a system call per
//! request. Elsewhere each line is written at once. An access line has the
//! shape tracing-subscriber gives an event (same fields, text or JSON) but is
//! formatted directly: through tracing it cost a field visitor, a timestamp
//! formatted from scratch, and colour codes per field, about 3 us a request.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Layered, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

use crate::config::{LogConfig, LogFormat, LogLevel};

/// How long a buffered line may wait before it is written.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// A buffer this full is written at once.
const FLUSH_AT: usize = 32 * 1024;

/// The two streams of lines, each to its own file or to standard error.
#[derive(Clone, Copy)]
enum Stream {
    Events = 0,
    Access = 1,
}

/// A stream's open file (`None`: standard error, or for access lines, where
/// events go). Writers read it without a lock.
struct Sink {
    file: ArcSwapOption<File>,
}

static SINKS: [Sink; 2] = [Sink { file: ArcSwapOption::const_empty() }, Sink { file: ArcSwapOption::const_empty() }];

/// The paths the sinks were opened from, held while files are opened and
/// stored, so that a reopen (SIGUSR1) and a reload (the file watcher,
/// `POST /reload`) cannot interleave and leave a stream on the wrong file.
static PATHS: Mutex<[Option<PathBuf>; 2]> = Mutex::new([None, None]);

/// The subscriber below the format layer, as reload handles name it.
type Filtered = Layered<reload::Layer<EnvFilter, Registry>, Registry>;
type FormatLayer = Box<dyn Layer<Filtered> + Send + Sync>;

/// What a reload may change in the running subscriber.
struct Handles {
    filter: reload::Handle<EnvFilter, Registry>,
    format: reload::Handle<FormatLayer, Filtered>,
    /// `RUST_LOG` was set at start: it keeps overriding `log.level`.
    level_from_env: bool,
    running: Mutex<LogConfig>,
}

static HANDLES: OnceLock<Handles> = OnceLock::new();
/// The access lines' format (events have theirs in the format layer).
static ACCESS_JSON: AtomicBool = AtomicBool::new(false);

/// A log file that could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open log file {}: {source}", path.display())]
pub struct OpenError {
    path: PathBuf,
    source: std::io::Error,
}

/// The files a reopen could not open (their streams keep the old file).
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct ReopenErrors(Vec<OpenError>);

/// Sets up logging for `run` (and the demo): the log files are opened (an
/// error if one cannot be) and the subscriber installed. A second call keeps
/// the first subscriber.
pub fn init(config: &LogConfig) -> Result<(), OpenError> {
    if HANDLES.get().is_some() {
        return Ok(());
    }
    open_sinks(config)?;
    ACCESS_JSON.store(config.format == LogFormat::Json, Ordering::Relaxed);
    let from_env = EnvFilter::try_from_default_env().ok();
    let level_from_env = from_env.is_some();
    let (filter, filter_handle) = reload::Layer::new(from_env.unwrap_or_else(|| level_filter(config.level)));
    let (format, format_handle) = reload::Layer::new(format_layer(config));
    if tracing_subscriber::registry().with(filter).with(format).try_init().is_ok() {
        let _ = HANDLES.set(Handles {
            filter: filter_handle,
            format: format_handle,
            level_from_env,
            running: Mutex::new(config.clone()),
        });
    }
    Ok(())
}

/// Applies a reloaded `log:` section: level, format and files. A file that
/// cannot be opened changes nothing (the reload fails). A no-op where [`init`]
/// was not called (a proxy embedded in tests).
pub fn apply(config: &LogConfig) -> Result<(), OpenError> {
    let Some(handles) = HANDLES.get() else { return Ok(()) };
    let mut running = handles.running.lock().expect("never poisoned");
    if *running == *config {
        return Ok(());
    }
    if running.file != config.file || running.access_file != config.access_file {
        open_sinks(config)?;
    }
    if running.level != config.level {
        if handles.level_from_env {
            tracing::warn!(level = ?config.level, "log.level changed, but RUST_LOG (set at start) decides the level");
        } else {
            let _ = handles.filter.reload(level_filter(config.level));
        }
    }
    ACCESS_JSON.store(config.format == LogFormat::Json, Ordering::Relaxed);
    let _ = handles.format.reload(format_layer(config));
    *running = config.clone();
    Ok(())
}

/// SIGUSR1: opens the log files again by their paths, so that lines go to
/// new files once logrotate has moved the old ones away. Each stream is
/// tried; one whose file cannot be opened keeps the old file.
pub fn reopen() -> Result<usize, ReopenErrors> {
    let paths = PATHS.lock().expect("never poisoned");
    let mut reopened = 0;
    let mut errors = Vec::new();
    for (sink, path) in SINKS.iter().zip(paths.iter()) {
        let Some(path) = path else { continue };
        match open(path) {
            Ok(file) => {
                sink.file.store(Some(Arc::new(file)));
                reopened += 1;
            }
            Err(error) => errors.push(error),
        }
    }
    if errors.is_empty() {
        Ok(reopened)
    } else {
        Err(ReopenErrors(errors))
    }
}

/// Opens both streams' files (the previous ones close once no line is being
/// written to them); either both change or neither does.
fn open_sinks(config: &LogConfig) -> Result<(), OpenError> {
    let mut paths = PATHS.lock().expect("never poisoned");
    let events = config.file.as_deref().map(open).transpose()?;
    let access = config.access_file.as_deref().map(open).transpose()?;
    for (sink, file) in SINKS.iter().zip([events, access]) {
        sink.file.store(file.map(Arc::new));
    }
    *paths = [config.file.clone(), config.access_file.clone()];
    Ok(())
}

fn open(path: &Path) -> Result<File, OpenError> {
    // Appended to, so a restart adds to the day's file; not readable by
    // others (paths and client addresses are in it).
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .map_err(|source| OpenError { path: path.to_owned(), source })
}

fn level_filter(level: LogLevel) -> EnvFilter {
    EnvFilter::new(match level {
        LogLevel::Error => "error",
        LogLevel::Warn => "warn",
        LogLevel::Info => "info",
        LogLevel::Debug => "debug",
        LogLevel::Trace => "trace",
    })
}

fn format_layer(config: &LogConfig) -> FormatLayer {
    // Colour only for a person at a terminal, never into a file or a collector.
    let colour = config.file.is_none() && std::io::stderr().is_terminal();
    let layer = tracing_subscriber::fmt::layer().with_ansi(colour).with_writer(Lines(Stream::Events));
    match config.format {
        LogFormat::Text => Box::new(layer),
        // Without span fields: a span opened under the text format (h2's
        // connection span, at debug) has none formatted for JSON, which
        // the JSON formatter would not survive after a reload switched it.
        LogFormat::Json => Box::new(layer.json().with_current_span(false).with_span_list(false)),
    }
}

thread_local! {
    /// This thread's pending lines per stream; `None` on threads that write at once.
    static BUFFERS: RefCell<Option<[Vec<u8>; 2]>> = const { RefCell::new(None) };
}

/// Set when the proxy stops: buffers are written out and no longer used.
static AT_ONCE: AtomicBool = AtomicBool::new(false);
static FLUSH_NOW: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// The drain starts, and the process exits when it ends: buffered threads
/// write what they hold now (woken by [`flush_now`]) and every line from now
/// on is written at once, so that none is left in a buffer at the exit.
pub fn write_at_once() {
    AT_ONCE.store(true, Ordering::Relaxed);
    FLUSH_NOW.notify_waiters();
}

/// Completes when [`write_at_once`] asks the buffered threads to flush.
pub async fn flush_now() {
    FLUSH_NOW.notified().await;
}

/// From now on this thread's log lines are buffered; the thread must call
/// [`flush_this_thread`] every [`FLUSH_EVERY`] and before it ends.
pub fn buffer_this_thread() {
    BUFFERS.with(|buffers| {
        *buffers.borrow_mut() = Some([Vec::with_capacity(FLUSH_AT), Vec::with_capacity(FLUSH_AT)]);
    });
}

/// Writes this thread's pending lines.
pub fn flush_this_thread() {
    BUFFERS.with(|buffers| {
        if let Some(buffers) = buffers.borrow_mut().as_mut() {
            for (stream, buffer) in [Stream::Events, Stream::Access].into_iter().zip(buffers) {
                write_out(stream, buffer);
            }
        }
    });
}

fn write_out(stream: Stream, buffer: &mut Vec<u8>) {
    if !buffer.is_empty() {
        write_now(stream, buffer);
        buffer.clear();
    }
}

/// Writes `lines` to the stream's file, or standard error.
fn write_now(stream: Stream, lines: &[u8]) {
    let own = SINKS[stream as usize].file.load();
    let events;
    let file = match (&*own, stream) {
        (Some(file), _) => Some(file),
        (None, Stream::Access) => {
            events = SINKS[Stream::Events as usize].file.load();
            events.as_ref()
        }
        (None, Stream::Events) => None,
    };
    // A full disk loses lines, never a request.
    let _ = match file {
        Some(file) => (&**file).write_all(lines),
        None => std::io::stderr().lock().write_all(lines),
    };
}

/// Appends to this thread's buffer of `stream` and returns true, or returns
/// false on a thread that writes at once.
fn buffered(stream: Stream, append: impl FnOnce(&mut Vec<u8>)) -> bool {
    BUFFERS.with(|buffers| match buffers.borrow_mut().as_mut() {
        Some(buffers) if AT_ONCE.load(Ordering::Relaxed) => {
            // What was buffered goes first, then this line is written at once.
            for (stream, buffer) in [Stream::Events, Stream::Access].into_iter().zip(buffers) {
                write_out(stream, buffer);
            }
            false
        }
        Some(buffers) => {
            let buffer = &mut buffers[stream as usize];
            append(buffer);
            if buffer.len() >= FLUSH_AT {
                write_out(stream, buffer);
            }
            true
        }
        None => false,
    })
}

/// Where tracing writes an event: the events stream.
struct Lines(Stream);

impl<'a> MakeWriter<'a> for Lines {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line(self.0)
    }
}

struct Line(Stream);

impl Write for Line {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        if !buffered(self.0, |buffer| buffer.extend_from_slice(line)) {
            write_now(self.0, line);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One access log line's fields (see docs/operations.md).
pub struct AccessLine<'a> {
    pub client: Option<SocketAddr>,
    pub method: &'a str,
    pub path: &'a str,
    pub route: &'a str,
    pub upstream: &'a str,
    pub backend: &'a str,
    /// `None` when the request ended without a response (`error`).
    pub status: Option<u16>,
    pub attempts: u32,
    pub queue_wait_ms: f64,
    pub duration_ms: f64,
    pub request_id: &'a str,
    /// The request's trace id with `tracing:` on, else empty.
    pub trace_id: &'a str,
    /// Whom the route's `auth:` found the request to come from (the token's
    /// `sub`, the API key's name, the certificate's name), else empty.
    pub user: &'a str,
}

/// Writes one access line, through this thread's buffer when it has one.
pub fn access(line: &AccessLine<'_>) {
    let format = if ACCESS_JSON.load(Ordering::Relaxed) { LogFormat::Json } else { LogFormat::Text };
    if !buffered(Stream::Access, |buffer| format_access(buffer, format, SystemTime::now(), line)) {
        let mut text = Vec::with_capacity(256);
        format_access(&mut text, format, SystemTime::now(), line);
        write_now(Stream::Access, &text);
    }
}

/// Appends the line as tracing-subscriber would write the event (`info!` with
/// target `access`, message `request`), colour aside.
fn format_access(out: &mut Vec<u8>, format: LogFormat, now: SystemTime, line: &AccessLine<'_>) {
    let mut out = Utf8(out);
    let status = StatusText(line.status);
    let client = ClientText(line.client);
    match format {
        LogFormat::Text => {
            // Pieces pushed one by one rather than through `write!`: the
            // formatting machinery was most of an access line's cost.
            write_timestamp(&mut out, now);
            let out = &mut *out.0;
            out.extend_from_slice(b"  INFO access: request client=");
            push_client(out, line.client);
            for (name, value) in [(&b" method="[..], line.method), (b" path=", line.path)] {
                out.extend_from_slice(name);
                out.extend_from_slice(value.as_bytes());
            }
            for (name, value) in
                [(&b" route="[..], line.route), (b" upstream=", line.upstream), (b" backend=", line.backend)]
            {
                out.extend_from_slice(name);
                push_debug_str(out, value);
            }
            out.extend_from_slice(b" status=");
            match line.status {
                Some(status) => push_decimal(out, u64::from(status)),
                None => out.extend_from_slice(b"error"),
            }
            out.extend_from_slice(b" attempts=");
            push_decimal(out, u64::from(line.attempts));
            out.extend_from_slice(b" queue_wait_ms=");
            push_debug_f64(out, line.queue_wait_ms);
            out.extend_from_slice(b" duration_ms=");
            push_debug_f64(out, line.duration_ms);
            out.extend_from_slice(b" request_id=");
            push_debug_str(out, line.request_id);
            if !line.user.is_empty() {
                out.extend_from_slice(b" user=");
                push_debug_str(out, line.user);
            }
            if !line.trace_id.is_empty() {
                out.extend_from_slice(b" trace_id=");
                push_debug_str(out, line.trace_id);
            }
        }
        LogFormat::Json => {
            out.0.extend_from_slice(b"{\"timestamp\":\"");
            write_timestamp(&mut out, now);
            let _ = write!(
                out,
                "\",\"level\":\"INFO\",\"fields\":{{\"message\":\"request\",\"client\":\"{client}\",\"method\":{},\
                 \"path\":{},\"route\":{},\"upstream\":{},\"backend\":{},\"status\":\"{status}\",\"attempts\":{},\
                 \"queue_wait_ms\":{:?},\"duration_ms\":{:?},\"request_id\":{}{}{}}},\"target\":\"access\"}}",
                Json(line.method),
                Json(line.path),
                Json(line.route),
                Json(line.upstream),
                Json(line.backend),
                line.attempts,
                line.queue_wait_ms,
                line.duration_ms,
                Json(line.request_id),
                OptionalField("user", line.user),
                OptionalField("trace_id", line.trace_id)
            );
        }
    }
    out.0.push(b'\n');
}

/// `,"name":"value"` when there is a value.
struct OptionalField<'a>(&'static str, &'a str);

impl std::fmt::Display for OptionalField<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.1.is_empty() {
            return Ok(());
        }
        write!(f, ",\"{}\":{}", self.0, Json(self.1))
    }
}

/// `client` as `SocketAddr`'s `Display` writes it, IPv4 by hand (the common
/// case, and a tenth of the cost of the formatting machinery).
fn push_client(out: &mut Vec<u8>, client: Option<SocketAddr>) {
    match client {
        Some(SocketAddr::V4(address)) => {
            for (i, octet) in address.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                push_decimal(out, u64::from(octet));
            }
            out.push(b':');
            push_decimal(out, u64::from(address.port()));
        }
        Some(address) => {
            let _ = write!(Utf8(out), "{address}");
        }
        None => {}
    }
}

fn push_decimal(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(crate::text::decimal(value, &mut [0; 20]));
}

/// `value` as `f64`'s `Debug` writes it; zero (no queue wait, most often) by hand.
fn push_debug_f64(out: &mut Vec<u8>, value: f64) {
    if value == 0.0 && value.is_sign_positive() {
        out.extend_from_slice(b"0.0");
    } else {
        let _ = write!(Utf8(out), "{value:?}");
    }
}

/// `text` as `str`'s `Debug` writes it: quoted, with escapes. Printable ASCII
/// without quotes or backslashes (config names, addresses, request ids) needs
/// none, and is copied as it is.
fn push_debug_str(out: &mut Vec<u8>, text: &str) {
    if text.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else {
        let _ = write!(Utf8(out), "{text:?}");
    }
}

/// `fmt::Write` over a byte buffer (everything written is UTF-8).
struct Utf8<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Utf8<'_> {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        self.0.extend_from_slice(text.as_bytes());
        Ok(())
    }
}

/// RFC 3339 in UTC with microseconds, as tracing-subscriber writes it. The
/// date and time of the current second are formatted once per second and thread.
fn write_timestamp(out: &mut Utf8<'_>, now: SystemTime) {
    thread_local! {
        static SECOND: RefCell<(u64, [u8; 19])> = const { RefCell::new((u64::MAX, [0; 19])) };
    }
    let since_epoch = now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let seconds = since_epoch.as_secs();
    SECOND.with(|second| {
        let mut second = second.borrow_mut();
        if second.0 != seconds {
            *second = (seconds, crate::clock::utc_date_time(seconds));
        }
        out.0.extend_from_slice(&second.1);
    });
    let micros = since_epoch.subsec_micros();
    let mut digits = *b".000000Z";
    for (at, place) in (1..7).zip([100_000, 10_000, 1_000, 100, 10, 1]) {
        digits[at] = b'0' + (micros / place % 10) as u8;
    }
    out.0.extend_from_slice(&digits);
}

struct StatusText(Option<u16>);

impl std::fmt::Display for StatusText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(status) => write!(f, "{status}"),
            None => f.write_str("error"),
        }
    }
}

struct ClientText(Option<SocketAddr>);

impl std::fmt::Display for ClientText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(client) => write!(f, "{client}"),
            None => Ok(()),
        }
    }
}

/// A JSON string literal.
struct Json<'a>(&'a str);

impl std::fmt::Display for Json<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_char('"')?;
        let mut rest = self.0;
        while let Some(at) = rest.find(|c: char| c == '"' || c == '\\' || c.is_control()) {
            f.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().expect("found above");
            match c {
                '"' => f.write_str("\\\"")?,
                '\\' => f.write_str("\\\\")?,
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                other => write!(f, "\\u{:04x}", u32::from(other))?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        f.write_str(rest)?;
        f.write_char('"')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(path: &'static str, status: Option<u16>) -> AccessLine<'static> {
        AccessLine {
            client: Some("127.0.0.1:4000".parse().unwrap()),
            method: "GET",
            path,
            route: "web",
            upstream: "pool",
            backend: "10.0.0.1:80",
            status,
            attempts: 2,
            queue_wait_ms: 0.0,
            duration_ms: 3.25,
            request_id: "req-42",
            trace_id: "",
            user: "",
        }
    }

    fn formatted(format: LogFormat, line: &AccessLine<'_>) -> String {
        let mut out = Vec::new();
        let at = SystemTime::UNIX_EPOCH + Duration::from_micros(1_764_265_681_000_042);
        format_access(&mut out, format, at, line);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_text_line_has_every_field_and_no_colour() {
        assert_eq!(
            formatted(LogFormat::Text, &line("/jobs/7", Some(200))),
            "2025-11-27T17:48:01.000042Z  INFO access: request client=127.0.0.1:4000 method=GET path=/jobs/7 \
             route=\"web\" upstream=\"pool\" backend=\"10.0.0.1:80\" status=200 attempts=2 queue_wait_ms=0.0 \
             duration_ms=3.25 request_id=\"req-42\"\n"
        );
        assert!(formatted(LogFormat::Text, &line("/", None)).contains(" status=error "));
        let traced = AccessLine { trace_id: "4bf92f3577b34da6a3ce929d0e0e4736", ..line("/", None) };
        assert!(formatted(LogFormat::Text, &traced).ends_with(" trace_id=\"4bf92f3577b34da6a3ce929d0e0e4736\"\n"));
        let user = AccessLine { user: "robot \"7\"", ..line("/", None) };
        assert!(formatted(LogFormat::Text, &user).ends_with(" user=\"robot \\\"7\\\"\"\n"));
        assert!(formatted(LogFormat::Json, &user).contains(r#","user":"robot \"7\""}"#));
    }

    #[test]
    fn text_fields_are_written_as_display_and_debug_would_write_them() {
        for client in ["0.0.0.0:0", "255.255.255.255:65535", "10.20.3.4:80", "[::1]:8080", "[fe80::1%2]:1"] {
            let client: SocketAddr = client.parse().unwrap();
            let mut out = Vec::new();
            push_client(&mut out, Some(client));
            assert_eq!(String::from_utf8(out).unwrap(), client.to_string());
        }
        for text in ["web", "", "a\"b", "back\\slash", "tab\there", "é ü", "\u{7f}", "line\nbreak", "x-req 42"] {
            let mut out = Vec::new();
            push_debug_str(&mut out, text);
            assert_eq!(String::from_utf8(out).unwrap(), format!("{text:?}"));
        }
        for value in [0.0, -0.0, 3.25, 1e-7, 1e21, 12_345.678_9] {
            let mut out = Vec::new();
            push_debug_f64(&mut out, value);
            assert_eq!(String::from_utf8(out).unwrap(), format!("{value:?}"));
        }
        for value in [0u64, 7, 10, 65_535, u64::MAX] {
            let mut out = Vec::new();
            push_decimal(&mut out, value);
            assert_eq!(String::from_utf8(out).unwrap(), value.to_string());
        }
    }

    #[test]
    fn a_json_line_parses_with_every_field_and_escapes_what_the_client_sent() {
        let text = formatted(LogFormat::Json, &line("/say\"hi\"\\", None));
        assert!(text.ends_with('\n') && text.lines().count() == 1);
        let entry: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(entry["timestamp"], "2025-11-27T17:48:01.000042Z");
        assert_eq!(entry["level"], "INFO");
        assert_eq!(entry["target"], "access");
        let fields = &entry["fields"];
        assert_eq!(fields["message"], "request");
        assert_eq!(fields["client"], "127.0.0.1:4000");
        assert_eq!(fields["path"], "/say\"hi\"\\");
        assert_eq!(fields["status"], "error");
        assert_eq!(fields["attempts"], 2);
        assert_eq!(fields["duration_ms"], 3.25);
        assert_eq!(fields["queue_wait_ms"], 0.0);
        assert_eq!(fields["request_id"], "req-42");
        assert_eq!(fields["route"], "web");
        assert_eq!(fields["upstream"], "pool");
        assert_eq!(fields["backend"], "10.0.0.1:80");
        assert_eq!(fields["method"], "GET");
        assert!(fields.get("trace_id").is_none(), "no trace id without tracing");
        let traced = AccessLine { trace_id: "4bf92f3577b34da6a3ce929d0e0e4736", ..line("/", None) };
        let entry: serde_json::Value = serde_json::from_str(&formatted(LogFormat::Json, &traced)).unwrap();
        assert_eq!(entry["fields"]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    }
}
