"""Traffic: `generate()` called the way users call it, measured per call.

    python -m pcg_backend.bench --traffic [--calls N] [--variants eager,pcg-inductor]

Each variant makes the same seeded sequence of `generate()` calls: prompt
lengths from 1 to the largest bucket plus a share above it (padded to pcg's
overflow buckets, or run at their size above those), batch sizes from
`--batches` with left-padded prompts (every row but the first is shorter), and
a new cache on every call. Before the timed calls each variant gets one
documented warm-up (`warm_up_calls`): the plan's longest call, then a
`generate()` per batch size for each kind of prompt in the plan (1 token, up
to the largest bucket, each overflow bucket, above them), in passes until one pass captures and
compiles nothing (at most `MAX_WARM_UP_PASSES`). For each variant the result holds per-call latency
(p50, p90, max), time to first token, tokens per second, the CUDA graphs
captured and Dynamo graphs compiled during the timed calls, and allocated
memory before and after them. The ideal of a call, measured in the same run
on the pcg variant, is its prefill at its bucket plus one decode step per
further token. In half precision, `reference_sequences` and `agreement`
read every variant's tokens against an fp32 copy of the model: eager's
distance from it is the noise that pcg's is judged by.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import time

import torch

from .buckets import Ladder


@dataclasses.dataclass(frozen=True)
class Call:
    batch: int
    prompt: int        # tokens in the longest row; shorter rows are left-padded


def plan(seed: int, calls: int, largest: int, batches: list[int], above_share: float = 0.15) -> list[Call]:
    """A seeded list of calls: prompt lengths uniform in 1..largest, a share of them up to twice that."""
    rng = random.Random(seed)
    out = []
    for _ in range(calls):
        top = 2 * largest if rng.random() < above_share else largest
        out.append(Call(rng.choice(batches), rng.randint(1, top)))
    return out


def prompts(call: Call, vocab: int, device, generator: torch.Generator, pad_id: int = 0):
    """(input_ids, attention_mask) for `call`: row 0 is full, later rows lose 1 to a third of it to left padding.

    Every later row is padded (prompts of 2 tokens or more): a batch whose
    mask is all ones lets HF drop the mask, a graph of its own, which a
    warm-up call would then compile instead of the padded one.
    """
    ids = torch.randint(3, vocab, (call.batch, call.prompt), generator=generator)
    mask = torch.ones_like(ids)
    for row in range(1, call.batch if call.prompt >= 2 else 0):
        short = int(torch.randint(1, max(2, call.prompt // 3 + 1), (1,), generator=generator))
        ids[row, :short] = pad_id
        mask[row, :short] = 0
    return ids.to(device), mask.to(device)


class _FirstToken:
    """A logits processor that notes when the first token's logits are ready (the end of the prefill)."""

    def __init__(self, sync):
        self.sync = sync
        self.at = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            self.sync()
            self.at = time.perf_counter()
        return scores


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def cache_kwargs(cache: str) -> dict:
    """`generate()` keyword arguments for a cache kind: "dynamic" (HF's default) or "static".

    With a static cache on CUDA, `generate()` would compile the forward once
    more for decode (Inductor with CUDA graph trees); `disable_compile` keeps
    each variant on the forward it installed, so that "eager" stays eager.
    """
    if cache not in ("dynamic", "static"):
        raise ValueError(f"cache must be 'dynamic' or 'static', got {cache!r}")
    return {"cache_implementation": "static", "disable_compile": True} if cache == "static" else {}


def one_call(model, call: Call, new_tokens: int, generator: torch.Generator, cache: str = "dynamic") -> dict:
    """Run one `generate()` on a new cache; seconds for the call and to its first token."""
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    ids, mask = prompts(call, model.config.vocab_size, device, generator)
    first = _FirstToken(lambda: _sync(device))
    _sync(device)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([first]),
                         **cache_kwargs(cache))
    _sync(device)
    end = time.perf_counter()
    return {"batch": call.batch, "prompt": call.prompt, "seconds": end - start, "ttft": first.at - start,
            "tokens": call.batch * new_tokens, "sequences": out.cpu()}


def _counts() -> tuple[int, int]:
    """(CUDA graphs pcg captured, Dynamo graphs compiled) so far in this process."""
    from torch._dynamo.utils import counters

    from .stats import STATS

    return STATS.cuda_graphs_captured, counters["stats"]["unique_graphs"]


