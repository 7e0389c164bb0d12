"""Sweep tasks on a Hugging Face VLM folder: ``hf_vlm`` (generated-token agreement and logit KL against keep=1.0)
and ``hf_vlm_timing`` (prefill time and FLOPs as ratios to keep=1.0).

Models: a local folder ``from_pretrained`` can load (a supported family: ``vtok.hooks.hf.supported()``). Placements:
``pre_llm`` (``vtok.wrap(..., layer=None)``) or ``llm:K`` (in-LLM pruning entering decoder layer ``K``). The prompts
file (``task_options.<task>.prompts``) is JSON lines, one sample each::

    {"prompt": "USER: <image> describe the image ASSISTANT:", "image": "photo.png"}
    {"prompt": "USER: <image> what is it ? ASSISTANT:", "image": "skimage:astronaut"}

``image`` is a path (relative to the prompts file) or ``skimage:NAME``, a photo shipped with scikit-image.

Before any cell runs, every model x method x keep x placement is checked with the checks ``vtok.wrap`` itself makes
(the context the real placement gives on this model, the layer range, the method's options), on the model built
from its ``config.json`` on the ``meta`` device (no weights are read).
"""

from __future__ import annotations

import inspect
import json
import statistics
import time
from pathlib import Path
from typing import Any

import vtok
from vtok.bench.layer_cache import cached_layers, module_digest
from vtok.hooks.hf import llm_context
from vtok.hooks.hf.adapter import find_adapter
from vtok.sweep.tasks import Option, Task, file_digest, register_task


def parse_placement(placement: str) -> int | None:
    """``"pre_llm"`` -> ``None``; ``"llm:K"`` -> ``K``; anything else raises ``ValueError``."""
    if placement == "pre_llm":
        return None
    head, _, tail = placement.partition(":")
    if head == "llm" and tail.isdigit():
        return int(tail)
    raise ValueError(f"placements: {placement!r} is not a VLM placement (expected 'pre_llm' or 'llm:K', K a layer)")


def read_prompts(path: str | Path) -> list[dict[str, str]]:
    """The samples of a prompts file; a missing file or a bad line raises ``ValueError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompts: {path} is not a file")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"prompts: {path} line {i} is not JSON: {e}") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("image"), str):
            raise ValueError(f"prompts: {path} line {i}: expected {{\"prompt\": str, \"image\": str}}, got {line!r}")
        rows.append(row)
    if not rows:
        raise ValueError(f"prompts: {path} holds no samples")
    return rows


def load_image(spec: str, base: Path):
    """An RGB ``uint8`` array from ``skimage:NAME`` or an image path (relative to ``base``)."""
    import numpy as np

    if spec.startswith("skimage:"):
        from skimage import data

        im = getattr(data, spec.split(":", 1)[1])()
    else:
        from PIL import Image

        im = np.array(Image.open(base / spec).convert("RGB"))
    if im.ndim == 2:
        im = np.stack([im] * 3, -1)
    return im[..., :3]


def _meta(key: str, config, what: str):
    """The model of ``config()`` on the ``meta`` device (no weights), cached under ``key``; a ``ValueError``
    ``models: {what}: {reason}`` when it cannot be built."""
    import torch
    from transformers import AutoModelForImageTextToText

    if key not in _META:
        try:
            cfg = config()
            with torch.device("meta"):
                _META[key] = AutoModelForImageTextToText.from_config(cfg)
        except Exception as e:  # noqa: BLE001 - any reason the model cannot be built: named, one line
            raise ValueError(f"models: {what}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return _META[key]


def meta_model(folder: str | Path):
    """The model of an HF folder built from its ``config.json`` on the ``meta`` device (no weights read), or a
    ``ValueError`` naming the folder."""
    from transformers import AutoConfig

    key = str(Path(folder).resolve())
    return _meta(key, lambda: AutoConfig.from_pretrained(key), f"{str(folder)!r} cannot be built from its config.json")


_META: dict[str, Any] = {}


def bench_vlm_meta(bench: str = "vtok.bench.vlm", name: str = "real_vlm"):
    """A bench VLM (``bench``: ``vtok.bench.vlm`` or ``vtok.bench.vlm_clip``) on the ``meta`` device, built from the
    recipe it is assembled with (``vlm_config``: the committed checkpoint's metadata and the LLM's config, no
    weights, no tokenizer), so the checks need no assembled folder; if the recipe's LLM is not there, from the
    assembled folder's config.json."""
    import importlib

    from vtok.bench import vlm

    mod = importlib.import_module(bench)
    key = f"{name}:{mod.CHECKPOINT}:{vlm.LLM_CACHE}"
    if key in _META:
        return _META[key]
    try:
        return _meta(key, mod.vlm_config, f"{name!r} cannot be built from {bench}'s recipe")
    except ValueError:
        if not (mod.VLM_FOLDER / "config.json").is_file():
            raise
        _META[key] = meta_model(mod.VLM_FOLDER)
        return _META[key]


