//! Configuration: built-in defaults, overlaid by a TOML file (`topology/pulses.toml`),
//! then by `PULSES_*` environment variables and command-line flags (see [`crate::cli`]).
//! Every field has a default so an empty file is a valid configuration.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use crate::pulse::time::{duration, parse_duration};
use crate::window::{WindowSettings, WindowSpec};

mod registry;
mod security;
pub use registry::{OutputFormat, SchemaRegistryConfig};
pub use security::{is_secret_property, KafkaSecurity, SaslMechanism, Secret, SecurityProtocol};

/// Errors reading or checking the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The cause is in the message and not a `source`: an error chain would print it twice.
    #[error("cannot read config file {path}: {cause}")]
    Read { path: PathBuf, cause: std::io::Error },
    #[error("config file {path} is not valid: {cause}")]
    Parse { path: PathBuf, cause: toml::de::Error },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The whole configuration of a pulses process.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Kafka bootstrap servers, `host:port[,host:port]`.
    pub bootstrap_servers: String,
    /// Prefix of consumer-group ids, transactional ids and internal topics.
    pub application_id: String,
    /// Consumer-group id prefix; defaults to `application_id`.
    pub group_id: Option<String>,
    /// Where RocksDB state and checkpoints live.
    pub state_dir: PathBuf,
    /// Listen address of the HTTP endpoint (metrics, health).
    pub http_addr: String,
    /// How long a command waits at start for a broker that is not reachable yet or
    /// still loading its coordinators, retrying with backoff, before it gives up.
    #[serde(deserialize_with = "duration")]
    pub startup_timeout: Duration,
    /// `exactly_once` (default): outputs, state changes and consumed offsets commit in
    /// one Kafka transaction. `at_least_once`: a crash may re-emit records (see README).
    pub processing_guarantee: Guarantee,
    /// How often each stage-2 task snapshots its RocksDB store into `checkpoint_dir`.
    #[serde(deserialize_with = "duration")]
    pub checkpoint_interval: Duration,
    /// Where checkpoints (RocksDB snapshots + changelog offsets) go; defaults to
    /// `<state_dir>/checkpoints`. A separate volume here survives losing `state_dir`.
    pub checkpoint_dir: Option<PathBuf>,
    pub topics: Topics,
    /// How every Kafka client authenticates and encrypts (TLS, SASL, mutual TLS).
    pub kafka_security: KafkaSecurity,
    /// Extra librdkafka properties applied to every client, last (they win).
    pub kafka: KafkaProperties,
    /// What every stage's loop shares: when it commits.
    pub stage: StageSettings,
    pub group: GroupStage,
    pub aggregate: AggregateStage,
    /// Tumbling windows computed at once (SPEC §4).
    pub windows: Vec<WindowSpec>,
    /// Value format of the grouped and aggregated topics: `json` (default) or `avro`.
    pub output_format: OutputFormat,
    /// Confluent Schema Registry for Avro input and output (SPEC §6).
    pub schema_registry: SchemaRegistryConfig,
    /// `pulses serve` (SPEC §8).
    pub serve: ServeSettings,
    /// Meters over CloudEvents (`[[meters]]`, SPEC §10): read by `run` (stage 1 meters
    /// the events), `replay` (re-meters history) and `serve` (answers queries).
    pub meters: crate::meter::Meters,
}

/// `pulses serve` settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServeSettings {
    /// Listen address (`--http-addr` wins).
    pub http_addr: String,
    /// How long a request waits for the broker to acknowledge its pulses before it is
    /// answered 503 (also the producer's `message.timeout.ms`).
    #[serde(deserialize_with = "duration")]
    pub ack_timeout: Duration,
    /// Requests answered at once; beyond it, 429.
    pub max_in_flight_requests: usize,
    /// Request body bytes held at once; beyond it, 429 (a body without Content-Length
    /// counts as the largest allowed, 5 MiB).
    pub max_in_flight_bytes: usize,
    /// The quota file (`--quotas` wins); none: no quotas, every check is allowed.
    pub quotas: Option<PathBuf>,
}

