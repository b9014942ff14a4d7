//! The `pendo-sync` binary: parse the command line, set up logging, hand over to the library.

use std::process::ExitCode;

use clap::Parser;

/// A reconcile maps, hashes and frees millions of small values across threads; mimalloc does
/// that at a fraction of glibc malloc's cost (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = pendo_sync::cli::Cli::parse();
    // The demo tells its own story on stdout; its info logs would only interleave with it.
    let demo = matches!(cli.command, pendo_sync::cli::Command::Demo);
    let quiet = cli.quiet || (demo && cli.verbose == 0);
    pendo_sync::telemetry::init(cli.log_format, cli.verbose, quiet);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(pendo_sync::commands::run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
