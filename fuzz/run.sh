#!/usr/bin/env bash
# Runs every fuzz target for N seconds (default 30) with cargo-fuzz on nightly, starting
# from the corpus kept in fuzz/corpus/<target>/ (the regression inputs, never modified
# here: new inputs go to a scratch directory), and prints the executions of each target.
# Fails if any target finds a crash, a leak, an out-of-memory or a timeout; the input that
# triggered it is left in fuzz/artifacts/<target>/.
#
#   fuzz/run.sh [SECONDS]
#
# Environment: FUZZ_TARGETS (space-separated, default all), FUZZ_SANITIZER (default none:
# the crate has no unsafe code, and without AddressSanitizer the model and fault targets run
# several times faster; `address` for long runs), FUZZ_KEEP=1 to keep the inputs
# found in fuzz/artifacts/<target>-corpus/ (ignored by git; copy good ones to corpus/).
set -euo pipefail
cd "$(dirname "$0")"

seconds="${1:-30}"
sanitizer="${FUZZ_SANITIZER:-none}"
targets="${FUZZ_TARGETS:-ops store_file record_codec key_fingerprint}"
toolchain="+nightly"

if ! cargo "$toolchain" fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2
    exit 1
fi

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

# One build for all targets before the clock starts.
cargo "$toolchain" fuzz build -O --sanitizer "$sanitizer"

failed=()
summary=()
for t in $targets; do
    found="$scratch/$t"
    if [[ "${FUZZ_KEEP:-0}" == 1 ]]; then
        found="artifacts/$t-corpus"
    fi
    mkdir -p "$found" "artifacts/$t"
    log="$scratch/$t.log"
    printf '\n==> fuzz %s for %ss\n' "$t" "$seconds"
    status=0
    rss=2048
    if [[ $t == store_file ]]; then
        # redb's read-only open of a damaged file can allocate (and zero) a page buffer as
        # large as a damaged page pointer says, up to 4 GiB, before finding the read out of
        # range: transient, and not something idemstore can prevent (see README.md).
        rss=5120
    fi
    # The first corpus directory receives new inputs; the kept corpus is only read.
    cargo "$toolchain" fuzz run -O --sanitizer "$sanitizer" "$t" "$found" "corpus/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb="$rss" -timeout=20 -print_final_stats=1 \
        >"$log" 2>&1 || status=$?
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
    rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)"
    if [[ $status -ne 0 ]]; then
        # Show the report (the panic message and where the input was saved).
        grep -v '^ *at \| [0-9]*: ' "$log" | tail -n 60 >&2 || true
        failed+=("$t")
        summary+=("$(printf '%-16s FAILED (exit %s) after %s executions' "$t" "$status" "${execs:-?}")")
    else
        summary+=("$(printf '%-16s %10s executions (%s/s)' "$t" "${execs:-?}" "${rate:-?}")")
    fi
    echo "${summary[-1]}"
done

printf '\n==> fuzz summary (%ss per target, sanitizer %s)\n' "$seconds" "$sanitizer"
printf '%s\n' "${summary[@]}"
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "fuzzing found a problem in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
