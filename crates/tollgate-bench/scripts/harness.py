"""What the bench scripts share: the mock upstream and a `tollgate serve` on free ports, and a
client of the management API."""
import http.client
import json
import socket
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
MOCK = ROOT / "target" / "debug" / "examples" / "mock"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(port, path="/healthz"):
    for _ in range(300):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", path)
            if c.getresponse().status < 500:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"nothing answers on port {port}")


def api(port, token, method, path, body=None):
    """One management API call as `token`; its JSON (or bytes), or exit on a non-2xx answer."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
    c.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    r = c.getresponse()
    data = r.read()
    if r.status >= 300:
        raise SystemExit(f"{method} {path}: {r.status} {data[:300]!r}")
    return json.loads(data) if data and r.getheader("content-type", "").startswith("application/json") else data


def mock_config(mock_port):
    """A tollgate.toml whose Anthropic upstream is the mock on `mock_port`."""
    return (f'[[upstream]]\nname = "anthropic"\nkind = "anthropic"\nbase_url = "http://127.0.0.1:{mock_port}"\n'
            'api_key_env = "MOCK_UPSTREAM_KEY"\nmodels = ["claude-*"]\n')
