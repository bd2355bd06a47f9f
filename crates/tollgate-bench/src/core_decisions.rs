//! Core decisions of one call, no I/O: price the worst case, decide the hold, price the usage,
//! split the charge between grant and overage, settle. One thread.

use std::hint::black_box;
use std::time::Instant;

use chrono::NaiveDate;
use tollgate_core::ledger;
use tollgate_core::price::Allowances;
use tollgate_core::{Modifiers, Nanos, PoolScope, PriceTable, RequestBound, Usage};

pub fn run(args: &[String]) -> Result<(), String> {
    let calls = crate::flag(args, "--calls", 20_000_000)?;
    let prices = PriceTable::builtin();
    #[allow(clippy::expect_used, reason = "2026-11-10 is a real calendar date")]
    let day = NaiveDate::from_ymd_opt(2026, 11, 10).expect("a real date");
    let entry = prices.price_at("claude-sonnet-4-5", day).map_err(|e| e.to_string())?.clone();
    let allow = Allowances::default();
    let mut pool =
        PoolScope { limit: Some(Nanos::from_usd(1_000_000_000)), grants: Nanos::from_usd(50), ..PoolScope::default() };
    let start = Instant::now();
    let mut charged = Nanos::ZERO;
    for i in 0..calls {
        // Vary the call a little so nothing is hoisted out of the loop.
        let bound = RequestBound { body_bytes: 2_000 + (i & 1023), max_tokens: 4_096, ..RequestBound::default() };
        let worst = entry.worst_case(black_box(&bound), &allow).map_err(|e| e.to_string())?;
        let amount = ledger::hold_amount(worst, 1_000_000).ok_or("hold overflow")?;
        let decision = ledger::decide_hold(&pool, None, amount).map_err(|r| r.code().to_string())?;
        pool.held = decision.pool_held;
        let usage = Usage { input_tokens: 1_200 + (i & 511), output_tokens: 300, ..Usage::default() };
        let cost = entry.cost(black_box(&usage), &Modifiers::default()).map_err(|e| e.to_string())?;
        let s = ledger::settle(amount, cost, &pool, 1_000_000).map_err(|r| r.code().to_string())?;
        pool.held = pool.held.saturating_sub_floor(s.released);
        pool.used = pool.used.saturating_add(s.split.grant);
        pool.overage = pool.overage.saturating_add(s.split.overage);
        charged = charged.saturating_add(s.split.total());
    }
    let secs = start.elapsed().as_secs_f64();
    black_box(charged);
    println!(
        "core: {calls} calls (worst case + hold + cost + split + settle) in {secs:.3} s on one thread: \
         {:.2} million calls/s; charged {charged}",
        calls as f64 / secs / 1e6
    );
    Ok(())
}
