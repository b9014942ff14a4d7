//! Digests: 64-bit summaries the engine uses to avoid work on records that did not change.
//!
//! - [`values_digest`]: a record's mapped values, seeded by what the mapping writes. Two records
//!   with equal digests carry the same meaning (up to a 2⁻⁶⁴ collision), so the engine uses it
//!   both to spot ambiguous ids and, with the digests the store keeps (see
//!   [`crate::store::Store::load_digests`]), to let a reconcile skip records that are in sync.
//! - [`id_hash`]: a Pendo or CRM id, for the per-pull maps of a million ids.
//!
//! Both use `DefaultHasher::new()`, which is the same in every process built by one Rust
//! release. A release that changes it makes every stored digest stale once: that costs one long
//! reconcile and misses nothing, because a stale digest only ever means "diff it the long way".

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{BuildHasherDefault, Hash, Hasher};

use crate::mapping::{MappedRecord, Mapping};

/// A map keyed by a 64-bit hash (see [`AlreadyHashed`]).
pub type IdMap<V> = HashMap<u64, V, BuildHasherDefault<AlreadyHashed>>;

/// The hasher for maps whose keys are already hashes: the key is used as it is. Hashing it again
/// would cost a second SipHash per record and spread the keys no better.
#[derive(Default)]
pub struct AlreadyHashed(u64);

impl Hasher for AlreadyHashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are meant; this keeps any other key correct, if slower.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// The hash of an id.
pub fn id_hash(id: &str) -> u64 {
    let mut h = DefaultHasher::new();
    id.hash(&mut h);
    h.finish()
}

/// Where every value digest of one mapping starts: what the mapping writes (kind, Pendo fields
/// and their types) goes in first, so renaming a field or changing its type makes every digest
/// the store kept for it stale.
#[derive(Clone)]
pub struct DigestSeed(DefaultHasher);

impl DigestSeed {
    pub fn new(mapping: &Mapping) -> DigestSeed {
        let mut h = DefaultHasher::new();
        mapping.kind.as_str().hash(&mut h);
        for f in &mapping.fields {
            (f.pendo_field.as_str(), f.field_type.as_str()).hash(&mut h);
        }
        DigestSeed(h)
    }
}

/// The digest of a record's mapped values (equal meanings, equal digests; a value held back by
/// `on_null = "keep"` differs from a null).
pub fn values_digest(seed: &DigestSeed, r: &MappedRecord) -> u64 {
    let mut h = seed.0.clone();
    for v in &r.values {
        match v {
            Some(v) => v.hash_into(&mut h),
            None => 255u8.hash(&mut h),
        }
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{IdCase, OnDelete, OnNull};
    use crate::domain::{FieldType, Kind, Value};
    use crate::mapping::FieldMap;

    fn mapping(fields: &[(&str, FieldType)]) -> Mapping {
        Mapping {
            name: "m".into(),
            kind: Kind::Account,
            id_path: "Id".into(),
            id_case: IdCase::Keep,
            on_delete: OnDelete::Keep,
            guard: Default::default(),
            fields: fields
                .iter()
                .map(|(name, t)| FieldMap {
                    pendo_field: (*name).into(),
                    raw_key: "x".into(),
                    from: "x".into(),
                    field_type: *t,
                    on_null: OnNull::Clear,
                })
                .collect(),
        }
    }

    fn record(values: Vec<Option<Value>>) -> MappedRecord {
        MappedRecord {
            crm_id: "c".into(),
            pendo_id: "p".into(),
            values,
            deleted: false,
            modified_at: None,
        }
    }

    #[test]
    fn a_digest_changes_with_the_values_and_with_what_the_mapping_writes() {
        let m = mapping(&[("tier", FieldType::String), ("arr", FieldType::Number)]);
        let r = record(vec![
            Some(Value::String("gold".into())),
            Some(Value::Number(1.0)),
        ]);
        let digest = |m: &Mapping, r: &MappedRecord| values_digest(&DigestSeed::new(m), r);
        let d = digest(&m, &r);
        // Stable: a seed rebuilt from scratch (as in another process) gives the same digest.
        assert_eq!(d, digest(&m.clone(), &r));
        // Any value, a kept null, a renamed field, a new type or another kind: a different one.
        let mut r2 = r.clone();
        r2.values[1] = Some(Value::Number(2.0));
        assert_ne!(d, digest(&m, &r2));
        r2.values[1] = None;
        assert_ne!(d, digest(&m, &r2));
        r2.values[1] = Some(Value::Null);
        assert_ne!(d, digest(&m, &r2));
        let renamed = mapping(&[("plan", FieldType::String), ("arr", FieldType::Number)]);
        assert_ne!(d, digest(&renamed, &r));
        let retyped = mapping(&[("tier", FieldType::String), ("arr", FieldType::Date)]);
        assert_ne!(d, digest(&retyped, &r));
        let mut visitor = m.clone();
        visitor.kind = Kind::Visitor;
        assert_ne!(d, digest(&visitor, &r));
    }

    #[test]
    fn already_hashed_keys_pass_through() {
        let mut h = AlreadyHashed::default();
        h.write_u64(0xfeed);
        assert_eq!(h.finish(), 0xfeed);
        let mut m: IdMap<u8> = IdMap::default();
        m.insert(id_hash("a"), 1);
        assert_eq!(m.get(&id_hash("a")), Some(&1));
    }
}
