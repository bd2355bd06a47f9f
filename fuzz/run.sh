#!/usr/bin/env bash
# Coverage-guided fuzzing of tollgate's readers of hostile bytes with AFL++ (through cargo-afl,
# which runs on stable Rust; cargo-fuzz needs nightly). docs/RELIABILITY.md, "Coverage-guided
# fuzzing".
#
#   fuzz/run.sh [seconds-per-target] [target…]     (default: 300 s, every target)
#
# Installs cargo-afl if missing, builds the targets, runs each one for the given time on one
# core (starting from fuzz/corpus/<target>/), then minimizes what the run found with afl-cmin
# back into fuzz/corpus/<target>/ (the seed-* files are always kept) and prints executions,
# corpus size, crashes and hangs per target. Crashing inputs are copied to
# fuzz/corpus/<target>/ too, as crash-*, so the replay test (cargo test -p tollgate-server
# --test fuzz_corpus) fails until they are fixed. Work files go to fuzz/out/ (ignored by git).
set -euo pipefail

AFL_VERSION=0.18.2
TARGETS=(anthropic_sse openai_sse json_usage request_bound config price_file events)

cd "$(dirname "$0")"
seconds=${1:-300}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${TARGETS[@]}")
for t in "${targets[@]}"; do
    [[ " ${TARGETS[*]} " == *" $t "* ]] || { echo "unknown target $t; targets: ${TARGETS[*]}" >&2; exit 2; }
done

if ! cargo afl --version >/dev/null 2>&1; then
    cargo install cargo-afl --version "$AFL_VERSION" --locked
fi
# Builds AFL++ itself once per Rust toolchain; it says so and fails when it is already built.
cargo afl config --build >/dev/null 2>&1 || true
cargo afl --version
cargo afl build --release
bin=target/release/tollgate-fuzz
# afl-cmin (Python) finds no coverage in afl.rs binaries here; its awk version does, fast.
rustc_id="$(rustc -vV | sed -n 's/^release: //p')-$(rustc -vV | sed -n 's/^commit-hash: //p' | cut -c1-7)"
afl_bin="${XDG_DATA_HOME:-$HOME/.local/share}/afl.rs/rustc-$rustc_id/afl.rs-$AFL_VERSION/afl/bin"
[ -x "$afl_bin/afl-cmin.awk" ] || { echo "no afl-cmin.awk in $afl_bin" >&2; exit 1; }

# No core dumps piped to a crash reporter here, and the cores are shared: let AFL++ run anyway,
# unbound, without its screen.
export AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_SKIP_CPUFREQ=1 AFL_NO_AFFINITY=1 AFL_NO_UI=1
# A reader that takes 2 s on one input (at most 1 MiB) has hung.
timeout_ms=2000

stat() { sed -n "s/^$1 *: *//p" "$2"; }

# One summary per set of targets, so runs of different targets can share the machine.
summary="out/summary-$(IFS=-; echo "${targets[*]}").txt"
mkdir -p out
printf '%-14s %8s %12s %10s %8s %8s %7s\n' target seconds executions execs/s corpus crashes hangs | tee "$summary"
for t in "${targets[@]}"; do
    rm -rf "out/$t" "out/$t-cmin"
    # -V stops the run after $seconds; the outer timeout only guards against AFL++ itself stuck.
    timeout --kill-after=30 $((seconds + 120)) \
        cargo afl fuzz -V "$seconds" -t "$timeout_ms" -i "corpus/$t" -o "out/$t" -- "$bin" "$t" \
        >"out/$t.log" 2>&1 || echo "afl-fuzz on $t exited with $? (out/$t.log)" >&2
    stats="out/$t/default/fuzzer_stats"
    [ -f "$stats" ] || { echo "no statistics for $t (out/$t.log)" >&2; continue; }

    # Keep the smallest set of inputs that covers what the run covered, named by content.
    AFL_PATH="$afl_bin" PATH="$afl_bin:$PATH" "$afl_bin/afl-cmin.awk" -e -t "$timeout_ms" -i "out/$t/default/queue" -o "out/$t-cmin" -- "$bin" "$t" >"out/$t-cmin.log" 2>&1 \
        || echo "afl-cmin on $t failed (out/$t-cmin.log)" >&2
    if [ -n "$(ls -A "out/$t-cmin" 2>/dev/null)" ]; then
        find "corpus/$t" -type f ! -name 'seed-*' ! -name 'crash-*' -delete
        for f in "out/$t-cmin"/*; do
            [ -f "$f" ] || continue
            cp "$f" "corpus/$t/$(sha1sum "$f" | cut -c1-16)"
        done
        # A seed is kept under its own name, not twice.
        for s in "corpus/$t"/seed-*; do
            rm -f "corpus/$t/$(sha1sum "$s" | cut -c1-16)"
        done
    fi
    for f in "out/$t/default/crashes"/id:*; do
        [ -f "$f" ] && cp "$f" "corpus/$t/crash-$(sha1sum "$f" | cut -c1-16)"
    done

    printf '%-14s %8s %12s %10s %8s %8s %7s\n' "$t" "$(stat run_time "$stats")" "$(stat execs_done "$stats")" \
        "$(stat execs_per_sec "$stats")" "$(find "corpus/$t" -type f | wc -l)" \
        "$(stat saved_crashes "$stats")" "$(stat saved_hangs "$stats")" | tee -a "$summary"
done
echo "corpus: $(du -sh corpus | cut -f1) in $(find corpus -type f | wc -l) files; summary in fuzz/$summary"
