#!/usr/bin/env python3
"""Clients that are slow on purpose against `tollgate serve`, measured from outside (the attacker's
pass on docs/gateway.md "Connections"; figures in docs/RELIABILITY.md section 10).

Each scenario starts the testkit's mock upstream (target/debug/examples/mock) and the given
tollgate binary under `prlimit --nofile=FILES:FILES` on a fresh SQLite database with one key:

  slow-bodies      20 connections (connections_max = 20) each send a whole head with the key and
                   one byte of body; /healthz every 1.5 s for 9 s (body_read_timeout_s = 8)
  stalled-readers  3 clients with a 4 KiB receive buffer ask for an 8 MB OpenAI stream and read
                   nothing (response_stall_timeout_s = 2); the balance every 3 s, then the events
  big-heads        400 connections each send 400,000 bytes of a head that never ends: RSS
  sigterm          an idle keep-alive, a half-sent head, 3 streams in progress; SIGTERM; the
                   time to exit and the state of every hold
  churn            6,000 connections opened and closed by 4 threads (half with a request, a third
                   closed with RST): fds and connections_open before and after

usage: slow_clients.py TOLLGATE_BINARY SCENARIO
"""
import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from harness import MOCK, api, free_port, mock_config, wait_for

TOKEN = "tga_slow-clients-admin-token"
OPENAI = ('[[upstream]]\nname = "openai"\nkind = "openai"\nbase_url = "http://127.0.0.1:MOCKPORT"\n'
          'api_key_env = "MOCK_UPSTREAM_KEY"\nmodels = ["gpt-*"]\n')


class Server:
    def __init__(self, binary, server_toml="", files=256):
        self.work = Path(tempfile.mkdtemp(prefix="slow-clients-"))
        self.mock_port, self.port = free_port(), free_port()
        self.mock = subprocess.Popen([str(MOCK), str(self.mock_port)], stdout=subprocess.DEVNULL)
        wait_for(self.mock_port, "/v1/models")
        toml = server_toml.replace("MOCKPORT", str(self.mock_port)) + "\n" + mock_config(self.mock_port)
        (self.work / "tollgate.toml").write_text(toml)
        log = open(self.work / "serve.log", "ab")
        env = dict(os.environ, TOLLGATE_LISTEN=f"127.0.0.1:{self.port}", TOLLGATE_DB=str(self.work / "tollgate.db"),
                   TOLLGATE_ADMIN_TOKEN=TOKEN, TOLLGATE_LOG="warn", MOCK_UPSTREAM_KEY="upstream-secret")
        self.proc = subprocess.Popen(["prlimit", f"--nofile={files}:{files}", "--", binary, "serve"],
                                     cwd=self.work, env=env, stdout=log, stderr=log)
        wait_for(self.port)
        api(self.port, TOKEN, "POST", "/api/v1/accounts", {"id": "acme", "tier": "max-20x"})
        self.key = api(self.port, TOKEN, "POST", "/api/v1/accounts/acme/keys",
                       {"pool": "programmatic", "name": "bot"})["key"]

    def connect(self, rcvbuf=None):
        s = socket.socket()
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(5)
        s.connect(("127.0.0.1", self.port))
        return s

    def health(self):
        start = time.perf_counter()
        try:
            c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            c.request("GET", "/healthz")
            r = c.getresponse()
            r.read()
            result = r.status
        except OSError as e:
            result = type(e).__name__
        return f"{result} in {(time.perf_counter() - start) * 1000:.1f} ms"

    def connection_metrics(self):
        text = api(self.port, TOKEN, "GET", "/metrics").decode()
        return {l.split()[0]: l.split()[1] for l in text.splitlines() if l.startswith("tollgate_connections")}

    def pool(self):
        return api(self.port, TOKEN, "GET", "/api/v1/accounts/acme/balance")["pools"]["programmatic"]

    def fds(self):
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def rss_mb(self):
        status = Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
        return int(next(l for l in status if l.startswith("VmRSS")).split()[1]) // 1024

    def stop(self):
        self.proc.kill()
        self.mock.kill()


def gateway_head(key, body, extra=""):
    return (f"POST /v1/messages HTTP/1.1\r\nhost: t\r\nx-api-key: {key}\r\nanthropic-version: 2023-06-01\r\n"
            f"content-type: application/json\r\n{extra}content-length: {len(body)}\r\n\r\n{body}").encode()


