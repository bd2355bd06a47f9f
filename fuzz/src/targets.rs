//! The fuzz targets (issue 13): one entry function per reader of hostile bytes, each checking
//! what must hold beyond "no panic, no hang". `fuzz/src/main.rs` runs one under AFL++;
//! `crates/tollgate-server/tests/fuzz_corpus.rs` replays every file of `fuzz/corpus/<target>/`
//! through the same function (this file is included there with `#[path]`), so CI keeps the
//! corpus passing without the fuzzer.

use std::sync::LazyLock;

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{Value, json};
use tollgate_config::{Env, Settings, UnknownModel};
use tollgate_core::price::{Allowances, PriceEntry};
use tollgate_core::{Modifiers, PriceTable, RequestBound, Usage};
use tollgate_gateway::wire::{self, AnthropicStream, OpenAiStream, RequestFacts, UsageChunkStrip};
use tollgate_server::{Caller, EventRules};

/// A target: takes any bytes; panics when something that must hold does not.
pub type Target = fn(&[u8]);

/// Every target by name: the name is its corpus directory and the fuzzer's argument.
pub const TARGETS: [(&str, Target); 7] = [
    ("anthropic_sse", anthropic_sse),
    ("openai_sse", openai_sse),
    ("json_usage", json_usage),
    ("request_bound", request_bound),
    ("config", config),
    ("price_file", price_file),
    ("events", events),
];

static PRICES: LazyLock<PriceTable> = LazyLock::new(PriceTable::builtin);

/// The day prices are read at: fixed, so a run is repeatable.
fn today() -> NaiveDate {
    NaiveDate::from_ymd_opt(2026, 12, 1).expect("a date")
}

/// `data` fed whole, byte by byte, and cut in two where its first byte says.
fn cuts(data: &[u8]) -> [Vec<&[u8]>; 3] {
    let at = data.first().map_or(0, |&b| usize::from(b) * data.len() / 256);
    [vec![data], data.chunks(1).collect(), vec![&data[..at], &data[at..]]]
}

/// An Anthropic SSE stream reads the same however it is cut, and every count it reads is within
/// the per-call bound.
pub fn anthropic_sse(data: &[u8]) {
    let [whole, rest @ ..] = cuts(data).map(|chunks| {
        let mut s = AnthropicStream::default();
        chunks.iter().for_each(|c| s.feed(c));
        s
    });
    for s in rest {
        assert_eq!(s.reported, whole.reported);
        assert_eq!(
            (s.started, s.stopped, &s.error, s.text_bytes),
            (whole.started, whole.stopped, &whole.error, whole.text_bytes)
        );
    }
    assert!(whole.reported.usage.validate().is_ok(), "{:?}", whole.reported.usage);
}

/// An OpenAI SSE stream reads the same however it is cut; stripping the usage chunk forwards
/// the same bytes however the stream is cut, never adds any, and stripping again changes nothing.
pub fn openai_sse(data: &[u8]) {
    let [whole, rest @ ..] = cuts(data).map(|chunks| {
        let mut s = OpenAiStream::default();
        chunks.iter().for_each(|c| s.feed(c));
        s
    });
    for s in rest {
        assert_eq!(s.reported, whole.reported);
        assert_eq!((s.done, s.started, s.text_bytes), (whole.done, whole.started, whole.text_bytes));
    }
    assert!(whole.reported.usage.validate().is_ok(), "{:?}", whole.reported.usage);

    let strip = |chunks: &[&[u8]]| {
        let (mut strip, mut out) = (UsageChunkStrip::default(), Vec::new());
        chunks.iter().for_each(|c| strip.feed(c, &mut out));
        strip.finish(&mut out);
        out
    };
    let [whole, rest @ ..] = cuts(data).map(|chunks| strip(&chunks));
    for out in rest {
        assert_eq!(out, whole);
    }
    assert!(whole.len() <= data.len());
    assert_eq!(strip(&[&whole]), whole, "stripping twice removed more");
}

/// A JSON answer's usage is within the per-call bound, reads the same once re-encoded, and the
/// same as its usage object sent in an SSE event (the stream readers share the usage reading).
pub fn json_usage(data: &[u8]) {
    let anthropic = wire::anthropic_response_usage(data);
    let openai = wire::openai_response_usage(data);
    for report in [anthropic, openai] {
        assert!(report.reported.usage.validate().is_ok(), "{:?}", report.reported.usage);
    }
    let Ok(v) = serde_json::from_slice::<Value>(data) else { return };
    let again = serde_json::to_vec(&v).expect("a value encodes");
    assert_eq!(wire::anthropic_response_usage(&again), anthropic);
    assert_eq!(wire::openai_response_usage(&again), openai);
    if let Some(usage) = v.get("usage") {
        let mut stream = AnthropicStream::default();
        stream.feed(format!("data: {}\n\n", json!({"type": "message_delta", "usage": usage})).as_bytes());
        assert_eq!(stream.reported, anthropic.reported);
        let mut stream = OpenAiStream::default();
        stream.feed(format!("data: {}\n\n", json!({"choices": [], "usage": usage})).as_bytes());
        assert_eq!(stream.reported, openai.reported);
    }
}

