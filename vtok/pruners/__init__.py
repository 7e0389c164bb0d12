"""Training-free token pruning and merging strategies, registered by name."""

from vtok.pruners import attention, baselines, clustering, diversity, tome, transition  # noqa: F401  (registration)
from vtok.pruners.registry import FAMILIES, Method, Placement, get, methods, register

__all__ = ["FAMILIES", "Method", "Placement", "get", "methods", "register"]
