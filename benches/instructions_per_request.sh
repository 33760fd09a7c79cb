#!/usr/bin/env bash
# idemgate's instructions per request, counted by valgrind's callgrind:
# the same binary and load give the same count whatever else this shared
# machine is doing, so two builds compare within a fraction of a percent
# where CPU time moves by 10 % (benches/cpu_per_request.sh). Counts are
# instructions, not time: a copy of 4 KiB is 130 of them and a cache miss
# none; use it to find and check user-space work, and time to report.
#
#   benches/instructions_per_request.sh BIN nokey|unique
#   C=8 D=6 TOP=30 benches/instructions_per_request.sh target/profiling/idemgate unique
#
# Starts an nginx upstream (1 worker, a 44-byte JSON answer) and idemgate
# under callgrind (memory store; IDEMGATE_EVENT_LOOPS and the like pass
# through) on free loopback ports, warms up with wrk for 3 s, zeroes the
# counters, runs wrk -t1 -c$C (8) for $D (6) seconds, dumps, and prints
# the instructions per request and the $TOP (25) functions with the most
# instructions of their own. Build with `cargo build --profile profiling`
# for function names. Under valgrind the sha2 crate finds no SHA
# extensions and hashes in software, so sha256's line is far above what it
# costs on a CPU that has them. Everything started here is stopped at the
# end.
set -euo pipefail
BIN=$1 SCRIPT=$2
case $SCRIPT in
  nokey | unique) ;;
  *) echo "instructions_per_request.sh: SCRIPT is nokey or unique" >&2; exit 2 ;;
esac
command -v valgrind >/dev/null || { echo "instructions_per_request.sh: valgrind is not installed" >&2; exit 2; }
W=$(mktemp -d)
VP=
cleanup() {
  [ -n "$VP" ] && kill "$VP" 2>/dev/null || true
  [ -f "$W/nginx.pid" ] && kill "$(cat "$W/nginx.pid")" 2>/dev/null || true
  sleep 0.5; rm -rf "$W"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP=$(port) P=$(port) A=$(port)
cat > "$W/nginx.conf" <<N
worker_processes 1; pid $W/nginx.pid; error_log /dev/null; events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000; server { listen 127.0.0.1:$UP;
  location / { default_type application/json; return 201 '{"id":"ch_1","amount":100,"currency":"eur"}'; } } }
N
nginx -c "$W/nginx.conf"
printf '[store]\nmax_entries = 100000000\n' > "$W/idemgate.toml"
RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$W/cg.out.%p" "$BIN" \
  --config "$W/idemgate.toml" --upstream "http://127.0.0.1:$UP" \
  --listen "127.0.0.1:$P" --admin-listen "127.0.0.1:$A" 2>"$W/valgrind.log" &
VP=$!
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$A/readyz" >/dev/null && break; sleep 0.2; done
lua="$(dirname "$0")/wrk/$SCRIPT.lua"
url="http://127.0.0.1:$P/v1/charges"
wrk -t1 -c"${C:-8}" -d3s -s "$lua" "$url" >/dev/null
callgrind_control -z "$VP" >/dev/null
out=$(wrk -t1 -c"${C:-8}" -d"${D:-6}s" -s "$lua" "$url")
callgrind_control -d "$VP" >/dev/null
sleep 1
n=$(awk '/requests in/ {print $1}' <<<"$out")
dump=$(ls -t "$W"/cg.out."$VP".* | head -1)
python3 - "$dump" "$n" "${TOP:-25}" "$(basename "$BIN")" "$SCRIPT" "${C:-8}" <<'PY'
# Each function's own instructions (callgrind's format: a cost line after
# `calls=` is the callee's inclusive cost, not the caller's own).
import collections, re, sys
path, n, top, name, script, c = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:]
names, own, fn, callee_cost = {}, collections.Counter(), None, False
def named(v):
    m = re.match(r'\((\d+)\)(?: (.*))?', v)
    if not m:
        return v
    if m.group(2):
        names[m.group(1)] = m.group(2)
    return names.get(m.group(1), v)
for line in open(path, errors='replace'):
    line = line.rstrip('\n')
    if not line:
        continue
    if line[0].isdigit() or line[0] in '+-*':
        if callee_cost:
            callee_cost = False
        elif len(line.split()) > 1:
            own[fn] += int(line.split()[1])
    elif line.startswith('calls='):
        callee_cost = True
    elif '=' in line:
        k, v = line.split('=', 1)
        if k == 'fn':
            fn = named(v)
        elif k in ('fl', 'fi', 'fe', 'ob', 'cfn', 'cfi', 'cfl', 'cob'):
            named(v)
total = sum(own.values())
print(f"{name} {script} c={c}: {n} requests, {total // n} instructions per request")
for f, k in own.most_common(top):
    print(f"  {k / total * 100:5.1f} % {k // n:7d}  {f[:140]}")
PY
