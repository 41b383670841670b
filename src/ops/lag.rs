//! Consumer lag per partition from librdkafka's statistics, so no extra broker round
//! trips: the records a stage still has to read (see [`partition_lag`]).

use rdkafka::Statistics;

use super::metrics::Metrics;

/// Stores the lag of every partition `stage` currently consumes.
pub fn record(metrics: &Metrics, stage: &str, statistics: &Statistics) {
    let lags = statistics.topics.iter().flat_map(|(topic, t)| {
        t.partitions
            .values()
            // -1 is librdkafka's internal "unassigned" partition; `desired` = assigned.
            .filter(|p| p.partition >= 0 && p.desired)
            .map(move |p| {
                let lag = partition_lag(PartitionOffsets {
                    last_stable: p.ls_offset,
                    low: p.lo_offset,
                    consumed: p.app_offset,
                    committed: p.committed_offset,
                    librdkafka_lag: p.consumer_lag,
                });
                (topic.clone(), p.partition, lag)
            })
    });
    metrics.ops.set_lag(stage, lags);
}

/// What librdkafka's statistics say of one assigned partition (negative: unknown).
#[derive(Debug, Clone, Copy)]
pub struct PartitionOffsets {
    /// The end a `read_committed` reader sees (the stages read that way).
    pub last_stable: i64,
    /// The first offset still in the log.
    pub low: i64,
    /// The offset after the last record handed to the stage.
    pub consumed: i64,
    /// The committed offset, as far as this consumer knows.
    pub committed: i64,
    /// librdkafka's own `consumer_lag`: end minus committed offset.
    pub librdkafka_lag: i64,
}

/// Records the stage still has to read: the last stable offset minus how far the stage
/// got (what it consumed or, before that, what was committed); 0 for an empty
/// partition; -1 when unknown. librdkafka's `consumer_lag` alone stays -1 under
/// exactly_once, the default: offsets commit through the transaction, and the consumer
/// never learns them.
pub fn partition_lag(p: PartitionOffsets) -> i64 {
    if p.last_stable < 0 {
        return p.librdkafka_lag;
    }
    let position = p.consumed.max(p.committed);
    if position >= 0 {
        (p.last_stable - position).max(0)
    } else if p.low >= 0 && p.last_stable <= p.low {
        0
    } else {
        p.librdkafka_lag
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNKNOWN: i64 = -1001; // librdkafka's RD_KAFKA_OFFSET_INVALID

    fn offsets(last_stable: i64, low: i64, consumed: i64, committed: i64, librdkafka_lag: i64) -> PartitionOffsets {
        PartitionOffsets { last_stable, low, consumed, committed, librdkafka_lag }
    }

    #[test]
    fn lag_is_known_under_exactly_once_where_librdkafka_says_unknown() {
        // Transactional commits: librdkafka knows no committed offset, but what was read.
        assert_eq!(partition_lag(offsets(1_000, 0, 400, UNKNOWN, -1)), 600);
        assert_eq!(partition_lag(offsets(1_000, 0, 1_000, UNKNOWN, -1)), 0);
        // An empty partition has nothing to read, whatever else is unknown.
        assert_eq!(partition_lag(offsets(0, 0, UNKNOWN, UNKNOWN, -1)), 0);
        assert_eq!(partition_lag(offsets(50, 50, UNKNOWN, UNKNOWN, -1)), 0);
    }

    #[test]
    fn lag_falls_back_to_librdkafka_and_never_goes_negative() {
        // Committed by the consumer itself (at_least_once), nothing read since.
        assert_eq!(partition_lag(offsets(1_000, 0, UNKNOWN, 700, 300)), 300);
        // Records exist, nothing read or committed: unknown, as librdkafka says.
        assert_eq!(partition_lag(offsets(1_000, 0, UNKNOWN, UNKNOWN, -1)), -1);
        // End not known yet.
        assert_eq!(partition_lag(offsets(-1, -1, 10, UNKNOWN, -1)), -1);
        // A position past the last stable offset (an open transaction ahead) is not negative.
        assert_eq!(partition_lag(offsets(10, 0, 12, UNKNOWN, -1)), 0);
    }
}
