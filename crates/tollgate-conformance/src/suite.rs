//! The conformance suite: behaviour every [`Store`](tollgate_store::Store) backend must show. A backend's
//! tests invoke [`conformance_suite!`](crate::conformance_suite) with a factory of fresh, empty
//! stores; each case becomes its own test.
//!
//! Every case drives the store with an explicit clock (the suite's "now" is
//! 2026-11-10T12:00:00Z) and never reads the system clock. The standard account is on the
//! `team-standard` tier ($100 interactive, $50 programmatic) with its billing anchor on
//! 2026-11-01T00:00:00Z in UTC, so "now" is in the cycle [2026-11-01, 2026-12-01).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;
use tokio::sync::Barrier;
use tollgate_core::tier::PPM;
use tollgate_core::{Nanos, OnExhausted, PoolKind, PoolPolicy, Refusal, Tier, Usage};

use tollgate_store::alerts::{AlertKind, AlertQuery, AlertRule, NewAlert, alert_id};
use tollgate_store::report::Dims;
use tollgate_store::{
    Account, AccountUpdate, Event, EventOutcome, EventQuery, Grant, GrantKind, Hold, HoldOutcome, HoldRequest,
    HoldState, KeyPool, NewAccount, NewEvent, NewGrant, NewKey, PoolBalance, SettleRequest, Store, StoreError,
    StoreResult,
};

/// A fresh, empty store for one case.
pub type Fresh = Arc<dyn Store>;

/// Expands to one `#[tokio::test]` per conformance case. `$factory` is an async expression
/// that yields a fresh, empty `Arc<dyn Store>`:
///
/// ```text
/// tollgate_conformance::conformance_suite!(async { fresh_store() });
/// ```
///
/// The calling crate needs `tokio` with the `macros` and `rt-multi-thread` features.
#[macro_export]
macro_rules! conformance_suite {
    (@cases $factory:expr; $($case:ident)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let store = $factory.await;
                $crate::suite::$case(store).await;
            }
        )*
    };
    ($factory:expr) => {
        $crate::conformance_suite!(@cases $factory;
            tiers_put_replaces_and_lists
            account_create_and_read
            account_requires_known_tier
            account_id_is_unique
            account_default_anchor_is_creation_day_in_timezone
            account_update_tier
            account_update_anchor_before_ledger_state
            account_anchor_frozen_by_ledger_state
            unknown_account_is_not_found
            balance_before_any_write_shows_tier_grants
            balance_uses_account_grant_override
            pool_limit_follows_policy
            grants_tier_grant_created_once
            add_grant_tops_up_current_cycle_only
            cycle_rollover_starts_fresh_pool
            hold_within_limit
            hold_keeps_its_maker_and_only_its_maker_ends_it
            hold_up_to_exact_limit_then_refused
            hold_refused_records_nothing
            hold_counts_charged_and_held
            hold_replay_and_conflict
            hold_negative_amount_refused
            key_cap_limits_holds
            idempotency_ids_are_per_account
            settle_charges_and_releases
            settle_takes_pool_and_key_from_hold
            settle_event_id_defaults_to_hold_id
            settle_overshoot_is_recorded
            settle_splits_grant_then_overage_at_multiplier
            settle_is_idempotent
            settle_refuses_closed_or_unknown_holds
            void_releases_and_repeats
            settle_part_charges_calls_against_a_lease
            extend_hold_pushes_expiry
            record_events_are_facts_beyond_limit
            record_events_duplicate_and_batch_conflict
            record_events_one_id_twice_in_a_batch
            late_event_booked_in_its_cycle
            events_query_filters_and_pages
            money_is_exact
            expire_holds_settles_past_ttl
            expired_hold_is_charged_to_its_cycle
            recover_open_holds_settles_open_holds
            keys_create_list_lookup_revoke
            audit_clean_after_mixed_workload
            audit_warns_of_overshoot_per_pool_and_cycle
            concurrent_holds_never_overshoot
            concurrent_holds_respect_key_cap
            concurrent_settles_charge_once
            concurrent_settle_and_void_have_one_winner
            concurrent_duplicate_events_charge_once
            concurrent_hold_replays_reserve_once
            alert_rules_put_list_delete_and_config_rules_are_protected
            alerts_fire_once_per_rule_pool_cycle_and_dedupe
            alerts_history_filters_newest_first
            deliveries_are_leased_retried_and_finished
            concurrent_claims_hand_each_delivery_out_once
            rollups_add_up_to_the_events
        );
    };
}

// ---------------------------------------------------------------------------------------------
// Fixtures: the clock, money, accounts, requests.
// ---------------------------------------------------------------------------------------------

const TTL_S: u64 = 600;
const MODEL: &str = "claude-sonnet-4-5";
const OTHER_MODEL: &str = "claude-opus-4-1";
const SOURCE: &str = "conformance";
const STANDARD_TIER: &str = "team-standard";
const EVENTS_MAX: usize = 10_000;

const I: PoolKind = PoolKind::Interactive;
const P: PoolKind = PoolKind::Programmatic;

fn at(rfc3339: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(rfc3339)
        .unwrap_or_else(|e| panic!("bad fixture time {rfc3339:?}: {e}"))
        .with_timezone(&Utc)
}

/// The suite's clock.
fn now() -> DateTime<Utc> {
    at("2026-11-10T12:00:00Z")
}

fn later(seconds: i64) -> DateTime<Utc> {
    now() + Duration::seconds(seconds)
}

/// Start of the standard account's cycle containing `now()`.
fn nov() -> DateTime<Utc> {
    at("2026-11-01T00:00:00Z")
}

/// End of the standard account's cycle containing `now()`.
fn dec() -> DateTime<Utc> {
    at("2026-12-01T00:00:00Z")
}

fn usd(x: i64) -> Nanos {
    Nanos::from_usd(x)
}

fn cents(x: i64) -> Nanos {
    Nanos(x * 10_000_000)
}

/// A short, deterministic digest of a request's content (its `Debug` text without the
/// fingerprint), standing in for the callers' content digests.
fn digest(text: &str) -> String {
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    format!("fp-{:016x}", h.finish())
}

async fn ensure_builtin_tiers(store: &Fresh) {
    let have = ok(store.tiers().await, "tiers()");
    for tier in Tier::builtins() {
        if !have.iter().any(|t| t.id == tier.id) {
            ok(store.put_tier(tier).await, "put_tier(builtin tier)");
        }
    }
}

fn new_account(id: &str, tier: &str) -> NewAccount {
    NewAccount {
        id: id.to_string(),
        tier: tier.to_string(),
        anchor: Some(nov()),
        timezone: Tz::UTC,
        interactive_grant: None,
        programmatic_grant: None,
    }
}

/// A `team-standard` account anchored on 2026-11-01T00:00:00Z (UTC), created at `now()`.
async fn standard_account(store: &Fresh, id: &str) -> Account {
    ensure_builtin_tiers(store).await;
    ok(store.create_account(new_account(id, STANDARD_TIER), now()).await, &format!("create_account({id})"))
}

/// An account on `tier` (put first), anchored like the standard account.
async fn account_on_tier(store: &Fresh, id: &str, tier: Tier) -> Account {
    ensure_builtin_tiers(store).await;
    let tier_id = tier.id.clone();
    ok(store.put_tier(tier).await, &format!("put_tier({tier_id})"));
    ok(store.create_account(new_account(id, &tier_id), now()).await, &format!("create_account({id})"))
}

fn custom_tier(id: &str, interactive: Nanos, programmatic: Nanos, payg_multiplier_ppm: u64) -> Tier {
    Tier { id: id.to_string(), interactive, programmatic, monthly_price: None, payg_multiplier_ppm }
}

fn hold_request(account: &str, id: &str, pool: PoolKind, amount: Nanos) -> HoldRequest {
    with_hold_fingerprint(HoldRequest {
        account: account.to_string(),
        id: id.to_string(),
        pool,
        key: None,
        amount,
        ttl_s: TTL_S,
        model: Some(MODEL.to_string()),
        source: Some(SOURCE.to_string()),
        fingerprint: String::new(),
        made_by: tollgate_store::Maker::Admin,
    })
}

fn with_key(mut request: HoldRequest, key: &str) -> HoldRequest {
    request.key = Some(key.to_string());
    with_hold_fingerprint(request)
}

fn with_ttl(mut request: HoldRequest, ttl_s: u64) -> HoldRequest {
    request.ttl_s = ttl_s;
    with_hold_fingerprint(request)
}

fn with_hold_fingerprint(mut request: HoldRequest) -> HoldRequest {
    request.fingerprint = String::new();
    request.fingerprint = digest(&format!("{request:?}"));
    request
}

fn event(account: &str, id: &str, pool: PoolKind, cost: Nanos, timestamp: DateTime<Utc>) -> NewEvent {
    with_event_fingerprint(NewEvent {
        id: id.to_string(),
        account: account.to_string(),
        pool,
        model: MODEL.to_string(),
        usage: Usage { input_tokens: 1_000, output_tokens: 200, ..Usage::default() },
        cost,
        service_tier: None,
        inference_geo: None,
        speed: None,
        source: Some(SOURCE.to_string()),
        key: None,
        labels: BTreeMap::new(),
        timestamp,
        latency_ms: Some(850),
        ttft_ms: Some(120),
        partial: false,
        estimated: false,
        fingerprint: String::new(),
    })
}

fn with_event_fingerprint(mut event: NewEvent) -> NewEvent {
    event.fingerprint = String::new();
    event.fingerprint = digest(&format!("{event:?}"));
    event
}

/// A settle request for `hold` whose event has the hold's id, pool and key.
fn settle_request(hold: &Hold, cost: Nanos, timestamp: DateTime<Utc>) -> SettleRequest {
    let mut ev = event(&hold.account, &hold.id, hold.pool, cost, timestamp);
    ev.key = hold.key.clone();
    SettleRequest { account: hold.account.clone(), hold_id: hold.id.clone(), event: with_event_fingerprint(ev) }
}

fn new_key(account: &str, id: &str, pool: KeyPool, cap: Option<Nanos>) -> NewKey {
    NewKey {
        id: id.to_string(),
        account: account.to_string(),
        secret_hash: key_hash(id),
        name: None,
        pool,
        labels: BTreeMap::new(),
        cap,
    }
}

/// A stand-in for the hex SHA-256 of a key's secret: 64 hex digits derived from the key id.
fn key_hash(key_id: &str) -> String {
    let part = |salt: u64| {
        let mut h = DefaultHasher::new();
        (salt, key_id).hash(&mut h);
        format!("{:016x}", h.finish())
    };
    format!("{}{}{}{}", part(1), part(2), part(3), part(4))
}

fn policy(on_exhausted: OnExhausted, overage_cap: Option<Nanos>, spend_cap: Option<Nanos>) -> PoolPolicy {
    PoolPolicy { on_exhausted, overage_cap, spend_cap }
}

fn all_events_query(account: &str) -> EventQuery {
    EventQuery { account: account.to_string(), limit: EVENTS_MAX, ..EventQuery::default() }
}

async fn all_events(store: &Fresh, account: &str) -> Vec<Event> {
    ok(store.events(all_events_query(account)).await, &format!("events({account})"))
}

// ---------------------------------------------------------------------------------------------
// Assertions with messages that say what was expected.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ErrKind {
    NotFound,
    Conflict,
    Invalid,
}

fn err_kind(e: &StoreError) -> Option<ErrKind> {
    match e {
        StoreError::NotFound(_) => Some(ErrKind::NotFound),
        StoreError::Conflict(_) => Some(ErrKind::Conflict),
        StoreError::Invalid(_) | StoreError::Refused(_) => Some(ErrKind::Invalid),
        StoreError::Backend(_) | StoreError::Corrupt(_) | StoreError::Unavailable(_) => None,
    }
}

#[track_caller]
fn ok<T>(result: StoreResult<T>, what: &str) -> T {
    match result {
        Ok(v) => v,
        Err(e) => panic!("{what}: expected success, got error {e:?}"),
    }
}

#[track_caller]
fn expect_err<T: fmt::Debug>(result: StoreResult<T>, want: ErrKind, what: &str) {
    match result {
        Err(e) if err_kind(&e) == Some(want) => {}
        other => panic!("{what}: expected Err({want:?}), got {other:?}"),
    }
}

#[track_caller]
fn held(outcome: StoreResult<HoldOutcome>, what: &str) -> Hold {
    match outcome {
        Ok(HoldOutcome::Held(h)) => h,
        other => panic!("{what}: expected the hold to be Held, got {other:?}"),
    }
}

#[track_caller]
fn replayed(outcome: StoreResult<HoldOutcome>, what: &str) -> Hold {
    match outcome {
        Ok(HoldOutcome::Replayed(h)) => h,
        other => panic!("{what}: expected the hold to be Replayed, got {other:?}"),
    }
}

#[track_caller]
fn refused(outcome: StoreResult<HoldOutcome>, what: &str) -> (Refusal, DateTime<Utc>) {
    match outcome {
        Ok(HoldOutcome::Refused { refusal, resets_at }) => (refusal, resets_at),
        other => panic!("{what}: expected the hold to be Refused, got {other:?}"),
    }
}

#[track_caller]
fn recorded(outcome: &EventOutcome, what: &str) -> Event {
    match outcome {
        EventOutcome::Recorded(e) => e.clone(),
        other => panic!("{what}: expected Recorded, got {other:?}"),
    }
}

#[track_caller]
fn duplicate(outcome: &EventOutcome, what: &str) -> Event {
    match outcome {
        EventOutcome::Duplicate(e) => e.clone(),
        other => panic!("{what}: expected Duplicate, got {other:?}"),
    }
}

async fn record_one(store: &Fresh, ev: NewEvent, now: DateTime<Utc>, what: &str) -> Event {
    let outcomes = ok(store.record_events(vec![ev], now).await, what);
    assert_eq!(outcomes.len(), 1, "{what}: record_events of one event must return one outcome, got {outcomes:?}");
    recorded(&outcomes[0], what)
}

async fn hold_state(store: &Fresh, account: &str, hold_id: &str) -> HoldState {
    match ok(store.hold_by_id(account, hold_id).await, &format!("hold_by_id({account}, {hold_id})")) {
        Some(h) => h.state,
        None => panic!("hold_by_id({account}, {hold_id}): the hold is missing"),
    }
}

/// The figures of one pool in one cycle.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Figures {
    grants: Nanos,
    used: Nanos,
    overage: Nanos,
    held: Nanos,
}

impl fmt::Debug for Figures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "grants ${} ({} nanos), used ${} ({}), overage ${} ({}), held ${} ({})",
            self.grants, self.grants.0, self.used, self.used.0, self.overage, self.overage.0, self.held, self.held.0
        )
    }
}

fn fig(grants: Nanos, used: Nanos, overage: Nanos, held: Nanos) -> Figures {
    Figures { grants, used, overage, held }
}

async fn pool_balance(store: &Fresh, account: &str, pool: PoolKind, at: DateTime<Utc>) -> PoolBalance {
    let balance = ok(store.balance(account, at).await, &format!("balance({account}, {at})"));
    let p = balance.pool(pool).clone();
    assert_eq!(p.pool, pool, "balance({account}).pools must be [interactive, programmatic]");
    p
}

#[track_caller]
fn assert_figures_of(p: &PoolBalance, want: Figures, what: &str) {
    let got = fig(p.grants, p.used, p.overage, p.held);
    assert_eq!(got, want, "{what}: {} pool figures", p.pool);
}

async fn assert_figures(store: &Fresh, account: &str, pool: PoolKind, at: DateTime<Utc>, want: Figures, what: &str) {
    let p = pool_balance(store, account, pool, at).await;
    let got = fig(p.grants, p.used, p.overage, p.held);
    assert_eq!(got, want, "{what}: balance of {account} {pool} at {at}");
}

/// Checks the fields an event carries unchanged from what was sent. Pool and key come from the
/// hold when the event settled one.
#[track_caller]
fn assert_event_carries(got: &Event, sent: &NewEvent, hold: Option<&Hold>, what: &str) {
    assert_eq!(got.id, sent.id, "{what}: event id");
    assert_eq!(got.account, sent.account, "{what}: event account");
    assert_eq!(got.model, sent.model, "{what}: event model");
    assert_eq!(got.usage, sent.usage, "{what}: event usage");
    assert_eq!(got.cost, sent.cost, "{what}: event list cost");
    assert_eq!(got.service_tier, sent.service_tier, "{what}: event service_tier");
    assert_eq!(got.inference_geo, sent.inference_geo, "{what}: event inference_geo");
    assert_eq!(got.speed, sent.speed, "{what}: event speed");
    assert_eq!(got.source, sent.source, "{what}: event source");
    assert_eq!(got.labels, sent.labels, "{what}: event labels");
    assert_eq!(got.timestamp, sent.timestamp, "{what}: event timestamp");
    assert_eq!(got.latency_ms, sent.latency_ms, "{what}: event latency_ms");
    assert_eq!(got.ttft_ms, sent.ttft_ms, "{what}: event ttft_ms");
    assert_eq!(got.partial, sent.partial, "{what}: event partial");
    match hold {
        Some(h) => {
            assert_eq!(got.pool, h.pool, "{what}: a settled event's pool is the hold's");
            assert_eq!(got.key, h.key, "{what}: a settled event's key is the hold's");
            assert_eq!(got.hold_id.as_deref(), Some(h.id.as_str()), "{what}: a settled event names its hold");
        }
        None => {
            assert_eq!(got.pool, sent.pool, "{what}: event pool");
            assert_eq!(got.key, sent.key, "{what}: event key");
            assert_eq!(got.hold_id, None, "{what}: a recorded event has no hold");
        }
    }
}

