"""Adapter for ``SmolVLMForConditionalGeneration`` (SmolVLM / SmolVLM2): Idefics3's structure (SigLIP tower without
CLS, pixel-shuffle connector, ``text_model``), so ``Idefics3Adapter`` serves it as is (records per crop, an image's
crops sharing its budget; see ``vtok/hooks/hf/idefics3.py``). Video frames come as images (the processor turns each
sampled frame into one global view with a timestamp before it): one record, one image, per frame; no temporal
context (``frames``) is given.
"""

from __future__ import annotations

from vtok.hooks.hf.adapter import register_adapter
from vtok.hooks.hf.idefics3 import Idefics3Adapter


@register_adapter
class SmolVLMAdapter(Idefics3Adapter):
    """SmolVLM: Idefics3's layout and hooks."""

    names = ("SmolVLMForConditionalGeneration",)
