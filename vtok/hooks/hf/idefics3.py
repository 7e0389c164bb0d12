"""Adapter for ``Idefics3ForConditionalGeneration`` (Idefics3; ``SmolVLMAdapter`` in ``smolvlm.py`` reuses it).

What the language model sees of one image (the processor's prompt): with image splitting, ``rows x cols`` sub-images
of ``max_image_size`` px, each one run ``<fake_token_around_image><row_i_col_j><image> * seq_len``, a text newline
after every row, then the global view (the whole image resized to one crop), ``\\n<fake_token_around_image>
<global-img><image> * seq_len<fake_token_around_image>``; without splitting only that global part. Every crop is one
SigLIP pass (no CLS token) of ``side x side`` patches (``side = image_size // patch_size``), pixel-shuffled by the
connector into ``seq_len = (side / s)²`` tokens (``s = scale_factor``): token ``i' * (side / s) + j'`` holds the
patches ``(i' s + r, j' s + c)``, ``0 <= r, c < s``. ``pixel_values [B, crops, 3, H, W]`` holds the crops of each
sample's images in prompt order, all-zero padding crops after them (``get_image_features`` drops those).

Records, in prompt order: one per crop (sub-image or global view), ``n = seq_len``, ``grid (side / s, side / s)``,
nothing protected. The records of one image share its ``image`` index, so its budget (``resolve_k(keep, N)`` of its
``N = crops * seq_len`` tokens, an int ``keep`` being the image's total) is split over its crops in proportion to their
sizes (equal: ``k // crops`` each, the first ``k % crops`` crops one more; at least one token each). The crops of one
image are found in the prompt: an image ends with its global view, whose run follows the ``<global-img>`` token, the
token before the last run of every sample (``global_token_id`` set on the adapter overrides it). The engine calls
``group_records`` at every prefill with the prompt, so features pre-encoded by ``generate`` (transformers 5) are
grouped alike. SmolVLM video frames are global views: one image each.

Vision-side context (no CLS token), recomputed from the input of the last encoder layer (the features are its output
after ``post_layernorm``; ``mid_attn``: the input of layer ``floor(mid_layer · depth)``, HiPrune), per crop:

* ``cls_attn [n]``: the substitute for a CLS row: the attention each patch receives, averaged over heads and the
  crop's valid query rows (padding patches of ``pixel_attention_mask`` masked as the tower masks them, and receiving
  0), then averaged over the ``s x s`` patches of each shuffled token;
* ``keys [H, n, dh]``: that layer's per-head keys, averaged over each shuffled token's ``s x s`` patches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vtok.hooks.hf import _vision
from vtok.hooks.hf._runtime import ImageRecord
from vtok.hooks.hf.adapter import Undo, VLMAdapter, features_of, layer_input, register_adapter
from vtok.hooks.hf.llava import VISION_KEYS, LlavaAdapter

if TYPE_CHECKING:
    from vtok.hooks.hf._runtime import Runtime

_MASK = "patch_mask"  # watch key of the tower's embeddings (their patch_attention_mask)
_CHUNK = 256  # query rows per block of the masked received attention


def _capture(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def received_masked(q: Tensor, k: Tensor, scale: float, valid: Tensor) -> Tensor:
    """Attention each token receives, averaged over heads and the valid query rows, keys ``~valid`` masked:
    ``q, k [n, H, T, dh]``, ``valid [n, T]`` bool → ``[n, T]`` (fp32; 0 at invalid tokens)."""
    n, h, t, _ = q.shape
    acc = torch.zeros(n, t, dtype=torch.float32, device=q.device)
    kf = k.float().transpose(-1, -2)
    bias = torch.zeros(n, 1, 1, t, dtype=torch.float32, device=q.device).masked_fill(~valid[:, None, None], -torch.inf)
    for i in range(0, t, _CHUNK):
        p = ((q[:, :, i:i + _CHUNK].float() @ kf) * scale + bias).softmax(-1)  # [n, H, c, T]
        acc += (p * valid[:, None, i:i + _CHUNK, None]).sum((1, 2))
    return acc / (h * valid.sum(-1, keepdim=True).clamp_min(1))


def shuffle_mean(x: Tensor, side: int, s: int, dim: int) -> Tensor:
    """Mean of ``x`` (``side²`` patches along ``dim``, row-major) over each pixel-shuffle group of ``s x s``
    patches: ``(side / s)²`` tokens along ``dim``, in the connector's token order."""
    g = side // s
    shape = x.shape[:dim] + (g, s, g, s) + x.shape[dim + 1:]
    return x.reshape(shape).mean((dim + 1, dim + 3)).flatten(dim, dim + 1)


