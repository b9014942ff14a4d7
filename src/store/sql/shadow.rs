use std::collections::HashMap;

use sqlx::Row;

use super::{Backend, Conn, PG};
use super::{end_session, query};
use crate::domain::Kind;
use crate::store::shadow::parse_record;
use crate::store::*;

/// `column IN` the JSON array of strings in parameter `$n`.
pub(super) fn in_list(column: &str, n: usize) -> String {
    if PG {
        format!("{column} IN (SELECT jsonb_array_elements_text(${n}::jsonb))")
    } else {
        format!("{column} IN (SELECT value FROM json_each(${n}))")
    }
}

/// Writes `rows` (`[kind, pendo id, {field: value}]`, one per record) into the shadow as
/// confirmed at `now`, under the next shadow sequence number, keeping `field_totals` (the
/// non-null values per kind and field) in step in the same transaction. A null removes the
/// field: json_patch (RFC 7396) removes keys patched to null, so a cleared field leaves an
/// existing record; a new record may keep a null, which every reader treats as absent.
/// PostgreSQL has no json_patch: `||` then jsonb_strip_nulls is the same for these records
/// (scalars or a one-key `{"date": n}`, replaced whole), except that it also drops nulls
/// already stored, which no reader sees.
pub(super) async fn patch(
    conn: &mut Conn,
    rows: Vec<serde_json::Value>,
    now: i64,
) -> Result<(), StoreError> {
    // The rows take the next shadow sequence number: a digest computed from an older snapshot
    // is not written over them (see `write_digests`).
    let rev: i64 = query("UPDATE shadow_seq SET seq = seq + 1 WHERE id = 1 RETURNING seq")
        .fetch_one(&mut *conn)
        .await?
        .get(0);
    let rows = serde_json::Value::Array(rows).to_string();
    let rows = rows.as_str();
    // The totals first: each value's change of "held or not" against the record as it is now.
    query(if PG {
        "INSERT INTO field_totals (kind, field, n)
         SELECT e.value ->> 0, p.key,
                sum(CASE WHEN jsonb_typeof(p.value) = 'null' THEN -c.held ELSE 1 - c.held END)
         FROM jsonb_array_elements($1::jsonb) AS e(value)
         CROSS JOIN LATERAL jsonb_each(e.value -> 2) AS p(key, value)
         LEFT JOIN shadow AS s ON s.kind = e.value ->> 0 AND s.pendo_id = e.value ->> 1
         CROSS JOIN LATERAL (SELECT CASE WHEN coalesce(jsonb_typeof(s.vals -> p.key), 'null') <> 'null'
                                         THEN 1 ELSE 0 END AS held) AS c
         GROUP BY 1, 2
         ON CONFLICT (kind, field) DO UPDATE SET n = field_totals.n + excluded.n"
    } else {
        "INSERT INTO field_totals (kind, field, n)
         SELECT h.value ->> 0, h.key,
                sum(CASE WHEN h.type = 'null' THEN -h.held ELSE 1 - h.held END)
         FROM (SELECT e.value AS value, p.key AS key, p.type AS type,
                      coalesce(json_type(s.vals, '$.\"' || p.key || '\"'), 'null') != 'null' AS held
               FROM json_each($1) AS e
               JOIN json_each(e.value -> 2) AS p
               LEFT JOIN shadow AS s ON s.kind = e.value ->> 0 AND s.pendo_id = e.value ->> 1) AS h
         WHERE true
         GROUP BY 1, 2
         ON CONFLICT (kind, field) DO UPDATE SET n = n + excluded.n"
    })
    .bind(rows)
    .execute(&mut *conn)
    .await?;
    query(if PG {
        "INSERT INTO shadow (kind, pendo_id, vals, confirmed_at, rev)
         SELECT e.value ->> 0, e.value ->> 1, e.value -> 2, $2, $3
         FROM jsonb_array_elements($1::jsonb) AS e(value)
         ON CONFLICT (kind, pendo_id) DO UPDATE
         SET vals = jsonb_strip_nulls(shadow.vals || excluded.vals),
             confirmed_at = excluded.confirmed_at, rev = excluded.rev"
    } else {
        "INSERT INTO shadow (kind, pendo_id, vals, confirmed_at, rev)
         SELECT e.value ->> 0, e.value ->> 1, e.value -> 2, $2, $3 FROM json_each($1) AS e WHERE true
         ON CONFLICT (kind, pendo_id) DO UPDATE
         SET vals = json_patch(shadow.vals, excluded.vals), confirmed_at = excluded.confirmed_at,
             rev = excluded.rev"
    })
    .bind(rows)
    .bind(now)
    .bind(rev)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The confirmed records among `ids`, read on `conn` (so a caller can read them inside its own
/// transaction, beside the outbox).
pub(super) async fn load_records(
    conn: &mut Conn,
    kind: Kind,
    ids: &[&str],
) -> Result<HashMap<String, ShadowRecord>, StoreError> {
    let mut out = HashMap::with_capacity(ids.len());
    // One statement and one result row per chunk: SQLite looks the ids up (json_each keeps
    // the statement static) and folds the records into a single JSON object, which costs far
    // less than handing thousands of rows one by one through the driver. PostgreSQL does the
    // same with jsonb_array_elements_text and json_object_agg (one text row too).
    for chunk in ids.chunks(5_000) {
        let list = serde_json::to_string(chunk).expect("strings serialize");
        let row = query(if PG {
            // json_object_agg (json, not jsonb) only concatenates: no re-sorting, no
            // deduplication; its spacing (`{ "id" : {...} }`) is still JSON.
            "SELECT coalesce(json_object_agg(pendo_id, vals)::text, '{}')
             FROM shadow WHERE kind = $1 AND pendo_id IN (SELECT jsonb_array_elements_text($2::jsonb))"
        } else {
            // `vals` is already JSON text: concatenating skips SQLite re-parsing it.
            "SELECT '{' || coalesce(group_concat(json_quote(pendo_id) || ':' || vals, ','), '') || '}'
             FROM shadow WHERE kind = $1 AND pendo_id IN (SELECT value FROM json_each($2))"
        })
        .bind(kind.as_str())
        .bind(list)
        .fetch_one(&mut *conn)
        .await?;
        let text: String = row.get(0);
        // Parsing a page of records is CPU work: off the async threads, so it overlaps the
        // engine's other stages.
        let records: HashMap<String, ShadowRecord> =
            tokio::task::spawn_blocking(move || serde_json::from_str(&text))
                .await
                .expect("parsing does not panic")
                .map_err(|e| StoreError::Corrupt(format!("shadow {kind}: {e}")))?;
        out.extend(
            records
                .into_iter()
                .map(|(id, r)| (id, crate::store::shadow::without_nulls(r))),
        );
    }
    Ok(out)
}

impl Backend {
    /// The confirmed records among `ids` (ids without a record are absent from the map).
    pub async fn load_shadow(
        &self,
        kind: Kind,
        ids: &[&str],
    ) -> Result<HashMap<String, ShadowRecord>, StoreError> {
        // In a read transaction for its plan (see `begin_read`): the writer reads the shadow
        // before every batch while its settles grow it.
        let mut tx = self.begin_read().await?;
        let records = load_records(&mut tx, kind, ids).await?;
        tx.commit().await?;
        Ok(records)
    }

    /// One entity's shadow record and when Pendo last confirmed a value of it.
    pub async fn shadow_entry(
        &self,
        kind: Kind,
        id: &str,
    ) -> Result<Option<(ShadowRecord, i64)>, StoreError> {
        // `vals` is JSONB on PostgreSQL: read as text, as SQLite stores it.
        let mut session = self.session().await?;
        let row = query(if PG {
            "SELECT vals::text, confirmed_at FROM shadow WHERE kind = $1 AND pendo_id = $2"
        } else {
            "SELECT vals, confirmed_at FROM shadow WHERE kind = $1 AND pendo_id = $2"
        })
        .bind(kind.as_str())
        .bind(id)
        .fetch_optional(&mut *session)
        .await?;
        end_session(session).await?;
        row.map(|r| Ok((parse_record(kind, id, &r.get::<String, _>(0))?, r.get(1))))
            .transpose()
    }

    /// Up to `limit` shadow records of `kind` with ids after `after`, in id order: for audits
    /// and reconciles that walk the whole shadow without holding it in memory.
    pub async fn shadow_page(
        &self,
        kind: Kind,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(String, ShadowRecord)>, StoreError> {
        let mut session = self.session().await?;
        let rows = query(if PG {
            // `vals::text` as in `shadow_entry`. `pendo_id >= coalesce($2, '')` only gives the
            // index scan a lower bound a generic (cached) plan can use too, which the `IS NULL OR`
            // alone cannot: `($2 IS NULL OR pendo_id > $2)` still decides, so the rows are the
            // same (strictly after `after`).
            "SELECT pendo_id, vals::text FROM shadow
             WHERE kind = $1 AND pendo_id >= coalesce($2, '') AND ($2 IS NULL OR pendo_id > $2)
             ORDER BY pendo_id LIMIT $3"
        } else {
            "SELECT pendo_id, vals FROM shadow WHERE kind = $1 AND ($2 IS NULL OR pendo_id > $2)
             ORDER BY pendo_id LIMIT $3"
        })
        .bind(kind.as_str())
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&mut *session)
        .await?;
        end_session(session).await?;
        rows.into_iter()
            .map(|row| {
                let id: String = row.get(0);
                let vals: String = row.get(1);
                let record = parse_record(kind, &id, &vals)?;
                Ok((id, record))
            })
            .collect()
    }

    /// Number of shadow records per kind.
    pub async fn shadow_count(&self, kind: Kind) -> Result<i64, StoreError> {
        let mut session = self.session().await?;
        let row = query("SELECT count(*) FROM shadow WHERE kind = $1")
            .bind(kind.as_str())
            .fetch_one(&mut *session)
            .await?;
        end_session(session).await?;
        Ok(row.get(0))
    }
}
