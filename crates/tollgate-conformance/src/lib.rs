//! Dev only: what every [`tollgate_store::Store`] backend must pass, kept out of the production
//! crates. [`suite`] is the conformance suite, one test per case through
//! [`conformance_suite!`]; [`simulation`] is the seeded, concurrent workload checked against an
//! independent model. The backends run both from their tests.

#![allow(clippy::expect_used, reason = "dev-only test machinery: a failed expectation fails the backend's test")]

pub mod simulation;
pub mod suite;