#[track_caller]
fn assert_split(e: &Event, grant: Nanos, overage: Nanos, overshoot: Nanos, what: &str) {
    assert_eq!(
        (e.grant_part, e.overage_part, e.overshoot),
        (grant, overage, overshoot),
        "{what}: event {} (grant_part, overage_part, overshoot)",
        e.id
    );
}

// ---------------------------------------------------------------------------------------------
// Tiers and accounts.
// ---------------------------------------------------------------------------------------------

/// put_tier creates or replaces a tier; tiers() lists each id once; accounts see the new grants.
pub async fn tiers_put_replaces_and_lists(store: Fresh) {
    ensure_builtin_tiers(&store).await;
    let first = Tier {
        id: "conf-custom".to_string(),
        interactive: usd(7),
        programmatic: usd(3),
        monthly_price: Some(usd(20)),
        payg_multiplier_ppm: 1_250_000,
    };
    ok(store.put_tier(first.clone()).await, "put_tier(conf-custom)");
    let tiers = ok(store.tiers().await, "tiers()");
    let found: Vec<&Tier> = tiers.iter().filter(|t| t.id == "conf-custom").collect();
    assert_eq!(found, vec![&first], "tiers() must list the tier just put, exactly as given");

    let second = Tier { interactive: usd(9), monthly_price: None, payg_multiplier_ppm: PPM, ..first.clone() };
    ok(store.put_tier(second.clone()).await, "put_tier(conf-custom) again");
    let tiers = ok(store.tiers().await, "tiers()");
    let found: Vec<&Tier> = tiers.iter().filter(|t| t.id == "conf-custom").collect();
    assert_eq!(found, vec![&second], "put_tier with an existing id must replace the tier (one entry, new values)");
    for builtin in Tier::builtins() {
        assert!(
            tiers.iter().any(|t| t.id == builtin.id),
            "tiers() lost the built-in tier {} after put_tier of another tier",
            builtin.id
        );
    }

    ok(store.create_account(new_account("acme", "conf-custom"), now()).await, "create_account on conf-custom");
    assert_figures(&store, "acme", I, now(), fig(usd(9), Nanos::ZERO, Nanos::ZERO, Nanos::ZERO), "replaced tier").await;
    assert_figures(&store, "acme", P, now(), fig(usd(3), Nanos::ZERO, Nanos::ZERO, Nanos::ZERO), "replaced tier").await;
}

/// create_account returns the account as created; account() and accounts() read it back.
pub async fn account_create_and_read(store: Fresh) {
    let created = standard_account(&store, "acme").await;
    let want = Account {
        id: "acme".to_string(),
        tier: STANDARD_TIER.to_string(),
        anchor: nov(),
        timezone: Tz::UTC,
        interactive_grant: None,
        programmatic_grant: None,
        created_at: now(),
    };
    assert_eq!(created, want, "create_account must return the account as created");
    assert_eq!(ok(store.account("acme").await, "account(acme)"), Some(want.clone()), "account(acme) after create");
    standard_account(&store, "beta").await;
    let all = ok(store.accounts().await, "accounts()");
    let ids: BTreeSet<&str> = all.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids, BTreeSet::from(["acme", "beta"]), "accounts() must list every account once");
    assert_eq!(all.iter().find(|a| a.id == "acme"), Some(&want), "accounts() entry of acme");
    assert_eq!(ok(store.account("nobody").await, "account(nobody)"), None, "account() of an unknown id is None");
}

/// An account needs an existing tier: Invalid otherwise, and nothing is created.
pub async fn account_requires_known_tier(store: Fresh) {
    ensure_builtin_tiers(&store).await;
    expect_err(
        store.create_account(new_account("acme", "no-such-tier"), now()).await,
        ErrKind::Invalid,
        "create_account with an unknown tier",
    );
    assert_eq!(ok(store.account("acme").await, "account(acme)"), None, "a refused account must not exist");
    assert!(ok(store.accounts().await, "accounts()").is_empty(), "a refused account must not be listed");
}

/// Account ids are unique: a second create with the same id is a Conflict and changes nothing.
pub async fn account_id_is_unique(store: Fresh) {
    let first = standard_account(&store, "acme").await;
    let mut again = new_account("acme", "pro");
    again.anchor = Some(at("2026-10-05T00:00:00Z"));
    expect_err(store.create_account(again, later(60)).await, ErrKind::Conflict, "create_account with a taken id");
    assert_eq!(ok(store.account("acme").await, "account(acme)"), Some(first), "a duplicate create must change nothing");
}

/// Without an anchor, the anchor is the creation day at 00:00 in the account's timezone.
pub async fn account_default_anchor_is_creation_day_in_timezone(store: Fresh) {
    ensure_builtin_tiers(&store).await;
    let cases = [
        // id, timezone, created at, anchor, first cycle end
        ("utc", Tz::UTC, "2026-11-10T12:00:00Z", "2026-11-10T00:00:00Z", "2026-12-10T00:00:00Z"),
        // 03:00Z is 22:00 on Nov 9 in New York (EST, UTC-5): the local day is the 9th.
        ("nyc", chrono_tz::America::New_York, "2026-11-10T03:00:00Z", "2026-11-09T05:00:00Z", "2026-12-09T05:00:00Z"),
        // 20:00Z is 05:00 on Nov 11 in Tokyo (UTC+9): the local day is the 11th.
        ("tokyo", chrono_tz::Asia::Tokyo, "2026-11-10T20:00:00Z", "2026-11-10T15:00:00Z", "2026-12-10T15:00:00Z"),
    ];
    for (id, timezone, created, anchor, end) in cases {
        let request = NewAccount { anchor: None, timezone, ..new_account(id, STANDARD_TIER) };
        let account = ok(store.create_account(request, at(created)).await, &format!("create_account({id})"));
        assert_eq!(
            account.anchor,
            at(anchor),
            "{id}: the default anchor is the creation day 00:00 in {timezone} (created {created})"
        );
        assert_eq!(account.timezone, timezone, "{id}: timezone kept");
        assert_eq!(account.created_at, at(created), "{id}: created_at is the `now` given");
        let balance = ok(store.balance(id, at(created)).await, &format!("balance({id})"));
        assert_eq!(
            (balance.cycle.start, balance.cycle.end),
            (at(anchor), at(end)),
            "{id}: the first cycle runs from the default anchor for one month"
        );
    }
}

/// The tier can change, before and after ledger state; an unknown tier is Invalid. A cycle
/// created after the change carries the new tier's grants.
pub async fn account_update_tier(store: Fresh) {
    let before = standard_account(&store, "acme").await;
    let updated = ok(
        store.update_account("acme", AccountUpdate { tier: Some("pro".to_string()), ..AccountUpdate::default() }).await,
        "update_account(tier = pro)",
    );
    assert_eq!(updated, Account { tier: "pro".to_string(), ..before.clone() }, "update_account changes only the tier");
    let balance = ok(store.balance("acme", now()).await, "balance(acme)");
    assert_eq!(balance.tier, "pro", "balance names the new tier");
    // No write has touched the cycle yet, so it shows the new tier's grants.
    assert_figures(&store, "acme", I, now(), fig(usd(40), Nanos::ZERO, Nanos::ZERO, Nanos::ZERO), "tier pro").await;
    assert_figures(&store, "acme", P, now(), fig(usd(20), Nanos::ZERO, Nanos::ZERO, Nanos::ZERO), "tier pro").await;

    held(store.hold(hold_request("acme", "h-1", P, usd(1)), now()).await, "hold on pro");
    let updated = ok(
        store
            .update_account("acme", AccountUpdate { tier: Some("max-20x".to_string()), ..AccountUpdate::default() })
            .await,
        "update_account(tier = max-20x) after ledger state",
    );
    assert_eq!(updated.tier, "max-20x", "a tier change is allowed after ledger state");
    let next = at("2026-12-10T00:00:00Z");
    assert_figures(&store, "acme", I, next, fig(usd(500), Nanos::ZERO, Nanos::ZERO, Nanos::ZERO), "next cycle").await;
    assert_figures(&store, "acme", P, next, fig(usd(200), Nanos::ZERO, Nanos::ZERO, Nanos::ZERO), "next cycle").await;

    expect_err(
        store
            .update_account(
                "acme",
                AccountUpdate { tier: Some("no-such-tier".to_string()), ..AccountUpdate::default() },
            )
            .await,
        ErrKind::Invalid,
        "update_account to an unknown tier",
    );
    let account = ok(store.account("acme").await, "account(acme)").expect("acme exists");
    assert_eq!(account.tier, "max-20x", "a refused tier change changes nothing");
}

/// Anchor and timezone may change while the account has no ledger state; balance() is not a write.
pub async fn account_update_anchor_before_ledger_state(store: Fresh) {
    standard_account(&store, "acme").await;
    // Reads are not ledger state.
    ok(store.balance("acme", now()).await, "balance(acme)");
    ok(store.balance("acme", at("2026-10-20T00:00:00Z")).await, "balance(acme) last cycle");

    let anchor = at("2026-10-15T00:00:00Z");
    let updated = ok(
        store.update_account("acme", AccountUpdate { anchor: Some(anchor), ..AccountUpdate::default() }).await,
        "update_account(anchor) before any ledger state (only balance reads so far)",
    );
    assert_eq!(updated.anchor, anchor, "the new anchor is kept");
    assert_eq!(updated.tier, STANDARD_TIER, "the tier is unchanged");
    let balance = ok(store.balance("acme", now()).await, "balance(acme)");
    assert_eq!(
        (balance.cycle.start, balance.cycle.end),
        (anchor, at("2026-11-15T00:00:00Z")),
        "the cycle follows the new anchor"
    );

    let berlin = chrono_tz::Europe::Berlin;
    let updated = ok(
        store.update_account("acme", AccountUpdate { timezone: Some(berlin), ..AccountUpdate::default() }).await,
        "update_account(timezone) before any ledger state",
    );
    assert_eq!(updated.timezone, berlin, "the new timezone is kept");
    let balance = ok(store.balance("acme", now()).await, "balance(acme)");
    assert_eq!(balance.cycle, updated.cycle_anchor().cycle_at(now()), "the cycle follows the new timezone");
}

async fn assert_anchor_frozen(store: &Fresh, id: &str, state: &str) {
    let before = ok(store.account(id).await, "account()").expect("account exists");
    expect_err(
        store
            .update_account(id, AccountUpdate { anchor: Some(at("2026-10-15T00:00:00Z")), ..AccountUpdate::default() })
            .await,
        ErrKind::Conflict,
        &format!("update_account(anchor) of {id} after {state}"),
    );
    expect_err(
        store
            .update_account(id, AccountUpdate { timezone: Some(chrono_tz::Europe::Berlin), ..AccountUpdate::default() })
            .await,
        ErrKind::Conflict,
        &format!("update_account(timezone) of {id} after {state}"),
    );
    assert_eq!(
        ok(store.account(id).await, "account()"),
        Some(before),
        "{id}: a refused anchor/timezone change must change nothing"
    );
    let updated = ok(
        store.update_account(id, AccountUpdate { tier: Some("pro".to_string()), ..AccountUpdate::default() }).await,
        &format!("update_account(tier) of {id} after {state}"),
    );
    assert_eq!(updated.tier, "pro", "{id}: the tier may still change after {state}");
}

/// Once an account has ledger state (a hold, an event in any cycle, a grant), its anchor and
/// timezone are frozen (Conflict); its tier may still change.
pub async fn account_anchor_frozen_by_ledger_state(store: Fresh) {
    standard_account(&store, "with-hold").await;
    held(store.hold(hold_request("with-hold", "h-1", P, usd(1)), now()).await, "hold");
    assert_anchor_frozen(&store, "with-hold", "a hold").await;

    standard_account(&store, "with-event").await;
    // A late event, booked in the previous cycle: ledger state in any cycle counts.
    record_one(&store, event("with-event", "e-1", I, usd(1), at("2026-10-20T08:00:00Z")), now(), "late event").await;
    assert_anchor_frozen(&store, "with-event", "a late event").await;

    standard_account(&store, "with-grant").await;
    let grant = NewGrant { account: "with-grant".to_string(), pool: I, amount: usd(5), note: None };
    ok(store.add_grant(grant, now()).await, "add_grant");
    assert_anchor_frozen(&store, "with-grant", "a top-up grant").await;
}

/// Every operation naming an account that does not exist is NotFound and creates nothing.
pub async fn unknown_account_is_not_found(store: Fresh) {
    ensure_builtin_tiers(&store).await;
    expect_err(store.balance("nobody", now()).await, ErrKind::NotFound, "balance(nobody)");
    expect_err(
        store.hold(hold_request("nobody", "h-1", P, usd(1)), now()).await,
        ErrKind::NotFound,
        "hold for an unknown account",
    );
    expect_err(
        store
            .update_account("nobody", AccountUpdate { tier: Some("pro".to_string()), ..AccountUpdate::default() })
            .await,
        ErrKind::NotFound,
        "update_account(nobody)",
    );
    expect_err(
        store.add_grant(NewGrant { account: "nobody".to_string(), pool: P, amount: usd(5), note: None }, now()).await,
        ErrKind::NotFound,
        "add_grant for an unknown account",
    );
    expect_err(
        store.set_policy("nobody", P, PoolPolicy::default()).await,
        ErrKind::NotFound,
        "set_policy for an unknown account",
    );
    expect_err(
        store.create_key(new_key("nobody", "k-1", KeyPool::Auto, None), now()).await,
        ErrKind::NotFound,
        "create_key for an unknown account",
    );
    expect_err(
        store.record_events(vec![event("nobody", "e-1", P, usd(1), now())], now()).await,
        ErrKind::NotFound,
        "record_events for an unknown account",
    );
    expect_err(store.void("nobody", "h-1", now()).await, ErrKind::NotFound, "void for an unknown account");
    expect_err(
        store
            .settle(
                SettleRequest {
                    account: "nobody".to_string(),
                    hold_id: "h-1".to_string(),
                    event: event("nobody", "h-1", P, usd(1), now()),
                },
                now(),
            )
            .await,
        ErrKind::NotFound,
        "settle for an unknown account",
    );
    assert_eq!(ok(store.account("nobody").await, "account(nobody)"), None, "nothing may create the account");
}

// ---------------------------------------------------------------------------------------------
// Balance, policies, grants, cycles.
// ---------------------------------------------------------------------------------------------

/// Before any write, balance() shows the tier's grants with the default policy; it never writes,
/// and two reads are equal.
pub async fn balance_before_any_write_shows_tier_grants(store: Fresh) {
    let account = standard_account(&store, "acme").await;
    let balance = ok(store.balance("acme", now()).await, "balance(acme)");
    assert_eq!(balance.account, "acme", "balance.account");
    assert_eq!(balance.tier, STANDARD_TIER, "balance.tier");
    assert_eq!(balance.cycle, account.cycle_anchor().cycle_at(now()), "balance.cycle is the cycle containing now");
    assert_eq!((balance.cycle.start, balance.cycle.end), (nov(), dec()), "balance.cycle of the standard account");
    assert_eq!([balance.pools[0].pool, balance.pools[1].pool], [I, P], "pools are [interactive, programmatic]");
    for (pool, grant) in [(I, usd(100)), (P, usd(50))] {
        let p = balance.pool(pool);
        assert_eq!(p.policy, PoolPolicy::default(), "{pool}: the default policy is block without caps");
        assert_figures_of(p, fig(grant, Nanos::ZERO, Nanos::ZERO, Nanos::ZERO), "before any write");
        assert_eq!(p.limit, Some(grant), "{pool}: block limit = grants");
        assert_eq!(p.remaining(), Some(grant), "{pool}: remaining = limit");
    }
    assert_eq!(ok(store.balance("acme", now()).await, "balance again"), balance, "two reads must be equal");
    assert_eq!(
        ok(store.balance("acme", later(3_600)).await, "balance an hour later"),
        balance,
        "the balance holds nothing that changes with the clock alone within a cycle"
    );
    let future = at("2027-03-10T00:00:00Z");
    let balance = ok(store.balance("acme", future).await, "balance in March 2027");
    assert_eq!(
        (balance.cycle.start, balance.cycle.end),
        (at("2027-03-01T00:00:00Z"), at("2027-04-01T00:00:00Z")),
        "a future cycle"
    );
    assert_figures_of(balance.pool(P), fig(usd(50), Nanos::ZERO, Nanos::ZERO, Nanos::ZERO), "a future cycle");
}

/// An account's own grants replace the tier's grant of that pool.
pub async fn balance_uses_account_grant_override(store: Fresh) {
    ensure_builtin_tiers(&store).await;
    let request = NewAccount {
        interactive_grant: Some(usd(300)),
        programmatic_grant: Some(usd(75)),
        ..new_account("ent", "enterprise")
    };
    let account = ok(store.create_account(request, now()).await, "create_account(ent)");
    assert_eq!(
        (account.interactive_grant, account.programmatic_grant),
        (Some(usd(300)), Some(usd(75))),
        "create_account keeps the per-account grants"
    );
    assert_figures(&store, "ent", I, now(), fig(usd(300), Nanos::ZERO, Nanos::ZERO, Nanos::ZERO), "override").await;
    assert_figures(&store, "ent", P, now(), fig(usd(75), Nanos::ZERO, Nanos::ZERO, Nanos::ZERO), "override").await;

    let request = NewAccount { programmatic_grant: Some(usd(5)), ..new_account("part", STANDARD_TIER) };
    ok(store.create_account(request, now()).await, "create_account(part)");
    assert_figures(&store, "part", I, now(), fig(usd(100), Nanos::ZERO, Nanos::ZERO, Nanos::ZERO), "no override").await;
    let (refusal, _) = refused(store.hold(hold_request("part", "h-1", P, usd(6)), now()).await, "$6 over a $5 grant");
    assert_eq!(refusal, Refusal::PoolExhausted { limit: usd(5), remaining: usd(5) }, "limit is the override");
    held(store.hold(hold_request("part", "h-2", P, usd(5)), now()).await, "$5 on a $5 grant");
    let grants = ok(store.grants("part", now()).await, "grants(part)");
    let tier_grants: Vec<&Grant> = grants.iter().filter(|g| g.pool == P && g.kind == GrantKind::Tier).collect();
    assert_eq!(tier_grants.len(), 1, "one tier grant for the programmatic pool, got {grants:?}");
    assert_eq!(tier_grants[0].amount, usd(5), "the tier grant written is the account's override");
}

