//! The gateway routes and the phases of one call: authenticate → read the request → pick the
//! upstream and price → classify the pool → hold the worst case (fitting the call first if it
//! does not fit) → forward → meter the response on the side → settle or void.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, head, post};
use chrono::{DateTime, Utc};
use tollgate_core::classify::{self, Decider};
use tollgate_core::ledger::hold_amount;
use tollgate_core::price::Allowances;
use tollgate_core::{Modifiers, Nanos, OnExhausted, PoolKind, PriceEntry, Refusal, RequestBound};
use tollgate_store::{HoldOutcome, HoldRequest, Key, KeyPool, StoreError, hash_secret};

use crate::error::GatewayError;
use crate::id::request_id;
use crate::meter::{Finish, Meter, MeteredBody};
use crate::metrics::{KindLabels, RefusalLabels};
use crate::outbound::{no_upstream, pick_upstream, send, upstream_request};
use crate::retry::void_unknown_hold;
use crate::state::{Gateway, UNBOUNDED_TOOL_ALLOWANCE_DEFAULT, internal};
use crate::upstream::{Kind, Upstream};
use crate::wire::{self, RequestFacts};

/// The gateway's routes, to merge into the server's router.
pub fn routes(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/v1/messages", post(messages))
        .route("/v1/messages/count_tokens", post(count_tokens))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/metrics", get(metrics))
        .route("/", head(probe))
        .route("/api/hello", head(probe).get(probe))
        .with_state(gateway)
}

async fn probe() -> StatusCode {
    StatusCode::OK
}

/// Prometheus metrics; behind the admin token when one is configured (they name accounts).
async fn metrics(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    if let Some(digest) = &gw.settings.metrics_token_digest {
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| hash_secret(t.trim()));
        if given.as_deref() != Some(digest.as_str()) {
            let body = serde_json::json!({"error": {"code": "unauthorized", "message": "GET /metrics needs the admin token as Authorization: Bearer"}});
            return (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response();
        }
    }
    match gw.metrics.render(gw.store.as_ref(), gw.now()).await {
        Ok(text) => {
            ([(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
                .into_response()
        }
        // The store away answers 503 with retry-after, as every other route does.
        Err(StoreError::Unavailable(m)) => {
            tracing::warn!(error = %m, "cannot render metrics: the store is unavailable");
            GatewayError::Unavailable(
                "metrics are unavailable: tollgate's ledger cannot be read for now; retry in a moment".into(),
            )
            .into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot render metrics");
            GatewayError::Internal("metrics are unavailable: tollgate's ledger cannot be read".into()).into_response()
        }
    }
}

async fn messages(State(gw): State<Arc<Gateway>>, request: Request) -> Response {
    metered(gw, Kind::Anthropic, request).await
}

async fn chat_completions(State(gw): State<Arc<Gateway>>, request: Request) -> Response {
    metered(gw, Kind::OpenAi, request).await
}

/// Runs a metered call in a task of its own, so that a client that leaves (which drops this
/// handler) cannot stop it halfway with its hold open: a call held but not yet forwarded is then
/// voided, and a call forwarded ends by the upstream's answer (SPEC section 3: voided on an
/// error status, settled once served).
async fn metered(gw: Arc<Gateway>, kind: Kind, request: Request) -> Response {
    // Dropped with this handler: tells the call its client is gone.
    let (_client_here, client) = tokio::sync::oneshot::channel::<()>();
    match tokio::spawn(metered_call(gw, kind, request, client)).await {
        Ok(answer) => answer.unwrap_or_else(|e| e.into_response_for(kind)),
        Err(e) => {
            tracing::error!(error = %e, "a gateway call failed");
            GatewayError::Internal("the gateway failed while serving the call".into()).into_response_for(kind)
        }
    }
}

/// Forwarded, not billed (SPEC section 4); the caller must still hold a tollgate key.
async fn count_tokens(State(gw): State<Arc<Gateway>>, request: Request) -> Response {
    unmetered_call(gw, Kind::Anthropic, request).await.unwrap_or_else(|e| e.into_response_for(Kind::Anthropic))
}

async fn models(State(gw): State<Arc<Gateway>>, request: Request) -> Response {
    unmetered_call(gw, Kind::Anthropic, request).await.unwrap_or_else(|e| e.into_response_for(Kind::Anthropic))
}

/// The tollgate key of a call: `x-tollgate-key` (passthrough), else `x-api-key`, else Bearer.
fn tollgate_secret(headers: &HeaderMap) -> Option<(&str, bool)> {
    if let Some(v) = headers.get("x-tollgate-key").and_then(|v| v.to_str().ok()) {
        return Some((v.trim(), true));
    }
    if let Some(v) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some((v.trim(), false));
    }
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(|v| (v.trim(), false))
}

async fn authenticate(gw: &Gateway, headers: &HeaderMap) -> Result<(Key, bool), GatewayError> {
    let (secret, separate) = tollgate_secret(headers).ok_or_else(|| {
        GatewayError::Unauthenticated(
            "no tollgate key: send one in x-api-key or Authorization: Bearer (or x-tollgate-key in passthrough mode)"
                .into(),
        )
    })?;
    Ok((gw.key(secret).await?, separate))
}

async fn read_body(gw: &Gateway, body: Body) -> Result<bytes::Bytes, GatewayError> {
    let limit = gw.settings.body_size_bytes_max;
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        GatewayError::TooLarge(format!("the request body is larger than the gateway's limit of {limit} bytes"))
    })
}

