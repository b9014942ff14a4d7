//! Mapping: one raw CRM record → a Pendo id and typed, canonical field values.
//!
//! Coercion accepts every representation a CRM uses for a value — Salesforce's typed JSON,
//! HubSpot's strings ("1200000", "true", epoch-ms or ISO dates, "") — and yields exactly one
//! [`Value`] per meaning, so re-reading unchanged data never looks like a change. A value that
//! cannot be coerced makes the whole record invalid, with a message naming the record, the field
//! and the value; the rest of the page goes on.
//!
//! So does a NUL character (U+0000) in a text value, in the Pendo id or in the CRM record id:
//! PostgreSQL stores none in `text` or `jsonb` ("unsupported Unicode escape sequence") while
//! SQLite does, so such a record would fail every cycle of its mapping on one back-end and reach
//! Pendo on the other. It is set aside here, before anything reaches the state, on both alike.

use crate::config::{IdCase, MappingSettings, OnDelete, OnNull};
use crate::connectors::{FieldRequest, RawRecord};
use crate::domain::{FieldType, Kind, Value};

/// One Pendo field fed by one CRM field.
#[derive(Debug, Clone)]
pub struct FieldMap {
    /// The Pendo custom field key.
    pub pendo_field: String,
    /// Where the connector put the raw value ([`FieldRequest::key`]).
    pub raw_key: String,
    /// The CRM path as configured, for messages.
    pub from: String,
    pub field_type: FieldType,
    pub on_null: OnNull,
}

/// A compiled mapping.
#[derive(Debug, Clone)]
pub struct Mapping {
    pub name: String,
    pub kind: Kind,
    pub id_path: String,
    pub id_case: IdCase,
    pub on_delete: OnDelete,
    pub fields: Vec<FieldMap>,
    /// The guard's limits for this mapping.
    pub guard: crate::config::GuardSettings,
}

/// A record that mapped cleanly.
#[derive(Debug, Clone, PartialEq)]
pub struct MappedRecord {
    pub crm_id: String,
    pub pendo_id: String,
    /// Parallel to [`Mapping::fields`]; `None` where an empty value meets `on_null = "keep"`.
    pub values: Vec<Option<Value>>,
    pub deleted: bool,
    /// The CRM's modification time of the record (Unix ms), when the connector knows it.
    pub modified_at: Option<i64>,
}

/// Why a record was set aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordError {
    /// The id field is missing or empty: the record has no Pendo identity.
    MissingId { crm_id: String, id_path: String },
    /// A field's value cannot become the mapping's type.
    BadValue {
        crm_id: String,
        pendo_id: String,
        field: String,
        from: String,
        message: String,
    },
}

impl RecordError {
    /// Short machine-friendly reason, used as a metric label and in `queue list`.
    pub fn reason(&self) -> &'static str {
        match self {
            RecordError::MissingId { .. } => "missing_id",
            RecordError::BadValue { .. } => "bad_value",
        }
    }

    pub fn crm_id(&self) -> &str {
        match self {
            RecordError::MissingId { crm_id, .. } | RecordError::BadValue { crm_id, .. } => crm_id,
        }
    }

    pub fn pendo_id(&self) -> Option<&str> {
        match self {
            RecordError::MissingId { .. } => None,
            RecordError::BadValue { pendo_id, .. } => Some(pendo_id),
        }
    }
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordError::MissingId { crm_id, id_path } => {
                write!(
                    f,
                    "record {crm_id}: id field {id_path} is empty, so it has no Pendo id"
                )
            }
            RecordError::BadValue {
                crm_id,
                pendo_id,
                field,
                from,
                message,
            } => write!(
                f,
                "record {crm_id} (Pendo id {pendo_id}): field {field} (from {from}): {message}"
            ),
        }
    }
}

impl Mapping {
    pub fn new(settings: &MappingSettings) -> Mapping {
        let fields = settings
            .fields
            .iter()
            .map(|(pendo_field, f)| FieldMap {
                pendo_field: pendo_field.clone(),
                raw_key: FieldRequest {
                    path: f.from.clone(),
                    transform: f.transform,
                }
                .key(),
                from: f.from.clone(),
                field_type: f.field_type,
                on_null: f.on_null,
            })
            .collect();
        Mapping {
            name: settings.name.clone(),
            kind: settings.kind,
            id_path: settings.id.clone(),
            id_case: settings.id_case,
            on_delete: settings.on_delete,
            fields,
            guard: settings.guard_limits,
        }
    }

