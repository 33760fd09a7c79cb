#!/usr/bin/env bash
# Soak: a long mixed load on the Redis store, then the health of what is left.
#
#   benches/soak.sh                 # 10 minutes
#   SOAK_SECONDS=120 benches/soak.sh
#
# Starts an nginx upstream, redis-server and idemgate (release build) on free
# loopback ports and drives idemgate with wrk: 40% new keys, 40% replays of a
# hot set of 200 keys, 20% requests without a key. Reports idemgate's RSS one
# minute in and at the end (should be flat: state lives in Redis), request
# errors (should be 0), and whether every key idemgate wrote carries a TTL
# (Redis' own counts: keys == expires). Installs nginx, wrk and redis-server
# from Debian's packages when missing (needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TOTAL=${SOAK_SECONDS:-600}
need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
command -v redis-server >/dev/null || need+=(redis-server)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
cargo build --release --quiet --bin idemgate
BIN=$PWD/target/release/idemgate
WORK=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  sleep 0.3; rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
UP=$(free_port); REDIS=$(free_port); PROXY=$(free_port); ADMIN=$(free_port)
cat > "$WORK/nginx.conf" <<NGINX
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/error.log warn;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path $WORK; proxy_temp_path $WORK; fastcgi_temp_path $WORK; uwsgi_temp_path $WORK; scgi_temp_path $WORK;
  server { listen 127.0.0.1:$UP; location / { default_type application/json; return 201 '{"id":"ch_1","amount":100}'; } } }
NGINX
nginx -c "$WORK/nginx.conf"
redis-server --port "$REDIS" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" --maxmemory-policy noeviction >/dev/null &
pids+=($!)
cat > "$WORK/idemgate.toml" <<TOML
[idempotency]
record_ttl = "60s"
TOML
RUST_LOG=warn "$BIN" --config "$WORK/idemgate.toml" --upstream "http://127.0.0.1:$UP" --redis "redis://127.0.0.1:$REDIS" \
  --listen "127.0.0.1:$PROXY" --admin-listen "127.0.0.1:$ADMIN" 2>"$WORK/idemgate.log" &
IDG=$!; pids+=($IDG)
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$ADMIN/readyz" >/dev/null && break; sleep 0.1; done
cat > "$WORK/mixed.lua" <<'LUA'
local n = 0
local prefix = tostring(math.random(1, 1e9))
wrk.method = "POST"
wrk.body = '{"amount":100}'
request = function()
  n = n + 1
  local r = math.random(1, 10)
  local h = {["Content-Type"] = "application/json"}
  if r <= 4 then h["Idempotency-Key"] = prefix .. "-" .. n
  elseif r <= 8 then h["Idempotency-Key"] = "hot-" .. math.random(1, 200) end
  return wrk.format(nil, "/v1/charges", h)
end
LUA
rss() { awk '/VmRSS/ {print $2}' "/proc/$IDG/status"; }
wrk -t1 -c32 -d"${SECONDS_TOTAL}s" --timeout 15s -s "$WORK/mixed.lua" "http://127.0.0.1:$PROXY/v1/charges" > "$WORK/wrk.txt" 2>&1 &
WRK=$!
sleep 60; RSS_START=$(rss)
wait $WRK
RSS_END=$(rss)
echo "soak: ${SECONDS_TOTAL}s, wrk -t1 -c32, mixed 40% new keys / 40% replays of 200 hot keys / 20% no key, Redis store, record_ttl 60s"
grep -E "requests in|Requests/sec|Non-2xx|Socket errors" "$WORK/wrk.txt" | sed 's/^/  /'
python3 - "$RSS_START" "$RSS_END" <<'PY'
import sys
a, b = int(sys.argv[1]), int(sys.argv[2])
print(f"  idemgate RSS: {a/1024:.1f} MiB at 1 min, {b/1024:.1f} MiB at the end ({(b-a)*100/a:+.1f}%)")
PY
KEYSPACE=$(redis-cli -p "$REDIS" INFO keyspace | grep db0 || true)
echo "  Redis keyspace after the run: ${KEYSPACE:-empty}"
python3 - "$KEYSPACE" <<'PY'
import re, sys
m = re.search(r"keys=(\d+),expires=(\d+)", sys.argv[1])
if m:
    keys, expires = map(int, m.groups())
    print(f"  keys without a TTL: {keys - expires}")
PY
echo "  store errors logged: $(grep -c -i 'store' "$WORK/idemgate.log" || true)"
