//! Paged reads of what Pendo holds for custom fields, through the aggregation API: the one read
//! `audit --against pendo` and the guard's adoption (`pendo::adopt`) share. The aggregation API
//! has no cursor, so pages are `sort` + `skip` + `limit`; an entity added mid-read shifts the
//! pages by one (one row may be listed twice, which readers skip).

use std::time::Duration;

use serde_json::{Value as Json, json};

use crate::domain::Kind;

use super::{PendoClient, PendoError};

/// How a read retries: transient failures back off (honouring Retry-After, capped by `max`),
/// a 408 or a 413 halves the page (down to 100 rows).
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub initial: Duration,
    pub max: Duration,
    pub attempts: u32,
}

/// The select key under which field `field` comes back: the field's own key, unless it collides
/// with the id key.
pub fn alias(kind: Kind, field: &str) -> String {
    if field == kind.id_key() {
        format!("custom_{field}")
    } else {
        field.to_owned()
    }
}

/// Every entity of `kind` with the custom `fields`, page by page.
pub struct ValuePages<'c> {
    client: &'c PendoClient,
    kind: Kind,
    select: serde_json::Map<String, Json>,
    label: String,
    retry: Retry,
    skip: usize,
    limit: usize,
    done: bool,
}

impl<'c> ValuePages<'c> {
    /// `label` names the read in Pendo's request id (`pendo-sync-{label}`) and in the log.
    pub fn new(
        client: &'c PendoClient,
        kind: Kind,
        fields: &[&str],
        page: usize,
        retry: Retry,
        label: &str,
    ) -> ValuePages<'c> {
        let id_key = kind.id_key();
        let mut select = serde_json::Map::new();
        select.insert(id_key.to_owned(), json!(id_key));
        for f in fields {
            select.insert(alias(kind, f), json!(format!("metadata.custom.{f}")));
        }
        ValuePages {
            client,
            kind,
            select,
            label: label.to_owned(),
            retry,
            skip: 0,
            limit: page.max(1),
            done: false,
        }
    }

    /// The next page's rows (`None` after the last), each `{id_key: id, alias: value, ...}`.
    pub async fn next(&mut self) -> Result<Option<Vec<Json>>, PendoError> {
        if self.done {
            return Ok(None);
        }
        let mut delay = self.retry.initial;
        let mut attempt = 1;
        let source = match self.kind {
            Kind::Account => json!({ "accounts": null }),
            Kind::Visitor => json!({ "visitors": null }),
        };
        loop {
            let request = json!({
                "response": { "mimeType": "application/json" },
                "request": {
                    "requestId": format!("pendo-sync-{}", self.label),
                    "pipeline": [
                        { "source": source },
                        { "identified": self.kind.id_key() },
                        { "select": self.select },
                        { "sort": [self.kind.id_key()] },
                        { "skip": self.skip },
                        { "limit": self.limit },
                    ]
                }
            });
            match self.client.aggregate(&request).await {
                Ok(rows) => {
                    self.skip += rows.len();
                    self.done = rows.len() < self.limit;
                    return Ok(Some(rows));
                }
                Err(e) if e.wants_smaller_batch() && self.limit > 100 => {
                    self.limit /= 2;
                    tracing::warn!(read = %self.label, limit = self.limit, error = %e, "Pendo refused an aggregation page (408/413); halving it.");
                }
                Err(e) if e.is_transient() && attempt < self.retry.attempts => {
                    let wait = e.retry_after().unwrap_or(delay).min(self.retry.max);
                    tracing::warn!(read = %self.label, error = %e, attempt, ?wait, "Pendo aggregation failed; retrying.");
                    tokio::time::sleep(wait).await;
                    delay = (delay * 2).min(self.retry.max);
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}
