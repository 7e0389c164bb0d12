"""Turn a user's ``keep`` into an exact token count ``k``.

This is the single place the rounding rule lives:

* ``keep`` an ``int`` (or any integral number, but not ``bool``) is a *count*: ``k = keep``,
  and ``1 <= keep <= n`` is required.
* ``keep`` a ``float`` is a *ratio* in ``(0, 1]``: ``k = floor(keep * n + 0.5)`` (nearest integer,
  halves rounded up), then clamped to ``[1, n]``. ``keep=1.0`` always gives ``k = n``.

A float like ``64.0`` is a ratio, not a count: pass ``64`` for a count.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

Keep = int | float


def resolve_k(keep: Keep, n: int, *, name: str = "keep") -> int:
    """Exact number of tokens to keep out of ``n`` (see the module docstring for the rule)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n must be an int token count, got {type(n).__name__}")
    n = int(n)
    if n <= 0:
        raise ValueError(f"n (the number of tokens) must be >= 1, got {n}")
    if isinstance(keep, bool):
        raise TypeError(f"{name} must be an int count or a float ratio in (0, 1], got bool {keep}")
    if isinstance(keep, numbers.Integral):
        k = int(keep)
        if k < 1:
            raise ValueError(f"{name} as a count must be >= 1, got {k}")
        if k > n:
            raise ValueError(f"{name} as a count must be <= the number of tokens N={n}, got {k}")
        return k
    if isinstance(keep, numbers.Real):
        r = float(keep)
        if math.isnan(r):
            raise ValueError(f"{name} must be a number, got NaN")
        if r <= 0.0:
            raise ValueError(f"{name} must be > 0 (a ratio in (0, 1] or a count >= 1), got {r}")
        if r > 1.0:
            raise ValueError(
                f"{name} as a ratio must be in (0, 1], got {r}; pass an int (e.g. {name}={int(r)}) for a count"
            )
        return min(n, max(1, math.floor(r * n + 0.5)))
    raise TypeError(f"{name} must be an int count or a float ratio in (0, 1], got {type(keep).__name__}")


def resolve_ks(keep: Keep | Sequence[Keep], lengths: Sequence[int], *, name: str = "keep") -> list[int]:
    """Per-sample ``k`` for samples of different lengths (one ``keep`` for all, or one per sample)."""
    if isinstance(keep, (numbers.Real, bool)):
        return [resolve_k(keep, n, name=name) for n in lengths]
    keep = list(keep)
    if len(keep) != len(lengths):
        raise ValueError(f"{name} has {len(keep)} entries but there are {len(lengths)} samples")
    return [resolve_k(kp, n, name=f"{name}[{i}]") for i, (kp, n) in enumerate(zip(keep, lengths, strict=True))]
