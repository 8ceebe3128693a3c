"""Triton kernels of hypertriton, importable only as ``hypertriton.kernels``.

Each module holds ``@triton.jit`` kernels and a launcher that takes and returns plain tensors (no
autograd). Set ``TRITON_INTERPRET=1`` before the first import to run them on CPU tensors.
"""

import os

# Triton decides at decoration time whether a kernel is interpreted; remember what it saw.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def autotuned_kernels() -> dict:
    """Every autotuned Triton kernel of the package, by name (imports the kernel modules)."""
    from . import center_pivot_conv4d, fused_first_layer, hypercorrelation

    return {
        "correlation": hypercorrelation._correlation_kernel,
        "correlation_grad": hypercorrelation._correlation_grad_kernel,
        "center_pivot_conv4d": center_pivot_conv4d._center_pivot_conv4d_kernel,
        "center_pivot_conv4d_grad_input": center_pivot_conv4d._center_pivot_conv4d_grad_input_kernel,
        "center_pivot_conv4d_grad_weight": center_pivot_conv4d._center_pivot_conv4d_grad_weight_kernel,
        "fused_support_branch": fused_first_layer._support_branch_kernel,
    }


def _index_scalars_under_old_interpreters() -> None:
    """Triton < 3.7's interpreter turns a scalar argument used as an index (``range(0, C, BLOCK)``) into an
    int with ``int(array)`` on a one-element array, which NumPy >= 2.4 refuses; Triton 3.7 squeezes the
    array first. Do the same for older versions (the patch lives only while a kernel runs, as theirs)."""
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "squeezes_index", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor.squeezes_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if INTERPRETED:
    import numpy

    try:
        import triton
    except ImportError as error:
        raise ImportError("TRITON_INTERPRET=1 is set but the triton package is not installed (torch's macOS and "
                          "Windows wheels do not bring it): pip install triton, or unset TRITON_INTERPRET and use "
                          "the torch backend") from error

    if (tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 7)
            and tuple(int(part) for part in numpy.__version__.split(".")[:2]) >= (2, 4)):
        _index_scalars_under_old_interpreters()
