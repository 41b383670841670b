//! Consumer lag per partition from librdkafka's statistics (`consumer_lag`: the
//! partition's end minus the committed offset), so no extra broker round trips.

use rdkafka::config::ClientConfig;
use rdkafka::Statistics;

use super::metrics::Metrics;

/// How often librdkafka reports statistics to the stage consumers.
pub const STATISTICS_INTERVAL_MS: &str = "5000";

/// Turns statistics on for a stage consumer whose context calls [`record`].
pub fn with_statistics(mut c: ClientConfig) -> ClientConfig {
    c.set("statistics.interval.ms", STATISTICS_INTERVAL_MS);
    c
}

/// Stores the lag of every partition `stage` currently consumes.
pub fn record(metrics: &Metrics, stage: &str, statistics: &Statistics) {
    let lags = statistics.topics.iter().flat_map(|(topic, t)| {
        t.partitions
            .values()
            // -1 is librdkafka's internal "unassigned" partition; `desired` = assigned.
            .filter(|p| p.partition >= 0 && p.desired)
            .map(move |p| (topic.clone(), p.partition, p.consumer_lag))
    });
    metrics.ops.set_lag(stage, lags);
}
