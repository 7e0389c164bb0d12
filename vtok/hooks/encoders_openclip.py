"""open_clip ``VisionTransformer`` (CLIP's ``.visual``) built from ``ResidualAttentionBlock``.

As for timm, only the block's ``forward`` changes (class swap). The block's ``nn.MultiheadAttention`` is run as
its own math on the fused path: one input projection, ``F.scaled_dot_product_attention`` (ToMe's ``log(size)`` as
the additive mask when tokens were merged), output projection; ``q`` and ``k`` are kept for the hook.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vtok.hooks._encoder_state import Spec

NAME = "open_clip VisionTransformer (open_clip.transformer.VisionTransformer with ResidualAttentionBlock; pass " \
       "the CLIP model or its .visual)"


def attention(mha: torch.nn.MultiheadAttention, x: Tensor, bias: Any = None) -> tuple[Tensor, Tensor, Tensor, float]:
    """``nn.MultiheadAttention`` self-attention on batch-first ``x [B, N, D]`` → ``(out, q, k, scale)``;
    ``bias(dtype)`` gives the additive attention mask (or None)."""
    b, n, d = x.shape
    heads = mha.num_heads
    dh = d // heads
    q, k, v = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).view(b, n, 3, heads, dh).permute(2, 0, 3, 1, 4) \
        .unbind(0)
    mask = bias(q.dtype) if bias is not None else None
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=mha.dropout if mha.training else 0.0)
    o = F.linear(o.transpose(1, 2).reshape(b, n, d), mha.out_proj.weight, mha.out_proj.bias)
    return o, q, k, dh ** -0.5


def block_forward(self, q_x: Tensor, k_x: Tensor | None = None, v_x: Tensor | None = None,
                  attn_mask: Tensor | None = None) -> Tensor:
    st, i = self._vtok_state, self._vtok_index
    batch_first = self.attn.batch_first
    x = q_x if batch_first else q_x.transpose(0, 1)
    if i == 0:
        st.begin(x)
    if k_x is not None or v_x is not None or not st.active(i, x):
        return self._vtok_orig_cls.forward(self, q_x, k_x, v_x, attn_mask=attn_mask)
    if attn_mask is not None:
        raise ValueError("a vtok-patched open_clip block that reduces tokens does not take attn_mask")
    out, q, k, scale = attention(self.attn, self.ln_1(x), st.bias)
    x_in, x = x, x + self.ls_1(out)
    x = st.after_attention(i, x, q, k, scale, x_in)
    x = x + self.ls_2(self.mlp(self.ln_2(x)))
    x = st.after_block(i, x)
    return x if batch_first else x.transpose(0, 1)


def _grid_hook(module: torch.nn.Module, inputs: tuple[Any, ...], output: Any) -> tuple[int, int] | None:
    return int(output.shape[-2]), int(output.shape[-1])  # conv1: [B, width, gh, gw]


def spec(model: torch.nn.Module) -> Spec | None:
    """A ``Spec`` for an open_clip ``VisionTransformer`` or a CLIP model whose ``.visual`` is one, else None."""
    try:
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
    except ImportError:  # pragma: no cover - open_clip is a dependency
        return None
    if not isinstance(model, VisionTransformer):
        visual = getattr(model, "visual", None)
        if not isinstance(visual, VisionTransformer):
            return None
        model = visual
    blocks = list(model.transformer.resblocks)
    for j, blk in enumerate(blocks):
        mha = getattr(blk, "attn", None)
        base = getattr(type(blk), "_vtok_orig_cls", type(blk))  # a vtok subclass counts as its original class
        ok = (base is ResidualAttentionBlock and isinstance(mha, torch.nn.MultiheadAttention)
              and mha._qkv_same_embed_dim and mha.bias_k is None and not mha.add_zero_attn
              and not hasattr(blk, "ln_1_kv"))
        if not ok:
            raise TypeError(f"open_clip VisionTransformer block {j} is {type(blk).__name__}; vtok patches only "
                            f"ResidualAttentionBlock self-attention (not CustomResidualAttentionBlock, qk-norm or "
                            f"scaled-cosine variants)")
    gh, gw = model.grid_size
    return Spec("open_clip", model, blocks, 1, True, model.conv1, _grid_hook, int(gh) * int(gw),
                {ResidualAttentionBlock: block_forward})
