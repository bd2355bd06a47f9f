//! A seeded simulation of money through the gateway, end to end: the real `tollgate serve`, the
//! testkit's mock upstream, a workload of gateway calls drawn from one seed, with an adversarial
//! key and `kill -9`s at random points between calls. After every step it checks, from the
//! outside (the balance and events over HTTP), with its own arithmetic (Sonnet 4.5 at $3 / $15
//! per million tokens, no tollgate code):
//!
//! - charged through the gateway = the cost of what the upstream reported, to the nano-USD, for
//!   every call the client read to the end; for a call whose client went away after the
//!   response began, at least the input the upstream reported and at most the call's output
//!   bound more (never zero, never less); the only other charges are `unsettled` ones after a
//!   crash;
//! - held ≤ 2 × `lease_usd` + the worst cases of the calls in flight (none between steps);
//! - after a `kill -9` and a restart, what is charged for work not in flight is ≤ 2 × `lease_usd`
//!   (one key, one pool), and nothing stays held;
//! - the key that made a call can never end its hold (409 `hold_owned_by_gateway`);
//! - `tollgate check` finds the database clean at the end.
//!
//! Seeds: `TOLLGATE_SIM_SEED` (decimal or 0x-hex) runs one; otherwise three fixed ones. A failure
//! names its seed.

mod serve;

use std::time::Duration;

use serde_json::{Value, json};
use serve::{Client, Server, usd_nanos};
use tollgate_conformance::simulation::{Rng, seed_from_env};
use tollgate_testkit::MockUpstream;

const TOKEN: &str = "tga_money-simulation-admin-token";
const LEASE_NANOS: i64 = 1_000_000_000;
const STEPS: usize = 60;

