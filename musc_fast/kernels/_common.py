"""Small helpers shared by the Triton kernel files: interpreter detection, device checks, launch sizes.

Imports triton; only the kernel modules (themselves imported lazily) import this file.
"""
from __future__ import annotations

import os

import torch

# Same truthy spellings as triton.knobs' env_bool.
_TRUE = ("1", "true", "on", "yes")


def interpreting() -> bool:
    """True when TRITON_INTERPRET asks for the CPU interpreter (read now, not at import)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def check_device(*tensors: torch.Tensor) -> None:
    """Compiled kernels need CUDA tensors; the interpreter takes CPU tensors."""
    if interpreting():
        return
    for t in tensors:
        if t.device.type != "cuda":
            raise ValueError(f"Triton kernels need CUDA tensors unless TRITON_INTERPRET=1; got {t.device}")


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def num_sms(device: torch.device) -> int:
    """Multiprocessors of the device: the persistent grids are sized from it (4 under the interpreter)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count
