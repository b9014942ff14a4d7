//! The HubSpot connector: full pulls through the list endpoint (plus an `archived=true` sweep
//! for deletes), incremental pulls through search on the modification date, single-record reads
//! by id (`why --live`), and owner lookups. HTTP, auth, limits and error classification live in
//! [`client`].
//!
//! # Incremental pulls and the 10,000-result search cap
//!
//! Search pages are read by **keyset**, never by offset: every query asks for `after: 0` with
//! the modification-date bound moved up to the last timestamp seen (`GTE t`), and records at `t`
//! already delivered are skipped by id. The offset never grows, so the 10,000-result cap is never
//! reached however many records changed, and a record edited mid-pull moves forward in the sort
//! instead of shifting everyone behind it (which offset paging would turn into a skipped record).
//! When one whole page shares a single timestamp (≥ 200 ties), ordering by date cannot make
//! progress, so the pull switches to a *tie scan* of that timestamp (`date EQ t`,
//! `hs_object_id GT last`, sorted by `hs_object_id`), again keyset, then continues with `GT t`.
//! Any number of records sharing one timestamp arrive.
//!
//! The watermark is JSON `{"ms": <epoch ms>, "id": "<hs_object_id>"}` of the last record of the
//! page (never earlier than the one the pull started from). A pull resumes with `GTE ms - overlap`,
//! so the id is informational: ties at `ms` are re-read rather than trusted to an order HubSpot
//! does not promise.
//!
//! Filters (`property=value` pairs, ANDed) are sent as `EQ` filters in searches and applied
//! client-side to list pages (the list endpoint cannot filter). A search filter group holds at
//! most 10 filters (reference §h) and ANDed pairs cannot be split across groups or requests, so
//! the pairs that do not fit beside the cursor filters are applied client-side to search pages
//! too, after the page's watermark is taken from every hit. Search never returns archived
//! records, so incremental pulls do not report deletes; the periodic full reconcile's archived
//! sweep does.
//!
//! # Owners
//!
//! `owner_email` / `owner_name` resolve `hubspot_owner_id` through a cached owner list that
//! holds active *and* archived owners (a deactivated user still owns their records). The list
//! is read again at the start of every full pull, whenever it is older than
//! [`OWNER_CACHE_MAX_AGE`], and once per pull when an id is unknown.

mod client;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use self::client::{API, Client, Endpoint};
use super::{
    BoxFuture, CheckFinding, Connector, ConnectorError, FieldRequest, Page, Pull, PullSpec,
    RawRecord, Watermark,
};
use crate::config::{ConfigError, HubspotSettings, Transform, parse_hubspot_filter};
use crate::connectors::SharedKv;

/// List endpoint page size (HubSpot's practical maximum).
const LIST_LIMIT: usize = 100;
/// Search page size (HubSpot's maximum).
const SEARCH_LIMIT: usize = 200;
/// Filters HubSpot accepts in one filter group (since 2024-08-26; reference §h: 5 groups, 10
/// filters per group, 25 in all). A mapping's filter pairs are ANDed, so they must share one
/// group with the modification-date filters; pairs beyond what fits are applied here instead.
const MAX_FILTERS_PER_GROUP: usize = 10;
/// Modification-date / id filters a search body carries besides the mapping's (the tie scan's
/// `date EQ t` and `hs_object_id GT id`).
const CURSOR_FILTERS: usize = 2;
/// How long a loaded owner list is trusted. Owners change rarely (a new e-mail, a name, a
/// deactivated user), but a long-running service must pass such a change on without a restart:
/// incremental pulls read the list again once it is older than this, full pulls always do.
pub const OWNER_CACHE_MAX_AGE: Duration = Duration::from_secs(60 * 60);

#[derive(Debug, Clone)]
struct OwnerInfo {
    email: Option<String>,
    name: Option<String>,
}

/// The owner list as last read, and when.
struct OwnerCache {
    owners: HashMap<String, OwnerInfo>,
    /// A Tokio instant, so tests can age the cache with `tokio::time::pause` / `advance`.
    loaded_at: tokio::time::Instant,
}

