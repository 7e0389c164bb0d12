"""Synthetic but valid context for any registered strategy: for tests, benchmarks and demos without a model.

    ctx = example_context("transprune", tokens)          # {"prev_hidden": ..., "text_attn": ...}
    out, sel = vtok.compress(tokens, "transprune", keep=0.25, **ctx)

The values are generated per context key from what the method declares (``Method.needs | Method.uses``), so any
method registered later works as long as every key it declares has a generator in :data:`GENERATORS`.
Attention-like values are real softmax attention of random query vectors over the tokens projected with random
key weights (averaged over ``heads``), so they correlate with token content the way real attention does.
Everything is deterministic under ``seed`` and lives on the tokens' device and dtype.

Grid: the most square factorisation ``(h, w)`` of ``N`` (``h <= w``, ``h`` the largest divisor ``<= sqrt(N)``).
For a prime ``N`` that is the degenerate single row ``(1, N)``, which is valid but not a 2-D image: methods that
need ``grid`` should be exercised with a composite ``N``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vtok.pruners import get
from vtok.pruners.registry import Method

TEXT_TOKENS = 8  # instruction rows T of text_attn
MAX_FRAMES = 8


def most_square_grid(n: int) -> tuple[int, int]:
    """``(h, w)`` with ``h * w == n``, ``h <= w`` and ``h`` as large as possible; ``(1, n)`` for prime ``n``."""
    if n < 1:
        raise ValueError(f"N must be >= 1, got {n}")
    h = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return h, n // h


def frame_count(n: int, max_frames: int = MAX_FRAMES) -> int:
    """Largest divisor ``T <= max_frames`` of ``n`` that leaves at least 2 tokens per frame (1 if none)."""
    return max((t for t in range(1, max_frames + 1) if n % t == 0 and n // t >= 2), default=1)


@dataclass
class _Gen:
    """What one generator sees: the tokens, its own seeded CPU generator, the head count."""

    tokens: Tensor
    g: torch.Generator
    heads: int

    def randn(self, *shape: int) -> Tensor:
        # drawn on the CPU so results do not depend on the device, then moved
        return torch.randn(shape, generator=self.g, dtype=torch.float32).to(self.tokens.device)

    def keys(self) -> Tensor:
        """Per-head keys ``[B, H, N, dh]`` (fp32): tokens through a random projection."""
        b, n, d = self.tokens.shape
        dh = max(1, d // self.heads)
        w = self.randn(self.heads, d, dh) / math.sqrt(d)
        return torch.einsum("bnd,hde->bhne", self.tokens.float(), w)

    def attention(self, queries: int) -> Tensor:
        """Attention of ``queries`` random query rows per head over the tokens: ``[B, queries, N]``, rows sum to 1."""
        k = self.keys()
        b, h, _, dh = k.shape
        q = self.randn(b, h, queries, dh)
        p = torch.softmax(torch.einsum("bhqe,bhne->bhqn", q, k) / math.sqrt(dh), dim=-1)
        return p.mean(1)

    def out(self, x: Tensor) -> Tensor:
        return x.to(self.tokens.dtype)


def _cls_attn(s: _Gen) -> Tensor:
    return s.out(s.attention(1)[:, 0])


def _text_attn(s: _Gen) -> Tensor:
    return s.out(s.attention(TEXT_TOKENS))


def _prev_hidden(s: _Gen) -> Tensor:
    t = s.tokens
    scale = t.float().flatten(1).std(1, unbiased=False).clamp_min(1e-3)[:, None, None]  # per sample
    return s.out(t.float() + 0.1 * scale * s.randn(*t.shape))


def _keys(s: _Gen) -> Tensor:
    b, n, d = s.tokens.shape
    return s.out(s.tokens.float() @ (s.randn(d, d) / math.sqrt(d)))


def _attn(s: _Gen) -> Tensor:
    """Self-attention ``[B, N, N]`` (head mean), row-stochastic. The only generator that builds ``N × N``."""
    k = s.keys()
    b, h, n, dh = k.shape
    q = k + 0.5 * s.randn(b, h, n, dh)
    out = torch.zeros(b, n, n, device=k.device)
    for head in range(h):
        out += torch.softmax(q[:, head] @ k[:, head].transpose(1, 2) / math.sqrt(dh), dim=-1)
    return s.out(out / h)


def _query(s: _Gen) -> Tensor:
    b, _, d = s.tokens.shape
    t = s.tokens.float()
    # a "question" near the mean token, so query relevance is neither trivial nor noise
    return s.out(t.mean(1) + t.std(1, unbiased=False) * s.randn(b, d))


def _grid(s: _Gen) -> tuple[int, int]:
    return most_square_grid(s.tokens.shape[1])


def _frames(s: _Gen) -> int:
    return frame_count(s.tokens.shape[1])


def _frame_scores(s: _Gen) -> Tensor:
    """``[B, T]`` for ``T = frame_count(N)`` (the ``frames`` generator's T): cosine of a random query with each frame's
    mean token, so relevance follows content."""
    b, n, d = s.tokens.shape
    t = frame_count(n)
    means = s.tokens.float().reshape(b, t, n // t, d).mean(2)
    return s.out(torch.nn.functional.cosine_similarity(means, s.randn(b, 1, d), dim=-1))


def _features(s: _Gen) -> Tensor:
    """``[B, N, D]``: the tokens through a random linear map (similarity features that differ from the values)."""
    d = s.tokens.shape[-1]
    return s.out(s.tokens.float() @ (torch.eye(d, device=s.tokens.device) + 0.3 * s.randn(d, d) / math.sqrt(d)))


def _relevance_features(s: _Gen) -> Tensor:
    """``[B, N, D]``: the tokens through another random linear map (a second representation for relevance)."""
    d = s.tokens.shape[-1]
    return s.out(s.tokens.float() @ (s.randn(d, d) / math.sqrt(d)))


def _seq_offset(b: int) -> Tensor:
    """Where sample ``b``'s image starts in its "prompt": 35 + 7·b (LLaVA-1.5's system prompt is 35 tokens)."""
    return 35 + 7 * torch.arange(b)[:, None]


def _seq_index(s: _Gen) -> Tensor:
    """``[B, N]`` int64: the image tokens' indices in a prompt, from ``35 + 7·b`` on."""
    b, n = s.tokens.shape[:2]
    return (_seq_offset(b) + torch.arange(n)).to(s.tokens.device)


