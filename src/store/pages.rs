//! Reads for the status model and the console: paged lists of one outbox state and of the
//! records set aside, the last cycles of a mapping, and the cycles of the last day with the Pendo
//! batches each one's writer passes sent.
//!
//! Every list pages by key (the last row shown), never by offset, so page 500 of a 100k-row
//! state costs what page 1 does; and each walks an index in the order it shows (the outbox by
//! `outbox_due`, whose (state, kind, next attempt) order ends in the primary key).

use serde::{Deserialize, Serialize};
use sqlx::Row;

use super::outbox::{OutboxEntry, QueueState};
use super::{InvalidRecord, RunRecord, Store, StoreError};
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

/// One cycle of the chart: when, which mapping, its changes, and the Pendo batches sent between
/// its start and the next cycle's.
#[derive(Debug, Clone, Serialize)]
pub struct CycleBar {
    pub id: i64,
    pub mapping: String,
    pub mode: String,
    pub started_at: i64,
    pub ok: Option<bool>,
    pub changes: i64,
    pub pendo_requests: i64,
}

/// The end of the range of ids starting with a prefix: ids are compared as text, and no
/// character sorts after U+10FFFF.
const PREFIX_END: &str = "\u{10FFFF}";

impl Store {
    /// Rows of one outbox state, next due first, `limit` at a time after `after`; `id_prefix`
    /// keeps ids that start with it.
    pub async fn outbox_page(
        &self,
        state: QueueState,
        id_prefix: Option<&str>,
        after: Option<&OutboxCursor>,
        limit: u32,
    ) -> Result<Page<OutboxEntry, OutboxCursor>, StoreError> {
        let prefix_end = id_prefix.map(|p| format!("{p}{PREFIX_END}"));
        // The cursor's condition is left out on the first page rather than made `?4 IS NULL OR`,
        // so that on later pages it bounds the index range instead of filtering a scan.
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT * FROM outbox INDEXED BY outbox_due
             WHERE state = ?1 AND (?2 IS NULL OR (pendo_id >= ?2 AND pendo_id < ?3)) {}
             ORDER BY kind, next_attempt_at, pendo_id, field LIMIT ?8",
            if after.is_some() {
                "AND (kind, next_attempt_at, pendo_id, field) > (?4, ?5, ?6, ?7)"
            } else {
                "AND ?4 IS NULL AND ?5 IS NULL AND ?6 IS NULL AND ?7 IS NULL"
            }
        )))
        .bind(state.as_str())
        .bind(id_prefix)
        .bind(prefix_end.as_deref())
        .bind(after.map(|c| c.kind.as_str()))
        .bind(after.map(|c| c.next_attempt_at))
        .bind(after.map(|c| c.pendo_id.as_str()))
        .bind(after.map(|c| c.field.as_str()))
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.pool)
        .await?;
        let mut entries = rows
            .iter()
            .map(super::outbox::entry_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let next = if entries.len() > limit as usize {
            entries.truncate(limit as usize);
            entries.last().map(|e| OutboxCursor {
                kind: e.kind,
                next_attempt_at: e.next_attempt_at,
                pendo_id: e.pendo_id.clone(),
                field: e.field.clone(),
            })
        } else {
            None
        };
        let total: i64 = sqlx::query(
            "SELECT count(*) FROM outbox
             WHERE state = ?1 AND (?2 IS NULL OR (pendo_id >= ?2 AND pendo_id < ?3))",
        )
        .bind(state.as_str())
        .bind(id_prefix)
        .bind(prefix_end.as_deref())
        .fetch_one(&self.pool)
        .await?
        .get(0);
        Ok(Page {
            rows: entries,
            total,
            next,
        })
    }

    /// Records set aside, by mapping and CRM id, `limit` at a time after `after`; `id_prefix`
    /// keeps records whose CRM id or Pendo id starts with it.
    pub async fn invalid_page(
        &self,
        id_prefix: Option<&str>,
        after: Option<&InvalidCursor>,
        limit: u32,
    ) -> Result<Page<InvalidRecord, InvalidCursor>, StoreError> {
        let prefix_end = id_prefix.map(|p| format!("{p}{PREFIX_END}"));
        const MATCH: &str = "(?1 IS NULL OR (crm_id >= ?1 AND crm_id < ?2)
                               OR (pendo_id >= ?1 AND pendo_id < ?2))";
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT mapping, crm_id, pendo_id, reason, detail, seen_at FROM invalid_records
             WHERE {MATCH} {}
             ORDER BY mapping, crm_id LIMIT ?5",
            if after.is_some() {
                "AND (mapping, crm_id) > (?3, ?4)"
            } else {
                "AND ?3 IS NULL AND ?4 IS NULL"
            }
        )))
        .bind(id_prefix)
        .bind(prefix_end.as_deref())
        .bind(after.map(|c| c.mapping.as_str()))
        .bind(after.map(|c| c.crm_id.as_str()))
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.pool)
        .await?;
        let mut records: Vec<InvalidRecord> = rows
            .into_iter()
            .map(|r| InvalidRecord {
                mapping: r.get(0),
                crm_id: r.get(1),
                pendo_id: r.get(2),
                reason: r.get(3),
                detail: r.get(4),
                seen_at: r.get(5),
            })
            .collect();
        let next = if records.len() > limit as usize {
            records.truncate(limit as usize);
            records.last().map(|r| InvalidCursor {
                mapping: r.mapping.clone(),
                crm_id: r.crm_id.clone(),
            })
        } else {
            None
        };
        let total: i64 = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM invalid_records WHERE {MATCH}"
        )))
        .bind(id_prefix)
        .bind(prefix_end.as_deref())
        .fetch_one(&self.pool)
        .await?
        .get(0);
        Ok(Page {
            rows: records,
            total,
            next,
        })
    }

    /// Deletes up to `batch` cycles that started before `before`, oldest first, but never a
    /// mapping's last cycle nor its last successful one (the status model's freshness and last
    /// run). One short transaction: call again until it returns less than `batch`.
    pub async fn prune_runs(&self, before: i64, batch: u32) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mappings: Vec<String> = sqlx::query_scalar("SELECT DISTINCT mapping FROM runs")
            .fetch_all(&mut *tx)
            .await?;
        let mut keep: Vec<i64> = Vec::with_capacity(mappings.len() * 2);
        for m in &mappings {
            // Both on `runs_by_mapping`, newest first: a few index steps each.
            let last: Option<i64> =
                sqlx::query_scalar("SELECT max(id) FROM runs WHERE mapping = ?1")
                    .bind(m)
                    .fetch_one(&mut *tx)
                    .await?;
            let last_ok: Option<i64> = sqlx::query_scalar(
                "SELECT id FROM runs WHERE mapping = ?1 AND ok = 1 ORDER BY id DESC LIMIT 1",
            )
            .bind(m)
            .fetch_optional(&mut *tx)
            .await?;
            keep.extend(last.into_iter().chain(last_ok));
        }
        // Ids follow start times: the oldest rows are at the front of the table.
        let done = sqlx::query(
            "DELETE FROM runs WHERE id IN (
                SELECT id FROM runs
                WHERE started_at < ?1 AND id NOT IN (SELECT value FROM json_each(?2))
                ORDER BY id LIMIT ?3)",
        )
        .bind(before)
        .bind(serde_json::to_string(&keep).expect("ids serialize"))
        .bind(batch)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    /// Records set aside, all mappings.
    pub async fn invalid_count(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query("SELECT count(*) FROM invalid_records")
            .fetch_one(&self.pool)
            .await?
            .get(0))
    }

    /// A mapping's last `limit` cycles, newest first.
    pub async fn recent_runs(
        &self,
        mapping: &str,
        limit: u32,
    ) -> Result<Vec<RunRecord>, StoreError> {
        let rows = sqlx::query(RECENT_RUNS_SQL)
            .bind(mapping)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(super::run_from_row).collect())
    }

    /// The cycles (all mappings) that started at or after `since`, at most the last `limit`,
    /// oldest first, each with the Pendo batches sent from its start to the next cycle's start
    /// (the last one: to `now`). One statement: the runs newest first by id (ids follow start
    /// times, so the scan stops after `limit` rows), each counting its batches on the send-time
    /// index.
    pub async fn cycle_bars(
        &self,
        since: i64,
        now: i64,
        limit: u32,
    ) -> Result<Vec<CycleBar>, StoreError> {
        let rows = sqlx::query(CYCLES_SQL)
            .bind(limit)
            .bind(now)
            .bind(since)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| CycleBar {
                id: r.get(0),
                mapping: r.get(1),
                mode: r.get(2),
                started_at: r.get(3),
                ok: r.get(4),
                changes: r.get(5),
                pendo_requests: r.get(6),
            })
            .collect())
    }
}

pub(super) const RECENT_RUNS_SQL: &str =
    "SELECT id, mapping, mode, started_at, finished_at, ok, pulled, changes, invalid, error
     FROM runs WHERE mapping = ?1 ORDER BY id DESC LIMIT ?2";
pub(super) const CYCLES_SQL: &str =
    "WITH last AS (SELECT id, mapping, mode, started_at, ok, changes FROM runs ORDER BY id DESC LIMIT ?1),
          bars AS (SELECT *, lead(started_at, 1, ?2) OVER (ORDER BY id) AS ends FROM last)
     SELECT id, mapping, mode, started_at, ok, changes,
            (SELECT count(*) FROM history_batches
             WHERE sent_at >= bars.started_at AND sent_at < max(bars.ends, bars.started_at))
     FROM bars WHERE started_at >= ?3 ORDER BY id";
pub(super) const LAST_SUCCESS_SQL: &str =
    "SELECT finished_at FROM runs WHERE mapping = ?1 AND ok = 1 ORDER BY id DESC LIMIT 1";
