//! The hot path: a request's stages, in the order `pipeline` calls them.
//!
//! `listener` accepts (its h1 header deadline kept by `head_timer`) -> `normalize` the path -> reserved paths -> `route` ->
//! gates -> `admission` (rate limit, bulkhead) -> `breaker` + `retry` -> `upstream` (with `headers` rewritten) -> `respond` / `observe`.
//! `runtime` is the compiled config snapshot every stage reads; `window` is the
//! lock-free sliding window of counters under the breaker's rate rule and the
//! retry budget.

pub mod admission;
pub mod body;
pub mod breaker;
pub mod call;
pub mod clock;
pub mod head_timer;
pub mod headers;
pub mod limits;
pub mod listener;
pub mod normalize;
pub mod observe;
pub mod pipeline;
pub mod replay;
pub mod respond;
pub mod retry;
pub mod route;
pub mod runtime;
pub mod upstream;
pub mod window;

pub use body::Body;
pub use pipeline::{Conn, Gates, LocalEndpoints, Proxy, Side};
pub use runtime::Runtime;

/// Boxes the value `make` builds. Allocating first lets the optimiser build the value in
/// the box; `Box::new(value)` builds it on the stack and copies it whole. For the request's
/// record (~300 bytes) and the upstream call's future (a few KiB), on every request.
fn boxed_in_place<T>(make: impl FnOnce() -> T) -> Box<T> {
    let slot = Box::new_uninit();
    Box::write(slot, make())
}
