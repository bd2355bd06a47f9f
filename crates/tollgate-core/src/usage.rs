//! The token counts of one call, normalized to Anthropic's meaning: `input_tokens` excludes every
//! cache token, `output_tokens` includes thinking.

use std::fmt;

/// Token counts of one call, by type. Names are the event JSON's field names (SPEC section 11).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Usage {
    /// Input tokens neither written to nor read from the cache.
    pub input_tokens: u64,
    /// Input tokens written to the cache for 5 minutes.
    pub cache_creation_5m_input_tokens: u64,
    /// Input tokens written to the cache for 1 hour.
    pub cache_creation_1h_input_tokens: u64,
    /// Input tokens read from the cache.
    pub cache_read_input_tokens: u64,
    /// Output tokens, thinking included.
    pub output_tokens: u64,
    /// Web search requests made by the server tool.
    pub web_search_requests: u64,
}

/// The most tokens of one type a single call may report. The largest context windows are a few
/// million tokens; anything beyond this bound is a bug or an attack, not a call.
pub const TOKENS_PER_CALL_MAX: u64 = 100_000_000;
/// The most server-tool requests a single call may report.
pub const TOOL_REQUESTS_PER_CALL_MAX: u64 = 100_000;

/// A usage count beyond its per-call bound.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageError {
    /// The count's field name, as in the event JSON.
    pub field: &'static str,
    /// The count given.
    pub value: u64,
    /// Its per-call bound.
    pub max: u64,
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "usage.{} = {} is absurd for one call: at most {} allowed", self.field, self.value, self.max)
    }
}

impl std::error::Error for UsageError {}

impl Usage {
    /// All input-side tokens: uncached input plus cache writes and reads.
    pub fn total_input_tokens(&self) -> u64 {
        self.input_tokens
            + self.cache_creation_5m_input_tokens
            + self.cache_creation_1h_input_tokens
            + self.cache_read_input_tokens
    }

    /// Every token, input side and output.
    pub fn tokens(&self) -> u64 {
        self.total_input_tokens().saturating_add(self.output_tokens)
    }

    /// Adds another usage to this one, field by field (saturating: sums over many calls).
    pub fn add(&mut self, other: &Usage) {
        self.input_tokens = self.input_tokens.saturating_add(other.input_tokens);
        self.cache_creation_5m_input_tokens =
            self.cache_creation_5m_input_tokens.saturating_add(other.cache_creation_5m_input_tokens);
        self.cache_creation_1h_input_tokens =
            self.cache_creation_1h_input_tokens.saturating_add(other.cache_creation_1h_input_tokens);
        self.cache_read_input_tokens = self.cache_read_input_tokens.saturating_add(other.cache_read_input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(other.output_tokens);
        self.web_search_requests = self.web_search_requests.saturating_add(other.web_search_requests);
    }

    /// Checks every count against its per-call bound.
    pub fn validate(&self) -> Result<(), UsageError> {
        let fields = [
            ("input_tokens", self.input_tokens, TOKENS_PER_CALL_MAX),
            ("cache_creation_5m_input_tokens", self.cache_creation_5m_input_tokens, TOKENS_PER_CALL_MAX),
            ("cache_creation_1h_input_tokens", self.cache_creation_1h_input_tokens, TOKENS_PER_CALL_MAX),
            ("cache_read_input_tokens", self.cache_read_input_tokens, TOKENS_PER_CALL_MAX),
            ("output_tokens", self.output_tokens, TOKENS_PER_CALL_MAX),
            ("web_search_requests", self.web_search_requests, TOOL_REQUESTS_PER_CALL_MAX),
        ];
        for (field, value, max) in fields {
            if value > max {
                return Err(UsageError { field, value, max });
            }
        }
        Ok(())
    }

    /// Normalizes OpenAI usage, where `prompt_tokens` includes `cached_tokens`.
    pub fn from_openai(prompt_tokens: u64, cached_tokens: u64, completion_tokens: u64) -> Usage {
        Usage {
            input_tokens: prompt_tokens.saturating_sub(cached_tokens),
            cache_read_input_tokens: cached_tokens.min(prompt_tokens),
            output_tokens: completion_tokens,
            ..Usage::default()
        }
    }
}
