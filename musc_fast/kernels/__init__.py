"""Triton kernels (GPU; CPU under TRITON_INTERPRET=1). Imported only through the gate in ``musc_fast.ops``."""
from __future__ import annotations


def available() -> tuple[bool, str]:
    """(can the Triton kernels run here, why not)."""
    return False, "this build has no Triton kernels yet"
