//! One pull as a state machine: decide REST or Bulk, then serve pages.
//!
//! REST pages follow `nextRecordsUrl`, which Salesforce serves from the snapshot it took when the
//! query ran, so a record edited mid-pull is not skipped: it gets a newer `SystemModstamp` than
//! anything in the snapshot and so lands after this pull's watermark. On `QUERY_TIMEOUT` an
//! incremental pull narrows its time window (halving it, up to four times) and walks forward
//! window by window.

use chrono::{DateTime, Utc};

use crate::connectors::{BoxFuture, ConnectorError, Page, Pull, PullSpec};

use super::soql::{self, Cursor, Window};
use super::{API, Req, SalesforceConnector, error_code};

/// How many times a timed-out query is narrowed before the pull gives up.
const MAX_NARROWINGS: u32 = 4;

enum Stage {
    Start,
    Rest(RestState),
    Bulk(super::bulk::BulkState),
    Done,
}

struct RestState {
    window: Window,
    /// Width of each window once a timeout forced narrowing.
    span: Option<chrono::Duration>,
    next_url: Option<String>,
    narrowed: u32,
}

pub(super) struct SfPull<'a> {
    conn: &'a SalesforceConnector,
    spec: PullSpec,
    /// Where an incremental pull started: no watermark goes behind it.
    start: Option<Cursor>,
    started_at: DateTime<Utc>,
    /// Whether this pull already asked `/limits` for a fresh reading.
    probed: bool,
    stage: Stage,
}

impl<'a> SfPull<'a> {
    pub(super) fn new(
        conn: &'a SalesforceConnector,
        spec: PullSpec,
    ) -> Result<Self, ConnectorError> {
        let start = match &spec.since {
            None => None,
            Some(w) => Some(Cursor::from_watermark(w).ok_or_else(|| ConnectorError::Protocol {
                api: API,
                message: format!(
                    "the stored watermark of mapping {} is not a Salesforce cursor; run a resync",
                    spec.mapping
                ),
            })?),
        };
        Ok(SfPull {
            conn,
            spec,
            start,
            started_at: Utc::now(),
            probed: false,
            stage: Stage::Start,
        })
    }

    /// A watermark for a page whose last record has `last`: never behind the start.
    pub(super) fn watermark(&self, last: Option<Cursor>) -> Option<crate::connectors::Watermark> {
        let best = match (last, self.start.clone()) {
            (Some(l), Some(s)) => Some(l.max(s)),
            (l, s) => l.or(s),
        };
        best.map(|c| c.to_watermark())
    }

    async fn begin(&mut self) -> Result<(), ConnectorError> {
        if let Some(start) = &self.start {
            let overlap = chrono::Duration::from_std(self.spec.overlap).unwrap_or_default();
            self.stage = Stage::Rest(RestState {
                window: Window {
                    from: Some(start.ts - overlap),
                    to: None,
                },
                span: None,
                next_url: None,
                narrowed: 0,
            });
            return Ok(());
        }
        // A full pull: count first, and hand big ones to Bulk 2.0 (one job instead of one
        // request per 2,000 rows).
        let total = self.count().await?;
        if total > self.conn.settings.bulk_threshold {
            tracing::info!(mapping = %self.spec.mapping, total, "full pull via Bulk API 2.0");
            let job = super::bulk::start(self.conn, &self.spec, &mut self.probed).await?;
            self.stage = Stage::Bulk(job);
        } else {
            self.stage = Stage::Rest(RestState {
                window: Window::default(),
                span: None,
                next_url: None,
                narrowed: 0,
            });
        }
        Ok(())
    }

    async fn count(&mut self) -> Result<u64, ConnectorError> {
        let mut req = Req::get(self.conn.data_path("queryAll"));
        req.query.push(("q", soql::count_query(&self.spec)));
        let ans = self.conn.send(&req, Some(&mut self.probed)).await?;
        let v = self.conn.json(ans, &self.spec.mapping)?;
        v["totalSize"]
            .as_u64()
            .ok_or_else(|| ConnectorError::Protocol {
                api: API,
                message: "COUNT() answer without totalSize".into(),
            })
    }