def slow_bodies(binary):
    s = Server(binary, "[server]\nconnections_max = 20\nbody_read_timeout_s = 8\n")
    try:
        head = (f"POST /v1/messages HTTP/1.1\r\nhost: t\r\nx-api-key: {s.key}\r\nanthropic-version: 2023-06-01\r\n"
                "content-type: application/json\r\ncontent-length: 1000\r\n\r\n{").encode()
        attackers = [s.connect() for _ in range(20)]
        for a in attackers:
            a.sendall(head)
        time.sleep(0.5)
        start = time.time()
        while time.time() - start < 9:
            print(f"t={time.time() - start:4.1f} s /healthz {s.health()}")
            time.sleep(1.5)
        print(s.connection_metrics())
    finally:
        s.stop()


def stalled_readers(binary):
    s = Server(binary, "[server]\nconnections_max = 4\nresponse_stall_timeout_s = 2\n" + OPENAI)
    try:
        body = json.dumps({"model": "gpt-4.1-mini", "stream": True, "max_tokens": 100,
                           "messages": [{"role": "user", "content": "hi"}]})
        readers = []
        for _ in range(3):
            r = s.connect(rcvbuf=4096)
            r.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {s.key}\r\n"
                       f"content-type: application/json\r\nx-mock-big-event-bytes: 8388608\r\n"
                       f"content-length: {len(body)}\r\n\r\n{body}").encode())
            readers.append(r)
        start = time.time()
        while time.time() - start < 15:
            p = s.pool()
            print(f"t={time.time() - start:4.1f} s /healthz {s.health()}; held {p['held_usd']} used {p['used_usd']}")
            time.sleep(3)
        print(s.connection_metrics())
        events = api(s.port, TOKEN, "GET", "/api/v1/accounts/acme/events?limit=100")["events"]
        print("event costs:", [e.get("cost_usd") for e in events])
        log = (s.work / "serve.log").read_text()
        print("hold expired while its client stalled:", "expired" in log)
    finally:
        s.stop()


def big_heads(binary):
    s = Server(binary, "[server]\nheader_read_timeout_s = 60\n", files=2048)
    try:
        before = s.rss_mb()
        attackers = []
        for _ in range(400):
            a = s.connect()
            a.sendall(b"GET /healthz HTTP/1.1\r\nhost: t\r\nx-pad: " + b"a" * 400_000)
            attackers.append(a)
        time.sleep(2)
        print(f"400 heads of 400,000 bytes: RSS {before} MB -> {s.rss_mb()} MB; /healthz {s.health()};",
              s.connection_metrics())
    finally:
        s.stop()


def sigterm(binary):
    s = Server(binary, "[server]\nheader_read_timeout_s = 600\n")
    try:
        idle = s.connect()
        idle.sendall(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
        idle.recv(1000)
        half = s.connect()
        half.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: t\r\ncontent-ty")
        body = json.dumps({"model": "claude-haiku-4-5", "stream": True, "max_tokens": 1000,
                           "messages": [{"role": "user", "content": "hi"}]})
        streams = [s.connect() for _ in range(3)]
        for st in streams:
            st.sendall(gateway_head(s.key, body, "x-mock-delay-ms: 300\r\n"))
        time.sleep(0.8)
        start = time.time()
        s.proc.send_signal(signal.SIGTERM)
        try:
            s.proc.wait(timeout=30)
            print(f"exited {s.proc.returncode} {time.time() - start:.2f} s after SIGTERM")
        except subprocess.TimeoutExpired:
            print("still running 30 s after SIGTERM")
        done = 0
        for st in streams:
            data = b""
            try:
                while chunk := st.recv(65536):
                    data += chunk
            except OSError:
                pass
            done += b"message_stop" in data
        print(f"streams run to their end: {done} of 3")
        db = sqlite3.connect(s.work / "tollgate.db")
        print("holds (source, state):", db.execute("SELECT source, state FROM holds").fetchall())
    finally:
        s.stop()


def churn(binary):
    s = Server(binary)
    try:
        fds, metrics = s.fds(), s.connection_metrics()

        def run(n):
            for i in range(n):
                c = socket.create_connection(("127.0.0.1", s.port))
                if i % 2:
                    c.sendall(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
                if i % 3 == 0:
                    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                c.close()

        start = time.time()
        threads = [threading.Thread(target=run, args=(1500,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.time() - start
        time.sleep(1)
        print(f"before: {fds} fds, {metrics}")
        print(f"6,000 connections in {took:.1f} s ({6000 / took:.0f} a second); after: {s.fds()} fds,",
              s.connection_metrics())
    finally:
        s.stop()


SCENARIOS = {"slow-bodies": slow_bodies, "stalled-readers": stalled_readers, "big-heads": big_heads,
             "sigterm": sigterm, "churn": churn}

if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[2] not in SCENARIOS:
        raise SystemExit(__doc__)
    SCENARIOS[sys.argv[2]](os.path.abspath(sys.argv[1]))
