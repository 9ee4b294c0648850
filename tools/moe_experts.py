"""pcg's MoE router and experts kernels against HF's router and grouped_mm experts path, at a family's MoE
shape (needs CUDA).

    python tools/moe_experts.py [--tokens 1,8,16,64,128,512] [--family granitemoehybrid] [--search]

For each token count it routes random tokens to the family's experts (top-k
of distinct experts, softmax weights), checks `pcg::moe_experts`'s kernels
against HF's `grouped_mm_experts_forward` over the same weights and against
an fp32 reference, then times both in a CUDA graph, rotating over copies of
the weights so that every call reads them from memory. It prints the
microseconds per MoE layer, and the rate at which each reads the weights of
the experts the tokens chose. Then it times `pcg::moe_router` against HF's
router arithmetic (a linear, `.float()`, top-k, softmax) the same way, and
counts the tokens whose experts differ. `--search` also times other tiles
for the up and down kernels at each token count and prints the fastest.
"""

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemm_libraries import replay_us  # noqa: E402

from pcg_backend.families import config as family_config  # noqa: E402
from pcg_backend.ops import moe_experts, moe_router  # noqa: E402

COPIES = 4


def routing(tokens: int, experts: int, top_k: int, device="cuda"):
    """Random top-k of distinct experts per token, with softmax weights in bf16."""
    ids = torch.rand(tokens, experts, device=device).argsort(dim=-1)[:, :top_k]
    weights = torch.softmax(torch.randn(tokens, top_k, device=device), dim=-1).to(torch.bfloat16)
    return ids, weights


def fp32_reference(x, ids, weights, gate_up, down):
    gu = torch.einsum("th,tkoh->tko", x.float(), gate_up[ids].float())
    gate, up = gu.chunk(2, dim=-1)
    h = torch.nn.functional.silu(gate) * up
    y = torch.einsum("tki,tkoi->tko", h, down[ids].float())
    return (y * weights.float()[..., None]).sum(dim=1)


def hf_grouped(x, ids, weights, gate_up, down):
    from transformers.integrations.moe import grouped_mm_experts_forward

    return grouped_mm_experts_forward(moe_experts.GatedExperts(gate_up, down), x, ids, weights)


def time_layer(fn, tokens, hidden, experts, top_k, weights_list) -> float:
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    ids, w = routing(tokens, experts, top_k)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):   # compile and library init outside the capture
        for gu, dn in weights_list:
            fn(x, ids, w, gu, dn)
    torch.cuda.synchronize()
    graph, rounds = torch.cuda.CUDAGraph(), 3
    with torch.cuda.graph(graph):
        for _ in range(rounds):
            for gu, dn in weights_list:
                fn(x, ids, w, gu, dn)
    return replay_us(graph, rounds * len(weights_list))


def time_router(fn, tokens, hidden, experts, top_k) -> float:
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    weights = [(torch.randn(experts, hidden, device="cuda") / hidden ** 0.5).to(torch.bfloat16)
               for _ in range(COPIES)]
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):   # compile, and the arrival counters' allocation, outside the capture
        for w in weights:
            fn(x, w, top_k)
    torch.cuda.synchronize()
    graph, rounds = torch.cuda.CUDAGraph(), 3
    with torch.cuda.graph(graph):
        for _ in range(rounds):
            for w in weights:
                fn(x, w, top_k)
    return replay_us(graph, rounds * len(weights))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="1,8,16,64,128,512")
    parser.add_argument("--family", default="granitemoehybrid")
    parser.add_argument("--search", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tools/moe_experts.py needs a CUDA GPU")
    config = family_config(args.family)
    experts, top_k = config.num_local_experts, config.num_experts_per_tok
    hidden, inter = config.hidden_size, config.intermediate_size
    print(torch.cuda.get_device_name(), f"{args.family}: {experts} experts, top {top_k}, hidden {hidden}, "
          f"intermediate {inter}")
    torch.manual_seed(0)
    weights_list = [((torch.randn(experts, 2 * inter, hidden, device="cuda") / hidden ** 0.5).to(torch.bfloat16),
                     (torch.randn(experts, hidden, inter, device="cuda") / inter ** 0.5).to(torch.bfloat16))
                    for _ in range(COPIES)]
    expert_bytes = 3 * inter * hidden * 2
    for tokens in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
        ids, w = routing(tokens, experts, top_k)
        gu, dn = weights_list[0]
        ours = moe_experts.triton_experts(x, ids, w, gu, dn)
        theirs = hf_grouped(x, ids, w, gu, dn)
        exact = fp32_reference(x, ids, w, gu, dn)
        scale = exact.abs().max().item()
        err_ours = (ours.float() - exact).abs().max().item() / scale
        err_hf = (theirs.float() - exact).abs().max().item() / scale
        gap = (ours.float() - theirs.float()).abs().max().item() / scale
        chosen = ids.unique().numel()
        t_ours = time_layer(moe_experts.triton_experts, tokens, hidden, experts, top_k, weights_list)
        t_hf = time_layer(hf_grouped, tokens, hidden, experts, top_k, weights_list)
        rate = chosen * expert_bytes / t_ours / 1e6
        print(f"tokens {tokens:4d}: {chosen:2d} experts chosen; pcg {t_ours:7.1f} us ({rate:.2f} TB/s), "
              f"HF grouped_mm {t_hf:7.1f} us; max error / max |out| vs fp32: pcg {err_ours:.2e}, "
              f"HF {err_hf:.2e}, pcg vs HF {gap:.2e}")
        if args.search:
            _search(tokens, hidden, experts, top_k, weights_list)
    for tokens in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
        router = (torch.randn(experts, hidden, device="cuda") / hidden ** 0.5).to(torch.bfloat16)
        ours, theirs = moe_router.triton_router(x, router, top_k), moe_router.reference(x, router, top_k)
        differ = (ours[2].sort(-1).values != theirs[2].sort(-1).values).any(-1).sum().item()
        t_ours = time_router(moe_router.triton_router, tokens, hidden, experts, top_k)
        t_hf = time_router(moe_router.reference, tokens, hidden, experts, top_k)
        print(f"router, tokens {tokens:4d}: pcg {t_ours:6.1f} us, HF's arithmetic {t_hf:6.1f} us; "
              f"tokens whose experts differ (near-ties): {differ}")


def _search(tokens, hidden, experts, top_k, weights_list) -> None:
    for name in ("UP_TILE", "DOWN_TILE"):
        tile = getattr(moe_experts, name)
        saved = dict(tile)
        results = []
        for bn, bk, stages in itertools.product((16, 32, 64), (64, 128), (3, 4, 5)):
            tile.update(BLOCK_N=bn, BLOCK_K=bk, num_stages=stages)
            try:
                results.append((round(time_layer(moe_experts.triton_experts, tokens, hidden, experts, top_k,
                                                 weights_list), 1), bn, bk, stages))
            except Exception as e:  # noqa: BLE001 - a tile that needs more shared memory than the SM has
                if "resources" not in str(e) and "shared memory" not in str(e):
                    raise
            tile.clear(), tile.update(saved)
        print(f"    {name} at {tokens} tokens, best (us, BLOCK_N, BLOCK_K, stages): {sorted(results)[:3]}")


if __name__ == "__main__":
    main()
