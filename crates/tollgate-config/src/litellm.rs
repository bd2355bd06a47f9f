//! Reads LiteLLM's `model_prices_and_context_window.json`: the Anthropic and OpenAI chat
//! entries, with prices per token read exactly from their decimal text.

use std::collections::BTreeMap;

use chrono::NaiveDate;
use serde_json::Value;
use tollgate_core::Nanos;
use tollgate_core::price::{LongContext, PriceEntry, Provider, Rates, parse_scaled_decimal};

use crate::{ConfigError, err};

/// USD per token → nano-USD per MTok.
const PER_TOKEN_TO_RATE: i32 = 15;

fn rate(entry: &serde_json::Map<String, Value>, field: &str) -> Result<Option<i64>, String> {
    match entry.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => parse_scaled_decimal(&n.to_string(), PER_TOKEN_TO_RATE)
            .filter(|v| *v >= 0)
            .map(Some)
            .ok_or_else(|| format!("{field} = {n} is not a price")),
        Some(other) => Err(format!("{field} = {other} is not a number")),
    }
}

/// The Anthropic and OpenAI chat-model prices of a LiteLLM price file, dated `effective_from`.
/// Entries of other providers and modes are skipped; a malformed Anthropic/OpenAI entry is an
/// error naming the model.
pub fn read_litellm(text: &str, effective_from: NaiveDate) -> Result<Vec<PriceEntry>, ConfigError> {
    let all: BTreeMap<String, Value> =
        serde_json::from_str(text).map_err(|e| err(format!("LiteLLM price file is not valid JSON: {e}")))?;
    let mut out = Vec::new();
    for (name, v) in all {
        let Value::Object(entry) = v else { continue };
        let provider = match entry.get("litellm_provider").and_then(Value::as_str) {
            Some("anthropic") => Provider::Anthropic,
            Some("openai") => Provider::OpenAi,
            _ => continue,
        };
        if entry.get("mode").and_then(Value::as_str).is_some_and(|m| m != "chat") {
            continue;
        }
        let model = name.trim_start_matches("anthropic/").trim_start_matches("openai/").to_string();
        let bad = |m: String| err(format!("LiteLLM entry {name:?}: {m}"));
        let (Some(input), Some(output)) =
            (rate(&entry, "input_cost_per_token").map_err(bad)?, rate(&entry, "output_cost_per_token").map_err(bad)?)
        else {
            continue;
        };
        let read = rate(&entry, "cache_read_input_token_cost").map_err(bad)?.unwrap_or(input);
        let w5m = rate(&entry, "cache_creation_input_token_cost").map_err(bad)?.unwrap_or(input);
        let w1h = rate(&entry, "cache_creation_input_token_cost_above_1hr").map_err(bad)?.unwrap_or(w5m);
        let long_input = rate(&entry, "input_cost_per_token_above_200k_tokens").map_err(bad)?;
        let long_context = match long_input {
            Some(long_in) => Some(LongContext {
                threshold_tokens: 200_000,
                rates: Rates {
                    input: long_in,
                    cache_write_5m: rate(&entry, "cache_creation_input_token_cost_above_200k_tokens")
                        .map_err(bad)?
                        .unwrap_or(w5m),
                    cache_write_1h: rate(&entry, "cache_creation_input_token_cost_above_1hr_above_200k_tokens")
                        .map_err(bad)?
                        .unwrap_or(w1h),
                    cache_read: rate(&entry, "cache_read_input_token_cost_above_200k_tokens")
                        .map_err(bad)?
                        .unwrap_or(read),
                    output: rate(&entry, "output_cost_per_token_above_200k_tokens").map_err(bad)?.unwrap_or(output),
                },
            }),
            None => None,
        };
        out.push(PriceEntry {
            model,
            provider,
            effective_from,
            rates: Rates { input, cache_write_5m: w5m, cache_write_1h: w1h, cache_read: read, output },
            long_context,
            fast_multiplier_ppm: None,
            geo_us_surcharge: false,
            web_search_per_request: if provider == Provider::Anthropic { Nanos(10_000_000) } else { Nanos::ZERO },
        });
    }
    Ok(out)
}
