"""The former home of the Mamba2 mixer routing, now `pcg_backend.hf.adapters.mamba2`.

This name is the same module object, not a copy, so that code which sets
`pcg_backend.hf.mixer.REQUIRED` (the CPU tests do) changes what the adapter
reads.
"""

import sys

from .adapters import mamba2

sys.modules[__name__] = mamba2
