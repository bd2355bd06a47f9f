//! The response body the client reads: the upstream's bytes, forwarded as they arrive and read
//! on the side for usage. However the body ends (completed, upstream error or cut, client gone)
//! the call's hold is settled or voided exactly once.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame};
use hyper::body::Incoming;
use tollgate_core::{Modifiers, PoolKind, PriceEntry, Usage};
use tollgate_store::{NewEvent, SettleRequest};

use crate::lease::{Part, Scope};
use crate::metrics::{CallLabels, ModelLabels};
use crate::proxy::Gateway;
use crate::upstream::Kind;
use crate::wire::{self, AnthropicStream, OpenAiStream};

/// Most bytes of a JSON response kept to read its usage.
const JSON_BODY_BYTES_MAX: usize = 64 * 1024 * 1024;

/// How the response is read for usage.
pub enum Meter {
    /// An upstream error response: forwarded unchanged, never billed.
    Error,
    Json {
        kind: Kind,
        body: Vec<u8>,
    },
    AnthropicSse(AnthropicStream),
    OpenAiSse {
        stream: OpenAiStream,
        /// Hide the usage chunk that tollgate asked for on the client's behalf.
        strip_usage_chunk: bool,
        /// Bytes of an SSE event not yet complete (only when stripping).
        pending: Vec<u8>,
    },
}

/// How a body ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Complete,
    UpstreamCut,
    ClientGone,
}

impl Meter {
    /// Reads a chunk; returns the bytes to forward.
    fn feed(&mut self, chunk: Bytes) -> Bytes {
        match self {
            Meter::Error => chunk,
            Meter::Json { body, .. } => {
                if body.len() + chunk.len() <= JSON_BODY_BYTES_MAX {
                    body.extend_from_slice(&chunk);
                }
                chunk
            }
            Meter::AnthropicSse(s) => {
                s.feed(&chunk);
                chunk
            }
            Meter::OpenAiSse { stream, strip_usage_chunk: false, .. } => {
                stream.feed(&chunk);
                chunk
            }
            Meter::OpenAiSse { stream, strip_usage_chunk: true, pending } => {
                stream.feed(&chunk);
                pending.extend_from_slice(&chunk);
                let mut out = Vec::with_capacity(pending.len());
                while let Some(end) = event_end(pending) {
                    let event: Vec<u8> = pending.drain(..end).collect();
                    if !wire::openai_is_usage_chunk(&event) {
                        out.extend_from_slice(&event);
                    }
                }
                Bytes::from(out)
            }
        }
    }

    /// The usage known now, whether the response is complete, and the partial estimate flag.
    fn usage(&self, end: End) -> Option<(Usage, bool)> {
        match self {
            Meter::Error => None,
            Meter::Json { kind, body } => {
                if end != End::Complete {
                    return None;
                }
                let usage = match kind {
                    Kind::Anthropic => wire::anthropic_response_usage(body),
                    Kind::OpenAi => wire::openai_response_usage(body),
                };
                usage.map(|u| (u, false))
            }
            Meter::AnthropicSse(s) => {
                if !s.started {
                    return None;
                }
                let whole = end == End::Complete && s.stopped && s.error.is_none();
                let mut usage = s.usage;
                if !whole {
                    // Output = the larger of the last count seen and ⌈text bytes forwarded / 3⌉.
                    usage.output_tokens = usage.output_tokens.max(s.text_bytes.div_ceil(3));
                }
                Some((usage, !whole))
            }
            Meter::OpenAiSse { stream, .. } => match (stream.usage, end) {
                (Some(u), _) => Some((u, false)),
                (None, _) if stream.started => {
                    Some((Usage { output_tokens: stream.text_bytes.div_ceil(3), ..Usage::default() }, true))
                }
                (None, _) => None,
            },
        }
    }
}

/// The end of the first complete SSE event (after its blank line), if any.
fn event_end(buf: &[u8]) -> Option<usize> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// What settling or voiding the call needs.
pub struct Finish {
    pub gateway: Arc<Gateway>,
    pub account: String,
    /// The call's own hold, or the lease it has a part of.
    pub hold_id: String,
    /// The call's request id: its event's id.
    pub call_id: String,
    pub lease: Option<(Scope, Part)>,
    pub pool: PoolKind,
    pub model: String,
    pub entry: PriceEntry,
    pub modifiers: Modifiers,
    pub source: String,
    pub labels: BTreeMap<String, String>,
    pub started: Instant,
}

impl Finish {
    /// Voids the hold; `outcome` says why, for the calls metric.
    pub async fn void(self, outcome: &'static str) {
        self.count(outcome);
        if let Some((scope, part)) = &self.lease {
            // The part goes back to the lease, unused: nothing to write.
            crate::lease::done(&self.gateway, scope, part, false).await;
            return;
        }
        let now = self.gateway.now();
        if let Err(e) = self.gateway.store.void(&self.account, &self.hold_id, now).await {
            tracing::error!(error = %e, hold = %self.hold_id, "void failed; the sweeper will expire the hold");
        }
    }

    fn count(&self, outcome: &'static str) {
        let m = &self.gateway.metrics;
        m.holds_open.dec();
        let labels = CallLabels { pool: self.pool.as_str(), model: self.model.clone(), outcome };
        m.calls.get_or_create(&labels).inc();
    }

