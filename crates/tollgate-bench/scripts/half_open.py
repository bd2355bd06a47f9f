#!/usr/bin/env python3
"""Half-open sockets against `tollgate serve`, measured from outside (issue 13, finding 1).

Starts the testkit's mock upstream (target/debug/examples/mock) and the given tollgate binary
under `prlimit --nofile=FILES:FILES` on a fresh SQLite database, with one programmatic key. Then:

1. baseline: 200 `/healthz` requests and 200 small gateway calls, each on a new connection;
2. an attacker opens SOCKETS connections that each send half a request head and wait;
3. the same 400 requests again, with a 5 s timeout each, while the attacker waits;
4. counts how many attacker sockets the server closed, and reads the connection metrics.

usage: half_open.py TOLLGATE_BINARY [SOCKETS] [FILES]    (defaults 1100 and 1024)
"""
import http.client
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import MOCK, api, free_port, mock_config, wait_for

TOKEN = "tga_half-open-admin-token"


def timed(port, method, path, body=None, headers=None):
    """Milliseconds for one request on a new connection, or None if it failed or took over 5 s."""
    start = time.perf_counter()
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        r.read()
        c.close()
        if r.status != 200:
            return None
    except OSError:
        return None
    return (time.perf_counter() - start) * 1000


def summary(name, samples):
    ok = sorted(s for s in samples if s is not None)
    failed = len(samples) - len(ok)
    if not ok:
        return f"{name}: all {failed} failed"
    pick = lambda q: ok[min(len(ok) - 1, int(q * len(ok)))]
    return f"{name}: {len(ok)} ok, {failed} failed; p50 {pick(0.5):.2f} ms, p99 {pick(0.99):.2f} ms, max {ok[-1]:.2f} ms"


def main():
    binary = os.path.abspath(sys.argv[1])
    sockets = int(sys.argv[2]) if len(sys.argv) > 2 else 1100
    files = int(sys.argv[3]) if len(sys.argv) > 3 else 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, sockets + 256)), hard))
    work = Path(tempfile.mkdtemp(prefix="half-open-"))
    mock_port, port = free_port(), free_port()
    mock = subprocess.Popen([str(MOCK), str(mock_port)], stdout=subprocess.DEVNULL)
    wait_for(mock_port, "/v1/models")
    (work / "tollgate.toml").write_text(mock_config(mock_port))
    log = open(work / "serve.log", "ab")
    env = dict(os.environ, TOLLGATE_LISTEN=f"127.0.0.1:{port}", TOLLGATE_DB=str(work / "tollgate.db"),
               TOLLGATE_ADMIN_TOKEN=TOKEN, TOLLGATE_LOG="warn", MOCK_UPSTREAM_KEY="upstream-secret")
    server = subprocess.Popen(["prlimit", f"--nofile={files}:{files}", "--", binary, "serve"],
                              cwd=work, env=env, stdout=log, stderr=log)
    attackers = []
    try:
        wait_for(port)
        api(port, TOKEN, "POST", "/api/v1/accounts", {"id": "acme", "tier": "max-20x"})
        secret = api(port, TOKEN, "POST", "/api/v1/accounts/acme/keys", {"pool": "programmatic", "name": "bot"})["key"]
        call = json.dumps({"model": "claude-haiku-4-5", "max_tokens": 100,
                           "messages": [{"role": "user", "content": "hi"}]})
        headers = {"x-api-key": secret, "content-type": "application/json", "anthropic-version": "2023-06-01"}

        def round_of_requests():
            health = [timed(port, "GET", "/healthz") for _ in range(200)]
            calls = [timed(port, "POST", "/v1/messages", call, headers) for _ in range(200)]
            return health, calls

        base_health, base_calls = round_of_requests()
        opened = 0
        for _ in range(sockets):
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: tollgate\r\ncontent-type: app")
                attackers.append(s)
                opened += 1
            except OSError:
                break
        attack_health, attack_calls = round_of_requests()
        closed = 0
        for s in attackers:
            s.setblocking(False)
            try:
                closed += s.recv(1) == b""
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
        metrics = api(port, TOKEN, "GET", "/metrics").decode()
        counters = {l.split()[0]: l.split()[1] for l in metrics.splitlines()
                    if l.startswith("tollgate_connections")}
        print(f"{binary} under prlimit --nofile={files} (connections_max (files - 64) / 2 = {(files - 64) // 2})")
        print(f"attacker: {opened} of {sockets} half-open sockets opened; {closed} closed by the server")
        print(summary("baseline /healthz", base_health))
        print(summary("baseline gateway call", base_calls))
        print(summary("under attack /healthz", attack_health))
        print(summary("under attack gateway call", attack_calls))
        for name, value in sorted(counters.items()):
            print(f"{name} {value}")
    finally:
        for s in attackers:
            s.close()
        server.kill()
        mock.kill()


if __name__ == "__main__":
    main()
