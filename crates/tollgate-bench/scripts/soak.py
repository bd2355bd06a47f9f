#!/usr/bin/env python3
"""A soak of `tollgate serve`: mixed load for a long time, resident memory and open files sampled.

Starts the testkit's mock upstream (target/debug/examples/mock) and the given tollgate binary on a
fresh SQLite database (or TOLLGATE_DB, e.g. a PostgreSQL URL), with a Max 20x account topped up
by $1,000,000 per pool (so nothing is refused for credit), two programmatic keys and one
interactive key. Then, for SECONDS:

- GATEWAY threads post small Haiku and Sonnet calls, one in four streaming, some cut by the
  upstream (`x-mock-cut-after`), some answered 529, some dropped by the client mid-stream;
- one thread writes events and API holds (made, then settled or voided) and reads balances,
  reports and events;
- two subscribers read `/api/v1/stream`, reconnecting every minute;
- one thread opens half-sent request heads and idle connections and leaves them.

Every 10 s it samples the server's resident memory (VmRSS) and open files (/proc/PID/fd) and
the calls done. At the end: the samples at start (after a minute's warm-up), middle and end,
the calls by outcome, `tollgate check` on the ledger, and open holds.

usage: soak.py TOLLGATE_BINARY [SECONDS] [GATEWAY_THREADS]    (defaults 1800 and 4)
"""
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from harness import MOCK, api, free_port, mock_config, wait_for