/// A request's facts survive the gateway's rewrites of its body (`max_uses` given, `max_tokens`
/// clamped, usage asked for), and its worst case covers what the bound lets it bill.
pub fn request_bound(data: &[u8]) {
    if let Ok(facts) = wire::anthropic_request(data) {
        let body = wire::anthropic_inject_max_uses(data, 5).expect("a body read once is rewritten");
        let mut want = facts.clone();
        want.inject_max_uses(5);
        assert_eq!(wire::anthropic_request(&body), Ok(want));
        let body = wire::anthropic_clamp(data, 1000).expect("a body read once is clamped");
        assert_eq!(wire::anthropic_request(&body), Ok(RequestFacts { max_tokens: Some(1000), ..facts.clone() }));
        worst_case_covers(&facts, data.len() as u64, "claude-sonnet-4-5");
    }
    if let Ok(facts) = wire::openai_request(data) {
        let body = wire::openai_rewrite(data, true, Some(1000)).expect("a body read once is rewritten");
        let want = RequestFacts { max_tokens: Some(1000), include_usage: true, ..facts.clone() };
        assert_eq!(wire::openai_request(&body), Ok(want));
        worst_case_covers(&facts, data.len() as u64, "gpt-5");
    }
}

/// The worst case of a request (priced as its model, or as `fallback` when it has no price) is
/// at least its input side and at least the cost of any usage the bound allows.
fn worst_case_covers(facts: &RequestFacts, body_bytes: u64, fallback: &str) {
    let entry = PRICES.price_at(&facts.model, today()).or_else(|_| PRICES.price_at(fallback, today()));
    let entry = entry.expect("the fallback model has a price");
    let allow = Allowances::default();
    let bound = RequestBound {
        body_bytes,
        max_tokens: facts.max_tokens.unwrap_or(0),
        web_search_max_uses: facts.web_search_max_uses,
        web_fetch_max_uses: facts.web_fetch_max_uses,
        unbounded_inputs: facts.unbounded_inputs,
        unbounded_tools: !facts.unbounded_tools.is_empty(),
        modifiers: Modifiers { batch: facts.batch, geo_us: facts.geo_us, fast: facts.fast },
    };
    let Ok(worst) = entry.worst_case(&bound, &allow) else { return };
    let input = entry.input_worst_case(&bound, &allow).expect("the input side of a worst case that fits");
    assert!(input <= worst, "input side {input:?} above the worst case {worst:?}");
    let input_tokens = (bound.web_search_max_uses + bound.web_fetch_max_uses) * allow.input_tokens_per_tool_use
        + bound.unbounded_inputs * allow.input_tokens_per_unbounded_input
        + body_bytes;
    let at_bound =
        Usage { output_tokens: bound.max_tokens, web_search_requests: bound.web_search_max_uses, ..Usage::default() };
    for usage in [
        Usage { input_tokens, ..at_bound },
        Usage { cache_creation_5m_input_tokens: input_tokens, ..at_bound },
        Usage { cache_creation_1h_input_tokens: input_tokens, ..at_bound },
        Usage { cache_read_input_tokens: input_tokens, ..at_bound },
    ] {
        if let Ok(cost) = entry.cost(&usage, &bound.modifiers) {
            assert!(cost <= worst, "{usage:?} costs {cost:?}, above the worst case {worst:?}");
        }
    }
}

/// No environment: the file alone decides.
struct NoEnv;

impl Env for NoEnv {
    fn var(&self, _: &str) -> Option<String> {
        None
    }
}

/// A `tollgate.toml` is read or refused with a message; what it validates to validates again to
/// the same, and every price it holds can be used.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(mut file) = tollgate_config::parse_file(text) else { return };
    // A LiteLLM file is read from disk: the `price_file` target reads its text.
    file.pricing.litellm_file = None;
    let Ok(settings) = Settings::from_file(file, None, &NoEnv) else { return };
    let again = Settings::from_file(settings.file.clone(), None, &NoEnv).expect("valid settings validate again");
    assert_eq!(
        (&again.listen, &again.store, &again.tiers, &again.unknown_model),
        (&settings.listen, &settings.store, &settings.tiers, &settings.unknown_model)
    );
    for entry in settings.prices.entries() {
        price_is_usable(entry);
    }
    if let UnknownModel::PriceAs(model) = &settings.unknown_model {
        assert!(settings.prices.resolve(model).is_some(), "unknown models priced as {model:?}, which has no price");
    }
}

