"""The context a strategy may need beyond the tokens, validated in one place.

Each key has a description and a validator ``(value, tokens) -> value`` that raises ``ValueError``
naming the key and the expected shape. Strategies declare the keys they need; hooks compute exactly
those and nothing else (so no N×N attention is built unless a method truly needs it).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Validator = Callable[[Any, Tensor], Any]


@dataclass(frozen=True)
class ContextKey:
    name: str
    description: str
    validate: Validator


CONTEXT_KEYS: dict[str, ContextKey] = {}


def register_context(name: str, description: str) -> Callable[[Validator], Validator]:
    """Decorator: register a context key with its validator."""

    def deco(fn: Validator) -> Validator:
        CONTEXT_KEYS[name] = ContextKey(name, description, fn)
        return fn

    return deco


def all_finite(t: Tensor) -> bool:
    """Whether a floating tensor holds no NaN / ±Inf: one ``aminmax`` pass (NaN propagates into both, an infinity
    into one), ~20× cheaper on the CPU than ``isfinite(t).all()``, which writes a boolean copy of ``t``."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _tensor(name: str, value: Any) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"context '{name}' must be a torch.Tensor, got {type(value).__name__}")
    if value.is_floating_point() and not all_finite(value):
        raise ValueError(f"context '{name}' contains NaN or Inf")
    return value


def _check_shape(name: str, value: Tensor, tokens: Tensor, allowed: Mapping[int, str]) -> None:
    """``allowed``: ndim → shape text, whose first dim must be B and last N."""
    b, n = tokens.shape[:2]
    if value.dim() not in allowed or value.shape[0] != b or value.shape[-1] != n:
        want = " or ".join(allowed.values())
        raise ValueError(f"context '{name}' must have shape {want} with B={b}, N={n}; got {list(value.shape)}")


@register_context("cls_attn", "attention each token receives from the CLS query (or mean received attention), "
                  "[B, N] or per head [B, H, N]")
def _cls_attn(value: Any, tokens: Tensor) -> Tensor:
    value = _tensor("cls_attn", value)
    _check_shape("cls_attn", value, tokens, {2: "[B, N]", 3: "[B, H, N]"})
    return value


@register_context("text_attn", "attention from text / instruction queries to each visual token, "
                  "[B, N], [B, T, N] or [B, H, T, N]")
def _text_attn(value: Any, tokens: Tensor) -> Tensor:
    value = _tensor("text_attn", value)
    _check_shape("text_attn", value, tokens, {2: "[B, N]", 3: "[B, T, N]", 4: "[B, H, T, N]"})
    return value


@register_context("prev_hidden", "the same tokens' hidden states at earlier layers, [B, N, D] or [L, B, N, D]")
def _prev_hidden(value: Any, tokens: Tensor) -> Tensor:
    value = _tensor("prev_hidden", value)
    b, n = tokens.shape[:2]
    ok = (value.dim() == 3 and value.shape[:2] == (b, n)) or (value.dim() == 4 and value.shape[1:3] == (b, n))
    if not ok:
        raise ValueError(f"context 'prev_hidden' must have shape [B, N, D] or [L, B, N, D] with B={b}, N={n}; "
                         f"got {list(value.shape)}")
    return value


@register_context("grid", "patch grid (h, w) of the tokens in row-major order, h * w == N; for video tokens "
                  "(with frames=T) the grid of one frame, h * w * T == N")
def _grid(value: Any, tokens: Tensor) -> tuple[int, int]:
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"context 'grid' must be a pair of ints (h, w), got {value!r}")
    h, w = int(value[0]), int(value[1])
    if h < 1 or w < 1:  # h * w against N (or N / frames, a per-frame grid): Context.build, which knows frames
        raise ValueError(f"context 'grid' (h, w) must have h, w >= 1, got ({h}, {w})")
    return h, w


