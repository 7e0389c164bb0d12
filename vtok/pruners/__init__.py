"""Training-free token pruning and merging strategies, registered by name.

Layout, one rule: **one module per method, named after its registered name** — the function of method ``name`` lives in
``vtok/pruners/<name>.py`` (``visionzip.py``, ``scope.py``, ``cdpruner.py``, ...). The only exception: a method
registered as ``<base>_<suffix>`` that is a variant or another stage of method ``<base>`` (the same paper) lives in
``<base>.py`` (``holitom_llm`` in ``holitom.py``, ``mustdrop_llm`` in ``mustdrop.py``, ``prumerge_plus`` in
``prumerge.py``).

- A method built on another method's function imports it from that method's module (``pdrop`` and ``holitom_llm``
  rank as ``fastv``, ``downsample`` pools as ``pool2d``, ``holitom`` and ``sparsevlm`` cluster with ``dpc_knn``).
- Code shared by several methods that is not itself a method lives in a private helper module, named after what it
  holds: ``_checks`` (option checks), ``_attention`` (head-averaged scores, ranking, the VLM feature layer),
  ``_clustering`` (cluster assignment and merge maps), ``_grid`` (patch-grid pooling), ``_video`` (frame layout,
  budget splits, image strategies run per frame). A helper used by one method stays in that method's module.
- ``registry`` holds ``register`` / ``get`` / ``methods``. ``Method.source`` (and the ``vtok methods`` table) names
  each method's file.

A new method's module must be added to the imports below, at the end: they run in registration order, which keeps
the registry's insertion order stable as modules move (``vtok.methods()`` itself is sorted by family, then name).
"""

# isort: off
from vtok.pruners import (  # noqa: F401  (registration)
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
    prefix,
    adaptive_length,
)
# isort: on
from vtok.pruners.registry import FAMILIES, Method, Placement, get, methods, register

__all__ = ["FAMILIES", "Method", "Placement", "get", "methods", "register"]
