//! Meters over CloudEvents (SPEC §10): which events count, how, and grouped by what.
//!
//! A meter is configuration (`[[meters]]`), like OpenMeter's: an event `type`, an
//! aggregation, a JSONPath to the value in the event's `data` and named JSONPaths to
//! group by. Stage 1 turns each CloudEvent into one grouped pulse per meter that reads
//! its type ([`apply`]); from there the window operator counts it like any pulse, with
//! the meter, its aggregation and the group-by values in the group key ([`key`]). The
//! query side ([`query`]) folds the stored windows into OpenMeter's answer shape.
//! Plain types only: no Kafka, no RocksDB, no HTTP.

pub mod apply;
pub mod event;
pub mod key;
pub mod path;
pub mod query;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

pub use path::JsonPath;

/// How a meter folds its events' values (OpenMeter's aggregations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Aggregation {
    Sum,
    Count,
    Avg,
    Min,
    Max,
    UniqueCount,
    Latest,
}

impl Aggregation {
    pub const ALL: [Aggregation; 7] =
        [Self::Sum, Self::Count, Self::Avg, Self::Min, Self::Max, Self::UniqueCount, Self::Latest];

    /// As configured and as stored in aggregates: `sum`, `unique_count`, …
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sum => "sum",
            Self::Count => "count",
            Self::Avg => "avg",
            Self::Min => "min",
            Self::Max => "max",
            Self::UniqueCount => "unique_count",
            Self::Latest => "latest",
        }
    }

    /// As OpenMeter's API writes it: `SUM`, `UNIQUE_COUNT`, …
    pub fn openmeter_name(self) -> String {
        self.as_str().to_ascii_uppercase()
    }

    /// Whether the meter reads a value from the event (all but `count`).
    pub fn needs_value(self) -> bool {
        self != Self::Count
    }
}

impl std::str::FromStr for Aggregation {
    type Err = String;
    /// Either spelling, `unique_count` or OpenMeter's `UNIQUE_COUNT`.
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|a| a.as_str().eq_ignore_ascii_case(s)).ok_or_else(|| {
            let known: Vec<_> = Self::ALL.iter().map(|a| a.as_str()).collect();
            format!("unknown aggregation {s:?}; known: {}", known.join(", "))
        })
    }
}

impl fmt::Display for Aggregation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Aggregation {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Aggregation {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One `[[meters]]` entry, checked: a valid slug, a value path where the aggregation
/// needs one, JSONPaths that parse, group-by names that are plain identifiers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "MeterSpec", into = "MeterSpec")]
pub struct Meter {
    pub slug: String,
    pub event_type: String,
    pub aggregation: Aggregation,
    pub value_property: Option<JsonPath>,
    pub group_by: BTreeMap<String, JsonPath>,
    /// Display name and description, for OpenMeter's meter shape.
    pub name: Option<String>,
    pub description: Option<String>,
}

/// A `[[meters]]` entry as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MeterSpec {
    slug: String,
    event_type: String,
    aggregation: Aggregation,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value_property: Option<JsonPath>,
    #[serde(default)]
    group_by: BTreeMap<String, JsonPath>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    description: Option<String>,
}

/// Longest meter slug (OpenMeter's limit).
pub const MAX_SLUG_LEN: usize = 63;

impl TryFrom<MeterSpec> for Meter {
    type Error = String;
    fn try_from(s: MeterSpec) -> Result<Self, String> {
        let slug_ok = !s.slug.is_empty()
            && s.slug.len() <= MAX_SLUG_LEN
            && s.slug.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !slug_ok {
            return Err(format!("meter slug {:?} must be 1-{MAX_SLUG_LEN} chars of [a-z0-9_]", s.slug));
        }
        let at = |what: &str| format!("meter {}: {what}", s.slug);
        if s.event_type.is_empty() {
            return Err(at("event_type is empty"));
        }
        if s.value_property.is_none() && s.aggregation.needs_value() {
            return Err(at(&format!("aggregation {} needs a value_property", s.aggregation)));
        }
        for name in s.group_by.keys() {
            let name_ok = !name.is_empty() && name.len() <= MAX_SLUG_LEN && name != "subject"
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !name_ok {
                return Err(at(&format!("group_by name {name:?} must be 1-{MAX_SLUG_LEN} chars of [A-Za-z0-9_], not \"subject\"")));
            }
        }
        Ok(Self {
            slug: s.slug,
            event_type: s.event_type,
            aggregation: s.aggregation,
            value_property: s.value_property,
            group_by: s.group_by,
            name: s.name,
            description: s.description,
        })
    }
}

impl From<Meter> for MeterSpec {
    fn from(m: Meter) -> Self {
        Self {
            slug: m.slug,
            event_type: m.event_type,
            aggregation: m.aggregation,
            value_property: m.value_property,
            group_by: m.group_by,
            name: m.name,
            description: m.description,
        }
    }
}

/// The configured meters: slugs unique, looked up by event type.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Vec<Meter>", into = "Vec<Meter>")]
pub struct Meters {
    meters: Vec<Meter>,
}

impl TryFrom<Vec<Meter>> for Meters {
    type Error = String;
    fn try_from(meters: Vec<Meter>) -> Result<Self, String> {
        let mut seen = std::collections::HashSet::new();
        for m in &meters {
            if !seen.insert(m.slug.as_str()) {
                return Err(format!("meter slug {:?} is defined twice", m.slug));
            }
        }
        Ok(Self { meters })
    }
}

impl From<Meters> for Vec<Meter> {
    fn from(m: Meters) -> Self {
        m.meters
    }
}

impl Meters {
    pub fn new(meters: Vec<Meter>) -> Result<Self, String> {
        Self::try_from(meters)
    }

