"""Tiny random-weight VLMs of every family ``vtok.wrap`` supports, for demos and tests (no downloads).

* ``tiny_model(family)``: an in-memory model built from configs (``TINY_FAMILIES``: ``llava``, ``llava_next``,
  ``llava_onevision``, ``qwen2_vl``, ``qwen2_5_vl`` here; ``qwen3_vl``, ``internvl``, ``idefics3``, ``smolvlm``,
  ``gemma3`` in their own modules of this package, each described in its docstring), and
  ``tiny_inputs(model, [1, 2, 0])``: left-padded inputs as the family's processor gives them (token ids,
  placeholder runs, pixels), here one prompt per entry holding that many images;
* ``build_tiny_llava(path)``: a LLaVA saved as a real checkpoint folder (model + processor) read back with
  ``from_pretrained(path)``, the path a user's own checkpoint takes.

Their weights are random: they show the mechanics (token counts, speed, agreement with the unpruned output), never
answer quality.

Shapes (in-memory models): vision towers of 28 px crops / 14 px patches, 3 layers; language models 64 wide, 4 heads
(2 key / value heads), ``layers`` decoder layers (default 4). LLaVA: CLIP, 4 x 4 = 16 tokens per image. LLaVA-NeXT
(CLIP) / OneVision (SigLIP): grid pinpoints ``(28, 56)``, ``(56, 28)``, ``(56, 56)``, so an image is a 4 x 4 base view
plus 2 or 4 tiles with one image-newline per high-res row (OneVision ``anyres_max_2``: an 8 x 8 high-res grid shrinks
to 5 x 5). Qwen2-VL / Qwen2.5-VL: 14 px patches merged 2 x 2, ``t * h * w / 4`` tokens for a ``(t, h, w)`` patch grid;
Qwen2.5-VL's tower uses 56 px windows except in block 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

WORDS = ["<pad>", "<unk>", "<image>", "USER:", "ASSISTANT:", "what", "is", "in", "the", "image", "?", "describe",
         "a", "photo", "of", "cat", "person", "and", "where", "left", "right", "top", "bottom", "colour"]

PAD = 0
# LLaVA / LLaVA-NeXT / OneVision: a 256-token vocabulary
IMAGE_TOKEN = 250
VIDEO_TOKEN = 251
PINPOINTS = [[28, 56], [56, 28], [56, 56]]
NEXT_SIZES = [(10, 56), (50, 50), (56, 20)]  # (height, width) of tiny_inputs' images, in turn: 2 / 4 / 2 tiles
# Qwen2-VL / Qwen2.5-VL: a 300-token vocabulary
QWEN_VOCAB = 300
QWEN_IMAGE_TOKEN = 290
QWEN_VIDEO_TOKEN = 291
VISION_START = 292
VISION_END = 293
MERGE = 2
PATCH = 14
TEMPORAL = 2
QWEN_GRIDS = [(1, 4, 4), (1, 4, 6), (1, 8, 8), (1, 6, 4)]  # (t, h, w) patch grids of tiny_inputs' images, in turn

TINY_FAMILIES: dict[str, Callable[..., torch.nn.Module]] = {}
_FAMILY_OF: dict[str, str] = {}  # model class name -> family


def _family(name: str, cls_name: str):
    def deco(fn: Callable[..., torch.nn.Module]) -> Callable[..., torch.nn.Module]:
        TINY_FAMILIES[name] = fn
        _FAMILY_OF[cls_name] = name
        return fn

    return deco


def register_family(name: str, cls_name: str, build: Callable[..., torch.nn.Module],
                    runs: Callable[[torch.nn.Module, int, int], Runs],
                    id_extras: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None) -> None:
    """Add a tiny family from its own module ``vtok/hooks/hf/tiny/<family>.py`` (imported with this package):
    ``build(layers=, attn=, **options)`` the random-weight model of class ``cls_name``; ``runs(model, n, seed)``
    the placeholder-token runs of ``n`` images and their pixel inputs (``Runs``); ``id_extras(ids)`` inputs derived
    from the token ids (Qwen's ``mm_token_type_ids``)."""
    if name in TINY_FAMILIES:
        raise ValueError(f"tiny family {name!r} is already registered")
    _family(name, cls_name)(build)
    _RUNS[name] = runs
    if id_extras is not None:
        _ID_EXTRAS[name] = id_extras


def tiny_model(family: str, *, seed: int = 0, layers: int = 4, attn: str = "sdpa", **options: Any
               ) -> torch.nn.Module:
    """A tiny random-weight ``family`` VLM (``sorted(TINY_FAMILIES)``) in eval mode, language-model attention
    ``attn``; ``options``: the family's own (``llava``: ``select``; ``llava_onevision``: ``aspect``). It never stops
    early (no EOS), so batched and one-by-one generations stay aligned."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"family must be one of {sorted(TINY_FAMILIES)}, got {family!r}")
    torch.manual_seed(seed)
    model = TINY_FAMILIES[family](layers=layers, attn=attn, **options).eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None
    return model


def _llama(layers: int, **extra: Any):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, pad_token_id=PAD, **extra)


def _clip():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=28, patch_size=7, projection_dim=32)


@_family("llava", "LlavaForConditionalGeneration")
def _tiny_llava(*, layers: int, attn: str, select: str = "default"):
    """CLIP tower (16 patches + CLS, ``vision_feature_layer=-2``, ``select`` strategy), Llama language model."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(vision_config=_clip(), text_config=_llama(layers), image_token_id=IMAGE_TOKEN,
                      vision_feature_select_strategy=select, vision_feature_layer=-2)
    cfg._attn_implementation = attn
    return LlavaForConditionalGeneration(cfg)


