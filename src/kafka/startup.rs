//! Start-up against a broker that is not there yet, or still coming up. A fresh broker
//! refuses connections for a moment, then answers NOT_COORDINATOR or
//! COORDINATOR_LOAD_IN_PROGRESS while it loads its internal topics, and a topic just
//! created is not in every metadata answer at once. Those are waits, not failures:
//! [`retry`] repeats a start-up step with backoff, logging each attempt and saying why
//! in `/readyz`, until `startup_timeout`. Errors no wait can mend (authentication,
//! authorization, bad configuration) stop the command at once, naming what is wrong.

use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

/// First wait between two attempts; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Whether an error of a start-up step may go away by itself.
pub trait Retriable {
    fn is_retriable(&self) -> bool;
}

/// The codes of a request the broker's authorizer refused (what we may do).
pub fn is_authorization_code(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        code,
        TopicAuthorizationFailed | GroupAuthorizationFailed | TransactionalIdAuthorizationFailed | ClusterAuthorizationFailed
            | DelegationTokenAuthorizationFailed
    )
}

/// The codes no wait mends: who we are, what we may do, what we asked for.
pub fn is_fatal_code(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    is_authorization_code(code)
        || matches!(
            code,
            Authentication
            | SaslAuthenticationFailed
            | SSL
            | SecurityDisabled
            | InvalidConfig
            | InvalidArgument
            | InvalidPartitions
            | InvalidReplicationFactor
            | InvalidTopic
            | InvalidRequest
            | InvalidTransactionTimeout
            | PolicyViolation
            | UnsupportedVersion
            | Fatal
    )
}

impl Retriable for KafkaError {
    fn is_retriable(&self) -> bool {
        match self {
            // A client that cannot even be created has a bad configuration.
            KafkaError::ClientCreation(_) | KafkaError::ClientConfig(..) => false,
            other => !other.rdkafka_error_code().is_some_and(is_fatal_code),
        }
    }
}

/// Runs `step` until it succeeds, fails for good, or `timeout` has passed since the
/// first attempt. Each failed attempt is logged with `what` and reported through
/// `waiting` (`Some(reason)`; `None` once done), so `/readyz` can say why.
pub fn retry<T, E>(
    what: &str,
    timeout: Duration,
    waiting: &dyn Fn(Option<String>),
    mut step: impl FnMut() -> Result<T, E>,
) -> Result<T, E>
where
    E: Retriable + std::fmt::Display,
{
    let mut attempts = Attempts::new(what, timeout, waiting);
    loop {
        attempts.start();
        match step() {
            Ok(v) => return Ok(attempts.succeeded(v)),
            Err(e) => std::thread::sleep(attempts.failed(e)?),
        }
    }
}

/// [`retry`] for an async step (`pulses serve`, whose start-up runs on tokio), waiting
/// without blocking the runtime.
pub async fn retry_async<T, E, F>(
    what: &str,
    timeout: Duration,
    waiting: &(dyn Fn(Option<String>) + Sync),
    mut step: impl FnMut() -> F,
) -> Result<T, E>
where
    E: Retriable + std::fmt::Display,
    F: std::future::Future<Output = Result<T, E>>,
{
    let mut attempts = Attempts::new(what, timeout, waiting);
    loop {
        attempts.start();
        match step().await {
            Ok(v) => return Ok(attempts.succeeded(v)),
            Err(e) => tokio::time::sleep(attempts.failed(e)?).await,
        }
    }
}

/// The attempts of one start-up step: their count, backoff, deadline, log lines and
/// readiness reports, shared by [`retry`] and [`retry_async`].
struct Attempts<'a> {
    what: &'a str,
    timeout: Duration,
    waiting: &'a dyn Fn(Option<String>),
    started: Instant,
    backoff: Duration,
    attempt: u32,
}

impl<'a> Attempts<'a> {
    fn new(what: &'a str, timeout: Duration, waiting: &'a dyn Fn(Option<String>)) -> Self {
        Self { what, timeout, waiting, started: Instant::now(), backoff: FIRST_BACKOFF, attempt: 0 }
    }

