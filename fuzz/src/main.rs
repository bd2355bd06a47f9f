//! One binary for every fuzz target: `tollgate-fuzz <target>` reads inputs from AFL++ and runs
//! them through the target's entry function (`targets.rs`). `fuzz/run.sh` builds and runs it.

mod targets;

fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    let Some(&(_, target)) = targets::TARGETS.iter().find(|(n, _)| *n == name) else {
        let names: Vec<&str> = targets::TARGETS.iter().map(|(n, _)| *n).collect();
        eprintln!("usage: tollgate-fuzz <target>; targets: {}", names.join(", "));
        std::process::exit(2);
    };
    afl::fuzz!(|data: &[u8]| target(data));
}