    async fn rest_page(&mut self) -> Result<Option<Page>, ConnectorError> {
        loop {
            let Stage::Rest(st) = &mut self.stage else {
                return Ok(None);
            };
            let (req, first) = match st.next_url.take() {
                Some(url) => (Req::get(url), false),
                None => {
                    let mut req = Req::get(self.conn.data_path("queryAll"));
                    req.query
                        .push(("q", soql::rest_query(&self.spec, st.window)));
                    (req, true)
                }
            };
            let window = st.window;
            let ans = self.conn.send(&req, Some(&mut self.probed)).await?;
            let Stage::Rest(st) = &mut self.stage else {
                return Ok(None);
            };
            if first
                && ans.status == 400
                && error_code(&ans.body).is_some_and(|c| c.0 == "QUERY_TIMEOUT")
            {
                let Some(from) = window.from.filter(|_| st.narrowed < MAX_NARROWINGS) else {
                    return Err(ConnectorError::Transient {
                        api: API,
                        message: format!(
                            "QUERY_TIMEOUT for mapping {} even on a narrowed window",
                            self.spec.mapping
                        ),
                    });
                };
                let span = st.span.unwrap_or(self.started_at - from) / 2;
                st.narrowed += 1;
                st.span = Some(span);
                st.window.to = Some(from + span);
                tracing::warn!(mapping = %self.spec.mapping, ?span, "salesforce QUERY_TIMEOUT; narrowing the window");
                continue;
            }
            let body = self.conn.json(ans, &self.spec.mapping)?;
            let done = body["done"].as_bool().unwrap_or(true);
            if !done {
                st.next_url = Some(
                    body["nextRecordsUrl"]
                        .as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| ConnectorError::Protocol {
                            api: API,
                            message: "done:false without nextRecordsUrl".into(),
                        })?,
                );
            } else if let (Some(to), Some(span)) = (window.to, st.span) {
                // Next window; the last one is open-ended so it reaches "now".
                st.window.from = Some(to);
                st.window.to = (to + span < self.started_at).then_some(to + span);
            } else {
                self.stage = Stage::Done;
            }
            let records = body["records"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            let mut page = Vec::with_capacity(records.len());
            let mut last = None;
            for r in records {
                let (raw, cur) = soql::flatten(r, &self.spec.fields).ok_or_else(|| {
                    ConnectorError::Protocol {
                        api: API,
                        message: "a record without Id/SystemModstamp".into(),
                    }
                })?;
                page.push(raw);
                last = Some(cur);
            }
            if page.is_empty() && !matches!(self.stage, Stage::Done) {
                continue;
            }
            if page.is_empty() {
                return Ok(None);
            }
            return Ok(Some(Page {
                watermark: self.watermark(last),
                records: page,
            }));
        }
    }
}

impl SfPull<'_> {
    async fn bulk_page(&mut self) -> Result<Option<Page>, ConnectorError> {
        let Stage::Bulk(st) = &mut self.stage else {
            return Ok(None);
        };
        let page = super::bulk::next_page(self.conn, &self.spec, &mut self.probed, st).await?;
        if st.finished() {
            self.stage = Stage::Done;
        }
        Ok(page)
    }
}

impl Pull for SfPull<'_> {
    fn next_page(&mut self) -> BoxFuture<'_, Result<Option<Page>, ConnectorError>> {
        Box::pin(async move {
            if matches!(self.stage, Stage::Start) {
                self.begin().await?;
            }
            let page = match &self.stage {
                Stage::Start | Stage::Done => Ok(None),
                Stage::Rest(_) => self.rest_page().await,
                Stage::Bulk(_) => self.bulk_page().await,
            };
            self.conn.persist_quota().await;
            page
        })
    }
}
