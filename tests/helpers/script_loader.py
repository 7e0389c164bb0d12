"""Load a script run as ``python -m PACKAGE.NAME`` as a module, so tests can call its functions and ``main(argv)``."""

import importlib
import sys
from types import ModuleType


def _fresh(module: str) -> ModuleType:
    sys.modules.pop(module, None)
    return importlib.import_module(module)


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks.<name>`` freshly imported (the module ``python -m benchmarks.<name>`` runs)."""
    return _fresh(f"benchmarks.{name}")


def load_train_script(name: str) -> ModuleType:
    """``scripts.train.<name>`` freshly imported (the module ``python -m scripts.train.<name>`` runs)."""
    return _fresh(f"scripts.train.{name}")
