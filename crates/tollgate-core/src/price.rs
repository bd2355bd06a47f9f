//! The price table and the cost of a call: exact integer arithmetic, one rounding per call.
//!
//! Rates are nano-USD per million tokens (so $3 / MTok is `3_000_000_000`). A call's cost is the
//! sum of tokens × rate over every token type, times the modifiers, divided once and rounded
//! half-up to one nano-USD.

use std::collections::BTreeMap;
use std::fmt;

use chrono::NaiveDate;

use crate::money::Nanos;
use crate::usage::Usage;

/// Which API family a model belongs to; model advice compares models of one provider.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Provider {
    /// Anthropic's Claude models.
    Anthropic,
    /// OpenAI's models.
    OpenAi,
}

impl Provider {
    /// The provider's name: `anthropic` or `openai`.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Anthropic => "anthropic",
            Provider::OpenAi => "openai",
        }
    }

    /// The provider named `s` as [`Provider::as_str`] writes it; None for any other text.
    pub fn parse(s: &str) -> Option<Provider> {
        match s {
            "anthropic" => Some(Provider::Anthropic),
            "openai" => Some(Provider::OpenAi),
            _ => None,
        }
    }
}

/// Nano-USD per million tokens, by token type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rates {
    /// Per million uncached input tokens.
    pub input: i64,
    /// Per million input tokens written to the cache for 5 minutes.
    pub cache_write_5m: i64,
    /// Per million input tokens written to the cache for 1 hour.
    pub cache_write_1h: i64,
    /// Per million input tokens read from the cache.
    pub cache_read: i64,
    /// Per million output tokens, thinking included.
    pub output: i64,
}

impl Rates {
    /// The highest price any input-side token can have: the bound for unknown input mixes.
    pub fn input_side_max(&self) -> i64 {
        self.input.max(self.cache_write_5m).max(self.cache_write_1h).max(self.cache_read)
    }
}

/// Rates that apply to the whole request when its total input passes `threshold_tokens`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LongContext {
    /// Total input tokens (cache writes and reads included) above which these rates apply.
    pub threshold_tokens: u64,
    /// The rates for such a request, every token type.
    pub rates: Rates,
}

/// The price of one model from one date on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriceEntry {
    /// The canonical model id.
    pub model: String,
    /// The model's API family.
    pub provider: Provider,
    /// The first day this price applies.
    pub effective_from: NaiveDate,
    /// The rates of a request that is not long-context.
    pub rates: Rates,
    /// Higher rates for requests past a total-input threshold. None: the model has none.
    pub long_context: Option<LongContext>,
    /// Multiplier for `speed: fast`, in millionths (6× = 6_000_000). None: fast bills as standard.
    pub fast_multiplier_ppm: Option<u64>,
    /// Whether `inference_geo: us` costs ×1.1 on this model.
    pub geo_us_surcharge: bool,
    /// Price of one web search request.
    pub web_search_per_request: Nanos,
}

/// Call-level price modifiers, from the request or the event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Modifiers {
    /// `service_tier: batch`: ×0.5.
    pub batch: bool,
    /// `inference_geo: us`: ×1.1 where the entry says so.
    pub geo_us: bool,
    /// `speed: fast`: the entry's fast multiplier.
    pub fast: bool,
}

/// What the request body bounds, for the worst-case cost of a call before it is made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestBound {
    /// The body's size: a safe upper bound on its text and base64 input tokens.
    pub body_bytes: u64,
    /// The request's `max_tokens`: the most output tokens the call can bill.
    pub max_tokens: u64,
    /// Σ `max_uses` of the web search tools: each use costs its price per request and brings
    /// results in as input (the input allowance per use).
    pub web_search_max_uses: u64,
    /// Σ `max_uses` of the web fetch tools: no price per use, but each brings a page in as input
    /// (the input allowance per use).
    pub web_fetch_max_uses: u64,
    /// Documents or images given by URL or file id, whose size the body does not bound.
    pub unbounded_inputs: u64,
    /// The request uses tools whose cost it does not bound (the MCP connector, code execution):
    /// the call is held with the allowance for them, once.
    pub unbounded_tools: bool,
    /// The call's price modifiers.
    pub modifiers: Modifiers,
}

