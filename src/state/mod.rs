//! Durable state: one RocksDB store per assigned input partition (like a Kafka Streams
//! task's state store), implementing the window core's [`crate::window::WindowStore`].

pub mod store;

pub use store::{PartitionStore, StoreError, StoreResources};
