//! The response body the client reads: the upstream's bytes, forwarded as they arrive and read
//! on the side for usage. However the body ends (completed, upstream error or cut, client gone)
//! the call's hold is settled or voided exactly once.
//!
//! Never bill zero for served work (SPEC section 3): only an upstream error status is voided
//! here (an upstream never reached is voided by `proxy`). Once the upstream answered 2xx, the call
//! is settled at the best usage known; what could not be read is estimated ([`charge`]).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tollgate_core::price::{Allowances, PriceError};
use tollgate_core::{Modifiers, Nanos, PoolKind, PriceEntry, RequestBound, Usage};
use tollgate_store::{NewEvent, SettleRequest};

use crate::lease::{Part, Scope};
use crate::metrics::{CallLabels, ModelLabels};
use crate::retry::until_stored;
use crate::state::Gateway;
use crate::upstream::Kind;
use crate::upstream::{BodyError, UpstreamBody};
use crate::wire::{self, AnthropicStream, OpenAiStream, Reported, UsageChunkStrip};

/// Most bytes of a JSON response kept to read its usage; a longer answer's usage is not read
/// (it is estimated).
const JSON_BODY_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Longest the gateway reads on from the upstream after the client left, for the usage the
/// upstream has (nearly) sent: `message_start`, or the rest of a JSON answer.
const READ_ON_MAX: Duration = Duration::from_secs(10);

/// How the response is read for usage.
pub enum Meter {
    /// An upstream error response: forwarded unchanged, never billed.
    Error,
    Json {
        kind: Kind,
        /// The answer so far; None once it is longer than `JSON_BODY_BYTES_MAX` (no longer kept).
        body: Option<Vec<u8>>,
    },
    AnthropicSse(AnthropicStream),
    OpenAiSse {
        stream: OpenAiStream,
        /// Hides the usage chunk that tollgate asked for on the client's behalf.
        strip: Option<UsageChunkStrip>,
    },
}

/// How a body ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Complete,
    UpstreamCut,
    ClientGone,
}

/// What the meter read of a served response when it ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reading {
    pub reported: Reported,
    /// Bytes of text forwarded (SSE) or carried (JSON): the floor of an output estimate.
    pub text_bytes: u64,
    /// The upstream's whole answer reached the client: the body completed and, for Anthropic's
    /// stream, `message_start` … `message_stop` came with no `error` event.
    pub whole: bool,
}

impl Meter {
    /// A JSON answer's meter.
    pub fn json(kind: Kind) -> Meter {
        Meter::Json { kind, body: Some(Vec::new()) }
    }

    /// Reads a chunk; returns the bytes to forward. The work is linear in the chunk's size, and
    /// what is kept is bounded (a JSON answer up to `JSON_BODY_BYTES_MAX`, an SSE line or a held
    /// back SSE event up to 1 MiB).
    fn feed(&mut self, chunk: Bytes) -> Bytes {
        match self {
            Meter::Error => chunk,
            Meter::Json { body, .. } => {
                // Past the bound the answer is not kept at all: a part of it tells nothing.
                if body.as_ref().is_some_and(|b| b.len() + chunk.len() > JSON_BODY_BYTES_MAX) {
                    *body = None;
                }
                if let Some(b) = body {
                    b.extend_from_slice(&chunk);
                }
                chunk
            }
            Meter::AnthropicSse(s) => {
                s.feed(&chunk);
                chunk
            }
            Meter::OpenAiSse { stream, strip: None } => {
                stream.feed(&chunk);
                chunk
            }
            Meter::OpenAiSse { stream, strip: Some(strip) } => {
                stream.feed(&chunk);
                let mut out = Vec::with_capacity(chunk.len());
                strip.feed(&chunk, &mut out);
                Bytes::from(out)
            }
        }
    }

    /// The upstream's body ended whole: what was held back to be read whole is forwarded (an
    /// event the stream ended in without its blank line, unless it is the usage chunk).
    fn finish(&mut self) -> Bytes {
        let mut out = Vec::new();
        if let Meter::OpenAiSse { strip: Some(strip), .. } = self {
            strip.finish(&mut out);
        }
        Bytes::from(out)
    }

