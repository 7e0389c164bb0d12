"""Sweep tasks on an HF VLM folder (the tiny random LLaVA) and the lmms-eval plugin without lmms-eval."""

from __future__ import annotations

import importlib
import math
import sys
import types
from dataclasses import dataclass
from importlib.metadata import entry_points

import numpy as np
import pytest
from PIL import Image
from sweep_helpers import prompts_file

import vtok
from vtok.sweep import lmms_plugin as plugin
from vtok.sweep import load_config, run_sweep


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from vtok.hooks.hf.tiny import build_tiny_llava

    folder = tmp_path_factory.mktemp("vlm")
    return str(build_tiny_llava(folder / "llava", image_size=112)), str(prompts_file(folder))


def test_hf_vlm_agreement_kl_and_prefill_ratios(tiny, tmp_path):
    model, prompts = tiny
    opts = {"hf_vlm": {"prompts": prompts, "max_new_tokens": 4}, "hf_vlm_timing": {"prompts": prompts, "rounds": 1}}
    pre = load_config({"tasks": ["hf_vlm", "hf_vlm_timing"], "models": [model], "methods": ["divprune"],
                       "keeps": [1.0, 0.25], "task_options": opts})
    rows = run_sweep(pre, str(tmp_path / "r.jsonl"), show_progress=False).rows
    fastv = load_config({"tasks": ["hf_vlm"], "models": [model], "methods": ["fastv"], "keeps": [0.25],
                         "placements": ["llm:1"], "task_options": {"hf_vlm": opts["hf_vlm"]}})
    rows += run_sweep(fastv, str(tmp_path / "r.jsonl"), show_progress=False).rows[-1:]
    by = {(r["cell"]["task"], r["cell"]["method"], r["cell"]["keep"]): r["metrics"] for r in rows}
    full = by["hf_vlm", "divprune", 1.0]
    assert full["token_agreement"] == 1.0 and full["exact_match"] == 1.0 and full["logit_kl"] < 1e-6
    assert full["kept_tokens"] == full["tokens"] == 64 and full["n"] == 2
    for key in (("hf_vlm", "divprune", 0.25), ("hf_vlm", "fastv", 0.25)):
        m = by[key]
        assert m["kept_tokens"] == 16 and 0.0 <= m["token_agreement"] <= 1.0 and m["logit_kl"] >= 0.0
    assert by["hf_vlm", "divprune", 0.25]["logit_kl"] > 0.0  # pruning 3/4 of the image changes the logits
    t = by["hf_vlm_timing", "divprune", 0.25]
    assert t["kept_tokens"] == 16 and t["flops_ratio"] < 1.0
    assert by["hf_vlm_timing", "divprune", 1.0]["flops_ratio"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ lmms-eval plugin


def test_model_args_parsing_and_checks():
    args = plugin.parse_model_args("pretrained=/m/llava,method=divprune,keep=0.25,layer=2,verbose=true,name=x")
    assert args == {"pretrained": "/m/llava", "method": "divprune", "keep": 0.25, "layer": 2, "verbose": True,
                    "name": "x"}
    assert plugin.parse_model_args("keep=64")["keep"] == 64 and plugin.parse_model_args("") == {}
    assert plugin.check_args("fastv", 0.5, 2) == ("fastv", 0.5, 2)
    assert plugin.check_args("none", 1.0, "pre_llm") == ("none", 1.0, None)
    with pytest.raises(ValueError, match=r"model_args: expected KEY=VALUE, got 'keep'"):
        plugin.parse_model_args("method=divprune,keep")
    with pytest.raises(ValueError, match=r"model_args method: unknown method 'nope'"):
        plugin.check_args("nope", 0.5, None)
    with pytest.raises(ValueError, match=r"model_args keep: keeps: 1.5 is out of range"):
        plugin.check_args("divprune", 1.5, None)
    with pytest.raises(ValueError, match=r"model_args layer: .* got -1"):
        plugin.check_args("divprune", 0.5, -1)


def test_entry_point_is_registered():
    eps = [e for e in entry_points(group="lmms_eval.models") if e.name == plugin.MODEL_ID]
    assert len(eps) == 1 and eps[0].value == "vtok.sweep.lmms_plugin:manifest"
    assert eps[0].load() is plugin.manifest


@pytest.mark.skipif(plugin.HAVE_LMMS_EVAL, reason="lmms-eval is installed")
def test_manifest_without_lmms_eval_says_how_to_install():
    with pytest.raises(ImportError, match=r"pip install 'vtok\[lmms\]'"):
        plugin.manifest()


@pytest.fixture
def stub_lmms_eval(monkeypatch):
    """Minimal stand-ins for the two lmms-eval modules the plugin imports (lmms-eval itself is not installed)."""
    api_model = types.ModuleType("lmms_eval.api.model")

    class lmms:  # noqa: N801 - lmms-eval's name
        def __init__(self):
            self._rank, self._world_size, self.task_dict = 0, 1, {}

    api_model.lmms = lmms
    registry = types.ModuleType("lmms_eval.models.registry_v2")

    @dataclass(frozen=True)
    class ModelManifest:
        model_id: str
        simple_class_path: str | None = None
        chat_class_path: str | None = None
        aliases: tuple = ()

    registry.ModelManifest = ModelManifest
    for name, mod in {"lmms_eval": types.ModuleType("lmms_eval"), "lmms_eval.api": types.ModuleType("lmms_eval.api"),
                      "lmms_eval.api.model": api_model, "lmms_eval.models": types.ModuleType("lmms_eval.models"),
                      "lmms_eval.models.registry_v2": registry}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    yield importlib.reload(plugin), lmms, ModelManifest
    monkeypatch.undo()
    importlib.reload(plugin)


def test_registers_on_lmms_eval_and_generates(stub_lmms_eval, tiny):
    mod, lmms, ModelManifest = stub_lmms_eval
    assert mod.HAVE_LMMS_EVAL and issubclass(mod.VtokHF, lmms)
    man = mod.manifest()
    assert isinstance(man, ModelManifest) and man.model_id == "vtok_hf"
    path, cls = man.simple_class_path.rsplit(".", 1)
    assert getattr(importlib.import_module(path), cls).__name__ == "VtokHF"

    model_path, _ = tiny
    lm = mod.VtokHF.create_from_arg_string(f"pretrained={model_path},method=divprune,keep=0.25,max_new_tokens=3")
    assert lm._rank == 0 and vtok.stats(lm.model) is not None  # lmms base initialised; the model is wrapped
    image = Image.fromarray(np.full((112, 112, 3), 128, np.uint8))
    lm.task_dict = {"t": {"test": [{"image": image}]}}

    @dataclass
    class Req:
        args: tuple

    to_visual = lambda doc: [doc["image"]]  # noqa: E731
    out = lm.generate_until([Req(("describe the image", {"max_new_tokens": 3, "until": ["\n\n"]}, to_visual, 0, "t",
                                  "test"))])
    assert len(out) == 1 and isinstance(out[0], str)
    st = vtok.stats(lm.model)["per_image"]
    assert [(d["image"], d["before"], d["after"]) for d in st] == [(0, 64, 16)]
    [(loss, greedy)] = lm.loglikelihood([Req(("describe the", " image", to_visual, 0, "t", "test"))])
    assert math.isfinite(loss) and loss > 0 and isinstance(greedy, bool)  # a loss: lmms-eval takes the lowest
    with pytest.raises(NotImplementedError):
        lm.generate_until_multi_round([])
