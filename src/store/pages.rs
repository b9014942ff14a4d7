//! Reads for the status model and the console: paged lists of one outbox state and of the
//! records set aside, the last cycles of a mapping, and the cycles of the last day with the Pendo
//! batches each one's writer passes sent.
//!
//! Every list pages by key (the last row shown), never by offset, so page 500 of a 100k-row
//! state costs what page 1 does; and each walks an index in the order it shows (the outbox by
//! `outbox_due`, whose (state, kind, next attempt) order ends in the primary key).

use serde::{Deserialize, Serialize};

use crate::domain::Kind;

/// Where the next page of an outbox list starts: the last row shown, in list order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxCursor {
    pub kind: Kind,
    pub next_attempt_at: i64,
    pub pendo_id: String,
    pub field: String,
}

/// Where the next page of the records set aside starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvalidCursor {
    pub mapping: String,
    pub crm_id: String,
}

/// One page of a list, the rows matching in all, and the cursor of the next page (if any).
#[derive(Debug, Clone)]
pub struct Page<T, C> {
    pub rows: Vec<T>,
    pub total: i64,
    pub next: Option<C>,
}

/// One slot of the chart: the cycles that started in [`from`, `to`) (Unix ms), how many failed,
/// the changes they found, and the Pendo requests (HTTP attempts, retries included) sent in it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChartSlot {
    pub from: i64,
    pub to: i64,
    pub cycles: i64,
    pub failed: i64,
    pub changes: i64,
    pub pendo_requests: i64,
}
