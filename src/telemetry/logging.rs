//! Logging init: JSON lines (or pretty text) on stdout, level from `OPSGATE_LOG`.
//! The access log is a tracing event with target `access` so it can be filtered apart.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// Keeps the log writer thread alive; dropping it flushes what is buffered.
pub type LogGuard = tracing_appender::non_blocking::WorkerGuard;

/// Sets up logging. Lines are formatted on the caller's thread but written by a
/// dedicated thread through one buffered stdout writer, flushed whenever it has no more
/// lines waiting: under load one write(2) carries many access-log lines. If stdout
/// cannot keep up, lines are dropped rather than slowing requests down.
pub fn init(format: Option<LogFormat>) -> (LogGuard, super::access::AccessLog) {
    let filter = EnvFilter::try_from_env("OPSGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
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
    let access = match format {
        LogFormat::Json => super::access::AccessLog::Json(writer.clone()),
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
    (guard, access)
}
