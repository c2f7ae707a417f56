//! The series the proxy keeps itself rather than in the exporter's registry:
//! every series labelled with a backend (and so all of
//! `switchyard_requests_total`). They are atomics held by the state they
//! describe, so a backend that leaves the config or the discovered set takes
//! its series with it: the exporter can expire a series only by idleness,
//! which would also drop a live but quiet backend's counters (and orphan the
//! handles the request path keeps). The caller walks the live snapshot and
//! writes each family with [`Family`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::DURATION_BUCKETS;

/// Statuses with a counter of their own; the slot after them is `error` (no
/// response). Others go to a small map, behind a lock they rarely take.
const COMMON_STATUSES: [u16; 9] = [200, 201, 204, 400, 404, 500, 502, 503, 504];

/// `switchyard_requests_total` of one (route, upstream, backend or none): the
/// finished requests by status.
#[derive(Debug, Default)]
pub struct RequestCounts {
    common: [AtomicU64; COMMON_STATUSES.len() + 1],
    rare: Mutex<BTreeMap<u16, u64>>,
}

impl RequestCounts {
    /// Counts one finished request; `None` when it ended without a response.
    pub fn count(&self, status: Option<u16>) {
        let Some(code) = status else {
            self.common[COMMON_STATUSES.len()].fetch_add(1, Ordering::Relaxed);
            return;
        };
        match COMMON_STATUSES.iter().position(|&common| common == code) {
            Some(slot) => {
                self.common[slot].fetch_add(1, Ordering::Relaxed);
            }
            None => *self.rare.lock().expect("never poisoned").entry(code).or_insert(0) += 1,
        }
    }

    /// Each status counted at least once (`None`: no response), with its count.
    fn each(&self, mut visit: impl FnMut(Option<u16>, u64)) {
        for (slot, counter) in self.common.iter().enumerate() {
            let count = counter.load(Ordering::Relaxed);
            if count > 0 {
                visit(COMMON_STATUSES.get(slot).copied(), count);
            }
        }
        for (&code, &count) in self.rare.lock().expect("never poisoned").iter() {
            visit(Some(code), count);
        }
    }
}

/// The requests that matched no route (`route="-"`): process-wide, as the
/// exporter's counter was.
pub static UNROUTED_REQUESTS: std::sync::LazyLock<RequestCounts> = std::sync::LazyLock::new(RequestCounts::default);

/// A histogram over [`DURATION_BUCKETS`], lock-free: a count per bucket (the
/// last for above them all) and the sum in nanoseconds. Recording is a search
/// of 16 bounds and two atomic adds, with no sample kept for later.
#[derive(Debug, Default)]
pub struct DurationHistogram {
    buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

/// [`DURATION_BUCKETS`] in nanoseconds.
const BUCKET_NANOS: [u64; DURATION_BUCKETS.len()] = {
    let mut nanos = [0; DURATION_BUCKETS.len()];
    let mut i = 0;
    while i < nanos.len() {
        nanos[i] = (DURATION_BUCKETS[i] * 1e9) as u64;
        i += 1;
    }
    nanos
};

impl DurationHistogram {
    pub fn record(&self, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        // `le` bounds: a value equal to a bound is in that bound's bucket.
        let bucket = BUCKET_NANOS.partition_point(|&bound| bound < nanos);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    pub fn sum(&self) -> Duration {
        Duration::from_nanos(self.sum_nanos.load(Ordering::Relaxed))
    }
}

/// What the proxy counts about one backend of one upstream, kept in its
/// state for as long as the backend stays.
#[derive(Debug, Default)]
pub struct BackendSeries {
    /// `switchyard_upstream_duration_seconds`: each try's time to response head.
    pub upstream_duration: DurationHistogram,
    /// `switchyard_backend_ejections_total`.
    ejections: AtomicU64,
    /// `switchyard_health_checks_total`, passed and failed.
    checks_passed: AtomicU64,
    checks_failed: AtomicU64,
    /// `switchyard_requests_total` of each route that sends here, by route name.
    by_route: Mutex<Vec<(Arc<str>, Arc<RequestCounts>)>>,
}

impl BackendSeries {
    pub fn ejected(&self) {
        self.ejections.fetch_add(1, Ordering::Relaxed);
    }

