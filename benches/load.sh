#!/usr/bin/env bash
# Side-by-side load harness: idemgate vs nginx proxy_pass, same machine, same run.
#
#   benches/load.sh                  # 3 alternated rounds of 10 s per scenario
#   ROUNDS=5 DURATION=20 benches/load.sh
#   CONNS=256 ONLY=pg benches/load.sh   # clients per run, both sides (64 by default)
#
# Starts, on free loopback ports: an nginx upstream that answers a small JSON
# body over http and over https (a test CA made with openssl), and bodies of
# 1 KiB to 1 MiB (1 worker); nginx proxy_pass with a keepalive pool as the
# baseline (2 workers); redis-server; PostgreSQL (its own data folder,
# synchronous_commit on, fsync on); idemgate on the memory store, on Redis and
# on PostgreSQL. Drives each with wrk -t1 -c$CONNS, alternating baseline and
# candidate runs, and prints req/s, p50, p99 and each candidate's ratio to
# nginx from the same run, then idemgate's RSS under c=256 on Redis. Installs
# nginx, wrk, redis-server and PostgreSQL from Debian's packages when missing
# (needs root). Stops everything at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
ONLY=${ONLY:-mem,redis,replay,pg,nokey,tls,rss}   # a subset for quick iterations; also: bodies, traced
# PREFILL=10000000 fills Redis (and the memory store, when mem runs) with
# that many records first (see below).
want() { [[ ",$ONLY," == *",$1,"* ]]; }
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}

need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
command -v redis-server >/dev/null || need+=(redis-server)
want pg && ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null && need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" -eq 0 ] || { echo "load.sh: ${need[*]} missing; run as root" >&2; exit 2; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
[ -n "${BIN:-}" ] || cargo build --release --quiet --bin idemgate
BIN=${BIN:-$PWD/target/release/idemgate}   # BIN=... measures another build

WORK=$(mktemp -d)
pids=()
# PostgreSQL refuses to run as root: its programs run as `postgres` then.
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
  [ -f "$WORK/pg/data/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$WORK/pg/data" stop -m fast >/dev/null 2>&1 || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$WORK/up/nginx.pid" ] && kill "$(cat "$WORK/up/nginx.pid")" 2>/dev/null || true
  [ -f "$WORK/base/nginx.pid" ] && kill "$(cat "$WORK/base/nginx.pid")" 2>/dev/null || true
  [ -f "$WORK/ups/nginx.pid" ] && kill "$(cat "$WORK/ups/nginx.pid")" 2>/dev/null || true
  [ -f "$WORK/basetls/nginx.pid" ] && kill "$(cat "$WORK/basetls/nginx.pid")" 2>/dev/null || true
  sleep 0.3
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
UP=$(free_port); BASE=$(free_port); REDIS=$(free_port)
MEM=$(free_port); MEM_ADMIN=$(free_port); RED=$(free_port); RED_ADMIN=$(free_port)

nginx_conf() { # dir workers body
  mkdir -p "$1"
  cat > "$1/nginx.conf" <<NGINX
worker_processes $2;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $1; proxy_temp_path $1; fastcgi_temp_path $1; uwsgi_temp_path $1; scgi_temp_path $1;
  keepalive_requests 1000000;
  # Bodies up to 1 MiB (the bodies scenario), buffered in memory as
  # idemgate buffers a covered request, not in temporary files.
  client_max_body_size 4m; client_body_buffer_size 2m;
  $3
}
NGINX
}
# /body/N answers a POST with the N-byte file www/body/N (the 405 a static
# file gives a POST turned into the file itself).
mkdir -p "$WORK/www/body"
chmod 755 "$WORK"   # nginx's workers (not root) read the files
for n in 1k 64k; do head -c "${n/k/K}" /dev/zero | tr '\0' x > "$WORK/www/body/$n"; done
head -c 1M /dev/zero | tr '\0' x > "$WORK/www/body/1m"
nginx_conf "$WORK/up" 1 "server { listen 127.0.0.1:$UP; location / { default_type application/json; return 201 '{\"id\":\"ch_1\",\"amount\":100,\"currency\":\"eur\"}'; }
  location /body/ { root $WORK/www; default_type application/octet-stream; error_page 405 =200 \$uri; } }"
