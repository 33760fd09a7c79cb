#!/usr/bin/env bash
# The thread-per-core shape: one idemgate with two event loops
# (IDEMGATE_EVENT_LOOPS=2: a single-threaded runtime per thread, each
# accepting on its own SO_REUSEPORT socket), against one idemgate on its
# default runtime (two work-stealing workers), two idemgate processes with
# one tokio worker each (wrk's thread 1 drives one, thread 2 the other), and
# nginx proxy_pass (two worker processes), all pass-through, wrk -t2 -c64,
# ROUNDS (5) alternated rounds.
#
#   cargo build --release --bin idemgate && benches/thread_per_core.sh [BIN]
#
# Needs nginx and wrk (benches/load.sh installs them). Ports are free
# loopback ports; everything started here is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-$PWD/target/release/idemgate}
W=$(mktemp -d); chmod 755 "$W"
trap 'kill $(jobs -p) 2>/dev/null || true; kill $(cat $W/up.pid $W/base.pid 2>/dev/null) 2>/dev/null || true; sleep 0.3; rm -rf "$W"' EXIT
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
UP=$(port); BASE=$(port); A=$(port); B=$(port); C=$(port); L=$(port)
cat > $W/up.conf <<N
worker_processes 1; pid $W/up.pid; error_log /dev/null; events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000; server { listen 127.0.0.1:$UP; location / { default_type application/json; return 201 '{"id":"ch_1","amount":100,"currency":"eur"}'; } } }
N
cat > $W/base.conf <<N
worker_processes 2; pid $W/base.pid; error_log /dev/null; events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000; upstream api { server 127.0.0.1:$UP; keepalive 256; }
server { listen 127.0.0.1:$BASE; location / { proxy_pass http://api; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
N
nginx -c $W/up.conf; nginx -c $W/base.conf
for p in $A $B; do TOKIO_WORKER_THREADS=1 RUST_LOG=warn "$BIN" --upstream http://127.0.0.1:$UP --listen 127.0.0.1:$p --admin-listen 127.0.0.1:$(port) 2>/dev/null & done
RUST_LOG=warn "$BIN" --upstream http://127.0.0.1:$UP --listen 127.0.0.1:$C --admin-listen 127.0.0.1:$(port) 2>/dev/null &
IDEMGATE_EVENT_LOOPS=2 RUST_LOG=warn "$BIN" --upstream http://127.0.0.1:$UP --listen 127.0.0.1:$L --admin-listen 127.0.0.1:$(port) 2>/dev/null &
sleep 1
mk() { cat > $W/$1.lua <<LUA
wrk.method = "POST"
wrk.body = '{"amount":100,"currency":"eur"}'
wrk.headers["Content-Type"] = "application/json"
local n = 0
function setup(thread)
  n = n + 1
  local port = (n == 1) and "$2" or "$3"
  thread.addr = wrk.lookup("127.0.0.1", port)[1]
end
LUA
}
mk nginx $BASE $BASE; mk two $C $C; mk tpc $A $B; mk loops $L $L
echo "req/s, pass-through: nginx proxy_pass | idemgate, 2 workers | 2 x idemgate, 1 worker each | idemgate, 2 event loops"
for _ in $(seq "${ROUNDS:-5}"); do
  for s in nginx two tpc loops; do
    printf '%s ' "$(wrk -t2 -c64 -d4s -s "$W/$s.lua" "http://127.0.0.1:$BASE/v1/charges" | awk '/Requests\/sec/ {printf "%.0f", $2}')"
  done
  echo
done
