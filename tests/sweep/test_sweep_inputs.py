"""Odd input to sweeps and reports (issue #29): task options checked (type and range) before any cell runs, the
real placement's context for ``hf_vlm`` ``pre_llm``, reports that never average rows with different settings, one
line and exit status 2 for every CLI error."""

from __future__ import annotations

import copy

import pytest
from typer.testing import CliRunner

from tests.helpers.sweep_helpers import prompts_file, vit_checkpoint
from tests.sweep.test_sweep_report import synthetic_rows
from vtok.cli import app
from vtok.sweep import TASKS, ResultsStore, get_task, load_config, write_report
from vtok.sweep.report import _panels, _refs, markdown


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(vit_checkpoint(tmp_path_factory.mktemp("vit")))


def _sweep(ckpt: str, out, *options: str) -> list[str]:
    args = ["sweep", "--task", "eval_vit", "--model", ckpt, "--methods", "random", "--keep", "0.5",
            "--results", str(out), "--no-progress"]
    for o in options:
        args += ["--task-option", o]
    return args


@pytest.mark.parametrize("option, message", [
    ("eval_vit.limit=-5", "--task-option eval_vit.limit: -5 is out of range (expected an int >= 1 or absent)"),
    ("eval_vit.limit=0", "--task-option eval_vit.limit: 0 is out of range"),
    ("eval_vit.limit=2.5", "--task-option eval_vit.limit: expected an int >= 1 or absent, got 2.5"),
    ("eval_vit.batch=0", "--task-option eval_vit.batch: 0 is out of range (expected an int >= 1)"),
    ("eval_vit.layer=-1", "--task-option eval_vit.layer: -1 is out of range"),
    ("eval_vit.layer=99", "(--task-option eval_vit.layer): 99 is out of range for model"),
    ("eval_vit.limt=3", "--task-option eval_vit: unknown option(s) ['limt']"),
    ("evl_vit.limit=3", "--task-option evl_vit.limit: unknown task 'evl_vit'"),
])
def test_cli_task_option_refused_before_any_cell(ckpt, tmp_path, option, message):
    out = tmp_path / "r.jsonl"
    res = CliRunner().invoke(app, _sweep(ckpt, out, option))
    assert res.exit_code == 2, res.output
    assert message in res.output and res.output.count("\n") == 1 and "Traceback" not in res.output
    assert not out.exists()  # nothing ran, nothing written


def test_layer_99_is_refused_by_the_config_with_the_depth(ckpt):
    with pytest.raises(ValueError, match=r"layer\): 99 is out of range for model .* \(8 blocks: expected 0 to 7"):
        load_config({"tasks": ["eval_vit"], "models": [ckpt], "methods": ["random"], "keeps": [0.5],
                     "task_options": {"eval_vit": {"layer": 99}}})
    with pytest.raises(ValueError, match=r"task_options.timing.layer .*: 8 is out of range"):
        load_config({"tasks": ["timing"], "models": [ckpt], "methods": ["random"], "keeps": [0.5],
                     "task_options": {"timing": {"layer": 8}}})
    assert load_config({"tasks": ["eval_vit"], "models": [ckpt], "methods": ["random"], "keeps": [0.5],
                        "task_options": {"eval_vit": {"layer": 7}}}).task_options == {"eval_vit": {"layer": 7}}


def test_limit_absent_means_every_test_image(ckpt):
    cell = load_config({"tasks": ["eval_vit"], "models": [ckpt], "methods": ["random"], "keeps": [0.5]}).cells()[0]
    assert cell.task_options["limit"] is None and "absent: all 10,000" in get_task("eval_vit").options["limit"].doc


def test_every_task_declares_and_checks_its_options():
    """Each built-in task's options have a schema; a value of the wrong type or out of range is refused, named."""
    get_task("eval_vit")  # loads the built-ins
    for name, task in TASKS.items():
        if not hasattr(task, "options") or not task.options:
            continue
        for opt, spec in task.options.items():
            with pytest.raises(ValueError, match=rf"task_options.{name}.{opt}: expected"):
                task.check_options({opt: [1, 2]})
            if spec.minimum is not None:
                with pytest.raises(ValueError, match=rf"task_options.{name}.{opt}: .* is out of range"):
                    task.check_options({opt: spec.minimum - 1})


