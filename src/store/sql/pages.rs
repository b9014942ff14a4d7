use sqlx::Row;

use super::{Backend, Conn, DbRow, PG};
use super::{end_session, query, query_scalar};
use crate::store::*;

/// A list read `limit + 1` rows: the page, and the cursor after its last row if there is more.
fn split_page<T, C>(mut rows: Vec<T>, limit: u32, cursor: impl Fn(&T) -> C) -> (Vec<T>, Option<C>) {
    if rows.len() <= limit as usize {
        return (rows, None);
    }
    rows.truncate(limit as usize);
    let next = rows.last().map(cursor);
    (rows, next)
}

/// The end of the range of ids starting with a prefix: ids are compared as text, and no
/// character sorts after U+10FFFF.
const PREFIX_END: &str = "\u{10FFFF}";

impl Backend {
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
        // The cursor's condition is left out on the first page rather than made `$4 IS NULL OR`,
        // so that on later pages it bounds the index range instead of filtering a scan.
        // PostgreSQL has no `INDEXED BY`: its planner takes `outbox_due` for this order itself.
        let cursor = if after.is_some() {
            "AND (kind, next_attempt_at, pendo_id, field) > ($4, $5, $6, $7)"
        } else {
            "AND $4 IS NULL AND $5 IS NULL AND $6 IS NULL AND $7 IS NULL"
        };
        let mut session = self.session().await?;
        let rows = query(sqlx::AssertSqlSafe(if PG {
            format!(
                "SELECT * FROM outbox
                 WHERE state = $1 AND ($2 IS NULL OR (pendo_id >= $2 AND pendo_id < $3)) {cursor}
                 ORDER BY kind, next_attempt_at, pendo_id, field LIMIT $8"
            )
        } else {
            format!(
                "SELECT * FROM outbox INDEXED BY outbox_due
             WHERE state = $1 AND ($2 IS NULL OR (pendo_id >= $2 AND pendo_id < $3)) {cursor}
             ORDER BY kind, next_attempt_at, pendo_id, field LIMIT $8"
            )
        }))
        .bind(state.as_str())
        .bind(id_prefix)
        .bind(prefix_end.as_deref())
        .bind(after.map(|c| c.kind.as_str()))
        .bind(after.map(|c| c.next_attempt_at))
        .bind(after.map(|c| c.pendo_id.as_str()))
        .bind(after.map(|c| c.field.as_str()))
        .bind(i64::from(limit) + 1)
        .fetch_all(&mut *session)
        .await?;
        let (entries, next) = split_page(
            rows.iter()
                .map(super::outbox::entry_from_row)
                .collect::<Result<Vec<_>, _>>()?,
            limit,
            |e: &OutboxEntry| OutboxCursor {
                kind: e.kind,
                next_attempt_at: e.next_attempt_at,
                pendo_id: e.pendo_id.clone(),
                field: e.field.clone(),
            },
        );
        let total: i64 = query(
            "SELECT count(*) FROM outbox
             WHERE state = $1 AND ($2 IS NULL OR (pendo_id >= $2 AND pendo_id < $3))",
        )
        .bind(state.as_str())
        .bind(id_prefix)
        .bind(prefix_end.as_deref())
        .fetch_one(&mut *session)
        .await?
        .get(0);
        end_session(session).await?;
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
        const MATCH: &str = "($1 IS NULL OR (crm_id >= $1 AND crm_id < $2)
                               OR (pendo_id >= $1 AND pendo_id < $2))";
        let mut session = self.session().await?;
        let rows = query(sqlx::AssertSqlSafe(format!(
            "SELECT mapping, crm_id, pendo_id, reason, detail, seen_at FROM invalid_records
             WHERE {MATCH} {}
             ORDER BY mapping, crm_id LIMIT $5",
            if after.is_some() {
                "AND (mapping, crm_id) > ($3, $4)"
            } else {
                "AND $3 IS NULL AND $4 IS NULL"
            }
        )))
        .bind(id_prefix)
        .bind(prefix_end.as_deref())
        .bind(after.map(|c| c.mapping.as_str()))
        .bind(after.map(|c| c.crm_id.as_str()))
        .bind(i64::from(limit) + 1)
        .fetch_all(&mut *session)
        .await?;
        let (records, next) = split_page(
            rows.iter().map(super::base::invalid_from_row).collect(),
            limit,
            |r: &InvalidRecord| InvalidCursor {
                mapping: r.mapping.clone(),
                crm_id: r.crm_id.clone(),
            },
        );
        let total: i64 = query(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM invalid_records WHERE {MATCH}"
        )))
        .bind(id_prefix)
        .bind(prefix_end.as_deref())
        .fetch_one(&mut *session)
        .await?
        .get(0);
        end_session(session).await?;
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
        let mut tx = self.begin_write().await?;
        let mappings: Vec<String> = query_scalar("SELECT DISTINCT mapping FROM runs")
            .fetch_all(&mut *tx)
            .await?;
        let mut keep: Vec<i64> = Vec::with_capacity(mappings.len() * 2);
        for m in &mappings {
            // Both on `runs_by_mapping`, newest first: a few index steps each. On PostgreSQL
            // the last success is asked as a range of the mapping (see `PG_LAST_SUCCESS_SQL`).
            let last: Option<i64> = query_scalar("SELECT max(id) FROM runs WHERE mapping = $1")
                .bind(m)
                .fetch_one(&mut *tx)
                .await?;
            let last_ok: Option<i64> = query_scalar(if PG {
                "SELECT id FROM runs WHERE mapping >= $1 AND mapping <= $1 AND ok
                 ORDER BY mapping DESC, id DESC LIMIT 1"
            } else {
                "SELECT id FROM runs WHERE mapping = $1 AND ok = 1 ORDER BY id DESC LIMIT 1"
            })
            .bind(m)
            .fetch_optional(&mut *tx)
            .await?;
            keep.extend(last.into_iter().chain(last_ok));
        }
        // Ids follow start times: the oldest rows are at the front of the table. On PostgreSQL
        // `= ANY (ARRAY(..))`, not `IN`, so the delete goes by `runs_pkey` in every plan.
        let done = query(if PG {
            "DELETE FROM runs WHERE id = ANY (ARRAY(
                SELECT id FROM runs
                WHERE started_at < $1
                  AND id NOT IN (SELECT value::bigint FROM jsonb_array_elements_text($2::jsonb))
                ORDER BY id LIMIT $3))"
        } else {
            "DELETE FROM runs WHERE id IN (
                SELECT id FROM runs
                WHERE started_at < $1 AND id NOT IN (SELECT value FROM json_each($2))
                ORDER BY id LIMIT $3)"
        })
        .bind(before)
        .bind(serde_json::to_string(&keep).expect("ids serialize"))
        .bind(i64::from(batch))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    /// Records set aside, all mappings.
    pub async fn invalid_count(&self) -> Result<i64, StoreError> {
        let mut conn = self.session().await?;
        let count = invalid_count_in(&mut conn).await?;
        end_session(conn).await?;
        Ok(count)
    }

    /// A mapping's last `limit` cycles, newest first.
    pub async fn recent_runs(
        &self,
        mapping: &str,
        limit: u32,
    ) -> Result<Vec<RunRecord>, StoreError> {
        let mut conn = self.session().await?;
        let runs = recent_runs_in(&mut conn, mapping, limit).await?;
        end_session(conn).await?;
        Ok(runs)
    }

    /// `slots` slots of `width` ms ending at `end`, oldest first: two grouped range reads
    /// (cycles on `runs_by_start`, requests on the covering `history_batches_by_sent`).
    pub async fn chart(
        &self,
        end: i64,
        width: i64,
        slots: usize,
    ) -> Result<Vec<ChartSlot>, StoreError> {
        let mut conn = self.session().await?;
        let chart = chart_in(&mut conn, end, width, slots).await?;
        end_session(conn).await?;
        Ok(chart)
    }
}

