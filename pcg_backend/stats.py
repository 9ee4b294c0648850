"""Counters for everything pcg does, and the human-readable report.

One `Stats` object per process. Tests assert against its counters exactly, so
every path that runs a graph, a piece or a size *without* a CUDA graph must go
through `Stats.eager` with a reason a user can read.
"""

from __future__ import annotations

import collections
import dataclasses
import logging

log = logging.getLogger("pcg_backend")


@dataclasses.dataclass
class GraphRecord:
    """What the backend decided for one Dynamo graph."""

    name: str
    pieces: int
    capturable_pieces: int
    split_op_nodes: int
    token_symbol: str | None
    padding: str
    notes: list[str] = dataclasses.field(default_factory=list)


class Stats:
    """Process-wide counters. Read them with `pcg_backend.stats()`."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.graphs_compiled = 0
        self.pieces = 0
        self.capturable_pieces = 0
        self.split_op_nodes = 0
        self.split_ops_in_graphs = 0
        self.skinny_linears = 0
        self.skinny_linears_small_buckets = 0
        self.twin_captures = 0
        self.cuda_graphs_captured = 0
        self.cuda_graph_replays = 0
        self.new_address_captures = 0
        self.capture_seconds = 0.0
        self.graph_memory_bytes = 0
        self.padded_calls = 0
        self.eager_runs = 0
        self.eager_reasons: collections.Counter[str] = collections.Counter()
        self.graphs: list[GraphRecord] = []
        self.routing: list[str] = []
        self.capture_summaries: list[str] = []
        self._logged: set[str] = set()

    def eager(self, reason: str, count: int = 1) -> None:
        """Record `count` runs without a CUDA graph, and log each new reason once at INFO."""
        self.eager_runs += count
        self.eager_reasons[reason] += count
        self.note(reason)

    def note(self, message: str) -> None:
        """Log a message once per process (repeats are counted, not logged)."""
        if message not in self._logged:
            self._logged.add(message)
            log.info("pcg: %s", message)

    def as_dict(self) -> dict:
        return {
            "graphs_compiled": self.graphs_compiled,
            "pieces": self.pieces,
            "capturable_pieces": self.capturable_pieces,
            "split_op_nodes": self.split_op_nodes,
            "split_ops_in_graphs": self.split_ops_in_graphs,
            "skinny_linears": self.skinny_linears,
            "skinny_linears_small_buckets": self.skinny_linears_small_buckets,
            "twin_captures": self.twin_captures,
            "cuda_graphs_captured": self.cuda_graphs_captured,
            "cuda_graph_replays": self.cuda_graph_replays,
            "new_address_captures": self.new_address_captures,
            "capture_seconds": round(self.capture_seconds, 3),
            "graph_memory_bytes": self.graph_memory_bytes,
            "padded_calls": self.padded_calls,
            "eager_runs": self.eager_runs,
            "eager_reasons": dict(self.eager_reasons),
            "routing": list(self.routing),
            "capture_summaries": list(self.capture_summaries),
        }

    def report(self) -> str:
        d = self.as_dict()
        lines = ["pcg report", "=========="]
        width = max(len(k) for k in d)
        for key, value in d.items():
            if key in ("eager_reasons", "routing", "capture_summaries"):
                continue
            lines.append(f"{key:<{width}}  {value}")
        lines.append("")
        lines.append("graphs:")
        if not self.graphs:
            lines.append("  (none compiled)")
        for g in self.graphs:
            lines.append(
                f"  {g.name}: {g.pieces} pieces, {g.capturable_pieces} capturable, "
                f"{g.split_op_nodes} split ops, token symbol {g.token_symbol}, padding {g.padding}"
            )
            lines.extend(f"    - {n}" for n in g.notes)
        if self.capture_summaries:
            lines.append("")
            lines.append("up-front captures:")
            lines.extend(f"  {c}" for c in self.capture_summaries)
        lines.append("")
        lines.append("runs without CUDA graphs (reason: count):")
        if not self.eager_reasons:
            lines.append("  (none)")
        for reason, count in self.eager_reasons.most_common():
            lines.append(f"  {count:>8}  {reason}")
        if self.routing:
            lines.append("")
            lines.append("HF layer routing:")
            lines.extend(f"  {r}" for r in self.routing)
        return "\n".join(lines)


STATS = Stats()
