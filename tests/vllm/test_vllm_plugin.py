"""vtok's vLLM plugin on vLLM's CPU build (``make test-vllm``, in ``.venv-vllm``; skipped where vLLM is absent).

Tiny random-weight float32 LLaVA (576 image tokens), Qwen2.5-VL (4 to 64 image tokens, 3-D M-RoPE; videos) and Qwen3-VL
(DeepStack, interleaved M-RoPE) from ``vtok.integrations.vllm.tiny``, the same weights on both engines. Each vLLM engine
runs in its own process (``tests/vllm/engine.py``); the Hugging Face side (``vtok.wrap``) runs here, in the same venv.
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

from tests.vllm.engine import MAX_TOKENS, clip_metadata, image, video  # noqa: E402
from vtok.budget import resolve_k  # noqa: E402
from vtok.integrations.vllm import read  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
_Q = "<|im_start|>user \n {} <|im_end|> \n <|im_start|>assistant \n"
_QI = "<|vision_start|> <|image_pad|> <|vision_end|>"
PROMPTS = {
    "llava": [
        {"text": "USER: <image> describe the image ASSISTANT:", "images": [[336, 336, 0]]},
        {"text": "USER: what is in the photo ? ASSISTANT:"},
        {"text": "USER: <image> what is left of the cat ? ASSISTANT:", "images": [[200, 300, 1]]},
        {"text": "USER: <image> and <image> where is the person ? ASSISTANT:",
         "images": [[336, 336, 2], [120, 160, 3]]},
    ],
    "qwen2_5_vl": [  # images of 7 x 5, 2 x 3, 8 x 8 and 4 x 6 merged tokens
        {"text": _Q.format(f"{_QI} describe the image"), "images": [[200, 150, 0]]},
        {"text": _Q.format("what is in the photo ?")},
        {"text": _Q.format(f"{_QI} what is left of the cat ?"), "images": [[60, 90, 1]]},
        {"text": _Q.format(f"{_QI} and {_QI} where is the person ?"), "images": [[224, 224, 2], [120, 160, 3]]},
    ],
}
_QV = "<|vision_start|> <|video_pad|> <|vision_end|>"
# videos through Qwen2.5-VL (fps 2, temporal patch 2): 4 x 4 x 3 and 2 x 2 x 4 merged tokens, one beside an image
PROMPTS["qwen2_5_vl_video"] = [
    {"text": _Q.format(f"{_QV} what happens ?"), "videos": [[8, 112, 84, 5]]},
    {"text": _Q.format(f"{_QI} then {_QV} where is the cat ?"), "images": [[60, 90, 1]], "videos": [[4, 56, 112, 6]]},
]
PROMPTS["qwen3_vl"] = PROMPTS["qwen2_5_vl"]
PROMPTS["qwen3_vl_video"] = PROMPTS["qwen2_5_vl_video"]
LIMITS = {"llava": {"image": 2}, "qwen2_5_vl": {"image": 2, "video": 0}, "qwen2_5_vl_video": {"image": 1, "video": 1},
          "qwen3_vl": {"image": 2, "video": 0}, "qwen3_vl_video": {"image": 1, "video": 1}}
FAMILIES = ["llava", "qwen2_5_vl", "qwen3_vl"]
LOGPROB_ATOL = 1e-3  # float32, two engines' kernels


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Per family ``(hf_folder, vllm_folder)``: the same weights (LLaVA's tower renamed for vLLM)."""
    from vtok.integrations.vllm.tiny import build_tiny_qwen2_5_vl, build_tiny_qwen3_vl, tiny_llava_pair

    qwen = build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_qwen2_5_vl"))
    qwen3 = build_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny_qwen3_vl"))
    return {"llava": tiny_llava_pair(tmp_path_factory.mktemp("tiny_llava")), "qwen2_5_vl": (qwen, qwen),
            "qwen2_5_vl_video": (qwen, qwen), "qwen3_vl": (qwen3, qwen3), "qwen3_vl_video": (qwen3, qwen3)}