impl ServeSettings {
    /// Largest request body (SPEC §8).
    pub const MAX_BODY_BYTES: usize = 5 * 1024 * 1024;
}

impl Default for ServeSettings {
    fn default() -> Self {
        Self {
            http_addr: "127.0.0.1:8080".into(),
            ack_timeout: Duration::from_secs(10),
            max_in_flight_requests: 256,
            max_in_flight_bytes: 256 * 1024 * 1024,
            quotas: None,
        }
    }
}

/// What a crash or rebalance may do to the outputs (SPEC §4).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Guarantee {
    /// Consume, state change and produce commit atomically (Kafka transactions).
    #[default]
    ExactlyOnce,
    /// Outputs are flushed before offsets are committed: nothing is lost, but records
    /// handled after the last commit are processed again after a crash.
    AtLeastOnce,
}

impl Guarantee {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ExactlyOnce => "exactly_once",
            Self::AtLeastOnce => "at_least_once",
        }
    }
}

impl std::str::FromStr for Guarantee {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "exactly_once" => Ok(Self::ExactlyOnce),
            "at_least_once" => Ok(Self::AtLeastOnce),
            other => Err(format!("{other:?} is not a processing guarantee; use exactly_once or at_least_once")),
        }
    }
}

/// Stage 2 (windowed aggregation) settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AggregateStage {
    /// How long after a window's end it waits for out-of-order pulses before closing.
    #[serde(deserialize_with = "duration")]
    pub grace: Duration,
    /// How long after a window's end late pulses still correct it (revision + 1).
    #[serde(deserialize_with = "duration")]
    pub retention: Duration,
    /// Wall-clock time without input after which a partition's watermark advances.
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// How long a pulse_id is remembered for de-duplication (stream time).
    #[serde(deserialize_with = "duration")]
    pub dedupe_horizon: Duration,
    /// Least time between two interim records of a window with `emit = "updates"`.
    #[serde(deserialize_with = "duration")]
    pub update_interval: Duration,
    /// Most records one poll hands over.
    pub max_batch: usize,
    #[serde(deserialize_with = "duration")]
    pub max_batch_wait: Duration,
    /// RocksDB memory (block cache + memtables) shared by all partition stores, MiB.
    pub state_memory_mib: usize,
    /// Open windows kept in memory, shared by all partitions (about 300 bytes each);
    /// the others live only in the state store.
    pub open_window_cache: usize,
}

impl Default for AggregateStage {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(5),
            retention: Duration::from_secs(3600),
            idle_timeout: Duration::from_secs(30),
            dedupe_horizon: Duration::from_secs(86_400),
            update_interval: Duration::from_secs(1),
            max_batch: 20_000,
            max_batch_wait: Duration::from_millis(100),
            state_memory_mib: 128,
            open_window_cache: crate::window::operator::DEFAULT_CACHE_WINDOWS,
        }
    }
}

/// Topic names (SPEC §2).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Topics {
    pub source: String,
    pub grouped: String,
    pub aggregated: String,
    pub dlq: String,
    pub late: String,
    /// `pulses rate`: charges and threshold alerts.
    pub charges: String,
    pub alerts: String,
    /// `pulses invoice` and `POST /v1/invoices`: invoices and adjustments (compacted).
    pub invoices: String,
    /// `pulses replay`: where re-computed aggregates go.
    pub replay: String,
}

/// Settings of every stage thread's loop (`[stage]`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StageSettings {
    /// How often a stage commits its work (under exactly_once: one transaction of the
    /// thread's producer, with the offsets of all its tasks), like Kafka Streams'
    /// `commit.interval.ms`. Rebalances and shutdown commit too.
    #[serde(deserialize_with = "duration")]
    pub commit_interval: Duration,
    /// Most input records one commit carries: reached first, it commits early.
    pub commit_max_records: usize,
}

impl Default for StageSettings {
    fn default() -> Self {
        Self { commit_interval: Duration::from_millis(100), commit_max_records: 50_000 }
    }
}

