//! The history (DESIGN guarantee 11, "Provenance"): every state change of a (kind, Pendo id,
//! field) value as an event, for `why`.
//!
//! Events are written by the statements of this module *inside the transaction that makes the
//! change* (a page's commit, a settle, a guard decision, an operator's retry or drop), or by the
//! `history_superseded` trigger: there is no event without its change and no change without its
//! event, whatever crashes when. They are compact: a Pendo request's answer is one
//! `history_batches` row that its values' events point at, and the CRM record's context is kept
//! on the detection only.
//!
//! Retention ([`Store::prune_history`]) deletes the oldest events in small batches, found by
//! time on `history_by_at`: rows are appended in time order only while the clock runs forward,
//! and events dated in the future by a clock step must not hold back the older ones behind them.

use serde::{Deserialize, Serialize};

use crate::domain::Kind;
/// What happened to a value. The number is what the state stores: never renumber.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// A cycle found the CRM value differs from what Pendo holds or is queued: queued.
    Detected = 1,
    /// The CRM record was deleted or left the mapping (filter, hard delete): a clear queued.
    Cleared = 2,
    /// A newer value replaced this one in the queue (if it was in flight, its answer follows).
    Superseded = 3,
    /// The guard held it (`ref`: the hold).
    Held = 4,
    /// A person approved its hold: it goes out.
    Approved = 5,
    /// A person rejected its hold: it was dropped.
    Rejected = 6,
    /// Pendo confirmed it (`ref`: the batch): now in the shadow.
    Confirmed = 7,
    /// Not sent: the shadow already held it (an earlier send confirmed it).
    AlreadyConfirmed = 8,
    /// Pendo answered that it has no such entity: retried later.
    Missing = 9,
    /// The send failed (429, 5xx, timeout, or a per-record error): retried later.
    Failed = 10,
    /// Given up on: a 400 for this record, or `max_attempts` failures. Retryable by hand.
    Dead = 11,
    /// An operator made it pending again (`queue retry`).
    Retried = 12,
    /// An operator dropped it (`queue drop`).
    Dropped = 13,
    /// Withdrawn: a second CRM record claims the id with other values (ambiguous).
    Withdrawn = 14,
    /// Pendo held this value before pendo-sync first wrote the field (another integration,
    /// a CSV import): read before the first push and adopted into the shadow as confirmed.
    Adopted = 15,
}

impl Event {
    pub fn from_code(code: i64) -> Option<Event> {
        use Event::*;
        Some(match code {
            1 => Detected,
            2 => Cleared,
            3 => Superseded,
            4 => Held,
            5 => Approved,
            6 => Rejected,
            7 => Confirmed,
            8 => AlreadyConfirmed,
            9 => Missing,
            10 => Failed,
            11 => Dead,
            12 => Retried,
            13 => Dropped,
            14 => Withdrawn,
            15 => Adopted,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        use Event::*;
        match self {
            Detected => "detected",
            Cleared => "cleared",
            Superseded => "superseded",
            Held => "held",
            Approved => "approved",
            Rejected => "rejected",
            Confirmed => "confirmed",
            AlreadyConfirmed => "already_confirmed",
            Missing => "missing",
            Failed => "failed",
            Dead => "dead",
            Retried => "retried",
            Dropped => "dropped",
            Withdrawn => "withdrawn",
            Adopted => "adopted",
        }
    }
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a detected value came from: the CRM record and its modification time, and why a clear
/// was queued. Shared by the fields of one record.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Source {
    pub crm_id: Option<String>,
    pub modified_at: Option<i64>,
    /// Set for clears of records that left the CRM: `deleted in the CRM`, `not in the full
    /// pull (deleted or out of the filter)`.
    pub cleared: Option<&'static str>,
}

/// One Pendo request as the writer made it, for the history.
#[derive(Debug, Clone, PartialEq)]
pub struct SentBatch {
    pub kind: Kind,
    pub sent_at: i64,
    pub answered_at: i64,
    pub records: u32,
    /// HTTP attempts (in-process retries included).
    pub attempts: u32,
    /// The answer for the whole batch: `200: 98 updated, 2 missing`, or the error.
    pub answer: String,
}

/// One event as `why` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryEvent {
    pub id: i64,
    pub at: i64,
    pub kind: Kind,
    pub pendo_id: String,
    pub field: String,
    pub event: Event,
    /// Canonical stored text of the value (JSON), if the event has one.
    pub value: Option<String>,
    /// On detections and clears: the mapping.
    pub mapping: Option<String>,
    /// detected/cleared: the cycle; sent answers: the batch; hold events: the hold.
    pub cycle: Option<i64>,
    pub crm_id: Option<String>,
    pub crm_modified_at: Option<i64>,
    pub detail: Option<String>,
    /// For sent answers: the request's batch.
    pub batch: Option<BatchInfo>,
    /// For hold events: the hold and, once decided, who and why.
    pub hold: Option<HoldInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchInfo {
    pub id: i64,
    pub sent_at: i64,
    pub answered_at: i64,
    pub records: i64,
    pub attempts: i64,
    pub answer: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HoldInfo {
    pub id: i64,
    pub decided_by: Option<String>,
    pub decision_reason: Option<String>,
}
