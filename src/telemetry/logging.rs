//! Logging init: JSON lines (or pretty text) on stdout, level from `OPSGATE_LOG`.
//! The access log is target `access` at INFO, so the same filter governs it: the
//! hand-written JSON writer (see `access.rs`) asks the filter once, here.

use std::io::IsTerminal;

use tracing::callsite::{Callsite, Identifier};
use tracing::field::FieldSet;
use tracing::metadata::Kind;
use tracing::subscriber::Interest;
use tracing::{Level, Metadata};
use tracing_subscriber::EnvFilter;

/// The variable holding the log filter (tracing `EnvFilter` syntax).
const LOG_ENV: &str = "OPSGATE_LOG";
/// The filter when `OPSGATE_LOG` is unset or invalid.
const DEFAULT_FILTER: &str = "info";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// Keeps the log writer threads alive; dropping it flushes what is buffered: the access
/// lines' batches first, then the writer's queue (fields drop in declaration order).
pub struct LogGuard {
    _access: Option<super::batch::FlushGuard>,
    _writer: tracing_appender::non_blocking::WorkerGuard,
}

/// Sets up logging. Lines are formatted on the caller's thread but written by a
/// dedicated thread through one buffered stdout writer, flushed whenever it has no more
/// lines waiting: under load one write(2) carries many access-log lines. If stdout
/// cannot keep up, lines are dropped rather than slowing requests down.
pub fn init(format: Option<LogFormat>) -> (LogGuard, super::access::AccessLog) {
    let directives = std::env::var(LOG_ENV).ok();
    let filter = env_filter(directives.as_deref());
    let access_on = access_enabled(env_filter(directives.as_deref()));
    let format = format.unwrap_or(if std::io::stdout().is_terminal() {
        LogFormat::Pretty
    } else {
        LogFormat::Json
    });
    let stdout = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout());
    // 8192 waiting lines is a deep enough queue for bursts; the default (128k) would
    // reserve and touch about 4 MB of memory up front.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(8192)
        .finish(stdout);
    let mut access_guard = None;
    let access = match format {
        _ if !access_on => super::access::AccessLog::Off,
        // Straight to stdout, past the log writer's queue: a batch is one write(2) whole.
        LogFormat::Json => match super::batch::Batcher::start(std::io::stdout()) {
            Ok((batcher, guard)) => {
                access_guard = Some(guard);
                super::access::AccessLog::Json(batcher)
            }
            // No thread for the batches: lines go through tracing, unbatched.
            Err(_) => super::access::AccessLog::Tracing,
        },
        LogFormat::Pretty => super::access::AccessLog::Tracing,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
    let guard = LogGuard {
        _access: access_guard,
        _writer: guard,
    };
    (guard, access)
}

/// Redis client's own lines are kept to errors unless the filter names it: opsgate logs a
/// Redis outage once itself, while fred warns on every reconnect round (with its source path).
const QUIET_LIBRARIES: &str = "fred=error";

/// `OPSGATE_LOG`'s filter; unset or invalid gives `info`, as tracing's own `from_env` would.
fn env_filter(directives: Option<&str>) -> EnvFilter {
    let filter = directives
        .and_then(|d| EnvFilter::try_new(d).ok())
        .unwrap_or_else(|| EnvFilter::new(DEFAULT_FILTER));
    match directives {
        Some(d) if d.contains("fred") => filter,
        _ => filter.add_directive(QUIET_LIBRARIES.parse().expect("a valid directive")),
    }
}

/// Whether `filter` lets an access line (target `access`, level INFO) through: `error` and
/// `info,access=off` do not, `warn,access=info` does. Asked once, so a request pays nothing.
pub fn access_enabled(filter: EnvFilter) -> bool {
    use tracing_subscriber::layer::SubscriberExt;
    let subscriber = tracing_subscriber::registry().with(filter);
    tracing::Subscriber::enabled(&subscriber, &ACCESS_EVENT)
}

/// The metadata an access line would have, to put to the filter without emitting anything.
struct AccessCallsite;

static ACCESS_CALLSITE: AccessCallsite = AccessCallsite;

static ACCESS_EVENT: Metadata<'static> = Metadata::new(
    "access",
    "access",
    Level::INFO,
    None,
    None,
    None,
    FieldSet::new(&[], Identifier(&ACCESS_CALLSITE)),
    Kind::EVENT,
);

impl Callsite for AccessCallsite {
    fn set_interest(&self, _: Interest) {}

    fn metadata(&self) -> &Metadata<'_> {
        &ACCESS_EVENT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(directives: &str) -> bool {
        access_enabled(env_filter(Some(directives)))
    }

    #[test]
    fn the_access_log_follows_the_filter_for_target_access_at_info() {
        assert!(access("info"));
        assert!(access("debug"));
        assert!(access("warn,access=info"));
        assert!(access("off,access=info"));
        assert!(!access("error"));
        assert!(!access("warn"));
        assert!(!access("info,access=off"));
        assert!(!access("info,access=warn"));
        // Other targets' directives leave it alone.
        assert!(access("info,opsgate=debug,hyper=off"));
        assert!(!access("error,opsgate=debug"));
        // Unset or unparsable: the `info` default.
        assert!(access_enabled(env_filter(None)));
        assert!(access("[[not a filter"));
    }
}
