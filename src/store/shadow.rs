//! The shadow copy: per Pendo entity, the field values Pendo has confirmed, in their canonical
//! stored JSON form (see [`crate::domain::Value::to_stored`]; compare with
//! [`crate::domain::Value::matches_stored`]). An absent field and a confirmed `null` mean the same
//! thing (Pendo holds nothing), so a cleared field is removed from the record.

use std::collections::HashMap;

use super::StoreError;
use crate::domain::Kind;

/// Field key → canonical stored value (parsed JSON; nulls dropped).
pub type ShadowRecord = HashMap<String, serde_json::Value>;

pub(crate) fn parse_record(kind: Kind, id: &str, text: &str) -> Result<ShadowRecord, StoreError> {
    let object: HashMap<String, serde_json::Value> = serde_json::from_str(text)
        .map_err(|e| StoreError::Corrupt(format!("shadow {kind} {id:?}: {e}")))?;
    Ok(without_nulls(object))
}

pub(crate) fn without_nulls(mut record: ShadowRecord) -> ShadowRecord {
    record.retain(|_, v| !v.is_null());
    record
}
