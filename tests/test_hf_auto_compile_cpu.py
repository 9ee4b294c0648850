"""generate() must not compile a pcg-compiled forward a second time (HF's auto-compile for static caches).

HF decides per call with `_valid_auto_compile_criteria`; on CPU it says no
unless a compile config asks for every device, which these tests do, so
that HF's own answer is yes and pcg's override is what is tested.
"""

from __future__ import annotations

import logging
import types

import pytest
import torch

import pcg_backend
from pcg_backend.hf.auto_compile import compiled_backend_name
from hf_models import tiny_model


def _plus_one(x):
    return x + 1


@pytest.mark.parametrize("backend", ["pcg", "eager", "inductor"])
def test_the_backend_of_a_compiled_function_is_read_from_its_wrapper(backend):
    assert compiled_backend_name(torch.compile(_plus_one, backend=backend)) == backend


def test_a_plain_function_has_no_backend():
    assert compiled_backend_name(_plus_one) is None
    assert compiled_backend_name(torch.nn.Linear(2, 2).forward) is None


def _hf_would_compile(model) -> bool:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import CompileConfig

    config = GenerationConfig()
    config.compile_config = CompileConfig()
    config.compile_config._compile_all_devices = True       # HF's answer on CPU becomes yes
    cache = types.SimpleNamespace(is_compileable=True)       # a compileable cache that is not a DynamicCache
    return model._valid_auto_compile_criteria({"past_key_values": cache, "cache": cache}, config)


def test_generate_skips_its_auto_compile_only_for_a_pcg_forward(caplog, monkeypatch):
    from pcg_backend.hf import auto_compile

    pcg_backend.hf.enable()
    monkeypatch.setattr(auto_compile, "_TOLD", set())
    eager, other, ours = (tiny_model("nemotron_h") for _ in range(3))
    other.forward = torch.compile(other.forward, backend="eager")
    ours.forward = torch.compile(ours.forward, backend="pcg")
    assert _hf_would_compile(eager)                          # HF's decision stands
    assert _hf_would_compile(other)                          # another backend: HF's decision stands
    with caplog.at_level(logging.INFO, logger="pcg_backend"):
        assert not _hf_would_compile(ours)
        assert not _hf_would_compile(ours)
    told = [r.getMessage() for r in caplog.records if "auto-compile" in r.getMessage()]
    assert told == ["pcg: generate() keeps NemotronHForCausalLM.forward compiled with pcg; HF's auto-compile "
                    "for static caches is skipped"]          # once per model class, not per call
