"""Tokenizer building blocks: register mask, FSQ, binary quantizer, length sampling, video tubelets."""

import itertools

import pytest
import torch

from vtok.tokenizers_img import (
    FSQ,
    BinaryQuantizer,
    ModelConfig,
    Tokenizer,
    VideoTokenizer,
    pow2_lengths,
    prefix_mask,
    register_attention_mask,
    sample_lengths,
)
from vtok.tokenizers_img.model import ResamplerEncoder
from vtok.tokenizers_img.video import tubeletify, untubeletify


def test_mask_structure():
    n, k = 5, 4
    m = register_attention_mask(n, k)
    assert m.shape == (n + k, n + k) and m.dtype == torch.bool
    assert m[:n, :n].all()                      # patches see patches
    assert not m[:n, n:].any()                  # patches never see registers
    assert m[n:, :n].all()                      # registers see every patch
    for i, j in itertools.product(range(k), range(k)):
        assert bool(m[n + i, n + j]) == (j <= i)  # register i sees j <= i only


def test_mask_behaviour_later_register_cannot_change_earlier_outputs():
    torch.manual_seed(0)
    enc = ResamplerEncoder(patch_dim=12, n_patches=6, n_registers=5, width=16, depth=2, heads=2, mlp_ratio=2.0,
                           out_dim=3)
    x = torch.randn(2, 6, 12)
    before = enc.hidden(x)
    j = 3
    with torch.no_grad():
        enc.registers[j] += torch.randn(16)  # (a constant shift would vanish in LayerNorm)
    after = enc.hidden(x)
    torch.testing.assert_close(after[:, :6 + j], before[:, :6 + j], rtol=0, atol=0)  # patches and registers < j
    assert not torch.allclose(after[:, 6 + j], before[:, 6 + j])
    # fewer registers appended gives the same first registers
    torch.testing.assert_close(enc(x, k=2), enc(x)[:, :2], rtol=1e-5, atol=1e-6)


def test_fsq_round_trip_all_indices_and_codes():
    q = FSQ([3, 4, 2])
    assert q.codebook_size == 24 and q.dim == 3
    idx = torch.arange(24)
    codes = q.indices_to_codes(idx)
    assert codes.min() >= -1 and codes.max() <= 1
    assert torch.equal(q.codes_to_indices(codes), idx)
    assert len({tuple(c.tolist()) for c in codes}) == 24                # distinct codes
    torch.testing.assert_close(q.indices_to_codes(q.codes_to_indices(codes)), codes)
    # codes from the quantiser itself are on the grid and agree with its indices
    z = torch.randn(50, 3, requires_grad=True) * 3
    c, i = q(z)
    assert i.min() >= 0 and i.max() < 24
    torch.testing.assert_close(q.indices_to_codes(i), c.detach())


def test_fsq_default_levels_and_straight_through():
    q = FSQ()
    assert q.levels == (8, 8, 8, 5, 5, 5) and q.codebook_size == 64000
    z = torch.randn(4, 6, requires_grad=True)
    c, _ = q(z)
    c.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="levels"):
        FSQ([8, 1])


def test_binary_straight_through_gradient_reaches_encoder():
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=16, patch_size=8, num_tokens=4, width=16, enc_depth=1, dec_depth=1, heads=2,
                      quantizer="binary", bits=6)
    tok = Tokenizer(cfg).train()
    x = torch.rand(3, 3, 16, 16)
    out = tok(x, generator=torch.Generator().manual_seed(1))
    ((out.recon - x) ** 2).mean().backward()
    for p in (tok.encoder.head.weight, tok.encoder.registers, tok.encoder.embed.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert 0 <= float(out.penalty.detach()) <= 0.25


def test_binary_quantizer_modes():
    q = BinaryQuantizer(bits=5, tau=0.5)
    z = torch.randn(2, 3, 5)
    b, p = q.eval()(z)
    assert torch.equal(b.bool(), torch.sigmoid(z) > 0.5)
    q.train()
    b, p = q(z, torch.Generator().manual_seed(0))
    b = b.detach()
    torch.testing.assert_close(b, b.round(), rtol=0, atol=1e-6)  # values 0 or 1 (up to the ST rounding)
    torch.testing.assert_close(p, torch.sigmoid(z / 0.5))
    assert float(BinaryQuantizer.confidence_penalty(torch.full((4,), 0.5))) == 0.25


def test_nested_lengths_support():
    g = torch.Generator().manual_seed(0)
    assert pow2_lengths(8) == [1, 2, 4, 8] and pow2_lengths(6) == [1, 2, 4, 6] and pow2_lengths(1) == [1]
    ks = sample_lengths("nested", 4000, 8, g)
    assert set(ks.tolist()) == {1, 2, 4, 8}
    assert set(sample_lengths("nested", 4000, 6, g).tolist()) == {1, 2, 4, 6}
    assert set(sample_lengths("nested", 4000, 8, g, dist="uniform").tolist()) == set(range(1, 9))
    assert len(set(ks.tolist())) > 1  # per sample, not per batch


def test_tail_drop_one_length_per_batch_and_control():
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        ks = sample_lengths("tail", 16, 8, g)
        assert len(set(ks.tolist())) == 1
        seen.add(int(ks[0]))
    assert seen == set(range(1, 9))
    assert sample_lengths("none", 5, 8, g).tolist() == [8] * 5
    with pytest.raises(ValueError, match="nested"):
        sample_lengths("bogus", 2, 8, g)


def test_prefix_mask():
    m = prefix_mask(torch.tensor([1, 3, 4]), 4)
    assert m.tolist() == [[True, False, False, False], [True, True, True, False], [True, True, True, True]]


def test_video_tokenizer_forward_and_tubelets():
    clips = torch.rand(2, 3, 4, 16, 16)
    t = tubeletify(clips, 2, 8)
    assert t.shape == (2, 2 * 2 * 2, 3 * 2 * 8 * 8)
    torch.testing.assert_close(untubeletify(t, (2, 2, 2), 2, 8), clips, rtol=0, atol=0)
    torch.manual_seed(0)
    cfg = ModelConfig(kind="video", image_size=16, patch_size=8, frames=4, tubelet_frames=2, num_tokens=6, width=16,
                      enc_depth=1, dec_depth=1, heads=2)
    tok = VideoTokenizer(cfg)
    assert tok.config.n_patches == 8
    out = tok(clips)
    assert out.recon.shape == clips.shape
    ids = tok.tokenize(clips)
    assert ids.shape == (2, 6)
    assert torch.equal(tok.tokenize(clips, k=2), ids[:, :2])  # ordered over the whole clip, prefix-consistent
    for k in range(1, 7):
        assert tok.detokenize(ids[:, :k]).shape == clips.shape
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        tok.tokenize(torch.rand(2, 3, 16, 16))
