//! The request path; stages listed in the order a request meets them.

pub mod admission;
pub mod breaker;
pub mod retry;
