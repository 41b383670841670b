//! Quotas (SPEC §8): a file of limits per tenant (or `*`), sku and unit over a UTC
//! calendar day or month, and the check `used + requested <= limit`. Pure, apart from
//! reading the file; the handler is in [`super::usage`].

use std::path::{Path, PathBuf};
use std::str::FromStr;

use chrono::{Datelike, TimeZone, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error("cannot read quota file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("quota file {path} is not valid: {detail}")]
    Invalid { path: PathBuf, detail: String },
}

/// The period a limit applies to, on the UTC calendar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Day,
    Month,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Day => "day",
            Self::Month => "month",
        }
    }

    /// `[start, end)` in epoch ms of the period holding `now_ms`.
    pub fn bounds(self, now_ms: i64) -> (i64, i64) {
        let now = Utc.timestamp_millis_opt(now_ms).single().unwrap_or_default();
        let day = now.date_naive();
        let (start, end) = match self {
            Self::Day => (day, day.succ_opt().unwrap_or(day)),
            Self::Month => {
                let first = day.with_day(1).unwrap_or(day);
                let next = if first.month() == 12 {
                    first.with_year(first.year() + 1).and_then(|d| d.with_month(1))
                } else {
                    first.with_month(first.month() + 1)
                };
                (first, next.unwrap_or(first))
            }
        };
        let ms = |d: chrono::NaiveDate| d.and_hms_opt(0, 0, 0).map_or(0, |t| t.and_utc().timestamp_millis());
        (ms(start), ms(end))
    }
}

/// One entry of the quota file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// A tenant, or `*` for every tenant without an entry of its own.
    pub tenant_id: String,
    pub product_sku: String,
    pub use_unit: String,
    #[serde(deserialize_with = "decimal")]
    pub limit: Decimal,
    pub period: Period,
}

fn decimal<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Num {
        Text(String),
        Int(i64),
    }
    let text = match Num::deserialize(d)? {
        Num::Text(t) => t,
        Num::Int(i) => i.to_string(),
    };
    Decimal::from_str_exact(text.trim()).map_err(|e| serde::de::Error::custom(format!("limit {text:?}: {e}")))
}

/// Every quota of the file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quotas {
    #[serde(default)]
    pub quota: Vec<Quota>,
}

impl Quotas {
    pub fn parse(text: &str, path: &Path) -> Result<Self, QuotaError> {
        let invalid = |detail: String| QuotaError::Invalid { path: path.to_owned(), detail };
        let quotas: Quotas = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let mut seen = std::collections::BTreeSet::new();
        for q in &quotas.quota {
            if q.limit.is_sign_negative() {
                return Err(invalid(format!("the limit of {}/{}/{} is negative", q.tenant_id, q.product_sku, q.use_unit)));
            }
            if !seen.insert((&q.tenant_id, &q.product_sku, &q.use_unit)) {
                return Err(invalid(format!("{}/{}/{} has two entries", q.tenant_id, q.product_sku, q.use_unit)));
            }
        }
        Ok(quotas)
    }

    pub fn load(path: &Path) -> Result<Self, QuotaError> {
        let text = std::fs::read_to_string(path).map_err(|source| QuotaError::Read { path: path.to_owned(), source })?;
        Self::parse(&text, path)
    }

    /// The quota of `tenant`'s `sku` in `unit`: its own entry, else the `*` one.
    pub fn find(&self, tenant: &str, sku: &str, unit: &str) -> Option<&Quota> {
        let of = |t: &str| self.quota.iter().find(|q| q.tenant_id == t && q.product_sku == sku && q.use_unit == unit);
        of(tenant).or_else(|| of("*"))
    }
}

/// The quotas in force: the file's latest valid content, reloaded when it changes
/// (or on SIGHUP). A file that turns invalid keeps the previous quotas, loudly.
pub struct QuotaStore {
    path: Option<PathBuf>,
    current: std::sync::RwLock<std::sync::Arc<Quotas>>,
    modified: std::sync::Mutex<Option<std::time::SystemTime>>,
}

impl QuotaStore {
    /// Loads `path` (none: no quotas, every check is allowed).
    pub fn open(path: Option<PathBuf>) -> Result<Self, QuotaError> {
        let quotas = path.as_deref().map(Quotas::load).transpose()?.unwrap_or_default();
        let modified = path.as_deref().and_then(modified);
        Ok(Self { path, current: std::sync::RwLock::new(std::sync::Arc::new(quotas)), modified: std::sync::Mutex::new(modified) })
    }

    pub fn current(&self) -> std::sync::Arc<Quotas> {
        self.current.read().map(|q| std::sync::Arc::clone(&q)).unwrap_or_default()
    }

    /// Reads the file again; false (and the previous quotas kept) if it is not valid.
    pub fn reload(&self) -> bool {
        let Some(path) = &self.path else { return true };
        match Quotas::load(path) {
            Ok(q) => {
                tracing::info!(path = %path.display(), quotas = q.quota.len(), "quotas loaded");
                if let Ok(mut current) = self.current.write() {
                    *current = std::sync::Arc::new(q);
                }
                true
            }
            Err(e) => {
                tracing::error!("{e}; the previous quotas stay in force");
                false
            }
        }
    }

    /// Reloads if the file's modification time changed since the last look.
    pub fn reload_if_changed(&self) {
        let Some(path) = &self.path else { return };
        let now = modified(path);
        let changed = self.modified.lock().map(|mut m| std::mem::replace(&mut *m, now) != now).unwrap_or(false);
        if changed {
            self.reload();
        }
    }
}

