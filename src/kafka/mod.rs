//! Kafka plumbing: client configuration, the DLQ record format, and topic admin.
//! Stages use these; nothing here knows what a pulse is.

pub mod admin;
pub mod backlog;
pub mod batch;
pub mod clients;
pub mod dlq;
pub mod partitioner;
pub mod reader;
pub mod reports;
pub mod security;
pub mod startup;
pub mod upstream;
