"""Sweep tasks on the committed Fashion-MNIST evaluation ViT: ``eval_vit`` (accuracy, agreement) and ``timing``.

``eval_vit`` computes, per cell, top-1 accuracy on the test images and agreement with the unpruned model's
prediction, with the strategy ``inside`` the encoder (``vtok.patch`` at block ``layer``, default the middle one) or
``after`` it (the head mean-pools the kept final tokens): the same computation, seeds and batches as
``benchmarks/encoder_accuracy.py``, so equal options give the same counts. A shard's cells finish one after another
(each row is written as its cell finishes), while the unpruned model's work on each batch is still done once per
shard and shared: see ``_Shard`` and ``cache_budget`` (``$VTOK_SWEEP_CACHE_GB``). ``timing`` measures forward time and
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

        cache_budget()  # a malformed VTOK_SWEEP_CACHE_GB is named before any cell runs
        try:
            load_fashion_mnist("test")
        except (FileNotFoundError, OSError) as e:
            raise ValueError(f"tasks: 'eval_vit' needs the Fashion-MNIST test set (apt-get install "
                             f"dataset-fashion-mnist): {e}") from None

    def run(self, cells, progress):
        """Each cell's row the moment that cell has counted every batch; see ``_Shard``."""
        from vtok.bench.fashion_mnist import load_fashion_mnist, preprocess

        opts = cells[0].task_options
        model = self._load(cells[0])
        x_all, y_all = load_fashion_mnist("test")
        if opts["limit"] is not None:
            x_all, y_all = x_all[: opts["limit"]], y_all[: opts["limit"]]
        yield from _Shard(model, preprocess(x_all), y_all, cells, opts, progress).run(cache_budget())


CACHE_ENV = "VTOK_SWEEP_CACHE_GB"
CACHE_GB = 4.0  # the default cap; never more than a quarter of the memory available when the shard starts


