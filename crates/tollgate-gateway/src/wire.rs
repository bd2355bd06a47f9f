//! The parts of the Anthropic Messages and OpenAI chat-completions formats that metering needs:
//! the bound of a request, and the usage of a response (a JSON body or an SSE stream read on the
//! side while its bytes are forwarded unchanged).

use serde::Deserialize;
use serde_json::Value;
use tollgate_core::Usage;
use tollgate_core::usage::{TOKENS_PER_CALL_MAX, TOOL_REQUESTS_PER_CALL_MAX};

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
    if v.get("stream_options").is_some_and(|o| !o.is_null() && !o.is_object()) {
        return Err(BadRequest("stream_options: must be an object, such as {\"include_usage\": true}".into()));
    }
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
        let options = obj.entry("stream_options").or_insert(Value::Null);
        // A null `stream_options` is as good as none: it gets an object too.
        if options.is_null() {
            *options = Value::Object(Default::default());
        }
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

/// One usage count as a report gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Count {
    /// A whole number within the per-call bound.
    Sane(u64),
    /// Text, a negative or fractional number, or a number above the per-call bound (2^64 too):
    /// never read as some smaller number, the field is unknown.
    Unreadable,
}

impl Count {
    /// The count of a JSON value; None when the field is absent (`null`).
    fn read(v: Option<&Value>, max: u64) -> Option<Count> {
        match v? {
            Value::Null => None,
            v => Some(match v.as_u64() {
                Some(n) if n <= max => Count::Sane(n),
                _ => Count::Unreadable,
            }),
        }
    }

    fn tokens(v: Option<&Value>) -> Option<Count> {
        Count::read(v, TOKENS_PER_CALL_MAX)
    }
}

/// The fields of a usage, as bits of [`Reported`]'s masks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Input = 1,
    CacheWrite5m = 2,
    CacheWrite1h = 4,
    CacheRead = 8,
    Output = 16,
    WebSearch = 32,
}

const INPUT_SIDE: u8 =
    Field::Input as u8 | Field::CacheWrite5m as u8 | Field::CacheWrite1h as u8 | Field::CacheRead as u8;

/// The usage a response has reported so far, field by field. Anthropic's stream reports
/// cumulative counts, so each field holds the largest sane count reported: a later, smaller one
/// is a misreport, not a refund. A field reported only in a form that cannot be read stays
/// unknown, and the meter estimates it rather than read it as zero.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reported {
    pub usage: Usage,
    /// Fields reported with a sane count at least once.
    known: u8,
    /// Fields reported at least once with a count that cannot be read.
    unreadable: u8,
}

impl Reported {
    fn set(&mut self, field: Field, count: Count) {
        let n = match count {
            Count::Sane(n) => n,
            Count::Unreadable => {
                self.unreadable |= field as u8;
                return;
            }
        };
        self.known |= field as u8;
        let u = &mut self.usage;
        let slot = match field {
            Field::Input => &mut u.input_tokens,
            Field::CacheWrite5m => &mut u.cache_creation_5m_input_tokens,
            Field::CacheWrite1h => &mut u.cache_creation_1h_input_tokens,
            Field::CacheRead => &mut u.cache_read_input_tokens,
            Field::Output => &mut u.output_tokens,
            Field::WebSearch => &mut u.web_search_requests,
        };
        *slot = (*slot).max(n);
    }

    fn set_some(&mut self, field: Field, count: Option<Count>) {
        if let Some(c) = count {
            self.set(field, c);
        }
    }

    /// The input side is known: `input_tokens` was reported as a sane count, and no input-side
    /// count (input, cache writes, cache reads) was reported only unreadably.
    pub fn input_known(&self) -> bool {
        self.known & Field::Input as u8 != 0 && self.unreadable & !self.known & INPUT_SIDE == 0
    }

    /// `output_tokens` was reported as a sane count.
    pub fn output_known(&self) -> bool {
        self.known & Field::Output as u8 != 0
    }

