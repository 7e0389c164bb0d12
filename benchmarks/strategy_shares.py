"""Where the time of the slow strategies goes: each next to its dominant component, measured side by side in one run.

For N in ``--n`` (D = 1024, keep 0.25, batch 1): a timm ViT-B block on ``[1, N, 768]``, one ``N × N × D`` cosine GEMM,
``kmeans`` with its default 20 iterations and with ``iters=1`` (≈ the k-means++ initialisation), ``kmedoids`` likewise,
``dpc_knn``, ``scope``, ``vispruner`` and with ``important_ratio=1`` (no duplicate-removal rounds), ``cdpruner``. Median
of 5 calls after a warm-up, milliseconds (compare within a row only: the docs quote the shares).

    OMP_NUM_THREADS=2 python -m benchmarks.strategy_shares            # N in {576, 2880}, 2 threads
    python -m benchmarks.strategy_shares --n 64 --reps 1               # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import vtok
from vtok.bench.synthetic import example_context


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def shares(n: int, reps: int = 5, dim: int = 1024) -> dict[str, float]:
    from timm.models.vision_transformer import Block

    x = torch.randn(1, n, dim, generator=torch.Generator().manual_seed(0))
    cls_attn = example_context("scope", x, seed=1)["cls_attn"]
    query = example_context("cdpruner", x, seed=1).get("query")
    block = Block(768, 12, mlp_ratio=4.0).eval()
    xb = torch.randn(1, n, 768)
    xn = torch.nn.functional.normalize(x[0], dim=-1)
    with torch.no_grad():
        calls = {
            "vit_b_block": lambda: block(xb),
            "cosine_gemm_NxNxD": lambda: xn @ xn.T,
            "kmeans": lambda: vtok.compress(x, "kmeans", keep=0.25),
            "kmeans_iters1": lambda: vtok.compress(x, "kmeans", keep=0.25, iters=1),
            "kmedoids": lambda: vtok.compress(x, "kmedoids", keep=0.25),
            "kmedoids_iters1": lambda: vtok.compress(x, "kmedoids", keep=0.25, iters=1),
            "dpc_knn": lambda: vtok.compress(x, "dpc_knn", keep=0.25),
            "scope": lambda: vtok.compress(x, "scope", keep=0.25, cls_attn=cls_attn),
            "vispruner": lambda: vtok.compress(x, "vispruner", keep=0.25, cls_attn=cls_attn),
            "vispruner_important_only": lambda: vtok.compress(x, "vispruner", keep=0.25, cls_attn=cls_attn,
                                                              important_ratio=1.0),
            "cdpruner": lambda: vtok.compress(x, "cdpruner", keep=0.25, query=query),
        }
        return {name: round(median_ms(fn, reps), 2) for name, fn in calls.items()}


def main(argv: list[str] | None = None) -> dict[int, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[576, 2880])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = {}
    for n in args.n:
        out[n] = shares(n, args.reps)
        print(json.dumps({"n": n, "ms": out[n]}), flush=True)
    return out


if __name__ == "__main__":
    main()
