//! OpenTelemetry traces: spans of every request, store call, wait and
//! upstream call, exported over OTLP/HTTP when `[tracing]` (or the
//! `OTEL_*` environment) names an endpoint, and W3C Trace Context
//! (`traceparent`, `tracestate`) and `baggage` taken from the client and
//! sent on with every call idemgate makes for the request.
//!
//! The spans are `tracing` spans, turned into OpenTelemetry spans by
//! `tracing-opentelemetry`'s layer, which [`init`] adds to the process's
//! subscriber. The request's span is at `INFO`, so log lines carry its
//! ids; the spans below it are at `DEBUG`, which the log filter (`info` by
//! default) leaves to OpenTelemetry alone: formatting their fields for the
//! log would cost every request. Off, nothing is built: the proxy asks [`on`] (one atomic
//! load) before making a span, so tracing costs nothing unless it is
//! configured. [`export`] is how spans leave the process.

pub mod export;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use http::HeaderMap;
use opentelemetry::propagation::{TextMapCompositePropagator, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_sdk::trace::{Sampler as SdkSampler, SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;

use crate::config::traces::{Sampler, TracesConfig};
use crate::idempotency::record::Origin;

static ON: AtomicBool = AtomicBool::new(false);
/// `[tracing]`'s sampler and ratio, set once by [`init`].
static SAMPLER: OnceLock<(Sampler, f64)> = OnceLock::new();

/// Whether spans are made and exported (set once, by [`init`]).
#[inline]
pub fn on() -> bool {
    ON.load(Ordering::Relaxed)
}

fn propagator() -> &'static TextMapCompositePropagator {
    static P: OnceLock<TextMapCompositePropagator> = OnceLock::new();
    P.get_or_init(|| {
        TextMapCompositePropagator::new(vec![
            Box::new(TraceContextPropagator::new()),
            Box::new(BaggagePropagator::new()),
        ])
    })
}

/// The client's trace context (and baggage) from its request's headers.
pub fn extract(headers: &HeaderMap) -> Context {
    propagator().extract(&opentelemetry_http::HeaderExtractor(headers))
}

/// Writes `cx` into an outgoing request's headers (replacing the
/// client's `traceparent`, `tracestate` and `baggage`).
pub fn inject(cx: &Context, headers: &mut HeaderMap) {
    if cx.span().span_context().is_valid() {
        propagator().inject_context(cx, &mut opentelemetry_http::HeaderInjector(headers));
    }
}

/// The trace id and span id of `cx`'s span, as hex, if it has one.
pub fn ids(cx: &Context) -> Option<(String, String)> {
    let sc = cx.span().span_context().clone();
    sc.is_valid()
        .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
}

/// The trace of the request being served, to keep in its record: the
/// current span's context, when it is sampled (with traces on).
pub fn origin() -> Option<Origin> {
    if !on() {
        return None;
    }
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = tracing::Span::current().context();
    let sc = cx.span().span_context().clone();
    (sc.is_valid() && sc.is_sampled()).then(|| Origin {
        trace_id: sc.trace_id().to_bytes(),
        span_id: sc.span_id().to_bytes(),
        flags: sc.trace_flags().to_u8(),
    })
}

/// Links the current span to the request that made a replayed record
/// (with traces on): "which request actually ran?" from any retry's trace.
pub fn link_to_origin(origin: Option<&Origin>) {
    let (true, Some(o)) = (on(), origin) else {
        return;
    };
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let sc = SpanContext::new(
        TraceId::from_bytes(o.trace_id),
        SpanId::from_bytes(o.span_id),
        TraceFlags::new(o.flags),
        true,
        TraceState::default(),
    );
    tracing::Span::current().add_link(sc);
}

/// What [`init`] built: the tracer for the layer, the exporter's handle.
pub struct Tracing {
    pub tracer: SdkTracer,
    provider: SdkTracerProvider,
    sender: export::Sender,
}

impl Tracing {
    /// Exports what is queued, waiting at most `within` (at shutdown).
    pub async fn flush(&self, within: Duration) {
        self.sender.flush(within).await;
        let _ = self.provider.shutdown();
    }
}

/// Whether a request whose parent context is `parent` is sampled, by
/// `[tracing]`'s sampler. Decided here, before any span is made, so an
/// unsampled request makes none (the SDK then samples every span it is
/// given). The ratio is the SDK's own rule on the trace id's low 8 bytes.
pub fn sampled(parent: &Context) -> bool {
    let Some((sampler, ratio)) = SAMPLER.get().copied() else {
        return false;
    };
    let sc = parent.span().span_context().clone();
    let by_ratio = || {
        let id = if sc.is_valid() {
            sc.trace_id().to_bytes()
        } else {
            rand::random::<[u8; 16]>()
        };
        let low = u64::from_be_bytes(id[8..].try_into().unwrap_or_default()) >> 1;
        (low as f64) < ratio * (1u64 << 63) as f64
    };
    match sampler {
        Sampler::AlwaysOn => true,
        Sampler::AlwaysOff => false,
        Sampler::TraceIdRatio => by_ratio(),
        Sampler::ParentBasedAlwaysOn if sc.is_valid() => sc.is_sampled(),
        Sampler::ParentBasedAlwaysOff if sc.is_valid() => sc.is_sampled(),
        Sampler::ParentBasedTraceIdRatio if sc.is_valid() => sc.is_sampled(),
        Sampler::ParentBasedAlwaysOn => true,
        Sampler::ParentBasedAlwaysOff => false,
        Sampler::ParentBasedTraceIdRatio => by_ratio(),
    }
}

/// For a request that is not sampled: a `traceparent` that carries the
/// decision on (the client's trace, or a new one; a new span id; flags
/// `00`), so the services below do not sample what this one dropped.
pub fn unsampled_traceparent(parent: &Context) -> http::HeaderValue {
    let sc = parent.span().span_context().clone();
    let trace = if sc.is_valid() {
        sc.trace_id().to_string()
    } else {
        opentelemetry::trace::TraceId::from_bytes(rand::random()).to_string()
    };
    let span = opentelemetry::trace::SpanId::from_bytes(rand::random());
    http::HeaderValue::try_from(format!("00-{trace}-{span}-00")).unwrap_or(
        http::HeaderValue::from_static("00-00000000000000000000000000000000-0000000000000000-00"),
    )
}

/// Whether the code running now is inside a sampled request's span (child
/// spans are made only then).
pub fn in_sampled_request() -> bool {
    on() && !tracing::Span::current().is_none()
}

/// Builds the exporter and the tracer, and turns spans on; `None` when
/// `[tracing]` names no endpoint. Call within the runtime.
pub fn init(t: &TracesConfig, dropped: prometheus::IntCounter) -> Result<Option<Tracing>, String> {
    let Some(endpoint) = &t.endpoint else {
        return Ok(None);
    };
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(export::Http::new()?)
        .with_endpoint(endpoint.to_string())
        .with_timeout(t.timeout)
        .with_headers(t.headers.clone().into_iter().collect())
        .build()
        .map_err(|e| format!("tracing exporter: {e}"))?;
    let mut attributes: Vec<KeyValue> = t
        .resource_attributes
        .iter()
        .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
        .collect();
    attributes.push(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    let resource = Resource::builder_empty()
        .with_attributes(attributes)
        .with_service_name(t.service_name.clone())
        .build();
    opentelemetry_sdk::trace::SpanExporter::set_resource(&mut exporter, &resource);
    let (queue, sender) = export::start(exporter, export::Drops::new(dropped), t.timeout);
    let provider = SdkTracerProvider::builder()
        .with_span_processor(queue)
        // The decision is made once per request, by `sampled`.
        .with_sampler(SdkSampler::AlwaysOn)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("idemgate");
    let _ = SAMPLER.set((t.sampler, t.sampler_arg));
    ON.store(true, Ordering::Relaxed);
    Ok(Some(Tracing {
        tracer,
        provider,
        sender,
    }))
}