async fn unmetered_call(gw: Arc<Gateway>, kind: Kind, request: Request) -> Result<Response, GatewayError> {
    let (parts, body) = request.into_parts();
    let (_key, separate) = authenticate(&gw, &parts.headers).await?;
    let body = read_body(&gw, body).await?;
    let model = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("model").and_then(|m| m.as_str()).map(str::to_string));
    let upstream = match &model {
        Some(m) => pick_upstream(&gw, kind, m)?,
        None => gw.settings.upstreams.iter().find(|u| u.kind == kind).ok_or_else(|| no_upstream(kind, None))?,
    }
    .clone();
    let forward = upstream_request(&upstream, parts.method, &parts.uri, &parts.headers, body, separate)?;
    let response = send(&gw, forward).await?;
    let (parts, incoming) = response.into_parts();
    Ok(Response::from_parts(parts, Body::new(incoming)))
}

fn classify(gw: &Gateway, key: &Key, headers: &HeaderMap) -> Result<(PoolKind, Decider), GatewayError> {
    if let KeyPool::Fixed(pool) = key.pool {
        return Ok((pool, Decider::Key));
    }
    if let Some(v) = headers.get("x-tollgate-pool") {
        let name = v.to_str().unwrap_or("");
        let pool = PoolKind::parse(name).ok_or_else(|| {
            GatewayError::BadRequest(format!("x-tollgate-pool: unknown pool {name:?}; use interactive or programmatic"))
        })?;
        return Ok((pool, Decider::Header));
    }
    for rule in &gw.settings.rules {
        if let Some(v) = headers.get(&rule.header).and_then(|v| v.to_str().ok())
            && crate::upstream::glob_match(&rule.value, v)
        {
            return Ok((rule.pool, Decider::Rule(rule.name.clone())));
        }
    }
    let ua = headers.get(axum::http::header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or("");
    Ok(match classify::by_user_agent(ua) {
        Some((pool, what)) => (pool, Decider::UserAgent(what)),
        None => (gw.settings.default_pool, Decider::Default),
    })
}

/// The price entry for a model, or the clear refusal of an unpriced one.
fn price_entry<'a>(
    gw: &'a Gateway,
    model: &str,
    day: chrono::NaiveDate,
) -> Result<(&'a PriceEntry, String), GatewayError> {
    match gw.prices.price_at(model, day) {
        Ok(e) => Ok((e, gw.prices.resolve(model).unwrap_or(model).to_string())),
        Err(original) => match &gw.settings.unknown_model_as {
            Some(other) => gw
                .prices
                .price_at(other, day)
                .map(|e| (e, model.to_string()))
                .map_err(|e| GatewayError::BadRequest(e.to_string())),
            None => Err(GatewayError::BadRequest(original.to_string())),
        },
    }
}

fn modifiers(facts: &RequestFacts) -> Modifiers {
    Modifiers { batch: facts.batch, geo_us: facts.geo_us, fast: facts.fast }
}

