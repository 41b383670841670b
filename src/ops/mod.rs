//! Operations: counters the stages update, and how an operator sees them: the HTTP
//! endpoint ([`http`]: `/metrics` rendered by [`prometheus`], `/healthz`, `/readyz`
//! from [`health`]); heap trimming ([`memory`]).

pub mod health;
pub mod http;
pub mod lag;
pub mod memory;
pub mod metrics;
pub mod prometheus;
pub mod telemetry;