/// When one pull reads the owner list (again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OwnerRefresh {
    /// A full pull (reconcile, resync): on first use, whatever the cache holds.
    Now,
    /// An incremental pull: once, if an owner id is unknown.
    OnMiss,
    /// Already read during this pull; only [`OWNER_CACHE_MAX_AGE`] triggers another read.
    Done,
}

/// HubSpot as a [`Connector`]. One instance per portal: its limiters are shared by every pull.
pub struct HubspotConnector {
    client: Client,
    /// Owner id → owner (active and archived), read on first use, at the start of every full
    /// pull, when older than [`OWNER_CACHE_MAX_AGE`], and once per pull on an unknown id.
    owners: tokio::sync::Mutex<Option<OwnerCache>>,
}

impl std::fmt::Debug for HubspotConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubspotConnector")
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

impl HubspotConnector {
    /// Resolves the secrets and builds the HTTP client and the shared limiters
    /// (`requests_per_10s` for every call, `search_requests_per_second` also for searches).
    /// `store` keeps rotated OAuth refresh tokens and the latest quota reading.
    pub fn new(settings: &HubspotSettings, store: Option<SharedKv>) -> Result<Self, ConfigError> {
        Ok(HubspotConnector {
            client: Client::new(settings, store)?,
            owners: tokio::sync::Mutex::new(None),
        })
    }

    /// Every owner: the active ones, then the archived ones (`archived=true` lists *only*
    /// archived owners). A deactivated user stays the owner of their records in HubSpot until
    /// someone reassigns them, so their e-mail and name must still resolve.
    async fn load_owners(
        &self,
        mapping: &str,
    ) -> Result<HashMap<String, OwnerInfo>, ConnectorError> {
        let mut out = HashMap::new();
        self.read_owners(false, mapping, &mut out).await?;
        let active = out.len();
        self.read_owners(true, mapping, &mut out).await?;
        tracing::debug!(
            active,
            archived = out.len() - active,
            "read the hubspot owner list"
        );
        Ok(out)
    }

    /// One `archived=false|true` listing of owners into `out` (an id already there is kept).
    async fn read_owners(
        &self,
        archived: bool,
        mapping: &str,
        out: &mut HashMap<String, OwnerInfo>,
    ) -> Result<(), ConnectorError> {
        let url = self.client.path(Endpoint::Owners);
        let mut after: Option<String> = None;
        loop {
            let mut q = vec![
                ("limit", "100".to_owned()),
                ("archived", archived.to_string()),
            ];
            if let Some(a) = &after {
                q.push(("after", a.clone()));
            }
            let v = self.client.get(&url, &q, mapping).await?;
            for o in v["results"].as_array().into_iter().flatten() {
                let Some(id) = id_string(&o["id"]) else {
                    continue;
                };
                let text = |k: &str| {
                    o[k].as_str()
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                };
                let name = [text("firstName"), text("lastName")]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(" ");
                out.entry(id).or_insert(OwnerInfo {
                    email: text("email"),
                    name: (!name.is_empty()).then_some(name),
                });
            }
            after = next_after(&v);
            if after.is_none() {
                return Ok(());
            }
        }
    }

    /// The owners among `ids`. The list is read again on first use, at the start of a full
    /// pull (`refresh` is [`OwnerRefresh::Now`]), when the cache is older than
    /// [`OWNER_CACHE_MAX_AGE`], and once per pull when an id is unknown; a list read during
    /// this pull serves the rest of it (an id unknown to it stays unknown).
    async fn owners_for(
        &self,
        ids: &BTreeSet<String>,
        refresh: &mut OwnerRefresh,
        mapping: &str,
    ) -> Result<HashMap<String, OwnerInfo>, ConnectorError> {
        let mut cache = self.owners.lock().await;
        let reason = match cache.as_ref() {
            None => Some("first use"),
            Some(_) if *refresh == OwnerRefresh::Now => Some("full pull"),
            Some(c) if c.loaded_at.elapsed() >= OWNER_CACHE_MAX_AGE => Some("cache expired"),
            Some(c)
                if *refresh == OwnerRefresh::OnMiss
                    && ids.iter().any(|i| !c.owners.contains_key(i)) =>
            {
                Some("unknown owner id")
            }
            Some(_) => None,
        };
        if let Some(reason) = reason {
            tracing::debug!(reason, mapping, "reading the hubspot owner list");
            let owners = self.load_owners(mapping).await?;
            *refresh = OwnerRefresh::Done;
            *cache = Some(OwnerCache {
                owners,
                loaded_at: tokio::time::Instant::now(),
            });
        }
        let map = &cache.as_ref().expect("loaded above").owners;
        Ok(ids
            .iter()
            .filter_map(|i| map.get(i).map(|o| (i.clone(), o.clone())))
            .collect())
    }
}

