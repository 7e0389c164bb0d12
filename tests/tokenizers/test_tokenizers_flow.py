"""The optional rectified-flow decoder head: off by default, exact loss and Euler sampler, API, training, save/load."""

import pytest
import torch

import vtok
from vtok.tokenizers_img import ModelConfig, RunConfig, Tokenizer, TrainConfig, VideoTokenizer
from vtok.tokenizers_img.data import CropPool, training_photos
from vtok.tokenizers_img.flow import FlowHead
from vtok.tokenizers_img.train import train_tokenizer

K = 4


def _tok(flow: bool = True, quantizer: str = "fsq", seed: int = 0) -> Tokenizer:
    torch.manual_seed(seed)
    cfg = ModelConfig(image_size=16, patch_size=8, num_tokens=K, width=16, enc_depth=1, dec_depth=1, heads=2,
                      quantizer=quantizer, fsq_levels=(4, 3, 5), bits=6, flow_head=flow)
    return Tokenizer(cfg).eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_off_by_default_and_mean_sampler_unchanged(images):
    tok = _tok(flow=False)
    assert ModelConfig().flow_head is False and tok.flow is None
    assert not any(k.startswith("flow.") for k in tok.state_dict())
    ids = tok.tokenize(images)
    emb = tok.embed(tok.quantizer.indices_to_codes(ids))
    with torch.no_grad():  # the mean sampler is the plain decoder forward
        ref = tok.from_patches(tok.decoder(emb, torch.ones(3, K, dtype=torch.bool))).clamp(0, 1)
    assert torch.equal(tok.detokenize(ids), ref)
    assert tok(images).flow_loss is None
    with pytest.raises(ValueError, match="flow_head=True"):
        tok.detokenize(ids, sampler="flow")


def test_loss_is_the_rectified_flow_objective(images):
    """At init the velocity MLP outputs 0, so the loss is mean((x1 - x0)^2) with x0, t from the same generator."""
    tok = _tok()
    out = tok(images, generator=torch.Generator().manual_seed(5))
    x1 = tok.to_patches(images) * 2 - 1
    g = torch.Generator().manual_seed(5)
    torch.rand(3, generator=g)  # t
    x0 = torch.randn(x1.shape, generator=g)
    torch.testing.assert_close(out.flow_loss, ((x1 - x0) ** 2).mean())


def test_loss_with_explicit_velocity():
    head = FlowHead(patch_dim=6, width=4, depth=2, time_dim=8)
    torch.nn.init.normal_(head.net[-1].weight)
    target, h = torch.randn(2, 5, 6), torch.randn(2, 5, 4)
    loss = head.loss(target, h, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    t = torch.rand(2, generator=g)
    x0 = torch.randn(target.shape, generator=g)
    x_t = t[:, None, None] * target + (1 - t[:, None, None]) * x0
    torch.testing.assert_close(loss, ((head(x_t, t, h) - (target - x0)) ** 2).mean())


def test_euler_sampler_integrates_a_constant_velocity_exactly():
    head = FlowHead(patch_dim=6, width=4, depth=2, time_dim=8)
    c = torch.linspace(-1, 1, 6)
    with torch.no_grad():
        head.net[-1].bias.copy_(c)  # weight is zero at init: v ≡ c
    h = torch.randn(2, 5, 4)
    x = head.sample(h, 6, steps=7, generator=torch.Generator().manual_seed(3))
    x0 = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(x, x0 + c)
    with pytest.raises(ValueError, match="steps"):
        head.sample(h, 6, steps=0)


def test_gradients_reach_head_and_decoder(images):
    tok = _tok().train()
    with torch.no_grad():
        torch.nn.init.normal_(tok.flow.net[-1].weight, std=0.02)
    tok(images, generator=torch.Generator().manual_seed(0)).flow_loss.backward()
    assert tok.flow.net[0].weight.grad.abs().sum() > 0
    assert tok.decoder.blocks[0].qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("quantizer", ["fsq", "binary"])
def test_flow_detokenize_every_prefix_seeded(images, quantizer):
    tok = _tok(quantizer=quantizer)
    with torch.no_grad():
        torch.nn.init.normal_(tok.flow.net[-1].weight, std=0.1)
    ids = tok.tokenize(images)
    for k in range(1, K + 1):
        a = tok.detokenize(ids[:, :k], sampler="flow", steps=3, generator=torch.Generator().manual_seed(0))
        b = tok.detokenize(ids[:, :k], sampler="flow", steps=3, generator=torch.Generator().manual_seed(0))
        c = tok.detokenize(ids[:, :k], sampler="flow", steps=3, generator=torch.Generator().manual_seed(1))
        assert a.shape == images.shape and a.min() >= 0 and a.max() <= 1
        assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="sampler"):
        tok.detokenize(ids, sampler="ode")


def test_save_load_and_config_errors(images, tmp_path):
    tok = _tok()
    with torch.no_grad():
        torch.nn.init.normal_(tok.flow.net[-1].weight, std=0.1)
    tok.save(tmp_path / "t")
    tok2 = vtok.load_tokenizer(tmp_path / "t")
    assert tok2.config.flow_head is True
    ids = tok.tokenize(images)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(tok2.detokenize(ids, "flow", 2, g()), tok.detokenize(ids, "flow", 2, g()))
    with pytest.raises(TypeError, match="flow_head"):
        ModelConfig(flow_head="yes")
    with pytest.raises(ValueError, match="flow_weight"):
        TrainConfig(flow_weight=-1.0)


def test_video_tokenizer_with_flow_head():
    torch.manual_seed(0)
    cfg = ModelConfig(kind="video", image_size=16, patch_size=8, frames=4, tubelet_frames=2, num_tokens=3, width=16,
                      enc_depth=1, dec_depth=1, heads=2, flow_head=True)
    tok = VideoTokenizer(cfg).eval()
    clips = torch.rand(2, 3, 4, 16, 16)
    out = tok.detokenize(tok.tokenize(clips, k=2), sampler="flow", steps=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == clips.shape


def test_training_lowers_the_flow_loss(tmp_path):
    model = ModelConfig(image_size=16, patch_size=8, num_tokens=4, width=16, enc_depth=1, dec_depth=1, heads=2,
                        flow_head=True)
    tc = TrainConfig(length_mode="nested", steps=80, batch_size=8, warmup=2, lr=3e-3, ckpt_every=80, log_every=1,
                     eval_images=0, sources=("skimage",), scales=(2, 4))
    batch = CropPool(training_photos(tc.sources), 16, tc.scales).sample(32, torch.Generator().manual_seed(7))

    def fixed_flow_loss(tok):  # same batch, same 4 draws of (t, noise)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            return sum(float(tok.eval()(batch, generator=g).flow_loss) for _ in range(4)) / 4

    torch.manual_seed(tc.seed)
    before = fixed_flow_loss(Tokenizer(model))
    res = train_tokenizer(RunConfig("flow", model, tc), tmp_path, progress=False, log=lambda s: None)
    after = fixed_flow_loss(res.tokenizer)
    assert after < 0.95 * before, (before, after)  # 1.22 → 1.12 (fixed draws: the drop is learning, not noise)
    assert "flow" in res.history[-1]
    assert vtok.load_tokenizer(tmp_path).flow is not None
