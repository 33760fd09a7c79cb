#!/usr/bin/env bash
# idemgate's CPU time and context switches per request, from /proc, under
# wrk: finer than a throughput ratio when comparing two builds (alternate
# them; this shared machine still moves figures by about 10%).
#
#   benches/cpu_per_request.sh BIN nokey|unique [redis|postgres]
#   C=1 D=8 benches/cpu_per_request.sh target/release/idemgate nokey
#   benches/cpu_per_request.sh nginx unique     # nginx proxy_pass instead
#
# Starts an nginx upstream (1 worker, a 44-byte JSON answer), optionally
# redis-server or PostgreSQL (as benches/load.sh starts it: its own data
# folder, synchronous_commit and fsync on), and idemgate on free loopback
# ports; warms up for 2 s, then runs wrk -t1 -c$C (64) for $D (6) seconds
# and prints p50, req/s, CPU microseconds (user + system, from
# /proc/<pid>/stat) and context switches (every thread's, from
# /proc/<pid>/task/*/status) per request; then where the rest of the
# machine's CPU went, per request: Redis's, or every PostgreSQL process's,
# the upstream's and wrk's. BIN `nginx` measures nginx proxy_pass as
# benches/load.sh runs it (2 workers, keepalive 256) in idemgate's place,
# for the same split. Everything started here is stopped at the end.
set -euo pipefail
BIN=$1 SCRIPT=$2 STORE=${3:-memory}
W=$(mktemp -d); chmod 755 "$W"
pids=()
# PostgreSQL refuses to run as root: its programs run as `postgres` then.
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  [ -f "$W/nginx.pid" ] && kill "$(cat "$W/nginx.pid")" 2>/dev/null || true
  [ -f "$W/pg/data/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$W/pg/data" stop -m fast >/dev/null 2>&1 || true
  sleep 0.3; rm -rf "$W"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP=$(port) P=$(port) A=$(port) R=$(port)
cat > "$W/nginx.conf" <<N
worker_processes 1; pid $W/nginx.pid; error_log /dev/null; events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000; server { listen 127.0.0.1:$UP;
  location / { default_type application/json; return 201 '{"id":"ch_1","amount":100,"currency":"eur"}'; } } }
N
nginx -c "$W/nginx.conf"
extra=()
if [ "$STORE" = redis ]; then
  redis-server --port "$R" --bind 127.0.0.1 --save "" --appendonly no --dir "$W" >/dev/null &
  pids+=($!)
  sleep 0.3
  extra=(--redis "redis://127.0.0.1:$R")
fi
printf '[store]\nmax_entries = 100000000\n' > "$W/idemgate.toml"
if [ "$STORE" = postgres ]; then
  [ -n "$PGBIN" ] || { echo "cpu_per_request.sh: PostgreSQL is not installed" >&2; exit 2; }
  mkdir -p "$W/pg"; [ "$(id -u)" -eq 0 ] && chown postgres "$W/pg"
  as_pg "$PGBIN/initdb" -D "$W/pg/data" -U postgres --auth=trust >/dev/null
  as_pg "$PGBIN/postgres" -D "$W/pg/data" -p "$R" -c listen_addresses=127.0.0.1 \
    -c unix_socket_directories="$W/pg" -c shared_buffers=512MB -c max_connections=200 \
    -c synchronous_commit=on -c fsync=on ${PGOPTS:-} 2>"$W/pg/server.log" &
  for _ in $(seq 100); do "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$R" && break; sleep 0.1; done
  printf '[store]\nbackend = "postgres"\nurl = "postgres://postgres@127.0.0.1:%s/postgres"\n' "$R" > "$W/idemgate.toml"
fi
if [ "$BIN" = nginx ]; then
  cat > "$W/proxy.conf" <<N