/// An id that HubSpot sends as a string or a number.
fn id_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn next_after(v: &Value) -> Option<String> {
    id_string(&v["paging"]["next"]["after"])
}

/// Numeric order of HubSpot ids (they are decimal integers; anything else sorts first).
fn id_num(id: &str) -> u64 {
    id.parse().unwrap_or(0)
}

/// Epoch ms from a HubSpot date value: epoch-ms digits or ISO-8601.
fn parse_ms(s: &str) -> Option<i64> {
    s.parse::<i64>().ok().or_else(|| {
        chrono::DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|d| d.timestamp_millis())
    })
}

/// The modification-date property searches filter and sort on (reference §h).
fn cursor_property(object: &str) -> &'static str {
    if object == "contacts" {
        "lastmodifieddate"
    } else {
        "hs_lastmodifieddate"
    }
}

/// `(modified ms, id)`, ordered by time then id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct Mark {
    ms: i64,
    #[serde(with = "id_as_string")]
    id: u64,
}

/// The id is written as a string (HubSpot ids outgrow JavaScript numbers).
mod id_as_string {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(id: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&id.to_string())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = String::deserialize(d)?;
        Ok(s.parse().unwrap_or(0))
    }
}

impl Mark {
    fn parse(w: &Watermark) -> Result<Mark, ConnectorError> {
        if let Ok(m) = serde_json::from_str::<Mark>(&w.0) {
            return Ok(m);
        }
        // A bare timestamp (epoch ms or ISO) is accepted too, e.g. one set by hand.
        parse_ms(w.0.trim())
            .map(|ms| Mark { ms, id: 0 })
            .ok_or_else(|| ConnectorError::Protocol {
                api: API,
                message: format!(
                    "unreadable HubSpot watermark {:?}; run a resync to reset it",
                    w.0
                ),
            })
    }

    fn to_watermark(self) -> Watermark {
        Watermark(serde_json::to_string(&self).expect("a mark serializes"))
    }
}

/// One record from a list or search answer.
struct Hit {
    id: String,
    props: Map<String, Value>,
    ms: Option<i64>,
    archived: bool,
}

fn parse_hits(v: &Value, cursor: &str) -> Result<Vec<Hit>, ConnectorError> {
    let results = v["results"]
        .as_array()
        .ok_or_else(|| ConnectorError::Protocol {
            api: API,
            message: "answer has no results array".into(),
        })?;
    results.iter().map(|r| parse_hit(r, cursor)).collect()
}

/// One record object (`id`, `properties`, `updatedAt`, `archived`), as list and search answers
/// hold them and the single-record endpoint answers it.
fn parse_hit(r: &Value, cursor: &str) -> Result<Hit, ConnectorError> {
    let id = id_string(&r["id"]).ok_or_else(|| ConnectorError::Protocol {
        api: API,
        message: "a record has no id".into(),
    })?;
    let props = r["properties"].as_object().cloned().unwrap_or_default();
    let ms = props
        .get(cursor)
        .and_then(Value::as_str)
        .or(r["updatedAt"].as_str())
        .and_then(parse_ms);
    Ok(Hit {
        id,
        props,
        ms,
        archived: r["archived"].as_bool().unwrap_or(false),
    })
}

