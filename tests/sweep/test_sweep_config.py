"""vtok.sweep.config: the grid, and every bad config refused before any cell runs, naming key and value."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from tests.helpers.sweep_helpers import vit_checkpoint
from vtok.cli import app
from vtok.sweep import load_config


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(vit_checkpoint(tmp_path_factory.mktemp("vit")))


def base(ckpt: str, **kw) -> dict:
    cfg = {"tasks": ["eval_vit"], "models": [ckpt], "methods": ["random", "divprune"], "keeps": [0.5, 0.25],
           "task_options": {"eval_vit": {"limit": 4}}}
    cfg.update(kw)
    return cfg


def test_grid_is_the_product_with_stable_unique_ids(ckpt):
    cfg = load_config(base(ckpt, seeds=[0, 1]))
    cells = cfg.cells()
    assert len(cells) == 2 * 2 * 2 * 2  # methods x keeps x placements (inside, after) x seeds
    assert len({c.id for c in cells}) == len(cells)
    assert [c.id for c in load_config(base(ckpt, seeds=[0, 1])).cells()] == [c.id for c in cells]
    assert {c.placement for c in cells} == {"inside", "after"}
    # options are part of a cell's identity: another limit is another cell
    other = load_config(base(ckpt, seeds=[0, 1], task_options={"eval_vit": {"limit": 8}})).cells()
    assert not {c.id for c in other} & {c.id for c in cells}


def test_command_line_overrides_and_comma_lists(ckpt, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"tasks: eval_vit\nmodels: [{ckpt}]\nmethods: [random]\nkeeps: [0.5]\n")
    cfg = load_config(path, methods="uniform,cls_attn", keeps="0.25,49", placements="after")
    assert cfg.methods == ["uniform", "cls_attn"] and cfg.keeps == [0.25, 49] and cfg.placements == ["after"]
    assert len(cfg.cells()) == 4
    path.write_text(path.read_text() + "task_options: {eval_vit: {limit: 4, batch: 2}}\n")
    cfg = load_config(path, task_options={"eval_vit": {"limit": 8}})  # merged option by option
    assert cfg.task_options == {"eval_vit": {"limit": 8, "batch": 2}}


@pytest.mark.parametrize("change, match", [
    ({"methods": ["random", "no_such_method"]}, r"methods: unknown method 'no_such_method'"),
    ({"keeps": [0.5, 1.5]}, r"keeps: 1.5 is out of range"),
    ({"keeps": [0]}, r"keeps: 0 is out of range"),
    ({"keeps": ["half"]}, r"keeps: 'half' is not a number"),
    ({"tasks": ["nope"]}, r"tasks: unknown task 'nope'"),
    ({"tasks": ["real_vlm"], "placements": ["pre_llm"], "task_options": {}},
     r"models: '.*' is not a model of task 'real_vlm'"),
    ({"tasks": ["real_vlm"], "models": ["real_vlm"], "placements": ["llm:2"], "methods": ["dart"],
      "task_options": {"real_vlm": {"n": 0}}}, r"task_options.real_vlm.n: 0 is out of range \(expected an int >= 1\)"),
    ({"task_options": {"eval_vit": {"limit": -5}}}, r"task_options.eval_vit.limit: -5 is out of range"),
    ({"tasks": ["real_vlm"], "models": ["real_vlm"], "placements": ["llm:0"], "methods": ["dart"], "task_options": {}},
     r"methods: 'dart' needs context \['keys'\].*placement 'llm:0'"),
    ({"models": ["/no/such/model.safetensors"]}, r"models: '/no/such/model.safetensors' is not a model of task"),
    ({"methods": ["fastv"]}, r"methods: 'fastv' needs context \['text_attn'\].*placement 'inside'"),
    ({"placements": ["middle"]}, r"placements: 'middle' is not a placement of task 'eval_vit'"),
    ({"task_options": {"eval_vit": {"limt": 3}}}, r"task_options.eval_vit: unknown option\(s\) \['limt'\]"),
    ({"task_options": {"eval_vit": {"batch": "big"}}}, r"task_options.eval_vit.batch: expected an int >= 1, got 'big'"),
    ({"method_options": {"random": {"sed": 1}}}, r"method_options.random: unknown option\(s\) \['sed'\]"),
    ({"seeds": [0.5]}, r"seeds: 0.5 is not an int"),
    ({"shard_size": 0}, r"shard_size: expected an int >= 1, got 0"),
    ({"budgets": [0.5]}, r"config: unknown key\(s\) \['budgets'\]"),
])
def test_bad_config_is_named(ckpt, change, match):
    with pytest.raises(ValueError, match=match):
        load_config(base(ckpt, **change))


def test_vlm_placements_and_prompts_are_checked(tmp_path):
    from vtok.hooks.hf.tiny import build_tiny_llava

    model = build_tiny_llava(tmp_path / "m", image_size=112)
    (tmp_path / "p.jsonl").write_text('{"prompt": "USER: <image> hi ASSISTANT:", "image": "skimage:astronaut"}\n')
    cfg = {"tasks": ["hf_vlm"], "models": [str(model)], "methods": ["divprune"], "keeps": [0.5],
           "task_options": {"hf_vlm": {"prompts": str(tmp_path / "p.jsonl")}}}
    assert len(load_config(cfg).cells()) == 1
    with pytest.raises(ValueError, match=r"methods: 'fastv' at placement 'pre_llm'.*needs context \['text_attn'\]"):
        load_config({**cfg, "methods": ["fastv"]})
    assert len(load_config({**cfg, "methods": ["fastv"], "placements": ["llm:2"]}).cells()) == 1
    with pytest.raises(ValueError, match=r"placements: 'llm:x' is not a VLM placement"):
        load_config({**cfg, "placements": ["llm:x"]})
    with pytest.raises(ValueError, match=r"task_options.hf_vlm.prompts: required"):
        load_config({**cfg, "task_options": {}})
    (tmp_path / "bad.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match=r"prompts: .*bad.jsonl line 1 is not JSON"):
        load_config({**cfg, "task_options": {"hf_vlm": {"prompts": str(tmp_path / "bad.jsonl")}}})
    with pytest.raises(ValueError, match=r"models: '.*nowhere' is not a model of task 'hf_vlm'"):
        load_config({**cfg, "models": [str(tmp_path / "nowhere")]})
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"models: '.*fake' cannot be built from its config.json"):
        load_config({**cfg, "models": [str(tmp_path / "fake")]})


def test_cli_refuses_bad_config_before_any_cell(ckpt, tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("tasks: [eval_vit\nmethods: random\n")
    out = tmp_path / "r.jsonl"
    res = CliRunner().invoke(app, ["sweep", str(bad_yaml), "--results", str(out)])
    assert res.exit_code == 2 and "malformed YAML" in res.output and str(bad_yaml) in res.output
    good = tmp_path / "good.yaml"
    good.write_text(f"tasks: eval_vit\nmodels: [{ckpt}]\nmethods: [random, divprune]\nkeeps: [0.5]\n")
    res = CliRunner().invoke(app, ["sweep", str(good), "--keep", "0.5,2.0", "--results", str(out)])
    assert res.exit_code == 2 and "keeps: 2.0 is out of range" in res.output
    res = CliRunner().invoke(app, ["sweep", str(good), "--methods", "random,bogus", "--results", str(out)])
    assert res.exit_code == 2 and "unknown method 'bogus'" in res.output
    assert not out.exists()  # nothing ran


@pytest.mark.parametrize("name, task", [("vlm_accuracy", "real_vlm"), ("vlm_accuracy_llm", "real_vlm"),
                                        ("vlm_clip_accuracy", "real_vlm_clip"),
                                        ("vlm_clip_accuracy_llm", "real_vlm_clip")])
def test_vlm_accuracy_configs_are_valid(name, task):
    """Every method / placement pair of the small VLMs' accuracy sweeps passes the checks (no cell runs here)."""
    from tests.helpers import ROOT

    cfg = load_config(ROOT / "configs" / "sweeps" / f"{name}.yaml")
    assert cfg.tasks == [task] and len(cfg.cells()) == len(cfg.methods) * 4