    pub fn is_empty(&self) -> bool {
        self.meters.is_empty()
    }

    pub fn all(&self) -> &[Meter] {
        &self.meters
    }

    /// The meter `slug` (OpenMeter's `idOrSlug`: a meter's id is its slug here).
    pub fn get(&self, slug: &str) -> Option<&Meter> {
        self.meters.iter().find(|m| m.slug == slug)
    }

    /// The meters that read events of `event_type`.
    pub fn of_type<'a>(&'a self, event_type: &'a str) -> impl Iterator<Item = &'a Meter> + 'a {
        self.meters.iter().filter(move |m| m.event_type == event_type)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct File {
        #[serde(default)]
        meters: Meters,
    }

    fn parse(text: &str) -> Result<Meters, String> {
        toml::from_str::<File>(text).map(|f| f.meters).map_err(|e| e.to_string())
    }

    #[test]
    fn a_meter_file_parses() {
        let m = parse(
            r#"
[[meters]]
slug = "tokens_total"
event_type = "prompt"
aggregation = "sum"
value_property = "$.tokens"
group_by = { model = "$.model", type = "$.type" }

[[meters]]
slug = "prompts"
event_type = "prompt"
aggregation = "COUNT"
"#,
        )
        .unwrap();
        assert_eq!(m.all().len(), 2);
        assert_eq!(m.of_type("prompt").count(), 2);
        assert_eq!(m.get("prompts").unwrap().aggregation, Aggregation::Count);
        assert_eq!(m.get("tokens_total").unwrap().group_by.keys().collect::<Vec<_>>(), ["model", "type"]);
    }

    #[test]
    fn bad_meters_are_refused_with_the_line() {
        let unknown = parse("\n\n[[meters]]\nslug = \"a\"\nevent_type = \"t\"\naggregation = \"median\"\nvalue_property = \"$.v\"\n").unwrap_err();
        assert!(unknown.contains("unknown aggregation \"median\"") && unknown.contains("line 6"), "{unknown}");
        let path = parse("[[meters]]\nslug = \"a\"\nevent_type = \"t\"\naggregation = \"sum\"\nvalue_property = \"tokens\"\n").unwrap_err();
        assert!(path.contains("JSONPath \"tokens\"") && path.contains("line 5"), "{path}");
        let twice = "[[meters]]\nslug = \"a\"\nevent_type = \"t\"\naggregation = \"count\"\n";
        let dup = parse(&format!("{twice}{twice}")).unwrap_err();
        assert!(dup.contains("\"a\" is defined twice"), "{dup}");
        let slug = parse("[[meters]]\nslug = \"Tokens\"\nevent_type = \"t\"\naggregation = \"count\"\n").unwrap_err();
        assert!(slug.contains("[a-z0-9_]"), "{slug}");
        let no_value = parse("[[meters]]\nslug = \"a\"\nevent_type = \"t\"\naggregation = \"max\"\n").unwrap_err();
        assert!(no_value.contains("needs a value_property"), "{no_value}");
    }
}
