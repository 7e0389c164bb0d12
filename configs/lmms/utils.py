"""Hooks of the lmms-eval smoke tasks ``vtok_scenes_gen`` / ``vtok_scenes_mc`` (``!function utils.…`` in the YAMLs)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
# the answers a question type allows (vtok.bench.vlm_task): the multiple-choice options
CHOICES = {"relation": ["yes", "no"], "count": ["0", "1", "2", "3", "4"], "locate": ["1", "2", "3", "4"]}


def doc_to_visual(doc: dict) -> list[Image.Image]:
    """The doc's scene (a 112×112 grey PNG beside this file) as one RGB image."""
    return [Image.open(HERE / doc["image"]).convert("RGB")]


def doc_to_choice(doc: dict) -> list[str]:
    return CHOICES[doc["qtype"]]