/// The pool limit follows the policy (SPEC section 1), in balance() and in hold().
pub async fn pool_limit_follows_policy(store: Fresh) {
    standard_account(&store, "acme").await;
    for pool in PoolKind::ALL {
        assert_eq!(ok(store.policy("acme", pool).await, "policy()"), PoolPolicy::default(), "{pool}: default policy");
    }
    ok(store.set_policy("acme", P, policy(OnExhausted::Block, None, Some(usd(30)))).await, "set_policy");
    ok(store.set_policy("acme", P, PoolPolicy::default()).await, "set_policy back to default");
    assert_eq!(ok(store.policy("acme", P).await, "policy()"), PoolPolicy::default(), "set_policy replaces");
    assert_eq!(pool_balance(&store, "acme", P, now()).await.limit, Some(usd(50)), "limit back to grants");

    // The programmatic grant is $50.
    let cases = [
        ("block-cap", policy(OnExhausted::Block, None, Some(usd(30))), Some(usd(30))),
        ("block-cap-high", policy(OnExhausted::Block, None, Some(usd(80))), Some(usd(50))),
        ("payg-overage", policy(OnExhausted::Payg, Some(usd(20)), None), Some(usd(70))),
        ("payg-both", policy(OnExhausted::Payg, Some(usd(20)), Some(usd(60))), Some(usd(60))),
        ("payg-spend", policy(OnExhausted::Payg, None, Some(usd(60))), Some(usd(60))),
        ("payg-open", policy(OnExhausted::Payg, None, None), None),
        ("alert-open", policy(OnExhausted::Alert, Some(usd(20)), None), None),
        ("alert-cap", policy(OnExhausted::Alert, None, Some(usd(10))), Some(usd(10))),
    ];
    for (id, pool_policy, limit) in cases {
        standard_account(&store, id).await;
        ok(store.set_policy(id, P, pool_policy).await, &format!("set_policy({id})"));
        assert_eq!(ok(store.policy(id, P).await, "policy()"), pool_policy, "{id}: policy() returns what was set");
        assert_eq!(ok(store.policy(id, I).await, "policy()"), PoolPolicy::default(), "{id}: other pool untouched");
        let p = pool_balance(&store, id, P, now()).await;
        assert_eq!(p.policy, pool_policy, "{id}: balance shows the policy");
        assert_eq!(p.limit, limit, "{id}: balance limit for {pool_policy:?}");
        assert_eq!(p.remaining(), limit, "{id}: remaining before any spend");
        match limit {
            Some(limit) => {
                let h = held(store.hold(hold_request(id, "h-1", P, limit), now()).await, &format!("{id}: hold limit"));
                assert_eq!(h.remaining_after, Some(Nanos::ZERO), "{id}: remaining after holding the whole limit");
                let (refusal, _) =
                    refused(store.hold(hold_request(id, "h-2", P, Nanos(1)), now()).await, &format!("{id}: 1 nano"));
                assert_eq!(refusal, Refusal::PoolExhausted { limit, remaining: Nanos::ZERO }, "{id}: refusal");
            }
            None => {
                let h =
                    held(store.hold(hold_request(id, "h-1", P, usd(1_000)), now()).await, &format!("{id}: unlimited"));
                assert_eq!(h.remaining_after, None, "{id}: an unlimited pool has no remaining");
            }
        }
    }
}

/// The first write touching a cycle creates its tier grant, once; later writes do not add another.
pub async fn grants_tier_grant_created_once(store: Fresh) {
    standard_account(&store, "acme").await;
    held(store.hold(hold_request("acme", "h-1", P, usd(1)), now()).await, "first hold");
    record_one(&store, event("acme", "e-1", P, usd(2), later(1)), later(1), "event").await;
    held(store.hold(hold_request("acme", "h-2", P, usd(1)), later(2)).await, "second hold");
    let grants = ok(store.grants("acme", now()).await, "grants(acme)");
    let programmatic: Vec<&Grant> = grants.iter().filter(|g| g.pool == P).collect();
    assert_eq!(programmatic.len(), 1, "exactly one programmatic grant (the tier's), got {grants:?}");
    let g = programmatic[0];
    assert_eq!(
        (g.account.as_str(), g.kind, g.amount, g.cycle_start, g.expires_at),
        ("acme", GrantKind::Tier, usd(50), nov(), dec()),
        "the programmatic tier grant (account, kind, amount, cycle_start, expires_at)"
    );
    let interactive: Vec<&Grant> = grants.iter().filter(|g| g.pool == I).collect();
    assert!(interactive.len() <= 1, "at most one interactive grant, got {grants:?}");
    for g in interactive {
        assert_eq!((g.kind, g.amount), (GrantKind::Tier, usd(100)), "the interactive tier grant");
    }
    assert_figures(&store, "acme", P, now(), fig(usd(50), usd(2), Nanos::ZERO, usd(2)), "after writes").await;
}

/// add_grant tops up the pool in the cycle containing `now`, and only that cycle.
pub async fn add_grant_tops_up_current_cycle_only(store: Fresh) {
    standard_account(&store, "acme").await;
    let request =
        NewGrant { account: "acme".to_string(), pool: P, amount: usd(25), note: Some("goodwill".to_string()) };
    let g = ok(store.add_grant(request, now()).await, "add_grant($25)");
    assert_eq!(
        (g.account.as_str(), g.pool, g.kind, g.amount, g.cycle_start, g.expires_at, g.note.as_deref(), g.created_at),
        ("acme", P, GrantKind::TopUp, usd(25), nov(), dec(), Some("goodwill"), now()),
        "the grant returned by add_grant"
    );
    let p = pool_balance(&store, "acme", P, now()).await;
    assert_figures_of(&p, fig(usd(75), Nanos::ZERO, Nanos::ZERO, Nanos::ZERO), "after a $25 top-up");
    assert_eq!(p.limit, Some(usd(75)), "a block pool's limit includes top-ups");
    assert_figures(&store, "acme", I, now(), fig(usd(100), Nanos::ZERO, Nanos::ZERO, Nanos::ZERO), "other pool").await;

    let grants = ok(store.grants("acme", now()).await, "grants(acme)");
    assert!(grants.contains(&g), "grants() lists the top-up, got {grants:?}");
    let programmatic: Vec<(GrantKind, Nanos)> =
        grants.iter().filter(|x| x.pool == P).map(|x| (x.kind, x.amount)).collect();
    assert_eq!(programmatic.len(), 2, "programmatic grants: the tier's and the top-up, got {grants:?}");
    assert!(programmatic.contains(&(GrantKind::Tier, usd(50))), "the tier grant is listed, got {grants:?}");

    let next = at("2026-12-10T00:00:00Z");
    assert_figures(&store, "acme", P, next, fig(usd(50), Nanos::ZERO, Nanos::ZERO, Nanos::ZERO), "next cycle").await;
    held(store.hold(hold_request("acme", "h-1", P, usd(75)), now()).await, "$75 against $50 + $25");
    let (refusal, _) = refused(store.hold(hold_request("acme", "h-2", P, Nanos(1)), now()).await, "1 nano more");
    assert_eq!(refusal, Refusal::PoolExhausted { limit: usd(75), remaining: Nanos::ZERO }, "refusal");
}

/// A new cycle starts with a fresh pool when its time has come (no reset job); a refusal says
/// when the pool resets.
pub async fn cycle_rollover_starts_fresh_pool(store: Fresh) {
    standard_account(&store, "acme").await;
    record_one(&store, event("acme", "e-1", P, usd(50), now()), now(), "spend the whole grant").await;
    let (refusal, resets_at) = refused(store.hold(hold_request("acme", "h-1", P, usd(1)), now()).await, "no credit");
    assert_eq!(refusal, Refusal::PoolExhausted { limit: usd(50), remaining: Nanos::ZERO }, "refusal");
    assert_eq!(resets_at, dec(), "resets_at is the cycle end");
    let last_second = at("2026-11-30T23:59:59Z");
    let (_, resets_at) =
        refused(store.hold(hold_request("acme", "h-2", P, usd(1)), last_second).await, "last second of November");
    assert_eq!(resets_at, dec(), "resets_at is the cycle end");

    let balance = ok(store.balance("acme", dec()).await, "balance at the cycle end");
    assert_eq!(
        (balance.cycle.start, balance.cycle.end),
        (dec(), at("2027-01-01T00:00:00Z")),
        "the cycle end is the next cycle's start"
    );
    assert_figures_of(balance.pool(P), fig(usd(50), Nanos::ZERO, Nanos::ZERO, Nanos::ZERO), "fresh December pool");
    let h = held(store.hold(hold_request("acme", "h-3", P, usd(1)), dec()).await, "hold in December");
    assert_eq!((h.cycle_start, h.cycle_end), (dec(), at("2027-01-01T00:00:00Z")), "the hold's cycle");
    assert_eq!(h.remaining_after, Some(usd(49)), "December remaining");
    assert_figures(&store, "acme", P, now(), fig(usd(50), usd(50), Nanos::ZERO, Nanos::ZERO), "November unchanged")
        .await;
}

// ---------------------------------------------------------------------------------------------
// Holds.
// ---------------------------------------------------------------------------------------------

/// A hold that fits is Held, as requested, and reserved in the balance.
pub async fn hold_within_limit(store: Fresh) {
    standard_account(&store, "acme").await;
    let h = held(store.hold(hold_request("acme", "h-1", P, usd(30)), now()).await, "$30 of $50");
    let want = Hold {
        id: "h-1".to_string(),
        account: "acme".to_string(),
        pool: P,
        key: None,
        amount: usd(30),
        model: Some(MODEL.to_string()),
        source: Some(SOURCE.to_string()),
        state: HoldState::Open,
        cycle_start: nov(),
        cycle_end: dec(),
        created_at: now(),
        expires_at: later(TTL_S as i64),
        remaining_after: Some(usd(20)),
        made_by: tollgate_store::Maker::Admin,
    };
    assert_eq!(h, want, "the hold returned");
    assert_eq!(ok(store.hold_by_id("acme", "h-1").await, "hold_by_id"), Some(want), "hold_by_id reads it back");
    assert_eq!(ok(store.hold_by_id("acme", "nope").await, "hold_by_id"), None, "hold_by_id of an unknown id");
    let p = pool_balance(&store, "acme", P, now()).await;
    assert_figures_of(&p, fig(usd(50), Nanos::ZERO, Nanos::ZERO, usd(30)), "after a $30 hold");
    assert_eq!(p.remaining(), Some(usd(20)), "remaining after a $30 hold");
    assert_figures(&store, "acme", I, now(), fig(usd(100), Nanos::ZERO, Nanos::ZERO, Nanos::ZERO), "other pool").await;
    let h2 = held(store.hold(hold_request("acme", "h-2", P, usd(20)), now()).await, "the last $20");
    assert_eq!(h2.remaining_after, Some(Nanos::ZERO), "remaining after the last $20");
}

/// A hold keeps who made it (the gateway, a key, the admin) across a read, on every backend; an
/// account key cannot end a gateway hold or a sibling key's hold through `ownership`, and the
/// hold stays open and whole; an event settled at an estimate keeps its `estimated` flag.
pub async fn hold_keeps_its_maker_and_only_its_maker_ends_it(store: Fresh) {
    use tollgate_store::Maker;
    use tollgate_store::ownership::{self, EndError};
    standard_account(&store, "acme").await;
    let made =
        |id: &str, by: Maker| with_hold_fingerprint(HoldRequest { made_by: by, ..hold_request("acme", id, P, usd(1)) });
    let key = |k: &str| Maker::Key(k.to_string());
    for (id, by) in [("h-gw", Maker::Gateway), ("h-k1", key("k1")), ("h-admin", Maker::Admin)] {
        let h = held(store.hold(made(id, by.clone()), now()).await, id);
        assert_eq!(h.made_by, by, "the hold returned names its maker");
        let read = ok(store.hold_by_id("acme", id).await, "hold_by_id").expect("the hold");
        assert_eq!(read.made_by, by, "hold_by_id reads the maker back");
    }
    let s: &dyn Store = &*store;
    for (id, by, code) in [
        ("h-gw", key("k1"), "hold_owned_by_gateway"),
        ("h-gw", Maker::Admin, "hold_owned_by_gateway"),
        ("h-k1", key("k2"), "hold_made_by_another"),
        ("h-admin", key("k1"), "hold_made_by_another"),
    ] {
        match ownership::void_as(s, &by, "acme", id, now()).await {
            Err(EndError::Denied(d)) => assert_eq!(d.code(), code, "{by:?} voiding {id}"),
            other => panic!("{by:?} voiding {id}: expected a refusal, got {other:?}"),
        }
        let hold = ok(store.hold_by_id("acme", id).await, "hold_by_id").expect("the hold");
        let req = settle_request(&hold, Nanos::ZERO, now());
        assert!(
            matches!(ownership::settle_as(s, &by, req, now()).await, Err(EndError::Denied(_))),
            "{by:?} settling {id}"
        );
        let hold = ok(store.hold_by_id("acme", id).await, "hold_by_id").expect("the hold");
        assert_eq!((hold.state, hold.amount), (HoldState::Open, usd(1)), "{id} is untouched");
    }
    assert_figures(&store, "acme", P, now(), fig(usd(50), Nanos::ZERO, Nanos::ZERO, usd(3)), "three holds open").await;
    ok(
        ownership::void_as(s, &key("k1"), "acme", "h-k1", now())
            .await
            .map_err(|e| format!("{e:?}"))
            .map_err(StoreError::Backend),
        "its maker voids h-k1",
    );
    ok(
        ownership::void_as(s, &Maker::Admin, "acme", "h-admin", now())
            .await
            .map_err(|e| format!("{e:?}"))
            .map_err(StoreError::Backend),
        "the admin voids h-admin",
    );
    let gw = ok(store.hold_by_id("acme", "h-gw").await, "hold_by_id").expect("the hold");
    let mut req = settle_request(&gw, usd(1), now());
    req.event.estimated = true;
    let req = SettleRequest { event: with_event_fingerprint(req.event), ..req };
    let e = ok(store.settle(req, now()).await, "the gateway settles its hold");
    assert!(e.estimated, "the settled event is flagged estimated");
    let stored = all_events(&store, "acme").await;
    assert_eq!(stored.iter().map(|e| (e.id.as_str(), e.estimated)).collect::<Vec<_>>(), [("h-gw", true)], "read back");
    assert_figures(&store, "acme", P, now(), fig(usd(50), usd(1), Nanos::ZERO, Nanos::ZERO), "after").await;
}

/// A hold of exactly what remains fits; one nano more is refused with the pool's limit and
/// remaining, and resets_at at the cycle end.
pub async fn hold_up_to_exact_limit_then_refused(store: Fresh) {
    standard_account(&store, "acme").await;
    let h = held(store.hold(hold_request("acme", "h-1", P, usd(50)), now()).await, "exactly the limit");
    assert_eq!(h.remaining_after, Some(Nanos::ZERO), "remaining after holding the limit");
    let (refusal, resets_at) = refused(store.hold(hold_request("acme", "h-2", P, Nanos(1)), now()).await, "1 nano");
    assert_eq!(refusal, Refusal::PoolExhausted { limit: usd(50), remaining: Nanos::ZERO }, "refusal");
    assert_eq!(resets_at, dec(), "resets_at");
    held(store.hold(hold_request("acme", "h-3", I, usd(100)), now()).await, "the other pool is separate");

    standard_account(&store, "beta").await;
    let over = Nanos(usd(50).0 + 1);
    let (refusal, _) = refused(store.hold(hold_request("beta", "h-1", P, over), now()).await, "$50 + 1 nano");
    assert_eq!(refusal, Refusal::PoolExhausted { limit: usd(50), remaining: usd(50) }, "refusal");
    assert_figures(&store, "beta", P, now(), fig(usd(50), Nanos::ZERO, Nanos::ZERO, Nanos::ZERO), "nothing held").await;
}

/// A refused hold records nothing: its id stays free and is Held once the pool has room.
pub async fn hold_refused_records_nothing(store: Fresh) {
    standard_account(&store, "acme").await;
    held(store.hold(hold_request("acme", "h-a", P, usd(45)), now()).await, "$45");
    let b = hold_request("acme", "h-b", P, usd(10));
    let (refusal, _) = refused(store.hold(b.clone(), now()).await, "$10 with $5 left");
    assert_eq!(refusal, Refusal::PoolExhausted { limit: usd(50), remaining: usd(5) }, "refusal");
    assert_eq!(ok(store.hold_by_id("acme", "h-b").await, "hold_by_id"), None, "a refused hold is not stored");
    assert_figures(&store, "acme", P, now(), fig(usd(50), Nanos::ZERO, Nanos::ZERO, usd(45)), "after refusal").await;
    ok(store.void("acme", "h-a", later(1)).await, "void h-a");
    let h = held(store.hold(b, later(2)).await, "the refused request again, now that there is room");
    assert_eq!(h.amount, usd(10), "amount");
    assert_figures(&store, "acme", P, now(), fig(usd(50), Nanos::ZERO, Nanos::ZERO, usd(10)), "after retry").await;
}

