//! Ledger writes made again while the store is unavailable (restarting, its connection lost,
//! its disk full), so that a moment's absence neither loses a served call's charge nor leaves a
//! hold to expire at its held amount.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tollgate_store::{Store, StoreError, StoreResult};

/// Longest pause between two tries of a write the store was unavailable for.
const STORE_RETRY_PAUSE_MAX: Duration = Duration::from_secs(1);

/// Runs a write that ends a hold (settle, settle of a part, void) again while the store is
/// unavailable (restarting, its connection lost, its disk full), for up to the hold's time to
/// live: a served call's charge is not lost, nor its hold left to expire at its held amount,
/// because the store was away for a moment. These writes are idempotent (the hold's and the
/// event's ids), so one whose outcome was unknown is safely made again. Past the bound, the hold
/// is left to the sweeper.
pub(crate) async fn until_stored<T, F, W>(hold_ttl_s: u64, what: &str, mut write: F) -> StoreResult<T>
where
    F: FnMut() -> W,
    W: std::future::Future<Output = StoreResult<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(hold_ttl_s);
    let mut pause = Duration::from_millis(50);
    loop {
        match write().await {
            Err(StoreError::Unavailable(m)) if Instant::now() + pause < deadline => {
                tracing::warn!(error = %m, what, "the store is unavailable; the write will be tried again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(STORE_RETRY_PAUSE_MAX);
            }
            result => return result,
        }
    }
}

/// Voids, in the background and once the store is back, a hold whose write failed with the
/// store unavailable: it may have landed all the same. A hold that did not is not found.
pub(crate) fn void_unknown_hold(store: Arc<dyn Store>, now: DateTime<Utc>, ttl_s: u64, account: String, id: String) {
    tokio::spawn(async move {
        match until_stored(ttl_s, "void", || store.void(&account, &id, now)).await {
            Ok(_) => tracing::warn!(hold = %id, "a hold written while the store was unavailable was voided"),
            Err(StoreError::NotFound(_)) => {}
            Err(e) => {
                tracing::error!(error = %e, hold = %id, "could not void a hold of unknown outcome; the sweeper will expire it")
            }
        }
    });
}