    pub fn ejections(&self) -> u64 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Health checks passed and failed.
    pub fn checks(&self) -> (u64, u64) {
        (self.checks_passed.load(Ordering::Relaxed), self.checks_failed.load(Ordering::Relaxed))
    }

    pub fn checked(&self, passed: bool) {
        let counter = if passed { &self.checks_passed } else { &self.checks_failed };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The requests `route` sent here. Taken when a config is compiled (and on
    /// the rare reroute), never per request: it takes a lock.
    pub fn requests_of(&self, route: &Arc<str>) -> Arc<RequestCounts> {
        let mut by_route = self.by_route.lock().expect("never poisoned");
        if let Some((_, counts)) = by_route.iter().find(|(name, _)| name == route) {
            return Arc::clone(counts);
        }
        let counts = Arc::<RequestCounts>::default();
        by_route.push((Arc::clone(route), Arc::clone(&counts)));
        counts
    }

    /// Forgets the counts of routes that no longer send here.
    pub fn keep_routes(&self, mut sends_here: impl FnMut(&str) -> bool) {
        self.by_route.lock().expect("never poisoned").retain(|(route, _)| sends_here(route));
    }
}

/// One metric family being written in the Prometheus text format: its
/// `# HELP` (for a contract name) and `# TYPE` lines first, then its series, then the blank line that ends it,
/// as the exporter writes its own families.
pub struct Family<'a> {
    out: &'a mut String,
    name: &'static str,
}

impl<'a> Family<'a> {
    pub fn counter(out: &'a mut String, name: &'static str) -> Self {
        Family::start(out, name, "counter")
    }

    pub fn gauge(out: &'a mut String, name: &'static str) -> Self {
        Family::start(out, name, "gauge")
    }

    pub fn histogram(out: &'a mut String, name: &'static str) -> Self {
        Family::start(out, name, "histogram")
    }

    fn start(out: &'a mut String, name: &'static str, kind: &str) -> Self {
        if let Some(help) = super::help(name) {
            let _ = writeln!(out, "# HELP {name} {help}");
        }
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Family { out, name }
    }

    /// The series of `counts` labelled `labels` plus `code`.
    pub fn requests(&mut self, labels: &[(&str, &str)], counts: &RequestCounts) {
        counts.each(|status, count| {
            let code = match status {
                Some(code) => itoa(code),
                None => CodeLabel::Error,
            };
            self.line("", labels, Some(("code", code.as_str())), count);
        });
    }

    pub fn value(&mut self, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.line("", labels, None, value);
    }

    pub fn histogram_value(&mut self, labels: &[(&str, &str)], histogram: &DurationHistogram) {
        let mut cumulative = 0;
        for (le, bucket) in BUCKET_LABELS.iter().zip(&histogram.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            self.line("_bucket", labels, Some(("le", le)), cumulative);
        }
        cumulative += histogram.buckets[DURATION_BUCKETS.len()].load(Ordering::Relaxed);
        self.line("_bucket", labels, Some(("le", "+Inf")), cumulative);
        let sum = histogram.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        self.line("_sum", labels, None, sum);
        // The buckets' total rather than a separate count, so a scrape that
        // races a record still sees `_count` equal to the `+Inf` bucket.
        self.line("_count", labels, None, cumulative);
    }

