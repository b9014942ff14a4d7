//! What the state remembers of the configuration, and what a change to it does (DESIGN.md,
//! "When the configuration changes"). Operators should not have to know that a new field needs
//! a resync.
//!
//! The state keeps, per mapping, a [`Fingerprint`]: what decides which records it covers and
//! what id they get (source, object, kind, id, id_case, filter), and per field what decides its
//! value (from, type, transform, on_null). Compared with the configuration in force:
//!
//! - a **new or changed field**, or a **changed definition**: the mapping's next cycle is a full
//!   reconcile (an incremental cycle would only reach the records that happen to change), guarded
//!   as always. The fingerprint is recorded once a full cycle has succeeded, so a failed one is
//!   tried again;
//! - a **removed field or mapping**: its shadow values, outbox rows (every state) and open holds
//!   are forgotten ([`crate::store::Store::forget_mapped`]); nothing is cleared in Pendo;
//! - a mapping never seen (a new one, or a state from before fingerprints): recorded after its
//!   first successful cycle, which for a new mapping pulls everything anyway.
//!
//! [`plan`] says what will happen (`check`, `sync --dry-run`); [`forget_removed`] and
//! [`App::cycle`](crate::app::App::cycle) do it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::{MappingSettings, Settings};
use crate::domain::Kind;
use crate::store::{Store, StoreError};

const PREFIX: &str = "config.mapping.";

/// What the state remembers of one mapping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub kind: Kind,
    /// Source, object, id, id_case and filter, as one line.
    pub definition: String,
    /// Field -> from, type, transform and on_null, as one line.
    pub fields: BTreeMap<String, String>,
}

impl Fingerprint {
    pub fn of(m: &MappingSettings) -> Fingerprint {
        Fingerprint {
            kind: m.kind,
            definition: format!(
                "source={:?} object={:?} id={:?} id_case={:?} filter={:?}",
                m.source, m.object, m.id, m.id_case, m.filter
            ),
            fields: m
                .fields
                .iter()
                .map(|(name, f)| {
                    let line = format!(
                        "from={:?} type={:?} transform={:?} on_null={:?}",
                        f.from, f.field_type, f.transform, f.on_null
                    );
                    (name.clone(), line)
                })
                .collect(),
        }
    }

    pub async fn load(store: &Store, mapping: &str) -> Result<Option<Fingerprint>, StoreError> {
        store
            .kv_get(&format!("{PREFIX}{mapping}"))
            .await?
            .map(|v| {
                serde_json::from_value(v).map_err(|e| {
                    StoreError::Corrupt(format!("the fingerprint of mapping {mapping}: {e}"))
                })
            })
            .transpose()
    }

    pub async fn save(&self, store: &Store, mapping: &str) -> Result<(), StoreError> {
        let value = serde_json::to_value(self).expect("a fingerprint serializes");
        store.kv_set(&format!("{PREFIX}{mapping}"), &value).await
    }
}

/// What a configuration change does to one mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingPlan {
    pub mapping: String,
    /// Why its next cycle is a full reconcile, if it must be.
    pub reconcile: Option<String>,
    /// Fields the state knows for it that the configuration no longer maps.
    pub removed_fields: Vec<String>,
}

/// What the configuration in force changes, against what the state remembers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Mappings with something to do (unchanged and never-seen ones are left out).
    pub mappings: Vec<MappingPlan>,
    /// Mappings the state knows that the configuration no longer has.
    pub removed: Vec<(String, Fingerprint)>,
}

impl Plan {
    /// One line per change, for `check` and `sync --dry-run`.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for m in &self.mappings {
            if let Some(why) = &m.reconcile {
                out.push(format!(
                    "{}: {why}: the next cycle is a full reconcile (guarded as always)",
                    m.mapping
                ));
            }
            for f in &m.removed_fields {
                out.push(format!(
                    "{}: field `{f}` removed: its queued values and shadow are forgotten, holds with nothing else closed; Pendo keeps its values",
                    m.mapping
                ));
            }
        }
        for (name, print) in &self.removed {
            out.push(format!(
                "{name}: mapping removed: its queued values, shadow ({} fields) and holds are forgotten; Pendo keeps its values",
                print.fields.len()
            ));
        }
        out
    }
}