def _allocated(device) -> int:
    return torch.cuda.memory_allocated(device) if torch.device(device).type == "cuda" else 0


def warm_up_calls(calls: list[Call], largest: int, overflow: tuple[int, ...] = ()) -> list[Call]:
    """The documented warm-up: the plan's longest call, then per batch size one call per kind of prompt.

    The longest call comes first for static caches: HF sizes a new one to the
    longest generation seen so far, and a graph compiled before that length
    was reached would be compiled again at it.

    The kinds are the paths a prefill can take, and each needs its own call
    at each batch size: one token (Dynamo specializes a size of 1, a graph of
    its own), 2 to `largest` tokens (the padded graph, whose CUDA graphs are
    captured at every bucket the first time a batch size reaches it), each of
    the `overflow` buckets above it (captured on first use, one at a time) and
    more than those (the graph at its exact size, without CUDA graphs). A
    batch's shortest and longest prompts alone can miss the padded path, as
    when they are 1 token and more than `largest`. Each kind is warmed with
    its longest prompt in the plan.
    """
    above = Ladder(overflow) if overflow else None

    def kind(prompt: int) -> tuple:
        # In the warm-up's order: one token, the ladder, each overflow bucket, above them.
        if prompt == 1 or prompt <= largest:
            return (0,) if prompt == 1 else (1,)
        bucket = above.bucket(prompt) if above is not None else None
        return (3,) if bucket is None else (2, bucket)

    out = [max(calls, key=lambda c: c.prompt)]
    longest: dict[tuple, int] = {}
    for c in calls:
        key = (c.batch, kind(c.prompt))
        longest[key] = max(longest.get(key, 0), c.prompt)
    out += [Call(batch, prompt) for (batch, _), prompt in sorted(longest.items())]
    return out


# A warm-up pass after the one that compiled the last graph captures that graph's missing keys;
# a third pass is expected to find nothing left, and a fourth is not made.
MAX_WARM_UP_PASSES = 3


