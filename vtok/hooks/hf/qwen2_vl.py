"""Adapter for ``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration`` (M-RoPE).

Each image is one record of ``t * h * w / merge²`` tokens (``image_grid_thw`` counts 14 px patches; the merger joins
``merge x merge`` patches into one token), with grid ``(h / merge, w / merge)`` when ``t == 1``.

Vision-side context (the towers have no CLS token), recomputed from one vision block's input (captured by a forward
pre-hook, the tower itself runs unchanged):

* ``cls_attn [n]``: the attention each patch receives, averaged over heads and all query rows of its own image
  (the block's ``cu_seqlens`` segments: the images of a call are packed into one sequence and attend only within
  themselves), from the block's fused ``qkv`` with the vision 2-D RoPE applied as the block applies it, then averaged
  over the ``merge²`` patches of each merger group;
* ``keys [H, n, dh]``: the block's per-head keys before the vision RoPE (content matching features for ToMe /
  VisionZip), averaged over each merger group.

The block: ``cls_block`` if set on the adapter, else the last vision block for Qwen2-VL and, for Qwen2.5-VL, whose
blocks mostly attend within windows, the last full-attention block (``vision_config.fullatt_block_indexes``; the
last block in the released checkpoints, e.g. 31 of 32). Qwen2.5-VL reorders patches window by window inside the
tower; the context is mapped back to the prompt's token order (the order of ``pooler_output``).

Each video (``pixel_values_videos``, ``video_token_id`` placeholders) is one record of ``t * h * w / merge²`` tokens:
``t`` temporal patches (``video_grid_thw``; ``temporal_patch_size`` frames each) of the ``(h / merge, w / merge)``
grid in time order, given to the strategy with ``frames=t`` and ``grid`` (the temporal strategies' contract; image
strategies see the flattened tokens). Its ``cls_attn`` is the mean attention received within its frame (the tower
attends per temporal patch), ``keys`` as for images. ``positions="original"`` keeps the 3-D ids the model computed
on the unpruned prompt (temporal ids included, Qwen2.5-VL's seconds-per-grid scaling as well); ``"reindex"`` keeps
each kept token's ``(t, h, w)`` offset from the video's start and closes the gaps after it, as for images.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vtok.budget import resolve_k
from vtok.hooks.hf import _resize, _vision
from vtok.hooks.hf._runtime import ImageRecord
from vtok.hooks.hf.adapter import FeatureCall, Undo, VLMAdapter, features_of, register_adapter
from vtok.pruners._grid import pool_grid

if TYPE_CHECKING:
    from vtok.hooks.hf._runtime import Runtime

_BLOCK_INPUTS = ("hidden_states", "cu_seqlens", "position_embeddings")


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The vision RoPE as ``apply_rotary_pos_emb_vision``: ``x [S, H, dh]``, ``cos / sin [S, dh]``, in fp32."""
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    xf = x.float()
    return ((xf * cos) + (_rotate_half(xf) * sin)).to(x.dtype)


def _block_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """What a vision block receives: ``hidden_states [S, D]``, ``cu_seqlens`` and ``position_embeddings``."""
    got = dict(zip(_BLOCK_INPUTS, args, strict=False))
    got.update({k: kwargs[k] for k in _BLOCK_INPUTS if k in kwargs})
    return got


def _feature_list(out: Any) -> list[Tensor]:
    """The per-image (per-video) features of a feature method's output: ``[n_i, D]`` each."""
    feats = features_of(out)
    return list(feats) if not isinstance(feats, Tensor) else [feats]


