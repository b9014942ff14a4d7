use std::collections::BTreeMap;

use sqlx::Row;

use super::history;
use super::{Backend, Conn, DbRow, PG};
use super::{end_session, query};
use crate::config::GuardSettings;
use crate::domain::{Kind, now_ms};
use crate::guard::{FieldCounts, SampleChange};
use crate::store::*;

/// How many changes a hold shows.
const SAMPLE: i64 = 20;

/// Which rows a count covers.
enum Scope {
    Staged,
    Hold(i64),
}

impl Scope {
    fn condition(&self) -> (&'static str, i64) {
        match self {
            Scope::Staged => ("o.state = 'staged' AND $2 = $2", 0),
            Scope::Hold(id) => ("o.state = 'held' AND o.hold_id = $2", *id),
        }
    }
}

/// Per field: sets (first fills), clears and overwrites among `scope`'s rows of `mapping`,
/// judged against the shadow. Values compare as stored JSON text (both sides are canonical).
/// On PostgreSQL they compare as jsonb (`shadow.vals` is JSONB, whose text form is not the
/// canonical one), the field is looked up by key, and `count(*) FILTER` counts (no
/// `sum(boolean)`).
/// The values of `field` the guard judges against: what the pages covered, and at least every
/// value it counts as cleared or overwritten (the shadow held those). A value Pendo confirmed
/// between a page's diff and the guard (an older queued value in flight while the cycle
/// restaged the row) is one the page could not count as covered.
fn covered_at_guard(covered: &BTreeMap<String, u64>, field: &str, c: &FieldCounts) -> u64 {
    covered
        .get(field)
        .copied()
        .unwrap_or(0)
        .max(c.clears + c.overwrites)
}

async fn counts(
    conn: &mut Conn,
    mapping: &str,
    scope: &Scope,
) -> Result<BTreeMap<String, FieldCounts>, StoreError> {
    let (condition, param) = scope.condition();
    let rows = query(sqlx::AssertSqlSafe(if PG {
        format!(
            "SELECT field,
                    count(*) FILTER (WHERE value = 'null' AND held IS NOT NULL),
                    count(*) FILTER (WHERE value <> 'null' AND held IS NOT NULL
                                     AND held <> value::jsonb),
                    count(*) FILTER (WHERE value <> 'null' AND held IS NULL)
             FROM (SELECT o.field, o.value,
                          nullif(s.vals -> o.field, 'null'::jsonb) AS held
                   FROM outbox AS o LEFT JOIN shadow AS s ON s.kind = o.kind AND s.pendo_id = o.pendo_id
                   WHERE o.mapping = $1 AND {condition}) AS c
             GROUP BY field"
        )
    } else {
        format!(
            "SELECT field,
                sum(value = 'null' AND held IS NOT NULL),
                sum(value != 'null' AND held IS NOT NULL AND held != value),
                sum(value != 'null' AND held IS NULL)
         FROM (SELECT o.field, o.value,
                      nullif(s.vals -> ('$.\"' || o.field || '\"'), 'null') AS held
               FROM outbox AS o LEFT JOIN shadow AS s ON s.kind = o.kind AND s.pendo_id = o.pendo_id
               WHERE o.mapping = $1 AND {condition})
         GROUP BY field"
        )
    }))
    .bind(mapping)
    .bind(param)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let n = |i: usize| r.get::<Option<i64>, _>(i).unwrap_or(0).max(0) as u64;
            (
                r.get::<String, _>(0),
                FieldCounts {
                    clears: n(1),
                    overwrites: n(2),
                    sets: n(3),
                    ..FieldCounts::default()
                },
            )
        })
        .collect())
}