    /// Bytes held back from the client: an SSE event not yet complete, when stripping.
    #[cfg(test)]
    fn buffered_bytes(&self) -> usize {
        match self {
            Meter::OpenAiSse { strip: Some(strip), .. } => strip.held_bytes(),
            _ => 0,
        }
    }

    /// Whether reading on after the client left can still tell the usage: Anthropic's stream
    /// before `message_start` (sent first, at once), a JSON answer not yet whole (the upstream
    /// has done the work; the rest of the answer says what it cost). Not OpenAI's stream: its
    /// usage comes last, and reading on would have the upstream write the whole answer for no one.
    fn reads_on(&self) -> bool {
        match self {
            Meter::AnthropicSse(s) => !s.started,
            Meter::Json { .. } => true,
            Meter::Error | Meter::OpenAiSse { .. } => false,
        }
    }

    /// What was read, when the response ended; None for an upstream error (voided).
    fn reading(&self, end: End) -> Option<Reading> {
        match self {
            Meter::Error => None,
            Meter::Json { kind, body } => {
                let report = match (end, body) {
                    (End::Complete, Some(body)) => match kind {
                        Kind::Anthropic => wire::anthropic_response_usage(body),
                        Kind::OpenAi => wire::openai_response_usage(body),
                    },
                    // Only a whole answer is JSON: a part of one tells nothing.
                    _ => wire::JsonReport::default(),
                };
                Some(Reading { reported: report.reported, text_bytes: report.text_bytes, whole: end == End::Complete })
            }
            Meter::AnthropicSse(s) => Some(Reading {
                reported: s.reported,
                text_bytes: s.text_bytes,
                whole: end == End::Complete && s.started && s.stopped && s.error.is_none(),
            }),
            Meter::OpenAiSse { stream, .. } => Some(Reading {
                reported: stream.reported,
                text_bytes: stream.text_bytes,
                whole: end == End::Complete && stream.done,
            }),
        }
    }
}

/// What a served call is charged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Charge {
    /// The usage read (counts that could not be read are not in it), output raised to the
    /// estimate from the text when the answer was not whole.
    pub usage: Usage,
    pub cost: Nanos,
    /// Not the upstream's whole, readable report: cut, client gone, an error event, or a count
    /// that could not be read.
    pub partial: bool,
    /// Part of the cost is the hold's estimate, not a reported count: the input side (or the
    /// server-tool count) was not reported in a readable form.
    pub estimated: bool,
}

/// The charge of a served call (SPEC section 3, "never bill zero for served work"): the best
/// usage known; output at least ⌈text bytes / 3⌉ when the answer was not whole; and, when the
/// input side is not known, at least the hold's input part (`bound`'s input at the highest
/// input-side price, [`PriceEntry::input_worst_case`]) plus the rest of the usage read. Prices
/// come from core only.
pub fn charge(
    reading: &Reading,
    entry: &PriceEntry,
    modifiers: &Modifiers,
    bound: &RequestBound,
    allow: &Allowances,
) -> Result<Charge, PriceError> {
    let r = &reading.reported;
    let exact = reading.whole && r.input_known() && r.output_known() && !r.any_unreadable();
    let mut usage = r.usage;
    if !exact {
        // Output = the larger of the last count seen and ⌈text bytes forwarded / 3⌉.
        usage.output_tokens = usage.output_tokens.max(reading.text_bytes.div_ceil(3));
    }
    let mut estimated = false;
    if r.web_search_unknown() {
        usage.web_search_requests = usage.web_search_requests.max(bound.web_search_max_uses);
        estimated = true;
    }
    let mut cost = entry.cost(&usage, modifiers)?;
    if !r.input_known() {
        let rest = Usage {
            output_tokens: usage.output_tokens,
            web_search_requests: usage.web_search_requests,
            ..Usage::default()
        };
        let estimate = entry
            .input_worst_case(bound, allow)?
            .checked_add(entry.cost(&rest, modifiers)?)
            .ok_or(PriceError::Overflow)?;
        cost = cost.max(estimate);
        estimated = true;
    }
    Ok(Charge { usage, cost, partial: !exact, estimated })
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
    /// What the call was held for (its input and output bounds): the estimate of a served call
    /// whose usage is not known is this bound's input part.
    pub bound: RequestBound,
    pub source: String,
    pub labels: BTreeMap<String, String>,
    pub started: Instant,
    /// Counts the call in [`Gateway::calls_open`] until it is settled or voided.
    pub(crate) _open: Arc<()>,
}

