//! The parts of the Anthropic Messages and OpenAI chat-completions formats that metering needs:
//! the bound of a request, and the usage of a response (a JSON body or an SSE stream read on the
//! side while its bytes are forwarded unchanged).

use serde::Deserialize;
use serde_json::Value;
use tollgate_core::Usage;

/// What pricing needs to know about a request before it is forwarded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestFacts {
    pub model: String,
    /// `max_tokens` (Anthropic) or `max_completion_tokens` / `max_tokens` (OpenAI); None if absent.
    pub max_tokens: Option<u64>,
    pub stream: bool,
    /// Σ `max_uses` of the web search tools that set one.
    pub web_search_max_uses: u64,
    /// Σ `max_uses` of the web fetch tools that set one.
    pub web_fetch_max_uses: u64,
    /// Web search and web fetch tools without `max_uses`: unbounded until the gateway gives
    /// them one ([`RequestFacts::inject_max_uses`], [`anthropic_inject_max_uses`]).
    pub web_search_without_max_uses: u64,
    pub web_fetch_without_max_uses: u64,
    /// Documents and images given by URL or file id: their size is not in the body.
    pub unbounded_inputs: u64,
    /// What the request uses whose cost the gateway cannot bound before the call, as the
    /// request names it (`mcp_servers`, a code execution tool's type, `container_upload`,
    /// `web_search_options`), each once, in the order found.
    pub unbounded_tools: Vec<String>,
    pub batch: bool,
    pub geo_us: bool,
    pub fast: bool,
    /// OpenAI: the client asked for usage in the stream itself.
    pub include_usage: bool,
}

impl RequestFacts {
    /// Server tools without `max_uses` that the gateway must give one before forwarding.
    pub fn tools_without_max_uses(&self) -> u64 {
        self.web_search_without_max_uses.saturating_add(self.web_fetch_without_max_uses)
    }

    /// Counts `max_uses` for every server tool that had none, as the body rewritten by
    /// [`anthropic_inject_max_uses`] with the same value says.
    pub fn inject_max_uses(&mut self, max_uses: u64) {
        let add = |sum: u64, tools: u64| sum.saturating_add(tools.saturating_mul(max_uses));
        self.web_search_max_uses = add(self.web_search_max_uses, self.web_search_without_max_uses);
        self.web_fetch_max_uses = add(self.web_fetch_max_uses, self.web_fetch_without_max_uses);
        self.web_search_without_max_uses = 0;
        self.web_fetch_without_max_uses = 0;
    }

    fn unbounded(&mut self, name: &str) {
        if !self.unbounded_tools.iter().any(|n| n == name) {
            self.unbounded_tools.push(name.to_string());
        }
    }
}

/// Server tools whose uses `max_uses` bounds, by the prefix of their `type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ServerTool {
    WebSearch,
    WebFetch,
}

fn server_tool(tool: &Value) -> Option<ServerTool> {
    let kind = tool.get("type").and_then(Value::as_str)?;
    if kind.starts_with("web_search") {
        Some(ServerTool::WebSearch)
    } else if kind.starts_with("web_fetch") {
        Some(ServerTool::WebFetch)
    } else {
        None
    }
}

