"""Backend options: parsing and validation of the `options=` dict.

Every bad key or value raises `PcgOptionError`, a `ValueError` whose message
names the valid choices, so that a typo never silently turns into a default:

* `pcg_backend.compile(model, **options)` calls `parse_options` before it
  calls `torch.compile`, so the error comes from that line.
* `torch.compile(model, backend="pcg", options=...)` cannot check anything
  until Dynamo calls the backend, at the first call of the compiled model.
  There the backend raises `BackendOptionError`, which is a `PcgOptionError`
  (so `except ValueError` catches it) and also Dynamo's `BackendCompilerFailed`:
  Dynamo re-raises that class as it is (torch 2.11-2.13), where it would wrap
  any other exception, a `ValueError` included, in `BackendCompilerFailed`.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from torch._dynamo.exc import BackendCompilerFailed

from .buckets import default_ladder, overflow_ladder
from .gemm_library import LIBRARIES


class PcgOptionError(ValueError):
    """A bad pcg option, option value or `mode=`; the message names the valid choices."""


class BackendOptionError(PcgOptionError, BackendCompilerFailed):
    """A `PcgOptionError` raised inside the backend, in the one form Dynamo lets reach the caller.

    `inner_exception` is the `PcgOptionError` that `parse_options` raised.
    """

    def __init__(self, error: PcgOptionError, backend_fn, frame) -> None:
        BackendCompilerFailed.__init__(self, backend_fn, error, frame)


COMPILERS = ("eager", "inductor")
CAPTURE_POLICIES = ("upfront", "lazy")
SKINNY_GEMMS = ("static", "all", "off")
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclasses.dataclass(frozen=True)
class PcgOptions:
    """The resolved options for one compiled graph (see the README's table)."""

    capture_sizes: tuple[int, ...]
    max_capture_size: int
    overflow_sizes: tuple[int, ...] = ()
    compiler: str = "eager"
    cuda_graphs: bool = True
    capture: str = "upfront"
    progress: bool = True
    capture_split_ops: bool = True
    gemm_library: str = "cublaslt"
    skinny_gemm: str = "all"

    @property
    def largest(self) -> int:
        return self.capture_sizes[-1]


_DEFAULTS: dict[str, Any] = {
    "capture_sizes": "auto",
    "max_capture_size": 512,
    "max_overflow_size": 2048,
    "compiler": "eager",
    "cuda_graphs": True,
    "capture": "upfront",
    "progress": True,
    "capture_split_ops": True,
    "gemm_library": "cublaslt",
    "skinny_gemm": "all",
}


def _check_sizes(sizes: Any) -> tuple[int, ...]:
    if not isinstance(sizes, (list, tuple)) or not sizes:
        raise PcgOptionError(
            f"pcg option capture_sizes must be 'auto' or a non-empty sorted list of positive ints, got {sizes!r}"
        )
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, int) or s <= 0:
            raise PcgOptionError(f"pcg option capture_sizes must hold positive ints only, got {s!r} in {list(sizes)}")
    if list(sizes) != sorted(set(sizes)):
        raise PcgOptionError(
            f"pcg option capture_sizes must be sorted ascending without repeats, got {list(sizes)}; "
            f"pass {sorted(set(sizes))}"
        )
    return tuple(sizes)


def parse_options(options: dict | None, mode: str | None = None) -> PcgOptions:
    """Validate `options` (and the `mode=` that torch.compile or HF may pass) into `PcgOptions`.

    Raises `PcgOptionError` (a `ValueError`) naming the valid choices.
    """
    if mode not in MODES:
        raise PcgOptionError(f"pcg got mode={mode!r}; valid modes are {MODES} (all behave the same under pcg)")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise PcgOptionError(f"pcg options must be a dict, got {type(options).__name__}")
    unknown = sorted(set(options) - set(_DEFAULTS))
    if unknown:
        raise PcgOptionError(f"unknown pcg option(s) {unknown}; valid options are {sorted(_DEFAULTS)}")
    merged = {**_DEFAULTS, **options}

    max_size = merged["max_capture_size"]
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size <= 0:
        raise PcgOptionError(f"pcg option max_capture_size must be a positive int, got {max_size!r}")

    sizes = merged["capture_sizes"]
    if sizes == "auto":
        sizes = default_ladder(max_size)
    elif isinstance(sizes, str):
        raise PcgOptionError(f"pcg option capture_sizes must be 'auto' or a list of ints, got {sizes!r}")
    else:
        sizes = _check_sizes(sizes)
        if "max_capture_size" not in options:
            max_size = sizes[-1]  # an explicit ladder sets its own largest bucket
        elif sizes[-1] > max_size:
            raise PcgOptionError(
                f"pcg option capture_sizes has sizes above max_capture_size={max_size}: "
                f"{[s for s in sizes if s > max_size]}; drop them or raise max_capture_size"
            )

    overflow = merged["max_overflow_size"]
    if isinstance(overflow, bool) or not isinstance(overflow, int) or overflow < 0:
        raise PcgOptionError(f"pcg option max_overflow_size must be an int >= 0 (0: no overflow buckets), "
                             f"got {overflow!r}")

    compiler = merged["compiler"]
    if compiler not in COMPILERS:
        raise PcgOptionError(f"pcg option compiler must be one of {COMPILERS}, got {compiler!r}")
    for flag in ("cuda_graphs", "progress", "capture_split_ops"):
        if not isinstance(merged[flag], bool):
            raise PcgOptionError(f"pcg option {flag} must be True or False, got {merged[flag]!r}")
    if merged["capture"] not in CAPTURE_POLICIES:
        raise PcgOptionError(f"pcg option capture must be one of {CAPTURE_POLICIES}, got {merged['capture']!r}")
    if merged["gemm_library"] not in LIBRARIES:
        raise PcgOptionError(f"pcg option gemm_library must be one of {LIBRARIES}, got {merged['gemm_library']!r}")
    if merged["skinny_gemm"] not in SKINNY_GEMMS:
        raise PcgOptionError(f"pcg option skinny_gemm must be one of {SKINNY_GEMMS}, got {merged['skinny_gemm']!r}")

    return PcgOptions(
        capture_sizes=tuple(sizes),
        max_capture_size=max_size,
        overflow_sizes=overflow_ladder(sizes[-1], overflow),
        compiler=compiler,
        cuda_graphs=merged["cuda_graphs"],
        capture=merged["capture"],
        progress=merged["progress"],
        capture_split_ops=merged["capture_split_ops"],
        gemm_library=merged["gemm_library"],
        skinny_gemm=merged["skinny_gemm"],
    )


def parse_backend_options(options: dict | None, mode: str | None, backend_fn, unexpected=()) -> PcgOptions:
    """`parse_options` for the backend: a bad option raises `BackendOptionError`, which Dynamo passes on.

    `unexpected` are keywords the backend got besides `options` and `mode`.
    """
    try:
        if unexpected:
            raise PcgOptionError(f"pcg backend got unexpected keyword(s) {sorted(unexpected)}; "
                                 f"pass settings in options={{...}}; valid options are {sorted(_DEFAULTS)}")
        return parse_options(options, mode)
    except PcgOptionError as error:
        # This frame is where the caller's traceback starts: Dynamo strips the frames above it.
        raise BackendOptionError(error, backend_fn, inspect.currentframe()) from None