    /// Maps one raw record. Deleted records map like live ones (their last values identify them).
    pub fn map(&self, raw: &RawRecord) -> Result<MappedRecord, RecordError> {
        let pendo_id = self.pendo_id(raw).ok_or_else(|| RecordError::MissingId {
            crm_id: printable(&raw.crm_id),
            id_path: self.id_path.clone(),
        })?;
        // Ids are stored (shadow, outbox, claims, history) and sent: a NUL in either sets the
        // record aside, under ids written so that the set-aside row itself can be stored.
        let nul_in_id = has_nul(&pendo_id);
        if nul_in_id || has_nul(&raw.crm_id) {
            let (field, from, what) = if nul_in_id {
                (self.id_path.clone(), self.id_path.clone(), "the id")
            } else {
                (
                    "record id".to_owned(),
                    "the CRM record".to_owned(),
                    "the CRM record id",
                )
            };
            return Err(RecordError::BadValue {
                crm_id: printable(&raw.crm_id),
                pendo_id: printable(&pendo_id),
                field,
                from,
                message: format!("{what} {NUL_MESSAGE}"),
            });
        }
        let mut values = Vec::with_capacity(self.fields.len());
        for f in &self.fields {
            let raw_value = lookup(&raw.fields, &f.raw_key);
            let value = coerce(raw_value, f.field_type)
                .and_then(storable)
                .map_err(|message| RecordError::BadValue {
                    crm_id: raw.crm_id.clone(),
                    pendo_id: pendo_id.clone(),
                    field: f.pendo_field.clone(),
                    from: f.from.clone(),
                    message,
                })?;
            values.push(match (value, f.on_null) {
                (Value::Null, OnNull::Keep) => None,
                (v, _) => Some(v),
            });
        }
        Ok(MappedRecord {
            crm_id: raw.crm_id.clone(),
            pendo_id,
            values,
            deleted: raw.deleted,
            modified_at: raw.modified_at,
        })
    }

    fn pendo_id(&self, raw: &RawRecord) -> Option<String> {
        let id = match lookup(&raw.fields, &self.id_path) {
            serde_json::Value::String(s) => s.trim().to_owned(),
            serde_json::Value::Number(n) => n.to_string(),
            _ => return None,
        };
        if id.is_empty() {
            return None;
        }
        Some(match self.id_case {
            IdCase::Keep => id,
            IdCase::Lower => id.to_lowercase(),
        })
    }
}

static NULL: serde_json::Value = serde_json::Value::Null;

/// Why a NUL character sets a record aside (after the value or id that holds it).
const NUL_MESSAGE: &str = "contains a NUL character (U+0000), which cannot be stored or sent";

/// Whether `s` holds a NUL character (U+0000).
fn has_nul(s: &str) -> bool {
    s.as_bytes().contains(&0)
}

/// `s` with each NUL character written as `\0`: an id that can be stored and shown in the
/// message of the record it sets aside.
fn printable(s: &str) -> String {
    if has_nul(s) {
        s.replace('\0', "\\0")
    } else {
        s.to_owned()
    }
}

/// A mapped value both state back-ends store alike and Pendo can be sent: text with a NUL
/// character is refused, naming the value (its NUL shown as `\0`). Applied after coercion (and
/// so after a connector's transform); numbers, booleans and dates cannot hold one, and a CRM
/// object or array never becomes a value (coercion refuses it).
pub fn storable(value: Value) -> Result<Value, String> {
    if let Value::String(s) = &value
        && has_nul(s)
    {
        return Err(format!("{:?} {NUL_MESSAGE}", short(s)));
    }
    Ok(value)
}

