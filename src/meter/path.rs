//! The JSONPath subset meters use to reach into an event's `data`: `$`, `.name`,
//! `['name']` / `["name"]` and `[index]`, as OpenMeter's meters are written
//! (`$.tokens`, `$.usage.input_tokens`, `$['model-id']`, `$.items[0].qty`). Wildcards,
//! slices, filters and recursive descent select several values; a meter needs one, so
//! they are refused when the meter is configured, not met at run time.
//!
//! Evaluation walks the event's JSON text without parsing numbers: the value found is
//! the raw JSON text, so `0.1` reaches the exact decimal as written.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use serde_json::value::RawValue;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Field(String),
    Index(usize),
}

/// A parsed path: the steps from the root of `data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPath {
    steps: Vec<Step>,
    text: String,
}

/// What a path finds in a document.
#[derive(Debug, Clone, Copy)]
pub enum Found<'a> {
    /// The JSON text of the value (a string keeps its quotes).
    Value(&'a RawValue),
    /// Absent, or `null`.
    Missing,
}

impl JsonPath {
    pub fn parse(text: &str) -> Result<Self, String> {
        let rest = text.strip_prefix('$').ok_or("a JSONPath starts with $")?;
        let b = rest.as_bytes();
        let mut steps = Vec::new();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'.' => {
                    let start = i + 1;
                    let mut end = start;
                    while end < b.len() && b[end] != b'.' && b[end] != b'[' {
                        end += 1;
                    }
                    let name = &rest[start..end];
                    if name.is_empty() || name == "*" || name.contains(['?', '(', ')', '@', '*', ' ']) {
                        return Err(format!("unsupported step {:?} (one value per path: no .., *, filters)", &rest[i..end]));
                    }
                    steps.push(Step::Field(name.to_owned()));
                    i = end;
                }
                b'[' => {
                    let close = rest[i..].find(']').map(|c| i + c).ok_or("a [ without ]")?;
                    let inner = rest[i + 1..close].trim();
                    let quoted = inner.len() >= 2
                        && ((inner.starts_with('\'') && inner.ends_with('\'')) || (inner.starts_with('"') && inner.ends_with('"')));
                    if quoted {
                        let name = &inner[1..inner.len() - 1];
                        if name.is_empty() || name.contains(['\'', '"']) {
                            return Err(format!("unsupported field name {inner}"));
                        }
                        steps.push(Step::Field(name.to_owned()));
                    } else if !inner.is_empty() && inner.bytes().all(|c| c.is_ascii_digit()) {
                        steps.push(Step::Index(inner.parse().map_err(|_| format!("index {inner} is too large"))?));
                    } else {
                        return Err(format!("unsupported step [{inner}] (a quoted name or an index: one value per path)"));
                    }
                    i = close + 1;
                }
                _ => return Err(format!("unexpected {:?} after {:?}", &rest[i..], &text[..text.len() - rest.len() + i])),
            }
        }
        if steps.is_empty() {
            return Err("the path selects all of data, not a value in it".into());
        }
        Ok(Self { steps, text: text.to_owned() })
    }

    /// The value at this path in `doc`. A step into something that is not an object
    /// (or an array, for an index) finds nothing; so does malformed JSON.
    pub fn find<'a>(&self, doc: &'a RawValue) -> Found<'a> {
        let mut at = doc;
        for step in &self.steps {
            let next = match step {
                Step::Field(name) => serde_json::from_str::<HashMap<Cow<'a, str>, &'a RawValue>>(at.get())
                    .ok()
                    .and_then(|m| m.get(name.as_str()).copied()),
                Step::Index(i) => serde_json::from_str::<Vec<&'a RawValue>>(at.get()).ok().and_then(|v| v.get(*i).copied()),
            };
            match next {
                Some(v) => at = v,
                None => return Found::Missing,
            }
        }
        if at.get() == "null" {
            Found::Missing
        } else {
            Found::Value(at)
        }
    }
}

/// Parsed where it is read, so a configuration error points at the path's own line.
impl<'de> serde::Deserialize<'de> for JsonPath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(|e| serde::de::Error::custom(format!("JSONPath {text:?}: {e}")))
    }
}

impl serde::Serialize for JsonPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl fmt::Display for JsonPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    fn find(path: &str, doc: &str) -> Option<String> {
        let doc = raw(doc);
        match JsonPath::parse(path).unwrap().find(&doc) {
            Found::Value(v) => Some(v.get().to_owned()),
            Found::Missing => None,
        }
    }

    #[test]
    fn finds_values_as_written() {
        let doc = r#"{"tokens": 0.10, "usage": {"in": "6.51E-7", "list": [1, {"q": 12}]}, "model-id": "gpt", "n": null}"#;
        assert_eq!(find("$.tokens", doc).as_deref(), Some("0.10"));
        assert_eq!(find("$.usage.in", doc).as_deref(), Some("\"6.51E-7\""));
        assert_eq!(find("$.usage.list[1].q", doc).as_deref(), Some("12"));
        assert_eq!(find("$['model-id']", doc).as_deref(), Some("\"gpt\""));
        assert_eq!(find("$[\"usage\"]['in']", doc).as_deref(), Some("\"6.51E-7\""));
        assert_eq!(find("$.n", doc), None);
        assert_eq!(find("$.absent", doc), None);
        assert_eq!(find("$.tokens.deeper", doc), None);
        assert_eq!(find("$.usage.list[5]", doc), None);
    }

    #[test]
    fn paths_that_select_several_values_or_none_are_refused() {
        for bad in ["tokens", "$", "$..tokens", "$.*", "$.items[*]", "$.a[?(@.x)]", "$.a[", "$.", "$.a b", "$x"] {
            assert!(JsonPath::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(JsonPath::parse("$.a.b[2]").unwrap().to_string(), "$.a.b[2]");
    }
}
