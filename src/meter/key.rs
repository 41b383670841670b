//! How a meter's windows are keyed. The window operator groups by (tenant, sku, unit);
//! a metered event becomes a grouped pulse with tenant = the event's subject, sku = the
//! meter's slug and unit = this key's JSON text: the aggregation, the group-by values
//! and, for `unique_count`, the distinct value itself (so each distinct value has its
//! own windows and the distinct values of any range are exactly the keys found there).
//!
//! A pulse's unit is 1-128 chars of `[A-Za-z0-9._:-]` and never starts with `{`, so a
//! meter's windows never share a key with a pulse's. JSON escapes control characters,
//! so the text never holds the NUL the stores separate key parts with.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Aggregation;

/// The part of a meter window's group key after tenant and slug.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeterKey {
    pub aggregation: Aggregation,
    /// Group-by name → value; a property the event lacks is absent.
    pub group_by: BTreeMap<String, String>,
    /// `unique_count` only: the value counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

impl MeterKey {
    /// The unit text (serde_json writes a `BTreeMap`'s keys in order: one text per key).
    pub fn to_unit(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The meter key in a window's unit, if it is a meter's window.
    pub fn from_unit(unit: &str) -> Option<Self> {
        if !unit.starts_with('{') {
            return None;
        }
        serde_json::from_str(unit).ok()
    }
}

/// What an aggregate of a meter's window says about the meter (SPEC §10): written
/// beside the window's totals in `tenant.aggregated.pulses.amount`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeterOf {
    pub slug: String,
    pub aggregation: Aggregation,
    pub group_by: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

impl MeterOf {
    /// From a window's sku and unit; None for a pulse's window.
    pub fn of(product_sku: &str, use_unit: &str) -> Option<Self> {
        let k = MeterKey::from_unit(use_unit)?;
        Some(Self { slug: product_sku.to_owned(), aggregation: k.aggregation, group_by: k.group_by, value: k.value })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_round_trips_and_never_looks_like_a_pulse_unit() {
        let k = MeterKey {
            aggregation: Aggregation::UniqueCount,
            group_by: [("z".to_owned(), "1".to_owned()), ("a".to_owned(), "x\u{0}y".to_owned())].into(),
            value: Some("user-1".into()),
        };
        let unit = k.to_unit();
        assert_eq!(unit, r#"{"aggregation":"unique_count","group_by":{"a":"x\u0000y","z":"1"},"value":"user-1"}"#);
        assert!(!unit.contains('\0'));
        assert_eq!(MeterKey::from_unit(&unit), Some(k));
        assert_eq!(MeterKey::from_unit("GB"), None);
        assert!(crate::pulse::validate::identifier("use_unit", Some(&unit)).is_err());
    }
}
