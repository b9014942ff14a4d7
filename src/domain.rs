//! The vocabulary every stage shares: what kind of Pendo entity a value belongs to, the four field
//! types a mapping can declare, and [`Value`], the one canonical form of a mapped value.
//!
//! Canonical means "one representation per meaning": the number 1000 read as `1000`, `1000.0`,
//! `"1000"` or `"1e3"` is the same [`Value::Number`], and its stored text is the same string. The diff
//! compares stored text, so re-reading unchanged CRM data can never produce a change.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A Pendo entity kind. Each has its own metadata namespace and its own id key in request bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Visitor,
    Account,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Visitor, Kind::Account];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Visitor => "visitor",
            Kind::Account => "account",
        }
    }

    /// The id key Pendo expects in a bulk metadata body (`visitorId` / `accountId`).
    pub fn id_key(self) -> &'static str {
        match self {
            Kind::Visitor => "visitorId",
            Kind::Account => "accountId",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "visitor" => Some(Kind::Visitor),
            "account" => Some(Kind::Account),
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The type a mapping declares for a Pendo custom field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    String,
    Number,
    Boolean,
    Date,
}

impl FieldType {
    pub fn as_str(self) -> &'static str {
        match self {
            FieldType::String => "string",
            FieldType::Number => "number",
            FieldType::Boolean => "boolean",
            FieldType::Date => "date",
        }
    }

    /// Whether a Pendo schema `Type` string can hold values of this type. Pendo's type names are
    /// only partly documented ("string", "boolean" seen in fixtures; "number", "float", "integer",
    /// "date", "time" plausible), so the match is deliberately tolerant.
    pub fn compatible_with_pendo(self, pendo_type: &str) -> bool {
        let t = pendo_type.to_ascii_lowercase();
        match self {
            FieldType::String => matches!(t.as_str(), "string" | "text"),
            FieldType::Number => {
                matches!(
                    t.as_str(),
                    "number" | "float" | "integer" | "int" | "numeric"
                )
            }
            FieldType::Boolean => matches!(t.as_str(), "boolean" | "bool"),
            FieldType::Date => matches!(t.as_str(), "date" | "time" | "datetime" | "timestamp"),
        }
    }
}

impl fmt::Display for FieldType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A canonical mapped value.
///
/// `Number` never holds NaN or an infinity (coercion rejects them) and `-0.0` is stored as `0`, so
/// equal meanings have equal [`Value::to_stored`] text. `Date` is epoch milliseconds, UTC.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    String(String),
    Number(f64),
    Bool(bool),
    Date(i64),
}

impl Value {
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// The stored (and compared) text: canonical JSON. Integral numbers within f64's exact range
    /// print without a fraction, so `1000.0` and `1000` store the same text.
    pub fn to_stored(&self) -> String {
        match self {
            Value::Null => "null".to_owned(),
            Value::String(s) => serde_json::Value::String(s.clone()).to_string(),
            Value::Number(n) => canonical_number_text(*n),
            Value::Bool(b) => b.to_string(),
            Value::Date(ms) => format!("{{\"date\":{ms}}}"),
        }
    }

