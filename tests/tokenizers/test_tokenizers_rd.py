"""The rate–distortion benchmark runs end to end on a tiny random-init checkpoint."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from tests.helpers.script_loader import load_benchmark
from vtok.tokenizers_img import ModelConfig, Tokenizer

ROOT = Path(__file__).resolve().parents[2]


def test_tokenizer_rd_benchmark_smoke(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=16, patch_size=8, num_tokens=64, width=16, enc_depth=1, dec_depth=1, heads=2)
    Tokenizer(cfg, meta={"name": "tiny_rd", "length_mode": "nested", "step": 0}).save(tmp_path / "ck")
    res = subprocess.run([sys.executable, "-m", "benchmarks.tokenizer_rd", str(tmp_path / "ck"),
                          "--sources", "skimage", "--limit", "3", "--out-dir", str(tmp_path / "rd")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| k | bits/image | bytes | PSNR (dB) | SSIM |" in res.stdout
    assert "never drops by more than 0.1 dB" in res.stdout
    data = json.loads((tmp_path / "rd" / "results.json").read_text())
    rows = data["checkpoints"][0]["rows"]
    assert [r["k"] for r in rows] == [1, 2, 4, 8, 16, 32, 64]
    assert rows[-1]["WebP"] is not None and rows[-1]["WebP"]["bytes"] <= rows[-1]["bytes"]  # 128 B fits a WebP
    assert (tmp_path / "rd" / "tokenizer_rd.png").stat().st_size > 1000


def _jpeg_segments(data: bytes) -> tuple[int, int]:
    """Walk a baseline JPEG's marker segments by hand: ``(start of entropy-coded data, index of EOI)``."""
    i = 2  # after SOI
    while True:
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        i += 2 + length
        if marker == 0xDA:  # SOS: entropy-coded data follows its header
            return i, len(data) - 2


def test_codec_payload_bytes_exclude_headers():
    from skimage import data as skdata

    rd = load_benchmark("tokenizer_rd")
    img = skdata.astronaut()[::16, ::16][:32, :32].copy()
    jpeg = rd.encode(img, "JPEG", 5)
    start, eoi = _jpeg_segments(jpeg)
    assert jpeg[eoi:] == b"\xff\xd9"
    assert rd.payload_size("JPEG", jpeg) == eoi - start + 1  # scan bytes + 1 byte of quality
    assert rd.payload_size("JPEG", jpeg) < len(jpeg) - 400  # tables and markers dominate a 32×32 file
    webp = rd.encode(img, "WebP", 5)
    assert webp[:4] == b"RIFF" and webp[12:16] == b"VP8 "
    assert rd.payload_size("WebP", webp) == len(webp) - 12 - 8 - 10  # RIFF, chunk header, key-frame header
    assert rd.decode(jpeg).shape == (32, 32, 3)
