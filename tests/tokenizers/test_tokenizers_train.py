"""Tokenizer training: a few steps on real photo crops, loss falls, resume is bit-identical, CLI works."""

import json

import torch
from typer.testing import CliRunner

import vtok
from vtok.cli import app
from vtok.tokenizers_img import ModelConfig, RunConfig, Tokenizer, TrainConfig
from vtok.tokenizers_img.data import CropPool, training_photos
from vtok.tokenizers_img.train import STATE_FILE, lr_at, train_tokenizer


def _run(mode: str = "nested", quantizer: str = "fsq", steps: int = 8, **train) -> RunConfig:
    model = ModelConfig(image_size=16, patch_size=8, num_tokens=4, width=16, enc_depth=1, dec_depth=1, heads=2,
                        quantizer=quantizer, bits=6)
    tc = TrainConfig(length_mode=mode, steps=steps, batch_size=8, warmup=2, lr=3e-3, ckpt_every=4, log_every=1,
                     eval_images=2, sources=("skimage",), scales=(2, 4), **train)
    return RunConfig("tiny", model, tc)


def test_loss_falls_and_output_loads(tmp_path):
    run = _run(steps=60)
    photos = training_photos(run.train.sources)
    batch = CropPool(photos, 16, run.train.scales).sample(32, torch.Generator().manual_seed(123))

    def fixed_mse(tok):
        with torch.no_grad():
            return float(((tok.eval()(batch).recon - batch) ** 2).mean())

    torch.manual_seed(run.train.seed)
    before = fixed_mse(Tokenizer(run.model))
    res = train_tokenizer(run, tmp_path, progress=False, log=lambda s: None)
    assert len(res.history) == 60
    after = fixed_mse(res.tokenizer)
    assert after < 0.8 * before, (before, after)
    losses = [r["loss"] for r in res.history]
    assert sum(losses[-10:]) < sum(losses[:10])
    tok = vtok.load_tokenizer(tmp_path)
    assert tok.meta["step"] == 60 and tok.meta["length_mode"] == "nested"
    assert fixed_mse(tok) == after
    assert "psnr_k1" in res.history[-1] and "psnr_k4" in res.history[-1]
    assert json.loads((tmp_path / "history.json").read_text())[-1]["step"] == 60


def _weights(path):
    return torch.load(path / STATE_FILE, weights_only=True)["model"]


def test_resume_matches_uninterrupted_run(tmp_path):
    for quantizer in ("fsq", "binary"):
        run = _run("tail", quantizer)
        a, b = tmp_path / f"a_{quantizer}", tmp_path / f"b_{quantizer}"
        full = train_tokenizer(run, a, progress=False, log=lambda s: None)
        half = train_tokenizer(run, b, stop_at=4, progress=False, log=lambda s: None)
        assert half.step == 4 and torch.load(b / STATE_FILE, weights_only=True)["step"] == 4
        msgs = []
        rest = train_tokenizer(run, b, progress=False, log=msgs.append)
        assert rest.step == 8 and any("resuming tiny from step 4" in m for m in msgs)
        wa, wb = _weights(a), _weights(b)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
        strip = lambda h: [{k: v for k, v in r.items() if k != "images_per_s"} for r in h]
        assert strip(full.history) == strip(rest.history)


def test_resume_refuses_a_different_config(tmp_path):
    train_tokenizer(_run(steps=2), tmp_path, progress=False, log=lambda s: None)
    try:
        train_tokenizer(_run("none", steps=2), tmp_path, progress=False, log=lambda s: None)
    except ValueError as e:
        assert "different config" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_lr_schedule():
    tc = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, tc) == 0.1 and lr_at(9, tc) == 1.0
    assert abs(lr_at(100, tc) - 0.1) < 1e-9 and lr_at(50, tc) < lr_at(20, tc)


def test_cli_train_tokenizer(tmp_path):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(_run(steps=2).to_dict()))
    res = CliRunner().invoke(app, ["train-tokenizer", "--config", str(cfg), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "model.safetensors").is_file() and "step 2" in res.output


def test_shipped_configs_parse():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs" / "tokenizers"
    runs = {p.stem: RunConfig.load(p) for p in root.glob("*.json")}
    assert {"fsq_nested", "fsq_control", "fsq_tail", "binary_nested"} <= runs.keys()
    assert runs["fsq_control"].train.length_mode == "none" and runs["fsq_tail"].train.length_mode == "tail"
    assert runs["binary_nested"].model.quantizer == "binary"
    shapes = {(r.model.image_size, r.model.patch_size, r.model.num_tokens, r.model.width, r.model.enc_depth,
               r.model.dec_depth) for r in runs.values()}
    assert len(shapes) == 1  # same architecture for every run


def test_multi_keep_forward_equals_separate_forwards():
    torch.manual_seed(0)
    run = _run()
    tok = Tokenizer(run.model).eval()
    x = torch.rand(3, 3, 16, 16)
    keeps = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    both = torch.stack([keeps, torch.ones_like(keeps)])
    with torch.no_grad():
        out = tok(x, both).recon
        assert out.shape == (2, 3, 3, 16, 16)
        torch.testing.assert_close(out[0], tok(x, keeps).recon)
        torch.testing.assert_close(out[1], tok(x).recon)
    try:
        tok(x, both[:, :2])
    except ValueError as e:
        assert "keep must be [B, K] or [R, B, K]" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_also_full_step_matches_explicit_two_term_loss(tmp_path):
    """One ``also_full`` step == AdamW on the mean of the sampled-prefix loss and the all-K loss."""
    from vtok.tokenizers_img.length import prefix_mask, sample_lengths
    from vtok.tokenizers_img.losses import reconstruction_loss
    from vtok.tokenizers_img.train import _optimizer, step_generator

    run = _run(steps=1, also_full=True)
    tc, mc = run.train, run.model
    res = train_tokenizer(run, tmp_path, progress=False, log=lambda s: None)

    torch.manual_seed(tc.seed)
    ref = Tokenizer(mc)
    opt = _optimizer(ref, tc)
    g = step_generator(tc.seed, 0)
    x = CropPool(training_photos(tc.sources, tc.video_frames), mc.image_size, tc.scales).sample(tc.batch_size, g)
    keep = prefix_mask(sample_lengths("nested", tc.batch_size, mc.num_tokens, g, tc.nested_dist), mc.num_tokens)
    loss_k = reconstruction_loss(ref(x, keep).recon, x, tc.grad_weight)[0]
    loss_full = reconstruction_loss(ref(x).recon, x, tc.grad_weight)[0]
    for group in opt.param_groups:
        group["lr"] = lr_at(0, tc)
    loss = (loss_k + loss_full) / 2
    lk, lf = float(loss_k.detach()), float(loss_full.detach())
    assert abs(res.history[0]["loss"] - (lk + lf) / 2) < 1e-6 * lk
    assert abs(lk - lf) > 1e-3 * lk  # the two terms really differ
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), tc.grad_clip)
    opt.step()
    got = res.tokenizer.state_dict()
    for name, w in ref.state_dict().items():
        torch.testing.assert_close(got[name], w, rtol=1e-5, atol=1e-6)
    assert TrainConfig(also_full=True) != TrainConfig()
