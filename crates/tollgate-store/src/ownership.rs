//! Who may end a hold (SPEC section 3): a hold made by the gateway (a call's own hold or a lease)
//! is settled, voided or extended only by the gateway, from what the upstream reported; a hold
//! made through the API only by its maker, or by the admin. The management API ends holds only
//! through these functions, so an account key cannot make a call it did not pay for free.
//!
//! A hold's maker and key never change once it is made, so reading the hold and then ending it
//! (two steps) decides the same as one atomic step would.

use chrono::{DateTime, Utc};

use crate::{Event, Hold, Maker, SettleRequest, Store, StoreError};

/// Why a caller may not end a hold.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// The gateway made it; only the gateway (or the expiry sweeper) ends it.
    #[error("hold {0:?} belongs to a gateway call; only the gateway settles it, from what the upstream reported")]
    OwnedByGateway(String),
    /// Another key (or the admin) made it.
    #[error("hold {0:?} was made by another key or the admin; a key ends only the holds it made")]
    MadeByAnother(String),
}

impl Denied {
    /// The stable code of the refusal.
    pub fn code(&self) -> &'static str {
        match self {
            Denied::OwnedByGateway(_) => "hold_owned_by_gateway",
            Denied::MadeByAnother(_) => "hold_made_by_another",
        }
    }
}

/// Whether `by` may settle, void or extend `hold`.
pub fn may_end(hold: &Hold, by: &Maker) -> Result<(), Denied> {
    let allowed = match (&hold.made_by, by) {
        (Maker::Gateway, Maker::Gateway) => true,
        (Maker::Gateway, _) => return Err(Denied::OwnedByGateway(hold.id.clone())),
        // The gateway ends only its own holds.
        (_, Maker::Gateway) => false,
        (_, Maker::Admin) => true,
        (Maker::Key(maker), Maker::Key(caller)) => maker == caller,
        (Maker::Admin, Maker::Key(_)) => false,
    };
    if allowed { Ok(()) } else { Err(Denied::MadeByAnother(hold.id.clone())) }
}

/// What ending a hold on someone's behalf can fail with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndError {
    Denied(Denied),
    Store(StoreError),
}

impl From<StoreError> for EndError {
    fn from(e: StoreError) -> Self {
        EndError::Store(e)
    }
}

async fn checked(store: &dyn Store, by: &Maker, account: &str, hold_id: &str) -> Result<Hold, EndError> {
    let hold = store
        .hold_by_id(account, hold_id)
        .await?
        .ok_or_else(|| EndError::Store(StoreError::NotFound(format!("hold {hold_id:?}"))))?;
    may_end(&hold, by).map_err(EndError::Denied)?;
    Ok(hold)
}

/// `Store::settle` for `by`, if it may end the hold.
pub async fn settle_as(
    store: &dyn Store,
    by: &Maker,
    request: SettleRequest,
    now: DateTime<Utc>,
) -> Result<Event, EndError> {
    checked(store, by, &request.account, &request.hold_id).await?;
    Ok(store.settle(request, now).await?)
}

/// `Store::void` for `by`, if it may end the hold.
pub async fn void_as(
    store: &dyn Store,
    by: &Maker,
    account: &str,
    hold_id: &str,
    now: DateTime<Utc>,
) -> Result<Hold, EndError> {
    checked(store, by, account, hold_id).await?;
    Ok(store.void(account, hold_id, now).await?)
}

/// The hold, if `by` may end it (a settle needs the hold's model and key first).
pub async fn hold_for(store: &dyn Store, by: &Maker, account: &str, hold_id: &str) -> Result<Hold, EndError> {
    checked(store, by, account, hold_id).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hold(made_by: Maker) -> Hold {
        use chrono::TimeZone;
        let t = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
        Hold {
            id: "h".into(),
            account: "acme".into(),
            pool: tollgate_core::PoolKind::Programmatic,
            key: None,
            amount: tollgate_core::Nanos(1),
            model: None,
            source: None,
            state: crate::HoldState::Open,
            cycle_start: t,
            cycle_end: t,
            created_at: t,
            expires_at: t,
            remaining_after: None,
            made_by,
        }
    }

    #[test]
    fn only_the_maker_or_the_admin_ends_an_api_hold_and_only_the_gateway_a_gateway_hold() {
        let key = |k: &str| Maker::Key(k.into());
        let gw = hold(Maker::Gateway);
        assert_eq!(may_end(&gw, &Maker::Gateway), Ok(()));
        for by in [Maker::Admin, key("k1")] {
            assert_eq!(may_end(&gw, &by).map_err(|d| d.code()), Err("hold_owned_by_gateway"), "{by:?}");
        }
        let by_k1 = hold(key("k1"));
        assert_eq!(may_end(&by_k1, &key("k1")), Ok(()));
        assert_eq!(may_end(&by_k1, &Maker::Admin), Ok(()));
        assert_eq!(may_end(&by_k1, &key("k2")).map_err(|d| d.code()), Err("hold_made_by_another"));
        assert_eq!(may_end(&by_k1, &Maker::Gateway).map_err(|d| d.code()), Err("hold_made_by_another"));
        let by_admin = hold(Maker::Admin);
        assert_eq!(may_end(&by_admin, &Maker::Admin), Ok(()));
        assert_eq!(may_end(&by_admin, &key("k1")).map_err(|d| d.code()), Err("hold_made_by_another"));
    }
}
