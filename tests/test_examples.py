"""The examples run as a new user runs them, and say what they promise."""

import os
import re
import subprocess
import sys

import pytest

from conftest import requires_reference_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), *args], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_quickstart():
    out = _run("quickstart.py")
    assert "pcg report" in out and "token count above the largest overflow bucket 2048" in out
    assert "Calls above the largest bucket padded to an overflow bucket: 1" in out
    diffs = [float(line.split("=")[-1]) for line in out.splitlines() if "max |pcg - eager|" in line]
    assert len(diffs) == 5 and max(diffs) < 1e-5


@requires_reference_kernels
def test_hf_generate():
    out = _run("hf_generate.py")
    assert "tokens equal to eager: True" in out
    assert "Mamba2 core via pcg::mamba2_core" in out


@requires_reference_kernels
def test_hf_generate_with_a_static_cache():
    out = _run("hf_generate.py", "--cache", "static")
    assert "tokens equal to eager: True" in out
    assert "run eagerly between pieces" not in out
    graphs = [line for line in out.splitlines() if re.match(r"  graph\d+: ", line)]
    assert graphs and all(": 1 pieces, 1 capturable" in line for line in graphs), out