/// Stage 1 (grouping) tuning.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GroupStage {
    /// Most records one poll hands over.
    pub max_batch: usize,
    /// Longest a poll waits for more records.
    #[serde(deserialize_with = "duration")]
    pub max_batch_wait: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            bootstrap_servers: "127.0.0.1:9092".into(),
            application_id: "pulses".into(),
            group_id: None,
            state_dir: PathBuf::from("state"),
            http_addr: "127.0.0.1:9464".into(),
            startup_timeout: Duration::from_secs(300),
            processing_guarantee: Guarantee::ExactlyOnce,
            checkpoint_interval: Duration::from_secs(60),
            checkpoint_dir: None,
            topics: Topics::default(),
            kafka_security: KafkaSecurity::default(),
            kafka: KafkaProperties::default(),
            stage: StageSettings::default(),
            group: GroupStage::default(),
            aggregate: AggregateStage::default(),
            windows: WindowSpec::defaults(),
            output_format: OutputFormat::Json,
            schema_registry: SchemaRegistryConfig::default(),
            serve: ServeSettings::default(),
            meters: Default::default(),
        }
    }
}

impl Default for Topics {
    fn default() -> Self {
        Self {
            source: "source.pulses".into(),
            grouped: "tenant.grouped.pulses".into(),
            aggregated: "tenant.aggregated.pulses.amount".into(),
            dlq: "source.pulses.dlq".into(),
            late: "tenant.late.pulses".into(),
            charges: "tenant.rated.charges".into(),
            alerts: "tenant.usage.alerts".into(),
            invoices: "tenant.invoices".into(),
            replay: "tenant.aggregated.pulses.amount.replay".into(),
        }
    }
}

impl Default for GroupStage {
    fn default() -> Self {
        Self { max_batch: 20_000, max_batch_wait: Duration::from_millis(100) }
    }
}

