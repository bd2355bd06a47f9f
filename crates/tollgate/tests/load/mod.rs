//! A mixed load on a running `tollgate serve` for the fault-injection tests: gateway calls
//! through the mock upstream (JSON and streams), API events, and API holds settled through the
//! API. It tallies every answer by class (2xx, 503, anything else, no answer in time) and keeps
//! what was acknowledged, so a test can check afterwards that every acknowledged write is in the
//! ledger, exactly.
//!
//! The API writers behave as docs/RELIABILITY.md asks a client to: on a 503 they send the same
//! request again (same ids, same timestamp) until it is answered, so a hold whose answer was
//! lost is never left open by the client. Gateway calls are not retried: each is a new call.

#![allow(clippy::expect_used, reason = "test code: helpers outside #[test] fns, which allow-expect-in-tests misses")]
#![allow(dead_code, reason = "each test binary uses a part of this module")]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

/// A gateway call: Sonnet 4.5, 100 tokens in and 20 out, $0.0006.
pub const CALL_NANOS: i64 = 600_000;
/// An API event: Sonnet 4.5, 100 in and 10 out, $0.00045.
pub const EVENT_NANOS: i64 = 450_000;
/// What an API hold is settled at.
pub const SETTLE_NANOS: i64 = 1_000_000;
/// Longest a request may take before it counts as a hang.
const ANSWER_WITHIN: Duration = Duration::from_secs(20);
/// How many times an API writer sends the same request on 503s before giving up on it.
const RESENDS_MAX: usize = 200;

/// Answers by class.
#[derive(Default, Debug, Clone)]
pub struct Tally {
    pub ok: usize,
    pub unavailable: usize,
    /// Anything else: "status body" or "no answer: error", the first few.
    pub other: Vec<String>,
    pub other_count: usize,
}

impl Tally {
    fn add(&mut self, answer: &Answer) {
        match answer {
            Answer::Status(s, _) if (200..300).contains(s) => self.ok += 1,
            Answer::Status(503, _) => self.unavailable += 1,
            other => {
                self.other_count += 1;
                if self.other.len() < 10 {
                    self.other.push(format!("{other:?}"));
                }
            }
        }
    }

    pub fn total(&self) -> usize {
        self.ok + self.unavailable + self.other_count
    }
}

#[derive(Debug)]
enum Answer {
    Status(u16, String),
    /// No answer, a cut body, or none within `ANSWER_WITHIN`.
    Failed(String),
}

/// What the load saw and what was acknowledged.
#[derive(Default, Debug)]
pub struct Seen {
    pub calls: Tally,
    pub events: Tally,
    pub holds: Tally,
    /// Gateway calls answered 200 with their whole body: their request ids.
    pub calls_acked: Vec<String>,
    /// Events answered 2xx: their ids.
    pub events_acked: Vec<String>,
    /// Holds whose settle was answered 2xx: their settle's event ids.
    pub settles_acked: Vec<String>,
    /// Holds taken (2xx) but never settled or voided because the load gave up on them.
    pub holds_abandoned: Vec<String>,
}

