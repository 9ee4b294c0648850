"""pcg as a drop-in for an HF hybrid model: greedy generate with a tiny random NemotronH.

Builds the model from its config class (no hub access), generates with HF
eager and with `model.forward` compiled by pcg, checks that the tokens match,
and prints pcg's report. CPU by default; pass --device cuda (with mamba-ssm
and causal-conv1d installed) to capture CUDA graphs. With --cache static the
cache is HF's static one, and each graph is one piece, attention included.
"""

import argparse
import copy

import torch
import transformers

import pcg_backend


def tiny_nemotron_h():
    config = transformers.NemotronHConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, layers_block_type=["mamba", "attention", "mamba", "mlp"], num_hidden_layers=4,
        mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=16, conv_kernel=4, chunk_size=16,
        mlp_hidden_act="relu2", pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--cache", choices=["dynamic", "static"], default="dynamic")
    args = parser.parse_args()

    model = tiny_nemotron_h().to(args.device)
    ids = torch.randint(3, model.config.vocab_size, (2, 11), device=args.device)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
              do_sample=False, pad_token_id=0)
    if args.cache == "static":
        # disable_compile: on CUDA, HF compiles a static cache's decode itself; the reference stays eager.
        kw.update(cache_implementation="static", disable_compile=True)
    with torch.no_grad():
        eager = model.generate(ids, **kw)
        compiled = copy.copy(model)                 # shares the weights; only `forward` differs
        compiled.forward = torch.compile(model.forward, backend="pcg", options={"max_capture_size": 64})
        pcg = compiled.generate(ids, **kw)
    print(f"tokens equal to eager: {torch.equal(eager, pcg)}")
    print(pcg_backend.report())


if __name__ == "__main__":
    main()