@register_context("frames", "number of frames T; tokens are T equal frames in time order, N % T == 0")
def _frames(value: Any, tokens: Tensor) -> int:
    n = tokens.shape[1]
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1 or n % int(value):
        raise ValueError(f"context 'frames' must be an int T >= 1 dividing N={n}, got {value!r}")
    return int(value)


@register_context("query", "a text / question embedding in the tokens' space (or in the space of "
                  "'relevance_features' where given), [B, D] or [B, Q, D]")
def _query(value: Any, tokens: Tensor) -> Tensor:
    value = _tensor("query", value)
    b = tokens.shape[0]
    if value.dim() not in (2, 3) or value.shape[0] != b:  # D against the tokens or relevance_features: Context.build
        raise ValueError(f"context 'query' must have shape [B, D] or [B, Q, D] with B={b}; got {list(value.shape)}")
    return value


class Context(dict):
    """A validated mapping of context key → value. ``ctx["grid"]`` or ``ctx.get("cls_attn")``."""

    @classmethod
    def build(cls, tokens: Tensor, values: Mapping[str, Any]) -> Context:
        ctx = cls()
        for name, value in values.items():
            if value is None:
                continue
            if name not in CONTEXT_KEYS:
                raise ValueError(f"unknown context '{name}'; known: {sorted(CONTEXT_KEYS)}")
            ctx[name] = CONTEXT_KEYS[name].validate(value, tokens)
        ctx._check_frames(tokens.shape[1])
        ctx._check_query(tokens)
        return ctx

    def _check_query(self, tokens: Tensor) -> None:
        """``query`` lives in the space of ``relevance_features`` where given, else in the tokens' space."""
        if "query" not in self:
            return
        b, d = tokens.shape[0], tokens.shape[-1]
        where = ""
        if "relevance_features" in self:
            d, where = self["relevance_features"].shape[-1], " (the width of 'relevance_features')"
        if self["query"].shape[-1] != d:
            raise ValueError(f"context 'query' must have shape [B, D] or [B, Q, D] with B={b}, D={d}{where}; "
                             f"got {list(self['query'].shape)}")

    def _check_frames(self, n: int) -> None:
        """Keys that describe frames must agree with ``frames``: a per-frame ``grid`` (``h * w * T == N``) and
        ``frame_scores`` ``[B, T]``."""
        t = self.get("frames")
        if "grid" in self and self["grid"][0] * self["grid"][1] != n:
            h, w = self["grid"]
            if t is None:
                raise ValueError(f"context 'grid' (h, w) must satisfy h * w == N={n}, got ({h}, {w}) (h * w = "
                                 f"{h * w}); for video tokens pass frames=T and the grid of one frame, "
                                 f"h * w == N / T")
            if h * w * t != n:
                raise ValueError(f"context 'grid' (h, w) with frames={t} is the grid of one frame: "
                                 f"h * w * frames == N, so h * w must equal N / frames = {n} / {t} = {n // t}, "
                                 f"got ({h}, {w}) (h * w = {h * w})")
        if "frame_scores" in self and (t is None or self["frame_scores"].shape[1] != t):
            raise ValueError(f"context 'frame_scores' [B, T] needs frames=T with the same T; got "
                             f"{list(self['frame_scores'].shape)} with frames={t}")

    def frame_grid(self, n: int) -> tuple[int, int] | None:
        """The grid of one frame: ``grid`` when it is per-frame (or ``frames`` is 1), else ``None``."""
        t = self.get("frames", 1)
        if "grid" not in self:
            return None
        h, w = self["grid"]
        return (h, w) if h * w * t == n else None

    def require(self, method: str, needs: frozenset[str] | set[str]) -> None:
        missing = sorted(set(needs) - set(self))
        if missing:
            hints = "; ".join(f"'{m}': {CONTEXT_KEYS[m].description}" for m in missing)
            raise ValueError(f"method '{method}' needs context {missing} — pass it as a keyword ({hints})")