/// A hold must fit limit − (used + overage) − held.
pub async fn hold_counts_charged_and_held(store: Fresh) {
    standard_account(&store, "acme").await;
    record_one(&store, event("acme", "e-1", P, usd(30), now()), now(), "$30 event").await;
    held(store.hold(hold_request("acme", "h-1", P, usd(15)), now()).await, "$15");
    let (refusal, _) = refused(store.hold(hold_request("acme", "h-2", P, usd(6)), now()).await, "$6 with $5 left");
    assert_eq!(refusal, Refusal::PoolExhausted { limit: usd(50), remaining: usd(5) }, "50 − 30 − 15");
    let h = held(store.hold(hold_request("acme", "h-3", P, usd(5)), now()).await, "$5 with $5 left");
    assert_eq!(h.remaining_after, Some(Nanos::ZERO), "remaining after");

    standard_account(&store, "beta").await;
    record_one(&store, event("beta", "e-1", P, usd(60), now()), now(), "$60 event on $50").await;
    assert_figures(&store, "beta", P, now(), fig(usd(50), usd(50), usd(10), Nanos::ZERO), "over the grant").await;
    let (refusal, _) = refused(store.hold(hold_request("beta", "h-1", P, Nanos(1)), now()).await, "1 nano");
    assert_eq!(
        refusal,
        Refusal::PoolExhausted { limit: usd(50), remaining: Nanos::ZERO },
        "overage counts against the limit; remaining is reported as 0, not negative"
    );
}

/// Same id and fingerprint → Replayed (the hold as it is now, reserved once, even when the pool
/// is full); same id, different fingerprint → Conflict.
pub async fn hold_replay_and_conflict(store: Fresh) {
    standard_account(&store, "acme").await;
    let request = hold_request("acme", "h-1", P, usd(10));
    let h = held(store.hold(request.clone(), now()).await, "first");
    let again = replayed(store.hold(request.clone(), later(1)).await, "same id and fingerprint");
    assert_eq!(again, h, "a replay returns the first hold");
    assert_figures(&store, "acme", P, now(), fig(usd(50), Nanos::ZERO, Nanos::ZERO, usd(10)), "reserved once").await;

    let conflicting = hold_request("acme", "h-1", P, usd(11));
    assert_ne!(conflicting.fingerprint, request.fingerprint, "fixture: fingerprints differ");
    expect_err(store.hold(conflicting, later(2)).await, ErrKind::Conflict, "same id, different fingerprint");
    assert_eq!(ok(store.hold_by_id("acme", "h-1").await, "hold_by_id"), Some(h.clone()), "conflict changes nothing");

    held(store.hold(hold_request("acme", "h-2", P, usd(40)), now()).await, "fill the pool");
    let again = replayed(store.hold(request.clone(), later(3)).await, "replay with a full pool");
    assert_eq!(again, h, "a replay is not refused when the pool is full");

    let voided = ok(store.void("acme", "h-1", later(4)).await, "void h-1");
    let again = replayed(store.hold(request, later(5)).await, "replay after void");
    assert_eq!(again.state, HoldState::Voided, "a replay returns the hold as it is now");
    assert_eq!(again, voided, "a replay returns the hold as it is now");
    assert_figures(&store, "acme", P, now(), fig(usd(50), Nanos::ZERO, Nanos::ZERO, usd(40)), "not re-reserved").await;
}

/// A negative amount is refused (AmountNegative) or Invalid, and records nothing.
pub async fn hold_negative_amount_refused(store: Fresh) {
    standard_account(&store, "acme").await;
    match store.hold(hold_request("acme", "h-1", P, Nanos(-1)), now()).await {
        Ok(HoldOutcome::Refused { refusal: Refusal::AmountNegative, .. }) | Err(StoreError::Invalid(_)) => {}
        other => panic!("a hold of -1 nano: expected Refused(AmountNegative) or Err(Invalid), got {other:?}"),
    }
    assert_eq!(ok(store.hold_by_id("acme", "h-1").await, "hold_by_id"), None, "nothing stored");
    assert_figures(&store, "acme", P, now(), fig(usd(50), Nanos::ZERO, Nanos::ZERO, Nanos::ZERO), "nothing held").await;
}

/// A key's cap limits its holds: cap − (Σ charged of its events in the cycle) − its held; the
/// pool is checked first.
pub async fn key_cap_limits_holds(store: Fresh) {
    standard_account(&store, "acme").await;
    ok(store.create_key(new_key("acme", "k-capped", KeyPool::Fixed(P), Some(usd(5))), now()).await, "create_key");
    let keyed = |id: &str, amount: Nanos| with_key(hold_request("acme", id, P, amount), "k-capped");

    let h1 = held(store.hold(keyed("h-1", usd(3)), now()).await, "$3 on a $5 key");
    assert_eq!(h1.key.as_deref(), Some("k-capped"), "the hold names its key");
    let (refusal, resets_at) = refused(store.hold(keyed("h-2", usd(3)), now()).await, "$3 more on the key");
    assert_eq!(refusal, Refusal::KeyCapReached { cap: usd(5), remaining: usd(2) }, "5 − 3 held");
    assert_eq!(resets_at, dec(), "resets_at");
    held(store.hold(hold_request("acme", "h-3", P, usd(3)), now()).await, "$3 without the key");

    let settled = ok(store.settle(settle_request(&h1, usd(1), later(1)), later(1)).await, "settle h-1 at $1");
    assert_eq!(settled.key.as_deref(), Some("k-capped"), "the settled event carries the key");
    let mut ev = event("acme", "e-1", P, usd(2), later(2));
    ev.key = Some("k-capped".to_string());
    record_one(&store, with_event_fingerprint(ev), later(2), "$2 event on the key").await;
    let (refusal, _) = refused(store.hold(keyed("h-4", cents(250)), later(3)).await, "$2.50 on the key");
    assert_eq!(refusal, Refusal::KeyCapReached { cap: usd(5), remaining: usd(2) }, "5 − (1 + 2) charged");
    held(store.hold(keyed("h-5", usd(2)), later(4)).await, "$2 on the key");
    held(store.hold(keyed("h-6", usd(5)), at("2026-12-05T00:00:00Z")).await, "the key's charges start over next cycle");

    standard_account(&store, "small").await;
    ok(store.set_policy("small", P, policy(OnExhausted::Block, None, Some(usd(1)))).await, "set_policy");
    ok(store.create_key(new_key("small", "k-small", KeyPool::Fixed(P), Some(usd(1))), now()).await, "create_key");
    let (refusal, _) = refused(
        store.hold(with_key(hold_request("small", "h-1", P, usd(2)), "k-small"), now()).await,
        "over both pool and key",
    );
    assert_eq!(refusal, Refusal::PoolExhausted { limit: usd(1), remaining: usd(1) }, "the pool is checked first");
}

/// Idempotency ids are per account: two accounts may use the same hold and event ids, and one
/// account cannot reach another's hold.
pub async fn idempotency_ids_are_per_account(store: Fresh) {
    standard_account(&store, "acme").await;
    standard_account(&store, "beta").await;
    let a = held(store.hold(hold_request("acme", "h-1", P, usd(10)), now()).await, "acme h-1");
    let b = held(store.hold(hold_request("beta", "h-1", P, usd(20)), now()).await, "beta h-1 (same id, other account)");
    assert_eq!(ok(store.hold_by_id("acme", "h-1").await, "hold_by_id").map(|h| h.amount), Some(usd(10)), "acme's");
    assert_eq!(ok(store.hold_by_id("beta", "h-1").await, "hold_by_id").map(|h| h.amount), Some(usd(20)), "beta's");
    assert_eq!((a.account.as_str(), b.account.as_str()), ("acme", "beta"), "hold accounts");

    let ea = record_one(&store, event("acme", "e-1", P, usd(1), now()), now(), "acme e-1").await;
    let eb =
        record_one(&store, event("beta", "e-1", P, usd(2), now()), now(), "beta e-1 (same id, other account)").await;
    assert_eq!((ea.account.as_str(), eb.account.as_str()), ("acme", "beta"), "event accounts");

    let settled = ok(store.settle(settle_request(&a, usd(4), later(1)), later(1)).await, "settle acme h-1");
    assert_eq!(settled.account, "acme", "settled event account");
    assert_eq!(hold_state(&store, "beta", "h-1").await, HoldState::Open, "beta's h-1 untouched by acme's settle");
    assert_figures(&store, "acme", P, now(), fig(usd(50), usd(5), Nanos::ZERO, Nanos::ZERO), "acme").await;
    assert_figures(&store, "beta", P, now(), fig(usd(50), usd(2), Nanos::ZERO, usd(20)), "beta").await;

    held(store.hold(hold_request("acme", "only-acme", P, usd(1)), now()).await, "acme only-acme");
    assert_eq!(ok(store.hold_by_id("beta", "only-acme").await, "hold_by_id"), None, "another account's hold");
    expect_err(store.void("beta", "only-acme", now()).await, ErrKind::NotFound, "void of another account's hold");
    expect_err(
        store.extend_hold("beta", "only-acme", TTL_S, now()).await,
        ErrKind::NotFound,
        "extend_hold of another account's hold",
    );
    let mut foreign = settle_request(&a, usd(1), now());
    foreign.account = "beta".to_string();
    foreign.hold_id = "only-acme".to_string();
    foreign.event.account = "beta".to_string();
    foreign.event = with_event_fingerprint(foreign.event);
    expect_err(store.settle(foreign, now()).await, ErrKind::NotFound, "settle of another account's hold");
    assert_eq!(hold_state(&store, "acme", "only-acme").await, HoldState::Open, "acme's hold untouched");
}

// ---------------------------------------------------------------------------------------------
// Settle and void.
// ---------------------------------------------------------------------------------------------

/// Settle charges the real cost from the grants, releases the hold and records the event.
pub async fn settle_charges_and_releases(store: Fresh) {
    standard_account(&store, "acme").await;
    let h = held(store.hold(hold_request("acme", "h-1", P, usd(10)), now()).await, "$10");
    let mut ev = event("acme", "h-1", P, Nanos(3_000_000_123), later(5));
    ev.usage = Usage {
        input_tokens: 1_200,
        cache_creation_5m_input_tokens: 10,
        cache_creation_1h_input_tokens: 20,
        cache_read_input_tokens: 30,
        output_tokens: 400,
        web_search_requests: 1,
    };
    ev.labels = BTreeMap::from([("job".to_string(), "nightly".to_string())]);
    ev.service_tier = Some("batch".to_string());
    ev.inference_geo = Some("us".to_string());
    ev.speed = Some("fast".to_string());
    let ev = with_event_fingerprint(ev);
    let request = SettleRequest { account: "acme".to_string(), hold_id: "h-1".to_string(), event: ev.clone() };
    let e = ok(store.settle(request, later(6)).await, "settle");
    assert_event_carries(&e, &ev, Some(&h), "settle");
    assert_split(&e, Nanos(3_000_000_123), Nanos::ZERO, Nanos::ZERO, "settle under the hold");
    assert_eq!(e.cycle_start, nov(), "event cycle_start");
    assert!(!e.unsettled, "a settled event is not flagged unsettled");
    assert_eq!(e.recorded_at, later(6), "recorded_at is the `now` of settle");

    let after = ok(store.hold_by_id("acme", "h-1").await, "hold_by_id").expect("hold exists");
    assert_eq!((after.state, after.amount), (HoldState::Settled, usd(10)), "the hold is settled, amount kept");
    let p = pool_balance(&store, "acme", P, now()).await;
    assert_figures_of(&p, fig(usd(50), Nanos(3_000_000_123), Nanos::ZERO, Nanos::ZERO), "after settle");
    assert_eq!(p.remaining(), Some(Nanos(50_000_000_000 - 3_000_000_123)), "remaining after settle");
    assert_eq!(all_events(&store, "acme").await, vec![e], "events() lists the settled event");

    let h2 = held(store.hold(hold_request("acme", "h-2", P, usd(1)), later(7)).await, "second hold");
    let mut request = settle_request(&h2, cents(50), later(8));
    request.event.partial = true;
    request.event = with_event_fingerprint(request.event);
    let e2 = ok(store.settle(request, later(8)).await, "partial settle");
    assert!(e2.partial, "the partial flag is kept");
}

/// The settled event's pool and key are the hold's, whatever the request's event says.
pub async fn settle_takes_pool_and_key_from_hold(store: Fresh) {
    standard_account(&store, "acme").await;
    ok(store.create_key(new_key("acme", "k-auto", KeyPool::Auto, None), now()).await, "create_key");
    let h = held(store.hold(with_key(hold_request("acme", "h-1", I, usd(5)), "k-auto"), now()).await, "hold");
    let mut ev = event("acme", "h-1", P, usd(2), later(1));
    ev.key = None;
    let ev = with_event_fingerprint(ev);
    let request = SettleRequest { account: "acme".to_string(), hold_id: "h-1".to_string(), event: ev.clone() };
    let e = ok(store.settle(request, later(1)).await, "settle");
    assert_event_carries(&e, &ev, Some(&h), "settle with another pool and no key in the event");
    assert_figures(&store, "acme", I, now(), fig(usd(100), usd(2), Nanos::ZERO, Nanos::ZERO), "hold's pool").await;
    assert_figures(&store, "acme", P, now(), fig(usd(50), Nanos::ZERO, Nanos::ZERO, Nanos::ZERO), "other pool").await;
}

/// A settle request whose event id is empty records the event under the hold's id (types.rs:
/// "its id defaults to the hold id"), so two holds settled that way never collide on one id.
pub async fn settle_event_id_defaults_to_hold_id(store: Fresh) {
    standard_account(&store, "acme").await;
    for id in ["h-1", "h-2"] {
        let h = held(store.hold(hold_request("acme", id, P, usd(5)), now()).await, "hold");
        let mut request = settle_request(&h, usd(1), later(1));
        request.event.id = String::new();
        request.event = with_event_fingerprint(request.event);
        let e = ok(store.settle(request, later(1)).await, &format!("settle {id} with an empty event id"));
        assert_eq!(e.id, id, "an empty event id defaults to the hold id");
    }
    let listed: Vec<String> = all_events(&store, "acme").await.into_iter().map(|e| e.id).collect();
    assert_eq!(listed, ["h-1", "h-2"], "events() lists them under their hold ids");
}

/// A charge above the hold is recorded as overshoot, and beyond the grants it is overage.
pub async fn settle_overshoot_is_recorded(store: Fresh) {
    standard_account(&store, "acme").await;
    let h = held(store.hold(hold_request("acme", "h-1", P, usd(1)), now()).await, "$1");
    let e = ok(store.settle(settle_request(&h, usd(3), later(1)), later(1)).await, "settle $3 on a $1 hold");
    assert_split(&e, usd(3), Nanos::ZERO, usd(2), "overshoot");
    let h = held(store.hold(hold_request("acme", "h-2", P, usd(1)), now()).await, "$1");
    let e = ok(store.settle(settle_request(&h, cents(40), later(2)), later(2)).await, "settle $0.40 on a $1 hold");
    assert_split(&e, cents(40), Nanos::ZERO, Nanos::ZERO, "under the hold");
    assert_figures(&store, "acme", P, now(), fig(usd(50), cents(340), Nanos::ZERO, Nanos::ZERO), "acme").await;

    standard_account(&store, "beta").await;
    record_one(&store, event("beta", "e-1", P, usd(49), now()), now(), "$49").await;
    let h = held(store.hold(hold_request("beta", "h-1", P, usd(1)), now()).await, "the last $1");
    let e = ok(store.settle(settle_request(&h, usd(3), later(1)), later(1)).await, "settle $3 on the last $1");
    assert_split(&e, usd(1), usd(2), usd(2), "grant part up to the grant, the rest overage, overshoot above the hold");
    let p = pool_balance(&store, "beta", P, now()).await;
    assert_figures_of(&p, fig(usd(50), usd(50), usd(2), Nanos::ZERO), "beta after overshoot");
    assert_eq!(p.remaining(), Some(usd(-2)), "remaining goes negative by the overshoot");
    let (refusal, _) = refused(store.hold(hold_request("beta", "h-2", P, Nanos(1)), later(2)).await, "1 nano");
    assert_eq!(refusal, Refusal::PoolExhausted { limit: usd(50), remaining: Nanos::ZERO }, "refusal");
}