    /// The server-tool count was reported, but only unreadably.
    pub fn web_search_unknown(&self) -> bool {
        self.unreadable & !self.known & Field::WebSearch as u8 != 0
    }

    /// Some count could not be read, even if another report of it could.
    pub fn any_unreadable(&self) -> bool {
        self.unreadable != 0
    }

    /// Reads an Anthropic usage object (`message_start`'s, a `message_delta`'s or a JSON
    /// answer's); absent fields keep their value.
    fn read_anthropic(&mut self, usage: &Value) {
        let Some(o) = usage.as_object() else {
            if !usage.is_null() {
                // Not an object at all: nothing of it can be read.
                self.set(Field::Input, Count::Unreadable);
                self.set(Field::Output, Count::Unreadable);
            }
            return;
        };
        self.set_some(Field::Input, Count::tokens(o.get("input_tokens")));
        let split = o.get("cache_creation");
        let w5 = Count::tokens(split.and_then(|c| c.get("ephemeral_5m_input_tokens")));
        let w1 = Count::tokens(split.and_then(|c| c.get("ephemeral_1h_input_tokens")));
        if w5.is_some() || w1.is_some() {
            self.set(Field::CacheWrite5m, w5.unwrap_or(Count::Sane(0)));
            self.set(Field::CacheWrite1h, w1.unwrap_or(Count::Sane(0)));
        } else {
            // Without the split, cache writes are 5-minute writes (the API's default TTL).
            let total = Count::tokens(o.get("cache_creation_input_tokens"));
            let w5 = total.map(|t| match t {
                Count::Sane(t) => Count::Sane(t.saturating_sub(self.usage.cache_creation_1h_input_tokens)),
                unreadable => unreadable,
            });
            self.set_some(Field::CacheWrite5m, w5);
        }
        self.set_some(Field::CacheRead, Count::tokens(o.get("cache_read_input_tokens")));
        self.set_some(Field::Output, Count::tokens(o.get("output_tokens")));
        let searches = o.get("server_tool_use").and_then(|t| t.get("web_search_requests"));
        self.set_some(Field::WebSearch, Count::read(searches, TOOL_REQUESTS_PER_CALL_MAX));
    }

    /// Reads an OpenAI usage object: `prompt_tokens` include the cached ones, which are priced
    /// as cache reads.
    fn read_openai(&mut self, usage: &Value) {
        let Some(o) = usage.as_object() else {
            if !usage.is_null() {
                self.set(Field::Input, Count::Unreadable);
                self.set(Field::Output, Count::Unreadable);
            }
            return;
        };
        let prompt = Count::tokens(o.get("prompt_tokens"));
        let cached = Count::tokens(o.get("prompt_tokens_details").and_then(|d| d.get("cached_tokens")));
        match (prompt, cached) {
            (Some(Count::Sane(p)), None | Some(Count::Sane(_))) => {
                let cached = match cached {
                    Some(Count::Sane(c)) => c,
                    _ => 0,
                };
                let u = Usage::from_openai(p, cached, 0);
                self.set(Field::Input, Count::Sane(u.input_tokens));
                self.set(Field::CacheRead, Count::Sane(u.cache_read_input_tokens));
            }
            (prompt, cached) => {
                self.set_some(Field::Input, prompt.map(|_| Count::Unreadable));
                self.set_some(Field::CacheRead, cached.map(|_| Count::Unreadable));
            }
        }
        self.set_some(Field::Output, Count::tokens(o.get("completion_tokens")));
    }
}

/// What a whole JSON answer reports: its usage, and the bytes of text it carries (the floor of
/// an output estimate when its count cannot be read).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JsonReport {
    pub reported: Reported,
    pub text_bytes: u64,
}

fn str_len(v: Option<&Value>) -> u64 {
    v.and_then(Value::as_str).map_or(0, |s| s.len() as u64)
}

