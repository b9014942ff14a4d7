//! The guard: nothing goes out at scale by mistake (DESIGN guarantee 9).
//!
//! A cycle's changes are *staged* as its pages commit: the writer does not claim them. When the
//! pull has completed, the guard counts, per Pendo field, the staged clears and overwrites
//! against the values the shadow holds for that field among the records the cycle covered
//! (every record of the mapping for a full pull; the pulled ones for an incremental cycle).
//! Within `[guard]` limits the staged rows become pending in one transaction; beyond them they
//! become *held* under a hold that a person approves or rejects. First fills (a field Pendo
//! holds no value for) never count. This module is the decision alone (pure); the store moves
//! the rows and keeps the holds.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::GuardSettings;
use crate::domain::Kind;

/// What a cycle would change in one Pendo field.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldCounts {
    /// Values set where Pendo holds none (first fills: never counted against the limits).
    pub sets: u64,
    /// Values Pendo holds that would be cleared.
    pub clears: u64,
    /// Non-null values Pendo holds that a different non-null value would replace.
    pub overwrites: u64,
    /// Values the shadow holds for the field among the records the cycle covered.
    pub covered: u64,
}

/// One change of a hold's sample: (id, field, from → to), values as stored JSON text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleChange {
    pub id: String,
    pub field: String,
    pub from: Option<String>,
    pub to: String,
}

/// Why the guard held a cycle: one line per field over a limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Trip {
    pub lines: Vec<String>,
}

impl Trip {
    pub fn summary(&self) -> String {
        self.lines.join("; ")
    }
}

/// The guard's decision over per-field counts: `None` (within the limits) or why it trips.
pub fn evaluate(
    limits: &GuardSettings,
    kind: Kind,
    counts: &BTreeMap<String, FieldCounts>,
) -> Option<Trip> {
    let noun = match kind {
        Kind::Visitor => "visitors",
        Kind::Account => "accounts",
    };
    let mut lines = Vec::new();
    for (field, c) in counts {
        // Few covered values say little: a field is never held on percentages below the floor.
        if c.covered < limits.min_values.max(1) {
            continue;
        }
        let pct = |n: u64| n as f64 * 100.0 / c.covered as f64;
        if c.clears > 0 && pct(c.clears) > limits.max_clear_percent {
            lines.push(format!(
                "would clear `{field}` on {} of {} {noun} ({:.0}% > {}%)",
                group(c.clears),
                group(c.covered),
                pct(c.clears),
                limits.max_clear_percent
            ));
        }
        if c.overwrites > 0 && pct(c.overwrites) > limits.max_overwrite_percent {
            lines.push(format!(
                "would overwrite `{field}` on {} of {} {noun} ({:.0}% > {}%)",
                group(c.overwrites),
                group(c.covered),
                pct(c.overwrites),
                limits.max_overwrite_percent
            ));
        }
    }
    (!lines.is_empty()).then_some(Trip { lines })
}

/// 9412 → "9,412".
fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> GuardSettings {
        GuardSettings {
            max_clear_percent: 10.0,
            max_overwrite_percent: 50.0,
            min_values: 100,
        }
    }

    fn one(field: &str, c: FieldCounts) -> BTreeMap<String, FieldCounts> {
        BTreeMap::from([(field.to_owned(), c)])
    }

    #[test]
    fn a_mass_clear_trips_with_a_readable_reason() {
        let trip = evaluate(
            &limits(),
            Kind::Visitor,
            &one(
                "lifecyclestage",
                FieldCounts {
                    clears: 9_412,
                    covered: 9_980,
                    ..Default::default()
                },
            ),
        )
        .unwrap();
        assert_eq!(
            trip.summary(),
            "would clear `lifecyclestage` on 9,412 of 9,980 visitors (94% > 10%)"
        );
    }

    #[test]
    fn first_fills_small_fields_and_normal_changes_pass() {
        let fill = FieldCounts {
            sets: 50_000,
            covered: 0,
            ..Default::default()
        };
        assert_eq!(evaluate(&limits(), Kind::Account, &one("arr", fill)), None);
        let small = FieldCounts {
            clears: 90,
            covered: 99,
            ..Default::default()
        };
        assert_eq!(evaluate(&limits(), Kind::Account, &one("arr", small)), None);
        let normal = FieldCounts {
            clears: 10,
            overwrites: 500,
            covered: 1_000,
            ..Default::default()
        };
        assert_eq!(
            evaluate(&limits(), Kind::Account, &one("arr", normal)),
            None
        );
        let over = FieldCounts {
            overwrites: 501,
            ..normal
        };
        assert!(evaluate(&limits(), Kind::Account, &one("arr", over)).is_some());
    }
}
