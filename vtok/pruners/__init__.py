"""Training-free token pruning and merging strategies, registered by name."""

from vtok.pruners import baselines  # noqa: F401  (registers the strategies)
from vtok.pruners.registry import FAMILIES, Method, get, methods, register

__all__ = ["FAMILIES", "Method", "get", "methods", "register"]
