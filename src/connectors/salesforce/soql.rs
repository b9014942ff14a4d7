//! SOQL text, the incremental cursor and record flattening: everything about *what* a pull asks
//! Salesforce for and how an answer becomes [`RawRecord`]s, with no I/O.
//!
//! The cursor is the compound `(SystemModstamp, Id)` of the last record delivered, stored as JSON
//! in the [`Watermark`]. Queries re-read from `SystemModstamp >= cursor.ts - overlap` and order by
//! `SystemModstamp, Id`, so records sharing a timestamp (common: second precision, bulk updates)
//! are never split between "delivered" and "skipped".

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value};

use crate::connectors::{FieldRequest, PullSpec, RawRecord, Watermark};

/// `(SystemModstamp, Id)` of the last delivered record.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Cursor {
    pub ts: DateTime<Utc>,
    pub id: String,
}

impl Cursor {
    pub fn to_watermark(&self) -> Watermark {
        let v = serde_json::json!({
            "ts": self.ts.to_rfc3339_opts(SecondsFormat::Millis, true),
            "id": self.id,
        });
        Watermark(v.to_string())
    }

    pub fn from_watermark(w: &Watermark) -> Option<Cursor> {
        let v: Value = serde_json::from_str(&w.0).ok()?;
        Some(Cursor {
            ts: parse_datetime(v["ts"].as_str()?)?,
            id: v["id"].as_str().unwrap_or("").to_owned(),
        })
    }
}

/// Salesforce writes `2026-11-01T10:00:00.000+0000` (REST) and `...000Z` (Bulk CSV).
pub(super) fn parse_datetime(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .or_else(|_| DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f%z"))
        .ok()
        .map(|d| d.with_timezone(&Utc))
}

/// A SOQL datetime literal: unquoted ISO 8601 in UTC, whole seconds (rounded down, so the
/// condition can only include more, never less).
pub(super) fn literal(ts: DateTime<Utc>) -> String {
    ts.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// The SELECT list: the mapping's paths plus the cursor and delete columns, each once
/// (SOQL rejects duplicate columns; names are case-insensitive).
pub(super) fn select_list(spec: &PullSpec) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let wanted = ["Id", "SystemModstamp", "IsDeleted"]
        .into_iter()
        .map(str::to_owned)
        .chain(spec.fields.iter().map(|f| f.path.clone()));
    for f in wanted {
        if !out.iter().any(|o| o.eq_ignore_ascii_case(&f)) {
            out.push(f);
        }
    }
    out
}

/// The time range one query covers: `[from, to)`, either end open.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Window {
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
}

fn where_clause(spec: &PullSpec, window: Window) -> String {
    let mut conds = Vec::new();
    if let Some(f) = &spec.filter {
        conds.push(format!("({f})"));
    }
    if let Some(from) = window.from {
        conds.push(format!("SystemModstamp >= {}", literal(from)));
    }
    if let Some(to) = window.to {
        conds.push(format!("SystemModstamp < {}", literal(to)));
    }
    if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    }
}

/// The REST query of a pull window, in cursor order.
pub(super) fn rest_query(spec: &PullSpec, window: Window) -> String {
    format!(
        "SELECT {} FROM {}{} ORDER BY SystemModstamp ASC, Id ASC",
        select_list(spec).join(", "),
        spec.object,
        where_clause(spec, window)
    )
}

/// The Bulk 2.0 query: no ORDER BY (it disables PK chunking; order is restored by the cursor).
pub(super) fn bulk_query(spec: &PullSpec) -> String {
    format!(
        "SELECT {} FROM {}{}",
        select_list(spec).join(", "),
        spec.object,
        where_clause(spec, Window::default())
    )
}

