"""Tiny checkpoint folders of every family (``vtok.hooks.hf.tiny.folders``): read back with ``from_pretrained``, the
family's own processor and chat template on real photos, wrapped / unwrapped, the demo and the ``hf_vlm`` sweep task
on them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vtok
from vtok.hooks.hf.tiny.folders import FOLDER_FAMILIES, build_tiny_folder

ROOT = Path(__file__).resolve().parents[2]
PROCESSORS = {"qwen3_vl": "Qwen3VLProcessor", "gemma3": "Gemma3Processor", "internvl": "InternVLProcessor",
              "smolvlm": "SmolVLMProcessor"}
MODELS = {"qwen3_vl": "Qwen3VLForConditionalGeneration", "gemma3": "Gemma3ForConditionalGeneration",
          "internvl": "InternVLForConditionalGeneration", "smolvlm": "SmolVLMForConditionalGeneration"}
IMAGE_TOKENS = {"qwen3_vl": "<|image_pad|>", "gemma3": "<image_soft_token>", "internvl": "<IMG_CONTEXT>",
                "smolvlm": "<image>"}
FAMILIES = sorted(PROCESSORS)


def _needs(family: str) -> None:
    import transformers

    if not hasattr(transformers, PROCESSORS[family]):
        pytest.skip(f"transformers {transformers.__version__} has no {PROCESSORS[family]}")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> its tiny checkpoint folder (built once per module)."""
    root = tmp_path_factory.mktemp("folders")
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        _needs(family)
        if family not in made:
            made[family] = build_tiny_folder(family, root / family)
        return made[family]

    return get


def _load(path: Path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoProcessor.from_pretrained(path), AutoModelForImageTextToText.from_pretrained(path).eval()


def _chat(processor, question: str = "describe the image") -> str:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True)


def _inputs(processor):
    from skimage import data

    texts = [_chat(processor), _chat(processor, "what is in the image ?")]
    return processor(images=[[data.astronaut()], [data.chelsea()]], text=texts, return_tensors="pt", padding=True)


def test_folder_families_and_unknown_family_refused(tmp_path):
    assert set(FOLDER_FAMILIES) == {"llava", *FAMILIES}
    with pytest.raises(ValueError, match="family must be one of"):
        build_tiny_folder("bogus", tmp_path / "x")


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_loads_and_processor_inputs_run(folders, family):
    path = folders(family)
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    processor, model = _load(path)
    assert type(processor).__name__ == PROCESSORS[family] and type(model).__name__ == MODELS[family]
    text = _chat(processor)
    assert "describe the image" in text
    inputs = _inputs(processor)
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKENS[family])
    assert image_id == model.config.image_token_id
    per = (inputs["input_ids"] == image_id).sum(1).tolist()
    assert all(n > 0 and n % 4 == 0 for n in per), per
    assert (inputs["input_ids"] == processor.tokenizer.unk_token_id).sum() == 0  # every word is in the vocabulary
    with torch.no_grad():
        out = model(**inputs)
        gen = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(out.logits).all()
    assert gen.shape == (2, inputs["input_ids"].shape[1] + 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_wrap_prunes_what_stats_says_and_unwrap_is_bit_exact(folders, family):
    processor, model = _load(folders(family))
    inputs = _inputs(processor)
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKENS[family])
    visual = (inputs["input_ids"] == image_id).sum(1).tolist()
    with torch.no_grad():
        ref = model(**inputs).logits
        for layer in (None, 1):
            vtok.wrap(model, "random", 0.5, layer=layer)
            out = model(**inputs).logits
            per = vtok.stats(model)["per_sample"]
            assert [d["visual_before"] for d in per] == visual, layer
            assert [d["visual_after"] for d in per] == [n // 2 for n in visual], layer
            for d in per:
                assert d["prompt_tokens_before"] - d["prompt_tokens_after"] == d["visual_before"] - d["visual_after"]
            assert not torch.equal(out[:, -1], ref[:, -1]), layer  # pruning changes the logits
            vtok.unwrap(model)
            assert torch.equal(model(**inputs).logits, ref), layer


@pytest.mark.parametrize("family", FAMILIES)
def test_demo_runs_on_the_family(family, tmp_path):
    _needs(family)
    out = subprocess.run([sys.executable, str(ROOT / "demos" / "wrap_vlm.py"), "--family", family, "--out",
                          str(tmp_path / family), "--image-size", "112", "--methods", "random",
                          "--max-new-tokens", "2"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split()[0]: line for line in out.stdout.splitlines() if line.strip()}
    assert "random" in rows and "fastv" in rows and "→" in rows["random"], out.stdout
    assert "generated (unpruned):" in out.stdout
    assert (tmp_path / family / "config.json").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_vlm_sweep_runs_one_cell_on_the_folder(folders, family, tmp_path):
    from vtok.sweep import load_config, run_sweep

    path = folders(family)
    processor, _ = _load(path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": _chat(processor), "image": "skimage:astronaut"}) + "\n")
    cfg = load_config({"tasks": ["hf_vlm"], "models": [str(path)], "methods": ["random"], "keeps": [0.5],
                       "task_options": {"hf_vlm": {"prompts": str(prompts), "max_new_tokens": 2}}})
    rows = run_sweep(cfg, str(tmp_path / "r.jsonl"), show_progress=False).rows
    assert len(rows) == 1 and not rows[0].get("error"), rows
    m = rows[0]["metrics"]
    assert m["n"] == 1 and m["tokens"] > 0 and m["kept_tokens"] == m["tokens"] // 2
    assert 0.0 <= m["token_agreement"] <= 1.0 and m["logit_kl"] >= 0.0