/// The `max_uses` the gateway gives a web search or web fetch tool that has none (configurable).
pub const SERVER_TOOL_MAX_USES_DEFAULT: u64 = 5;

/// Allowances for what the body does not bound (configurable; see docs/pricing.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allowances {
    /// Input tokens allowed for each web search or web fetch use.
    pub input_tokens_per_tool_use: u64,
    /// Input tokens allowed for each document or image given by URL or file id.
    pub input_tokens_per_unbounded_input: u64,
    /// Held once for a call with tools whose cost the request does not bound; a flat amount,
    /// not scaled by the modifiers. Whether such a call is admitted at all is the gateway's
    /// decision (docs/gateway.md).
    pub unbounded_tools: Nanos,
}

impl Default for Allowances {
    fn default() -> Self {
        Allowances {
            input_tokens_per_tool_use: 20_000,
            input_tokens_per_unbounded_input: 100_000,
            unbounded_tools: Nanos::ZERO,
        }
    }
}

/// Why a call could not be priced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PriceError {
    /// The table knows no model, alias or dated id of this name.
    UnknownModel(String),
    /// The figures do not fit the ledger's integers: absurd usage or prices.
    Overflow,
}

impl fmt::Display for PriceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PriceError::UnknownModel(m) => write!(
                f,
                "unknown model {m:?}: tollgate has no price for it; add a [[price]] entry for it in \
                 tollgate.toml, or map unknown models with [pricing] unknown_model = \"as:<model>\""
            ),
            PriceError::Overflow => write!(f, "cost overflows the ledger's range: usage or price is absurd"),
        }
    }
}

impl std::error::Error for PriceError {}

const MTOK: i128 = 1_000_000;
const PPM: i128 = 1_000_000;

impl PriceEntry {
    fn rates_for_input(&self, total_input_tokens: u64) -> &Rates {
        match &self.long_context {
            Some(lc) if total_input_tokens > lc.threshold_tokens => &lc.rates,
            _ => &self.rates,
        }
    }

    /// The exact cost of a call's usage, rounded half-up to one nano-USD once.
    pub fn cost(&self, usage: &Usage, modifiers: &Modifiers) -> Result<Nanos, PriceError> {
        let r = self.rates_for_input(usage.total_input_tokens());
        let terms = [
            (usage.input_tokens, r.input),
            (usage.cache_creation_5m_input_tokens, r.cache_write_5m),
            (usage.cache_creation_1h_input_tokens, r.cache_write_1h),
            (usage.cache_read_input_tokens, r.cache_read),
            (usage.output_tokens, r.output),
        ];
        let mut sum: i128 = 0;
        for (tokens, rate) in terms {
            sum = i128::from(tokens)
                .checked_mul(i128::from(rate))
                .and_then(|t| sum.checked_add(t))
                .ok_or(PriceError::Overflow)?;
        }
        // Server tools have a flat price per request: token modifiers (batch, geo, fast) do not
        // scale them, and they are whole nano-USD, so the single rounding stays the tokens'.
        let tools = self.tools_cost(usage.web_search_requests)?;
        self.apply_modifiers(sum, MTOK, modifiers, Rounding::HalfUp)?.checked_add(tools).ok_or(PriceError::Overflow)
    }

    fn tools_cost(&self, web_search_requests: u64) -> Result<Nanos, PriceError> {
        i64::try_from(web_search_requests)
            .ok()
            .and_then(|n| n.checked_mul(self.web_search_per_request.0))
            .map(Nanos)
            .ok_or(PriceError::Overflow)
    }

