//! The reference rating consumer (`pulses rate`, SPEC §5): final window aggregates in,
//! money out.
//!
//! - [`price_book`]: the price book file, checked;
//! - [`pricing`]: quantity → amount and tier breakdown (flat, graduated, volume);
//! - [`ledger`]: charges, running balances and threshold alerts, pure;
//! - [`records`]: the charge and alert records;
//! - [`store`] and [`consumer`]: the RocksDB state and the Kafka I/O around the ledger.

pub mod consumer;
pub mod ledger;
pub mod price_book;
pub mod pricing;
pub mod records;
pub mod store;

pub use ledger::{Ledger, Rated};
pub use price_book::PriceBook;