/// The split: grants first, then overage at list × the tier's PAYG multiplier, rounded half up;
/// top-ups count as grants.
pub async fn settle_splits_grant_then_overage_at_multiplier(store: Fresh) {
    let tier = custom_tier("conf-payg15", usd(10), usd(10), 1_500_000);
    account_on_tier(&store, "acme", tier).await;
    ok(store.set_policy("acme", P, policy(OnExhausted::Payg, None, None)).await, "set_policy(payg)");
    let e = record_one(&store, event("acme", "e-1", P, usd(9), now()), now(), "$9 of $10").await;
    assert_split(&e, usd(9), Nanos::ZERO, Nanos::ZERO, "within the grant");

    let h = held(store.hold(hold_request("acme", "h-1", P, usd(5)), now()).await, "$5");
    let e = ok(store.settle(settle_request(&h, usd(3), later(1)), later(1)).await, "settle $3 with $1 of grant left");
    assert_split(&e, usd(1), usd(3), Nanos::ZERO, "$1 from the grant, $2 × 1.5 overage, charged $4 under a $5 hold");
    assert_figures(&store, "acme", P, now(), fig(usd(10), usd(10), usd(3), Nanos::ZERO), "after split").await;

    let h = held(store.hold(hold_request("acme", "h-2", P, Nanos(1)), now()).await, "1 nano");
    let e = ok(store.settle(settle_request(&h, Nanos(3), later(2)), later(2)).await, "settle 3 nanos");
    assert_split(&e, Nanos::ZERO, Nanos(5), Nanos(4), "3 × 1.5 = 4.5 rounds half up to 5; overshoot 5 − 1");
    let outcomes = ok(
        store
            .record_events(
                vec![event("acme", "e-2", P, Nanos(1), now()), event("acme", "e-3", P, Nanos(5), now())],
                now(),
            )
            .await,
        "record 1 and 5 nanos",
    );
    assert_split(&recorded(&outcomes[0], "e-2"), Nanos::ZERO, Nanos(2), Nanos::ZERO, "1 × 1.5 = 1.5 rounds to 2");
    assert_split(&recorded(&outcomes[1], "e-3"), Nanos::ZERO, Nanos(8), Nanos::ZERO, "5 × 1.5 = 7.5 rounds to 8");
    assert_figures(&store, "acme", P, now(), fig(usd(10), usd(10), Nanos(3_000_000_015), Nanos::ZERO), "final").await;

    ok(store.create_account(new_account("topped", "conf-payg15"), now()).await, "create_account(topped)");
    let grant = NewGrant { account: "topped".to_string(), pool: P, amount: usd(5), note: None };
    ok(store.add_grant(grant, now()).await, "add_grant($5)");
    let e = record_one(&store, event("topped", "e-1", P, usd(12), now()), now(), "$12 of $15").await;
    assert_split(&e, usd(12), Nanos::ZERO, Nanos::ZERO, "the top-up is paid from first");
    let e = record_one(&store, event("topped", "e-2", P, usd(4), now()), now(), "$4 with $3 left").await;
    assert_split(&e, usd(3), cents(150), Nanos::ZERO, "$3 from grants, $1 × 1.5 overage");
    assert_figures(&store, "topped", P, now(), fig(usd(15), usd(15), cents(150), Nanos::ZERO), "topped").await;
}

/// Repeating a settle with the same event returns the same event and charges once; a different
/// event is a Conflict.
pub async fn settle_is_idempotent(store: Fresh) {
    standard_account(&store, "acme").await;
    let h = held(store.hold(hold_request("acme", "h-1", P, usd(10)), now()).await, "$10");
    let request = settle_request(&h, usd(4), later(1));
    let first = ok(store.settle(request.clone(), later(1)).await, "settle");
    let again = ok(store.settle(request.clone(), later(30)).await, "the same settle again");
    assert_eq!(again, first, "a repeated settle returns the first event");
    assert_figures(&store, "acme", P, now(), fig(usd(50), usd(4), Nanos::ZERO, Nanos::ZERO), "charged once").await;

    let conflicting = settle_request(&h, usd(5), later(1));
    assert_ne!(conflicting.event.fingerprint, request.event.fingerprint, "fixture: fingerprints differ");
    expect_err(store.settle(conflicting, later(31)).await, ErrKind::Conflict, "settle again with another cost");
    assert_figures(&store, "acme", P, now(), fig(usd(50), usd(4), Nanos::ZERO, Nanos::ZERO), "unchanged").await;
    assert_eq!(all_events(&store, "acme").await, vec![first], "one event");
}

/// Settling a voided or expired hold is a Conflict; an unknown hold is NotFound.
pub async fn settle_refuses_closed_or_unknown_holds(store: Fresh) {
    standard_account(&store, "acme").await;
    let h = held(store.hold(hold_request("acme", "h-1", P, usd(10)), now()).await, "$10");
    ok(store.void("acme", "h-1", later(1)).await, "void");
    expect_err(
        store.settle(settle_request(&h, usd(1), later(2)), later(2)).await,
        ErrKind::Conflict,
        "settle of a voided hold",
    );

    let h = held(store.hold(with_ttl(hold_request("acme", "h-2", P, usd(2)), 60), now()).await, "$2 for 60 s");
    let expired = ok(store.expire_holds(later(60)).await, "expire_holds");
    assert_eq!(expired.len(), 1, "one hold expired, got {expired:?}");
    expect_err(
        store.settle(settle_request(&h, usd(1), later(61)), later(61)).await,
        ErrKind::Conflict,
        "settle of an expired hold",
    );
    let unknown = Hold { id: "nope".to_string(), ..h };
    expect_err(
        store.settle(settle_request(&unknown, usd(1), later(62)), later(62)).await,
        ErrKind::NotFound,
        "settle of an unknown hold",
    );
    assert_figures(&store, "acme", P, now(), fig(usd(50), usd(2), Nanos::ZERO, Nanos::ZERO), "only the expiry").await;
}

/// A lease: several calls' events charged against parts of one open hold, which keeps the rest
/// held; repeats replay, a bad part changes nothing, and the rest is voided or expired as usual.
pub async fn settle_part_charges_calls_against_a_lease(store: Fresh) {
    standard_account(&store, "acme").await;
    ok(store.create_key(new_key("acme", "k-1", KeyPool::Fixed(P), None), now()).await, "create_key");
    let lease = held(store.hold(with_key(hold_request("acme", "lease-1", P, usd(10)), "k-1"), now()).await, "$10");
    let part = |id: &str, cost: Nanos| {
        let mut request = settle_request(&lease, cost, later(1));
        request.event.id = id.to_string();
        request.event = with_event_fingerprint(request.event);
        request
    };
    let a = ok(store.settle_part(part("call-a", cents(30)), usd(1), later(1)).await, "first call");
    assert_eq!((a.hold_id.as_deref(), a.key.as_deref()), (Some("lease-1"), Some("k-1")), "charged to the lease");
    assert_split(&a, cents(30), Nanos::ZERO, Nanos::ZERO, "within its part");
    let b = ok(store.settle_part(part("call-b", usd(3)), usd(2), later(2)).await, "second call");
    assert_split(&b, usd(3), Nanos::ZERO, usd(1), "a charge above its part is overshoot");
    let after = ok(store.hold_by_id("acme", "lease-1").await, "hold_by_id").expect("the lease exists");
    assert_eq!((after.state, after.amount), (HoldState::Open, usd(7)), "the lease stays open with the rest");
    assert_figures(&store, "acme", P, now(), fig(usd(50), cents(330), Nanos::ZERO, usd(7)), "two calls").await;

    assert_eq!(
        ok(store.settle_part(part("call-a", cents(30)), usd(1), later(3)).await, "repeat"),
        a,
        "a repeat replays"
    );
    expect_err(
        store.settle_part(part("call-a", cents(31)), usd(1), later(3)).await,
        ErrKind::Conflict,
        "same id, other cost",
    );
    expect_err(store.settle_part(part("call-c", cents(1)), usd(8), later(3)).await, ErrKind::Invalid, "more than held");
    expect_err(store.settle_part(part("", cents(1)), usd(1), later(3)).await, ErrKind::Invalid, "no event id");
    assert_figures(&store, "acme", P, now(), fig(usd(50), cents(330), Nanos::ZERO, usd(7)), "unchanged").await;

    let v = ok(store.void("acme", "lease-1", later(4)).await, "void the rest");
    assert_eq!((v.state, v.amount), (HoldState::Voided, usd(7)), "voided with the rest");
    expect_err(store.settle_part(part("call-d", cents(1)), cents(1), later(5)).await, ErrKind::Conflict, "after void");
    assert_eq!(
        ok(store.settle_part(part("call-b", usd(3)), usd(2), later(5)).await, "repeat after void"),
        b,
        "a repeat of a part recorded before the void replays it"
    );
    assert_figures(&store, "acme", P, now(), fig(usd(50), cents(330), Nanos::ZERO, Nanos::ZERO), "released").await;

    // A lease left open (its process died) expires at its rest, like any hold.
    let lease = held(store.hold(with_ttl(hold_request("acme", "lease-2", P, usd(5)), 60), now()).await, "$5 for 60 s");
    let mut request = settle_request(&lease, cents(20), later(1));
    request.event.id = "call-e".to_string();
    request.event = with_event_fingerprint(request.event);
    ok(store.settle_part(request, usd(1), later(1)).await, "a call on the second lease");
    let expired = ok(store.expire_holds(later(60)).await, "expire_holds");
    assert_eq!(expired.len(), 1, "the lease expired, got {expired:?}");
    assert_eq!((expired[0].charged(), expired[0].unsettled), (usd(4), true), "charged its rest, flagged unsettled");
    assert_figures(&store, "acme", P, now(), fig(usd(50), cents(750), Nanos::ZERO, Nanos::ZERO), "final").await;
    let audit = ok(store.audit().await, "audit");
    assert!(audit.breaches.is_empty(), "a lease's several events are no breach: {:?}", audit.breaches);
}

/// Void releases an open hold; repeating it returns the voided hold; a settled or expired hold
/// cannot be voided (Conflict); an unknown hold is NotFound.
pub async fn void_releases_and_repeats(store: Fresh) {
    standard_account(&store, "acme").await;
    held(store.hold(hold_request("acme", "h-1", P, usd(10)), now()).await, "$10");
    let v = ok(store.void("acme", "h-1", later(1)).await, "void");
    assert_eq!((v.id.as_str(), v.state, v.amount, v.pool), ("h-1", HoldState::Voided, usd(10), P), "voided hold");
    assert_figures(&store, "acme", P, now(), fig(usd(50), Nanos::ZERO, Nanos::ZERO, Nanos::ZERO), "released").await;
    let again = ok(store.void("acme", "h-1", later(2)).await, "void again");
    assert_eq!(again, v, "a repeated void returns the voided hold");
    assert_eq!(hold_state(&store, "acme", "h-1").await, HoldState::Voided, "hold_by_id after void");

    let h = held(store.hold(hold_request("acme", "h-2", P, usd(50)), later(3)).await, "the whole pool again");
    ok(store.settle(settle_request(&h, usd(1), later(4)), later(4)).await, "settle h-2");
    expect_err(store.void("acme", "h-2", later(5)).await, ErrKind::Conflict, "void of a settled hold");
    assert_eq!(hold_state(&store, "acme", "h-2").await, HoldState::Settled, "still settled");

    held(store.hold(with_ttl(hold_request("acme", "h-3", P, usd(2)), 60), now()).await, "$2 for 60 s");
    ok(store.expire_holds(later(60)).await, "expire_holds");
    expect_err(store.void("acme", "h-3", later(61)).await, ErrKind::Conflict, "void of an expired hold");
    assert_eq!(hold_state(&store, "acme", "h-3").await, HoldState::Expired, "still expired");
    expect_err(store.void("acme", "nope", later(62)).await, ErrKind::NotFound, "void of an unknown hold");
    assert_figures(&store, "acme", P, now(), fig(usd(50), usd(3), Nanos::ZERO, Nanos::ZERO), "final").await;
}

/// extend_hold pushes expires_at to now + ttl, so the sweeper leaves the hold alone until then.
pub async fn extend_hold_pushes_expiry(store: Fresh) {
    standard_account(&store, "acme").await;
    let h = held(store.hold(with_ttl(hold_request("acme", "h-1", P, usd(3)), 60), now()).await, "$3 for 60 s");
    assert_eq!(h.expires_at, later(60), "expires_at = now + ttl");
    let extended = ok(store.extend_hold("acme", "h-1", 600, later(30)).await, "extend_hold by 600 s at +30 s");
    assert_eq!((extended.state, extended.expires_at), (HoldState::Open, later(630)), "extended hold");
    let read = ok(store.hold_by_id("acme", "h-1").await, "hold_by_id").expect("hold exists");
    assert_eq!(read.expires_at, later(630), "hold_by_id sees the new expiry");
    assert!(ok(store.expire_holds(later(120)).await, "expire_holds").is_empty(), "not expired at +120 s");
    assert_eq!(hold_state(&store, "acme", "h-1").await, HoldState::Open, "still open");
    let expired = ok(store.expire_holds(later(630)).await, "expire_holds at the new expiry");
    assert_eq!(expired.len(), 1, "expired at the new expiry, got {expired:?}");
    expect_err(store.extend_hold("acme", "nope", 600, now()).await, ErrKind::NotFound, "extend of an unknown hold");

    held(store.hold(hold_request("acme", "h-2", P, usd(1)), now()).await, "$1");
    ok(store.void("acme", "h-2", later(1)).await, "void h-2");
    assert!(store.extend_hold("acme", "h-2", 600, later(2)).await.is_err(), "extending a voided hold must fail");
    assert_eq!(hold_state(&store, "acme", "h-2").await, HoldState::Voided, "extend does not reopen a hold");
}

// ---------------------------------------------------------------------------------------------
// Events.
// ---------------------------------------------------------------------------------------------

/// Direct events are facts: never refused, beyond the grant they are overage, split in batch order.
pub async fn record_events_are_facts_beyond_limit(store: Fresh) {
    standard_account(&store, "acme").await;
    let e1 = event("acme", "e-1", P, usd(40), now());
    let mut e2 = event("acme", "e-2", P, usd(30), later(1));
    e2.labels = BTreeMap::from([("job".to_string(), "import".to_string())]);
    let e2 = with_event_fingerprint(e2);
    assert!(ok(store.record_events(Vec::new(), now()).await, "record no events").is_empty(), "empty batch");
    let outcomes = ok(store.record_events(vec![e1.clone(), e2.clone()], later(2)).await, "record $40 + $30 on $50");
    assert_eq!(outcomes.len(), 2, "one outcome per event, got {outcomes:?}");
    let r1 = recorded(&outcomes[0], "e-1");
    let r2 = recorded(&outcomes[1], "e-2");
    assert_event_carries(&r1, &e1, None, "e-1");
    assert_event_carries(&r2, &e2, None, "e-2");
    assert_split(&r1, usd(40), Nanos::ZERO, Nanos::ZERO, "e-1");
    assert_split(&r2, usd(10), usd(20), Nanos::ZERO, "e-2 beyond the grant");
    for r in [&r1, &r2] {
        assert_eq!((r.cycle_start, r.unsettled, r.recorded_at), (nov(), false, later(2)), "{}: cycle, flags", r.id);
    }
    assert!(r1.seq < r2.seq, "seq follows the batch order");
    let p = pool_balance(&store, "acme", P, now()).await;
    assert_figures_of(&p, fig(usd(50), usd(50), usd(20), Nanos::ZERO), "facts beyond the limit");
    assert_eq!(p.remaining(), Some(usd(-20)), "remaining below zero after direct events");
    let (refusal, _) = refused(store.hold(hold_request("acme", "h-1", P, Nanos(1)), later(3)).await, "1 nano");
    assert_eq!(refusal, Refusal::PoolExhausted { limit: usd(50), remaining: Nanos::ZERO }, "refusal");
    let r3 = record_one(&store, event("acme", "e-3", P, usd(5), later(4)), later(4), "more").await;
    assert_split(&r3, Nanos::ZERO, usd(5), Nanos::ZERO, "e-3 all overage");
    assert_eq!(all_events(&store, "acme").await, vec![r1, r2, r3], "events() lists them in order");
}

/// A repeated event is a Duplicate of the first and charged once; a batch with a conflicting id
/// fails as a whole and writes nothing.
pub async fn record_events_duplicate_and_batch_conflict(store: Fresh) {
    standard_account(&store, "acme").await;
    let e1 = event("acme", "e-1", P, usd(1), now());
    let first = record_one(&store, e1.clone(), now(), "e-1").await;
    let outcomes = ok(store.record_events(vec![e1.clone()], later(1)).await, "e-1 again");
    assert_eq!(duplicate(&outcomes[0], "e-1 again"), first, "a duplicate returns the first event");
    assert_figures(&store, "acme", P, now(), fig(usd(50), usd(1), Nanos::ZERO, Nanos::ZERO), "charged once").await;

    let e1_changed = event("acme", "e-1", P, usd(7), now());
    let e2 = event("acme", "e-2", P, usd(2), now());
    expect_err(
        store.record_events(vec![e2.clone(), e1_changed.clone()], later(2)).await,
        ErrKind::Conflict,
        "a batch whose second event reuses e-1 with other content",
    );
    assert_eq!(all_events(&store, "acme").await, vec![first.clone()], "a failed batch writes nothing (e-2 absent)");
    assert_figures(&store, "acme", P, now(), fig(usd(50), usd(1), Nanos::ZERO, Nanos::ZERO), "unchanged").await;
    // The first event at fault decides the error, whatever kind: a negative cost before a
    // later event's conflict.
    let negative = event("acme", "e-neg", P, Nanos(-1), now());
    expect_err(
        store.record_events(vec![negative, e1_changed.clone()], later(2)).await,
        ErrKind::Invalid,
        "a negative cost, then e-1 with other content",
    );
    assert_eq!(all_events(&store, "acme").await, vec![first.clone()], "a failed batch writes nothing");
    expect_err(
        store.record_events(vec![e1_changed], later(3)).await,
        ErrKind::Conflict,
        "e-1 alone with other content",
    );

    let e3 = event("acme", "e-3", P, usd(3), now());
    let outcomes = ok(store.record_events(vec![e3.clone(), e1.clone()], later(4)).await, "e-3 + e-1 again");
    let r3 = recorded(&outcomes[0], "e-3");
    assert_event_carries(&r3, &e3, None, "e-3");
    assert_eq!(duplicate(&outcomes[1], "e-1 in a batch"), first, "the duplicate in a batch");
    let r2 = record_one(&store, e2, later(5), "e-2 after its batch failed").await;
    assert_figures(&store, "acme", P, now(), fig(usd(50), usd(6), Nanos::ZERO, Nanos::ZERO), "1 + 3 + 2").await;
    assert_eq!(all_events(&store, "acme").await, vec![first, r3, r2], "three events");
}