/// Up to [`SAMPLE`] of `scope`'s changes, clears and overwrites first. On PostgreSQL the held
/// value is jsonb's text (`{"date": 123}`, with a space), which reads back as the same value.
async fn sample(
    conn: &mut Conn,
    mapping: &str,
    scope: &Scope,
) -> Result<Vec<SampleChange>, StoreError> {
    let (condition, param) = scope.condition();
    let rows = query(sqlx::AssertSqlSafe(if PG {
        format!(
            "SELECT pendo_id, field, held::text, value FROM
               (SELECT o.pendo_id, o.field, o.value,
                       nullif(s.vals -> o.field, 'null'::jsonb) AS held
                FROM outbox AS o LEFT JOIN shadow AS s ON s.kind = o.kind AND s.pendo_id = o.pendo_id
                WHERE o.mapping = $1 AND {condition}) AS c
             ORDER BY c.held IS NULL, c.value <> 'null', pendo_id, field LIMIT {SAMPLE}"
        )
    } else {
        format!(
            "SELECT pendo_id, field, held, value FROM
           (SELECT o.pendo_id, o.field, o.value,
                   nullif(s.vals -> ('$.\"' || o.field || '\"'), 'null') AS held
            FROM outbox AS o LEFT JOIN shadow AS s ON s.kind = o.kind AND s.pendo_id = o.pendo_id
            WHERE o.mapping = $1 AND {condition})
         ORDER BY held IS NULL, value != 'null', pendo_id, field LIMIT {SAMPLE}"
        )
    }))
    .bind(mapping)
    .bind(param)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| SampleChange {
            id: r.get(0),
            field: r.get(1),
            from: r.get(2),
            to: r.get(3),
        })
        .collect())
}

/// What the guard judges `mapping`'s fields against beyond the cycle: per field, the values the
/// shadow holds across the mapping (`total`) and what the guard let through since `since`
/// (`window_clears`, `window_overwrites`). The other counts are zero.
pub(super) async fn context(
    conn: &mut Conn,
    mapping: &str,
    kind: Kind,
    since: i64,
) -> Result<BTreeMap<String, FieldCounts>, StoreError> {
    let mut out: BTreeMap<String, FieldCounts> = BTreeMap::new();
    for r in query("SELECT field, n FROM field_totals WHERE kind = $1")
        .bind(kind.as_str())
        .fetch_all(&mut *conn)
        .await?
    {
        out.entry(r.get(0)).or_default().total = r.get::<i64, _>(1).max(0) as u64;
    }
    for r in query(if PG {
        "SELECT field, sum(clears)::bigint, sum(overwrites)::bigint FROM guard_window
         WHERE mapping = $1 AND at > $2 GROUP BY field"
    } else {
        "SELECT field, sum(clears), sum(overwrites) FROM guard_window
         WHERE mapping = $1 AND at > $2 GROUP BY field"
    })
    .bind(mapping)
    .bind(since)
    .fetch_all(&mut *conn)
    .await?
    {
        let c = out.entry(r.get(0)).or_default();
        c.window_clears = r.get::<i64, _>(1).max(0) as u64;
        c.window_overwrites = r.get::<i64, _>(2).max(0) as u64;
    }
    Ok(out)
}

/// The start of the rolling window that ends `now`.
fn window_start(limits: &GuardSettings, now: i64) -> i64 {
    now - limits.window.as_millis().min(i64::MAX as u128) as i64
}

fn hold_from_row(r: &DbRow) -> Result<Hold, StoreError> {
    let kind: String = r.get("kind");
    let counts: String = r.get("counts");
    let sample: String = r.get("sample");
    Ok(Hold {
        id: r.get("id"),
        mapping: r.get("mapping"),
        kind: Kind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("hold kind {kind:?}")))?,
        state: r.get("state"),
        created_at: r.get("created_at"),
        updated_at: r.get("updated_at"),
        reason: r.get("reason"),
        counts: serde_json::from_str(&counts)
            .map_err(|e| StoreError::Corrupt(format!("hold counts: {e}")))?,
        sample: serde_json::from_str(&sample)
            .map_err(|e| StoreError::Corrupt(format!("hold sample: {e}")))?,
        cycles: r.get("cycles"),
        held_values: r.get("held_values"),
        decided_at: r.get("decided_at"),
        decided_by: r.get("decided_by"),
        decision_reason: r.get("decision_reason"),
    })
}