    /// Scales `numerator / denominator` nano-USD by the modifiers and rounds once.
    fn apply_modifiers(
        &self,
        numerator: i128,
        denominator: i128,
        m: &Modifiers,
        rounding: Rounding,
    ) -> Result<Nanos, PriceError> {
        let mut num = numerator;
        let mut den = denominator;
        let mut scale = |n: i128, d: i128| -> Result<(), PriceError> {
            num = num.checked_mul(n).ok_or(PriceError::Overflow)?;
            den = den.checked_mul(d).ok_or(PriceError::Overflow)?;
            Ok(())
        };
        if m.batch {
            scale(1, 2)?;
        }
        if m.geo_us && self.geo_us_surcharge {
            scale(11, 10)?;
        }
        if m.fast
            && let Some(ppm) = self.fast_multiplier_ppm
        {
            scale(i128::from(ppm), PPM)?;
        }
        let rounded = match rounding {
            Rounding::HalfUp => num.checked_add(den / 2),
            Rounding::Up => num.checked_add(den - 1),
        }
        .ok_or(PriceError::Overflow)?
            / den;
        i64::try_from(rounded).map(Nanos).map_err(|_| PriceError::Overflow)
    }

    /// The most a request can cost: its input bounded by the body size and allowances at the
    /// highest input-side price, plus `max_tokens` at the output price, plus server tools, plus
    /// the allowance for tools the request does not bound.
    pub fn worst_case(&self, bound: &RequestBound, allow: &Allowances) -> Result<Nanos, PriceError> {
        let input_tokens = input_tokens_max(bound, allow)?;
        let r = self.rates_for_input(input_tokens);
        let input_rate = r.input_side_max().max(self.rates.input_side_max());
        let output_rate = r.output.max(self.rates.output);
        let sum = i128::from(input_tokens)
            .checked_mul(i128::from(input_rate))
            .and_then(|i| i.checked_add(i128::from(bound.max_tokens).checked_mul(i128::from(output_rate))?))
            .ok_or(PriceError::Overflow)?;
        // Round up, not half-up: a bound must never be below the true worst case.
        let tokens = self.apply_modifiers(sum, MTOK, &bound.modifiers, Rounding::Up)?;
        let unbounded = if bound.unbounded_tools { allow.unbounded_tools } else { Nanos::ZERO };
        tokens
            .checked_add(self.tools_cost(bound.web_search_max_uses)?)
            .and_then(|t| t.checked_add(unbounded))
            .ok_or(PriceError::Overflow)
    }

    /// The input side of [`PriceEntry::worst_case`]: the request's input-token bound at the
    /// highest input-side price the worst case uses, with its modifiers, rounded up. It is what a
    /// call the upstream served is charged for its input when its usage is not known (SPEC
    /// section 3, "never bill zero for served work"); never more than the worst case.
    pub fn input_worst_case(&self, bound: &RequestBound, allow: &Allowances) -> Result<Nanos, PriceError> {
        let input_tokens = input_tokens_max(bound, allow)?;
        let input_rate = self.rates_for_input(input_tokens).input_side_max().max(self.rates.input_side_max());
        let sum = i128::from(input_tokens).checked_mul(i128::from(input_rate)).ok_or(PriceError::Overflow)?;
        self.apply_modifiers(sum, MTOK, &bound.modifiers, Rounding::Up)
    }
}

/// The most input tokens a request can bring: its body size plus the allowances for the server
/// tool uses and the inputs by URL or file id that the body does not bound.
fn input_tokens_max(bound: &RequestBound, allow: &Allowances) -> Result<u64, PriceError> {
    let tool_uses = bound.web_search_max_uses.checked_add(bound.web_fetch_max_uses).ok_or(PriceError::Overflow)?;
    bound
        .body_bytes
        .checked_add(tool_uses.checked_mul(allow.input_tokens_per_tool_use).ok_or(PriceError::Overflow)?)
        .and_then(|t| t.checked_add(bound.unbounded_inputs.checked_mul(allow.input_tokens_per_unbounded_input)?))
        .ok_or(PriceError::Overflow)
}

#[derive(Clone, Copy)]
enum Rounding {
    HalfUp,
    Up,
}

