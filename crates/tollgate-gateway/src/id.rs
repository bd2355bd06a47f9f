//! The ids the gateway gives: a call's request id, and through it a lease's.

use crate::error::GatewayError;

/// A random id for a call: its hold id, event id and `x-tollgate-request-id`.
/// A new request id: the time in microseconds (hex), then 8 random bytes. Ids made later sort
/// later, so the store's index on event and hold ids grows at its end instead of at a random
/// page per call (one page written per batch, not one per call). Fails only when the OS has no
/// randomness to give.
pub(crate) fn request_id() -> Result<String, GatewayError> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|e| GatewayError::Internal(format!("no randomness for a request id: {e}")))?;
    let micros = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros());
    Ok(format!("tgr_{micros:014x}{}", hex::encode(bytes)))
}
