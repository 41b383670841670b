//! Operations: counters the stages update and the process reports; heap trimming.

pub mod memory;
pub mod metrics;
