//! One integration binary for opsgate: real sockets, throwaway servers, no mocks.

mod health;
mod lifecycle;
mod ops;
mod proxy;
mod resilience;
mod support;
