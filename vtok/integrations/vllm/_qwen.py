"""What the plugin's Qwen2.5-VL and Qwen3-VL classes share (``vtok.integrations.vllm``): placeholder counts, the pruned
features of one image or video (run alone, cached by pixels), the tower's attention, and 3-D positions of kept tokens.

The mixin :class:`QwenPruning` goes first in the bases of a subclass of vLLM's model class (it calls ``super()`` for
the unpruned paths) and reads ``self.visual`` (the vision tower), ``self.config`` and ``self.vtok`` (the settings).
See ``qwen2_5_vl.py`` for the design (why the positions are made where the tower runs) and the context rule.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor
from vllm.multimodal.processing import PromptReplacement

from vtok.hooks.hf import _vision
from vtok.integrations.vllm import settings as vs

CACHE_ITEMS = 256  # pruned items kept between get_mrope_input_positions and embed_multimodal
GRID_KEY = {"image": "image_grid_thw", "video": "video_grid_thw"}
PIXELS_KEY = {"image": "pixel_values", "video": "pixel_values_videos"}
EMBEDS_KEY = {"image": "image_embeds", "video": "video_embeds"}


def thw_of(thw: Any) -> tuple[int, int, int]:
    t, h, w = (int(v) for v in (thw.tolist() if isinstance(thw, Tensor) else thw))
    return t, h, w


def item_shape(cfg: vs.Settings, thw: Any, merge: int, modality: str) -> vs.ItemShape:
    """The shape ``vtok.wrap`` gives a method for an image (1 frame) or a video of patch grid ``thw``."""
    t, h, w = thw_of(thw)
    if modality == "image" and t != 1:
        raise ValueError(f"vtok: an image must have 1 temporal patch, got grid {(t, h, w)}")
    return cfg.item_shape(t, (h // merge, w // merge))


def _shrink(replacement: Any, cfg: vs.Settings, out_mm_kwargs: Any, merge: int, modality: str, item_idx: int
            ) -> list[int]:
    ids = list(replacement(item_idx))
    shape = item_shape(cfg, out_mm_kwargs[modality][item_idx][GRID_KEY[modality]].data, merge, modality)
    if len(ids) != shape.n or len(set(ids)) != 1:
        raise NotImplementedError(f"vtok: unexpected Qwen {modality} placeholders ({len(ids)} for {shape})")
    return ids[:1] * cfg.count(shape.n, shape.grid)


def shrink_updates(updates: Sequence[Any], cfg: vs.Settings | None, out_mm_kwargs: Any, merge: int,
                   modalities: Sequence[str]) -> list[Any]:
    """The processor's prompt updates with each run of ``modalities`` placeholders cut to ``vtok.retained_count``."""
    if cfg is None:
        return list(updates)
    return [u if u.modality not in modalities else
            PromptReplacement(modality=u.modality, target=u.target,
                              replacement=partial(_shrink, u.replacement, cfg, out_mm_kwargs, merge, u.modality))
            for u in updates]


