"""Capture and replay of one piece per capture key, over one shared memory pool.

Memory follows vLLM's scheme: every capture of every piece and bucket goes
into one graph pool, and a piece keeps only *weak* aliases of its outputs and
static input buffers. The allocator therefore sees that memory as free once a
forward is over, so the next capture (a smaller bucket, another graph) reuses
it, and graph memory stays near one forward's working set instead of growing
with buckets x pieces. This is safe because replays run in capture order on
one stream, and anything that leaves the compiled region is cloned by the
runtime (see `GraphPool.owns`).

gc is never run per capture: `torch.cuda.graph` would collect and empty the
cache on every entry, which makes capturing hundreds of pieces slow, so we
drive `CUDAGraph.capture_begin/capture_end` ourselves.
"""

from __future__ import annotations

import dataclasses
import operator
import threading
import time
import warnings
import weakref

import torch

from . import context, write_check
from .batched_copy import copy_pairs
from .eager_pieces import private_copies
from .gemm_library import gemm_library
from .stats import STATS


def weak_alias(t: torch.Tensor) -> torch.Tensor:
    """A tensor viewing `t`'s memory without keeping that memory allocated."""
    storage = t.untyped_storage()
    weak_storage = torch._C._construct_storage_from_data_pointer(storage.data_ptr(), t.device, storage.nbytes())
    return torch.empty((0,), dtype=t.dtype, device=t.device).set_(
        weak_storage, t.storage_offset(), t.size(), t.stride()
    )


_STREAMS: dict[int, torch.cuda.Stream] = {}
# Graphs kept per capture key for different static-input addresses (models sharing compiled code).
MAX_VERSIONS_PER_KEY = 4


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    # One capture stream per device for the process, kept across pool
    # releases: libraries cache per-stream state (cuBLAS workspaces) that
    # would otherwise pile up with every new pool.
    if device.index not in _STREAMS:
        _STREAMS[device.index] = torch.cuda.Stream(device=device)
    return _STREAMS[device.index]


def _owned_pool(device: torch.device) -> torch.cuda.MemPool:
    """A graph memory pool that lives as long as this object, not as long as its graphs.

    With a bare `graph_pool_handle()` the allocator creates the pool on the
    first capture and drops it when the last graph using it is destroyed. If
    that first capture fails (a host sync hidden inside an opaque op), its
    graph dies, the pool goes with it, and every later capture into the same
    handle trips an allocator assert. A `MemPool` holds its own reference.
    """
    with torch.cuda.device(device):
        return torch.cuda.MemPool()


class GraphPool:
    """The one memory pool and capture stream shared by all pieces on a device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mempool = _owned_pool(device)
        self.handle = self.mempool.id
        self.stream = _capture_stream(device)
        self._storages: set[int] = set()

    def remember(self, t: torch.Tensor) -> None:
        self._storages.add(t.untyped_storage().data_ptr())

    def owns(self, t: torch.Tensor) -> bool:
        """True if `t` lives in graph-pool memory that a later replay may overwrite."""
        return t.is_cuda and t.untyped_storage().data_ptr() in self._storages


_POOLS: dict[int, GraphPool] = {}


def pool_for(device: torch.device) -> GraphPool:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _POOLS:
        _POOLS[index] = GraphPool(torch.device("cuda", index))
    return _POOLS[index]


def release_pools() -> None:
    """Drop every pool (after `torch._dynamo.reset()` the graphs that used them are gone)."""
    _POOLS.clear()
    _forward.fresh = None


_forward = threading.local()


def begin_forward(late: bool) -> None:
    """Tell the pieces whether this forward's key was seen before (see `_capture_pool`)."""
    _forward.late = late
    _forward.fresh = None


