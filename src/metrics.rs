//! Metric names (Prometheus) and the small helpers that record them. Names follow DESIGN.md;
//! labels stay low-cardinality (no entity ids).

pub const RECORDS_PULLED: &str = "pendo_sync_records_pulled_total";
pub const CHANGES_DETECTED: &str = "pendo_sync_changes_detected_total";
pub const VALUES_PUSHED: &str = "pendo_sync_values_pushed_total";
pub const REQUESTS: &str = "pendo_sync_requests_total";
pub const OUTBOX_VALUES: &str = "pendo_sync_outbox_values";
pub const OLDEST_PENDING: &str = "pendo_sync_oldest_pending_seconds";
pub const CYCLE_DURATION: &str = "pendo_sync_cycle_duration_seconds";
pub const LAST_SUCCESS: &str = "pendo_sync_last_success_timestamp_seconds";
pub const INVALID_RECORDS: &str = "pendo_sync_invalid_records_total";
/// Counter: unmatched values made pending because Pendo was found to know their id, by `kind`
/// and `how` (`discovery`, `full_check`).
pub const UNMATCHED_FOUND: &str = "pendo_sync_unmatched_found_total";

/// Counts one HTTP request to `api` (`pendo`, `salesforce`, `hubspot`). `status` is the HTTP
/// status, or `error` when no response arrived (timeout, dropped connection).
pub fn record_request(api: &'static str, status: Option<u16>) {
    let status = status.map_or_else(|| "error".to_owned(), |s| s.to_string());
    metrics::counter!(REQUESTS, "api" => api, "status" => status).increment(1);
}

/// Gauge: 1 while Pendo refuses the integration key and the writer waits.
pub const WRITER_PAUSED: &str = "pendo_sync_writer_paused";

/// Gauge: holds of the guard waiting for a person.
pub const HOLDS_OPEN: &str = "pendo_sync_holds_open";
/// Gauge: events in the history (`why`), after retention.
pub const HISTORY_EVENTS: &str = "pendo_sync_history_events";
/// Gauge: values held by the guard, per mapping.
pub const HELD_VALUES: &str = "pendo_sync_held_values";
/// Gauge: 1 while this process writes (holds the file lock or the leader lease), 0 on a standby.
pub const LEADER: &str = "pendo_sync_leader";
