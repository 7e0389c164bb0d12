"""The dispatch point strategies call. Today every op is the pure-torch reference (the CPU path);
the fused-kernel work registers Triton implementations for CUDA behind these same names."""

from vtok.kernels.reference import (
    attention_received,
    attention_rows,
    cosine_argmax,
    farthest_point,
    kmeans_assign,
    nearest_neighbor_distance,
    pagerank,
    pairwise_distance,
    segment_stats,
    stable_topk,
    topk_gather,
)

__all__ = [
    "attention_received", "attention_rows", "cosine_argmax", "farthest_point", "kmeans_assign",
    "nearest_neighbor_distance", "pagerank", "pairwise_distance", "segment_stats", "stable_topk", "topk_gather",
]