/// A server tool's `max_uses`: None when absent (or null); a value that is not a whole number
/// is the caller's to fix.
fn max_uses(tool: &Value, index: usize) -> Result<Option<u64>, BadRequest> {
    match tool.get("max_uses") {
        None | Some(Value::Null) => Ok(None),
        Some(m) => m
            .as_u64()
            .map(Some)
            .ok_or_else(|| BadRequest(format!("tools[{index}].max_uses: must be a whole number of uses, such as 5"))),
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct BadRequest(pub String);

fn parse_json(body: &[u8]) -> Result<Value, BadRequest> {
    serde_json::from_slice(body).map_err(|e| BadRequest(format!("the request body is not valid JSON: {e}")))
}

/// Reads an Anthropic Messages request.
pub fn anthropic_request(body: &[u8]) -> Result<RequestFacts, BadRequest> {
    let v = parse_json(body)?;
    let model = v
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| BadRequest("model: field required (a string, e.g. \"claude-sonnet-4-5\")".into()))?;
    let max_tokens = match v.get("max_tokens") {
        None => None,
        Some(m) => Some(m.as_u64().ok_or_else(|| BadRequest("max_tokens: must be a positive whole number".into()))?),
    };
    let mut facts = RequestFacts {
        model: model.to_string(),
        max_tokens,
        stream: v.get("stream").and_then(Value::as_bool).unwrap_or(false),
        batch: v.get("service_tier").and_then(Value::as_str) == Some("batch"),
        geo_us: v.get("inference_geo").and_then(Value::as_str) == Some("us"),
        fast: v.get("speed").and_then(Value::as_str) == Some("fast"),
        ..RequestFacts::default()
    };
    // The MCP connector: the upstream calls the servers' tools, and their results come in as
    // input, as often as the model likes.
    if v.get("mcp_servers").and_then(Value::as_array).is_some_and(|s| !s.is_empty()) {
        facts.unbounded("mcp_servers");
    }
    for (i, tool) in v.get("tools").and_then(Value::as_array).into_iter().flatten().enumerate() {
        match (server_tool(tool), max_uses(tool, i)?) {
            (Some(ServerTool::WebSearch), Some(n)) => {
                facts.web_search_max_uses = facts.web_search_max_uses.saturating_add(n)
            }
            (Some(ServerTool::WebFetch), Some(n)) => {
                facts.web_fetch_max_uses = facts.web_fetch_max_uses.saturating_add(n)
            }
            (Some(ServerTool::WebSearch), None) => facts.web_search_without_max_uses += 1,
            (Some(ServerTool::WebFetch), None) => facts.web_fetch_without_max_uses += 1,
            (None, _) => {
                // Code execution: billed by container time, and what it prints comes back as input.
                let kind = tool.get("type").and_then(Value::as_str).unwrap_or("");
                if kind.starts_with("code_execution") {
                    facts.unbounded(kind);
                }
            }
        }
    }
    let mut count = |blocks: &Value| {
        for block in blocks.as_array().into_iter().flatten() {
            let source_kind = block.get("source").and_then(|s| s.get("type")).and_then(Value::as_str);
            if matches!(source_kind, Some("url") | Some("file")) {
                facts.unbounded_inputs += 1;
            }
            // A file put into the code execution container: what the model does with it there
            // is as unbounded as code execution itself.
            if block.get("type").and_then(Value::as_str) == Some("container_upload") {
                facts.unbounded("container_upload");
            }
        }
    };
    for message in v.get("messages").and_then(Value::as_array).into_iter().flatten() {
        if let Some(content) = message.get("content") {
            count(content);
            for block in content.as_array().into_iter().flatten() {
                // Tool results may carry documents and images of their own.
                if let Some(inner) = block.get("content") {
                    count(inner);
                }
            }
        }
    }
    Ok(facts)
}

/// Gives every web search and web fetch tool without `max_uses` this one, so that what the
/// call can cost is bounded (SPEC section 3); tools that have one keep it.
pub fn anthropic_inject_max_uses(body: &[u8], max_uses: u64) -> Result<Vec<u8>, BadRequest> {
    let mut v = parse_json(body)?;
    for tool in v.get_mut("tools").and_then(Value::as_array_mut).into_iter().flatten() {
        if server_tool(tool).is_some()
            && tool.get("max_uses").is_none_or(Value::is_null)
            && let Some(t) = tool.as_object_mut()
        {
            t.insert("max_uses".into(), Value::from(max_uses));
        }
    }
    serde_json::to_vec(&v).map_err(|e| BadRequest(format!("cannot re-encode the request: {e}")))
}

/// Reads an OpenAI chat-completions request.
pub fn openai_request(body: &[u8]) -> Result<RequestFacts, BadRequest> {
    let v = parse_json(body)?;
    let model = v
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| BadRequest("model: field required (a string, e.g. \"gpt-5\")".into()))?;
    let max_tokens = match v.get("max_completion_tokens").or_else(|| v.get("max_tokens")) {
        None | Some(Value::Null) => None,
        Some(m) => Some(
            m.as_u64().ok_or_else(|| BadRequest("max_completion_tokens: must be a positive whole number".into()))?,
        ),
    };
    let mut facts = RequestFacts {
        model: model.to_string(),
        max_tokens,
        stream: v.get("stream").and_then(Value::as_bool).unwrap_or(false),
        include_usage: v.pointer("/stream_options/include_usage").and_then(Value::as_bool).unwrap_or(false),
        batch: v.get("service_tier").and_then(Value::as_str) == Some("batch"),
        ..RequestFacts::default()
    };
    // Search models: a price per search and the pages found as input, with no bound on either.
    if v.get("web_search_options").is_some_and(|o| !o.is_null()) {
        facts.unbounded("web_search_options");
    }
    Ok(facts)
}