@register_context("keys", "attention keys of the tokens (ToMe / VisionZip matching features), [B, N, Dk] or "
                  "per head [B, H, N, dh]")
def _keys(value: Any, tokens: Tensor) -> Tensor:
    value = _tensor("keys", value)
    b, n = tokens.shape[:2]
    ok = (value.dim() == 3 and value.shape[:2] == (b, n)) or (value.dim() == 4 and value.shape[0] == b
                                                                and value.shape[2] == n)
    if not ok:
        raise ValueError(f"context 'keys' must have shape [B, N, Dk] or [B, H, N, dh] with B={b}, N={n}; "
                         f"got {list(value.shape)}")
    return value


@register_context("attn", "full attention among the tokens (row = query), [B, N, N] or [B, H, N, N]; only for "
                  "methods that truly need the whole graph (Zero-TPrune)")
def _attn(value: Any, tokens: Tensor) -> Tensor:
    value = _tensor("attn", value)
    b, n = tokens.shape[:2]
    if value.dim() not in (3, 4) or value.shape[0] != b or value.shape[-2:] != (n, n):
        raise ValueError(f"context 'attn' must have shape [B, N, N] or [B, H, N, N] with B={b}, N={n}; "
                         f"got {list(value.shape)}")
    return value


@register_context("mid_attn", "attention each token receives from the CLS query at a middle, object-centric "
                  "encoder layer (HiPrune anchors), [B, N] or [B, H, N]")
def _mid_attn(value: Any, tokens: Tensor) -> Tensor:
    value = _tensor("mid_attn", value)
    _check_shape("mid_attn", value, tokens, {2: "[B, N]", 3: "[B, H, N]"})
    return value


@register_context("sizes", "how many original tokens each token already stands for (ToMe size), [B, N], > 0")
def _sizes(value: Any, tokens: Tensor) -> Tensor:
    value = _tensor("sizes", value)
    _check_shape("sizes", value, tokens, {2: "[B, N]"})
    if bool((value <= 0).any()):
        raise ValueError("context 'sizes' must be > 0 everywhere")
    return value


@register_context("frame_scores", "relevance of each frame (e.g. text-frame similarity) for query-driven frame "
                  "budgets, [B, T] with T = frames")
def _frame_scores(value: Any, tokens: Tensor) -> Tensor:
    value = _tensor("frame_scores", value)
    b, n = tokens.shape[:2]
    if value.dim() != 2 or value.shape[0] != b or value.shape[1] < 1 or n % value.shape[1]:
        raise ValueError(f"context 'frame_scores' must have shape [B, T] with B={b} and T dividing N={n}; "
                         f"got {list(value.shape)}")
    return value


@register_context("features", "the tokens' features for similarity where they differ from the token values (an LLM's "
                  "normalised hidden states: DART), [B, N, Df]")
def _features(value: Any, tokens: Tensor) -> Tensor:
    value = _tensor("features", value)
    b, n = tokens.shape[:2]
    if value.dim() != 3 or value.shape[:2] != (b, n):
        raise ValueError(f"context 'features' must have shape [B, N, Df] with B={b}, N={n}; got {list(value.shape)}")
    return value


@register_context("relevance_features", "the tokens in the embedding space of 'query' where it is not the tokens' "
                  "own (CDPruner: CLIP's image embeddings visual_projection(post_layernorm(h)) against CLIP text "
                  "embeddings, while similarity stays on the tokens), [B, N, Dq]")
def _relevance_features(value: Any, tokens: Tensor) -> Tensor:
    value = _tensor("relevance_features", value)
    b, n = tokens.shape[:2]
    if value.dim() != 3 or value.shape[:2] != (b, n):
        raise ValueError(f"context 'relevance_features' must have shape [B, N, Dq] with B={b}, N={n}; "
                         f"got {list(value.shape)}")
    return value