/// Sonnet 4.5: $3 / MTok in, $15 / MTok out, in nano-USD.
fn sonnet_cost(input: i64, output: i64) -> i64 {
    input * 3_000 + output * 15_000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn money_through_the_gateway_survives_adversaries_and_crashes() {
    let seeds = match seed_from_env() {
        Some(seed) => vec![seed],
        None => vec![1, 2, 0x5eed],
    };
    for seed in seeds {
        run(seed).await;
    }
}

async fn run(seed: u64) {
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let mock = MockUpstream::start().await;
    let mut server = Server::with_mock(dir.path(), TOKEN, &mock).await;
    let mut c = Client::new(&server, TOKEN);
    c.admin(reqwest::Method::POST, "/api/v1/accounts", Some(json!({"id": "acme", "tier": "max-20x"}))).await;
    let (_, secret) = c.key("bot", None).await;
    // What the upstream reported, priced by hand; and what crashes charged as unsettled.
    // What the upstream reported, priced by hand: exactly for calls read to the end, as a range
    // for calls whose client left; and what crashes charged as unsettled.
    let (mut reported, mut reported_max, mut unsettled) = (0i64, 0i64, 0i64);
    let (mut calls, mut crashes, mut intrusions, mut dropped) = (0, 0, 0, 0);
    for step in 0..STEPS {
        let at = format!("seed {seed}, step {step}");
        match rng.below(100) {
            0..=7 => {
                // kill -9 between calls: only leases are open once every call has its event (a
                // call whose client left may still be reading the upstream's answer).
                until_recorded(&c, calls).await;
                let (charged_before, _) = c.programmatic().await;
                server.kill();
                server = Server::with_mock(dir.path(), TOKEN, &mock).await;
                c = Client::new(&server, TOKEN);
                let (charged_after, held) = c.programmatic().await;
                let charged_now = charged_after - charged_before;
                assert_eq!(held, 0, "{at}: nothing stays held after a restart");
                assert!(charged_now <= 2 * LEASE_NANOS, "{at}: a crash charged {charged_now} nano-USD unsettled");
                unsettled += charged_now;
                crashes += 1;
            }
            _ => {
                // A burst of 1 to 4 concurrent calls, JSON or streamed, small or large.
                let burst = rng.range(1, 4) as usize;
                let mut pending = Vec::new();
                for _ in 0..burst {
                    let (input, output) = (rng.range(1, 4_000), rng.range(1, 900));
                    let stream = rng.chance(50);
                    let intrude = stream && rng.chance(30);
                    // The client goes away once the response began (after the first bytes of a
                    // stream, or without reading a JSON body).
                    let drop_early = !intrude && rng.chance(15);
                    // A call the key will attack is too big for a lease: it is held on its own,
                    // under its request id, which the key knows.
                    let max_tokens = if intrude { 100_000 } else { 1_000 };
                    let body = json!({"model": "claude-sonnet-4-5", "max_tokens": max_tokens, "stream": stream,
                                      "messages": [{"role": "user", "content": "x".repeat(rng.range(10, 20_000) as usize)}]});
                    let request = c
                        .message(&secret, body)
                        .header("x-mock-usage", format!("{input},{output}"))
                        .header("x-mock-delay-ms", if intrude { "50" } else { "0" });
                    let cost = if drop_early {
                        (sonnet_cost(input, 0), sonnet_cost(input, max_tokens))
                    } else {
                        (sonnet_cost(input, output), sonnet_cost(input, output))
                    };
                    pending.push((request, cost, intrude, drop_early));
                }
                let outcomes =
                    futures_util::future::join_all(pending.into_iter().map(|(request, cost, intrude, drop_early)| {
                        let c = &c;
                        let secret = &secret;
                        async move {
                            let r = request.send().await.unwrap();
                            assert_eq!(r.status(), 200);
                            let mut refused = 0;
                            if intrude {
                                let id = r.headers()["x-tollgate-request-id"].to_str().unwrap().to_string();
                                let path = format!("/api/v1/accounts/acme/holds/{id}/void");
                                let (status, v) = c.api(secret, reqwest::Method::POST, &path, None).await;
                                assert_eq!((status, v["error"]["code"].as_str()), (409, Some("hold_owned_by_gateway")));
                                refused += 1;
                            }
                            if drop_early {
                                let mut r = r;
                                let _ = r.chunk().await;
                                drop(r);
                            } else {
                                r.bytes().await.unwrap();
                            }
                            (cost, refused, drop_early)
                        }
                    }))
                    .await;
                for ((low, high), refused, drop_early) in outcomes {
                    reported += low;
                    reported_max += high;
                    intrusions += refused;
                    dropped += usize::from(drop_early);
                    calls += 1;
                }
            }
        }
        // Between steps nothing is in flight once the last settles land.
        let (charged, held) = until_settled(&c, reported + unsettled).await;
        let by_calls = charged - unsettled;
        assert!(
            (reported..=reported_max).contains(&by_calls),
            "{at}: the calls were charged {by_calls}, not what the upstream reported ({reported}..={reported_max})"
        );
        assert!(held <= 2 * LEASE_NANOS, "{at}: held {held} nano-USD, more than two leases");
    }
    // Every charge is an event: those of the calls are exactly what was reported.
    let events = c.events(TOKEN).await;
    let charged_of =
        |e: &Value| usd_nanos(e["grant_usd"].as_str().unwrap()) + usd_nanos(e["overage_usd"].as_str().unwrap());
    let by_calls: i64 = events.iter().filter(|e| e["unsettled"] == false).map(charged_of).sum();
    assert!(
        (reported..=reported_max).contains(&by_calls),
        "seed {seed}: the calls' events charge what the upstream reported"
    );
    assert_eq!(events.iter().filter(|e| e["unsettled"] == false).count(), calls, "seed {seed}: one event per call");
    drop(server);
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["check", "--db", dir.path().join("tollgate.db").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(check.status.success(), "seed {seed}: tollgate check: {}", String::from_utf8_lossy(&check.stdout));
    eprintln!(
        "seed {seed}: {calls} calls ({dropped} dropped by their client), {crashes} kill -9s, {intrusions} intrusions refused, {unsettled} nano-USD unsettled"
    );
}

/// (charged, held) once charged reaches `expected` and held is within two leases, or after 10 s.
async fn until_settled(c: &Client, expected: i64) -> (i64, i64) {
    for _ in 0..200 {
        let (charged, held) = c.programmatic().await;
        if charged >= expected && held <= 2 * LEASE_NANOS {
            return (charged, held);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.programmatic().await
}

/// Waits (at most 20 s) until the calls' events, those not `unsettled`, number `calls`.
async fn until_recorded(c: &Client, calls: usize) {
    for _ in 0..400 {
        if c.events(TOKEN).await.iter().filter(|e| e["unsettled"] == false).count() >= calls {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
