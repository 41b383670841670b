//! Durable state: one RocksDB store per assigned input partition (like a Kafka Streams
//! task's state store), implementing the window core's [`crate::window::WindowStore`],
//! with its changelog topic and checkpoints; and the replica's identity in its state
//! dir ([`instance`]).

pub mod changelog;
pub mod checkpoint;
pub mod instance;
pub mod store;

pub use changelog::{RestoreError, RestoreStats};
pub use checkpoint::{CheckpointError, StorePaths};
pub use store::{PartitionStore, StoreError, StoreResources};
