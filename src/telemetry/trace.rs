//! One trace per record: `process` from taken to committed, with children `consume` (queued in
//! its lane), `call` (one per attempt), `publish` (the reply or dead letter) and `commit`.
//!
//! The parent comes from the record's `traceparent`/`tracestate` headers; each call carries its
//! own span's context to the service, and each written record carries its `publish` span's. With
//! no collector configured nothing is made here, and the record's own `traceparent` travels on
//! unchanged.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{BatchConfigBuilder, Sampler, SdkTracer, SdkTracerProvider};

use super::attributes as attr;
use crate::config::Traces;
use crate::offsets::Tp;
use crate::outcome::{Outcome, Reason};
use crate::record::Record;

/// The W3C trace context headers to send on: `traceparent` and, when set, `tracestate`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceHeaders(pub Vec<(&'static str, String)>);

impl TraceHeaders {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }

    /// Puts these headers on an outgoing record in place of any it carried.
    pub fn replace_in(&self, headers: &mut crate::produce::Headers) {
        if self.0.is_empty() {
            return;
        }
        headers.retain(|(k, _)| k != "traceparent" && k != "tracestate");
        for (k, v) in &self.0 {
            headers.push(((*k).into(), Bytes::from(v.clone())));
        }
    }
}

struct RecordHeaders<'a>(&'a [(String, Bytes)]);

impl Extractor for RecordHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}

impl Injector for TraceHeaders {
    fn set(&mut self, key: &str, value: String) {
        let key = match key {
            "traceparent" => "traceparent",
            "tracestate" => "tracestate",
            _ => return,
        };
        if !value.is_empty() {
            self.0.push((key, value));
        }
    }
}

/// A sampled record whose outcome is final, waiting for the commit that covers it.
struct Pending {
    record: Context,
    commit: opentelemetry_sdk::trace::Span,
}

/// The tracer of one sidecar; inert when no collector is configured.
pub struct Tracing {
    tracer: Option<SdkTracer>,
    provider: Option<SdkTracerProvider>,
    group: String,
    pending: Mutex<HashMap<Tp, BTreeMap<i64, Pending>>>,
}

impl Tracing {
    /// No spans; records' own trace context still travels on.
    pub fn off() -> Tracing {
        Tracing {
            tracer: None,
            provider: None,
            group: String::new(),
            pending: Mutex::default(),
        }
    }

    /// Exports to `config.otlp_endpoint`, else `OTEL_EXPORTER_OTLP_ENDPOINT`; off without either.
    /// Must run inside the tokio runtime, which carries the exports.
    pub fn start(config: &Traces, group: &str) -> Result<Tracing, String> {
        let endpoint = config
            .otlp_endpoint
            .clone()
            .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
            .filter(|e| !e.is_empty());
        let Some(endpoint) = endpoint else {
            return Ok(Tracing::off());
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(&endpoint)
            .with_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| format!("cannot set up trace export to {endpoint}: {e}"))?;
        let batches = BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_scheduled_delay(Duration::from_secs(1))
                    .with_max_queue_size(8192)
                    .build(),
            )
            .build();
        // A record whose context says "sampled" is traced; otherwise one in `sample_ratio`.
        let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sample_ratio)));
        let provider = SdkTracerProvider::builder()
            .with_span_processor(batches)
            .with_sampler(sampler)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(config.service_name.clone())
                    .build(),
            )
            .build();
        tracing::info!(endpoint = %endpoint, sample_ratio = config.sample_ratio, "Exporting traces");
        Ok(Tracing {
            tracer: Some(provider.tracer("ferry")),
            provider: Some(provider),
            group: group.to_string(),
            pending: Mutex::default(),
        })
    }

    /// Starts `record`'s trace, as a child of the context in its headers.
    pub fn record(&self, record: &Record, route: &str) -> RecordTrace {
        let Some(tracer) = &self.tracer else {
            return RecordTrace(None);
        };
        let parent = TraceContextPropagator::new().extract(&RecordHeaders(&record.headers));
        let span = tracer
            .span_builder(format!("{} {}", record.topic, attr::PROCESS))
            .with_kind(SpanKind::Consumer)
            .with_start_time(record.taken)
            .with_attributes([
                KeyValue::new(attr::MESSAGING_SYSTEM, "kafka"),
                KeyValue::new(attr::MESSAGING_OPERATION, "process"),
                KeyValue::new(attr::DESTINATION, record.topic.to_string()),
                KeyValue::new(attr::PARTITION, record.partition.to_string()),
                KeyValue::new(attr::OFFSET, record.offset),
                KeyValue::new(attr::CONSUMER_GROUP, self.group.clone()),
                KeyValue::new(attr::ROUTE, route.to_string()),
            ])
            .start_with_context(tracer, &parent);
        let cx = parent.with_span(span);
        let mut queued = tracer
            .span_builder(attr::CONSUME)
            .with_kind(SpanKind::Internal)
            .with_start_time(record.taken)
            .start_with_context(tracer, &cx);
        queued.end();
        RecordTrace(Some((tracer.clone(), cx)))
    }

    /// `record`'s outcome is final: the trace waits for the commit that covers its offset.
    pub fn finished(
        &self,
        trace: RecordTrace,
        tp: &Tp,
        offset: i64,
        outcome: Outcome,
        reason: Option<Reason>,
    ) {
        let Some((tracer, cx)) = trace.0 else { return };
        let span = cx.span();
        span.set_attribute(KeyValue::new(attr::OUTCOME, outcome.as_str()));
        if let Some(r) = reason {
            span.set_attribute(KeyValue::new(attr::REASON, r.as_str()));
        }
        if !span.span_context().is_sampled() {
            return span.end();
        }
        let commit = tracer
            .span_builder(attr::COMMIT)
            .with_kind(SpanKind::Internal)
            .start_with_context(&tracer, &cx);
        lock(&self.pending)
            .entry(tp.clone())
            .or_default()
            .insert(offset, Pending { record: cx, commit });
    }

    /// The broker confirmed these offsets: every pending record below them is committed.
    pub fn committed(&self, offsets: &[(Tp, i64)]) {
        if self.tracer.is_none() {
            return;
        }
        let mut done = Vec::new();
        {
            let mut pending = lock(&self.pending);
            for (tp, o) in offsets {
                if let Some(waiting) = pending.get_mut(tp) {
                    let rest = waiting.split_off(o);
                    done.extend(std::mem::replace(waiting, rest).into_values());
                }
            }
        }
        for p in done {
            end(p, true);
        }
    }

    /// These partitions are gone: their pending records were not committed by this process.
    pub fn forget(&self, tps: &[Tp]) {
        if self.tracer.is_none() {
            return;
        }
        let gone: Vec<_> = {
            let mut pending = lock(&self.pending);
            tps.iter().filter_map(|tp| pending.remove(tp)).collect()
        };
        for p in gone.into_iter().flat_map(BTreeMap::into_values) {
            end(p, false);
        }
    }

    /// Sends what is buffered and stops exporting.
    pub fn shutdown(&self) {
        if let Some(p) = &self.provider {
            if let Err(e) = p.shutdown() {
                tracing::warn!(error = %e, "Trace export did not shut down cleanly");
            }
        }
    }
}