impl Finish {
    /// Voids the hold — only for a call the upstream did not serve (an error status, never
    /// reached); `outcome` says why, for the calls metric.
    pub async fn void(self, outcome: &'static str) {
        self.count(outcome);
        if let Some((scope, part)) = &self.lease {
            // The part goes back to the lease, unused: nothing to write.
            self.gateway.leases.done(scope, part, false).await;
            return;
        }
        let now = self.gateway.now();
        let (store, account, hold_id) = (&self.gateway.store, &self.account, &self.hold_id);
        if let Err(e) =
            until_stored(self.gateway.settings.hold_ttl_s, "void", || store.void(account, hold_id, now)).await
        {
            tracing::error!(error = %e, hold = %self.hold_id, "void failed; the sweeper will expire the hold");
        }
    }

    fn count(&self, outcome: &'static str) {
        let m = &self.gateway.metrics;
        m.holds_open.dec();
        let labels = CallLabels { pool: self.pool.as_str(), model: self.model.clone(), outcome };
        m.calls.get_or_create(&labels).inc();
    }

    /// Settles a served call at its [`charge`]; a call on a lease is settled against it
    /// (`Store::settle_part`), never given back.
    async fn settle(self, reading: Reading, ttft_ms: Option<u64>) {
        let charged = charge(&reading, &self.entry, &self.modifiers, &self.bound, &self.gateway.settings.allowances);
        let c = match charged {
            Ok(c) => c,
            Err(e) => {
                // Cannot happen for counts within their per-call bounds; left to the sweeper,
                // which charges what is held, flagged `unsettled`.
                self.count("unpriced");
                tracing::error!(error = %e, hold = %self.hold_id, "cannot price the usage; the hold is kept until it expires");
                if let Some((scope, part)) = &self.lease {
                    self.gateway.leases.book.abandon(scope, part);
                }
                return;
            }
        };
        self.count(match (c.estimated, c.partial) {
            (true, _) => "estimated",
            (false, true) => "partial",
            (false, false) => "ok",
        });
        self.gateway.metrics.usage(self.pool, &self.model, &c.usage);
        let now = self.gateway.now();
        let event = NewEvent {
            id: self.call_id.clone(),
            account: self.account.clone(),
            pool: self.pool,
            model: self.model.clone(),
            usage: c.usage,
            cost: c.cost,
            service_tier: self.modifiers.batch.then(|| "batch".to_string()),
            inference_geo: self.modifiers.geo_us.then(|| "us".to_string()),
            speed: self.modifiers.fast.then(|| "fast".to_string()),
            source: Some(self.source.clone()),
            key: None,
            labels: self.labels.clone(),
            timestamp: now,
            latency_ms: Some(self.started.elapsed().as_millis() as u64),
            ttft_ms,
            partial: c.partial,
            estimated: c.estimated,
            fingerprint: self.call_id.clone(),
        };
        let request = SettleRequest { account: self.account.clone(), hold_id: self.hold_id.clone(), event };
        let store = &self.gateway.store;
        let settled = match &self.lease {
            None => {
                until_stored(self.gateway.settings.hold_ttl_s, "settle", || store.settle(request.clone(), now)).await
            }
            Some((scope, part)) => {
                let settled = until_stored(self.gateway.settings.hold_ttl_s, "settle", || {
                    store.settle_part(request.clone(), part.amount, now)
                })
                .await;
                match settled {
                    Ok(_) => self.gateway.leases.done(scope, part, true).await,
                    Err(_) => self.gateway.leases.book.abandon(scope, part),
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
    /// The upstream's body (its silence bounded); taken by the task that reads on after the
    /// client left, dropped once it ended.
    inner: Option<UpstreamBody>,
    meter: Meter,
    finish: Option<Finish>,
    ttft_ms: Option<u64>,
    /// When the hold's time to live was last renewed (at its creation, then while data flows).
    renewed: Instant,
}

impl MeteredBody {
    pub fn new(inner: UpstreamBody, meter: Meter, finish: Finish) -> MeteredBody {
        let renewed = finish.started;
        MeteredBody { inner: Some(inner), meter, finish: Some(finish), ttft_ms: None, renewed }
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

    /// Settles (served) or voids (an upstream error) once, in a task of its own: a body cannot
    /// await.
    fn end(&mut self, end: End) {
        let Some(finish) = self.finish.take() else { return };
        let reading = self.meter.reading(end);
        let ttft_ms = self.ttft_ms;
        tokio::spawn(finish.end(reading, ttft_ms));
    }
}

impl Finish {
    async fn end(self, reading: Option<Reading>, ttft_ms: Option<u64>) {
        match reading {
            Some(reading) => self.settle(reading, ttft_ms).await,
            None => self.void("upstream_error").await,
        }
    }
}

/// After the client left: reads on from the upstream, forwarding nothing, while that can still
/// tell the usage ([`Meter::reads_on`]), for at most `limit`; then the upstream connection is
/// dropped. Returns how the upstream's body ended, if it did.
async fn read_on(mut inner: UpstreamBody, meter: &mut Meter, limit: Duration) -> Option<End> {
    let deadline = tokio::time::Instant::now() + limit;
    while meter.reads_on() {
        match tokio::time::timeout_at(deadline, inner.frame()).await {
            Err(_) => return None,
            Ok(None) => return Some(End::Complete),
            Ok(Some(Err(_))) => return Some(End::UpstreamCut),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    meter.feed(data);
                }
                if inner.is_end_stream() {
                    return Some(End::Complete);
                }
            }
        }
    }
    None
}

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = BodyError;

    /// The upstream's frames, metered; an upstream that cuts its body, or stays silent past the
    /// idle bound ([`UpstreamBody`]), ends the call as a cut: settled at what was read.
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        loop {
            let Some(inner) = this.inner.as_mut() else { return Poll::Ready(None) };
            return match Pin::new(inner).poll_frame(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(None) => {
                    let rest = this.meter.finish();
                    this.end(End::Complete);
                    this.inner = None;
                    if rest.is_empty() { Poll::Ready(None) } else { Poll::Ready(Some(Ok(Frame::data(rest)))) }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.end(End::UpstreamCut);
                    // Closes the upstream's connection now (a silent one is still open).
                    this.inner = None;
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
                        let mut out = this.meter.feed(data);
                        // hyper stops polling a body that says it has ended: settle now.
                        if this.is_end_stream() {
                            let rest = this.meter.finish();
                            if !rest.is_empty() {
                                out = Bytes::from([&out[..], &rest[..]].concat());
                            }
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
        self.inner.as_ref().is_none_or(UpstreamBody::is_end_stream)
    }
}

impl Drop for MeteredBody {
    /// The client is gone before the body ended (it may not have polled a single frame). The
    /// upstream served the call, so it is settled, never voided: at once with what was read, or,
    /// while reading on can still tell the usage, after reading on (bounded by `READ_ON_MAX`
    /// and half the hold's time to live, so the hold cannot expire meanwhile).
    fn drop(&mut self) {
        let Some(finish) = self.finish.take() else { return };
        let ttft_ms = self.ttft_ms;
        let inner = self.inner.take();
        match inner {
            Some(inner) if self.meter.reads_on() => {
                let mut meter = std::mem::replace(&mut self.meter, Meter::Error);
                let limit = READ_ON_MAX.min(Duration::from_millis(finish.gateway.settings.hold_ttl_s * 500));
                tokio::spawn(async move {
                    // What the upstream sent after the client left was not forwarded: even a
                    // body read whole (a JSON answer, parsed for its usage) is not `whole`.
                    let end = read_on(inner, &mut meter, limit).await.unwrap_or(End::ClientGone);
                    let reading = meter.reading(end).map(|r| Reading { whole: false, ..r });
                    finish.end(reading, ttft_ms).await;
                });
            }
            _ => {
                let reading = self.meter.reading(End::ClientGone);
                tokio::spawn(finish.end(reading, ttft_ms));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::PriceTable;

    /// What an Anthropic stream of these `data:` payloads reported.
    fn reported(events: &[&str]) -> Reported {
        let mut s = AnthropicStream::default();
        for e in events {
            s.feed(format!("data: {e}\n\n").as_bytes());
        }
        s.reported
    }

    /// An OpenAI stream whose usage chunk is stripped: a role chunk, a text chunk whose event is
    /// `text_event_bytes` long, the stop chunk, the usage chunk (100 in, 20 out) and `[DONE]`;
    /// some events end in `\r\n\r\n`. Returns the stream and what the client must get: the
    /// same bytes without the usage chunk.
    fn openai_stream(text_event_bytes: usize) -> (Vec<u8>, Vec<u8>) {
        let chunk = |delta: &str| {
            format!(
                r#"{{"id":"c","object":"chat.completion.chunk","choices":[{{"index":0,"delta":{delta}}}],"usage":null}}"#
            )
        };
        let bare = format!("data: {}\n\n", chunk(r#"{"content":""}"#)).len();
        let text = "a".repeat(text_event_bytes.saturating_sub(bare));
        let usage = r#"data: {"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":100,"completion_tokens":20}}"#;
        let events = [
            format!("data: {}\r\n\r\n", chunk(r#"{"role":"assistant","content":""}"#)),
            format!("data: {}\n\n", chunk(&format!(r#"{{"content":"{text}"}}"#))),
            format!("data: {}\r\n\r\n", chunk("{}")),
            format!("{usage}\n\n"),
            "data: [DONE]\n\n".to_string(),
        ];
        let all = events.concat().into_bytes();
        let client = events.iter().filter(|e| !e.starts_with(usage)).cloned().collect::<String>().into_bytes();
        (all, client)
    }

    fn stripping_meter() -> Meter {
        Meter::OpenAiSse { stream: OpenAiStream::default(), strip: Some(UsageChunkStrip::default()) }
    }

    /// Issue 13, finding 4: an 8 MiB event in 1 KiB chunks. The meter holds back at most one
    /// bounded event (the old code held the whole event and scanned all of it again on every
    /// chunk), forwards every byte but the usage chunk's, and still reads the usage.
    #[test]
    fn stripping_an_8_mib_event_holds_back_a_bounded_part_and_forwards_every_other_byte() {
        let (upstream, client) = openai_stream(8 << 20);
        let mut meter = stripping_meter();
        let mut out = Vec::with_capacity(client.len());
        let started = Instant::now();
        for (i, chunk) in upstream.chunks(1024).enumerate() {
            out.extend_from_slice(&meter.feed(Bytes::copy_from_slice(chunk)));
            let held = meter.buffered_bytes();
            assert!(held <= wire::SSE_EVENT_BYTES_MAX, "after chunk {i}: {held} bytes held back");
        }
        eprintln!("8 MiB event stripped in 1 KiB chunks in {:?}", started.elapsed());
        assert!(out == client, "the client's bytes: {} of {} as expected", out.len(), client.len());
        let reading = meter.reading(End::Complete).unwrap();
        assert_eq!((reading.reported.usage.input_tokens, reading.reported.usage.output_tokens), (100, 20));
        assert!(reading.whole);
    }

    /// However the stream is cut into chunks, even through a `\r\n\r\n`, the client gets the same
    /// bytes, without the usage chunk.
    #[test]
    fn stripping_is_the_same_in_chunks_of_any_size() {
        let (upstream, client) = openai_stream(300);
        for size in 1..=upstream.len() {
            let mut meter = stripping_meter();
            let mut out = Vec::new();
            for chunk in upstream.chunks(size) {
                out.extend_from_slice(&meter.feed(Bytes::copy_from_slice(chunk)));
            }
            assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(&client), "chunks of {size}");
        }
    }

    /// A JSON answer longer than the bound is not kept at all: its usage is unknown (estimated),
    /// never read from the part of it that came after the bound.
    #[test]
    fn a_json_answer_over_the_bound_is_not_read() {
        let mut meter = Meter::json(Kind::Anthropic);
        meter.feed(Bytes::from(vec![b'x'; JSON_BODY_BYTES_MAX + 1]));
        meter.feed(Bytes::from_static(br#"{"usage":{"input_tokens":1,"output_tokens":1}}"#));
        let reading = meter.reading(End::Complete).unwrap();
        assert!(!reading.reported.input_known() && !reading.reported.output_known(), "{reading:?}");
    }

    const START_100: &str = r#"{"type":"message_start","message":{"usage":{"input_tokens":100,"output_tokens":1}}}"#;
    const DELTA_20: &str = r#"{"type":"message_delta","usage":{"output_tokens":20}}"#;
    const START_GARBAGE: &str =
        r#"{"type":"message_start","message":{"usage":{"input_tokens":-5,"output_tokens":-5}}}"#;
    const START_SEARCH_UNREADABLE: &str = r#"{"type":"message_start","message":{"usage":{"input_tokens":100,"output_tokens":1,"server_tool_use":{"web_search_requests":"x"}}}}"#;

    struct Row {
        what: &'static str,
        events: &'static [&'static str],
        text_bytes: u64,
        whole: bool,
        /// (cost in nano-USD, partial, estimated)
        want: (i64, bool, bool),
    }

    #[test]
    fn every_served_ending_is_charged() {
        // Sonnet 4.5: $3 in, $15 out, $6 for a 1h cache write, $10 per 1,000 searches. The call
        // was held for 200 input tokens (its body) and 1,000 output tokens, 2 searches: the
        // hold's input part is (200 + 2 × 20,000 allowance) × $6 / MTok = 241,200,000 nano-USD.
        const INPUT_PART: i64 = 40_200 * 6_000;
        let rows = [
            Row {
                what: "whole",
                events: &[START_100, DELTA_20],
                text_bytes: 29,
                whole: true,
                want: (600_000, false, false),
            },
            Row {
                what: "cut after message_start: output from the text",
                events: &[START_100],
                text_bytes: 11,
                whole: false,
                want: (100 * 3_000 + 4 * 15_000, true, false),
            },
            Row { what: "nothing read", events: &[], text_bytes: 0, whole: false, want: (INPUT_PART, true, true) },
            Row {
                what: "no message_start, output known",
                events: &[DELTA_20],
                text_bytes: 29,
                whole: false,
                want: (INPUT_PART + 20 * 15_000, true, true),
            },
            Row {
                what: "unreadable counts in a complete stream",
                events: &[START_GARBAGE],
                text_bytes: 29,
                whole: true,
                want: (INPUT_PART + 10 * 15_000, true, true),
            },
            Row {
                what: "unreadable search count: the hold's 2",
                events: &[START_SEARCH_UNREADABLE, DELTA_20],
                text_bytes: 29,
                whole: true,
                want: (600_000 + 2 * 10_000_000, true, true),
            },
        ];
        let table = PriceTable::builtin();
        let entry =
            table.price_at("claude-sonnet-4-5", chrono::NaiveDate::from_ymd_opt(2026, 11, 10).unwrap()).unwrap();
        let bound = RequestBound {
            body_bytes: 200,
            max_tokens: 1_000,
            web_search_max_uses: 2,
            web_fetch_max_uses: 0,
            unbounded_inputs: 0,
            unbounded_tools: false,
            modifiers: Modifiers::default(),
        };
        let mut failures = Vec::new();
        for row in &rows {
            let reading = Reading { reported: reported(row.events), text_bytes: row.text_bytes, whole: row.whole };
            let c = charge(&reading, entry, &Modifiers::default(), &bound, &Allowances::default()).unwrap();
            let got = (c.cost.0, c.partial, c.estimated);
            if got != row.want {
                failures.push(format!("{}: got {got:?}, want {:?}", row.what, row.want));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}
