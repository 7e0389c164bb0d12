"""Pre-LLM pruning on the small VLM: the same kept tokens, renumbered or at their original positions.

A pre-LLM method hands the kept visual tokens to the LLM renumbered 0 … k−1 (``positions="reindex"``, the default of
those methods); ``positions="original"`` lets each keep its unpruned position id. This asks the bench VLM the first
``--n`` held-out scenes under both, for each method at ``--keep``, with the tower memoised between them
(``vtok.bench.layer_cache``), and prints exact match overall and per question type.

    python -m benchmarks.vlm_positions --vlm clip --n 200 --methods random cdpruner --keep 0.25
"""

from __future__ import annotations

import argparse
import importlib
import statistics

import vtok
from vtok.bench.layer_cache import cached_layers
from vtok.hooks.hf.adapter import find_adapter

VLMS = {"fmnist": ("vtok.bench.vlm", "vtok.bench.vlm_task", "real_vlm"),
        "clip": ("vtok.bench.vlm_clip", "vtok.bench.clip_scenes", "real_vlm_clip")}


def score(bench, model, processor, scenes, batch: int) -> dict[str, float]:
    """Exact match of ``model`` on ``scenes``: ``accuracy`` and ``accuracy_<type>`` per question type."""
    from vtok.bench import vlm_task

    hits: dict[str, list[int]] = {}
    for s in range(0, len(scenes), batch):
        chunk = scenes[s:s + batch]
        out = bench.answer(model, processor, [c.image for c in chunk], [c.question for c in chunk])
        for c, a in zip(chunk, out, strict=True):
            hits.setdefault(c.qtype, []).append(int(vlm_task.exact_match(a, c.answer)))
    every = [h for v in hits.values() for h in v]
    per = {f"accuracy_{k}": statistics.fmean(v) for k, v in sorted(hits.items())}
    return {"accuracy": statistics.fmean(every), **per}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vlm", choices=sorted(VLMS), default="clip")
    ap.add_argument("--model", default=None, help="default: the --vlm's committed weights; or an assembled folder")
    ap.add_argument("--n", type=int, default=200, help="held-out scenes")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--methods", nargs="+", default=["random", "cdpruner"])
    ap.add_argument("--keep", type=float, default=0.25)
    args = ap.parse_args(argv)
    if args.n < 1 or args.batch < 1:
        ap.error(f"--n and --batch must be >= 1, got {args.n} and {args.batch}")
    bench_name, scenes_name, default_model = VLMS[args.vlm]
    bench = importlib.import_module(bench_name)
    model, processor = bench.open_vlm(args.model or default_model)
    scenes = importlib.import_module(scenes_name).heldout(args.n)
    rows = []
    with cached_layers(find_adapter(model).tower_layers(model), {}):
        rows.append({"method": "(unpruned)", "positions": "-", **score(bench, model, processor, scenes, args.batch)})
        for method in args.methods:
            for positions in ("reindex", "original"):
                with vtok.wrapped(model, method, args.keep, positions=positions):
                    rows.append({"method": method, "positions": positions,
                                 **score(bench, model, processor, scenes, args.batch)})
    types = [k for k in rows[0] if k.startswith("accuracy_")]
    print(f"exact match (%) on the first {args.n} held-out scenes, keep {args.keep} ahead of the LLM")
    print("| method | positions | all | " + " | ".join(t.removeprefix("accuracy_") for t in types) + " |")
    print("|---|---|---:|" + "---:|" * len(types))
    for r in rows:
        print(f"| {r['method']} | {r['positions']} | {100 * r['accuracy']:.1f} | "
              + " | ".join(f"{100 * r.get(t, float('nan')):.1f}" for t in types) + " |")
    return rows


if __name__ == "__main__":
    main()
