//! `pulses bench`: the end-to-end benchmark against a broker.
//!
//! The processor runs as a child `pulses run` process, exactly as in production, so
//! its CPU time and peak RSS (from `/proc/<pid>`) are its own and not the producer's
//! or the reader's; latencies and counts come from its `/metrics` and from reading
//! its output topic. [`plan`] says what a run does; [`stats`] and [`report`] are pure; [`driver`] (topics, producer,
//! measurement), [`processor`] (the child) and [`aggregates`] (the reader) do the I/O.

pub mod aggregates;
pub mod driver;
pub mod plan;
pub mod processor;
pub mod report;
pub mod stats;
