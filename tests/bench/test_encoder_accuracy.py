"""benchmarks/encoder_accuracy.py: its shortcut equals the patched model, and a tiny run completes and resumes."""

import json

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import vtok
from tests.helpers.script_loader import load_benchmark
from vtok.bench.eval_vit import build_eval_vit, save_eval_vit


def tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=4,
                             num_heads=2, global_pool="avg").eval()


def test_image_methods_are_every_strategy_but_llm_attention_and_video():
    bench = load_benchmark("encoder_accuracy")
    video = {m.name for m in vtok.methods("temporal")}  # they need frames (several images), not one encoder pass
    in_llm = {"fastv", "pdrop", "fitprune", "sparsevlm", "holitom_llm", "mustdrop_llm"}
    tokenizer_only = {"adaptive_length"}  # reads a 1D tokenizer's prefix errors
    assert set(bench.image_methods()) == {m.name for m in vtok.methods()} - in_llm - video - tokenizer_only


def test_shortcut_equals_patched_forward_for_every_method():
    bench = load_benchmark("encoder_accuracy")
    m = tiny_vit()
    x = torch.randn(3, 1, 32, 32)
    bench.check_shortcut(m, bench.image_methods(), x, mid=2, grid=(8, 8))  # raises on a mismatch
    assert not hasattr(m, "_vtok_state")


def test_after_placement_keep_all_is_the_model():
    bench = load_benchmark("encoder_accuracy")
    m = tiny_vit()
    x = torch.randn(3, 1, 32, 32)
    with torch.inference_mode():
        with vtok.capture(m, layers=[1, 2, 3], what=("cls_attn", "keys", "hidden", "attn")) as cap:
            ref = m(x)
        cap = {i: dict(v) for i, v in cap.items()}
        for method in ("uniform", "cls_attn", "transprune", "divprune"):
            torch.testing.assert_close(bench.after_logits(m, method, 1.0, cap, (8, 8)), ref, atol=1e-5, rtol=1e-5)
        # half the tokens: the head pools exactly the kept final tokens
        out = bench.after_logits(m, "uniform", 0.5, cap, (8, 8))
        kept = torch.arange(64)[1::2]  # uniform's bin centres for k = N/2
        torch.testing.assert_close(out, m.head(m.fc_norm(cap[3]["hidden"][:, kept].mean(1))), atol=1e-5, rtol=1e-5)


def test_tiny_run_writes_rows_and_resumes(tmp_path, capsys):
    bench = load_benchmark("encoder_accuracy")
    ckpt = tmp_path / "vit.safetensors"
    torch.manual_seed(0)
    save_eval_vit(build_eval_vit(), ckpt)
    argv = ["--checkpoint", str(ckpt), "--methods", "random", "uniform", "cls_attn", "--keeps", "0.5",
            "--test-limit", "6", "--batch", "4", "--speed-batch", "2", "--rounds", "1", "--out", str(tmp_path / "o"),
            "--plot", str(tmp_path / "acc.png")]
    state = bench.main(argv)
    assert state["done"] == 6 and (tmp_path / "acc.png").exists()
    assert set(state["correct"]) == {"none"} | {f"{m}|{p}|0.5" for m in ("random", "uniform", "cls_attn")
                                                 for p in ("inside", "after")}
    assert all(0 <= v <= 6 for v in state["correct"].values()) and len(state["speed"]) == 6
    table = capsys.readouterr().out
    assert "| **random** | inside |" in table and "| cls_attn | after |" in table
    again = bench.main(argv)  # everything done: resumes and recomputes nothing
    assert again["correct"] == state["correct"]
    assert bench.main([*argv, "--report"]) == again  # report only: the saved state, untouched
    assert json.loads((tmp_path / "o" / "state.json").read_text())["done"] == 6
    with pytest.raises(ValueError, match="other settings"):
        bench.main([*argv[:-4], "--out", str(tmp_path / "o"), "--keeps", "0.25"])
    with pytest.raises(ValueError, match="no measured images"):
        bench.main([*argv[:-4], "--out", str(tmp_path / "empty"), "--report"])
    with pytest.raises(ValueError, match="cannot run on a ViT encoder"):
        bench.main([*argv, "--methods", "fastv"])


