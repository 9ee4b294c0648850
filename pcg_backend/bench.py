"""Benchmark: a 7-9 B-shaped HF hybrid model with random bf16 weights (NemotronH by default).

    python -m pcg_backend.bench [--quick] [--family F] [--layers N] [--variants eager,pcg-eager,...] [--out DIR]
    python -m pcg_backend.bench --traffic [--calls N] [--batches 1,4,8] [--variants ...] [--noise]

`--cache static` makes every generate() call use a static cache (default: HF's DynamicCache).

Variants, run one after another in this process: `eager` (HF eager),
`compile` (torch.compile default), `reduce-overhead`, `pcg-eager` and
`pcg-inductor`. For each: prefill latency at several token counts, decode
time per step through greedy `generate`, first-call time (compile plus
capture), graph memory, and the weight-read floor measured in the same run.
Writes a table to stdout and `bench.json` (after every measurement) plus
`bench.png` to --out. `--quick` runs fewer sizes and, unless --variants is
given, only eager and pcg-inductor. `--traffic` measures `generate()` calls
at random prompt lengths and batch sizes instead (`traffic.py`), into
`traffic.json`; `--noise` reads every variant's tokens against an fp32
copy of the model, the noise half precision is judged by.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import statistics
import time

import torch

from . import host_phases
from .buckets import Ladder
from .families import FAMILIES
from .traffic import cache_kwargs

PATTERN = "M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-M-"
KINDS = {"M": "mamba", "*": "attention", "-": "mlp"}
VARIANTS = ("eager", "compile", "reduce-overhead", "pcg-eager", "pcg-inductor")
# What --quick runs unless --variants says otherwise: on the full model, `compile` and
# `reduce-overhead` recompile the whole model for each new size class (50-140 s each on the
# H100), which no 5-minute run holds.
QUICK_VARIANTS = ("eager", "pcg-inductor")
# pcg-inductor with --baseline-options merged over --pcg-options, run first: an option's effect
# measured against its absence in the same process (these machines are shared and noisy).
BASELINE = "pcg-baseline"
FIRST_CALL_TOKENS = 16  # the first call is a 16-token prefill: compile, plus capture for pcg


def short_pattern(layers: int | None) -> str:
    """The first `layers` layers of the pattern; if that holds no attention layer, the last Mamba
    layer becomes one (HF's hybrid cache needs an attention layer to count the sequence length)."""
    if not layers:
        return PATTERN
    if layers < 2:
        raise ValueError("--layers must be at least 2 (one Mamba and one attention layer)")
    pattern = PATTERN[:layers]
    if "*" not in pattern:
        last = pattern.rindex("M")
        pattern = pattern[:last] + "*" + pattern[last + 1:]
    return pattern


def nano9b_config(layers: int | None = None):
    from transformers import NemotronHConfig

    pattern = short_pattern(layers)
    return NemotronHConfig(
        vocab_size=131072, hidden_size=4480, intermediate_size=15680, mlp_hidden_act="relu2",
        num_attention_heads=40, num_key_value_heads=8, head_dim=128,
        mamba_num_heads=128, mamba_head_dim=80, n_groups=8, ssm_state_size=128, conv_kernel=4, chunk_size=128,
        layers_block_type=[KINDS[c] for c in pattern], num_hidden_layers=len(pattern),
        max_position_embeddings=8192, tie_word_embeddings=False, pad_token_id=0, eos_token_id=2, bos_token_id=1,
    )


def build_model(layers: int | None, family: str = "nemotron_h"):
    """The benchmark model of `family` (`families.py`) with random bf16 weights, on the GPU."""
    from transformers import AutoModelForCausalLM

    from .families import config

    torch.manual_seed(0)
    with torch.device("cuda"):
        cfg = nano9b_config(layers) if family == "nemotron_h" else config(family)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model.eval()


def weight_bytes(model) -> int:
    """Bytes of every weight: what one forward reads at least once (the floor's numerator)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def state_bytes_per_row(model) -> int:
    """Bytes of Mamba2 state one sequence carries: each decode step reads and writes all of it.

    Per Mamba2 mixer that pcg routes (`hf/adapters/mamba2.py`), the SSM
    state (heads x head dim x state size, fp32 as pcg allocates it) and the
    conv state (channels x kernel width, in the model's dtype). A decode step
    at batch b moves 2 * b times this on top of the weights, which the
    weight-read floor leaves out.
    """
    from .hf.adapters.mamba2 import looks_like_mixer, missing_attributes

    mixer_classes = {cls for cls in {type(m) for m in model.modules()} if looks_like_mixer(cls)}
    total = 0
    for m in model.modules():
        if type(m) in mixer_classes and not missing_attributes(m):
            total += m.num_heads * m.head_dim * m.ssm_state_size * 4
            total += m.conv_dim * m.conv_kernel_size * next(m.parameters()).element_size()
    return total


def copy_bandwidth() -> float:
    """Device memory bandwidth in bytes/s, from a 2 GiB device-to-device copy (read + write)."""
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 10
    del src, dst
    return 2 * (2 << 30) / seconds


# CUDA graphs captured inside timed calls (pcg: a new cache's state at new addresses), per variant.
_CAPTURES_IN_TIMED_CALLS = [0]


def _captures_note() -> str:
    """' (N graphs captured inside timed calls so far)' when N > 0: those timings include capture work."""
    n = _CAPTURES_IN_TIMED_CALLS[0]
    return f"  ({n} graphs captured inside timed calls so far)" if n else ""


# Every call's seconds in the last `timed`, in order: the spread behind its median.
_LAST_TIMES: list[float] = []

# --skip-guard-eval: timed calls run with Dynamo evaluating only the guards that tell its graphs apart.
_SKIP_GUARD_EVAL = [False]


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs (after the caller's warm-up, which compiled what
    they need: with --skip-guard-eval they run under `skip_guard_eval_unsafe`)."""
    from pcg_backend.stats import STATS

    captured = STATS.cuda_graphs_captured
    times = []
    stance = (torch.compiler.set_stance("default", skip_guard_eval_unsafe=True) if _SKIP_GUARD_EVAL[0]
              else contextlib.nullcontext())
    with stance:
        for _ in range(repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    _CAPTURES_IN_TIMED_CALLS[0] += STATS.cuda_graphs_captured - captured
    _LAST_TIMES[:] = times
    return statistics.median(times)


def _spread() -> str:
    """The last `timed` call's fastest, slowest and first three calls, in ms."""
    ms = [1e3 * t for t in _LAST_TIMES]
    if not ms:
        return "none"
    return f"{min(ms):.2f}-{max(ms):.2f} ms, first {', '.join(f'{t:.2f}' for t in ms[:3])}"


def chosen_variants(variants: str | None, quick: bool, baseline: bool = False) -> list[str]:
    """The variants to run: those named by --variants, else QUICK_VARIANTS with --quick, else all;
    with `baseline`, BASELINE first."""
    chosen = variants.split(",") if variants else list(QUICK_VARIANTS if quick else VARIANTS)
    return [BASELINE, *(v for v in chosen if v != BASELINE)] if baseline else chosen


def variant_options(variant: str, pcg_options: dict, baseline_options: dict | None) -> dict:
    """The pcg options `variant` compiles with: --pcg-options, and for BASELINE --baseline-options over them."""
    if variant == BASELINE:
        return {**pcg_options, **(baseline_options or {})}
    return dict(pcg_options)


def install_variant(model, variant: str, skip_module_guards: bool = False, pcg_options: dict | None = None):
    """Compile `model.forward` for `variant`; with `skip_module_guards`, Dynamo does not re-check the
    model's modules and parameters on every call (`torch.compiler.skip_guard_on_all_nn_modules_unsafe`,
    safe when nothing reassigns module attributes between calls)."""
    import pcg_backend

    torch._dynamo.reset()
    pcg_backend.reset_stats()
    model.forward = model.__class__.forward.__get__(model)
    guards = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe} if skip_module_guards else {}
    if variant == "compile":
        model.forward = torch.compile(model.forward, dynamic=None, options=guards or None)
    elif variant == "reduce-overhead":
        model.forward = torch.compile(model.forward, mode="reduce-overhead", options=guards or None)
    elif variant.startswith("pcg-"):
        compiler = "inductor" if variant == BASELINE else variant[4:]
        model.forward = torch.compile(model.forward, backend="pcg",
                                      options={"compiler": compiler, **(pcg_options or {}), **guards})


def profile_runs(model, path: str, prefill_sizes, trace_dir: str | None = None, batches=(1,),
                 append: bool = False) -> None:
    """Write the top CPU and CUDA ops of a greedy generate of 8 tokens at each batch size in
    `batches`, then of one prefill per size in `prefill_sizes` (profiles, not timings), to `path`
    (after what it holds, with `append`). With `trace_dir`, also a gzipped Chrome trace per run,
    and the ops grouped by input shape (to tell which copies are which)."""
    from torch.profiler import ProfilerActivity, profile

    vocab = model.config.vocab_size
    runs = {}
    for b in batches:
        ids = torch.randint(2, vocab, (b, 16), device="cuda")
        runs[f"generate, batch {b}, 8 new tokens"] = lambda ids=ids: model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8, do_sample=False,
            pad_token_id=0)
    for n in prefill_sizes:
        prompt = torch.randint(2, vocab, (1, n), device="cuda")
        runs[f"prefill of {n} tokens"] = lambda prompt=prompt: model(prompt)
    with open(path, "a" if append else "w") as f:
        for title, run in runs.items():
            with torch.no_grad():
                run()   # unprofiled first: a new cache's first decode step may capture graphs (new addresses)
                f.write(f"== {title}, unprofiled: {_host_split(run)}\n")
                f.write(f"== {title}, host phases (unprofiled): {host_phases.measure(run)}\n")
            with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                                          record_shapes=trace_dir is not None) as prof:
                start = time.perf_counter()
                run()
                torch.cuda.synchronize()
                wall_ms = 1e3 * (time.perf_counter() - start)
            # Kernel time against wall time: the share the GPU waited on the host (profiled, so an upper bound).
            busy_ms = _kernel_ms(prof)
            f.write(f"== {title}: {wall_ms:.2f} ms wall (profiled), device busy {busy_ms:.2f} ms "
                    f"({100 * busy_ms / wall_ms:.0f}%)\n")
            f.write(f"== {title}, timeline (profiled): {_timeline(prof)}\n")
            if trace_dir:
                _write_trace(prof, os.path.join(trace_dir, f"trace_{len(os.listdir(trace_dir))}.json.gz"), title)
                f.write(prof.key_averages(group_by_input_shape=True).table(
                    sort_by="cuda_time_total", row_limit=25, max_name_column_width=40, max_shapes_column_width=90))
                f.write("\n")
            f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))
            f.write("\n")
            f.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=60))
            f.write("\n")


