//! One integration binary for opsgate: real sockets, throwaway servers, no mocks.

mod health;
mod ops;
mod support;
