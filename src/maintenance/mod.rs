//! Offline checks and repairs of a ledger directory: `verify` reads everything and compares,
//! `repair` cuts a damaged tail or sets aside damaged snapshots.

pub mod repair;
pub mod verify;
