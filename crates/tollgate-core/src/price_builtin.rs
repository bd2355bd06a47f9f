//! The built-in price table. Sources: Anthropic's pricing page (mirror dated 2026-08-20) and the
//! price file of the `litellm` PyPI package 1.108.7 for models newer than that page; OpenAI's
//! published prices for the models of the plan guidance. Figures are USD per million tokens.
//! Where a model's release date is not published in those sources, `effective_from` is
//! 2026-01-01; lookups for earlier dates fall back to the earliest version anyway.

use chrono::NaiveDate;

use crate::money::Nanos;
use crate::price::{LongContext, PriceEntry, PriceTable, Provider, Rates};

/// Micro-USD per MTok → nano-USD per MTok.
const fn rates(input: i64, w5m: i64, w1h: i64, read: i64, output: i64) -> Rates {
    Rates {
        input: input * 1000,
        cache_write_5m: w5m * 1000,
        cache_write_1h: w1h * 1000,
        cache_read: read * 1000,
        output: output * 1000,
    }
}

const OPUS_4: Rates = rates(15_000_000, 18_750_000, 30_000_000, 1_500_000, 75_000_000);
const OPUS_45: Rates = rates(5_000_000, 6_250_000, 10_000_000, 500_000, 25_000_000);
const OPUS_55: Rates = rates(4_000_000, 5_000_000, 8_000_000, 200_000, 20_000_000);
const SONNET_4: Rates = rates(3_000_000, 3_750_000, 6_000_000, 300_000, 15_000_000);
const SONNET_4_LONG: Rates = rates(6_000_000, 7_500_000, 12_000_000, 600_000, 22_500_000);
const SONNET_5: Rates = rates(2_000_000, 2_500_000, 4_000_000, 200_000, 10_000_000);
const SONNET_55: Rates = rates(2_000_000, 2_500_000, 4_000_000, 100_000, 10_000_000);
const HAIKU_3: Rates = rates(250_000, 300_000, 500_000, 30_000, 1_250_000);
const HAIKU_35: Rates = rates(800_000, 1_000_000, 1_600_000, 80_000, 4_000_000);
const HAIKU_45: Rates = rates(1_000_000, 1_250_000, 2_000_000, 100_000, 5_000_000);
const HAIKU_55: Rates = rates(100_000, 125_000, 200_000, 10_000, 500_000);
const FABLE_5: Rates = rates(10_000_000, 12_500_000, 20_000_000, 1_000_000, 50_000_000);
const FABLE_51: Rates = rates(10_000_000, 12_500_000, 20_000_000, 250_000, 50_000_000);

/// OpenAI has no cache-write price: cache writes bill as input.
const fn openai(input: i64, cached: i64, output: i64) -> Rates {
    rates(input, input, input, cached, output)
}

/// $10 per 1,000 web searches.
const WEB_SEARCH: Nanos = Nanos(10_000_000);
const LONG_CONTEXT_THRESHOLD_TOKENS: u64 = 200_000;

#[allow(clippy::expect_used, reason = "only called with the built-in tables' constant dates, all real dates")]
fn date(y: i32, m: u32, d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(y, m, d).expect("built-in dates are valid")
}

struct Spec {
    model: &'static str,
    from: (i32, u32, u32),
    rates: Rates,
    long: Option<Rates>,
    fast_ppm: Option<u64>,
    geo_us: bool,
}

const fn claude(model: &'static str, from: (i32, u32, u32), rates: Rates) -> Spec {
    Spec { model, from, rates, long: None, fast_ppm: None, geo_us: false }
}

const fn claude46(model: &'static str, from: (i32, u32, u32), rates: Rates, fast_ppm: Option<u64>) -> Spec {
    Spec { model, from, rates, long: None, fast_ppm, geo_us: true }
}