/// What a call's hold is worked out from: its price, what its request bounds, the allowances
/// for what it does not, and the multiplier the hold is raised by.
struct HoldTerms<'a> {
    entry: &'a PriceEntry,
    facts: &'a RequestFacts,
    allow: Allowances,
    ppm: u64,
}

impl HoldTerms<'_> {
    fn bound(&self, input_tokens_max: u64, max_tokens: u64) -> RequestBound {
        let f = self.facts;
        RequestBound {
            body_bytes: input_tokens_max,
            max_tokens,
            web_search_max_uses: f.web_search_max_uses,
            web_fetch_max_uses: f.web_fetch_max_uses,
            unbounded_inputs: f.unbounded_inputs,
            unbounded_tools: !f.unbounded_tools.is_empty(),
            modifiers: modifiers(f),
        }
    }

    /// The hold for an input bound and an output bound: the worst case × the multiplier.
    fn amount(&self, input_tokens_max: u64, max_tokens: u64) -> Option<Nanos> {
        self.entry
            .worst_case(&self.bound(input_tokens_max, max_tokens), &self.allow)
            .ok()
            .and_then(|w| hold_amount(w, self.ppm))
    }

    /// The most output tokens (≤ `wanted`) whose hold fits `room`.
    fn affordable_output(&self, input_tokens_max: u64, wanted: u64, room: Nanos) -> u64 {
        let fits = |m: u64| self.amount(input_tokens_max, m).is_some_and(|h| h <= room);
        if !fits(0) {
            return 0;
        }
        let (mut lo, mut hi) = (0u64, wanted);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if fits(mid) { lo = mid } else { hi = mid - 1 }
        }
        lo
    }
}

/// The allowance a call with tools the gateway cannot bound is held with, or its refusal: on a
/// `block` pool such a call is admitted only under a configured allowance (SPEC section 3).
fn unbounded_tool_allowance(
    gw: &Gateway,
    key: &Key,
    pool: PoolKind,
    on_exhausted: OnExhausted,
    facts: &RequestFacts,
) -> Result<Nanos, GatewayError> {
    if facts.unbounded_tools.is_empty() {
        return Ok(Nanos::ZERO);
    }
    match (gw.settings.unbounded_tool_allowance, on_exhausted) {
        (Some(allowance), _) => Ok(allowance),
        (None, OnExhausted::Payg | OnExhausted::Alert) => Ok(UNBOUNDED_TOOL_ALLOWANCE_DEFAULT),
        (None, OnExhausted::Block) => {
            gw.metrics.refusals.get_or_create(&RefusalLabels { pool: pool.as_str(), reason: "unbounded_tool" }).inc();
            let tools = facts.unbounded_tools.join(", ");
            Err(GatewayError::BadRequest(format!(
                "this request uses {tools}, whose cost tollgate cannot bound before the call, and the {} pool of \
                 account {} is a block pool (a hard cap): remove {tools} from the request, or set \
                 [gateway] unbounded_tool_allowance_usd in tollgate.toml to hold such calls with an allowance",
                pool.as_str(),
                key.account
            )))
        }
    }
}

struct Admitted {
    hold_id: String,
    /// The call's part of a lease, when it runs on one (then `hold_id` is the lease's).
    part: Option<crate::lease::Part>,
    /// The input and output bounds the call was held at (after fitting, if it was fitted).
    input_tokens_max: u64,
    max_tokens: u64,
    remaining_after: Option<Nanos>,
    clamped_to: Option<u64>,
    body: bytes::Bytes,
}

