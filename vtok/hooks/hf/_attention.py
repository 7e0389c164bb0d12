"""Read a few attention rows from a Hugging Face attention module while it runs SDPA (or eager).

transformers looks its attention function up by name in ``ALL_ATTENTION_FUNCTIONS`` on every call. vtok puts a thin
delegate under ``"sdpa"`` and ``"eager"`` that, only for the modules a wrapped model registered, recomputes the
softmax rows of the query positions asked for from the (RoPE-applied) ``query`` / ``key`` it is handed, then calls
the original function unchanged. Nothing switches to eager and no full attention matrix is built.

``CAPTURES`` names what a watching callback may compute from one call (``vtok.hooks.hf.providers`` cuts the context
keys from them): ``"last_row"`` (the last query row, heads averaged), ``"head_max"`` / ``"head_mean"`` (every query
row, heads max- / mean-reduced) and ``"keys"`` (the RoPE'd keys themselves).

Some transformers versions (4.x) call their module's own ``eager_attention_forward`` directly for ``"eager"``,
bypassing ``ALL_ATTENTION_FUNCTIONS``; for those, ``watch`` also puts a delegate in place of that module-level function
(the one from the watched module's Python module), and the ``"eager"`` entry then calls the saved original, so a
callback runs once per call either way.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import Tensor

Callback = Callable[[Tensor], None]
_CALLBACKS: dict[int, tuple[Callable[[Tensor, Tensor, Tensor | None, float | None, object], None]]] = {}
_ORIGINAL: dict[str, Callable] = {}
_MODULE_EAGER: dict[str, Callable] = {}  # Python module name -> its original eager_attention_forward


def _eager_of(module: torch.nn.Module) -> Callable:
    """The module's own eager function (eager is the modules' default), never vtok's delegate of it."""
    name = type(module).__module__
    current = __import__(name, fromlist=["eager_attention_forward"]).eager_attention_forward
    return _MODULE_EAGER[name] if getattr(current, "_vtok_delegate", False) else current


def _delegate(name: str) -> Callable:
    def fn(module, query, key, value, attention_mask, *args, **kwargs):
        cb = _CALLBACKS.get(id(module))
        if cb is not None:
            cb[0](query, key, attention_mask, kwargs.get("scaling"), module)
        original = _ORIGINAL.get(name) or _eager_of(module)
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    fn._vtok_delegate = True  # type: ignore[attr-defined]
    return fn


def _install_module_eager(module: torch.nn.Module) -> None:
    """Delegate the module-level ``eager_attention_forward`` of ``module``'s Python module (idempotent)."""
    name = type(module).__module__
    mod = sys.modules.get(name)
    current = getattr(mod, "eager_attention_forward", None)
    if current is None or getattr(current, "_vtok_delegate", False):
        return
    _MODULE_EAGER[name] = current

    def fn(module, query, key, value, attention_mask, *args, **kwargs):
        cb = _CALLBACKS.get(id(module))
        if cb is not None:
            cb[0](query, key, attention_mask, kwargs.get("scaling"), module)
        return current(module, query, key, value, attention_mask, *args, **kwargs)

    fn._vtok_delegate = True  # type: ignore[attr-defined]
    mod.eager_attention_forward = fn


def install() -> None:
    """Put the delegates in place (idempotent)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for name in ("sdpa", "eager"):
        current = ALL_ATTENTION_FUNCTIONS.get(name)
        if current is not None and getattr(current, "_vtok_delegate", False):
            continue
        if current is not None:
            _ORIGINAL[name] = current
        ALL_ATTENTION_FUNCTIONS[name] = _delegate(name)


def watch(module: torch.nn.Module, callback) -> None:
    """Call ``callback(query, key, mask, scaling, module)`` each time ``module`` runs its attention."""
    install()
    _install_module_eager(module)
    _CALLBACKS[id(module)] = (callback,)


def unwatch(module: torch.nn.Module) -> None:
    _CALLBACKS.pop(id(module), None)


def last_row_attention(query: Tensor, key: Tensor, mask: Tensor | None, scaling: float | None) -> Tensor:
    """Softmax attention of the last query row over all keys, heads averaged: ``[B, K]`` (fp32).

    ``query [B, H, Q, dh]``, ``key [B, Hk, K, dh]`` (grouped-query heads repeated), ``mask`` a 4-D boolean (True =
    attend) or additive mask ``[B, 1|H, Q, K]``, or ``None`` (causal: the last row sees every key)."""
    q = query[:, :, -1:].float()
    k = key.float()
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    logits = (q @ k.transpose(-1, -2)) * scale  # [B, H, 1, K]
    if mask is not None and isinstance(mask, Tensor):
        m = mask[:, :, -1:, -k.shape[2]:]
        logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m.float()
    return logits.softmax(-1).mean(1)[:, 0]


def head_reduced_attention(query: Tensor, key: Tensor, mask: Tensor | None, scaling: float | None,
                           reduce: str = "max") -> Tensor:
    """Softmax attention of every query row, max (``reduce="max"``, FitPrune) or mean (``"mean"``, SparseVLM) over
    heads: ``[B, Q, K]`` (fp32), one head at a time (no ``[B, H, Q, K]`` tensor). Arguments as
    :func:`last_row_attention`; ``mask=None`` means causal (query ``q`` sees keys up to ``K − Q + q``). Rows that see
    no key (padding) are 0."""
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    b, h, q_len, _ = query.shape
    k_len = key.shape[2]
    rep = h // key.shape[1]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if mask is None:
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
        mask = causal.expand(b, 1, q_len, k_len)
    elif isinstance(mask, Tensor):
        mask = mask[:, :, -q_len:, -k_len:]
    out = None
    for i in range(h):
        logits = (query[:, i].float() @ key[:, i // rep].float().transpose(-1, -2)) * scale  # [B, Q, K]
        m = mask[:, i if mask.shape[1] > 1 else 0]
        logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m.float()
        a = logits.softmax(-1).nan_to_num(0.0)
        if out is None:
            out = a
        else:
            out = torch.maximum(out, a) if reduce == "max" else out.add_(a)
    return out / h if reduce == "mean" else out


def _keys(query: Tensor, key: Tensor, mask: Tensor | None, scaling: float | None) -> Tensor:
    """The keys as the attention got them: ``[B, Hk, K, dh]``, RoPE applied."""
    return key


Capture = Callable[[Tensor, Tensor, Tensor | None, float | None], Tensor]
CAPTURES: dict[str, Capture] = {
    "last_row": last_row_attention,  # [B, K]
    "head_max": lambda q, k, m, s: head_reduced_attention(q, k, m, s, "max"),  # [B, Q, K]
    "head_mean": lambda q, k, m, s: head_reduced_attention(q, k, m, s, "mean"),  # [B, Q, K]
    "keys": _keys,  # [B, Hk, K, dh]
}
"""Capture name → ``fn(query [B, H, Q, dh], key [B, Hk, K, dh], mask, scaling)``: what a stage's providers read
from one attention call."""