impl Config {
    /// Reads a TOML file over the defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|cause| ConfigError::Read { path: path.to_owned(), cause })?;
        Self::from_toml(&text).map_err(|cause| ConfigError::Parse { path: path.to_owned(), cause })
    }

    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// The consumer-group id of stage 1.
    pub fn group_stage_group_id(&self) -> String {
        format!("{}.group", self.group_id.as_deref().unwrap_or(&self.application_id))
    }

    /// The consumer-group id of stage 2.
    pub fn aggregate_stage_group_id(&self) -> String {
        format!("{}.aggregate", self.group_id.as_deref().unwrap_or(&self.application_id))
    }

    /// Stage 2's state changelog: `<application_id>-windows-changelog` (compacted, one
    /// partition per grouped-topic partition).
    pub fn changelog_topic(&self) -> String {
        format!("{}-windows-changelog", self.application_id)
    }

    /// The compacted topic holding `pulses serve`'s API keys: `<application_id>.api-keys`.
    pub fn api_keys_topic(&self) -> String {
        format!("{}.api-keys", self.application_id)
    }

    /// `<invoices topic>.layout`: one record, the invoices topic's partition count when
    /// the first invoice was issued (see `billing`).
    pub fn invoices_layout_topic(&self) -> String {
        format!("{}.layout", self.topics.invoices)
    }

    /// The re-rating jobs' log (one partition, compacted): `<application_id>.rerating-jobs`.
    pub fn rerating_jobs_topic(&self) -> String {
        format!("{}.rerating-jobs", self.application_id)
    }

    /// Where checkpoints go (see [`Config::checkpoint_dir`]).
    pub fn checkpoint_root(&self) -> PathBuf {
        self.checkpoint_dir.clone().unwrap_or_else(|| self.state_dir.join("checkpoints"))
    }

    /// The window operator's settings, in milliseconds.
    pub fn window_settings(&self) -> WindowSettings {
        let a = &self.aggregate;
        let ms = |d: Duration| d.as_millis() as i64;
        WindowSettings {
            windows: self.windows.clone(),
            grace_ms: ms(a.grace),
            retention_ms: ms(a.retention),
            idle_timeout_ms: ms(a.idle_timeout),
            dedupe_horizon_ms: ms(a.dedupe_horizon),
            update_interval_ms: ms(a.update_interval),
        }
    }

    /// Checks what serde cannot: non-empty names, sane sizes.
    pub fn check(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let serve = &self.serve;
        if serve.max_in_flight_requests == 0 {
            return invalid("serve.max_in_flight_requests must be at least 1".into());
        }
        let body = ServeSettings::MAX_BODY_BYTES;
        if !(body..=u32::MAX as usize).contains(&serve.max_in_flight_bytes) {
            return invalid(format!("serve.max_in_flight_bytes must be from {body} (one largest request) to {}", u32::MAX));
        }
        if serve.ack_timeout < Duration::from_millis(100) {
            return invalid("serve.ack_timeout must be at least 100ms".into());
        }
        if self.bootstrap_servers.trim().is_empty() {
            return invalid("bootstrap_servers is empty".into());
        }
        if !valid_kafka_name(&self.application_id) {
            return invalid(format!("application_id {:?} must be 1-200 chars of [A-Za-z0-9._-]", self.application_id));
        }
        let t = &self.topics;
        for (what, name) in [("source", &t.source), ("grouped", &t.grouped), ("aggregated", &t.aggregated), ("dlq", &t.dlq), ("late", &t.late),
            ("charges", &t.charges), ("alerts", &t.alerts), ("invoices", &t.invoices), ("replay", &t.replay)] {
            if !valid_kafka_name(name) {
                return invalid(format!("topics.{what} {name:?} is not a valid topic name"));
            }
        }
        if t.source == t.grouped || t.source == t.dlq || t.grouped == t.dlq {
            return invalid("topics.source, topics.grouped and topics.dlq must differ".into());
        }
        if self.group.max_batch == 0 || self.aggregate.max_batch == 0 {
            return invalid("max_batch must be at least 1".into());
        }
        if self.stage.commit_interval.is_zero() || self.stage.commit_max_records == 0 {
            return invalid("[stage] commit_interval and commit_max_records must be above zero".into());
        }
        if self.windows.is_empty() {
            return invalid("at least one [[windows]] entry is needed".into());
        }
        let mut names = std::collections::HashSet::new();
        for w in &self.windows {
            if !valid_kafka_name(&w.name) || !names.insert(w.name.as_str()) {
                return invalid(format!("window name {:?} must be unique, 1-200 chars of [A-Za-z0-9._-]", w.name));
            }
            if w.size.is_zero() {
                return invalid(format!("window {:?} has size 0", w.name));
            }
        }
        if self.aggregate.retention < self.aggregate.grace {
            return invalid("aggregate.retention must be at least aggregate.grace".into());
        }
        if self.checkpoint_interval.is_zero() {
            return invalid("checkpoint_interval must be more than 0".into());
        }
        if self.aggregate.state_memory_mib < 8 {
            return invalid("aggregate.state_memory_mib must be at least 8".into());
        }
        if self.aggregate.open_window_cache == 0 {
            return invalid("aggregate.open_window_cache must be at least 1".into());
        }
        self.kafka_security.check().map_err(ConfigError::Invalid)?;
        for (key, why) in RESERVED_KAFKA_KEYS {
            if self.kafka.contains_key(*key) {
                return invalid(format!("[kafka] may not set {key:?}: {why}"));
            }
        }
        if !self.meters.is_empty() && self.output_format == OutputFormat::Avro {
            return invalid("[[meters]] need output_format = \"json\": the Avro aggregate schema has no meter fields".into());
        }
        let max_poll = self.kafka.get("max.poll.interval.ms").map(String::as_str);
        self.schema_registry.check(self.output_format, max_poll).map_err(ConfigError::Invalid)?;
        Ok(())
    }
}

/// The `[kafka]` table: librdkafka properties by name. Its `Debug` shows secret ones
/// (passwords, keys, tokens: [`is_secret_property`]) as `***`.
#[derive(Clone, Default, Deserialize, PartialEq)]
#[serde(transparent)]
pub struct KafkaProperties(pub BTreeMap<String, String>);

