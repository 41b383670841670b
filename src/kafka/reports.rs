//! A producer whose delivery reports a thread of its own serves, woken by librdkafka
//! when a report arrives ([`ReportedProducer`]).
//!
//! rdkafka's `ThreadedProducer` does the same job by polling every 100 ms, and its poll
//! ends in a spin: it hands librdkafka the time left truncated to milliseconds and polls
//! again while any is left, so each 100 ms poll ends with up to a millisecond of
//! `clock_gettime` in a loop, and so does every wait after a report. perf on an idle
//! `pulses run`: its two producers' polling threads took 50 of its 106 CPU ticks in 30 s,
//! nearly all of it in that loop. Here the thread sleeps on a condition variable that
//! librdkafka's queue callback signals when a report lands on the empty queue, then
//! serves the queue without waiting.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::bindings as rdsys;
use rdkafka::client::Client;
use rdkafka::config::{ClientConfig, FromClientConfigAndContext};
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::producer::{BaseProducer, Producer, ProducerContext, PurgeConfig};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use rdkafka::TopicPartitionList;

/// The longest the serving thread sleeps without a signal: only its stop flag needs it.
const IDLE_WAKE: Duration = Duration::from_secs(1);
/// Events served per turn before the thread looks at its stop flag again.
const SERVE_AT_MOST: usize = 100_000;

/// Set by librdkafka's callback when something lands on the empty queue.
#[derive(Default)]
struct Signal {
    pending: Mutex<bool>,
    woken: Condvar,
}

impl Signal {
    fn raise(&self) {
        if let Ok(mut pending) = self.pending.lock() {
            *pending = true;
        }
        self.woken.notify_one();
    }

    /// Waits until raised (or `IDLE_WAKE`), and lowers it.
    fn wait(&self) {
        let Ok(mut pending) = self.pending.lock() else { return };
        if !*pending {
            pending = match self.woken.wait_timeout(pending, IDLE_WAKE) {
                Ok((guard, _)) => guard,
                Err(_) => return,
            };
        }
        *pending = false;
    }
}

/// Called by librdkafka, from one of its threads, when an element is enqueued on the
/// producer's previously empty main queue.
unsafe extern "C" fn on_enqueue(_rk: *mut rdsys::rd_kafka_t, opaque: *mut std::ffi::c_void) {
    // SAFETY: `opaque` is the `Signal` that `ReportedProducer` keeps alive until it has
    // disabled this callback (see its Drop).
    let signal = unsafe { &*(opaque as *const Signal) };
    signal.raise();
}

/// librdkafka's main queue of a producer: where its delivery reports arrive.
struct MainQueue(*mut rdsys::rd_kafka_queue_t);

// SAFETY: librdkafka queue handles are thread-safe; this one is only read for its
// length and destroyed once, by the owner, after the serving thread has stopped.
unsafe impl Send for MainQueue {}
unsafe impl Sync for MainQueue {}

impl MainQueue {
    fn len(&self) -> usize {
        // SAFETY: the handle is valid until `ReportedProducer` drops it.
        unsafe { rdsys::rd_kafka_queue_length(self.0) }
    }
}

/// A [`BaseProducer`] with a thread serving its delivery reports as they arrive (they
/// run the context's `delivery` callback). Dereferences to the producer.
pub struct ReportedProducer<C: ProducerContext + 'static> {
    producer: Arc<BaseProducer<C>>,
    queue: Arc<MainQueue>,
    signal: Arc<Signal>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl<C: ProducerContext + 'static> ReportedProducer<C> {
    pub fn new(producer: BaseProducer<C>) -> KafkaResult<Self> {
        let producer = Arc::new(producer);
        let rk = producer.client().native_ptr();
        // SAFETY: `rk` is the producer's live handle; the queue reference is released in Drop.
        let queue = Arc::new(MainQueue(unsafe { rdsys::rd_kafka_queue_get_main(rk) }));
        let signal = Arc::new(Signal::default());
        // SAFETY: the callback's opaque is the Signal, kept alive by `self.signal` until
        // Drop has disabled the callback.
        unsafe {
            rdsys::rd_kafka_queue_cb_event_enable(queue.0, Some(on_enqueue), Arc::as_ptr(&signal) as *mut std::ffi::c_void)
        };
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (producer, queue, signal, stop) = (Arc::clone(&producer), Arc::clone(&queue), Arc::clone(&signal), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("delivery reports".into())
                .spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        // A poll without a wait serves one event; librdkafka counts
                        // what is queued, so the queue is emptied without waiting.
                        let mut served = 0;
                        while queue.len() > 0 && served < SERVE_AT_MOST {
                            producer.poll(Duration::ZERO);
                            served += 1;
                        }
                        if served < SERVE_AT_MOST {
                            signal.wait();
                        }
                    }
                })
        };
        // Dropped without a thread, it still disables the callback and releases the queue.
        let mut reported = Self { producer, queue, signal, stop, thread: None };
        reported.thread = Some(thread.map_err(|e| KafkaError::ClientCreation(format!("starting the delivery report thread: {e}")))?);
        Ok(reported)
    }
}

