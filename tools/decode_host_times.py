"""Where a decode step's host time goes before its first CUDA graph replay (needs CUDA).

    python tools/decode_host_times.py [--skip-module-guards] [--layers N] [--prefill 1,16,128]

Builds the benchmark's Nemotron-Nano-9B-v2-shaped model, compiles it with
pcg-inductor, warms up greedy `generate`, then times three 32-token generates
with timestamps at: the compiled forward's call, pcg's runner, the end of its
context setup, the split module's forward, the first captured piece, and its
graph replay. It prints the medians over the decode steps, and the time the
Python garbage collector ran. With --prefill, it then times single forwards of those
token counts the same way, up to their first replay, next to each call's wall time. A diagnostic: it wraps pcg's internals, so
its absolute step times include that wrapping; the benchmark measures speed.
"""

from __future__ import annotations

import argparse
import functools
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pcg_backend import bench  # noqa: E402
from pcg_backend.cudagraph import CudaGraphPiece  # noqa: E402
from pcg_backend.runtime import PiecewiseRunner  # noqa: E402

MARKS: dict[str, list[float]] = {}


def mark(name: str) -> None:
    MARKS.setdefault(name, []).append(time.perf_counter())


def instrument() -> None:
    """Wrap the runner, its context setup, the captured pieces and graph replay with timestamps."""
    call, context = PiecewiseRunner.__call__, PiecewiseRunner._context

    def runner_call(self, *args):
        mark("runner")
        if not getattr(self, "_timed", False):
            forward = self._forward
            self._forward = lambda *a: (mark("module"), forward(*a))[1]
            self._timed = True
        return call(self, *args)

    def timed_context(self, args):
        out = context(self, args)
        mark("context")
        return out

    piece = CudaGraphPiece.forward

    def piece_forward(self, *args):
        mark("piece")
        return piece(self, *args)

    replay = torch.cuda.CUDAGraph.replay

    def timed_replay(self):
        mark("replay")
        replay(self)
        mark("replayed")

    PiecewiseRunner.__call__ = runner_call
    PiecewiseRunner._context = timed_context
    CudaGraphPiece.forward = CudaGraphPiece.__call__ = piece_forward
    torch.cuda.CUDAGraph.replay = timed_replay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-module-guards", action="store_true")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--prefill", default="", help="comma-separated token counts to time as single forwards")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (it times CUDA graph replays)")
    instrument()
    gc_seconds = [0.0]
    starts: list[float] = []
    gc.callbacks.append(lambda phase, info: starts.append(time.perf_counter()) if phase == "start"
                        else gc_seconds.__setitem__(0, gc_seconds[0] + time.perf_counter() - starts.pop()))

    model = bench.build_model(args.layers)
    options = {"compiler": "inductor"}
    if args.skip_module_guards:
        options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
    inner = model.__class__.forward.__get__(model)
    compiled = torch.compile(inner, backend="pcg", options=options)

    @functools.wraps(inner)
    def forward(*a, **k):
        mark("call")
        return compiled(*a, **k)

    model.forward = forward
    print(f"{torch.cuda.get_device_name()}; module guards {'skipped' if args.skip_module_guards else 'kept'}")
    ids = torch.randint(2, model.config.vocab_size, (1, 16), device="cuda")
    torch._dynamo.mark_dynamic(ids, 1)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32, do_sample=False,
              pad_token_id=0)

    def after(name, earlier):
        return [min(t for t in MARKS[name] if t > e) for e in earlier]

    def median_us(a, b):
        return 1e6 * statistics.median(y - x for x, y in zip(a, b))

    with torch.no_grad():
        model(ids)
        for _ in range(3):
            model.generate(ids, **kw)
        for _ in range(3):
            MARKS.clear()
            gc_seconds[0] = 0.0
            torch.cuda.synchronize()
            start = time.perf_counter()
            model.generate(ids, **kw)
            torch.cuda.synchronize()
            total = time.perf_counter() - start
            calls = MARKS["call"][1:]                      # call 0 is the prefill
            runners = after("runner", calls)
            contexts = after("context", runners)
            modules = after("module", contexts)
            pieces = after("piece", modules)
            replays = after("replay", pieces)
            replayed = after("replayed", replays)
            step = statistics.median(b - a for a, b in zip(calls, calls[1:]))
            print(f"generate {1e3 * total:.1f} ms, step {1e3 * step:.2f} ms, gc {1e3 * gc_seconds[0]:.2f} ms; "
                  f"call->runner {median_us(calls, runners):.0f} us, runner->context "
                  f"{median_us(runners, contexts):.0f}, context->module {median_us(contexts, modules):.0f}, "
                  f"module->first piece {median_us(modules, pieces):.0f}, piece->replay "
                  f"{median_us(pieces, replays):.0f}, replay call {median_us(replays, replayed):.0f} us", flush=True)
        for n in [int(x) for x in args.prefill.split(",") if x]:
            prompt = torch.randint(2, model.config.vocab_size, (1, n), device="cuda")
            for _ in range(3):
                model(prompt)
            walls = []
            MARKS.clear()
            for _ in range(20):
                torch.cuda.synchronize()
                start = time.perf_counter()
                model(prompt)
                torch.cuda.synchronize()
                walls.append(time.perf_counter() - start)
            calls = MARKS["call"]
            runners = after("runner", calls)
            contexts = after("context", runners)
            modules = after("module", contexts)
            pieces = after("piece", modules)
            replays = after("replay", pieces)
            print(f"prefill {n}: wall {1e3 * statistics.median(walls):.2f} ms; call->runner "
                  f"{median_us(calls, runners):.0f} us, runner->context {median_us(runners, contexts):.0f}, "
                  f"context->module {median_us(contexts, modules):.0f}, module->first piece "
                  f"{median_us(modules, pieces):.0f}, piece->replay {median_us(pieces, replays):.0f}, "
                  f"call->first replay {median_us(calls, replays):.0f} us", flush=True)


if __name__ == "__main__":
    main()
