"""generate() on a pcg-compiled model defers its stop check on CUDA (HF's DeferredStopCheck, one step late).

HF asks `DeferredStopCheck.is_supported(device, ...)` once per decoding loop,
after the prefill. These tests ask it from inside a real `generate()` (a
logits processor runs in the loop), for a CUDA device, so that pcg's
decision is tested on CPU: HF's own answer for CUDA is no, pcg's is yes for a
pcg-compiled forward under HF's other conditions.
"""

from __future__ import annotations

import types

import pytest
import torch

import pcg_backend
from hf_models import tiny_model

transformers_generation = pytest.importorskip("transformers.generation.utils")
if not hasattr(transformers_generation, "DeferredStopCheck"):
    pytest.skip("this transformers has no DeferredStopCheck", allow_module_level=True)
DeferredStopCheck = transformers_generation.DeferredStopCheck
CUDA = torch.device("cuda")


class _AskInLoop:
    """A logits processor that asks HF, from inside the decoding loop, whether a CUDA loop may defer,
    with a given cache (None: no cache) that is or is not returned to the caller."""

    def __init__(self, is_assistant: bool = False, cache=None, cache_is_returned: bool = False):
        self.answers: list[bool] = []
        self.is_assistant = is_assistant
        self.cache, self.cache_is_returned = cache, cache_is_returned

    def __call__(self, input_ids, scores):
        self.answers.append(DeferredStopCheck.is_supported(CUDA, self.cache, self.cache_is_returned,
                                                           self.is_assistant))
        return scores


def _generate_asking(model, is_assistant: bool = False, cache=None,
                     cache_is_returned: bool = False) -> tuple[list[bool], torch.Tensor]:
    ask = _AskInLoop(is_assistant, cache, cache_is_returned)
    ids = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0,
                             logits_processor=[ask])
    return ask.answers, out


def test_only_a_pcg_compiled_generate_defers_on_cuda():
    pcg_backend.hf.enable()
    pcg_backend.reset_stats()
    eager, other, ours = (tiny_model("nemotron_h") for _ in range(3))
    other.forward = torch.compile(other.forward, backend="eager")
    ours.forward = torch.compile(ours.forward, backend="pcg")
    assert _generate_asking(eager)[0] == [False] * 3              # HF's answer for CUDA stands
    assert _generate_asking(other)[0] == [False] * 3              # another backend: HF's answer stands
    answers, tokens = _generate_asking(ours)
    assert answers == [True] * 3
    # The wrappers change nothing a CPU loop decodes (on CPU HF itself never defers).
    assert torch.equal(tokens, _generate_asking(eager)[1])
    assert pcg_backend.stats()["deferred_stop_checks"] == 3        # one per positive answer (here: per ask)
    assert "read their stop flag one step late" in pcg_backend.report()
    # Outside any decoding loop the answer is HF's again, and a CPU loop never defers.
    assert not DeferredStopCheck.is_supported(CUDA, None, False, False)
    assert not DeferredStopCheck.is_supported(torch.device("cpu"), None, False, False)


def test_hf_conditions_still_hold_for_a_pcg_loop():
    pcg_backend.hf.enable()
    pcg_backend.reset_stats()
    model = tiny_model("nemotron_h")
    model.forward = torch.compile(model.forward, backend="pcg")
    assert _generate_asking(model, is_assistant=True)[0] == [False] * 3   # an assistant model never defers
    # A cache handed back to the caller must undo the extra step; a hybrid cache holding Mamba
    # state cannot (HF's `is_croppable`), so that loop checks every step.
    hybrid = types.SimpleNamespace(is_croppable=False)
    assert _generate_asking(model, cache=hybrid, cache_is_returned=True)[0] == [False] * 3
    assert _generate_asking(model, cache=hybrid, cache_is_returned=False)[0] == [True] * 3   # dropped after
    croppable = types.SimpleNamespace(is_croppable=True)
    assert _generate_asking(model, cache=croppable, cache_is_returned=True)[0] == [True] * 3
    assert pcg_backend.stats()["deferred_stop_checks"] == 6


def test_disable_restores_hf_decision():
    from pcg_backend.hf import stop_check  # noqa: F401  (the wrappers live there)

    pcg_backend.hf.enable()
    assert hasattr(vars(DeferredStopCheck)["is_supported"], "_pcg_original")
    pcg_backend.hf.disable()
    try:
        assert not hasattr(vars(DeferredStopCheck)["is_supported"], "_pcg_original")
        assert isinstance(vars(DeferredStopCheck)["is_supported"], staticmethod)
    finally:
        pcg_backend.hf.enable()
