//! Logging: tracing-subscriber, pretty on a terminal, JSON lines for the daemon or when asked.
//!
//! Logs go to stderr; stdout is kept for command output (tables, `--json` reports) so that it can be piped.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. `verbosity` is -1 (quiet), 0 (default) or higher (-v, -vv).
/// Returns the format chosen, which the cluster master hands on to its workers.
pub fn init(format: Option<LogFormat>, verbosity: i8, daemon: bool) -> LogFormat {
    let default_level = match verbosity {
        i8::MIN..=-1 => "error",
        0 if daemon => "info",
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("COZY_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("{default_level},sqlx=warn,hyper=warn")));
    let terminal = std::io::stderr().is_terminal();
    let format = format.unwrap_or(if daemon && !terminal {
        LogFormat::Json
    } else {
        LogFormat::Pretty
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Pretty => builder.with_ansi(terminal).with_target(false).try_init(),
    };
    format
}
