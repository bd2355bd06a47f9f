"""The real Claude Code CLI (npm @anthropic-ai/claude-code@2.1.332, installed by .ci/run) as
`claude -p`, with ANTHROPIC_BASE_URL pointing at tollgate in front of the mock upstream, all
inside a network namespace of its own so nothing else can be reached."""

import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLAUDE = ROOT / "target" / "claude-code" / "node_modules" / ".bin" / "claude"


def test_claude_p_through_tollgate_lands_in_the_programmatic_pool():
    if not CLAUDE.exists():
        # .ci/run installs it and sets TOLLGATE_E2E_REQUIRED, so there it can never be skipped.
        if os.environ.get("TOLLGATE_E2E_REQUIRED"):
            pytest.fail(f"{CLAUDE} is missing")
        pytest.skip("install it with .ci/run (npm @anthropic-ai/claude-code@2.1.332)")
    out = subprocess.run(["unshare", "-n", sys.executable, str(Path(__file__).with_name("claude_code_run.py")), str(CLAUDE)],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent,
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent)))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["returncode"] == 0, result["stderr"]
    assert "Hello from the mock upstream." in result["stdout"]
    events = result["events"]["events"] if isinstance(result["events"], dict) else result["events"]
    calls = [e for e in events if e["model"] == "claude-opus-5-5"]
    assert calls, events
    for e in events:
        assert e["pool"] == "programmatic", e
        assert e["source"] == "ua:sdk-cli", e
    # claude-opus-5-5: $4 / MTok in, $20 / MTok out; the mock reports 100 in, 20 out.
    assert all(Decimal(e["cost_usd"]) == Decimal("0.0008") for e in calls), calls
    pools = result["balance"]["pools"]
    charged = Decimal(pools["programmatic"]["used_usd"]) + Decimal(pools["programmatic"]["overage_usd"])
    assert charged == sum(Decimal(e["cost_usd"]) for e in events)
    assert Decimal(pools["interactive"]["used_usd"]) == 0