def test_resume_keys_on_checkpoint_contents_not_its_path(tmp_path):
    bench = load_benchmark("encoder_accuracy")
    torch.manual_seed(0)
    vit = build_eval_vit()
    save_eval_vit(vit, tmp_path / "a.safetensors")
    argv = ["--methods", "uniform", "--keeps", "0.5", "--test-limit", "4", "--batch", "4", "--speed-batch", "2",
            "--rounds", "1", "--out", str(tmp_path / "o")]
    state = bench.main(["--checkpoint", str(tmp_path / "a.safetensors"), *argv])
    (tmp_path / "moved").mkdir()  # same weights elsewhere (e.g. a fresh clone): resumes, nothing recomputed
    (tmp_path / "moved" / "a.safetensors").write_bytes((tmp_path / "a.safetensors").read_bytes())
    assert bench.main(["--checkpoint", str(tmp_path / "moved" / "a.safetensors"), *argv, "--report"]) == state
    with torch.no_grad():  # retrained weights at the same path: refused, never mixed into the old counts
        vit.head.bias.add_(1.0)
    save_eval_vit(vit, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="other settings"):
        bench.main(["--checkpoint", str(tmp_path / "a.safetensors"), *argv])


def test_jobs_and_resume_points_give_the_same_counts(tmp_path):
    """Forked workers, or a run stopped and resumed, count exactly what one straight run does (``random``
    included)."""
    bench = load_benchmark("encoder_accuracy")
    ckpt = tmp_path / "vit.safetensors"
    torch.manual_seed(0)
    save_eval_vit(build_eval_vit(), ckpt)
    argv = ["--checkpoint", str(ckpt), "--methods", "random", "uniform", "--keeps", "0.25", "--test-limit", "10",
            "--batch", "3", "--speed-batch", "2", "--rounds", "1"]
    one = bench.main([*argv, "--out", str(tmp_path / "one")])
    two = bench.main([*argv, "--out", str(tmp_path / "two"), "--jobs", "2"])
    assert two["done"] == one["done"] == 10 and two["correct"] == one["correct"]
    stopped = bench.main([*argv, "--out", str(tmp_path / "stop"), "--minutes", "1e-9"])  # deadline before batch 1
    assert stopped["done"] == 0
    assert bench.main([*argv, "--out", str(tmp_path / "stop")])["correct"] == one["correct"]
    assert bench.main([*argv, "--out", str(tmp_path / "stop2"), "--jobs", "2", "--minutes", "1e-9"])["done"] == 0
    assert not bench._WORK  # the workers' shared inputs are released on every exit path
    with pytest.raises(ValueError, match="--jobs"):
        bench.main([*argv, "--out", str(tmp_path / "bad"), "--jobs", "0"])


def test_merge_rows_replaces_and_adds_methods():
    bench = load_benchmark("encoder_accuracy")
    proto = {"checkpoint_sha256": "x", "keeps": [0.5], "n": 4, "batch": 2, "mid": 2}
    main = {"key": {**proto, "methods": ["random", "tome"]}, "methods": ["random", "tome"], "done": 4,
            "correct": {"none": 3, "random|inside|0.5": 2, "tome|inside|0.5": 3}, "speed": {}, "errors": {}}
    other = {"key": {**proto, "methods": ["tome", "dart"]}, "methods": ["tome", "dart"], "done": 4,
             "correct": {"none": 3, "tome|inside|0.5": 1, "dart|inside|0.5": 2}, "speed": {}, "errors": {}}
    bench.merge_rows(main, other)
    assert main["methods"] == main["key"]["methods"] == ["random", "tome", "dart"]
    assert main["correct"] == {"none": 3, "random|inside|0.5": 2, "tome|inside|0.5": 1, "dart|inside|0.5": 2}
    with pytest.raises(ValueError, match="differ in"):
        bench.merge_rows(main, {**other, "key": {**other["key"], "n": 5}})