def _index(name: str, value: Any, shape: str, want: tuple[int, ...] | None, b: int) -> Tensor:
    """An integer index tensor ``[B, ·]`` of non-negative entries."""
    if not isinstance(value, Tensor):
        raise TypeError(f"context '{name}' must be a torch.Tensor, got {type(value).__name__}")
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise ValueError(f"context '{name}' must be an integer tensor, got {value.dtype}")
    if value.dim() != 2 or value.shape[0] != b or (want is not None and tuple(value.shape) != want):
        raise ValueError(f"context '{name}' must have shape {shape}; got {list(value.shape)}")
    if value.numel() and bool((value < 0).any()):
        raise ValueError(f"context '{name}' must be >= 0 everywhere")
    return value


@register_context("seq_index", "each token's index in its (unpadded) sequence, e.g. a VLM prompt, [B, N] integer "
                  "(DART's pivot order follows it)")
def _seq_index(value: Any, tokens: Tensor) -> Tensor:
    b, n = tokens.shape[:2]
    return _index("seq_index", value, f"[B, N] with B={b}, N={n}", (b, n), b)


@register_context("text_seq_index", "the sequence index of each instruction token of 'text_features' / 'text_keys', "
                  "[B, T] integer")
def _text_seq_index(value: Any, tokens: Tensor) -> Tensor:
    b = tokens.shape[0]
    return _index("text_seq_index", value, f"[B, T] with B={b}", None, b)


@register_context("text_features", "features of the instruction tokens after the image, in the space of 'features' "
                  "(or of the tokens), [B, T, Df] (DART's text pivots)")
def _text_features(value: Any, tokens: Tensor) -> Tensor:
    value = _tensor("text_features", value)
    if value.dim() != 3 or value.shape[0] != tokens.shape[0]:
        raise ValueError(f"context 'text_features' must have shape [B, T, Df] with B={tokens.shape[0]}; "
                         f"got {list(value.shape)}")
    return value


@register_context("text_keys", "attention keys of the same instruction tokens, [B, T, Dk] or per head [B, H, T, dh]")
def _text_keys(value: Any, tokens: Tensor) -> Tensor:
    value = _tensor("text_keys", value)
    if value.dim() not in (3, 4) or value.shape[0] != tokens.shape[0]:
        raise ValueError(f"context 'text_keys' must have shape [B, T, Dk] or [B, H, T, dh] with B={tokens.shape[0]}; "
                         f"got {list(value.shape)}")
    return value


@register_context("self_cross_attn", "attention each visual token receives in an LLM layer, heads max-reduced: row 0 "
                  "the mean over the image's own query tokens, row 1 the sum over the (text) queries after the image, "
                  "[B, 2, N]")
def _self_cross_attn(value: Any, tokens: Tensor) -> Tensor:
    value = _tensor("self_cross_attn", value)
    _check_shape("self_cross_attn", value, tokens, {3: "[B, 2, N]"})
    if value.shape[1] != 2:
        raise ValueError(f"context 'self_cross_attn' must have shape [B, 2, N]; got {list(value.shape)}")
    return value


@register_context("text_rows_attn", "attention rows of the text tokens after the image to each visual token in an LLM "
                  "layer, heads averaged, [B, T, N] (SparseVLM's rater attention)")
def _text_rows_attn(value: Any, tokens: Tensor) -> Tensor:
    value = _tensor("text_rows_attn", value)
    _check_shape("text_rows_attn", value, tokens, {3: "[B, T, N]"})
    return value


@register_context("text_relevance", "relevance of each text token after the image to the image, from the language "
                  "model's input embeddings, [B, T] (SparseVLM's raters: the entries above the mean)")
def _text_relevance(value: Any, tokens: Tensor) -> Tensor:
    value = _tensor("text_relevance", value)
    if value.dim() != 2 or value.shape[0] != tokens.shape[0]:
        raise ValueError(f"context 'text_relevance' must have shape [B, T] with B={tokens.shape[0]}; "
                         f"got {list(value.shape)}")
    return value
