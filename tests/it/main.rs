//! One integration binary for opsgate: real sockets, throwaway servers, no mocks.

mod admin;
mod fuzz_corpus;
mod health;
mod lifecycle;
mod limits;
mod listeners;
mod ops;
mod probes;
mod proxy;
mod request_path;
mod resilience;
mod support;
