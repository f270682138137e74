"""The README's demo runs, and the benchmark harness runs end to end (quick mode, results to tmp)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_demo_runs_and_reports_its_checks():
    proc = _run(["demo/demo.py"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "activation patching" in out and "steering" in out
    assert "plain model(x) bitwise identical to before the tdfunc calls: True" in out


BENCHES = [  # one name per line, so that each benchmark's line is its own
    "call",
    "ig",
    "ig_paper",
    "cache",
    "patching",
    "deep_lift",
    "perturb_methods",
    "atp",
    "attnlrp",
    "scaling",
    "neuron",
    "stop",
    "attention_capture",
]


@pytest.mark.parametrize("name", BENCHES)
def test_bench_quick_smoke(name, tmp_path):
    proc = _run(["-m", "bench.run", "--only", name, "--quick", "--threads", "1", "--out", str(tmp_path)], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / f"{name}.json").exists() and (tmp_path / f"{name}.md").exists()