@_family("llava_next", "LlavaNextForConditionalGeneration")
def _tiny_llava_next(*, layers: int, attn: str):
    """CLIP tower (CLS dropped, ``vision_feature_layer=-2``), Llama language model, anyres tiles."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    cfg = LlavaNextConfig(vision_config=_clip(), text_config=_llama(layers, eos_token_id=None, bos_token_id=None),
                          image_token_id=IMAGE_TOKEN, vision_feature_select_strategy="default",
                          vision_feature_layer=-2, image_grid_pinpoints=PINPOINTS)
    cfg._attn_implementation = attn
    return LlavaNextForConditionalGeneration(cfg)


@_family("llava_onevision", "LlavaOnevisionForConditionalGeneration")
def _tiny_llava_onevision(*, layers: int, attn: str, aspect: str = "anyres_max_2"):
    """SigLIP tower (no CLS, ``"full"``, ``vision_feature_layer=-1``), Llama language model; ``anyres_max_2``: a 4 x 8
    high-res grid stays, an 8 x 8 one is interpolated down to 5 x 5."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=28, patch_size=7, vision_use_head=False)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=_llama(layers, eos_token_id=None, bos_token_id=None),
                               image_token_index=IMAGE_TOKEN, video_token_index=VIDEO_TOKEN,
                               vision_feature_select_strategy="full", vision_feature_layer=-1,
                               image_grid_pinpoints=PINPOINTS, vision_aspect_ratio=aspect)
    cfg._attn_implementation = attn
    return LlavaOnevisionForConditionalGeneration(cfg)


def _qwen_text(layers: int) -> dict[str, Any]:
    # head_dim 16 -> 8 rotary frequencies, split over (t, h, w) by mrope_section
    return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=QWEN_VOCAB, max_position_embeddings=512, pad_token_id=PAD,
                bos_token_id=1, eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                 "mrope_section": [2, 3, 3]},
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})  # transformers 4.x reads this one


def _qwen_ids() -> dict[str, int]:
    return dict(image_token_id=QWEN_IMAGE_TOKEN, video_token_id=QWEN_VIDEO_TOKEN, vision_start_token_id=VISION_START,
                vision_end_token_id=VISION_END)


