//! pulses: a Kafka-native Kappa stream processor that meters cloud usage for billing.
//!
//! Where to look:
//! - a pulse enters in [`stage::group`], is decoded by [`codec`], validated by
//!   [`pulse::validate`] and leaves re-keyed by tenant to the grouped topic, or to the
//!   DLQ ([`kafka::dlq`]);
//! - it is counted in [`stage::aggregate`] by the window operator ([`window`]), whose
//!   state lives in [`state`], and leaves as an aggregate encoded by [`codec`];
//! - the pure core ([`pulse`], [`window`]) has no Kafka or RocksDB in sight and is
//!   unit-tested on plain values;
//! - both stages and `pulses rate` run on [`runtime`] (a loop per stage thread, a task
//!   per partition with its state manager, one transactional producer per thread:
//!   [`runtime::record_collector`]);
//! - [`cli`] is the command line, [`config`] the configuration, [`ops`] the counters.

pub mod bench;
pub mod billing;
pub mod cli;
pub mod codec;
pub mod config;
pub mod invoice;
pub mod kafka;
pub mod meter;
pub mod ops;
pub mod pulse;
pub mod rate;
pub mod replay;
pub mod rerating;
pub mod registry;
pub mod runtime;
pub mod state;
pub mod serve;
pub mod stage;
pub mod window;
pub mod stub;
