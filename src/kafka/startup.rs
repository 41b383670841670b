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

/// The codes no wait mends: who we are, what we may do, what we asked for.
pub fn is_fatal_code(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        code,
        Authentication
            | SaslAuthenticationFailed
            | SSL
            | SecurityDisabled
            | TopicAuthorizationFailed
            | GroupAuthorizationFailed
            | ClusterAuthorizationFailed
            | TransactionalIdAuthorizationFailed
            | DelegationTokenAuthorizationFailed
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
    let started = Instant::now();
    let mut backoff = FIRST_BACKOFF;
    for attempt in 1.. {
        // A step may itself wait long for an absent broker (a request timeout): say
        // what is being waited for from the first attempt on.
        waiting(Some(format!("{what} (attempt {attempt})")));
        match step() {
            Ok(v) => {
                if attempt > 1 {
                    tracing::info!(what, attempt, waited_ms = started.elapsed().as_millis() as u64, "broker ready");
                }
                waiting(None);
                return Ok(v);
            }
            Err(e) if !e.is_retriable() || started.elapsed() + backoff > timeout => {
                waiting(None);
                return Err(e);
            }
            Err(e) => {
                tracing::warn!(what, attempt, error = %e, retry_in_ms = backoff.as_millis() as u64,
                    deadline_s = timeout.as_secs(), "broker not ready yet; retrying");
                waiting(Some(format!("{what}: {e} (attempt {attempt}; next in {} ms)", backoff.as_millis())));
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    unreachable!("the attempts never end")
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