/// One event id twice in one batch: with the same content the second is a Duplicate of the
/// first, charged once; with other content the whole batch fails and writes nothing.
pub async fn record_events_one_id_twice_in_a_batch(store: Fresh) {
    standard_account(&store, "acme").await;
    let e1 = event("acme", "e-1", P, usd(4), now());
    let e2 = event("acme", "e-2", P, usd(2), now());
    let outcomes = ok(store.record_events(vec![e1.clone(), e2, e1.clone()], later(1)).await, "e-1, e-2, e-1");
    let r1 = recorded(&outcomes[0], "e-1");
    assert_event_carries(&r1, &e1, None, "e-1");
    recorded(&outcomes[1], "e-2");
    assert_eq!(duplicate(&outcomes[2], "e-1 again in its batch"), r1, "the duplicate is the batch's own e-1");
    assert_figures(&store, "acme", P, now(), fig(usd(50), usd(6), Nanos::ZERO, Nanos::ZERO), "e-1 charged once").await;

    let e3 = event("acme", "e-3", P, usd(1), now());
    let e3_changed = event("acme", "e-3", P, usd(9), now());
    expect_err(
        store.record_events(vec![e3, e3_changed], later(2)).await,
        ErrKind::Conflict,
        "a batch that names e-3 twice with other content",
    );
    assert_eq!(all_events(&store, "acme").await.len(), 2, "the failed batch wrote nothing");
    assert_figures(&store, "acme", P, now(), fig(usd(50), usd(6), Nanos::ZERO, Nanos::ZERO), "unchanged").await;
}

/// A late event is booked in the cycle containing its timestamp, with that cycle's tier grant.
pub async fn late_event_booked_in_its_cycle(store: Fresh) {
    standard_account(&store, "acme").await;
    held(store.hold(hold_request("acme", "h-1", P, usd(10)), now()).await, "November hold");
    let october = at("2026-10-20T08:00:00Z");
    let e = record_one(&store, event("acme", "e-1", P, usd(5), october), now(), "October event").await;
    assert_eq!(e.cycle_start, at("2026-10-01T00:00:00Z"), "booked in October's cycle");
    assert_eq!(e.recorded_at, now(), "recorded now");
    let balance = ok(store.balance("acme", october).await, "balance in October");
    assert_eq!((balance.cycle.start, balance.cycle.end), (at("2026-10-01T00:00:00Z"), nov()), "October's cycle");
    assert_figures_of(balance.pool(P), fig(usd(50), usd(5), Nanos::ZERO, Nanos::ZERO), "October");
    assert_figures(&store, "acme", P, now(), fig(usd(50), Nanos::ZERO, Nanos::ZERO, usd(10)), "November untouched")
        .await;
    let e = record_one(&store, event("acme", "e-2", P, usd(60), at("2026-10-25T00:00:00Z")), now(), "$60 late").await;
    assert_split(&e, usd(45), usd(15), Nanos::ZERO, "October's grant, then overage");
    assert_figures(&store, "acme", P, october, fig(usd(50), usd(50), usd(15), Nanos::ZERO), "October after").await;
    assert_figures(&store, "acme", P, now(), fig(usd(50), Nanos::ZERO, Nanos::ZERO, usd(10)), "November still").await;
}

/// events() filters by account (never another's), pool, model, since/until, and pages by seq.
pub async fn events_query_filters_and_pages(store: Fresh) {
    standard_account(&store, "acme").await;
    standard_account(&store, "beta").await;
    let ev = |account: &str, id: &str, pool: PoolKind, model: &str, ts: &str| {
        let mut e = event(account, id, pool, cents(10), at(ts));
        e.model = model.to_string();
        with_event_fingerprint(e)
    };
    let batch1 = vec![
        ev("acme", "a1", P, MODEL, "2026-11-02T10:00:00Z"),
        ev("acme", "a2", I, OTHER_MODEL, "2026-11-03T10:00:00Z"),
        ev("acme", "a3", P, OTHER_MODEL, "2026-11-04T10:00:00Z"),
    ];
    ok(store.record_events(batch1, now()).await, "acme batch 1");
    ok(store.record_events(vec![ev("beta", "b1", P, MODEL, "2026-11-03T12:00:00Z")], now()).await, "beta");
    let batch2 = vec![
        ev("acme", "a4", P, MODEL, "2026-11-05T10:00:00Z"),
        ev("acme", "a5", I, MODEL, "2026-11-06T10:00:00Z"),
        ev("acme", "a6", P, MODEL, "2026-10-20T10:00:00Z"),
    ];
    ok(store.record_events(batch2, now()).await, "acme batch 2");

    let ids = |events: &[Event]| events.iter().map(|e| e.id.clone()).collect::<Vec<_>>();
    let query = |f: &dyn Fn(&mut EventQuery)| {
        let mut q = all_events_query("acme");
        f(&mut q);
        q
    };
    let all = ok(store.events(query(&|_| {})).await, "all acme events");
    assert_eq!(ids(&all), ["a1", "a2", "a3", "a4", "a5", "a6"], "all of acme's events, in seq order");
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq), "seq strictly increases");
    assert!(all.iter().all(|e| e.account == "acme"), "only acme's events");

    let cases: Vec<(&str, EventQuery, Vec<&str>)> = vec![
        ("pool programmatic", query(&|q| q.pool = Some(P)), vec!["a1", "a3", "a4", "a6"]),
        ("pool interactive", query(&|q| q.pool = Some(I)), vec!["a2", "a5"]),
        ("model", query(&|q| q.model = Some(OTHER_MODEL.to_string())), vec!["a2", "a3"]),
        (
            "since Nov 3 until Nov 5",
            query(&|q| {
                q.since = Some(at("2026-11-03T00:00:00Z"));
                q.until = Some(at("2026-11-05T00:00:00Z"));
            }),
            vec!["a2", "a3"],
        ),
        ("since Nov 1", query(&|q| q.since = Some(nov())), vec!["a1", "a2", "a3", "a4", "a5"]),
        ("until Nov 1", query(&|q| q.until = Some(nov())), vec!["a6"]),
        (
            "programmatic since Nov 3",
            query(&|q| {
                q.pool = Some(P);
                q.since = Some(at("2026-11-03T00:00:00Z"));
            }),
            vec!["a3", "a4"],
        ),
    ];
    for (name, q, want) in cases {
        let got = ok(store.events(q).await, name);
        assert_eq!(ids(&got), want, "events() filtered by {name}");
    }

    let mut pages = Vec::new();
    let mut after = None;
    loop {
        let page = ok(
            store
                .events(query(&|q| {
                    q.after_seq = after;
                    q.limit = 2;
                }))
                .await,
            "a page",
        );
        assert!(page.len() <= 2, "a page holds at most `limit` events, got {}", page.len());
        let Some(last) = page.last() else { break };
        after = Some(last.seq);
        pages.push(ids(&page));
        assert!(pages.len() <= 4, "paging does not end: {pages:?}");
    }
    assert_eq!(pages, [vec!["a1", "a2"], vec!["a3", "a4"], vec!["a5", "a6"]], "pages of 2 by after_seq");

    let beta = ok(store.events(all_events_query("beta")).await, "beta events");
    assert_eq!(ids(&beta), ["b1"], "beta sees only its own event");
    let beta_after = ok(
        store.events(EventQuery { after_seq: Some(0), ..all_events_query("beta") }).await,
        "beta events after seq 0",
    );
    assert_eq!(ids(&beta_after), ["b1"], "after_seq never reaches another account's events");
}

/// Money is exact integer nanos, from single nanos to billions of dollars.
pub async fn money_is_exact(store: Fresh) {
    standard_account(&store, "acme").await;
    for i in 1..=3 {
        let e =
            record_one(&store, event("acme", &format!("e-{i}"), P, Nanos(6_000_000), now()), now(), "6e6 nanos").await;
        assert_split(&e, Nanos(6_000_000), Nanos::ZERO, Nanos::ZERO, "6e6 nanos");
    }
    assert_figures(&store, "acme", P, now(), fig(usd(50), Nanos(18_000_000), Nanos::ZERO, Nanos::ZERO), "3 × 6e6")
        .await;
    for i in 1..=7 {
        let h = held(store.hold(hold_request("acme", &format!("n-{i}"), P, Nanos(1)), now()).await, "1 nano");
        ok(store.settle(settle_request(&h, Nanos(1), later(1)), later(1)).await, "settle 1 nano");
    }
    for i in 1..=3 {
        held(store.hold(hold_request("acme", &format!("t-{i}"), P, Nanos(333_333_333)), now()).await, "1/3 USD");
    }
    ok(
        store.add_grant(NewGrant { account: "acme".to_string(), pool: P, amount: Nanos(1), note: None }, now()).await,
        "add_grant(1 nano)",
    );
    let p = pool_balance(&store, "acme", P, now()).await;
    assert_figures_of(&p, fig(Nanos(50_000_000_001), Nanos(18_000_007), Nanos::ZERO, Nanos(999_999_999)), "exact");
    assert_eq!(p.remaining(), Some(Nanos(50_000_000_001 - 18_000_007 - 999_999_999)), "exact remaining");

    // Far beyond what a float holds exactly (2^53 ≈ 9.007e15).
    standard_account(&store, "whale").await;
    let big = Nanos(9_000_000_000_000_000_001);
    ok(
        store.add_grant(NewGrant { account: "whale".to_string(), pool: P, amount: big, note: None }, now()).await,
        "add_grant(9e18 + 1 nanos)",
    );
    let total = Nanos(9_000_000_050_000_000_001);
    assert_figures(&store, "whale", P, now(), fig(total, Nanos::ZERO, Nanos::ZERO, Nanos::ZERO), "huge grant").await;
    let h = held(store.hold(hold_request("whale", "h-1", P, total), now()).await, "hold all of it");
    assert_eq!(h.remaining_after, Some(Nanos::ZERO), "exactly nothing left");
    let (refusal, _) = refused(store.hold(hold_request("whale", "h-2", P, Nanos(1)), now()).await, "1 nano more");
    assert_eq!(refusal, Refusal::PoolExhausted { limit: total, remaining: Nanos::ZERO }, "exact refusal");
    let e = ok(store.settle(settle_request(&h, Nanos(total.0 - 1), later(1)), later(1)).await, "settle all but 1");
    assert_split(&e, Nanos(total.0 - 1), Nanos::ZERO, Nanos::ZERO, "huge settle");
    assert_figures(&store, "whale", P, now(), fig(total, Nanos(total.0 - 1), Nanos::ZERO, Nanos::ZERO), "huge used")
        .await;
}

// ---------------------------------------------------------------------------------------------
// Expiry and recovery.
// ---------------------------------------------------------------------------------------------

/// expire_holds settles every open hold with expires_at ≤ now at its amount, flagged unsettled,
/// under the hold's id; other holds are untouched; a second sweep finds nothing.
pub async fn expire_holds_settles_past_ttl(store: Fresh) {
    standard_account(&store, "acme").await;
    ok(store.create_key(new_key("acme", "k-1", KeyPool::Fixed(P), None), now()).await, "create_key");
    let h1 = held(store.hold(with_ttl(with_key(hold_request("acme", "h-1", P, usd(3)), "k-1"), 60), now()).await, "h1");
    held(store.hold(hold_request("acme", "h-2", P, usd(4)), now()).await, "h2 with the default ttl");
    let h3 = held(store.hold(with_ttl(hold_request("acme", "h-3", P, usd(2)), 60), now()).await, "h3");
    ok(store.settle(settle_request(&h3, usd(1), later(10)), later(10)).await, "settle h3");
    held(store.hold(with_ttl(hold_request("acme", "h-4", P, usd(5)), 60), now()).await, "h4");
    ok(store.void("acme", "h-4", later(10)).await, "void h4");

    assert!(ok(store.expire_holds(later(59)).await, "expire_holds at +59 s").is_empty(), "nothing due at +59 s");
    let expired = ok(store.expire_holds(later(60)).await, "expire_holds at +60 s");
    assert_eq!(expired.len(), 1, "only h-1 is due at +60 s (expires_at ≤ now), got {expired:?}");
    let e = &expired[0];
    assert_eq!(
        (e.id.as_str(), e.hold_id.as_deref(), e.account.as_str(), e.pool, e.key.as_deref()),
        ("h-1", Some("h-1"), "acme", P, Some("k-1")),
        "the expiry event (id, hold_id, account, pool, key)"
    );
    assert_eq!(e.charged(), usd(3), "charged at the held amount");
    assert_split(e, usd(3), Nanos::ZERO, Nanos::ZERO, "expiry");
    assert!(e.unsettled, "flagged unsettled");
    assert_eq!(e.cycle_start, h1.cycle_start, "booked in the hold's cycle");
    assert_eq!(hold_state(&store, "acme", "h-1").await, HoldState::Expired, "h-1 expired");
    assert_eq!(hold_state(&store, "acme", "h-2").await, HoldState::Open, "h-2 not due");
    assert_eq!(hold_state(&store, "acme", "h-3").await, HoldState::Settled, "h-3 settled before");
    assert_eq!(hold_state(&store, "acme", "h-4").await, HoldState::Voided, "h-4 voided before");
    assert_figures(&store, "acme", P, now(), fig(usd(50), usd(4), Nanos::ZERO, usd(4)), "3 expired + 1 settled").await;
    assert!(ok(store.expire_holds(later(61)).await, "expire_holds again").is_empty(), "a second sweep finds nothing");
    assert!(all_events(&store, "acme").await.contains(e), "events() lists the expiry event");

    let expired = ok(store.expire_holds(later(TTL_S as i64)).await, "expire_holds at the default ttl");
    let ids: Vec<&str> = expired.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["h-2"], "h-2 due at its ttl");
    assert_figures(&store, "acme", P, now(), fig(usd(50), usd(8), Nanos::ZERO, Nanos::ZERO), "all closed").await;
}

/// An expired hold is charged to the cycle it reserved, even when swept after that cycle ended.
pub async fn expired_hold_is_charged_to_its_cycle(store: Fresh) {
    standard_account(&store, "acme").await;
    let h = held(store.hold(hold_request("acme", "h-1", P, usd(2)), at("2026-11-30T23:58:00Z")).await, "late hold");
    assert_eq!((h.cycle_start, h.cycle_end), (nov(), dec()), "the hold's cycle");
    let expired = ok(store.expire_holds(at("2026-12-01T00:10:00Z")).await, "expire_holds in December");
    assert_eq!(expired.len(), 1, "the hold expired, got {expired:?}");
    assert_eq!(expired[0].cycle_start, nov(), "charged to November");
    assert_figures(&store, "acme", P, now(), fig(usd(50), usd(2), Nanos::ZERO, Nanos::ZERO), "November").await;
    let december = at("2026-12-05T00:00:00Z");
    assert_figures(&store, "acme", P, december, fig(usd(50), Nanos::ZERO, Nanos::ZERO, Nanos::ZERO), "December").await;
}

/// At start, open holds are settled like expired ones (single-process backend: all of them);
/// closed holds are untouched.
pub async fn recover_open_holds_settles_open_holds(store: Fresh) {
    standard_account(&store, "acme").await;
    ok(store.create_key(new_key("acme", "k-1", KeyPool::Fixed(P), None), now()).await, "create_key");
    held(store.hold(hold_request("acme", "h-1", P, usd(3)), now()).await, "h1");
    held(store.hold(with_ttl(with_key(hold_request("acme", "h-2", P, usd(4)), "k-1"), 3_600), now()).await, "h2");
    let h3 = held(store.hold(hold_request("acme", "h-3", P, usd(5)), now()).await, "h3");
    ok(store.settle(settle_request(&h3, usd(1), later(1)), later(1)).await, "settle h3");
    held(store.hold(hold_request("acme", "h-4", I, usd(6)), now()).await, "h4");
    ok(store.void("acme", "h-4", later(1)).await, "void h4");

    let events = ok(store.recover_open_holds(later(2)).await, "recover_open_holds");
    let mut recovered: Vec<&str> = events.iter().filter_map(|e| e.hold_id.as_deref()).collect();
    recovered.sort_unstable();
    assert_eq!(recovered, ["h-1", "h-2"], "every open hold is recovered, closed ones are not: {events:?}");
    for e in &events {
        assert!(e.unsettled, "{}: a recovered hold's event is flagged unsettled", e.id);
        assert_eq!(Some(e.id.as_str()), e.hold_id.as_deref(), "{}: the event id is the hold id", e.id);
    }
    assert_eq!(events.iter().find(|e| e.id == "h-2").map(|e| e.charged()), Some(usd(4)), "h-2 charged its amount");
    assert_eq!(events.iter().find(|e| e.id == "h-2").and_then(|e| e.key.clone()), Some("k-1".to_string()), "key");
    for (id, state) in [("h-1", HoldState::Expired), ("h-2", HoldState::Expired), ("h-3", HoldState::Settled)] {
        assert_eq!(hold_state(&store, "acme", id).await, state, "{id} after recovery");
    }
    assert_eq!(hold_state(&store, "acme", "h-4").await, HoldState::Voided, "h-4 after recovery");
    assert_figures(&store, "acme", P, now(), fig(usd(50), usd(8), Nanos::ZERO, Nanos::ZERO), "no open hold left").await;
    assert_figures(&store, "acme", I, now(), fig(usd(100), Nanos::ZERO, Nanos::ZERO, Nanos::ZERO), "voided").await;
    assert!(ok(store.recover_open_holds(later(3)).await, "recover again").is_empty(), "nothing left to recover");
}

