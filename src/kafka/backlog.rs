//! Which assigned partitions still hold records the consumer has not handed to the
//! application. A partition with such a backlog is behind, not idle: stage 2 must not
//! advance its watermark with the wall clock ([`crate::window::WindowOperator::on_time`]),
//! or windows would close before the records that belong in them are read, e.g. on a
//! restart after downtime, or while librdkafka delivers another partition's large fetch.

use std::collections::{BTreeSet, HashMap};
use std::ffi::CString;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};

use super::batch::log_offset;

/// The partitions of `topic` assigned to `consumer` that have records waiting.
/// `resumed_at` maps a partition to the offset consumption resumed from (its committed
/// offset at assignment), the position to assume until a first record is read.
///
/// Uses only what the client already knows (the application position and the high
/// watermark of the latest fetch response): no request to the broker.
pub fn partitions_behind<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    resumed_at: &HashMap<i32, i64>,
) -> BTreeSet<i32> {
    let Ok(positions) = consumer.position() else {
        // No assignment to ask about (e.g. mid-rebalance): nobody can be called idle.
        return resumed_at.keys().copied().collect();
    };
    let Ok(topic_c) = CString::new(topic) else { return BTreeSet::new() };
    positions
        .elements_for_topic(topic)
        .into_iter()
        .filter(|e| {
            let p = e.partition();
            let (low, high) = cached_watermarks(consumer, &topic_c, p);
            has_records_waiting(log_offset(e.offset()), resumed_at.get(&p).copied(), low, high)
        })
        .map(|e| e.partition())
        .collect()
}

/// The decision, for one partition: `position` is the offset after the last record
/// handed to the application (librdkafka moves it past transaction markers too), none
/// before the first; then consumption continues from `resumed_at`, or from the log
/// start `low` when nothing was committed. `high`: the high watermark of the latest
/// fetch response, none before the first. Unknown counts as waiting: the first fetch
/// after an assignment answers within a fetch wait.
///
/// Under read_committed the high watermark includes a transaction still open, so a
/// partition stays "behind" until it commits or aborts (at most the producer's
/// transaction timeout): its records might belong in the windows idling would close.
pub fn has_records_waiting(position: Option<i64>, resumed_at: Option<i64>, low: Option<i64>, high: Option<i64>) -> bool {
    let Some(high) = high else { return true };
    match position.or(resumed_at).or(low) {
        Some(next) => next < high,
        None => true,
    }
}

/// librdkafka's cached low and high watermark of a partition (from fetch responses).
fn cached_watermarks<C: ConsumerContext>(consumer: &BaseConsumer<C>, topic: &CString, partition: i32) -> (Option<i64>, Option<i64>) {
    let (mut low, mut high) = (-1_i64, -1_i64);
    // SAFETY: the client pointer is valid while `consumer` lives, `topic` is a valid C
    // string, and the call only writes the two out-parameters (no network, no callback).
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    if err != rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        return (None, None);
    }
    let known = |o: i64| (o >= 0).then_some(o);
    (known(low), known(high))
}

#[cfg(test)]
mod tests {
    use super::has_records_waiting;

    #[test]
    fn waiting_until_the_position_reaches_the_high_watermark() {
        assert!(has_records_waiting(Some(10), None, Some(0), Some(12)));
        assert!(!has_records_waiting(Some(12), None, Some(0), Some(12)));
        // Past a high watermark a broker under-reports: caught up, never stuck.
        assert!(!has_records_waiting(Some(13), None, Some(0), Some(12)));
    }

    #[test]
    fn before_the_first_record_the_resume_offset_counts() {
        assert!(!has_records_waiting(None, Some(500), Some(0), Some(500)), "resumed at the end: caught up");
        assert!(has_records_waiting(None, Some(400), Some(0), Some(500)), "resumed behind the end: a backlog");
        assert!(has_records_waiting(None, None, Some(0), Some(500)), "nothing committed: from the log start");
        assert!(!has_records_waiting(None, None, Some(500), Some(500)), "an empty log");
    }

    #[test]
    fn unknown_ends_count_as_waiting() {
        assert!(has_records_waiting(Some(5), Some(5), Some(0), None), "no fetch response yet");
        assert!(has_records_waiting(None, None, None, Some(3)));
    }
}