@cache
def _engine(family: str, model: str, overrides: str | None) -> dict:
    prompts = PROMPTS[family]
    # run 0: the batch of all four (mixed: text-only, one image, two images, different sizes); runs 1..4: one by one
    spec = {"model": model, "overrides": json.loads(overrides) if overrides else None,
            "runs": [prompts] + [[p] for p in prompts], "limit_mm_per_prompt": LIMITS[family]}
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run([sys.executable, "-m", "tests.vllm.engine", json.dumps(spec)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("VTOK_RESULT ")]
    if not lines:
        raise AssertionError(f"engine process failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("VTOK_RESULT "):])


def engine(folders, family: str, overrides: dict | None) -> dict:
    return _engine(family, str(folders[family][1]), json.dumps(overrides, sort_keys=True) if overrides else None)


def ok_engine(folders, family: str, overrides: dict | None) -> dict:
    res = engine(folders, family, overrides)
    assert res["ok"], res.get("error")
    return res


@cache
def _hf(family: str, folder: str, method: str | None, keep: float | None) -> list[dict]:
    """Greedy tokens and their log-probabilities from Hugging Face ``generate`` with ``vtok.wrap(model, method,
    keep)`` (its default positions rule) on each prompt alone."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import vtok

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # as vLLM's ignore_eos: always MAX_TOKENS tokens
    proc = AutoProcessor.from_pretrained(folder)
    if method is not None:
        vtok.wrap(model, method, keep=keep)
    out = []
    for p in PROMPTS[family]:
        imgs = [image(*im) for im in p.get("images", [])]
        clips = [video(*v) for v in p.get("videos", [])]
        extra = ({"videos": clips, "do_sample_frames": False, "video_metadata": [hf_metadata(len(c)) for c in clips]}
                 if clips else {})
        inputs = proc(images=imgs or None, text=[p["text"]], return_tensors="pt", **extra)
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
        ids = gen.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        lps = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(gen.scores, ids, strict=True)]
        n_prompt = inputs["input_ids"].shape[1]
        if method is not None:  # the pruned prompt the language model saw
            grids = ([(24, 24)] * len(imgs) if family == "llava" else
                     [(h // 2, w // 2) for _, h, w in inputs["image_grid_thw"].tolist()] if imgs else [])
            n_prompt -= sum(g[0] * g[1] - vtok.retained_count(method, g[0] * g[1], keep, grid=g) for g in grids)
            sizes = [t * h * w // 4 for t, h, w in inputs["video_grid_thw"].tolist()] if clips else []
            n_prompt -= sum(n - resolve_k(keep, n) for n in sizes)
        out.append({"ids": ids, "logprobs": lps, "prompt_len": n_prompt})
    return out


def hf_metadata(t: int) -> dict:
    """The engine's clip metadata in the fields transformers' ``VideoMetadata`` takes (same fps and frames)."""
    meta = clip_metadata(t)
    return {key: meta[key] for key in ("fps", "duration", "total_num_frames", "frames_indices")}


def hf(folders, family: str, method: str | None, keep: float | None) -> list[dict]:
    return _hf(family, str(folders[family][0]), method, keep)


def same(a: dict, b: dict) -> None:
    assert a["ids"] == b["ids"]
    assert a["prompt_len"] == b["prompt_len"]
    torch.testing.assert_close(torch.tensor(a["logprobs"]), torch.tensor(b["logprobs"]), rtol=0, atol=LOGPROB_ATOL)


def test_plugin_entry_point_is_registered():
    import importlib.metadata as md

    eps = {ep.name: ep.value for ep in md.entry_points(group="vllm.general_plugins")}
    assert eps.get("vtok") == "vtok.integrations.vllm:register"


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_one_is_vllm_unpruned_output_exactly(folders, family):
    base = ok_engine(folders, family, None)
    for method in ("divprune", "random", "pool2d") if family == "llava" else ("divprune",):
        full = ok_engine(folders, family, {"vtok_method": method, "vtok_keep": 1.0})
        assert full["runs"] == base["runs"]  # token ids, prompt lengths and log-probabilities, bit for bit


@pytest.mark.parametrize("family", FAMILIES)
def test_unpruned_vllm_matches_hf(folders, family):
    base = ok_engine(folders, family, None)
    for got, want in zip(base["runs"][1:], hf(folders, family, None, None), strict=True):
        same(got[0], want)


@pytest.mark.parametrize(("family", "method"), [(f, m) for f in FAMILIES for m in ("random", "pool2d", "divprune",
                                                                                  "visionzip")]
                         + [("llava", "cls_attn")] + [("qwen2_5_vl_video", m) for m in ("evs", "holitom", "divprune")])
def test_pruned_equals_hf_wrap(folders, family, method):
    """The cross-engine equivalence: vLLM + plugin == Hugging Face + vtok.wrap (same method, keep, positions).
    Attention methods read the tower's attention (LLaVA: the CLS row; Qwen: the attention received in the last
    full-attention block; VisionZip also the keys), recomputed on both sides; Qwen3-VL's DeepStack features follow
    the kept tokens. Videos: a temporal method without (``evs``) and with (``holitom``) the tower's attention, and an
    image method on the flattened tokens."""
    res = ok_engine(folders, family, {"vtok_method": method, "vtok_keep": 0.25})
    want = hf(folders, family, method, 0.25)
    for got, w in zip(res["runs"][1:], want, strict=True):
        same(got[0], w)
    unpruned = ok_engine(folders, family, None)
    assert res["runs"][1][0]["prompt_len"] < unpruned["runs"][1][0]["prompt_len"]  # placeholders shrank
    assert res["runs"][1][0]["logprobs"] != unpruned["runs"][1][0]["logprobs"]  # pruning changed the output


def test_qwen_positions_rule_is_checked(folders):
    """The equivalence above pins the positions rule: vtok.wrap with kept tokens at their unpruned M-RoPE ids
    (``positions="original"``) gives other log-probabilities than the plugin, which follows ``"reindex"`` (pool2d:
    the pooled tokens sit at the first cell of their windows, so the image spans fewer positions than its grid)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import vtok

    folder = str(folders["qwen2_5_vl"][0])
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(folder)
    p = PROMPTS["qwen2_5_vl"][0]
    inputs = proc(images=[image(*p["images"][0])], text=[p["text"]], return_tensors="pt")
    vtok.wrap(model, "pool2d", keep=0.25, positions="original")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    first = torch.log_softmax(logits.float(), -1).max().item()
    res = ok_engine(folders, "qwen2_5_vl", {"vtok_method": "pool2d", "vtok_keep": 0.25})
    assert abs(first - res["runs"][1][0]["logprobs"][0]) > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_equals_one_by_one(folders, family):
    res = ok_engine(folders, family, {"vtok_method": "divprune", "vtok_keep": 0.25})
    batch, alone = res["runs"][0], [r[0] for r in res["runs"][1:]]
    for b, a in zip(batch, alone, strict=True):
        same(b, a)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"vtok_method": "no_such_method", "vtok_keep": 0.25}, "unknown vtok_method 'no_such_method'"),
    ({"vtok_method": "random", "vtok_keep": 1.5}, "vtok_keep must be a ratio in (0, 1]"),
    ({"vtok_method": "random", "vtok_keep": 0.0}, "vtok_keep must be a ratio in (0, 1]"),
    ({"vtok_method": "hiprune", "vtok_keep": 0.25}, "needs context the plugin cannot supply on llava: ['mid_attn']"),
    ({"vtok_method": "fastv", "vtok_keep": 0.25}, "needs context the plugin cannot supply on llava: ['text_attn']"),
    ({"vtok_method": "cdpruner", "vtok_keep": 0.25}, "reads optional context ['query', 'relevance_features']"),
    ({"vtok_method": "random", "vtok_keep": 0.25, "vtok_options": {"sed": 1}}, "unknown option(s) ['sed']"),
    ({"vtok_keep": 0.25}, "vtok_method is not"),
])
def test_bad_settings_fail_at_startup(folders, overrides, message):
    res = engine(folders, "llava", overrides)
    assert not res["ok"]
    assert "vtok:" in res["error"] and message in res["error"], res["error"]