// Each with its PostgreSQL text beside it (`PG_`). There `mapping >= $1 AND mapping <= $1`
// stands for `mapping = $1` on purpose: with `=` the planner drops the mapping from the order
// and may walk the whole primary key instead of `runs_by_mapping` (every run, for a mapping that
// never succeeded); `ok` is BOOLEAN and `sum(bigint)` numeric (cast back for the i64).
pub(super) const RECENT_RUNS_SQL: &str =
    "SELECT id, mapping, mode, started_at, finished_at, ok, pulled, changes, invalid, error
     FROM runs WHERE mapping = $1 ORDER BY id DESC LIMIT $2";
pub(super) const PG_RECENT_RUNS_SQL: &str =
    "SELECT id, mapping, mode, started_at, finished_at, ok, pulled, changes, invalid, error
     FROM runs WHERE mapping >= $1 AND mapping <= $1 ORDER BY mapping DESC, id DESC LIMIT $2";
pub(super) const CHART_RUNS_SQL: &str =
    "SELECT (started_at - $1) / $2 AS slot, count(*), coalesce(sum(ok = 0), 0), coalesce(sum(changes), 0)
     FROM runs WHERE started_at >= $1 AND started_at < $3 GROUP BY slot";
pub(super) const PG_CHART_RUNS_SQL: &str =
    "SELECT (started_at - $1) / $2 AS slot, count(*), count(*) FILTER (WHERE NOT ok),
            coalesce(sum(changes), 0)::bigint
     FROM runs WHERE started_at >= $1 AND started_at < $3 GROUP BY slot";
