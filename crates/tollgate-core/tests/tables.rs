//! Data-driven table tests for the pure domain: prices, worst cases, cycles and money.
//!
//! Every expected figure is worked out by hand in the comment next to its row, from SPEC section 2
//! and `reference/anthropic.md` section 4.1; none is computed by calling the code under test.
//!
//! Unit reminder: $1 / MTok = 1e9 nano-USD / 1e6 tokens = 1,000 nano-USD per token, so
//! $3 / MTok = 3,000 nano/token, $0.30 / MTok = 300 nano/token, $0.01 / MTok = 10 nano/token.
//! Web search: $10 / 1,000 requests = $0.01 = 10,000,000 nano per request.

use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;
use tollgate_core::price::{Allowances, PriceError};
use tollgate_core::{Cycle, CycleAnchor, Modifiers, MoneyError, Nanos, PriceEntry, PriceTable, Provider, Rates};
use tollgate_core::{RequestBound, Usage};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn date(s: &str) -> NaiveDate {
    s.parse().unwrap_or_else(|e| panic!("bad date {s:?} in table: {e}"))
}

fn utc(s: &str) -> DateTime<Utc> {
    s.parse().unwrap_or_else(|e| panic!("bad instant {s:?} in table: {e}"))
}

/// Anthropic-shaped usage: input (uncached), 5m write, 1h write, cache read, output, web searches.
const fn u(input: u64, w5m: u64, w1h: u64, read: u64, output: u64, web: u64) -> Usage {
    Usage {
        input_tokens: input,
        cache_creation_5m_input_tokens: w5m,
        cache_creation_1h_input_tokens: w1h,
        cache_read_input_tokens: read,
        output_tokens: output,
        web_search_requests: web,
    }
}

const STD: Modifiers = Modifiers { batch: false, geo_us: false, fast: false };
const BATCH: Modifiers = Modifiers { batch: true, geo_us: false, fast: false };
const GEO: Modifiers = Modifiers { batch: false, geo_us: true, fast: false };
const BATCH_GEO: Modifiers = Modifiers { batch: true, geo_us: true, fast: false };
const FAST: Modifiers = Modifiers { batch: false, geo_us: false, fast: true };
const FAST_GEO_BATCH: Modifiers = Modifiers { batch: true, geo_us: true, fast: true };

/// The day most rows are priced on: the date of the price mirror in the reference.
const D: &str = "2026-08-20";

/// A synthetic model priced in single nano-USD per MTok, so that sub-nano fractions are easy to
/// produce by hand: input 1, 5m write 2, 1h write 3, cache read 1, output 5 nano-USD / MTok.
const TINY: &str = "test-tiny";

fn table() -> PriceTable {
    let mut t = PriceTable::builtin();
    t.insert(PriceEntry {
        model: TINY.to_string(),
        provider: Provider::Anthropic,
        effective_from: date("2026-01-01"),
        rates: Rates { input: 1, cache_write_5m: 2, cache_write_1h: 3, cache_read: 1, output: 5 },
        long_context: None,
        fast_multiplier_ppm: None,
        geo_us_surcharge: false,
        web_search_per_request: Nanos::ZERO,
    });
    t
}

// ---------------------------------------------------------------------------------------------
// 1. Prices: cost of a call
// ---------------------------------------------------------------------------------------------

struct CostRow {
    model: &'static str,
    date: &'static str,
    usage: Usage,
    modifiers: Modifiers,
    /// Nano-USD, or None for an unknown model.
    want: Option<i64>,
}

const fn row(model: &'static str, date: &'static str, usage: Usage, modifiers: Modifiers, want: i64) -> CostRow {
    CostRow { model, date, usage, modifiers, want: Some(want) }
}

const fn unknown(model: &'static str) -> CostRow {
    CostRow { model, date: D, usage: u(1000, 0, 0, 0, 0, 0), modifiers: STD, want: None }
}

/// `Usage::from_openai` is not const; OpenAI rows are built at run time.
fn oa(model: &'static str, prompt: u64, cached: u64, completion: u64, want: i64) -> CostRow {
    CostRow { model, date: D, usage: Usage::from_openai(prompt, cached, completion), modifiers: STD, want: Some(want) }
}

