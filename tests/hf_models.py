"""Tiny random configs of the six HF hybrid families (no hub access needed)."""

from __future__ import annotations

import copy

import torch

FAMILIES = ["nemotron_h", "bamba", "falcon_h1", "granitemoehybrid", "zamba2", "mamba2"]

# Sizes keep every in_proj width a multiple of 8: causal-conv1d's CUDA kernel needs 8-aligned strides.
_MAMBA = dict(mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=2, mamba_d_state=16, mamba_d_conv=4, mamba_chunk_size=16)


def tiny_config(family: str):
    import transformers as tf

    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False)
    if family in ("nemotron_h", "nemotron_h_moe"):
        nemotron = dict(head_dim=8, mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=16, conv_kernel=4,
                        chunk_size=16, mlp_hidden_act="relu2", num_hidden_layers=4)
        if family == "nemotron_h":
            return tf.NemotronHConfig(**common, **nemotron, layers_block_type=["mamba", "attention", "mamba", "mlp"])
        # MoE layers: 4 routed experts (2 per token) and a shared one, as in Nemotron 3.
        return tf.NemotronHConfig(**common, **nemotron, layers_block_type=["mamba", "moe", "attention", "moe"],
                                  n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=32,
                                  moe_shared_expert_intermediate_size=32, num_experts_per_tok=2, n_group=1,
                                  topk_group=1)
    if family == "bamba":
        return tf.BambaConfig(**common, num_hidden_layers=3, attn_layer_indices=[1], mamba_expand=2, **_MAMBA)
    if family == "falcon_h1":
        return tf.FalconH1Config(**common, num_hidden_layers=2, mamba_expand=2, mamba_d_ssm=64, head_dim=8, **_MAMBA)
    if family == "granitemoehybrid":
        return tf.GraniteMoeHybridConfig(**common, num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"],
                                         num_local_experts=2, num_experts_per_tok=1, shared_intermediate_size=64,
                                         mamba_expand=2, **_MAMBA)
    if family == "zamba2":
        return tf.Zamba2Config(**{k: v for k, v in common.items() if k != "intermediate_size"}, num_hidden_layers=4,
                               layers_block_type=["mamba", "hybrid", "mamba", "mamba"], mamba_d_state=16,
                               mamba_d_conv=4, mamba_expand=2, mamba_ngroups=2, mamba_headdim=8, n_mamba_heads=8,
                               chunk_size=16, attention_head_dim=8, num_mem_blocks=1, use_mem_rope=True)
    if family == "mamba2":
        return tf.Mamba2Config(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8, expand=2,
                               n_groups=2, state_size=16, conv_kernel=4, chunk_size=16, pad_token_id=0,
                               eos_token_id=1, bos_token_id=2, tie_word_embeddings=False)
    raise ValueError(family)


def tiny_model(family: str, dtype=torch.float32, device="cpu", seed=0):
    import transformers as tf

    torch.manual_seed(seed)
    config = tiny_config(family)
    model = tf.AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype).eval()
    # Random init leaves some params tiny; make the SSM and norms non-trivial and deterministic.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.linspace(1, 4, p.numel(), device=p.device)).to(p.dtype))
    return model


def pcg_twin(model, options: dict):
    """A shallow copy of `model` whose `forward` is compiled with pcg: it shares the weights (and so the
    eager reference stays `model` itself), and only `forward` differs."""
    twin = copy.copy(model)
    twin.forward = torch.compile(model.forward, backend="pcg", options=options)
    return twin
