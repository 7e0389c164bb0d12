"""What each strategy costs in accuracy: top-1 of the eval ViT on the 10k Fashion-MNIST test images, pruned.

For every registered strategy an image encoder can feed (all but FastV, which needs an LLM's text attention) at
each keep ratio, in two placements:

* ``inside``: ``vtok.patch(vit, method, keep=keep, layers=depth // 2)`` — every strategy runs at the middle block
  (the same block for all, so rows compare), with the method's own placement otherwise (after the block's
  attention, or on its output for VisionZip; no proportional attention after VisionZip) and the context that block
  supplies (CLS row recomputed from q/k — HiPrune: attention averaged over heads and all query rows, anchors from
  block ``floor(9/24 · depth)`` — keys, its input for TransPrune, the grid); every later block runs on the kept
  tokens. Throughput ratio = images/s of the patched model over the
  unpatched one on the same batch, timed interleaved in this run.
* ``after``: the unpatched encoder runs in full; the strategy chooses among its output patch tokens, with context
  captured from the last block (``mid_attn``: the middle block, or the method's ``mid_layer`` block; ``cls_attn``
  of HiPrune: the head- and query-averaged attention; ``prev_hidden``: the block before the last), and the
  classifier sees only the kept tokens — it mean-pools them (the model's own ``global_pool="avg"`` head), as an LLM
  sees only a VLM's kept visual tokens. Merged tokens count once each, like any other token a consumer receives.
  Throughput ratio = encoder alone over encoder plus strategy: the strategy's overhead, as the saving happens
  downstream.

Rows also hold the unpruned model (``none``). Throughput is measured first (on a quiet machine, before the long
part), then accuracy accumulates per test batch in ``--out/state.json`` (written atomically), so an interrupted run
resumes where it stopped and the table always says on how many test images it was measured; ``--plot`` draws
accuracy against kept tokens.

    python -m benchmarks.encoder_accuracy --jobs 2           # the table in docs/benchmarks.md (2-core CPU: ~3 h)
    python -m benchmarks.encoder_accuracy --test-limit 64 --methods random cls_attn --keeps 0.5   # smoke run

Before measuring, the ``inside`` numbers' shortcut (the blocks before the middle run once per batch, shared by all
rows) is checked against the patched model's own forward on a few images, for every method.

Re-measuring some methods (after their defaults changed) without redoing the rest: measure them into another
``--out`` with ``--methods`` (same keeps, batch and checkpoint), then ``--merge-from`` that finished state into the
main one, which replaces those methods' rows::

    python -m benchmarks.encoder_accuracy --methods tome visionzip --out outputs/remeasure --jobs 2
    python -m benchmarks.encoder_accuracy --out docs/encoder_accuracy --merge-from outputs/remeasure \
        --plot docs/encoder_accuracy.png
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

import vtok
from vtok.bench.digest import file_sha256
from vtok.bench.eval_vit import CHECKPOINT, load_eval_vit
from vtok.bench.fashion_mnist import load_fashion_mnist, preprocess
from vtok.budget import resolve_k
from vtok.sweep.vit import (  # noqa: F401 - re-exported: the tests and older scripts use these names here
    Prefixes,
    after_logits,
    captured_forward,
    embed,
    first_active,
    forward_to,
    grid_of,
    head,
    image_methods,
    mid_block,
    tail_inside,
)

KEEPS = (0.75, 0.5, 0.25, 0.1)
BASELINES = ("random", "uniform")


# The forwards (shared prefix, ``inside`` tail, ``after`` head on the kept tokens) live in ``vtok.sweep.vit``: the
# sweep's ``eval_vit`` task runs the same code, so ``vtok sweep`` reproduces this table cell by cell
# (``configs/sweeps/encoder_accuracy.yaml``).


# ------------------------------------------------------------------------------------------------ state


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


def _key(method: str, placement: str, keep: float) -> str:
    return f"{method}|{placement}|{keep}"


def find_infeasible(model, methods, keeps, x: Tensor, state: dict) -> None:
    """Budgets a strategy cannot make (e.g. pool2d's grid tiling) become n/a rows in ``state["errors"]``."""
    errors = state["errors"]
    with torch.inference_mode():
        for method in methods:
            for kp in keeps:
                if _key(method, "inside", kp) in errors or _key(method, "inside", kp) in state["speed"]:
                    continue  # known already
                vtok.patch(model, method, keep=kp, layers=len(model.blocks) // 2)
                try:
                    model(x[:1])
                except ValueError as e:
                    for placement in ("after", "inside"):
                        errors[_key(method, placement, kp)] = str(e)
                    print(f"  {method} keep={kp}: {e}", flush=True)
                finally:
                    vtok.unpatch(model)


def check_shortcut(model, methods: list[str], x: Tensor, mid: int, grid: tuple[int, int]) -> None:
    """``tail_inside`` from the shared middle tokens equals the patched model's full forward, for every method."""
    with torch.inference_mode():
        prefix = Prefixes(model, x)
        for method in methods:
            vtok.patch(model, method, keep=0.5, layers=mid)
            try:
                start = first_active(model)
                full, short = model(x), tail_inside(model, prefix(start), start, grid)
            finally:
                vtok.unpatch(model)
            if not torch.allclose(full, short, atol=1e-4, rtol=1e-4):
                raise RuntimeError(f"shortcut forward differs from the patched model for {method}: "
                                   f"max |diff| {(full - short).abs().max().item():.3g}")


def batch_counts(model, methods, keeps, x: Tensor, y: Tensor, errors: dict, seed: int) -> dict[str, int]:
    """Correct predictions on one test batch ``x [B, C, H, W]``, ``y [B]`` for every row. The registered strategies
    draw only from their own seeded generators; torch's global RNG is also seeded per batch (``seed``: the batch's
    first image index), so even a strategy that used it would count the same whatever the resume point or ``--jobs``."""
    torch.manual_seed(seed)
    mid = len(model.blocks) // 2
    grid = grid_of(model)
    counts: dict[str, int] = {}
    with torch.inference_mode():
        logits, cap = captured_forward(model, x)
        counts["none"] = int((logits.argmax(-1) == y).sum())
        prefix = Prefixes(model, x)
        for method in methods:
            for keep in keeps:
                if _key(method, "after", keep) in errors:
                    continue
                logits = after_logits(model, method, keep, cap, grid)
                counts[_key(method, "after", keep)] = int((logits.argmax(-1) == y).sum())
                vtok.patch(model, method, keep=keep, layers=mid)
                try:
                    start = first_active(model)
                    logits = tail_inside(model, prefix(start), start, grid)
                finally:
                    vtok.unpatch(model)
                counts[_key(method, "inside", keep)] = int((logits.argmax(-1) == y).sum())
    return counts


_WORK: dict = {}  # what forked --jobs workers read (set before the pool forks; shared copy-on-write)


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _worker(s: int) -> tuple[int, dict[str, int]]:
    w = _WORK
    x, y = w["x"][s:s + w["batch"]], w["y"][s:s + w["batch"]]
    return s, batch_counts(w["model"], w["methods"], w["keeps"], x, y, w["errors"], seed=s)


def measure_accuracy(model, methods, keeps, x_all: Tensor, y_all: Tensor, batch: int, state: dict,
                     path: Path, deadline: float = float("inf"), jobs: int = 1) -> None:
    """Accumulate every row's correct count, batch by batch, into ``state`` (saved after each batch). With
    ``jobs > 1``, forked workers (``torch`` threads split between them) measure batches in parallel, and their results
    are committed in order, so the saved state is always a contiguous prefix of the test set and resumes as usual."""
    counts = state["correct"]
    n = len(x_all)
    starts = range(state["done"], n, batch)
    first, t_run = state["done"], time.time()

    def commit(s: int, c: dict[str, int]) -> None:
        for k, v in c.items():
            counts[k] = counts.get(k, 0) + v
        state["done"] = min(s + batch, n)
        _save(path, state)
        rate = (state["done"] - first) / max(time.time() - t_run, 1e-9)
        print(f"  {state['done']}/{n} test images ({rate:.2f} img/s over all rows, this run); accuracy unpruned "
              f"{counts['none'] / state['done']:.4f}", flush=True)

    jobs = min(jobs, len(starts))  # no idle workers, and no fork for a single batch
    pool = None
    if jobs > 1:
        import multiprocessing as mp

        _WORK.update(model=model, methods=methods, keeps=keeps, x=x_all, y=y_all, batch=batch, errors=state["errors"])
        pool = mp.get_context("fork").Pool(jobs, initializer=_worker_init,
                                           initargs=(max(1, torch.get_num_threads() // jobs),))
        results = pool.imap(_worker, starts)
    else:  # lazy: a batch is measured only when the loop asks for it
        results = ((s, batch_counts(model, methods, keeps, x_all[s:s + batch], y_all[s:s + batch], state["errors"],
                                    seed=s)) for s in starts)
    try:
        for _ in starts:
            if time.time() > deadline:
                print(f"  time budget spent: stopping at {state['done']}/{n} images (rerun to resume)", flush=True)
                return
            commit(*next(results))
    finally:
        if pool is not None:
            pool.terminate()  # every result consumed, or the deadline passed: nothing left worth waiting for
            _WORK.clear()


def _time(fn, x: Tensor) -> float:
    t = time.perf_counter()
    fn(x)
    return time.perf_counter() - t


def measure_speed(model, methods, keeps, x: Tensor, rounds: int, state: dict, path: Path) -> None:
    """Paired, interleaved timing on one batch, per method: each round times the unpatched model, then the model
    patched at every keep (``inside``: ratio = unpatched time / patched time), then one captured forward followed by
    the strategy at every keep (``after``: ratio = encoder time / (encoder + strategy) time). Reported: the median
    ratio over rounds."""
    mid = len(model.blocks) // 2
    grid = grid_of(model)
    speed, errors = state["speed"], state["errors"]
    with torch.inference_mode():
        model(x)  # warm-up
        for method in methods:
            todo = [kp for kp in keeps if _key(method, "inside", kp) not in errors
                    and not (_key(method, "inside", kp) in speed and _key(method, "after", kp) in speed)]
            if not todo:
                continue
            r_in: dict[float, list[float]] = {kp: [] for kp in todo}
            r_after: dict[float, list[float]] = {kp: [] for kp in todo}
            for rnd in range(rounds + 1):  # round 0 warms up every variant and is discarded
                t_base = _time(model, x)
                for kp in todo:
                    vtok.patch(model, method, keep=kp, layers=mid)
                    try:
                        t = _time(model, x)
                    finally:
                        vtok.unpatch(model)
                    if rnd:
                        r_in[kp].append(t_base / t)
                t = time.perf_counter()
                _, cap = captured_forward(model, x)
                t_enc = time.perf_counter() - t
                for kp in todo:
                    t = time.perf_counter()
                    after_logits(model, method, kp, cap, grid)
                    if rnd:
                        r_after[kp].append(t_enc / (t_enc + time.perf_counter() - t))
            for kp in todo:
                k_in, k_after = _key(method, "inside", kp), _key(method, "after", kp)
                speed[k_in], speed[k_after] = statistics.median(r_in[kp]), statistics.median(r_after[kp])
            _save(path, state)
            print(f"  speed {method}: " + ", ".join(f"keep {kp}: inside {speed[_key(method, 'inside', kp)]:.2f}x "
                                                    f"after {speed[_key(method, 'after', kp)]:.2f}x" for kp in todo),
                  flush=True)


# ------------------------------------------------------------------------------------------------ report


def table(state: dict, n_patches: int) -> str:
    done, counts, speed = state["done"], state["correct"], state["speed"]
    keeps = state["keeps"]
    head_ = "| method | placement | " + " | ".join(f"keep {kp} ({resolve_k(kp, n_patches)} tok)" for kp in keeps)
    lines = [head_ + " |", "|" + "---|" * (2 + len(keeps))]
    lines.append(f"| none (unpruned) | — | {counts['none'] / done:.4f}" + " | " * (len(keeps) - 1) + " |")
    for placement in ("inside", "after"):
        for method in state["methods"]:
            cells = []
            for kp in keeps:
                k = _key(method, placement, kp)
                acc = f"{counts[k] / done:.4f}" if k in counts else "—"
                sp = f" ({speed[k]:.2f}×)" if k in speed else ""
                cells.append("n/a" if k in state["errors"] else acc + sp)
            name = f"**{method}**" if method in BASELINES else method
            lines.append(f"| {name} | {placement} | " + " | ".join(cells) + " |")
    notes = sorted({f"{k.split('|')[0]} keep={k.split('|')[2]}: {e}" for k, e in state["errors"].items()})
    redone = [f"throughput of {', '.join(r['methods'])} re-timed {r['date']} (load {r['load']:.2f}): `{r['command']}`"
              for r in state.get("speed_remeasured", [])]
    return "\n".join(lines + [""] + [f"n/a — {n}" for n in notes] + redone)


def plot(state: dict, n_patches: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done, counts, keeps = state["done"], state["correct"], state["keeps"]
    ks = [resolve_k(kp, n_patches) for kp in keeps]
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5), sharey=True)
    cmap = plt.get_cmap("tab10")  # 10 colours × a marker per ten methods: every (colour, marker) pair is unique
    for ax, placement in zip(axes, ("inside", "after"), strict=True):
        for j, method in enumerate(state["methods"]):
            acc = [counts.get(_key(method, placement, kp), float("nan")) / done for kp in keeps]
            base = method in BASELINES
            ax.plot(ks, acc, marker="osD^v"[(j // 10) % 5], ms=3.5, color="black" if base else cmap(j % 10),
                    ls={"random": "--", "uniform": "-."}.get(method, "-"), lw=2 if base else 1.2, label=method)
        ax.axhline(counts["none"] / done, color="grey", lw=0.8, ls=":", label="unpruned")
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_xlabel(f"patch tokens kept (of {n_patches})")
        ax.set_title({"inside": f"inside the encoder (pruned at block {state['mid']})",
                      "after": "after the encoder (head pools the kept tokens)"}[placement])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"top-1 on {done} Fashion-MNIST test images")
    axes[1].legend(fontsize=7, ncol=2, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _protocol(key: dict | None, without_methods: bool) -> dict | None:
    return None if key is None else {k: v for k, v in key.items() if not (without_methods and k == "methods")}


def merge_rows(state: dict, other: dict) -> None:
    """Replace ``state``'s rows of ``other``'s methods by ``other``'s (accuracy, throughput, n/a notes); methods that
    are not rows of ``state`` yet are added after its own. Both must measure the same weights, keeps, test images and
    batches, and ``other`` must be complete."""
    same = ("checkpoint_sha256", "keeps", "n", "batch", "mid")
    diff = [f for f in same if state["key"].get(f) != other["key"].get(f)]
    if diff:
        raise ValueError(f"--merge-from: the two runs differ in {diff}; only rows of the same protocol can merge")
    if other["done"] != other["key"]["n"] or state["done"] != state["key"]["n"]:
        raise ValueError(f"--merge-from: both runs must be complete (merged run {other['done']}/{other['key']['n']}, "
                         f"this run {state['done']}/{state['key']['n']} images); resume them first")
    if other["correct"]["none"] != state["correct"]["none"]:
        raise ValueError("--merge-from: the unpruned counts differ, so the two runs did not see the same model/data")
    new = [m for m in other["methods"] if m not in state["methods"]]
    state["methods"] = state["methods"] + new
    state["key"]["methods"] = state["key"]["methods"] + new
    for part in ("correct", "speed", "errors"):
        for key in [k for k in state[part] if k != "none" and k.split("|")[0] in other["methods"]]:
            del state[part][key]
        state[part].update({k: v for k, v in other[part].items() if k != "none"})
    state.setdefault("merged", []).append({"methods": other["methods"], "command": other.get("command", "")})


def compare_sweep(state: dict, results: Path) -> list[str]:
    """Cells of a ``vtok sweep`` results file (task ``eval_vit``, same checkpoint, all test images, same batch) next to
    this state's counts; returns the mismatches (empty: the sweep reproduces these cells exactly)."""
    from vtok.sweep.report import load_rows

    rows = [r for r in load_rows(results) if r["cell"]["task"] == "eval_vit"]
    bad, lines = [], []
    for r in rows:
        c = r["cell"]
        if c["task_options"].get("batch") != state["key"]["batch"] or c["fingerprint"] != \
                state["key"]["checkpoint_sha256"][:16] or r["metrics"].get("n", state["done"]) != state["done"]:
            continue
        key = _key(c["method"], c["placement"], c["keep"])
        mine = "n/a" if key in state["errors"] else state["correct"].get(key)
        theirs = "n/a" if "error" in r else r["metrics"]["correct"]
        ok = mine == theirs
        lines.append(f"  {key}: state {mine}, sweep {theirs} {'ok' if ok else 'MISMATCH'}")
        if not ok:
            bad.append(key)
    print(f"{len(lines)} comparable sweep cells in {results} (of {len(rows)} eval_vit rows):", flush=True)
    print("\n".join(lines) if lines else "  none", flush=True)
    print(f"{len(lines) - len(bad)}/{len(lines)} equal" + (f"; mismatches: {bad}" if bad else ""), flush=True)
    return bad


def checkpoint_digest(path: Path) -> str:
    """SHA-256 of the checkpoint file: a resumed run must measure the same weights, wherever the repo lives."""
    return file_sha256(path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    ap.add_argument("--methods", nargs="+", default=None, help="default: every image strategy")
    ap.add_argument("--keeps", nargs="+", type=float, default=list(KEEPS))
    ap.add_argument("--test-limit", type=int, default=0, help="first N test images only (default all 10k)")
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--speed-batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per throughput ratio")
    ap.add_argument("--out", type=Path, default=Path("outputs/encoder_accuracy"))
    ap.add_argument("--plot", type=Path, default=None, help="write the accuracy plot here (PNG)")
    ap.add_argument("--report", action="store_true", help="only print the table (and --plot) of the saved state")
    ap.add_argument("--minutes", type=float, default=0, help="stop measuring accuracy after about this long "
                    "(state saved; rerun to resume); 0: no limit")
    ap.add_argument("--merge-from", type=Path, default=None, help="a finished state dir (same checkpoint, keeps, "
                    "images, batch) whose methods' rows replace those rows here (see the module docstring)")
    ap.add_argument("--compare-sweep", type=Path, default=None, help="a `vtok sweep` results JSONL: print its "
                    "eval_vit cells next to the saved counts (reproduction check) and stop")
    ap.add_argument("--remeasure-speed", action="store_true", help="re-time only the throughput rows of --methods "
                    "in the finished state in --out (accuracy untouched: for speed-ups that change no selection)")
    ap.add_argument("--jobs", type=int, default=1, help="measure accuracy in this many forked processes, the "
                    "torch threads split between them (same counts as --jobs 1)")
    args = ap.parse_args(argv)

    methods = args.methods or image_methods()
    bad = sorted(set(methods) - set(image_methods()))
    if bad:
        raise ValueError(f"--methods: {bad} cannot run on a ViT encoder; choose from {image_methods()}")
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    for kp in args.keeps:
        if not 0.0 < kp <= 1.0:
            raise ValueError(f"--keeps must be ratios in (0, 1], got {kp}")
    torch.manual_seed(0)
    model = load_eval_vit(args.checkpoint)
    x_all, y_all = load_fashion_mnist("test")
    if args.test_limit:
        x_all, y_all = x_all[: args.test_limit], y_all[: args.test_limit]
    x_all = preprocess(x_all)
    n_patches = int(model.patch_embed.num_patches)
    mid = len(model.blocks) // 2

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "state.json"
    key = {"checkpoint_sha256": checkpoint_digest(args.checkpoint), "methods": methods, "keeps": args.keeps,
           "n": len(x_all), "batch": args.batch, "mid": mid}
    state = json.loads(path.read_text()) if path.exists() else None
    if args.compare_sweep is not None:  # any finished run: the sweep cells are matched by checkpoint and batch
        if state is None or state["done"] != state["key"]["n"]:
            raise ValueError(f"--compare-sweep: {path} holds no finished run to compare with")
        state["sweep_mismatches"] = compare_sweep(state, args.compare_sweep)
        return state
    if args.remeasure_speed:
        return remeasure_speed(model, args, state, path, x_all, n_patches, argv)
    # --report / --merge-from read or extend a saved run whatever its method list (methods registered since then
    # are not rows of it); measuring needs the very same settings
    lenient = args.report or args.merge_from is not None
    if state is not None and _protocol(state.get("key"), lenient) != _protocol(key, lenient):
        raise ValueError(f"{path} holds a run with other settings ({state.get('key')}); use another --out")
    if args.merge_from is not None:
        if state is None:
            raise ValueError(f"--merge-from: {path} holds no state to merge into")
        merge_rows(state, json.loads((args.merge_from / "state.json").read_text()))
        _save(path, state)
        return report(state, n_patches, args.plot)
    if args.report:
        if state is None or state["done"] == 0:
            raise ValueError(f"--report: {path} holds no measured images yet")
        return report(state, n_patches, args.plot)
    if state is None:
        command = "python -m benchmarks.encoder_accuracy " + shlex.join(argv if argv is not None else sys.argv[1:])
        state = {"key": key, "methods": methods, "keeps": args.keeps, "mid": mid, "done": 0, "correct": {},
                 "speed": {}, "errors": {}, "command": command}
        print("checking the shared-prefix shortcut against each patched model's forward ...", flush=True)
        check_shortcut(model, methods, x_all[:8], mid, grid_of(model))
        _save(path, state)
    else:
        print(f"resuming {path}: {state['done']}/{len(x_all)} images done", flush=True)
    print(f"throughput: batch {args.speed_batch}, {args.rounds} paired rounds per row "
          f"(load {os.getloadavg()[0]:.2f})", flush=True)
    find_infeasible(model, methods, args.keeps, x_all[:1], state)
    measure_speed(model, methods, args.keeps, x_all[: args.speed_batch], args.rounds, state, path)
    print(f"accuracy: {len(methods)} methods × {len(args.keeps)} keeps × inside/after on {len(x_all)} images",
          flush=True)
    deadline = time.time() + 60 * args.minutes if args.minutes else float("inf")
    measure_accuracy(model, methods, args.keeps, x_all, y_all, args.batch, state, path, deadline, args.jobs)
    return report(state, n_patches, args.plot)


def remeasure_speed(model, args, state: dict | None, path: Path, x_all: Tensor, n_patches: int, argv) -> dict:
    """``--remeasure-speed``: the throughput rows of ``--methods`` timed again (same keeps, batch and rounds as
    asked) in a finished state; the accuracy counts stay. The state records which rows were re-timed, when, with
    what command and at what load."""
    if state is None or state["done"] != state["key"]["n"]:
        raise ValueError(f"--remeasure-speed: {path} holds no finished run")
    if state["key"]["checkpoint_sha256"] != checkpoint_digest(args.checkpoint):
        raise ValueError("--remeasure-speed: the state measured other weights than --checkpoint")
    if not args.methods or set(args.methods) - set(state["methods"]):
        raise ValueError(f"--remeasure-speed needs --methods among the state's rows {state['methods']}")
    for method in args.methods:
        for placement in ("inside", "after"):
            for kp in state["keeps"]:
                state["speed"].pop(_key(method, placement, kp), None)
    load = os.getloadavg()[0]
    print(f"re-timing {args.methods}: batch {args.speed_batch}, {args.rounds} paired rounds (load {load:.2f})",
          flush=True)
    measure_speed(model, args.methods, state["keeps"], x_all[: args.speed_batch], args.rounds, state, path)
    command = "python -m benchmarks.encoder_accuracy " + shlex.join(argv if argv is not None else sys.argv[1:])
    state.setdefault("speed_remeasured", []).append({"methods": args.methods, "command": command, "load": load,
                                                     "date": time.strftime("%Y-%m-%d")})
    _save(path, state)
    return report(state, n_patches, args.plot)


def report(state: dict, n_patches: int, plot_path: Path | None) -> dict:
    if state["done"] == 0:
        print("no test images measured yet: no table (rerun to continue)", flush=True)
        return state
    print(table(state, n_patches))
    if plot_path is not None:
        plot(state, n_patches, plot_path)
        print(f"wrote {plot_path}")
    return state


if __name__ == "__main__":
    main()
