//! librdkafka client configuration shared by every Kafka-facing command.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseProducer, ProducerContext};

use crate::config::Config;

//
// One builder per kind of client pulses creates (admin, stage consumer, group consumer,
// reader, producer, transactional producer). Each layers pulses' settings and then
// applies the user's `[kafka]` table once, last, so the table wins; callers never set
// keys on a built config. Keys pulses' guarantees depend on cannot be in the table
// (`Config::check` refuses them, see [`crate::config::RESERVED_KAFKA_KEYS`]).

/// An admin client, or a consumer used only for metadata: bootstrap servers and client id.
pub fn admin(cfg: &Config) -> ClientConfig {
    with_user_overrides(defaults(cfg), cfg)
}

/// Bootstrap servers, client id and `[kafka_security]`, without the user's table.
fn defaults(cfg: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.bootstrap_servers);
    c.set("client.id", &cfg.application_id);
    for (k, v) in cfg.kafka_security.librdkafka_properties() {
        c.set(k, v);
    }
    c
}

/// Applies the user's `[kafka]` table last, so it wins over pulses' own settings.
fn with_user_overrides(mut c: ClientConfig, cfg: &Config) -> ClientConfig {
    for (k, v) in &cfg.kafka {
        c.set(k, v);
    }
    c
}

/// Settings of every consumer that reads records: a prefetch queue that is refilled as
/// soon as it runs low, and only committed records. librdkafka postpones the next fetch
/// of a partition by `fetch.queue.backoff.ms` (default 1 s) once its queue has passed
/// the prefetch thresholds, so a stage working off a backlog drained its queue and then
/// waited out the rest of that second: stage 1 sat in poll 75% of the time, and a 1M
/// exactly_once burst ran at 70,000-77,000 pulses/s instead of 106,000.
fn record_reader_defaults(cfg: &Config, group_id: &str) -> ClientConfig {
    let mut c = defaults(cfg);
    c.set("fetch.queue.backoff.ms", "10")
        .set("group.id", group_id)
        // Offsets move only when pulses commits them, after the outputs of the records
        // are durably written (auto-commit could lose pulses).
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Producers may write transactionally; only committed input counts.
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest");
    c
}

/// A member of consumer group `group_id` (`pulses rate`).
pub fn group_consumer(cfg: &Config, group_id: &str) -> ClientConfig {
    with_user_overrides(group_consumer_defaults(cfg, group_id), cfg)
}

fn group_consumer_defaults(cfg: &Config, group_id: &str) -> ClientConfig {
    let mut c = record_reader_defaults(cfg, group_id);
    c.set("session.timeout.ms", "30000");
    c
}

/// How often librdkafka reports statistics to the stage consumers (consumer lag,
/// [`crate::ops::lag`]).
pub const STATISTICS_INTERVAL_MS: &str = "5000";

/// A stage's consumer: a [`group_consumer`] that also reports statistics.
pub fn stage_consumer(cfg: &Config, group_id: &str) -> ClientConfig {
    let mut c = group_consumer_defaults(cfg, group_id);
    c.set("statistics.interval.ms", STATISTICS_INTERVAL_MS);
    with_user_overrides(c, cfg)
}

/// A consumer that assigns itself partitions and reads them to their end (changelog
/// restore, replay, rating catch-up, bench readers): it never joins `group_id`
/// (librdkafka wants one named) and commits nothing; the end of each partition is
/// reported as an event ([`QuietEof`] keeps it out of the warnings).
pub fn reader(cfg: &Config, group_id: &str) -> ClientConfig {
    let mut c = record_reader_defaults(cfg, group_id);
    c.set("enable.partition.eof", "true");
    with_user_overrides(c, cfg)
}

/// A [`reader`] whose fetches return within 50 ms when there is nothing new
/// (librdkafka parks a fetch up to `fetch.wait.max.ms`, 500 ms): what a reader waiting
/// on a transaction's records, or on the end of a partition that ends in a transaction
/// marker, would otherwise pay each time (serve's views, billing's questions).
pub fn prompt_reader(cfg: &Config, group_id: &str) -> ClientConfig {
    let mut c = record_reader_defaults(cfg, group_id);
    c.set("enable.partition.eof", "true").set("fetch.wait.max.ms", "50");
    with_user_overrides(c, cfg)
}

