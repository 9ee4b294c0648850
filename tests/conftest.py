"""Shared fixtures: every test starts with fresh Dynamo caches and zeroed pcg counters."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import pcg_backend  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_pcg():
    torch._dynamo.reset()
    pcg_backend.reset_stats()
    yield
    torch._dynamo.reset()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cuda_kernels_installed() -> bool:
    from pcg_backend.ops.mamba2 import KERNELS_AVAILABLE

    return KERNELS_AVAILABLE


# With mamba-ssm installed, HF binds its CUDA kernels at import, and they cannot run on CPU tensors.
requires_reference_kernels = pytest.mark.skipif(
    _cuda_kernels_installed(), reason="mamba-ssm is installed: HF models use its CUDA kernels, not the CPU reference"
)
