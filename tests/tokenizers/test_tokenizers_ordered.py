"""Tokenizers feed the strategies: latents, prefix errors, ``tokenize(keep=, method=)`` and its decoding."""

import math

import pytest
import torch

import vtok
from vtok.tokenizers_img import pow2_lengths
from vtok.tokenizers_img.selected import TokenSelection


@pytest.fixture(scope="module")
def tok():
    return vtok.load_tokenizer("fsq_nested")


@pytest.fixture(scope="module")
def images():
    from skimage import data

    from vtok.tokenizers_img.data import center_square

    busy = torch.from_numpy(center_square(data.astronaut(), 32)).permute(2, 0, 1).float() / 255.0
    x = torch.stack([torch.full((3, 32, 32), 0.4), busy, busy.flip(-1)])
    return x.clamp(0, 1)


def test_latents_are_the_codes_of_every_token(tok, images):
    z = tok.latents(images)
    assert z.shape == (3, tok.num_tokens, tok.quantizer.dim)
    assert torch.equal(tok.quantizer.codes_to_indices(z), tok.tokenize(images))


def test_prefix_errors_are_the_prefix_reconstructions_mse(tok, images):
    e = tok.prefix_errors(images)
    assert e.shape == (3, tok.num_tokens) and bool((e >= 0).all())
    for k in (1, 5, 32):
        ref = (tok.reconstruct(images, k) - images).pow(2).flatten(1).mean(1)
        assert torch.allclose(e[:, k - 1], ref, atol=1e-6)
    cheap = tok.prefix_errors(images, pow2_lengths(tok.num_tokens))
    for k in pow2_lengths(tok.num_tokens):
        assert torch.allclose(cheap[:, k - 1], e[:, k - 1], atol=1e-6)
    assert (cheap - e).abs().max() < 0.01
    assert torch.equal(tok.prefix_errors(images, codes=tok.latents(images)), e)  # given codes = computed ones
    with pytest.raises(ValueError, match="codes must be latents"):
        tok.prefix_errors(images, codes=tok.latents(images)[:1])


def test_prefix_through_tokenize_equals_the_plain_prefix(tok, images):
    ts = tok.tokenize(images, keep=8)
    assert isinstance(ts, TokenSelection) and ts.is_prefix and ts.lengths.tolist() == [8, 8, 8]
    assert torch.equal(ts.ids, tok.tokenize(images, k=8))
    assert torch.equal(tok.detokenize(ts), tok.detokenize(tok.tokenize(images, k=8)))
    assert ts.payload_bits(tok.bits_per_token, fixed_length=True).tolist() == [8 * tok.bits_per_token] * 3


def test_adaptive_length_meets_the_mean_and_gives_the_flat_image_less(tok, images):
    ts = tok.tokenize(images, keep=0.25, method="adaptive_length")
    assert int(ts.lengths.sum()) == 3 * 8 and ts.is_prefix
    assert ts.lengths[0] < ts.lengths[1]
    rec = tok.detokenize(ts)
    for b in range(3):
        k = int(ts.lengths[b])
        assert torch.allclose(rec[b:b + 1], tok.reconstruct(images[b:b + 1], k), atol=1e-6)  # batch vs one


@pytest.mark.parametrize("method", ["random", "divprune", "kmedoids"])
def test_post_hoc_pruning_decodes_the_kept_registers(tok, images, method):
    ts = tok.tokenize(images, keep=8, method=method)
    assert ts.lengths.tolist() == [8, 8, 8] and not ts.is_prefix or method == "random"
    keep = torch.zeros(3, tok.num_tokens, dtype=torch.bool).scatter_(1, ts.positions, True)
    ref = tok(images, keep=keep).recon.clamp(0, 1)  # the training forward with the same registers masked
    assert torch.allclose(tok.detokenize(ts), ref, atol=1e-6)
    bits = ts.payload_bits(tok.bits_per_token, fixed_length=True)
    assert bits[0].item() == pytest.approx(8 * tok.bits_per_token + math.log2(math.comb(32, 8)))


def test_merging_stays_on_the_code_grid(images):
    for name in ("fsq_nested", "binary_nested"):
        t = vtok.load_tokenizer(name)
        ts = t.tokenize(images, keep=4, method="tome")
        assert ts.ids.shape[:2] == (3, 4) and tuple(t.detokenize(ts).shape) == tuple(images.shape)
        if name == "binary_nested":
            assert ts.ids.dtype == torch.bool


def test_bad_calls_fail_clearly(tok, images):
    with pytest.raises(ValueError, match="either k"):
        tok.tokenize(images, 4, keep=4)
    with pytest.raises(ValueError, match="needs keep="):
        tok.tokenize(images, method="random")
    with pytest.raises(ValueError, match="unknown method"):
        tok.tokenize(images, keep=4, method="nope")
    with pytest.raises(ValueError, match="keep as a ratio"):
        tok.tokenize(images, keep=1.5)
    other = TokenSelection(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long),
                           torch.tensor([2]), "prefix", 16)
    with pytest.raises(ValueError, match="K=16"):
        tok.detokenize(other)


def test_adaptive_grid_writes_fixed_and_adaptive_columns(tok, images, tmp_path):
    from PIL import Image

    from vtok.tokenizers_img.demo import adaptive_grid

    png = adaptive_grid(tok, images, tmp_path / "grid.png", cell=32, ks=(4,))
    im = Image.open(png)
    assert im.width == 3 + 3 * (32 + 3) and im.height == 14 + 3 + 3 * (32 + 12 + 3)
