"""Toy models with the toy split ops, for exact counter assertions (vLLM's `silly` style)."""

from __future__ import annotations

import torch

from pcg_backend.ops import toy  # noqa: F401  (registers pcg_toy::mix and pcg_toy::mix_functional)


class ToyModel(torch.nn.Module):
    """L toy-mixing layers between L+1 token-wise blocks: 2L+1 pieces, L+1 capturable."""

    def __init__(self, layers: int = 3, hidden: int = 16, functional: bool = False):
        super().__init__()
        self.layers = layers
        self.functional = functional
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden) for _ in range(layers + 1))

    def forward(self, x):
        x = self.blocks[0](x)
        for i in range(self.layers):
            if self.functional:
                mixed = torch.ops.pcg_toy.mix_functional(x)
            else:
                mixed = torch.empty_like(x)
                torch.ops.pcg_toy.mix(x, mixed)
            x = torch.nn.functional.gelu(self.blocks[i + 1](mixed)) + x
        return x


class StatefulToyModel(torch.nn.Module):
    """Two toy recurrent layers whose state is a graph input written in place (like an SSM cache)."""

    def __init__(self, hidden: int = 16, layers: int = 2):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden) for _ in range(layers + 1))

    def new_state(self, device="cpu"):
        return torch.zeros(len(self.blocks) - 1, self.blocks[0].out_features, device=device)

    def forward(self, x, state):
        x = self.blocks[0](x)
        for i, block in enumerate(self.blocks[1:]):
            mixed = torch.empty_like(x)
            torch.ops.pcg_toy.running_sum(x, state[i], mixed)
            x = torch.tanh(block(mixed)) + x
        return x


class NoSplitModel(torch.nn.Module):
    """A plain MLP: no split op at all, so the whole graph is one bucketed piece."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.up = torch.nn.Linear(hidden, 4 * hidden)
        self.down = torch.nn.Linear(4 * hidden, hidden)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def compile_toy(model, **options):
    """Compile with the token dim marked dynamic up front (no recompiles across sizes)."""
    import torch._dynamo

    compiled = torch.compile(model, backend="pcg", options=options or None, dynamic=True)
    return compiled
