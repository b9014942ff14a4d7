use sqlx::{Row, Transaction};

use super::{Backend, Conn, Db, DbRow, PG};
use super::{end_session, query, query_scalar};
use crate::domain::Kind;
use crate::store::*;

/// How much older than the oldest kept event a batch must be to go (see `prune_history`).
const BATCH_MARGIN_MS: i64 = 3_600_000;

/// A change's detection columns: (event, CRM record id, its modification time, detail).
pub(super) fn detection(c: &Change) -> (i64, Option<&str>, Option<i64>, Option<&'static str>) {
    let source = c.source.as_deref();
    let (event, detail) = match source.and_then(|s| s.cleared) {
        Some(why) => (Event::Cleared, Some(why)),
        None => (Event::Detected, None),
    };
    (
        event as i64,
        source.and_then(|s| s.crm_id.as_deref()),
        source.and_then(|s| s.modified_at),
        detail,
    )
}

/// Detections (and clears) of a chunk of enqueued changes, after their upsert (so a
/// supersession it caused comes first). `rows` is the enqueue's JSON array: `[kind, pendo_id,
/// field, value, mapping, force, event, crm_id, crm_at, detail]` per change.
///
/// Only rows the upsert wrote get one. When it skipped some (the same value already queued, e.g.
/// a second resync before the first drained), `skipped_version` is the chunk's version: the
/// rows it wrote carry it, the others keep their own.
pub(super) async fn record_detected(
    tx: &mut Transaction<'_, Db>,
    rows: &str,
    skipped_version: Option<i64>,
    run: Option<i64>,
    now: i64,
) -> Result<(), StoreError> {
    // Two statements, not one with `$4 IS NULL OR EXISTS (...)`: SQLite evaluates the
    // subquery per row either way, which cost the first sync 30 % more. PostgreSQL walks the
    // array with `jsonb_array_elements` (its `jsonb_each` takes an object) and its `->>` always
    // gives text, so the integer columns are cast.
    const ALL: &str = if PG {
        "INSERT INTO history (at, kind, pendo_id, field, event, value, mapping, ref, crm_id, crm_at, detail)
         SELECT $2, e.value ->> 0, e.value ->> 1, e.value ->> 2, (e.value ->> 6)::bigint, e.value ->> 3,
                e.value ->> 4, $3, e.value ->> 7, (e.value ->> 8)::bigint, e.value ->> 9
         FROM jsonb_array_elements($1::jsonb) AS e(value) WHERE $4::bigint IS NULL"
    } else {
        "INSERT INTO history (at, kind, pendo_id, field, event, value, mapping, ref, crm_id, crm_at, detail)
         SELECT $2, e.value ->> 0, e.value ->> 1, e.value ->> 2, e.value ->> 6, e.value ->> 3,
                e.value ->> 4, $3, e.value ->> 7, e.value ->> 8, e.value ->> 9
         FROM jsonb_each(jsonb($1)) AS e WHERE $4 IS NULL"
    };
    const WRITTEN: &str = if PG {
        "INSERT INTO history (at, kind, pendo_id, field, event, value, mapping, ref, crm_id, crm_at, detail)
         SELECT $2, e.value ->> 0, e.value ->> 1, e.value ->> 2, (e.value ->> 6)::bigint, e.value ->> 3,
                e.value ->> 4, $3, e.value ->> 7, (e.value ->> 8)::bigint, e.value ->> 9
         FROM jsonb_array_elements($1::jsonb) AS e(value)
         JOIN outbox AS o ON o.kind = e.value ->> 0 AND o.pendo_id = e.value ->> 1
              AND o.field = e.value ->> 2 AND o.version = $4"
    } else {
        "INSERT INTO history (at, kind, pendo_id, field, event, value, mapping, ref, crm_id, crm_at, detail)
         SELECT $2, e.value ->> 0, e.value ->> 1, e.value ->> 2, e.value ->> 6, e.value ->> 3,
                e.value ->> 4, $3, e.value ->> 7, e.value ->> 8, e.value ->> 9
         FROM jsonb_each(jsonb($1)) AS e
         JOIN outbox AS o ON o.kind = e.value ->> 0 AND o.pendo_id = e.value ->> 1
              AND o.field = e.value ->> 2 AND o.version = $4"
    };
    query(if skipped_version.is_none() {
        ALL
    } else {
        WRITTEN
    })
    .bind(rows)
    .bind(now)
    .bind(run)
    .bind(skipped_version)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// An event for every outbox row matching `condition` (SQL over the outbox's columns, with its
/// own parameters from `$4` on), before the statement that changes them runs: `$1` the time,
/// `$2` the event, `$3` goes into `ref` (a hold, a cycle).
pub(super) fn from_outbox(condition: &str) -> String {
    from_outbox_into("ref", condition)
}

/// [`from_outbox`] with `$3` going into `column` (`ref` or `detail`).
pub(super) fn from_outbox_into(column: &str, condition: &str) -> String {
    format!(
        "INSERT INTO history (at, kind, pendo_id, field, event, value, {column})
         SELECT $1, kind, pendo_id, field, $2, value, $3 FROM outbox WHERE {condition}"
    )
}

/// Events for an operator's `queue retry|drop` over `filter`, with who asked in the detail.
pub(super) async fn record_operator(
    tx: &mut Transaction<'_, Db>,
    event: Event,
    filter: &QueueFilter,
    states: &str,
    who: &str,
    now: i64,
) -> Result<u64, StoreError> {
    let sql = from_outbox_into(
        "detail",
        &format!(
            "state IN ({states}) AND ($4 IS NULL OR state = $4) AND ($5 IS NULL OR kind = $5)
               AND ($6 IS NULL OR pendo_id = $6)"
        ),
    );
    let done = query(sqlx::AssertSqlSafe(sql))
        .bind(now)
        .bind(event as i64)
        .bind(who)
        .bind(filter.state.map(QueueState::as_str))
        .bind(filter.kind.map(Kind::as_str))
        .bind(filter.pendo_id.as_deref())
        .execute(&mut **tx)
        .await?;
    Ok(done.rows_affected())
}

/// The answers a settle records, each pointing at its batch: one per row whose version still
/// matches, and every confirmation (see the statement below).
pub(super) async fn record_answers(
    tx: &mut Transaction<'_, Db>,
    outcomes: &[(OutboxEntry, Settlement)],
    batches: &[SentBatch],
    batch_of: &[Option<usize>],
    now: i64,
) -> Result<(), StoreError> {
    let mut ids = Vec::with_capacity(batches.len());
    for b in batches {
        let id: i64 = query(
            "INSERT INTO history_batches (kind, sent_at, answered_at, records, attempts, answer)
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        )
        .bind(b.kind.as_str())
        .bind(b.sent_at)
        .bind(b.answered_at)
        .bind(b.records as i64)
        .bind(b.attempts as i64)
        .bind(&b.answer)
        .fetch_one(&mut **tx)
        .await?
        .get(0);
        ids.push(id);
    }
    // Confirmations get their event whatever the row became (below); the other answers only
    // while the row still holds the version that was sent. Apart, so that the usual batch (all
    // confirmed) is written without looking up a single outbox row.
    let mut confirmed: Vec<serde_json::Value> = Vec::with_capacity(outcomes.len());
    let mut if_current: Vec<serde_json::Value> = Vec::new();
    for (i, (entry, settlement)) in outcomes.iter().enumerate() {
        let batch = batch_of.get(i).copied().flatten();
        let batch_answer = batch.map(|b| batches[b].answer.as_str());
        // Text the batch's answer does not already say.
        let own = |text: &str| (Some(text) != batch_answer).then(|| text.to_owned());
        // (event, detail, attempts this failure adds, max attempts before dead)
        let (event, detail, attempts, max) = match settlement {
            Settlement::Confirmed => (Event::Confirmed, None, 0, 0),
            Settlement::AlreadyConfirmed => (Event::AlreadyConfirmed, None, 0, 0),
            Settlement::Unmatched { .. } => (Event::Missing, None, 0, 0),
            Settlement::Retry {
                error,
                max_attempts,
                attempts,
                ..
            } => (Event::Failed, own(error), *attempts, *max_attempts),
            Settlement::Dead { error } => (Event::Dead, own(error), 0, 0),
            Settlement::Release => continue,
        };
        let row = serde_json::json!([
            entry.kind.as_str(),
            entry.pendo_id,
            entry.field,
            entry.version,
            event as i64,
            batch.map(|b| ids[b]),
            detail,
            attempts,
            max,
            entry.value,
        ]);
        if event == Event::Confirmed {
            confirmed.push(row);
        } else {
            if_current.push(row);
        }
    }
    // An answer changes the outbox row only while it still holds the version that was sent,
    // and so gets an event only then, except a confirmation: the settle writes the shadow for
    // every confirmed value, even one a newer value replaced (or an operator dropped) while it
    // was in flight, so its event is written whatever the row became. A failure that uses up
    // the attempts is the row's death: recorded as such (the settle's own statement makes the
    // same decision from the same numbers). PostgreSQL's `->>` gives text: the numbers are cast.
    if !confirmed.is_empty() {
        query(if PG {
            "INSERT INTO history (at, kind, pendo_id, field, event, value, ref, detail)
             SELECT $2, e.value ->> 0, e.value ->> 1, e.value ->> 2, (e.value ->> 4)::bigint,
                    e.value ->> 9, (e.value ->> 5)::bigint, e.value ->> 6
             FROM jsonb_array_elements($1::jsonb) AS e(value)"
        } else {
            "INSERT INTO history (at, kind, pendo_id, field, event, value, ref, detail)
             SELECT $2, e.value ->> 0, e.value ->> 1, e.value ->> 2, e.value ->> 4,
                    e.value ->> 9, e.value ->> 5, e.value ->> 6
             FROM jsonb_each(jsonb($1)) AS e"
        })
        .bind(serde_json::Value::Array(confirmed).to_string())
        .bind(now)
        .execute(&mut **tx)
        .await?;
    }
    if if_current.is_empty() {
        return Ok(());
    }
    query(if PG {
        "INSERT INTO history (at, kind, pendo_id, field, event, value, ref, detail)
         SELECT $2, e.value ->> 0, e.value ->> 1, e.value ->> 2,
                CASE WHEN (e.value ->> 4)::bigint = 10
                          AND o.attempts + (e.value ->> 7)::bigint >= (e.value ->> 8)::bigint
                     THEN 11 ELSE (e.value ->> 4)::bigint END,
                e.value ->> 9, (e.value ->> 5)::bigint, e.value ->> 6
         FROM jsonb_array_elements($1::jsonb) AS e(value)
         JOIN outbox AS o ON o.kind = e.value ->> 0 AND o.pendo_id = e.value ->> 1
              AND o.field = e.value ->> 2 AND o.version = (e.value ->> 3)::bigint"
    } else {
        "INSERT INTO history (at, kind, pendo_id, field, event, value, ref, detail)
         SELECT $2, e.value ->> 0, e.value ->> 1, e.value ->> 2,
                CASE WHEN e.value ->> 4 = 10 AND o.attempts + (e.value ->> 7) >= (e.value ->> 8)
                     THEN 11 ELSE e.value ->> 4 END,
                e.value ->> 9, e.value ->> 5, e.value ->> 6
         FROM jsonb_each(jsonb($1)) AS e
         JOIN outbox AS o ON o.kind = e.value ->> 0 AND o.pendo_id = e.value ->> 1
              AND o.field = e.value ->> 2 AND o.version = e.value ->> 3"
    })
    .bind(serde_json::Value::Array(if_current).to_string())
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn event_from_row(row: &DbRow) -> Result<HistoryEvent, StoreError> {
    let kind: String = row.get("kind");
    let code: i64 = row.get("event");
    let event = Event::from_code(code)
        .ok_or_else(|| StoreError::Corrupt(format!("history event code {code}")))?;
    let reference: Option<i64> = row.get("ref");
    let batch = row.get::<Option<i64>, _>("b_id").map(|id| BatchInfo {
        id,
        sent_at: row.get("b_sent_at"),
        answered_at: row.get("b_answered_at"),
        records: row.get("b_records"),
        attempts: row.get("b_attempts"),
        answer: row.get("b_answer"),
    });
    let hold = match event {
        Event::Held | Event::Approved | Event::Rejected => reference.map(|id| HoldInfo {
            id,
            decided_by: row.get("h_by"),
            decision_reason: row.get("h_reason"),
        }),
        _ => None,
    };
    let cycle = match event {
        Event::Detected | Event::Cleared | Event::Withdrawn => reference,
        _ => None,
    };
    Ok(HistoryEvent {
        id: row.get("id"),
        at: row.get("at"),
        kind: Kind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("history kind {kind:?}")))?,
        pendo_id: row.get("pendo_id"),
        field: row.get("field"),
        event,
        value: row.get("value"),
        mapping: row.get("mapping"),
        cycle,
        crm_id: row.get("crm_id"),
        crm_modified_at: row.get("crm_at"),
        detail: row.get("detail"),
        batch,
        hold,
    })
}