@register_adapter
class QwenVLAdapter(VLMAdapter):
    """Model-specific glue for Qwen2-VL / Qwen2.5-VL; the ``Runtime`` does the rest."""

    names = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    positions = "mrope"
    cls_block: int | None = None  # vision block of cls_attn / keys; None: see the module docstring

    def image_token_ids(self, model: torch.nn.Module) -> list[int]:
        return [model.config.image_token_id, model.config.video_token_id]

    # --- vision side
    def tower(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.inner(model).visual

    def tower_layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        return self.tower(model).blocks

    def feature_layer(self, model: torch.nn.Module) -> int:
        return self.block_index(model)

    def _merge(self, model: torch.nn.Module) -> int:
        return int(self.tower(model).spatial_merge_size)

    def _windowed(self, model: torch.nn.Module) -> bool:
        return hasattr(self.tower(model), "fullatt_block_indexes")

    def block_index(self, model: torch.nn.Module) -> int:
        """The vision block whose attention gives ``cls_attn`` / ``keys``."""
        blocks = self.tower_layers(model)
        depth = len(blocks)
        if self.cls_block is not None:
            return self.cls_block % depth
        if self._windowed(model):
            full = [i % depth for i in self.tower(model).fullatt_block_indexes if -depth <= i < depth]
            if full:
                return max(full)
        return depth - 1

    def provides(self, model: torch.nn.Module) -> set[str]:
        """Context keys the pre-LLM stage can give."""
        return {"grid", "frames", "query", "cls_attn", "keys"}

    # --- hooks
    def install(self, model: torch.nn.Module, rt: Runtime) -> list[Undo]:
        want = {"cls_attn", "keys"} & set(rt.pre_context()) & self.provides(model)
        block = self.tower_layers(model)[self.block_index(model)]
        placement = self.pre_placement(rt)
        resize = placement is not None and placement.resize_input
        cfg = model.config
        undo = []
        for name, grid_key, token, video in (("get_image_features", "image_grid_thw", cfg.image_token_id, False),
                                             ("get_video_features", "video_grid_thw", cfg.video_token_id, True)):
            if resize and not video:
                run = functools.partial(self._downsample, model, rt, grid_key)
                undo.append(self.hook_features(model, rt, name, None, functools.partial(self._planned, token=token),
                                               run=run))
            else:
                records = functools.partial(self._records, model, block, grid_key, token, video, want)
                undo.append(self.hook_features(model, rt, name, {0: block} if want else None, records,
                                               capture=_block_input))
        return undo

    def _records(self, model: torch.nn.Module, block: torch.nn.Module, grid_key: str, token: int, video: bool,
                 want: set[str], out: Any, call: FeatureCall) -> list[ImageRecord]:
        """One record per image (video) of a call, ``grid`` / ``frames`` from its ``(t, h, w)`` patch grid."""
        feats = _feature_list(out)
        thw = call.arguments.get(grid_key, call.kwargs.get(grid_key))
        sizes = [int(f.shape[0]) for f in feats]
        got = call.captured.get(0)
        ctx = (self._context(model, block, got, thw, sizes, want, call.kwargs)
               if want and got is not None and thw is not None else {})
        merge = self._merge(model)
        recs = []
        for i, n in enumerate(sizes):
            grid = frames = None
            if thw is not None:
                t, h, w = (int(v) for v in thw[i])
                if t * (h // merge) * (w // merge) == n and (video or t == 1):
                    grid, frames = (h // merge, w // merge), t  # an image is one frame
            recs.append(ImageRecord(n=n, image=i, grid=grid, ctx={k: v[i] for k, v in ctx.items()},
                                    token=token, frames=frames, video=video))
        return recs

    def _downsample(self, model: torch.nn.Module, rt: Runtime, grid_key: str, orig_fn: Any, call: FeatureCall
                    ) -> Any:
        """``downsample``: each image resized to the ``pool2d`` grid of its budget *before* the tower; the tower's
        tokens of the smaller image are spread over the cells of the full grid (``_resize.spread``) so the placeholders
        still match and the strategy's cell average returns exactly them. The plan ``[(grid, pooled grid, n)]`` per
        image goes to ``call.state["plan"]`` (``_planned``)."""
        keeps = rt.pre.keep
        if any(k != keeps[0] for k in keeps):
            raise NotImplementedError("vtok: downsample on Qwen2-VL needs one keep for the whole batch (the images "
                                      "are resized inside the vision call, before they are matched to samples)")
        bound = call.signature.bind(*call.args, **call.kwargs)
        pixels, thw = bound.arguments["pixel_values"], bound.arguments[grid_key]
        vc = model.config.vision_config
        p, m, tp = int(vc.patch_size), self._merge(model), int(vc.temporal_patch_size)
        rows, grids, plan, start = [], [], [], 0
        for t, h, w in (tuple(int(v) for v in g) for g in thw):
            n_rows, n = t * h * w, t * (h // m) * (w // m)
            part = pixels[start:start + n_rows]
            start += n_rows
            if t != 1:
                raise NotImplementedError(f"vtok: downsample of an image with {t} temporal patches")
            k = resolve_k(keeps[0], n)
            out_grid = pool_grid(h // m, w // m, k) if k < n else None
            if out_grid is None:
                rows.append(part)
                grids.append((t, h, w))
            else:
                r, g = _resize.resize_rows(part, (t, h, w), (out_grid[0] * m, out_grid[1] * m), p, m, tp)
                rows.append(r)
                grids.append(g)
            plan.append(((h // m, w // m), out_grid, n))
        bound.arguments["pixel_values"] = torch.cat(rows)
        bound.arguments[grid_key] = torch.tensor(grids, dtype=thw.dtype, device=thw.device)
        out = orig_fn(*bound.args, **bound.kwargs)
        feats = _feature_list(out)
        full = [f if og is None else _resize.spread(f, grid, og) for f, (grid, og, _) in zip(feats, plan, strict=True)]
        if hasattr(out, "pooler_output"):
            out.pooler_output = tuple(full)
        else:
            out = tuple(full)
        call.state["plan"] = plan
        return out

    @staticmethod
    def _planned(out: Any, call: FeatureCall, token: int) -> list[ImageRecord]:
        """The records of a downsampled call: one per image of the full grid (``_downsample``'s plan)."""
        return [ImageRecord(n=n, image=i, grid=grid, token=token, frames=1)
                for i, (grid, _, n) in enumerate(call.state["plan"])]

    @torch.no_grad()
    def _context(self, model, block, got: dict[str, Any], thw: Tensor, sizes: list[int], want: set[str],
                 kwargs: dict[str, Any]) -> dict[str, list[Tensor]]:
        """Per image ``cls_attn [n]`` / ``keys [H, n, dh]`` (see the module docstring)."""
        attn = block.attn
        hidden = got["hidden_states"]
        s_len = hidden.shape[0]
        y = block.norm1(hidden)
        q, k, _ = attn.qkv(y).reshape(s_len, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # [S, H, dh]
        unit = self._merge(model) ** 2
        out: dict[str, Tensor] = {}
        if "keys" in want:
            kk = k.float().reshape(s_len // unit, unit, attn.num_heads, -1).mean(1)  # [S/unit, H, dh]
            out["keys"] = kk.transpose(0, 1).to(k.dtype)  # [H, S/unit, dh]
        if "cls_attn" in want:
            cos, sin = got["position_embeddings"]
            qr, kr = _rope(q, cos, sin).transpose(0, 1), _rope(k, cos, sin).transpose(0, 1)  # [H, S, dh]
            cu = got.get("cu_seqlens")
            bounds = [0, s_len] if cu is None else [int(v) for v in cu]
            scale = float(getattr(attn, "scaling", qr.shape[-1] ** -0.5))
            rec = torch.cat([_vision.received(qr[None, :, a:b], kr[None, :, a:b], scale)[0]
                             for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a])  # [S]
            out["cls_attn"] = rec.reshape(-1, unit).mean(1)  # [S/unit], merger groups are consecutive
        if self._windowed(model):
            order = self._window_index(model, thw, kwargs)
            if order is not None:
                back = torch.argsort(order.to(hidden.device))
                out = {key: v.index_select(-1 if key == "cls_attn" else -2, back) for key, v in out.items()}
        return {key: list(v.split(sizes, dim=-1 if key == "cls_attn" else -2)) for key, v in out.items()}

    def _window_index(self, model, thw: Tensor, kwargs: dict[str, Any]) -> Tensor | None:
        """Qwen2.5-VL's window order of the merged tokens (the tower's ``window_index``)."""
        for name in ("image_window_index", "window_index"):
            if kwargs.get(name) is not None:
                return kwargs[name]
        tower = self.tower(model)
        try:
            from transformers.vision_utils import get_vision_window_index
        except ImportError:  # transformers 4.x: a method of the tower
            return tower.get_window_index(thw)[0] if hasattr(tower, "get_window_index") else None
        index, _ = get_vision_window_index(thw, spatial_merge_size=tower.spatial_merge_size,
                                           window_size=tower.window_size, patch_size=tower.patch_size)
        return index

