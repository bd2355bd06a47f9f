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
    let r = anthropic_response_usage(body).reported;
    assert_eq!(r.usage, usage(2095, 51, 2000, 2051, 503, 2));
    assert!(r.input_known() && r.output_known() && !r.any_unreadable());
    // Without the split, cache writes are 5-minute writes.
    let body = br#"{"usage":{"input_tokens":4,"cache_creation_input_tokens":25277,"cache_read_input_tokens":0,"output_tokens":6}}"#;
    assert_eq!(anthropic_response_usage(body).reported.usage, usage(4, 25277, 0, 0, 6, 0));
    // No usage: nothing known (the meter estimates it).
    let r = anthropic_response_usage(br#"{"type":"error"}"#).reported;
    assert!(!r.input_known() && !r.output_known());
    assert_eq!(anthropic_response_usage(br#"{"usage":{"input_tokens":4,"#), JsonReport::default(), "a part of a body");
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
        assert_eq!(s.reported.usage, usage(10682, 0, 0, 0, 510, 1), "chunks of {step}");
        assert!(s.started && s.stopped && s.error.is_none());
        assert_eq!(s.text_bytes, 5);
    }
}

#[test]
fn anthropic_stream_error_and_cut() {
    let mut s = AnthropicStream::default();
    s.feed(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n");
    s.feed(b"event: error\ndata: {\"type\": \"error\", \"error\": {\"type\": \"overloaded_error\", \"message\": \"Overloaded\"}}\n\n");
    assert_eq!(s.reported.usage, usage(25, 0, 0, 0, 1, 0));
    assert_eq!(s.error.as_deref(), Some("overloaded_error"));
    assert!(!s.stopped);
}

/// An Anthropic stream whose events are these `data:` payloads.
fn anthropic_stream(events: &[&str]) -> AnthropicStream {
    let mut s = AnthropicStream::default();
    for e in events {
        s.feed(format!("event: x\ndata: {e}\n\n").as_bytes());
    }
    s
}

#[test]
fn cumulative_usage_that_goes_down_is_read_as_its_largest_value() {
    let s = anthropic_stream(&[
        r#"{"type":"message_start","message":{"usage":{"input_tokens":5000,"cache_read_input_tokens":700,"output_tokens":1}}}"#,
        r#"{"type":"message_delta","usage":{"output_tokens":500}}"#,
        r#"{"type":"message_delta","usage":{"input_tokens":50,"cache_read_input_tokens":0,"output_tokens":20}}"#,
    ]);
    assert_eq!(s.reported.usage, usage(5000, 0, 0, 700, 500, 0), "each field its largest count");
    assert!(s.reported.input_known() && s.reported.output_known() && !s.reported.any_unreadable());
}

#[test]
fn counts_that_cannot_be_read_are_unknown_never_smaller() {
    // Text, negative, fractional, 2^64 (one past u64::MAX: must not wrap to 0), far beyond it,
    // above the per-call bound of 100,000,000 tokens, and a usage that is not an object.
    for raw in ["\"lots\"", "-5", "12.5", "1e3", "18446744073709551616", "1e400", "100000001", "true", "[1]"] {
        let start = format!(
            r#"{{"type":"message_start","message":{{"usage":{{"input_tokens":{raw},"output_tokens":{raw}}}}}}}"#
        );
        let s = anthropic_stream(&[&start]);
        assert!(s.started, "{raw}");
        assert!(!s.reported.input_known() && !s.reported.output_known() && s.reported.any_unreadable(), "{raw}");
        assert_eq!(s.reported.usage, Usage::default(), "{raw}: nothing read as a number");
        let json = format!(r#"{{"usage":{{"input_tokens":{raw},"output_tokens":3}}}}"#);
        let r = anthropic_response_usage(json.as_bytes()).reported;
        assert!(!r.input_known() && r.output_known() && r.usage.output_tokens == 3, "{raw}");
        let openai = format!(r#"{{"usage":{{"prompt_tokens":{raw},"completion_tokens":3}}}}"#);
        let r = openai_response_usage(openai.as_bytes()).reported;
        assert!(!r.input_known() && r.output_known(), "{raw}");
    }
    let s = anthropic_stream(&[r#"{"type":"message_start","message":{"usage":"lots"}}"#]);
    assert!(s.started && !s.reported.input_known() && s.reported.any_unreadable());
    // The per-call bound itself is a count.
    let s = anthropic_stream(&[r#"{"type":"message_start","message":{"usage":{"input_tokens":100000000}}}"#]);
    assert!(s.reported.input_known() && s.reported.usage.input_tokens == 100_000_000);
}

#[test]
fn an_unreadable_count_does_not_hide_a_sane_one() {
    // message_start's input is known; a delta's unreadable input leaves it, flagged.
    let s = anthropic_stream(&[
        r#"{"type":"message_start","message":{"usage":{"input_tokens":50000,"output_tokens":1}}}"#,
        r#"{"type":"message_delta","usage":{"input_tokens":-1,"output_tokens":30}}"#,
    ]);
    assert_eq!(s.reported.usage, usage(50000, 0, 0, 0, 30, 0));
    assert!(s.reported.input_known() && s.reported.any_unreadable());
    // An unreadable cache count makes the input side unknown: it may be the largest part.
    let s = anthropic_stream(&[
        r#"{"type":"message_start","message":{"usage":{"input_tokens":10,"cache_read_input_tokens":"x","output_tokens":1}}}"#,
    ]);
    assert!(!s.reported.input_known());
    // An unreadable web-search count is unknown too.
    let s = anthropic_stream(&[
        r#"{"type":"message_start","message":{"usage":{"input_tokens":10,"output_tokens":1,"server_tool_use":{"web_search_requests":-2}}}}"#,
    ]);
    assert!(s.reported.input_known() && s.reported.web_search_unknown());
}

#[test]
fn json_answers_report_their_text_for_an_output_estimate() {
    let body = br#"{"content":[{"type":"thinking","thinking":"abc"},{"type":"text","text":"Hello"},
        {"type":"tool_use","id":"t","name":"f","input":{"a":1}}],"usage":{"input_tokens":"x"}}"#;
    // "abc" + "Hello" + {"a":1}
    assert_eq!(anthropic_response_usage(body).text_bytes, 3 + 5 + 7);
    let body = br#"{"choices":[{"message":{"role":"assistant","content":"Hi there"}}]}"#;
    assert_eq!(openai_response_usage(body).text_bytes, 8);
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

/// Found by the fuzz target `request_bound`: a streaming request with `"stream_options": null`
/// was forwarded without asking for usage (the rewrite set nothing in a null), so its stream
/// reported none and the call was billed at an estimate. A `stream_options` that is not an
/// object is the caller's to fix.
#[test]
fn a_null_stream_options_still_asks_for_usage() {
    let body = br#"{"model":"gpt-5","stream":true,"stream_options":null,"messages":[]}"#;
    assert!(!openai_request(body).unwrap().include_usage);
    let rewritten = openai_rewrite(body, true, None).unwrap();
    assert!(openai_request(&rewritten).unwrap().include_usage);
    let bad = br#"{"model":"gpt-5","stream":true,"stream_options":"yes","messages":[]}"#;
    assert!(openai_request(bad).unwrap_err().0.contains("stream_options"));
}

#[test]
fn openai_usage_counts_cached_tokens_once() {
    let body =
        br#"{"usage":{"prompt_tokens":1000,"completion_tokens":50,"prompt_tokens_details":{"cached_tokens":600}}}"#;
    assert_eq!(openai_response_usage(body).reported.usage, usage(400, 0, 0, 600, 50, 0));
    let mut s = OpenAiStream::default();
    s.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi there\"}}]}\n\n");
    let usage_chunk = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":2}}\n\n";
    assert!(openai_is_usage_chunk(usage_chunk));
    assert!(!openai_is_usage_chunk(b"data: {\"choices\":[{\"delta\":{}}],\"usage\":null}\n\n"));
    s.feed(usage_chunk);
    s.feed(b"data: [DONE]\n\n");
    assert_eq!(s.reported.usage, usage(10, 0, 0, 0, 2, 0));
    assert!(s.reported.input_known() && s.reported.output_known());
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

/// A line longer than the bound is skipped whole: the rest of it, in a later chunk, is not read
/// as a line of its own (it used to be, from wherever the bound cut it).
#[test]
fn the_rest_of_a_line_over_the_bound_is_not_read_as_a_line() {
    let mut s = AnthropicStream::default();
    s.feed(b"data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n");
    s.feed(&vec![b'x'; LINE_BYTES_MAX + 1]);
    s.feed(b"data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":999}}\n\n");
    assert_eq!(s.reported.usage, usage(25, 0, 0, 0, 1, 0), "the long line's rest was skipped");
    s.feed(b"data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":7}}\n\n");
    assert_eq!(s.reported.usage, usage(25, 0, 0, 0, 7, 0), "the next line is read");
}

/// Events that end in `\n\n`, `\r\n\r\n` or a mix, and one longer than the bound that looks like
/// the usage chunk: only the real usage chunk is removed, in chunks of any size.
#[test]
fn the_usage_chunk_strip_removes_only_the_usage_chunk() {
    let usage = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":2}}";
    let padded = format!(
        "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":10,\"completion_tokens\":2}},\"pad\":\"{}\"}}\n\n",
        "p".repeat(SSE_EVENT_BYTES_MAX)
    );
    let events = [
        "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\r\n\r\n".to_string(),
        "event: x\ndata: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\r\n".to_string(),
        padded.clone(),
        format!("{usage}\r\n\n"),
        "data: [DONE]\n\n".to_string(),
    ];
    let upstream = events.concat();
    let client = events.iter().filter(|e| !e.starts_with(usage) || **e == padded).cloned().collect::<String>();
    for size in [1, 2, 3, 5, 1024, 65_536, upstream.len()] {
        let (mut strip, mut out) = (UsageChunkStrip::default(), Vec::new());
        for chunk in upstream.as_bytes().chunks(size) {
            strip.feed(chunk, &mut out);
            assert!(strip.held_bytes() <= SSE_EVENT_BYTES_MAX, "chunks of {size}");
        }
        strip.finish(&mut out);
        assert!(out == client.as_bytes(), "chunks of {size}: {} bytes out, {} expected", out.len(), client.len());
    }
}

/// A stream that ends without the blank line of its last event still gives the client every byte.
#[test]
fn the_usage_chunk_strip_gives_back_an_unfinished_last_event() {
    let (mut strip, mut out) = (UsageChunkStrip::default(), Vec::new());
    strip.feed(b"data: {\"choices\":[]}\n\ndata: [DONE]\n", &mut out);
    assert_eq!(out, b"data: {\"choices\":[]}\n\n");
    strip.finish(&mut out);
    assert_eq!(out, b"data: {\"choices\":[]}\n\ndata: [DONE]\n");
}
