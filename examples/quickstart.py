"""Quickstart: compile a toy model with the pcg backend and read the report.

Runs on CPU by default (the same splitting, padding and slicing, without CUDA
graphs); pass --device cuda to capture and replay CUDA graphs.
"""

import argparse
import logging

import torch

import pcg_backend
from pcg_backend.ops import toy  # noqa: F401  (registers the toy split op pcg_toy::mix)


class TinyMixer(torch.nn.Module):
    """Two token-wise blocks around one token-mixing split op."""

    def __init__(self, hidden=32):
        super().__init__()
        self.up = torch.nn.Linear(hidden, hidden)
        self.down = torch.nn.Linear(hidden, hidden)

    def forward(self, x):
        h = self.up(x)
        mixed = torch.empty_like(h)
        torch.ops.pcg_toy.mix(h, mixed)   # a registered split op: runs eagerly on the real tokens
        return self.down(torch.relu(mixed)) + x


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model = TinyMixer().to(args.device)
    compiled = torch.compile(model, backend="pcg", options={"capture_sizes": [4, 8, 16]}, dynamic=True)
    # 3 and 5 pad to the ladder's buckets 4 and 8; 20 pads to the overflow bucket 24 above the ladder
    # (captured on its first call on CUDA); 3000 is above the overflow buckets (2048) and runs unpadded.
    for n in [3, 8, 5, 20, 3000]:
        x = torch.randn(n, 32, device=args.device)
        diff = (compiled(x) - model(x)).abs().max().item()
        print(f"{n:>3} tokens: max |pcg - eager| = {diff:.2e}")
    print(pcg_backend.report())


if __name__ == "__main__":
    main()
