//! tollgate's benchmarks. Each subcommand measures one figure of docs/BENCHMARKS.md and prints
//! it with what was measured; run them in release mode:
//!
//! ```text
//! cargo run --release -p tollgate-bench -- core
//! cargo run --release -p tollgate-bench -- sqlite [--tasks 64] [--calls 200000]
//! cargo run --release -p tollgate-bench -- gateway [--calls 5000] [--connections 64] [--seconds 10] [--postgres URL] [--lease-usd X]
//! cargo run --release -p tollgate-bench -- streams [--streams 1000] [--delay-ms 500]
//! cargo run --release -p tollgate-bench -- reports [--events 10000000] [--postgres URL]
//! cargo run --release -p tollgate-bench -- postgres [--pools 1] [--stores 4] [--tasks 256] [--calls 100000] [--url postgres://…]
//! cargo run --release -p tollgate-bench -- strip [--bytes 8388608] [--chunk-bytes 1024] [--runs 3]
//! ```

#![warn(clippy::too_many_lines)] // production functions stay under 80 lines (clippy.toml)

mod core_decisions;
mod gateway;
mod postgres_ledger;
mod reports;
mod sqlite_ledger;
mod streams;
mod strip;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("core") => core_decisions::run(&args[1..]),
        Some("sqlite") => sqlite_ledger::run(&args[1..]),
        Some("gateway") => gateway::run(&args[1..]),
        Some("streams") => streams::run(&args[1..]),
        Some("streams-gateway") => streams::serve(&args[1..]),
        Some("reports") => reports::run(&args[1..]),
        Some("postgres") => postgres_ledger::run(&args[1..]),
        Some("strip") => strip::run(&args[1..]),
        _ => Err("usage: tollgate-bench core [--calls N] | sqlite [--tasks N] [--calls N] | gateway [--calls N] [--connections N] [--seconds N] [--postgres URL] [--lease-usd X] | streams [--streams N] [--delay-ms N] | reports [--events N] [--postgres URL] | postgres [--pools N] [--stores N] [--tasks N] [--calls N] [--url URL] | strip [--bytes N] [--chunk-bytes N] [--runs N]".to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate-bench: {e}");
            ExitCode::from(2)
        }
    }
}

/// The value of `--name N` in `args`, or `default`.
pub fn flag(args: &[String], name: &str, default: u64) -> Result<u64, String> {
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.replace('_', "").parse().ok())
            .ok_or_else(|| format!("{name} needs a whole number, as in `{name} 1000`")),
    }
}
