"""Ordered tokens through the strategies: ``Tokenizer.tokenize(images, keep=…, method=…)``.

A tokenizer's latent tokens (its quantised codes, ``Tokenizer.latents``: ``[B, K, code_dim]``) go through
``vtok.compress`` like any tokens. ``prefix`` keeps the first ``k``; ``adaptive_length`` a prefix per image, its
length chosen from ``Tokenizer.prefix_errors``; any other strategy (``random``, ``divprune``, ``kmedoids``,
``tome``, …) prunes or merges post hoc. Merged codes are averages, so they are rounded back onto the code grid
(FSQ levels, or bits at 0.5) to stay tokens a decoder and a byte count understand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from vtok.tokenizers_img.tokenizer import Tokenizer


@dataclass(frozen=True)
class TokenSelection:
    """Tokens kept from each image of a batch, possibly a different number per image.

    Attributes:
        ids: FSQ int64 ``[B, k]`` or binary bool ``[B, k, bits]``; ``k`` the longest row, padding rows repeat 0.
        positions: int64 ``[B, k]``: the register (0..K−1) each token takes in the decoder.
        lengths: int64 ``[B]``: real tokens per image (the first ``lengths[b]`` of row ``b``).
        method: the strategy that chose them.
        num_tokens: the tokenizer's ``K``.
    """

    ids: Tensor
    positions: Tensor
    lengths: Tensor
    method: str
    num_tokens: int

    @property
    def is_prefix(self) -> bool:
        """Whether every row is a prefix ``0 … lengths[b] − 1`` (no positions to send)."""
        ar = torch.arange(self.positions.shape[1], device=self.positions.device)
        valid = self.valid_mask()
        return bool(((self.positions == ar) | ~valid).all())

    def valid_mask(self) -> Tensor:
        """Boolean ``[B, k]``: the real tokens."""
        return torch.arange(self.positions.shape[1], device=self.lengths.device)[None] < self.lengths[:, None]

    def payload_bits(self, bits_per_token: float, fixed_length: bool = False) -> Tensor:
        """float64 ``[B]``: bits to send each image's tokens — ``lengths · bits_per_token``, plus which registers
        they occupy (``log2 C(K, len)`` unless a prefix), plus the length itself (``log2 K``) unless
        ``fixed_length`` (every image of the stream has the same agreed length)."""
        n = self.lengths.to(torch.float64)
        bits = n * bits_per_token
        if not self.is_prefix:
            k = self.num_tokens
            bits = bits + torch.tensor([math.log2(math.comb(k, int(v))) for v in self.lengths], dtype=torch.float64)
        if not fixed_length:
            bits = bits + math.log2(self.num_tokens)
        return bits


def requantize(tok: Tokenizer, codes: Tensor) -> Tensor:
    """Codes ``[..., code_dim]`` (possibly averages of codes) → ids on the nearest grid point: FSQ indices ``[...]``
    or binary bits ``[..., bits]`` (bool, at 0.5)."""
    from vtok.tokenizers_img.fsq import FSQ

    if isinstance(tok.quantizer, FSQ):
        return tok.quantizer.codes_to_indices(codes.clamp(-1.0, 1.0))
    return codes > 0.5


def select(tok: Tokenizer, images: Tensor, keep: Any, method: str = "prefix", **options: Any) -> TokenSelection:
    """The tokens ``method`` keeps of ``images`` at budget ``keep`` (see :mod:`vtok.tokenizers_img.selected`)."""
    import vtok

    info = vtok.get_method(method)
    codes = tok.latents(images)
    if "prefix_error" in info.needs | info.uses and "prefix_error" not in options:
        options["prefix_error"] = tok.prefix_errors(images, codes=codes)
    out, sel = vtok.compress(codes, method, keep, **options)
    valid = sel.valid_mask()
    ids = requantize(tok, out)
    ids = ids.masked_fill(~valid if ids.dim() == 2 else ~valid[..., None], 0)
    positions = sel.emitted_keep().masked_fill(~valid, 0)
    return TokenSelection(ids, positions, sel.counts().clone(), method, tok.num_tokens)


def decode_selection(tok: Tokenizer, ts: TokenSelection) -> Tensor:
    """Images from a :class:`TokenSelection`: each image's tokens placed at their registers, the rest masked."""
    codes = tok._ids_to_codes(ts.ids)
    valid = ts.valid_mask().to(tok.device)
    b = ts.ids.shape[0]
    emb = torch.zeros(b, tok.num_tokens, tok.config.width, device=tok.device)
    keep = torch.zeros(b, tok.num_tokens, dtype=torch.bool, device=tok.device)
    pos = ts.positions.to(tok.device)
    rows = torch.arange(b, device=tok.device)[:, None].expand_as(pos)
    e = tok.embed(codes)
    emb[rows[valid], pos[valid]] = e[valid]
    keep[rows[valid], pos[valid]] = True
    return tok.from_patches(tok.decoder.head(tok.decoder.features(emb, keep))).clamp(0.0, 1.0)
