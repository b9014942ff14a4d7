//! Forgetting what the configuration no longer maps (DESIGN.md, "When the configuration
//! changes"): a removed field's or mapping's shadow values, outbox rows in every state, and open
//! holds. Nothing is sent: Pendo keeps what it holds.

use super::history;
use super::query;
use super::shadow::in_list;
use super::{Backend, PG};
use crate::domain::{Kind, now_ms};
use crate::store::*;

/// Why rows and holds went: the history's detail and the holds' decision reason.
pub const REMOVED_REASON: &str = "removed from the configuration";

/// The outbox rows forgotten, with the mapping in `$first`, the fields (a JSON array) in the
/// next parameter and "the whole mapping" (0/1) in the one after: every row of the mapping, or
/// its rows of those fields.
fn rows_where(first: usize) -> String {
    format!(
        "mapping = ${first} AND (${} = 1 OR {})",
        first + 2,
        in_list("field", first + 1)
    )
}

impl Backend {
    /// Forgets `fields` of mapping `mapping` (of `kind`), or the whole mapping when `whole` (its
    /// claims, digests, watermark, set-aside records and staged coverage too), in one
    /// transaction. Outbox rows get a `dropped` event; open holds of the mapping left with no
    /// held row (all of them, for a whole mapping) are closed as rejected.
    pub async fn forget_mapped(
        &self,
        mapping: &str,
        kind: Kind,
        fields: &[String],
        whole: bool,
    ) -> Result<Forgotten, StoreError> {
        let now = now_ms();
        let fields_json = serde_json::to_string(fields).expect("strings serialize");
        let mut tx = self.begin_write().await?;
        query(sqlx::AssertSqlSafe(history::from_outbox_into(
            "detail",
            &rows_where(4),
        )))
        .bind(now)
        .bind(Event::Dropped as i64)
        .bind(REMOVED_REASON)
        .bind(mapping)
        .bind(&fields_json)
        .bind(whole as i64)
        .execute(&mut *tx)
        .await?;
        let outbox_rows = query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM outbox WHERE {}",
            rows_where(1)
        )))
        .bind(mapping)
        .bind(&fields_json)
        .bind(whole as i64)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        // A Pendo field belongs to one mapping of its kind (config validation), so the shadow's
        // values of the field are this mapping's.
        let mut shadow_values = 0;
        for field in fields {
            shadow_values += query(if PG {
                "UPDATE shadow SET vals = vals - $2 WHERE kind = $1 AND jsonb_exists(vals, $2)"
            } else {
                "UPDATE shadow SET vals = json_remove(vals, '$.\"' || $2 || '\"')
                 WHERE kind = $1 AND json_type(vals, '$.\"' || $2 || '\"') IS NOT NULL"
            })
            .bind(kind.as_str())
            .bind(field)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            query("DELETE FROM field_totals WHERE kind = $1 AND field = $2")
                .bind(kind.as_str())
                .bind(field)
                .execute(&mut *tx)
                .await?;
            // A field mapped again later is adopted again before its first push.
            query("DELETE FROM kv WHERE key = $1")
                .bind(crate::store::adopted_key(mapping, field))
                .execute(&mut *tx)
                .await?;
        }
        let holds_closed = query(
            "UPDATE holds SET state = 'rejected', decided_at = $2, decided_by = 'configuration',
                decision_reason = $3, updated_at = $2, held_values = 0
             WHERE mapping = $1 AND state = 'open'
               AND NOT EXISTS (SELECT 1 FROM outbox WHERE hold_id = holds.id AND state IN ('held', 'staged'))",
        )
        .bind(mapping)
        .bind(now)
        .bind(REMOVED_REASON)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        // The holds that stay open hold fewer values now.
        query(
            "UPDATE holds SET held_values =
                (SELECT count(*) FROM outbox WHERE hold_id = holds.id AND state = 'held')
             WHERE mapping = $1 AND state = 'open'",
        )
        .bind(mapping)
        .execute(&mut *tx)
        .await?;
        let per_mapping: &[&str] = if whole {
            &[
                "DELETE FROM claims WHERE mapping = $1",
                "DELETE FROM shadow_digest WHERE mapping = $1",
                "DELETE FROM watermarks WHERE mapping = $1",
                "DELETE FROM invalid_records WHERE mapping = $1",
                "DELETE FROM staged_cover WHERE mapping = $1",
                "DELETE FROM guard_window WHERE mapping = $1",
            ]
        } else {
            // The mapping's digests summarised values with these fields in them.
            &["DELETE FROM shadow_digest WHERE mapping = $1"]
        };
        for sql in per_mapping {
            query(sqlx::AssertSqlSafe(*sql))
                .bind(mapping)
                .execute(&mut *tx)
                .await?;
        }
        if !whole {
            for table in ["staged_cover", "guard_window"] {
                query(sqlx::AssertSqlSafe(format!(
                    "DELETE FROM {table} WHERE mapping = $1 AND {}",
                    in_list("field", 2)
                )))
                .bind(mapping)
                .bind(&fields_json)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(Forgotten {
            outbox_rows,
            shadow_values,
            holds_closed,
        })
    }
}