/// Rewrites an OpenAI request: `stream_options.include_usage = true` (so the stream reports
/// usage) and, when given, the output bound.
pub fn openai_rewrite(body: &[u8], include_usage: bool, max_tokens: Option<u64>) -> Result<Vec<u8>, BadRequest> {
    let mut v = parse_json(body)?;
    let obj = v.as_object_mut().ok_or_else(|| BadRequest("the request body must be a JSON object".into()))?;
    if include_usage {
        let options = obj.entry("stream_options").or_insert_with(|| Value::Object(Default::default()));
        if let Some(o) = options.as_object_mut() {
            o.insert("include_usage".into(), Value::Bool(true));
        }
    }
    if let Some(m) = max_tokens {
        let field = if obj.contains_key("max_tokens") && !obj.contains_key("max_completion_tokens") {
            "max_tokens"
        } else {
            "max_completion_tokens"
        };
        obj.insert(field.into(), Value::from(m));
    }
    serde_json::to_vec(&v).map_err(|e| BadRequest(format!("cannot re-encode the request: {e}")))
}

/// Rewrites an Anthropic request's `max_tokens` (and a manual thinking budget above it).
pub fn anthropic_clamp(body: &[u8], max_tokens: u64) -> Result<Vec<u8>, BadRequest> {
    let mut v = parse_json(body)?;
    let obj = v.as_object_mut().ok_or_else(|| BadRequest("the request body must be a JSON object".into()))?;
    obj.insert("max_tokens".into(), Value::from(max_tokens));
    if let Some(thinking) = obj.get_mut("thinking").and_then(Value::as_object_mut)
        && let Some(budget) = thinking.get("budget_tokens").and_then(Value::as_u64)
        && budget >= max_tokens
    {
        thinking.insert("budget_tokens".into(), Value::from(max_tokens.saturating_sub(1).max(1)));
    }
    serde_json::to_vec(&v).map_err(|e| BadRequest(format!("cannot re-encode the request: {e}")))
}

/// Anthropic's usage object, every field optional (deltas carry only some).
#[derive(Debug, Default, Deserialize)]
struct AnthropicUsage {
    input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation: Option<CacheCreation>,
    output_tokens: Option<u64>,
    server_tool_use: Option<ServerToolUse>,
}

