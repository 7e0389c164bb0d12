"""FitPrune's recipe fitted on a wrapped VLM (arXiv 2409.10197, Sec. 3.2–3.3; the authors' ``statistical_analysis.py``).

    sched = fit_fitprune(model, [inputs_1, inputs_2, ...], reduction=0.6)   # processor outputs, one prompt each
    vtok.wrap(model, "fitprune", sched.keep, layer=sched.layers)

The pure steps (threshold counts, FLOPs model, stopping rule) are in ``vtok.pruners.fitprune``; this module runs the
model. Per calibration sample and LLM layer ``l`` it needs layer ``l``'s attention on the sequence the recipe so far
leaves, so it runs the wrapped model once per (``α``, layer, sample) with the sample's own schedule up to ``l`` plus an
identity stage at ``l + 1`` that exposes layer ``l``'s head-max attention (the same ``self_cross_attn`` the pruning
reads); the unpruned model's masses of every layer come from one forward with identity stages at all layers.
Differences from the authors' code, each noted where it happens: a sample drops its counted tokens by the inference
rule (lowest ``cross × self``) rather than the intersection of the two threshold sets (same count); the FLOPs model
takes the widths from the model's config (grouped-query k / v included) instead of LLaMA-7B constants; the result is
the recipe of the smallest ``α`` that met the budget (their script prints the last one tried).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vtok.pruners.fitprune import budget_reached, deletion_count, layer_flops


@dataclass
class FitSchedule:
    """A fitted FitPrune recipe: ``vtok.wrap(model, "fitprune", keep, layer=layers)``.

    Attributes:
        layers: the stages' decoder layers (layer ``l + 1`` for a drop after layer ``l``'s attention).
        keep: the image tokens left after each stage, as a fraction of the image's tokens.
        deletions: the recipe as the authors print it, tokens dropped per layer ``l`` (mean over the samples, floored).
        alpha: the attention-mass tolerance the search settled on.
        n_image: the calibration images' token count the fractions are relative to (mean over samples).
    """

    layers: list[int]
    keep: list[float]
    deletions: dict[int, int] = field(default_factory=dict)
    alpha: float = 0.0
    n_image: int = 0


def _dims(model: Any) -> tuple[int, int, int, int]:
    tc = getattr(model.config, "text_config", model.config)
    heads = tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    kv = getattr(tc, "num_key_value_heads", None) or heads
    return tc.num_hidden_layers, tc.hidden_size, kv * head_dim, tc.intermediate_size


def _scores(model: Any, inputs: Mapping[str, Any], stages: Mapping[int, int | float]
            ) -> tuple[dict[int, torch.Tensor], list[dict[str, Any]]]:
    """One forward of the sample with FitPrune stages ``{stage layer: keep}``: the ``[2, n]`` self / cross attention
    mass its image tokens got in layer ``l`` for every stage at ``l + 1`` (``{l: scores}``), and ``vtok.stats``'
    per-image records. A stage keeping every token (its current count, or 1.0) only exposes its scores."""
    from vtok.hooks.hf import stats, wrapped

    layers = sorted(stages)
    with torch.no_grad(), wrapped(model, "fitprune", [stages[ly] for ly in layers], layer=layers):
        model(**inputs, use_cache=False)
        per_image = stats(model)["per_image"]
        got = model._vtok_runtime.state.per_record("self_cross_attn")  # per stage layer, per record
        scores = {ly - 1: next(iter(got[ly].values())) for ly in layers if got.get(ly)}  # the one image's
    return scores, per_image


def _fit(model: Any, samples: Sequence[Mapping[str, Any]], n_image: list[int], ref: list[torch.Tensor],
         alpha: float, budget: float) -> tuple[bool, dict[int, int]]:
    """One pass of the authors' ``fit_model``: ``(budget reached, deletions per layer summed over samples)``."""
    layers, hidden, kv, ffn = _dims(model)
    counts = list(n_image)
    used = [0.0] * len(samples)
    schedules: list[dict[int, int]] = [{} for _ in samples]  # per sample: stage layer -> tokens left
    dropped = {i: 0 for i in range(layers)}
    for layer in range(layers):
        for s, n in enumerate(counts):
            used[s] += layer_flops(n, hidden, kv, ffn)[0]
        if budget_reached(counts, layer, used, layers, hidden, kv, ffn, budget):
            return True, dropped
        for s, inputs in enumerate(samples):
            d = 0
            if layer + 1 < layers and counts[s] > 1:
                sc = _scores(model, inputs, {**schedules[s], layer + 1: counts[s]})[0][layer]
                w_self, w_cross = float(ref[s][layer, 0]), float(ref[s][layer, 1])
                # the two threshold sets: the lowest deletion_count tokens by each score; the drop is their overlap
                low_self = set(torch.sort(sc[0].double(), stable=True).indices[:deletion_count(sc[0], w_self, alpha)]
                               .tolist())
                low_cross = torch.sort(sc[1].double(), stable=True).indices[:deletion_count(sc[1], w_cross, alpha)]
                d = len(low_self.intersection(low_cross.tolist()))
            if d:
                counts[s] -= d
                schedules[s][layer + 1] = counts[s]
                dropped[layer] += d
            used[s] += layer_flops(counts[s], hidden, kv, ffn)[1]
    return False, dropped


