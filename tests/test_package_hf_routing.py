"""HF routing's lifecycle: nothing at import, `enable()`, `disable()` restoring every original, and the default path.

`import pcg_backend` must import no transformers and patch nothing; routing is
installed by `pcg_backend.hf.enable()`, by `pcg_backend.compile`, or by the
backend's first call on an HF graph (which makes Dynamo trace once more);
`disable()` puts back the very objects that were there before.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import pcg_backend
from conftest import requires_reference_kernels
from hf_models import tiny_model
from pcg_backend import hf
from pcg_backend.hf import lifecycle
from pcg_backend.hf.patches import Patches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEMOTRON_H_ROUTING = [   # layers "M * M -": two Mamba2 mixers and one attention layer, each once
    "model.layers.0.mixer (NemotronHMamba2Mixer): Mamba2 core via pcg::mamba2_core",
    "model.layers.1.mixer (NemotronHAttention): attention via pcg::attention (sdpa)",
    "model.layers.2.mixer (NemotronHMamba2Mixer): Mamba2 core via pcg::mamba2_core",
]


def _python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests"),
                                                         os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_import_imports_no_transformers_and_installs_nothing():
    out = _python("""
        import sys
        import pcg_backend
        print(sorted(m for m in sys.modules if m.split(".")[0] == "transformers"))
        print(pcg_backend.hf.is_enabled(), len(pcg_backend.hf.patches.PATCHES))
    """)
    assert out.splitlines() == ["[]", "False 0"]


@requires_reference_kernels
def test_enable_then_disable_restores_every_attribute_and_eager_outputs():
    # A fresh process, so that "before" really is before pcg touched anything.
    out = _python("""
        import sys
        import torch
        import transformers
        from transformers import cache_utils, modeling_utils
        from transformers.generation import utils as generation_utils
        from transformers.generation.utils import GenerationMixin
        from transformers.integrations import moe
        from hf_models import FAMILIES, tiny_model

        MARK = "_pcg_computes_reference_norm"   # hf/adapters/mamba2.py's REFERENCE_NORM
        models = {f: tiny_model(f) for f in FAMILIES}
        ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))

        def outputs():
            with torch.no_grad():
                return {f: m(ids).logits for f, m in models.items()}

        def attributes():
            # every attribute pcg may patch: each class's own forward and each module's
            # eager_attention_forward in every loaded modeling module, the cache layers'
            # update, HF's attention registry, PreTrainedModel.post_init, generate()'s
            # auto-compile decision, its decoding loop and its deferred stop check, and the
            # experts registry's grouped_mm and batched_mm entries
            seen = {
                "_valid_auto_compile_criteria": vars(GenerationMixin)["_valid_auto_compile_criteria"],
                "_sample": vars(GenerationMixin)["_sample"],
                "DeferredStopCheck.is_supported": vars(generation_utils.DeferredStopCheck)["is_supported"],
                "DynamicLayer.update": vars(cache_utils.DynamicLayer)["update"],
                "StaticLayer.update": vars(cache_utils.StaticLayer)["update"],
                "sdpa": modeling_utils.ALL_ATTENTION_FUNCTIONS._global_mapping["sdpa"],
                "post_init": vars(modeling_utils.PreTrainedModel)["post_init"],
                "experts.grouped_mm": moe.ALL_EXPERTS_FUNCTIONS._global_mapping["grouped_mm"],
                "experts.batched_mm": moe.ALL_EXPERTS_FUNCTIONS._global_mapping["batched_mm"],
            }
            for name, module in list(sys.modules.items()):
                if name.startswith("transformers.models.") and ".modeling_" in name and module:
                    for key, value in list(vars(module).items()):
                        if key == "eager_attention_forward":
                            seen[f"{name}.{key}"] = value
                        elif isinstance(value, type) and value.__module__ == name and "forward" in vars(value):
                            seen[f"{name}.{key}.forward"] = vars(value)["forward"]
                        if isinstance(value, type) and value.__module__ == name and key.endswith("RMSNormGated"):
                            seen[f"{name}.{key}.{MARK}"] = vars(value).get(MARK)   # pcg's mark (None: absent)
            return seen

        def differing(a, b):
            return sorted(k for k in a if a[k] is not b.get(k))

        before, reference = attributes(), outputs()
        import pcg_backend
        assert differing(before, attributes()) == [], "import pcg_backend patched something"

        wrapped = pcg_backend.hf.enable()
        during = attributes()
        changed = differing(before, during)
        assert pcg_backend.hf.enable() == 0                      # idempotent
        while_enabled = outputs()                                # eager: the wrappers run the originals
        compiled = pcg_backend.compile(models["nemotron_h"], max_capture_size=16)
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids).logits, reference["nemotron_h"], atol=1e-4, rtol=0)
        routed = len(pcg_backend.stats()["routing"])

        restored = pcg_backend.hf.disable()
        after = attributes()
        assert pcg_backend.hf.disable() == 0
        print(wrapped, restored, routed, len(before), len(after))
        print(differing(before, after))
        print(all(torch.equal(reference[f], while_enabled[f]) for f in FAMILIES))
        print(all(torch.equal(reference[f], o) for f, o in outputs().items()))
        print("\\n".join(changed))
        # The gated norms pcg may mark: every family's own, FalconH1's excepted (another arithmetic).
        print(" ".join(k for k in before if k.endswith(MARK) and "falcon_h1" not in k))
    """)
    counts, unrestored, same_while_enabled, same_after, *changed, marks = out.splitlines()
    assert len(marks.split()) >= 4   # Bamba's, GraniteMoeHybrid's, Zamba2's, Mamba2's (and NemotronH's own, after 5.17)
    wrapped, restored, routed, n_before, n_after = map(int, counts.split())
    assert unrestored == "[]" and n_before == n_after
    assert same_while_enabled == "True" and same_after == "True"
    assert wrapped == restored == len(changed) and routed == 3
    modeling = "transformers.models.{0}.modeling_{0}.{1}"
    assert changed == sorted(
        ["DeferredStopCheck.is_supported", "DynamicLayer.update", "StaticLayer.update", "_sample",
         "_valid_auto_compile_criteria", "experts.batched_mm", "experts.grouped_mm", "post_init", "sdpa"]
        + [modeling.format(f, cls + ".forward") for f, cls in [
            ("bamba", "BambaMixer"), ("falcon_h1", "FalconH1Mixer"), ("granitemoehybrid", "GraniteMoeHybridMambaLayer"),
            ("granitemoehybrid", "GraniteMoeHybridTopKRouter"),   # the MoE router, found by its source
            ("mamba2", "Mamba2Mixer"), ("nemotron_h", "NemotronHMamba2Mixer"), ("zamba2", "Zamba2MambaMixer")]]
        + marks.split()
        + [modeling.format(f, "eager_attention_forward")      # every family with attention
           for f in ["bamba", "falcon_h1", "granitemoehybrid", "nemotron_h", "zamba2"]])


@requires_reference_kernels
def test_plain_torch_compile_enables_routing_and_traces_once_more(monkeypatch):
    hf.disable()
    restarts = []
    real = lifecycle._trace_again
    monkeypatch.setattr(lifecycle, "_trace_again", lambda: restarts.append(1) or real())
    model = tiny_model("nemotron_h")
    compiled = torch.compile(model, backend="pcg", options={"max_capture_size": 64})
    ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(compiled(ids[:, :3]).logits, model(ids[:, :3]).logits, atol=1e-4, rtol=0)
    assert hf.is_enabled() and restarts == [1]        # once, at the first graph; the second graph is routed at once
    s = pcg_backend.stats()
    # 2 Mamba cores and attention each (a new DynamicCache's first KV write is no split op)
    assert s["graphs_compiled"] == 2 and s["split_op_nodes"] == 2 * 3
    assert s["routing"] == NEMOTRON_H_ROUTING          # once per layer, not once per graph


@requires_reference_kernels
def test_compile_enables_routing_before_dynamo_traces(monkeypatch):
    hf.disable()
    restarts = []
    monkeypatch.setattr(lifecycle, "_trace_again", lambda: restarts.append(1))
    model = tiny_model("nemotron_h")
    compiled = pcg_backend.compile(model, max_capture_size=64)
    assert hf.is_enabled()
    ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, atol=1e-4, rtol=0)
    assert restarts == [] and pcg_backend.stats()["routing"] == NEMOTRON_H_ROUTING


def test_a_model_without_transformers_layers_never_enables_routing():
    from toy_models import ToyModel

    import transformers  # noqa: F401  (imported, but this model has no HF layer)

    hf.disable()
    model = ToyModel(1)
    x = torch.randn(3, 16)
    torch.testing.assert_close(pcg_backend.compile(model)(x), model(x), atol=1e-5, rtol=0)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(model, backend="pcg")(x), model(x), atol=1e-5, rtol=0)
    assert not hf.is_enabled() and pcg_backend.stats()["routing"] == []
    assert pcg_backend.stats()["graphs_compiled"] == 2


@requires_reference_kernels
def test_zamba2_shared_attention_is_listed_by_its_module_path():
    model = tiny_model("zamba2")
    compiled = pcg_backend.compile(model, max_capture_size=64)
    ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, atol=1e-4, rtol=0)
    assert pcg_backend.stats()["routing"] == [
        "model.layers.0.mamba (Zamba2MambaMixer): Mamba2 core via pcg::mamba2_core",
        "model.layers.1.shared_transformer.self_attn (Zamba2Attention): attention via pcg::attention (sdpa)",
        "model.layers.1.mamba_decoder.mamba (Zamba2MambaMixer): Mamba2 core via pcg::mamba2_core",
        "model.layers.2.mamba (Zamba2MambaMixer): Mamba2 core via pcg::mamba2_core",
        "model.layers.3.mamba (Zamba2MambaMixer): Mamba2 core via pcg::mamba2_core",
    ]


def test_one_adapter_per_layer_kind():
    assert sorted(a.kind for a in hf.adapters()) == ["Mamba2 mixer", "MoE router", "attention", "experts"]
    with pytest.raises(ValueError, match="an HF adapter for 'attention' is already registered"):
        hf.register_adapter(hf.Adapter("attention", lambda module, patches: None))
    assert hf.register_adapter(hf.adapters()[0]) is hf.adapters()[0]   # the same adapter again: a no-op


def test_patches_restore_the_original_objects_and_respect_later_changes():
    class Owner:
        def f(self):
            return "f"

    class Child(Owner):
        pass

    original = vars(Owner)["f"]
    table = {"g": len}
    patches = Patches()
    assert patches.wrap(Child, "f", lambda f: lambda self: "child " + f(self))   # inherited: set on Child
    assert patches.wrap(Owner, "f", lambda f: lambda self: "wrapped " + f(self))
    assert not patches.wrap(Owner, "f", lambda f: None)          # already wrapped: untouched
    assert patches.wrap_item(table, "g", lambda g: lambda x: -g(x))
    assert not patches.wrap_item(table, "missing", lambda g: g)   # nothing to wrap
    assert (Owner().f(), Child().f(), table["g"]("abc")) == ("wrapped f", "child f", -3) and len(patches) == 3
    assert patches.restore_all() == 3
    assert vars(Owner)["f"] is original and "f" not in vars(Child) and table == {"g": len}

    patches.wrap(Owner, "f", lambda f: lambda self: "wrapped")
    Owner.f = replacement = lambda self: "someone else's"   # replaced after pcg wrapped it
    patches.restore_all()
    assert vars(Owner)["f"] is replacement


def test_a_wrapper_imported_into_another_module_is_unbound_on_restore():
    # A modeling module that imports a function while routing is on holds pcg's wrapper.
    import types

    first, second = types.ModuleType("first"), types.ModuleType("second")
    first.fn = original = lambda: "original"
    patches = Patches()
    patches.wrap(first, "fn", lambda f: lambda: "wrapped")
    second.fn = first.fn
    assert not patches.wrap(second, "fn", lambda f: lambda: "twice")   # not wrapped a second time
    assert second.fn() == "wrapped"
    patches.restore_all()
    assert first.fn is original and second.fn is original