def _capture_pool(pool: GraphPool) -> torch.cuda.MemPool:
    """The pool a capture allocates from.

    Captures of a key's first forward go to the shared pool: every piece is
    captured in order, each one's outputs held while the next is captured, so
    replays reproduce a consistent layout. A capture in a *later* forward of the
    same key (weights or state at new addresses) sits between pieces that
    replay, whose outputs the allocator sees as free (weak aliases): in the
    shared pool it could land on them. It gets a fresh pool, one per forward.
    The graphs captured into a pool hold it (`_Entry.mempool`): a `MemPool`
    that dies empties its cache, and the memory its graphs replay into (free
    in the allocator's eyes after capture) would go back to the driver.
    """
    if not getattr(_forward, "late", False):
        return pool.mempool
    if getattr(_forward, "fresh", None) is None:
        _forward.fresh = _owned_pool(pool.device)
    return _forward.fresh


def any_pool_owns(t: torch.Tensor) -> bool:
    return any(p.owns(t) for p in _POOLS.values())


def _is_static_address(t: torch.Tensor) -> bool:
    # Parameters, and tensors HF or the user marked with mark_static_address
    # (cache state), keep their address for the model's life: no copy needed.
    return isinstance(t, torch.nn.Parameter) or hasattr(t, "_dynamo_static_input_type")


def _recover_from_failed_capture(device: torch.device, handle) -> None:
    # Only for a capture_end that raised (CUDA invalidated the capture, e.g. a
    # host sync): torch raises before it tells the allocator that the capture
    # is over, and later allocations on the capture stream would keep landing
    # in the graph pool. Calling this after a capture_end that succeeded would
    # end the pool's allocation twice. The CUDA RNG is left in capture mode too
    # (`_end_rng_capture`). pcg avoids such captures up front (analyse/node_kinds.py
    # sends host syncs and host-to-device copies it can see to eager pieces,
    # `_host_sync_in` finds the hidden ones), so this is a last resort.
    try:
        torch._C._cuda_endAllocateToPool(device.index, handle)
    except RuntimeError:
        pass


def _end_rng_capture(device: torch.device) -> None:
    """Take torch's CUDA RNG out of capture mode after a capture that CUDA invalidated.

    `capture_end` raises before it ends the RNG's capture, and every later
    random op on the device would fail ("Offset increment outside graph
    capture"). An empty capture that ends cleanly ends it: each capture starts
    and ends the RNG's capture of every device's default generator.
    """
    graph = torch.cuda.CUDAGraph()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch warns that the graph is empty: it is meant to be
        with torch.cuda.stream(torch.cuda.Stream(device)):
            graph.capture_begin()
            graph.capture_end()


def _host_sync_in(fn) -> str | None:
    """Run `fn` with CUDA sync debugging set to raise; the message if it synchronized with the host.

    A sync hidden inside an opaque op (HF's MoE `grouped_mm_fallback` calls
    `.tolist()`) is invisible in the FX graph, and finding it by a failed
    capture is too late: the failed capture leaves torch's CUDA RNG in
    capture mode for the rest of the process.
    """
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with write_check.probing():   # its first-run check reads on the host: it waits for a later run
            fn()
    except RuntimeError as e:
        if "synchronizing CUDA operation" not in str(e):
            raise
        return str(e).splitlines()[0][:160]
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return None


_data_ptr = torch.Tensor.data_ptr


def _picker(indices: list[int]):
    """args -> the tuple of args at `indices`, picked in C (`itemgetter`), not in a Python loop."""
    if not indices:
        return lambda args: ()
    get = operator.itemgetter(*indices)
    return (lambda args: (get(args),)) if len(indices) == 1 else get


@dataclasses.dataclass
class _Entry:
    graph: torch.cuda.CUDAGraph
    copies: list[tuple[int, torch.Tensor]]   # arg index -> captured address (copied into if it differs)
    fixed: list[tuple[int, int]]             # arg index -> data_ptr that must not change
    scalars: list[tuple[int, object]]        # arg index -> Python value baked into the graph
    outputs: tuple
    written_back: list[tuple[int, torch.Tensor]]  # written inputs captured in a static buffer: copied back
    mempool: torch.cuda.MemPool                   # the pool the graph replays into, alive as long as the graph

    def __post_init__(self):
        self._pick_fixed = _picker([i for i, _ in self.fixed])
        self._fixed_ptrs = [ptr for _, ptr in self.fixed]

    def matches(self, args) -> bool:
        """True if this graph may replay for `args` (this runs on every replay).

        An HF decode piece has several hundred fixed inputs (every weight and
        state tensor it reads). A Python loop over them took about 0.15 ms per
        replay on the H100 host; `map` and `itemgetter` do the walk in C.
        """
        if list(map(_data_ptr, self._pick_fixed(args))) != self._fixed_ptrs:
            return False
        for i, value in self.scalars:
            if args[i] != value:
                return False
        return True