impl<C: ProducerContext + 'static> Drop for ReportedProducer<C> {
    fn drop(&mut self) {
        // SAFETY: disables the callback before the Signal it points to can go.
        unsafe { rdsys::rd_kafka_queue_cb_event_enable(self.queue.0, None, std::ptr::null_mut()) };
        self.stop.store(true, Ordering::Release);
        self.signal.raise();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // SAFETY: the thread that read the queue has stopped; the reference is ours.
        unsafe { rdsys::rd_kafka_queue_destroy(self.queue.0) };
        // The producer itself (purged and flushed by its own Drop) goes with `self.producer`.
    }
}

impl<C: ProducerContext + 'static> std::ops::Deref for ReportedProducer<C> {
    type Target = BaseProducer<C>;

    fn deref(&self) -> &BaseProducer<C> {
        &self.producer
    }
}

impl<C: ProducerContext + 'static> FromClientConfigAndContext<C> for ReportedProducer<C> {
    fn from_config_and_context(config: &ClientConfig, context: C) -> KafkaResult<Self> {
        Self::new(BaseProducer::from_config_and_context(config, context)?)
    }
}

impl<C: ProducerContext + 'static> Producer<C> for ReportedProducer<C> {
    fn client(&self) -> &Client<C> {
        self.producer.client()
    }

    fn in_flight_count(&self) -> i32 {
        self.producer.in_flight_count()
    }

    /// librdkafka's own flush ([`flush`]): it sleeps until every record
    /// is reported, the thread serving the reports (rdkafka's `BaseProducer::flush`
    /// would poll in a loop).
    fn flush<T: Into<Timeout>>(&self, timeout: T) -> KafkaResult<()> {
        let within = match timeout.into() {
            Timeout::After(d) => d,
            Timeout::Never => Duration::MAX,
        };
        flush(&*self.producer, within)
    }

    fn purge(&self, flags: PurgeConfig) {
        self.producer.purge(flags)
    }

    fn init_transactions<T: Into<Timeout>>(&self, timeout: T) -> KafkaResult<()> {
        self.producer.init_transactions(timeout)
    }

    fn begin_transaction(&self) -> KafkaResult<()> {
        self.producer.begin_transaction()
    }

    fn send_offsets_to_transaction<T: Into<Timeout>>(
        &self,
        offsets: &TopicPartitionList,
        cgm: &ConsumerGroupMetadata,
        timeout: T,
    ) -> KafkaResult<()> {
        self.producer.send_offsets_to_transaction(offsets, cgm, timeout)
    }

    fn commit_transaction<T: Into<Timeout>>(&self, timeout: T) -> KafkaResult<()> {
        self.producer.commit_transaction(timeout)
    }

    fn abort_transaction<T: Into<Timeout>>(&self, timeout: T) -> KafkaResult<()> {
        self.producer.abort_transaction(timeout)
    }
}

/// Waits until every record `producer` has enqueued is delivered or has failed, for
/// at most `timeout`, asking librdkafka to send what lingers at once. For producers
/// whose delivery reports a thread of their own serves ([`ReportedProducer`], and
/// rdkafka's `FutureProducer`): every producer pulses creates.
///
/// It is librdkafka's own `rd_kafka_flush`, which in event mode (how rdkafka sets it
/// up) sleeps on a condition until the count of records in flight reaches zero.
/// rdkafka's `Producer::flush` instead polls the delivery queue in a loop against the
/// background thread that serves it: at 10,000 pulses/s under exactly_once that loop
/// was 40% of pulses' CPU (two commits a stage every 100 ms, each spinning until the
/// broker acknowledged), and its steps of up to 100 ms made a 3 ms flush take 100.
pub fn flush<C, P>(producer: &P, timeout: Duration) -> KafkaResult<()>
where
    C: ProducerContext,
    P: Producer<C>,
{
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: the handle belongs to `producer`, which the borrow keeps alive for the call;
    // rd_kafka_flush is safe to call from any thread.
    let err = unsafe { rdkafka::bindings::rd_kafka_flush(producer.client().native_ptr(), ms) };
    match RDKafkaErrorCode::from(err) {
        RDKafkaErrorCode::NoError => Ok(()),
        code => Err(KafkaError::Flush(code)),
    }
}
