"""Hugging Face hybrid models: finding Mamba2 mixers and attention, and routing them through split ops.

`install()` runs when pcg is imported and again whenever an HF model is
built. It wraps, at class level, the Mamba2 mixer `forward` of every loaded
transformers model family whose source looks like a Mamba2 mixer, and the KV
updates of `DynamicLayer`/`StaticLayer` and HF's attention functions. Each
wrapper takes pcg's path only while Dynamo traces for the pcg backend
(`gate.tracing_for_pcg`), so eager runs and other backends are untouched.
"""

from .install import install, routed_layers

__all__ = ["install", "routed_layers"]