def sharpen_qwen_vision(model: torch.nn.Module) -> torch.nn.Module:
    """Sharper vision attention than the 0.02 init gives (near-uniform rows would make attention scores near-ties)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for blk in model.model.visual.blocks:
            w = blk.attn.qkv.weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.5)
    return model


@_family("qwen2_vl", "Qwen2VLForConditionalGeneration")
def _tiny_qwen2_vl(*, layers: int, attn: str):
    """Vision depth 2, embed 32, 2 heads, patch 14, merge 2."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL)
    cfg = Qwen2VLConfig(vision_config=vision, text_config=_qwen_text(layers), **_qwen_ids())
    cfg._attn_implementation = attn
    return sharpen_qwen_vision(Qwen2VLForConditionalGeneration(cfg))


@_family("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration")
def _tiny_qwen2_5_vl(*, layers: int, attn: str):
    """Vision depth 3 with full attention only in block 1 (blocks 0 and 2 use 56 px windows = 2 x 2 merged tokens),
    embed 32, 2 heads, patch 14, merge 2."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = dict(depth=3, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2,
                  patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, window_size=56,
                  fullatt_block_indexes=[1])
    cfg = Qwen2_5_VLConfig(vision_config=vision, text_config=_qwen_text(layers), **_qwen_ids())
    cfg._attn_implementation = attn
    return sharpen_qwen_vision(Qwen2_5_VLForConditionalGeneration(cfg))


# ---------------------------------------------------------------------------------------------------------- inputs
def family_of(model: torch.nn.Module) -> str:
    """The ``TINY_FAMILIES`` name of ``model``'s class."""
    for cls in type(model).__mro__:
        if cls.__name__ in _FAMILY_OF:
            return _FAMILY_OF[cls.__name__]
    raise TypeError(f"{type(model).__name__} is none of the tiny families {sorted(TINY_FAMILIES)}")


def left_pad(rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [B, L], attention_mask [B, L])`` of token rows, left-padded with ``PAD``."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, n - len(r):] = 1
    return ids, mask


def llava_pixels(n: int, seed: int = 0) -> torch.Tensor:
    """``pixel_values [n, 3, 28, 28]``: random images for ``llava``."""
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


def next_pixels(image_sizes: Sequence[tuple[int, int]], model: torch.nn.Module, seed: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values [n, max_crops, 3, 28, 28], image_sizes [n, 2])`` random crops of images of ``image_sizes``
    (height, width) for ``llava_next`` / ``llava_onevision``, zero-padded to the largest crop count as the processors
    do."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    g = torch.Generator().manual_seed(seed)
    counts = [image_size_to_num_patches(list(s), model.config.image_grid_pinpoints, 28) for s in image_sizes]
    pv = torch.zeros(len(image_sizes), max(counts, default=1), 3, 28, 28)
    for i, c in enumerate(counts):
        pv[i, :c] = torch.randn(c, 3, 28, 28, generator=g)
    return pv, torch.tensor([list(s) for s in image_sizes], dtype=torch.long).reshape(-1, 2)


