"""``VideoTokenizer``: the same resampler over spatio-temporal tubelets; K tokens ordered over the whole clip.

A clip ``[B, 3, T, H, W]`` is cut into ``(T/t)·(H/p)·(W/p)`` tubelets of ``t×p×p`` pixels (time-major order);
K registers summarise the whole clip with the causal register mask, so any prefix decodes to the full clip.
"""

from __future__ import annotations

from torch import Tensor

from vtok.tokenizers_img.tokenizer import Tokenizer


def tubeletify(clips: Tensor, tubelet: int, patch: int) -> Tensor:
    """``[B, C, T, H, W]`` → ``[B, (T/t)(H/p)(W/p), C·t·p·p]``."""
    if clips.dim() != 5:
        raise ValueError(f"clips must be [B, C, T, H, W], got shape {list(clips.shape)}")
    b, c, t, h, w = clips.shape
    if t % tubelet or h % patch or w % patch:
        raise ValueError(f"clip size ({t}, {h}, {w}) must be divisible by ({tubelet}, {patch}, {patch})")
    x = clips.reshape(b, c, t // tubelet, tubelet, h // patch, patch, w // patch, patch)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, (t // tubelet) * (h // patch) * (w // patch), c * tubelet * patch * patch)


def untubeletify(tokens: Tensor, grid: tuple[int, int, int], tubelet: int, patch: int, channels: int = 3) -> Tensor:
    """Inverse of :func:`tubeletify`: ``[B, gt·gh·gw, C·t·p·p]`` → ``[B, C, gt·t, gh·p, gw·p]``."""
    gt, gh, gw = grid
    b = tokens.shape[0]
    x = tokens.reshape(b, gt, gh, gw, channels, tubelet, patch, patch).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(b, channels, gt * tubelet, gh * patch, gw * patch)


class VideoTokenizer(Tokenizer):
    """Clips ``[B, 3, T, H, W]`` in [0, 1] ↔ K ordered tokens; ``config.kind`` must be ``"video"``."""

    kind = "video"

    @property
    def input_shape(self) -> tuple[int, ...]:
        c = self.config
        return (3, c.frames, c.image_size, c.image_size)

    def to_patches(self, x: Tensor) -> Tensor:
        return tubeletify(x, self.config.tubelet_frames, self.config.patch_size)

    def from_patches(self, p: Tensor) -> Tensor:
        return untubeletify(p, self.config.grid, self.config.tubelet_frames, self.config.patch_size)