    fn line(
        &mut self,
        suffix: &str,
        labels: &[(&str, &str)],
        extra: Option<(&str, &str)>,
        value: impl std::fmt::Display,
    ) {
        self.out.push_str(self.name);
        self.out.push_str(suffix);
        for (i, (key, value)) in labels.iter().chain(extra.as_ref()).enumerate() {
            self.out.push(if i == 0 { '{' } else { ',' });
            let _ = write!(self.out, "{key}=\"");
            escape_label_value(self.out, value);
            self.out.push('"');
        }
        if !labels.is_empty() || extra.is_some() {
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

impl Drop for Family<'_> {
    fn drop(&mut self) {
        self.out.push('\n');
    }
}

/// A status code as a label value, without allocating.
enum CodeLabel {
    Number([u8; 3]),
    Error,
}

impl CodeLabel {
    fn as_str(&self) -> &str {
        match self {
            CodeLabel::Number(digits) => std::str::from_utf8(digits).expect("ASCII digits"),
            CodeLabel::Error => "error",
        }
    }
}

/// A status code (100-999, as `http` holds them) as three digits.
fn itoa(code: u16) -> CodeLabel {
    let digit = |n: u16| b'0' + (n % 10) as u8;
    CodeLabel::Number([digit(code / 100), digit(code / 10), digit(code)])
}

/// [`DURATION_BUCKETS`] as `le` values, written as the exporter writes them.
const BUCKET_LABELS: [&str; DURATION_BUCKETS.len()] =
    ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "30", "60", "120", "300", "600"];

/// Escapes a label value as the text format requires: backslash, double
/// quote and line feed.
fn escape_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duration_equal_to_a_bound_is_in_that_bucket_and_the_rest_above() {
        let histogram = DurationHistogram::default();
        histogram.record(Duration::from_millis(5));
        histogram.record(Duration::from_micros(5001));
        histogram.record(Duration::from_secs(3600));
        let mut out = String::new();
        Family::histogram(&mut out, "h").histogram_value(&[("backend", "a\"b")], &histogram);
        assert!(out.starts_with("# TYPE h histogram\n"), "{out}");
        assert!(out.contains("h_bucket{backend=\"a\\\"b\",le=\"0.005\"} 1\n"), "{out}");
        assert!(out.contains("h_bucket{backend=\"a\\\"b\",le=\"0.01\"} 2\n"), "{out}");
        assert!(out.contains("h_bucket{backend=\"a\\\"b\",le=\"600\"} 2\n"), "{out}");
        assert!(out.contains("h_bucket{backend=\"a\\\"b\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("h_sum{backend=\"a\\\"b\"} 3600.010001\n"), "{out}");
        assert!(out.contains("h_count{backend=\"a\\\"b\"} 3\n"), "{out}");
        assert!(out.ends_with("\n\n"), "a family ends with a blank line");
    }

    #[test]
    fn bucket_labels_are_the_bounds() {
        for (label, bound) in BUCKET_LABELS.iter().zip(DURATION_BUCKETS) {
            assert_eq!(*label, format!("{bound}"));
        }
    }

    #[test]
    fn requests_are_written_by_status_and_only_once_counted() {
        let counts = RequestCounts::default();
        counts.count(Some(200));
        counts.count(Some(200));
        counts.count(Some(418));
        counts.count(None);
        let mut out = String::new();
        Family::counter(&mut out, "r").requests(&[("route", "a")], &counts);
        assert_eq!(
            out,
            "# TYPE r counter\nr{route=\"a\",code=\"200\"} 2\nr{route=\"a\",code=\"error\"} 1\nr{route=\"a\",code=\"418\"} 1\n\n"
        );
    }

    #[test]
    fn a_route_keeps_its_counts_until_it_no_longer_sends_to_the_backend() {
        let series = BackendSeries::default();
        let (jobs, other): (Arc<str>, Arc<str>) = ("jobs".into(), "other".into());
        series.requests_of(&jobs).count(Some(200));
        series.requests_of(&other).count(Some(200));
        assert!(Arc::ptr_eq(&series.requests_of(&jobs), &series.requests_of(&jobs)));
        series.keep_routes(|route| route == "other");
        let mut out = String::new();
        Family::counter(&mut out, "r").requests(&[], &series.requests_of(&jobs));
        assert_eq!(out, "# TYPE r counter\n\n", "the dropped route's count starts over");
    }
}
