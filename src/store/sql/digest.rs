//! Value digests: the reconcile's shortcut past unchanged records.
//!
//! For each (kind, Pendo id, mapping) the store may hold a 64-bit digest of the mapped values a
//! full diff last found already in Pendo. The contract, enforced by the triggers in
//! `migrations/0002_digest.sql` and by [`write_digests`]:
//!
//! - **A digest is only ever a claim of "in sync".** It is written for records whose diff was
//!   empty and that had no outbox rows when diffed and have none when the page commits.
//! - **Any change to the entity's shadow row deletes its digests**, whatever made it, and
//!   [`Store::load_digests`] leaves out entities with outbox rows. So a loaded digest equal to a
//!   record's current digest means the record's values are the values Pendo confirmed with
//!   nothing queued, and the record can skip the shadow load and the diff.
//! - A missing or different digest only costs the long way round: never a missed change.
//!
//! What a digest is (and the id hash the loaded map is keyed by) lives in [`crate::digest`].

use sqlx::Row;

use super::{Backend, Conn, PG};
use super::{end_session, query};
use crate::digest::{IdMap, id_hash};
use crate::domain::Kind;
use crate::store::*;

/// Stored digests per page of [`Store::load_digests`]: big enough that the per-statement cost
/// vanishes, small enough that one page's text stays a few MB.
const LOAD_PAGE: i64 = 50_000;

impl Backend {
    /// Every digest kept for `mapping`, keyed by [`id_hash`] of the Pendo id, except those of
    /// entities with outbox rows (their diff must see the queued values). A reconcile loads them
    /// once: a lookup per record through SQLite would cost more than the diff it saves.
    ///
    /// The digests and the outbox ids are read in one read transaction (one snapshot): read
    /// apart, a writer confirming a queued value in between would leave a stale digest in.
    pub async fn load_digests(&self, kind: Kind, mapping: &str) -> Result<IdMap<u64>, StoreError> {
        let mut tx = self.begin_read().await?;
        // Sized once: growing a million-entry map rehashes it several times.
        let total: i64 =
            query("SELECT count(*) FROM shadow_digest WHERE kind = $1 AND mapping = $2")
                .bind(kind.as_str())
                .bind(mapping)
                .fetch_one(&mut *tx)
                .await?
                .get(0);
        let mut out = IdMap::with_capacity_and_hasher(total.max(0) as usize, Default::default());
        let mut after = String::new();
        loop {
            // One row per page (keyset paging on the primary key): the entries concatenated
            // into one blob, which costs far less than a driver row per digest. group_concat
            // appends each blob's bytes as they are; the cast hands them back as a blob.
            // PostgreSQL's string_agg over bytea gives a bytea; both decode as `Vec<u8>`.
            let row = query(if PG {
                "SELECT string_agg(entry, ''::bytea), max(pendo_id), count(*)
                 FROM (SELECT pendo_id, entry FROM shadow_digest
                       WHERE kind = $1 AND pendo_id > $2 AND mapping = $3
                       ORDER BY pendo_id LIMIT $4) AS page"
            } else {
                "SELECT CAST(group_concat(entry, '') AS BLOB), max(pendo_id), count(*)
                 FROM (SELECT pendo_id, entry FROM shadow_digest
                       WHERE kind = $1 AND pendo_id > $2 AND mapping = $3
                       ORDER BY pendo_id LIMIT $4)"
            })
            .bind(kind.as_str())
            .bind(&after)
            .bind(mapping)
            .bind(LOAD_PAGE)
            .fetch_one(&mut *tx)
            .await?;
            let count: i64 = row.get(2);
            if count == 0 {
                break;
            }
            let bytes: Vec<u8> = row.get(0);
            after = row.get(1);
            if bytes.len() as i64 != count * ENTRY_LEN as i64 {
                return Err(StoreError::Corrupt(format!(
                    "shadow_digest {kind}: {} bytes for {count} digests after {after:?}",
                    bytes.len()
                )));
            }
            for entry in bytes.chunks_exact(ENTRY_LEN) {
                let (id, digest) = entry.split_at(8);
                out.insert(
                    u64::from_le_bytes(id.try_into().expect("8 bytes")),
                    u64::from_le_bytes(digest.try_into().expect("8 bytes")),
                );
            }
            if count < LOAD_PAGE {
                break;
            }
        }
        self.pause_at(PausePoint::BetweenDigestReads).await;
        // The outbox is small in steady state; when it is large (a first push), few digests exist.
        let queued = query("SELECT DISTINCT pendo_id FROM outbox WHERE kind = $1")
            .bind(kind.as_str())
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        for row in queued {
            out.remove(&id_hash(row.get::<&str, _>(0)));
        }
        Ok(out)
    }