#[derive(Debug, Default, Deserialize)]
struct CacheCreation {
    ephemeral_5m_input_tokens: Option<u64>,
    ephemeral_1h_input_tokens: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
struct ServerToolUse {
    web_search_requests: Option<u64>,
}

impl AnthropicUsage {
    /// Overwrites, field by field, what this (cumulative) usage carries.
    fn apply(&self, usage: &mut Usage) {
        if let Some(v) = self.input_tokens {
            usage.input_tokens = v;
        }
        match (&self.cache_creation, self.cache_creation_input_tokens) {
            (Some(c), _) if c.ephemeral_5m_input_tokens.is_some() || c.ephemeral_1h_input_tokens.is_some() => {
                usage.cache_creation_5m_input_tokens = c.ephemeral_5m_input_tokens.unwrap_or(0);
                usage.cache_creation_1h_input_tokens = c.ephemeral_1h_input_tokens.unwrap_or(0);
            }
            // Without the split, cache writes are 5-minute writes (the API's default TTL).
            (_, Some(total)) => {
                usage.cache_creation_5m_input_tokens = total.saturating_sub(usage.cache_creation_1h_input_tokens);
            }
            _ => {}
        }
        if let Some(v) = self.cache_read_input_tokens {
            usage.cache_read_input_tokens = v;
        }
        if let Some(v) = self.output_tokens {
            usage.output_tokens = v;
        }
        if let Some(v) = self.server_tool_use.as_ref().and_then(|s| s.web_search_requests) {
            usage.web_search_requests = v;
        }
    }
}

/// The usage of a non-streaming Anthropic response body; None when it has none.
pub fn anthropic_response_usage(body: &[u8]) -> Option<Usage> {
    #[derive(Deserialize)]
    struct Response {
        usage: Option<AnthropicUsage>,
    }
    let r: Response = serde_json::from_slice(body).ok()?;
    let mut usage = Usage::default();
    r.usage?.apply(&mut usage);
    Some(usage)
}

/// The usage of a non-streaming OpenAI response body; None when it has none.
pub fn openai_response_usage(body: &[u8]) -> Option<Usage> {
    #[derive(Deserialize)]
    struct Response {
        usage: Option<OpenAiUsage>,
    }
    let r: Response = serde_json::from_slice(body).ok()?;
    r.usage.map(|u| u.to_usage())
}

#[derive(Debug, Deserialize)]
struct OpenAiUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Debug, Deserialize)]
struct PromptDetails {
    cached_tokens: Option<u64>,
}

impl OpenAiUsage {
    fn to_usage(&self) -> Usage {
        let cached = self.prompt_tokens_details.as_ref().and_then(|d| d.cached_tokens).unwrap_or(0);
        Usage::from_openai(self.prompt_tokens, cached, self.completion_tokens)
    }
}

/// Splits a byte stream into SSE lines across chunk boundaries.
#[derive(Debug, Default)]
struct Lines {
    partial: Vec<u8>,
}

/// Longest SSE line kept while waiting for its end; longer lines are skipped (no usage is that big).
const LINE_BYTES_MAX: usize = 1 << 20;

impl Lines {
    fn feed(&mut self, chunk: &[u8], mut on_line: impl FnMut(&[u8])) {
        let mut rest = chunk;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            let (line, tail) = rest.split_at(i);
            if self.partial.is_empty() {
                on_line(trim_cr(line));
            } else {
                self.partial.extend_from_slice(line);
                let whole = std::mem::take(&mut self.partial);
                on_line(trim_cr(&whole));
            }
            rest = &tail[1..];
        }
        if self.partial.len() + rest.len() <= LINE_BYTES_MAX {
            self.partial.extend_from_slice(rest);
        } else {
            self.partial.clear();
        }
    }
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn data_of(line: &[u8]) -> Option<&[u8]> {
    let d = line.strip_prefix(b"data:")?;
    Some(d.strip_prefix(b" ").unwrap_or(d))
}

/// Reads an Anthropic SSE stream on the side: the usage of `message_start`, overwritten field by
/// field by each cumulative `message_delta`; the text forwarded (for a cut stream's estimate);
/// whether the stream finished (`message_stop`) or reported an error.
#[derive(Debug, Default)]
pub struct AnthropicStream {
    lines: Lines,
    pub usage: Usage,
    pub started: bool,
    pub stopped: bool,
    pub error: Option<String>,
    /// Bytes of text, thinking and tool input forwarded in deltas.
    pub text_bytes: u64,
}

