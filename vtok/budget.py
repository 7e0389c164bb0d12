"""Turn a user's ``keep`` into an exact token count ``k``.

This is the single place the rounding rule lives:

* ``keep`` an ``int`` (or any integral number, but not ``bool``) is a *count*: ``k = keep``,
  and ``1 <= keep <= n`` is required.
* ``keep`` a ``float`` is a *ratio* in ``(0, 1]``: ``k = floor(keep * n + 0.5)`` (nearest integer,
  halves rounded up), then clamped to ``[1, n]``. ``keep=1.0`` always gives ``k = n``.

A float like ``64.0`` is a ratio, not a count: pass ``64`` for a count.

Text (a command-line ``--keep``, a config value) follows the same rule through :func:`parse_keep`: ``"1"`` and
``"64"`` are counts (one token, 64 tokens), ``"1.0"`` and ``"0.25"`` are ratios (every token, a quarter).
"""

from __future__ import annotations

import math
import numbers
import re
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
            hint = f"; pass an int (e.g. {name}={int(r)}) for a count" if math.isfinite(r) else ""
            raise ValueError(f"{name} as a ratio must be in (0, 1], got {r}{hint}")
        return min(n, max(1, math.floor(r * n + 0.5)))
    raise TypeError(f"{name} must be an int count or a float ratio in (0, 1], got {type(keep).__name__}")


def check_keep(keep: object, name: str = "keep") -> Keep:
    """``keep`` checked for the range that needs no ``N`` (an int count ``>= 1`` or a ratio in ``(0, 1]``) and
    returned as ``int`` / ``float``; ``TypeError`` if it is not a number, ``ValueError`` (naming ``name``) if out of
    range. :func:`resolve_k` checks a count against ``N`` later."""
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise TypeError(f"{name} must be a float ratio in (0, 1] or an int count >= 1, got {keep!r}")
    if isinstance(keep, numbers.Integral):
        if keep < 1:
            raise ValueError(f"{name}: {keep} is out of range (an int count must be >= 1; fewer would leave zero "
                             "image tokens)")
        return int(keep)
    value = float(keep)
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(f"{name}: {value} is out of range (a ratio must be in (0, 1]; 0 would leave zero image "
                         "tokens)")
    return value


_COUNT = re.compile(r"[+-]?[0-9]+")


def keep_from_text(text: str) -> Keep:
    """The number ``text`` spells, by :func:`resolve_k`'s rule: digits only (``"1"``, ``"64"``, signed too) are an
    int count, anything else a float ratio (``"1.0"``, ``"0.25"``, ``"1e-1"``); ``ValueError`` if it is neither.
    No range check."""
    text = str(text).strip()
    return int(text) if _COUNT.fullmatch(text) else float(text)


def parse_keep(text: str, *, name: str = "keep") -> Keep:
    """``keep`` from text (:func:`keep_from_text`), checked for the range that needs no ``N`` (a count ``>= 1``, a
    ratio in ``(0, 1]``); :func:`resolve_k` checks a count against ``N`` later."""
    try:
        keep = keep_from_text(text)
    except ValueError:
        raise ValueError(f"{name} must be an int count (e.g. 64) or a ratio in (0, 1] (e.g. 0.25), "
                         f"got {str(text).strip()!r}") from None
    resolve_k(keep, max(1, keep) if isinstance(keep, int) else 1, name=name)
    return keep


def resolve_ks(keep: Keep | Sequence[Keep], lengths: Sequence[int], *, name: str = "keep") -> list[int]:
    """Per-sample ``k`` for samples of different lengths (one ``keep`` for all, or one per sample)."""
    if isinstance(keep, (numbers.Real, bool)):
        return [resolve_k(keep, n, name=name) for n in lengths]
    keep = list(keep)
    if len(keep) != len(lengths):
        raise ValueError(f"{name} has {len(keep)} entries but there are {len(lengths)} samples")
    return [resolve_k(kp, n, name=f"{name}[{i}]") for i, (kp, n) in enumerate(zip(keep, lengths, strict=True))]
