//! An in-memory CRM for tests and benchmarks: records kept in a shared table, each stamped with a
//! strictly increasing modification sequence, pulled in pages ordered by `(seq, id)`.
//!
//! It honours the whole [`Connector`] contract (watermarks in order, deletes, full pulls), so the
//! engine's tests exercise the same paths a real CRM does, without a network.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::{
    BoxFuture, CheckFinding, Connector, ConnectorError, Page, Pull, PullSpec, RawRecord, Watermark,
};

#[derive(Debug, Clone)]
struct Row {
    seq: u64,
    fields: serde_json::Value,
    deleted: bool,
}

#[derive(Debug, Default)]
struct Inner {
    /// object → crm id → row
    objects: BTreeMap<String, BTreeMap<String, Row>>,
    seq: u64,
    /// Fail the pull with a transient error when this many pages have been served.
    fail_after_pages: Option<usize>,
    pages_served: usize,
    /// Full pulls (reconciles, resyncs) fail at once while this is set.
    fail_full_pulls: bool,
}

/// A shared, mutable fixture CRM. Clones share the same records.
#[derive(Debug, Clone)]
pub struct FixtureConnector {
    inner: Arc<Mutex<Inner>>,
    page_size: usize,
}

impl FixtureConnector {
    pub fn new(page_size: usize) -> Self {
        FixtureConnector {
            inner: Arc::default(),
            page_size: page_size.max(1),
        }
    }

    /// Inserts or replaces a record; it becomes the newest change.
    pub fn upsert(&self, object: &str, crm_id: &str, fields: serde_json::Value) {
        let mut inner = self.inner.lock().expect("fixture lock");
        inner.seq += 1;
        let seq = inner.seq;
        inner.objects.entry(object.to_owned()).or_default().insert(
            crm_id.to_owned(),
            Row {
                seq,
                fields,
                deleted: false,
            },
        );
    }

    /// Changes one field of an existing record (dotted paths not supported: top level only).
    pub fn set_field(&self, object: &str, crm_id: &str, field: &str, value: serde_json::Value) {
        let mut inner = self.inner.lock().expect("fixture lock");
        inner.seq += 1;
        let seq = inner.seq;
        let row = inner
            .objects
            .get_mut(object)
            .and_then(|o| o.get_mut(crm_id))
            .expect("fixture record exists");
        row.fields[field] = value;
        row.seq = seq;
    }

    /// Marks a record deleted (it is still returned, with `deleted: true`, like `queryAll`).
    pub fn delete(&self, object: &str, crm_id: &str) {
        let mut inner = self.inner.lock().expect("fixture lock");
        inner.seq += 1;
        let seq = inner.seq;
        if let Some(row) = inner
            .objects
            .get_mut(object)
            .and_then(|o| o.get_mut(crm_id))
        {
            row.deleted = true;
            row.seq = seq;
        }
    }

    /// Removes a record without a trace (a hard delete, or a record that left the mapping's
    /// filter): no pull returns it again, so only a full pull notices it is gone.
    pub fn purge(&self, object: &str, crm_id: &str) {
        let mut inner = self.inner.lock().expect("fixture lock");
        if let Some(o) = inner.objects.get_mut(object) {
            o.remove(crm_id);
        }
    }

    /// Makes the next pull fail (transiently) once `pages` pages have been served.
    pub fn fail_after_pages(&self, pages: Option<usize>) {
        let mut inner = self.inner.lock().expect("fixture lock");
        inner.fail_after_pages = pages;
        inner.pages_served = 0;
    }

    /// Makes every full pull fail (transiently) until switched off; incremental pulls work.
    pub fn fail_full_pulls(&self, on: bool) {
        self.inner.lock().expect("fixture lock").fail_full_pulls = on;
    }

    /// Pages served since the last [`FixtureConnector::fail_after_pages`] (or creation).
    pub fn pages_served(&self) -> usize {
        self.inner.lock().expect("fixture lock").pages_served
    }