/// A price's cost and worst case answer (an amount or an overflow) for any usage.
fn price_is_usable(entry: &PriceEntry) {
    let usage = Usage { input_tokens: 300_000, output_tokens: 100_000, web_search_requests: 10, ..Usage::default() };
    let modifiers = Modifiers { batch: true, geo_us: true, fast: true };
    let _ = entry.cost(&usage, &modifiers);
    let bound = RequestBound { body_bytes: 300_000, max_tokens: 100_000, modifiers, ..RequestBound::default() };
    let _ = entry.worst_case(&bound, &Allowances::default());
}

/// A LiteLLM price file is read exactly: every rate it gives is non-negative, and an entry
/// written back as LiteLLM JSON (its rates as exact decimals) reads as the same entry.
pub fn price_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(entries) = tollgate_config::read_litellm(text, today()) else { return };
    for entry in &entries {
        price_is_usable(entry);
        let mut file = serde_json::Map::new();
        file.insert("m".into(), litellm_json(entry));
        let again = tollgate_config::read_litellm(&Value::Object(file).to_string(), today()).expect("written back");
        assert_eq!(again, vec![PriceEntry { model: "m".into(), ..entry.clone() }]);
    }
}

/// A price entry as LiteLLM writes one, each rate (nano-USD per MTok) as USD per token.
fn litellm_json(e: &PriceEntry) -> Value {
    let per_token = |rate: i64| -> Value { serde_json::from_str(&format!("{rate}e-15")).expect("a JSON number") };
    let mut v = json!({
        "litellm_provider": e.provider.as_str(),
        "mode": "chat",
        "input_cost_per_token": per_token(e.rates.input),
        "output_cost_per_token": per_token(e.rates.output),
        "cache_read_input_token_cost": per_token(e.rates.cache_read),
        "cache_creation_input_token_cost": per_token(e.rates.cache_write_5m),
        "cache_creation_input_token_cost_above_1hr": per_token(e.rates.cache_write_1h),
    });
    if let Some(lc) = &e.long_context {
        let r = &lc.rates;
        for (field, rate) in [
            ("input_cost_per_token_above_200k_tokens", r.input),
            ("output_cost_per_token_above_200k_tokens", r.output),
            ("cache_read_input_token_cost_above_200k_tokens", r.cache_read),
            ("cache_creation_input_token_cost_above_200k_tokens", r.cache_write_5m),
            ("cache_creation_input_token_cost_above_1hr_above_200k_tokens", r.cache_write_1h),
        ] {
            v[field] = per_token(rate);
        }
    }
    v
}

/// A `POST /events` body is refused or checked into events that store only safe strings, sane
/// counts and a cost of at least zero; an account key's events are the admin's, attributed to it.
pub fn events(data: &[u8]) {
    let Ok(body) = serde_json::from_slice::<Value>(data) else { return };
    let now: DateTime<Utc> = today().and_hms_opt(12, 0, 0).expect("a time").and_utc();
    let unknown_model = UnknownModel::PriceAs("claude-sonnet-4-5".into());
    let rules = EventRules { prices: &PRICES, unknown_model: &unknown_model, now };
    let key = Caller::Account { account: "acme".into(), key_id: "key_1".into() };
    let admin = tollgate_server::validate_events(body.clone(), &Caller::Admin, &rules);
    let Ok((mine, batch)) = tollgate_server::validate_events(body, &key, &rules) else { return };
    let (theirs, admin_batch) = admin.expect("what an account key may post, the admin may");
    assert_eq!((mine.len(), batch), (theirs.len(), admin_batch));
    for (e, a) in mine.iter().zip(&theirs) {
        assert_eq!((&e.account, e.key.as_deref()), (&"acme".to_string(), Some("key_1")));
        assert_eq!((&e.id, e.cost, &e.fingerprint), (&a.id, a.cost, &a.fingerprint));
        assert!(!e.model.is_empty() && e.model.len() <= 200 && !e.model.chars().any(char::is_control));
        let safe_id =
            |id: &str| id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:@/-".contains(&b));
        assert!(!e.id.is_empty() && safe_id(&e.id), "{:?}", e.id);
        assert!(e.labels.len() <= 32);
        assert!(e.usage.validate().is_ok() && !e.cost.is_negative(), "{:?} {:?}", e.usage, e.cost);
        assert!(e.timestamp <= now + chrono::Duration::seconds(300));
    }
}
