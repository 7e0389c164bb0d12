"""Length training: how many leading tokens each training sample keeps.

``nested`` (FlexTok nested dropout): one ``k`` per sample, from ``{1, 2, 4, …, K}`` (``pow2``) or uniform in
``1..K``. ``tail`` (One-D-Piece tail-token drop): one ``k`` uniform in ``1..K`` shared by the whole batch.
``none``: always ``K`` (the control).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vtok.tokenizers_img.config import LENGTH_MODES, NESTED_DISTS


def pow2_lengths(num_tokens: int) -> list[int]:
    """``[1, 2, 4, …]`` up to ``num_tokens``, with ``num_tokens`` itself appended if it is not a power of two."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    out, k = [], 1
    while k < num_tokens:
        out.append(k)
        k *= 2
    return [*out, num_tokens]


def sample_lengths(mode: str, batch: int, num_tokens: int, generator: torch.Generator | None = None,
                   dist: str = "pow2") -> Tensor:
    """Kept lengths ``[batch]`` int64 in ``1..num_tokens`` for one training batch."""
    if mode not in LENGTH_MODES:
        raise ValueError(f"mode must be one of {LENGTH_MODES}, got {mode!r}")
    if dist not in NESTED_DISTS:
        raise ValueError(f"dist must be one of {NESTED_DISTS}, got {dist!r}")
    if mode == "none":
        return torch.full((batch,), num_tokens, dtype=torch.long)
    if mode == "tail":
        k = torch.randint(1, num_tokens + 1, (1,), generator=generator)
        return k.expand(batch).clone()
    if dist == "uniform":
        return torch.randint(1, num_tokens + 1, (batch,), generator=generator)
    choices = torch.tensor(pow2_lengths(num_tokens))
    return choices[torch.randint(len(choices), (batch,), generator=generator)]


def prefix_mask(lengths: Tensor, num_tokens: int) -> Tensor:
    """``lengths [B]`` → bool ``[B, num_tokens]``, True for the first ``lengths[b]`` tokens."""
    return torch.arange(num_tokens, device=lengths.device)[None, :] < lengths[:, None]
