"""Option checks shared by the strategies: each raises ``ValueError`` with the message the strategies have always given
(tests match them), and returns the checked value where it converts it.

Checks used by a single strategy stay in that strategy's module.
"""

from __future__ import annotations

import numbers


def check_k(k: int, n: int) -> None:
    """``k`` must be a plain ``int`` in ``[1, n]`` (``bool`` refused)."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or k > n:
        raise ValueError(f"k must be an int in [1, N={n}], got {k!r}")


def check_int(name: str, value: object, low: int) -> int:
    """Option ``name`` must be an integer (any ``numbers.Integral`` but ``bool``) ``>= low``; returns it as ``int``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def check_real(name: str, value: object, low: float | None = None, high: float | None = None) -> float:
    """Option ``name`` must be a real number (not ``bool``, not NaN) in ``[low, high]`` (``None``: unbounded); returns
    it as ``float``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:
        raise ValueError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if (low is not None and v < low) or (high is not None and v > high):
        raise ValueError(f"{name} must lie in [{low}, {high}], got {v}")
    return v


def check_fraction(name: str, value: object) -> float:
    """Option ``name`` must be an ``int`` or ``float`` (not ``bool``) in ``[0, 1]``; returns it as ``float``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    """Option ``name`` must be one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