nginx_conf "$WORK/base" 2 "upstream api { server 127.0.0.1:$UP; keepalive 256; }
  server { listen 127.0.0.1:$BASE; location / { proxy_pass http://api; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
# TLS: the same upstream answer over https (a CA and a certificate for
# localhost made here), nginx proxy_pass https:// (verifying it, keepalive,
# session reuse) against idemgate with upstream_ca_file.
UPS=$(free_port); BASE_TLS=$(free_port); TLS=$(free_port); TLS_ADMIN=$(free_port)
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj "/CN=bench CA" \
  -keyout "$WORK/ca.key" -out "$WORK/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=localhost" \
  -keyout "$WORK/up.key" -out "$WORK/up.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost\n' > "$WORK/san.ext"
openssl x509 -req -in "$WORK/up.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca.key" -CAcreateserial \
  -days 2 -extfile "$WORK/san.ext" -out "$WORK/up.pem" 2>/dev/null
nginx_conf "$WORK/ups" 1 "server { listen 127.0.0.1:$UPS ssl; ssl_certificate $WORK/up.pem; ssl_certificate_key $WORK/up.key;
  keepalive_requests 1000000;
  location / { default_type application/json; return 201 '{\"id\":\"ch_1\",\"amount\":100,\"currency\":\"eur\"}'; } }"
nginx_conf "$WORK/basetls" 2 "upstream apis { server localhost:$UPS; keepalive 256; }
  server { listen 127.0.0.1:$BASE_TLS; location / { proxy_pass https://apis; proxy_http_version 1.1; proxy_set_header Connection \"\";
    proxy_ssl_verify on; proxy_ssl_trusted_certificate $WORK/ca.pem; proxy_ssl_name localhost; proxy_ssl_server_name on; proxy_ssl_session_reuse on; } }"
nginx -c "$WORK/up/nginx.conf"
nginx -c "$WORK/base/nginx.conf"
nginx -c "$WORK/ups/nginx.conf"
nginx -c "$WORK/basetls/nginx.conf"

redis-server --port "$REDIS" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" \
  --maxmemory-policy noeviction >/dev/null &
pids+=($!)
# PREFILL=N: Redis holds N completed records (an hour's TTL, a 44-byte body
# like the upstream's) before any run, so the Redis scenarios measure a
# keyspace that size. Filled by a script inside Redis, 100,000 per call.
if [ "${PREFILL:-0}" -gt 0 ] && { want redis || want replay; }; then
  for _ in $(seq 50); do redis-cli -p "$REDIS" ping >/dev/null 2>&1 && break; sleep 0.1; done
  fill='local r = string.rep("x", 200)
for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do
  local k = "idemgate:{fill" .. i .. "}"
  redis.call("HSET", k, "s", "c", "f", i, "r", r)
  redis.call("PEXPIRE", k, 3600000)
end'
  for ((from = 1; from <= PREFILL; from += 100000)); do
    to=$((from + 99999 < PREFILL ? from + 99999 : PREFILL))
    redis-cli -p "$REDIS" eval "$fill" 0 "$from" "$to" >/dev/null
  done
  echo "Redis prefilled: $(redis-cli -p "$REDIS" dbsize) keys, $(redis-cli -p "$REDIS" info memory | awk -F: '/^used_memory_human/ {print $2}' | tr -d '\r')"
fi
cat > "$WORK/idemgate.toml" <<TOML
[store]
max_entries = 100000000
TOML
# With PREFILL the memory store must hold that many records (about 300
# bytes each with this body) past its default 512 MiB bound.
[ "${PREFILL:-0}" -gt 0 ] && echo 'max_bytes = "32GiB"' >> "$WORK/idemgate.toml"
env RUST_LOG=warn ${THREADS:+TOKIO_WORKER_THREADS=$THREADS} "$BIN" --config "$WORK/idemgate.toml" --upstream "http://127.0.0.1:$UP" \
  --listen "127.0.0.1:$MEM" --admin-listen "127.0.0.1:$MEM_ADMIN" 2>"$WORK/mem.log" &
MEM_PID=$!; pids+=($MEM_PID)
sleep 0.5
env RUST_LOG=warn ${THREADS:+TOKIO_WORKER_THREADS=$THREADS} "$BIN" --upstream "http://127.0.0.1:$UP" --redis "redis://127.0.0.1:$REDIS" \
  --listen "127.0.0.1:$RED" --admin-listen "127.0.0.1:$RED_ADMIN" 2>"$WORK/red.log" &
RED_PID=$!; pids+=($RED_PID)
printf 'upstream_ca_file = "%s"\n[store]\nmax_entries = 100000000\n' "$WORK/ca.pem" > "$WORK/tls.toml"
env RUST_LOG=warn ${THREADS:+TOKIO_WORKER_THREADS=$THREADS} "$BIN" --config "$WORK/tls.toml" --upstream "https://localhost:$UPS" \
  --listen "127.0.0.1:$TLS" --admin-listen "127.0.0.1:$TLS_ADMIN" 2>"$WORK/tls.log" &
pids+=($!)
# traced: the memory store with its spans exported over OTLP/HTTP to a
# receiver that accepts them (the upstream nginx answers 201 to any POST,
# /v1/traces included); TRACE_RATIO of the requests sampled (default 1).
TRC_ADMIN=""
if want traced; then
  TRC=$(free_port); TRC_ADMIN=$(free_port)
  env RUST_LOG=warn ${THREADS:+TOKIO_WORKER_THREADS=$THREADS} OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$UP" \
    OTEL_TRACES_SAMPLER=traceidratio OTEL_TRACES_SAMPLER_ARG="${TRACE_RATIO:-1}" "$BIN" --config "$WORK/idemgate.toml" --upstream "http://127.0.0.1:$UP" \
    --listen "127.0.0.1:$TRC" --admin-listen "127.0.0.1:$TRC_ADMIN" 2>"$WORK/trc.log" &
  pids+=($!)
fi
# PostgreSQL as an operator who keeps acknowledged records would run it:
# every commit flushed (fsync, synchronous_commit on), 512 MiB of shared
# buffers; idemgate on it with the default pool (16 connections).
PG_ADMIN=""
if want pg; then
  PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  PGPORT=$(free_port); PGI=$(free_port); PG_ADMIN=$(free_port)
  mkdir -p "$WORK/pg"
  [ "$(id -u)" -eq 0 ] && chown postgres "$WORK/pg"
  as_pg "$PGBIN/initdb" -D "$WORK/pg/data" -U postgres --auth=trust >/dev/null
  as_pg "$PGBIN/postgres" -D "$WORK/pg/data" -p "$PGPORT" -c listen_addresses=127.0.0.1 \
    -c unix_socket_directories="$WORK/pg" -c shared_buffers=512MB -c max_connections=200 \
    -c synchronous_commit=on -c fsync=on 2>"$WORK/pg/server.log" &
  pids+=($!)
  for _ in $(seq 100); do "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PGPORT" && break; sleep 0.1; done
  printf '[store]\nbackend = "postgres"\nurl = "postgres://postgres@127.0.0.1:%s/postgres"\n' "$PGPORT" > "$WORK/pg.toml"
  env RUST_LOG=warn ${THREADS:+TOKIO_WORKER_THREADS=$THREADS} "$BIN" --config "$WORK/pg.toml" --upstream "http://127.0.0.1:$UP" \
    --listen "127.0.0.1:$PGI" --admin-listen "127.0.0.1:$PG_ADMIN" 2>"$WORK/pgi.log" &
  pids+=($!)
fi
for p in $MEM_ADMIN $RED_ADMIN $TLS_ADMIN $PG_ADMIN $TRC_ADMIN; do
  for _ in $(seq 50); do curl -sf "http://127.0.0.1:$p/readyz" >/dev/null && break; sleep 0.1; done
done

# PREFILL on the memory store: the records are made the only way a memory
# store gets them, by requests with new keys (wrk, 10 s at a time, counted
# from wrk's totals); at ~20k req/s ten million take about 8 minutes.
prefill_memory() {
  local done=0
  while [ "$done" -lt "$PREFILL" ]; do
    wrk -t1 -c64 -d10s -s "$WORK/unique.lua" "http://127.0.0.1:$MEM/v1/charges" > "$WORK/outfill" 2>&1 || true
    done=$((done + $(awk '/requests in/ {print $1}' "$WORK/outfill")))
  done
  echo "memory store prefilled: $done records, idemgate RSS $(awk '/VmRSS/ {printf "%d MiB", $2/1024}' "/proc/$MEM_PID/status")"
}

# wrk request scripts (benches/wrk/): the same Lua cost for baseline and
# candidate.
cp benches/wrk/unique.lua benches/wrk/replay.lua benches/wrk/nokey.lua "$WORK/"

# run PORT SCRIPT CONNS -> "rps p50_ms p99_ms"
run() {
  wrk -t1 -c"$3" -d"${DURATION}s" --latency -s "$WORK/$2" "http://127.0.0.1:$1/v1/charges" > "$WORK/out" 2>&1 || true
  python3 - "$WORK/out" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
if "Requests/sec" not in t or "99%" not in t:
    sys.exit("wrk failed:\n" + t)
def ms(v):
    num, unit = re.match(r"([\d.]+)(us|ms|s|m)", v).groups()
    return float(num) * {"us": 1e-3, "ms": 1, "s": 1e3, "m": 6e4}[unit]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
# Anchored: "62.50%" in the Req/Sec line must not read as the 50th percentile.
p50 = ms(re.search(r"^\s+50%\s+(\S+)", t, re.M).group(1))
p99 = ms(re.search(r"^\s+99%\s+(\S+)", t, re.M).group(1))
non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
errs = re.search(r"Socket errors: (.*)", t)
print(f"{rps:.0f} {p50:.3f} {p99:.3f} {non2xx.group(1) if non2xx else 0} {'errors' if errs else 'ok'}")
PY
}

median() { python3 -c 'import sys,statistics; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }

if [ "${PREFILL:-0}" -gt 0 ] && want mem; then prefill_memory; fi
echo "idemgate $("$BIN" --version | cut -d' ' -f2) vs nginx $(nginx -v 2>&1 | cut -d/ -f2); wrk -t1 -c$CONNS -d${DURATION}s, $ROUNDS alternated rounds, $(nproc) cores"
echo
printf '| %-28s | %9s | %8s | %8s | %9s | %8s | %8s | %6s | %8s |\n' scenario "nginx r/s" "p50 ms" "p99 ms" "idem r/s" "p50 ms" "p99 ms" ratio "non-2xx"
printf '|%s|\n' "------------------------------|-----------|----------|----------|-----------|----------|----------|--------|----------"
scenario() { # name port script [baseline port]
  local base=${4:-$BASE}
  local b_rps=() b50=() b99=() c_rps=() c50=() c99=() bad=0
  for _ in $(seq "$ROUNDS"); do
    read -r r a p n _ < <(run "$base" "$3" "$CONNS"); b_rps+=("$r"); b50+=("$a"); b99+=("$p")
    read -r r a p n _ < <(run "$2" "$3" "$CONNS"); c_rps+=("$r"); c50+=("$a"); c99+=("$p"); bad=$((bad + n))
  done
  local br cr
  br=$(median "${b_rps[@]}"); cr=$(median "${c_rps[@]}")
  printf '| %-28s | %9.0f | %8.3f | %8.3f | %9.0f | %8.3f | %8.3f | %5.2fx | %8s |\n' "$1" "$br" \
    "$(median "${b50[@]}")" "$(median "${b99[@]}")" "$cr" "$(median "${c50[@]}")" "$(median "${c99[@]}")" \
    "$(python3 -c "print($cr/$br)")" "$bad"
}
want mem && scenario "unique keys (memory)" "$MEM" unique.lua
want traced && scenario "unique keys (memory, traced)" "$TRC" unique.lua
want traced && echo "traced (ratio ${TRACE_RATIO:-1}): $(curl -s "http://127.0.0.1:$TRC_ADMIN/metrics" | grep '^idemgate_trace_spans_dropped_total') (about 4 spans a sampled request)"
want redis && scenario "unique keys (Redis)" "$RED" unique.lua
want replay && scenario "replay of one key (Redis)" "$RED" replay.lua
want pg && scenario "unique keys (Postgres)" "$PGI" unique.lua
want pg && scenario "replay of one key (Postgres)" "$PGI" replay.lua
want nokey && scenario "no key, pass-through (memory)" "$MEM" nokey.lua
want tls && scenario "no key, https upstream" "$TLS" nokey.lua "$BASE_TLS"
want tls && scenario "unique keys, https upstream" "$TLS" unique.lua "$BASE_TLS"
if want bodies; then
  # Unique keys on the memory store with request and response bodies of
  # each size. Records live 2 s here, so a 1 MiB run holds about 2 s of
  # them rather than every one (the memory bound is raised to match).
  BODY=$(free_port); BODY_ADMIN=$(free_port)
  printf '[idempotency]\nmax_request_body = "2MiB"\nrecord_ttl = "2s"\n[store]\nmax_entries = 100000000\nmax_bytes = "8GiB"\n' > "$WORK/body.toml"
  env RUST_LOG=warn "$BIN" --config "$WORK/body.toml" --upstream "http://127.0.0.1:$UP" \
    --listen "127.0.0.1:$BODY" --admin-listen "127.0.0.1:$BODY_ADMIN" 2>"$WORK/body.log" &
  BODY_PID=$!; pids+=($BODY_PID)
  for _ in $(seq 50); do curl -sf "http://127.0.0.1:$BODY_ADMIN/readyz" >/dev/null && break; sleep 0.1; done
  rss_after=""
  for sz in 1k 64k 1m; do
    size=${sz/k/*1024}; size=${size/1m/1048576}
    cat > "$WORK/body$sz.lua" <<LUA
local n = 0
local prefix = tostring(math.random(1, 1e9)) .. "-" .. tostring(os.time())
wrk.method = "POST"
wrk.body = string.rep("x", $size)
request = function()
  n = n + 1
  return wrk.format(nil, "/body/$sz", {["Content-Type"] = "application/octet-stream", ["Idempotency-Key"] = prefix .. "-" .. n})
end
LUA
    scenario "unique keys, $sz bodies (memory)" "$BODY" "body$sz.lua"
    rss_after+="idemgate RSS after the $sz runs: $(awk '/VmRSS/ {printf "%d MiB", $2/1024}' "/proc/$BODY_PID/status")\n"
  done
  printf '\n%b' "$rss_after"
fi
want rss || exit 0

# RSS of idemgate on Redis under unique keys, at each of RSS_CONNS
# connections (default 256; e.g. RSS_CONNS="16 64 256 1024").
echo
for c in ${RSS_CONNS:-256}; do
  rss_max=0
  wrk -t1 -c"$c" -d"${DURATION}s" -s "$WORK/unique.lua" "http://127.0.0.1:$RED/v1/charges" > "$WORK/outrss" 2>&1 &
  WRK=$!
  while kill -0 "$WRK" 2>/dev/null; do
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$RED_PID/status")
    [ "$rss" -gt "$rss_max" ] && rss_max=$rss
    sleep 0.2
  done
  echo "idemgate RSS on Redis at c=$c (unique keys): max $((rss_max / 1024)) MiB; $(grep Requests/sec "$WORK/outrss" | awk '{printf "%.0f req/s", $2}')"
done
