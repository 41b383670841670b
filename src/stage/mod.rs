//! The processing stages. Each wraps the pure core (`pulse`, `window`) with Kafka I/O
//! and runs on the shared runtime ([`crate::runtime`]): stage 1 ([`group`]) validates
//! and re-keys, in event-time order ([`order`]), stage 2 ([`aggregate`]) counts, and
//! `pulses rate` ([`rate`]) prices the final aggregates. What
//! each reads, writes and stores is described once in [`topology`].

pub mod acls;
pub mod aggregate;
pub mod group;
pub mod merge;
pub mod order;
pub mod rate;
pub mod topology;
