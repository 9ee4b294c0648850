"""A decode step with and without pcg's decode-attention kernel, in one process (needs CUDA).

    python tools/decode_attention_ab.py [--family falcon_h1] [--batch 1] [--new-tokens 16] [--rounds 3]

Over a DynamicCache every attention layer of a decode step runs eagerly
between graph replays, so its host time is part of the step. pcg's
`pcg::attention` runs a decode step's attention in one Triton kernel
(`ops/decode_attention.py`) where HF's SDPA path launches about eight
kernels; the kernel saves device time, but its launch goes through Triton's
Python launcher. This builds the benchmark's model of a family (random bf16
weights, `pcg_backend/families.py`), compiles it with pcg-inductor (lazy
capture), warms up greedy `generate()`, then times the decode step in
alternating rounds: the kernel on, then off (HF's SDPA path through the same
op). Both run the same compiled graphs and captured pieces, since the
attention between pieces is not captured; the rounds alternate so that a
host that speeds up or slows down weighs on both. It prints each round's
step time, the medians and their ratio, and for each path where a
`generate()`'s host time goes (`host_phases.py`; "between replays" holds the
attention layers run between the step's graphs). A diagnostic: the benchmark measures
speed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pcg_backend import bench, host_phases  # noqa: E402
from pcg_backend.families import FAMILIES  # noqa: E402
from pcg_backend.ops import decode_attention  # noqa: E402


def _generate(model, batch: int):
    ids = torch.randint(2, model.config.vocab_size, (batch, 16), device="cuda")

    def gen(k):
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, min_new_tokens=k,
                                  do_sample=False, pad_token_id=0)

    return gen


def step_ms(model, batch: int, new_tokens: int, repeats: int) -> float:
    """Milliseconds per decode step: (a generate of `new_tokens` - one of 1 token) / (new_tokens - 1)."""
    gen = _generate(model, batch)
    long = bench.timed(lambda: gen(new_tokens), repeats)
    short = bench.timed(lambda: gen(1), repeats)
    return 1e3 * (long - short) / (new_tokens - 1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="falcon_h1", choices=FAMILIES)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="generate() calls per timing (medians)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of kernel on / off")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2: a step is the difference between two generate() lengths")
    if not torch.cuda.is_available():
        parser.error("this diagnostic needs a CUDA GPU")
    import transformers
    import triton

    print(torch.cuda.get_device_name(), "torch", torch.__version__, "transformers", transformers.__version__,
          "triton", triton.__version__, flush=True)
    model = bench.build_model(None, args.family)
    bench.install_variant(model, "pcg-inductor", pcg_options={"capture": "lazy"})
    for _ in range(2):   # compiles prefill and decode, captures their graphs at this cache's addresses
        step_ms(model, args.batch, args.new_tokens, 1)
    applies = decode_attention.applies
    times: dict[str, list[float]] = {"kernel": [], "sdpa": []}
    try:
        for r in range(args.rounds):
            for mode in times:
                decode_attention.applies = applies if mode == "kernel" else (lambda *a: False)
                times[mode].append(step_ms(model, args.batch, args.new_tokens, args.repeats))
                print(f"round {r}: {mode:>6} {times[mode][-1]:.3f} ms per step", flush=True)
        for mode in times:   # where a generate()'s host time goes, per mode: "between replays" holds the cuts
            decode_attention.applies = applies if mode == "kernel" else (lambda *a: False)
            gen = _generate(model, args.batch)
            print(f"{mode:>6} generate of {args.new_tokens}: {host_phases.measure(lambda: gen(args.new_tokens))}",
                  flush=True)
    finally:
        decode_attention.applies = applies
    on, off = statistics.median(times["kernel"]), statistics.median(times["sdpa"])
    print(f"{args.family}, batch {args.batch}: decode step {on:.3f} ms with the kernel, {off:.3f} ms with "
          f"HF's SDPA path ({on / off:.3f}x), medians of {args.rounds} rounds")


if __name__ == "__main__":
    main()
