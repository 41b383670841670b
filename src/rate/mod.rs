//! The reference rating consumer (`pulses rate`, SPEC §5): final window aggregates in,
//! money out.
//!
//! - [`price_book`]: the price book file, checked;
//! - [`pricing`]: quantity → amount and tier breakdown (flat, graduated, volume);
//! - [`ledger`]: charges, running balances and threshold alerts, pure;
//! - [`period`]: the billing period, a UTC calendar month;
//! - [`records`]: the charge and alert records.
//!
//! All pure; the stage around them (Kafka, the ledger's RocksDB store and changelog)
//! is [`crate::stage::rate`].

pub mod ledger;
pub mod period;
pub mod price_book;
pub mod pricing;
pub mod records;

pub use ledger::{Ledger, Rated};
pub use price_book::PriceBook;
