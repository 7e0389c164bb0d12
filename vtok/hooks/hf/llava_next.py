"""Adapters for ``LlavaNextForConditionalGeneration`` (LLaVA-NeXT / 1.6, "anyres" tiles) and
``LlavaOnevisionForConditionalGeneration`` (LLaVA-OneVision images).

What the language model sees of one image (``pack_image_features``, transformers 5.x): the base view (crop 0, the
image resized to one crop: ``side x side`` tokens, ``side = image_size // patch_size``) followed by the high-res
part: crops ``1..`` tiled into one ``(rows_t * side) x (cols_t * side)`` grid, unpadded to the image's aspect ratio
(OneVision: then bilinearly shrunk when larger than ``anyres_max_M`` crops), with one learned ``image_newline`` token
after every row. An image given a single crop (OneVision multi-image samples, ``batch_num_images > 1``) is its base
view followed by one ``image_newline``.

Records, in prompt order (each a contiguous run of the image's placeholder tokens):

* base view: ``n = side²``, ``grid (side, side)``, nothing protected;
* high-res part: ``n = h * (w + 1)``, the ``h`` newline tokens ``protected`` (never pruned, never counted in a
  budget); ``grid = (h, w)``: the grid of its *prunable* tokens (dropping the newline column of a row-major
  ``h x (w + 1)`` layout leaves the row-major ``h x w`` grid), the convention of ``vtok.retained_count(...,
  grid=, protected=)``. The current engine ignores the grid of a record with protected tokens (``select_slots``),
  so methods that need ``grid`` get it for base views only;
* single-crop image: ``n = side² + 1``, the last token protected, ``grid (side, side)`` likewise.

Budgets are per image, of its prunable tokens: an image of ``N = side² + h * w`` of them keeps ``k = resolve_k(keep,
N)`` (an int ``keep`` is the image's total), split over its two records in proportion to their sizes (largest
remainder, at least one each: ``_sequence.split_budget``), plus its ``h`` newlines, so ``vtok.retained_count(method,
n, keep, protected=h)`` with ``n`` the image's placeholder tokens is what it keeps (``vtok.stats`` counts the newlines
in ``before`` / ``after`` and as ``protected``).

``cls_attn`` / ``keys`` come from the encoder layer producing ``vision_feature_layer`` (``mid_attn``: from layer
``floor(mid_layer · depth)`` of the method's placement, HiPrune), per crop: every crop is an independent CLIP / SigLIP
pass, so the CLS row (placement ``score_rows="cls"``; without a CLS token or with ``"all"``: the attention received,
averaged over heads and query rows) is normalised within its crop. They are laid out like the features by running the
model's own ``pack_image_features`` on a per-crop ``[crops, N, C]`` tensor (an indicator channel, one channel per
score, the flattened keys): the base view gets crop 0's values, the high-res tokens the unpadded (OneVision:
bilinearly interpolated, an approximation for scores and keys) values of crops ``1..``.

OneVision videos (``pixel_values_videos [B, T, 3, H, W]``): one record per video, its ``T`` frames' pooled grids
(``apply_pooling``: ``side / 2`` per side) in time order and one protected ``image_newline`` at the end, given to the
strategy with ``frames=T`` and the pooled ``grid`` (temporal strategies; image strategies see the frames
flattened). No ``cls_attn`` / ``keys`` for video frames: a pre-LLM method that needs them raises
``NotImplementedError`` when a video comes.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import Tensor

from vtok.hooks.hf import _vision, register_adapter
from vtok.hooks.hf._runtime import ImageRecord
from vtok.hooks.hf.llava import LlavaAdapter

_VISION_KEYS = ("cls_attn", "keys", "mid_attn")


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT: base view + unpadded high-res grid with image-newline tokens (see the module docstring)."""

    names = ("LlavaNextForConditionalGeneration",)

    # --- family specifics: crops per image and the packing
    def _num_patches(self):
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        return image_size_to_num_patches

    def _crops(self, model, image_sizes: Tensor, call: dict[str, Any]) -> list[int]:
        fn = self._num_patches()
        return [fn(image_size=s, grid_pinpoints=model.config.image_grid_pinpoints,
                   patch_size=model.config.vision_config.image_size) for s in image_sizes]

    def _pack(self, model, per_image: list[Tensor], image_sizes: Tensor, newline: Tensor, call: dict[str, Any]
              ) -> list[Tensor]:
        strategy = call.get("vision_feature_select_strategy") or model.config.vision_feature_select_strategy
        packed, _ = model.model.pack_image_features(per_image, image_sizes, vision_feature_select_strategy=strategy,
                                                    image_newline=newline)
        return packed

    # --- hook
    def provides(self, model) -> set[str]:
        """Context keys the pre-LLM stage can give (``grid`` of base views only until the engine keeps the grid of
        records with protected tokens; see the module docstring)."""
        out = {"grid", "query"}
        if self._feature_layer(model) % (len(self._tower_layers(model)) + 1) >= 1:
            out |= {"cls_attn", "keys", "mid_attn"}
        return out

    def install(self, model, rt) -> list[Any]:
        from vtok.pruners import get as get_method

        inner = model.model
        orig = inner.get_image_features
        sig = inspect.signature(orig)
        needs = rt.pre_context()
        want = {"cls_attn", "keys", "mid_attn"} & set(needs) & self.provides(model)
        placement = get_method(rt.pre.method).placement if rt.pre is not None else None
        rows = getattr(placement, "score_rows", "cls")
        mid = getattr(placement, "mid_layer", None)
        layers = self._tower_layers(model)
        captured: dict[int, Tensor] = {}

        def hook_for(i: int):
            def pre_hook(module, args, kwargs):
                captured[i] = args[0] if args else kwargs["hidden_states"]

            return pre_hook

        @functools.wraps(orig)  # keeps the signature: generate() inspects it to pre-encode the images
        def get_image_features(*args, **kwargs):
            call = sig.bind_partial(*args, **kwargs).arguments
            fl = call.get("vision_feature_layer")
            fl = model.config.vision_feature_layer if fl is None else fl
            fl = fl[-1] if isinstance(fl, (list, tuple)) else fl
            li = fl % (len(layers) + 1) - 1  # the tower layer producing the features (its input is captured)
            mi = li if mid is None else min(int(mid * len(layers)), li)  # HiPrune's middle layer
            use = want if li >= 0 else set()
            watch = sorted(({li} if use - {"mid_attn"} else set()) | ({mi} if "mid_attn" in use else set()))
            captured.clear()
            handles = [layers[i].register_forward_pre_hook(hook_for(i), with_kwargs=True) for i in watch]
            try:
                out = orig(*args, **kwargs)
            finally:
                for handle in handles:
                    handle.remove()
            feats = out.pooler_output if hasattr(out, "pooler_output") else out
            ctx: dict[str, Tensor] = {}
            if li in captured and use - {"mid_attn"}:
                ctx.update(self._crop_context(model, layers[li], captured[li], use - {"mid_attn"}, rows))
            if "mid_attn" in use and mi in captured:
                ctx["mid_attn"] = self._crop_context(model, layers[mi], captured[mi], {"cls_attn"}, rows)["cls_attn"]
            rt.add_records(out, self._records(model, list(feats), call, ctx))
            return out

        inner.get_image_features = get_image_features
        undo = [lambda: delattr(inner, "get_image_features")]
        orig_video = getattr(inner, "get_video_features", None)
        if orig_video is not None:
            vsig = inspect.signature(orig_video)

            @functools.wraps(orig_video)
            def get_video_features(*args, **kwargs):
                out = orig_video(*args, **kwargs)
                feats = out.pooler_output if hasattr(out, "pooler_output") else out
                call = vsig.bind_partial(*args, **kwargs).arguments
                pix = call.get("pixel_values_videos", call.get("pixel_values"))  # 4.x names it pixel_values
                # transformers 5.x returns the newline with the frames (pooler_output), 4.x appends it in forward
                rt.add_records(out, self._video_records(model, rt, feats, int(pix.shape[1]),
                                                        hasattr(out, "pooler_output")))
                return out

            inner.get_video_features = get_video_features
            undo.append(lambda: delattr(inner, "get_video_features"))
        return undo

    def _video_records(self, model, rt, feats: Tensor, frames: int, newline: bool) -> list[ImageRecord]:
        """Records of the videos of one ``get_video_features`` call (none: LLaVA-NeXT has no video input)."""
        return []

    @torch.no_grad()
    def _records(self, model, feats: list[Tensor], call: dict[str, Any], ctx: dict[str, Tensor]
                 ) -> list[ImageRecord]:
        """The records of every image, from the model's own packing applied to per-crop indicator / context."""
        image_sizes = call["image_sizes"]
        crops = self._crops(model, image_sizes, call)
        total = sum(crops)
        if len(crops) != len(feats):
            raise RuntimeError(f"vtok: {len(feats)} packed images but {len(crops)} image sizes")
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        n_crop = self._tokens_per_crop(model, side)
        dev = feats[0].device
        chans = [torch.ones(total, n_crop, 1, device=dev)]
        heads = dh = 0
        scores = sorted(key for key in ctx if key != "keys")  # [crops, N] each: one channel
        for key in scores:
            chans.append(ctx[key].float().to(dev)[..., None])
        if "keys" in ctx:
            k = ctx["keys"]  # [crops, H, N, dh]
            _, heads, _, dh = k.shape
            chans.append(k.float().to(dev).permute(0, 2, 1, 3).reshape(total, n_crop, heads * dh))
        per_crop = torch.cat(chans, -1)  # [crops, N, C]
        if per_crop.shape[0] != total:
            raise RuntimeError(f"vtok: the vision tower saw {per_crop.shape[0]} crops, expected {total}")
        newline = per_crop.new_zeros(per_crop.shape[-1])
        newline[0] = -1.0
        packed = self._pack(model, list(per_crop.split(crops)), image_sizes, newline, call)
        recs: list[ImageRecord] = []
        for i, (f, p) in enumerate(zip(feats, packed, strict=True)):
            if p.shape[0] != f.shape[0]:
                raise RuntimeError(f"vtok: image {i} has {f.shape[0]} features but its layout {p.shape[0]} tokens")
            prot = p[:, 0] < 0
            parts = [(0, n_crop), (n_crop, p.shape[0])] if crops[i] > 1 else [(0, p.shape[0])]
            for a, b in parts:
                pr = prot[a:b]
                rows = int(pr.sum())
                n_free = (b - a) - rows
                if rows == 0:
                    grid, pr = (side, side) if n_free == side * side else None, None
                elif crops[i] == 1:
                    grid = (side, side) if n_free == side * side else None
                else:
                    grid = (rows, n_free // rows) if n_free % rows == 0 else None
                c: dict[str, Tensor] = {}
                col = 1
                for key in scores:
                    c[key] = p[a:b, col].to(ctx[key].dtype)
                    col += 1
                if "keys" in ctx:
                    c["keys"] = p[a:b, col:].reshape(b - a, heads, dh).permute(1, 0, 2).to(ctx["keys"].dtype)
                recs.append(ImageRecord(n=b - a, image=i, grid=grid, protected=pr, ctx=c))
        return recs

    @torch.no_grad()
    def _crop_context(self, model, layer, hidden: Tensor, want: set[str], rows: str) -> dict[str, Tensor]:
        """Per crop, from one tower layer's input: ``cls_attn [crops, N]`` (the CLS row when the tower has a CLS
        token and ``rows == "cls"``, else the attention received, averaged over heads and query rows) and ``keys
        [crops, H, N, dh]``; the CLS column dropped when the features drop it."""
        q, k, scale = _vision.qk(layer, hidden)
        drop = 1 if self._drops_cls(model) else 0
        out: dict[str, Tensor] = {}
        if "cls_attn" in want:
            use_cls = self._has_cls(model) and rows == "cls"
            out["cls_attn"] = (_vision.cls_row(q, k, scale) if use_cls else _vision.received(q, k, scale))[:, drop:]
        if "keys" in want:
            out["keys"] = k[:, :, drop:]
        return out

    def _tokens_per_crop(self, model, side: int) -> int:
        return side * side + (1 if self._has_cls(model) and not self._drops_cls(model) else 0)


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision images: LLaVA-NeXT's layout, the high-res grid bilinearly shrunk to ``anyres_max_M`` crops,
    and a single crop (base view + one newline) per image in multi-image samples."""

    names = ("LlavaOnevisionForConditionalGeneration",)

    def _num_patches(self):
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        return image_size_to_num_patches

    def _crops(self, model, image_sizes: Tensor, call: dict[str, Any]) -> list[int]:
        many = call.get("batch_num_images")
        patch = [True] * len(image_sizes) if many is None else [int(n) == 1 for n in many for _ in range(int(n))]
        fn = self._num_patches()
        return [fn(image_size=s, grid_pinpoints=model.config.image_grid_pinpoints,
                   patch_size=model.config.vision_config.image_size) if p else 1
                for s, p in zip(image_sizes, patch, strict=True)]

    def image_token_ids(self, model) -> list[int]:
        cfg = model.config
        return [*super().image_token_ids(model), getattr(cfg, "video_token_id", None) or cfg.video_token_index]

    def provides(self, model) -> set[str]:
        return super().provides(model) | {"frames"}

    def _video_records(self, model, rt, feats: Tensor, frames: int, newline: bool) -> list[ImageRecord]:
        """One record per video (``feats [V, T·s² (+ 1 with the newline), D]``): its ``frames`` pooled frame grids
        in time order, then one ``image_newline`` (protected); ``grid`` the pooled frame's ``(s, s)``. No vision-side
        scores: a method needing them refuses videos."""
        if rt.pre is not None:
            missing = sorted(rt.pre.needs & set(_VISION_KEYS))
            if missing:
                raise NotImplementedError(f"vtok: LLaVA-OneVision videos carry no vision-side {missing}, which "
                                          f"'{rt.pre.method}' needs before the language model; use a method without "
                                          "them (e.g. a temporal one) or an in-LLM layer")
        n = int(feats.shape[1]) + (0 if newline else 1)  # the prompt's run always ends with the newline
        per_frame = (n - 1) // frames
        side = int(round(per_frame ** 0.5))
        grid = (side, side) if side * side == per_frame and per_frame * frames + 1 == n else None
        protected = torch.zeros(n, dtype=torch.bool, device=feats.device)  # [n]: the newline
        protected[-1] = True
        token = self.image_token_ids(model)[-1]
        return [ImageRecord(n=n, image=i, grid=grid, protected=protected, token=token,
                            frames=frames if grid is not None else None, video=True)
                for i in range(int(feats.shape[0]))]

    def _pack(self, model, per_image: list[Tensor], image_sizes: Tensor, newline: Tensor, call: dict[str, Any]
              ) -> list[Tensor]:
        aspect = call.get("vision_aspect_ratio") or model.config.vision_aspect_ratio
        packed, _ = model.model.pack_image_features(per_image, image_sizes, image_newline=newline,
                                                    vision_aspect_ratio=aspect)
        return packed


register_adapter(LlavaNextAdapter())
register_adapter(LlavaOnevisionAdapter())
