"""vtok's vLLM plugin on vLLM's CPU build (``make test-vllm``, in ``.venv-vllm``; skipped where vLLM is absent).

Tiny random-weight float32 LLaVA (576 image tokens, ``vtok.integrations.vllm.tiny``): the same weights in a Hugging
Face folder and a vLLM folder. Each engine runs in its own process (``tests/vllm/engine.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from tests.vllm.engine import MAX_TOKENS, image  # noqa: E402
from vtok.integrations.vllm import read, supported_methods  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
IMG = {"text": "USER: <image> describe the image ASSISTANT:", "images": [[336, 336, 0]]}
TEXT = {"text": "USER: what is in the photo ? ASSISTANT:"}
SMALL = {"text": "USER: <image> what is left of the cat ? ASSISTANT:", "images": [[200, 300, 1]]}
TWO = {"text": "USER: <image> and <image> where is the person ? ASSISTANT:", "images": [[336, 336, 2], [120, 160, 3]]}
PROMPTS = [IMG, TEXT, SMALL, TWO]
# run 0: the batch of all four (mixed: text-only, one image, two images, different sizes); runs 1..4: one by one
RUNS = [PROMPTS] + [[p] for p in PROMPTS]
LOGPROB_ATOL = 1e-3  # float32, two engines' kernels


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    from vtok.integrations.vllm.tiny import tiny_llava_pair

    return tiny_llava_pair(tmp_path_factory.mktemp("tiny_llava"))


@cache
def _engine(model: str, overrides: str | None) -> dict:
    spec = {"model": model, "overrides": json.loads(overrides) if overrides else None, "runs": RUNS}
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run([sys.executable, "-m", "tests.vllm.engine", json.dumps(spec)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("VTOK_RESULT ")]
    if not lines:
        raise AssertionError(f"engine process failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("VTOK_RESULT "):])


def engine(folder: Path, overrides: dict | None) -> dict:
    return _engine(str(folder), json.dumps(overrides, sort_keys=True) if overrides else None)


def ok_engine(folder: Path, overrides: dict | None) -> dict:
    res = engine(folder, overrides)
    assert res["ok"], res.get("error")
    return res


@cache
def _hf(folder: str, method: str | None, keep: float | None) -> list[dict]:
    """Greedy tokens and their log-probabilities from Hugging Face ``generate`` with ``vtok.wrap(model, method,
    keep)`` (default positions rule) on each prompt alone."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import vtok

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # as vLLM's ignore_eos: always MAX_TOKENS tokens
    proc = AutoProcessor.from_pretrained(folder)
    if method is not None:
        vtok.wrap(model, method, keep=keep)
    out = []
    for p in PROMPTS:
        imgs = [image(*im) for im in p.get("images", [])]
        inputs = proc(images=imgs or None, text=[p["text"]], return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
        ids = gen.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        lps = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(gen.scores, ids, strict=True)]
        n_prompt = inputs["input_ids"].shape[1]
        if method is not None:  # the pruned prompt the language model saw (LLaVA: 576 tokens per image)
            n_prompt -= len(imgs) * (576 - vtok.retained_count(method, 576, keep, grid=(24, 24)))
        out.append({"ids": ids, "logprobs": lps, "prompt_len": n_prompt})
    return out


def hf(folder: Path, method: str | None, keep: float | None) -> list[dict]:
    return _hf(str(folder), method, keep)


def same(a: dict, b: dict) -> None:
    assert a["ids"] == b["ids"]
    assert a["prompt_len"] == b["prompt_len"]
    torch.testing.assert_close(torch.tensor(a["logprobs"]), torch.tensor(b["logprobs"]), rtol=0, atol=LOGPROB_ATOL)


def test_plugin_entry_point_is_registered():
    import importlib.metadata as md

    eps = {ep.name: ep.value for ep in md.entry_points(group="vllm.general_plugins")}
    assert eps.get("vtok") == "vtok.integrations.vllm:register"


def test_keep_one_is_vllm_unpruned_output_exactly(folders):
    _, vl = folders
    base = ok_engine(vl, None)
    for method in ("divprune", "random", "pool2d"):
        full = ok_engine(vl, {"vtok_method": method, "vtok_keep": 1.0})
        assert full["runs"] == base["runs"]  # token ids, prompt lengths and log-probabilities, bit for bit


def test_unpruned_vllm_matches_hf(folders):
    hf_dir, vl = folders
    base = ok_engine(vl, None)
    for got, want in zip(base["runs"][1:], hf(hf_dir, None, None), strict=True):
        same(got[0], want)


@pytest.mark.parametrize("method", ["random", "pool2d", "divprune"])
def test_pruned_equals_hf_wrap(folders, method):
    """The cross-engine equivalence: vLLM + plugin == Hugging Face + vtok.wrap (same method, keep, positions)."""
    hf_dir, vl = folders
    res = ok_engine(vl, {"vtok_method": method, "vtok_keep": 0.25})
    want = hf(hf_dir, method, 0.25)
    for got, w in zip(res["runs"][1:], want, strict=True):
        same(got[0], w)
    assert res["runs"][1][0]["prompt_len"] == 581 - 576 + 144  # the placeholders shrank before the encoder ran
    unpruned = ok_engine(vl, None)
    assert res["runs"][1][0]["logprobs"] != unpruned["runs"][1][0]["logprobs"]  # pruning changed the output


@pytest.mark.parametrize("method", ["divprune", "random"])
def test_mixed_batch_equals_one_by_one(folders, method):
    _, vl = folders
    res = ok_engine(vl, {"vtok_method": method, "vtok_keep": 0.25})
    batch, alone = res["runs"][0], [r[0] for r in res["runs"][1:]]
    for b, a in zip(batch, alone, strict=True):
        same(b, a)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"vtok_method": "no_such_method", "vtok_keep": 0.25}, "unknown vtok_method 'no_such_method'"),
    ({"vtok_method": "random", "vtok_keep": 1.5}, "vtok_keep must be a ratio in (0, 1]"),
    ({"vtok_method": "random", "vtok_keep": 0.0}, "vtok_keep must be a ratio in (0, 1]"),
    ({"vtok_method": "visionzip", "vtok_keep": 0.25}, "needs context the plugin cannot supply: ['cls_attn']"),
    ({"vtok_method": "fastv", "vtok_keep": 0.25}, "needs context the plugin cannot supply: ['text_attn']"),
    ({"vtok_method": "random", "vtok_keep": 0.25, "vtok_options": {"sed": 1}}, "unknown option(s) ['sed']"),
    ({"vtok_keep": 0.25}, "vtok_method is not"),
])
def test_bad_settings_fail_at_startup(folders, overrides, message):
    _, vl = folders
    res = engine(vl, overrides)
    assert not res["ok"]
    assert "vtok:" in res["error"] and message in res["error"], res["error"]


def test_settings_rules():
    assert {"random", "pool2d", "divprune", "uniform", "kmedoids"} <= set(supported_methods("llava"))
    assert "downsample" not in supported_methods("qwen2_5_vl")

    class Cfg:
        vtok_method = "pool2d"
        vtok_keep = 0.25

    s = read(Cfg, "llava")
    assert s.count(576, (24, 24)) == 144
    feats = torch.randn(576, 8)
    out, _ = s.prune(feats, (24, 24))
    assert out.shape == (144, 8)