async fn metered_call(
    gw: Arc<Gateway>,
    kind: Kind,
    request: Request,
    mut client: tokio::sync::oneshot::Receiver<()>,
) -> Result<Response, GatewayError> {
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    let (key, separate) = authenticate(&gw, &parts.headers).await?;
    let body = read_body(&gw, body).await?;
    let mut facts = match kind {
        Kind::Anthropic => wire::anthropic_request(&body),
        Kind::OpenAi => wire::openai_request(&body),
    }
    .map_err(|e| GatewayError::BadRequest(e.0))?;
    let upstream = pick_upstream(&gw, kind, &facts.model)?.clone();
    let now = gw.now();
    let (entry, model) = price_entry(&gw, &facts.model, now.date_naive())?;
    let entry = entry.clone();
    let (pool, decider) = classify(&gw, &key, &parts.headers)?;
    let terms = gw.pool_terms(&key.account, pool).await?;
    let allow = Allowances {
        unbounded_tools: unbounded_tool_allowance(&gw, &key, pool, terms.on_exhausted, &facts)?,
        ..gw.settings.allowances
    };

    let (body, strip_usage_chunk) = rewrite_body(&gw, kind, &mut facts, body)?;

    let id = request_id()?;
    let source = decider.source();
    let hold_terms = HoldTerms { entry: &entry, facts: &facts, allow, ppm: terms.multiplier_ppm };
    let call = Call {
        gw: &gw,
        kind,
        upstream: &upstream,
        headers: &parts.headers,
        key: &key,
        pool,
        source: &source,
        model: &model,
        id: &id,
        separate,
    };
    let admitted = admit(&call, &hold_terms, body).await?;

    let finish = Finish {
        gateway: gw.clone(),
        account: key.account.clone(),
        hold_id: admitted.hold_id.clone(),
        call_id: id.clone(),
        lease: admitted.part.clone().map(|p| (crate::lease::scope(&key, pool), p)),
        pool,
        model: model.clone(),
        entry: entry.clone(),
        modifiers: modifiers(&facts),
        bound: hold_terms.bound(admitted.input_tokens_max, admitted.max_tokens),
        source: source.clone(),
        labels: key.labels.clone(),
        started,
        _open: gw.calls_open.clone(),
    };
    gw.metrics.holds_open.inc();
    let forward =
        match upstream_request(&upstream, parts.method, &parts.uri, &parts.headers, admitted.body.clone(), separate) {
            Ok(f) => f,
            Err(e) => {
                // Held but never forwarded: nothing was served.
                finish.void("not_forwarded").await;
                return Err(e);
            }
        };
    if matches!(client.try_recv(), Err(tokio::sync::oneshot::error::TryRecvError::Closed)) {
        // The client left while the call was held: nobody would read the answer.
        finish.void("not_forwarded").await;
        return Err(GatewayError::Internal("the client left before the call was forwarded".into()));
    }
    gw.metrics.overhead.get_or_create(&KindLabels { api: api_label(kind) }).observe(started.elapsed().as_secs_f64());
    // A client that leaves from now on no longer stops the call (it runs in a task of its own,
    // `metered`): it ends by the upstream's answer, and a body built for no one is dropped.
    forward_and_meter(forward, finish, kind, strip_usage_chunk, admitted).await
}

/// The body forwarded upstream, and whether the OpenAI usage chunk is to be hidden from the
/// client: server tools without `max_uses` get one, so that their uses are bounded and held;
/// an OpenAI stream asks for the usage chunk, hidden when the client did not ask for it.
fn rewrite_body(
    gw: &Gateway,
    kind: Kind,
    facts: &mut RequestFacts,
    body: bytes::Bytes,
) -> Result<(bytes::Bytes, bool), GatewayError> {
    let bad = |e: wire::BadRequest| GatewayError::BadRequest(e.0);
    let body = if facts.tools_without_max_uses() > 0 {
        let max_uses = gw.settings.server_tool_max_uses;
        facts.inject_max_uses(max_uses);
        bytes::Bytes::from(wire::anthropic_inject_max_uses(&body, max_uses).map_err(bad)?)
    } else {
        body
    };
    let strip_usage_chunk = kind == Kind::OpenAi && facts.stream && !facts.include_usage;
    if strip_usage_chunk {
        return Ok((bytes::Bytes::from(wire::openai_rewrite(&body, true, None).map_err(bad)?), true));
    }
    Ok((body, false))
}