def test_hf_vlm_pre_llm_uses_the_real_placements_context(tmp_path):
    """transprune needs the LLM's hidden states and zero_tprune the tower's full attention: neither exists before the
    language model of a LLaVA, so both are refused up front (before: the ViT's context list let them through and every
    cell failed)."""
    from vtok.hooks.hf.tiny import build_tiny_llava

    model = str(build_tiny_llava(tmp_path / "llava", image_size=112))
    cfg = {"tasks": ["hf_vlm"], "models": [model], "methods": ["divprune"], "keeps": [0.5],
           "task_options": {"hf_vlm": {"prompts": str(prompts_file(tmp_path))}}}
    assert len(load_config(cfg).cells()) == 1
    for method, key in (("transprune", "prev_hidden"), ("zero_tprune", "attn")):
        with pytest.raises(ValueError, match=rf"methods: '{method}' at placement 'pre_llm' on llava: .*needs context "
                                             rf"\['{key}'\]"):
            load_config({**cfg, "methods": ["divprune", method]})
    with pytest.raises(ValueError, match=r"layer must be in \[0, 4\)"):
        load_config({**cfg, "methods": ["fastv"], "placements": ["llm:9"]})
    assert len(load_config({**cfg, "methods": ["fastv", "divprune"], "placements": ["llm:2"]}).cells()) == 2


# ------------------------------------------------------------------------------------------------------ reports


def _two_limits() -> list[dict]:
    """The same grid twice into one file, with limit 200 and with limit 100 (different numbers, different ids)."""
    rows = []
    for limit, shift in ((200, 0.0), (100, 0.05)):
        for r in synthetic_rows():
            if r["cell"]["task"] != "eval_vit" or "error" in r:
                continue
            r = copy.deepcopy(r)
            r["id"] += f"-{limit}"
            r["cell"]["task_options"] = {"limit": limit, "batch": 250}
            r["metrics"]["accuracy"] += shift
            r["metrics"]["ref_accuracy"] = 0.9 + 2 * shift
            r["versions"] = {"vtok": "0.1.0"}
            rows.append(r)
    return rows


def test_report_keeps_rows_with_different_settings_apart(tmp_path):
    rows = _two_limits()
    panels = _panels(rows, "eval_vit", "accuracy")[("eval_vit", "inside")]
    assert sorted(panels) == sorted((m, f" [limit={lim}]") for m in ("random", "uniform", "divprune", "tome")
                                    for lim in (100, 200))
    for (method, tail), pts in panels.items():  # each series is one limit's numbers, never a mean of both
        want = {r["metrics"]["kept_tokens"]: r["metrics"]["accuracy"] for r in rows
                if r["cell"]["method"] == method and f"limit={r['cell']['task_options']['limit']}]" in tail}
        assert dict(pts) == want
    assert _refs(rows, "eval_vit", "accuracy")[("eval_vit", "inside")] == {" [limit=100]": 1.0,
                                                                          " [limit=200]": 0.9}
    md = markdown(rows).splitlines()
    cols = [c.strip() for c in md[0].strip("|").split("|")]
    assert "limit" in cols and "batch" not in cols  # the differing setting gets a column, equal ones do not
    assert sorted(ln.split("|")[cols.index("limit") + 1].strip() for ln in md[2:]) == ["100"] * 12 + ["200"] * 12
    path = tmp_path / "r.jsonl"
    store = ResultsStore(path)
    for r in rows:
        store.append(r)
    assert write_report(path)["rows"] == 24


def test_report_splits_on_vtok_version_and_seed():
    rows = _two_limits()[:12]
    other = copy.deepcopy(rows)
    for r in other:
        r["id"] += "-v2"
        r["versions"] = {"vtok": "0.2.0"}
        r["cell"]["seed"] = 1
    panels = _panels(rows + other, "eval_vit", "accuracy")[("eval_vit", "inside")]
    assert {tail for _, tail in panels} == {" [seed=0, vtok=0.1.0]", " [seed=1, vtok=0.2.0]"}


def test_report_out_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "r.jsonl"
    store = ResultsStore(path)
    for r in synthetic_rows():
        store.append(r)
    taken = tmp_path / "taken.txt"
    taken.write_text("mine")
    res = CliRunner().invoke(app, ["report", str(path), "--out", str(taken)])
    assert res.exit_code == 2 and f"--out {taken}: exists and is not a folder" in res.output
    assert res.output.count("\n") == 1 and taken.read_text() == "mine"
