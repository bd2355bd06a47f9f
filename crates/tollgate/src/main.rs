//! The `tollgate` binary: parse the command line, run the command, turn its outcome into an
//! exit code. Everything else lives in the library crates and in `commands`.

#![warn(clippy::too_many_lines)] // production functions stay under 80 lines (clippy.toml)

mod cli;
mod client;
mod commands;
mod table;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tollgate: cannot start the async runtime: {e}");
            return commands::Failure::Internal.into();
        }
    };
    match runtime.block_on(commands::run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err((failure, message)) => {
            eprintln!("tollgate: {message}");
            failure.into()
        }
    }
}
