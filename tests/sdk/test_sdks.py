"""The official Anthropic and OpenAI Python SDKs against tollgate in front of the mock upstream.

Run by .ci/run after `cargo build`: it needs target/debug/tollgate and the testkit's mock
(`cargo build -p tollgate-testkit --example mock`). Each test checks the ledger afterwards
through `tollgate status --json`.
"""

import json
import os
import socket
import subprocess
import tempfile
import time
from decimal import Decimal
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
TOLLGATE = ROOT / "target" / "debug" / "tollgate"
MOCK = ROOT / "target" / "debug" / "examples" / "mock"
ADMIN = "sdk-test-admin-token"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url):
    for _ in range(100):
        try:
            httpx.get(url, timeout=0.5)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


class Tollgate:
    def __init__(self, work, port, mock_url):
        self.url = f"http://127.0.0.1:{port}"
        config = work / "tollgate.toml"
        config.write_text(
            f"""
[server]
listen = "127.0.0.1:{port}"

[store]
url = "sqlite://{work / 'tollgate.db'}"

[[upstream]]
name = "anthropic"
kind = "anthropic"
base_url = "{mock_url}"
api_key_env = "MOCK_ANTHROPIC_KEY"
models = ["claude-*"]

[[upstream]]
name = "openai"
kind = "openai"
base_url = "{mock_url}"
api_key_env = "MOCK_OPENAI_KEY"
models = ["gpt-*"]
"""
        )
        self.env = dict(os.environ, TOLLGATE_ADMIN_TOKEN=ADMIN, TOLLGATE_SERVER=self.url,
                        MOCK_ANTHROPIC_KEY="upstream-a", MOCK_OPENAI_KEY="upstream-o")
        self.proc = subprocess.Popen([TOLLGATE, "serve", "--config", config], cwd=work, env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.url + "/healthz")

    def cli(self, *args):
        out = subprocess.run([TOLLGATE, *args], env=self.env, capture_output=True, text=True, check=True)
        return out.stdout.strip()

    def programmatic(self, account):
        """(used + overage, held) of the programmatic pool in USD, once no hold is open."""
        for _ in range(100):
            pool = json.loads(self.cli("status", account, "--json"))["pools"]["programmatic"]
            if Decimal(pool["held_usd"]) == 0:
                break
            time.sleep(0.05)
        return Decimal(pool["used_usd"]) + Decimal(pool["overage_usd"]), Decimal(pool["held_usd"])


@pytest.fixture(scope="module")
def gate():
    mock_port = free_port()
    mock = subprocess.Popen([MOCK, str(mock_port)], stdout=subprocess.DEVNULL)
    with tempfile.TemporaryDirectory() as work:
        try:
            wait_for(f"http://127.0.0.1:{mock_port}/v1/models")
            t = Tollgate(Path(work), free_port(), f"http://127.0.0.1:{mock_port}")
            yield t
            t.proc.terminate()
            t.proc.wait(timeout=10)
        finally:
            mock.kill()


counter = 0


@pytest.fixture
def account(gate):
    """A fresh account on team-standard with an `auto` key; returns (id, secret)."""
    global counter
    counter += 1
    name = f"acct{counter}"
    gate.cli("account", "create", name, "--tier", "team-standard")
    secret = gate.cli("key", "create", name, "--pool", "auto")
    return name, secret


# Sonnet 4.5: $3 / MTok in, $15 / MTok out; the mock's default usage is 100 in, 20 out.
SONNET_100_20 = Decimal("0.0006")


def test_anthropic_message(gate, account):
    name, secret = account
    client = anthropic.Anthropic(api_key=secret, base_url=gate.url)
    message = client.messages.create(model="claude-sonnet-4-5", max_tokens=1000,
                                     messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].text == "Hello from the mock upstream."
    assert (message.usage.input_tokens, message.usage.output_tokens) == (100, 20)
    assert gate.programmatic(name) == (SONNET_100_20, 0)