/// A consumer that only looks at consumer group `group_id` from outside: its committed
/// offsets, and the ends of the partitions it reads as its read_committed members see
/// them. It never subscribes, so it never joins the group.
pub fn observer(cfg: &Config, group_id: &str) -> ClientConfig {
    with_user_overrides(record_reader_defaults(cfg, group_id), cfg)
}

/// An idempotent producer (no duplicates from internal retries) partitioning keys like
/// the Java client (murmur2), so Kafka Streams or Flink readers co-partition with us.
pub fn producer_config(cfg: &Config) -> ClientConfig {
    with_user_overrides(producer_defaults(cfg), cfg)
}

fn producer_defaults(cfg: &Config) -> ClientConfig {
    let mut c = defaults(cfg);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000");
    c
}

/// A transactional producer's settings (see [`transactional_producer`]). The
/// transaction timeout is Kafka Streams' under exactly-once (10 s): a replica that
/// died with a transaction open holds back read_committed readers of its output
/// partitions until the broker aborts it, unless it comes back first (its restart
/// fences its old id at once). Transactions commit every `commit_interval` (100 ms),
/// far inside it.
fn transactional_config(cfg: &Config, transactional_id: &str) -> ClientConfig {
    let mut c = producer_defaults(cfg);
    c.set("transactional.id", transactional_id).set("transaction.timeout.ms", "10000");
    with_user_overrides(c, cfg)
}

pub use super::reports::flush;

/// Counts failed deliveries so a batch is never committed past a lost record, and
/// remembers where the records of one topic (stage 2's changelog) landed, so a store
/// can record the changelog offset it reflects.
#[derive(Default, Clone)]
pub struct DeliveryTracker {
    failed: Arc<AtomicU64>,
    last_error: Arc<std::sync::Mutex<Option<String>>>,
    tracked_topic: Option<Arc<str>>,
    /// partition of `tracked_topic` → offset after the last delivered record.
    next_offsets: Arc<std::sync::Mutex<std::collections::HashMap<i32, i64>>>,
}

impl DeliveryTracker {
    /// A tracker that also records delivered offsets of `topic`.
    pub fn tracking(topic: &str) -> Self {
        Self { tracked_topic: Some(topic.into()), ..Self::default() }
    }

    /// Raises the known end of the tracked topic's `partition` to at least `next`.
    pub fn advance_to(&self, partition: i32, next: i64) {
        if let Ok(mut m) = self.next_offsets.lock() {
            let e = m.entry(partition).or_insert(next);
            *e = (*e).max(next);
        }
    }

    /// The offset after the last delivered record of the tracked topic's `partition`.
    pub fn next_offset(&self, partition: i32) -> Option<i64> {
        self.next_offsets.lock().ok().and_then(|m| m.get(&partition).copied())
    }

    /// Where each partition of the tracked topic ends, as far as delivered.
    pub fn next_offsets(&self) -> std::collections::HashMap<i32, i64> {
        self.next_offsets.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Failed deliveries since start.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Acquire)
    }

    /// The most recent delivery error, for the log line that explains a failure.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|g| g.clone())
    }
}

impl ClientContext for DeliveryTracker {}

/// Context of a consumer that reads assigned partitions to their end (changelog
/// restore, replay, rating catch-up): the end of a partition is what it waits for, so
/// librdkafka reporting it as a client error is logged at trace level, not as a
/// problem. Other client errors are warnings naming `reader`.
pub struct QuietEof {
    pub reader: &'static str,
}

impl ClientContext for QuietEof {
    fn error(&self, error: KafkaError, reason: &str) {
        match error {
            KafkaError::PartitionEOF(_) | KafkaError::Global(rdkafka::types::RDKafkaErrorCode::PartitionEOF) => {
                tracing::trace!(reader = self.reader, "end of partition: {reason}")
            }
            other => tracing::warn!("{} consumer: {other}: {reason}", self.reader),
        }
    }
}

impl rdkafka::consumer::ConsumerContext for QuietEof {}

