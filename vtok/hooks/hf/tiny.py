"""A small random-weight LLaVA saved as a real checkpoint folder (model + processor), for demos and tests.

No model hub is reachable here, so the demo builds one from configs: a CLIP tower at 336 px / patch 14 (576 image
tokens, LLaVA-1.5's shape, narrow and shallow), a Llama language model, a word-level tokenizer with a chat-style
prompt format and a CLIP image processor. It is written with ``save_pretrained`` and read back with
``from_pretrained(path)``, the path a user's own checkpoint takes. Its weights are random: it shows the mechanics
(token counts, speed, agreement with the unpruned output), never answer quality.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["<pad>", "<unk>", "<image>", "USER:", "ASSISTANT:", "what", "is", "in", "the", "image", "?", "describe",
         "a", "photo", "of", "cat", "person", "and", "where", "left", "right", "top", "bottom", "colour"]


def build_tiny_llava(path: str | Path, *, image_size: int = 336, patch: int = 14, seed: int = 0,
                     text_layers: int = 4) -> Path:
    """Create (once) and return a folder holding a tiny ``LlavaForConditionalGeneration`` and its processor."""
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
