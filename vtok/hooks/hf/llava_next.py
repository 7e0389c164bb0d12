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

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vtok.hooks.hf._runtime import ImageRecord
from vtok.hooks.hf.adapter import FeatureCall, Undo, features_of, register_adapter
from vtok.hooks.hf.llava import VISION_KEYS, LlavaAdapter

if TYPE_CHECKING:
    from vtok.hooks.hf._runtime import Runtime


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT: base view + unpadded high-res grid with image-newline tokens (see the module docstring). It
    provides LLaVA's context keys (``grid`` of base views only until the engine keeps the grid of records with
    protected tokens)."""

    names = ("LlavaNextForConditionalGeneration",)

    # --- family specifics: crops per image and the packing
    def _num_patches(self):
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        return image_size_to_num_patches

    def _crop_count(self, model: torch.nn.Module, image_size: Tensor) -> int:
        """Crops of one image of ``image_size`` (base view + anyres tiles)."""
        return self._num_patches()(image_size=image_size, grid_pinpoints=model.config.image_grid_pinpoints,
                                   patch_size=model.config.vision_config.image_size)

    def _crops(self, model: torch.nn.Module, image_sizes: Tensor, args: dict[str, Any]) -> list[int]:
        return [self._crop_count(model, s) for s in image_sizes]

    def _pack_options(self, model: torch.nn.Module, args: dict[str, Any]) -> dict[str, Any]:
        """The family's own arguments of ``pack_image_features`` for one call's ``args``."""
        strategy = args.get("vision_feature_select_strategy") or model.config.vision_feature_select_strategy
        return {"vision_feature_select_strategy": strategy}

    def _pack(self, model: torch.nn.Module, per_image: list[Tensor], image_sizes: Tensor, newline: Tensor,
              args: dict[str, Any]) -> list[Tensor]:
        """The model's own ``pack_image_features`` of per-crop tensors ``per_image[i] [crops_i, N, C]``."""
        packed, _ = self.inner(model).pack_image_features(per_image, image_sizes, image_newline=newline,
                                                          **self._pack_options(model, args))
        return packed

    # --- hooks
    def _call_feature_layer(self, model: torch.nn.Module, call: FeatureCall) -> int:
        """The call's ``vision_feature_layer`` argument, else the configured one."""
        fl = call.arguments.get("vision_feature_layer")
        return self._producing_layer(model, model.config.vision_feature_layer if fl is None else fl)

    def _install_video(self, model: torch.nn.Module, rt: Runtime) -> list[Undo]:
        if getattr(self.inner(model), "get_video_features", None) is None:
            return []

        def make_records(out: Any, call: FeatureCall) -> list[ImageRecord]:
            args = call.arguments
            pix = args.get("pixel_values_videos", args.get("pixel_values"))  # 4.x names it pixel_values
            # transformers 5.x returns the newline with the frames (pooler_output), 4.x appends it in forward
            return self._video_records(model, rt, features_of(out), int(pix.shape[1]), hasattr(out, "pooler_output"))

        return [self.hook_features(model, rt, "get_video_features", None, make_records)]

    def _video_records(self, model, rt, feats: Tensor, frames: int, newline: bool) -> list[ImageRecord]:
        """Records of the videos of one ``get_video_features`` call (none: LLaVA-NeXT has no video input)."""
        return []

    @torch.no_grad()
    def _records(self, model: torch.nn.Module, feats: list[Tensor], call: FeatureCall, ctx: dict[str, Tensor]
                 ) -> list[ImageRecord]:
        """The records of every image, from the model's own packing applied to per-crop indicator / context
        (``ctx`` values per crop: ``[crops, N]`` scores, ``keys [crops, H, N, dh]``)."""
        args = call.arguments
        image_sizes = args["image_sizes"]
        crops = self._crops(model, image_sizes, args)
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
        packed = self._pack(model, list(per_crop.split(crops)), image_sizes, newline, args)
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

    def _tokens_per_crop(self, model, side: int) -> int:
        return side * side + (1 if self._has_cls(model) and not self._drops_cls(model) else 0)


@register_adapter
class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision images: LLaVA-NeXT's layout, the high-res grid bilinearly shrunk to ``anyres_max_M`` crops,
    and a single crop (base view + one newline) per image in multi-image samples."""

    names = ("LlavaOnevisionForConditionalGeneration",)

    def _num_patches(self):
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        return image_size_to_num_patches

    def _crops(self, model: torch.nn.Module, image_sizes: Tensor, args: dict[str, Any]) -> list[int]:
        many = args.get("batch_num_images")
        patch = [True] * len(image_sizes) if many is None else [int(n) == 1 for n in many for _ in range(int(n))]
        return [self._crop_count(model, s) if p else 1 for s, p in zip(image_sizes, patch, strict=True)]

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
            missing = sorted(rt.pre.needs & VISION_KEYS)
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

    def _pack_options(self, model: torch.nn.Module, args: dict[str, Any]) -> dict[str, Any]:
        return {"vision_aspect_ratio": args.get("vision_aspect_ratio") or model.config.vision_aspect_ratio}
