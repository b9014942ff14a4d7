//! The outbox: field-level changes waiting for Pendo's confirmation.
//!
//! One row per (kind, pendo id, field), so a newer CRM value replaces an unsent older one
//! (latest wins). Each replacement bumps `version`; a writer settles the rows it sent by
//! (key, version), so a value superseded while in flight stays in the outbox and goes out again.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::domain::Kind;

/// A change the diff found: this field of this entity should hold `value` in Pendo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub kind: Kind,
    pub pendo_id: String,
    pub field: String,
    /// Canonical stored text of the new value.
    pub value: String,
    pub mapping: String,
    /// Send even if the shadow already holds this value (resync).
    pub force: bool,
    /// The CRM record it came from, for the history (shared by the record's fields).
    pub source: Option<std::sync::Arc<super::history::Source>>,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum QueueState {
    /// Written by a cycle whose pull has not completed (or was interrupted): not sent until
    /// the guard passed it.
    Staged,
    Pending,
    /// Under a hold of the guard: sent only once a person approves it.
    Held,
    Unmatched,
    Dead,
}

impl QueueState {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueState::Staged => "staged",
            QueueState::Pending => "pending",
            QueueState::Held => "held",
            QueueState::Unmatched => "unmatched",
            QueueState::Dead => "dead",
        }
    }
}

/// The identity of an outbox row as sent: a settlement only applies if the version still matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OutboxKey {
    pub kind: Kind,
    pub pendo_id: String,
    pub field: String,
    pub version: i64,
}

/// One outbox row.
#[derive(Debug, Clone, Serialize)]
pub struct OutboxEntry {
    pub kind: Kind,
    pub pendo_id: String,
    pub field: String,
    /// Canonical stored text.
    pub value: String,
    pub mapping: String,
    pub state: QueueState,
    pub force: bool,
    pub version: i64,
    pub attempts: u32,
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    pub enqueued_at: i64,
}

impl OutboxEntry {
    pub fn key(&self) -> OutboxKey {
        OutboxKey {
            kind: self.kind,
            pendo_id: self.pendo_id.clone(),
            field: self.field.clone(),
            version: self.version,
        }
    }
}

/// What happened to a row the writer sent (or decided not to send).
#[derive(Debug, Clone, PartialEq)]
pub enum Settlement {
    /// Pendo confirmed the value: into the shadow, out of the outbox.
    Confirmed,
    /// The shadow already holds this value (a later cycle caught up): out of the outbox.
    AlreadyConfirmed,
    /// Pendo does not know the id: the row waits, unsent, until Pendo is found to know it
    /// (see `pendo::discovery`). The message names no id, so a batch's rows settle together.
    Unmatched { message: String },
    /// A failed attempt: retried at `retry_at`, or dead once `attempts` reaches `max_attempts`.
    Retry {
        retry_at: i64,
        error: String,
        max_attempts: u32,
        /// HTTP attempts this failure took (in-process retries included).
        attempts: u32,
    },
    /// Will not succeed by retrying (a 400 for this record alone): kept, visible, retryable by hand.
    Dead { error: String },
    /// Not sent after all (shutdown): back to the queue as it was.
    Release,
}
/// Which rows `queue list|retry|drop` act on.
#[derive(Debug, Clone, Default)]
pub struct QueueFilter {
    pub state: Option<QueueState>,
    pub kind: Option<Kind>,
    pub pendo_id: Option<String>,
}
/// What [`Store::outbox_summary`] returns.
#[derive(Debug, Clone, Default)]
pub struct OutboxSummary {
    /// Values (kind, id, field) per state, every state present.
    pub values: BTreeMap<&'static str, i64>,
    /// Entities (kind, id) per state: an operator thinks in accounts and visitors.
    pub ids: BTreeMap<&'static str, i64>,
    pub oldest_pending_at: Option<i64>,
}

pub(crate) const STATES: [&str; 5] = ["staged", "pending", "held", "unmatched", "dead"];
