//! The writes a plan decides, and their answers.

use tollgate_core::Nanos;

use super::Plan;
use crate::{Event, EventOutcome, Hold, HoldOutcome, HoldRequest, NewEvent, SettleRequest, StoreError, StoreResult};

/// One ledger write.
#[derive(Clone, Debug)]
pub enum Op {
    Hold(HoldRequest),
    Settle(Box<SettleRequest>),
    /// A part of a lease: the event charged against this much of the hold, which stays open.
    SettlePart(Box<SettleRequest>, Nanos),
    Void {
        account: String,
        hold_id: String,
    },
    Extend {
        account: String,
        hold_id: String,
        ttl_s: u64,
    },
    /// Usage that already happened, recorded on its own (no hold).
    Record(Box<NewEvent>),
    /// An open hold settled at its held amount, flagged `unsettled` (expired, or found open at a
    /// restart).
    Expire {
        account: String,
        hold_id: String,
    },
}

impl Op {
    /// The account the write belongs to.
    pub fn account(&self) -> &str {
        match self {
            Op::Hold(r) => &r.account,
            Op::Settle(r) | Op::SettlePart(r, _) => &r.account,
            Op::Void { account, .. } | Op::Extend { account, .. } | Op::Expire { account, .. } => account,
            Op::Record(e) => &e.account,
        }
    }

    /// The (account, hold id) the write names; None for a recorded event.
    pub fn hold_key(&self) -> Option<(&str, &str)> {
        match self {
            Op::Hold(r) => Some((&r.account, &r.id)),
            Op::Settle(r) | Op::SettlePart(r, _) => Some((&r.account, &r.hold_id)),
            Op::Void { account, hold_id } | Op::Extend { account, hold_id, .. } | Op::Expire { account, hold_id } => {
                Some((account, hold_id))
            }
            Op::Record(_) => None,
        }
    }

    /// The key id a new hold or event names (whose cap and account the snapshot needs).
    pub fn key(&self) -> Option<&str> {
        match self {
            Op::Hold(r) => r.key.as_deref(),
            Op::Record(e) => e.key.as_deref(),
            _ => None,
        }
    }

    /// The (account, event id) the write's event takes, whose committed event the snapshot
    /// holds when it knows the taken ids; an expiry's is its hold's id.
    pub fn event_key(&self) -> Option<(&str, &str)> {
        match self {
            Op::Settle(r) => Some((&r.account, if r.event.id.is_empty() { &r.hold_id } else { &r.event.id })),
            Op::SettlePart(r, _) => Some((&r.account, &r.event.id)),
            Op::Record(e) => Some((&e.account, &e.id)),
            Op::Expire { account, hold_id } => Some((account, hold_id)),
            _ => None,
        }
    }
}

/// What a write answers.
#[derive(Clone, Debug)]
pub enum Done {
    Hold(HoldOutcome),
    /// A settle's event (or a part's), or a recorded event.
    Event(EventOutcome),
    /// A voided or extended hold.
    Changed(Hold),
}

impl Done {
    /// A hold's answer.
    pub fn into_hold_outcome(self) -> StoreResult<HoldOutcome> {
        match self {
            Done::Hold(outcome) => Ok(outcome),
            _ => Err(StoreError::Backend("a hold answered with something else".into())),
        }
    }

    /// A settle's (or a part's) event.
    pub fn into_event(self) -> StoreResult<Event> {
        match self {
            Done::Event(EventOutcome::Recorded(event) | EventOutcome::Duplicate(event)) => Ok(event),
            _ => Err(StoreError::Backend("a settle answered with something else".into())),
        }
    }

    /// A recorded event's answer.
    pub fn into_event_outcome(self) -> StoreResult<EventOutcome> {
        match self {
            Done::Event(outcome) => Ok(outcome),
            _ => Err(StoreError::Backend("an event answered with something else".into())),
        }
    }

    /// A voided or extended hold.
    pub fn into_hold(self) -> StoreResult<Hold> {
        match self {
            Done::Changed(hold) => Ok(hold),
            _ => Err(StoreError::Backend("a void or an extension answered with something else".into())),
        }
    }
}

/// A write's answer before the plan's new events have their seqs.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant, reason = "short-lived, one per write of a batch: not worth a box")]
pub enum Outcome {
    Ready(Done),
    /// The new event at this place of [`Plan::new_events`]: recorded (or settled) once written.
    Recorded(usize),
    /// A repeat of the new event at this place: answered with it once written.
    Repeat(usize),
}

impl Outcome {
    /// The answer, once the plan's new events have their seqs (`seqs`, in order).
    pub fn answer(self, plan: &Plan, seqs: &[i64]) -> Done {
        match self {
            Outcome::Ready(done) => done,
            Outcome::Recorded(i) => Done::Event(EventOutcome::Recorded(plan.new_events[i].event(seqs[i]))),
            Outcome::Repeat(i) => Done::Event(EventOutcome::Duplicate(plan.new_events[i].event(seqs[i]))),
        }
    }
}
