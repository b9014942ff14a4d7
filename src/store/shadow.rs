//! The shadow copy: per Pendo entity, the field values Pendo has confirmed, as canonical stored
//! text (see [`crate::domain::Value::to_stored`]). An absent field and a confirmed `null` mean the
//! same thing (Pendo holds nothing), so a cleared field is removed from the record.

use std::collections::HashMap;

use sqlx::Row;

use super::{Store, StoreError};
use crate::domain::Kind;

/// Field key → canonical stored value text.
pub type ShadowRecord = HashMap<String, String>;

pub(super) fn parse_record(kind: Kind, id: &str, text: &str) -> Result<ShadowRecord, StoreError> {
    let object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)
        .map_err(|e| StoreError::Corrupt(format!("shadow {kind} {id:?}: {e}")))?;
    // Re-printing through serde_json gives the same canonical text `Value::to_stored` produced,
    // whatever spacing or escapes SQLite's json functions chose.
    Ok(object
        .into_iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k, v.to_string()))
        .collect())
}

impl Store {
    /// The confirmed records among `ids` (ids without a record are absent from the map).
    pub async fn load_shadow(
        &self,
        kind: Kind,
        ids: &[&str],
    ) -> Result<HashMap<String, ShadowRecord>, StoreError> {
        let mut out = HashMap::with_capacity(ids.len());
        // json_each keeps the statement static and the parameter count at one, whatever the page size.
        for chunk in ids.chunks(5_000) {
            let list = serde_json::to_string(chunk).expect("strings serialize");
            let rows = sqlx::query(
                "SELECT pendo_id, vals FROM shadow
                 WHERE kind = ?1 AND pendo_id IN (SELECT value FROM json_each(?2))",
            )
            .bind(kind.as_str())
            .bind(list)
            .fetch_all(&self.pool)
            .await?;
            for row in rows {
                let id: String = row.get(0);
                let vals: String = row.get(1);
                let record = parse_record(kind, &id, &vals)?;
                out.insert(id, record);
            }
        }
        Ok(out)
    }

    /// Up to `limit` shadow records of `kind` with ids after `after`, in id order: for audits
    /// and reconciles that walk the whole shadow without holding it in memory.
    pub async fn shadow_page(
        &self,
        kind: Kind,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(String, ShadowRecord)>, StoreError> {
        let rows = sqlx::query(
            "SELECT pendo_id, vals FROM shadow WHERE kind = ?1 AND (?2 IS NULL OR pendo_id > ?2)
             ORDER BY pendo_id LIMIT ?3",
        )
        .bind(kind.as_str())
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
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
        let row = sqlx::query("SELECT count(*) FROM shadow WHERE kind = ?1")
            .bind(kind.as_str())
            .fetch_one(&self.pool)
            .await?;
        Ok(row.get(0))
    }
}