// ---------------------------------------------------------------------------------------------
// Keys.
// ---------------------------------------------------------------------------------------------

/// Keys: create, list per account, find by hash (revoked or not), revoke; ids are unique and one
/// account cannot revoke another's key.
pub async fn keys_create_list_lookup_revoke(store: Fresh) {
    standard_account(&store, "acme").await;
    standard_account(&store, "beta").await;
    let mut request = new_key("acme", "k-1", KeyPool::Fixed(P), Some(usd(5)));
    request.name = Some("ci".to_string());
    request.labels = BTreeMap::from([("team".to_string(), "data".to_string())]);
    let k1 = ok(store.create_key(request.clone(), now()).await, "create_key(k-1)");
    assert_eq!(
        (
            k1.id.as_str(),
            k1.account.as_str(),
            k1.name.as_deref(),
            k1.pool,
            &k1.labels,
            k1.cap,
            k1.created_at,
            k1.revoked_at
        ),
        ("k-1", "acme", Some("ci"), KeyPool::Fixed(P), &request.labels, Some(usd(5)), now(), None),
        "the key returned by create_key"
    );
    let k2 = ok(store.create_key(new_key("acme", "k-2", KeyPool::Auto, None), later(1)).await, "create_key(k-2)");
    assert_eq!((k2.pool, k2.cap), (KeyPool::Auto, None), "k-2");
    expect_err(
        store.create_key(new_key("acme", "k-1", KeyPool::Auto, None), later(2)).await,
        ErrKind::Conflict,
        "create_key with a taken id",
    );

    let mut listed = ok(store.keys("acme").await, "keys(acme)");
    listed.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(listed, vec![k1.clone(), k2.clone()], "keys(acme)");
    assert!(ok(store.keys("beta").await, "keys(beta)").is_empty(), "keys(beta) holds none of acme's keys");
    assert_eq!(ok(store.key_by_hash(&key_hash("k-1")).await, "key_by_hash"), Some(k1.clone()), "key_by_hash(k-1)");
    assert_eq!(ok(store.key_by_hash(&key_hash("nope")).await, "key_by_hash"), None, "key_by_hash of an unknown hash");

    expect_err(store.revoke_key("beta", "k-1", later(3)).await, ErrKind::NotFound, "revoke another account's key");
    expect_err(store.revoke_key("acme", "nope", later(3)).await, ErrKind::NotFound, "revoke an unknown key");
    assert_eq!(ok(store.key_by_hash(&key_hash("k-1")).await, "key_by_hash"), Some(k1.clone()), "not revoked yet");
    let revoked = ok(store.revoke_key("acme", "k-1", later(3_600)).await, "revoke_key(k-1)");
    assert_eq!(
        revoked,
        tollgate_store::Key { revoked_at: Some(later(3_600)), ..k1 },
        "revoke_key sets revoked_at only"
    );
    assert_eq!(
        ok(store.key_by_hash(&key_hash("k-1")).await, "key_by_hash"),
        Some(revoked.clone()),
        "key_by_hash finds a revoked key, with revoked_at"
    );
    let mut listed = ok(store.keys("acme").await, "keys(acme)");
    listed.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(listed, vec![revoked, k2], "keys(acme) after revoke");
}

// ---------------------------------------------------------------------------------------------
// Audit.
// ---------------------------------------------------------------------------------------------

/// After a mixed workload (holds, settles with overshoot, voids, direct and late events beyond
/// the limit, top-ups, expiry, keys, PAYG), the audit finds no breach and counts sensibly.
pub async fn audit_clean_after_mixed_workload(store: Fresh) {
    standard_account(&store, "acme").await;
    standard_account(&store, "beta").await;
    ok(store.set_policy("beta", P, policy(OnExhausted::Payg, Some(usd(20)), None)).await, "set_policy(beta)");
    ok(store.create_key(new_key("acme", "k-1", KeyPool::Fixed(P), Some(usd(20))), now()).await, "create_key");
    ok(
        store.add_grant(NewGrant { account: "acme".to_string(), pool: I, amount: usd(10), note: None }, now()).await,
        "add_grant",
    );

    let h1 = held(store.hold(with_key(hold_request("acme", "h-1", P, usd(5)), "k-1"), now()).await, "h1");
    ok(store.settle(settle_request(&h1, usd(3), later(1)), later(1)).await, "settle h1");
    held(store.hold(hold_request("acme", "h-2", I, usd(10)), now()).await, "h2");
    ok(store.void("acme", "h-2", later(1)).await, "void h2");
    held(store.hold(with_ttl(hold_request("acme", "h-3", P, usd(2)), 60), now()).await, "h3");
    let h4 = held(store.hold(hold_request("acme", "h-4", P, usd(1)), now()).await, "h4");
    ok(store.settle(settle_request(&h4, usd(4), later(2)), later(2)).await, "settle h4 with overshoot");
    held(store.hold(hold_request("acme", "h-5", I, usd(7)), now()).await, "h5 stays open");
    record_one(&store, event("acme", "e-1", P, usd(30), later(3)), later(3), "e1").await;
    record_one(&store, event("acme", "e-2", P, usd(60), at("2026-10-20T00:00:00Z")), later(3), "late e2").await;
    refused(store.hold(hold_request("acme", "h-6", P, usd(40)), later(4)).await, "h6 too big");

    record_one(&store, event("beta", "e-1", P, usd(55), now()), now(), "beta e1").await;
    let hb = held(store.hold(hold_request("beta", "h-1", P, usd(10)), now()).await, "beta hold within payg");
    ok(store.settle(settle_request(&hb, usd(12), later(1)), later(1)).await, "settle beta");
    ok(store.expire_holds(later(60)).await, "expire_holds");

    let audit = ok(store.audit().await, "audit");
    assert!(audit.breaches.is_empty(), "a consistent store has no breaches, got {:#?}", audit.breaches);
    let events = all_events(&store, "acme").await.len() + all_events(&store, "beta").await.len();
    assert_eq!(events, 7, "fixture: acme h-1, h-3, h-4, e-1, e-2 and beta e-1, h-1");
    assert_eq!(audit.events_checked, events as u64, "the audit checks every event");
    assert_eq!(audit.holds_open, 1, "one hold is open (acme h-5)");
    assert!(
        audit.pools_checked >= 4,
        "the audit checks every pool and cycle written (acme P Nov, I Nov, P Oct, beta P Nov), got {}",
        audit.pools_checked
    );
}

/// Charges above their holds (overshoot: the upstream reported more than the worst case held)
/// are no breach, but the audit names them: one warning per pool and cycle, with the total and
/// the number of events, lease parts included; direct events and charges within their holds
/// are not named.
pub async fn audit_warns_of_overshoot_per_pool_and_cycle(store: Fresh) {
    standard_account(&store, "acme").await;
    standard_account(&store, "beta").await;
    let october = at("2026-10-20T00:00:00Z");
    let h = held(store.hold(hold_request("acme", "h-0", P, usd(1)), october).await, "October $1");
    ok(store.settle(settle_request(&h, usd(2), october), october).await, "October: $1 above its hold");
    let h = held(store.hold(hold_request("acme", "h-1", P, usd(1)), now()).await, "$1");
    ok(store.settle(settle_request(&h, usd(3), later(1)), later(1)).await, "$2 above its hold");
    let h = held(store.hold(hold_request("acme", "h-2", P, usd(1)), now()).await, "$1");
    ok(store.settle(settle_request(&h, cents(150), later(2)), later(2)).await, "$0.50 above its hold");
    let h = held(store.hold(hold_request("acme", "h-3", P, usd(1)), now()).await, "$1");
    ok(store.settle(settle_request(&h, cents(40), later(3)), later(3)).await, "within its hold");
    let h = held(store.hold(hold_request("acme", "h-4", I, usd(1)), now()).await, "interactive $1");
    ok(store.settle(settle_request(&h, cents(90), later(3)), later(3)).await, "interactive, within its hold");
    record_one(&store, event("acme", "e-1", P, usd(60), later(4)), later(4), "a direct event past the limit").await;

    let lease = held(store.hold(hold_request("beta", "lease-1", P, usd(5)), now()).await, "beta's lease");
    let mut part = settle_request(&lease, usd(2), later(1));
    part.event.id = "call-1".to_string();
    part.event = with_event_fingerprint(part.event);
    ok(store.settle_part(part, usd(1), later(1)).await, "a lease part $1 above what it held");

    let audit = ok(store.audit().await, "audit");
    assert!(audit.breaches.is_empty(), "overshoot is no breach: {:#?}", audit.breaches);
    assert_eq!(
        audit.warnings,
        [
            "account acme pool programmatic cycle 2026-10-01T00:00:00+00:00: 1 event was charged $1.00 above its hold \
             (overshoot)",
            "account acme pool programmatic cycle 2026-11-01T00:00:00+00:00: 2 events were charged $2.50 above their \
             holds (overshoot)",
            "account beta pool programmatic cycle 2026-11-01T00:00:00+00:00: 1 event was charged $1.00 above its hold \
             (overshoot)",
        ],
        "one warning per pool and cycle with overshoot, in account, pool and cycle order"
    );
}

// ---------------------------------------------------------------------------------------------
// Concurrency.
// ---------------------------------------------------------------------------------------------

async fn hold_concurrently(store: &Fresh, requests: Vec<HoldRequest>, at: DateTime<Utc>) -> Vec<HoldOutcome> {
    let barrier = Arc::new(Barrier::new(requests.len()));
    let tasks: Vec<_> = requests
        .into_iter()
        .map(|request| {
            let store = store.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                store.hold(request, at).await
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        let result = task.await.expect("a hold task panicked");
        outcomes.push(ok(result, "a concurrent hold"));
    }
    outcomes
}

fn held_of(outcomes: &[HoldOutcome]) -> Vec<Hold> {
    outcomes
        .iter()
        .filter_map(|o| match o {
            HoldOutcome::Held(h) => Some(h.clone()),
            _ => None,
        })
        .collect()
}

fn refusals_of(outcomes: &[HoldOutcome]) -> Vec<Refusal> {
    outcomes
        .iter()
        .filter_map(|o| match o {
            HoldOutcome::Refused { refusal, .. } => Some(*refusal),
            _ => None,
        })
        .collect()
}

/// 200 concurrent $1 holds on a $10 block pool: exactly 10 Held, 190 Refused, never more.
/// Then concurrent settles and voids, exact balances, and a second burst fills what is left.
pub async fn concurrent_holds_never_overshoot(store: Fresh) {
    account_on_tier(&store, "acme", custom_tier("conf-ten", usd(10), usd(10), PPM)).await;
    let requests = (0..200).map(|i| hold_request("acme", &format!("c-{i}"), P, usd(1))).collect();
    let outcomes = hold_concurrently(&store, requests, now()).await;
    let holds = held_of(&outcomes);
    let refusals = refusals_of(&outcomes);
    assert_eq!((holds.len(), refusals.len()), (10, 190), "200 × $1 on $10: exactly 10 Held and 190 Refused");
    for r in &refusals {
        assert_eq!(*r, Refusal::PoolExhausted { limit: usd(10), remaining: Nanos::ZERO }, "every refusal");
    }
    let mut remaining: Vec<Nanos> = holds.iter().map(|h| h.remaining_after.expect("limited pool")).collect();
    remaining.sort();
    assert_eq!(remaining, (0..10).map(usd).collect::<Vec<_>>(), "each hold saw the one before it (serializable)");
    let p = pool_balance(&store, "acme", P, now()).await;
    assert_figures_of(&p, fig(usd(10), Nanos::ZERO, Nanos::ZERO, usd(10)), "after the burst (one tier grant)");
    assert_eq!(p.remaining(), Some(Nanos::ZERO), "nothing remains");
    let held_ids: BTreeSet<&str> = holds.iter().map(|h| h.id.as_str()).collect();
    for i in 0..200 {
        let id = format!("c-{i}");
        let stored = ok(store.hold_by_id("acme", &id).await, "hold_by_id").is_some();
        assert_eq!(stored, held_ids.contains(id.as_str()), "{id}: only Held holds are stored");
    }

    // Settle five and void five, all at once.
    let costs = [cents(25), cents(50), cents(75), usd(1), cents(150)];
    let barrier = Arc::new(Barrier::new(holds.len()));
    let tasks: Vec<_> = holds
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let store = store.clone();
            let barrier = barrier.clone();
            let h = h.clone();
            let cost = costs.get(i).copied();
            tokio::spawn(async move {
                barrier.wait().await;
                match cost {
                    Some(cost) => store.settle(settle_request(&h, cost, later(1)), later(1)).await.map(Some),
                    None => store.void(&h.account, &h.id, later(1)).await.map(|_| None),
                }
            })
        })
        .collect();
    let mut events = Vec::new();
    for task in tasks {
        if let Some(e) = ok(task.await.expect("a settle/void task panicked"), "a concurrent settle or void") {
            events.push(e);
        }
    }
    assert_eq!(events.len(), 5, "five settled");
    let overshoot: i64 = events.iter().map(|e| e.overshoot.0).sum();
    assert_eq!(Nanos(overshoot), cents(50), "the $1.50 settle of a $1 hold overshot by $0.50");
    let p = pool_balance(&store, "acme", P, now()).await;
    assert_figures_of(&p, fig(usd(10), usd(4), Nanos::ZERO, Nanos::ZERO), "0.25 + 0.5 + 0.75 + 1 + 1.5 settled");
    assert_eq!(p.remaining(), Some(usd(6)), "$6 remains");

    let requests = (0..100).map(|i| hold_request("acme", &format!("d-{i}"), P, usd(1))).collect();
    let outcomes = hold_concurrently(&store, requests, later(2)).await;
    assert_eq!(
        (held_of(&outcomes).len(), refusals_of(&outcomes).len()),
        (6, 94),
        "100 × $1 with $6 left: exactly 6 Held"
    );
    let p = pool_balance(&store, "acme", P, now()).await;
    assert_figures_of(&p, fig(usd(10), usd(4), Nanos::ZERO, usd(6)), "after the second burst");
    let audit = ok(store.audit().await, "audit");
    assert!(audit.breaches.is_empty(), "no breaches after the bursts, got {:#?}", audit.breaches);
}

/// Concurrent holds on a capped key: exactly what the cap allows; holds without the key are not
/// limited by it.
pub async fn concurrent_holds_respect_key_cap(store: Fresh) {
    standard_account(&store, "acme").await;
    ok(store.create_key(new_key("acme", "k-1", KeyPool::Fixed(P), Some(usd(3))), now()).await, "create_key");
    let requests = (0..100)
        .map(|i| with_key(hold_request("acme", &format!("k-{i}"), P, usd(1)), "k-1"))
        .chain((0..20).map(|i| hold_request("acme", &format!("n-{i}"), P, usd(1))))
        .collect();
    let outcomes = hold_concurrently(&store, requests, now()).await;
    let holds = held_of(&outcomes);
    let keyed = holds.iter().filter(|h| h.key.is_some()).count();
    let unkeyed = holds.iter().filter(|h| h.key.is_none()).count();
    assert_eq!((keyed, unkeyed), (3, 20), "a $3 key admits 3 × $1; the 20 holds without it all fit");
    for r in refusals_of(&outcomes) {
        assert_eq!(r, Refusal::KeyCapReached { cap: usd(3), remaining: Nanos::ZERO }, "every refusal is the key's");
    }
    assert_figures(&store, "acme", P, now(), fig(usd(50), Nanos::ZERO, Nanos::ZERO, usd(23)), "held").await;
}

/// Many concurrent settles of one hold: one charge, one event, every caller gets that event.
pub async fn concurrent_settles_charge_once(store: Fresh) {
    standard_account(&store, "acme").await;
    let h = held(store.hold(hold_request("acme", "h-1", P, usd(5)), now()).await, "$5");
    let request = settle_request(&h, usd(2), later(1));
    let barrier = Arc::new(Barrier::new(50));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let store = store.clone();
            let barrier = barrier.clone();
            let request = request.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                store.settle(request, later(1)).await
            })
        })
        .collect();
    let mut events = Vec::new();
    for task in tasks {
        events.push(ok(task.await.expect("a settle task panicked"), "a concurrent settle of the same hold"));
    }
    assert!(events.windows(2).all(|w| w[0] == w[1]), "every settle returns the same event");
    assert_eq!(all_events(&store, "acme").await, vec![events[0].clone()], "one event");
    assert_figures(&store, "acme", P, now(), fig(usd(50), usd(2), Nanos::ZERO, Nanos::ZERO), "charged once").await;
}

