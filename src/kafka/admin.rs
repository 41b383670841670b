//! Topic administration: `pulses run` makes sure its output topics exist, so a fresh
//! cluster works without a separate init step (existing topics are left as they are).

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("kafka admin client: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("creating topic {topic}: {code}")]
    Create { topic: String, code: RDKafkaErrorCode },
    #[error("topic {0} does not exist (or has no partitions)")]
    Missing(String),
    #[error(transparent)]
    Denied(#[from] super::security::Denied),
}

impl super::startup::Retriable for AdminError {
    fn is_retriable(&self) -> bool {
        match self {
            Self::Kafka(e) => super::startup::Retriable::is_retriable(e),
            Self::Create { code, .. } => !super::startup::is_fatal_code(*code),
            // Being created (here or by another replica): it shows up.
            Self::Missing(_) => true,
            Self::Denied(_) => false,
        }
    }
}

/// A topic `pulses run` needs: name, partitions, and topic configs.
pub struct TopicSpec<'a> {
    pub name: &'a str,
    pub partitions: i32,
    pub configs: &'a [(&'a str, &'a str)],
}

/// Partitions of the topics pulses creates when they do not exist yet (`pulses run
/// --default-partitions`; `pulses serve` creates the aggregates topic it reads with it).
pub const DEFAULT_PARTITIONS: i32 = 6;

/// Configs of a changelog topic: compacted, so it holds the latest value per key.
pub const COMPACTED: &[(&str, &str)] = &[("cleanup.policy", "compact")];

/// Creates each topic that does not exist yet.
pub async fn ensure_topics(cfg: &Config, topics: &[TopicSpec<'_>]) -> Result<(), AdminError> {
    let admin: AdminClient<DefaultClientContext> = super::clients::admin(cfg).create()?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            t.configs
                .iter()
                .fold(NewTopic::new(t.name, t.partitions, TopicReplication::Fixed(-1)), |n, (k, v)| n.set(k, v))
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(&new, &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) if super::startup::is_authorization_code(code) => {
                return Err(super::security::Denied::new(cfg, "Create", format!("topic {topic}"), code.to_string()).into())
            }
            Err((topic, code)) => return Err(AdminError::Create { topic, code }),
        }
    }
    let names: Vec<&str> = topics.iter().map(|t| t.name).collect();
    wait_until_visible(cfg, &names, VISIBLE_WITHIN).await
}

/// How long a topic just created (here or by another replica) may take to show up in
/// metadata with its partitions.
const VISIBLE_WITHIN: Duration = Duration::from_secs(30);

/// Waits until every topic of `names` has partitions in the metadata this client sees.
/// Kafka answers CreateTopics before every broker's metadata has the topic, so a
/// replica that lost the race to create it (N replicas started at once) read
/// "does not exist" right after and stopped.
async fn wait_until_visible(cfg: &Config, names: &[&str], within: Duration) -> Result<(), AdminError> {
    let started = std::time::Instant::now();
    let mut missing: Vec<&str> = names.to_vec();
    loop {
        let mut still = Vec::new();
        for name in missing {
            if partition_count(cfg, name).is_err() {
                still.push(name);
            }
        }
        missing = still;
        match missing.first() {
            None => return Ok(()),
            Some(name) if started.elapsed() >= within => return Err(AdminError::Missing((*name).to_owned())),
            Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The number of partitions of an existing `topic`.
pub fn partition_count(cfg: &Config, topic: &str) -> Result<i32, AdminError> {
    partition_ids(cfg, topic).map(|ids| ids.len() as i32)
}

/// The partitions of an existing `topic`; [`AdminError::Denied`] when the principal
/// may not see it, which the broker answers differently from a missing topic.
pub fn partition_ids(cfg: &Config, topic: &str) -> Result<Vec<i32>, AdminError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = super::clients::admin(cfg).create()?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(30))?;
    match md.topics().first() {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(t.partitions().iter().map(|p| p.id()).collect()),
        Some(t) if t.error().map(RDKafkaErrorCode::from).is_some_and(super::startup::is_authorization_code) => {
            Err(super::security::Denied::new(cfg, "Describe", format!("topic {topic}"), "Broker: Topic authorization failed").into())
        }
        _ => Err(AdminError::Missing(topic.to_owned())),
    }
}