def real_vlm_meta():
    """The ``real_vlm`` model on the ``meta`` device (:func:`bench_vlm_meta` of ``vtok.bench.vlm``)."""
    return bench_vlm_meta("vtok.bench.vlm", "real_vlm")


def check_wrap_on(model, name: str, method: str, keep: float | int, placement: str, options: dict[str, Any]) -> None:
    """``vtok.wrap``'s own checks for this cell on ``model`` (a meta copy); a refusal becomes a ``ValueError`` naming
    the method, placement and model (``name``)."""
    try:
        vtok.wrap(model, method, keep, layer=parse_placement(placement), **options)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise ValueError(f"methods: {method!r} at placement {placement!r} on {name}: {e}") from None
    vtok.unwrap(model)


def check_wrap(folder: str | Path, method: str, keep: float | int, placement: str, options: dict[str, Any]) -> None:
    """``check_wrap_on`` the model of an HF folder, built from its ``config.json`` on the ``meta`` device."""
    check_wrap_on(meta_model(folder), Path(folder).name, method, keep, placement, options)


class _Placements(Task):
    """``pre_llm`` / ``llm:K`` placements, checked against what the wrapper can feed a method there."""

    placements = ("pre_llm",)

    def check_placement(self, placement: str) -> None:
        parse_placement(placement)

    def check_method(self, method: str, placement: str) -> None:
        """In-LLM placements: what any model gives at that layer (the pre-LLM context depends on the model: see
        ``check_cell``)."""
        layer = parse_placement(placement)
        if layer is None:
            return
        avail = llm_context(layer, method)
        missing = sorted(vtok.get_method(method).needs - avail - {"frames"})
        if missing:
            raise ValueError(f"methods: {method!r} needs context {missing}, which placement {placement!r} cannot give "
                             f"(it gives {sorted(avail)})")

    def check_cell(self, model: str, method: str, keep: float | int, placement: str,
                   method_options: dict[str, Any]) -> None:
        check_wrap(model, method, keep, placement, method_options)


PROMPTS = Option(str, required=True, doc="a prompts file (JSON lines: prompt, image)")


