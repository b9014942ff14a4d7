//! The guard: nothing goes out at scale by mistake (DESIGN guarantee 9).
//!
//! A cycle's changes are *staged* as its pages commit: the writer does not claim them. When the
//! pull has completed, the guard counts, per Pendo field (DESIGN, "What is counted, and against
//! what"):
//!
//! - **clears** per cycle against the values the shadow holds for the field among the records
//!   the cycle covered (every record of the mapping for a full pull; the pulled ones for an
//!   incremental cycle), *and* added up over the rolling `guard.window` against the values held
//!   across the whole mapping (a property that vanishes a few records per poll is caught once the
//!   sum passes the limit);
//! - **overwrites** against the values held across the whole mapping, per cycle and over the
//!   window (a routine bulk edit of 1 % passes; "ARR is now in cents" does not).
//!
//! Within `[guard]` limits the staged rows become pending in one transaction; beyond them they
//! become *held* under a hold that a person approves or rejects. First fills (a field Pendo
//! holds no value for) never count; values Pendo held before pendo-sync first wrote the field
//! are adopted into the shadow first (`pendo::adopt`), so replacing them counts as overwrites.
//! This module is the decision alone (pure); the store keeps the counts, moves the rows and
//! keeps the holds.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::GuardSettings;
use crate::domain::Kind;

/// What a cycle (or a hold) would change in one Pendo field, and what it is judged against.
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
    /// Values the shadow holds for the field across the whole mapping.
    #[serde(default)]
    pub total: u64,
    /// Clears the guard let through within the window before this cycle.
    #[serde(default)]
    pub window_clears: u64,
    /// Overwrites the guard let through within the window before this cycle.
    #[serde(default)]
    pub window_overwrites: u64,
}

impl FieldCounts {
    /// What the whole mapping's values are: at least what the cycle covered (a state whose
    /// totals were never counted still judges like a per-cycle guard).
    pub fn mapping_values(&self) -> u64 {
        self.total.max(self.covered)
    }
}

/// Fills `counts`' `total` and window sums from what the store keeps beside the cycle
/// ([`crate::store::Store::guard_context`]).
pub fn apply_context(
    counts: &mut BTreeMap<String, FieldCounts>,
    context: &BTreeMap<String, FieldCounts>,
) {
    for (field, c) in counts.iter_mut() {
        if let Some(x) = context.get(field) {
            c.total = x.total;
            c.window_clears = x.window_clears;
            c.window_overwrites = x.window_overwrites;
        }
    }
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
    let floor = limits.min_values.max(1);
    let within = format!(" within {}", window_text(limits.window));
    let mut lines = Vec::new();
    // One check: `n` of `of` over `limit` percent (and `of` at least the floor).
    // A limit of 100 % holds nothing: a window's sum can pass 100 % (a value overwritten twice
    // counts twice), and "100" is how a mapping says "never hold on this".
    let mut check = |verb: &str, field: &str, n: u64, of: u64, limit: f64, when: &str| {
        if n == 0 || of < floor || limit >= 100.0 {
            return false;
        }
        let pct = n as f64 * 100.0 / of as f64;
        if pct <= limit {
            return false;
        }
        lines.push(format!(
            "would {verb} `{field}` on {} of {} {noun}{when} ({pct:.0}% > {limit}%)",
            group(n),
            group(of),
        ));
        true
    };
    for (field, c) in counts {
        let all = c.mapping_values();
        // Clears: this cycle against what it covered, then the window against the mapping.
        if c.clears > 0
            && !check(
                "clear",
                field,
                c.clears,
                c.covered,
                limits.max_clear_percent,
                "",
            )
        {
            check(
                "clear",
                field,
                c.window_clears + c.clears,
                all,
                limits.max_clear_percent,
                &within,
            );
        }
        // Overwrites: against the mapping, this cycle alone, then with the window's.
        if c.overwrites > 0
            && !check(
                "overwrite",
                field,
                c.overwrites,
                all,
                limits.max_overwrite_percent,
                "",
            )
        {
            check(
                "overwrite",
                field,
                c.window_overwrites + c.overwrites,
                all,
                limits.max_overwrite_percent,
                &within,
            );
        }
    }
    (!lines.is_empty()).then_some(Trip { lines })
}

