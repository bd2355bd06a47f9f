use super::*;

fn usage(input: u64, w5: u64, w1: u64, read: u64, output: u64, search: u64) -> Usage {
    Usage {
        input_tokens: input,
        cache_creation_5m_input_tokens: w5,
        cache_creation_1h_input_tokens: w1,
        cache_read_input_tokens: read,
        output_tokens: output,
        web_search_requests: search,
    }
}

#[test]
fn anthropic_request_bounds() {
    let body = br#"{"model":"claude-opus-5-5","max_tokens":128000,"stream":true,
        "tools":[{"type":"web_search_20250305","name":"web_search","max_uses":3},{"type":"web_search_20250305","name":"w2"},
                 {"name":"bash","input_schema":{}}],
        "messages":[{"role":"system","content":"x"},
                    {"role":"user","content":[{"type":"image","source":{"type":"url","url":"https://e/x.png"}},
                                              {"type":"image","source":{"type":"base64","data":"AAAA"}},
                                              {"type":"tool_result","content":[{"type":"document","source":{"type":"file","file_id":"f"}}]}]}],
        "service_tier":"batch","speed":"fast"}"#;
    let f = anthropic_request(body).unwrap();
    assert_eq!(f.model, "claude-opus-5-5");
    assert_eq!(f.max_tokens, Some(128_000));
    assert!(f.stream && f.batch && f.fast && !f.geo_us);
    assert_eq!((f.web_search_max_uses, f.web_search_without_max_uses), (3, 1));
    assert_eq!(f.unbounded_inputs, 2);
    assert!(f.unbounded_tools.is_empty());
}

#[test]
fn anthropic_server_tools_get_max_uses_and_unbounded_tools_are_named() {
    let body = br#"{"model":"m","max_tokens":10,"messages":[{"role":"user","content":[
            {"type":"container_upload","file_id":"f1"},{"type":"container_upload","file_id":"f2"}]}],
        "mcp_servers":[{"type":"url","url":"https://mcp.example/sse","name":"x"}],
        "tools":[{"type":"web_fetch_20250910","name":"web_fetch"},{"type":"web_fetch_20250910","name":"f2","max_uses":4},
                 {"type":"web_search_20250305","name":"web_search","max_uses":null},
                 {"type":"code_execution_20250825","name":"code_execution"}]}"#;
    let mut f = anthropic_request(body).unwrap();
    assert_eq!((f.web_fetch_max_uses, f.web_fetch_without_max_uses), (4, 1));
    assert_eq!((f.web_search_max_uses, f.web_search_without_max_uses), (0, 1));
    assert_eq!(f.tools_without_max_uses(), 2);
    assert_eq!(f.unbounded_tools, ["mcp_servers", "code_execution_20250825", "container_upload"]);
    f.inject_max_uses(5);
    assert_eq!((f.web_fetch_max_uses, f.web_search_max_uses, f.tools_without_max_uses()), (9, 5, 0));

    let rewritten = anthropic_inject_max_uses(body, 5).unwrap();
    let v: Value = serde_json::from_slice(&rewritten).unwrap();
    let uses: Vec<Value> = v["tools"].as_array().unwrap().iter().map(|t| t["max_uses"].clone()).collect();
    assert_eq!(uses, [Value::from(5), Value::from(4), Value::from(5), Value::Null]);
    // The rewritten body reads as bounded.
    let again = anthropic_request(&rewritten).unwrap();
    assert_eq!((again.web_fetch_max_uses, again.web_search_max_uses, again.tools_without_max_uses()), (9, 5, 0));

    let bad = br#"{"model":"m","tools":[{"type":"web_search_20250305","name":"w","max_uses":"lots"}]}"#;
    assert!(anthropic_request(bad).unwrap_err().0.contains("tools[0].max_uses"));
    let search = br#"{"model":"gpt-5-search","messages":[],"web_search_options":{}}"#;
    assert_eq!(openai_request(search).unwrap().unbounded_tools, ["web_search_options"]);
}