/// The properties to request: each mapped path, the filter properties, the cursor and the id,
/// once each.
fn wanted_properties(spec: &PullSpec, filters: &[(String, String)], cursor: &str) -> Vec<String> {
    let mut properties: Vec<String> = Vec::new();
    let wanted = spec
        .fields
        .iter()
        .map(|f| f.path.as_str())
        .chain(filters.iter().map(|(k, _)| k.as_str()))
        .chain([cursor, "hs_object_id"]);
    for p in wanted {
        if !properties.iter().any(|q| q == p) {
            properties.push(p.to_owned());
        }
    }
    properties
}

/// Whether the client refused a call with a 404. [`client`] classifies every 404 as a
/// [`ConnectorError::Mapping`] worded `HTTP 404[: message]` (for list and search a 404 means a
/// wrong path or object); a single-record read is the one call where 404 means "no such record".
fn is_not_found(e: &ConnectorError) -> bool {
    matches!(e, ConnectorError::Mapping { message, .. } if message.starts_with("HTTP 404"))
}

/// A record id as one URL path segment: RFC 3986 unreserved bytes kept, every other byte
/// percent-encoded, so no id can reach another path or add a query.
fn path_segment(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

enum State {
    Full {
        archived: bool,
        after: Option<String>,
        max_ms: Option<i64>,
        started_ms: i64,
    },
    Incremental {
        start: Mark,
        /// Lower bound on the modification date: `GT lo` when `strict`, else `GTE lo`.
        lo: i64,
        strict: bool,
        /// Ids already delivered whose date is exactly `lo`.
        seen: HashSet<String>,
        /// Scanning the ties of one timestamp by id: `(ms, last id delivered)`.
        tie: Option<(i64, u64)>,
    },
    Done,
}

struct HubspotPull<'a> {
    conn: &'a HubspotConnector,
    spec: PullSpec,
    filters: Vec<(String, String)>,
    /// Properties to request: the mapped ones, filter ones, the cursor and the id.
    properties: Vec<String>,
    cursor: &'static str,
    state: State,
    owner_refresh: OwnerRefresh,
}

/// Whether a record's properties meet every `property=value` pair (exact text, as HubSpot's
/// `EQ` on the string properties a mapping filters on).
fn meets(props: &Map<String, Value>, pairs: &[(String, String)]) -> bool {
    pairs
        .iter()
        .all(|(k, want)| props.get(k).and_then(Value::as_str) == Some(want.as_str()))
}