    /// The live (not deleted) records of `object`, by CRM id.
    pub fn records(&self, object: &str) -> BTreeMap<String, serde_json::Value> {
        let inner = self.inner.lock().expect("fixture lock");
        inner
            .objects
            .get(object)
            .map(|o| {
                o.iter()
                    .filter(|(_, r)| !r.deleted)
                    .map(|(k, r)| (k.clone(), r.fields.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

struct FixturePull {
    inner: Arc<Mutex<Inner>>,
    /// The snapshot taken at pull start, in (seq, id) order: later edits arrive next pull.
    rows: std::vec::IntoIter<(u64, String, Row)>,
    page_size: usize,
}

impl Connector for FixtureConnector {
    fn source(&self) -> &'static str {
        "fixture"
    }

    fn pull<'a>(
        &'a self,
        spec: PullSpec,
    ) -> BoxFuture<'a, Result<Box<dyn Pull + 'a>, ConnectorError>> {
        Box::pin(async move {
            let since: u64 = match &spec.since {
                None => 0,
                Some(w) => w.0.parse().map_err(|_| ConnectorError::Protocol {
                    api: "fixture",
                    message: format!("bad watermark {:?}", w.0),
                })?,
            };
            let inner = self.inner.lock().expect("fixture lock");
            if spec.since.is_none() && inner.fail_full_pulls {
                return Err(ConnectorError::Transient {
                    api: "fixture",
                    message: "injected full-pull failure".into(),
                });
            }
            let mut rows: Vec<(u64, String, Row)> = inner
                .objects
                .get(&spec.object)
                .map(|o| {
                    o.iter()
                        .filter(|(_, r)| r.seq > since)
                        .filter(|(_, r)| spec.since.is_some() || !r.deleted)
                        .map(|(k, r)| (r.seq, k.clone(), r.clone()))
                        .collect()
                })
                .unwrap_or_default();
            rows.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
            drop(inner);
            Ok(Box::new(FixturePull {
                inner: self.inner.clone(),
                rows: rows.into_iter(),
                page_size: self.page_size,
            }) as Box<dyn Pull + 'a>)
        })
    }

    fn check<'a>(
        &'a self,
        spec: &'a PullSpec,
    ) -> BoxFuture<'a, Result<Vec<CheckFinding>, ConnectorError>> {
        Box::pin(async move {
            Ok(vec![CheckFinding {
                ok: true,
                subject: format!("fixture {}", spec.object),
                detail: "in-memory fixture".into(),
            }])
        })
    }

    /// The row as a pull would deliver it (all its fields, `deleted` kept, no modification
    /// time); a purged or never-written id is `None`.
    fn fetch<'a>(
        &'a self,
        spec: &'a PullSpec,
        crm_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<RawRecord>, ConnectorError>> {
        let found = {
            let inner = self.inner.lock().expect("fixture lock");
            inner
                .objects
                .get(&spec.object)
                .and_then(|o| o.get(crm_id))
                .map(|row| RawRecord {
                    crm_id: crm_id.to_owned(),
                    fields: row.fields.clone(),
                    deleted: row.deleted,
                    modified_at: None,
                })
        };
        Box::pin(std::future::ready(Ok(found)))
    }
}

impl Pull for FixturePull {
    fn next_page(&mut self) -> BoxFuture<'_, Result<Option<Page>, ConnectorError>> {
        Box::pin(async move {
            {
                let mut inner = self.inner.lock().expect("fixture lock");
                if inner
                    .fail_after_pages
                    .is_some_and(|n| inner.pages_served >= n)
                {
                    inner.fail_after_pages = None;
                    return Err(ConnectorError::Transient {
                        api: "fixture",
                        message: "injected failure".into(),
                    });
                }
                inner.pages_served += 1;
            }
            let chunk: Vec<_> = self.rows.by_ref().take(self.page_size).collect();
            let Some(last_seq) = chunk.last().map(|r| r.0) else {
                return Ok(None);
            };
            let records = chunk
                .into_iter()
                .map(|(_, id, row)| RawRecord {
                    crm_id: id,
                    fields: row.fields,
                    deleted: row.deleted,
                    modified_at: None,
                })
                .collect();
            Ok(Some(Page {
                records,
                watermark: Some(Watermark(last_seq.to_string())),
            }))
        })
    }
}