/// What a hold holds, when its contents no longer trip the limits by themselves (latest wins
/// inside a hold: a later cycle may have taken some of its changes back).
pub fn describe(kind: Kind, counts: &BTreeMap<String, FieldCounts>) -> String {
    let noun = match kind {
        Kind::Visitor => "visitors",
        Kind::Account => "accounts",
    };
    let mut parts = Vec::new();
    for (field, c) in counts {
        for (n, verb) in [(c.clears, "clears"), (c.overwrites, "overwrites")] {
            if n > 0 {
                parts.push(format!("{verb} `{field}` on {} {noun}", group(n)));
            }
        }
    }
    if parts.is_empty() {
        "holds first fills only (within the limits now)".to_owned()
    } else {
        format!("holds: {} (within the limits now)", parts.join(", "))
    }
}

/// "24h", "90m", "45s": the window as a config would write it.
fn window_text(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s >= 3600 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
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
            window: Duration::from_secs(24 * 3600),
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

    #[test]
    fn a_bulk_edit_is_judged_against_the_whole_mapping() {
        // 200 of 20,000 contacts moved to a new stage within one poll: 1 %.
        let edit = FieldCounts {
            overwrites: 200,
            covered: 200,
            total: 20_000,
            ..Default::default()
        };
        assert_eq!(
            evaluate(&limits(), Kind::Visitor, &one("lifecyclestage", edit)),
            None
        );
        // At the reconcile the whole mapping is covered: "ARR is now in cents" trips.
        let cents = FieldCounts {
            overwrites: 15_000,
            covered: 20_000,
            total: 20_000,
            ..Default::default()
        };
        assert_eq!(
            evaluate(&limits(), Kind::Account, &one("arr", cents))
                .unwrap()
                .summary(),
            "would overwrite `arr` on 15,000 of 20,000 accounts (75% > 50%)"
        );
    }

    #[test]
    fn clears_dripped_under_the_floor_add_up_over_the_window() {
        // 40 clears a cycle: below min_values per cycle, 3 cycles pass 10 % of 1,000.
        let drip = |before: u64| FieldCounts {
            clears: 40,
            covered: 40,
            total: 1_000,
            window_clears: before,
            ..Default::default()
        };
        assert_eq!(
            evaluate(&limits(), Kind::Visitor, &one("stage", drip(0))),
            None
        );
        assert_eq!(
            evaluate(&limits(), Kind::Visitor, &one("stage", drip(40))),
            None
        );
        assert_eq!(
            evaluate(&limits(), Kind::Visitor, &one("stage", drip(80)))
                .unwrap()
                .summary(),
            "would clear `stage` on 120 of 1,000 visitors within 24h (12% > 10%)"
        );
        // A cycle that clears nothing is not held on the window's past sum.
        let quiet = FieldCounts {
            clears: 0,
            window_clears: 500,
            total: 1_000,
            ..Default::default()
        };
        assert_eq!(
            evaluate(&limits(), Kind::Visitor, &one("stage", quiet)),
            None
        );
    }

    #[test]
    fn a_limit_of_100_percent_holds_nothing_even_when_the_window_passes_it() {
        let churn = FieldCounts {
            overwrites: 1_000,
            covered: 1_000,
            total: 1_000,
            window_overwrites: 5_000,
            ..Default::default()
        };
        let off = GuardSettings {
            max_overwrite_percent: 100.0,
            ..limits()
        };
        assert_eq!(evaluate(&off, Kind::Account, &one("arr", churn)), None);
        assert!(evaluate(&limits(), Kind::Account, &one("arr", churn)).is_some());
    }

    #[test]
    fn a_hold_describes_what_it_holds_when_no_longer_over() {
        let c = FieldCounts {
            clears: 3,
            overwrites: 1_200,
            ..Default::default()
        };
        assert_eq!(
            describe(Kind::Account, &one("arr", c)),
            "holds: clears `arr` on 3 accounts, overwrites `arr` on 1,200 accounts (within the limits now)"
        );
    }
}
