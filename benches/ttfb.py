#!/usr/bin/env python3
"""Time to first byte through idemgate (covered and pass-through) and nginx
`proxy_pass` with `proxy_buffering off`, in one run, on free loopback ports.

    cargo build --release --bin idemgate && python3 benches/ttfb.py

Starts a Python upstream that streams server-sent events (10 events, 50 ms
apart, chunked) at /sse and sends a 1 MiB body (with Content-Length) at
/big; nginx (one worker) as the baseline; idemgate on the memory store.
Each request is a fresh connection; ROUNDS (default 20) requests per case,
cases alternated; prints the median and p90 time to the first body byte and
to the last. Needs nginx (Debian's nginx-light).
"""

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

ROUNDS = int(os.environ.get("ROUNDS", "20"))
BIN = os.environ.get("BIN", os.path.join(os.path.dirname(__file__), "..", "target", "release", "idemgate"))
BIG = bytes((i * 31 + 7) % 251 for i in range(1 << 20))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def upstream(port):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(256)

    def serve(conn):
        f = conn.makefile("rb")
        try:
            while True:
                line = f.readline()
                if not line:
                    return
                path = line.split()[1].decode()
                length = 0
                while True:
                    h = f.readline()
                    if h in (b"\r\n", b""):
                        break
                    k, _, v = h.decode().partition(":")
                    if k.lower() == "content-length":
                        length = int(v)
                f.read(length)
                if path.startswith("/sse"):
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                    for i in range(10):
                        if i:
                            time.sleep(0.05)
                        ev = f"id: {i}\ndata: event {i}\n\n".encode()
                        conn.sendall(b"%x\r\n%s\r\n" % (len(ev), ev))
                    conn.sendall(b"0\r\n\r\n")
                else:
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: %d\r\n\r\n" % len(BIG) + BIG)
        except OSError:
            pass
        finally:
            conn.close()

    def accept():
        while True:
            c, _ = srv.accept()
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()


def fetch(port, path, key):
    """(seconds to the first body byte, seconds to the last) for one POST."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    extra = f"idempotency-key: {key}\r\n" if key else ""
    req = f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 2\r\n{extra}connection: close\r\n\r\n{{}}"
    start = time.perf_counter()
    s.sendall(req.encode())
    buf = b""
    first = None
    while True:
        data = s.recv(65536)
        if not data:
            break
        buf += data
        if first is None:
            head_end = buf.find(b"\r\n\r\n")
            if head_end >= 0 and len(buf) > head_end + 4:
                first = time.perf_counter() - start
    total = time.perf_counter() - start
    s.close()
    return first, total


def main():
    if not shutil.which("nginx"):
        sys.exit("ttfb.py: nginx is missing (apt-get install nginx-light)")
    work = tempfile.mkdtemp()
    up, base, idg, admin = free_port(), free_port(), free_port(), free_port()
    upstream(up)
    conf = os.path.join(work, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""worker_processes 1; pid {work}/nginx.pid; error_log {work}/error.log warn;
events {{ worker_connections 1024; }}
http {{ access_log off;
  client_body_temp_path {work}; proxy_temp_path {work}; fastcgi_temp_path {work}; uwsgi_temp_path {work}; scgi_temp_path {work};
  upstream api {{ server 127.0.0.1:{up}; keepalive 64; }}
  server {{ listen 127.0.0.1:{base};
    location / {{ proxy_pass http://api; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; }} }} }}
""")
    subprocess.run(["nginx", "-c", conf], check=True)
    idemgate = subprocess.Popen(
        [BIN, "--upstream", f"http://127.0.0.1:{up}", "--listen", f"127.0.0.1:{idg}", "--admin-listen", f"127.0.0.1:{admin}"],
        env={**os.environ, "RUST_LOG": "warn"},
    )
    try:
        time.sleep(0.5)
        cases = [
            ("nginx proxy_pass (buffering off)", base, False),
            ("idemgate pass-through (no key)", idg, False),
            ("idemgate covered (new key)", idg, True),
        ]
        for path, label in [("/sse", "SSE, 10 events 50 ms apart"), ("/big", "1 MiB body")]:
            results = {name: ([], []) for name, _, _ in cases}
            for _ in range(ROUNDS):
                for name, port, covered in cases:
                    first, total = fetch(port, path, uuid.uuid4().hex if covered else None)
                    results[name][0].append(first)
                    results[name][1].append(total)
            print(f"\n{label} ({ROUNDS} requests each, fresh connections)")
            print(f"| {'case':<36} | first byte p50 | p90 | last byte p50 |")
            print(f"|{'-' * 38}|---|---|---|")
            for name, _, _ in cases:
                firsts, totals = results[name]
                q = statistics.quantiles(firsts, n=10)
                print(f"| {name:<36} | {statistics.median(firsts) * 1e3:.2f} ms | {q[8] * 1e3:.2f} ms | {statistics.median(totals) * 1e3:.1f} ms |")
    finally:
        idemgate.terminate()
        subprocess.run(["nginx", "-c", conf, "-s", "stop"], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
