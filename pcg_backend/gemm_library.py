"""Which BLAS library the GEMMs inside captured pieces use (option `gemm_library`).

A CUDA graph keeps the GEMM kernels chosen while it was captured, so the
choice is made once, at capture, and costs nothing on replay. At the small
token counts of decode and short prefill a GEMM only streams its weights,
and the library's kernel choice decides how close that gets to the memory
bandwidth. On an H100 (`tools/gemm_libraries.py`), cuBLASLt reads the
10240x4480 and 15680x4480 projections of the Nemotron-Nano-9B-v2 shape
14-17 % faster than cuBLAS at 128 tokens and 6-8 % faster at 16, and ties at
1 token and on the other shapes. Eager calls, including pieces pcg runs
without a graph, keep the process's own setting.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

LIBRARIES = ("cublaslt", "unchanged")


@contextlib.contextmanager
def gemm_library(library: str):
    """Route torch's GEMMs to `library` ("unchanged": leave the process setting alone) inside the block."""
    if library == "unchanged":
        yield
        return
    with warnings.catch_warnings():
        # torch warns once that choosing the library is experimental; pcg makes that choice on purpose.
        warnings.filterwarnings("ignore", message=".*preferred_blas_library is an experimental feature.*")
        previous = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library(library)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(previous)
