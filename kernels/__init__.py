"""Triton kernels of hypertriton, importable only as ``hypertriton.kernels``.

Each module holds ``@triton.jit`` kernels and a launcher that takes and returns plain tensors (no
autograd). Set ``TRITON_INTERPRET=1`` before the first import to run them on CPU tensors.
"""

import os

# Triton decides at decoration time whether a kernel is interpreted; remember what it saw.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
