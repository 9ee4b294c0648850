"""Counters for everything pcg does, and the report a user reads.

One `Stats` object per process. Tests assert against its counters exactly, so
every path that runs a graph, a piece or a size *without* a CUDA graph must go
through `Stats.eager` with a reason a user can read.

`report()` puts a summary first: the graphs, whether CUDA graphs ran, each
reason for running without one (once, with its count), the graphs whose
padding is limited and why, and the HF routing. Details follow: each graph
and its notes, the up-front captures, the routing of each HF layer (once
per layer, by module path), and the raw counters of `stats()`. Where no
CUDA graph could run at all (CPU, or `cuda_graphs=False`), it says so once
and leaves out the GPU-only counters, which would all be 0.
"""

from __future__ import annotations

import collections
import dataclasses
import logging

log = logging.getLogger("pcg_backend")

# Reasons that mean a graph has no CUDA graphs at all (backend._cuda_graphs_off_reason).
CUDA_GRAPHS_OFF = ("CUDA graphs off", "CUDA graphs disabled")
# Counters that only a graph with CUDA graphs can move.
GPU_ONLY = ("skinny_linears", "skinny_linears_small_buckets", "twin_captures", "cuda_graphs_captured",
            "cuda_graph_replays", "live_captures", "new_address_captures", "capture_seconds", "warmup_seconds", "graph_memory_bytes")
