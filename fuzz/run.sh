#!/usr/bin/env bash
# Runs each libFuzzer target for SECONDS seconds, seeded with the committed corpus
# (crates/lb-fuzz/corpus/<target>/), on the stable toolchain (`--sanitizer none`: no -Z
# flags). Prints one line per target for `cargo xtask reliability`:
#   RELIABILITY {"section":"fuzz","target":"config","seconds":60,"execs":E,"crashes":0,"corpus":C}
# New inputs go to fuzz/corpus/<target>/ (not committed); a crash is written to
# fuzz/artifacts/<target>/ and stops that target (see fuzz/README.md for what to do with it).
# Usage: fuzz/run.sh SECONDS [TARGET...]   (exit 1 if any target crashed)
set -euo pipefail
cd "$(dirname "$0")"

seconds="${1:?usage: fuzz/run.sh SECONDS [TARGET...]}"
shift
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(config http1_head core_events)

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "fuzz/run.sh: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked >&2
fi
export CARGO_INCREMENTAL=0
# -O -a: optimized, with debug assertions and overflow checks (an overflow is a crash).
cargo fuzz build --sanitizer none -O -a >&2
triple="$(rustc -vV | sed -n 's/^host: //p')"
failed=0
for t in "${targets[@]}"; do
  bin="target/$triple/release/$t"
  work="corpus/$t"
  artifacts="artifacts/$t"
  mkdir -p "$work" "$artifacts"
  log="$(mktemp)"
  status=0
  "$bin" "$work" "../crates/lb-fuzz/corpus/$t" \
    -max_total_time="$seconds" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 \
    -max_len=8192 -artifact_prefix="$artifacts/" >"$log" 2>&1 || status=$?
  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
  corpus="$(find "$work" -type f | wc -l | tr -d ' ')"
  crashes=0
  if [ "$status" -ne 0 ]; then
    crashes=1
    failed=1
    echo "fuzz/run.sh: $t crashed; its input is in fuzz/$artifacts/:" >&2
    grep -E "panicked|SUMMARY|Test unit written" "$log" >&2 || tail -20 "$log" >&2
  fi
  rm -f "$log"
  echo "RELIABILITY {\"section\":\"fuzz\",\"target\":\"$t\",\"seconds\":$seconds,\"execs\":${execs:-0},\"crashes\":$crashes,\"corpus\":$corpus}"
done
exit "$failed"
