"""The encoder's attention mask: patches see patches; registers see all patches and earlier registers."""

from __future__ import annotations

import torch
from torch import Tensor


def register_attention_mask(n_patches: int, n_registers: int, device: torch.device | str | None = None) -> Tensor:
    """Bool ``[N+K, N+K]``; entry ``[q, k]`` is True where query ``q`` may attend key ``k``.

    Sequence order is ``[patch_0 … patch_{N-1}, reg_0 … reg_{K-1}]``. Patches never see registers, so the
    patch features do not depend on how many registers are appended; register ``i`` sees every patch and
    registers ``0..i`` only, so the first ``k`` tokens do not depend on later ones.
    """
    if n_patches < 1 or n_registers < 0:
        raise ValueError(f"need n_patches >= 1 and n_registers >= 0, got {n_patches}, {n_registers}")
    n = n_patches + n_registers
    mask = torch.zeros(n, n, dtype=torch.bool, device=device)
    mask[:, :n_patches] = True
    mask[n_patches:, n_patches:] = torch.ones(n_registers, n_registers, dtype=torch.bool, device=device).tril()
    return mask