#[rustfmt::skip]
fn cost_rows() -> Vec<CostRow> {
    vec![
        // --- each token type on claude-sonnet-4-5 ($3 / $3.75 / $6 / $0.30 / $15) ---
        // 1000 × $3/MTok = 1000 × 3,000 nano = 3,000,000 ($0.003)
        row("claude-sonnet-4-5", D, u(1000, 0, 0, 0, 0, 0), STD, 3_000_000),
        // 1000 × $3.75/MTok = 1000 × 3,750 = 3,750,000
        row("claude-sonnet-4-5", D, u(0, 1000, 0, 0, 0, 0), STD, 3_750_000),
        // 1000 × $6/MTok = 1000 × 6,000 = 6,000,000
        row("claude-sonnet-4-5", D, u(0, 0, 1000, 0, 0, 0), STD, 6_000_000),
        // 1000 × $0.30/MTok = 1000 × 300 = 300,000
        row("claude-sonnet-4-5", D, u(0, 0, 0, 1000, 0, 0), STD, 300_000),
        // 1000 × $15/MTok = 1000 × 15,000 = 15,000,000
        row("claude-sonnet-4-5", D, u(0, 0, 0, 0, 1000, 0), STD, 15_000_000),
        // 3 web searches × $10/1000 = $0.03 = 30,000,000
        row("claude-sonnet-4-5", D, u(0, 0, 0, 0, 0, 3), STD, 30_000_000),
        // 1000 × $3/MTok + 200 × $15/MTok = 0.003 + 0.003 = $0.006
        row("claude-sonnet-4-5", D, u(1000, 0, 0, 0, 200, 0), STD, 6_000_000),
        // --- claude-opus-4-5 ($5 / $6.25 / $10 / $0.50 / $25) ---
        // 2000×5,000 + 1000×6,250 + 1000×10,000 + 10,000×500 + 500×25,000
        //   = 10,000,000 + 6,250,000 + 10,000,000 + 5,000,000 + 12,500,000 = 43,750,000 ($0.04375)
        row("claude-opus-4-5", D, u(2000, 1000, 1000, 10_000, 500, 0), STD, 43_750_000),
        // --- claude-opus-5-5 ($4 / $5 / $8 / $0.20 / $20) ---
        // 100×4,000 + 200×5,000 + 300×8,000 + 50,000×200 + 1000×20,000
        //   = 400,000 + 1,000,000 + 2,400,000 + 10,000,000 + 20,000,000 = 33,800,000
        row("claude-opus-5-5", D, u(100, 200, 300, 50_000, 1000, 0), STD, 33_800_000),
        // 1 web search $0.01 + 1 output × 20,000 = 10,000,000 + 20,000 = 10,020,000
        row("claude-opus-5-5", D, u(0, 0, 0, 0, 1, 1), STD, 10_020_000),
        // --- claude-haiku-5-5 ($0.10 / $0.125 / $0.20 / $0.01 / $0.50) ---
        // 1M of each: 0.10 + 0.125 + 0.20 + 0.01 + 0.50 = $0.935 (4M input: no long-context tier)
        row("claude-haiku-5-5", D, u(1_000_000, 1_000_000, 1_000_000, 1_000_000, 1_000_000, 0), STD, 935_000_000),
        // 1 cache-read token × $0.01/MTok = 1e-8 USD = 10 nano (integral: no rounding)
        row("claude-haiku-5-5", D, u(0, 0, 0, 1, 0, 0), STD, 10),
        // --- claude-sonnet-5-5 ($2 / $2.50 / $4 / $0.10 / $10) ---
        // 500×2,000 + 10,000×100 + 2000×10,000 + 1 search = 1,000,000 + 1,000,000 + 20,000,000 + 10,000,000
        //   = 32,000,000
        row("claude-sonnet-5-5", D, u(500, 0, 0, 10_000, 2000, 1), STD, 32_000_000),
        // 4000×2,500 + 1000×4,000 = 10,000,000 + 4,000,000 = 14,000,000
        row("claude-sonnet-5-5", D, u(0, 4000, 1000, 0, 0, 0), STD, 14_000_000),
        // --- OpenAI, normalized: prompt includes cached ---
        // gpt-4.1-mini ($0.40 / cached $0.10 / $1.60): prompt 10,000 of which 4,000 cached, 1,000 out
        //   6,000×400 + 4,000×100 + 1,000×1,600 = 2,400,000 + 400,000 + 1,600,000 = 4,400,000
        oa("gpt-4.1-mini", 10_000, 4_000, 1_000, 4_400_000),
        // gpt-5 ($1.25 / $0.125 / $10): 12,000×1,250 + 8,000×125 + 3,000×10,000
        //   = 15,000,000 + 1,000,000 + 30,000,000 = 46,000,000
        oa("gpt-5", 20_000, 8_000, 3_000, 46_000_000),
        // gpt-5.2 ($1.75 / $0.175 / $14): 1,000×1,750 + 100×14,000 = 1,750,000 + 1,400,000 = 3,150,000
        oa("gpt-5.2", 1_000, 0, 100, 3_150_000),
        // gpt-5.2 all cached: 4,000 × 175 = 700,000
        oa("gpt-5.2", 4_000, 4_000, 0, 700_000),
        // gpt-5, cached (150) > prompt (100) is clamped: 100 cached × 125 = 12,500
        oa("gpt-5", 100, 150, 0, 12_500),
        // --- aliases and dated ids resolve to the same price ---
        // = claude-sonnet-4-5: 1000×3,000 + 200×15,000 = 6,000,000
        row("claude-sonnet-4-5-20250929", D, u(1000, 0, 0, 0, 200, 0), STD, 6_000_000),
        // claude-3-5-haiku ($0.80 / $4): 1000×800 + 1000×4,000 = 800,000 + 4,000,000 = 4,800,000
        row("claude-3-5-haiku-latest", D, u(1000, 0, 0, 0, 1000, 0), STD, 4_800_000),
        row("claude-3-5-haiku-20241022", D, u(1000, 0, 0, 0, 1000, 0), STD, 4_800_000),
        row("claude-haiku-3-5", D, u(1000, 0, 0, 0, 1000, 0), STD, 4_800_000),
        // = gpt-4.1-mini row above: 4,400,000
        oa("gpt-4.1-mini-2025-04-14", 10_000, 4_000, 1_000, 4_400_000),
        // = claude-opus-4-5: 1000 × 5,000 = 5,000,000
        row("claude-opus-4-5-20251101", D, u(1000, 0, 0, 0, 0, 0), STD, 5_000_000),
        // --- unknown models ---
        unknown("claude-unknown-9"),
        unknown("claude-sonnet-4-5-2025092"), // 7-digit suffix is not a date
        unknown("gpt-4.1-mini-2025-4-14"),    // malformed OpenAI date suffix
        unknown("gpt-7"),
        unknown(""),
        // --- batch ×0.5 ---
        // (1000×3,000 + 1000×15,000) × 0.5 = 18,000,000 × 0.5 = 9,000,000
        row("claude-sonnet-4-5", D, u(1000, 0, 0, 0, 1000, 0), BATCH, 9_000_000),
        // 1000 × 20,000 × 0.5 = 10,000,000 ($10/MTok batch output for opus-5-5)
        row("claude-opus-5-5", D, u(0, 0, 0, 0, 1000, 0), BATCH, 10_000_000),
        // --- inference_geo us ×1.1 on 4.6+ only ---
        // opus-4-6: (1000×5,000 + 1000×25,000) × 1.1 = 30,000,000 × 1.1 = 33,000,000
        row("claude-opus-4-6", D, u(1000, 0, 0, 0, 1000, 0), GEO, 33_000_000),
        // sonnet-4-5 is older than 4.6: no surcharge, 3,000,000 + 15,000,000 = 18,000,000
        row("claude-sonnet-4-5", D, u(1000, 0, 0, 0, 1000, 0), GEO, 18_000_000),
        // sonnet-4-6 batch + geo: 18,000,000 × 0.5 × 1.1 = 9,900,000
        row("claude-sonnet-4-6", D, u(1000, 0, 0, 0, 1000, 0), BATCH_GEO, 9_900_000),
        // --- fast mode, versioned by effective_from ---
        // opus-4-6 on 2026-03-01: 30,000,000 × 6 = 180,000,000
        row("claude-opus-4-6", "2026-03-01", u(1000, 0, 0, 0, 1000, 0), FAST, 180_000_000),
        // last day of the 6× price: 180,000,000
        row("claude-opus-4-6", "2026-06-28", u(1000, 0, 0, 0, 1000, 0), FAST, 180_000_000),
        // from 2026-06-29 fast bills at standard: 30,000,000 × 1
        row("claude-opus-4-6", "2026-06-29", u(1000, 0, 0, 0, 1000, 0), FAST, 30_000_000),
        row("claude-opus-4-6", "2026-07-01", u(1000, 0, 0, 0, 1000, 0), FAST, 30_000_000),
        // a date before every version falls back to the earliest (6×): 180,000,000
        row("claude-opus-4-6", "2025-06-01", u(1000, 0, 0, 0, 1000, 0), FAST, 180_000_000),
        // not fast on the 6× day: 30,000,000
        row("claude-opus-4-6", "2026-03-01", u(1000, 0, 0, 0, 1000, 0), STD, 30_000_000),
        // opus-5 fast ×2: 30,000,000 × 2 = 60,000,000
        row("claude-opus-5", D, u(1000, 0, 0, 0, 1000, 0), FAST, 60_000_000),
        // opus-5 fast + geo + batch: 30,000,000 × 2 × 1.1 × 0.5 = 33,000,000
        row("claude-opus-5", D, u(1000, 0, 0, 0, 1000, 0), FAST_GEO_BATCH, 33_000_000),
        // sonnet-4-5 has no fast price: 18,000,000
        row("claude-sonnet-4-5", D, u(1000, 0, 0, 0, 1000, 0), FAST, 18_000_000),
        // --- long context (claude-sonnet-4-5: > 200K total input → $6 / $22.50, whole request) ---
        // 201,000 × 6,000 + 1000 × 22,500 = 1,206,000,000 + 22,500,000 = 1,228,500,000 ($1.2285)
        row("claude-sonnet-4-5", D, u(201_000, 0, 0, 0, 1000, 0), STD, 1_228_500_000),
        // exactly 200,000 stays standard: 200,000 × 3,000 + 1000 × 15,000 = 600,000,000 + 15,000,000
        row("claude-sonnet-4-5", D, u(200_000, 0, 0, 0, 1000, 0), STD, 615_000_000),
        // the threshold counts cache tokens: 1,000 + 200,000 read = 201,000 → long;
        //   read at 0.1 × $6 = $0.60: 1,000×6,000 + 200,000×600 = 6,000,000 + 120,000,000 = 126,000,000
        row("claude-sonnet-4-5", D, u(1000, 0, 0, 200_000, 0, 0), STD, 126_000_000),
        // long-context writes at 1.25 × $6 = $7.50 and 2 × $6 = $12 (210,000 total):
        //   150,000×6,000 + 40,000×7,500 + 20,000×12,000 = 900,000,000 + 300,000,000 + 240,000,000
        row("claude-sonnet-4-5", D, u(150_000, 40_000, 20_000, 0, 0, 0), STD, 1_440_000_000),
        // via the dated id, batch: 1,228,500,000 × 0.5 = 614,250,000
        row("claude-sonnet-4-5-20250929", D, u(201_000, 0, 0, 0, 1000, 0), BATCH, 614_250_000),
        // 4.6+ has 1M context at standard price: 300,000 × 5,000 = 1,500,000,000
        row("claude-opus-4-6", D, u(300_000, 0, 0, 0, 0, 0), STD, 1_500_000_000),
        // --- rounding: exact sum, one half-up rounding per call ---
        // haiku-5-5 1 × 5m write: 125 × 1.1 = 137.5 → 138 (half up)
        row("claude-haiku-5-5", D, u(0, 1, 0, 0, 0, 0), GEO, 138),
        // 125 × 0.5 = 62.5 → 63 (half up)
        row("claude-haiku-5-5", D, u(0, 1, 0, 0, 0, 0), BATCH, 63),
        // 3 × 125 × 0.55 = 375 × 0.55 = 206.25 → 206 (rounds down)
        row("claude-haiku-5-5", D, u(0, 3, 0, 0, 0, 0), BATCH_GEO, 206),
        // 1 cache read: 10 × 0.55 = 5.5 → 6
        row("claude-haiku-5-5", D, u(0, 0, 0, 1, 0, 0), BATCH_GEO, 6),
        // once per call, not per term: (125 + 10) × 0.55 = 74.25 → 74 (per term: 69 + 6 = 75)
        row("claude-haiku-5-5", D, u(0, 1, 0, 1, 0, 0), BATCH_GEO, 74),
        // test-tiny at 1 nano/MTok input: 1 token = 0.000001 nano → 0
        row(TINY, D, u(1, 0, 0, 0, 0, 0), STD, 0),
        // 499,999 tokens = 0.499999 nano → 0 (down)
        row(TINY, D, u(499_999, 0, 0, 0, 0, 0), STD, 0),
        // 500,000 tokens = 0.5 nano → 1 (half up)
        row(TINY, D, u(500_000, 0, 0, 0, 0, 0), STD, 1),
        // 1,500,000 tokens = 1.5 nano → 2
        row(TINY, D, u(1_500_000, 0, 0, 0, 0, 0), STD, 2),
        // 300,000 input + 100,000 output: 0.3 + 0.5 = 0.8 nano → 1 (per term: 0 + 1 = 1; sum shows once)
        row(TINY, D, u(300_000, 0, 0, 0, 100_000, 0), STD, 1),
        // 300,000 input + 300,000 read: 0.3 + 0.3 = 0.6 → 1 (per-term rounding would give 0)
        row(TINY, D, u(300_000, 0, 0, 300_000, 0, 0), STD, 1),
    ]
}