impl ProducerContext for DeliveryTracker {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: Self::DeliveryOpaque) {
        use rdkafka::Message;
        if let (Ok(msg), Some(topic)) = (result, &self.tracked_topic) {
            if msg.topic() == &**topic {
                self.advance_to(msg.partition(), msg.offset() + 1);
            }
        }
        if let Err((err, msg)) = result {
            self.failed.fetch_add(1, Ordering::AcqRel);
            let text = format!("delivery to {} failed: {err}", msg.topic());
            tracing::error!("{text}");
            if let Ok(mut g) = self.last_error.lock() {
                *g = Some(text);
            }
        }
    }
}

/// A producer whose delivery reports a thread of its own serves as they arrive.
pub type TrackedProducer = super::reports::ReportedProducer<DeliveryTracker>;

pub fn tracked_producer(cfg: &Config, tracker: DeliveryTracker) -> Result<TrackedProducer, KafkaError> {
    producer_config(cfg).create_with_context(tracker)
}

/// A transactional producer owning `transactional_id` (see [`crate::runtime::record_collector`]).
pub fn transactional_producer(
    cfg: &Config,
    transactional_id: &str,
    tracker: DeliveryTracker,
) -> Result<TrackedProducer, KafkaError> {
    transactional_config(cfg, transactional_id).create_with_context(tracker)
}

/// Enqueues a record, waiting while librdkafka's local queue is full instead of
/// failing: back-pressure, not loss.
pub fn send_with_backpressure<'a, K, P, C>(
    producer: &BaseProducer<C>,
    mut record: rdkafka::producer::BaseRecord<'a, K, P, ()>,
) -> Result<(), KafkaError>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
    C: ProducerContext<DeliveryOpaque = ()> + 'static,
{
    use rdkafka::types::RDKafkaErrorCode::QueueFull;
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(QueueFull), back)) => {
                record = back;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RESERVED_KAFKA_KEYS;

    /// Every client pulses creates, by kind.
    fn every_builder(cfg: &Config) -> Vec<(&'static str, ClientConfig)> {
        vec![
            ("admin", admin(cfg)),
            ("group consumer", group_consumer(cfg, "g")),
            ("stage consumer", stage_consumer(cfg, "g")),
            ("reader", reader(cfg, "g.restore")),
            ("producer", producer_config(cfg)),
            ("transactional producer", transactional_config(cfg, "t-1")),
        ]
    }

    /// In every builder, each key pulses sets is overridden by the user's `[kafka]`
    /// table (applied once, last), except the reserved keys the table may not hold.
    #[test]
    fn the_users_kafka_table_wins_over_every_builders_settings() {
        let plain = Config::default();
        let mut keys = std::collections::BTreeSet::new();
        for (_, c) in every_builder(&plain) {
            keys.extend(c.config_map().keys().cloned());
        }
        let mut cfg = Config::default();
        for k in &keys {
            if !RESERVED_KAFKA_KEYS.iter().any(|(r, _)| r == k) {
                cfg.kafka.insert(k.clone(), format!("user-{k}"));
            }
        }
        cfg.kafka.insert("security.protocol".into(), "SASL_SSL".into());
        for ((kind, theirs), (_, ours)) in every_builder(&cfg).into_iter().zip(every_builder(&plain)) {
            for (k, v) in ours.config_map() {
                let want = cfg.kafka.get(k).unwrap_or(v);
                assert_eq!(theirs.get(k), Some(want.as_str()), "{kind}: {k}");
            }
            assert_eq!(theirs.get("security.protocol"), Some("SASL_SSL"), "{kind}: the table reaches every client");
        }
        // The settings the guarantees rest on, where they belong.
        let [admin, group, stage, reader, producer, txn] = every_builder(&cfg).try_into().map_err(|_| ()).unwrap();
        for (kind, c) in [&group, &stage, &reader] {
            assert_eq!((c.get("isolation.level"), c.get("enable.auto.commit")), (Some("read_committed"), Some("false")), "{kind}");
        }
        assert_eq!(stage.1.get("statistics.interval.ms"), Some("user-statistics.interval.ms"));
        assert_eq!(reader.1.get("enable.partition.eof"), Some("true"));
        assert_eq!((group.1.get("enable.partition.eof"), admin.1.get("group.id")), (None, None));
        for (kind, c) in [&producer, &txn] {
            assert_eq!((c.get("enable.idempotence"), c.get("acks")), (Some("true"), Some("all")), "{kind}");
        }
        assert_eq!(txn.1.get("transactional.id"), Some("t-1"));
    }
}
