//! Diff: which fields of a mapped record differ from what Pendo confirmed. Pure: no I/O, no clock.
//!
//! A field is a change when its canonical stored text differs from the value the outbox already
//! holds for it (so a value that goes A → B → A before B is sent goes out as A again, latest wins),
//! or, with nothing in the outbox, from the shadow. An absent shadow field and `null` are the same:
//! Pendo holds nothing, so an empty CRM value for a never-set field is not a change.

use std::collections::HashMap;
use std::sync::Arc;

use crate::domain::Value;
use crate::mapping::{MappedRecord, Mapping};
use crate::store::{Change, ShadowRecord, Source};

/// The field-level changes for one record. With `force` (resync) every mapped value is a change,
/// whatever the shadow says, so a Pendo that drifted is repaired.
pub fn diff_record(
    mapping: &Mapping,
    record: &MappedRecord,
    shadow: Option<&ShadowRecord>,
    outbox: Option<&HashMap<String, String>>,
    force: bool,
) -> Vec<Change> {
    let mut changes = Vec::new();
    // The record's context for the history, shared by its changes; built only for a record
    // that has one (most records a reconcile diffs have none).
    let mut source: Option<Arc<Source>> = None;
    for (field, value) in mapping.fields.iter().zip(&record.values) {
        let Some(value) = value else { continue };
        if let Some(change) = diff_field(&field.pendo_field, value, shadow, outbox, force) {
            let source = source.get_or_insert_with(|| {
                Arc::new(Source {
                    crm_id: Some(record.crm_id.clone()),
                    modified_at: record.modified_at,
                    cleared: None,
                })
            });
            changes.push(Change {
                kind: mapping.kind,
                pendo_id: record.pendo_id.clone(),
                field: field.pendo_field.clone(),
                value: change,
                mapping: mapping.name.clone(),
                force,
                source: Some(source.clone()),
            });
        }
    }
    changes
}

/// The changes that clear every field of `mapping` that Pendo holds (or is about to hold) for
/// `pendo_id`: used when a record leaves the CRM and `on_delete = "clear"`. `source` says which
/// record left and how (for the history).
pub fn clear_record(
    mapping: &Mapping,
    pendo_id: &str,
    shadow: Option<&ShadowRecord>,
    outbox: Option<&HashMap<String, String>>,
    force: bool,
    source: Source,
) -> Vec<Change> {
    let source = Some(Arc::new(source));
    mapping
        .fields
        .iter()
        .filter_map(|f| {
            diff_field(&f.pendo_field, &Value::Null, shadow, outbox, force).map(|value| Change {
                kind: mapping.kind,
                pendo_id: pendo_id.to_owned(),
                field: f.pendo_field.clone(),
                value,
                mapping: mapping.name.clone(),
                force,
                source: source.clone(),
            })
        })
        .collect()
}