def test_video_keep_one_is_vllm_unpruned_output_exactly(folders):
    """Videos (and an image beside one) at keep 1.0 through the plugin: vLLM's own output bit for bit. (Unpruned
    vLLM and Hugging Face differ on videos: transformers 5.x advances the text after a video by ``max(h, w)`` of
    its grid, vLLM and transformers 4.x by its largest position offset, temporal included; with pruning both
    engines follow vtok's "reindex", the second rule, and agree above.)"""
    base = ok_engine(folders, "qwen2_5_vl_video", None)
    full = ok_engine(folders, "qwen2_5_vl_video", {"vtok_method": "evs", "vtok_keep": 1.0})
    assert full["runs"] == base["runs"]


def test_qwen3_videos_pass_unpruned(folders):
    """Qwen3-VL: videos (one run per temporal patch, timestamps between) pass unpruned while images are pruned; a
    video alone gives vLLM's own output, and beside an image only the image's placeholders shrink."""
    base = ok_engine(folders, "qwen3_vl_video", None)
    res = ok_engine(folders, "qwen3_vl_video", {"vtok_method": "divprune", "vtok_keep": 0.25})
    assert res["runs"][1] == base["runs"][1]
    n_image = 3 * 2  # the 60 x 90 image: 3 x 2 merged tokens
    assert res["runs"][2][0]["prompt_len"] == base["runs"][2][0]["prompt_len"] - (n_image - resolve_k(0.25, n_image))


def test_video_refuses_a_grid_method_clearly(folders):
    res = engine(folders, "qwen2_5_vl_video", {"vtok_method": "pool2d", "vtok_keep": 0.25})
    assert not res["ok"]
    assert "vtok: vtok_method 'pool2d' needs an image grid and cannot prune a video" in res["error"], res["error"]


@pytest.mark.parametrize(("method", "message"), [
    ("downsample", "it resizes the image before Qwen's vision tower"),
    ("hiprune", "needs context the plugin cannot supply on qwen2_5_vl: ['mid_attn']"),
    ("query_budget", "reads optional context ['frame_scores', 'query']"),
])
def test_qwen_refusals_at_startup(folders, method, message):
    res = engine(folders, "qwen2_5_vl", {"vtok_method": method, "vtok_keep": 0.25})
    assert not res["ok"]
    assert f"vtok: vtok_method '{method}' is not available" in res["error"] and message in res["error"], res["error"]


def test_serve_flag_reaches_the_config(folders):
    """``vllm serve MODEL --hf-overrides '{...}'``: the CLI form lands on the config the plugin reads."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", str(folders["llava"][1]), "--dtype", "float32", "--hf-overrides",
                              '{"vtok_method": "divprune", "vtok_keep": 0.25, "vtok_options": {}}'])
    cfg = EngineArgs.from_cli_args(args).create_model_config()
    assert read(cfg.hf_config, "llava") == read(type("C", (), {"vtok_method": "divprune", "vtok_keep": 0.25}),
                                                "llava")