def _host_split(run, repeats: int = 5) -> str:
    """Median wall time of `run()` to a synchronized device, and the time it took to return to the
    caller (the host's share where the device still had work queued), by default and with Dynamo
    skipping its guards (`skip_guard_eval_unsafe`): what the host costs a call, unprofiled."""
    def medians():
        wall, host = [], []
        for _ in range(repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            returned = time.perf_counter()
            torch.cuda.synchronize()
            wall.append(time.perf_counter() - start)
            host.append(returned - start)
        return 1e3 * statistics.median(wall), 1e3 * statistics.median(host)

    wall, host = medians()
    with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
        skip_wall, skip_host = medians()
    return (f"{wall:.2f} ms wall, returned after {host:.2f} ms; skipping guards: {skip_wall:.2f} ms wall, "
            f"returned after {skip_host:.2f} ms (medians of {repeats})")


def _timeline(prof) -> str:
    """Where a profiled call's wall time went: the host's time before the first device work, then the
    device's span from its first to its last work, split into busy (the union of kernel and copy
    intervals) and idle (gaps: launch latency inside graphs, or the device waiting on the host), and
    the host's time inside `cudaGraphLaunch`."""
    from torch.autograd import DeviceType

    events = prof.events()
    device = sorted((e.time_range.start, e.time_range.end) for e in events
                    if e.device_type == DeviceType.CUDA and not e.is_user_annotation)
    host = [e for e in events if e.device_type == DeviceType.CPU]
    if not device or not host:
        return "no device or host events"
    busy, reach = 0.0, device[0][0]
    for start, end in device:
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    span = reach - device[0][0]
    lead = device[0][0] - min(e.time_range.start for e in host)
    launch = sum(e.time_range.elapsed_us() for e in host if e.name == "cudaGraphLaunch")
    return (f"host before the first device work {lead / 1e3:.2f} ms; device span {span / 1e3:.2f} ms, busy "
            f"{busy / 1e3:.2f}, idle {(span - busy) / 1e3:.2f}; in cudaGraphLaunch {launch / 1e3:.2f} ms")


def _kernel_ms(prof) -> float:
    """Milliseconds of device work in a profile: device events only, as the profiler's own "Self CUDA
    time total" counts them. CPU ranges such as a compiled region also carry the kernels they launched."""
    from torch.autograd import DeviceType

    return sum(e.self_device_time_total for e in prof.key_averages()
               if e.device_type == DeviceType.CUDA and not e.is_user_annotation) / 1e3


def _write_trace(prof, path: str, title: str) -> None:
    import gzip
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as raw:
        prof.export_chrome_trace(raw.name)
        with open(raw.name, "rb") as src, gzip.open(path, "wb") as dst:
            dst.write(src.read())
    print(f"  trace of {title}: {path}", flush=True)


def _warm_up(result: dict, name: str, fn) -> None:
    """Run `fn` once (it may compile or capture) and record its seconds, and the graphs Dynamo
    has compiled so far, under result["warm_up"][name]: where a compiled variant's time goes."""
    from torch._dynamo.utils import counters

    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    graphs = counters["stats"]["unique_graphs"]
    result["warm_up"][name] = {"seconds": round(seconds, 2), "dynamo_graphs_so_far": graphs}
    if seconds > 1:
        print(f"  {result['variant']:>16} warm-up of {name}: {seconds:.1f} s, {graphs} Dynamo graph(s) so far",
              flush=True)


def run_variant(model, variant: str, prefill_sizes, batches, new_tokens: int, repeats: int, profile_dir=None,
                skip_module_guards: bool = False, trace: bool = False, pcg_options: dict | None = None,
                result: dict | None = None, save=lambda: None, cache: str = "dynamic") -> dict:
    """Measure one variant into `result` (a new dict if None), calling `save()` after each
    measurement, so that a run cut short (a time limit) keeps what it measured. Decode steps
    run on a `cache` ("dynamic" or "static") made by each generate() call."""
    import pcg_backend
    from torch._dynamo.utils import counters

    install_variant(model, variant, skip_module_guards, pcg_options)
    counters.clear()
    _CAPTURES_IN_TIMED_CALLS[0] = 0
    result = {} if result is None else result
    result.update({"variant": variant, "prefill_ms": {}, "decode_ms": {}, "decode_tok_s": {}, "warm_up": {}})
    vocab = model.config.vocab_size
    with torch.no_grad():
        first = torch.randint(2, vocab, (1, FIRST_CALL_TOKENS), device="cuda")
        if variant.startswith("pcg"):
            # The token dim marked dynamic up front (no recompile on live traffic): the first call
            # compiles the one prefill graph and captures every bucket, largest first.
            torch._dynamo.mark_dynamic(first, 1)
        _warm_up(result, "first call", lambda: model(first))
        result["first_call_s"] = result["warm_up"]["first call"]["seconds"]
        if variant.startswith("pcg"):
            # Where the first call went: pcg's piece compiler (Inductor) and its captures; the rest is
            # Dynamo's tracing, pcg's graph passes and the forwards themselves.
            stats = pcg_backend.stats()
            result["warm_up"]["first call"].update(compile_s=stats["compile_seconds"],
                                                   warmup_s=stats["warmup_seconds"],
                                                   capture_s=stats["capture_seconds"])
            print(f"  {variant:>16} first call: {stats['compile_seconds']:.1f} s compiling pieces, "
                  f"{stats['warmup_seconds']:.1f} s in runs before captures, {stats['capture_seconds']:.1f} s "
                  f"capturing", flush=True)
        save()
        for n in prefill_sizes:
            ids = torch.randint(2, vocab, (1, n), device="cuda")
            _warm_up(result, f"prefill {n}", lambda: model(ids))  # compiles or captures this size
            result["prefill_ms"][n] = 1e3 * timed(lambda: model(ids), repeats)
            result.setdefault("prefill_ms_calls", {})[n] = [round(1e3 * t, 3) for t in _LAST_TIMES]
            save()
            print(f"  {variant:>16} prefill {n:>5}: {result['prefill_ms'][n]:8.2f} ms (calls {_spread()})"
                  f"{_captures_note()}", flush=True)
        profile_path = os.path.join(profile_dir, f"profile_{variant}.txt") if profile_dir else None
        trace_dir = os.path.join(profile_dir, f"traces_{variant}") if profile_dir and trace else None
        if trace_dir:
            os.makedirs(trace_dir, exist_ok=True)
        if profile_path:
            # The prefills' profiles before any decode: a run cut short at its time limit while the
            # decode graph compiles still has them.
            profile_runs(model, profile_path, prefill_sizes, trace_dir, batches=())
        for b in batches:
            ids = torch.randint(2, vocab, (b, 16), device="cuda")
            def gen(k):
                return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k,
                                      min_new_tokens=k, do_sample=False, pad_token_id=0, **cache_kwargs(cache))

            # Warm-up: prefill and decode graphs, every cache length. Twice: each generate makes a
            # new cache, and the allocator may place the second one's state elsewhere (pcg then
            # captures decode graphs for those addresses once; see "captures at new addresses").
            _warm_up(result, f"generate b={b}", lambda: gen(new_tokens))
            _warm_up(result, f"generate b={b}, again", lambda: gen(new_tokens))
            # Medians of `repeats` runs each: a single run of each made the difference, hence
            # the step time, swing by 1.5 ms between processes on a shared host.
            long = timed(lambda: gen(new_tokens), repeats)
            short = timed(lambda: gen(1), repeats)
            step = (long - short) / (new_tokens - 1)
            result["decode_ms"][b] = 1e3 * step
            result["decode_tok_s"][b] = b / step
            save()
            print(f"  {variant:>16} decode b={b:>3}: {1e3 * step:8.2f} ms/step{_captures_note()}", flush=True)
    if profile_path and batches:
        profile_runs(model, profile_path, (), trace_dir, batches, append=True)
    if variant.startswith("pcg"):
        s = pcg_backend.stats()
        result["graph_memory_mib"] = s["graph_memory_bytes"] / 2**20
        result["pcg_stats"] = {k: v for k, v in s.items() if k != "routing"}
        print("\n".join(f"  {variant:>16} {line}" for line in s["capture_summaries"]), flush=True)
        # Captures after the first forward of a key (a new cache's state at new addresses) fall inside
        # timed calls: a non-zero count here means some timings include capture work.
        result["captures_in_timed_calls"] = _CAPTURES_IN_TIMED_CALLS[0]
        print(f"  {variant:>16} captures at new addresses: {s['new_address_captures']} "
              f"({_CAPTURES_IN_TIMED_CALLS[0]} graphs captured inside timed calls), "
              f"eager piece runs: {s['eager_runs']}, attention calls with SDPA's causal flag after a host "
              f"check: {s['causal_flag_attention']}", flush=True)
    return result