def run(model, calls: list[Call], new_tokens: int, seed: int = 0, log=lambda message: None,
        cache: str = "dynamic", largest: int | None = None, overflow: tuple[int, ...] | None = None) -> dict:
    """Warm up, then make every call; the measurements described in the module docstring.

    `largest` is the largest bucket the model was compiled with (by default
    pcg's default) and `overflow` its overflow buckets (by default pcg's for
    that `largest`), which decide the warm-up (`warm_up_calls`).

    `log` receives a line per warm-up call (seconds, graphs captured and
    compiled so far) and one every tenth timed call.
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    warm_up = []
    with torch.no_grad():
        if largest is None or overflow is None:
            from .options import parse_options

            defaults = parse_options({} if largest is None else {"max_capture_size": largest})
            largest, overflow = defaults.largest, defaults.overflow_sizes if overflow is None else overflow
        # Passes until one captures and compiles nothing. Dynamo's graphs generalize as the warm-up
        # goes (a batch size or length seen twice becomes a symbol), and a graph compiled late
        # supersedes earlier ones for the batch sizes warmed before it: those batches meet it first
        # on live traffic, and its CUDA graphs, keyed by batch, would be captured there.
        for warm_pass in range(1, MAX_WARM_UP_PASSES + 1):
            before_pass = _counts()
            for call in warm_up_calls(calls, largest, overflow):
                r = one_call(model, call, new_tokens, generator, cache)
                warm_up.append({"pass": warm_pass, "batch": call.batch, "prompt": call.prompt,
                                "seconds": r["seconds"]})
                log(f"warm-up pass {warm_pass}, batch {call.batch}, prompt {call.prompt}: {r['seconds']:.1f} s "
                    f"(graphs captured, compiled so far: {_counts()})")
            if _counts() == before_pass:
                break
        generator = torch.Generator().manual_seed(seed)
        captured, compiled = _counts()
        before = _allocated(device)
        results = []
        for i, call in enumerate(calls, 1):
            results.append(one_call(model, call, new_tokens, generator, cache))
            if i % 10 == 0:
                log(f"{i} calls, last {1e3 * results[-1]['seconds']:.1f} ms (captured, compiled: {_counts()})")
        after = _allocated(device)
        captured_after, compiled_after = _counts()
    seconds = [r["seconds"] for r in results]
    return {
        "warm_up": warm_up,
        "warm_up_passes": warm_up[-1]["pass"],
        "calls": [{k: v for k, v in r.items() if k != "sequences"} for r in results],
        "sequences": [r["sequences"] for r in results],
        "p50_s": statistics.median(seconds),
        "p90_s": _quantile(seconds, 0.9),
        "max_s": max(seconds),
        "ttft_p50_s": statistics.median(r["ttft"] for r in results),
        "tokens_per_s": sum(r["tokens"] for r in results) / sum(seconds),
        "captures_after_warm_up": captured_after - captured,
        "compiles_after_warm_up": compiled_after - compiled,
        "allocated_before_mib": before / 2**20,
        "allocated_after_mib": after / 2**20,
    }


def _quantile(values, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ideal(model, calls: list[Call], new_tokens: int, ladder: Ladder, repeats: int = 3, cache: str = "dynamic") -> dict:
    """Per call: the prefill of its batch at its bucket plus `new_tokens - 1` decode steps, as measured now.

    Both go through `generate()` on prompts made as the calls make them (left
    padded), so that they use the graphs the calls used: the prefill is a
    `generate()` of one new token on a prompt of the bucket's length (the
    prompt itself above the largest bucket), a decode step the difference of
    `generate()` calls of `new_tokens` and 1 new tokens over the steps between
    them (a single step's difference would carry the first step's extra work
    and the timer's noise alone). Returns the per-call ideal seconds and the
    p50 over the plan.
    """
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    prefill: dict = {}
    step: dict = {}

    def timed(fn):
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def generate(batch, prompt, k):
        ids, mask = prompts(Call(batch, prompt), vocab, device, generator)
        return lambda: model.generate(ids, attention_mask=mask, max_new_tokens=k, min_new_tokens=k,
                                      do_sample=False, pad_token_id=0, **cache_kwargs(cache))

    steps = new_tokens - 1

    def decode_step(batch):
        longer, one = timed(generate(batch, 16, 1 + steps)), timed(generate(batch, 16, 1))
        return max(0.0, longer - one) / steps

    with torch.no_grad():
        for call in calls:
            size = ladder.bucket(call.prompt) or call.prompt
            if (call.batch, size) not in prefill:
                prefill[(call.batch, size)] = timed(generate(call.batch, size, 1))
            if call.batch not in step:
                # Calls of one token have no decode step: nothing to time, nor to compile for it.
                step[call.batch] = decode_step(call.batch) if steps else 0.0
    per_call = [prefill[(c.batch, ladder.bucket(c.prompt) or c.prompt)] + (new_tokens - 1) * step[c.batch]
                for c in calls]
    return {"per_call_s": per_call, "p50_s": statistics.median(per_call),
            "decode_step_ms": {b: 1e3 * s for b, s in step.items()}}


def reference_sequences(reference, calls: list[Call], new_tokens: int, seed: int = 0,
                        cache: str = "dynamic") -> list[torch.Tensor]:
    """The plan's calls made on `reference` (an fp32 copy of the model, run eagerly): what half
    precision is read against.

    The prompts are those `run` times (the same `seed`). In bf16, eager and
    pcg both round differently from fp32, and with random weights near-ties in
    the logits then let greedy decoding go apart; how far each stays with
    fp32 (`agreement`) is the noise pcg's tokens are judged by, rather than
    eager's own bf16 tokens, which are one rounding among others.
    """
    device = next(reference.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for call in calls:
            ids, mask = prompts(call, reference.config.vocab_size, device, generator)
            out.append(reference.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                                          **cache_kwargs(cache)).cpu())
    return out


def agreement(sequences: list[torch.Tensor], reference: list[torch.Tensor], new_tokens: int) -> dict:
    """How far `sequences` keep `reference`'s new tokens: the share of calls with all of them equal,
    and the mean over every row of every call of the new tokens equal before the first difference."""
    if len(sequences) != len(reference) or not reference:
        raise ValueError(f"{len(sequences)} calls against {len(reference)} reference calls")
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be at least 1, got {new_tokens}")
    same, leading = [], []
    for ours, theirs in zip(sequences, reference):
        equal = ours[:, -new_tokens:] == theirs[:, -new_tokens:]
        same.append(bool(equal.all()))
        # cumprod keeps 1 up to the first difference: its sum is the row's run of equal tokens.
        leading += equal.int().cumprod(dim=1).sum(dim=1).tolist()
    return {"same_calls_share": sum(same) / len(same), "leading_equal_tokens": sum(leading) / len(leading),
            "new_tokens": new_tokens, "calls": len(same)}


def table(results: dict, ideal_result: dict | None, floor_ms: float | None = None,
          state_ms_per_row: float = 0.0) -> str:
    """One row per variant: latency percentiles, time to first token, tokens/s, captures and compiles.

    With `floor_ms` (every weight read once), the ideal's decode steps are also given against it,
    and with `state_ms_per_row` against it plus their batch's Mamba2 state read and written.
    """
    header = (f"{'variant':>14} {'p50 ms':>8} {'p90 ms':>8} {'max ms':>8} {'TTFT ms':>8} {'tok/s':>8} "
              f"{'x eager':>8} {'x ideal':>8} {'captures':>8} {'compiles':>8} {'MiB before/after':>17}")
    lines = [header, "-" * len(header)]
    eager = results.get("eager")
    for name, r in results.items():
        if "failed" in r:
            lines.append(f"{name:>14} FAILED: {r['failed']}")
            continue
        speed = f"{eager['p50_s'] / r['p50_s']:8.2f}" if eager else f"{'-':>8}"
        over = f"{r['p50_s'] / ideal_result['p50_s']:8.2f}" if ideal_result else f"{'-':>8}"
        lines.append(f"{name:>14} {1e3 * r['p50_s']:8.1f} {1e3 * r['p90_s']:8.1f} {1e3 * r['max_s']:8.1f} "
                     f"{1e3 * r['ttft_p50_s']:8.1f} {r['tokens_per_s']:8.1f} {speed} {over} "
                     f"{r['captures_after_warm_up']:8d} {r['compiles_after_warm_up']:8d} "
                     f"{r['allocated_before_mib']:8.0f}/{r['allocated_after_mib']:<8.0f}")
    if ideal_result:
        lines.append(f"{'ideal':>14} {1e3 * ideal_result['p50_s']:8.1f}  (prefill at its bucket + decode steps, "
                     f"decode step ms by batch {', '.join(f'{b}: {s:.2f}' for b, s in ideal_result['decode_step_ms'].items())})")
        if floor_ms:
            steps = ideal_result["decode_step_ms"].items()
            lines.append(f"{'':>14} weight-read floor {floor_ms:.2f} ms; decode step x floor by batch "
                         + ", ".join(f"{b}: {s / floor_ms:.2f}" for b, s in steps))
            if state_ms_per_row:
                lines.append(f"{'':>14} with the Mamba2 state read and written ({state_ms_per_row:.3f} ms per "
                             f"sequence): x floor by batch "
                             + ", ".join(f"{b}: {s / (floor_ms + int(b) * state_ms_per_row):.2f}" for b, s in steps))
    lines.append("(captures and compiles: during the timed calls, after the warm-up; x eager: p50 speed-up)")
    lines += _token_lines(results)
    return "\n".join(lines)


def _token_lines(results: dict) -> list[str]:
    """Tokens against eager's, per variant, and against an fp32 copy where that was measured."""
    lines = [f"same tokens as eager: {name} in {100 * r['same_tokens_as_eager']:.0f}% of calls"
             for name, r in results.items() if name != "eager" and "same_tokens_as_eager" in r]
    for name, r in results.items():
        a = r.get("against_fp32")
        if a:
            lines.append(f"against an fp32 copy: {name} keeps all its new tokens in {100 * a['same_calls_share']:.0f}% "
                         f"of {a['calls']} calls, {a['leading_equal_tokens']:.1f} of {a['new_tokens']} "
                         f"before the first difference (mean over rows)")
    return lines


def plot(results: dict, ideal_result: dict | None, calls: list[Call], path: str) -> None:
    """Per-call latency against prompt length, one series per variant and the ideal (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    prompts = [c.prompt for c in calls]
    for name, r in results.items():
        if "failed" not in r:
            ax.scatter(prompts, [1e3 * c["seconds"] for c in r["calls"]], s=10, label=name)
    if ideal_result:
        ax.scatter(prompts, [1e3 * s for s in ideal_result["per_call_s"]], s=10, marker="x", label="ideal")
    ax.set_xlabel("prompt tokens (longest row)")
    ax.set_ylabel("ms per generate() call")
    ax.set_title("generate() traffic: a new cache per call")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
