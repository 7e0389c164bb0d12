"""Training-free token pruning and merging strategies, registered by name."""

from vtok.pruners import (  # noqa: F401  (registration)
    attention,
    baselines,
    cls_methods,
    clustering,
    coverage,
    dart,
    diversity,
    dpp,
    evs,
    fitprune,
    graph,
    holitom,
    mustdrop,
    sparsevlm,
    temporal,
    tome,
    transition,
    vidcom2,
)
from vtok.pruners.registry import FAMILIES, Method, Placement, get, methods, register

__all__ = ["FAMILIES", "Method", "Placement", "get", "methods", "register"]
