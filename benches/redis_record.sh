#!/usr/bin/env bash
# What Redis spends per new key in the record's two scripts (begin, then
# complete): the record as one string (src/store/redis_store/lua/, round
# three's design 3) against the hash it was before (redis_record/*_hash.lua,
# the same scripts as they were). Each script runs for N (200,000) new
# keys, pipelined over one connection (redis-cli --pipe), on a
# redis-server started here on a free loopback port; prints Redis's own µs
# per call (INFO commandstats) and the commands inside. ROUNDS (3) times,
# alternated; then the begin of a replay, records of 1 KiB and 64 KiB.
#
#   benches/redis_record.sh
set -euo pipefail
N=${N:-200000}
ROUNDS=${ROUNDS:-3}
here=$(cd "$(dirname "$0")" && pwd)
lua="$here/../src/store/redis_store/lua"
W=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$W" >/dev/null &
RP=$!
trap 'kill $RP 2>/dev/null || true; sleep 0.2; rm -rf "$W"' EXIT
for _ in $(seq 50); do redis-cli -p "$PORT" PING >/dev/null 2>&1 && break; sleep 0.1; done
cli() { redis-cli -p "$PORT" "$@"; }
for op in begin complete; do
  cat "$lua/lib.lua" "$here/redis_record/${op}_hash.lua" > "$W/${op}_hash.lua"
  cat "$lua/lib.lua" "$lua/$op.lua" > "$W/${op}_string.lua"
done
# The commands each measurement pipelines, as RESP:
#   gen.py new OP SHA N              N calls of one script, a new key each
#                                    (complete: the key begun)
#   gen.py replay RECORD SHA N SIZE  one completed record of SIZE bytes as
#                                    RECORD holds it, then N begins of it
cat > "$W/gen.py" <<'PY'
import sys
mode, what, sha, n = sys.argv[1], sys.argv[2], sys.argv[3].encode(), int(sys.argv[4])
def resp(*a):
    out = [b'*%d\r\n' % len(a)]
    for x in a:
        x = x if isinstance(x, bytes) else str(x).encode()
        out.append(b'$%d\r\n%s\r\n' % (len(x), x))
    return b''.join(out)
lease, fp = b'0123456789abcdef0123456789abcdef', b'F' * 32
begin = lambda k: resp(b'EVALSHA', sha, 1, k, lease, fp, 30000, 30000, b'', b'')
w = sys.stdout.buffer
if mode == 'new':
    rec = b'R' * 120
    for i in range(n):
        k = b'idemgate:{%032d}' % i
        if what.startswith('begin'):
            w.write(begin(k))
        else:
            w.write(resp(b'EVALSHA', sha, 1, k, lease, rec, 86400000, b'idemgate:done:' + k, b'0'))
else:
    k, body = b'idemgate:{replayed}', b'R' * int(sys.argv[5])
    if what == 'hash':
        w.write(resp(b'HSET', k, b's', b'c', b'f', b'123', b'r', body))
    else:
        w.write(resp(b'SET', k, b'c123 ' + body))
    for _ in range(n):
        w.write(begin(k))
PY
for round in $(seq "$ROUNDS"); do
  for record in hash string; do
    cli FLUSHALL >/dev/null
    for op in begin complete; do
      sha=$(cli SCRIPT LOAD "$(cat "$W/${op}_$record.lua")")
      python3 "$W/gen.py" new "${op}_$record" "$sha" "$N" > "$W/commands"
      cli CONFIG RESETSTAT >/dev/null
      cli --pipe < "$W/commands" >/dev/null
      stats=$(cli INFO commandstats | tr -d '\r')
      per=$(sed -n 's/^cmdstat_evalsha:.*usec_per_call=\([0-9.]*\).*/\1/p' <<<"$stats")
      inner=$(grep -v -e evalsha -e script -e config -e flushall -e echo <<<"$stats" |
        sed -n 's/^cmdstat_\([a-z]*\):.*usec_per_call=\([0-9.]*\).*/\1 \2/p' | tr '\n' ' ')
      echo "round $round, $record record, $op: $per µs per call (inside: $inner)"
    done
  done
done
# Then a replay's begin: one completed record of SIZE bytes, begun REPLAYS
# (20,000) times, as each layout holds it.
for round in $(seq "$ROUNDS"); do
  for size in 1024 65536; do
    for record in hash string; do
      cli FLUSHALL >/dev/null
      sha=$(cli SCRIPT LOAD "$(cat "$W/begin_$record.lua")")
      python3 "$W/gen.py" replay "$record" "$sha" "${REPLAYS:-20000}" "$size" > "$W/commands"
      cli CONFIG RESETSTAT >/dev/null
      cli --pipe < "$W/commands" >/dev/null
      per=$(cli INFO commandstats | tr -d '\r' |
        sed -n 's/^cmdstat_evalsha:.*usec_per_call=\([0-9.]*\).*/\1/p')
      echo "round $round, $record record, replay of $size bytes: $per µs per begin"
    done
  done
done