const ANTHROPIC: &[Spec] = &[
    claude("claude-3-haiku", (2024, 3, 7), HAIKU_3),
    claude("claude-3-5-haiku", (2024, 10, 22), HAIKU_35),
    claude("claude-opus-4", (2025, 5, 22), OPUS_4),
    claude("claude-opus-4-1", (2025, 8, 5), OPUS_4),
    Spec { long: Some(SONNET_4_LONG), ..claude("claude-sonnet-4", (2025, 5, 22), SONNET_4) },
    Spec { long: Some(SONNET_4_LONG), ..claude("claude-sonnet-4-5", (2025, 9, 29), SONNET_4) },
    claude("claude-haiku-4-5", (2025, 10, 1), HAIKU_45),
    claude("claude-opus-4-5", (2025, 11, 24), OPUS_45),
    // Opus 4.6 fast mode billed 6× from its beta until 2026-06-29, then at the standard rate.
    claude46("claude-opus-4-6", (2026, 2, 1), OPUS_45, Some(6_000_000)),
    claude46("claude-opus-4-6", (2026, 6, 29), OPUS_45, None),
    claude46("claude-sonnet-4-6", (2026, 2, 17), SONNET_4, None),
    claude46("claude-opus-4-7", (2026, 1, 1), OPUS_45, Some(6_000_000)),
    claude46("claude-opus-4-8", (2026, 1, 1), OPUS_45, Some(2_000_000)),
    claude46("claude-opus-5", (2026, 1, 1), OPUS_45, Some(2_000_000)),
    claude46("claude-opus-5-5", (2026, 1, 1), OPUS_55, None),
    claude46("claude-sonnet-5", (2026, 1, 1), SONNET_5, None),
    claude46("claude-sonnet-5-5", (2026, 1, 1), SONNET_55, None),
    claude46("claude-haiku-5-5", (2026, 1, 1), HAIKU_55, None),
    claude46("claude-fable-5", (2026, 1, 1), FABLE_5, None),
    claude46("claude-mythos-5", (2026, 1, 1), FABLE_5, None),
    claude46("claude-fable-5-1", (2026, 1, 1), FABLE_51, None),
    claude46("claude-mythos-5-1", (2026, 1, 1), FABLE_51, None),
];

const OPENAI: &[(&str, (i32, u32, u32), Rates)] = &[
    ("gpt-4.1-mini", (2025, 4, 14), openai(400_000, 100_000, 1_600_000)),
    ("gpt-5", (2025, 8, 7), openai(1_250_000, 125_000, 10_000_000)),
    ("gpt-5-mini", (2025, 8, 7), openai(250_000, 25_000, 2_000_000)),
    ("gpt-5-nano", (2025, 8, 7), openai(50_000, 5_000, 400_000)),
    ("gpt-5.1", (2025, 11, 13), openai(1_250_000, 125_000, 10_000_000)),
    ("gpt-5.2", (2025, 12, 11), openai(1_750_000, 175_000, 14_000_000)),
];

const ALIASES: &[(&str, &str)] = &[
    ("claude-3-haiku-20240307", "claude-3-haiku"),
    ("claude-3-5-haiku-20241022", "claude-3-5-haiku"),
    ("claude-haiku-3-5", "claude-3-5-haiku"),
    ("claude-opus-4-0", "claude-opus-4"),
    ("claude-opus-4-20250514", "claude-opus-4"),
    ("claude-sonnet-4-0", "claude-sonnet-4"),
    ("claude-sonnet-4-20250514", "claude-sonnet-4"),
    ("claude-opus-4-1-20250805", "claude-opus-4-1"),
    ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
    ("claude-haiku-4-5-20251001", "claude-haiku-4-5"),
    ("claude-opus-4-5-20251101", "claude-opus-4-5"),
];

pub(crate) fn table() -> PriceTable {
    let mut t = PriceTable::empty();
    for s in ANTHROPIC {
        t.insert(PriceEntry {
            model: s.model.to_string(),
            provider: Provider::Anthropic,
            effective_from: date(s.from.0, s.from.1, s.from.2),
            rates: s.rates,
            long_context: s.long.map(|rates| LongContext { threshold_tokens: LONG_CONTEXT_THRESHOLD_TOKENS, rates }),
            fast_multiplier_ppm: s.fast_ppm,
            geo_us_surcharge: s.geo_us,
            web_search_per_request: WEB_SEARCH,
        });
    }
    for (model, from, rates) in OPENAI {
        t.insert(PriceEntry {
            model: model.to_string(),
            provider: Provider::OpenAi,
            effective_from: date(from.0, from.1, from.2),
            rates: *rates,
            long_context: None,
            fast_multiplier_ppm: None,
            geo_us_surcharge: false,
            web_search_per_request: Nanos::ZERO,
        });
    }
    for (alias, model) in ALIASES {
        t.alias(alias, model);
    }
    t
}