    async fn settle(self, usage: Usage, partial: bool, ttft_ms: Option<u64>) {
        self.count(if partial { "partial" } else { "ok" });
        self.gateway.metrics.usage(self.pool, &self.model, &usage);
        let now = self.gateway.now();
        let cost = match self.entry.cost(&usage, &self.modifiers) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, hold = %self.hold_id, "cannot price the usage; the hold is kept until it expires");
                return;
            }
        };
        let event = NewEvent {
            id: self.call_id.clone(),
            account: self.account.clone(),
            pool: self.pool,
            model: self.model.clone(),
            usage,
            cost,
            service_tier: self.modifiers.batch.then(|| "batch".to_string()),
            inference_geo: self.modifiers.geo_us.then(|| "us".to_string()),
            speed: self.modifiers.fast.then(|| "fast".to_string()),
            source: Some(self.source.clone()),
            key: None,
            labels: self.labels.clone(),
            timestamp: now,
            latency_ms: Some(self.started.elapsed().as_millis() as u64),
            ttft_ms,
            partial,
            estimated: false,
            fingerprint: self.call_id.clone(),
        };
        let request = SettleRequest { account: self.account.clone(), hold_id: self.hold_id.clone(), event };
        let settled = match &self.lease {
            None => self.gateway.store.settle(request, now).await,
            Some((scope, part)) => {
                let settled = self.gateway.store.settle_part(request, part.amount, now).await;
                match settled {
                    Ok(_) => crate::lease::done(&self.gateway, scope, part, true).await,
                    Err(_) => self.gateway.leases.abandon(scope, part),
                }
                settled
            }
        };
        match settled {
            Ok(event) => {
                let labels = ModelLabels { pool: self.pool.as_str(), model: self.model.clone() };
                let charged = event.grant_part.saturating_add(event.overage_part);
                let m = &self.gateway.metrics;
                m.spend_nano_usd.get_or_create(&labels).inc_by(charged.0.max(0) as u64);
                self.gateway.feed.charged(&self.account, self.pool, charged, event.usage.tokens());
                if event.overshoot.0 > 0 {
                    m.overshoot_nano_usd.get_or_create(&labels).inc_by(event.overshoot.0 as u64);
                    tracing::warn!(hold = %self.hold_id, overshoot = %event.overshoot, "a call cost more than its hold");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, hold = %self.hold_id, "settle failed; the sweeper will expire the hold")
            }
        }
    }
}

pub struct MeteredBody {
    inner: Incoming,
    meter: Meter,
    finish: Option<Finish>,
    ttft_ms: Option<u64>,
    /// When the hold's time to live was last renewed (at its creation, then while data flows).
    renewed: Instant,
}

impl MeteredBody {
    pub fn new(inner: Incoming, meter: Meter, finish: Finish) -> MeteredBody {
        let renewed = finish.started;
        MeteredBody { inner, meter, finish: Some(finish), ttft_ms: None, renewed }
    }

    /// A stream still sending data keeps its hold alive: past half its time to live, the hold
    /// is extended by a whole one, so the sweeper never expires a call that is still running.
    fn keep_hold_alive(&mut self) {
        let Some(f) = &self.finish else { return };
        let ttl_s = f.gateway.settings.hold_ttl_s;
        if self.renewed.elapsed().as_millis() < u128::from(ttl_s) * 500 {
            return;
        }
        self.renewed = Instant::now();
        let (gateway, account, hold_id) = (f.gateway.clone(), f.account.clone(), f.hold_id.clone());
        tokio::spawn(async move {
            let now = gateway.now();
            if let Err(e) = gateway.store.extend_hold(&account, &hold_id, ttl_s, now).await {
                tracing::warn!(error = %e, hold = %hold_id, "could not extend the hold of a running stream");
            }
        });
    }

    /// Settles (usage known) or voids (none) once, in a task of its own: a body cannot await.
    fn end(&mut self, end: End) {
        let Some(finish) = self.finish.take() else { return };
        let usage = self.meter.usage(end);
        let ttft_ms = self.ttft_ms;
        let outcome = match (&self.meter, end) {
            (Meter::Error, _) => "upstream_error",
            (_, End::ClientGone) => "client_gone",
            (_, End::UpstreamCut) => "cut",
            (_, End::Complete) => "no_usage",
        };
        tokio::spawn(async move {
            match usage {
                Some((usage, partial)) => finish.settle(usage, partial, ttft_ms).await,
                None => finish.void(outcome).await,
            }
        });
    }
}

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        loop {
            return match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(None) => {
                    this.end(End::Complete);
                    Poll::Ready(None)
                }
                Poll::Ready(Some(Err(e))) => {
                    this.end(End::UpstreamCut);
                    Poll::Ready(Some(Err(e)))
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        if this.ttft_ms.is_none()
                            && let Some(f) = &this.finish
                        {
                            this.ttft_ms = Some(f.started.elapsed().as_millis() as u64);
                        }
                        this.keep_hold_alive();
                        let out = this.meter.feed(data);
                        // hyper stops polling a body that says it has ended: settle now.
                        if this.inner.is_end_stream() {
                            this.end(End::Complete);
                        }
                        if out.is_empty() {
                            continue;
                        }
                        Poll::Ready(Some(Ok(Frame::data(out))))
                    }
                    Err(frame) => Poll::Ready(Some(Ok(frame))),
                },
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        if self.finish.is_some() {
            self.end(End::ClientGone);
        }
    }
}