fn modified(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The answer to a quota check (SPEC §8); decimals as exact strings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    pub allowed: bool,
    #[serde(with = "rust_decimal::serde::str_option")]
    pub used: Option<Decimal>,
    #[serde(with = "rust_decimal::serde::str")]
    pub requested: Decimal,
    #[serde(with = "rust_decimal::serde::str_option")]
    pub limit: Option<Decimal>,
    #[serde(with = "rust_decimal::serde::str_option")]
    pub remaining: Option<Decimal>,
    pub period: Option<Period>,
    pub period_start: Option<String>,
    pub as_of: String,
}

/// Checks `requested` against `quota` given `used` in its current period. Without a
/// quota everything is allowed and nothing is measured. `remaining` is never below 0.
pub fn check(quota: Option<&Quota>, used: Decimal, requested: Decimal, period_start: Option<String>, as_of: String) -> Check {
    match quota {
        None => Check { allowed: true, used: None, requested, limit: None, remaining: None, period: None, period_start: None, as_of },
        Some(q) => Check {
            allowed: used.checked_add(requested).is_some_and(|total| total <= q.limit),
            used: Some(used),
            requested,
            limit: Some(q.limit),
            remaining: Some((q.limit - used).max(Decimal::ZERO)),
            period: Some(q.period),
            period_start,
            as_of,
        },
    }
}

/// Parses a requested amount: a decimal string or JSON number, not negative.
pub fn requested(raw: &serde_json::value::RawValue) -> Result<Decimal, String> {
    let text = raw.get().trim();
    let text = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')).unwrap_or(text);
    let d = Decimal::from_str(text).map_err(|e| format!("requested {text:?} is not a decimal: {e}"))?;
    if d.is_sign_negative() {
        return Err(format!("requested {text} is negative"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[[quota]]
tenant_id = "*"
product_sku = "storage.standard"
use_unit = "GB"
limit = "1000"
period = "month"

[[quota]]
tenant_id = "acme"
product_sku = "storage.standard"
use_unit = "GB"
limit = "10.5"
period = "day"
"#;

    fn ms(s: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
    }

    #[test]
    fn a_tenants_own_entry_wins_over_the_wildcard() {
        let q = Quotas::parse(FILE, Path::new("q.toml")).unwrap();
        assert_eq!(q.find("acme", "storage.standard", "GB").unwrap().limit, Decimal::new(105, 1));
        assert_eq!(q.find("globex", "storage.standard", "GB").unwrap().period, Period::Month);
        assert!(q.find("acme", "storage.standard", "TB").is_none());
    }

    #[test]
    fn periods_are_utc_calendar_days_and_months() {
        assert_eq!(Period::Day.bounds(ms("2026-12-03T13:00:00Z")), (ms("2026-12-03T00:00:00Z"), ms("2026-12-04T00:00:00Z")));
        assert_eq!(Period::Month.bounds(ms("2026-12-31T23:59:59.999Z")), (ms("2026-12-01T00:00:00Z"), ms("2027-01-01T00:00:00Z")));
        assert_eq!(Period::Month.bounds(ms("2028-02-29T12:00:00Z")), (ms("2028-02-01T00:00:00Z"), ms("2028-03-01T00:00:00Z")));
        assert_eq!(Period::Day.bounds(ms("2026-12-04T00:00:00Z")).0, ms("2026-12-04T00:00:00Z"));
    }

    #[test]
    fn allowed_is_used_plus_requested_within_the_limit() {
        let q = Quotas::parse(FILE, Path::new("q.toml")).unwrap();
        let acme = q.find("acme", "storage.standard", "GB");
        let d = |s: &str| Decimal::from_str(s).unwrap();
        let at_limit = check(acme, d("10.0"), d("0.5"), None, String::new());
        assert!(at_limit.allowed);
        assert_eq!(at_limit.remaining, Some(d("0.5")));
        let over = check(acme, d("10.0"), d("0.6"), None, String::new());
        assert!(!over.allowed);
        let beyond = check(acme, d("11"), d("0"), None, String::new());
        assert_eq!((beyond.allowed, beyond.remaining), (false, Some(Decimal::ZERO)));
        let none = check(None, d("5"), d("1000000"), None, String::new());
        assert!(none.allowed && none.limit.is_none() && none.remaining.is_none());
        let json = serde_json::to_value(&at_limit).unwrap();
        assert_eq!((json["used"].as_str(), json["limit"].as_str(), json["period"].as_str()), (Some("10.0"), Some("10.5"), Some("day")));
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        for (text, says) in [
            ("[[quota]]\ntenant_id='a'\nproduct_sku='s'\nuse_unit='u'\nlimit='-1'\nperiod='day'\n", "negative"),
            ("[[quota]]\ntenant_id='a'\nproduct_sku='s'\nuse_unit='u'\nlimit='x'\nperiod='day'\n", "limit"),
            ("[[quota]]\ntenant_id='a'\nproduct_sku='s'\nuse_unit='u'\nlimit='1'\nperiod='week'\n", "week"),
            ("[[quota]]\ntenant_id='a'\nproduct_sku='s'\nuse_unit='u'\nlimit='1'\nperiod='day'\n[[quota]]\ntenant_id='a'\nproduct_sku='s'\nuse_unit='u'\nlimit='2'\nperiod='day'\n", "two entries"),
        ] {
            let err = Quotas::parse(text, Path::new("q.toml")).unwrap_err().to_string();
            assert!(err.contains(says), "{err}");
        }
        assert_eq!(requested(&serde_json::value::RawValue::from_string("\"-1\"".into()).unwrap()).unwrap_err(), "requested -1 is negative");
        assert_eq!(requested(&serde_json::value::RawValue::from_string("2.50".into()).unwrap()).unwrap(), Decimal::new(250, 2));
    }
}
