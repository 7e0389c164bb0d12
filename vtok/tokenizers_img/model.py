"""The resampler: a ViT encoder with K causal registers, and a ViT decoder from (masked) registers to patches.

Both work on flat patch tokens ``[B, N, P]``, so the same modules serve images (patches) and video (tubelets).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vtok.tokenizers_img.blocks import Block
from vtok.tokenizers_img.masks import register_attention_mask


def _param(*shape: int, std: float) -> nn.Parameter:
    """A learned embedding (positions, registers, queries, mask token) drawn from N(0, std²).

    Scales matter at initialisation. The image must dominate what the registers read and what the decoder sees:
    with unit-scale positions / registers the encoder's output barely depends on the image (its spread across
    images is ~1/10 of one FSQ step, so a register emits 1–6 distinct codes over 64 crops), and with unit-scale
    token positions the decoder's output barely depends on its tokens, so the model learns the mean image and sits
    there. Registers, token positions and the mask token start small (0.02, as FlexTok's registers and mask token);
    patch positions and the decoder's patch queries start at 0.3, enough to keep positions apart.
    """
    return nn.Parameter(torch.randn(*shape) * std)


class ResamplerEncoder(nn.Module):
    """Patch tokens ``[B, N, P]`` → the first ``k`` register outputs ``[B, k, out_dim]`` (pre-quantisation)."""

    def __init__(self, patch_dim: int, n_patches: int, n_registers: int, width: int, depth: int, heads: int,
                 mlp_ratio: float, out_dim: int) -> None:
        super().__init__()
        self.n_patches, self.n_registers = n_patches, n_registers
        self.embed = nn.Linear(patch_dim, width)
        self.pos = _param(n_patches, width, std=0.3)
        self.registers = _param(n_registers, width, std=0.02)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_dim)

    def hidden(self, patches: Tensor, k: int | None = None) -> Tensor:
        """All final hidden states ``[B, N + k, width]`` (patches first, then registers ``0..k-1``)."""
        k = self.n_registers if k is None else k
        b = patches.shape[0]
        x = torch.cat([self.embed(patches) + self.pos, self.registers[:k].expand(b, -1, -1)], dim=1)
        mask = register_attention_mask(self.n_patches, k, device=x.device)
        for blk in self.blocks:
            x = blk(x, mask)
        return self.norm(x)

    def forward(self, patches: Tensor, k: int | None = None) -> Tensor:
        # Registers are causal and patches never see them, so running only k registers gives the same first k.
        return self.head(self.hidden(patches, k)[:, self.n_patches:])


class ResamplerDecoder(nn.Module):
    """Token embeddings ``[B, K, width]`` and a keep mask ``[B, K]`` → patch predictions ``[B, N, P]``.

    Dropped tokens (keep False) are replaced by one learnable mask token; learnable per-patch queries read the
    tokens through full attention and a linear head turns each query into its patch's pixels.
    """

    def __init__(self, patch_dim: int, n_patches: int, n_registers: int, width: int, depth: int, heads: int,
                 mlp_ratio: float) -> None:
        super().__init__()
        self.n_registers = n_registers
        self.mask_token = _param(width, std=0.02)
        self.token_pos = _param(n_registers, width, std=0.02)
        self.queries = _param(n_patches, width, std=0.3)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, patch_dim)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.constant_(self.head.bias, 0.5)  # start at mid-grey

    def forward(self, tokens: Tensor, keep: Tensor) -> Tensor:
        return self.head(self.features(tokens, keep))

    def features(self, tokens: Tensor, keep: Tensor) -> Tensor:
        """The patch queries' final normed features ``[B, N, width]`` (what the pixel head and a flow head read)."""
        b = tokens.shape[0]
        x = torch.where(keep[..., None], tokens, self.mask_token.to(tokens.dtype)) + self.token_pos
        x = torch.cat([x, self.queries.expand(b, -1, -1)], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x[:, self.n_registers:])
