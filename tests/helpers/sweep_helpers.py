"""Shared pieces of the sweep tests: a random-weight eval-ViT checkpoint and a tiny-LLaVA prompts file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vtok.bench.eval_vit import build_eval_vit, save_eval_vit


def vit_checkpoint(folder: Path) -> Path:
    """The eval ViT's architecture with seeded random weights, saved like the committed checkpoint."""
    path = folder / "vit.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        save_eval_vit(build_eval_vit(), path)
    return path


def prompts_file(folder: Path, n: int = 2) -> Path:
    """A prompts file for the tiny LLaVA (scikit-image photos: no download)."""
    path = folder / "prompts.jsonl"
    rows = [{"prompt": "USER: <image> describe the image ASSISTANT:", "image": "skimage:astronaut"},
            {"prompt": "USER: <image> what is in the image ? ASSISTANT:", "image": "skimage:chelsea"}][:n]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def comparable(rows: list[dict]) -> dict[str, tuple]:
    """id -> (cell, metrics, error): everything in a row but wall-clock timing, versions and host."""
    return {r["id"]: (r["cell"], r["metrics"], r.get("error")) for r in rows}


def failing_eval_vit():
    """The registered ``eval_vit_failing`` task: ``eval_vit`` whose ``inside`` forward raises ``RuntimeError`` for
    the methods in ``.fail`` (in whatever process runs the shard: a Ray worker too, the task travels with it)."""
    from vtok.sweep import TASKS, register_task
    from vtok.sweep.vit_task import EvalVit

    class EvalVitFailing(EvalVit):
        name = "eval_vit_failing"
        fail: frozenset[str] = frozenset()

        def run(self, cells, progress):
            import vtok.sweep.vit as vit

            real, fail = vit.inside_logits, self.fail

            def inside_logits(model, method, *args, **kwargs):
                if method in fail:
                    raise RuntimeError(f"told to fail: {method}")
                return real(model, method, *args, **kwargs)

            vit.inside_logits = inside_logits
            try:
                yield from super().run(cells, progress)
            finally:
                vit.inside_logits = real

    return TASKS.get("eval_vit_failing") or register_task(EvalVitFailing())