def _text_seq_index(s: _Gen) -> Tensor:
    """``[B, 8]`` int64: the 8 instruction tokens' indices, right after the image of ``_seq_index``."""
    b, n = s.tokens.shape[:2]
    return (_seq_offset(b) + n + torch.arange(TEXT_TOKENS)).to(s.tokens.device)


def _text_features(s: _Gen) -> Tensor:
    """``[B, 8, D]``: "instruction tokens" near the mean token (the ``query`` generator's recipe, 8 of them)."""
    b, _, d = s.tokens.shape
    t = s.tokens.float()
    return s.out(t.mean(1, keepdim=True) + t.std(1, unbiased=False, keepdim=True) * s.randn(b, TEXT_TOKENS, d))


def _text_keys(s: _Gen) -> Tensor:
    b, _, d = s.tokens.shape
    return s.out(s.randn(b, TEXT_TOKENS, d))


def _self_cross_attn(s: _Gen) -> Tensor:
    """``[B, 2, N]``: attention received from the image's own tokens (row 0, mean over N query rows) and from 8 text
    rows (row 1, summed), as FitPrune reads them."""
    n = s.tokens.shape[1]
    return s.out(torch.stack([s.attention(n).mean(1), s.attention(TEXT_TOKENS).sum(1)], 1))


def _text_rows_attn(s: _Gen) -> Tensor:
    """``[B, 8, N]``: the attention rows of 8 text tokens over the visual tokens (SparseVLM's rater rows)."""
    return s.out(s.attention(TEXT_TOKENS))


def _text_relevance(s: _Gen) -> Tensor:
    """``[B, 8]``: the 8 text tokens' relevance, a softmax over them averaged over the visual tokens (rows sum to 1)."""
    b = s.tokens.shape[0]
    return s.out(torch.softmax(s.randn(b, TEXT_TOKENS), dim=-1))


def _sizes(s: _Gen) -> Tensor:
    return torch.ones(s.tokens.shape[:2], device=s.tokens.device, dtype=s.tokens.dtype)