def pruning_processor(base: type, family: str, modalities: tuple[str, ...]) -> type:
    """A subclass of vLLM's multimodal processor ``base`` whose prompt updates cut each run of ``modalities``
    placeholders to ``vtok.retained_count`` (the settings read from the model config of ``family``)."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs: Mapping[str, Any], out_mm_kwargs
                            ) -> Sequence[Any]:
        updates = base._get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        merge = self.info.get_image_processor(**hf_processor_mm_kwargs).merge_size
        return shrink_updates(updates, vs.read(self.info.get_hf_config(), family), out_mm_kwargs, merge, modalities)

    doc = f"{base.__name__} with each {' / '.join(modalities)} placeholder run cut to ``vtok.retained_count``."
    return type(f"Vtok{base.__name__}", (base,), {"_get_prompt_updates": _get_prompt_updates, "__doc__": doc})


def assemble_positions(runs: list[tuple[int, np.ndarray]], n_tokens: int) -> tuple[Tensor, int]:
    """3-D positions ``[3, n_tokens]`` and the M-RoPE delta of a prompt whose vision runs are ``(offset of the first
    vision token, [3, k] offsets of its tokens from the run's start)``: text counts on by one, a run takes its offsets
    after the text before it and spans ``max offset + 1`` positions (vtok.wrap's ``"reindex"``)."""
    pieces: list[np.ndarray] = []
    st = cur = 0
    for offset, pos in sorted(runs, key=lambda r: r[0]):
        text = offset - st
        pieces.append(np.broadcast_to(np.arange(text), (3, text)) + cur)
        cur += text
        pieces.append(pos + cur)
        cur += int(pos.max()) + 1
        st = offset + pos.shape[1]
    if st < n_tokens:
        text = n_tokens - st
        pieces.append(np.broadcast_to(np.arange(text), (3, text)) + cur)
    positions = np.concatenate(pieces, axis=1).astype(np.int64)
    return torch.from_numpy(positions), int(positions.max()) + 1 - n_tokens


class QwenPruning:
    """Pre-LLM pruning for vLLM's Qwen-VL classes (see the module docstring)."""

    FAMILY: str
    PRUNED_MODALITIES: tuple[str, ...] = ("image", "video")

    def _vtok_setup(self) -> None:
        """Read the settings, refuse EVS beside them, and capture the tower block for attention methods."""
        self.vtok = vs.read(self.config, self.FAMILY)
        self._vtok_cache: OrderedDict[bytes, tuple[Tensor, Tensor]] = OrderedDict()
        self._vtok_got: dict[str, Tensor] | None = None
        if self.vtok is None:
            return
        if self.is_multimodal_pruning_enabled:
            raise ValueError("vtok: vtok_method together with vLLM's video_pruning_rate (EVS) is not supported; "
                             "set one of them")
        if self.vtok.tower_context:
            self._hook_block()

    def get_encoder_cudagraph_config(self):
        """vLLM's, without the pruned modalities: the encoder CUDA-graph path (GPU) bypasses ``_process_*_input``, as
        vLLM's own EVS notes for its postprocess."""
        cfg = super().get_encoder_cudagraph_config()
        if self.vtok is not None:
            cfg = dataclasses.replace(cfg, modalities=[m for m in cfg.modalities if m not in self.PRUNED_MODALITIES])
        return cfg

    # --- the tower's attention (methods reading cls_attn / keys)
    def _hook_block(self) -> None:
        """Capture the input of the block ``vtok.wrap`` reads: the last full-attention block (Qwen2.5-VL's
        ``fullatt_block_indexes``), else the last block."""
        blocks = self.visual.blocks
        depth = len(blocks)
        full = [i % depth for i in getattr(self.visual, "fullatt_block_indexes", []) if -depth <= i < depth]
        self._vtok_block = blocks[max(full) if full else depth - 1]
        if self._vtok_block.attn.num_attention_heads_per_partition != self.config.vision_config.num_heads:
            raise ValueError(f"vtok: vtok_method {self.vtok.method!r} reads the tower's attention, which the plugin "
                             f"does not recompute with tensor parallelism (the tower's heads are split over ranks)")
        # vLLM's @support_torch_compile gives the block a __call__ that calls self.forward directly (no module
        # hooks), so the capture wraps forward on the instance
        forward = self._vtok_block.forward

        def capture(*args, **kwargs):
            self._vtok_got = {"x": args[0] if args else kwargs["x"], "cu": kwargs["cu_seqlens"],
                              "cos": kwargs["rotary_pos_emb_cos"], "sin": kwargs["rotary_pos_emb_sin"]}
            return forward(*args, **kwargs)

        self._vtok_block.forward = capture

    @torch.no_grad()
    def _tower_context(self, thw: tuple[int, int, int]) -> dict[str, Tensor]:
        """``cls_attn [n]`` / ``keys [H, n, dh]`` of the one item the tower just ran on, in row-major merged order."""
        if self._vtok_got is None:
            raise RuntimeError("vtok: the vision tower's block did not run through the plugin's capture (a compiled "
                               "encoder, compile_mm_encoder, bypasses it)")
        got, self._vtok_got = self._vtok_got, None
        block, want = self._vtok_block, self.vtok.tower_context
        attn = block.attn
        qkv, _ = attn.qkv(block.norm1(got["x"]))  # [S, 1, 3 * H * dh]
        s_len, heads = qkv.shape[0], attn.num_attention_heads_per_partition
        q, k = qkv.reshape(s_len, 3, heads, -1)[:, :2].unbind(1)  # [S, H, dh] each, the tower's order
        unit = self.visual.spatial_merge_size ** 2
        ctx: dict[str, Tensor] = {}
        if "keys" in want:
            ctx["keys"] = k.float().reshape(s_len // unit, unit, heads, -1).mean(1).transpose(0, 1).to(k.dtype)
        if "cls_attn" in want:
            qk = attn.apply_rotary_emb(torch.stack([q, k]).contiguous(), got["cos"], got["sin"])  # [2, S, H, dh]
            qr, kr = qk[0].transpose(0, 1)[None], qk[1].transpose(0, 1)[None]  # [1, H, S, dh]
            scale = float(attn.hidden_size_per_attention_head ** -0.5)
            bounds = [int(v) for v in got["cu"]]
            rec = torch.cat([_vision.received(qr[:, :, a:b], kr[:, :, a:b], scale)[0]
                             for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a])  # [S]
            ctx["cls_attn"] = rec.reshape(-1, unit).mean(1)
        if hasattr(self.visual, "get_window_index_thw"):  # Qwen2.5-VL: window order -> row-major
            back = torch.argsort(self.visual.get_window_index_thw(*thw)[0].to(got["x"].device))
            ctx = {key: v.index_select(-1 if key == "cls_attn" else -2, back) for key, v in ctx.items()}
        return ctx

    # --- the pruned features of one item, computed alone and cached
    def _split(self, feats: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(features the method sees, rows that follow the selection)``; Qwen3-VL overrides (DeepStack)."""
        return feats, None

    def _prune(self, feats: Tensor, shape: vs.ItemShape, ctx: dict[str, Tensor] | None = None
               ) -> tuple[Tensor, Tensor]:
        """``(pruned features, kept)``: ``kept [k]`` each output token's index in the item's merged grid (a merged
        token's representative); extra rows (DeepStack) are gathered at ``kept``."""
        main, extra = self._split(feats)
        out, sel = self.vtok.prune(main, shape, ctx)
        kept = sel.emitted_keep()[0]
        if extra is not None:
            out = torch.cat([out, extra.index_select(0, kept.to(extra.device))], dim=-1)
        return out, kept.to("cpu")

    def _key(self, modality: str, pixels: Tensor, thw: Sequence[int]) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        h.update(modality.encode())
        h.update(np.asarray(list(thw), dtype=np.int64).tobytes())
        h.update(pixels.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        return h.digest()

    @torch.inference_mode()
    def _pruned(self, modality: str, pixels: Tensor, thw: Sequence[int], pop: bool) -> tuple[Tensor, Tensor]:
        """``(features [k, D], kept [k])`` of one image or video, from the cache or by running the tower on this item
        alone."""
        pixels = pixels.to(device=self.visual.device, dtype=self.visual.dtype)
        thw = thw_of(thw)
        key = self._key(modality, pixels, thw)
        hit = self._vtok_cache.pop(key, None) if pop else self._vtok_cache.get(key)
        if hit is not None:
            return hit
        feats = self.visual(pixels, grid_thw=[list(thw)])
        ctx = self._tower_context(thw) if self.vtok.tower_context else None
        got = self._prune(feats, item_shape(self.vtok, thw, self.visual.spatial_merge_size, modality), ctx)
        if not pop:
            self._vtok_cache[key] = got
            while len(self._vtok_cache) > CACHE_ITEMS:
                self._vtok_cache.popitem(last=False)
        return got

    def _refuse_embeds(self, modality: str) -> None:
        if self.vtok.tower_context:
            raise ValueError(f"vtok: vtok_method {self.vtok.method!r} reads the vision tower's attention; "
                             f"{EMBEDS_KEY[modality]} inputs bypass the tower (give pixels, or a feature-only method)")

    def _pruned_items(self, modality: str, items, base) -> tuple[Tensor, ...]:
        thw = items[GRID_KEY[modality]].tolist()
        merge = self.visual.spatial_merge_size
        if items["type"] == EMBEDS_KEY[modality]:
            self._refuse_embeds(modality)
            return tuple(self._prune(e, item_shape(self.vtok, g, merge, modality))[0]
                         for e, g in zip(base(items), thw, strict=True))
        pixels = items[PIXELS_KEY[modality]].split([t * h * w for t, h, w in thw])
        return tuple(self._pruned(modality, p, g, pop=True)[0] for p, g in zip(pixels, thw, strict=True))

    def _process_image_input(self, image_input) -> tuple[Tensor, ...]:
        if self.vtok is None:
            return super()._process_image_input(image_input)
        return self._pruned_items("image", image_input, super()._process_image_input)

    def _process_video_input(self, video_input) -> tuple[Tensor, ...]:
        if self.vtok is None or "video" not in self.PRUNED_MODALITIES:
            return super()._process_video_input(video_input)
        return self._pruned_items("video", video_input, super()._process_video_input)

    # --- 3-D positions
    def _kept(self, modality: str, data: Mapping[str, Any], thw: tuple[int, int, int]) -> np.ndarray:
        """Each kept token's index in the item's merged grid, in output order."""
        if PIXELS_KEY[modality] in data:
            return self._pruned(modality, data[PIXELS_KEY[modality]].data, thw, pop=False)[1].numpy()
        self._refuse_embeds(modality)
        shape = item_shape(self.vtok, thw, self.visual.spatial_merge_size, modality)
        return self._prune(data[EMBEDS_KEY[modality]].data, shape)[1].numpy()

    def _kept_offsets(self, modality: str, data: Mapping[str, Any], factor: float = 1.0) -> np.ndarray:
        """``[3, k]``: each kept token's ``(t, h, w)`` offset from its item's start (temporal offsets scaled by
        ``factor`` and floored, as vLLM scales a video's)."""
        thw = thw_of(data[GRID_KEY[modality]].data)
        merge = self.visual.spatial_merge_size
        pos = np.indices((thw[0], thw[1] // merge, thw[2] // merge)).reshape(3, -1)
        if factor != 1.0:
            pos[0] = (pos[0] * factor).astype(np.int64)
        return pos[:, self._kept(modality, data, thw)]
