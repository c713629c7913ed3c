//! One integration test binary; each room has its module.

mod ops;