impl std::ops::Deref for KafkaProperties {
    type Target = BTreeMap<String, String>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KafkaProperties {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl<'a> IntoIterator for &'a KafkaProperties {
    type Item = (&'a String, &'a String);
    type IntoIter = std::collections::btree_map::Iter<'a, String, String>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl std::fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| (k, if is_secret_property(k) { "***" } else { v.as_str() })))
            .finish()
    }
}

/// librdkafka properties the user's `[kafka]` table may not hold, because pulses'
/// guarantees rest on the value each client is given; with why, for the error.
pub const RESERVED_KAFKA_KEYS: &[(&str, &str)] = &[
    ("group.id", "pulses names its consumer groups from application_id and group_id"),
    ("transactional.id", "pulses names one transactional id per stage thread and replica to fence its previous incarnation"),
    ("enable.auto.commit", "offsets move only when the outputs of their records are committed"),
    ("enable.auto.offset.store", "offsets move only when the outputs of their records are committed"),
    ("isolation.level", "only committed records may count (read_committed)"),
    ("auto.offset.reset", "a new consumer group must start at the earliest record, or pulses are skipped"),
    ("enable.idempotence", "producer retries must not duplicate records"),
    ("acks", "a record counts as written only once every in-sync replica has it (acks=all)"),
    ("enable.partition.eof", "readers of a partition to its end depend on the end-of-partition event"),
];

fn valid_kafka_name(s: &str) -> bool {
    (1..=200).contains(&s.len()) && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("1.5s").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn shipped_topology_file_parses_and_checks() {
        let cfg = Config::from_file(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/topology/pulses.toml"))).unwrap();
        cfg.check().unwrap();
        assert_eq!(cfg.topics, Topics::default());
        assert_eq!(cfg.window_settings(), WindowSettings::default());
        // Besides the defaults, the file ships example meters (there are none by default).
        let slugs: Vec<&str> = cfg.meters.all().iter().map(|m| m.slug.as_str()).collect();
        assert_eq!(slugs, ["tokens_total", "active_users"]);
        let without_meters = Config { meters: Default::default(), ..cfg };
        assert_eq!(without_meters, Config::default(), "the shipped file documents the defaults");
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(Config::from_toml("bootstrap = 'x'").is_err());
        assert!(Config::from_toml("[topics]\nsorce = 'x'").is_err());
    }
}

#[cfg(test)]
mod reserved_keys {
    use super::*;

    #[test]
    fn kafka_keys_the_guarantees_rest_on_are_refused_with_why() {
        let cfg = Config::from_toml("[kafka]\n\"enable.auto.commit\" = \"true\"").unwrap();
        let err = cfg.check().unwrap_err().to_string();
        assert!(err.contains("\"enable.auto.commit\"") && err.contains("offsets move only"), "{err}");
        let ok = Config::from_toml("[kafka]\n\"security.protocol\" = \"SASL_SSL\"\n\"linger.ms\" = \"20\"").unwrap();
        assert!(ok.check().is_ok());
    }

    #[test]
    fn secrets_in_either_table_never_show_in_the_printed_configuration() {
        let cfg = Config::from_toml(
            "[kafka_security]\nprotocol = \"sasl_ssl\"\nsasl_mechanism = \"SCRAM-SHA-512\"\nsasl_username = \"pulses\"\n\
             sasl_password = \"pw-in-file\"\n[kafka]\n\"ssl.keystore.password\" = \"pw-in-table\"\n\"linger.ms\" = \"7\"",
        )
        .unwrap();
        cfg.check().unwrap();
        let shown = format!("{cfg:?} {cfg:#?}");
        assert!(!shown.contains("pw-in-file") && !shown.contains("pw-in-table"), "{shown}");
        assert!(shown.contains("\"linger.ms\": \"7\"") && shown.contains("sasl_username: Some(\"pulses\")"), "{shown}");
    }
}