def table(results, floor_ms: float, state_ms_per_row: float = 0.0) -> str:
    """The measurements against eager and the weight-read floor; with `state_ms_per_row` (the time
    to read and write one sequence's Mamba2 state once), decode steps also against that floor plus
    their batch's state traffic."""
    base = next((r for r in results if r["variant"] == "eager"), None)
    lines = [f"weight-read floor: {floor_ms:.2f} ms; Mamba2 state read and written per sequence: "
             f"{state_ms_per_row:.3f} ms", ""]
    header = f"{'variant':>16} {'metric':>16} {'ms':>9} {'x eager':>8} {'x floor':>8} {'x +state':>8}"
    lines += [header, "-" * len(header)]
    for r in results:
        rows = [(f"prefill {n}", v, base and base["prefill_ms"].get(n), None) for n, v in r["prefill_ms"].items()]
        rows += [(f"decode b={b}", v, base and base["decode_ms"].get(b), floor_ms + int(b) * state_ms_per_row)
                 for b, v in r["decode_ms"].items()]
        for name, ms, ref, with_state in rows:
            speed = f"{ref / ms:8.2f}" if ref else f"{'-':>8}"
            state = f"{ms / with_state:8.2f}" if with_state else f"{'-':>8}"
            lines.append(f"{r['variant']:>16} {name:>16} {ms:9.2f} {speed} {ms / floor_ms:8.2f} {state}")
        if "failed" in r:
            lines.append(f"{r['variant']:>16} FAILED: {r['failed']}")
            continue
        extra = f"first call ({FIRST_CALL_TOKENS} tokens) {r['first_call_s']:.1f} s"
        if "graph_memory_mib" in r:
            extra += f", graph memory {r['graph_memory_mib']:.0f} MiB"
        lines.append(f"{r['variant']:>16} {extra}")
    lines.append("(x eager: speed-up over eager in this run; x floor: time over the weight-read floor; "
                 "x +state: a decode step over that floor plus its batch's Mamba2 state read and written)")
    return "\n".join(lines)


