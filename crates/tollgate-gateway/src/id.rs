//! The ids the gateway gives: a call's request id, and through it a lease's.

/// A random id for a call: its hold id, event id and `x-tollgate-request-id`.
/// A new request id: the time in microseconds (hex), then 8 random bytes. Ids made later sort
/// later, so the store's index on event and hold ids grows at its end instead of at a random
/// page per call (one page written per batch, not one per call).
pub(crate) fn request_id() -> String {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("the OS random source works");
    let micros = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros());
    format!("tgr_{micros:014x}{}", hex::encode(bytes))
}