impl HubspotPull<'_> {
    /// The filter pairs sent to search: as many as fit in one group beside the cursor filters.
    /// The pairs are ANDed, so they cannot be spread over groups (groups are ORed) or over
    /// requests; the rest ([`HubspotPull::local_filters`]) are applied to each page here.
    fn search_filters(&self) -> &[(String, String)] {
        let n = self
            .filters
            .len()
            .min(MAX_FILTERS_PER_GROUP - CURSOR_FILTERS);
        &self.filters[..n]
    }

    /// The filter pairs search could not carry.
    fn local_filters(&self) -> &[(String, String)] {
        &self.filters[self.search_filters().len()..]
    }

    /// Drops the hits that fail a filter search did not apply. Called after the page's
    /// watermark is computed from every hit: a record skipped here was read and judged, so the
    /// watermark may pass it.
    fn keep_local_matches(&self, hits: Vec<Hit>) -> Vec<Hit> {
        let local = self.local_filters();
        if local.is_empty() {
            return hits;
        }
        hits.into_iter()
            .filter(|h| meets(&h.props, local))
            .collect()
    }

    fn search_body(&self, filters: Vec<Value>, sort: &str) -> Value {
        debug_assert!(filters.len() <= CURSOR_FILTERS);
        let mut all = filters;
        all.extend(
            self.search_filters()
                .iter()
                .map(|(k, v)| json!({"propertyName": k, "operator": "EQ", "value": v})),
        );
        json!({
            "filterGroups": [{ "filters": all }],
            "sorts": [{ "propertyName": sort, "direction": "ASCENDING" }],
            "properties": self.properties,
            "limit": SEARCH_LIMIT,
            "after": "0",
        })
    }

    async fn search(&self, body: &Value) -> Result<(Vec<Hit>, bool), ConnectorError> {
        let url = self.conn.client.path(Endpoint::Search(&self.spec.object));
        let v = self
            .conn
            .client
            .post(&url, body, true, &self.spec.mapping)
            .await?;
        Ok((parse_hits(&v, self.cursor)?, next_after(&v).is_some()))
    }

    /// The next incremental page (see the module docs for the keyset scheme).
    async fn next_incremental(&mut self) -> Result<Option<Page>, ConnectorError> {
        loop {
            let State::Incremental {
                start,
                lo,
                strict,
                tie,
                ..
            } = &self.state
            else {
                return Ok(None);
            };
            let (start, lo_v, strict_v, tie_v) = (*start, *lo, *strict, *tie);
            if let Some((t_ms, after_id)) = tie_v {
                let body = self.search_body(
                    vec![
                        json!({"propertyName": self.cursor, "operator": "EQ", "value": t_ms.to_string()}),
                        json!({"propertyName": "hs_object_id", "operator": "GT", "value": after_id.to_string()}),
                    ],
                    "hs_object_id",
                );
                let (hits, more) = self.search(&body).await?;
                let hits: Vec<Hit> = hits
                    .into_iter()
                    .filter(|h| id_num(&h.id) > after_id)
                    .collect();
                let max_id = hits.iter().map(|h| id_num(&h.id)).max();
                if let State::Incremental {
                    lo,
                    strict,
                    seen,
                    tie,
                    ..
                } = &mut self.state
                {
                    match (more, max_id) {
                        (true, Some(m)) => *tie = Some((t_ms, m)),
                        _ => {
                            // The timestamp is exhausted: continue strictly after it.
                            *tie = None;
                            *lo = t_ms;
                            *strict = true;
                            seen.clear();
                        }
                    }
                }
                let Some(max_id) = max_id else { continue };
                let mark = Mark {
                    ms: t_ms,
                    id: max_id,
                };
                let hits = self.keep_local_matches(hits);
                return self.finish(hits, Some(mark.max(start))).await.map(Some);
            }
            let op = if strict_v { "GT" } else { "GTE" };
            let body = self.search_body(
                vec![
                    json!({"propertyName": self.cursor, "operator": op, "value": lo_v.to_string()}),
                ],
                self.cursor,
            );
            let (hits, more) = self.search(&body).await?;
            if hits.is_empty() {
                self.state = State::Done;
                return Ok(None);
            }
            let mut dated = Vec::with_capacity(hits.len());
            for h in hits {
                let ms = h.ms.ok_or_else(|| ConnectorError::Protocol {
                    api: API,
                    message: format!("record {} has no {}", h.id, self.cursor),
                })?;
                dated.push((ms, h));
            }
            let min_ms = dated.iter().map(|d| d.0).min().unwrap_or(lo_v);
            let max_ms = dated.iter().map(|d| d.0).max().unwrap_or(lo_v);
            let State::Incremental {
                lo,
                strict,
                seen,
                tie,
                ..
            } = &mut self.state
            else {
                return Ok(None);
            };
            if more && min_ms == max_ms {
                // A full page of one timestamp: only an id-ordered scan of it can progress.
                *tie = Some((max_ms, 0));
                continue;
            }
            let fresh: Vec<(i64, Hit)> = dated
                .into_iter()
                .filter(|(ms, h)| !(*ms == lo_v && seen.contains(&h.id)))
                .collect();
            let done = !more;
            if more {
                // Records at `max_ms` may continue on the next page: re-read from it, skipping
                // the ones delivered here.
                if max_ms != lo_v {
                    seen.clear();
                }
                seen.extend(
                    fresh
                        .iter()
                        .filter(|(ms, _)| *ms == max_ms)
                        .map(|(_, h)| h.id.clone()),
                );
                *lo = max_ms;
                *strict = false;
            }
            if done {
                self.state = State::Done;
            }
            let Some(mark) = fresh
                .iter()
                .map(|(ms, h)| Mark {
                    ms: *ms,
                    id: id_num(&h.id),
                })
                .max()
            else {
                if done {
                    return Ok(None);
                }
                continue;
            };
            let hits = self.keep_local_matches(fresh.into_iter().map(|(_, h)| h).collect());
            return self.finish(hits, Some(mark.max(start))).await.map(Some);
        }
    }

    /// The next full-pull page: live records, then the archived sweep.
    async fn next_full(&mut self) -> Result<Option<Page>, ConnectorError> {
        loop {
            let State::Full {
                archived,
                after,
                max_ms,
                started_ms,
            } = &self.state
            else {
                return Ok(None);
            };
            let (archived, after, max_ms, started_ms) =
                (*archived, after.clone(), *max_ms, *started_ms);
            let url = self.conn.client.path(Endpoint::Objects(&self.spec.object));
            let mut q = vec![
                ("limit", LIST_LIMIT.to_string()),
                ("properties", self.properties.join(",")),
                ("archived", archived.to_string()),
            ];
            if let Some(a) = after {
                q.push(("after", a));
            }
            let v = self.conn.client.get(&url, &q, &self.spec.mapping).await?;
            let hits = parse_hits(&v, self.cursor)?;
            let page_max = hits.iter().filter_map(|h| h.ms).max();
            let max_ms = max_ms.max(page_max);
            let next = next_after(&v);
            let finished = next.is_none() && archived;
            self.state = match next {
                Some(a) => State::Full {
                    archived,
                    after: Some(a),
                    max_ms,
                    started_ms,
                },
                None if !archived => State::Full {
                    archived: true,
                    after: None,
                    max_ms,
                    started_ms,
                },
                None => State::Done,
            };
            let hits: Vec<Hit> = hits
                .into_iter()
                .filter(|h| meets(&h.props, &self.filters))
                .collect();
            // Only the last page carries a watermark: list order is not date order. It is capped
            // at the pull's start so changes made during the pull are read again next cycle.
            let watermark = finished
                .then(|| {
                    max_ms.map(|m| Mark {
                        ms: m.min(started_ms),
                        id: 0,
                    })
                })
                .flatten();
            if hits.is_empty() && watermark.is_none() {
                if finished {
                    return Ok(None);
                }
                continue;
            }
            return self.finish(hits, watermark).await.map(Some);
        }
    }

    /// Builds the page's records (owners resolved) and records the quota reading.
    async fn finish(
        &mut self,
        hits: Vec<Hit>,
        watermark: Option<Mark>,
    ) -> Result<Page, ConnectorError> {
        let records = self
            .conn
            .records(
                hits,
                &self.spec.fields,
                &mut self.owner_refresh,
                &self.spec.mapping,
            )
            .await?;
        self.conn.client.flush_quota().await;
        Ok(Page {
            records,
            watermark: watermark.map(Mark::to_watermark),
        })
    }
}