def _prefix_error(s: _Gen) -> Tensor:
    """``[B, N]``: a decreasing error curve per sample (as an ordered tokenizer's prefixes give), random scale and
    decay, strictly positive."""
    b, n = s.tokens.shape[:2]
    scale = s.randn(b, 1).abs() + 0.1
    decay = s.randn(b, 1).abs() + 0.2
    j = torch.arange(n, device=s.tokens.device, dtype=torch.float32)[None]
    return s.out(scale * torch.exp(-decay * j / max(1, n - 1) * 4) + 1e-3)


GENERATORS: dict[str, Callable[[_Gen], Any]] = {
    "cls_attn": _cls_attn,
    "mid_attn": _cls_attn,
    "text_attn": _text_attn,
    "prev_hidden": _prev_hidden,
    "grid": _grid,
    "frames": _frames,
    "query": _query,
    "keys": _keys,
    "attn": _attn,
    "sizes": _sizes,
    "prefix_error": _prefix_error,
    "frame_scores": _frame_scores,
    "features": _features,
    "text_features": _text_features,
    "text_keys": _text_keys,
    "self_cross_attn": _self_cross_attn,
    "text_rows_attn": _text_rows_attn,
    "text_relevance": _text_relevance,
    "relevance_features": _relevance_features,
    "seq_index": _seq_index,
    "text_seq_index": _text_seq_index,
}
"""Context key → generator. Shapes: ``cls_attn`` / ``mid_attn`` ``[B, N]``; ``text_attn`` ``[B, 8, N]``;
``prev_hidden`` ``[B, N, D]`` (tokens + 10 % noise); ``keys`` ``[B, N, D]``; ``attn`` ``[B, N, N]``; ``query``
``[B, D]``; ``grid`` ``(h, w)``; ``frames`` ``T | N``; ``sizes`` ones ``[B, N]``; ``frame_scores`` ``[B, T]``;
``features`` ``[B, N, D]``; ``text_features`` / ``text_keys`` ``[B, 8, D]``; ``self_cross_attn`` ``[B, 2, N]``;
``text_rows_attn`` ``[B, 8, N]``; ``text_relevance`` ``[B, 8]``; ``relevance_features`` ``[B, N, D]``; ``seq_index``
``[B, N]`` / ``text_seq_index`` ``[B, 8]`` (int64 sequence indices: image from ``35 + 7·b``, the text right after it).
Attention rows sum to 1. For a ``temporal`` method ``grid`` is the grid of one frame (``h * w * T == N``)."""


def example_context(method: str | Method, tokens: Tensor, *, seed: int = 0, heads: int = 4) -> dict[str, Any]:
    """Valid values for every context key ``method`` needs or uses, for ``tokens [B, N, D]``.

    Args:
        method: a registered name or a :class:`~vtok.pruners.registry.Method`.
        tokens: the tokens the context describes.
        seed: each key draws from its own ``torch.Generator`` seeded from ``(seed, key name)``, so a key's value
            depends only on ``(key, tokens, seed, heads)``, not on which other keys the method declares.
        heads: attention heads averaged in the attention-like keys.

    Returns:
        ``{key: value}`` ready to pass as ``vtok.compress(tokens, method, keep, **ctx)``.
    """
    info = get(method) if isinstance(method, str) else method
    if not isinstance(info, Method):
        raise TypeError(f"method must be a method name or a Method, got {type(method).__name__}")
    if not isinstance(tokens, Tensor) or tokens.dim() != 3:
        raise ValueError(f"tokens must be a tensor [B, N, D], got {getattr(tokens, 'shape', type(tokens))}")
    if heads < 1:
        raise ValueError(f"heads must be >= 1, got {heads}")
    wanted = sorted(info.needs | info.uses)
    missing = [k for k in wanted if k not in GENERATORS]
    if missing:
        raise NotImplementedError(f"example_context has no generator for context {missing} of method "
                                  f"'{info.name}'; add one to vtok.bench.synthetic.GENERATORS")
    out: dict[str, Any] = {}
    with torch.no_grad():
        for key in wanted:
            g = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
            out[key] = GENERATORS[key](_Gen(tokens.detach(), g, int(heads)))
    if info.family == "temporal" and "grid" in out:  # video tokens: the grid of one frame
        out["grid"] = most_square_grid(tokens.shape[1] // frame_count(tokens.shape[1]))
    return out
