"""Memoise a frozen stack of layers by the digest of what enters each layer: a benchmark speed-up, not a method.

A sweep over pruning methods asks the same frozen vision tower about the same images once per cell. On the small
VLM on the real CLIP ViT-B/16 the tower is 40–80 % of a cell's time. :func:`cached_layers` replaces each layer's
``forward`` (on the instance) by a lookup keyed on a BLAKE2 digest of its tensor arguments (values, shapes, dtypes)
and the repr of the others: a layer whose inputs are bit-identical to an earlier call returns that call's output
without running. Because it wraps ``forward`` and not ``__call__``, the module's forward pre-hooks and hooks still
run with the same tensors, so methods that read a layer's input (``cls_attn`` from the feature layer) see exactly
what they see without the cache. Anything that changes a layer's input (a method pruning inside the tower) changes
the digest, so the cache can only return what the layer would compute — provided the weights do not change while
it is installed (frozen towers; the caller's responsibility).

    with cached_layers(adapter.tower_layers(model), store):   # store: a dict kept across calls
        ...
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, MutableMapping
from typing import Any

import torch

DEFAULT_LIMIT_BYTES = 4 << 30  # stop adding entries beyond this much cached tensor data (4 GiB)


def _feed(h: Any, value: Any) -> None:
    """Update hash ``h`` with ``value``: tensors by dtype, shape and bytes; sequences / dicts item by item."""
    if isinstance(value, torch.Tensor):
        t = value.detach().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}{t.device}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).cpu().numpy())
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}".encode())
        for v in value:
            _feed(h, v)
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for k in sorted(value, key=str):
            h.update(repr(k).encode())
            _feed(h, value[k])
    else:
        h.update(repr(value).encode())


def input_digest(index: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """Hex digest of one layer call: the layer's ``index`` in its stack, positional and keyword arguments."""
    h = hashlib.blake2b(digest_size=20)
    h.update(f"layer{index}".encode())
    _feed(h, args)
    _feed(h, kwargs)
    return h.hexdigest()


def module_digest(module: torch.nn.Module) -> str:
    """Hex digest of ``module``'s parameters and buffers (names, dtypes, shapes, values): the key of a store that
    may only be used with these weights."""
    h = hashlib.blake2b(digest_size=20)
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        _feed(h, t)
    return h.hexdigest()


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


class LayerCacheStats:
    """Counters of one store: ``hits``, ``misses``, ``bytes`` held, ``full`` (entries refused by the limit)."""

    def __init__(self) -> None:
        self.hits = self.misses = self.bytes = self.full = 0


@contextlib.contextmanager
def cached_layers(layers: torch.nn.ModuleList | list[torch.nn.Module], store: MutableMapping[str, Any],
                  limit_bytes: int = DEFAULT_LIMIT_BYTES,
                  stats: LayerCacheStats | None = None) -> Iterator[LayerCacheStats]:
    """Within the block, each of ``layers`` answers a call whose inputs it has seen (in ``store``) from ``store``.

    ``store`` maps input digests to outputs; keep it between blocks to reuse it (it must only ever be used with
    these layers' current weights). New outputs are stored until ``limit_bytes`` of tensor data is held; then
    layers simply compute. Outputs are stored and returned as the layer gave them; callers must not modify them
    in place (transformers' layers do not). A call with gradients enabled always computes (the store holds no
    graph). Leaving the block restores the layers' own ``forward`` exactly.
    Yields the ``LayerCacheStats`` (``stats`` when given, to count over several blocks).
    """
    if limit_bytes < 0:
        raise ValueError(f"limit_bytes must be >= 0, got {limit_bytes}")
    stats = stats if stats is not None else LayerCacheStats()
    stats.bytes = sum(_nbytes(v) for v in store.values())
    patched = []
    try:
        for index, layer in enumerate(layers):
            if "forward" in vars(layer):
                raise RuntimeError(f"layer {index} ({type(layer).__name__}) already has an instance forward; "
                                   "cached_layers does not nest")
            orig = layer.forward

            def forward(*args: Any, _index: int = index, _orig: Any = orig, **kwargs: Any) -> Any:
                if torch.is_grad_enabled():  # the cache holds no graph: compute when gradients are wanted
                    return _orig(*args, **kwargs)
                key = input_digest(_index, args, kwargs)
                if key in store:
                    stats.hits += 1
                    return store[key]
                stats.misses += 1
                out = _orig(*args, **kwargs)
                size = _nbytes(out)
                if stats.bytes + size <= limit_bytes:
                    store[key] = out
                    stats.bytes += size
                else:
                    stats.full += 1
                return out

            layer.forward = forward
            patched.append(layer)
        yield stats
    finally:
        for layer in patched:
            del layer.forward
