//! Operations: counters the stages update and the process reports.

pub mod metrics;