/// Whether `id` has the shape of a Salesforce record id: 15 (case-sensitive) or 18
/// (case-insensitive) letters and digits. Anything else cannot name a record, and Salesforce
/// would refuse it in a filter (`invalid ID field`), so it is never put into a query.
pub(super) fn is_record_id(id: &str) -> bool {
    matches!(id.len(), 15 | 18) && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// A SOQL string literal: single quotes, with the backslash and the quote escaped (SOQL's
/// escape sequences), so no value can end the literal early.
pub(super) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if c == '\\' || c == '\'' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// The query reading one record by id, with a pull's columns (so [`flatten`] reads it the
/// same way). Sent to `queryAll`, so a record in the recycle bin comes back with
/// `IsDeleted = true`. The mapping's filter does not apply: `why --live` asks about this record
/// whether it matches or not.
pub(super) fn fetch_query(spec: &PullSpec, id: &str) -> String {
    format!(
        "SELECT {} FROM {} WHERE Id = {}",
        select_list(spec).join(", "),
        spec.object,
        quote(id)
    )
}

pub(super) fn count_query(spec: &PullSpec) -> String {
    format!(
        "SELECT COUNT() FROM {}{}",
        spec.object,
        where_clause(spec, Window::default())
    )
}

/// Looks up a dotted path in a REST record, walking relationship objects (`"Owner": {...}` or
/// `"Owner": null`). Salesforce answers with the field's canonical case, which may differ from
/// the case in the mapping, so a case-insensitive match is the fallback.
fn lookup<'a>(record: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    let mut cur = record;
    let mut segs = path.split('.').peekable();
    while let Some(seg) = segs.next() {
        let v = cur.get(seg).or_else(|| {
            cur.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(seg))
                .map(|(_, v)| v)
        })?;
        if segs.peek().is_none() {
            return Some(v);
        }
        cur = v.as_object()?;
    }
    None
}

/// A REST record as the engine wants it: flat, keyed by [`FieldRequest::key`], plus its cursor.
pub(super) fn flatten(record: &Value, fields: &[FieldRequest]) -> Option<(RawRecord, Cursor)> {
    let map = record.as_object()?;
    let id = lookup(map, "Id")?.as_str()?.to_owned();
    let ts = parse_datetime(lookup(map, "SystemModstamp")?.as_str()?)?;
    let deleted = lookup(map, "IsDeleted")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut flat = Map::new();
    for f in fields {
        flat.insert(
            f.key(),
            lookup(map, &f.path).cloned().unwrap_or(Value::Null),
        );
    }
    Some((
        RawRecord {
            crm_id: id.clone(),
            fields: Value::Object(flat),
            deleted,
            modified_at: Some(ts.timestamp_millis()),
        },
        Cursor { ts, id },
    ))
}

#[cfg(test)]
mod unit {
    use super::*;
    use serde_json::json;

    #[test]
    fn flatten_reads_relationships_and_nulls() {
        let rec = json!({
            "attributes": {"type": "Account"},
            "Id": "001A", "SystemModstamp": "2026-11-01T10:00:00.000+0000", "IsDeleted": false,
            "ARR__c": 12.5, "Owner": {"attributes": {"type": "User"}, "Email": "o@x.com"}, "Parent": null,
        });
        let fields: Vec<FieldRequest> = ["Id", "ARR__c", "owner.email", "Parent.Name"]
            .iter()
            .map(|p| FieldRequest {
                path: (*p).into(),
                transform: None,
            })
            .collect();
        let (raw, cur) = flatten(&rec, &fields).unwrap();
        assert_eq!(
            raw.fields,
            json!({"Id": "001A", "ARR__c": 12.5, "owner.email": "o@x.com", "Parent.Name": null})
        );
        assert_eq!(cur.id, "001A");
        assert_eq!(literal(cur.ts), "2026-11-01T10:00:00Z");
        assert_eq!(Cursor::from_watermark(&cur.to_watermark()), Some(cur));
    }

    #[test]
    fn fetch_query_quotes_the_id_and_ignores_the_filter() {
        let spec = PullSpec {
            mapping: "m".into(),
            object: "Account".into(),
            fields: vec![FieldRequest {
                path: "Owner.Email".into(),
                transform: None,
            }],
            filter: Some("Type = 'Customer'".into()),
            since: None,
            overlap: std::time::Duration::ZERO,
        };
        assert_eq!(
            fetch_query(&spec, "001000000000001AAA"),
            "SELECT Id, SystemModstamp, IsDeleted, Owner.Email FROM Account WHERE Id = '001000000000001AAA'"
        );
        assert_eq!(quote(r"a'b\c"), r"'a\'b\\c'");
        assert!(is_record_id("001000000000001") && is_record_id("001000000000001AAA"));
        for bad in [
            "",
            "001X",
            "001000000000001AA",
            "001' OR Id != '1",
            "001 00000000001",
        ] {
            assert!(!is_record_id(bad), "{bad}");
        }
    }
}