/// All known prices: canonical model ids, each with its price history, and aliases.
#[derive(Clone, Debug, Default)]
pub struct PriceTable {
    entries: BTreeMap<String, Vec<PriceEntry>>,
    aliases: BTreeMap<String, String>,
}

impl PriceTable {
    /// A table with no prices and no aliases.
    pub fn empty() -> PriceTable {
        PriceTable::default()
    }

    /// Adds a price version. An entry with the same model and `effective_from` is replaced.
    pub fn insert(&mut self, entry: PriceEntry) {
        let versions = self.entries.entry(entry.model.clone()).or_default();
        versions.retain(|e| e.effective_from != entry.effective_from);
        versions.push(entry);
        versions.sort_by_key(|e| e.effective_from);
    }

    /// Replaces every version of the entry's model with this one entry.
    pub fn replace(&mut self, entry: PriceEntry) {
        self.entries.insert(entry.model.clone(), vec![entry]);
    }

    /// Makes `alias` name `model`, replacing any earlier target. It resolves only while `model`
    /// has a price.
    pub fn alias(&mut self, alias: &str, model: &str) {
        self.aliases.insert(alias.to_string(), model.to_string());
    }

    /// The canonical id of a model id, alias or dated id, if the table knows it.
    pub fn resolve<'a>(&'a self, model: &'a str) -> Option<&'a str> {
        let known = |m: &'a str| -> Option<&'a str> {
            if let Some((k, _)) = self.entries.get_key_value(m) {
                return Some(k.as_str());
            }
            self.aliases.get(m).map(String::as_str).filter(|c| self.entries.contains_key(*c))
        };
        known(model).or_else(|| strip_date_suffix(model).and_then(known))
    }

    /// The price of `model` on `date`: the latest version in effect that day (the earliest
    /// version for a date before any is in effect).
    pub fn price_at(&self, model: &str, date: NaiveDate) -> Result<&PriceEntry, PriceError> {
        let canonical = self.resolve(model).ok_or_else(|| PriceError::UnknownModel(model.to_string()))?;
        let versions = &self.entries[canonical];
        Ok(versions.iter().rev().find(|e| e.effective_from <= date).unwrap_or(&versions[0]))
    }

    /// Every price version, model by model.
    pub fn entries(&self) -> impl Iterator<Item = &PriceEntry> {
        self.entries.values().flatten()
    }

    /// Every alias and the model it names, in alias order.
    pub fn aliases(&self) -> impl Iterator<Item = (&str, &str)> {
        self.aliases.iter().map(|(a, m)| (a.as_str(), m.as_str()))
    }

    /// The built-in table: current Claude models and the OpenAI models of the plan guidance.
    pub fn builtin() -> PriceTable {
        crate::price_builtin::table()
    }
}

/// `claude-sonnet-4-5-20250929` → `claude-sonnet-4-5`; `gpt-5-2025-08-07` → `gpt-5`;
/// `claude-3-5-haiku-latest` → `claude-3-5-haiku`.
fn strip_date_suffix(model: &str) -> Option<&str> {
    if let Some(base) = model.strip_suffix("-latest") {
        return Some(base);
    }
    let (base, tail) = model.rsplit_once('-')?;
    if tail.len() == 8 && tail.bytes().all(|b| b.is_ascii_digit()) {
        return Some(base);
    }
    // OpenAI style: -YYYY-MM-DD
    // `split_at_checked`: a model name is caller text, and the cut may fall inside a character.
    if let Some((base, date)) = model.len().checked_sub(11).and_then(|at| model.split_at_checked(at))
        && !base.is_empty()
    {
        let d = date.as_bytes();
        let shape = d[0] == b'-'
            && d[5] == b'-'
            && d[8] == b'-'
            && d.iter().enumerate().all(|(i, b)| matches!(i, 0 | 5 | 8) || b.is_ascii_digit());
        if shape {
            return Some(base);
        }
    }
    None
}

