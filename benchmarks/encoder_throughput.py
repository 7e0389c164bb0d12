"""Encoder throughput with in-encoder token reduction: unpatched ViT vs ``vtok.patch`` side by side, in one run.

timm ``vit_base_patch16_224`` (random weights, ``pretrained=False``), eval, ``torch.no_grad``, on the CPU. The
variants are timed interleaved (one forward of each per round, after warm-up rounds); reported per variant: the
median images/s, and the ratio to the unpatched model as the median over rounds of the paired time ratio:

* ``tome r=16``: ToMe, 16 tokens merged in every block (ToMe reports ~1.65x at r=13 on a GPU for ViT-B/16);
* ``divprune keep=0.5 @ block 6``: a pruning strategy, half the patch tokens dropped at block 6.

    python -m benchmarks.encoder_throughput                 # batch 8, 5 rounds
    python -m benchmarks.encoder_throughput --quick         # tiny ViT, smoke run
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import statistics
import sys
import time

import torch

import vtok


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def build(quick: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if quick:
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=4).eval()
    import timm

    return timm.create_model("vit_base_patch16_224", pretrained=False).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds (one forward per variant each)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--r", type=int, default=16, help="ToMe tokens merged per block")
    ap.add_argument("--prune", default="divprune", help="pruning strategy for the extra line")
    ap.add_argument("--prune-keep", type=float, default=0.5)
    ap.add_argument("--prune-layer", type=int, default=6)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--quick", action="store_true", help="tiny ViT (smoke run)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.prune_layer = min(args.prune_layer, 2)
        args.r = min(args.r, 8)

    base = build(args.quick)
    tome = vtok.patch(copy.deepcopy(base), "tome", r=args.r)
    prune = vtok.patch(copy.deepcopy(base), args.prune, keep=args.prune_keep, layers=args.prune_layer)
    variants = {"unpatched": base, f"tome r={args.r}": tome,
                f"{args.prune} keep={args.prune_keep} @ block {args.prune_layer}": prune}
    size = base.patch_embed.img_size
    x = torch.randn(args.batch, 3, *size, generator=torch.Generator().manual_seed(0))

    load0 = _load()
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        for rnd in range(args.warmup + args.rounds):
            for name, model in variants.items():
                t0 = time.perf_counter()
                model(x)
                dt = time.perf_counter() - t0
                if rnd >= args.warmup:
                    times[name].append(dt)

    load1 = _load()
    print(f"command: `{shlex.join(['python', '-m', 'benchmarks.encoder_throughput', *sys.argv[1:]])}`")
    print(f"model: {'tiny ViT (quick)' if args.quick else 'timm vit_base_patch16_224 (random weights)'}, "
          f"batch {args.batch}, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.rounds} rounds (median), 1-min load average before / after: {load0:.2f} / {load1:.2f} "
          f"({_cpus()} CPUs)")
    print()
    print("| variant | tokens out | images/s | speed-up vs unpatched |")
    print("|---|---|---|---|")
    for name, model in variants.items():
        ips = args.batch / statistics.median(times[name])
        # paired per round (each round times every variant back to back), so slow drifts of a shared CPU cancel
        ratio = statistics.median(tb / tv for tb, tv in zip(times["unpatched"], times[name], strict=True))
        st = getattr(model, "_vtok_state", None)
        tokens = (st.selection.k + st.n_prefix) if st is not None else base.patch_embed.num_patches + 1
        print(f"| {name} | {tokens} | {ips:.2f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