/// The usage of a non-streaming Anthropic answer; nothing known when it is not JSON.
pub fn anthropic_response_usage(body: &[u8]) -> JsonReport {
    let Ok(v) = serde_json::from_slice::<Value>(body) else { return JsonReport::default() };
    let mut report = JsonReport::default();
    if let Some(u) = v.get("usage") {
        report.reported.read_anthropic(u);
    }
    for block in v.get("content").and_then(Value::as_array).into_iter().flatten() {
        report.text_bytes += str_len(block.get("text")) + str_len(block.get("thinking"));
        if let Some(input) = block.get("input").filter(|i| !i.is_null()) {
            report.text_bytes += input.to_string().len() as u64;
        }
    }
    report
}

/// The usage of a non-streaming OpenAI answer; nothing known when it is not JSON.
pub fn openai_response_usage(body: &[u8]) -> JsonReport {
    let Ok(v) = serde_json::from_slice::<Value>(body) else { return JsonReport::default() };
    let mut report = JsonReport::default();
    if let Some(u) = v.get("usage") {
        report.reported.read_openai(u);
    }
    for choice in v.get("choices").and_then(Value::as_array).into_iter().flatten() {
        report.text_bytes += str_len(choice.pointer("/message/content"));
    }
    report
}

/// Splits a byte stream into SSE lines across chunk boundaries. Each byte is looked at once; a
/// line is kept while waiting for its end only up to [`LINE_BYTES_MAX`]: a longer line is skipped
/// whole, up to its end (no usage is that big), so the buffer is bounded and the work linear.
#[derive(Debug, Default)]
struct Lines {
    partial: Vec<u8>,
    /// The line being read is longer than [`LINE_BYTES_MAX`]: skip it up to its end.
    skipping: bool,
}

/// Longest SSE line kept while waiting for its end; longer lines are skipped (no usage is that big).
const LINE_BYTES_MAX: usize = 1 << 20;