/// A running load; [`Load::stop`] ends it and returns what it saw.
pub struct Load {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn answer(request: reqwest::RequestBuilder) -> Answer {
    let sent = tokio::time::timeout(ANSWER_WITHIN, async {
        let r = request.send().await.map_err(|e| format!("{e}"))?;
        let status = r.status().as_u16();
        let body = r.text().await.map_err(|e| format!("status {status}, body cut: {e}"))?;
        Ok::<_, String>((status, body))
    })
    .await;
    match sent {
        Ok(Ok((status, body))) => Answer::Status(status, body),
        Ok(Err(e)) => Answer::Failed(e),
        Err(_) => Answer::Failed(format!("no answer within {ANSWER_WITHIN:?}")),
    }
}

/// The same request until it is answered with something other than 503 (or `RESENDS_MAX`
/// times); every answer is tallied. The last answer.
async fn until_answered(tally: &Mutex<Tally>, make: impl Fn() -> reqwest::RequestBuilder) -> Answer {
    let mut last = Answer::Failed("not sent".into());
    for _ in 0..RESENDS_MAX {
        last = answer(make()).await;
        tally.lock().unwrap().add(&last);
        match &last {
            Answer::Status(503, _) => tokio::time::sleep(Duration::from_millis(100)).await,
            _ => break,
        }
    }
    last
}

impl Load {
    /// Starts `callers` gateway callers (with the key `secret`), `eventers` event writers and
    /// `holders` hold takers on the server at `base`, acting as the admin `token` for the API.
    pub fn start(base: &str, token: &str, secret: &str, callers: usize, eventers: usize, holders: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
        let mut tasks = Vec::new();
        for w in 0..callers {
            let (stop, seen, http, base, secret) =
                (stop.clone(), seen.clone(), http.clone(), base.to_string(), secret.to_string());
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let stream = (w as u64 + n).is_multiple_of(2);
                    let request = http
                        .post(format!("{base}/v1/messages"))
                        .header("x-api-key", &secret)
                        .header("anthropic-version", "2023-06-01")
                        .header("x-mock-usage", "100,20")
                        .json(&json!({"model": "claude-sonnet-4-5", "max_tokens": 1000, "stream": stream,
                                      "messages": [{"role": "user", "content": "hi"}]}));
                    let sent = tokio::time::timeout(ANSWER_WITHIN, async {
                        let r = request.send().await.map_err(|e| format!("{e}"))?;
                        let status = r.status().as_u16();
                        let id =
                            r.headers().get("x-tollgate-request-id").and_then(|v| v.to_str().ok()).map(String::from);
                        let body = r.text().await.map_err(|e| format!("status {status}, body cut: {e}"))?;
                        Ok::<_, String>((status, id, body))
                    })
                    .await;
                    let answer = match sent {
                        Ok(Ok((status, id, body))) => {
                            if status == 200 {
                                seen.lock().unwrap().calls_acked.push(id.expect("a served call has a request id"));
                            }
                            Answer::Status(status, body)
                        }
                        Ok(Err(e)) => Answer::Failed(e),
                        Err(_) => Answer::Failed(format!("no answer within {ANSWER_WITHIN:?}")),
                    };
                    seen.lock().unwrap().calls.add(&answer);
                    if !matches!(answer, Answer::Status(200, _)) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }));
        }
        let timestamp = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        for w in 0..eventers {
            let (stop, seen, http, base, token, timestamp) =
                (stop.clone(), seen.clone(), http.clone(), base.to_string(), token.to_string(), timestamp.clone());
            tasks.push(tokio::spawn(async move {
                let tally = Mutex::new(Tally::default());
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let id = format!("evt-{w}-{n}");
                    let body = json!({"id": id, "account": "acme", "pool": "programmatic", "model": "claude-sonnet-4-5",
                        "usage": {"input_tokens": 100, "output_tokens": 10}, "timestamp": timestamp, "source": "fault-test"});
                    let last = until_answered(&tally, || {
                        http.post(format!("{base}/api/v1/events")).bearer_auth(&token).json(&body)
                    })
                    .await;
                    if matches!(last, Answer::Status(s, _) if (200..300).contains(&s)) {
                        seen.lock().unwrap().events_acked.push(id);
                    }
                }
                let t = tally.into_inner().unwrap();
                merge(&mut seen.lock().unwrap().events, t);
            }));
        }
        for w in 0..holders {
            let (stop, seen, http, base, token, timestamp) =
                (stop.clone(), seen.clone(), http.clone(), base.to_string(), token.to_string(), timestamp.clone());
            tasks.push(tokio::spawn(async move {
                let tally = Mutex::new(Tally::default());
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let id = format!("hold-{w}-{n}");
                    let hold = json!({"id": id, "pool": "programmatic", "amount_usd": "0.01", "ttl_s": 600});
                    let taken = until_answered(&tally, || {
                        http.post(format!("{base}/api/v1/accounts/acme/holds")).bearer_auth(&token).json(&hold)
                    })
                    .await;
                    if !matches!(taken, Answer::Status(s, _) if (200..300).contains(&s)) {
                        continue;
                    }
                    let event_id = format!("hevt-{w}-{n}");
                    let settle = json!({"event_id": event_id, "model": "claude-sonnet-4-5", "cost_usd": "0.001",
                                        "timestamp": timestamp});
                    let settled = until_answered(&tally, || {
                        http.post(format!("{base}/api/v1/accounts/acme/holds/{id}/settle"))
                            .bearer_auth(&token)
                            .json(&settle)
                    })
                    .await;
                    let mut seen = seen.lock().unwrap();
                    match settled {
                        Answer::Status(s, _) if (200..300).contains(&s) => seen.settles_acked.push(event_id),
                        _ => seen.holds_abandoned.push(id),
                    }
                }
                let t = tally.into_inner().unwrap();
                merge(&mut seen.lock().unwrap().holds, t);
            }));
        }
        Load { stop, seen, tasks }
    }

    /// What has been acknowledged so far (calls, events, settles).
    pub fn acked(&self) -> usize {
        let s = self.seen.lock().unwrap();
        s.calls_acked.len() + s.events_acked.len() + s.settles_acked.len()
    }

    /// Stops every worker once its current request is answered; what the load saw.
    pub async fn stop(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("a load worker panicked");
        }
        Arc::try_unwrap(self.seen).expect("the workers are done").into_inner().unwrap()
    }
}

