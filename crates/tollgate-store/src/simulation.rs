//! A seeded simulation of the ledger: random concurrent workload against a store, every reply
//! checked against an independent reference model.
