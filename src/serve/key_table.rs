//! Where API keys live: the compacted topic `<application-id>.api-keys` (record key:
//! the key id; value: the [`ApiKey`] as JSON). `pulses keys` writes it; every `pulses
//! serve` replica reads it from its start and then follows it, so a key created or
//! revoked anywhere is known everywhere within a poll (well inside SPEC §8's 5 s).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};

use super::keys::ApiKey;
use crate::config::Config;
use crate::kafka::admin::{ensure_topics, TopicSpec, COMPACTED};
use crate::kafka::clients::{self, QuietEof};

#[derive(Debug, thiserror::Error)]
pub enum KeyTableError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("creating the API key topic {topic}: {source}")]
    Create { topic: String, source: crate::kafka::admin::AdminError },
    #[error("the API key topic {topic}: {detail}")]
    Topic { topic: String, detail: String },
    #[error("the API key topic {topic} was not read to its end within {secs} s")]
    Timeout { topic: String, secs: u64 },
    #[error("writing key {id} to {topic}: {detail}")]
    Write { id: String, topic: String, detail: String },
}

impl crate::kafka::startup::Retriable for KeyTableError {
    /// A broker not up yet, or a key topic just created and not yet in the metadata.
    fn is_retriable(&self) -> bool {
        match self {
            Self::Kafka(e) => e.is_retriable(),
            Self::Create { source, .. } => source.is_retriable(),
            Self::Topic { .. } | Self::Timeout { .. } => true,
            Self::Write { .. } => false,
        }
    }
}

/// The topic holding the keys of `cfg`'s application.
pub fn topic(cfg: &Config) -> String {
    cfg.api_keys_topic()
}

/// Creates the key topic (one partition, compacted) if it does not exist.
pub async fn ensure_topic(cfg: &Config) -> Result<String, KeyTableError> {
    let name = topic(cfg);
    ensure_topics(cfg, &[TopicSpec { name: &name, partitions: 1, configs: COMPACTED }])
        .await
        .map_err(|source| KeyTableError::Create { topic: name.clone(), source })?;
    Ok(name)
}

/// Writes `key` (a new key, or one now revoked) and waits for the broker to take it.
pub async fn publish(cfg: &Config, key: &ApiKey) -> Result<(), KeyTableError> {
    let topic = ensure_topic(cfg).await?;
    let producer: FutureProducer = clients::producer_config(cfg).create()?;
    let value = serde_json::to_vec(key).map_err(|e| KeyTableError::Write { id: key.id.clone(), topic: topic.clone(), detail: e.to_string() })?;
    producer
        .send(FutureRecord::to(&topic).key(&key.id).payload(&value), Duration::from_secs(30))
        .await
        .map_err(|(e, _)| KeyTableError::Write { id: key.id.clone(), topic: topic.clone(), detail: e.to_string() })?;
    Ok(())
}

/// Every key in the topic, read to its end (`pulses keys list` and `revoke`).
pub fn read_all(cfg: &Config, within: Duration) -> Result<HashMap<String, ApiKey>, KeyTableError> {
    let table = KeyTable::default();
    let mut follower = Follower::open(cfg, &topic(cfg))?;
    let started = Instant::now();
    while !follower.caught_up() {
        if started.elapsed() > within {
            return Err(KeyTableError::Timeout { topic: topic(cfg), secs: within.as_secs() });
        }
        follower.poll(&table, Duration::from_millis(200));
    }
    Ok(table.keys.read().map(|k| k.clone()).unwrap_or_default())
}

/// The keys a serve replica knows, kept current by [`follow`].
#[derive(Debug, Default)]
pub struct KeyTable {
    keys: RwLock<HashMap<String, ApiKey>>,
    caught_up: AtomicBool,
}

impl KeyTable {
    pub fn get(&self, id: &str) -> Option<ApiKey> {
        self.keys.read().ok()?.get(id).cloned()
    }

    /// Whether the table has read the topic to the end it had when following began.
    pub fn caught_up(&self) -> bool {
        self.caught_up.load(Ordering::Acquire)
    }

    fn apply(&self, id: &str, value: Option<&[u8]>) {
        let Ok(mut keys) = self.keys.write() else { return };
        match value.map(serde_json::from_slice::<ApiKey>) {
            // A tombstone (compaction may leave none, pulses writes none) forgets the key.
            None => {
                keys.remove(id);
            }
            Some(Ok(key)) if key.id == id => {
                keys.insert(key.id.clone(), key);
            }
            Some(Ok(key)) => tracing::warn!(record_key = id, key_id = key.id, "API key record under another id; ignored"),
            Some(Err(e)) => tracing::warn!(record_key = id, "API key record is not a key ({e}); ignored"),
        }
    }
}

/// Reads the key topic into `table` until `stop`, on a thread of its own.
pub fn follow(cfg: &Config, table: Arc<KeyTable>, stop: Arc<AtomicBool>) -> Result<std::thread::JoinHandle<()>, KeyTableError> {
    let mut follower = Follower::open(cfg, &topic(cfg))?;
    std::thread::Builder::new()
        .name("api-keys".into())
        .spawn(move || {
            while !stop.load(Ordering::Acquire) {
                follower.poll(&table, Duration::from_millis(100));
                if follower.caught_up() && !table.caught_up() {
                    tracing::info!(keys = table.keys.read().map(|k| k.len()).unwrap_or(0), "API keys loaded");
                    table.caught_up.store(true, Ordering::Release);
                }
            }
        })
        .map_err(|e| KeyTableError::Topic { topic: topic(cfg), detail: format!("starting the key reader: {e}") })
}

/// A consumer of every partition of the key topic, from its start.
struct Follower {
    consumer: BaseConsumer<QuietEof>,
    partitions: usize,
    at_end: BTreeSet<i32>,
}

impl Follower {
    fn open(cfg: &Config, topic: &str) -> Result<Self, KeyTableError> {
        let consumer: BaseConsumer<QuietEof> =
            clients::reader(cfg, &format!("{}.api-keys-reader", cfg.application_id)).create_with_context(QuietEof { reader: "api-keys" })?;
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(30))?;
        let mut tpl = TopicPartitionList::new();
        for p in metadata.topics().iter().flat_map(|t| t.partitions()) {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
        }
        if tpl.count() == 0 {
            return Err(KeyTableError::Topic { topic: topic.to_owned(), detail: "it has no partitions (does it exist?)".into() });
        }
        consumer.assign(&tpl)?;
        Ok(Self { consumer, partitions: tpl.count(), at_end: BTreeSet::new() })
    }

    fn caught_up(&self) -> bool {
        self.at_end.len() >= self.partitions
    }

    fn poll(&mut self, table: &KeyTable, wait: Duration) {
        match self.consumer.poll(wait) {
            Some(Ok(msg)) => match msg.key().map(std::str::from_utf8) {
                Some(Ok(id)) => table.apply(id, msg.payload()),
                _ => tracing::warn!(offset = msg.offset(), "API key record without a UTF-8 key; ignored"),
            },
            Some(Err(KafkaError::PartitionEOF(p))) => {
                self.at_end.insert(p);
            }
            Some(Err(e)) => tracing::warn!("reading API keys: {e}"),
            None => {}
        }
    }
}
