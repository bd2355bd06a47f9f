"""Runs inside a network namespace of its own (`unshare -n`, loopback only): the mock upstream,
`tollgate serve` in front of it, and the real Claude Code CLI as `claude -p` pointed at
tollgate. Prints one JSON object with what the test checks."""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from test_sdks import MOCK, Tollgate, free_port, wait_for

claude = sys.argv[1]
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
mock_port = free_port()
mock = subprocess.Popen([MOCK, str(mock_port)], stdout=subprocess.DEVNULL)
with tempfile.TemporaryDirectory() as work:
    try:
        wait_for(f"http://127.0.0.1:{mock_port}/v1/models")
        gate = Tollgate(Path(work), free_port(), f"http://127.0.0.1:{mock_port}")
        gate.cli("account", "create", "dev", "--tier", "team-standard")
        secret = gate.cli("key", "create", "dev", "--pool", "auto")
        home = Path(work) / "home"
        home.mkdir()
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(home),
            "CLAUDE_CONFIG_DIR": str(home / ".claude"),
            "ANTHROPIC_BASE_URL": gate.url,
            "ANTHROPIC_API_KEY": secret,
            "ANTHROPIC_CUSTOM_HEADERS": "x-mock-usage: 100,20",
            "DISABLE_AUTOUPDATER": "1",
            "DISABLE_TELEMETRY": "1",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        }
        run = subprocess.run([claude, "-p", "Say hello."], env=env, capture_output=True, text=True, timeout=120)
        balance = json.loads(gate.cli("status", "dev", "--json"))
        events = json.loads(gate.cli("events", "list", "dev", "--json"))
        print(json.dumps({"returncode": run.returncode, "stdout": run.stdout, "stderr": run.stderr[-2000:],
                          "balance": balance, "events": events}))
        gate.proc.terminate()
        gate.proc.wait(timeout=10)
    finally:
        mock.kill()