worker_processes 2; pid $W/proxy.pid; error_log /dev/null; events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000; upstream api { server 127.0.0.1:$UP; keepalive 256; }
  server { listen 127.0.0.1:$P; location / { proxy_pass http://api; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
N
  nginx -c "$W/proxy.conf"; sleep 0.3
  PID=$(cat "$W/proxy.pid")
  trap 'kill "$PID" 2>/dev/null || true; cleanup' EXIT
else
  RUST_LOG=warn "$BIN" --config "$W/idemgate.toml" --upstream "http://127.0.0.1:$UP" "${extra[@]}" \
    --listen "127.0.0.1:$P" --admin-listen "127.0.0.1:$A" 2>"$W/idemgate.log" &
  PID=$!; pids+=($PID)
  for _ in $(seq 50); do curl -sf "http://127.0.0.1:$A/readyz" >/dev/null && break; sleep 0.1; done
fi
case $SCRIPT in
  nokey | unique) cp "$(dirname "$0")/wrk/$SCRIPT.lua" "$W/s.lua" ;;
  *) echo "cpu_per_request.sh: SCRIPT is nokey or unique" >&2; exit 2 ;;
esac
url="http://127.0.0.1:$P/v1/charges"
wrk -t1 -c64 -d2s -s "$W/s.lua" "$url" >/dev/null
# The proxy's processes: idemgate, or nginx's master and workers.
proxy_pids() { echo "$PID" $(pgrep -P "$PID" || true); }
switches() {
  for p in $(proxy_pids); do cat /proc/"$p"/task/*/status; done |
    awk '/ctxt_switches/ {s += $2} END {print s}'
}
# CPU ticks (user + system) of the given processes.
ticks() { for p in "$@"; do cat "/proc/$p/stat" 2>/dev/null; done | awk '{s += $14 + $15} END {print s + 0}'; }
# The store's processes: redis-server, or every PostgreSQL process (its
# backends come and go with the pool).
store_pids() {
  case $STORE in
    redis) pgrep -f "redis-server 127.0.0.1:$R" || true ;;
    postgres) local pm; pm=$(head -1 "$W/pg/data/postmaster.pid"); echo "$pm" $(pgrep -P "$pm" || true) ;;
  esac
}
upstream_pids() { local m; m=$(cat "$W/nginx.pid"); echo "$m" $(pgrep -P "$m" || true); }
c0=$(switches); t0=$(ticks $(proxy_pids)); g0=$(ticks $(store_pids)); u0=$(ticks $(upstream_pids))
# wrk's own CPU, from bash's `time` (seconds, user and system).
out=$( { TIMEFORMAT='%U %S'; time wrk -t1 -c"${C:-64}" -d"${D:-6}s" --latency -s "$W/s.lua" "$url" 2>&1; } 2>&1 )
t1=$(ticks $(proxy_pids)); c1=$(switches); g1=$(ticks $(store_pids)); u1=$(ticks $(upstream_pids))
n=$(awk '/requests in/ {print $1}' <<<"$out")
rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
p50=$(awk '/^ +50%/ {print $2}' <<<"$out")
wrk_s=$(tail -1 <<<"$out" | awk '{print $1 + $2}')
hz=$(getconf CLK_TCK)
python3 - "$BIN" "$SCRIPT" "$STORE" "${C:-64}" "$p50" "$rps" "$t0" "$t1" "$c0" "$c1" "$n" "$hz" "$g0" "$g1" "$u0" "$u1" "$wrk_s" <<'PY'
import os, sys
b, script, store, c, p50, rps, t0, t1, c0, c1, n, hz, g0, g1, u0, u1, wrk_s = sys.argv[1:]
n = int(n)
per = lambda a, z: (float(z) - float(a)) / float(hz) * 1e6 / n
sw = (int(c1) - int(c0)) / n
rest = ([f"{'Redis' if store == 'redis' else 'PostgreSQL'} {per(g0, g1):.1f}"]
        if store != "memory" else [])
rest += [f"upstream {per(u0, u1):.1f}", f"wrk {float(wrk_s) * 1e6 / n:.1f}"]
print(f"{os.path.basename(b)} {script} {store} c={c}: p50 {p50}, {float(rps):.0f} req/s, "
      f"{per(t0, t1):.1f} us CPU/request, {sw:.2f} context switches/request; "
      f"elsewhere, us CPU/request: {', '.join(rest)}")
PY
