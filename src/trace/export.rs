//! Spans out to the collector: OpenTelemetry's batch processor in front of
//! its OTLP/HTTP (protobuf) exporter. A request hands a finished span over
//! without waiting; at most [`MAX_QUEUED_SPANS`] wait for export, and a span
//! beyond them (the collector slow or down) is dropped and counted. The
//! processor's own thread sends batches, each bounded by a timeout, and
//! counts what it sent and what failed (`switchyard_trace_spans_total`).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SpanData, SpanExporter, SpanProcessor};
use opentelemetry_sdk::Resource;

use crate::config::TracingConfig;
use crate::metrics::TRACE_SPANS_TOTAL;

/// Spans waiting for export, at most; more are dropped. Under 1 KiB each
/// (what a client chooses in them is cut short).
const MAX_QUEUED_SPANS: usize = 4096;
const MAX_BATCH: usize = 512;
/// A batch goes out when it is full or this long after the last.
const EXPORT_EVERY: Duration = Duration::from_secs(1);
/// One export's bound: a collector that does not answer costs this much of
/// the export thread's time, never a request's.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// A failing export is logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Spans handed to the processor and not yet taken for export.
#[derive(Debug, Default)]
struct Waiting(AtomicUsize);

/// The OTLP exporter, counting what each batch did.
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    waiting: Arc<Waiting>,
    /// When a failure was last logged, in seconds since the Unix epoch.
    warned_at: AtomicU64,
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let count = batch.len() as u64;
        self.waiting.0.fetch_sub(batch.len(), Ordering::Relaxed);
        let result = self.inner.export(batch).await;
        let outcome = if result.is_ok() { "exported" } else { "failed" };
        metrics::counter!(TRACE_SPANS_TOTAL, "result" => outcome).increment(count);
        if let Err(error) = &result {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
            let last = self.warned_at.load(Ordering::Relaxed);
            if now >= last + WARN_EVERY.as_secs()
                && self.warned_at.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
            {
                tracing::warn!(%error, spans = count, "exporting spans failed; they are lost (logged once a minute)");
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

pub struct Exporter {
    /// What it was made for: a reload that keeps both keeps the exporter.
    endpoint: String,
    service_name: String,
    processor: BatchSpanProcessor,
    waiting: Arc<Waiting>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter").field("endpoint", &self.endpoint).finish()
    }
}

impl Exporter {
    pub fn start(config: &TracingConfig) -> Result<Exporter, String> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(config.otlp_endpoint.as_str())
            .with_timeout(EXPORT_TIMEOUT)
            .with_headers(Default::default())
            .build()
            .map_err(|error| error.to_string())?;
        let waiting = Arc::new(Waiting::default());
        let exporter = Counted { inner: exporter, waiting: Arc::clone(&waiting), warned_at: AtomicU64::new(0) };
        let batches = BatchConfigBuilder::default()
            // Room for a batch being taken besides the spans waiting: the
            // processor never drops one itself, uncounted; `export` does.
            .with_max_queue_size(MAX_QUEUED_SPANS + MAX_BATCH)
            .with_max_export_batch_size(MAX_BATCH)
            .with_scheduled_delay(EXPORT_EVERY)
            .build();
        let mut processor = BatchSpanProcessor::builder(exporter).with_batch_config(batches).build();
        let resource = Resource::builder_empty()
            .with_service_name(config.service_name.clone())
            .with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        processor.set_resource(&resource);
        Ok(Exporter {
            endpoint: config.otlp_endpoint.clone(),
            service_name: config.service_name.clone(),
            processor,
            waiting,
        })
    }

    pub fn serves(&self, config: &TracingConfig) -> bool {
        self.endpoint == config.otlp_endpoint && self.service_name == config.service_name
    }

    /// Sends what waits, and waits for that (bounded by the processor's
    /// flush timeout); blocks the calling thread.
    pub fn flush(&self) {
        if let Err(error) = self.processor.force_flush() {
            tracing::warn!(%error, "the last spans could not be sent");
        }
    }

    /// Queues a finished span, or drops it when [`MAX_QUEUED_SPANS`] wait
    /// already; never waits.
    pub fn export(&self, span: SpanData) {
        if self.waiting.0.fetch_add(1, Ordering::Relaxed) >= MAX_QUEUED_SPANS {
            self.waiting.0.fetch_sub(1, Ordering::Relaxed);
            metrics::counter!(TRACE_SPANS_TOTAL, "result" => "dropped").increment(1);
            return;
        }
        self.processor.on_end(span);
    }
}
