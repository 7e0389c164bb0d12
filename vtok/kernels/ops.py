"""The dispatch point strategies call: ``from vtok.kernels import ops``.

The fused reductions are ``torch.library.custom_op`` s in the ``vtok`` namespace. Each one's default
implementation is the pure-torch reference (the CPU path and the oracle); on CUDA the Triton kernel is
registered instead (set ``VTOK_KERNELS=reference`` to force the reference there too). Fake (meta)
implementations let ``torch.compile(fullgraph=True)`` trace through strategies that call them. Ops with no
fused kernel (``attention_rows``, ``pairwise_distance``, ...) are plain reference functions re-exported here.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from vtok.kernels import reference as ref
from vtok.kernels._triton import HAS_TRITON
from vtok.kernels.reference import (  # noqa: F401  (re-exported: no fused kernel for these)
    attention_rows,
    cluster_medoids,
    density_peaks,
    nearest_neighbor_distance,
    pagerank,
    pairwise_distance,
    pairwise_distance_native,
)

FUSED_OPS = ("attention_received", "cosine_argmax", "farthest_point", "stable_topk", "topk_gather",
             "segment_stats", "kmeans_assign")


def use_triton(*tensors: Tensor) -> bool:
    """Whether the Triton path runs for these tensors (CUDA, triton importable, not forced off, no fp64: the kernels
    accumulate in fp32, so fp64 input runs the reference, which keeps fp64)."""
    return (HAS_TRITON and os.environ.get("VTOK_KERNELS", "auto") != "reference"
            and all(t.is_cuda and t.dtype != torch.float64 for t in tensors))


def _triton(module: str):
    """Import a Triton kernel module lazily (so CPU-only use never compiles anything)."""
    import importlib

    return importlib.import_module(f"vtok.kernels.{module}")


# --- attention received -------------------------------------------------------------------------------

@torch.library.custom_op("vtok::attention_received", mutates_args=())
def _attention_received(q: Tensor, k: Tensor, scale: float, key_mask: Tensor | None, q_pos: Tensor | None,
                        k_pos: Tensor | None, head_mean: bool) -> Tensor:
    if use_triton(q, k):
        return _triton("triton_attention").attention_received_triton(q, k, scale, key_mask, q_pos, k_pos, head_mean)
    return ref.attention_received(q, k, scale=scale, key_mask=key_mask, q_pos=q_pos, k_pos=k_pos,
                                  head_mean=head_mean)


@_attention_received.register_fake
def _(q, k, scale, key_mask, q_pos, k_pos, head_mean):
    b, h, n = q.shape[0], q.shape[1], k.shape[2]
    return q.new_empty((b, n) if head_mean else (b, h, n), dtype=ref.acc_dtype(q))


def attention_received(q: Tensor, k: Tensor, *, scale: float | None = None, key_mask: Tensor | None = None,
                       q_pos: Tensor | None = None, k_pos: Tensor | None = None, head_mean: bool = True,
                       chunk: int | None = None) -> Tensor:
    """Attention each key receives from the query rows (see ``reference.attention_received``); fused on CUDA."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if chunk is not None and not use_triton(q, k):
        return ref.attention_received(q, k, scale=scale, key_mask=key_mask, q_pos=q_pos, k_pos=k_pos,
                                      head_mean=head_mean, chunk=chunk)
    return _attention_received(q, k, scale, key_mask, q_pos, k_pos, head_mean)


# --- cosine best match (ToMe) -------------------------------------------------------------------------------