pub(super) const CHART_REQUESTS_SQL: &str =
    "SELECT (sent_at - $1) / $2 AS slot, coalesce(sum(attempts), 0)
     FROM history_batches WHERE sent_at >= $1 AND sent_at < $3 GROUP BY slot";
pub(super) const PG_CHART_REQUESTS_SQL: &str =
    "SELECT (sent_at - $1) / $2 AS slot, coalesce(sum(attempts), 0)::bigint
     FROM history_batches WHERE sent_at >= $1 AND sent_at < $3 GROUP BY slot";
pub(super) const LAST_SUCCESS_SQL: &str =
    "SELECT finished_at FROM runs WHERE mapping = $1 AND ok = 1 ORDER BY id DESC LIMIT 1";
pub(super) const PG_LAST_SUCCESS_SQL: &str =
    "SELECT finished_at FROM runs WHERE mapping >= $1 AND mapping <= $1 AND ok
     ORDER BY mapping DESC, id DESC LIMIT 1";

/// [`Store::invalid_count`] on a given connection (a [`super::Snapshot`]'s transaction, or one of the pool's).
pub(super) async fn invalid_count_in(conn: &mut Conn) -> Result<i64, StoreError> {
    Ok(query("SELECT count(*) FROM invalid_records")
        .fetch_one(&mut *conn)
        .await?
        .get(0))
}

/// [`Store::recent_runs`] on a given connection (a [`super::Snapshot`]'s transaction, or one of the pool's).
pub(super) async fn recent_runs_in(
    conn: &mut Conn,
    mapping: &str,
    limit: u32,
) -> Result<Vec<RunRecord>, StoreError> {
    let rows = query(if PG {
        PG_RECENT_RUNS_SQL
    } else {
        RECENT_RUNS_SQL
    })
    .bind(mapping)
    .bind(i64::from(limit))
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.iter().map(super::base::run_from_row).collect())
}

/// [`Store::chart`] on a given connection (a [`super::Snapshot`]'s transaction, or one of the pool's).
pub(super) async fn chart_in(
    conn: &mut Conn,
    end: i64,
    width: i64,
    slots: usize,
) -> Result<Vec<ChartSlot>, StoreError> {
    let start = end - width * slots as i64;
    let mut out: Vec<ChartSlot> = (0..slots as i64)
        .map(|i| ChartSlot {
            from: start + i * width,
            to: start + (i + 1) * width,
            ..ChartSlot::default()
        })
        .collect();
    // Each statement answers (slot index, its figures...) for the slots that have any.
    let (runs, requests) = if PG {
        (PG_CHART_RUNS_SQL, PG_CHART_REQUESTS_SQL)
    } else {
        (CHART_RUNS_SQL, CHART_REQUESTS_SQL)
    };
    for (sql, fill) in [
        (runs, fill_cycles as fn(&mut ChartSlot, &DbRow)),
        (requests, fill_requests),
    ] {
        let rows = query(sql)
            .bind(start)
            .bind(width)
            .bind(end)
            .fetch_all(&mut *conn)
            .await?;
        for r in &rows {
            let i: i64 = r.get(0);
            if let Some(slot) = usize::try_from(i).ok().and_then(|i| out.get_mut(i)) {
                fill(slot, r);
            }
        }
    }
    Ok(out)
}

fn fill_cycles(slot: &mut ChartSlot, r: &DbRow) {
    slot.cycles = r.get(1);
    slot.failed = r.get(2);
    slot.changes = r.get(3);
}

fn fill_requests(slot: &mut ChartSlot, r: &DbRow) {
    slot.pendo_requests = r.get(1);
}
