#!/usr/bin/env bash
# Rehearses a new machine: clones this repository's HEAD into a temporary
# folder and runs the README's two set-up commands there, each with an empty
# cargo registry cache (a fresh CARGO_HOME of its own), while still finding
# the installed toolchain (rustup's RUSTUP_HOME) and tools already on PATH.
# Prints how long each phase took.
#
#   scripts/fresh-clone-check.sh              both commands
#   scripts/fresh-clone-check.sh --test-only  only the test command
#   KEEP=1 scripts/fresh-clone-check.sh       keep the folder afterwards
#
# Run it after any change to dependencies, scripts/test.sh or .ci/run: a warm
# cargo cache hides a missing install step. Only committed work is cloned.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
run_phase=1
case "${1:-}" in
  "") ;;
  --test-only) run_phase=0 ;;
  *) echo "usage: scripts/fresh-clone-check.sh [--test-only]" >&2; exit 2 ;;
esac

if [ -n "$(git -C "$top" status --porcelain)" ]; then
  echo "fresh-clone-check: uncommitted changes are not part of the clone" >&2
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/idemgate-fresh.XXXXXX")
cleanup() {
  if [ "${KEEP:-0}" = 1 ]; then
    echo "fresh-clone-check: kept $work" >&2
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT

# The toolchain stays where rustup put it; only the registry cache is new.
if command -v rustup >/dev/null 2>&1; then
  RUSTUP_HOME=$(rustup show home)
  export RUSTUP_HOME
fi

report=()
phase() { # NAME SECONDS
  report+=("$(printf '%-44s %5ds' "$1" "$2")")
  printf 'fresh-clone-check: %s took %ds\n' "$1" "$2" >&2
}

# A shell whose cargo starts from an empty registry cache in $1.
fresh_cargo_env() {
  export CARGO_HOME=$1
  mkdir -p "$CARGO_HOME/bin"
  export PATH="$CARGO_HOME/bin:$PATH"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

start=$SECONDS
git clone --quiet "$top" "$work/idemgate"
phase "clone" $((SECONDS - start))

if [ "$run_phase" = 1 ]; then
  (
    fresh_cargo_env "$work/cargo-run"
    cd "$work/idemgate"
    up=$(free_port)
    listen=$(free_port)
    admin=$(free_port)
    # Any API will do; Python's answers POST with 501, which is still stored.
    python3 -m http.server "$up" --bind 127.0.0.1 >/dev/null 2>&1 &
    upstream_pid=$!
    start=$SECONDS
    # The README's first command, on free ports instead of 8081 and 9901.
    cargo run --release --locked -- --upstream "http://127.0.0.1:$up" \
      --listen "127.0.0.1:$listen" --admin-listen "127.0.0.1:$admin" \
      >"$work/run.log" 2>&1 &
    sidecar_pid=$!
    trap 'kill $sidecar_pid $upstream_pid 2>/dev/null || true' EXIT
    until curl -fsS "http://127.0.0.1:$admin/healthz" >/dev/null 2>&1; do
      if ! kill -0 "$sidecar_pid" 2>/dev/null; then
        echo "fresh-clone-check: the sidecar exited before it answered; its output:" >&2
        tail -n 40 "$work/run.log" >&2
        exit 1
      fi
      sleep 1
    done
    printf 'fresh-clone-check: first build and start took %ds\n' $((SECONDS - start)) >&2
    echo $((SECONDS - start)) >"$work/run.seconds"
    # It works as the walk-through says: the retry is a replay.
    for _ in 1 2; do
      curl -s -o /dev/null -D "$work/headers" -X POST "http://127.0.0.1:$listen/v1/charges" \
        -H 'Idempotency-Key: fresh-clone-check' -d '{"amount": 1000}'
    done
    if ! grep -qi '^idempotent-replayed: true' "$work/headers"; then
      echo "fresh-clone-check: the retry was not replayed; headers:" >&2
      cat "$work/headers" >&2
      exit 1
    fi
  )
  phase "run command: first build and start (release)" "$(cat "$work/run.seconds")"
fi

(
  fresh_cargo_env "$work/cargo-test"
  cd "$work/idemgate"
  start=$SECONDS
  bash .ci/run
  echo $((SECONDS - start)) >"$work/test.seconds"
)
phase "test command: whole suite (bash .ci/run)" "$(cat "$work/test.seconds")"
# A CI machine has a disk of its own size: a build that outgrows it fails in
# the linker, not in a test. The clone, its target/ and both registry caches:
disk=$(du -sh "$work" | cut -f1)

echo
echo "fresh-clone-check: passed (HEAD $(git -C "$top" rev-parse --short HEAD), $(nproc) cores)"
printf '  %s\n' "${report[@]}"
printf '  %-44s %6s\n' "disk used (clone, target/, cargo caches)" "$disk"
