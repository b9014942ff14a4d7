//! Resync jobs as rows (see `store/requests.rs`): saved whole, claimed oldest first by the
//! process that writes, requeued when the process that ran one died.

use sqlx::Row;

use super::{Backend, DbRow};
use super::{end_session, query};
use crate::store::*;

fn record_from_row(r: &DbRow) -> Result<ResyncRecord, StoreError> {
    let list = |column: &str| -> Result<Vec<String>, StoreError> {
        let text: String = r.get(column);
        serde_json::from_str(&text)
            .map_err(|e| StoreError::Corrupt(format!("resyncs.{column}: {e}")))
    };
    Ok(ResyncRecord {
        id: r.get("id"),
        mappings: list("mappings")?,
        kind: r.get("kind"),
        state: r.get("state"),
        records_read: r.get::<i64, _>("records_read") as u64,
        changes: r.get::<i64, _>("changes") as u64,
        pushed: r.get::<i64, _>("pushed") as u64,
        held: list("held")?,
        error: r.get("error"),
        requested_at: r.get("requested_at"),
        started_at: r.get("started_at"),
        finished_at: r.get("finished_at"),
    })
}

impl Backend {
    /// Writes the job as it stands (a new one, or its progress).
    pub async fn save_resync(&self, job: &ResyncRecord) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        query(
            "INSERT INTO resyncs (id, mappings, kind, state, records_read, changes, pushed, held,
                                  error, requested_at, started_at, finished_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
             ON CONFLICT (id) DO UPDATE SET state = excluded.state,
                records_read = excluded.records_read, changes = excluded.changes,
                pushed = excluded.pushed, held = excluded.held, error = excluded.error,
                started_at = excluded.started_at, finished_at = excluded.finished_at",
        )
        .bind(&job.id)
        .bind(serde_json::to_string(&job.mappings).expect("strings serialize"))
        .bind(&job.kind)
        .bind(&job.state)
        .bind(job.records_read as i64)
        .bind(job.changes as i64)
        .bind(job.pushed as i64)
        .bind(serde_json::to_string(&job.held).expect("strings serialize"))
        .bind(&job.error)
        .bind(job.requested_at)
        .bind(job.started_at)
        .bind(job.finished_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn resync(&self, id: &str) -> Result<Option<ResyncRecord>, StoreError> {
        let mut session = self.session().await?;
        let row = query("SELECT * FROM resyncs WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *session)
            .await?;
        end_session(session).await?;
        row.as_ref().map(record_from_row).transpose()
    }

    /// Marks the oldest queued job running (at `now`) and returns it.
    pub async fn claim_resync(&self, now: i64) -> Result<Option<ResyncRecord>, StoreError> {
        let mut tx = self.begin_write().await?;
        let row = query(
            "UPDATE resyncs SET state = 'running', started_at = $1
             WHERE id = (SELECT id FROM resyncs WHERE state = 'queued'
                         ORDER BY requested_at, id LIMIT 1)
             RETURNING *",
        )
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        row.as_ref().map(record_from_row).transpose()
    }

    /// Jobs a process left running when it died go back to the queue, to start over (a resync
    /// is safe to run again); returns how many.
    pub async fn requeue_resyncs(&self) -> Result<u64, StoreError> {
        let mut tx = self.begin_write().await?;
        let done = query(
            "UPDATE resyncs SET state = 'queued', records_read = 0, changes = 0, pushed = 0,
                    held = '[]', started_at = NULL
             WHERE state = 'running'",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    /// Deletes finished jobs older than `before` (Unix ms).
    pub async fn prune_resyncs(&self, before: i64) -> Result<u64, StoreError> {
        let mut tx = self.begin_write().await?;
        let done = query("DELETE FROM resyncs WHERE finished_at < $1")
            .bind(before)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }
}