@torch.library.custom_op("vtok::cosine_argmax", mutates_args=())
def _cosine_argmax(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    if use_triton(a, b):
        return _triton("triton_match").cosine_argmax_triton(a, b)
    return ref.cosine_argmax(a, b)


@_cosine_argmax.register_fake
def _(a, b):
    return a.new_empty(a.shape[:2], dtype=ref.acc_dtype(a)), a.new_empty(a.shape[:2], dtype=torch.long)


def cosine_argmax(a: Tensor, b: Tensor, *, chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """Each row of ``a``'s most cosine-similar row of ``b`` (see ``reference.cosine_argmax``); fused on CUDA."""
    return _cosine_argmax(a, b)


# --- greedy k-center ------------------------------------------------------------------------------------

@torch.library.custom_op("vtok::farthest_point", mutates_args=())
def _farthest_point(x: Tensor, k: int, start: Tensor | None, metric: str) -> Tensor:
    if use_triton(x):
        return _triton("triton_select").farthest_point_triton(x, k, start, metric)
    return ref.farthest_point(x, k, start=start, metric=metric)


@_farthest_point.register_fake
def _(x, k, start, metric):
    return x.new_empty((x.shape[0], k), dtype=torch.long)


def farthest_point(x: Tensor, k: int, *, start: Tensor | None = None, metric: str = "cosine") -> Tensor:
    """Greedy k-center in pick order ``[B, k]`` (see ``reference.farthest_point``, which with the Triton path
    validates ``metric``); one launch on CUDA (fp64 input runs the reference, which keeps fp64)."""
    return _farthest_point(x, int(k), start, metric)


# --- top-k + gather -------------------------------------------------------------------------------------

@torch.library.custom_op("vtok::stable_topk", mutates_args=())
def _stable_topk(scores: Tensor, k: int) -> Tensor:
    if use_triton(scores) and scores.shape[1] <= 16384:
        return _triton("triton_select").stable_topk_triton(scores, k)
    return ref.stable_topk(scores, k)


@_stable_topk.register_fake
def _(scores, k):
    return scores.new_empty((scores.shape[0], k), dtype=torch.long)


def stable_topk(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest scores, ties → lower index, ascending (see ``reference.stable_topk``)."""
    return _stable_topk(scores, int(k))


@torch.library.custom_op("vtok::topk_gather", mutates_args=())
def _topk_gather(x: Tensor, scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    if use_triton(x, scores) and scores.shape[1] <= 16384:
        return _triton("triton_select").topk_gather_triton(x, scores, k)
    return ref.topk_gather(x, scores, k)


@_topk_gather.register_fake
def _(x, scores, k):
    return x.new_empty((x.shape[0], k), dtype=torch.long), x.new_empty((x.shape[0], k, x.shape[2]))


def topk_gather(x: Tensor, scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-``k`` indices (ascending) and the gathered rows (see ``reference.topk_gather``)."""
    return _topk_gather(x, scores, int(k))


# --- per-frame statistics -------------------------------------------------------------------------------

@torch.library.custom_op("vtok::segment_stats", mutates_args=())
def _segment_stats(x: Tensor, frames: int) -> tuple[Tensor, Tensor]:
    if use_triton(x):
        return _triton("triton_frames").segment_stats_triton(x, frames)
    return ref.segment_stats(x, frames)


@_segment_stats.register_fake
def _(x, frames):
    b, n, d = x.shape
    return (x.new_empty((b, frames, d), dtype=ref.acc_dtype(x)),
            x.new_empty((b, frames, n // frames), dtype=ref.acc_dtype(x)))


def segment_stats(x: Tensor, frames: int) -> tuple[Tensor, Tensor]:
    """Per-frame mean and similarity to the previous frame (see ``reference.segment_stats``)."""
    return _segment_stats(x, int(frames))


# --- k-means assignment ---------------------------------------------------------------------------------

@torch.library.custom_op("vtok::kmeans_assign", mutates_args=())
def _kmeans_assign(x: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    if use_triton(x, centroids):
        return _triton("triton_match").kmeans_assign_triton(x, centroids)
    return ref.kmeans_assign(x, centroids)


@_kmeans_assign.register_fake
def _(x, centroids):
    return x.new_empty(x.shape[:2], dtype=torch.long), x.new_empty(x.shape[:2], dtype=ref.acc_dtype(x))


def kmeans_assign(x: Tensor, centroids: Tensor, *, chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """Nearest centroid and squared distance per token (see ``reference.kmeans_assign``)."""
    return _kmeans_assign(x, centroids)


__all__ = [
    "FUSED_OPS", "attention_received", "attention_rows", "cluster_medoids", "cosine_argmax", "density_peaks",
    "farthest_point", "kmeans_assign", "nearest_neighbor_distance", "pagerank", "pairwise_distance",
    "pairwise_distance_native", "segment_stats", "stable_topk", "topk_gather", "use_triton",
]
