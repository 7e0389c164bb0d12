"""Pre-LLM pruning on the small VLM: the same kept tokens, renumbered or at their original positions.

A pre-LLM method hands the kept visual tokens to the LLM renumbered 0 … k−1 (``positions="reindex"``, the default of
those methods); ``positions="original"`` lets each keep its unpruned position id. This asks the bench VLM the first
``--n`` held-out scenes under both, for each method at ``--keep``, with the tower memoised between them
(``vtok.bench.layer_cache``), and prints exact match overall and per question type (``train_vlm.evaluate``).

    python -m benchmarks.vlm_positions --vlm clip --n 200 --methods random cdpruner --keep 0.25
"""

from __future__ import annotations

import argparse
import importlib

import vtok
from benchmarks.vlm_accuracy import VLMS
from scripts.train.train_vlm import evaluate
from vtok.bench.layer_cache import cached_layers
from vtok.hooks.hf.adapter import find_adapter


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
    spec = VLMS[args.vlm]
    bench = importlib.import_module(spec["bench"])
    model, processor = bench.open_vlm(args.model or spec["task"])
    scenes = importlib.import_module(spec["scenes"]).heldout(args.n)

    def score() -> dict:  # exact match overall and per question type, as the training runs measure it
        res = evaluate(model, processor, scenes, batch=args.batch, ask=bench.answer)
        return {"accuracy": res["accuracy"], "per_type": res["per_type"]}

    rows = []
    with cached_layers(find_adapter(model).tower_layers(model), {}):
        rows.append({"method": "(unpruned)", "positions": "-", **score()})
        for method in args.methods:
            for positions in ("reindex", "original"):
                with vtok.wrapped(model, method, args.keep, positions=positions):
                    rows.append({"method": method, "positions": positions, **score()})
    types = list(rows[0]["per_type"])
    print(f"exact match (%) on the first {args.n} held-out scenes, keep {args.keep} ahead of the LLM")
    print("| method | positions | all | " + " | ".join(types) + " |")
    print("|---|---|---:|" + "---:|" * len(types))
    for r in rows:
        print(f"| {r['method']} | {r['positions']} | {100 * r['accuracy']:.1f} | "
              + " | ".join(f"{100 * r['per_type'].get(t, float('nan')):.1f}" for t in types) + " |")
    return rows


if __name__ == "__main__":
    main()
