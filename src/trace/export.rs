//! Spans out to the collector: OpenTelemetry's batch processor in front of
//! its OTLP/HTTP (protobuf) exporter. A request hands a finished span over
//! without waiting (a bounded channel: when it is full, because the
//! collector is slow or down, the span is dropped); the processor's own
//! thread sends batches, each bounded by a timeout.

use std::time::Duration;

use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SpanData, SpanProcessor};
use opentelemetry_sdk::Resource;

use crate::config::TracingConfig;

/// Spans waiting for export, at most; more are dropped. About 1 KiB each.
const MAX_QUEUED_SPANS: usize = 4096;
const MAX_BATCH: usize = 512;
/// A batch goes out when it is full or this long after the last.
const EXPORT_EVERY: Duration = Duration::from_secs(1);
/// One export's bound: a collector that does not answer costs this much of
/// the export thread's time, never a request's.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Exporter {
    /// What it was made for: a reload that keeps both keeps the exporter.
    endpoint: String,
    service_name: String,
    processor: BatchSpanProcessor,
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
        let batches = BatchConfigBuilder::default()
            .with_max_queue_size(MAX_QUEUED_SPANS)
            .with_max_export_batch_size(MAX_BATCH)
            .with_scheduled_delay(EXPORT_EVERY)
            .build();
        let mut processor = BatchSpanProcessor::builder(exporter).with_batch_config(batches).build();
        let resource = Resource::builder_empty()
            .with_service_name(config.service_name.clone())
            .with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        processor.set_resource(&resource);
        Ok(Exporter { endpoint: config.otlp_endpoint.clone(), service_name: config.service_name.clone(), processor })
    }

    pub fn serves(&self, config: &TracingConfig) -> bool {
        self.endpoint == config.otlp_endpoint && self.service_name == config.service_name
    }

    /// Queues a finished span; never waits.
    pub fn export(&self, span: SpanData) {
        self.processor.on_end(span);
    }
}
