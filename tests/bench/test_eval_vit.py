import torch

from tests.helpers.script_loader import load_train_script
from vtok.bench.eval_vit import build_eval_vit, checkpoint_meta, load_eval_vit
from vtok.bench.fashion_mnist import load_fashion_mnist, preprocess


def test_fashion_mnist_loads_real_data():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (10000,) and set(y.unique().tolist()) == set(range(10))
    assert preprocess(x[:2]).shape == (2, 1, 56, 56)


def test_eval_vit_has_196_patch_tokens_and_5_to_10m_params():
    m = build_eval_vit()
    assert m.patch_embed.num_patches == 196
    assert 5e6 <= sum(p.numel() for p in m.parameters()) <= 10e6


def test_training_is_resumable_and_deterministic(tmp_path):
    train = load_train_script("train_eval_vit")
    common = ["--limit", "48", "--batch", "16", "--epochs", "2", "--low-res-epochs", "1", "--test-limit", "32",
              "--warmup-epochs", "0.5"]
    # uninterrupted: 6 steps (3 at 28×28, 3 at 56×56)
    train.main([*common, "--work", str(tmp_path / "a"), "--out", str(tmp_path / "a.safetensors")])
    # interrupted after 2 steps, then resumed with the same command across the resolution switch
    out = train.main([*common, "--work", str(tmp_path / "b"), "--out", str(tmp_path / "b.safetensors"),
                      "--stop-after", "2"])
    assert out == {"stopped_at": 2}
    again = train.main([*common, "--work", str(tmp_path / "b"), "--out", str(tmp_path / "b.safetensors"),
                        "--stop-after", "2"])
    assert again == {"stopped_at": 2}  # already there: no extra step
    train.main([*common, "--work", str(tmp_path / "b"), "--out", str(tmp_path / "b.safetensors")])
    a, b = load_eval_vit(tmp_path / "a.safetensors"), load_eval_vit(tmp_path / "b.safetensors")
    for (na, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), na
    assert checkpoint_meta(tmp_path / "a.safetensors")["train_images"] == 48


def test_committed_checkpoint_is_accurate():
    """The committed eval ViT: its 10k-test accuracy (stored at training time, on the fp16 weights: 85.48 %; the issue
    asks for ≥ 85 %), re-measured here on the first 1,000 test images."""
    meta = checkpoint_meta()
    assert meta["test_accuracy"] >= 0.85 and meta["test_images"] == 10000
    model = load_eval_vit()
    assert model.patch_embed.num_patches == 196
    x, y = load_fashion_mnist("test")
    with torch.inference_mode():
        pred = torch.cat([model(preprocess(x[s:s + 250])).argmax(-1) for s in range(0, 1000, 250)])
    assert (pred == y[:1000]).float().mean() >= 0.85  # 87.1 % measured
