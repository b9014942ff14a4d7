//! Requests that any process may make and the writer carries out: resync jobs, as rows.

use serde::Serialize;

/// One resync job as stored: queued by whoever asked, run by the process that writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResyncRecord {
    pub id: String,
    pub mappings: Vec<String>,
    pub kind: Option<String>,
    /// `queued`, `running`, `done`, `failed`.
    pub state: String,
    pub records_read: u64,
    pub changes: u64,
    pub pushed: u64,
    /// The holds of the guard this resync's changes went into ("hold 3 (mapping m): …").
    pub held: Vec<String>,
    pub error: Option<String>,
    pub requested_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}