impl HubspotConnector {
    /// Hits as [`RawRecord`]s: each field under its [`FieldRequest::key`], property strings as
    /// HubSpot sent them, owner transforms resolved through the owner cache (`refresh` says
    /// when it is read again). Pulls and [`Connector::fetch`] both go through here, so a record
    /// read alone maps exactly as the same record pulled.
    async fn records(
        &self,
        hits: Vec<Hit>,
        fields: &[FieldRequest],
        refresh: &mut OwnerRefresh,
        mapping: &str,
    ) -> Result<Vec<RawRecord>, ConnectorError> {
        let owner_paths: BTreeSet<&str> = fields
            .iter()
            .filter(|f| f.transform.is_some())
            .map(|f| f.path.as_str())
            .collect();
        let owner_ids: BTreeSet<String> = hits
            .iter()
            .flat_map(|h| {
                owner_paths
                    .iter()
                    .filter_map(|p| h.props.get(*p).and_then(Value::as_str))
            })
            .filter(|s| !s.trim().is_empty())
            .map(str::to_owned)
            .collect();
        let owners = if owner_ids.is_empty() {
            HashMap::new()
        } else {
            self.owners_for(&owner_ids, refresh, mapping).await?
        };
        for id in owner_ids.iter().filter(|i| !owners.contains_key(*i)) {
            tracing::warn!(owner_id = %id, mapping = %mapping, "unknown HubSpot owner id; its owner fields are left empty");
        }
        Ok(hits
            .into_iter()
            .map(|h| {
                let mut map = Map::new();
                for f in fields {
                    let raw = h.props.get(&f.path).cloned().unwrap_or(Value::Null);
                    let value = match f.transform {
                        None => raw,
                        Some(t) => {
                            let owner = raw.as_str().and_then(|id| owners.get(id));
                            let v = match t {
                                Transform::OwnerEmail => owner.and_then(|o| o.email.clone()),
                                Transform::OwnerName => owner.and_then(|o| o.name.clone()),
                            };
                            v.map_or(Value::Null, Value::String)
                        }
                    };
                    map.insert(f.key(), value);
                }
                RawRecord {
                    crm_id: h.id,
                    fields: Value::Object(map),
                    deleted: h.archived,
                    modified_at: h.ms,
                }
            })
            .collect())
    }

