"""Finite scalar quantisation (FSQ): each dim is squashed into ``levels[i]`` evenly spaced values in [-1, 1].

The bound is the FSQ paper's (Mentzer et al. 2023, Sec. 3: ``f(z) = ⌊L/2⌋ tanh(z)``), written as digits
``(tanh(z) + 1)(L − 1) / 2 ∈ (0, L − 1)``: slope ``(L − 1) / 2`` at 0 (a plain sigmoid would halve it and make the
codes less sensitive to the encoder's output).

A code is a vector of digits ``d_i ∈ {0, …, L_i − 1}`` shown to the decoder as ``2 d_i / (L_i − 1) − 1``; its
index is the mixed-radix number ``Σ d_i · Π_{j<i} L_j`` in ``[0, Π L_i)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


class FSQ(nn.Module):
    """``z [..., dim]`` → ``(codes [..., dim] in [-1, 1] with straight-through rounding, indices [...] int64)``."""

    def __init__(self, levels: Sequence[int] = (8, 8, 8, 5, 5, 5)) -> None:
        super().__init__()
        levels = list(levels)
        if not levels or any(not isinstance(v, int) or v < 2 for v in levels):
            raise ValueError(f"levels must be a non-empty list of ints >= 2, got {levels}")
        self.levels = tuple(levels)
        basis = [math.prod(levels[:i]) for i in range(len(levels))]
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.long), persistent=False)
        self.register_buffer("_basis", torch.tensor(basis, dtype=torch.long), persistent=False)

    @property
    def dim(self) -> int:
        return len(self.levels)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    @property
    def bits(self) -> float:
        return math.log2(self.codebook_size)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        if z.shape[-1] != self.dim:
            raise ValueError(f"z must have last dim {self.dim} (len(levels)), got shape {list(z.shape)}")
        span = (self._levels - 1).to(z.dtype)
        scaled = (torch.tanh(z) + 1.0) * span / 2.0  # in (0, L - 1)
        digits = scaled + (scaled.round() - scaled).detach()  # straight-through rounding
        return 2.0 * digits / span - 1.0, self.digits_to_indices(digits.detach().round().long())

    def digits_to_indices(self, digits: Tensor) -> Tensor:
        """``[..., dim]`` int digits → ``[...]`` int64 indices."""
        return (digits.long() * self._basis).sum(-1)

    def indices_to_digits(self, indices: Tensor) -> Tensor:
        """``[...]`` int indices → ``[..., dim]`` int64 digits."""
        return (indices.long()[..., None] // self._basis) % self._levels

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """``[...]`` indices in ``[0, codebook_size)`` → codes ``[..., dim]`` float in [-1, 1]."""
        span = (self._levels - 1).float()
        return 2.0 * self.indices_to_digits(indices).float() / span - 1.0

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """Codes ``[..., dim]`` (values on the level grid) → indices ``[...]`` int64."""
        span = (self._levels - 1).to(codes.dtype)
        digits = ((codes + 1.0) * span / 2.0).round().long()
        return self.digits_to_indices(torch.minimum(digits.clamp(min=0), self._levels - 1))
