"""Running the Triton kernels on the CPU through Triton's interpreter (TRITON_INTERPRET=1), for tests.

Triton 3.6's interpreter converts scalars with int(array) where the array has shape (1,), which
NumPy >= 2.3 refuses; this wraps its tensor patching to take the single element instead.
Call `patch_interpreter()` after setting TRITON_INTERPRET=1 and before launching a kernel.
"""

from __future__ import annotations


def patch_interpreter() -> None:
    import triton.runtime.interpreter as interp

    if getattr(interp, "_dejavu_patched", False):
        return
    original = interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched
    interp._dejavu_patched = True