/// The columns [`event_from_row`] reads, joined to their batch and hold.
const SELECT_EVENTS: &str = "SELECT h.id, h.at, h.kind, h.pendo_id, h.field, h.event, h.value,
        h.mapping, h.ref, h.crm_id, h.crm_at, h.detail,
        b.id AS b_id, b.sent_at AS b_sent_at, b.answered_at AS b_answered_at,
        b.records AS b_records, b.attempts AS b_attempts, b.answer AS b_answer,
        d.decided_by AS h_by, d.decision_reason AS h_reason
     FROM history AS h
     LEFT JOIN history_batches AS b ON h.event IN (7, 9, 10, 11) AND b.id = h.ref
     LEFT JOIN holds AS d ON h.event IN (4, 5, 6) AND d.id = h.ref";

impl Backend {
    /// The events of one entity (of one field, with `field`), newest first, at most `limit`.
    pub async fn history(
        &self,
        kind: Kind,
        pendo_id: &str,
        field: Option<&str>,
        limit: u32,
    ) -> Result<Vec<HistoryEvent>, StoreError> {
        let mut session = self.session().await?;
        let rows = query(sqlx::AssertSqlSafe(format!(
            "{SELECT_EVENTS}
             WHERE h.pendo_id = $1 AND h.kind = $2 AND ($3 IS NULL OR h.field = $3)
             ORDER BY h.id DESC LIMIT $4"
        )))
        .bind(pendo_id)
        .bind(kind.as_str())
        .bind(field)
        .bind(i64::from(limit))
        .fetch_all(&mut *session)
        .await?;
        end_session(session).await?;
        rows.iter().map(event_from_row).collect()
    }

