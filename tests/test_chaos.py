"""The chaos harness, short: ``bench/chaos.py`` against real processes, every target at zero.

Two runs, each a child process of its own (the harness starts Redis, the instances, its proxy
and its client processes, injects faults and accounts for every mutation; see its docstring
and ``docs/reliability.md``): a standalone Redis with 6 clients for 40 access-token lifetimes
(~1.5 min), and a Redis Cluster whose data master fails over, with 4 clients for 20 lifetimes.
Each asserts that every target figure is zero and that a fault of every kind was injected;
the long run is ``make chaos``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

#: Under ``pytest -n`` (make test), the chaos and browser runs share one worker, one after the
#: other: each starts many processes on 2-second tokens and must not run beside the other.
pytestmark = pytest.mark.xdist_group("heavy")

REPO = Path(__file__).resolve().parents[1]
CHAOS = REPO / "bench" / "chaos.py"


def run_chaos(tmp_path: Path, *args: str, timeout: float) -> tuple[dict[str, Any], str]:
    report = tmp_path / "chaos.json"
    done = subprocess.run(
        [sys.executable, str(CHAOS), *args, "--json", str(report)],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    output = done.stdout[-6000:] + done.stderr[-4000:]
    assert report.exists(), f"no report (exit {done.returncode}):\n{output}"
    result: dict[str, Any] = json.loads(report.read_text())
    return result, output


def assert_clean(result: dict[str, Any], output: str, kinds: set[str]) -> None:
    details = result["details"]
    # Every kind of fault happened: the faults are seeded at random, so a run that skipped
    # one would pass without testing it.
    injected = details["faults_injected"]
    assert {kind for kind, n in injected.items() if n > 0} >= kinds, output
    lost = details["lost_answers"]
    assert lost.get("ws_mutate", 0) > 0, output
    assert lost.get("ws_refresh", 0) + lost.get("http_refresh", 0) > 0, output
    assert details["acknowledged"] > 0, output
    assert details["fault_errors"] == [], output
    nonzero = {name: value for name, value in result["figures"].items() if value}
    assert nonzero == {}, output
    assert result["ok"], output


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_short_chaos_run_standalone_redis(tmp_path: Path) -> None:
    result, output = run_chaos(tmp_path, "--clients", "6", "--lifetimes", "40", timeout=840)
    assert_clean(
        result,
        output,
        {
            "kill_instance",
            "cut_connections",
            "restart_redis",
            "freeze_client",
            "lost_mutate",
            "lost_refresh",
        },
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_short_chaos_run_cluster_failover(tmp_path: Path) -> None:
    result, output = run_chaos(
        tmp_path,
        *("--redis", "cluster", "--clients", "4", "--instances", "2"),
        *("--lifetimes", "20", "--fault-interval", "2,5"),
        timeout=540,
    )
    assert_clean(
        result,
        output,
        {
            "kill_instance",
            "cut_connections",
            "cluster_failover",
            "freeze_client",
            "lost_mutate",
            "lost_refresh",
        },
    )
