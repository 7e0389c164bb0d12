"""Adapter for ``Gemma3ForConditionalGeneration`` (Gemma 3: SigLIP tower, 4 x 4 average pooling, bidirectional image
attention in the language model).

Each image, and each pan-and-scan crop (its own ``<start_of_image>`` … ``<end_of_image>`` run and its own row of
``pixel_values``), is one record of ``mm_tokens_per_image`` tokens (256 in the released checkpoints) with grid
``(16, 16)``; a crop is budgeted as an image of its own (the model does not say which crops belong together).

Vision-side context (SigLIP has no CLS token), recomputed from the input of the last encoder layer (the features are
its output, post-layernormed and pooled by ``Gemma3MultiModalProjector``):

* ``cls_attn [n]`` (and ``mid_attn``): the attention each patch receives, averaged over heads and all query rows,
  then averaged over the ``k x k`` patches each token pools (``k = patches per side / tokens per side``, 4), like the
  features;
* ``keys [H, n, dh]``: that layer's per-head keys, averaged over the same ``k x k`` patches.

The language model: Gemma 3's image tokens attend bidirectionally among the tokens of their own image (one run of
``token_type_ids == 1``), everything else causally. The model builds that mask mapping itself and hands it to the
language model; the adapter (hooks ``lm_inputs`` / ``prefill_inputs`` / ``stage_mask``) gives the engine the 2-D mask
instead, gathers ``token_type_ids`` at the kept tokens and rebuilds the mapping with the model's own
``create_masks_for_generate`` on the pruned prompt, and adds the same image blocks to an in-LLM stage's mask: a kept
image's tokens still attend bidirectionally among themselves, nothing else changes.

Sliding-window layers (5 of every 6; window 512 / 1024 tokens): before the language model, pruning only shortens
the prompt and the model's own masks and caches apply. An in-LLM stage re-masks the layers after it over the pruned
sequence and their KV cache holds that sequence; a sliding layer's window (and its cache, which keeps the last
``sliding_window - 1`` tokens) would then count pruned tokens instead of prompt tokens. The wrapper runs an in-LLM
stage only while the whole sequence (the unpruned prompt plus the tokens generated) fits in ``sliding_window``,
where a window is the full causal attention, and refuses (``NotImplementedError``) beyond.
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vtok.hooks.hf._sequence import causal_keep_mask
from vtok.hooks.hf.adapter import Undo, register_adapter
from vtok.hooks.hf.llava import LlavaAdapter

if TYPE_CHECKING:
    from vtok.hooks.hf._runtime import Runtime

_ROPE_KWARGS = ("position_embeddings", "position_embeddings_global", "position_embeddings_local")  # 5.x; 4.x


def image_blocks(token_type_ids: Tensor) -> Tensor:
    """``[B, L]``: the image block of each token (``token_type_ids == 1`` runs numbered from 0 per sample), -1 for
    text; the rule of transformers' ``get_block_sequence_ids_for_mask``."""
    is_image = token_type_ids == 1
    start = is_image & ~F.pad(is_image, (1, 0))[:, :-1]
    return torch.where(is_image, start.long().cumsum(1) - 1, -1)


def _gather(t: Tensor, index: Tensor) -> Tensor:
    """``t [B, L]`` at ``index [B, L']`` (-1 → 0)."""
    return t.to(index.device).gather(1, index.clamp_min(0)).masked_fill(index < 0, 0)


def _pool(t: Tensor, k: int, dim: int) -> Tensor:
    """Average ``t``'s token dimension ``dim`` (``P²`` patches, row-major) over ``k x k`` patches: ``(P/k)²`` left."""
    t = t.movedim(dim, -1)
    lead, n = t.shape[:-1], t.shape[-1]
    side = int(round(n ** 0.5))
    out = F.avg_pool2d(t.reshape(-1, 1, side, side).float(), k).reshape(*lead, -1).to(t.dtype)
    return out.movedim(-1, dim)