    /// [`Connector::fetch`]: `GET …/objects/{object}/{id}` for the live record, then once more
    /// with `archived=true` (HubSpot answers 404 for an archived record unless asked for
    /// archived ones, and 404 for a live one when asked), so a deleted record still shows its
    /// last fields, flagged `deleted`. The properties are a pull's (mapped paths, the cursor
    /// property for `modified_at`, the id); owners resolve through the shared cache, read again
    /// only when stale or missing an id, as in an incremental pull. HubSpot ids are decimal
    /// integers: anything else is `None` without a request.
    async fn fetch_one(
        &self,
        spec: &PullSpec,
        crm_id: &str,
    ) -> Result<Option<RawRecord>, ConnectorError> {
        if crm_id.is_empty() || !crm_id.bytes().all(|b| b.is_ascii_digit()) {
            return Ok(None);
        }
        let cursor = cursor_property(&spec.object);
        let properties = wanted_properties(spec, &[], cursor).join(",");
        let url = format!(
            "{}/{}",
            self.client.path(Endpoint::Objects(&spec.object)),
            path_segment(crm_id)
        );
        let mut found = None;
        for archived in [false, true] {
            let q = [
                ("properties", properties.clone()),
                ("archived", archived.to_string()),
            ];
            match self.client.get(&url, &q, &spec.mapping).await {
                Ok(v) => {
                    let mut hit = parse_hit(&v, cursor)?;
                    // Asked for archived records only: this one is, whatever the flag says.
                    hit.archived |= archived;
                    found = Some(hit);
                    break;
                }
                Err(e) if is_not_found(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        let Some(hit) = found else {
            return Ok(None);
        };
        let mut refresh = OwnerRefresh::OnMiss;
        let mut records = self
            .records(vec![hit], &spec.fields, &mut refresh, &spec.mapping)
            .await?;
        Ok(records.pop())
    }
}

impl Pull for HubspotPull<'_> {
    fn next_page(&mut self) -> BoxFuture<'_, Result<Option<Page>, ConnectorError>> {
        Box::pin(async move {
            match self.state {
                State::Full { .. } => self.next_full().await,
                State::Incremental { .. } => self.next_incremental().await,
                State::Done => Ok(None),
            }
        })
    }
}

fn filter_pairs(spec: &PullSpec) -> Result<Vec<(String, String)>, ConnectorError> {
    match &spec.filter {
        None => Ok(Vec::new()),
        Some(f) => parse_hubspot_filter(f).map_err(|message| ConnectorError::Mapping {
            api: API,
            mapping: spec.mapping.clone(),
            message: format!("bad filter: {message}"),
        }),
    }
}

impl Connector for HubspotConnector {
    fn source(&self) -> &'static str {
        "hubspot"
    }

