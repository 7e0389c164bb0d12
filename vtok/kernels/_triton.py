"""Shared Triton plumbing: availability, interpreter detection, launch helpers."""

from __future__ import annotations

import os

import torch

try:  # triton is optional at import time: the reference path never needs it
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    HAS_TRITON = False


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels then run on CPU tensors, bf16 dots must be upcast)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def dot_dtype_upcast(x: torch.Tensor) -> bool:
    """Whether kernels cast tiles to fp32 before ``tl.dot``: always in the interpreter (it computes bf16 dots
    wrongly), and for fp32 inputs; fp16 / bf16 dot natively on the GPU, accumulating in fp32."""
    return interpreting() or x.dtype == torch.float32
