#!/usr/bin/env bash
# Runs each fuzz target for FUZZ_SECONDS (default 600) with its seed corpus.
#   fuzz/run.sh            # key, record, config, sealed, pointer, signature: 10 minutes each
#   FUZZ_SECONDS=60 fuzz/run.sh record
# Needs cargo-fuzz (cargo install cargo-fuzz); RUSTC_BOOTSTRAP=1 lets it build
# on the stable toolchain. Crashes land in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")"
SECS=${FUZZ_SECONDS:-600}
TARGETS=("${@:-key record config sealed pointer signature}")
for t in ${TARGETS[@]}; do
  mkdir -p "corpus/$t" "target/corpus/$t"
  echo "== $t: ${SECS}s"
  # New inputs go to target/corpus (not committed); the seeds stay as they are.
  RUSTC_BOOTSTRAP=1 cargo fuzz run "$t" "target/corpus/$t" "corpus/$t" -- \
    -max_total_time="$SECS" -print_final_stats=1 2>&1 | grep -E "^#|Done|stat::|ERROR|panicked|SUMMARY" | tail -12
done
