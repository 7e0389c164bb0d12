"""Adapter for ``InternVLForConditionalGeneration`` (InternVL 2.5 / 3 in transformers: InternViT tower, pixel-shuffle
projector, Qwen2 / Llama language model).

What the language model sees of one image (``InternVLProcessor``): dynamic tiles of ``image_size`` px, plus a
thumbnail tile when there are several, as consecutive rows of one flat ``pixel_values [tiles, 3, S, S]`` (all images
of the batch in prompt order), and in the prompt ``<img>``, ``image_seq_length`` context tokens per tile
(``<IMG_CONTEXT>``, the model's ``image_token_id``), ``</img>``. ``get_image_features`` runs the tower per tile, takes
the hidden state ``vision_feature_layer`` (``-1``: the last layer's output), drops the CLS token (strategy
``"default"``), pixel-shuffles the ``side x side`` patch grid by ``downsample_ratio`` (0.5: every 2 x 2 patch group
becomes one token of 4x the channels, ``g = side / 2``) and projects: ``[tiles, g², D]``.

Records, in prompt order: one per tile (the thumbnail is its image's last tile), ``n = g²`` tokens, ``grid (g, g)``
(row-major, as the shuffle lays them out), nothing protected. All tiles of an image share its ``image`` index, so the
budget is per image: an image of ``t`` tiles (``N = t·g²`` tokens) keeps ``k = resolve_k(keep, N)`` (an int ``keep`` is
the image's total), split over its tiles in proportion to their sizes (equal: largest remainder, ties to the earlier
tile), at least one token per tile (``_sequence.split_budget``: an image keeps ``max(k, t)``). Nothing in the model's
inputs says which tiles belong to which image but the prompt, so the adapter's ``group_records`` (called by the
engine at each prefill, whether the features were encoded in this forward or pre-encoded by ``generate``) reads the
placeholder runs of ``input_ids`` (one contiguous run per image, ``</img><img>`` between two images): each run of
``t·g²`` placeholders is one image of ``t`` tiles. Two images whose runs touch (no ``</img><img>`` between) share
one budget.

Context (pre-LLM): ``cls_attn`` / ``keys`` from the tower layer producing ``vision_feature_layer`` (the last with
``-1``; ``mid_attn`` from layer ``floor(mid_layer · depth)`` of the method's placement, HiPrune), recomputed per tile
from the layer's input (``layernorm_before``, ``q_proj`` / ``k_proj``, ``q_norm`` / ``k_norm``): the CLS query's
softmax row over the tile's patches, heads averaged (placement ``score_rows="all"``: the attention each patch
receives, averaged over heads and all query rows), normalised within the tile; ``keys`` the per-head keys of the
patches. Both are mapped through the pixel shuffle by averaging each shuffled group (2 x 2 patches → one token):
``cls_attn [g²]`` is the group's mean attention (a tile's values sum to ``1/4`` of its patch row's), ``keys [H, g²,
dh]`` the group's mean key. The groups are found by the model's own ``pixel_shuffle`` applied to the per-patch
values, so another ``downsample_ratio`` averages its own groups.

Videos: the InternVL processor sends each frame as one tile-image (``FrameK: <img>...</img>``), so frames are
images here (no ``frames`` / temporal methods).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from vtok.hooks.hf import _vision
from vtok.hooks.hf._runtime import ImageRecord
from vtok.hooks.hf.adapter import FeatureCall, register_adapter
from vtok.hooks.hf.llava import LlavaAdapter


@register_adapter
class InternVLAdapter(LlavaAdapter):
    """InternVL: one record per tile, an image's tiles sharing its budget (see the module docstring)."""

    names = ("InternVLForConditionalGeneration",)
    positions = "1d"

    # --- vision side
    def tower(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.inner(model).vision_tower

    def tower_layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        return self.tower(model).encoder.layer

    def _call_feature_layer(self, model: torch.nn.Module, call: FeatureCall) -> int:
        """The call's ``vision_feature_layer`` argument, else the configured one."""
        fl = call.arguments.get("vision_feature_layer")
        return self._producing_layer(model, model.config.vision_feature_layer if fl is None else fl)

    def _has_cls(self, model: torch.nn.Module) -> bool:
        return hasattr(self.tower(model).embeddings, "cls_token")

    # --- hooks
    def group_records(self, model: torch.nn.Module, records: Sequence[ImageRecord], input_ids: Tensor) -> None:
        """The tiles of each image share its index: the prompt's placeholder runs say how many tiles each image
        has (the model's inputs do not)."""
        if records:
            self._group(records, input_ids, self.image_token_ids(model)[0])

    @staticmethod
    def _tiles_per_image(ids: Tensor, token: int, per_tile: int) -> list[int]:
        """Tiles of each image of ``ids [B, L]`` in prompt order (samples in turn): each contiguous run of
        ``token`` is one image of ``len(run) / per_tile`` tiles."""
        out = []
        for row in ids:
            pos = (row == token).nonzero().squeeze(1)
            if not len(pos):
                continue
            breaks = (pos[1:] - pos[:-1] != 1).nonzero().squeeze(1) + 1
            edges = [0, *breaks.tolist(), len(pos)]
            for a, b in zip(edges[:-1], edges[1:], strict=False):
                if (b - a) % per_tile:
                    raise RuntimeError(f"vtok: an image's run of {b - a} placeholder tokens is not a whole number of "
                                       f"tiles of {per_tile} tokens")
                out.append((b - a) // per_tile)
        return out

    def _group(self, recs: Sequence[ImageRecord], ids: Tensor, token: int) -> None:
        """Give the tile records ``recs`` (all of one forward's, in prompt order) the index of their image, from
        0, as the placeholder runs of ``ids`` say; left per tile when the runs do not account for exactly these
        tiles (the engine then reports the mismatch)."""
        tiles = self._tiles_per_image(ids, token, recs[0].n)
        if sum(tiles) != len(recs):
            return
        it = iter(recs)
        for i, t in enumerate(tiles):
            for _ in range(t):
                next(it).image = i

    @torch.no_grad()
    def _records(self, model: torch.nn.Module, feats: list[Tensor], call: FeatureCall, ctx: dict[str, Tensor]
                 ) -> list[ImageRecord]:
        """One record per tile (``feats[i] [g², D]``), grid ``(g, g)``; ``ctx`` values per tile, per patch
        (``[tiles, side²]`` scores, ``keys [tiles, H, side², dh]``) averaged over each pixel-shuffle group."""
        per_tile = {key: self._shuffle_mean(model, v) for key, v in ctx.items()}
        recs = []
        for i, f in enumerate(feats):
            n = int(f.shape[0])
            g = int(round(n ** 0.5))
            recs.append(ImageRecord(n=n, image=i, grid=(g, g) if g * g == n else None,
                                    ctx={k: v[i] for k, v in per_tile.items()}))
        return recs

    def _shuffle_mean(self, model: torch.nn.Module, value: Tensor) -> Tensor:
        """Per-patch ``value`` (``[tiles, N]`` or ``keys [tiles, H, N, dh]``, ``N = side²`` row-major) averaged over
        the patches the model's ``pixel_shuffle`` merges into each token: ``[tiles, N / G]`` / ``[tiles, H, N / G,
        dh]`` with ``G = 1 / downsample_ratio²``."""
        ratio = model.config.downsample_ratio
        group = int(round(1 / ratio ** 2))
        keys = value.dim() == 4
        x = value.permute(0, 2, 1, 3).flatten(2) if keys else value[..., None]  # [tiles, N, C]
        tiles, n, c = x.shape
        side = int(round(n ** 0.5))
        if side * side != n:
            raise RuntimeError(f"vtok: InternVL tiles of {n} patch tokens are not square")
        shuffled = self.inner(model).pixel_shuffle(x.reshape(tiles, side, side, c), scale_factor=ratio)
        mean = shuffled.reshape(tiles, -1, group, c).mean(2)  # [tiles, N / G, C]
        if not keys:
            return mean[..., 0]
        return mean.unflatten(-1, (value.shape[1], value.shape[3])).permute(0, 2, 1, 3)

    @torch.no_grad()
    def _context(self, model: torch.nn.Module, layer: torch.nn.Module, hidden: Tensor, want: set[str],
                 rows: str = "cls") -> dict[str, Tensor]:
        """``cls_attn [tiles, N]`` (the CLS row, or with ``rows="all"`` the mean received attention) and ``keys
        [tiles, H, N, dh]`` of one InternViT layer for its input ``hidden [tiles, 1 + N, D]``, CLS column dropped
        when the features drop it."""
        attn = layer.attention
        y = layer.layernorm_before(hidden)
        t, s, _ = y.shape
        q = attn.q_norm(attn.q_proj(y)).view(t, s, attn.num_heads, -1).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(y)).view(t, s, attn.num_heads, -1).transpose(1, 2)
        drop = 1 if self._drops_cls(model) else 0
        out: dict[str, Tensor] = {}
        if "cls_attn" in want:
            row = _vision.cls_row(q, k, attn.scale) if rows == "cls" else _vision.received(q, k, attn.scale)
            out["cls_attn"] = row[:, drop:]
        if "keys" in want:
            out["keys"] = k[:, :, drop:]
        return out