def plot(results, floor_ms: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        if "failed" in r:
            continue
        a.plot(list(r["prefill_ms"]), list(r["prefill_ms"].values()), marker="o", label=r["variant"])
        b.plot(list(r["decode_ms"]), list(r["decode_ms"].values()), marker="o", label=r["variant"])
    for ax, title, xlabel in ((a, "prefill latency", "tokens"), (b, "decode step", "batch")):
        if ax.get_lines():   # no lines: every variant failed, and an empty axis cannot be log-scaled
            ax.set_xscale("log", base=2)
        ax.axhline(floor_ms, color="gray", linestyle="--", label="weight-read floor")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ms")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _json_object(text: str) -> dict:
    """argparse type for --pcg-options: a JSON object, or a clear error."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"max_capture_size\": 1024}}', got {text!r}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="nemotron_h", choices=FAMILIES,
                        help="the model family to build, in a 7-9 B shape (pcg_backend/families.py)")
    parser.add_argument("--layers", type=int, default=None,
                        help="nemotron_h only: use only the first N layers of the pattern")
    parser.add_argument("--quick", action="store_true",
                        help=f"fewer sizes and repeats, and unless --variants is given only {','.join(QUICK_VARIANTS)}: "
                             "about 5 minutes on an H100. compile and reduce-overhead take far longer "
                             "on the full model, where each new size class recompiles the whole model (50-140 s each "
                             "on an H100)")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated subset of {VARIANTS} (default: all; with --quick {','.join(QUICK_VARIANTS)})")
    parser.add_argument("--prefill", default=None, help="comma-separated prefill token counts (overrides --quick)")
    parser.add_argument("--batches", default=None,
                        help="comma-separated decode batch sizes (overrides --quick); an empty string measures "
                             "prefills only, which skips compiling the decode graph")
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--skip-guard-eval", action="store_true",
                        help="time prefills and decode steps (not the warm-ups, nor --traffic) under "
                             "torch.compiler.set_stance(skip_guard_eval_unsafe=True): Dynamo checks only the "
                             "guards that tell its compiled graphs apart, which is the host time a server that "
                             "never changes its model could save")
    parser.add_argument("--skip-module-guards", action="store_true",
                        help="compile every compiled variant with torch.compiler.skip_guard_on_all_nn_modules_unsafe")
    parser.add_argument("--profile", action="store_true",
                        help="profile a generate at each decode batch size and one prefill per size of each variant")
    parser.add_argument("--trace", action="store_true",
                        help="with --profile: also write gzipped Chrome traces and a by-shape table")
    parser.add_argument("--traffic", action="store_true",
                        help="time --calls generate() calls at seeded random prompt lengths and batch sizes, each "
                             "with a new cache, against the ideal (prefill at its bucket plus decode steps)")
    parser.add_argument("--calls", type=int, default=100, help="with --traffic: how many generate() calls")
    parser.add_argument("--new-tokens", type=int, default=16, help="with --traffic: new tokens per call")
    parser.add_argument("--cache", default="dynamic", choices=["dynamic", "static"],
                        help="the cache every generate() call makes: HF's DynamicCache (default), or a static cache, "
                             "with which pcg captures attention too (one graph per prefill bucket and per decode step)")
    parser.add_argument("--noise", action="store_true",
                        help="with --traffic: make every call first on an fp32 copy of the model, eagerly, and "
                             "report how far each variant keeps its tokens: in half precision, eager's distance "
                             "from fp32 is the noise pcg's is read against (the copy needs twice the bf16 weights' memory "
                             "more, freed before the timed calls)")
    parser.add_argument("--pcg-options", type=_json_object, default={},
                        help='extra pcg options as JSON for the pcg variants, e.g. \'{"max_capture_size": 1024}\'')
    parser.add_argument("--baseline-options", type=_json_object, default=None,
                        help=f"also run {BASELINE}, first: pcg-inductor with these options as JSON merged over "
                             "--pcg-options, e.g. '{\"skinny_gemm\": \"static\"}', so that the other variants are "
                             "read against it in the same process")
    args = parser.parse_args(argv)
    variants = chosen_variants(args.variants, args.quick, baseline=args.baseline_options is not None)
    # BASELINE is a variant only with its options given (it is then added, first).
    known = VARIANTS + ((BASELINE,) if args.baseline_options is not None else ())
    bad = [v for v in variants if v not in known]
    if bad:
        parser.error(f"unknown variant(s) {bad}; choose from {VARIANTS}")
    if args.noise and not args.traffic:
        parser.error("--noise needs --traffic (it reads each variant's generate() tokens against an fp32 copy)")
    if args.layers and args.family != "nemotron_h":
        parser.error("--layers shortens the nemotron_h pattern only")
    if not torch.cuda.is_available():
        parser.error("the benchmark needs a CUDA GPU")
    if args.traffic:
        return run_traffic(args, variants)

    prefill = [1, 16, 128] if args.quick else [1, 16, 128, 512, 2048]
    batches = [1, 8] if args.quick else [1, 8, 32]
    if args.prefill:
        prefill = [int(n) for n in args.prefill.split(",")]
    if args.batches is not None:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]   # "" measures no decode
    new_tokens, repeats = 32, (3 if args.quick else 5)
    device = torch.cuda.get_device_name()
    os.makedirs(args.out, exist_ok=True)
    model = build_model(args.layers, args.family)
    weights = weight_bytes(model)
    bandwidth = copy_bandwidth()
    floor_ms = 1e3 * weights / bandwidth
    state_ms_per_row = 1e3 * 2 * state_bytes_per_row(model) / bandwidth
    print(f"variants: {','.join(variants)}; prefill {prefill}; decode batches {batches}", flush=True)
    _SKIP_GUARD_EVAL[0] = args.skip_guard_eval
    print(f"family: {args.family}; pattern: {short_pattern(args.layers) if args.family == 'nemotron_h' else '-'}; module guards {'skipped' if args.skip_module_guards else 'kept'}; "
          f"guard evaluation in timed calls {'skipped' if args.skip_guard_eval else 'kept'}; "
          f"extra pcg options {args.pcg_options}"
          f"{f'; {BASELINE} options {args.baseline_options}' if args.baseline_options is not None else ''}", flush=True)
    print(f"device: {device}; {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params, "
          f"{weights / 1e9:.1f} GB; copy bandwidth {bandwidth / 1e12:.2f} TB/s; floor {floor_ms:.2f} ms", flush=True)
    results = []

    def save():
        # Written after every measurement, so a run cut short keeps what it measured.
        with open(os.path.join(args.out, "bench.json"), "w") as f:
            json.dump({"device": device, "family": args.family, "floor_ms": floor_ms, "weight_bytes": weights,
                       "state_ms_per_row": state_ms_per_row,
                       "bandwidth_bytes_s": bandwidth, "skip_module_guards": args.skip_module_guards,
                       "skip_guard_eval": args.skip_guard_eval,
                       "pcg_options": args.pcg_options, "baseline_options": args.baseline_options,
                       "cache": args.cache,
                       "results": results}, f, indent=1, default=str)

    for v in variants:
        result = {"variant": v, "prefill_ms": {}, "decode_ms": {}, "decode_tok_s": {}}
        results.append(result)
        try:
            run_variant(model, v, prefill, batches, new_tokens, repeats, args.out if args.profile else None,
                        args.skip_module_guards, args.trace, variant_options(v, args.pcg_options, args.baseline_options),
                        result, save, args.cache)
        except Exception as e:  # noqa: BLE001 - one failed variant is reported, the others still run
            message = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            print(f"  {v:>16} FAILED: {message}", flush=True)
            result["failed"] = message
        torch.cuda.empty_cache()
        save()
    text = table(results, floor_ms, state_ms_per_row)
    print(f"\n{device}\n{text}")
    try:
        plot(results, floor_ms, os.path.join(args.out, "bench.png"))
    except ImportError:
        print("matplotlib is not installed: no bench.png (pip install .[bench])")


def run_traffic(args, variants: list[str]) -> dict:
    """`--traffic`: the same seeded generate() calls for each variant, then the ideal on the last pcg variant
    (not BASELINE). The plan's buckets follow --pcg-options."""
    import pcg_backend
    from pcg_backend import traffic
    from pcg_backend.options import parse_options

    opts = parse_options(args.pcg_options)
    batches = [int(b) for b in (args.batches or "1,4,8").split(",")]
    # Each batch size is its own Dynamo graph for prefill and decode: with three of them Dynamo's
    # default limit of 8 graphs per frame runs later shapes without any backend, silently.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    calls = traffic.plan(0, args.calls, opts.largest, batches)
    device = torch.cuda.get_device_name()
    os.makedirs(args.out, exist_ok=True)
    model = build_model(args.layers, args.family)
    # The decode step's floor: every weight read once from device memory, at the copy bandwidth measured
    # here; and the Mamba2 state each sequence reads and writes per step, which grows with the batch.
    bandwidth = copy_bandwidth()
    floor_ms = 1e3 * weight_bytes(model) / bandwidth
    state_ms_per_row = 1e3 * 2 * state_bytes_per_row(model) / bandwidth
    print(f"traffic: {args.family}; {device}; {len(calls)} generate() calls of {args.new_tokens} new tokens, "
          f"{args.cache} cache, batches {batches}, "
          f"prompts 1..{2 * opts.largest} (largest bucket {opts.largest}); variants {','.join(variants)}; "
          f"weight-read floor {floor_ms:.2f} ms", flush=True)
    results: dict = {}
    ideal = None
    sequences = {}
    fp32 = None
    if args.noise:
        # Made before any variant is installed, so that the copy runs eagerly; freed before the timed calls.
        reference = copy.deepcopy(model).float()
        fp32 = traffic.reference_sequences(reference, calls, args.new_tokens, cache=args.cache)
        del reference
        torch.cuda.empty_cache()
        print(f"  fp32 copy: {len(fp32)} reference calls made", flush=True)

    def save():
        # Written after every variant, so a run cut short keeps what it measured.
        with open(os.path.join(args.out, "traffic.json"), "w") as f:
            json.dump({"device": device, "family": args.family, "cache": args.cache, "floor_ms": floor_ms,
                       "state_ms_per_row": state_ms_per_row, "calls": [dataclasses.asdict(c) for c in calls],
                       "new_tokens": args.new_tokens, "results": results, "ideal": ideal}, f, indent=1, default=str)

    for v in variants:
        install_variant(model, v, args.skip_module_guards, variant_options(v, args.pcg_options, args.baseline_options))
        try:
            r = traffic.run(model, calls, args.new_tokens, log=lambda m: print(f"  {v:>14} {m}", flush=True),
                            cache=args.cache, largest=opts.largest, overflow=opts.overflow_sizes)
        except Exception as e:  # noqa: BLE001 - one failed variant is reported, the others still run
            results[v] = {"failed": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
            save()
            continue
        sequences[v] = r.pop("sequences")
        if fp32 is not None:
            r["against_fp32"] = traffic.agreement(sequences[v], fp32, args.new_tokens)
        if v.startswith("pcg"):
            r["pcg_stats"] = {k: val for k, val in pcg_backend.stats().items() if k != "routing"}
        results[v] = r
        print(f"  {v:>14} p50 {1e3 * r['p50_s']:.1f} ms, captures after warm-up {r['captures_after_warm_up']}, "
              f"compiles {r['compiles_after_warm_up']}", flush=True)
        save()
        if v.startswith("pcg") and v != BASELINE:   # the ideal of the variants under test, not the baseline's
            ideal = traffic.ideal(model, calls, args.new_tokens, Ladder(opts.capture_sizes + opts.overflow_sizes),
                                  cache=args.cache)
            print(f"  ideal p50 {1e3 * ideal['p50_s']:.1f} ms, decode step ms {ideal['decode_step_ms']}", flush=True)
            save()
        torch.cuda.empty_cache()
    if "eager" in sequences:
        # bf16 greedy decoding: the share of calls whose tokens equal eager's (padding changes GEMM shapes).
        for v, seqs in sequences.items():
            if v in results and "failed" not in results[v]:
                results[v]["same_tokens_as_eager"] = sum(
                    torch.equal(a, b) for a, b in zip(seqs, sequences["eager"])) / len(seqs)
    save()
    print(f"\n{device}\n{traffic.table(results, ideal, floor_ms, state_ms_per_row)}")
    try:
        traffic.plot(results, ideal, calls, os.path.join(args.out, "traffic.png"))
    except ImportError:
        print("matplotlib is not installed: no traffic.png (pip install .[bench])")
    return results


if __name__ == "__main__":
    main()
