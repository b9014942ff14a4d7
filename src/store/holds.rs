//! Staged rows and holds (DESIGN guarantee 9, "The guard").
//!
//! A cycle's pages commit their outbox rows as `staged`; when its pull has completed,
//! [`Store::finish_staged`] counts the mapping's staged clears, overwrites and first fills per
//! field against the shadow, asks [`crate::guard::evaluate`], and in one transaction either
//! makes them `pending` or moves them under a hold (a new one, or the mapping's open hold, so
//! nothing of that mapping overtakes it). A person approves a hold (its rows become pending) or
//! rejects it (its rows are dropped); both are recorded with who, when and why.

use std::collections::BTreeMap;

use serde::Serialize;

use super::StoreError;
use crate::domain::Kind;
use crate::guard::{FieldCounts, SampleChange};

/// A hold as `holds show` and the admin port show it.
#[derive(Debug, Clone, Serialize)]
pub struct Hold {
    pub id: i64,
    pub mapping: String,
    pub kind: Kind,
    pub state: String,
    pub created_at: i64,
    pub updated_at: i64,
    pub reason: String,
    pub counts: BTreeMap<String, FieldCounts>,
    pub sample: Vec<SampleChange>,
    pub cycles: i64,
    /// Values held now (open), or when it was decided.
    pub held_values: i64,
    pub decided_at: Option<i64>,
    pub decided_by: Option<String>,
    pub decision_reason: Option<String>,
}

/// What the guard did with a cycle's staged rows.
#[derive(Debug, Clone, PartialEq)]
pub enum GuardOutcome {
    /// Nothing was staged.
    Nothing,
    /// Within the limits: this many values became pending.
    Passed { values: u64 },
    /// Held under `hold_id` (`new`: this cycle opened it; else it joined the mapping's open hold).
    Held {
        hold_id: i64,
        new: bool,
        reason: String,
        values: u64,
    },
}
/// Why a decision on a hold was refused.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error("no hold {0}")]
    Unknown(i64),
    #[error("hold {id} is already {state}")]
    Decided { id: i64, state: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for HoldError {
    fn from(e: sqlx::Error) -> Self {
        HoldError::Store(e.into())
    }
}
