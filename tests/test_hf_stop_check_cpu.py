"""generate() on a pcg-compiled model defers its stop check on CUDA (HF's DeferredStopCheck, one step late).

HF asks `DeferredStopCheck.is_supported(device, ...)` once per decoding loop,
after the prefill. These tests ask it from inside a real `generate()` (a
logits processor runs in the loop), for a CUDA device, so that pcg's
decision is tested on CPU: HF's own answer for CUDA is no, pcg's is yes for a
pcg-compiled forward under HF's other conditions.
"""

from __future__ import annotations

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
    """A logits processor that asks HF, from inside the decoding loop, whether a CUDA loop may defer."""

    def __init__(self, is_assistant: bool = False):
        self.answers: list[bool] = []
        self.is_assistant = is_assistant

    def __call__(self, input_ids, scores):
        self.answers.append(DeferredStopCheck.is_supported(CUDA, None, False, self.is_assistant))
        return scores


def _generate_asking(model, is_assistant: bool = False) -> tuple[list[bool], torch.Tensor]:
    ask = _AskInLoop(is_assistant)
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
    assert torch.equal(tokens, _generate_asking(eager)[1])        # asking changes nothing it decodes
    assert pcg_backend.stats()["deferred_stop_checks"] == 3        # one per positive answer
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
    assert pcg_backend.stats()["deferred_stop_checks"] == 0


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