class _VlmTask(_Placements):

    def resolve_options(self, given: dict[str, Any]) -> dict[str, Any]:
        opts = super().resolve_options(given)
        opts["prompts"] = str(Path(opts["prompts"]).resolve())
        read_prompts(opts["prompts"])
        return opts

    def check_model(self, model: str, options: dict[str, Any]) -> None:
        if not (Path(model) / "config.json").is_file():
            raise ValueError(f"models: {model!r} is not a model of task {self.name!r} (expected a Hugging Face "
                             f"model folder holding config.json)")

    def fingerprint(self, model: str) -> str:
        files = sorted(p for p in Path(model).iterdir() if p.suffix in (".json", ".safetensors", ".bin"))
        return file_digest(Path(model) / "config.json") + "".join(
            file_digest(p, limit=1 << 20)[:4] for p in files)

    def _load(self, cells):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        opts = cells[0].task_options
        processor = AutoProcessor.from_pretrained(cells[0].model)
        model = AutoModelForImageTextToText.from_pretrained(cells[0].model).eval()
        base = Path(opts["prompts"]).parent
        takes = set(inspect.signature(model.forward).parameters)
        samples = []
        for row in read_prompts(opts["prompts"]):
            batch = processor(images=[load_image(row["image"], base)], text=[row["prompt"]], return_tensors="pt")
            if "token_type_ids" not in takes:  # a tokenizer's output that transformers 4.x's generate refuses
                batch.pop("token_type_ids", None)
            samples.append(batch)
        torch.manual_seed(0)
        return model, processor, samples


# the unwrapped model's accuracy per (task, model, its fingerprint, n, start, batch), within one process
_REFERENCE: dict[tuple, dict[str, Any]] = {}
# the frozen tower's layer outputs (vtok.bench.layer_cache), within one process: one store, for the tower whose
# weights have this digest (another tower replaces it)
_TOWER_STORE: dict[str, Any] = {"digest": None, "store": {}}


def _visual_counts(model) -> tuple[int, int]:
    """``(before, after)``: visual tokens of the wrapped model's last call, summed over its samples (0, 0 unwrapped)."""
    if getattr(model, "_vtok_runtime", None) is None:
        return 0, 0
    per = vtok.stats(model)["per_sample"]
    return sum(d["visual_before"] for d in per), sum(d["visual_after"] for d in per)


def _wrap_kwargs(cell) -> dict[str, Any]:
    return {"layer": parse_placement(cell.placement), **cell.options}


class HfVlm(_VlmTask):
    """Greedy generation with the VLM wrapped vs unwrapped: token agreement, exact match, first-token logit KL."""

    name = "hf_vlm"
    description = "HF VLM folder + prompts file: generated-token agreement and logit KL vs keep=1.0"
    options = {"prompts": PROMPTS, "max_new_tokens": Option(int, 8, minimum=1, doc="greedy tokens per prompt")}

    def run(self, cells, progress):
        import torch

        model, _, samples = self._load(cells)
        new = cells[0].task_options["max_new_tokens"]

        def once(inputs):
            n = inputs["input_ids"].shape[1]
            logits = model(**inputs).logits[:, -1].float()
            out = model.generate(**inputs, max_new_tokens=new, do_sample=False)[:, n:]
            return logits, out

        with torch.no_grad():
            refs = [once(s) for s in samples]
            for i, c in enumerate(cells):
                agree, exact, kl, before, after = [], [], [], 0, 0
                try:
                    with vtok.wrapped(model, c.method, c.keep, **_wrap_kwargs(c)):
                        for s, (ref_logits, ref_out) in zip(samples, refs, strict=True):
                            logits, out = once(s)
                            b, a = _visual_counts(model)
                            before, after = before + b, after + a
                            m = min(out.shape[1], ref_out.shape[1])
                            same = (out[:, :m] == ref_out[:, :m]).sum().item()
                            agree.append(same / max(out.shape[1], ref_out.shape[1], 1))
                            exact.append(float(out.shape == ref_out.shape and bool((out == ref_out).all())))
                            lp, lq = ref_logits.log_softmax(-1), logits.log_softmax(-1)
                            kl.append(float((lp.exp() * (lp - lq)).sum(-1).mean()))
                except ValueError as e:
                    yield c, {"error": str(e)}
                    progress(i + 1, len(cells))
                    continue
                yield c, {"metrics": {"token_agreement": statistics.fmean(agree),
                                      "exact_match": statistics.fmean(exact), "logit_kl": statistics.fmean(kl),
                                      "kept_tokens": after / len(samples),
                                      "tokens": before / len(samples), "n": len(samples)}}
                progress(i + 1, len(cells))