impl Lines {
    fn feed(&mut self, chunk: &[u8], mut on_line: impl FnMut(&[u8])) {
        let mut rest = chunk;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            let (line, tail) = rest.split_at(i);
            if self.skipping {
                self.skipping = false;
            } else if self.partial.len() + line.len() > LINE_BYTES_MAX {
                self.partial = Vec::new();
            } else if self.partial.is_empty() {
                on_line(trim_cr(line));
            } else {
                self.partial.extend_from_slice(line);
                let whole = std::mem::take(&mut self.partial);
                on_line(trim_cr(&whole));
            }
            rest = &tail[1..];
        }
        if self.skipping {
            return;
        }
        if self.partial.len() + rest.len() <= LINE_BYTES_MAX {
            self.partial.extend_from_slice(rest);
        } else {
            self.partial = Vec::new();
            self.skipping = true;
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

/// Reads an Anthropic SSE stream on the side: the usage of `message_start`, then of each
/// cumulative `message_delta`, field by field (each field its largest sane count); the text
/// forwarded (for a cut stream's estimate); whether the stream finished (`message_stop`) or
/// reported an error.
#[derive(Debug, Default)]
pub struct AnthropicStream {
    lines: Lines,
    pub reported: Reported,
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
        let Ok(event) = serde_json::from_slice::<Value>(data) else { return };
        match event.get("type").and_then(Value::as_str).unwrap_or("") {
            "message_start" => {
                self.started = true;
                if let Some(u) = event.pointer("/message/usage") {
                    self.reported.read_anthropic(u);
                }
            }
            "message_delta" => {
                if let Some(u) = event.get("usage") {
                    self.reported.read_anthropic(u);
                }
            }
            "content_block_delta" => {
                if let Some(d) = event.get("delta") {
                    let n = str_len(d.get("text")) + str_len(d.get("thinking")) + str_len(d.get("partial_json"));
                    self.text_bytes += n;
                }
            }
            "message_stop" => self.stopped = true,
            "error" => {
                let kind = event.pointer("/error/type").and_then(Value::as_str).unwrap_or("error");
                self.error = Some(kind.to_string());
            }
            _ => {}
        }
    }
}

/// Reads an OpenAI chat-completions SSE stream on the side: the usage chunk (which tollgate asks
/// for), the text forwarded, whether `[DONE]` arrived.
#[derive(Debug, Default)]
pub struct OpenAiStream {
    lines: Lines,
    pub reported: Reported,
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
        let Ok(chunk) = serde_json::from_slice::<Value>(data) else { return };
        self.started = true;
        if let Some(u) = chunk.get("usage") {
            self.reported.read_openai(u);
        }
        for c in chunk.get("choices").and_then(Value::as_array).into_iter().flatten() {
            self.text_bytes += str_len(c.pointer("/delta/content"));
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

/// Longest SSE event held back to be read whole before it is forwarded. The usage chunk that
/// [`UsageChunkStrip`] removes is a few hundred bytes; a longer event is not it, and goes through
/// as it comes.
pub const SSE_EVENT_BYTES_MAX: usize = 1 << 20;

/// Capacity of [`UsageChunkStrip`]'s buffer kept between events.
const HELD_CAPACITY_KEPT: usize = 64 * 1024;

/// Removes the usage chunk from an OpenAI SSE stream (when tollgate asked for it on the client's
/// behalf) and forwards every other byte unchanged, in order.
///
/// Events end at a blank line (`\n\n`, `\r\n\r\n` or a mix), found as the bytes arrive: each byte
/// is looked at once, whatever the chunks (an event's end split across chunks included), so the
/// work is linear in the stream's size. Only an event's first [`SSE_EVENT_BYTES_MAX`] bytes are
/// held back; a longer event is not the usage chunk, and is forwarded as it comes.
#[derive(Debug, Default)]
pub struct UsageChunkStrip {
    /// The event being read, held back until its end (at most [`SSE_EVENT_BYTES_MAX`]).
    held: Vec<u8>,
    /// The line being read has a character other than `\r`: a `\n` ends the line, not the event.
    in_line: bool,
    /// The event being read is longer than the bound: forwarded as it comes, up to its end.
    passing: bool,
}

impl UsageChunkStrip {
    /// Reads a chunk; appends to `out` what the client gets of it.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        // `from`: where the part of the current event in this chunk starts.
        let (mut from, mut at) = (0, 0);
        while let Some(i) = chunk[at..].iter().position(|&b| b == b'\n') {
            let end = at + i;
            let blank = !self.in_line && chunk[at..end].iter().all(|&b| b == b'\r');
            at = end + 1;
            self.in_line = false;
            if blank {
                self.event_ends(&chunk[from..at], out);
                from = at;
            }
        }
        self.in_line |= chunk[at..].iter().any(|&b| b != b'\r');
        let rest = &chunk[from..];
        if self.passing {
            out.extend_from_slice(rest);
        } else if self.held.len() + rest.len() > SSE_EVENT_BYTES_MAX {
            out.extend_from_slice(&std::mem::take(&mut self.held));
            out.extend_from_slice(rest);
            self.passing = true;
        } else {
            self.held.extend_from_slice(rest);
        }
    }

    /// The stream ended: the bytes of an event it ended in (without its blank line), unless they
    /// are the usage chunk.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        let held = std::mem::take(&mut self.held);
        if !openai_is_usage_chunk(&held) {
            out.extend_from_slice(&held);
        }
        self.passing = false;
        self.in_line = false;
    }

    /// Bytes held back, waiting for their event's end.
    pub fn held_bytes(&self) -> usize {
        self.held.len()
    }

    /// The current event ends with `tail`: forwarded, unless it is the usage chunk.
    fn event_ends(&mut self, tail: &[u8], out: &mut Vec<u8>) {
        if std::mem::take(&mut self.passing) {
            out.extend_from_slice(tail);
            return;
        }
        let event = if self.held.is_empty() {
            tail
        } else {
            self.held.extend_from_slice(tail);
            &self.held
        };
        if event.len() > SSE_EVENT_BYTES_MAX || !openai_is_usage_chunk(event) {
            out.extend_from_slice(event);
        }
        // Events are small: a buffer grown by a large one is given back.
        if self.held.capacity() > HELD_CAPACITY_KEPT {
            self.held = Vec::new();
        } else {
            self.held.clear();
        }
    }
}

#[cfg(test)]
mod tests;
