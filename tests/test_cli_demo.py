import subprocess
import sys
from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from vtok.cli import app

ROOT = Path(__file__).resolve().parents[1]


def test_methods_command_prints_table():
    res = CliRunner().invoke(app, ["methods"])
    assert res.exit_code == 0, res.output
    assert "pool2d" in res.output and "random" in res.output and "family" in res.output


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