def test_anthropic_stream_with_cache_tokens(gate, account):
    name, secret = account
    client = anthropic.Anthropic(api_key=secret, base_url=gate.url)
    # input 1000, output 300, 5m write 200, 1h write 100, cache read 5000
    with client.messages.stream(model="claude-sonnet-4-5", max_tokens=1000,
                                messages=[{"role": "user", "content": "hi"}],
                                extra_headers={"x-mock-usage": "1000,300,200,100,5000"}) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello from the mock upstream."
    assert final.usage.cache_read_input_tokens == 5000
    # 1000 × $3 + 300 × $15 + 200 × $3.75 + 100 × $6 + 5000 × $0.30, per million tokens
    want = (1000 * 3 + 300 * 15 + Decimal("200") * Decimal("3.75") + 100 * 6 + Decimal("5000") * Decimal("0.30")) / 1_000_000
    assert gate.programmatic(name) == (want, 0)


def test_upstream_errors_raise_the_sdks_own_types(gate, account):
    name, secret = account
    client = anthropic.Anthropic(api_key=secret, base_url=gate.url, max_retries=0)
    with pytest.raises(anthropic._exceptions.OverloadedError) as e:
        client.messages.create(model="claude-sonnet-4-5", max_tokens=10, messages=[],
                               extra_headers={"x-mock-status": "529"})
    assert e.value.status_code == 529
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(api_key="wrong", base_url=gate.url, max_retries=0).messages.create(
            model="claude-sonnet-4-5", max_tokens=10, messages=[])
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="claude-nonexistent-1", max_tokens=10, messages=[])
    assert "claude-nonexistent-1" in str(e.value)
    assert gate.programmatic(name) == (0, 0)


def test_refused_call_raises_with_tollgates_message_and_is_not_retried(gate):
    gate.cli("tier", "set", "tiny", "--interactive-usd", "1", "--programmatic-usd", "0.001")
    gate.cli("account", "create", "tiny-acct", "--tier", "tiny")
    secret = gate.cli("key", "create", "tiny-acct", "--pool", "auto")
    sent = []
    http = httpx.Client(event_hooks={"request": [lambda r: sent.append(r.url)]})
    client = anthropic.Anthropic(api_key=secret, base_url=gate.url, max_retries=3, http_client=http)
    with pytest.raises(anthropic.RateLimitError) as e:
        client.messages.create(model="claude-sonnet-4-5", max_tokens=1000, messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 429
    assert "programmatic credits of account tiny-acct exhausted" in str(e.value)
    assert e.value.body["error"]["type"] == "billing_error"
    assert len(sent) == 1, "x-should-retry: false stops the SDK's retries"
    assert gate.programmatic("tiny-acct") == (0, 0)
    o = openai.OpenAI(api_key=secret, base_url=gate.url + "/v1", max_retries=0)
    with pytest.raises(openai.RateLimitError) as e:
        o.chat.completions.create(model="gpt-5", max_completion_tokens=1000, messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "insufficient_quota"


def test_openai_chat_stream_and_json(gate, account):
    name, secret = account
    client = openai.OpenAI(api_key=secret, base_url=gate.url + "/v1")
    reply = client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}],
                                           extra_headers={"x-mock-usage": "1000,50,0,0,600"})
    assert reply.choices[0].message.content == "Hello from the mock upstream."
    assert reply.usage.prompt_tokens == 1600
    chunks = list(client.chat.completions.create(model="gpt-5", stream=True, messages=[{"role": "user", "content": "hi"}],
                                                 extra_headers={"x-mock-usage": "1000,50,0,0,600"}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the mock upstream."
    assert all(c.usage is None for c in chunks), "the usage chunk tollgate asked for is not shown"
    # gpt-5: 1000 × $1.25 + 600 cached × $0.125 + 50 × $10 per MTok = $0.001825, twice
    assert gate.programmatic(name) == (Decimal("0.00365"), 0)
