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
//!
//! What a digest is (and the id hash the loaded map is keyed by) lives in [`crate::digest`].

use sqlx::Row;

use super::{Store, StoreError};
use crate::digest::{IdMap, id_hash};
use crate::domain::Kind;

/// One record's Pendo id and the digest of its mapped values.
pub type Digest<'a> = (&'a str, u64);

/// Stored digests per page of [`Store::load_digests`]: big enough that the per-statement cost
/// vanishes, small enough that one page's text stays a few MB.
const LOAD_PAGE: i64 = 50_000;

impl Store {
    /// Every digest kept for `mapping`, keyed by [`id_hash`] of the Pendo id. A reconcile loads
    /// them once: a lookup per record through SQLite would cost more than the diff it saves.
    pub async fn load_digests(&self, kind: Kind, mapping: &str) -> Result<IdMap<u64>, StoreError> {
        let mut out = IdMap::default();
        let mut after = String::new();
        loop {
            // One row per page: the digests folded into a JSON array in id order (keyset paging
            // on the primary key), which costs far less than a driver row per digest.
            let row = sqlx::query(
                "SELECT json_group_array(json_array(pendo_id, digest)), max(pendo_id), count(*)
                 FROM (SELECT pendo_id, digest FROM shadow_digest
                       WHERE kind = ?1 AND pendo_id > ?2 AND mapping = ?3
                       ORDER BY pendo_id LIMIT ?4)",
            )
            .bind(kind.as_str())
            .bind(&after)
            .bind(mapping)
            .bind(LOAD_PAGE)
            .fetch_one(&self.pool)
            .await?;
            let count: i64 = row.get(2);
            if count == 0 {
                break;
            }
            let text: String = row.get(0);
            after = row.get(1);
            let pairs: Vec<(String, i64)> =
                tokio::task::spawn_blocking(move || serde_json::from_str(&text))
                    .await
                    .expect("parsing does not panic")
                    .map_err(|e| StoreError::Corrupt(format!("shadow_digest {kind}: {e}")))?;
            out.reserve(pairs.len());
            for (id, digest) in pairs {
                out.insert(id_hash(&id), from_sql(digest));
            }
            if count < LOAD_PAGE {
                break;
            }
        }
        Ok(out)
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

/// SQLite integers are signed: the digest is stored as the same 64 bits.
fn as_sql(digest: u64) -> i64 {
    digest as i64
}

fn from_sql(digest: i64) -> u64 {
    digest as u64
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