/// Sends the call upstream and answers with its response, the body metered.
async fn forward_and_meter(
    forward: axum::http::Request<Body>,
    finish: Finish,
    kind: Kind,
    strip_usage_chunk: bool,
    admitted: Admitted,
) -> Result<Response, GatewayError> {
    let (gw, pool) = (finish.gateway.clone(), finish.pool);
    let api = api_label(kind);
    let sent = Instant::now();
    let response = match send(&gw, forward).await {
        Ok(r) => r,
        Err(e) => {
            finish.void(if matches!(e, GatewayError::Timeout(_)) { "timeout" } else { "unreachable" }).await;
            return Err(e);
        }
    };
    gw.metrics.upstream_latency.get_or_create(&KindLabels { api }).observe(sent.elapsed().as_secs_f64());
    let (mut head, incoming) = response.into_parts();
    let headers = &mut head.headers;
    headers.insert("x-tollgate-pool", HeaderValue::from_static(pool.as_str()));
    #[allow(clippy::expect_used, reason = "request ids are `tgr_` and hex digits: a valid header value")]
    let request_id = HeaderValue::from_str(&finish.call_id).expect("ids are ASCII");
    headers.insert("x-tollgate-request-id", request_id);
    if let Some(r) = admitted.remaining_after {
        #[allow(clippy::expect_used, reason = "an amount prints as digits, `-` and `.`: a valid header value")]
        let remaining = HeaderValue::from_str(&r.to_string()).expect("amounts are ASCII");
        headers.insert("x-tollgate-remaining-usd", remaining);
    }
    if let Some(m) = admitted.clamped_to {
        headers.insert("x-tollgate-max-tokens-clamped", HeaderValue::from(m));
    }
    if gw.settings.claude_code_warnings && kind == Kind::Anthropic {
        warn_claude_code(&gw, &finish.account, pool, headers).await;
    }
    if !head.status.is_success() {
        // Errors are not billed: void, and forward the error unchanged.
        let meter = Meter::Error;
        return Ok(Response::from_parts(head, Body::new(MeteredBody::new(incoming, meter, finish))));
    }
    let is_sse = head
        .headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let meter = match (kind, is_sse) {
        (Kind::Anthropic, true) => Meter::AnthropicSse(Default::default()),
        (Kind::OpenAi, true) => {
            Meter::OpenAiSse { stream: Default::default(), strip: strip_usage_chunk.then(Default::default) }
        }
        (_, false) => Meter::json(kind),
    };
    if strip_usage_chunk {
        head.headers.remove(axum::http::header::CONTENT_LENGTH);
    }
    Ok(Response::from_parts(head, Body::new(MeteredBody::new(incoming, meter, finish))))
}

/// The `api` label of the gateway's latency metrics.
fn api_label(kind: Kind) -> &'static str {
    match kind {
        Kind::Anthropic => "anthropic",
        Kind::OpenAi => "openai",
    }
}

/// Claude Code shows its own usage warning when it sees these headers (as a subscription's rate
/// limits send them): once the pool's charged + held passes 75 % of its limit.
async fn warn_claude_code(gw: &Gateway, account: &str, pool: PoolKind, headers: &mut HeaderMap) {
    let Ok(balance) = gw.store.balance(account, gw.now()).await else { return };
    let Some(p) = balance.pools.iter().find(|p| p.pool == pool) else { return };
    let Some(limit) = p.limit.filter(|l| l.0 > 0) else { return };
    // The unused part of this gateway's leases is held, not spent.
    let held = p.held.0 - gw.leases.book.unused(account, pool).0;
    let spent = i128::from(p.used.0) + i128::from(p.overage.0) + i128::from(held);
    // Utilization in hundredths, from integers: 0.75 ≤ spent / limit.
    let hundredths = (spent * 100 / i128::from(limit.0)).clamp(0, 100);
    if hundredths < 75 {
        return;
    }
    let utilization = format!("{}.{:02}", hundredths / 100, hundredths % 100);
    headers.insert("anthropic-ratelimit-unified-status", HeaderValue::from_static("allowed_warning"));
    headers.insert("anthropic-ratelimit-unified-representative-claim", HeaderValue::from_static("seven_day"));
    if let Ok(v) = HeaderValue::from_str(&utilization) {
        headers.insert("anthropic-ratelimit-unified-7d-utilization", v);
    }
    headers.insert("anthropic-ratelimit-unified-reset", HeaderValue::from(balance.cycle.end.timestamp()));
}