class HfVlmTiming(_VlmTask):
    """Prefill (``model(**inputs)``) time and FLOPs wrapped vs unwrapped, ratios to keep = 1.0."""

    name = "hf_vlm_timing"
    description = "HF VLM folder + prompts file: prefill time and FLOPs, ratios to keep=1.0"
    options = {"prompts": PROMPTS, "rounds": Option(int, 3, minimum=1, doc="timed rounds (median), after a warm-up")}

    def run(self, cells, progress):
        import torch

        from vtok.sweep.vit_task import flops

        model, _, samples = self._load(cells)
        rounds = cells[0].task_options["rounds"]

        def prefill():
            for s in samples:
                model(**s)

        with torch.no_grad():
            prefill()  # warm-up
            f_ref = flops(prefill)
            for i, c in enumerate(cells):
                try:
                    vtok.wrap(model, c.method, c.keep, **_wrap_kwargs(c))
                    vtok.unwrap(model)
                except ValueError as e:
                    yield c, {"error": str(e)}
                    progress(i + 1, len(cells))
                    continue
                ratios = []
                for rnd in range(rounds + 1):  # round 0 warms up and is discarded
                    t = time.perf_counter()
                    prefill()
                    t_ref = time.perf_counter() - t
                    with vtok.wrapped(model, c.method, c.keep, **_wrap_kwargs(c)):
                        t = time.perf_counter()
                        prefill()
                        t_cell = time.perf_counter() - t
                        if rnd == 0:
                            f_cell = flops(prefill)
                            kept = tokens = 0
                            for s in samples:  # visual tokens before / after, over every sample
                                model(**s)
                                b, a = _visual_counts(model)
                                tokens, kept = tokens + b, kept + a
                    if rnd:
                        ratios.append(t_cell / t_ref)
                ratio = statistics.median(ratios)
                yield c, {"metrics": {"flops_ratio": f_cell / f_ref, "kept_tokens": kept / len(samples),
                                      "tokens": tokens / len(samples)},
                          "timing": {"time_ratio": ratio, "speedup": 1.0 / ratio, "rounds": rounds}}
                progress(i + 1, len(cells))


