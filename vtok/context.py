"""The context a strategy may need beyond the tokens, validated in one place.

Each key has a description and a validator ``(value, tokens) -> value`` that raises ``ValueError``
naming the key and the expected shape. Strategies declare the keys they need; hooks compute exactly
those and nothing else (so no N×N attention is built unless a method truly needs it).

Tensor keys are described by one table, ``CONTEXT_SHAPES`` (key → ``TensorSpec``: description, the allowed shapes
as text, the dtype kind and extra rules), and checked by one generic validator; ``grid`` and ``frames`` (not
tensors) keep small dedicated validators. ``register_context(name, description)`` registers any other key with its
own validator.
"""

from __future__ import annotations

import functools
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


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor context key must look like.

    Attributes:
        description: one line for error hints and docs.
        shapes: the allowed shapes as text, one per ndim, e.g. ``("[B, N]", "[B, H, N]")``: ``B`` must be the
            tokens' batch size, ``N`` their count, a digit that size; any other name is free.
        dtype: ``"any"`` (floating values must be finite) or ``"int"`` (an integer tensor of entries ``>= 0``).
        positive: entries must be ``> 0``.
        rule: an extra shape condition ``(value, B, N) -> bool``, reported with the shape message.
        where: the shape message's ``with ...`` text (``{b}`` / ``{n}`` filled in); default ``B={b}, N={n}``, or
            ``B={b}`` where no shape names ``N``.
    """

    description: str
    shapes: tuple[str, ...]
    dtype: str = "any"
    positive: bool = False
    rule: Callable[[Tensor, int, int], bool] | None = None
    where: str | None = None


def _dims(shape: str) -> list[str]:
    """``"[B, H, N]"`` → ``["B", "H", "N"]``."""
    return [d.strip() for d in shape.strip("[]").split(",")]


def _fits(shape: str, value: Tensor, b: int, n: int) -> bool:
    dims = _dims(shape)
    if len(dims) != value.dim():
        return False
    fixed = {"B": b, "N": n}
    for name, size in zip(dims, value.shape, strict=True):
        want = int(name) if name.isdigit() else fixed.get(name)
        if want is not None and size != want:
            return False
    return True


def _validate(name: str, spec: TensorSpec, value: Any, tokens: Tensor) -> Tensor:
    """The generic validator of a ``CONTEXT_SHAPES`` key."""
    if not isinstance(value, Tensor):
        raise TypeError(f"context '{name}' must be a torch.Tensor, got {type(value).__name__}")
    if spec.dtype == "int":
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"context '{name}' must be an integer tensor, got {value.dtype}")
    elif value.is_floating_point() and not all_finite(value):
        raise ValueError(f"context '{name}' contains NaN or Inf")
    b, n = tokens.shape[:2]
    if not any(_fits(s, value, b, n) for s in spec.shapes) or (spec.rule is not None and not spec.rule(value, b, n)):
        where = spec.where or ("B={b}, N={n}" if any("N" in _dims(s) for s in spec.shapes) else "B={b}")
        raise ValueError(f"context '{name}' must have shape {' or '.join(spec.shapes)} with "
                         f"{where.format(b=b, n=n)}; got {list(value.shape)}")
    if spec.dtype == "int" and value.numel() and bool((value < 0).any()):
        raise ValueError(f"context '{name}' must be >= 0 everywhere")
    if spec.positive and bool((value <= 0).any()):
        raise ValueError(f"context '{name}' must be > 0 everywhere")
    return value


CONTEXT_SHAPES: dict[str, TensorSpec] = {
    "cls_attn": TensorSpec("attention each token receives from the CLS query (or mean received attention), "
                           "[B, N] or per head [B, H, N]", ("[B, N]", "[B, H, N]")),
    "text_attn": TensorSpec("attention from text / instruction queries to each visual token, "
                            "[B, N], [B, T, N] or [B, H, T, N]", ("[B, N]", "[B, T, N]", "[B, H, T, N]")),
    "prev_hidden": TensorSpec("the same tokens' hidden states at earlier layers, [B, N, D] or [L, B, N, D]",
                              ("[B, N, D]", "[L, B, N, D]")),
    # D against the tokens or relevance_features: Context.build
    "query": TensorSpec("a text / question embedding in the tokens' space (or in the space of "
                        "'relevance_features' where given), [B, D] or [B, Q, D]", ("[B, D]", "[B, Q, D]")),
    "keys": TensorSpec("attention keys of the tokens (ToMe / VisionZip matching features), [B, N, Dk] or "
                       "per head [B, H, N, dh]", ("[B, N, Dk]", "[B, H, N, dh]")),
    "attn": TensorSpec("full attention among the tokens (row = query), [B, N, N] or [B, H, N, N]; only for "
                       "methods that truly need the whole graph (Zero-TPrune)", ("[B, N, N]", "[B, H, N, N]")),
    "mid_attn": TensorSpec("attention each token receives from the CLS query at a middle, object-centric "
                           "encoder layer (HiPrune anchors), [B, N] or [B, H, N]", ("[B, N]", "[B, H, N]")),
    "sizes": TensorSpec("how many original tokens each token already stands for (ToMe size), [B, N], > 0",
                        ("[B, N]",), positive=True),
    "frame_scores": TensorSpec("relevance of each frame (e.g. text-frame similarity) for query-driven frame "
                               "budgets, [B, T] with T = frames", ("[B, T]",),
                               rule=lambda v, b, n: v.shape[1] >= 1 and n % v.shape[1] == 0,
                               where="B={b} and T dividing N={n}"),
    "features": TensorSpec("the tokens' features for similarity where they differ from the token values (an LLM's "
                           "normalised hidden states: DART), [B, N, Df]", ("[B, N, Df]",)),
    "relevance_features": TensorSpec("the tokens in the embedding space of 'query' where it is not the tokens' "
                                     "own (CDPruner: CLIP's image embeddings visual_projection(post_layernorm(h)) "
                                     "against CLIP text embeddings, while similarity stays on the tokens), "
                                     "[B, N, Dq]", ("[B, N, Dq]",)),
    "seq_index": TensorSpec("each token's index in its (unpadded) sequence, e.g. a VLM prompt, [B, N] integer "
                            "(DART's pivot order follows it)", ("[B, N]",), dtype="int"),
    "text_seq_index": TensorSpec("the sequence index of each instruction token of 'text_features' / 'text_keys', "
                                 "[B, T] integer", ("[B, T]",), dtype="int"),
    "text_features": TensorSpec("features of the instruction tokens after the image, in the space of 'features' "
                                "(or of the tokens), [B, T, Df] (DART's text pivots)", ("[B, T, Df]",)),
    "text_keys": TensorSpec("attention keys of the same instruction tokens, [B, T, Dk] or per head [B, H, T, dh]",
                            ("[B, T, Dk]", "[B, H, T, dh]")),
    "self_cross_attn": TensorSpec("attention each visual token receives in an LLM layer, heads max-reduced: row 0 "
                                  "the mean over the image's own query tokens, row 1 the sum over the (text) queries "
                                  "after the image, [B, 2, N]", ("[B, 2, N]",)),
    "text_rows_attn": TensorSpec("attention rows of the text tokens after the image to each visual token in an LLM "
                                 "layer, heads averaged, [B, T, N] (SparseVLM's rater attention)", ("[B, T, N]",)),
    "text_relevance": TensorSpec("relevance of each text token after the image to the image, from the language "
                                 "model's input embeddings, [B, T] (SparseVLM's raters: the entries above the mean)",
                                 ("[B, T]",)),
    "prefix_error": TensorSpec("reconstruction error of every prefix of ordered (1D tokenizer) tokens: entry j the "
                               "error from the first j + 1 tokens, e.g. Tokenizer.prefix_errors, [B, N] (>= 0)",
                               ("[B, N]",), rule=lambda v, b, n: bool((v >= 0).all()),
                               where="B={b}, N={n} and entries >= 0"),
}
for _name, _spec in CONTEXT_SHAPES.items():
    register_context(_name, _spec.description)(functools.partial(_validate, _name, _spec))


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

    def row(self, b: int, batch: int, n: int) -> Context:
        """The context of sample ``b`` alone (each tensor sliced on its batch axis ``B``; ``grid``, ``frames`` as
        they are), for running a batch one sample at a time (per-sample budgets)."""
        out = Context()
        for name, value in self.items():
            if not isinstance(value, Tensor):
                out[name] = value
                continue
            spec = CONTEXT_SHAPES.get(name)
            dims = next((_dims(s) for s in spec.shapes if _fits(s, value, batch, n)), None) if spec else None
            axis = dims.index("B") if dims and "B" in dims else 0
            out[name] = value.narrow(axis, b, 1)
        return out

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
