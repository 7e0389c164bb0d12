"""Load a ``benchmarks/*.py`` script as a module, so tests can call its functions and ``main(argv)``."""

import importlib
import sys
from types import ModuleType


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks.<name>`` freshly imported (the package ``python -m benchmarks.<name>`` runs)."""
    sys.modules.pop(f"benchmarks.{name}", None)
    return importlib.import_module(f"benchmarks.{name}")