def qwen_pixels(grids: Sequence[tuple[int, int, int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values [sum(t*h*w), 3 * 2 * 14 * 14], image_grid_thw [n, 3])``: random images of the given
    ``(t, h, w)`` patch grids for ``qwen2_vl`` / ``qwen2_5_vl``, one row per 14 px patch as the processor gives."""
    g = torch.Generator().manual_seed(seed)
    n = sum(t * h * w for t, h, w in grids)
    return (torch.randn(n, 3 * TEMPORAL * PATCH * PATCH, generator=g),
            torch.tensor([list(x) for x in grids], dtype=torch.long).reshape(-1, 3))


Runs = tuple[list[list[int]], dict[str, Any]]  # per image its placeholder run; the pixel inputs


def _llava_runs(model: torch.nn.Module, n: int, seed: int) -> Runs:
    per = 16 + (1 if model.config.vision_feature_select_strategy == "full" else 0)
    return [[IMAGE_TOKEN] * per for _ in range(n)], ({"pixel_values": llava_pixels(n, seed)} if n else {})


@torch.no_grad()
def _next_runs(model: torch.nn.Module, n: int, seed: int) -> Runs:
    if not n:
        return [], {}
    pv, sizes = next_pixels([NEXT_SIZES[i % len(NEXT_SIZES)] for i in range(n)], model, seed)
    feats = model.model.get_image_features(pv, sizes)  # the model's own packing says how many tokens each takes
    counts = [int(f.shape[0]) for f in getattr(feats, "pooler_output", feats)]
    return [[IMAGE_TOKEN] * c for c in counts], {"pixel_values": pv, "image_sizes": sizes}


def qwen_runs(model: torch.nn.Module, n: int, seed: int) -> Runs:
    grids = [QWEN_GRIDS[i % len(QWEN_GRIDS)] for i in range(n)]
    pix, thw = qwen_pixels(grids, seed)
    runs = [[VISION_START] + [QWEN_IMAGE_TOKEN] * (t * h * w // MERGE ** 2) + [VISION_END] for t, h, w in grids]
    return runs, ({"pixel_values": pix, "image_grid_thw": thw} if n else {})


def qwen_token_types(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    import transformers

    if transformers.__version__.startswith("4."):  # 4.x has no mm_token_type_ids (get_rope_index reads the ids)
        return {}
    return {"mm_token_type_ids": (ids == QWEN_IMAGE_TOKEN).int() + 2 * (ids == QWEN_VIDEO_TOKEN).int()}


_RUNS: dict[str, Callable[[torch.nn.Module, int, int], Runs]] = {
    "llava": _llava_runs, "llava_next": _next_runs, "llava_onevision": _next_runs, "qwen2_vl": qwen_runs,
    "qwen2_5_vl": qwen_runs}
_ID_EXTRAS: dict[str, Callable[[torch.Tensor], dict[str, torch.Tensor]]] = {
    "qwen2_vl": qwen_token_types, "qwen2_5_vl": qwen_token_types}


def tiny_inputs(model: torch.nn.Module, images_per_prompt: Sequence[int], *, seed: int = 0,
                text: tuple[Sequence[int], Sequence[int]] = ((1, 5, 9), (11, 12, 13))) -> dict[str, torch.Tensor]:
    """Left-padded inputs for a ``tiny_model``, as its processor gives them: prompt ``b`` is ``text[0]``, then
    ``images_per_prompt[b]`` images (each its placeholder run, Qwen's between vision start / end, followed by token
    7), then ``text[1]``; random pixels, the images of all prompts in order (LLaVA-NeXT / OneVision: sizes
    ``NEXT_SIZES`` in turn; Qwen: patch grids ``QWEN_GRIDS`` in turn). Qwen inputs carry ``mm_token_type_ids``
    on transformers 5."""
    family = family_of(model)
    runs, pixels = _RUNS[family](model, sum(images_per_prompt), seed)
    rows, used = [], 0
    for n in images_per_prompt:
        row = list(text[0])
        for run in runs[used:used + n]:
            row += run + [7]
        used += n
        rows.append(row + list(text[1]))
    ids, mask = left_pad(rows)
    extra = _ID_EXTRAS.get(family)
    return {"input_ids": ids, "attention_mask": mask, **pixels, **(extra(ids) if extra else {})}


# ---------------------------------------------------------------------------------------------------------- folder
def build_tiny_llava(path: str | Path, *, image_size: int = 336, patch: int = 14, seed: int = 0,
                     text_layers: int = 4) -> Path:
    """Create (once) and return a folder holding a tiny ``LlavaForConditionalGeneration`` and its processor: a CLIP
    tower at 336 px / patch 14 (576 image tokens, LLaVA-1.5's shape, narrow and shallow), a Llama language model, a
    word-level tokenizer with a chat-style prompt format and a CLIP image processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    path = Path(path)
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    words = WORDS + [f"w{i}" for i in range(256 - len(WORDS))]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                        padding_side="left")
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    images = CLIPImageProcessor(size={"shortest_edge": image_size},
                                crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="default", image_token="<image>",
                               num_additional_image_tokens=1)
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                              image_size=image_size, patch_size=patch, projection_dim=64)
    text = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=text_layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(words), max_position_embeddings=2048,
                       pad_token_id=vocab["<pad>"])
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab["<image>"],
                      vision_feature_select_strategy="default", vision_feature_layer=-2)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = vocab["<pad>"]
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _load_families() -> None:
    """Import the families kept in their own modules of this package (``register_family``)."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


_load_families()
