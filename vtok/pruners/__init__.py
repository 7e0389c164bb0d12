"""Training-free token pruning and merging strategies, registered by name."""

# isort: off
# Imported for registration, in registration order (the registry's insertion order).
from vtok.pruners import (  # noqa: F401
    cls_attn,
    fopru,
    hiprune,
    visionzip,
    zero_tprune,
    fastv,
    pdrop,
    random,
    uniform,
    pool2d,
    downsample,
    fastervlm,
    vispruner,
    prumerge,
    kmeans,
    kmedoids,
    dpc_knn,
    scope,
    dart,
    divprune,
    todre,
    cdpruner,
    frame_merge,
    segment_cluster,
    per_frame,
    query_budget,
    temporal_pool,
    evs,
    fitprune,
    gprune,
    holitom,
    mustdrop,
    sparsevlm,
    tome,
    transprune,
    vidcom2,
)
# isort: on
from vtok.pruners.registry import FAMILIES, Method, Placement, get, methods, register

__all__ = ["FAMILIES", "Method", "Placement", "get", "methods", "register"]