/// The raw value under `key`: a flat key first (connectors flatten), else a dotted walk through
/// nested objects (Salesforce relationship objects; a null relationship yields null).
/// A value Pendo holds as canonical stored text for the field's type (`None`: nothing). Pendo
/// may hold a date as epoch ms or as an ISO string, a number as a string, so the CRM's coercion
/// applies; a value that does not coerce is kept as its JSON text: it differs from anything the
/// CRM can map to.
pub fn stored_from_pendo(v: &serde_json::Value, ty: FieldType) -> Option<String> {
    match coerce(v, ty) {
        Ok(Value::Null) => None,
        Ok(v) => Some(v.to_stored()),
        Err(_) => Some(v.to_string()),
    }
}

pub fn lookup<'a>(fields: &'a serde_json::Value, key: &str) -> &'a serde_json::Value {
    if let Some(v) = fields.get(key) {
        return v;
    }
    let mut at = fields;
    for part in key.split('.') {
        match at.get(part) {
            Some(v) => at = v,
            None => return &NULL,
        }
    }
    at
}

/// Coerces a raw CRM value to `ty`. Empty strings are empty values (HubSpot sends "" for unset).
pub fn coerce(raw: &serde_json::Value, ty: FieldType) -> Result<Value, String> {
    use serde_json::Value as J;
    if let J::String(s) = raw
        && s.trim().is_empty()
    {
        return Ok(Value::Null);
    }
    if raw.is_null() {
        return Ok(Value::Null);
    }
    match ty {
        FieldType::String => match raw {
            J::String(s) => Ok(Value::String(s.clone())),
            J::Number(n) => Ok(Value::String(
                Value::Number(n.as_f64().unwrap_or(0.0)).display(),
            )),
            J::Bool(b) => Ok(Value::String(b.to_string())),
            other => Err(format!("expected text, got {}", describe(other))),
        },
        FieldType::Number => match raw {
            J::Number(n) => finite(n.as_f64().unwrap_or(f64::NAN), &n.to_string()),
            J::String(s) => parse_number(s.trim()),
            other => Err(format!("expected a number, got {}", describe(other))),
        },
        FieldType::Boolean => match raw {
            J::Bool(b) => Ok(Value::Bool(*b)),
            J::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => Ok(Value::Bool(true)),
                "false" | "0" | "no" => Ok(Value::Bool(false)),
                _ => Err(format!("expected true or false, got {}", describe(raw))),
            },
            J::Number(n) if n.as_f64() == Some(1.0) => Ok(Value::Bool(true)),
            J::Number(n) if n.as_f64() == Some(0.0) => Ok(Value::Bool(false)),
            other => Err(format!("expected true or false, got {}", describe(other))),
        },
        FieldType::Date => match raw {
            J::Number(n) => match n.as_i64().or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 9e15)
                    .map(|f| f as i64)
            }) {
                Some(ms) => Ok(Value::Date(ms)),
                None => Err(format!("expected epoch milliseconds, got {n}")),
            },
            J::String(s) => parse_date(s.trim()).map(Value::Date),
            other => Err(format!("expected a date, got {}", describe(other))),
        },
    }
}

fn describe(v: &serde_json::Value) -> String {
    let text = v.to_string();
    let short: String = text.chars().take(60).collect();
    if short.len() < text.len() {
        format!("{short}…")
    } else {
        short
    }
}

fn finite(n: f64, text: &str) -> Result<Value, String> {
    if n.is_finite() {
        Ok(Value::Number(n))
    } else {
        Err(format!("{text:?} is not a finite number"))
    }
}

fn parse_number(s: &str) -> Result<Value, String> {
    // Rust's f64 parser also accepts "NaN", "inf" and "infinity"; Pendo cannot store those.
    let plausible = s
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '-' | '+' | '.' | 'e' | 'E'));
    match s.parse::<f64>() {
        Ok(n) if plausible => finite(n, s),
        _ => Err(format!("{:?} is not a number", short(s))),
    }
}

fn short(s: &str) -> String {
    let cut: String = s.chars().take(60).collect();
    if cut.len() < s.len() {
        format!("{cut}…")
    } else {
        cut
    }
}