/// A gateway call once it is authenticated, read, priced and classified: what admitting it
/// (holding its worst case, fitting it, refusing it) needs to know.
struct Call<'a> {
    gw: &'a Arc<Gateway>,
    kind: Kind,
    upstream: &'a Upstream,
    headers: &'a HeaderMap,
    key: &'a Key,
    pool: PoolKind,
    /// Where the call comes from, as the pool rules named it.
    source: &'a str,
    model: &'a str,
    /// The call's request id, and its hold's id when it is held on its own.
    id: &'a str,
    /// The tollgate key came in a header of its own (the upstream's key is the caller's).
    separate: bool,
}

/// Holds the call's worst case; when it does not fit, first fits the call by lowering its
/// output bound (SPEC section 3), and refuses only what cannot fit even then.
async fn admit(call: &Call<'_>, terms: &HoldTerms<'_>, body: bytes::Bytes) -> Result<Admitted, GatewayError> {
    let Call { gw, kind, upstream, headers, key, pool, separate, .. } = *call;
    let wanted = terms.facts.max_tokens.unwrap_or(0);
    let input_max = body.len() as u64;
    let overflow = || GatewayError::BadRequest("the request's worst case overflows the ledger".into());
    let amount = terms.amount(input_max, wanted).ok_or_else(overflow)?;
    if let Some(part) = gw.leases.book.take(key, pool, amount, gw.settings.lease) {
        if part.low {
            gw.leases.next(key, pool);
        }
        let remaining_after = gw.leases.book.remaining(&crate::lease::scope(key, pool));
        let hold_id = part.lease_id.clone();
        return Ok(Admitted {
            hold_id,
            part: Some(part),
            input_tokens_max: input_max,
            max_tokens: wanted,
            remaining_after,
            clamped_to: None,
            body,
        });
    }
    let mut refusal = hold(call, amount).await?;
    if refusal.is_err() && gw.leases.give_back(key, pool).await {
        refusal = hold(call, amount).await?;
    }
    let refusal = match refusal {
        Ok(h) => {
            gw.leases.top_up(key, pool, h.1);
            return Ok(Admitted {
                hold_id: h.0,
                part: None,
                input_tokens_max: input_max,
                max_tokens: wanted,
                remaining_after: h.1,
                clamped_to: None,
                body,
            });
        }
        Err(r) => r,
    };
    let (room, resets_at) = match refusal {
        (Refusal::PoolExhausted { remaining, .. }, resets) | (Refusal::KeyCapReached { remaining, .. }, resets) => {
            (remaining, resets)
        }
        (other, resets) => return Err(refused(call, other, amount, resets).await),
    };
    // Fit the call: a tighter input bound from count_tokens (Anthropic), then the output bound.
    let input_bound = match kind {
        Kind::Anthropic => count_input_tokens(gw, upstream, headers, &body, separate)
            .await
            .map(|n| n + n / 20 + 100)
            .unwrap_or(input_max),
        Kind::OpenAi => input_max,
    }
    .min(input_max);
    let fitted = terms.affordable_output(input_bound, wanted, room);
    if wanted == 0 || fitted < gw.settings.min_output_tokens.min(wanted) {
        return Err(refused(call, refusal.0, amount, resets_at).await);
    }
    let amount = terms.amount(input_bound, fitted).ok_or_else(overflow)?;
    let clamped_body = match kind {
        Kind::Anthropic => wire::anthropic_clamp(&body, fitted),
        Kind::OpenAi => wire::openai_rewrite(&body, false, Some(fitted)),
    }
    .map_err(|e| GatewayError::BadRequest(e.0))?;
    match hold(call, amount).await? {
        Ok(h) => Ok(Admitted {
            hold_id: h.0,
            part: None,
            input_tokens_max: input_bound,
            max_tokens: fitted,
            remaining_after: h.1,
            clamped_to: Some(fitted),
            body: bytes::Bytes::from(clamped_body),
        }),
        Err((r, resets)) => Err(refused(call, r, amount, resets).await),
    }
}

type HoldResult = Result<(String, Option<Nanos>), (Refusal, DateTime<Utc>)>;

