"""Sweep tasks on the committed Fashion-MNIST evaluation ViT: ``eval_vit`` (accuracy, agreement) and ``timing``.

``eval_vit`` computes, per cell, top-1 accuracy on the test images and agreement with the unpruned model's
prediction, with the strategy ``inside`` the encoder (``vtok.patch`` at block ``layer``, default the middle one) or
``after`` it (the head mean-pools the kept final tokens): the same computation, seeds and batches as
``benchmarks/encoder_accuracy.py``, so equal options give the same counts. ``timing`` measures forward time and
FLOPs as ratios to the unpruned model (keep = 1.0), paired and interleaved on one batch.

Models: ``eval_vit`` (the committed checkpoint) or a path to a checkpoint saved by ``vtok.bench.save_eval_vit``.

Options (checked before any cell runs; ``vtok.sweep.get_task(name).options``): ``eval_vit``: ``limit`` (the first N
test images, an int >= 1; absent: all 10,000), ``batch`` (images per forward, >= 1), ``layer`` (the block
``inside`` prunes at, in ``[0, depth)``; absent: the middle block). ``timing``: ``batch``, ``rounds`` (>= 1), ``layer``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import vtok
from vtok.hooks._encoder_state import ENCODER_CONTEXT
from vtok.sweep.tasks import Option, Task, file_digest, register_task

PLACEMENTS = ("inside", "after")


def checkpoint_path(model: str) -> Path:
    """The checkpoint file behind a model name (``eval_vit``: the committed one)."""
    from vtok.bench.eval_vit import CHECKPOINT

    return CHECKPOINT if model == "eval_vit" else Path(model)


def _method_options(cell) -> dict[str, Any]:
    """The cell's options, plus ``seed=cell.seed`` for a method that takes a seed and was not given one."""
    opts = dict(cell.options)
    if "seed" in vtok.get_method(cell.method).options and "seed" not in opts:
        opts["seed"] = cell.seed
    return opts


LAYER = Option(int, None, minimum=0, optional=True, doc="the block `inside` prunes at; absent: the middle block")


def checkpoint_depth(path: Path) -> int:
    """Blocks of a ``save_eval_vit`` checkpoint (from its metadata, else its tensor names), without loading it."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        cfg = json.loads((f.metadata() or {}).get("config", "{}"))
        if "depth" in cfg:
            return int(cfg["depth"])
        return len({k.split(".")[1] for k in f.keys() if k.startswith("blocks.")})


class _VitTask(Task):
    placements = PLACEMENTS

    def check_method(self, method: str, placement: str) -> None:
        missing = sorted(vtok.get_method(method).needs - ENCODER_CONTEXT)
        if missing:
            raise ValueError(f"methods: {method!r} needs context {missing}, which placement {placement!r} of a ViT "
                             f"encoder cannot give (it gives {sorted(ENCODER_CONTEXT)})")

    def check_model(self, model: str, options: dict[str, Any]) -> None:
        path = checkpoint_path(model)
        if not (path.is_file() and path.suffix == ".safetensors"):
            raise ValueError(f"models: {model!r} is not a model of task {self.name!r} (expected 'eval_vit' or a "
                             f".safetensors checkpoint of vtok.bench.save_eval_vit)")
        layer = options.get("layer")
        if layer is not None:
            try:
                depth = checkpoint_depth(path)
            except Exception as e:  # noqa: BLE001 - a damaged file: name it
                raise ValueError(f"models: {model!r} is not a readable safetensors checkpoint: {e}") from None
            if layer >= depth:
                raise ValueError(f"task_options.{self.name}.layer (--task-option {self.name}.layer): {layer} is "
                                 f"out of range for model {model!r} "
                                 f"({depth} blocks: expected 0 to {depth - 1}, or absent for the middle block)")

    def fingerprint(self, model: str) -> str:
        return file_digest(checkpoint_path(model))

    def _load(self, cell):
        from vtok.bench.eval_vit import load_eval_vit

        return load_eval_vit(checkpoint_path(cell.model))


class EvalVit(_VitTask):
    """Top-1 accuracy and agreement with the unpruned prediction on Fashion-MNIST test images."""

    name = "eval_vit"
    description = "eval ViT on Fashion-MNIST: accuracy, agreement with keep=1.0 (inside / after the encoder)"
    options = {"limit": Option(int, None, minimum=1, optional=True, doc="first N test images; absent: all 10,000"),
               "batch": Option(int, 250, minimum=1, doc="images per forward"), "layer": LAYER}

    def check_model(self, model: str, options: dict[str, Any]) -> None:
        super().check_model(model, options)
        from vtok.bench.fashion_mnist import load_fashion_mnist

        try:
            load_fashion_mnist("test")
        except (FileNotFoundError, OSError) as e:
            raise ValueError(f"tasks: 'eval_vit' needs the Fashion-MNIST test set (apt-get install "
                             f"dataset-fashion-mnist): {e}") from None

    def run(self, cells, progress):
        import torch

        from vtok.bench.fashion_mnist import load_fashion_mnist, preprocess
        from vtok.sweep.vit import CAPTURED, Prefixes, after_logits, captured_forward, grid_of, inside_logits

        opts = cells[0].task_options
        model = self._load(cells[0])
        x_all, y_all = load_fashion_mnist("test")
        if opts["limit"] is not None:
            x_all, y_all = x_all[: opts["limit"]], y_all[: opts["limit"]]
        x_all = preprocess(x_all)
        n, batch = len(x_all), opts["batch"]
        layer = len(model.blocks) // 2 if opts["layer"] is None else opts["layer"]
        grid, n_tok = grid_of(model), int(model.patch_embed.num_patches)
        correct = dict.fromkeys((c.id for c in cells), 0)
        agree, errors, ref_correct = dict(correct), {}, 0
        starts = range(0, n, batch)
        reads = set().union(*(vtok.get_method(c.method).needs | vtok.get_method(c.method).uses for c in cells
                              if c.placement == "after"))
        what = tuple(w for w in CAPTURED if w != "attn" or "attn" in reads)  # N x N maps only when read
        with torch.inference_mode():
            for i, s in enumerate(starts):
                if len(errors) == len(cells):  # every cell is n/a: nothing left to measure
                    progress(len(starts), len(starts))
                    break
                x, y = x_all[s:s + batch], y_all[s:s + batch]
                torch.manual_seed(s)
                logits, cap = captured_forward(model, x, what)
                ref = logits.argmax(-1)
                ref_correct += int((ref == y).sum())
                prefix = Prefixes(model, x)
                for c in cells:
                    if c.id in errors:
                        continue
                    torch.manual_seed(c.seed * 1_000_003 + s)  # strategies use their own generators; a safety net
                    try:
                        if c.placement == "after":
                            out = after_logits(model, c.method, c.keep, cap, grid, **_method_options(c))
                        else:
                            out = inside_logits(model, c.method, c.keep, layer, prefix, grid, **_method_options(c))
                    except ValueError as e:  # a budget this method cannot make (pool2d's tiling): an n/a cell
                        errors[c.id] = str(e)
                        continue
                    pred = out.argmax(-1)
                    correct[c.id] += int((pred == y).sum())
                    agree[c.id] += int((pred == ref).sum())
                progress(i + 1, len(starts))
        for c in cells:
            if c.id in errors:
                yield c, {"error": errors[c.id]}
                continue
            yield c, {"metrics": {"accuracy": correct[c.id] / n, "agreement": agree[c.id] / n,
                                  "ref_accuracy": ref_correct / n, "correct": correct[c.id], "agree": agree[c.id],
                                  "n": n, "kept_tokens": vtok.resolve_k(c.keep, n_tok), "tokens": n_tok,
                                  "layer": layer}}


def flops(fn, *args) -> int:
    """FLOPs counted by ``torch.utils.flop_counter`` (matmuls, convolutions, attention) for one call."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn(*args)
    return int(fc.get_total_flops())