/// `YYYY-MM-DD`, read by hand: the common CRM date form, and chrono's format-string parser
/// costs more than the rest of a record's mapping.
fn plain_date(s: &str) -> Option<chrono::NaiveDate> {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        b[r].iter().try_fold(0u32, |n, c| {
            c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
        })
    };
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    chrono::NaiveDate::from_ymd_opt(digits(0..4)? as i32, digits(5..7)?, digits(8..10)?)
}

/// Accepts epoch milliseconds ("1767225600000"), a date ("2026-11-01", midnight UTC), RFC 3339
/// ("2026-11-01T10:00:00Z", "+01:00") and Salesforce's offset form ("2026-11-01T10:00:00.000+0000").
pub fn parse_date(s: &str) -> Result<i64, String> {
    if !s.is_empty()
        && s.chars().all(|c| c.is_ascii_digit() || c == '-')
        && let Ok(ms) = s.parse::<i64>()
    {
        return Ok(ms);
    }
    if let Some(d) = plain_date(s).or_else(|| chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").ok())
    {
        return Ok(d
            .and_hms_opt(0, 0, 0)
            .expect("midnight exists")
            .and_utc()
            .timestamp_millis());
    }
    if let Ok(dt) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(dt.timestamp_millis());
    }
    if let Ok(dt) = chrono::DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f%z") {
        return Ok(dt.timestamp_millis());
    }
    Err(format!(
        "{:?} is not a date (expected epoch ms, YYYY-MM-DD or ISO 8601)",
        short(s)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn hubspot_strings_coerce() {
        assert_eq!(
            coerce(&json!("1200000"), FieldType::Number),
            Ok(Value::Number(1_200_000.0))
        );
        assert_eq!(
            coerce(&json!("true"), FieldType::Boolean),
            Ok(Value::Bool(true))
        );
        assert_eq!(
            coerce(&json!("2026-11-01"), FieldType::Date),
            Ok(Value::Date(1_793_491_200_000))
        );
        assert_eq!(
            coerce(&json!("1793491200000"), FieldType::Date),
            Ok(Value::Date(1_793_491_200_000))
        );
        assert_eq!(coerce(&json!(""), FieldType::Number), Ok(Value::Null));
        assert_eq!(coerce(&json!(""), FieldType::String), Ok(Value::Null));
    }

    #[test]
    fn salesforce_forms_coerce() {
        assert_eq!(
            coerce(&json!("2026-11-01T00:00:00.000+0000"), FieldType::Date),
            Ok(Value::Date(1_793_491_200_000))
        );
        assert_eq!(
            coerce(&json!(125000.0), FieldType::Number),
            Ok(Value::Number(125000.0))
        );
        assert_eq!(coerce(&json!(null), FieldType::Boolean), Ok(Value::Null));
    }

    #[test]
    fn non_numbers_are_rejected_with_the_value() {
        for bad in ["NaN", "Infinity", "inf", "-infinity", "12abc", "1,200"] {
            let e = coerce(&json!(bad), FieldType::Number).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
        assert!(coerce(&json!("2026-13-45"), FieldType::Date).is_err());
        assert!(coerce(&json!({"a": 1}), FieldType::String).is_err());
    }

    #[test]
    fn dotted_paths_walk_nested_objects_and_null_relationships() {
        let rec = json!({"Owner": {"attributes": {}, "Email": "a@b.c"}, "Parent": null});
        assert_eq!(lookup(&rec, "Owner.Email"), &json!("a@b.c"));
        assert_eq!(lookup(&rec, "Parent.Name"), &json!(null));
        let flat = json!({"Owner.Email": "x@y.z"});
        assert_eq!(lookup(&flat, "Owner.Email"), &json!("x@y.z"));
    }

    /// A mapping with two text fields (one fed through a transform's key, as a HubSpot owner
    /// lookup delivers it) and a number field, its Pendo id from `Id`.
    fn nul_mapping() -> Mapping {
        let f = |pendo: &str, key: &str, t| FieldMap {
            pendo_field: pendo.into(),
            raw_key: key.into(),
            from: key.split('#').next().unwrap_or(key).into(),
            field_type: t,
            on_null: OnNull::Clear,
        };
        Mapping {
            name: "m".into(),
            kind: Kind::Account,
            id_path: "Id".into(),
            id_case: IdCase::Keep,
            on_delete: OnDelete::Clear,
            guard: Default::default(),
            fields: vec![
                f("plantier", "Plan_Tier__c", FieldType::String),
                f(
                    "owneremail",
                    "hubspot_owner_id#owner_email",
                    FieldType::String,
                ),
                f("arr", "ARR__c", FieldType::Number),
            ],
        }
    }

    fn raw(crm_id: &str, fields: serde_json::Value) -> RawRecord {
        RawRecord {
            crm_id: crm_id.into(),
            fields,
            deleted: false,
            modified_at: None,
        }
    }

    /// PostgreSQL stores no U+0000 (SQLite does): a NUL in a text value, after a transform, in
    /// the Pendo id or in the CRM record id sets the record aside with a message naming the field
    /// and saying why, and nothing in the error (which is stored) holds a NUL itself.
    #[test]
    fn a_nul_character_sets_the_record_aside_naming_the_field() {
        const SAYS: &str = "contains a NUL character (U+0000), which cannot be stored or sent";
        let m = nul_mapping();
        let clean = json!({
            "Id": "001A",
            "Plan_Tier__c": "Gold Plus",
            "ARR__c": 5,
            "hubspot_owner_id#owner_email": "a@b.c"
        });
        let ok = m
            .map(&raw("001A", clean.clone()))
            .expect("a clean record maps");
        assert_eq!(ok.values[0], Some(Value::String("Gold Plus".into())));

        // In a value, a transformed one included: named by its field and shown escaped.
        let cases = [
            (
                "Plan_Tier__c",
                json!("Gold\u{0}Plus"),
                "plantier",
                "\"Gold\\0Plus\"",
            ),
            ("Plan_Tier__c", json!("\u{0}"), "plantier", "\"\\0\""),
            (
                "hubspot_owner_id#owner_email",
                json!("a@b.c\u{0}"),
                "owneremail",
                "(from hubspot_owner_id)",
            ),
        ];
        for (key, value, field, shows) in cases {
            let mut fields = clean.clone();
            fields[key] = value;
            let e = m.map(&raw("001A", fields)).unwrap_err();
            assert_eq!(e.reason(), "bad_value");
            assert_eq!(e.pendo_id(), Some("001A"));
            let text = e.to_string();
            let head = format!("record 001A (Pendo id 001A): field {field} (from ");
            assert!(text.starts_with(&head), "{text}");
            assert!(text.contains(shows), "{text}");
            assert!(text.ends_with(SAYS), "{text}");
            assert!(!text.contains('\u{0}'), "{text:?}");
        }

        // In the id: named as the id field; the ids kept with the error are storable.
        let mut fields = clean.clone();
        fields["Id"] = json!("001\u{0}B");
        let e = m.map(&raw("001\u{0}B", fields)).unwrap_err();
        assert_eq!(e.reason(), "bad_value");
        assert_eq!(e.crm_id(), "001\\0B");
        assert_eq!(e.pendo_id(), Some("001\\0B"));
        assert_eq!(
            e.to_string(),
            format!("record 001\\0B (Pendo id 001\\0B): field Id (from Id): the id {SAYS}")
        );
        // Lower-casing and trimming keep it.
        let lower = Mapping {
            id_case: IdCase::Lower,
            ..nul_mapping()
        };
        let mut fields = clean.clone();
        fields["Id"] = json!(" 001\u{0}C ");
        assert!(lower.map(&raw("x", fields)).is_err());

        // Only in the CRM record id (the Pendo id comes from a clean field).
        let e = m.map(&raw("rec\u{0}1", clean.clone())).unwrap_err();
        assert_eq!(e.crm_id(), "rec\\01");
        assert_eq!(e.pendo_id(), Some("001A"));
        let text = e.to_string();
        assert!(text.contains("CRM record id contains a NUL"), "{text}");

        // A missing id with a NUL in the CRM record id: still a missing id, stored readable.
        let mut fields = clean.clone();
        fields["Id"] = json!("");
        let e = m.map(&raw("rec\u{0}2", fields)).unwrap_err();
        assert_eq!(e.reason(), "missing_id");
        assert_eq!(e.crm_id(), "rec\\02");

        // Other control characters pass; a CRM object or array never becomes a value (so no
        // NUL can hide in one); numbers and nulls are never refused.
        let mut fields = clean.clone();
        fields["Plan_Tier__c"] = json!("Gold\u{1}\tPlus");
        assert!(m.map(&raw("001A", fields)).is_ok());
        for nested in [json!(["Gold\u{0}"]), json!({"label": "Gold\u{0}"})] {
            let mut fields = clean.clone();
            fields["Plan_Tier__c"] = nested;
            let e = m.map(&raw("001A", fields)).unwrap_err();
            assert!(e.to_string().contains("expected text"), "{e}");
        }
        assert_eq!(storable(Value::Number(1.0)), Ok(Value::Number(1.0)));
        assert_eq!(storable(Value::Null), Ok(Value::Null));
        assert!(storable(Value::String("a\u{0}".into())).is_err());
    }

    fn number_forms(n: i64) -> Vec<serde_json::Value> {
        vec![
            json!(n),
            json!(n as f64),
            json!(n.to_string()),
            json!(format!("{n}.0")),
            json!(format!(" {n} ")),
            json!(format!("{}e0", n)),
        ]
    }

    proptest! {
        /// The hand-read `YYYY-MM-DD` agrees with chrono's parser, valid or not.
        #[test]
        fn plain_dates_read_like_chrono(y in 0u32..10_000, m in 0u32..14, d in 0u32..33) {
            let text = format!("{y:04}-{m:02}-{d:02}");
            prop_assert_eq!(
                plain_date(&text),
                chrono::NaiveDate::parse_from_str(&text, "%Y-%m-%d").ok()
            );
        }

        /// Every representation of a number maps to one stored text.
        #[test]
        fn every_number_form_is_one_value(n in -1_000_000_000_000i64..1_000_000_000_000i64) {
            let stored: Vec<String> = number_forms(n)
                .iter()
                .map(|f| coerce(f, FieldType::Number).unwrap().to_stored())
                .collect();
            prop_assert!(stored.iter().all(|s| *s == stored[0]), "{:?}", stored);
            prop_assert_eq!(&stored[0], &n.to_string());
        }

        #[test]
        fn every_float_form_is_one_value(x in -1e12f64..1e12f64) {
            let a = coerce(&json!(x), FieldType::Number).unwrap().to_stored();
            let b = coerce(&json!(x.to_string()), FieldType::Number).unwrap().to_stored();
            let c = coerce(&json!(format!("{x:e}")), FieldType::Number).unwrap().to_stored();
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(&a, &c);
        }

        /// A date written as epoch ms, as RFC 3339 UTC, with an offset, or Salesforce's form is one value.
        #[test]
        fn every_date_form_is_one_value(ms in 0i64..4_102_444_800_000i64) {
            let dt = chrono::DateTime::from_timestamp_millis(ms).unwrap();
            let forms = [
                json!(ms),
                json!(ms.to_string()),
                json!(dt.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
                json!(dt.with_timezone(&chrono::FixedOffset::east_opt(3600).unwrap()).to_rfc3339()),
                json!(dt.format("%Y-%m-%dT%H:%M:%S%.3f+0000").to_string()),
            ];
            for f in &forms {
                prop_assert_eq!(coerce(f, FieldType::Date).unwrap(), Value::Date(ms), "{}", f);
            }
        }

        #[test]
        fn every_boolean_form_is_one_value(b in any::<bool>()) {
            let forms = [json!(b), json!(b.to_string()), json!(b.to_string().to_uppercase()), json!(if b { 1 } else { 0 })];
            for f in &forms {
                prop_assert_eq!(coerce(f, FieldType::Boolean).unwrap(), Value::Bool(b));
            }
        }

        /// Strings survive unchanged (unicode, emoji, quotes), and store/load round-trips.
        #[test]
        fn strings_round_trip(s in "\\PC{1,40}") {
            prop_assume!(!s.trim().is_empty());
            let v = coerce(&json!(s.clone()), FieldType::String).unwrap();
            prop_assert_eq!(&v, &Value::String(s));
            prop_assert_eq!(Value::from_stored(&v.to_stored()).unwrap(), v);
        }
    }
}
