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
