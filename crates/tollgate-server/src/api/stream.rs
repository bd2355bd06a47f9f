//! `GET /api/v1/stream`: server-sent events of ledger activity (SPEC sections 5 and 9). The
//! admin sees every account; an account key sees its own account only. Event names: `calls`
//! (one per active pool per second: calls, refusals, charged, tokens) and `balance` (the
//! balance JSON of SPEC section 11, after activity) and `alert` (the webhook body of SPEC
//! section 11, when an alert fires). A subscriber too slow to keep up gets a
//! `lagged` event saying how many items it missed.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;
use tollgate_store::feed::FeedItem;

use crate::AppState;
use crate::auth::Caller;
use crate::dto;

pub async fn stream(State(s): State<AppState>, caller: Caller) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let receiver = s.feed.subscribe();
    let only = match caller {
        Caller::Admin => None,
        Caller::Account { account, .. } => Some(account),
    };
    let events = futures_util::stream::unfold((receiver, only), |(mut rx, only)| async move {
        loop {
            let event = match rx.recv().await {
                Ok(item) if only.as_deref().is_none_or(|a| a == item.account()) => sse_event(&item),
                Ok(_) => continue,
                Err(RecvError::Lagged(n)) => Event::default().event("lagged").data(json!({ "missed": n }).to_string()),
                Err(RecvError::Closed) => return None,
            };
            return Some((Ok(event), (rx, only)));
        }
    });
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

fn sse_event(item: &FeedItem) -> Event {
    match item {
        FeedItem::Calls { account, pool, window_end, window_s, tally } => Event::default().event("calls").data(
            json!({
                "account": account,
                "pool": pool.as_str(),
                "window_end": dto::time(*window_end),
                "window_s": window_s,
                "calls": tally.calls,
                "refused": tally.refused,
                "charged_usd": dto::usd(tally.charged),
                "tokens": tally.tokens,
            })
            .to_string(),
        ),
        FeedItem::Balance(b) => Event::default().event("balance").data(dto::balance(b).to_string()),
        FeedItem::Alert(a) => Event::default().event("alert").data(super::alerts::alert_json(a).to_string()),
    }
}