#[test]
fn anthropic_request_errors_say_what_to_fix() {
    assert!(anthropic_request(b"{not json").unwrap_err().0.contains("not valid JSON"));
    assert!(anthropic_request(br#"{"max_tokens":5}"#).unwrap_err().0.contains("model"));
    assert!(anthropic_request(br#"{"model":"m","max_tokens":-5}"#).unwrap_err().0.contains("max_tokens"));
}

#[test]
fn anthropic_json_usage_with_cache_split() {
    let body = br#"{"id":"msg_1","usage":{"input_tokens":2095,"cache_creation_input_tokens":2051,
        "cache_read_input_tokens":2051,"cache_creation":{"ephemeral_5m_input_tokens":51,"ephemeral_1h_input_tokens":2000},
        "output_tokens":503,"server_tool_use":{"web_search_requests":2}}}"#;
    assert_eq!(anthropic_response_usage(body), Some(usage(2095, 51, 2000, 2051, 503, 2)));
    // Without the split, cache writes are 5-minute writes.
    let body = br#"{"usage":{"input_tokens":4,"cache_creation_input_tokens":25277,"cache_read_input_tokens":0,"output_tokens":6}}"#;
    assert_eq!(anthropic_response_usage(body), Some(usage(4, 25277, 0, 0, 6, 0)));
    assert_eq!(anthropic_response_usage(br#"{"type":"error"}"#), None);
}

#[test]
fn anthropic_stream_overwrites_with_cumulative_deltas() {
    let stream = concat!(
        "event: message_start\n",
        "data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":2679,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"output_tokens\":3}}}\n\n",
        "event: ping\ndata: {\"type\": \"ping\"}\n\n",
        "event: content_block_delta\r\n",
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\r\n\r\n",
        "event: message_delta\n",
        "data: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"output_tokens\":200}}\n\n",
        "event: message_delta\n",
        "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"input_tokens\":10682,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"output_tokens\":510,\"server_tool_use\":{\"web_search_requests\":1}}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );
    // Fed one byte at a time, the result must be the same as fed whole.
    for step in [1, 7, stream.len()] {
        let mut s = AnthropicStream::default();
        for chunk in stream.as_bytes().chunks(step) {
            s.feed(chunk);
        }
        assert_eq!(s.usage, usage(10682, 0, 0, 0, 510, 1), "chunks of {step}");
        assert!(s.started && s.stopped && s.error.is_none());
        assert_eq!(s.text_bytes, 5);
    }
}

#[test]
fn anthropic_stream_error_and_cut() {
    let mut s = AnthropicStream::default();
    s.feed(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n");
    s.feed(b"event: error\ndata: {\"type\": \"error\", \"error\": {\"type\": \"overloaded_error\", \"message\": \"Overloaded\"}}\n\n");
    assert_eq!(s.usage, usage(25, 0, 0, 0, 1, 0));
    assert_eq!(s.error.as_deref(), Some("overloaded_error"));
    assert!(!s.stopped);
}

#[test]
fn openai_request_and_rewrite() {
    let body = br#"{"model":"gpt-5","max_completion_tokens":1000,"stream":true,"messages":[]}"#;
    let f = openai_request(body).unwrap();
    assert_eq!((f.model.as_str(), f.max_tokens, f.stream, f.include_usage), ("gpt-5", Some(1000), true, false));
    let rewritten = openai_rewrite(body, true, Some(500)).unwrap();
    let v: Value = serde_json::from_slice(&rewritten).unwrap();
    assert_eq!(v["stream_options"]["include_usage"], Value::Bool(true));
    assert_eq!(v["max_completion_tokens"], Value::from(500));
    // A request using the older max_tokens keeps that field.
    let old = openai_rewrite(br#"{"model":"gpt-4.1-mini","max_tokens":9}"#, false, Some(4)).unwrap();
    let v: Value = serde_json::from_slice(&old).unwrap();
    assert_eq!((v["max_tokens"].as_u64(), v.get("max_completion_tokens")), (Some(4), None));
}

#[test]
fn openai_usage_counts_cached_tokens_once() {
    let body =
        br#"{"usage":{"prompt_tokens":1000,"completion_tokens":50,"prompt_tokens_details":{"cached_tokens":600}}}"#;
    assert_eq!(openai_response_usage(body), Some(usage(400, 0, 0, 600, 50, 0)));
    let mut s = OpenAiStream::default();
    s.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi there\"}}]}\n\n");
    let usage_chunk = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":2}}\n\n";
    assert!(openai_is_usage_chunk(usage_chunk));
    assert!(!openai_is_usage_chunk(b"data: {\"choices\":[{\"delta\":{}}],\"usage\":null}\n\n"));
    s.feed(usage_chunk);
    s.feed(b"data: [DONE]\n\n");
    assert_eq!(s.usage, Some(usage(10, 0, 0, 0, 2, 0)));
    assert!(s.done);
    assert_eq!(s.text_bytes, 8);
}

#[test]
fn clamp_lowers_max_tokens_and_thinking_budget() {
    let body = br#"{"model":"m","max_tokens":128000,"thinking":{"type":"enabled","budget_tokens":31999}}"#;
    let v: Value = serde_json::from_slice(&anthropic_clamp(body, 4000).unwrap()).unwrap();
    assert_eq!(v["max_tokens"], Value::from(4000));
    assert_eq!(v["thinking"]["budget_tokens"], Value::from(3999));
}
