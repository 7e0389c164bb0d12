"""Binary latents (Instella-T2I): each token is a vector of bits; the decoder embeds it as ``b @ E``."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BinaryQuantizer(nn.Module):
    """Logits ``z [..., bits]`` → ``(b [..., bits] in {0, 1}, p [..., bits])``.

    Training: ``b ~ Bernoulli(p)``, ``p = sigmoid(z / tau)``, straight-through with the sigmoid as surrogate
    (``b.detach() + p − p.detach()``). Evaluation (``self.training`` False): ``b = sigmoid(z) > 0.5``.
    """

    def __init__(self, bits: int = 16, tau: float = 1.0) -> None:
        super().__init__()
        if not isinstance(bits, int) or bits < 1:
            raise ValueError(f"bits must be a positive int, got {bits!r}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.bits, self.tau = bits, tau

    def forward(self, z: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        if z.shape[-1] != self.bits:
            raise ValueError(f"z must have last dim bits={self.bits}, got shape {list(z.shape)}")
        p = torch.sigmoid(z / self.tau)
        if not self.training:
            return (z > 0).to(z.dtype), p
        b = torch.bernoulli(p.detach(), generator=generator)
        return b + p - p.detach(), p

    @staticmethod
    def confidence_penalty(p: Tensor) -> Tensor:
        """``mean(p (1 − p))``: zero when every bit is certain, 0.25 when every bit is a coin flip."""
        return (p * (1.0 - p)).mean()


class BitEmbedding(nn.Module):
    """Bit vectors ``b [..., bits]`` → ``b @ E + bias`` ``[..., width]`` (sum of per-bit embeddings)."""

    def __init__(self, bits: int, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(bits, width) / bits**0.5)
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, b: Tensor) -> Tensor:
        return b @ self.weight + self.bias