    /// The latest event of `event` kinds per field of one entity (e.g. the last detection and
    /// the last confirmation of each field), whatever the limit on the listing.
    pub async fn last_events(
        &self,
        kind: Kind,
        pendo_id: &str,
        events: &[Event],
    ) -> Result<Vec<HistoryEvent>, StoreError> {
        let codes = serde_json::to_string(&events.iter().map(|e| *e as i64).collect::<Vec<_>>())
            .expect("codes serialize");
        let mut session = self.session().await?;
        let rows = query(sqlx::AssertSqlSafe(if PG {
            format!(
                "{SELECT_EVENTS}
                 WHERE h.id IN (SELECT max(id) FROM history
                                WHERE pendo_id = $1 AND kind = $2
                                  AND event IN (SELECT value::bigint
                                                FROM jsonb_array_elements_text($3::jsonb))
                                GROUP BY field, event)
                 ORDER BY h.id"
            )
        } else {
            format!(
                "{SELECT_EVENTS}
             WHERE h.id IN (SELECT max(id) FROM history
                            WHERE pendo_id = $1 AND kind = $2
                              AND event IN (SELECT value FROM json_each($3))
                            GROUP BY field, event)
             ORDER BY h.id"
            )
        }))
        .bind(pendo_id)
        .bind(kind.as_str())
        .bind(codes)
        .fetch_all(&mut *session)
        .await?;
        end_session(session).await?;
        rows.iter().map(event_from_row).collect()
    }

