//! Adoption (DESIGN, "The guard": values Pendo already holds that pendo-sync never wrote):
//! before a field's first push, what Pendo holds for it is written into the shadow as
//! confirmed, so that the guard judges the staged values against it. A staged value equal to
//! Pendo's is dropped (never sent); a different one stays staged and counts as an overwrite.

use std::collections::{BTreeMap, HashMap};

use sqlx::Row;

use super::shadow::in_list;
use super::{Backend, PG, query, shadow};
use crate::domain::{Kind, now_ms};
use crate::store::*;

impl Backend {
    /// Adopts one page of Pendo's values: `held` is (Pendo id, field, stored value) for the
    /// non-null values Pendo holds. Only pairs with a staged row of `mapping` and no value in
    /// the shadow are taken (the shadow's own knowledge wins; ids the mapping does not stage are
    /// not ours). One transaction.
    pub async fn adopt_values(
        &self,
        mapping: &str,
        kind: Kind,
        held: &[(String, String, String)],
    ) -> Result<Adopted, StoreError> {
        if held.is_empty() {
            return Ok(Adopted::default());
        }
        let now = now_ms();
        let mut ids: Vec<&str> = held.iter().map(|(id, _, _)| id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        let ids_json = serde_json::to_string(&ids).expect("strings serialize");
        let mut tx = self.begin_write().await?;
        // By primary key (kind, id) from the page's ids: the planner must not take the
        // `outbox_due` index for `state`, which would walk every staged row of a first sync for
        // every page (SQLite: `+state` keeps the term off the index, CROSS JOIN keeps the order).
        let staged: HashMap<(String, String), String> = query(if PG {
            "SELECT o.pendo_id, o.field, o.value
             FROM jsonb_array_elements_text($3::jsonb) AS j(id)
             JOIN outbox AS o ON o.kind = $2 AND o.pendo_id = j.id
             WHERE o.state = 'staged' AND o.mapping = $1"
        } else {
            "SELECT o.pendo_id, o.field, o.value
             FROM json_each($3) AS j CROSS JOIN outbox AS o
             WHERE o.kind = $2 AND o.pendo_id = j.value AND +o.state = 'staged' AND o.mapping = $1"
        })
        .bind(mapping)
        .bind(kind.as_str())
        .bind(&ids_json)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect();
        let known = shadow::load_records(&mut tx, kind, &ids).await?;
        let mut patches: BTreeMap<&str, serde_json::Map<String, serde_json::Value>> =
            BTreeMap::new();
        // Per field: the ids seeded, and those whose staged value equals Pendo's.
        let mut seeded: BTreeMap<&str, Vec<(&str, &str)>> = BTreeMap::new();
        let mut equal: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        let mut out = Adopted::default();
        for (id, field, value) in held {
            let Some(staged_value) = staged.get(&(id.clone(), field.clone())) else {
                continue;
            };
            if known.get(id).is_some_and(|r| r.contains_key(field)) {
                continue;
            }
            let json: serde_json::Value = serde_json::from_str(value)
                .map_err(|e| StoreError::Corrupt(format!("Pendo value {value:?}: {e}")))?;
            patches.entry(id).or_default().insert(field.clone(), json);
            seeded.entry(field).or_default().push((id, value));
            out.seeded += 1;
            if staged_value == value {
                equal.entry(field).or_default().push(id);
                out.equal += 1;
            }
        }
        if patches.is_empty() {
            tx.commit().await?;
            return Ok(out);
        }
        for (field, pairs) in &seeded {
            query(if PG {
                "INSERT INTO history (at, kind, pendo_id, field, event, value)
                 SELECT $1, $2, e.value ->> 0, $3, $4, e.value ->> 1
                 FROM jsonb_array_elements($5::jsonb) AS e(value)"
            } else {
                "INSERT INTO history (at, kind, pendo_id, field, event, value)
                 SELECT $1, $2, e.value ->> 0, $3, $4, e.value ->> 1 FROM json_each($5) AS e"
            })
            .bind(now)
            .bind(kind.as_str())
            .bind(*field)
            .bind(Event::Adopted as i64)
            .bind(serde_json::to_string(pairs).expect("pairs serialize"))
            .execute(&mut *tx)
            .await?;
        }
        let rows: Vec<serde_json::Value> = patches
            .into_iter()
            .map(|(id, patch)| serde_json::json!([kind.as_str(), id, patch]))
            .collect();
        shadow::patch(&mut tx, rows, now).await?;
        // Equal values are in Pendo already: their staged rows go, unsent.
        for (field, ids) in &equal {
            query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM outbox WHERE kind = $2 AND field = $3 AND {}
                   AND {}state = 'staged' AND mapping = $1",
                in_list("pendo_id", 4),
                if PG { "" } else { "+" }
            )))
            .bind(mapping)
            .bind(kind.as_str())
            .bind(*field)
            .bind(serde_json::to_string(ids).expect("strings serialize"))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.checkpoint_soon();
        Ok(out)
    }
}
