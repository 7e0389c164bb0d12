"""Public tokenizer API: tokenize / detokenize, save / load, load_tokenizer names, input errors, demo."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import vtok
from vtok.tokenizers_img import ModelConfig, Tokenizer
from vtok.tokenizers_img.demo import reconstruction_grid

ROOT = Path(__file__).resolve().parents[2]
K = 5


def _tok(quantizer: str = "fsq") -> Tokenizer:
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=16, patch_size=8, num_tokens=K, width=16, enc_depth=1, dec_depth=1, heads=2,
                      quantizer=quantizer, fsq_levels=(4, 3, 5), bits=7)
    return Tokenizer(cfg).eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("quantizer", ["fsq", "binary"])
def test_tokenize_shapes_and_every_prefix(quantizer, images):
    tok = _tok(quantizer)
    ids = tok.tokenize(images)
    if quantizer == "fsq":
        assert ids.dtype == torch.int64 and ids.shape == (2, K)
        assert ids.min() >= 0 and ids.max() < 60 and tok.codebook_size == 60
        assert tok.bits_per_token == pytest.approx(5.9069, abs=1e-3)
    else:
        assert ids.dtype == torch.bool and ids.shape == (2, K, 7)
        assert tok.bits_per_token == 7
    for k in range(1, K + 1):
        assert torch.equal(tok.tokenize(images, k=k), ids[:, :k])   # prefix property
        rec = tok.detokenize(ids[:, :k])
        assert rec.shape == (2, 3, 16, 16) and rec.min() >= 0 and rec.max() <= 1


@pytest.mark.parametrize("quantizer", ["fsq", "binary"])
def test_save_load_identical(quantizer, images, tmp_path):
    tok = _tok(quantizer)
    tok.save(tmp_path / "t")
    assert {p.name for p in (tmp_path / "t").iterdir()} == {"config.json", "model.safetensors"}
    tok2 = vtok.load_tokenizer(tmp_path / "t")
    assert type(tok2) is Tokenizer and tok2.config == tok.config
    ids = tok.tokenize(images)
    assert torch.equal(tok2.tokenize(images), ids)
    assert torch.equal(tok2.detokenize(ids[:, :3]), tok.detokenize(ids[:, :3]))
    assert torch.equal(Tokenizer.load(tmp_path / "t").detokenize(ids), tok.detokenize(ids))


def test_unknown_name_lists_available():
    with pytest.raises(ValueError, match=r"available: .*train-tokenizer"):
        vtok.load_tokenizer("no_such_tokenizer")


def test_bad_images(images):
    tok = _tok()
    with pytest.raises(ValueError, match=r"\(3, 16, 16\)"):
        tok.tokenize(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(3, 16, 16\)"):
        tok.tokenize(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tok.tokenize(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tok.tokenize(images * 255)
    with pytest.raises(TypeError, match="float"):
        tok.tokenize((images * 255).to(torch.uint8))


def test_bad_k(images):
    tok = _tok()
    for k in (0, -1, K + 1):
        with pytest.raises(ValueError, match=rf"1\.\.{K}"):
            tok.tokenize(images, k=k)
    with pytest.raises(TypeError, match="k must be an int"):
        tok.tokenize(images, k=2.0)


def test_bad_ids():
    tok = _tok()
    with pytest.raises(ValueError, match=r"\[0, 60\)"):
        tok.detokenize(torch.tensor([[0, 60]]))
    with pytest.raises(ValueError, match=r"\[0, 60\)"):
        tok.detokenize(torch.tensor([[-1]]))
    with pytest.raises(ValueError, match=rf"1\.\.{K}"):
        tok.detokenize(torch.zeros(1, K + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=rf"1\.\.{K}"):
        tok.detokenize(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        tok.detokenize(torch.zeros(1, 2))
    btok = _tok("binary")
    with pytest.raises(ValueError, match="bits=7"):
        btok.detokenize(torch.zeros(1, 2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[B, k, 7\]"):
        btok.detokenize(torch.zeros(1, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        btok.detokenize(torch.zeros(1, 2, 7))


def test_bad_config():
    with pytest.raises(ValueError, match="divisible by patch_size"):
        ModelConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match=r"\('fsq', 'binary'\)"):
        ModelConfig(quantizer="vq")
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"imagesize": 3})


def test_reconstruction_grid(images, tmp_path):
    path = reconstruction_grid(_tok(), images, tmp_path / "grid.png", cell=32)
    img = Image.open(path)
    assert img.width > 32 * (1 + 4) and img.height > 2 * 32   # original + k = 1, 2, 4, 5


def test_demo_script_random_init(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "demos" / "tokenize_image.py"), "--size", "16", "--tokens", "4",
                          "--out", str(tmp_path / "g.png")], capture_output=True, text=True, check=True)
    assert "k=  4" in out.stdout and (tmp_path / "g.png").is_file()
    if not vtok.tokenizers_img.available_tokenizers():
        assert "RANDOM-INIT" in out.stdout


def test_committed_names_resolve_and_demo_draws_them(tmp_path, monkeypatch):
    from vtok.tokenizers_img import hub
    from vtok.tokenizers_img.demo import demo_committed

    monkeypatch.setattr(hub, "CHECKPOINT_DIR", tmp_path / "checkpoints")
    assert demo_committed(tmp_path / "out") == []
    _tok().save(tmp_path / "checkpoints" / "tiny")
    assert hub.available_tokenizers() == ["tiny"]
    assert vtok.load_tokenizer("tiny").num_tokens == K
    with pytest.raises(ValueError, match="available: tiny"):
        vtok.load_tokenizer("other")
    [png] = demo_committed(tmp_path / "out", n_images=2)
    assert png.name == "tokenizer_tiny.png" and Image.open(png).height > 2 * 96