def _time(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


class Timing(_VitTask):
    """Forward time and FLOPs of the pruned eval ViT as ratios to the unpruned one (``time_ratio`` < 1: faster)."""

    name = "timing"
    description = "eval ViT forward time and FLOPs, ratios to keep=1.0 (inside: patched model; after: + strategy)"
    options = {"batch": Option(int, 32, minimum=1, doc="images per timed forward"),
               "rounds": Option(int, 3, minimum=1, doc="timed rounds (median), after one warm-up"), "layer": LAYER}

    def run(self, cells, progress):
        import torch

        from vtok.bench.fashion_mnist import load_fashion_mnist, preprocess
        from vtok.sweep.vit import after_logits, captured_forward, grid_of

        opts = cells[0].task_options
        model = self._load(cells[0])
        x = preprocess(load_fashion_mnist("test")[0][: opts["batch"]])
        layer = len(model.blocks) // 2 if opts["layer"] is None else opts["layer"]
        grid, n_tok = grid_of(model), int(model.patch_embed.num_patches)
        with torch.inference_mode():
            model(x)  # warm-up
            f_ref = flops(model, x)
            for i, c in enumerate(cells):
                opts_m = _method_options(c)
                try:
                    if c.placement == "inside":
                        def run_cell(c=c, opts_m=opts_m):
                            vtok.patch(model, c.method, keep=c.keep, layers=layer, **opts_m)
                            try:
                                return model(x)
                            finally:
                                vtok.unpatch(model)
                        base = lambda: model(x)  # noqa: E731
                    else:
                        def run_cell(c=c, opts_m=opts_m):
                            _, cap = captured_forward(model, x)
                            return after_logits(model, c.method, c.keep, cap, grid, **opts_m)
                        base = lambda: captured_forward(model, x)  # noqa: E731
                    f_cell = flops(run_cell)
                    ratios = []
                    for rnd in range(opts["rounds"] + 1):  # round 0 warms up and is discarded
                        t_base, t_cell = _time(base), _time(run_cell)
                        if rnd:
                            ratios.append(t_cell / t_base)
                except ValueError as e:
                    yield c, {"error": str(e)}
                    progress(i + 1, len(cells))
                    continue
                ratio = statistics.median(ratios)
                f_base = f_ref if c.placement == "inside" else flops(base)
                yield c, {"metrics": {"flops_ratio": f_cell / f_base, "kept_tokens": vtok.resolve_k(c.keep, n_tok),
                                      "tokens": n_tok, "layer": layer},
                          "timing": {"time_ratio": ratio, "speedup": 1.0 / ratio, "batch": opts["batch"],
                                     "rounds": opts["rounds"]}}
                progress(i + 1, len(cells))


register_task(EvalVit())
register_task(Timing())