async fn hold(call: &Call<'_>, amount: Nanos) -> Result<HoldResult, GatewayError> {
    let Call { gw, key, pool, source, model, id, .. } = *call;
    let request = HoldRequest {
        account: key.account.clone(),
        id: id.to_string(),
        pool,
        key: Some(key.id.clone()),
        amount,
        ttl_s: gw.settings.hold_ttl_s,
        model: Some(model.to_string()),
        source: Some(source.to_string()),
        fingerprint: String::new(),
        made_by: tollgate_store::Maker::Gateway,
    };
    let held = gw.store.hold(request, gw.now()).await;
    if let Err(StoreError::Unavailable(_)) = &held {
        // The client hears 503 and is not charged: a hold that did land (a lost connection can
        // hide a commit) is voided once the store is back.
        void_unknown_hold(gw.store.clone(), gw.now(), gw.settings.hold_ttl_s, key.account.clone(), id.to_string());
    }
    match held.map_err(internal)? {
        HoldOutcome::Held(h) | HoldOutcome::Replayed(h) => Ok(Ok((h.id, h.remaining_after))),
        HoldOutcome::Refused { refusal, resets_at } => Ok(Err((refusal, resets_at))),
    }
}

async fn refused(call: &Call<'_>, refusal: Refusal, requested: Nanos, resets_at: DateTime<Utc>) -> GatewayError {
    let Call { gw, key, pool, .. } = *call;
    let now = gw.now();
    gw.metrics.refusals.get_or_create(&RefusalLabels { pool: pool.as_str(), reason: refusal.code() }).inc();
    // A pool's cap is hit only when the pool refused: a key's own cap is the key's, not the pool's.
    if matches!(refusal, Refusal::PoolExhausted { .. }) {
        gw.feed.refused(&key.account, pool);
    }
    // Which bound of the policy refused, for the message (best effort: not on the hot path).
    let scope = match gw.store.balance(&key.account, now).await {
        Ok(b) => b.pool(pool).policy.limit_scope(b.pool(pool).grants).map(|(_, s)| s),
        Err(_) => None,
    };
    let resets = resets_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let context = tollgate_core::ledger::RefusalContext {
        account: &key.account,
        pool,
        key: Some(&key.id),
        requested,
        scope,
        resets: &resets,
    };
    let message = match refusal {
        Refusal::PoolExhausted { .. } | Refusal::KeyCapReached { .. } => {
            tollgate_core::ledger::refusal_message(&refusal, &context)
        }
        other => format!("the call cannot be held ({}); resets {resets}", other.code()),
    };
    GatewayError::Refused { message, retry_after_s: (resets_at - now).num_seconds() }
}

/// Most bytes of a `count_tokens` answer read (it is `{"input_tokens":N}`).
const COUNT_TOKENS_BYTES_MAX: usize = 64 * 1024;

/// Longest a `count_tokens` call may take, answer included (at most `upstream_timeout`).
const COUNT_TOKENS_TIME_MAX: Duration = Duration::from_secs(10);

/// Asks the upstream's free `count_tokens` for the request's input; None if it cannot say, or
/// not within `COUNT_TOKENS_BYTES_MAX` and `COUNT_TOKENS_TIME_MAX`.
async fn count_input_tokens(
    gw: &Gateway,
    upstream: &Upstream,
    headers: &HeaderMap,
    body: &[u8],
    separate: bool,
) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let mut count = serde_json::Map::new();
    for field in ["model", "messages", "system", "tools", "tool_choice", "thinking"] {
        if let Some(x) = v.get(field) {
            count.insert(field.to_string(), x.clone());
        }
    }
    let body = serde_json::to_vec(&count).ok()?;
    let uri: Uri = "/v1/messages/count_tokens".parse().ok()?;
    let request = upstream_request(upstream, Method::POST, &uri, headers, body.into(), separate).ok()?;
    let answer = async {
        let response = gw.client.request(request).await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        let body = http_body_util::Limited::new(response.into_body(), COUNT_TOKENS_BYTES_MAX);
        Some(http_body_util::BodyExt::collect(body).await.ok()?.to_bytes())
    };
    let limit = COUNT_TOKENS_TIME_MAX.min(gw.settings.upstream_timeout);
    let bytes = tokio::time::timeout(limit, answer).await.ok()??;
    serde_json::from_slice::<serde_json::Value>(&bytes).ok()?.get("input_tokens")?.as_u64()
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        self.into_response_for(Kind::Anthropic)
    }
}
