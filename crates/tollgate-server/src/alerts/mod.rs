//! Alert delivery (SPEC section 6): the channels an alert goes to, and how one delivery is made.
//! Deciding that an alert fires is `tollgate_core::alert`; keeping it until delivered is the
//! store's outbox.

pub mod deliver;
pub mod engine;