# How the backend words a graph that cannot be padded (`GraphRecord.padding`).
_EXACT_ONLY = "exact bucket sizes only: "


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
        self.aligned_linears = 0
        self.twin_captures = 0
        self.cuda_graphs_captured = 0
        self.cuda_graph_replays = 0
        self.live_captures = 0        # captures inside a caller's forward, not pcg's up-front pass
        self.overflow_calls = 0       # calls padded to an overflow bucket, above the ladder (buckets.overflow_ladder)
        self.new_address_captures = 0
        self.capture_seconds = 0.0
        self.warmup_seconds = 0.0     # the runs before each capture (lazy inits, Triton autotuning, the sync probe)
        self.compile_seconds = 0.0    # in the piece compiler (Inductor, twins included), at the first call of a graph
        self.graph_memory_bytes = 0
        self.padded_calls = 0
        self.state_slots = 0          # model-state buffers pcg allocated and lends to caches (`state_slots.py`)
        self.state_slot_bytes = 0
        self.weight_nodes_hoisted = 0  # weight-only nodes moved out of graphs (rewrite/weight_prologue.py)
        self.weight_prologue_runs = 0  # times that arithmetic ran: once per graph, again when a weight changed
        self.deferred_stop_checks = 0  # generate() decode loops that read their stop flag a step late (hf/stop_check.py)
        self.causal_mask_checks = 0    # 4-D masks read on the host, one sync each (ops/plain_causal.py)
        self.causal_flag_attention = 0  # attention calls given SDPA's causal flag for a mask found plain causal
        self.eager_runs = 0
        self.eager_reasons: collections.Counter[str] = collections.Counter()
        self.graphs: list[GraphRecord] = []
        self.routing: list[str] = []          # "path (Class): decision", one line per layer and decision
        self.routing_decisions: collections.Counter[tuple[str, bool]] = collections.Counter()
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

    def route(self, layer: str, module_class: str, decision: str, routed: bool) -> None:
        """Record how an HF layer was routed; a layer traced again (another graph) is not listed twice."""
        line = f"{layer} ({module_class}): {decision}"
        if line not in self.routing:
            self.routing.append(line)
            self.routing_decisions[(decision, routed)] += 1

    def as_dict(self) -> dict:
        return {
            "graphs_compiled": self.graphs_compiled,
            "pieces": self.pieces,
            "capturable_pieces": self.capturable_pieces,
            "split_op_nodes": self.split_op_nodes,
            "split_ops_in_graphs": self.split_ops_in_graphs,
            "skinny_linears": self.skinny_linears,
            "skinny_linears_small_buckets": self.skinny_linears_small_buckets,
            "aligned_linears": self.aligned_linears,
            "twin_captures": self.twin_captures,
            "cuda_graphs_captured": self.cuda_graphs_captured,
            "cuda_graph_replays": self.cuda_graph_replays,
            "live_captures": self.live_captures,
            "overflow_calls": self.overflow_calls,
            "new_address_captures": self.new_address_captures,
            "capture_seconds": round(self.capture_seconds, 3),
            "compile_seconds": round(self.compile_seconds, 3),
            "warmup_seconds": round(self.warmup_seconds, 3),
            "graph_memory_bytes": self.graph_memory_bytes,
            "padded_calls": self.padded_calls,
            "state_slots": self.state_slots,
            "state_slot_bytes": self.state_slot_bytes,
            "weight_nodes_hoisted": self.weight_nodes_hoisted,
            "weight_prologue_runs": self.weight_prologue_runs,
            "deferred_stop_checks": self.deferred_stop_checks,
            "causal_mask_checks": self.causal_mask_checks,
            "causal_flag_attention": self.causal_flag_attention,
            "eager_runs": self.eager_runs,
            "eager_reasons": dict(self.eager_reasons),
            "routing": list(self.routing),
            "capture_summaries": list(self.capture_summaries),
        }

    # ------------------------------------------------------------------ report

    def report(self) -> str:
        d = self.as_dict()
        off = {r: c for r, c in self.eager_reasons.items() if r.startswith(CUDA_GRAPHS_OFF)}
        no_cuda_graphs = bool(off) and not any(d[k] for k in GPU_ONLY)
        limits = self._padding_limits()
        lines = ["pcg report", "=========="]
        lines += self._summary(d, off if no_cuda_graphs else {}, limits)
        lines += ["", "Graphs"]
        lines += self._graph_details(limits) or ["  (none compiled)"]
        if self.capture_summaries:
            lines += ["", "Up-front captures"]
            lines += [f"  {c}" for c in self.capture_summaries]
        if self.routing:
            lines += ["", "HF layer routing (one line per layer)"]
            lines += [f"  {r}" for r in self.routing]
        lines += ["", "Counters (pcg_backend.stats())"]
        shown = {k: v for k, v in d.items() if k not in ("eager_reasons", "routing", "capture_summaries")
                 and not (no_cuda_graphs and k in GPU_ONLY)}
        width = max(len(k) for k in shown)
        lines += [f"  {k:<{width}}  {v}" for k, v in shown.items()]
        if no_cuda_graphs:
            lines.append("  (without CUDA graphs, the GPU-only counters are all 0: " + ", ".join(GPU_ONLY) + ")")
        return "\n".join(lines)

    def _summary(self, d: dict, off: dict[str, int], limits: dict[str, list[str]]) -> list[str]:
        lines = ["Summary",
                 f"  {d['graphs_compiled']} graph(s) compiled: {d['pieces']} pieces, {d['capturable_pieces']} "
                 f"capturable, {d['split_op_nodes']} split-op nodes ({d['split_ops_in_graphs']} of them inside "
                 f"captured pieces), {d['padded_calls']} call(s) padded to a bucket"
                 + (f"; {d['compile_seconds']} s compiling pieces" if d["compile_seconds"] else "")]
        if off:
            lines += [f"  {reason} ({count} runs). Every piece ran eagerly: the same results, no speed-up"
                      for reason, count in off.items()]
        else:
            lines.append(f"  CUDA graphs: {d['cuda_graphs_captured']} captured ({d['capture_seconds']} s, "
                         f"{d['graph_memory_bytes'] / 2**20:.0f} MiB of graph memory), "
                         f"{d['cuda_graph_replays']} replays; {d['live_captures']} of the captures on callers' "
                         f"calls, not up front")
        if d["overflow_calls"]:
            lines.append(f"  Calls above the largest bucket padded to an overflow bucket: {d['overflow_calls']}")
        if d["state_slots"]:
            lines.append(f"  Model state: {d['state_slots']} buffers ({d['state_slot_bytes'] / 2**20:.0f} MiB) lent to "
                         f"caches at stable addresses; a new slot is allocated only for a cache alive beside another")
        rest = [(r, c) for r, c in self.eager_reasons.most_common() if r not in off]
        if rest:
            lines.append(f"  Runs without a CUDA graph{' for other reasons' if off else ''} (runs  reason):")
            lines += [f"    {count:>8}  {reason}" for reason, count in rest]
        elif not off:
            lines.append("  Runs without a CUDA graph: none")
        if limits:
            lines.append("  Graphs that only use CUDA graphs at exact bucket sizes (graphs  reason):")
            lines += [f"    {len(graphs):>8}  [{i}] {reason} ({', '.join(graphs)})"
                      for i, (reason, graphs) in enumerate(limits.items(), 1)]
        if self.routing_decisions:
            routed = [(dec, n) for (dec, ok), n in self.routing_decisions.items() if ok]
            not_routed = sum(n for (_, ok), n in self.routing_decisions.items() if not ok)
            lines.append(f"  HF layers: {sum(n for _, n in routed)} routed through pcg's ops"
                         + (f" ({', '.join(f'{n} {dec}' for dec, n in routed)})" if routed else "")
                         + f", {not_routed} not routed" + (" (see HF layer routing)" if not_routed else ""))
        if d["causal_mask_checks"]:
            lines.append(f"  Attention outside CUDA graphs: {d['causal_mask_checks']} mask(s) read on the host (one sync "
                         f"per forward); {d['causal_flag_attention']} call(s) had no padding and ran with SDPA's "
                         f"causal flag, as HF eager runs them")
        if d["deferred_stop_checks"]:
            lines.append(f"  generate(): {d['deferred_stop_checks']} decode loop(s) read their stop flag one step late, "
                         f"so the host queued each step while the GPU ran the one before")
        return lines

    def _padding_limits(self) -> dict[str, list[str]]:
        """Each reason a graph cannot be padded, once, with the graphs it applies to."""
        limits: dict[str, list[str]] = {}
        for g in self.graphs:
            if g.padding.startswith(_EXACT_ONLY):
                limits.setdefault(g.padding[len(_EXACT_ONLY):], []).append(g.name)
        return limits

    def _graph_details(self, limits: dict[str, list[str]]) -> list[str]:
        # A reason the summary gives in full appears here by reference: a padding
        # limit as its [n], a piece's runs without CUDA graphs as a pointer.
        refs = {reason: f"[{i}]" for i, reason in enumerate(limits, 1)}

        def short(text: str) -> str:
            if text in self.eager_reasons:
                return f"{text.split(': ', 1)[0]} (reason and runs in the summary)"
            for reason, ref in refs.items():
                text = text.replace(reason, ref)
            return text

        lines = []
        for g in self.graphs:
            lines.append(f"  {g.name}: {g.pieces} pieces, {g.capturable_pieces} capturable, "
                         f"{g.split_op_nodes} split ops, token symbol {g.token_symbol}, padding {short(g.padding)}")
            lines += [f"    - {short(n)}" for n in g.notes if n not in refs]
        return lines


STATS = Stats()