def _available_bytes() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo`` (Linux), else ``None``."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cache_budget() -> int:
    """Bytes an ``eval_vit`` shard may keep of the unpruned model's per-batch state, so that its cells can finish
    one after another: ``$VTOK_SWEEP_CACHE_GB`` GiB when set (``0``: keep nothing; the shard's cells then run
    batch by batch together, as one pass), else 4 GiB or a quarter of the memory available now, whichever is less.
    It decides only when rows arrive: never a result, never how much is computed."""
    import os

    raw = os.environ.get(CACHE_ENV)
    if raw is not None and raw.strip():
        try:
            gb = float(raw)
        except ValueError:
            gb = -1.0
        if not 0 <= gb < float("inf"):
            raise ValueError(f"{CACHE_ENV}: expected a number of GiB >= 0 (0: no cache), got {raw!r}")
        return int(gb * 2**30)
    budget = int(CACHE_GB * 2**30)
    avail = _available_bytes()
    return budget if avail is None else min(budget, avail // 4)


def _nbytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a captured ``keys`` is a view of the whole q, k, v)."""
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


class _Shard:
    """One ``eval_vit`` shard, run so that its cells finish one after another, each computing what the one-pass
    loop computed (same batches, calls, seeds and float32 values: the same counts), and the unpruned model's
    work on a batch still done once per shard.

    The cells form groups that share one per-batch state: the ``after`` cells share the captured forward (the
    entries they read, ``after_reads``); the ``inside`` cells that start from the same block share the tokens
    entering it (``forward_to``). The unpruned prediction of each batch is always kept (one int per image). Groups
    run one after another, ``after`` first. In a group, the first cell runs over every batch and keeps each batch's
    state for the others while ``budget`` bytes allow; then each other cell runs from the kept state and finishes
    in turn. Once a batch's state no longer fits, the remaining batches are run by the group's unfinished cells
    together (each state computed once, used by all, dropped), so nothing is computed twice; those cells then
    finish in turn from the kept batches. A group's kept state is freed when its last cell finishes."""

    def __init__(self, model, x_all, y_all, cells, opts, progress):
        import torch

        from vtok.sweep.vit import CAPTURED, after_reads, first_active, grid_of

        self.model, self.x_all, self.y_all, self.progress = model, x_all, y_all, progress
        self.n, self.batch = len(x_all), opts["batch"]
        self.starts = list(range(0, self.n, self.batch))
        self.layer = len(model.blocks) // 2 if opts["layer"] is None else opts["layer"]
        self.grid, self.n_tok = grid_of(model), int(model.patch_embed.num_patches)
        after = [c for c in cells if c.placement == "after"]
        reads = set().union(*(vtok.get_method(c.method).needs | vtok.get_method(c.method).uses for c in after))
        self.what = tuple(w for w in CAPTURED if w != "attn" or "attn" in reads)  # N x N maps only when read
        self.cap_keys = sorted({v for c in after for v in after_reads(c.method, len(model.blocks)).values()})
        self.groups: list[tuple[str, int | None, list]] = [("after", None, after)] if after else []
        by_start: dict[int, list] = {}
        with torch.inference_mode():
            for c in cells:
                if c.placement == "after":
                    continue
                try:
                    vtok.patch(model, c.method, keep=c.keep, layers=self.layer, **_method_options(c))
                except Exception:  # noqa: BLE001 - the cell raises it again when it runs (n/a or failed), alone
                    self.groups.append(("inside", None, [c]))
                    continue
                try:
                    start = first_active(model)
                except Exception:  # noqa: BLE001 - as above: its own run meets it again
                    start = None
                finally:
                    vtok.unpatch(model)
                if start is None:
                    self.groups.append(("inside", None, [c]))
                    continue
                if start not in by_start:
                    by_start[start] = []
                    self.groups.append(("inside", start, by_start[start]))
                by_start[start].append(c)
        self.refs: dict[int, Any] = {}  # batch -> the unpruned prediction
        self.ref_hits: dict[int, int] = {}  # batch -> how many of its images the unpruned model gets right
        self.total, self.steps = len(cells) * len(self.starts), 0

    # --- the unpruned model on batch i: computed here, and only here
    def _x(self, i: int):
        s = self.starts[i]
        return self.x_all[s:s + self.batch]

    def _captured(self, i: int) -> dict:
        """The captured forward of batch ``i`` (seeded with its first index, as the one-pass loop was); sets its
        prediction, returns the entries the ``after`` cells read."""
        import torch

        from vtok.sweep.vit import captured_forward

        torch.manual_seed(self.starts[i])
        logits, cap = captured_forward(self.model, self._x(i), self.what)
        if i not in self.refs:
            ref = logits.argmax(-1)
            s = self.starts[i]
            self.refs[i], self.ref_hits[i] = ref, int((ref == self.y_all[s:s + self.batch]).sum())
        sub: dict[int, dict] = {}
        for blk, entry in self.cap_keys:
            if entry in cap[blk]:
                sub.setdefault(blk, {})[entry] = cap[blk][entry]
        return sub

    def _state(self, kind: str, start: int | None, i: int):
        """What a group's cells share on batch ``i``: the ``after`` entries, or the tokens entering ``start``."""
        from vtok.sweep.vit import forward_to

        if kind == "after":
            return self._captured(i)
        return None if start is None else forward_to(self.model, self._x(i), start)

    @staticmethod
    def _size(state) -> int:
        if state is None:
            return 0
        if isinstance(state, dict):
            return _nbytes(t for d in state.values() for t in d.values())
        return _nbytes([state])

    # --- one cell on one batch
    def _apply(self, c, i: int, state, start: int | None, counts: dict, errors: dict) -> None:
        """Count cell ``c`` on batch ``i`` from the shared ``state`` (an ``inside`` cell's: the tokens entering block
        ``start``); a budget the method cannot make goes to ``errors``."""
        import torch

        from vtok.sweep.vit import after_logits, forward_to, inside_logits

        if i not in self.refs:
            self._captured(i)  # an inside group before any after cell: the prediction only
        s = self.starts[i]
        torch.manual_seed(c.seed * 1_000_003 + s)  # strategies use their own generators; a safety net
        try:
            if c.placement == "after":
                out = after_logits(self.model, c.method, c.keep, state, self.grid, **_method_options(c))
            else:
                def prefix(b: int):
                    return state if state is not None and b == start else forward_to(self.model, self._x(i), b)
                out = inside_logits(self.model, c.method, c.keep, self.layer, prefix, self.grid, **_method_options(c))
        except ValueError as e:  # a budget this method cannot make (pool2d's tiling): an n/a cell
            if c.id not in errors or i < errors[c.id][0]:  # the first failing batch speaks, as in one pass
                errors[c.id] = (i, str(e))
            return
        pred = out.argmax(-1)
        y = self.y_all[s:s + self.batch]
        counts[c.id][0] += int((pred == y).sum())
        counts[c.id][1] += int((pred == self.refs[i]).sum())
        counts[c.id][2].add(i)
        self.steps += 1
        self.progress(self.steps, self.total)

    def _part(self, c, counts: dict, errors: dict) -> dict[str, Any]:
        self.steps += len(self.starts) - len(counts[c.id][2])  # batches an n/a cell never ran
        self.progress(self.steps, self.total)
        if c.id in errors:
            return {"error": errors[c.id][1]}
        correct, agree, seen = counts[c.id]
        assert len(seen) == len(self.starts) and len(self.ref_hits) == len(self.starts)
        n = self.n
        return {"metrics": {"accuracy": correct / n, "agreement": agree / n,
                            "ref_accuracy": sum(self.ref_hits.values()) / n, "correct": correct, "agree": agree,
                            "n": n, "kept_tokens": vtok.resolve_k(c.keep, self.n_tok), "tokens": self.n_tok,
                            "layer": self.layer}}

    def _pass(self, kind: str, start: int | None, c, pending: list, kept: dict, used: list, budget: int,
              counts: dict, errors: dict) -> None:
        """Cell ``c`` over every batch it has not counted, in order, until it fails. A state it computes is kept
        for ``pending`` while it fits; the first that does not starts the joint run of the remaining batches."""
        for i in range(len(self.starts)):
            if c.id in errors and i >= errors[c.id][0]:
                return
            if i in counts[c.id][2]:
                continue
            state = kept.get(i)
            if i not in kept:
                state = self._state(kind, start, i)
                if pending:
                    size = self._size(state)
                    if used[0] + size > budget:  # no room: the rest of the batches, every unfinished cell at once
                        for i2 in range(i, len(self.starts)):
                            st = state if i2 == i else self._state(kind, start, i2)
                            for cell in [c, *pending]:
                                if cell.id not in errors:
                                    self._apply(cell, i2, st, start, counts, errors)
                        return
                    kept[i] = state
                    used[0] += size
            self._apply(c, i, state, start, counts, errors)

    def run(self, budget: int):
        """``(cell, part)`` for every cell, each as soon as it has counted every batch (``budget``: bytes of kept
        state a group may hold)."""
        import torch

        for kind, start, group in self.groups:
            kept: dict[int, Any] = {}
            used = [0]
            counts = {c.id: [0, 0, set()] for c in group}
            errors: dict[str, tuple[int, str]] = {}
            pending = list(group)
            while pending:
                c = pending.pop(0)
                with torch.inference_mode():
                    self._pass(kind, start, c, pending, kept, used, budget, counts, errors)
                    part = self._part(c, counts, errors)
                yield c, part  # on disk now: a kill from here on cannot lose this cell
            kept.clear()


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
