"""Helpers shared by the tests (tiny models, Hypothesis settings, references, sweep pieces), not tests themselves.

Import them by their package path, ``from tests.helpers.hf_tiny import tiny_llava``: pytest puts the repository root
on ``sys.path`` (``pythonpath`` in ``pyproject.toml``), never ``tests/`` or one of its folders.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository root
