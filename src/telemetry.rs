//! Logging: `tracing` to stderr, pretty for people or JSON for log pipelines. Secrets never reach
//! here: they live in `SecretString`s whose Debug is redacted, and no code logs them.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::writer::MakeWriterExt;

use crate::cli::LogFormat;

/// Installs the global subscriber. `RUST_LOG` wins over `-v`/`-q`.
pub fn init(format: LogFormat, verbose: u8, quiet: bool) {
    let default = match (quiet, verbose) {
        // sqlx reports slow statements as warnings; a full pull legitimately runs long ones.
        (true, _) => "warn,sqlx=error",
        (false, 0) => "info,sqlx=error",
        (false, 1) => "pendo_sync=debug,info,sqlx=error",
        (false, _) => "pendo_sync=trace,debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr.with_max_level(tracing::Level::TRACE));
    let result = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Pretty => builder.with_target(false).compact().try_init(),
    };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
}
