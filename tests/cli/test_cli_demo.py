import subprocess
import sys
from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from vtok.cli import app

ROOT = Path(__file__).resolve().parents[2]


def test_methods_command_prints_table():
    res = CliRunner().invoke(app, ["methods"])
    assert res.exit_code == 0, res.output
    assert "pool2d" in res.output and "random" in res.output and "family" in res.output


def test_methods_command_shows_each_method_source_file():
    """Issue #32: a ``source`` column names the file of every method, e.g. ``vtok/pruners/visionzip.py`` on
    visionzip's row (``prumerge_plus``: ``prumerge.py``, the module of its base method)."""
    import vtok

    res = CliRunner().invoke(app, ["methods"])
    assert res.exit_code == 0, res.output
    assert "source" in res.output
    rows = {line.split("│")[1].strip(): line for line in res.output.splitlines() if line.startswith("│ ")
            and line.split("│")[1].strip()}
    for m in vtok.methods():
        assert m.source in rows[m.name], (m.name, m.source)
    assert "vtok/pruners/visionzip.py" in rows["visionzip"]
    assert "vtok/pruners/prumerge.py" in rows["prumerge_plus"]


def test_demo_command_writes_png(tmp_path):
    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--size", "64", "--keep", "0.5"])
    assert res.exit_code == 0, res.output
    assert "PSNR" in res.output and "uniform" in res.output
    img = Image.open(tmp_path / "kept_patches.png")
    assert img.width > 64 and img.height > 64


def test_demo_script_runs():
    out = subprocess.run([sys.executable, str(ROOT / "demos" / "prune_photo_patches.py"), "--size", "64",
                          "--method", "pool2d", "--keep", "0.25"], capture_output=True, text=True, check=True)
    assert "16 -> 4 tokens" in out.stdout


def test_patch_vit_demo_runs():
    out = subprocess.run([sys.executable, str(ROOT / "demos" / "patch_vit.py"), "--model", "vit_tiny_patch16_224",
                          "--img", "64", "--batch", "2", "--r", "2"], capture_output=True, text=True, check=True)
    assert "16 patch tokens ->" in out.stdout
    out = subprocess.run([sys.executable, str(ROOT / "demos" / "patch_vit.py"), "--model", "vit_tiny_patch16_224",
                          "--img", "64", "--batch", "2", "--method", "cls_attn", "--keep", "0.5"],
                         capture_output=True, text=True, check=True)
    assert "16 patch tokens -> 8" in out.stdout


def test_wrap_vlm_demo_runs(tmp_path):
    """The VLM demo at tiny settings: a random LLaVA folder built, reloaded with from_pretrained, wrapped."""
    out = subprocess.run([sys.executable, str(ROOT / "demos" / "wrap_vlm.py"), "--out", str(tmp_path / "tiny"),
                          "--image-size", "56", "--methods", "divprune,visionzip", "--max-new-tokens", "4"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "divprune" in out.stdout and "fastv" in out.stdout
    assert "32→8" in out.stdout  # 2 images × 16 tokens at 56 px / patch 14, keep 0.25
    assert (tmp_path / "tiny" / "config.json").exists()


def test_demo_runs_floor_methods_at_their_fewest_and_names_impossible_budgets(tmp_path):
    from vtok.demo import run_demo

    # 64 px / 16 px patches: a 4 x 4 grid. keep 0.1 -> 2 tokens, below mustdrop's fewest (4: all four blocks
    # merged); keep 0.3125 -> 5 tokens, which pool2d cannot make on a 4 x 4 grid (5 is prime and > 4).
    rows = run_demo(tmp_path, size=64, keeps=(0.3125, 0.1), methods=["pool2d", "mustdrop", "random"])
    by = {(r.method, r.keep): r for r in rows}
    assert by[("mustdrop", 0.1)].kept == 4 and "fewest: 4 tokens (2 asked)" in by[("mustdrop", 0.1)].note
    assert by[("mustdrop", 0.3125)].kept == 5 and by[("mustdrop", 0.3125)].note == ""
    skipped = by[("pool2d", 0.3125)]
    assert skipped.kept == 0 and skipped.note.startswith("skipped: ") and "k=5" in skipped.note
    assert by[("pool2d", 0.1)].kept == 2 and by[("random", 0.1)].kept == 2
    assert (tmp_path / "kept_patches.png").exists()


def test_demo_command_default_budgets_exit_zero(tmp_path):
    """The bundled defaults (224 px, keeps 0.5 / 0.25 / 0.1, every model-free method) run without a traceback."""
    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "mustdrop" in res.output and "fewest" in res.output


def test_methods_unknown_family_is_refused_with_the_valid_ones():
    """Issue 29: ``vtok methods --family bogus`` exits 2 naming the flag and every family (not an empty table)."""
    from vtok.pruners.registry import FAMILIES

    res = CliRunner().invoke(app, ["methods", "--family", "bogus"])
    assert res.exit_code == 2, res.output
    assert res.output.strip() == f"error: --family bogus: no such family; choose one of {', '.join(FAMILIES)}"
    res = CliRunner().invoke(app, ["methods", "--family", "temporal"])
    assert res.exit_code == 0 and "frame_merge" in res.output and "pool2d" not in res.output


def test_demo_keep_follows_resolve_k_an_int_is_a_count(tmp_path):
    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--size", "64", "--keep", "1", "--keep", "1.0"])
    assert res.exit_code == 0, res.output
    assert "1/16" in res.output and "16/16" in res.output
    bad = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--keep", "half"])
    assert bad.exit_code == 2 and "--keep" in bad.output
