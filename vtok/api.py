"""The functional entry point: ``vtok.compress(tokens, method, keep, **context_and_options)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from vtok.budget import Keep, resolve_k, resolve_ks
from vtok.context import CONTEXT_KEYS, Context, all_finite
from vtok.pruners import get
from vtok.selection import Selection


def check_tokens(tokens: Any, name: str = "tokens") -> Tensor:
    """Validate a token tensor ``[B, N, D]``: a floating tensor, 3-D, non-empty, finite."""
    if not isinstance(tokens, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, N, D], got {type(tokens).__name__}")
    if tokens.dim() != 3:
        raise ValueError(f"{name} must be 3-D [B, N, D], got shape {list(tokens.shape)}")
    b, n, d = tokens.shape
    if b == 0 or n == 0 or d == 0:
        raise ValueError(f"{name} must be non-empty [B, N, D] with B, N, D >= 1, got {list(tokens.shape)}")
    if not tokens.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {tokens.dtype}")
    if not all_finite(tokens):
        raise ValueError(f"{name} contains NaN or Inf")
    return tokens


def compress(tokens: Tensor, method: str, keep: Keep | Sequence[Keep] | Tensor,
             **kwargs: Any) -> tuple[Tensor, Selection]:
    """Reduce ``tokens [B, N, D]`` to ``[B, k, D]`` with a registered strategy.

    Args:
        tokens: visual tokens ``[B, N, D]`` (patch tokens only; strip CLS / prefix tokens first), or the latent
            tokens of a 1D tokenizer (``Tokenizer.latents``).
        method: a name from ``vtok.methods()``.
        keep: a ratio in ``(0, 1]`` or an int count; see ``vtok.budget`` for the rounding rule. One per sample
            (a list or a 1-D tensor of ``B`` entries) for per-sample budgets: the method then runs sample by sample
            and the result is ragged (below).
        **kwargs: context the method needs (``grid=(h, w)``, ``cls_attn=...``; see ``vtok.context``) and the
            method's own options (``seed=0`` for ``random``, ...).

    Returns:
        ``(tokens_out [B, k, D], selection)``. ``keep`` resolving to all ``N`` tokens returns the input tensor
        itself (bit-exact identity) and ``Selection.identity``. Per-sample budgets and methods that pick a length
        per sample (``Method.ragged``: ``adaptive_length``) give a ragged result: ``k`` is the longest row,
        ``selection.lengths [B]`` the real count of each, padding is zeros (``selection.valid_mask()``).
    """
    tokens = check_tokens(tokens)
    info = get(method)
    b, n, _ = tokens.shape
    if not isinstance(keep, (int, float)) and (isinstance(keep, (list, tuple)) or
                                               (isinstance(keep, Tensor) and keep.dim() == 1)):
        ks = resolve_ks(keep.tolist() if isinstance(keep, Tensor) else list(keep), [n] * b)
        if len(set(ks)) > 1:
            return _compress_rows(tokens, method, ks, kwargs)
        keep = ks[0]
    k = resolve_k(keep, n)
    ctx_values = {key: v for key, v in kwargs.items() if key in CONTEXT_KEYS}
    options = {key: v for key, v in kwargs.items() if key not in CONTEXT_KEYS}
    bad = sorted(set(options) - set(info.options))
    if bad:
        raise TypeError(f"method '{method}' got unknown option(s) {bad}; its options: {sorted(info.options)}, "
                        f"context keys: {sorted(CONTEXT_KEYS)}")
    ctx = Context.build(tokens, ctx_values)
    ctx.require(method, info.needs)
    if "grid" in ctx and ctx["grid"][0] * ctx["grid"][1] != n and info.family != "temporal":
        raise ValueError(f"method '{method}' is an image strategy: its grid must cover all N={n} tokens, got the "
                         f"per-frame grid {ctx['grid']}; run it frame by frame with vtok.compress(tokens, 'per_frame', "
                         f"keep, strategy='{method}', frames=T, grid=(h, w))")
    if k == n and not (info.ragged and options):
        return tokens, Selection.identity(b, n, tokens.device)
    sel = info.fn(tokens, k, ctx, **options).validate()
    if info.ragged:
        if sel.batch != b or sel.n != n:
            raise RuntimeError(f"method '{method}' returned a selection of B={sel.batch} from N={sel.n}, "
                               f"expected B={b} from N={n}")
        return sel.apply(tokens, weights=ctx.get("sizes")), sel
    if sel.k != k or sel.batch != b or sel.n != n:
        raise RuntimeError(f"method '{method}' returned a selection of [B={sel.batch}, k={sel.k}] from N={sel.n}, "
                           f"expected [B={b}, k={k}] from N={n}")
    return sel.apply(tokens, weights=ctx.get("sizes")), sel


def _compress_rows(tokens: Tensor, method: str, ks: list[int], kwargs: dict[str, Any]) -> tuple[Tensor, Selection]:
    """``compress`` with a budget per sample: each sample alone (its context sliced), stacked ragged."""
    b, n, _ = tokens.shape
    info = get(method)
    if info.ragged:
        raise ValueError(f"method '{method}' picks its own length per sample; give it one keep (a mean budget or a "
                         f"cap), not one per sample")
    ctx = Context.build(tokens, {key: v for key, v in kwargs.items() if key in CONTEXT_KEYS})
    options = {key: v for key, v in kwargs.items() if key not in CONTEXT_KEYS}
    rows = []
    for i, k in enumerate(ks):
        one = tokens[i:i + 1]
        _, sel = compress(one, method, k, **ctx.row(i, b, n), **options)
        rows.append(sel)
    sel = Selection.from_rows(rows).validate()
    return sel.apply(tokens, weights=ctx.get("sizes")), sel


def retained_count(method: str, n: int, keep: Keep, grid: tuple[int, int] | None = None, protected: int = 0) -> int:
    """How many tokens ``method`` leaves of an image of ``n`` tokens, known before the encoder runs (serving engines
    size their placeholders with it, e.g. vLLM's multimodal pruning interface).

    Every registered strategy returns exactly ``resolve_k(keep, n - protected)`` tokens (``compress`` enforces it),
    plus the ``protected`` tokens a wrapper never prunes (LLaVA-NeXT's image-newlines). ``grid`` is checked
    (``h * w == n``) for methods that need it.
    """
    info = get(method)
    if info.ragged:
        raise ValueError(f"method '{method}' picks a length per image from its content; its count is not known "
                         f"before the encoder runs (use a fixed-count method such as 'prefix')")
    if "grid" in info.needs:
        if grid is None:
            raise ValueError(f"method '{method}' needs grid=(h, w) to size its output")
        if len(grid) != 2 or grid[0] * grid[1] != n - protected:
            raise ValueError(f"grid must satisfy h * w == n - protected = {n - protected}, got {grid}")
    if isinstance(protected, bool) or not isinstance(protected, int) or not 0 <= protected < n:
        raise ValueError(f"protected must be an int in [0, n={n}), got {protected!r}")
    return resolve_k(keep, n - protected) + protected