    /// An attempt starts. A step may itself wait long for an absent broker (a request
    /// timeout): say what is being waited for from the first attempt on.
    fn start(&mut self) {
        self.attempt += 1;
        (self.waiting)(Some(format!("{} (attempt {})", self.what, self.attempt)));
    }

    fn succeeded<T>(&self, v: T) -> T {
        if self.attempt > 1 {
            tracing::info!(what = self.what, attempt = self.attempt, waited_ms = self.started.elapsed().as_millis() as u64,
                "broker ready");
        }
        (self.waiting)(None);
        v
    }

    /// How long to wait before the next attempt; `Err(e)` when `e` is not retriable or
    /// the deadline would pass.
    fn failed<E: Retriable + std::fmt::Display>(&mut self, e: E) -> Result<Duration, E> {
        let (what, attempt, backoff) = (self.what, self.attempt, self.backoff);
        if !e.is_retriable() || self.started.elapsed() + backoff > self.timeout {
            (self.waiting)(None);
            return Err(e);
        }
        tracing::warn!(what, attempt, error = %e, retry_in_ms = backoff.as_millis() as u64,
            deadline_s = self.timeout.as_secs(), "broker not ready yet; retrying");
        (self.waiting)(Some(format!("{what}: {e} (attempt {attempt}; next in {} ms)", backoff.as_millis())));
        self.backoff = (backoff * 2).min(MAX_BACKOFF);
        Ok(backoff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[derive(Debug)]
    struct E(bool);
    impl Retriable for E {
        fn is_retriable(&self) -> bool {
            self.0
        }
    }
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "retriable={}", self.0)
        }
    }

    #[test]
    fn retriable_errors_are_retried_until_the_step_succeeds() {
        let calls = Cell::new(0);
        let reasons = std::cell::RefCell::new(Vec::new());
        let got = retry("t", Duration::from_secs(10), &|r| reasons.borrow_mut().push(r), || {
            calls.set(calls.get() + 1);
            if calls.get() < 3 { Err(E(true)) } else { Ok(7) }
        });
        assert_eq!(got.map_err(|e| e.0), Ok(7));
        assert_eq!(calls.get(), 3);
        let reasons = reasons.into_inner();
        assert_eq!(reasons.len(), 6, "{reasons:?}");
        assert_eq!(reasons[0].as_deref(), Some("t (attempt 1)"));
        assert!(reasons[1].as_deref().is_some_and(|r| r.starts_with("t: retriable=true (attempt 1; next in")), "{reasons:?}");
        assert_eq!(reasons[5], None, "ready again once it worked");
    }

    #[test]
    fn a_fatal_error_stops_at_once_and_the_deadline_bounds_the_wait() {
        let calls = Cell::new(0);
        let r: Result<(), E> = retry("t", Duration::from_secs(10), &|_| {}, || {
            calls.set(calls.get() + 1);
            Err(E(false))
        });
        assert!(r.is_err());
        assert_eq!(calls.get(), 1);
        let started = Instant::now();
        let r: Result<(), E> = retry("t", Duration::from_millis(600), &|_| {}, || Err(E(true)));
        assert!(r.is_err());
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn authentication_and_authorization_are_fatal_coordinator_moves_are_not() {
        use RDKafkaErrorCode::*;
        for code in [SaslAuthenticationFailed, TopicAuthorizationFailed, GroupAuthorizationFailed, TransactionalIdAuthorizationFailed] {
            assert!(!KafkaError::MetadataFetch(code).is_retriable(), "{code:?}");
        }
        for code in [NotCoordinator, CoordinatorLoadInProgress, CoordinatorNotAvailable, BrokerTransportFailure, AllBrokersDown,
            UnknownTopicOrPartition, LeaderNotAvailable, OperationTimedOut] {
            assert!(KafkaError::MetadataFetch(code).is_retriable(), "{code:?}");
        }
    }
}