fn merge(into: &mut Tally, from: Tally) {
    into.ok += from.ok;
    into.unavailable += from.unavailable;
    into.other_count += from.other_count;
    into.other.extend(from.other.into_iter().take(10usize.saturating_sub(into.other.len())));
}

/// Every event of account acme, by id, read through the API (paged).
pub async fn events_by_id(http: &reqwest::Client, base: &str, token: &str) -> BTreeMap<String, Value> {
    let mut all = BTreeMap::new();
    let mut after: Option<i64> = None;
    loop {
        let mut url = format!("{base}/api/v1/accounts/acme/events?limit=1000");
        if let Some(a) = after {
            url.push_str(&format!("&after={a}"));
        }
        let r = http.get(&url).bearer_auth(token).send().await.unwrap();
        assert_eq!(r.status(), 200, "GET events");
        let v: Value = r.json().await.unwrap();
        for e in v["events"].as_array().unwrap() {
            all.insert(e["id"].as_str().unwrap().to_string(), e.clone());
        }
        match v["next"].as_i64() {
            Some(n) => after = Some(n),
            None => return all,
        }
    }
}

/// "0.42" → 420,000,000.
fn usd_nanos(s: &str) -> i64 {
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    whole.parse::<i64>().unwrap() * 1_000_000_000 + format!("{frac:0<9}").parse::<i64>().unwrap()
}

/// What was acknowledged but is missing or wrong in the ledger, one line each (empty when all
/// is there): each served call charged exactly its usage (not partial, estimated or
/// unsettled), each event and each settle present at its cost.
pub fn acked_not_in_ledger(seen: &Seen, events: &BTreeMap<String, Value>) -> Vec<String> {
    let mut wrong = Vec::new();
    let mut check = |id: &String, cost: i64, what: &str| match events.get(id) {
        None => wrong.push(format!("{what} {id}: acknowledged, not in the ledger")),
        Some(e) => {
            let flags = ["partial", "estimated", "unsettled"].iter().filter(|f| e[**f] == true).count();
            if usd_nanos(e["cost_usd"].as_str().unwrap()) != cost || flags > 0 {
                wrong.push(format!("{what} {id}: acknowledged at {cost} nano-USD, in the ledger as {e}"));
            }
        }
    };
    for id in &seen.calls_acked {
        check(id, CALL_NANOS, "call");
    }
    for id in &seen.events_acked {
        check(id, EVENT_NANOS, "event");
    }
    for id in &seen.settles_acked {
        check(id, SETTLE_NANOS, "settle");
    }
    wrong
}

/// A one-line summary of a tally for the test's output and docs/RELIABILITY.md.
pub fn summary(what: &str, t: &Tally) -> String {
    format!("{what}: {} answered, {} 2xx, {} 503, {} other", t.total(), t.ok, t.unavailable, t.other_count)
}
