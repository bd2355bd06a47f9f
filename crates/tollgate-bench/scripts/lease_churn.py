#!/usr/bin/env python3
"""Lease churn and the crash charge of `tollgate serve`, measured from outside.

Starts the testkit's mock upstream (target/debug/examples/mock) and the given tollgate binary on a
fresh SQLite database, creates a Max 20x account with one programmatic key, and has THREADS
clients post small Sonnet calls (max_tokens 1000: a worst case of about $0.0156, $0.0006 charged)
one after another on keep-alive connections for SECONDS. Every 0.2 s it samples the pool's
`held_usd`. At the end it reads the lease counters from /metrics (when the binary has them),
counts the lease holds in the database, SIGKILLs the server, restarts it and reports what the
restart charged as `unsettled`.

usage: lease_churn.py TOLLGATE_BINARY [THREADS] [SECONDS]
"""
import http.client
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from harness import MOCK, api, free_port, mock_config, wait_for

TOKEN = "tga_lease-churn-admin-token"


def nanos(usd):
    whole, _, frac = usd.partition(".")
    return int(whole) * 10**9 + int((frac + "0" * 9)[:9])


def usd(n):
    """Nano-USD as exact dollars, without floats."""
    return f"${n // 10**9}.{n % 10**9:09d}".rstrip("0").rstrip(".")


def start(binary, work, port):
    log = open(work / f"serve-{port}.log", "ab")
    env = dict(os.environ, TOLLGATE_LISTEN=f"127.0.0.1:{port}", TOLLGATE_DB=str(work / "tollgate.db"),
               TOLLGATE_ADMIN_TOKEN=TOKEN, TOLLGATE_LOG="warn", MOCK_UPSTREAM_KEY="upstream-secret")
    p = subprocess.Popen([binary, "serve"], cwd=work, env=env, stdout=log, stderr=log)
    wait_for(port)
    return p


def main():
    binary = os.path.abspath(sys.argv[1])
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 20
    work = Path(tempfile.mkdtemp(prefix="lease-churn-"))
    mock_port, port = free_port(), free_port()
    mock = subprocess.Popen([str(MOCK), str(mock_port)], stdout=subprocess.DEVNULL)
    wait_for(mock_port, "/v1/models")
    (work / "tollgate.toml").write_text(mock_config(mock_port))
    server = start(binary, work, port)
    try:
        api(port, TOKEN, "POST", "/api/v1/accounts", {"id": "acme", "tier": "max-20x"})
        secret = api(port, TOKEN, "POST", "/api/v1/accounts/acme/keys", {"pool": "programmatic", "name": "bot"})["key"]
        body = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 1000,
                           "messages": [{"role": "user", "content": "hi"}]})
        stop = time.monotonic() + seconds
        counts = [0] * threads

        def client(i):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            while time.monotonic() < stop:
                c.request("POST", "/v1/messages", body=body,
                          headers={"x-api-key": secret, "content-type": "application/json",
                                   "anthropic-version": "2023-06-01"})
                r = c.getresponse()
                r.read()
                if r.status != 200:
                    raise SystemExit(f"call answered {r.status}")
                counts[i] += 1

        workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        held_max = 0
        while any(w.is_alive() for w in workers):
            b = api(port, TOKEN, "GET", "/api/v1/accounts/acme/balance")
            held_max = max(held_max, nanos(b["pools"]["programmatic"]["held_usd"]))
            time.sleep(0.2)
        calls = sum(counts)
        metrics = api(port, TOKEN, "GET", "/metrics").decode()
        leases = {o: next((int(float(l.split()[-1])) for l in metrics.splitlines()
                           if l.startswith("tollgate_gateway_leases_total") and f'"{o}"' in l), None)
                  for o in ("taken", "voided")}
        db = sqlite3.connect(f"file:{work / 'tollgate.db'}?mode=ro", uri=True)
        lease_holds = db.execute("SELECT COUNT(*) FROM holds WHERE id LIKE 'lease%'").fetchone()[0]
        db.close()
        before = api(port, TOKEN, "GET", "/api/v1/accounts/acme/balance")["pools"]["programmatic"]
        server.kill()
        server.wait()
        server = start(binary, work, port)
        after = api(port, TOKEN, "GET", "/api/v1/accounts/acme/balance")["pools"]["programmatic"]
        charged = lambda p: nanos(p["used_usd"]) + nanos(p["overage_usd"])
        crash = charged(after) - charged(before)
        print(f"{binary}: {threads} clients, {seconds:g} s: {calls} calls ({calls / seconds:.0f}/s); "
              f"lease holds written {lease_holds} ({lease_holds / seconds:.1f}/s, {1000 * lease_holds / max(calls, 1):.1f} per 1,000 calls); "
              f"metrics taken {leases['taken']} voided {leases['voided']}; held max {usd(held_max)}; "
              f"held at kill {usd(nanos(before['held_usd']))}; kill -9 + restart charged {usd(crash)} unsettled; "
              f"charged by calls {usd(charged(before))}")
    finally:
        server.kill()
        mock.kill()


if __name__ == "__main__":
    main()
