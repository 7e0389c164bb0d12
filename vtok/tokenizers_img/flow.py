"""Optional rectified-flow decoder head: sample patch pixels given the decoder's per-patch features.

FlexTok (Bachmann et al. 2025, §3) decodes its register tokens with a rectified-flow model, so a short prefix
yields a plausible sharp image instead of the blurry mean an MSE decoder predicts. vtok keeps its deterministic
decoder (the MSE path, always trained) and adds, behind ``ModelConfig.flow_head``, a small per-patch velocity MLP
conditioned on that decoder's final patch features — the per-token denoising MLP of MAR (Li et al. 2024, §3.3),
trained with the rectified-flow objective (Liu et al. 2022, Eq. 1):

    x_t = t·x_1 + (1 − t)·x_0,   x_0 ~ N(0, I),   t ~ U(0, 1),   loss = ‖v_θ(x_t, t, h) − (x_1 − x_0)‖²

where ``x_1`` are the target patch pixels centred to [-1, 1] and ``h`` the decoder's feature for that patch.
Sampling integrates ``dx/dt = v_θ`` from noise at t = 0 to t = 1 with Euler steps.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def time_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of times ``t [...]`` in [0, 1] → ``[..., dim]`` (``dim`` even)."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    ang = (t.float()[..., None] * 1000.0) * freqs
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


class FlowHead(nn.Module):
    """Velocity ``v [B, N, P]`` from noisy patches ``x_t [B, N, P]``, times ``t [B]`` and features ``h [B, N, W]``."""

    def __init__(self, patch_dim: int, width: int, hidden: int | None = None, depth: int = 3,
                 time_dim: int = 64) -> None:
        super().__init__()
        hidden = hidden or 2 * width
        self.time_dim = time_dim
        layers: list[nn.Module] = [nn.Linear(patch_dim + width + time_dim, hidden), nn.GELU()]
        for _ in range(depth - 2):
            layers += [nn.Linear(hidden, hidden), nn.GELU()]
        layers.append(nn.Linear(hidden, patch_dim))
        self.net = nn.Sequential(*layers)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x_t: Tensor, t: Tensor, h: Tensor) -> Tensor:
        te = time_embedding(t, self.time_dim)[:, None, :].expand(-1, x_t.shape[1], -1).to(x_t.dtype)
        return self.net(torch.cat([x_t, h, te], dim=-1))

    def loss(self, target: Tensor, h: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Rectified-flow loss for target patches ``[B, N, P]`` (centred to [-1, 1]) given features ``h``."""
        dev = target.device if generator is None else generator.device  # draw where the generator lives
        t = torch.rand(target.shape[0], generator=generator, device=dev).to(target.device, target.dtype)
        x0 = torch.randn(target.shape, generator=generator, device=dev).to(target.device, target.dtype)
        x_t = t[:, None, None] * target + (1 - t[:, None, None]) * x0
        return ((self(x_t, t, h) - (target - x0)) ** 2).mean()

    @torch.no_grad()
    def sample(self, h: Tensor, patch_dim: int, steps: int = 16, generator: torch.Generator | None = None) -> Tensor:
        """Euler-integrate from noise (t = 0) to data (t = 1): patches ``[B, N, patch_dim]`` in [-1, 1] scale."""
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        b, n = h.shape[:2]
        dev = h.device if generator is None else generator.device
        x = torch.randn(b, n, patch_dim, generator=generator, device=dev).to(h.device, h.dtype)
        dt = 1.0 / steps
        for i in range(steps):
            t = torch.full((b,), i * dt, device=h.device, dtype=h.dtype)
            x = x + dt * self(x, t, h)
        return x