@dataclasses.dataclass
class _Recording:
    """A graph just captured, with the strong references its capture made."""

    graph: torch.cuda.CUDAGraph
    outputs: object
    copies: list[tuple[int, torch.Tensor]]   # arg index -> static input the graph reads (copied into on replay)
    fixed: list[tuple[int, int]]             # arg index -> data_ptr captured in place
    buffers: list[tuple[int, torch.Tensor]]  # the static inputs allocated in the pool for this capture
    mempool: torch.cuda.MemPool


class CudaGraphPiece(torch.nn.Module):
    """Runs `runnable` through a CUDA graph per capture key, capturing on first use of a key."""

    # Every live piece, so that `torch._dynamo.reset()` can destroy all graphs
    # even if a caller still holds a compiled function.
    _live: "weakref.WeakSet[CudaGraphPiece]" = weakref.WeakSet()

    def __init__(self, runnable, name: str, pool: GraphPool, written: dict[int, str] | None = None,
                 write_back: bool = False, gemm_library: str = "unchanged", small_runnable=None,
                 small_tokens: int = 0):
        super().__init__()
        self.runnable = runnable
        # A second compile of the piece for captures at padded token counts of at most
        # `small_tokens` (`rewrite/skinny_routing.routed_twin`): its kernels only pay off there, so
        # larger buckets and uncaptured calls keep `runnable`.
        self.small_runnable = small_runnable
        self.small_tokens = small_tokens
        self.name = name
        self.pool = pool
        # The BLAS library for the GEMMs this piece captures (`gemm_library.py`): only the
        # capture needs it, since a graph replays the kernels it recorded.
        self.gemm_library = gemm_library
        # Inputs the piece writes in place (state written by a captured split
        # op). In graphs at exact sizes (decode) they are captured at their
        # own address: a cache keeps its state tensors from step to step, so
        # that costs no copies. In padded graphs (prefill, `write_back`) they
        # go through a static buffer like any input, and are copied back
        # after the replay: each prefill may bring a new cache, and a graph
        # per cache address would mean recapturing on live traffic.
        self.written = frozenset(written or ())
        self._fixed_written = frozenset() if write_back else self.written
        # Per key, one entry per set of static-input addresses: two models
        # sharing Dynamo's compiled code each get their own graphs.
        self.entries: dict[tuple, list[_Entry]] = {}
        self.refused: str | None = None
        self._probed = False   # run once under sync debugging before the first capture
        # A graph whose capture failed still holds the pool (device and pinned
        # host memory); dropping it could release the pool under live graphs.
        self._failed: list[torch.cuda.CUDAGraph] = []
        CudaGraphPiece._live.add(self)

    @classmethod
    def release_all(cls) -> None:
        """Destroy every captured graph; their pool memory becomes free for `empty_cache`."""
        for piece in list(cls._live):
            piece.entries.clear()
            piece._failed.clear()
            piece.refused = "its CUDA graphs were released by torch._dynamo.reset()"

    def forward(self, *args):
        ctx = context.current()
        key = ctx.capture_key if ctx is not None else None
        if key is None:
            STATS.eager(ctx.eager_reason if ctx is not None else "called outside a pcg forward")
            return self._run(self.runnable, args)
        if self.refused is not None:
            STATS.eager(self.refused)
            return self._run(self.runnable, args)
        entry = None
        versions = self.entries.get(key, ())
        for position, candidate in enumerate(versions):
            if candidate.matches(args):
                entry = candidate
                if position:
                    # Most recently used first: a decode loop replays one cache's graphs step
                    # after step, and each failed check costs a scan of the piece's inputs.
                    versions.insert(0, versions.pop(position))
                break
        if entry is None:
            if key in self.entries:
                STATS.new_address_captures += 1
                STATS.note(f"{self.name}: weights or written state at new addresses (a second model sharing "
                           f"this compiled code, moved weights, or a new cache), or a scalar input changed; "
                           f"capturing another graph for key {key}")
            with gemm_library(self.gemm_library), context.piece_running():
                return self._capture(key, args)
        copy_pairs([(static, args[i]) for i, static in entry.copies if args[i].data_ptr() != static.data_ptr()])
        entry.graph.replay()
        if entry.written_back and not ctx.warmup:
            self._write_back(entry.written_back, args)
        STATS.cuda_graph_replays += 1
        return entry.outputs

    @staticmethod
    def _write_back(written_back, args) -> None:
        copy_pairs([(args[i], static) for i, static in written_back if args[i].data_ptr() != static.data_ptr()])

    # Called once per piece per forward: skip nn.Module.__call__'s hook machinery.
    __call__ = forward

    def _runnable_to_capture(self):
        """The twin for a small bucket, else the piece itself."""
        padded = context.current().padded_tokens
        if self.small_runnable is not None and padded is not None and padded <= self.small_tokens:
            return self.small_runnable
        return self.runnable

    def _capture(self, key, args):
        """Capture a graph of this piece for `key`, replay it for this call, and keep it for later calls.

        A piece that cannot be captured (a CPU input, a host sync, a failed
        capture) is refused for good and runs eagerly from then on.
        """
        reason = self._cpu_input(args)
        if reason is not None:
            return self._refuse(reason, args)
        run = self._runnable_to_capture()
        warm_start = time.perf_counter()
        reason = self._warm_up(run, args)
        STATS.warmup_seconds += time.perf_counter() - warm_start
        if reason is not None:
            return self._refuse(reason, args)
        start = time.perf_counter()
        reserved = torch.cuda.memory_reserved(self.pool.device)
        recording = self._record(run, args)
        if isinstance(recording, str):
            return self._refuse(recording, args)
        # A capture records kernels without running them: this call's inputs go
        # into the static buffers, and its results come from a first replay.
        copy_pairs([(buf, args[i]) for i, buf in recording.buffers])
        recording.graph.replay()
        written_back = [(i, t) for i, t in recording.copies if i in self.written]
        # An up-front capture forward must leave the caller's state as it was.
        if written_back and not context.current().warmup:
            self._write_back(written_back, args)
        self._keep(key, recording, args, written_back)
        # The replay right after capture is part of the capture, not counted as a replay.
        STATS.cuda_graphs_captured += 1
        STATS.live_captures += not context.current().warmup
        STATS.twin_captures += run is not self.runnable
        STATS.capture_seconds += time.perf_counter() - start
        STATS.graph_memory_bytes += max(0, torch.cuda.memory_reserved(self.pool.device) - reserved)
        return recording.outputs

    def _refuse(self, reason: str, args):
        """Run this piece eagerly, for this call and every later one, for `reason` (counted for the report).

        At an overflow bucket only this call runs eagerly: a failure there (a
        capture out of memory, an op that reads the host above some size) says
        nothing about the ladder's buckets. The runner stops using overflow
        buckets for this key instead (`runtime.py`).
        """
        refusals = context.current().overflow_refusals
        if refusals is not None:
            refusals.append(reason)
        else:
            self.refused = reason
        STATS.eager(reason)
        return self.runnable(*args)   # inside `_capture`, so within `piece_running`

    @staticmethod
    def _run(runnable, args):
        with context.piece_running():
            return runnable(*args)

    def _cpu_input(self, args) -> str | None:
        """Why a CUDA graph cannot read this call's inputs (a tensor off the GPU), or None."""
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor) and a.device.type != "cuda":
                return f"{self.name}: input {i} is a {a.device.type} tensor, which a CUDA graph cannot read"
        return None

    def _warm_up(self, run, args) -> str | None:
        """Run the piece once outside the capture; before its first capture, and each at an overflow bucket,
        probe it for host syncs.

        The warm-up does the lazy inits (cuBLAS handles, Triton autotuning)
        that must not happen while the stream is capturing. Written inputs get
        private copies there, or the state would advance twice. Returns why
        the piece cannot be captured, or None.
        """
        run(*private_copies(args, self.written))
        overflow = context.current().overflow_refusals is not None
        if overflow or not self._probed:
            # Once per piece, after the warm-up above did the lazy inits (Triton
            # autotuning synchronizes), which must not count as the piece's syncs.
            # A twin differs from the piece only in its linear calls, which never
            # synchronize, so one probe serves both. Again before each overflow
            # bucket's capture: an op may read the host only above some size (HF's
            # MoE fallback above the experts kernels' token limit), and a probe
            # there says nothing about the ladder's buckets.
            self._probed = self._probed or not overflow
            sync = _host_sync_in(lambda: run(*private_copies(args, self.written)))
            if sync:
                return (f"{self.name}: synchronizes with the host ({sync}), which a CUDA graph cannot "
                        f"hold; found in a trial run before capture")
        return None

    def _record(self, run, args) -> _Recording | str:
        """Capture `run` on static stand-ins for `args`: the recording, or why the capture failed."""
        graph = torch.cuda.CUDAGraph()
        static_args = list(args)
        copies, fixed, buffers = [], [], []
        stream = self.pool.stream
        stream.wait_stream(torch.cuda.current_stream())
        ended = False
        mempool = _capture_pool(self.pool)
        handle = mempool.id
        try:
            with torch.cuda.stream(stream):
                graph.capture_begin(pool=handle)
                try:
                    for i, a in enumerate(args):
                        if not isinstance(a, torch.Tensor):
                            continue
                        if _is_static_address(a) or i in self._fixed_written:
                            fixed.append((i, a.data_ptr()))
                            continue
                        if not self.pool.owns(a):
                            # Allocated inside the capture so it lives in the pool; empty_strided launches no kernel.
                            buf = torch.empty_strided(a.size(), a.stride(), dtype=a.dtype, device=a.device)
                            buffers.append((i, buf))
                            static_args[i] = buf
                        copies.append((i, static_args[i]))
                    outputs = run(*static_args)
                finally:
                    graph.capture_end()
                    ended = True
        except Exception as e:  # noqa: BLE001 - any capture failure means: run this piece eagerly
            if not ended:
                _recover_from_failed_capture(self.pool.device, handle)
                _end_rng_capture(self.pool.device)
            self._failed.append(graph)
            torch.cuda.synchronize(self.pool.device)
            return f"{self.name}: CUDA graph capture failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
        torch.cuda.current_stream().wait_stream(stream)
        return _Recording(graph, outputs, copies, fixed, buffers, mempool)

    def _keep(self, key, recording: _Recording, args, written_back) -> None:
        """Store the graph for `key`, holding only weak aliases of its pool memory (see the module docstring)."""
        outputs = recording.outputs
        single = not isinstance(outputs, (tuple, list))
        weak_outputs = []
        for o in ([outputs] if single else outputs):
            if isinstance(o, torch.Tensor):
                self.pool.remember(o)
                weak_outputs.append(weak_alias(o))
            else:
                weak_outputs.append(o)
        for _, buf in recording.buffers:
            self.pool.remember(buf)
        versions = self.entries.setdefault(key, [])
        if len(versions) >= MAX_VERSIONS_PER_KEY:
            versions.pop()   # the least recently used: the list is kept most recent first
            STATS.note(f"{self.name}: more than {MAX_VERSIONS_PER_KEY} address sets for key {key}; "
                       f"dropping the least recently used graph")
        versions.insert(0, _Entry(
            recording.graph,
            [(i, weak_alias(t)) for i, t in recording.copies],
            recording.fixed,
            [(i, a) for i, a in enumerate(args) if not isinstance(a, torch.Tensor)],
            weak_outputs[0] if single else tuple(weak_outputs),
            [(i, weak_alias(t)) for i, t in written_back],
            recording.mempool,
        ))
