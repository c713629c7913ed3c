//! Overload protection beyond a route's single bucket (SPEC §11): keyed
//! buckets, fleet-wide budgets leased from Redis, and adaptive concurrency.
//! Pure algorithms with an injected clock; admission calls them per request.

pub mod adaptive;
pub mod fleet;
pub mod keyed;
pub mod lease;
pub mod rate;