@register_adapter
class Gemma3Adapter(LlavaAdapter):
    """Model-specific glue for Gemma 3; the ``Runtime`` does the rest."""

    names = ("Gemma3ForConditionalGeneration",)
    positions = "1d"

    def image_token_ids(self, model: torch.nn.Module) -> list[int]:
        return [int(model.config.image_token_id)]

    def feature_layer(self, model: torch.nn.Module) -> int:
        """The last encoder layer (the features are its output)."""
        return len(self.tower_layers(model)) - 1

    def _kernel(self, model: torch.nn.Module) -> int:
        return int(self.inner(model).multi_modal_projector.kernel_size)

    @torch.no_grad()
    def _context(self, model: torch.nn.Module, layer: torch.nn.Module, hidden: Tensor, want: set[str],
                 rows: str = "cls") -> dict[str, Tensor]:
        """LLaVA's per-patch context (mean received attention ``[n, P²]``, keys ``[n, H, P², dh]``) pooled like the
        features: ``cls_attn [n, N]``, ``keys [n, H, N, dh]``."""
        out = super()._context(model, layer, hidden, want, rows)
        k = self._kernel(model)
        return {key: _pool(v, k, -1 if key != "keys" else -2) for key, v in out.items()}

    def provides(self, model: torch.nn.Module) -> set[str]:
        return {"grid", "query", "cls_attn", "keys", "mid_attn"}

    # --- language-model inputs
    def rope_kwargs(self, model: torch.nn.Module) -> tuple[str, ...]:
        return _ROPE_KWARGS

    def install(self, model: torch.nn.Module, rt: Runtime) -> list[Undo]:
        """LLaVA's feature hook, plus a pre-hook on the inner model keeping the call's 2-D ``attention_mask`` and
        ``token_type_ids`` (``rt.adapter_state``)."""
        inner = self.inner(model)
        sig = inspect.signature(inner.forward)

        def keep_inputs(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            got = sig.bind_partial(*args, **kwargs).arguments
            rt.adapter_state["attention_mask"] = got.get("attention_mask")
            rt.adapter_state["token_type_ids"] = got.get("token_type_ids")

        handle = inner.register_forward_pre_hook(keep_inputs, with_kwargs=True)
        return [handle.remove, *self._install_loss(model, rt), *super().install(model, rt)]

    @staticmethod
    def _install_loss(model: torch.nn.Module, rt: Runtime) -> list[Undo]:
        """transformers 4.x: Gemma 3's forward computes its loss itself from the unpruned ``labels`` and
        ``attention_mask`` (not through ``loss_function``, which vtok prunes); with ``labels`` the forward runs without
        them and the loss is its own (shifted cross-entropy, ``-100`` ignored) over the pruned labels."""
        import transformers

        if not transformers.__version__.startswith("4."):
            return []
        orig = model.forward

        @functools.wraps(orig)
        def forward(*args: Any, **kwargs: Any) -> Any:
            labels = kwargs.pop("labels", None)
            out = orig(*args, **kwargs)
            if labels is None:
                return out
            if not hasattr(out, "logits"):
                raise NotImplementedError("vtok: Gemma 3 with labels needs return_dict=True on transformers 4.x")
            logits = out.logits
            pruned = rt.prune_labels(labels, logits.shape[1]).to(logits.device)
            out.loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), pruned[:, 1:].flatten(),
                                       ignore_index=-100)
            return out

        model.forward = forward
        return [lambda: delattr(model, "forward")]

    def _sliding_after(self, model: torch.nn.Module, rt: Runtime) -> int | None:
        """The sliding window when an in-LLM stage re-masks a sliding-window layer (or prunes its cache), else
        ``None``."""
        layers = [s.layer for s in rt.stages if s.layer is not None]
        if not layers:
            return None
        text = model.config.get_text_config()
        types = getattr(text, "layer_types", None) or []
        first = max(min(layers) - 1, 0)
        return text.sliding_window if "sliding_attention" in types[first:] else None

    def attention_kwargs(self, layer: torch.nn.Module, kw: dict[str, Any]) -> dict[str, Any]:
        """transformers 4.x hands a layer both RoPE tables; its attention takes the one of its kind."""
        if "position_embeddings_global" not in kw:
            return kw
        out = {k: v for k, v in kw.items() if k not in _ROPE_KWARGS}
        local = getattr(layer.self_attn, "is_sliding", False)
        out["position_embeddings"] = kw["position_embeddings_local" if local else "position_embeddings_global"]
        return out

    def lm_inputs(self, model: torch.nn.Module, rt: Runtime, kw: dict[str, Any]) -> None:
        """The model's mask mapping → the 2-D mask of the call; an in-LLM stage refused beyond the sliding window."""
        if isinstance(kw.get("attention_mask"), dict):
            am = rt.adapter_state.get("attention_mask")
            if am is not None and (not isinstance(am, Tensor) or am.dim() != 2):
                raise NotImplementedError("vtok: Gemma 3 needs a 2-D attention_mask [B, L] (or none), not a "
                                          "precomputed mask mapping")
            kw["attention_mask"] = am
        window = self._sliding_after(model, rt)
        if window is not None:
            am = kw.get("attention_mask")
            x = kw.get("inputs_embeds")
            n = am.shape[1] if isinstance(am, Tensor) else (x.shape[1] if x is not None else kw["input_ids"].shape[1])
            if n > window:
                raise NotImplementedError(
                    f"vtok: an in-LLM stage on Gemma 3 needs the whole sequence (prompt + generated tokens: {n}) "
                    f"within the sliding window ({window}): its sliding-window layers after the stage would count "
                    "the window over the pruned sequence and cache only its last tokens; prune before the "
                    "language model (layer=None) instead")

    def prefill_inputs(self, model: torch.nn.Module, rt: Runtime, kw: dict[str, Any], index: Tensor | None
                       ) -> None:
        """``token_type_ids`` gathered at the kept tokens and the model's own mask mapping built on them."""
        tt = rt.adapter_state.get("token_type_ids")
        x = kw["inputs_embeds"]
        if tt is None:  # no image blocks: the language model builds its causal / sliding masks from the 2-D mask
            rt.adapter_state["lm_token_type_ids"] = None
            return
        if index is not None:
            tt = _gather(tt, index)
        if tt.shape != x.shape[:2]:
            raise RuntimeError(f"vtok: Gemma 3's token_type_ids {list(tt.shape)} do not match the language model's "
                               f"input {list(x.shape[:2])}")
        rt.adapter_state["lm_token_type_ids"] = tt
        cache = kw.get("cache", kw.get("past_key_values"))
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        position_ids = kw.get("position_ids")
        cache_position = kw.get("cache_position")
        if cache_position is None:
            cache_position = torch.arange(past, past + x.shape[1], device=x.device)
        make = type(model).create_masks_for_generate
        given = {"config": model.config, "inputs_embeds": x, "input_embeds": x,
                 "attention_mask": kw.get("attention_mask"), "cache": cache, "past_key_values": cache,
                 "cache_position": cache_position, "position_ids": position_ids, "token_type_ids": tt}
        params = inspect.signature(make).parameters
        kw["attention_mask"] = make(**{k: v for k, v in given.items() if k in params})

    def stage_mask(self, model: torch.nn.Module, rt: Runtime, mask: Tensor | None, valid: Tensor, index: Tensor,
                   fmt: torch.dtype | None) -> Tensor | None:
        """Causal over the kept tokens, padding masked, OR the kept tokens of one image among themselves."""
        tt = rt.adapter_state.get("lm_token_type_ids")
        if tt is None:
            return mask
        blocks = image_blocks(_gather(tt, index))
        same = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
        m = causal_keep_mask(valid, valid.shape[1], None) | (same & valid[:, None, :] & valid[:, :, None])[:, None]
        if fmt is None or fmt == torch.bool:
            return m
        return torch.zeros(m.shape, dtype=fmt, device=m.device).masked_fill(~m, torch.finfo(fmt).min)