    /// The last event of each (id, field) among `ids` (for the audit's report).
    pub async fn last_event_per_field(
        &self,
        kind: Kind,
        ids: &[&str],
    ) -> Result<Vec<HistoryEvent>, StoreError> {
        let mut out = Vec::new();
        let mut session = self.session().await?;
        for chunk in ids.chunks(2_000) {
            let rows = query(sqlx::AssertSqlSafe(if PG {
                format!(
                    "{SELECT_EVENTS}
                     WHERE h.id IN (SELECT max(id) FROM history
                                    WHERE pendo_id IN (SELECT jsonb_array_elements_text($1::jsonb))
                                      AND kind = $2
                                    GROUP BY pendo_id, field)"
                )
            } else {
                format!(
                    "{SELECT_EVENTS}
                 WHERE h.id IN (SELECT max(id) FROM history
                                WHERE pendo_id IN (SELECT value FROM json_each($1)) AND kind = $2
                                GROUP BY pendo_id, field)"
                )
            }))
            .bind(serde_json::to_string(chunk).expect("strings serialize"))
            .bind(kind.as_str())
            .fetch_all(&mut *session)
            .await?;
            for row in &rows {
                out.push(event_from_row(row)?);
            }
        }
        end_session(session).await?;
        Ok(out)
    }