/// Parses a decimal number as written in JSON (`3e-06`, `0.000003`, `15`) exactly, scaled by
/// 10^`scale`, rounded half-up to an integer. Used to read USD-per-token prices without floats.
pub fn parse_scaled_decimal(text: &str, scale: i32) -> Option<i64> {
    let t = text.trim();
    let (mantissa, exp) = match t.find(['e', 'E']) {
        Some(i) => (&t[..i], t[i + 1..].parse::<i32>().ok()?),
        None => (t, 0),
    };
    let (neg, m) = match mantissa.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, mantissa.strip_prefix('+').unwrap_or(mantissa)),
    };
    let (whole, frac) = m.split_once('.').unwrap_or((m, ""));
    if (whole.is_empty() && frac.is_empty()) || !whole.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits: String = format!("{whole}{frac}");
    let digits = digits.trim_start_matches('0');
    // value = digits × 10^(exp + scale - frac.len())
    let shift = exp.checked_add(scale)?.checked_sub(i32::try_from(frac.len()).ok()?)?;
    if digits.is_empty() {
        return Some(0);
    }
    let n: i128 = if digits.len() > 30 {
        return None;
    } else {
        digits.parse().ok()?
    };
    let value = if shift >= 0 {
        n.checked_mul(10i128.checked_pow(u32::try_from(shift).ok()?)?)?
    } else {
        let drop = u32::try_from(-shift).ok()?;
        if drop > 38 {
            0
        } else {
            let d = 10i128.pow(drop);
            (n + d / 2) / d
        }
    };
    let v = i64::try_from(value).ok()?;
    Some(if neg { -v } else { v })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 13, finding 2: a model name with multi-byte characters where a date suffix would be
    /// (`claude-sonnet-€€€€`) panicked in `strip_date_suffix`; any text is an unknown model.
    #[test]
    fn any_model_name_is_resolved_or_unknown_never_a_panic() {
        let table = PriceTable::builtin();
        let day = NaiveDate::from_ymd_opt(2026, 11, 10).expect("a date");
        for name in [
            "claude-sonnet-€€€€",
            "€€€€€€€€€€€€",
            "a€-2026-11-1",
            "x-€€€€-01-01",
            "€",
            "-",
            "",
            "claude-sonnet-4-5-€€€",
        ] {
            assert!(matches!(table.price_at(name, day), Err(PriceError::UnknownModel(_))), "{name:?}");
        }
        assert!(table.price_at("claude-sonnet-4-5-20250929", day).is_ok(), "dated ids still resolve");
        assert!(table.price_at("gpt-4.1-mini-2025-04-14", day).is_ok(), "OpenAI dated ids still resolve");
    }

    #[test]
    fn scaled_decimals_are_exact() {
        // USD per token → nano-USD per MTok is a scale of 10^15.
        assert_eq!(parse_scaled_decimal("3e-06", 15), Some(3_000_000_000));
        assert_eq!(parse_scaled_decimal("3.75e-06", 15), Some(3_750_000_000));
        assert_eq!(parse_scaled_decimal("0.000003", 15), Some(3_000_000_000));
        assert_eq!(parse_scaled_decimal("3.0000000000000004e-06", 15), Some(3_000_000_000));
        assert_eq!(parse_scaled_decimal("1.25E-7", 15), Some(125_000_000));
        assert_eq!(parse_scaled_decimal("15", 0), Some(15));
        assert_eq!(parse_scaled_decimal("0", 15), Some(0));
        assert_eq!(parse_scaled_decimal("abc", 15), None);
        assert_eq!(parse_scaled_decimal("", 15), None);
    }

    #[test]
    fn date_suffixes_are_stripped() {
        assert_eq!(strip_date_suffix("claude-sonnet-4-5-20250929"), Some("claude-sonnet-4-5"));
        assert_eq!(strip_date_suffix("gpt-4.1-mini-2025-04-14"), Some("gpt-4.1-mini"));
        assert_eq!(strip_date_suffix("claude-3-5-haiku-latest"), Some("claude-3-5-haiku"));
        assert_eq!(strip_date_suffix("claude-opus-4-6"), None);
    }
}