    fn pull<'a>(
        &'a self,
        spec: PullSpec,
    ) -> BoxFuture<'a, Result<Box<dyn Pull + 'a>, ConnectorError>> {
        Box::pin(async move {
            let filters = filter_pairs(&spec)?;
            let cursor = cursor_property(&spec.object);
            let properties = wanted_properties(&spec, &filters, cursor);
            // A full pull (reconcile, resync) reads the owner list afresh: a changed e-mail or
            // name must reach Pendo at the latest with the next reconcile.
            let owner_refresh = if spec.since.is_none() {
                OwnerRefresh::Now
            } else {
                OwnerRefresh::OnMiss
            };
            let state = match &spec.since {
                None => State::Full {
                    archived: false,
                    after: None,
                    max_ms: None,
                    started_ms: chrono::Utc::now().timestamp_millis(),
                },
                Some(w) => {
                    let start = Mark::parse(w)?;
                    let overlap = i64::try_from(spec.overlap.as_millis()).unwrap_or(i64::MAX);
                    State::Incremental {
                        start,
                        lo: start.ms.saturating_sub(overlap),
                        strict: false,
                        seen: HashSet::new(),
                        tie: None,
                    }
                }
            };
            Ok(Box::new(HubspotPull {
                conn: self,
                spec,
                filters,
                properties,
                cursor,
                state,
                owner_refresh,
            }) as Box<dyn Pull + 'a>)
        })
    }

    fn check<'a>(
        &'a self,
        spec: &'a PullSpec,
    ) -> BoxFuture<'a, Result<Vec<CheckFinding>, ConnectorError>> {
        Box::pin(async move {
            let object = &spec.object;
            let url = self.client.path(Endpoint::Properties(object));
            let mut findings = Vec::new();
            let declared: HashMap<String, String> =
                match self.client.get(&url, &[], &spec.mapping).await {
                    Ok(v) => {
                        findings.push(CheckFinding {
                            ok: true,
                            subject: "hubspot login".into(),
                            detail: "token accepted".into(),
                        });
                        v["results"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|p| {
                                Some((
                                    p["name"].as_str()?.to_owned(),
                                    p["type"].as_str().unwrap_or("?").to_owned(),
                                ))
                            })
                            .collect()
                    }
                    Err(e @ ConnectorError::Auth { .. }) => {
                        return Ok(vec![CheckFinding {
                            ok: false,
                            subject: "hubspot login".into(),
                            detail: e.to_string(),
                        }]);
                    }
                    Err(ConnectorError::Mapping { message, .. }) => {
                        findings.push(CheckFinding {
                            ok: false,
                            subject: format!("hubspot {object}"),
                            detail: format!("hubspot has no object {object}: {message}"),
                        });
                        return Ok(findings);
                    }
                    Err(e) => return Err(e),
                };
            let filters = filter_pairs(spec)?;
            let mut names: Vec<&str> = Vec::new();
            for n in spec
                .fields
                .iter()
                .map(|f| f.path.as_str())
                .chain(filters.iter().map(|(k, _)| k.as_str()))
            {
                if !names.contains(&n) {
                    names.push(n);
                }
            }
            for n in names {
                findings.push(match declared.get(n) {
                    Some(t) => CheckFinding {
                        ok: true,
                        subject: format!("{object}.{n}"),
                        detail: format!("property exists (type {t})"),
                    },
                    None => CheckFinding {
                        ok: false,
                        subject: format!("{object}.{n}"),
                        detail: format!("{object} has no property {n}"),
                    },
                });
            }
            if spec.fields.iter().any(|f| f.transform.is_some()) {
                let url = self.client.path(Endpoint::Owners);
                let q = [("limit", "1".to_owned())];
                findings.push(match self.client.get(&url, &q, &spec.mapping).await {
                    Ok(_) => CheckFinding {
                        ok: true,
                        subject: "hubspot owners".into(),
                        detail: "owners are readable".into(),
                    },
                    Err(e) => CheckFinding {
                        ok: false,
                        subject: "hubspot owners".into(),
                        detail: format!("cannot read owners (needs crm.objects.owners.read): {e}"),
                    },
                });
            }
            Ok(findings)
        })
    }

    fn fetch<'a>(
        &'a self,
        spec: &'a PullSpec,
        crm_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<RawRecord>, ConnectorError>> {
        Box::pin(async move {
            let found = self.fetch_one(spec, crm_id).await;
            self.client.flush_quota().await;
            found
        })
    }
}