/// A settle and a void racing on each hold: exactly one wins, and the balance matches the winners.
pub async fn concurrent_settle_and_void_have_one_winner(store: Fresh) {
    standard_account(&store, "acme").await;
    let mut holds = Vec::new();
    for i in 0..20 {
        holds.push(held(store.hold(hold_request("acme", &format!("h-{i}"), P, usd(2)), now()).await, "hold"));
    }
    let barrier = Arc::new(Barrier::new(holds.len() * 2));
    let mut tasks = Vec::new();
    for h in &holds {
        let (s1, s2, b1, b2, h1, h2) =
            (store.clone(), store.clone(), barrier.clone(), barrier.clone(), h.clone(), h.clone());
        tasks.push(tokio::spawn(async move {
            b1.wait().await;
            s1.settle(settle_request(&h1, usd(1), later(1)), later(1)).await.map(|_| ())
        }));
        tasks.push(tokio::spawn(async move {
            b2.wait().await;
            s2.void(&h2.account, &h2.id, later(1)).await.map(|_| ())
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.expect("a settle/void task panicked"));
    }
    let mut settled = 0i64;
    for (i, pair) in results.chunks(2).enumerate() {
        let id = &holds[i].id;
        let state = hold_state(&store, "acme", id).await;
        match (&pair[0], &pair[1], state) {
            (Ok(()), Err(StoreError::Conflict(_)), HoldState::Settled) => settled += 1,
            (Err(StoreError::Conflict(_)), Ok(()), HoldState::Voided) => {}
            other => panic!("{id}: exactly one of settle and void must win, the other a Conflict; got {other:?}"),
        }
    }
    assert_figures(&store, "acme", P, now(), fig(usd(50), usd(settled), Nanos::ZERO, Nanos::ZERO), "winners").await;
    assert_eq!(all_events(&store, "acme").await.len() as i64, settled, "one event per settled hold");
}

/// Concurrent copies of one event: one Recorded, the rest Duplicate of it, charged once; many
/// distinct concurrent events split exactly across grant and overage.
pub async fn concurrent_duplicate_events_charge_once(store: Fresh) {
    standard_account(&store, "acme").await;
    let ev = event("acme", "e-1", P, usd(1), now());
    let barrier = Arc::new(Barrier::new(50));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (store, barrier, ev) = (store.clone(), barrier.clone(), ev.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                store.record_events(vec![ev], now()).await
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        let mut batch = ok(task.await.expect("a record task panicked"), "a concurrent record of the same event");
        assert_eq!(batch.len(), 1, "one outcome per event");
        outcomes.push(batch.remove(0));
    }
    let firsts: Vec<&EventOutcome> = outcomes.iter().filter(|o| matches!(o, EventOutcome::Recorded(_))).collect();
    assert_eq!(firsts.len(), 1, "exactly one Recorded among 50 copies");
    let first = firsts[0].event().clone();
    assert!(outcomes.iter().all(|o| o.event() == &first), "every Duplicate returns the recorded event");
    assert_figures(&store, "acme", P, now(), fig(usd(50), usd(1), Nanos::ZERO, Nanos::ZERO), "charged once").await;

    standard_account(&store, "beta").await;
    let barrier = Arc::new(Barrier::new(60));
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let (store, barrier) = (store.clone(), barrier.clone());
            let ev = event("beta", &format!("e-{i}"), P, usd(1), now());
            tokio::spawn(async move {
                barrier.wait().await;
                store.record_events(vec![ev], now()).await
            })
        })
        .collect();
    let (mut grant, mut overage) = (0i64, 0i64);
    for task in tasks {
        let batch = ok(task.await.expect("a record task panicked"), "a concurrent record");
        let e = recorded(&batch[0], "a distinct event");
        grant += e.grant_part.0;
        overage += e.overage_part.0;
    }
    assert_eq!((Nanos(grant), Nanos(overage)), (usd(50), usd(10)), "60 × $1 on $50: Σ grant parts, Σ overage parts");
    assert_figures(&store, "beta", P, now(), fig(usd(50), usd(50), usd(10), Nanos::ZERO), "beta").await;
}

/// Concurrent copies of one hold request: one Held, the rest Replayed, reserved once.
pub async fn concurrent_hold_replays_reserve_once(store: Fresh) {
    standard_account(&store, "acme").await;
    let request = hold_request("acme", "h-1", P, usd(7));
    let outcomes = hold_concurrently(&store, vec![request; 50], now()).await;
    let holds = held_of(&outcomes);
    assert_eq!(holds.len(), 1, "exactly one Held among 50 copies, got {outcomes:?}");
    for o in &outcomes {
        match o {
            HoldOutcome::Held(h) | HoldOutcome::Replayed(h) => assert_eq!(h.id, "h-1", "the same hold"),
            other => panic!("a copy of an admitted hold must be Replayed, got {other:?}"),
        }
    }
    assert_figures(&store, "acme", P, now(), fig(usd(50), Nanos::ZERO, Nanos::ZERO, usd(7)), "reserved once").await;
}

// ---------------------------------------------------------------------------------------------
// Alerts: rules, the history (each alert once), the delivery outbox.
// ---------------------------------------------------------------------------------------------

fn alert_rule(id: &str, kind: AlertKind, from_config: bool) -> AlertRule {
    AlertRule {
        id: id.to_string(),
        kind,
        account: None,
        pool: Some(P),
        percents: vec![50, 80, 100],
        window_s: None,
        factor_ppm: None,
        floor: None,
        days: None,
        channels: vec!["ops".to_string(), "slack".to_string()],
        from_config,
    }
}

fn new_alert(rule: &str, account: &str, pool: PoolKind, dedupe: &str, fired_at: DateTime<Utc>) -> NewAlert {
    NewAlert {
        rule_id: rule.to_string(),
        kind: AlertKind::Threshold,
        account: account.to_string(),
        pool,
        cycle_start: at("2026-11-01T00:00:00Z"),
        cycle_end: at("2026-12-01T00:00:00Z"),
        dedupe: dedupe.to_string(),
        percent: dedupe.parse().ok(),
        used: usd(40),
        limit: Some(usd(50)),
        message: format!("{account} passed {dedupe}%"),
        fired_at,
        channels: vec!["ops".to_string(), "slack".to_string()],
    }
}

pub async fn alert_rules_put_list_delete_and_config_rules_are_protected(store: Fresh) {
    ok(store.put_alert_rule(alert_rule("api-1", AlertKind::Threshold, false)).await, "put api rule");
    let mut spike = alert_rule("api-2", AlertKind::Spike, false);
    spike.window_s = Some(300);
    spike.factor_ppm = Some(3_000_000);
    spike.floor = Some(cents(50));
    spike.account = Some("acme".into());
    spike.pool = None;
    ok(store.put_alert_rule(spike.clone()).await, "put spike rule");
    ok(store.replace_config_alert_rules(vec![alert_rule("cfg-1", AlertKind::CapHit, true)]).await, "config rules");
    let rules = ok(store.alert_rules().await, "alert_rules");
    assert_eq!(rules.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["api-1", "api-2", "cfg-1"]);
    assert_eq!(rules[1], spike, "a rule reads back as written");
    assert!(rules[2].from_config);
    // The API cannot change or delete a configured rule.
    let err = store.put_alert_rule(alert_rule("cfg-1", AlertKind::Threshold, false)).await;
    assert!(matches!(err, Err(StoreError::Conflict(_))), "{err:?}");
    assert!(matches!(store.delete_alert_rule("cfg-1").await, Err(StoreError::Conflict(_))));
    assert!(matches!(store.delete_alert_rule("nope").await, Err(StoreError::NotFound(_))));
    ok(store.delete_alert_rule("api-1").await, "delete api rule");
    // A new configuration replaces the configured rules only.
    ok(store.replace_config_alert_rules(vec![alert_rule("cfg-2", AlertKind::Forecast, true)]).await, "reload");
    let ids: Vec<String> = ok(store.alert_rules().await, "alert_rules").into_iter().map(|r| r.id).collect();
    assert_eq!(ids, ["api-2", "cfg-2"]);
}

pub async fn alerts_fire_once_per_rule_pool_cycle_and_dedupe(store: Fresh) {
    let first = ok(store.fire_alert(new_alert("r", "acme", P, "80", now())).await, "fire");
    let first = first.expect("a new alert is recorded");
    assert!(first.id.starts_with("alr_") && first.id.len() == 24, "{}", first.id);
    assert_eq!(first.id, alert_id("r", "acme", P, at("2026-11-01T00:00:00Z"), "80"), "the id is its key's digest");
    assert_eq!(ok(store.fire_alert(new_alert("r", "acme", P, "80", later(5))).await, "again"), None, "once only");
    let mut other_cycle = new_alert("r", "acme", P, "80", later(6));
    other_cycle.cycle_start = at("2026-12-01T00:00:00Z");
    assert!(ok(store.fire_alert(other_cycle).await, "next cycle").is_some(), "each cycle fires again");
    assert!(ok(store.fire_alert(new_alert("r", "acme", P, "100", later(7))).await, "100").is_some());
    assert!(ok(store.fire_alert(new_alert("r", "acme", I, "80", later(8))).await, "other pool").is_some());
    assert!(ok(store.fire_alert(new_alert("r", "globex", P, "80", later(9))).await, "other account").is_some());
    // Two deliveries (one per channel) per recorded alert: 5 alerts × 2.
    let claimed = ok(store.claim_deliveries(later(60), 30, 100).await, "claim");
    assert_eq!(claimed.len(), 10, "{claimed:?}");
    assert_eq!(claimed.iter().filter(|d| d.alert.id == first.id).count(), 2);
}

pub async fn alerts_history_filters_newest_first(store: Fresh) {
    for (i, (account, pool)) in [("acme", P), ("acme", I), ("globex", P), ("acme", P)].into_iter().enumerate() {
        let mut a = new_alert("r", account, pool, &format!("{}", 50 + i), later(i as i64));
        if i == 3 {
            a.kind = AlertKind::CapHit;
        }
        ok(store.fire_alert(a).await, "fire");
    }
    let all = ok(store.alerts(AlertQuery { limit: 100, ..AlertQuery::default() }).await, "alerts");
    assert_eq!(
        all.iter().map(|a| a.percent).collect::<Vec<_>>(),
        [Some(53), Some(52), Some(51), Some(50)],
        "newest first"
    );
    let q = AlertQuery { account: Some("acme".into()), pool: Some(P), limit: 100, ..AlertQuery::default() };
    assert_eq!(ok(store.alerts(q).await, "acme P").len(), 2);
    let q = AlertQuery { kind: Some(AlertKind::CapHit), limit: 100, ..AlertQuery::default() };
    let caps = ok(store.alerts(q).await, "cap_hit");
    assert_eq!((caps.len(), caps[0].kind, caps[0].used, caps[0].limit), (1, AlertKind::CapHit, usd(40), Some(usd(50))));
    let q = AlertQuery { since: Some(later(2)), limit: 100, ..AlertQuery::default() };
    assert_eq!(ok(store.alerts(q).await, "since").len(), 2);
    let q = AlertQuery { limit: 1, ..AlertQuery::default() };
    assert_eq!(ok(store.alerts(q).await, "limit").len(), 1);
}

pub async fn deliveries_are_leased_retried_and_finished(store: Fresh) {
    let mut a = new_alert("r", "acme", P, "80", now());
    a.channels = vec!["ops".into()];
    ok(store.fire_alert(a).await, "fire");
    let first = ok(store.claim_deliveries(now(), 30, 10).await, "claim");
    assert_eq!(first.len(), 1);
    assert_eq!((first[0].channel.as_str(), first[0].attempts), ("ops", 0));
    assert!(ok(store.claim_deliveries(later(10), 30, 10).await, "leased").is_empty(), "leased to one caller");
    // The holder died: the lease runs out and the delivery is due again.
    let again = ok(store.claim_deliveries(later(31), 30, 10).await, "lease ran out");
    assert_eq!(again.len(), 1);
    // A failure: retried at the given time, with the attempt counted.
    ok(store.delivery_failed(again[0].id, Some(later(100)), "503").await, "failed");
    assert!(ok(store.claim_deliveries(later(99), 30, 10).await, "not yet").is_empty());
    let retry = ok(store.claim_deliveries(later(100), 30, 10).await, "retry");
    assert_eq!(retry[0].attempts, 1);
    ok(store.delivery_done(retry[0].id, later(101)).await, "done");
    assert!(ok(store.claim_deliveries(later(10_000), 30, 10).await, "done").is_empty(), "done is done");
    // Given up: never again.
    let mut b = new_alert("r", "acme", P, "100", now());
    b.channels = vec!["ops".into()];
    ok(store.fire_alert(b).await, "fire b");
    let b = ok(store.claim_deliveries(later(200), 30, 10).await, "claim b");
    ok(store.delivery_failed(b[0].id, None, "400").await, "give up");
    assert!(ok(store.claim_deliveries(later(100_000), 30, 10).await, "given up").is_empty());
}

pub async fn concurrent_claims_hand_each_delivery_out_once(store: Fresh) {
    for i in 0..20 {
        let mut a = new_alert("r", "acme", P, &i.to_string(), now());
        a.channels = vec!["ops".into()];
        ok(store.fire_alert(a).await, "fire");
    }
    let barrier = Arc::new(Barrier::new(8));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (store, barrier) = (store.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let mut mine = Vec::new();
            for _ in 0..5 {
                mine.extend(ok(store.claim_deliveries(later(1), 60, 3).await, "claim").into_iter().map(|d| d.id));
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("claimer"));
    }
    all.sort_unstable();
    let unique: BTreeSet<i64> = all.iter().copied().collect();
    assert_eq!(all.len(), unique.len(), "no delivery handed out twice: {all:?}");
    assert_eq!(unique.len(), 20, "every delivery handed out");
}

// ---------------------------------------------------------------------------------------------
// Rollups: what reports read.
// ---------------------------------------------------------------------------------------------

pub async fn rollups_add_up_to_the_events(store: Fresh) {
    standard_account(&store, "acme").await;
    let mut a = event("acme", "e-1", P, cents(3), now());
    a.latency_ms = Some(100);
    let mut b = event("acme", "e-2", P, cents(5), later(60));
    b.latency_ms = Some(300);
    let mut c = event("acme", "e-3", I, cents(7), later(3_600));
    c.model = OTHER_MODEL.to_string();
    c.latency_ms = None;
    for e in [a, b, c] {
        ok(store.record_events(vec![with_event_fingerprint(e)], now()).await, "record");
    }
    let h = held(store.hold(hold_request("acme", "h-1", P, usd(1)), now()).await, "hold");
    ok(store.settle(settle_request(&h, cents(11), later(120)), later(120)).await, "settle");
    // A batch that fails leaves nothing behind, in the rollups either.
    let dup = with_event_fingerprint(event("acme", "e-1", P, cents(99), now()));
    let fresh = with_event_fingerprint(event("acme", "e-9", P, cents(13), now()));
    assert!(store.record_events(vec![fresh, dup], now()).await.is_err(), "a conflicting batch fails");

    let cycle = at("2026-11-01T00:00:00Z");
    let rollups = ok(store.rollups("acme", cycle, Dims::ALL).await, "rollups");
    let sum = |pool: PoolKind| {
        rollups.iter().filter(|r| r.pool == pool).fold((0u64, Nanos::ZERO, 0u64, 0u64), |acc, r| {
            (acc.0 + r.calls, acc.1.saturating_add(r.cost), acc.2 + r.usage.input_tokens, acc.3 + r.timed)
        })
    };
    assert_eq!(sum(P), (3, cents(19), 3_000, 3), "3 programmatic calls: 3¢ + 5¢ + 11¢");
    assert_eq!(sum(I), (1, cents(7), 1_000, 0), "1 interactive call without latency");
    let other = rollups.iter().find(|r| r.model == OTHER_MODEL).expect("the other model has its rollup");
    assert_eq!(other.hour, at("2026-11-10T13:00:00Z"), "hours start on the hour");
    let latency: u64 = rollups.iter().filter(|r| r.pool == P).map(|r| r.latency_ms_sum).sum();
    assert_eq!(latency, 100 + 300 + 850, "latency sums (the settle's event says 850 ms)");
    let charged: Nanos = rollups.iter().fold(Nanos::ZERO, |s, r| s.saturating_add(r.charged));
    assert_eq!(charged, cents(26), "charged = Σ events");
    assert!(ok(store.rollups("acme", at("2026-12-01T00:00:00Z"), Dims::ALL).await, "next cycle").is_empty());
    assert!(ok(store.rollups("nobody", cycle, Dims::ALL).await, "unknown account").is_empty());

    // Summed over the dimensions a reader leaves out: one row per pool, then per (pool, model).
    let mut per_pool = ok(store.rollups("acme", cycle, Dims::NONE).await, "rollups per pool");
    per_pool.sort_by_key(|r| r.pool.as_str());
    let rows: Vec<_> =
        per_pool.iter().map(|r| (r.pool, r.hour, r.model.as_str(), r.calls, r.charged, r.timed)).collect();
    assert_eq!(rows, [(I, cycle, "", 1, cents(7), 0), (P, cycle, "", 3, cents(19), 3)], "one row per pool");
    assert_eq!(per_pool[1].latency_ms_sum, 1_250, "latency summed");
    let by_model = ok(store.rollups("acme", cycle, Dims { model: true, ..Dims::NONE }).await, "rollups per model");
    let mut rows: Vec<_> = by_model.iter().map(|r| (r.pool, r.model.as_str(), r.calls, r.source.as_str())).collect();
    rows.sort();
    assert_eq!(rows, [(I, OTHER_MODEL, 1, ""), (P, MODEL, 3, "")], "one row per (pool, model)");
}

#[cfg(test)]
mod tests {
    /// Every `pub async fn` case of this module is listed in `conformance_suite!`, and nothing else.
    #[test]
    fn every_case_is_listed_in_the_macro() {
        let source = include_str!("suite.rs");
        let cases: std::collections::BTreeSet<&str> = source
            .lines()
            .filter_map(|l| l.strip_prefix("pub async fn "))
            .map(|rest| rest.split('(').next().expect("a name").trim())
            .collect();
        let start = source.find("$crate::conformance_suite!(@cases $factory;").expect("the macro's case list");
        let list = &source[start..];
        let list = &list[list.find(';').expect("list start") + 1..list.find(");").expect("list end")];
        let listed: std::collections::BTreeSet<&str> = list.split_whitespace().collect();
        assert_eq!(listed, cases, "conformance_suite! must list exactly the cases of suite.rs");
        assert!(cases.len() >= 40, "found only {} cases: the scan is broken", cases.len());
    }
}
