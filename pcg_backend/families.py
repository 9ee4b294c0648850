"""Benchmark shapes of the HF hybrid families: 7-9 B-parameter configs, built with random weights.

    python -m pcg_backend.bench --family bamba

Each shape follows a published model of its family, so that the benchmark
reads as much weight memory and runs the same layer mix as that model:

| family | after | layers | attention layers |
| --- | --- | --- | --- |
| `nemotron_h` | Nemotron-Nano-9B-v2 | 56 | 4 |
| `bamba` | Bamba-9B | 32 | 3 |
| `falcon_h1` | Falcon-H1-7B (Mamba2 widened to 40 heads) | 44 | 44, beside Mamba2 in every layer |
| `zamba2` | Zamba2-7B, 54 of its 81 layers | 54 | 9 blocks (untied, below) |
| `granitemoehybrid` | Granite-4.0-H-Tiny (64 experts, 6 per token) | 40 | 4 |
| `mamba2` | an 8 B Mamba2 | 56 | 0 |

Zamba2's hybrid layers share 2 attention blocks in the published model, but
transformers ties them only when the config ties the word embeddings, which
these configs do not: the benchmark's 9 blocks are 9 sets of weights, each
read once per forward, as the weight-read floor counts them.
"""

from __future__ import annotations

FAMILIES = ("nemotron_h", "bamba", "falcon_h1", "zamba2", "granitemoehybrid", "mamba2")
_COMMON = dict(tie_word_embeddings=False, pad_token_id=0, eos_token_id=2, bos_token_id=1)
_MAMBA = dict(mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=256)


def config(family: str):
    """The benchmark config of `family` (see the module docstring), or ValueError naming the families."""
    import transformers as tf

    if family == "nemotron_h":
        from .bench import nano9b_config

        return nano9b_config()
    if family == "bamba":
        return tf.BambaConfig(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            attn_layer_indices=[9, 18, 27], num_attention_heads=32, num_key_value_heads=8, mamba_n_heads=128,
            mamba_d_head=64, mamba_n_groups=1, mamba_d_state=128, max_position_embeddings=8192, **_MAMBA, **_COMMON)
    if family == "falcon_h1":
        # 40 Mamba2 heads, not 36: HF's eager FalconH1 hands causal-conv1d a view of the in-projection,
        # whose row stride (2 * d_ssm + 2 * d_state + heads) the kernel needs to be a multiple of 8.
        return tf.FalconH1Config(
            vocab_size=130049, hidden_size=3072, intermediate_size=12288, num_hidden_layers=44, num_attention_heads=12,
            num_key_value_heads=2, head_dim=256, mamba_d_ssm=5120, mamba_n_heads=40, mamba_d_head=128,
            mamba_n_groups=1, mamba_d_state=256, max_position_embeddings=8192, **_MAMBA, **_COMMON)
    if family == "zamba2":
        layers = 54
        return tf.Zamba2Config(
            vocab_size=32000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=layers,
            layers_block_type=["hybrid" if i % 6 == 5 else "mamba" for i in range(layers)], num_attention_heads=32,
            num_key_value_heads=32, attention_head_dim=224, mamba_d_state=64, n_mamba_heads=112, mamba_headdim=64,
            mamba_ngroups=2, mamba_d_conv=4, mamba_expand=2, chunk_size=256, num_mem_blocks=2,
            use_shared_attention_adapter=True, adapter_rank=128, use_mem_rope=True, max_position_embeddings=8192,
            **_COMMON)
    if family == "granitemoehybrid":
        return tf.GraniteMoeHybridConfig(
            vocab_size=100352, hidden_size=1536, intermediate_size=512, shared_intermediate_size=1024,
            num_hidden_layers=40, layer_types=["attention" if i in (5, 15, 25, 35) else "mamba" for i in range(40)],
            num_attention_heads=12, num_key_value_heads=4, num_local_experts=64, num_experts_per_tok=6,
            mamba_n_heads=48, mamba_d_head=64, mamba_n_groups=1, mamba_d_state=128, max_position_embeddings=8192,
            **_MAMBA, **_COMMON)
    if family == "mamba2":
        return tf.Mamba2Config(
            vocab_size=256000, hidden_size=4096, num_hidden_layers=56, num_heads=128, head_dim=64, expand=2,
            n_groups=8, state_size=128, conv_kernel=4, chunk_size=256, **_COMMON)
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


# Where each family's config keeps its Mamba2 mixer's sizes: heads, head_dim, groups, state size, chunk size.
_MAMBA2_FIELDS = {
    "nemotron_h": ("mamba_num_heads", "mamba_head_dim", "n_groups", "ssm_state_size", "chunk_size"),
    "bamba": ("mamba_n_heads", "mamba_d_head", "mamba_n_groups", "mamba_d_state", "mamba_chunk_size"),
    "falcon_h1": ("mamba_n_heads", "mamba_d_head", "mamba_n_groups", "mamba_d_state", "mamba_chunk_size"),
    "zamba2": ("n_mamba_heads", "mamba_headdim", "mamba_ngroups", "mamba_d_state", "chunk_size"),
    "granitemoehybrid": ("mamba_n_heads", "mamba_d_head", "mamba_n_groups", "mamba_d_state", "mamba_chunk_size"),
    "mamba2": ("num_heads", "head_dim", "n_groups", "state_size", "chunk_size"),
}


def mamba2_shape(family: str) -> tuple[int, int, int, int, int]:
    """(heads, head_dim, groups, state size, chunk size) of the benchmark shape's Mamba2 mixers."""
    cfg = config(family)
    return tuple(int(getattr(cfg, field)) for field in _MAMBA2_FIELDS[family])
