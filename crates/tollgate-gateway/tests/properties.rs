//! Property tests of the wire readers (issue 13, fuzzing): whatever the bytes, the request and
//! usage readers answer without panicking; however a stream is cut into chunks, its usage reads
//! the same; a count is never read as less than a sane value reported. `PROPTEST_CASES` raises
//! the number of cases (CI runs the default of this file, 10,000 per property).

use proptest::prelude::*;
use tollgate_gateway::wire::{self, AnthropicStream, OpenAiStream};

const CASES: u32 = 10_000;

/// An Anthropic SSE transcript with the given counts.
fn anthropic_transcript(input: u64, cache_read: u64, outputs: &[u64], text: &str) -> Vec<u8> {
    let mut s = format!(
        "event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{{\"id\":\"m\",\"usage\":{{\"input_tokens\":{input},\"cache_read_input_tokens\":{cache_read},\"output_tokens\":1}}}}}}\n\n"
    );
    s.push_str("event: ping\ndata: {\"type\":\"ping\"}\n\n");
    let delta = serde_json::json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":text}});
    s.push_str(&format!("event: content_block_delta\ndata: {delta}\n\n"));
    for o in outputs {
        s.push_str(&format!(
            "event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{}},\"usage\":{{\"output_tokens\":{o}}}}}\n\n"
        ));
    }
    s.push_str("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
    s.into_bytes()
}

/// `bytes` cut at the given points (taken modulo its length).
fn chunks(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.sort_unstable();
    points.dedup();
    let mut out = Vec::new();
    let mut from = 0;
    for p in points.into_iter().chain([bytes.len()]) {
        out.push(bytes[from..p].to_vec());
        from = p;
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn request_and_response_readers_take_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = wire::anthropic_request(&bytes);
        let _ = wire::openai_request(&bytes);
        let _ = wire::anthropic_response_usage(&bytes);
        let _ = wire::openai_response_usage(&bytes);
        let _ = wire::openai_is_usage_chunk(&bytes);
        let mut a = AnthropicStream::default();
        a.feed(&bytes);
        let mut o = OpenAiStream::default();
        o.feed(&bytes);
    }

    #[test]
    fn json_shaped_requests_never_panic(model in "\\PC{0,40}", max_tokens in any::<i64>(), stream in any::<bool>()) {
        let body = serde_json::json!({"model": model, "max_tokens": max_tokens, "stream": stream,
                                      "messages": [{"role": "user", "content": "hi"}]});
        let bytes = serde_json::to_vec(&body).unwrap();
        let _ = wire::anthropic_request(&bytes);
        let _ = wire::openai_request(&bytes);
    }

    #[test]
    fn a_stream_reads_the_same_however_it_is_cut(
        input in 0u64..10_000_000,
        cache_read in 0u64..10_000_000,
        outputs in proptest::collection::vec(0u64..1_000_000, 1..5),
        text in "\\PC{0,64}",
        cuts in proptest::collection::vec(any::<usize>(), 0..40),
    ) {
        let transcript = anthropic_transcript(input, cache_read, &outputs, &text);
        let mut whole = AnthropicStream::default();
        whole.feed(&transcript);
        let mut cut = AnthropicStream::default();
        for c in chunks(&transcript, &cuts) {
            cut.feed(&c);
        }
        prop_assert_eq!(whole.reported.usage, cut.reported.usage);
        prop_assert_eq!((whole.started, whole.stopped, whole.text_bytes), (cut.started, cut.stopped, cut.text_bytes));
        prop_assert_eq!(cut.reported.usage.input_tokens, input);
        prop_assert_eq!(cut.reported.usage.cache_read_input_tokens, cache_read);
        // Cumulative counts that go down are read at their largest.
        prop_assert_eq!(cut.reported.usage.output_tokens, outputs.iter().copied().max().unwrap().max(1));
        prop_assert_eq!(cut.text_bytes, text.len() as u64);
    }
}