#[test]
fn price_table_costs() {
    let t = table();
    let rows = cost_rows();
    assert!(rows.len() >= 20);
    let mut failures = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let got = t.price_at(r.model, date(r.date)).and_then(|e| e.cost(&r.usage, &r.modifiers));
        let want = match r.want {
            Some(n) => Ok(Nanos(n)),
            None => Err(PriceError::UnknownModel(r.model.to_string())),
        };
        if got != want {
            failures.push(format!(
                "row {i} {} @{} {:?} {:?}: got {got:?}, want {want:?}",
                r.model, r.date, r.usage, r.modifiers
            ));
        }
    }
    assert!(failures.is_empty(), "{} cost rows failed:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn aliases_resolve_to_one_entry() {
    let t = table();
    #[rustfmt::skip]
    let pairs = [
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("claude-3-5-haiku-latest", "claude-3-5-haiku"),
        ("claude-3-5-haiku-20241022", "claude-3-5-haiku"),
        ("claude-haiku-3-5", "claude-3-5-haiku"),
        ("gpt-4.1-mini-2025-04-14", "gpt-4.1-mini"),
        ("claude-opus-4-5-20251101", "claude-opus-4-5"),
        ("claude-opus-4-5", "claude-opus-4-5"),
    ];
    for (alias, canonical) in pairs {
        assert_eq!(t.resolve(alias), Some(canonical), "{alias}");
        let a = t.price_at(alias, date(D)).expect(alias);
        let c = t.price_at(canonical, date(D)).expect(canonical);
        assert_eq!(a, c, "{alias} and {canonical} must be the same entry");
    }
}