    /// Reads back [`Value::to_stored`] text. Unknown text becomes an error rather than a guess.
    pub fn from_stored(text: &str) -> Result<Value, String> {
        let json: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("stored value {text:?}: {e}"))?;
        Ok(match json {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(b),
            serde_json::Value::Number(n) => Value::Number(n.as_f64().unwrap_or(0.0)),
            serde_json::Value::String(s) => Value::String(s),
            serde_json::Value::Object(o) => match o.get("date").and_then(|d| d.as_i64()) {
                Some(ms) => Value::Date(ms),
                None => return Err(format!("stored value {text:?} is not a known form")),
            },
            serde_json::Value::Array(_) => {
                return Err(format!("stored value {text:?} is not a known form"));
            }
        })
    }

    /// Whether `stored` (a value in its stored JSON form, as the shadow holds it) means this
    /// value. Allocation-free: the diff calls this for every field of every record it reads.
    pub fn matches_stored(&self, stored: &serde_json::Value) -> bool {
        use serde_json::Value as J;
        match (self, stored) {
            (Value::Null, J::Null) => true,
            (Value::String(a), J::String(b)) => a == b,
            (Value::Number(a), J::Number(b)) => b.as_f64() == Some(*a),
            (Value::Bool(a), J::Bool(b)) => a == b,
            (Value::Date(a), J::Object(o)) => {
                o.len() == 1 && o.get("date").and_then(J::as_i64) == Some(*a)
            }
            _ => false,
        }
    }

    /// Feeds the value's meaning into a hasher (equal meanings hash equally).
    pub fn hash_into<H: std::hash::Hasher>(&self, h: &mut H) {
        use std::hash::Hash;
        match self {
            Value::Null => 0u8.hash(h),
            Value::String(s) => (1u8, s).hash(h),
            Value::Number(n) => (2u8, if *n == 0.0 { 0u64 } else { n.to_bits() }).hash(h),
            Value::Bool(b) => (3u8, b).hash(h),
            Value::Date(ms) => (4u8, ms).hash(h),
        }
    }

    /// The JSON Pendo receives for this value. Dates follow `date_format`.
    pub fn to_wire(&self, date_format: DateFormat) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::String(s) => serde_json::Value::String(s.clone()),
            Value::Number(n) => number_json(*n),
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Date(ms) => match date_format {
                DateFormat::EpochMs => serde_json::Value::from(*ms),
                DateFormat::Iso8601 => serde_json::Value::String(iso8601_from_ms(*ms)),
            },
        }
    }

    /// Human text for reports (`audit`, `queue list`, dry runs).
    pub fn display(&self) -> String {
        match self {
            Value::Null => "null".to_owned(),
            Value::String(s) => s.clone(),
            Value::Number(n) => canonical_number_text(*n),
            Value::Bool(b) => b.to_string(),
            Value::Date(ms) => iso8601_from_ms(*ms),
        }
    }
}

/// How `date` fields are written to Pendo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DateFormat {
    #[default]
    EpochMs,
    Iso8601,
}

/// Largest integer f64 represents exactly (2^53).
const EXACT_INT_LIMIT: f64 = 9_007_199_254_740_992.0;

fn canonical_number_text(n: f64) -> String {
    number_json(n).to_string()
}

fn number_json(n: f64) -> serde_json::Value {
    let n = if n == 0.0 { 0.0 } else { n }; // folds -0.0 into 0
    if n.fract() == 0.0 && n.abs() <= EXACT_INT_LIMIT {
        serde_json::Value::from(n as i64)
    } else {
        serde_json::Number::from_f64(n)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null)
    }
}

/// A stored value (the outbox's and shadow's canonical text) as a person reads it; text that
/// is not a stored value is shown as it is.
pub fn display_stored(text: &str) -> String {
    Value::from_stored(text).map_or_else(|_| text.to_owned(), |v| v.display())
}

pub fn iso8601_from_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| ms.to_string())
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integral_numbers_store_without_fraction() {
        assert_eq!(Value::Number(1000.0).to_stored(), "1000");
        assert_eq!(Value::Number(-0.0).to_stored(), "0");
        assert_eq!(Value::Number(1.5).to_stored(), "1.5");
        assert_eq!(Value::Number(1e300).to_stored(), "1e+300");
    }

    #[test]
    fn stored_text_round_trips() {
        for v in [
            Value::Null,
            Value::String("a\"b".into()),
            Value::Number(12.25),
            Value::Bool(true),
            Value::Date(1_700_000_000_000),
        ] {
            assert_eq!(Value::from_stored(&v.to_stored()).unwrap(), v);
        }
    }

    #[test]
    fn dates_go_out_in_the_configured_format() {
        let v = Value::Date(1_767_225_600_000);
        assert_eq!(
            v.to_wire(DateFormat::EpochMs),
            serde_json::json!(1_767_225_600_000i64)
        );
        assert_eq!(
            v.to_wire(DateFormat::Iso8601),
            serde_json::json!("2026-01-01T00:00:00.000Z")
        );
    }
}
