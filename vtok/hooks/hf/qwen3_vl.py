"""Adapter for ``Qwen3VLForConditionalGeneration`` (Qwen3-VL: DeepStack, interleaved M-RoPE) — images.

Records, grids and the vision-side context are Qwen2-VL's (``vtok.hooks.hf.qwen2_vl``: ``t * h * w / merge²``
tokens per image, ``cls_attn`` the mean received attention of the last vision block averaged per merger group,
``keys`` its keys); positions are the same 3-D ids (interleaving only changes how the language model's RoPE mixes the
``(t, h, w)`` frequencies, not the ids), kept (``"original"``) or renumbered (``"reindex"``).

DeepStack: the tower's features at ``deepstack_visual_indexes`` (one merger each) are added to the output of the
first decoder layers at the image tokens (``visual_pos_masks [B, L]``, ``deepstack_visual_embeds``: per layer
``[n_visual, D]`` in the mask's order). The adapter prunes every one of them with the image tokens' selection:

* before the language model (``prefill_inputs``): the mask and each layer's rows gathered at the kept tokens (a
  merged token takes its representative's rows);
* inside it: a stage at a layer ``K`` up to the last injection re-gathers the later injections with the stage's
  selection (the language model's ``_deepstack_process`` is wrapped per instance; ``stage_mask``, which returns the
  engine's mask unchanged, keeps the stage's index).

Videos: Qwen3-VL puts each frame (temporal patch) in its own ``<t seconds>`` ``<vision_start>`` … ``<vision_end>``
run, timestamps as text instead of temporal position ids, and numbers each run's 3-D positions like an image's. So a
video is one record per frame (``frames=1``, ``grid`` its merged ``(h, w)``), all of the same video: one budget per
video, split evenly over its frames (``split_budget``); each frame's kept tokens stay in its own run, between its
timestamps. Temporal strategies therefore see one frame at a time (no cross-frame merging).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vtok.hooks.hf._runtime import ImageRecord
from vtok.hooks.hf.adapter import FeatureCall, Undo, register_adapter
from vtok.hooks.hf.providers import TOKEN_DIM
from vtok.hooks.hf.qwen2_vl import QwenVLAdapter

if TYPE_CHECKING:
    from vtok.hooks.hf._runtime import Runtime


def _gather(t: Tensor, index: Tensor) -> Tensor:
    """``t [B, L]`` at ``index [B, L']`` (-1 → 0)."""
    return t.to(index.device).gather(1, index.clamp_min(0)).masked_fill(index < 0, 0)


def gather_visual(mask: Tensor, embeds: list[Tensor], index: Tensor) -> tuple[Tensor, list[Tensor]]:
    """DeepStack inputs at the kept tokens: ``mask [B, L]`` (visual positions), ``embeds`` per layer ``[n, D]`` (rows
    in the mask's row-major order), ``index [B, L']`` (source position of each token, -1 padding) → the mask
    ``[B, L']`` and each layer's rows of the kept visual tokens, in the new order."""
    row = (mask.reshape(-1).long().cumsum(0) - 1).view(mask.shape)
    new_mask = _gather(mask.long(), index).bool() & (index >= 0)
    rows = _gather(row, index)[new_mask].to(embeds[0].device) if embeds else None
    return new_mask, [e[rows] for e in embeds]


_IN_VIDEO: set[int] = set()  # ids of the inner models running get_video_features now (it calls get_image_features)


@register_adapter
class Qwen3VLAdapter(QwenVLAdapter):
    """Model-specific glue for Qwen3-VL; the ``Runtime`` does the rest."""

    names = ("Qwen3VLForConditionalGeneration",)
    positions = "mrope"

    def _records(self, model: torch.nn.Module, block: torch.nn.Module, grid_key: str, token: int, video: bool,
                 want: set[str], out: Any, call: FeatureCall) -> list[ImageRecord]:
        if not video and id(self.inner(model)) in _IN_VIDEO:
            return []  # get_video_features runs get_image_features: its frames are the video's records
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], list):  # 4.x: (features, deepstack)
            out = out[0]
        recs = super()._records(model, block, grid_key, token, video, want, out, call)
        return [part for r in recs for part in self._frames(r)] if video else recs

    @staticmethod
    def _frames(rec: ImageRecord) -> list[ImageRecord]:
        """A video's record split into one record per frame (its own timestamped run in the prompt), all of the same
        video (``image``: one budget, split evenly over the frames), each ``frames=1``; the context cut per frame."""
        if rec.grid is None or rec.frames is None:
            raise NotImplementedError(f"vtok: a Qwen3-VL video of {rec.n} tokens without its frame grid")
        per = rec.grid[0] * rec.grid[1]
        out = []
        for f in range(rec.frames):
            ctx = {k: v.narrow(TOKEN_DIM[k] % v.dim(), f * per, per) for k, v in rec.ctx.items()}
            out.append(ImageRecord(n=per, image=rec.image, grid=rec.grid, ctx=ctx, token=rec.token, frames=1,
                                   video=True))
        return out

    def install(self, model: torch.nn.Module, rt: Runtime) -> list[Undo]:
        """Qwen2-VL's feature hooks, plus the language model's ``_deepstack_process`` following in-LLM stages."""
        lm = self.language_model(model)
        orig = lm._deepstack_process

        @functools.wraps(orig)
        def process(hidden: Tensor, mask: Tensor, embeds: Tensor) -> Tensor:
            if mask.shape[1] != hidden.shape[1]:  # after an in-LLM stage
                index = rt.adapter_state.get("stage_index")
                if index is None or index.shape[1] != hidden.shape[1]:
                    raise RuntimeError("vtok: a DeepStack injection after an in-LLM stage without its selection")
                mask, (embeds,) = gather_visual(mask, [embeds], index)
            return orig(hidden, mask, embeds)

        lm._deepstack_process = process
        undo = [lambda: delattr(lm, "_deepstack_process"), *super().install(model, rt)]
        inner = self.inner(model)
        hooked = inner.get_video_features

        @functools.wraps(hooked)
        def video(*args: Any, **kwargs: Any) -> Any:
            _IN_VIDEO.add(id(inner))
            try:
                return hooked(*args, **kwargs)
            finally:
                _IN_VIDEO.discard(id(inner))

        inner.get_video_features = video
        return [*undo, lambda: setattr(inner, "get_video_features", hooked)]

    def prefill_inputs(self, model: torch.nn.Module, rt: Runtime, kw: dict[str, Any], index: Tensor | None
                       ) -> None:
        """``visual_pos_masks`` and every ``deepstack_visual_embeds`` layer gathered at the kept tokens."""
        rt.adapter_state["stage_index"] = None
        mask, embeds = kw.get("visual_pos_masks"), kw.get("deepstack_visual_embeds")
        if index is None or mask is None or not embeds:
            return
        kw["visual_pos_masks"], kw["deepstack_visual_embeds"] = gather_visual(mask, list(embeds), index)

    def stage_mask(self, model: torch.nn.Module, rt: Runtime, mask: Tensor | None, valid: Tensor, index: Tensor,
                   fmt: torch.dtype | None) -> Tensor | None:
        """The engine's mask; keeps the stage's ``index`` for the DeepStack injections after it."""
        rt.adapter_state["stage_index"] = index
        return mask
