//! Adoption of the values Pendo already holds (DESIGN, "The guard": values Pendo already holds
//! that pendo-sync never wrote). Before a field's first push in a mapping (a first sync, a newly
//! mapped field, a fresh state), this module reads what Pendo holds for it through the
//! aggregation API ([`super::values::ValuePages`], the read `audit --against pendo` makes) and
//! hands each page to [`Store::adopt_values`]: Pendo's values go into the shadow as confirmed;
//! staged values equal to them are dropped, never sent; different ones stay staged, and the
//! guard counts them as overwrites of Pendo's values. Replacing another integration therefore
//! sends only what differs, and cannot silently overwrite it wholesale.
//!
//! The read costs one aggregation request per [`ADOPT_PAGE`] entities of the kind, once per
//! field's first push; a later cycle of the field finds its values in the shadow and reads
//! nothing.

use std::collections::HashMap;

use crate::mapping::{FieldMap, Mapping, stored_from_pendo};
use crate::store::{Store, StoreError};

use super::values::{Retry, ValuePages, alias};
use super::{PendoClient, PendoError};

/// Entities per aggregation page (the audit's page).
pub const ADOPT_PAGE: usize = 5_000;

/// What one adoption did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Adoption {
    /// Aggregation requests made.
    pub requests: u64,
    /// Entities Pendo listed.
    pub read: u64,
    /// Pendo's values written into the shadow (for ids the mapping staged a value for).
    pub seeded: u64,
    /// Of those, equal to the CRM's: dropped from the outbox, never sent.
    pub equal: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("reading what Pendo holds for {fields} before their first push: {source}")]
    Pendo {
        fields: String,
        #[source]
        source: PendoError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Adopts Pendo's values of `fields` for `mapping`'s staged rows, page by page.
pub async fn adopt(
    store: &Store,
    client: &PendoClient,
    mapping: &Mapping,
    fields: &[&FieldMap],
    retry: Retry,
) -> Result<Adoption, AdoptError> {
    let mut out = Adoption::default();
    let mut read = Read::new(client, mapping, fields, retry);
    while let Some(held) = read.next(&mut out).await? {
        let done = store
            .adopt_values(&mapping.name, mapping.kind, &held)
            .await?;
        out.seeded += done.seeded;
        out.equal += done.equal;
    }
    Ok(out)
}

/// What Pendo holds for `fields`, by (Pendo id, field), values in the outbox's stored form:
/// what a dry run judges its first fills against (it adopts nothing).
pub async fn read_held(
    client: &PendoClient,
    mapping: &Mapping,
    fields: &[&FieldMap],
    retry: Retry,
) -> Result<HashMap<(String, String), String>, AdoptError> {
    let mut out = HashMap::new();
    let mut read = Read::new(client, mapping, fields, retry);
    while let Some(held) = read.next(&mut Adoption::default()).await? {
        out.extend(
            held.into_iter()
                .map(|(id, field, value)| ((id, field), value)),
        );
    }
    Ok(out)
}

/// The paged read of `fields`, as (Pendo id, field, stored value) for the non-null values.
struct Read<'a> {
    pages: ValuePages<'a>,
    mapping: &'a Mapping,
    fields: &'a [&'a FieldMap],
    aliases: Vec<String>,
}

impl<'a> Read<'a> {
    fn new(
        client: &'a PendoClient,
        mapping: &'a Mapping,
        fields: &'a [&'a FieldMap],
        retry: Retry,
    ) -> Read<'a> {
        let kind = mapping.kind;
        let names: Vec<&str> = fields.iter().map(|f| f.pendo_field.as_str()).collect();
        let label = format!("adopt-{}", mapping.name);
        Read {
            pages: ValuePages::new(client, kind, &names, ADOPT_PAGE, retry, &label),
            mapping,
            fields,
            aliases: names.iter().map(|f| alias(kind, f)).collect(),
        }
    }

    async fn next(
        &mut self,
        counts: &mut Adoption,
    ) -> Result<Option<Vec<(String, String, String)>>, AdoptError> {
        let page = self
            .pages
            .next()
            .await
            .map_err(|source| AdoptError::Pendo {
                fields: self
                    .fields
                    .iter()
                    .map(|f| format!("`{}`", f.pendo_field))
                    .collect::<Vec<_>>()
                    .join(", "),
                source,
            })?;
        let Some(page) = page else {
            return Ok(None);
        };
        counts.requests += 1;
        counts.read += page.len() as u64;
        let id_key = self.mapping.kind.id_key();
        let mut held = Vec::new();
        for row in &page {
            let Some(id) = super::client::row_id(row, id_key) else {
                continue;
            };
            for (alias, f) in self.aliases.iter().zip(self.fields) {
                let raw = row.get(alias).unwrap_or(&serde_json::Value::Null);
                if let Some(value) = stored_from_pendo(raw, f.field_type) {
                    held.push((id.clone(), f.pendo_field.clone(), value));
                }
            }
        }
        Ok(Some(held))
    }
}