    /// Events in the state. Events are deleted oldest first, and the oldest are the lowest ids
    /// while the clock runs forward, so the ids are contiguous and this is exact without
    /// counting ten million rows. It is an upper bound on PostgreSQL (identity values are not
    /// rolled back, so ids can have gaps) and after a clock step (events dated in the future
    /// outlive the older ones written after them).
    pub async fn history_count(&self) -> Result<i64, StoreError> {
        let mut conn = self.session().await?;
        let count = history_count_in(&mut conn).await?;
        end_session(conn).await?;
        Ok(count)
    }

    /// Deletes up to `batch` events older than `before` (Unix ms), oldest first, and the
    /// batches no kept event refers to; one short transaction, so a writer waits at most for
    /// one batch. Returns the events deleted: call again until it returns less than `batch`.
    ///
    /// By time, not by id: ids follow time only while the clock runs forward. After a forward
    /// step (corrected later) the front of the table holds events dated in the future; taking
    /// "the oldest `batch` ids, those outside retention" would delete nothing until the clock
    /// caught up, and retention would stall behind them.
    pub async fn prune_history(&self, before: i64, batch: u32) -> Result<u64, StoreError> {
        let mut tx = self.begin_write().await?;
        // The expired events, oldest first, on `history_by_at`: the range read stops at the
        // first kept event. On PostgreSQL `= ANY (ARRAY(..))`, not `IN`: with `IN` a generic plan
        // hash-joins a scan of the whole table; this reads the index once and deletes by the
        // primary key.
        let done = query(if PG {
            "DELETE FROM history WHERE id = ANY (ARRAY(
               SELECT id FROM history WHERE at < $1 ORDER BY at LIMIT $2))"
        } else {
            "DELETE FROM history WHERE id IN
               (SELECT id FROM history WHERE at < $1 ORDER BY at LIMIT $2)"
        })
        .bind(before)
        .bind(i64::from(batch))
        .execute(&mut *tx)
        .await?;
        // A batch goes once no kept event can point at it: an event is written when its step
        // settles, at most minutes after its batch was answered, so batches an hour older than
        // the oldest kept event (the first entry of `history_by_at`) are unreferenced.
        let oldest: Option<i64> = query_scalar("SELECT min(at) FROM history")
            .fetch_one(&mut *tx)
            .await?;
        let cut = oldest.map_or(before, |at| at.min(before)) - BATCH_MARGIN_MS;
        // By time too, on `history_batches_by_sent` (a batch is answered after it is sent, so
        // `sent_at < $1` only narrows the range read; `answered_at` decides).
        query(if PG {
            "DELETE FROM history_batches WHERE id = ANY (ARRAY(
               SELECT id FROM history_batches WHERE sent_at < $1 AND answered_at < $1
               ORDER BY sent_at LIMIT $2))"
        } else {
            "DELETE FROM history_batches WHERE id IN
               (SELECT id FROM history_batches WHERE sent_at < $1 AND answered_at < $1
                ORDER BY sent_at LIMIT $2)"
        })
        .bind(cut)
        .bind(i64::from(batch))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }
}

/// Events kept: rowids are dense (pruning deletes the oldest, from the front while the clock
/// runs forward), so the span of the ids; an upper bound after a clock step.
/// Two subqueries: SQLite answers a lone `max(id)` or `min(id)` from the end of the table, but
/// `max(id) - min(id)` in one query scans it (10M events: every `/metrics` scrape). The same
/// text on PostgreSQL (both ends from `history_pkey`), where it is an upper bound: an identity
/// sequence is not rolled back, so a failed transaction leaves a gap in the ids.
pub(super) const COUNT_SQL: &str =
    "SELECT coalesce((SELECT max(id) FROM history) - (SELECT min(id) FROM history) + 1, 0)";

/// [`Store::history_count`] on a given connection (a [`super::Snapshot`]'s transaction, or one of the pool's).
pub(super) async fn history_count_in(conn: &mut Conn) -> Result<i64, StoreError> {
    let row = query(COUNT_SQL).fetch_one(&mut *conn).await?;
    Ok(row.get(0))
}
