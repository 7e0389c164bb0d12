"""Reconstruction loss: pixel MSE plus an optional image-gradient L1 term (sharper edges, no pretrained net)."""

from __future__ import annotations

from torch import Tensor


def gradient_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean L1 distance between horizontal and vertical finite differences; ``[..., H, W]`` inputs."""
    dx = (pred.diff(dim=-1) - target.diff(dim=-1)).abs().mean()
    dy = (pred.diff(dim=-2) - target.diff(dim=-2)).abs().mean()
    return 0.5 * (dx + dy)


def reconstruction_loss(pred: Tensor, target: Tensor, grad_weight: float = 0.0) -> tuple[Tensor, Tensor]:
    """``(total, mse)`` for images ``[B, 3, H, W]`` or clips ``[B, 3, T, H, W]``."""
    mse = ((pred - target) ** 2).mean()
    total = mse + grad_weight * gradient_loss(pred, target) if grad_weight else mse
    return total, mse