TOKEN = "tga_soak-admin-token"


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def open_files(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def main():
    binary = os.path.abspath(sys.argv[1])
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 1800
    threads = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    mock_port, port = free_port(), free_port()
    mock = subprocess.Popen([str(MOCK), str(mock_port)], stdout=subprocess.DEVNULL)
    wait_for(mock_port, "/v1/models")
    (work / "tollgate.toml").write_text(mock_config(mock_port))
    db = os.environ.get("TOLLGATE_DB", str(work / "tollgate.db"))
    log = open(work / "serve.log", "ab")
    env = dict(os.environ, TOLLGATE_LISTEN=f"127.0.0.1:{port}", TOLLGATE_DB=db,
               TOLLGATE_ADMIN_TOKEN=TOKEN, MOCK_UPSTREAM_KEY="upstream-secret")
    env.setdefault("TOLLGATE_LOG", "info")
    server = subprocess.Popen([binary, "serve"], cwd=work, env=env, stdout=log, stderr=log)
    stop = threading.Event()
    outcomes = Counter()
    lock = threading.Lock()

    def count(what):
        with lock:
            outcomes[what] += 1

    try:
        wait_for(port)
        api(port, TOKEN, "POST", "/api/v1/accounts", {"id": "acme", "tier": "max-20x"})
        # Credit enough that the pools never run out: the load stays calls that are served.
        for pool in ("interactive", "programmatic"):
            api(port, TOKEN, "POST", "/api/v1/accounts/acme/grants", {"pool": pool, "amount_usd": "1000000"})
        keys = [api(port, TOKEN, "POST", "/api/v1/accounts/acme/keys", {"pool": pool, "name": name})["key"]
                for pool, name in [("programmatic", "ci-bot"), ("programmatic", "nightly"), ("interactive", "alice")]]

        def gateway(i):
            rng = random.Random(i)
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            while not stop.is_set():
                model = rng.choice(["claude-haiku-4-5", "claude-sonnet-4-5"])
                stream = rng.random() < 0.25
                words = rng.randint(1, 2000)
                body = json.dumps({"model": model, "max_tokens": rng.choice([100, 1000, 4000]), "stream": stream,
                                   "messages": [{"role": "user", "content": "hi " * words}]})
                # Usage the request could have had: a token per word at most, so no call outgrows its hold.
                headers = {"x-api-key": rng.choice(keys), "content-type": "application/json",
                           "anthropic-version": "2023-06-01",
                           "x-mock-usage": f"{rng.randint(1, words)},{rng.randint(1, 90)}"}
                fault = rng.random()
                if fault < 0.02:
                    headers["x-mock-status"] = "529"
                elif fault < 0.04 and stream:
                    headers["x-mock-cut-after"] = "3"
                try:
                    c.request("POST", "/v1/messages", body=body, headers=headers)
                    r = c.getresponse()
                    if stream and fault > 0.97:
                        r.read(20)  # the client leaves mid-stream
                        c.close()
                        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                        count("client_left")
                        continue
                    r.read()
                    count(f"gateway_{r.status}")
                except (OSError, http.client.HTTPException):
                    count("gateway_cut")
                    c.close()
                    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

        def management():
            rng = random.Random(99)
            n = 0
            while not stop.is_set():
                n += 1
                event = {"id": f"soak-{n}", "account": "acme", "pool": rng.choice(["interactive", "programmatic"]),
                         "model": "claude-haiku-4-5", "usage": {"input_tokens": rng.randint(1, 2000),
                                                                "output_tokens": rng.randint(1, 200)}}
                api(port, TOKEN, "POST", "/api/v1/events", event)
                hold = api(port, TOKEN, "POST", "/api/v1/accounts/acme/holds",
                           {"pool": "programmatic", "amount_usd": "0.01", "ttl_s": 60})
                ending = "settle" if n % 2 else "void"
                api(port, TOKEN, "POST", f"/api/v1/accounts/acme/holds/{hold['id']}/{ending}",
                    {"cost_usd": "0.004"} if ending == "settle" else None)
                api(port, TOKEN, "GET", "/api/v1/accounts/acme/balance")
                if n % 20 == 0:
                    api(port, TOKEN, "GET", "/api/v1/accounts/acme/report")
                    api(port, TOKEN, "GET", "/api/v1/accounts/acme/events?limit=50")
                count("api_round")
                time.sleep(0.02)

        def subscriber():
            while not stop.is_set():
                try:
                    s = socket.create_connection(("127.0.0.1", port), timeout=5)
                    s.sendall(f"GET /api/v1/stream HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\n\r\n".encode())
                    until = time.monotonic() + 60
                    while time.monotonic() < until and not stop.is_set():
                        if not s.recv(65536):
                            break
                    s.close()
                    count("stream_session")
                except OSError:
                    count("stream_error")
                    time.sleep(1)

        def loiterer():
            held = []
            while not stop.is_set():
                try:
                    s = socket.create_connection(("127.0.0.1", port), timeout=5)
                    s.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\n")
                    held.append(s)
                    count("half_open")
                except OSError:
                    count("half_open_error")
                if len(held) > 50:
                    held.pop(0).close()
                time.sleep(0.5)
            for s in held:
                s.close()

        workers = [threading.Thread(target=gateway, args=(i,)) for i in range(threads)]
        workers += [threading.Thread(target=management), threading.Thread(target=loiterer)]
        workers += [threading.Thread(target=subscriber) for _ in range(2)]
        for w in workers:
            w.daemon = True
            w.start()
        started = time.monotonic()
        samples = []
        while time.monotonic() - started < seconds:
            time.sleep(10)
            if server.poll() is not None:
                raise SystemExit(f"the server exited ({server.returncode}); log in {work}")
            with lock:
                calls = sum(v for k, v in outcomes.items() if k.startswith("gateway_") or k == "client_left")
            samples.append((time.monotonic() - started, rss_kib(server.pid), open_files(server.pid), calls))
            t, rss, fds, calls = samples[-1]
            print(f"{t:7.0f} s  rss {rss / 1024:7.1f} MiB  files {fds:4d}  gateway calls {calls}", flush=True)
        stop.set()
        for w in workers:
            w.join(timeout=40)
        time.sleep(2)
        warm = next((s for s in samples if s[0] >= 60), samples[0])
        mid = samples[len(samples) // 2]
        end = samples[-1]
        print(f"\n{binary}, {seconds:g} s, {threads} gateway threads, store {db}")
        for name, (t, rss, fds, calls) in [("start (after warm-up)", warm), ("middle", mid), ("end", end)]:
            print(f"{name:>22}: {t:6.0f} s  rss {rss / 1024:.1f} MiB  open files {fds}  gateway calls {calls}")
        print("max rss {:.1f} MiB, max open files {}".format(max(s[1] for s in samples) / 1024,
                                                              max(s[2] for s in samples)))
        print("outcomes:", dict(sorted(outcomes.items())))
        balance = api(port, TOKEN, "GET", "/api/v1/accounts/acme/balance")
        print("held after the load:", {p: v["held_usd"] for p, v in balance["pools"].items()})
    finally:
        stop.set()
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        mock.kill()
    check = subprocess.run([binary, "check"], cwd=work, env=dict(env, TOLLGATE_LOG="warn"),
                           capture_output=True, text=True)
    print(f"tollgate check: exit {check.returncode}\n{check.stdout.strip()[-600:]}{check.stderr.strip()[-600:]}")


if __name__ == "__main__":
    main()
