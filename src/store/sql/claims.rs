use std::collections::HashMap;

use sqlx::Row;

use super::{Backend, Conn, PG};
use super::{end_session, query};
use crate::store::*;

impl Backend {
    /// The claims on `pendo_ids` in `mapping`: Pendo id → [(CRM id, values digest)].
    pub async fn load_claims(
        &self,
        mapping: &str,
        pendo_ids: &[&str],
    ) -> Result<HashMap<String, Vec<(String, u64)>>, StoreError> {
        let mut out: HashMap<String, Vec<(String, u64)>> = HashMap::new();
        let mut session = self.session().await?;
        for chunk in pendo_ids.chunks(5_000) {
            let rows = query(if PG {
                // PostgreSQL's planner drives it from the id list unhinted (index-only scan of
                // claims_by_pendo_id per id).
                "SELECT c.pendo_id, c.crm_id, c.digest
                 FROM jsonb_array_elements_text($2::jsonb) AS j(id)
                 JOIN claims AS c ON c.mapping = $1 AND c.pendo_id = j.id"
            } else {
                // Driven from the id list (CROSS JOIN fixes the loop order): the planner
                // would otherwise walk the mapping's whole primary-key range per page.
                "SELECT c.pendo_id, c.crm_id, c.digest FROM json_each($2) AS j
                 CROSS JOIN claims AS c ON c.mapping = $1 AND c.pendo_id = j.value"
            })
            .bind(mapping)
            .bind(serde_json::to_string(chunk).expect("strings serialize"))
            .fetch_all(&mut *session)
            .await?;
            for row in rows {
                out.entry(row.get(0))
                    .or_default()
                    .push((row.get(1), row.get::<i64, _>(2) as u64));
            }
        }
        end_session(session).await?;
        Ok(out)
    }

    /// Number of claims kept for `mapping`.
    pub async fn claims_count(&self, mapping: &str) -> Result<i64, StoreError> {
        let mut session = self.session().await?;
        let row = query("SELECT count(*) FROM claims WHERE mapping = $1")
            .bind(mapping)
            .fetch_one(&mut *session)
            .await?;
        end_session(session).await?;
        Ok(row.get(0))
    }

    /// Up to `limit` CRM ids with claims in `mapping` after `after`, in order.
    pub async fn claim_crm_ids(
        &self,
        mapping: &str,
        after: &str,
        limit: i64,
    ) -> Result<Vec<String>, StoreError> {
        let mut session = self.session().await?;
        let rows = query(
            "SELECT crm_id FROM claims WHERE mapping = $1 AND crm_id > $2 ORDER BY crm_id LIMIT $3",
        )
        .bind(mapping)
        .bind(after)
        .bind(limit)
        .fetch_all(&mut *session)
        .await?;
        end_session(session).await?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }

    /// Forgets `crm_ids` of `mapping`: their claims and their set-aside entries (the records
    /// left the CRM or the mapping's filter).
    pub async fn forget_records(
        &self,
        kind: crate::domain::Kind,
        mapping: &str,
        crm_ids: &[String],
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        forget(&mut tx, Some(kind), mapping, crm_ids).await?;
        tx.commit().await?;
        Ok(())
    }
}

pub(super) async fn write(
    tx: &mut Conn,
    mapping: &str,
    claims: &[Claim],
) -> Result<(), StoreError> {
    for chunk in claims.chunks(10_000) {
        let rows: Vec<(&str, &str, i64)> = chunk
            .iter()
            .map(|(crm, pendo, d)| (crm.as_str(), pendo.as_str(), *d as i64))
            .collect();
        // SQLite applies a crm_id repeated in the chunk row by row, so its last row stands;
        // PostgreSQL refuses an upsert that meets one key twice, so there only each crm_id's
        // last row goes in (the same end state).
        query(if PG {
            "INSERT INTO claims (mapping, crm_id, pendo_id, digest)
             SELECT DISTINCT ON ((e.value ->> 0) COLLATE \"C\")
                    $1, e.value ->> 0, e.value ->> 1, (e.value ->> 2)::bigint
             FROM jsonb_array_elements($2::jsonb) WITH ORDINALITY AS e(value, n)
             ORDER BY (e.value ->> 0) COLLATE \"C\", e.n DESC
             ON CONFLICT (mapping, crm_id) DO UPDATE SET pendo_id = excluded.pendo_id, digest = excluded.digest
             WHERE claims.pendo_id <> excluded.pendo_id OR claims.digest <> excluded.digest"
        } else {
            "INSERT INTO claims (mapping, crm_id, pendo_id, digest)
             SELECT $1, e.value ->> 0, e.value ->> 1, e.value ->> 2 FROM json_each($2) AS e WHERE true
             ON CONFLICT (mapping, crm_id) DO UPDATE SET pendo_id = excluded.pendo_id, digest = excluded.digest
             WHERE claims.pendo_id != excluded.pendo_id OR claims.digest != excluded.digest"
        })
        .bind(mapping)
        .bind(serde_json::to_string(&rows).expect("rows serialize"))
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

pub(super) async fn forget(
    tx: &mut Conn,
    kind: Option<crate::domain::Kind>,
    mapping: &str,
    crm_ids: &[String],
) -> Result<(), StoreError> {
    for chunk in crm_ids.chunks(5_000) {
        let list = serde_json::to_string(chunk).expect("strings serialize");
        // The digests of the Pendo ids they claimed go too: a record skipped by its digest
        // writes no claim, so a forgotten claim must not leave a digest that skips it.
        if let Some(kind) = kind {
            query(if PG {
                "DELETE FROM shadow_digest WHERE kind = $1 AND mapping = $2 AND pendo_id IN
                   (SELECT c.pendo_id FROM jsonb_array_elements_text($3::jsonb) AS j(id)
                    JOIN claims AS c ON c.mapping = $2 AND c.crm_id = j.id)"
            } else {
                "DELETE FROM shadow_digest WHERE kind = $1 AND mapping = $2 AND pendo_id IN
                   (SELECT c.pendo_id FROM json_each($3) AS j
                    CROSS JOIN claims AS c ON c.mapping = $2 AND c.crm_id = j.value)"
            })
            .bind(kind.as_str())
            .bind(mapping)
            .bind(&list)
            .execute(&mut *tx)
            .await?;
        }
        let ids = if PG {
            "SELECT jsonb_array_elements_text($2::jsonb)"
        } else {
            "SELECT value FROM json_each($2)"
        };
        for table in ["claims", "invalid_records"] {
            query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM {table} WHERE mapping = $1 AND crm_id IN ({ids})"
            )))
            .bind(mapping)
            .bind(&list)
            .execute(&mut *tx)
            .await?;
        }
    }
    Ok(())
}
