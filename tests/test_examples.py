"""The examples run as a new user runs them, and say what they promise."""

import os
import subprocess
import sys

import pytest

from conftest import requires_reference_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_quickstart():
    out = _run("quickstart.py")
    assert "pcg report" in out and "token count above the largest bucket 16" in out
    diffs = [float(line.split("=")[-1]) for line in out.splitlines() if "max |pcg - eager|" in line]
    assert len(diffs) == 4 and max(diffs) < 1e-5


@requires_reference_kernels
def test_hf_generate():
    out = _run("hf_generate.py")
    assert "tokens equal to eager: True" in out
    assert "Mamba2 core via pcg::mamba2_core" in out