fn end(mut p: Pending, committed: bool) {
    p.commit.set_attribute(KeyValue::new(attr::COMMITTED, committed));
    if !committed {
        p.commit
            .set_status(Status::error("the partition was revoked before the commit"));
    }
    p.commit.end();
    p.record
        .span()
        .set_attribute(KeyValue::new(attr::COMMITTED, committed));
    p.record.span().end();
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The trace of one record in hand; empty when tracing is off.
pub struct RecordTrace(Option<(SdkTracer, Context)>);

impl RecordTrace {
    /// Starts a child span; `headers` is its context, to send on. `describe` gives the span's
    /// name and attributes, and runs only when tracing is on: with it off (the default) a
    /// record's steps allocate nothing.
    fn step(&self, kind: SpanKind, describe: impl FnOnce() -> (String, Vec<KeyValue>)) -> Step {
        let Some((tracer, cx)) = &self.0 else {
            return Step(None, TraceHeaders::default());
        };
        let (name, attributes) = describe();
        let span = tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes)
            .start_with_context(tracer, cx);
        let child = cx.with_span(span);
        let mut headers = TraceHeaders::default();
        TraceContextPropagator::new().inject_context(&child, &mut headers);
        Step(Some(child), headers)
    }

    /// A call attempt: its span and the context the service receives.
    pub fn call(&self, route: &str, attempt: u32) -> Step {
        self.step(SpanKind::Client, || {
            (
                attr::CALL.to_string(),
                vec![
                    KeyValue::new(attr::ROUTE, route.to_string()),
                    KeyValue::new(attr::ATTEMPT, i64::from(attempt)),
                ],
            )
        })
    }

    /// Writing a reply or dead letter to `topic`.
    pub fn publish(&self, topic: &str) -> Step {
        self.step(SpanKind::Producer, || {
            (
                format!("{topic} {}", attr::PRODUCE),
                vec![
                    KeyValue::new(attr::MESSAGING_SYSTEM, "kafka"),
                    KeyValue::new(attr::MESSAGING_OPERATION, "send"),
                    KeyValue::new(attr::DESTINATION, topic.to_string()),
                ],
            )
        })
    }

    /// The record was given up without an outcome (its partition went away).
    pub fn abandon(self) {
        if let Some((_, cx)) = self.0 {
            cx.span().set_attribute(KeyValue::new(attr::OUTCOME, "abandoned"));
            cx.span().end();
        }
    }
}

/// One step of a record's trace, and the context to send on with it.
pub struct Step(Option<Context>, pub TraceHeaders);

impl Step {
    /// Ends the step with `result`; an error when `failed`.
    pub fn end(self, result: &str, failed: bool) {
        if let Some(cx) = self.0 {
            let span = cx.span();
            span.set_attribute(KeyValue::new(attr::RESULT, result.to_string()));
            if failed {
                span.set_status(Status::error(result.to_string()));
            }
            span.end();
        }
    }

    /// The context to send on, when tracing is on.
    pub fn headers(&self) -> Option<&TraceHeaders> {
        self.0.as_ref().map(|_| &self.1)
    }
}

/// When a record was taken, for spans that start before its handling.
pub fn now() -> SystemTime {
    SystemTime::now()
}
