//! The live feed of ledger activity, for the dashboard and `tollgate top` (`GET /api/v1/stream`).
//!
//! Calls are not sent one by one (at thousands per second a browser would drown): each pool's
//! calls are tallied and a ticker publishes one [`FeedItem::Calls`] per active pool per window,
//! followed by the balances of the accounts that moved. Subscribers that fall behind lose the
//! oldest items and are told how many (a live view, not a log: the ledger is the record).

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use tokio::sync::broadcast;
use tollgate_core::{Nanos, PoolKind};

use crate::Balance;

/// What one pool did during one window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub calls: u64,
    pub refused: u64,
    pub charged: Nanos,
    pub tokens: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FeedItem {
    Calls { account: String, pool: PoolKind, window_end: DateTime<Utc>, window_s: u64, tally: Tally },
    Balance(Box<Balance>),
    Alert(Box<crate::alerts::Alert>),
}

impl FeedItem {
    pub fn account(&self) -> &str {
        match self {
            FeedItem::Calls { account, .. } => account,
            FeedItem::Balance(b) => &b.account,
            FeedItem::Alert(a) => &a.account,
        }
    }
}

pub struct Feed {
    tx: broadcast::Sender<FeedItem>,
    tallies: Mutex<HashMap<(String, PoolKind), Tally>>,
}

/// Items kept for a slow subscriber before it starts losing the oldest.
const FEED_CAPACITY: usize = 4_096;

impl Default for Feed {
    fn default() -> Self {
        Feed { tx: broadcast::channel(FEED_CAPACITY).0, tallies: Mutex::default() }
    }
}

impl Feed {
    pub fn subscribe(&self) -> broadcast::Receiver<FeedItem> {
        self.tx.subscribe()
    }

    /// Counts a charged call (or a recorded event) of a pool.
    pub fn charged(&self, account: &str, pool: PoolKind, charged: Nanos, tokens: u64) {
        #[allow(clippy::expect_used, reason = "never poisoned: the tallies are locked only to count, drain and sort")]
        let mut tallies = self.tallies.lock().expect("feed tallies");
        let t = tallies.entry((account.to_string(), pool)).or_default();
        t.calls += 1;
        t.charged = t.charged.saturating_add(charged);
        t.tokens = t.tokens.saturating_add(tokens);
    }

    /// Counts a call refused for credit.
    pub fn refused(&self, account: &str, pool: PoolKind) {
        #[allow(clippy::expect_used, reason = "never poisoned: the tallies are locked only to count, drain and sort")]
        let mut tallies = self.tallies.lock().expect("feed tallies");
        tallies.entry((account.to_string(), pool)).or_default().refused += 1;
    }

    /// Takes the window's tallies (the ticker publishes them).
    pub fn take_tallies(&self) -> Vec<((String, PoolKind), Tally)> {
        #[allow(clippy::expect_used, reason = "never poisoned: the tallies are locked only to count, drain and sort")]
        let mut tallies = self.tallies.lock().expect("feed tallies");
        let mut out: Vec<_> = tallies.drain().collect();
        out.sort_by(|a, b| (&a.0.0, a.0.1.as_str()).cmp(&(&b.0.0, b.0.1.as_str())));
        out
    }

    /// Sends an item to every subscriber (none listening is fine).
    pub fn publish(&self, item: FeedItem) {
        let _ = self.tx.send(item);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_add_up_per_pool_and_reset_when_taken() {
        let feed = Feed::default();
        feed.charged("acme", PoolKind::Programmatic, Nanos(600_000), 120);
        feed.charged("acme", PoolKind::Programmatic, Nanos(400_000), 80);
        feed.refused("acme", PoolKind::Programmatic);
        feed.charged("acme", PoolKind::Interactive, Nanos(1), 1);
        let taken = feed.take_tallies();
        assert_eq!(taken.len(), 2);
        let programmatic = taken.iter().find(|(k, _)| k.1 == PoolKind::Programmatic).unwrap().1;
        assert_eq!(programmatic, Tally { calls: 2, refused: 1, charged: Nanos(1_000_000), tokens: 200 });
        assert!(feed.take_tallies().is_empty());
    }
}
