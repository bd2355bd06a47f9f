//! Stripping the OpenAI usage chunk from a stream with one large SSE event (issue 13, finding 4):
//! the work the gateway's meter does per chunk when a streaming client did not ask for usage
//! (`OpenAiStream::feed` reads usage on the side, `UsageChunkStrip::feed` decides what the client
//! gets). The stream is a role chunk, one text chunk whose SSE event is `--bytes` long (default
//! 8 MiB), the stop chunk, the usage chunk and `[DONE]`, fed in `--chunk-bytes` pieces (default
//! 1 KiB); every run checks that the client's bytes are the stream's without the usage chunk.
//! One thread, no I/O.

use std::time::Instant;

use tollgate_gateway::wire::{OpenAiStream, SSE_EVENT_BYTES_MAX, UsageChunkStrip};

pub fn run(args: &[String]) -> Result<(), String> {
    let bytes = crate::flag(args, "--bytes", 8 << 20)? as usize;
    let chunk_bytes = crate::flag(args, "--chunk-bytes", 1024)?.max(1) as usize;
    let runs = crate::flag(args, "--runs", 3)?;
    let (upstream, client) = stream(bytes);
    for run in 1..=runs {
        let (mut usage, mut strip) = (OpenAiStream::default(), UsageChunkStrip::default());
        let mut out = Vec::with_capacity(client.len());
        let mut held_max = 0;
        let start = Instant::now();
        for chunk in upstream.chunks(chunk_bytes) {
            usage.feed(chunk);
            strip.feed(chunk, &mut out);
            held_max = held_max.max(strip.held_bytes());
        }
        strip.finish(&mut out);
        let secs = start.elapsed().as_secs_f64();
        if out != client {
            return Err(format!("run {run}: the client's bytes differ from the stream's without the usage chunk"));
        }
        if usage.reported.usage.output_tokens != 20 {
            return Err(format!("run {run}: the usage chunk was not read"));
        }
        println!(
            "strip, run {run}: a {bytes}-byte SSE event in {chunk_bytes}-byte chunks ({} chunks) in {:.1} ms: \
             {:.0} MiB/s; at most {held_max} bytes held back (bound {SSE_EVENT_BYTES_MAX})",
            upstream.len().div_ceil(chunk_bytes),
            secs * 1e3,
            upstream.len() as f64 / secs / (1 << 20) as f64,
        );
    }
    Ok(())
}

/// The upstream's stream, and what the client must get of it (the same without the usage chunk).
fn stream(text_event_bytes: usize) -> (Vec<u8>, Vec<u8>) {
    let chunk = |delta: &str| {
        format!(
            r#"data: {{"id":"c","object":"chat.completion.chunk","choices":[{{"index":0,"delta":{delta}}}],"usage":null}}"#
        )
    };
    let bare = chunk(r#"{"content":""}"#).len() + 2;
    let text = "a".repeat(text_event_bytes.saturating_sub(bare));
    let usage = r#"data: {"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":100,"completion_tokens":20}}"#;
    let events = [
        format!("{}\n\n", chunk(r#"{"role":"assistant","content":""}"#)),
        format!("{}\n\n", chunk(&format!(r#"{{"content":"{text}"}}"#))),
        format!("{}\n\n", chunk("{}")),
        format!("{usage}\n\n"),
        "data: [DONE]\n\n".to_string(),
    ];
    let client = [&events[0], &events[1], &events[2], &events[4]].map(String::as_str).concat();
    (events.concat().into_bytes(), client.into_bytes())
}
