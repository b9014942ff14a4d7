//! Value digests: the reconcile's shortcut past unchanged records.
//!
//! For each (kind, Pendo id, mapping) the store may hold a 64-bit digest of the mapped values a
//! full diff last found already in Pendo. The contract, enforced by the triggers in
//! `migrations/0002_digest.sql` and by [`write_digests`]:
//!
//! - **A digest is only ever a claim of "in sync".** It is written for records whose diff was
//!   empty and that had no outbox rows when diffed and have none when the page commits.
//! - **Any change to the entity's shadow row or outbox rows deletes its digests**, whatever made
//!   it. So a stored digest equal to a record's current digest means the record's values are the
//!   values Pendo confirmed, and the record can skip the shadow load and the diff.
//! - A missing or different digest only costs the long way round: never a missed change.

use sqlx::Row;

use super::{Store, StoreError};
use crate::domain::Kind;

/// One record's Pendo id and the digest of its mapped values.
pub type Digest<'a> = (&'a str, u64);

/// SQLite integers are signed: the digest is stored as the same 64 bits.
fn as_sql(digest: u64) -> i64 {
    digest as i64
}

impl Store {
    /// Which of `records` (by position) need a full diff: those with no stored digest for
    /// `mapping`, or a different one. The rest are known to be in sync.
    pub async fn stale_digests(
        &self,
        kind: Kind,
        mapping: &str,
        records: &[Digest<'_>],
    ) -> Result<Vec<usize>, StoreError> {
        let mut stale = Vec::new();
        for (chunk_no, chunk) in records.chunks(5_000).enumerate() {
            let list = digest_list(chunk);
            // Returns positions, not rows: in steady state almost nothing comes back.
            let rows = sqlx::query(
                "SELECT j.key FROM json_each(?3) AS j
                 WHERE NOT EXISTS (SELECT 1 FROM shadow_digest AS d
                   WHERE d.kind = ?1 AND d.pendo_id = j.value ->> 0 AND d.mapping = ?2
                     AND d.digest = j.value ->> 1)",
            )
            .bind(kind.as_str())
            .bind(mapping)
            .bind(list)
            .fetch_all(&self.pool)
            .await?;
            let base = chunk_no * 5_000;
            stale.extend(rows.iter().map(|r| base + r.get::<i64, _>(0) as usize));
        }
        Ok(stale)
    }

    /// Number of stored digests for `mapping` (status and tests).
    pub async fn digest_count(&self, mapping: &str) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT count(*) FROM shadow_digest WHERE mapping = ?1")
            .bind(mapping)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.get(0))
    }
}

fn digest_list(records: &[Digest<'_>]) -> String {
    let pairs: Vec<(&str, i64)> = records.iter().map(|(id, d)| (*id, as_sql(*d))).collect();
    serde_json::to_string(&pairs).expect("pairs serialize")
}

/// Records `digests` for `mapping` inside a page's transaction, skipping any entity that has
/// outbox rows now (something changed since its diff: the next reconcile diffs it again).
pub(super) async fn write_digests(
    tx: &mut sqlx::SqliteConnection,
    kind: Kind,
    mapping: &str,
    digests: &[(String, u64)],
) -> Result<(), StoreError> {
    if digests.is_empty() {
        return Ok(());
    }
    let borrowed: Vec<Digest<'_>> = digests.iter().map(|(id, d)| (id.as_str(), *d)).collect();
    for chunk in borrowed.chunks(5_000) {
        sqlx::query(
            "INSERT INTO shadow_digest (kind, pendo_id, mapping, digest)
             SELECT ?1, j.value ->> 0, ?2, j.value ->> 1 FROM json_each(?3) AS j
             WHERE NOT EXISTS (SELECT 1 FROM outbox AS o WHERE o.kind = ?1 AND o.pendo_id = j.value ->> 0)
             ON CONFLICT (kind, pendo_id, mapping) DO UPDATE SET digest = excluded.digest",
        )
        .bind(kind.as_str())
        .bind(mapping)
        .bind(digest_list(chunk))
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}