@register_adapter
class Idefics3Adapter(VLMAdapter):
    """Idefics3: one record per crop, an image's crops sharing its budget (see the module docstring)."""

    names = ("Idefics3ForConditionalGeneration",)
    positions = "1d"
    global_token_id: int | None = None  # the <global-img> token id; None: inferred from each prompt

    # --- language-model structure
    def language_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.inner(model).text_model

    # --- vision side
    def tower(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.inner(model).vision_model

    def tower_layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        return self.tower(model).encoder.layers

    def feature_layer(self, model: torch.nn.Module) -> int:
        """The last encoder layer (the features are ``post_layernorm`` of its output)."""
        return len(self.tower_layers(model)) - 1

    def provides(self, model: torch.nn.Module) -> set[str]:
        return {"grid", "query"} | VISION_KEYS

    def _scale(self, model: torch.nn.Module) -> int:
        return int(model.config.scale_factor)

    def _side(self, model: torch.nn.Module) -> int:
        vc = model.config.vision_config
        return int(vc.image_size) // int(vc.patch_size)

    def tokens_per_crop(self, model: torch.nn.Module) -> int:
        """``seq_len``: the placeholder tokens of one crop, ``(side / scale_factor)²``."""
        return (self._side(model) // self._scale(model)) ** 2

    # --- hooks
    def install(self, model: torch.nn.Module, rt: Runtime) -> list[Undo]:
        want = VISION_KEYS & set(rt.pre_context()) & self.provides(model)
        layers = self.tower_layers(model)
        li = self.feature_layer(model)
        mi = LlavaAdapter._mid_layer(self.pre_placement(rt), li, len(layers))
        watch: dict[Any, torch.nn.Module] = {}
        if want - {"mid_attn"}:
            watch[li] = layers[li]
        if "mid_attn" in want:
            watch[mi] = layers[mi]
        if watch:
            watch[_MASK] = self.tower(model).embeddings
        return [self.hook_features(model, rt, "get_image_features", watch or None,
                                   lambda out, call: self._records(model, features_of(out),
                                                                   self._context(model, call.captured, want, li, mi)),
                                   capture=_capture)]

    def group_records(self, model: torch.nn.Module, records: Sequence[ImageRecord], input_ids: Tensor) -> None:
        """The crops of each image share its index (``group``): only the prompt tells which crops form an image."""
        self.group(model, records, input_ids)

    # --- records
    def _records(self, model: torch.nn.Module, feats: Any, ctx: dict[str, Tensor]) -> list[ImageRecord]:
        """One record per crop of ``feats`` (transformers 5: per sample ``[crops_b * n, D]``; 4.x: ``[crops, n,
        D]``), ``image`` its crop index until ``group`` runs; ``ctx`` values ``[crops, ...]``."""
        n = self.tokens_per_crop(model)
        if isinstance(feats, Tensor):
            total = feats.shape[0] * feats.shape[1] if feats.dim() == 3 else feats.shape[0]
        else:
            total = sum(int(f.shape[0]) for f in feats)
        if total % n:
            raise RuntimeError(f"vtok: {total} image features are not whole crops of {n} tokens")
        crops = total // n
        for key, v in ctx.items():
            if v.shape[0] != crops:
                raise RuntimeError(f"vtok: the vision tower saw {v.shape[0]} crops for '{key}', the features {crops}")
        g = self._side(model) // self._scale(model)
        return [ImageRecord(n=n, image=c, grid=(g, g), ctx={k: v[c] for k, v in ctx.items()}) for c in range(crops)]

    def group(self, model: torch.nn.Module, recs: Sequence[ImageRecord], ids: Tensor) -> None:
        """Give the crop records ``recs`` of one call (in prompt order) their image: the crops up to and including
        each global view (see the module docstring) share one index, ``min(image) + j`` for the ``j``-th image.
        Idempotent; leaves ``recs`` as they are when the prompt's placeholder runs do not match them."""
        if not recs or ids is None or ids.dim() != 2:
            return
        n = recs[0].n
        tok = self.image_token_ids(model)[0]
        crops: list[tuple[int, int | None, bool]] = []  # per crop: (sample, marker before its run or None, last)
        closers: set[int] = set()
        for b, row in enumerate(ids.tolist()):
            runs: list[tuple[int, int]] = []  # (start, length)
            for p, t in enumerate(row):
                if t == tok:
                    if runs and runs[-1][0] + runs[-1][1] == p:
                        runs[-1] = (runs[-1][0], runs[-1][1] + 1)
                    else:
                        runs.append((p, 1))
            for j, (start, length) in enumerate(runs):
                if length % n:
                    return
                marker = row[start - 1] if start > 0 else None
                for c in range(length // n):
                    crops.append((b, marker if c == length // n - 1 else None, j == len(runs) - 1
                                  and c == length // n - 1))
            if runs and self.global_token_id is None and runs[-1][0] > 0:
                closers.add(row[runs[-1][0] - 1])
        if self.global_token_id is not None:
            closers = {self.global_token_id}
        if len(crops) != len(recs):
            return
        base = min(r.image for r in recs)
        image = 0
        for r, (_, marker, last) in zip(recs, crops, strict=True):
            r.image = base + image
            if last or (marker is not None and marker in closers):
                image += 1

    # --- vision-side context
    @torch.no_grad()
    def _context(self, model: torch.nn.Module, got: dict[Any, Any], want: set[str], li: int, mi: int
                 ) -> dict[str, Tensor]:
        """Per crop ``cls_attn [crops, n]``, ``keys [crops, H, n, dh]``, ``mid_attn [crops, n]`` (those in
        ``want``) from the captured layer inputs and the tower's patch mask (module docstring)."""
        if not want or _MASK not in got:
            return {}
        side, s = self._side(model), self._scale(model)
        a, kw = got[_MASK]
        mask = kw.get("patch_attention_mask", a[1] if len(a) > 1 else None)
        layers = self.tower_layers(model)
        out: dict[str, Tensor] = {}
        todo = [(li, want & {"cls_attn", "keys"}), (mi, want & {"mid_attn"})]
        for idx, keys in todo:
            if not keys or idx not in got:
                continue
            hidden = layer_input(*got[idx])  # [crops, T, D]
            q, k, scale = _vision.qk(layers[idx], hidden)
            valid = mask.reshape(hidden.shape[0], -1).bool() if mask is not None else None
            if keys & {"cls_attn", "mid_attn"}:
                if valid is None or bool(valid.all()):
                    score = _vision.received(q, k, scale)
                else:
                    score = received_masked(q, k, scale, valid.to(q.device))
                out["mid_attn" if "mid_attn" in keys else "cls_attn"] = shuffle_mean(score, side, s, 1)
            if "keys" in keys:
                out["keys"] = shuffle_mean(k, side, s, 2)
        return out
