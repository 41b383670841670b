//! The `[schema_registry]` configuration section and `output_format`.

use std::time::Duration;

use serde::Deserialize;

use super::{duration, Secret};

/// Value format of the records pulses writes to the grouped and aggregated topics.
/// Input is always both: the wire format of each record decides (SPEC §6).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum OutputFormat {
    /// JSON, as in SPEC §3.
    #[default]
    Json,
    /// Avro in Confluent wire format, schemas under `<topic>-value` (TopicNameStrategy).
    Avro,
}

/// How pulses talks to a Confluent Schema Registry.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SchemaRegistryConfig {
    /// Base URL, e.g. `http://schema-registry:8081`. Unset: Avro input goes to the DLQ as
    /// `unknown_schema`, and `output_format` must be `json`.
    pub url: Option<String>,
    /// Register `schemas/*.avsc` under `<topic>-value` at start (else the subject's latest
    /// version must already be registered).
    pub auto_register: bool,
    /// Timeout of one HTTP request to the registry.
    #[serde(deserialize_with = "duration")]
    pub request_timeout: Duration,
    /// First wait after a failed request; doubles up to `retry_max_backoff`.
    #[serde(deserialize_with = "duration")]
    pub retry_initial_backoff: Duration,
    #[serde(deserialize_with = "duration")]
    pub retry_max_backoff: Duration,
    /// How long an outage (transport errors, HTTP 5xx) is retried before a record whose
    /// schema cannot be fetched goes to the DLQ as `registry_unavailable`. Stage 1 blocks
    /// meanwhile, so this must stay below the consumer's `max.poll.interval.ms`.
    #[serde(deserialize_with = "duration")]
    pub retry_max: Duration,
    /// HTTP basic auth (Confluent Cloud: API key and secret), sent only over https://.
    pub basic_auth_username: Option<String>,
    pub basic_auth_password: Option<Secret>,
    /// CA certificates (PEM) an https:// registry's certificate must chain to; unset:
    /// the system's CA store.
    pub ssl_ca_location: Option<std::path::PathBuf>,
}

impl Default for SchemaRegistryConfig {
    fn default() -> Self {
        Self {
            url: None,
            auto_register: true,
            request_timeout: Duration::from_secs(5),
            retry_initial_backoff: Duration::from_millis(100),
            retry_max_backoff: Duration::from_secs(5),
            retry_max: Duration::from_secs(60),
            basic_auth_username: None,
            basic_auth_password: None,
            ssl_ca_location: None,
        }
    }
}

/// librdkafka's default `max.poll.interval.ms`.
const DEFAULT_MAX_POLL_INTERVAL_MS: u64 = 300_000;

impl SchemaRegistryConfig {
    /// Checks what serde cannot. `max_poll_interval_ms` is the consumers' setting, if set.
    pub fn check(&self, output_format: OutputFormat, max_poll_interval_ms: Option<&str>) -> Result<(), String> {
        match self.url.as_deref() {
            None if output_format == OutputFormat::Avro => {
                return Err("output_format = \"avro\" needs [schema_registry] url".into())
            }
            Some(url) if !url.starts_with("http://") && !url.starts_with("https://") => {
                return Err(format!("schema_registry.url {url:?} must start with http:// or https://"))
            }
            Some(url) if url.split("://").nth(1).is_some_and(|rest| rest.split('/').next().unwrap_or("").contains('@')) => {
                return Err("schema_registry.url must not hold credentials (they would be logged): use \
                     schema_registry.basic_auth_username and basic_auth_password"
                    .into())
            }
            Some(url) if url.starts_with("http://") && self.basic_auth_password.is_some() => {
                return Err(format!(
                    "schema_registry.basic_auth_password would travel in clear text to {url:?}: use an https:// URL"
                ))
            }
            _ => {}
        }
        if self.basic_auth_username.is_some() != self.basic_auth_password.is_some() {
            return Err("schema_registry.basic_auth_username and basic_auth_password go together".into());
        }
        if self.retry_initial_backoff.is_zero() || self.retry_max_backoff < self.retry_initial_backoff {
            return Err("schema_registry.retry_initial_backoff must be > 0 and <= retry_max_backoff".into());
        }
        if self.request_timeout.is_zero() {
            return Err("schema_registry.request_timeout must be more than 0".into());
        }
        let poll_ms = match max_poll_interval_ms {
            Some(v) => v.parse::<u64>().map_err(|_| format!("kafka max.poll.interval.ms {v:?} is not a number"))?,
            None => DEFAULT_MAX_POLL_INTERVAL_MS,
        };
        let worst = self.retry_max + self.retry_max_backoff + self.request_timeout;
        if worst.as_millis() >= u128::from(poll_ms) {
            return Err(format!(
                "schema_registry.retry_max + retry_max_backoff + request_timeout ({} ms) must stay below the consumer's \
                 max.poll.interval.ms ({poll_ms} ms): stage 1 waits for the registry without polling",
                worst.as_millis()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks() {
        let none = SchemaRegistryConfig::default();
        assert!(none.check(OutputFormat::Json, None).is_ok());
        assert!(none.check(OutputFormat::Avro, None).unwrap_err().contains("needs [schema_registry] url"));
        let url = SchemaRegistryConfig { url: Some("http://sr:8081".into()), ..none.clone() };
        assert!(url.check(OutputFormat::Avro, None).is_ok());
        let tls = SchemaRegistryConfig { url: Some("https://sr:8081".into()), ..none.clone() };
        assert!(tls.check(OutputFormat::Avro, None).is_ok());
        let ftp = SchemaRegistryConfig { url: Some("ftp://sr".into()), ..none.clone() };
        assert!(ftp.check(OutputFormat::Json, None).unwrap_err().contains("https://"));
        let inline = SchemaRegistryConfig { url: Some("https://key:secret@sr:8081".into()), ..none.clone() };
        let err = inline.check(OutputFormat::Json, None).unwrap_err();
        assert!(err.contains("must not hold credentials") && !err.contains("secret"), "{err}");
        let auth = |url: &str| SchemaRegistryConfig {
            url: Some(url.into()),
            basic_auth_username: Some("key".into()),
            basic_auth_password: Some(Secret::literal("pw")),
            ..none.clone()
        };
        assert!(auth("https://sr").check(OutputFormat::Json, None).is_ok());
        assert!(auth("http://sr").check(OutputFormat::Json, None).unwrap_err().contains("clear text"));
        let half = SchemaRegistryConfig { basic_auth_password: None, ..auth("https://sr") };
        assert!(half.check(OutputFormat::Json, None).unwrap_err().contains("go together"));
        // 60 s + 5 s + 5 s of waiting must fit in max.poll.interval.ms.
        assert!(url.check(OutputFormat::Json, Some("70001")).is_ok());
        assert!(url.check(OutputFormat::Json, Some("70000")).unwrap_err().contains("max.poll.interval.ms"));
        assert!(url.check(OutputFormat::Json, Some("soon")).is_err());
        let zero = SchemaRegistryConfig { retry_initial_backoff: Duration::ZERO, ..url };
        assert!(zero.check(OutputFormat::Json, None).is_err());
    }
}