/// Why the mapping's next cycle must be a full reconcile, and which fields were removed, given
/// what the state remembers.
fn compare(now: &Fingerprint, was: &Fingerprint) -> (Option<String>, Vec<String>) {
    let removed: Vec<String> = was
        .fields
        .keys()
        .filter(|f| !now.fields.contains_key(*f))
        .cloned()
        .collect();
    if now.definition != was.definition || now.kind != was.kind {
        return (
            Some("which records it covers or their ids changed (source, object, id, id_case or filter)".into()),
            removed,
        );
    }
    let mut added = Vec::new();
    let mut changed = Vec::new();
    for (f, line) in &now.fields {
        match was.fields.get(f) {
            None => added.push(format!("`{f}`")),
            Some(old) if old != line => changed.push(format!("`{f}`")),
            Some(_) => {}
        }
    }
    let mut why = Vec::new();
    if !added.is_empty() {
        why.push(format!("field {} added", added.join(", ")));
    }
    if !changed.is_empty() {
        why.push(format!("field {} changed", changed.join(", ")));
    }
    ((!why.is_empty()).then(|| why.join("; ")), removed)
}

/// What the configuration in force changes. Reads only.
pub async fn plan(settings: &Settings, store: &Store) -> Result<Plan, StoreError> {
    let mut plan = Plan::default();
    for m in &settings.mappings {
        let Some(was) = Fingerprint::load(store, &m.name).await? else {
            continue;
        };
        let (reconcile, removed_fields) = compare(&Fingerprint::of(m), &was);
        if reconcile.is_some() || !removed_fields.is_empty() {
            plan.mappings.push(MappingPlan {
                mapping: m.name.clone(),
                reconcile,
                removed_fields,
            });
        }
    }
    for (key, value) in store.kv_prefix(PREFIX).await? {
        let name = &key[PREFIX.len()..];
        if settings.mappings.iter().any(|m| m.name == name) {
            continue;
        }
        let print = serde_json::from_value(value)
            .map_err(|e| StoreError::Corrupt(format!("the fingerprint of mapping {name}: {e}")))?;
        plan.removed.push((name.to_owned(), print));
    }
    Ok(plan)
}

/// Forgets the mappings the configuration no longer has (only the writer may: under the
/// instance lock or the leader lease).
pub async fn forget_removed(settings: &Settings, store: &Store) -> Result<(), StoreError> {
    for (name, print) in plan(settings, store).await?.removed {
        let fields: Vec<String> = print.fields.keys().cloned().collect();
        let forgotten = store
            .forget_mapped(&name, print.kind, &fields, true)
            .await?;
        store.kv_delete(&format!("{PREFIX}{name}")).await?;
        crate::schedule::ReconcileRecord::forget(store, &name).await?;
        tracing::warn!(
            mapping = %name,
            outbox_rows = forgotten.outbox_rows,
            shadow_values = forgotten.shadow_values,
            holds_closed = forgotten.holds_closed,
            "A mapping was removed from the configuration: its queued values, shadow and holds are forgotten. Pendo keeps its values."
        );
    }
    Ok(())
}

/// Before a mapping's cycle: forgets the fields it no longer maps, and says whether the cycle
/// must be a full reconcile (the fingerprint changed). Returns the fingerprint to record once a
/// full cycle succeeds (`None`: nothing to record).
pub async fn before_cycle(
    store: &Store,
    m: &MappingSettings,
    dry_run: bool,
) -> Result<(Option<String>, Option<Fingerprint>), StoreError> {
    let now = Fingerprint::of(m);
    let Some(mut was) = Fingerprint::load(store, &m.name).await? else {
        return Ok((None, Some(now)));
    };
    let (reconcile, removed) = compare(&now, &was);
    if !removed.is_empty() && !dry_run {
        let forgotten = store
            .forget_mapped(&m.name, was.kind, &removed, false)
            .await?;
        for f in &removed {
            was.fields.remove(f);
        }
        was.save(store, &m.name).await?;
        tracing::warn!(
            mapping = %m.name,
            fields = ?removed,
            outbox_rows = forgotten.outbox_rows,
            shadow_values = forgotten.shadow_values,
            holds_closed = forgotten.holds_closed,
            "Fields were removed from the mapping: their queued values and shadow are forgotten. Pendo keeps their values."
        );
    }
    let record = reconcile.as_ref().map(|_| now);
    Ok((reconcile, record))
}