class RealVlm(_Placements):
    """The small LLaVA trained here (``vtok.bench.vlm``) on its Fashion-MNIST scene questions: exact-match accuracy
    of the wrapped model on held-out scenes, overall and per question type, beside keep = 1.0.

    Model: ``real_vlm`` (``vtok.bench.load_vlm()``: the committed weights, assembled once) or a folder holding such a
    model (``config.json`` + processor). Options: ``n`` held-out scenes from ``start``, ``batch`` per generate call.
    """

    name = "real_vlm"
    description = "the small VLM trained here: exact-match accuracy on held-out Fashion-MNIST scenes (issue #17)"
    bench = "vtok.bench.vlm"  # the module that builds, opens and asks the model
    scenes = "vtok.bench.vlm_task"  # the module whose heldout(n, start) gives the scenes
    options = {"n": Option(int, 2000, minimum=1, doc="held-out scenes"),
               "start": Option(int, 0, minimum=0, doc="first held-out scene"),
               "batch": Option(int, 16, minimum=1, doc="scenes per generate call")}

    def _bench(self):
        import importlib

        return importlib.import_module(self.bench)

    def check_cell(self, model: str, method: str, keep: float | int, placement: str,
                   method_options: dict[str, Any]) -> None:
        if model != self.name:
            return super().check_cell(model, method, keep, placement, method_options)
        check_wrap_on(bench_vlm_meta(self.bench, self.name), self.name, method, keep, placement, method_options)

    def check_model(self, model: str, options: dict[str, Any]) -> None:
        if model != self.name and not (Path(model) / "config.json").is_file():
            raise ValueError(f"models: {model!r} is not a model of task {self.name!r} (expected {self.name!r} or a "
                             f"folder holding the assembled VLM's config.json)")

    def fingerprint(self, model: str) -> str:
        if model == self.name:
            ckpt = self._bench().CHECKPOINT
            return file_digest(ckpt) if ckpt.exists() else "untrained"
        files = sorted(p for p in Path(model).iterdir() if p.suffix in (".json", ".safetensors"))
        return "".join(file_digest(p, limit=1 << 20)[:4] for p in files)

    def run(self, cells, progress):
        import importlib

        from vtok.bench import vlm_task as answers

        bench = self._bench()
        c0 = cells[0]
        model, processor = bench.open_vlm(c0.model)
        opts = c0.task_options
        scenes = importlib.import_module(self.scenes).heldout(opts["n"], opts["start"])

        def score():
            hits: dict[str, list[int]] = {}
            kept = tokens = 0
            for s in range(0, len(scenes), opts["batch"]):
                chunk = scenes[s:s + opts["batch"]]
                out = bench.answer(model, processor, [c.image for c in chunk], [c.question for c in chunk])
                for c, a in zip(chunk, out, strict=True):
                    hits.setdefault(c.qtype, []).append(int(answers.exact_match(a, c.answer)))
                b, a = _visual_counts(model)
                tokens, kept = tokens + b, kept + a
            every = [h for v in hits.values() for h in v]
            per = {f"accuracy_{k}": statistics.fmean(v) for k, v in sorted(hits.items())}
            return {"accuracy": statistics.fmean(every), **per, "n": len(every)}, kept, tokens

        # keep = 1.0 on these scenes: once per process (a sweep's later shards of the same model and scenes reuse it)
        key = (self.name, c0.model, self.fingerprint(c0.model), opts["n"], opts["start"], opts["batch"])
        # the frozen tower answers the same images in every cell: its layers' outputs are memoised by input digest
        # (bit-identical results; pruning inside the tower changes the digests and so computes)
        layers = find_adapter(model).tower_layers(model)
        digest = module_digest(layers)
        if _TOWER_STORE["digest"] != digest:
            _TOWER_STORE.update(digest=digest, store={})
        with cached_layers(layers, _TOWER_STORE["store"]):
            if key not in _REFERENCE:
                _REFERENCE[key] = score()[0]
            ref = _REFERENCE[key]
            for i, c in enumerate(cells):
                try:
                    with vtok.wrapped(model, c.method, c.keep, **_wrap_kwargs(c)):
                        m, kept, tokens = score()
                except ValueError as e:
                    yield c, {"error": str(e)}
                    progress(i + 1, len(cells))
                    continue
                yield c, {"metrics": {**m, "ref_accuracy": ref["accuracy"], "kept_tokens": kept / len(scenes),
                                      "tokens": tokens / len(scenes)}}
                progress(i + 1, len(cells))


class RealVlmClip(RealVlm):
    """The small LLaVA on the real CLIP ViT-B/16 tower (``vtok.bench.vlm_clip``: 196 visual tokens, layer −2) on its
    224-px scenes (``vtok.bench.clip_scenes``): exact-match accuracy of the wrapped model, beside keep = 1.0.

    Model: ``real_vlm_clip`` (``vtok.bench.load_clip_vlm()``: the committed projector + LoRA around the converted
    tower, assembled once) or a folder holding such a model. Options as ``real_vlm``.
    """

    name = "real_vlm_clip"
    description = "the small VLM on the real CLIP ViT-B/16: exact-match accuracy on held-out 224-px scenes"
    bench = "vtok.bench.vlm_clip"
    scenes = "vtok.bench.clip_scenes"
    options = {**RealVlm.options, "n": Option(int, 1000, minimum=1, doc="held-out scenes")}


register_task(HfVlm())
register_task(HfVlmTiming())
register_task(RealVlm())
register_task(RealVlmClip())
