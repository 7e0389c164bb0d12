"""Tiny random-weight VLMs saved as real checkpoint folders (model + the family's own processor), no downloads.

``build_tiny_folder(family, path)`` writes ``tiny_model(family)`` with ``save_pretrained`` beside the family's real
processor class, built here: a word-level tokenizer whose vocabulary holds the family's special tokens at the ids the
tiny model's config uses (``"\\n"`` at id 20 too), a chat template in the family's format, and the family's image
processor sized so that its patch grid matches the tiny vision tower. ``AutoProcessor.from_pretrained(path)`` and
``AutoModelForImageTextToText.from_pretrained(path)`` read it back, the path a user's own checkpoint takes.

Per family (``FOLDER_FAMILIES``):

* ``llava``: ``build_tiny_llava`` (``USER: <image> ... ASSISTANT:`` prompts, no chat template);
* ``qwen3_vl``: ``Qwen3VLProcessor``, Qwen2-VL image processor at 14 px patches merged 2 x 2, images resized to
  56 - 112 px a side (16 tokens for a square photo);
* ``gemma3``: ``Gemma3Processor``, images resized to 56 x 56, 16 image tokens between ``<start_of_image>`` /
  ``<end_of_image>``;
* ``internvl``: ``InternVLProcessor``, 56 px tiles (up to 4 plus a thumbnail), 16 tokens per tile;
* ``smolvlm``: ``SmolVLMProcessor`` (it needs the ``num2words`` package, a dev dependency, which it uses for video
  prompts only), images resized to 112 px on the longest edge and split into 56 px crops plus a global view, 16
  tokens per crop.

Registers nothing: this module only saves the families of the other modules of this package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

NEWLINE = 20  # "\n": an added (non-special) token, so chat templates' line breaks survive word-level tokenization
_WORDS = ["what", "is", "in", "the", "image", "?", "describe", "a", "photo", "of", "cat", "person", "and", "where",
          "left", "right", "top", "bottom", "colour", "user", "assistant", "model", "User:", "Assistant:"]

_QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<start_of_image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
    "{% endif %}")
_INTERNVL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}:{% if m['content'] is string %}"
    "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")


def _tokenizer(size: int, specials: dict[int, str], named: dict[str, str], cls: Any = None, **kwargs: Any):
    """A word-level ``PreTrainedTokenizerFast`` of ``size`` ids: ``<pad>`` 0, ``<unk>`` 1, ``"\\n"`` at ``NEWLINE``,
    ``specials`` (id -> token, added as special tokens), ``_WORDS`` then ``w<i>`` fillers at the free ids; ``named``
    (e.g. ``{"image_token": "<image>"}``): attributes the processor reads (``tokenizer.image_token`` /
    ``image_token_id``), saved with it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    fixed = {0: "<pad>", 1: "<unk>", NEWLINE: "\n", **specials}
    words = iter(_WORDS + [f"w{i}" for i in range(size)])
    vocab = {(fixed[i] if i in fixed else next(words)): i for i in range(size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = (cls or PreTrainedTokenizerFast)(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                                 padding_side="left", extra_special_tokens=named,
                                                 model_input_names=["input_ids", "attention_mask"], **kwargs)
    tokenizer.add_tokens(["\n"])
    tokenizer.add_tokens(list(specials.values()), special_tokens=True)
    return tokenizer


def _qwen_tokenizer_class() -> Any:
    """``Qwen2TokenizerFast`` on transformers 4.x (its processors check the tokenizer's class), else ``None``."""
    import transformers

    return transformers.Qwen2TokenizerFast if transformers.__version__.startswith("4.") else None


def qwen_tokenizer():
    """The tiny Qwen-VL tokenizer (``QWEN_VOCAB`` ids; image / video pads, vision start / end, chat turns)."""
    from vtok.hooks.hf import tiny as t

    specials = {t.QWEN_IMAGE_TOKEN: "<|image_pad|>", t.QWEN_VIDEO_TOKEN: "<|video_pad|>",
                t.VISION_START: "<|vision_start|>", t.VISION_END: "<|vision_end|>", 294: "<|im_start|>",
                295: "<|im_end|>"}
    named = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
             "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
    return _tokenizer(t.QWEN_VOCAB, specials, named, cls=_qwen_tokenizer_class())


def qwen_grid(max_side: int) -> dict[str, Any]:
    """Qwen-VL image / video processor options: 14 px patches merged 2 x 2, images resized to 2 to ``max_side``
    merged tokens a side (in pixel count)."""
    from vtok.hooks.hf import tiny as t

    side = t.PATCH * t.MERGE
    least, most = (2 * side) ** 2, (max_side * side) ** 2
    return dict(patch_size=t.PATCH, merge_size=t.MERGE, temporal_patch_size=t.TEMPORAL,
                size={"shortest_edge": least, "longest_edge": most}, min_pixels=least, max_pixels=most)


def qwen3_vl_processor(max_side: int = 4):
    """The tiny Qwen3-VL processor (images 56 x 56 to 112 x 112 px by default)."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    grid = qwen_grid(max_side)
    return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(**grid), tokenizer=qwen_tokenizer(),
                            video_processor=Qwen3VLVideoProcessor(**grid), chat_template=_QWEN_TEMPLATE)


def _gemma3_processor():
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    from vtok.hooks.hf.tiny import IMAGE_TOKEN
    from vtok.hooks.hf.tiny.gemma3 import BOI, EOI, IMAGE_SIZE, TOKENS

    specials = {IMAGE_TOKEN: "<image_soft_token>", BOI: "<start_of_image>", EOI: "<end_of_image>", 2: "<bos>",
                3: "<start_of_turn>", 4: "<end_of_turn>"}
    tokenizer = _tokenizer(256, specials, {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                                           "eoi_token": "<end_of_image>"}, bos_token="<bos>", add_bos_token=False)
    images = Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_pan_and_scan=False)
    return Gemma3Processor(image_processor=images, tokenizer=tokenizer, image_seq_length=TOKENS,
                           chat_template=_GEMMA_TEMPLATE)


def _internvl_processor():
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    from vtok.hooks.hf.tiny.internvl import IMAGE_SEQ, IMG_CONTEXT, IMG_END, IMG_START, TILE

    specials = {IMG_CONTEXT: "<IMG_CONTEXT>", IMG_START: "<img>", IMG_END: "</img>", 251: "<video>",
                2: "<|im_start|>", 3: "<|im_end|>"}
    tokenizer = _tokenizer(256, specials, {"context_image_token": "<IMG_CONTEXT>", "start_image_token": "<img>",
                                           "end_image_token": "</img>", "video_token": "<video>"})
    size = {"height": TILE, "width": TILE}
    images = GotOcr2ImageProcessor(size=size, crop_to_patches=True, min_patches=1, max_patches=4)
    return InternVLProcessor(image_processor=images, tokenizer=tokenizer,
                             video_processor=InternVLVideoProcessor(size=size), image_seq_length=IMAGE_SEQ,
                             chat_template=_INTERNVL_TEMPLATE)


def _smolvlm_processor():
    """Needs ``num2words`` (``SmolVLMProcessor`` refuses to start without it; it only writes video prompts)."""
    from transformers import SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    from vtok.hooks.hf.tiny.idefics3 import CROP, FAKE, GLOBAL, IMAGE, ROW_COL, SEQ

    specials = {IMAGE: "<image>", FAKE: "<fake_token_around_image>", GLOBAL: "<global-img>",
                248: "<end_of_utterance>", 249: "<video>", 2: "<|im_start|>",
                **{ROW_COL + 4 * i + j: f"<row_{i + 1}_col_{j + 1}>" for i in range(4) for j in range(4)}}
    tokenizer = _tokenizer(256, specials, {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                                           "global_image_token": "<global-img>",
                                           "end_of_utterance_token": "<end_of_utterance>", "video_token": "<video>"})
    sizes = dict(size={"longest_edge": 2 * CROP}, max_image_size={"longest_edge": CROP})
    return SmolVLMProcessor(image_processor=SmolVLMImageProcessor(do_image_splitting=True, **sizes),
                            tokenizer=tokenizer, video_processor=SmolVLMVideoProcessor(**sizes), image_seq_len=SEQ,
                            chat_template=_SMOLVLM_TEMPLATE)


_PROCESSORS = {"qwen3_vl": qwen3_vl_processor, "gemma3": _gemma3_processor, "internvl": _internvl_processor,
               "smolvlm": _smolvlm_processor}
FOLDER_FAMILIES = ("llava", *_PROCESSORS)


def build_tiny_folder(family: str, path: str | Path, *, seed: int = 0, layers: int = 4, **opts: Any) -> Path:
    """Create (once) and return a checkpoint folder of a tiny random-weight ``family`` VLM (``FOLDER_FAMILIES``) and
    its processor (see the module docstring). ``llava``: ``build_tiny_llava(path, seed=, text_layers=, **opts)``;
    other families: ``tiny_model(family, seed=, layers=, **opts)``."""
    if family not in FOLDER_FAMILIES:
        raise ValueError(f"family must be one of {list(FOLDER_FAMILIES)}, got {family!r}")
    from vtok.hooks.hf.tiny import build_tiny_llava, tiny_model

    path = Path(path)
    if family == "llava":
        return build_tiny_llava(path, seed=seed, text_layers=layers, **opts)
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    processor = _PROCESSORS[family]()
    model = tiny_model(family, seed=seed, layers=layers, **opts)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