#[test]
fn unknown_model_error_names_the_model_and_the_fix() {
    let err = table().price_at("claude-unknown-9", date(D)).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("\"claude-unknown-9\""), "{text}");
    assert!(text.contains("[[price]]") && text.contains("unknown_model"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// 1b. Prices: worst case of a request before it is made (rounded UP)
// ---------------------------------------------------------------------------------------------

struct WorstRow {
    model: &'static str,
    date: &'static str,
    bound: RequestBound,
    want: Result<i64, PriceError>,
}

const fn b(
    body_bytes: u64,
    max_tokens: u64,
    web_search_max_uses: u64,
    unbounded_inputs: u64,
    m: Modifiers,
) -> RequestBound {
    RequestBound {
        body_bytes,
        max_tokens,
        web_search_max_uses,
        web_fetch_max_uses: 0,
        unbounded_inputs,
        unbounded_tools: false,
        modifiers: m,
    }
}

const fn w(model: &'static str, date: &'static str, bound: RequestBound, want: i64) -> WorstRow {
    WorstRow { model, date, bound, want: Ok(want) }
}

#[rustfmt::skip]
const WORST_ROWS: &[WorstRow] = &[
    // Claude Code-shaped: opus-5-5, body 50,000 bytes, max_tokens 128,000.
    //   50,000 × $8 (1h write) + 128,000 × $20 = 400,000,000 + 2,560,000,000 = 2,960,000,000 ($2.96)
    w("claude-opus-5-5", D, b(50_000, 128_000, 0, 0, STD), 2_960_000_000),
    // same, batch: 2,960,000,000 × 0.5 = 1,480,000,000
    w("claude-opus-5-5", D, b(50_000, 128_000, 0, 0, BATCH), 1_480_000_000),
    // same, geo us (opus-5-5 is 4.6+): 2,960,000,000 × 1.1 = 3,256,000,000
    w("claude-opus-5-5", D, b(50_000, 128_000, 0, 0, GEO), 3_256_000_000),
    // claude -p --model haiku: 50,000 × $0.20 + 128,000 × $0.50 = 10,000,000 + 64,000,000 = 74,000,000
    w("claude-haiku-5-5", D, b(50_000, 128_000, 0, 0, STD), 74_000_000),
    // sonnet-4-5: 1000 × $6 + 1000 × $15 = 6,000,000 + 15,000,000 = 21,000,000
    w("claude-sonnet-4-5", D, b(1000, 1000, 0, 0, STD), 21_000_000),
    // exactly 200,000 bytes cannot pass the long-context threshold: 200,000 × 6,000 = 1,200,000,000
    w("claude-sonnet-4-5", D, b(200_000, 0, 0, 0, STD), 1_200_000_000),
    // 200,001 bytes may: long 1h write 2 × $6 = $12, output $22.50:
    //   200,001 × 12,000 + 1000 × 22,500 = 2,400,012,000 + 22,500,000 = 2,422,512,000
    w("claude-sonnet-4-5", D, b(200_001, 1000, 0, 0, STD), 2_422_512_000),
    // web search max_uses 2: input 1000 + 2 × 20,000 allowance = 41,000 × 6,000 = 246,000,000
    //   + 2 × $0.01 = 20,000,000 → 266,000,000
    w("claude-sonnet-4-5", D, b(1000, 0, 2, 0, STD), 266_000_000),
    // one document by URL: 100,000 allowance × $0.20 (haiku-5-5 1h write) = 20,000,000
    w("claude-haiku-5-5", D, b(0, 0, 0, 1, STD), 20_000_000),
    // opus-4-6 fast on 2026-03-01: (10,000 × $10 + 4,000 × $25) × 6 = (100,000,000 + 100,000,000) × 6
    w("claude-opus-4-6", "2026-03-01", b(10_000, 4_000, 0, 0, FAST), 1_200_000_000),
    // same on 2026-07-01: ×1 → 200,000,000
    w("claude-opus-4-6", "2026-07-01", b(10_000, 4_000, 0, 0, FAST), 200_000_000),
    // gpt-5: no cache-write price, highest input side is $1.25:
    //   10,000 × 1,250 + 1,000 × 10,000 = 12,500,000 + 10,000,000 = 22,500,000
    w("gpt-5", D, b(10_000, 1_000, 0, 0, STD), 22_500_000),
    // test-tiny (1h write 3 nano/MTok, output 5): 1 byte × 3 / 1e6 = 0.000003 → UP to 1
    w(TINY, D, b(1, 0, 0, 0, STD), 1),
    // 100,000 × 3 / 1e6 = 0.3 → UP to 1 (half-up would say 0)
    w(TINY, D, b(100_000, 0, 0, 0, STD), 1),
    // 1,000,000 × 3 / 1e6 = 3 exactly → 3 (no extra nano when exact)
    w(TINY, D, b(1_000_000, 0, 0, 0, STD), 3),
    // 1,000,001 × 3 / 1e6 = 3.000003 → 4
    w(TINY, D, b(1_000_001, 0, 0, 0, STD), 4),
    // 1,000,000 × 3 + 1 × 5 = 3,000,005 / 1e6 = 3.000005 → 4
    w(TINY, D, b(1_000_000, 1, 0, 0, STD), 4),
    // nothing bounded: 0
    w(TINY, D, b(0, 0, 0, 0, STD), 0),
    // absurd: tool allowance overflows u64 (u64::MAX × 20,000) → Overflow, not a panic
    WorstRow { model: "claude-sonnet-4-5", date: D, bound: b(0, 0, u64::MAX, 0, STD), want: Err(PriceError::Overflow) },
];

#[test]
fn price_table_worst_cases() {
    let t = table();
    let mut failures = Vec::new();
    for (i, r) in WORST_ROWS.iter().enumerate() {
        let got =
            t.price_at(r.model, date(r.date)).and_then(|e| e.worst_case(&r.bound, &Allowances::default())).map(|n| n.0);
        if got != r.want {
            failures.push(format!("row {i} {} @{} {:?}: got {got:?}, want {:?}", r.model, r.date, r.bound, r.want));
        }
    }
    assert!(failures.is_empty(), "{} worst-case rows failed:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn worst_case_bounds_the_claude_code_call() {
    // A call inside the Claude Code bound: 50,000 input, 128,000 output on opus-5-5.
    //   50,000 × 4,000 + 128,000 × 20,000 = 200,000,000 + 2,560,000,000 = 2,760,000,000 ≤ 2,960,000,000
    let t = table();
    let e = t.price_at("claude-opus-5-5", date(D)).unwrap();
    assert_eq!(e.cost(&u(50_000, 0, 0, 0, 128_000, 0), &STD), Ok(Nanos(2_760_000_000)));
    assert_eq!(e.worst_case(&b(50_000, 128_000, 0, 0, STD), &Allowances::default()), Ok(Nanos(2_960_000_000)));
}

#[test]
fn input_worst_case_is_the_input_side_of_the_worst_case() {
    // What a served call whose usage is unknown is charged for its input: the worst case with no
    // output and no tool price, under every modifier, and never more than the worst case.
    let t = table();
    let allow = Allowances::default();
    // sonnet-4-5: 1,000 body bytes + 2 searches × 20,000 + 1 URL input × 100,000 = 141,000
    // tokens at the 1h write price ($6 / MTok) = 846,000,000 nano-USD.
    let e = t.price_at("claude-sonnet-4-5", date(D)).unwrap();
    assert_eq!(e.input_worst_case(&b(1_000, 500, 2, 1, STD), &allow), Ok(Nanos(846_000_000)));
    for model in ["claude-sonnet-4-5", "claude-opus-5-5", "gpt-5", TINY] {
        let e = t.price_at(model, date(D)).unwrap();
        for modifiers in [STD, BATCH, GEO, FAST, FAST_GEO_BATCH] {
            for bound in
                [b(1, 0, 0, 0, modifiers), b(3_000_000, 64_000, 0, 0, modifiers), b(120, 1_000, 3, 2, modifiers)]
            {
                let input = e.input_worst_case(&bound, &allow).unwrap();
                let no_output = RequestBound { max_tokens: 0, ..bound };
                let tools = Nanos(e.web_search_per_request.0 * bound.web_search_max_uses as i64);
                assert_eq!(e.worst_case(&no_output, &allow), Ok(Nanos(input.0 + tools.0)), "{model} {bound:?}");
                assert!(input <= e.worst_case(&bound, &allow).unwrap(), "{model} {bound:?}");
            }
        }
    }
}

#[test]
fn worst_case_with_absurd_tool_price_is_an_overflow_not_a_panic() {
    // With the tool allowance configured to 0 the input count does not overflow, so the web-search
    // term u64::MAX × i64::MAX × 1e6 (≈ 1.7e44, beyond i128's 1.7e38) is what must be checked.
    let mut entry = table().price_at(TINY, date(D)).unwrap().clone();
    entry.web_search_per_request = Nanos::MAX;
    let allow =
        Allowances { input_tokens_per_tool_use: 0, input_tokens_per_unbounded_input: 0, ..Allowances::default() };
    assert_eq!(entry.worst_case(&b(0, 0, u64::MAX, 0, STD), &allow), Err(PriceError::Overflow));
}

#[test]
fn worst_case_holds_web_fetch_uses_and_the_unbounded_tool_allowance() {
    let t = table();
    let e = t.price_at("claude-sonnet-4-6", date(D)).unwrap();
    let allow = Allowances { unbounded_tools: Nanos::from_usd(2), ..Allowances::default() };
    let bound = |web_search_max_uses, web_fetch_max_uses, unbounded_tools| RequestBound {
        body_bytes: 1_000,
        max_tokens: 1_000,
        web_search_max_uses,
        web_fetch_max_uses,
        unbounded_inputs: 0,
        unbounded_tools,
        modifiers: STD,
    };
    // sonnet-4-6 (no long-context price): 1h write $6, output $15.
    // Web fetch, 3 uses: input 1,000 + 3 × 20,000 = 61,000 × 6,000 = 366,000,000
    //   + 1,000 × 15,000 = 15,000,000; no price per fetch → 381,000,000
    assert_eq!(e.worst_case(&bound(0, 3, false), &allow), Ok(Nanos(381_000_000)));
    // Web search 2 + web fetch 3: input 1,000 + 5 × 20,000 = 101,000 × 6,000 = 606,000,000
    //   + 15,000,000 + 2 searches × 10,000,000 = 641,000,000
    assert_eq!(e.worst_case(&bound(2, 3, false), &allow), Ok(Nanos(641_000_000)));
    // Unbounded tools: 1,000 × 6,000 + 15,000,000 = 21,000,000, + the $2 allowance once
    //   = 2,021,000,000; the allowance is flat: batch halves the tokens only
    //   (21,000,000 / 2 = 10,500,000 + 2,000,000,000).
    assert_eq!(e.worst_case(&bound(0, 0, true), &allow), Ok(Nanos(2_021_000_000)));
    assert_eq!(e.worst_case(&RequestBound { modifiers: BATCH, ..bound(0, 0, true) }, &allow), Ok(Nanos(2_010_500_000)));
    // Without unbounded tools the allowance is not held.
    assert_eq!(e.worst_case(&bound(0, 0, false), &allow), Ok(Nanos(21_000_000)));
    // Uses that overflow together are an overflow, not a panic.
    assert_eq!(e.worst_case(&bound(u64::MAX, 1, false), &allow), Err(PriceError::Overflow));
}

// ---------------------------------------------------------------------------------------------
// 2. Cycles
// ---------------------------------------------------------------------------------------------

use chrono_tz::America::New_York;
use chrono_tz::Asia::Kolkata;
use chrono_tz::Australia::Lord_Howe;
use chrono_tz::Europe::Berlin;
use chrono_tz::UTC;

/// `CycleAnchor::new(anchor, tz).start(k) == start`.
struct StartRow {
    anchor: &'static str,
    tz: Tz,
    k: i64,
    start: &'static str,
}

const fn s(anchor: &'static str, tz: Tz, k: i64, start: &'static str) -> StartRow {
    StartRow { anchor, tz, k, start }
}

// Anchors used below, with their local reading:
const JAN31: &str = "2027-01-31T00:00:00Z"; // UTC, the 31st
const JAN29: &str = "2027-01-29T08:15:00Z"; // UTC, the 29th at 08:15
const JAN30_LEAP: &str = "2028-01-30T12:00:00Z"; // UTC, the 30th, in a leap year
const FEB29: &str = "2028-02-29T00:00:00Z"; // UTC, Feb 29 of a leap year
const NY_JAN15: &str = "2026-01-15T05:00:00Z"; // New York 2026-01-15 00:00 EST (UTC-5)
const BER_JAN31: &str = "2026-01-30T23:00:00Z"; // Berlin 2026-01-31 00:00 CET (UTC+1)
const KOL_JAN31: &str = "2026-01-30T18:30:00Z"; // Kolkata 2026-01-31 00:00 IST (UTC+5:30)
const LH_JAN10: &str = "2026-01-09T13:00:00Z"; // Lord Howe 2026-01-10 00:00 LHDT (UTC+11)
const NY_GAP: &str = "2026-02-08T07:30:00Z"; // New York 2026-02-08 02:30 EST
const NY_FOLD: &str = "2026-10-01T05:30:00Z"; // New York 2026-10-01 01:30 EDT (UTC-4)
const NY_FOLD_2ND: &str = "2026-11-01T06:30:00Z"; // New York 2026-11-01 01:30 EST: the 2nd 01:30
const LH_GAP: &str = "2026-09-03T15:45:00Z"; // Lord Howe 2026-09-04 02:15 LHST (UTC+10:30)
const LH_FOLD: &str = "2026-03-04T14:45:00Z"; // Lord Howe 2026-03-05 01:45 LHDT (UTC+11)

// DST facts used (2026): US starts Sun Mar 8 02:00 → 03:00, ends Sun Nov 1 02:00 → 01:00;
// EU starts Sun Mar 29, ends Sun Oct 25; Lord Howe ends Sun Apr 5 02:00 → 01:30 and starts
// Sun Oct 4 02:00 → 02:30 (+10:30 ↔ +11). India has no DST.
#[rustfmt::skip]
const START_ROWS: &[StartRow] = &[
    // --- anchor on the 31st: day clamped to the month, from the original anchor every time ---
    s(JAN31, UTC, 0, "2027-01-31T00:00:00Z"),
    s(JAN31, UTC, 1, "2027-02-28T00:00:00Z"),   // Feb 2027 has 28 days
    s(JAN31, UTC, 2, "2027-03-31T00:00:00Z"),   // back to the 31st, not the 28th
    s(JAN31, UTC, 3, "2027-04-30T00:00:00Z"),
    s(JAN31, UTC, 13, "2028-02-29T00:00:00Z"),  // 2028 is a leap year
    s(JAN31, UTC, -1, "2026-12-31T00:00:00Z"),  // before the anchor
    s(JAN31, UTC, -11, "2026-02-28T00:00:00Z"),
    s(JAN31, UTC, -12, "2026-01-31T00:00:00Z"),
    s(JAN31, UTC, -35, "2024-02-29T00:00:00Z"), // 2027-01 − 35 months = 2024-02 (leap)
    // --- the 29th / the 30th ---
    s(JAN29, UTC, 1, "2027-02-28T08:15:00Z"),
    s(JAN29, UTC, 2, "2027-03-29T08:15:00Z"),
    s(JAN29, UTC, 13, "2028-02-29T08:15:00Z"),
    s(JAN30_LEAP, UTC, 1, "2028-02-29T12:00:00Z"),
    s(JAN30_LEAP, UTC, 2, "2028-03-30T12:00:00Z"),
    s(JAN30_LEAP, UTC, 13, "2029-02-28T12:00:00Z"),
    // --- anchor Feb 29 ---
    s(FEB29, UTC, 1, "2028-03-29T00:00:00Z"),
    s(FEB29, UTC, 12, "2029-02-28T00:00:00Z"),
    s(FEB29, UTC, 13, "2029-03-29T00:00:00Z"),
    s(FEB29, UTC, 48, "2032-02-29T00:00:00Z"),
    s(FEB29, UTC, 864, "2100-02-28T00:00:00Z"), // 72 years on: 2100 is not a leap year
    s(FEB29, UTC, 1200, "2128-02-29T00:00:00Z"),
    s(FEB29, UTC, -1, "2028-01-29T00:00:00Z"),
    s(FEB29, UTC, -12, "2027-02-28T00:00:00Z"),
    s(FEB29, UTC, -48, "2024-02-29T00:00:00Z"),
    // --- America/New_York, local midnight kept across DST ---
    s(NY_JAN15, New_York, 0, "2026-01-15T05:00:00Z"),
    s(NY_JAN15, New_York, 1, "2026-02-15T05:00:00Z"),
    s(NY_JAN15, New_York, 2, "2026-03-15T04:00:00Z"),  // EDT (UTC-4) after Mar 8
    s(NY_JAN15, New_York, 9, "2026-10-15T04:00:00Z"),  // still EDT
    s(NY_JAN15, New_York, 10, "2026-11-15T05:00:00Z"), // EST after Nov 1
    s(NY_JAN15, New_York, -1, "2025-12-15T05:00:00Z"),
    s(NY_JAN15, New_York, -8, "2025-05-15T04:00:00Z"), // EDT in May 2025
    // --- Europe/Berlin, anchored on the local 31st ---
    s(BER_JAN31, Berlin, 1, "2026-02-27T23:00:00Z"),  // Feb 28 00:00 CET
    s(BER_JAN31, Berlin, 2, "2026-03-30T22:00:00Z"),  // Mar 31 00:00 CEST (UTC+2)
    s(BER_JAN31, Berlin, 3, "2026-04-29T22:00:00Z"),  // Apr 30 00:00 CEST
    s(BER_JAN31, Berlin, 9, "2026-10-30T23:00:00Z"),  // Oct 31 00:00 CET (after Oct 25)
    s(BER_JAN31, Berlin, -1, "2025-12-30T23:00:00Z"), // Dec 31 00:00 CET
    // --- Asia/Kolkata (+05:30): the local day is clamped, not the UTC day ---
    s(KOL_JAN31, Kolkata, 1, "2026-02-27T18:30:00Z"),   // Feb 28 00:00 IST
    s(KOL_JAN31, Kolkata, 3, "2026-04-29T18:30:00Z"),   // Apr 30 00:00 IST (UTC-day reading: Apr 30 18:30Z)
    s(KOL_JAN31, Kolkata, -11, "2025-02-27T18:30:00Z"), // Feb 28 2025 00:00 IST
    // --- Australia/Lord_Howe (30-minute DST) ---
    s(LH_JAN10, Lord_Howe, 4, "2026-05-09T13:30:00Z"), // May 10 00:00 +10:30
    s(LH_JAN10, Lord_Howe, 9, "2026-10-09T13:00:00Z"), // Oct 10 00:00 +11
    // --- spring-forward gap: 02:30 does not exist on 2026-03-08 in New York; read with the
    //     pre-gap offset (EST, UTC-5): 02:30 + 5 h = 07:30Z, which is 03:30 EDT ---
    s(NY_GAP, New_York, 0, "2026-02-08T07:30:00Z"),
    s(NY_GAP, New_York, 1, "2026-03-08T07:30:00Z"),
    s(NY_GAP, New_York, 2, "2026-04-08T06:30:00Z"), // 02:30 EDT
    // Lord Howe gap 02:00 → 02:30 on 2026-10-04: 02:15 at +10:30 = Oct 3 15:45Z (02:45 LHDT)
    s(LH_GAP, Lord_Howe, 1, "2026-10-03T15:45:00Z"),
    // --- fall-back: an ambiguous local time takes the earlier instant ---
    s(NY_FOLD, New_York, 1, "2026-11-01T05:30:00Z"), // 01:30 EDT, not 01:30 EST (06:30Z)
    s(NY_FOLD, New_York, 2, "2026-12-01T06:30:00Z"), // 01:30 EST
    // anchor given as the 2nd 01:30: only its local reading is kept, so cycle 0 starts at the 1st
    s(NY_FOLD_2ND, New_York, 0, "2026-11-01T05:30:00Z"),
    s(NY_FOLD_2ND, New_York, 1, "2026-12-01T06:30:00Z"),
    // Lord Howe 2026-04-05 01:30–02:00 happens twice: 01:45 +11 = Apr 4 14:45Z (not 15:15Z)
    s(LH_FOLD, Lord_Howe, 1, "2026-04-04T14:45:00Z"),
];

#[test]
fn cycle_starts() {
    let mut failures = Vec::new();
    for (i, r) in START_ROWS.iter().enumerate() {
        let got = CycleAnchor::new(utc(r.anchor), r.tz).start(r.k);
        if got != utc(r.start) {
            failures.push(format!("row {i} anchor {} {} k={}: got {got}, want {}", r.anchor, r.tz, r.k, r.start));
        }
    }
    assert!(failures.is_empty(), "{} cycle start rows failed:\n{}", failures.len(), failures.join("\n"));
}

/// `CycleAnchor::new(anchor, tz).cycle_at(t) == Cycle { index, start, end }`.
struct AtRow {
    anchor: &'static str,
    tz: Tz,
    t: &'static str,
    index: i64,
    start: &'static str,
    end: &'static str,
}

const fn at(
    anchor: &'static str,
    tz: Tz,
    t: &'static str,
    index: i64,
    start: &'static str,
    end: &'static str,
) -> AtRow {
    AtRow { anchor, tz, t, index, start, end }
}

#[rustfmt::skip]
const AT_ROWS: &[AtRow] = &[
    // --- UTC, anchor on the 31st; start inclusive, end exclusive ---
    at(JAN31, UTC, "2027-01-31T00:00:00Z", 0, "2027-01-31T00:00:00Z", "2027-02-28T00:00:00Z"),
    at(JAN31, UTC, "2027-02-27T23:59:59Z", 0, "2027-01-31T00:00:00Z", "2027-02-28T00:00:00Z"),
    at(JAN31, UTC, "2027-02-28T00:00:00Z", 1, "2027-02-28T00:00:00Z", "2027-03-31T00:00:00Z"),
    at(JAN31, UTC, "2027-03-30T23:59:59Z", 1, "2027-02-28T00:00:00Z", "2027-03-31T00:00:00Z"),
    at(JAN31, UTC, "2027-03-31T00:00:00Z", 2, "2027-03-31T00:00:00Z", "2027-04-30T00:00:00Z"),
    at(JAN31, UTC, "2027-01-30T23:59:59Z", -1, "2026-12-31T00:00:00Z", "2027-01-31T00:00:00Z"),
    at(JAN31, UTC, "2024-03-15T00:00:00Z", -35, "2024-02-29T00:00:00Z", "2024-03-31T00:00:00Z"),
    // --- anchor Feb 29: cycle 12 runs Feb 28 → Mar 29 of 2029 ---
    at(FEB29, UTC, "2029-03-01T00:00:00Z", 12, "2029-02-28T00:00:00Z", "2029-03-29T00:00:00Z"),
    at(FEB29, UTC, "2029-03-29T00:00:00Z", 13, "2029-03-29T00:00:00Z", "2029-04-29T00:00:00Z"),
    // --- New York across DST ---
    // 03:59:59Z on Mar 15 is Mar 14 23:59:59 EDT: still cycle 1, which is 28 days − 1 h long
    at(NY_JAN15, New_York, "2026-03-15T03:59:59Z", 1, "2026-02-15T05:00:00Z", "2026-03-15T04:00:00Z"),
    at(NY_JAN15, New_York, "2026-03-15T04:00:00Z", 2, "2026-03-15T04:00:00Z", "2026-04-15T04:00:00Z"),
    // 04:30Z on Nov 15 is Nov 14 23:30 EST: cycle 9 (UTC date already the 15th)
    at(NY_JAN15, New_York, "2026-11-15T04:30:00Z", 9, "2026-10-15T04:00:00Z", "2026-11-15T05:00:00Z"),
    at(NY_JAN15, New_York, "2026-01-15T04:59:59Z", -1, "2025-12-15T05:00:00Z", "2026-01-15T05:00:00Z"),
    // --- Berlin ---
    at(BER_JAN31, Berlin, "2026-01-30T23:00:00Z", 0, "2026-01-30T23:00:00Z", "2026-02-27T23:00:00Z"),
    at(BER_JAN31, Berlin, "2026-01-30T22:59:59Z", -1, "2025-12-30T23:00:00Z", "2026-01-30T23:00:00Z"),
    at(BER_JAN31, Berlin, "2026-03-30T21:59:59Z", 1, "2026-02-27T23:00:00Z", "2026-03-30T22:00:00Z"),
    // --- Kolkata ---
    at(KOL_JAN31, Kolkata, "2026-04-29T18:29:59Z", 2, "2026-03-30T18:30:00Z", "2026-04-29T18:30:00Z"),
    // May 31 00:00 IST = May 30 18:30Z
    at(KOL_JAN31, Kolkata, "2026-04-30T00:00:00Z", 3, "2026-04-29T18:30:00Z", "2026-05-30T18:30:00Z"),
    // --- Lord Howe: Apr 10 00:00 +10:30 = Apr 9 13:30Z ---
    at(LH_JAN10, Lord_Howe, "2026-05-09T13:29:59Z", 3, "2026-04-09T13:30:00Z", "2026-05-09T13:30:00Z"),
    // --- gap and fold ---
    at(NY_GAP, New_York, "2026-03-08T07:29:59Z", 0, "2026-02-08T07:30:00Z", "2026-03-08T07:30:00Z"),
    at(NY_GAP, New_York, "2026-03-08T07:30:00Z", 1, "2026-03-08T07:30:00Z", "2026-04-08T06:30:00Z"),
    at(NY_FOLD, New_York, "2026-11-01T05:29:59Z", 0, "2026-10-01T05:30:00Z", "2026-11-01T05:30:00Z"),
    // 06:00Z is the second 01:00 (EST): already in cycle 1
    at(NY_FOLD, New_York, "2026-11-01T06:00:00Z", 1, "2026-11-01T05:30:00Z", "2026-12-01T06:30:00Z"),
    // the anchor instant itself (2nd 01:30) lies in cycle 0, which started an hour earlier
    at(NY_FOLD_2ND, New_York, NY_FOLD_2ND, 0, "2026-11-01T05:30:00Z", "2026-12-01T06:30:00Z"),
];

#[test]
fn cycles_containing_instants() {
    let mut failures = Vec::new();
    for (i, r) in AT_ROWS.iter().enumerate() {
        let got = CycleAnchor::new(utc(r.anchor), r.tz).cycle_at(utc(r.t));
        let want = Cycle { index: r.index, start: utc(r.start), end: utc(r.end) };
        if got != want {
            failures.push(format!("row {i} anchor {} {} t={}: got {got:?}, want {want:?}", r.anchor, r.tz, r.t));
        }
    }
    assert!(failures.is_empty(), "{} cycle_at rows failed:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn cycles_tile_time() {
    // Consistency, not figures: starts strictly increase, and each start and the instant before the
    // next start belong to their own cycle.
    let anchors = [JAN31, FEB29, NY_JAN15, BER_JAN31, KOL_JAN31, LH_JAN10, NY_GAP, NY_FOLD, LH_GAP, LH_FOLD];
    let zones = [UTC, UTC, New_York, Berlin, Kolkata, Lord_Howe, New_York, New_York, Lord_Howe, Lord_Howe];
    for (a, tz) in anchors.into_iter().zip(zones) {
        let anchor = CycleAnchor::new(utc(a), tz);
        for k in -40..40 {
            let (s0, s1) = (anchor.start(k), anchor.start(k + 1));
            assert!(s0 < s1, "{a} {tz} k={k}");
            assert_eq!(anchor.cycle_at(s0), Cycle { index: k, start: s0, end: s1 }, "{a} {tz} k={k}");
            let last = s1 - chrono::Duration::nanoseconds(1);
            assert_eq!(anchor.cycle_at(last).index, k, "{a} {tz} k={k}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Money
// ---------------------------------------------------------------------------------------------

/// `Nanos::parse_usd(text)`, and for accepted amounts the canonical `Display` form.
#[rustfmt::skip]
const MONEY_OK: &[(&str, i64, &str)] = &[
    ("0", 0, "0"),
    ("12.5", 12_500_000_000, "12.5"),          // 12 × 1e9 + 0.5 × 1e9
    ("12.50", 12_500_000_000, "12.5"),         // trailing zero dropped on display
    ("0.000123", 123_000, "0.000123"),         // 123e-6 USD = 123,000 nano
    ("0.000000001", 1, "0.000000001"),         // one nano
    ("-0.000000001", -1, "-0.000000001"),
    ("1.123456789", 1_123_456_789, "1.123456789"),
    ("+3", 3_000_000_000, "3"),
    ("  7.25 ", 7_250_000_000, "7.25"),        // surrounding whitespace trimmed
    (".5", 500_000_000, "0.5"),
    ("-.5", -500_000_000, "-0.5"),
    ("5.", 5_000_000_000, "5"),
    ("-0", 0, "0"),
    ("0.0000000010", 1, "0.000000001"),        // a 10th decimal that is 0 is not extra precision
    ("00000000000000000000012", 12_000_000_000, "12"), // leading zeros beyond i64's digits
    ("0.1", 100_000_000, "0.1"),
    ("2.96", 2_960_000_000, "2.96"),           // the Claude Code worst case above
    ("1.2285", 1_228_500_000, "1.2285"),       // the long-context row above
    ("9223372036.854775807", i64::MAX, "9223372036.854775807"),
    ("-9223372036.854775807", -i64::MAX, "-9223372036.854775807"),
];

#[derive(Debug, PartialEq)]
enum Refused {
    Empty,
    Malformed,
    TooPrecise,
    TooLarge,
}

#[rustfmt::skip]
const MONEY_ERR: &[(&str, Refused)] = &[
    ("", Refused::Empty),
    ("   ", Refused::Empty),
    ("-", Refused::Malformed),
    (".", Refused::Malformed),
    ("-.", Refused::Malformed),
    ("1e3", Refused::Malformed),
    ("$1", Refused::Malformed),
    ("1,000", Refused::Malformed),
    ("1_000", Refused::Malformed),
    ("1 000", Refused::Malformed),
    ("0x10", Refused::Malformed),
    ("+-1", Refused::Malformed),
    ("1.2.3", Refused::Malformed),
    ("١", Refused::Malformed),                 // Arabic-Indic digit one
    ("0.0000000015", Refused::TooPrecise),     // 1.5 nano
    ("0.0000000001", Refused::TooPrecise),
    ("9223372036.854775808", Refused::TooLarge), // i64::MAX + 1 nano
    ("99999999999", Refused::TooLarge),
    // i64::MIN itself is printable (see below) but not parseable: the magnitude is parsed first
    ("-9223372036.854775808", Refused::TooLarge),
];

#[test]
fn money_parse_and_display_round_trip() {
    for &(text, nanos, shown) in MONEY_OK {
        assert_eq!(Nanos::parse_usd(text), Ok(Nanos(nanos)), "parse {text:?}");
        assert_eq!(Nanos(nanos).to_string(), shown, "display of {text:?}");
        assert_eq!(Nanos::parse_usd(shown), Ok(Nanos(nanos)), "re-parse {shown:?}");
    }
    for (text, refused) in MONEY_ERR {
        let got = match Nanos::parse_usd(text) {
            Ok(n) => panic!("{text:?} was accepted as {n:?}"),
            Err(MoneyError::Empty) => Refused::Empty,
            Err(MoneyError::Malformed(_)) => Refused::Malformed,
            Err(MoneyError::TooPrecise(_)) => Refused::TooPrecise,
            Err(MoneyError::TooLarge(_)) => Refused::TooLarge,
        };
        assert_eq!(&got, refused, "{text:?}");
    }
}

#[test]
fn money_display_table() {
    #[rustfmt::skip]
    let rows: &[(i64, &str)] = &[
        (0, "0"),
        (1, "0.000000001"),
        (10, "0.00000001"),
        (138, "0.000000138"),
        (1_000_000_000, "1"),
        (-1_500_000_000, "-1.5"),
        (6_000_000, "0.006"),
        (i64::MIN, "-9223372036.854775808"),
    ];
    for &(nanos, shown) in rows {
        assert_eq!(Nanos(nanos).to_string(), shown, "{nanos}");
    }
}