impl Backend {
    /// The end of a cycle whose pull completed: the guard decides over every staged row of
    /// `mapping` (an interrupted cycle's included), against the coverage the pages that staged
    /// them recorded (`staged_cover`), which it then clears. One transaction.
    pub async fn finish_staged(
        &self,
        mapping: &str,
        kind: Kind,
        limits: &GuardSettings,
    ) -> Result<GuardOutcome, StoreError> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        // Take the write lock first: nothing may stage or decide between the count and the move.
        // On PostgreSQL this locks only that row (settles and other `finish_staged` wait); the
        // open hold is read `FOR UPDATE` below, against `decide_hold`.
        query("UPDATE shadow_seq SET seq = seq WHERE id = 1")
            .execute(&mut *tx)
            .await?;
        let covered: BTreeMap<String, u64> =
            query("SELECT field, covered FROM staged_cover WHERE mapping = $1")
                .bind(mapping)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1).max(0) as u64))
                .collect();
        query("DELETE FROM staged_cover WHERE mapping = $1")
            .bind(mapping)
            .execute(&mut *tx)
            .await?;
        let mut by_field = counts(&mut tx, mapping, &Scope::Staged).await?;
        let total: i64 =
            query("SELECT count(*) FROM outbox WHERE state = 'staged' AND mapping = $1")
                .bind(mapping)
                .fetch_one(&mut *tx)
                .await?
                .get(0);
        if total == 0 {
            tx.commit().await?;
            return Ok(GuardOutcome::Nothing);
        }
        for (field, c) in by_field.iter_mut() {
            c.covered = covered_at_guard(&covered, field, c);
        }
        let since = window_start(limits, now);
        let context = context(&mut tx, mapping, kind, since).await?;
        crate::guard::apply_context(&mut by_field, &context);
        // PostgreSQL: `FOR UPDATE` waits for a `decide_hold` in progress (it row-locks the hold
        // first) and then skips the hold if it is no longer open, so no row is moved into a
        // decided hold; `decide_hold` in turn waits for this transaction.
        let open: Option<i64> = query(if PG {
            "SELECT id FROM holds WHERE mapping = $1 AND state = 'open' ORDER BY id LIMIT 1 FOR UPDATE"
        } else {
            "SELECT id FROM holds WHERE mapping = $1 AND state = 'open' ORDER BY id LIMIT 1"
        })
        .bind(mapping)
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| r.get(0));
        let trip = crate::guard::evaluate(limits, kind, &by_field);
        let outcome = match (open, trip) {
            (None, None) => {
                query(
                    "UPDATE outbox SET state = 'pending', hold_id = NULL, next_attempt_at = $2, updated_at = $2
                     WHERE state = 'staged' AND mapping = $1",
                )
                .bind(mapping)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                // What went through adds to the window's sums; what left the window goes.
                query("DELETE FROM guard_window WHERE mapping = $1 AND at <= $2")
                    .bind(mapping)
                    .bind(since)
                    .execute(&mut *tx)
                    .await?;
                for (field, c) in &by_field {
                    if c.clears + c.overwrites > 0 {
                        query(
                            "INSERT INTO guard_window (mapping, field, at, clears, overwrites)
                             VALUES ($1, $2, $3, $4, $5)",
                        )
                        .bind(mapping)
                        .bind(field)
                        .bind(now)
                        .bind(c.clears as i64)
                        .bind(c.overwrites as i64)
                        .execute(&mut *tx)
                        .await?;
                    }
                }
                GuardOutcome::Passed {
                    values: total as u64,
                }
            }
            (open, trip) => {
                let new = open.is_none();
                let reason = match (&trip, open) {
                    (Some(t), _) => t.summary(),
                    (None, Some(_)) => "joined the mapping's open hold".to_owned(),
                    (None, None) => unreachable!("handled above"),
                };
                let staged_sample = if new {
                    sample(&mut tx, mapping, &Scope::Staged).await?
                } else {
                    Vec::new()
                };
                let hold_id = match open {
                    Some(id) => id,
                    None => query(
                        "INSERT INTO holds (mapping, kind, created_at, updated_at, reason, counts, sample, cycles)
                         VALUES ($1, $2, $3, $3, $4, '{}', '[]', 0) RETURNING id",
                    )
                    .bind(mapping)
                    .bind(kind.as_str())
                    .bind(now)
                    .bind(&reason)
                    .fetch_one(&mut *tx)
                    .await?
                    .get(0),
                };
                query(sqlx::AssertSqlSafe(history::from_outbox(
                    "state = 'staged' AND mapping = $4",
                )))
                .bind(now)
                .bind(Event::Held as i64)
                .bind(hold_id)
                .bind(mapping)
                .execute(&mut *tx)
                .await?;
                query(
                    "UPDATE outbox SET state = 'held', hold_id = $2, updated_at = $3
                     WHERE state = 'staged' AND mapping = $1",
                )
                .bind(mapping)
                .bind(hold_id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                // The hold shows what it holds now (latest wins inside it), and its reason
                // says why all of that is held. A new hold holds exactly the staged rows just
                // counted; a joined one is counted again, against the values the cycles that
                // joined it covered together and the mapping's values now.
                let (held, shown, values) = if new {
                    (by_field.clone(), staged_sample, total)
                } else {
                    let before: BTreeMap<String, FieldCounts> =
                        query("SELECT counts FROM holds WHERE id = $1")
                            .bind(hold_id)
                            .fetch_one(&mut *tx)
                            .await
                            .map(|r| {
                                serde_json::from_str(&r.get::<String, _>(0)).unwrap_or_default()
                            })?;
                    let mut held = counts(&mut tx, mapping, &Scope::Hold(hold_id)).await?;
                    for (field, c) in held.iter_mut() {
                        let joined = covered.get(field).copied().unwrap_or(0)
                            + before.get(field).map_or(0, |b| b.covered);
                        c.covered = joined.max(c.clears + c.overwrites);
                    }
                    crate::guard::apply_context(&mut held, &context);
                    let shown = sample(&mut tx, mapping, &Scope::Hold(hold_id)).await?;
                    let values: i64 =
                        query("SELECT count(*) FROM outbox WHERE state = 'held' AND hold_id = $1")
                            .bind(hold_id)
                            .fetch_one(&mut *tx)
                            .await?
                            .get(0);
                    (held, shown, values)
                };
                if !new {
                    let why = crate::guard::evaluate(limits, kind, &held)
                        .map(|t| t.summary())
                        .unwrap_or_else(|| crate::guard::describe(kind, &held));
                    query("UPDATE holds SET reason = $2 WHERE id = $1")
                        .bind(hold_id)
                        .bind(why)
                        .execute(&mut *tx)
                        .await?;
                }
                query(
                    "UPDATE holds SET counts = $2, sample = $3, cycles = cycles + 1, held_values = $4,
                        updated_at = $5
                     WHERE id = $1",
                )
                .bind(hold_id)
                .bind(serde_json::to_string(&held).expect("counts serialize"))
                .bind(serde_json::to_string(&shown).expect("sample serializes"))
                .bind(values)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                GuardOutcome::Held {
                    hold_id,
                    new,
                    reason,
                    values: values as u64,
                }
            }
        };
        tx.commit().await?;
        // Staged rows became pending (or held): the planner's picture of the outbox changed.
        self.note_reshaped(total as usize).await;
        Ok(outcome)
    }

    /// What a cycle of `mapping` would be judged against beyond its own changes now (see
    /// [`context`]): for dry runs, which judge without staging.
    pub async fn guard_context(
        &self,
        mapping: &str,
        kind: Kind,
        limits: &GuardSettings,
    ) -> Result<BTreeMap<String, FieldCounts>, StoreError> {
        let mut session = self.session().await?;
        let context = context(&mut session, mapping, kind, window_start(limits, now_ms())).await?;
        end_session(session).await?;
        Ok(context)
    }

    /// Counts `field_totals` again from the shadow, as the migration that made it did: for a
    /// state whose shadow was written by other means (the benches' seeding).
    pub async fn recount_field_totals(&self) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        query("DELETE FROM field_totals").execute(&mut *tx).await?;
        query(if PG {
            "INSERT INTO field_totals (kind, field, n)
             SELECT s.kind, j.key, count(*) FROM shadow AS s, jsonb_each(s.vals) AS j
             WHERE jsonb_typeof(j.value) <> 'null' GROUP BY s.kind, j.key"
        } else {
            "INSERT INTO field_totals (kind, field, n)
             SELECT s.kind, j.key, count(*) FROM shadow AS s, json_each(s.vals) AS j
             WHERE j.type != 'null' GROUP BY s.kind, j.key"
        })
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Holds, newest first; only the open ones with `open_only`.
    pub async fn holds(&self, open_only: bool) -> Result<Vec<Hold>, StoreError> {
        let mut conn = self.session().await?;
        let holds = holds_in(&mut conn, open_only).await?;
        end_session(conn).await?;
        Ok(holds)
    }

    pub async fn hold(&self, id: i64) -> Result<Option<Hold>, StoreError> {
        let mut session = self.session().await?;
        let row = query("SELECT * FROM holds WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *session)
            .await?;
        end_session(session).await?;
        row.as_ref().map(hold_from_row).transpose()
    }

    /// Approves (its rows become pending, sent by the next writer pass) or rejects (its rows
    /// are dropped) an open hold, recording who, when and why.
    pub async fn decide_hold(
        &self,
        id: i64,
        approve: bool,
        who: &str,
        reason: Option<&str>,
    ) -> Result<Hold, HoldError> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        // Write first, so the transaction holds the write lock before it reads (a deferred
        // read-then-write could fail with SQLITE_BUSY beside a committing service). On
        // PostgreSQL it row-locks the hold, which `finish_staged`'s `FOR UPDATE` read waits on.
        query("UPDATE holds SET updated_at = updated_at WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let state: Option<String> = query("SELECT state FROM holds WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| r.get(0));
        match state.as_deref() {
            None => return Err(HoldError::Unknown(id)),
            Some("open") => {}
            Some(other) => {
                return Err(HoldError::Decided {
                    id,
                    state: other.to_owned(),
                });
            }
        }
        query(sqlx::AssertSqlSafe(history::from_outbox(
            "state = 'held' AND hold_id = $4",
        )))
        .bind(now)
        .bind(if approve {
            Event::Approved
        } else {
            Event::Rejected
        } as i64)
        .bind(id)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        // A person looked at the mapping's changes: the window's sums start again (else the
        // next few values would trip the same sum at once).
        query("DELETE FROM guard_window WHERE mapping = (SELECT mapping FROM holds WHERE id = $1)")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if approve {
            query(
                "UPDATE outbox SET state = 'pending', hold_id = NULL, next_attempt_at = $2, updated_at = $2
                 WHERE state = 'held' AND hold_id = $1",
            )
            .bind(id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        } else {
            query("DELETE FROM outbox WHERE state = 'held' AND hold_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        query(
            "UPDATE holds SET state = $2, decided_at = $3, decided_by = $4, decision_reason = $5,
                updated_at = $3
             WHERE id = $1",
        )
        .bind(id)
        .bind(if approve { "approved" } else { "rejected" })
        .bind(now)
        .bind(who)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.checkpoint_soon();
        self.hold(id).await?.ok_or(HoldError::Unknown(id))
    }

    /// Values held per mapping now (open holds), for `pendo_sync_held_values{mapping}`.
    pub async fn held_values_by_mapping(&self) -> Result<BTreeMap<String, i64>, StoreError> {
        let mut conn = self.session().await?;
        let held = held_values_by_mapping_in(&mut conn).await?;
        end_session(conn).await?;
        Ok(held)
    }
}

/// From the open holds' own counts (kept by `finish_staged` and `outbox_drop`), not from the
/// outbox: counting held rows per mapping looks up every held row. A held row a newer CRM value
/// re-staged counts in its hold until that cycle's guard recounts it.
pub(super) const HELD_PER_MAPPING_SQL: &str =
    "SELECT mapping, sum(held_values) FROM holds WHERE state = 'open' GROUP BY mapping";
/// [`HELD_PER_MAPPING_SQL`] on PostgreSQL: `sum(bigint)` is numeric, cast back for the i64.
pub(super) const PG_HELD_PER_MAPPING_SQL: &str =
    "SELECT mapping, sum(held_values)::bigint FROM holds WHERE state = 'open' GROUP BY mapping";

/// [`Store::held_values_by_mapping`] on a given connection (a [`super::Snapshot`]'s transaction, or one of the pool's).
pub(super) async fn held_values_by_mapping_in(
    conn: &mut Conn,
) -> Result<BTreeMap<String, i64>, StoreError> {
    let rows = query(if PG {
        PG_HELD_PER_MAPPING_SQL
    } else {
        HELD_PER_MAPPING_SQL
    })
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// [`Store::holds`] on a given connection (a [`super::Snapshot`]'s transaction, or one of the pool's).
pub(super) async fn holds_in(conn: &mut Conn, open_only: bool) -> Result<Vec<Hold>, StoreError> {
    let rows =
        query("SELECT * FROM holds WHERE ($1 = 0 OR state = 'open') ORDER BY id DESC LIMIT 200")
            .bind(open_only as i64)
            .fetch_all(&mut *conn)
            .await?;
    rows.iter().map(hold_from_row).collect()
}
