"""Hypothesis settings for vtok's property tests.

``conftest.py`` loads the profile: ``ci`` (derandomized: the same examples on every run, no example database) when
``CI=true`` or ``HYPOTHESIS_PROFILE=ci``, else ``dev`` (fresh random examples on every run, so local runs keep finding
new cases). ``@examples(n)`` sets a test's example count; ``VTOK_MAX_EXAMPLES=2000`` raises every count to at least
2,000 for a long local run, e.g. ``VTOK_MAX_EXAMPLES=2000 .venv/bin/python -m pytest tests/video/test_holitom.py``.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev", print_blob=True)


def profile_name() -> str:
    """``HYPOTHESIS_PROFILE`` if set, else ``ci`` under ``CI=true`` (or 1 / yes), else ``dev``."""
    chosen = os.environ.get("HYPOTHESIS_PROFILE")
    if chosen:
        return chosen
    return "ci" if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes") else "dev"


def examples(n: int) -> settings:
    """``settings(max_examples=n, deadline=None)``, with ``n`` raised to ``VTOK_MAX_EXAMPLES`` when that is larger."""
    floor = os.environ.get("VTOK_MAX_EXAMPLES", "").strip()
    if floor and not floor.isdigit():
        raise ValueError(f"VTOK_MAX_EXAMPLES must be a whole number, got {floor!r}")
    return settings(max_examples=max(n, int(floor or 0)), deadline=None)