def fit_fitprune(model: Any, samples: Sequence[Mapping[str, Any]], reduction: float, *, tol: float = 0.01
                 ) -> FitSchedule:
    """Fit FitPrune's per-layer recipe for a FLOPs ``reduction`` (of the visual tokens' LLM FLOPs, e.g. 0.6) on
    calibration ``samples`` (processor outputs, one prompt with one image each; the paper uses ~655 LLaVA
    instruction samples, a few already give a usable recipe). Binary search of ``α`` in ``[0, 1]`` to ``tol``.

    Raises:
        ValueError: ``reduction`` outside ``(0, 1)``, no samples, a sample without exactly one image.
    """
    if not 0.0 < float(reduction) < 1.0:
        raise ValueError(f"reduction must be in (0, 1), got {reduction}")
    if not samples:
        raise ValueError("samples must hold at least one calibration prompt")
    layers, hidden, kv, ffn = _dims(model)
    if layers < 2:
        raise ValueError(f"fit_fitprune needs a language model of >= 2 layers, got {layers}")
    n_image, ref = [], []  # per sample: its image tokens; the unpruned model's [layers, 2] attention masses
    for inputs in samples:
        scores, per = _scores(model, inputs, dict.fromkeys(range(1, layers), 1.0))
        if len(per) != 1 or per[0]["video"]:
            raise ValueError("fit_fitprune: each calibration sample must be one prompt with exactly one image (LLaVA, "
                             f"LLaVA-OneVision, Qwen2-VL / 2.5-VL single images); got {len(per)} image records")
        n_image.append(int(per[0]["before"]))
        ref.append(torch.stack([scores[ly].sum(1) for ly in range(layers - 1)] + [torch.zeros(2)]))
    origin = sum(layers * sum(layer_flops(n, hidden, kv, ffn)) for n in n_image) / len(n_image)
    budget = origin * (1.0 - float(reduction))
    lo, hi = 0.0, 1.0
    best: tuple[float, dict[int, int]] | None = None
    while hi - lo > tol + 1e-6:
        mid = (lo + hi) / 2
        reached, dropped = _fit(model, samples, n_image, ref, mid, budget)
        if reached:
            hi, best = mid, (mid, dropped)
        else:
            lo = mid
    if best is None:
        _, dropped = _fit(model, samples, n_image, ref, hi, budget)
        best = (hi, dropped)
    alpha, dropped = best
    per_layer = {ly: d // len(samples) for ly, d in dropped.items()}  # their round(scheme[i] // len)
    n_ref = round(sum(n_image) / len(n_image))
    out_layers, keep, left = [], [], n_ref
    for ly in sorted(per_layer):
        if per_layer[ly] and ly + 1 < layers:
            left -= per_layer[ly]
            out_layers.append(ly + 1)
            keep.append(max(left, 1) / n_ref)
    return FitSchedule(out_layers, keep, per_layer, alpha, n_ref)