impl AnthropicStream {
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut lines = std::mem::take(&mut self.lines);
        lines.feed(chunk, |line| {
            if let Some(data) = data_of(line) {
                self.on_data(data);
            }
        });
        self.lines = lines;
    }

    fn on_data(&mut self, data: &[u8]) {
        #[derive(Deserialize)]
        struct Event {
            #[serde(rename = "type")]
            kind: String,
            message: Option<Message>,
            usage: Option<AnthropicUsage>,
            delta: Option<Delta>,
            error: Option<ErrorBody>,
        }
        #[derive(Deserialize)]
        struct Message {
            usage: Option<AnthropicUsage>,
        }
        #[derive(Deserialize)]
        struct Delta {
            text: Option<String>,
            thinking: Option<String>,
            partial_json: Option<String>,
        }
        #[derive(Deserialize)]
        struct ErrorBody {
            #[serde(rename = "type")]
            kind: Option<String>,
        }
        let Ok(event) = serde_json::from_slice::<Event>(data) else { return };
        match event.kind.as_str() {
            "message_start" => {
                self.started = true;
                if let Some(u) = event.message.and_then(|m| m.usage) {
                    u.apply(&mut self.usage);
                }
            }
            "message_delta" => {
                if let Some(u) = event.usage {
                    u.apply(&mut self.usage);
                }
            }
            "content_block_delta" => {
                if let Some(d) = event.delta {
                    let n = [d.text, d.thinking, d.partial_json].iter().flatten().map(String::len).sum::<usize>();
                    self.text_bytes += n as u64;
                }
            }
            "message_stop" => self.stopped = true,
            "error" => self.error = Some(event.error.and_then(|e| e.kind).unwrap_or_else(|| "error".into())),
            _ => {}
        }
    }
}

/// Reads an OpenAI chat-completions SSE stream on the side. When tollgate asked for the usage
/// chunk on the client's behalf, [`OpenAiStream::feed`] reports the byte ranges to drop so the
/// client does not see it.
#[derive(Debug, Default)]
pub struct OpenAiStream {
    lines: Lines,
    pub usage: Option<Usage>,
    pub done: bool,
    pub text_bytes: u64,
    pub started: bool,
}

impl OpenAiStream {
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut lines = std::mem::take(&mut self.lines);
        lines.feed(chunk, |line| {
            if let Some(data) = data_of(line) {
                self.on_data(data);
            }
        });
        self.lines = lines;
    }

    fn on_data(&mut self, data: &[u8]) {
        if data == b"[DONE]" {
            self.done = true;
            return;
        }
        #[derive(Deserialize)]
        struct Chunk {
            usage: Option<OpenAiUsage>,
            #[serde(default)]
            choices: Vec<Choice>,
        }
        #[derive(Deserialize)]
        struct Choice {
            delta: Option<ChoiceDelta>,
        }
        #[derive(Deserialize)]
        struct ChoiceDelta {
            content: Option<String>,
        }
        let Ok(chunk) = serde_json::from_slice::<Chunk>(data) else { return };
        self.started = true;
        if let Some(u) = chunk.usage {
            self.usage = Some(u.to_usage());
        }
        for c in chunk.choices {
            if let Some(text) = c.delta.and_then(|d| d.content) {
                self.text_bytes += text.len() as u64;
            }
        }
    }
}

/// True when an SSE event block (`data: {...}`) of an OpenAI stream is the usage-only chunk
/// (empty `choices`, `usage` set), which is dropped when the client did not ask for it.
pub fn openai_is_usage_chunk(event: &[u8]) -> bool {
    let Some(data) = event.split(|&b| b == b'\n').find_map(|l| data_of(trim_cr(l))) else { return false };
    #[derive(Deserialize)]
    struct Chunk {
        usage: Option<Value>,
        choices: Option<Vec<Value>>,
    }
    match serde_json::from_slice::<Chunk>(data) {
        Ok(c) => c.usage.is_some_and(|u| !u.is_null()) && c.choices.is_some_and(|c| c.is_empty()),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests;
