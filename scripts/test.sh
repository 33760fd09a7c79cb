#!/usr/bin/env bash
# Runs idemgate's whole test suite on a fresh machine.
#
# Installs what the tests need when it is missing (redis-server, redis-cli
# and promtool from Debian's packages, needs root; cargo-deny from
# crates.io), checks the dependencies against deny.toml, then runs every
# test. The
# tests start their own servers (upstreams, Redis, Redis Cluster) on
# loopback ports the OS picks, and stop them when done.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v redis-server >/dev/null 2>&1 || need_pkgs+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need_pkgs+=(redis-tools)
command -v promtool >/dev/null 2>&1 || need_pkgs+=(prometheus)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/test.sh: ${need_pkgs[*]} missing; run as root (or install them) first" >&2
    exit 2
  fi
  echo "installing ${need_pkgs[*]} ..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi
# The Debian package starts a system redis on 6379; the tests never use it.

# Supply chain: licenses, banned crates and sources (deny.toml), offline.
# The advisory database needs the network, so it is not checked here.
if ! command -v cargo-deny >/dev/null 2>&1; then
  echo "installing cargo-deny ..."
  cargo install cargo-deny --locked --quiet
fi
cargo deny --offline --log-level error check licenses bans sources

# The worker end-to-end test runs the example binary itself; `cargo test`
# builds examples only as test harnesses.
cargo build --locked --examples
cargo test --locked --all-targets "$@"