/// The stored text to enqueue for this field, if it is a change.
fn diff_field(
    field: &str,
    value: &Value,
    shadow: Option<&ShadowRecord>,
    outbox: Option<&HashMap<String, String>>,
    force: bool,
) -> Option<String> {
    if let Some(queued) = outbox.and_then(|o| o.get(field)) {
        // Something is already on its way: only a different value replaces it. (A forced send
        // still enqueues, so an unmatched or dead row is retried by a resync.)
        let stored = value.to_stored();
        return (force || *queued != stored).then_some(stored);
    }
    if force {
        return Some(value.to_stored());
    }
    // The common case, unchanged data, is decided without formatting or allocating.
    let same = match shadow.and_then(|s| s.get(field)) {
        None => value.is_null(),
        Some(confirmed) => value.matches_stored(confirmed),
    };
    (!same).then(|| value.to_stored())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{IdCase, OnDelete, OnNull};
    use crate::domain::{FieldType, Kind};
    use crate::mapping::FieldMap;
    use proptest::prelude::*;

    fn mapping() -> Mapping {
        let f = |name: &str, t| FieldMap {
            pendo_field: name.into(),
            raw_key: name.into(),
            from: name.into(),
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
                f("s", FieldType::String),
                f("n", FieldType::Number),
                f("b", FieldType::Boolean),
                f("d", FieldType::Date),
            ],
        }
    }

    fn record(values: Vec<Option<Value>>) -> MappedRecord {
        MappedRecord {
            crm_id: "c1".into(),
            pendo_id: "p1".into(),
            values,
            deleted: false,
            modified_at: None,
        }
    }

    /// The shadow as the store would hand it back after confirming these values.
    fn confirmed_shadow(m: &Mapping, r: &MappedRecord) -> ShadowRecord {
        let mut object = serde_json::Map::new();
        for (f, v) in m.fields.iter().zip(&r.values) {
            if let Some(v) = v {
                object.insert(
                    f.pendo_field.clone(),
                    serde_json::from_str(&v.to_stored()).unwrap(),
                );
            }
        }
        crate::store::shadow_record_from_json(&serde_json::Value::Object(object).to_string())
            .unwrap()
    }

    #[test]
    fn one_changed_field_is_one_change() {
        let m = mapping();
        let before = record(vec![
            Some(Value::String("Gold".into())),
            Some(Value::Number(10.0)),
            Some(Value::Bool(true)),
            Some(Value::Date(5)),
        ]);
        let shadow = confirmed_shadow(&m, &before);
        let mut after = before.clone();
        after.values[1] = Some(Value::Number(11.0));
        let changes = diff_record(&m, &after, Some(&shadow), None, false);
        assert_eq!(changes.len(), 1);
        assert_eq!(
            (changes[0].field.as_str(), changes[0].value.as_str()),
            ("n", "11")
        );
    }

    #[test]
    fn null_clears_only_what_pendo_holds() {
        let m = mapping();
        let nulls = record(vec![Some(Value::Null); 4]);
        assert!(diff_record(&m, &nulls, None, None, false).is_empty());
        let held = record(vec![Some(Value::String("x".into())), None, None, None]);
        let shadow = confirmed_shadow(&m, &held);
        let changes = diff_record(&m, &nulls, Some(&shadow), None, false);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].value, "null");
    }

    #[test]
    fn outbox_value_is_compared_first_latest_wins() {
        let m = mapping();
        let a = record(vec![Some(Value::String("A".into())), None, None, None]);
        let shadow = confirmed_shadow(&m, &a);
        let queued_b = HashMap::from([("s".to_owned(), Value::String("B".into()).to_stored())]);
        // Back to A while B waits: A must go out again, or Pendo would end with B.
        let changes = diff_record(&m, &a, Some(&shadow), Some(&queued_b), false);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].value, "\"A\"");
    }

    #[test]
    fn force_sends_everything() {
        let m = mapping();
        let r = record(vec![
            Some(Value::String("A".into())),
            Some(Value::Null),
            None,
            None,
        ]);
        let shadow = confirmed_shadow(&m, &r);
        assert_eq!(diff_record(&m, &r, Some(&shadow), None, true).len(), 2);
    }

    fn value_strategy(t: FieldType) -> BoxedStrategy<Option<Value>> {
        let v = match t {
            FieldType::String => "\\PC{0,30}".prop_map(Value::String).boxed(),
            FieldType::Number => prop_oneof![
                (-1e15f64..1e15f64).prop_map(Value::Number),
                any::<i32>().prop_map(|i| Value::Number(i as f64))
            ]
            .boxed(),
            FieldType::Boolean => any::<bool>().prop_map(Value::Bool).boxed(),
            FieldType::Date => (0i64..4_102_444_800_000).prop_map(Value::Date).boxed(),
        };
        prop_oneof![1 => Just(None), 1 => Just(Some(Value::Null)), 6 => v.prop_map(Some)].boxed()
    }

    proptest! {
        /// Diffing a record against its own confirmed shadow is empty.
        #[test]
        fn a_record_against_its_confirmed_shadow_has_no_changes(
            s in value_strategy(FieldType::String),
            n in value_strategy(FieldType::Number),
            b in value_strategy(FieldType::Boolean),
            d in value_strategy(FieldType::Date),
        ) {
            let m = mapping();
            let r = record(vec![s, n, b, d]);
            let shadow = confirmed_shadow(&m, &r);
            prop_assert!(diff_record(&m, &r, Some(&shadow), None, false).is_empty());
        }
    }
}