    /// Number of stored digests for `mapping` (status and tests).
    pub async fn digest_count(&self, mapping: &str) -> Result<i64, StoreError> {
        let mut session = self.session().await?;
        let row = query("SELECT count(*) FROM shadow_digest WHERE mapping = $1")
            .bind(mapping)
            .fetch_one(&mut *session)
            .await?;
        end_session(session).await?;
        Ok(row.get(0))
    }
}

/// Bytes per stored entry: id hash, then digest.
const ENTRY_LEN: usize = 16;

/// The stored entry, in hex (the form JSON can carry; SQLite's `unhex`, PostgreSQL's
/// `decode(.., 'hex')`, turns it into the blob).
fn entry_hex(id: &str, digest: u64) -> String {
    let mut bytes = [0u8; ENTRY_LEN];
    bytes[..8].copy_from_slice(&id_hash(id).to_le_bytes());
    bytes[8..].copy_from_slice(&digest.to_le_bytes());
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(2 * ENTRY_LEN);
    for b in bytes {
        text.push(HEX[usize::from(b >> 4)] as char);
        text.push(HEX[usize::from(b & 15)] as char);
    }
    text
}

/// `[[pendo_id, entry hex], ...]`, the form `write_digests` passes to the database.
fn digest_list(records: &[(String, u64)]) -> String {
    let rows: Vec<(&str, String)> = records
        .iter()
        .map(|(id, d)| (id.as_str(), entry_hex(id, *d)))
        .collect();
    serde_json::to_string(&rows).expect("rows serialize")
}

/// Records `digests` for `mapping` inside a page's transaction, skipping any entity that has
/// outbox rows now, or whose shadow row was written after the snapshot (`read_seq`) the diff
/// read: something changed since its diff, and the next reconcile diffs it again.
pub(super) async fn write_digests(
    tx: &mut Conn,
    kind: Kind,
    mapping: &str,
    digests: &[(String, u64)],
    read_seq: i64,
) -> Result<(), StoreError> {
    if digests.is_empty() {
        return Ok(());
    }
    // (PostgreSQL: the page's transaction share-locked `shadow_seq` first; see `commit_page`.)
    for chunk in digests.chunks(5_000) {
        // PostgreSQL refuses an upsert that meets one key twice (two claimants of one Pendo id
        // can each push a digest): there only each id's last row goes in, as SQLite's in-order
        // application leaves it.
        query(if PG {
            "INSERT INTO shadow_digest (kind, pendo_id, mapping, entry)
             SELECT DISTINCT ON ((j.value ->> 0) COLLATE \"C\")
                    $1, j.value ->> 0, $2, decode(j.value ->> 1, 'hex')
             FROM jsonb_array_elements($3::jsonb) WITH ORDINALITY AS j(value, n)
             WHERE NOT EXISTS (SELECT 1 FROM outbox AS o WHERE o.kind = $1 AND o.pendo_id = j.value ->> 0)
               AND NOT EXISTS (SELECT 1 FROM shadow AS s
                               WHERE s.kind = $1 AND s.pendo_id = j.value ->> 0 AND s.rev > $4)
             ORDER BY (j.value ->> 0) COLLATE \"C\", j.n DESC
             ON CONFLICT (kind, pendo_id, mapping) DO UPDATE SET entry = excluded.entry"
        } else {
            "INSERT INTO shadow_digest (kind, pendo_id, mapping, entry)
             SELECT $1, j.value ->> 0, $2, unhex(j.value ->> 1) FROM json_each($3) AS j
             WHERE NOT EXISTS (SELECT 1 FROM outbox AS o WHERE o.kind = $1 AND o.pendo_id = j.value ->> 0)
               AND NOT EXISTS (SELECT 1 FROM shadow AS s
                               WHERE s.kind = $1 AND s.pendo_id = j.value ->> 0 AND s.rev > $4)
             ON CONFLICT (kind, pendo_id, mapping) DO UPDATE SET entry = excluded.entry"
        })
        .bind(kind.as_str())
        .bind(mapping)
        .bind(digest_list(chunk))
        .bind(read_seq)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}
