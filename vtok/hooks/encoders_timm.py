"""timm ``VisionTransformer`` (ViT, DeiT, ... built from ``vision_transformer.Block`` + ``Attention``).

The patched block keeps every weight and submodule; only its ``forward`` changes (the block's class is swapped for
a subclass, as ToMe's timm patch does). When the block has nothing to do it calls the original forward. Otherwise
it runs the same computation as ``Block.forward`` / ``Attention.forward`` on the fused path
(``F.scaled_dot_product_attention``, with ToMe's ``log(size)`` as the additive mask when tokens were merged),
keeping ``q`` and ``k`` for the hook, and hands the tokens to the state between attention and MLP. Such a block
always uses the fused kernel, even where timm was told to use eager attention (``TIMM_FUSED_ATTN=0``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vtok.hooks._encoder_state import Spec

NAME = "timm VisionTransformer (timm.models.vision_transformer.VisionTransformer: ViT, DeiT, ... with its Block / " \
       "Attention)"


def attention(attn: torch.nn.Module, x: Tensor, bias: Any = None) -> tuple[Tensor, Tensor, Tensor, float]:
    """``timm.layers.Attention.forward`` (fused path) returning ``(out, q, k, scale)``; ``bias(dtype)`` gives the
    additive attention mask (or None)."""
    b, n, _ = x.shape
    heads = attn.num_heads
    head_dim = getattr(attn, "head_dim", attn.qkv.out_features // (3 * heads))
    gate = getattr(attn, "gate", None)
    g = gate(x).sigmoid() if gate is not None else None
    q, k, v = attn.qkv(x).reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    mask = bias(q.dtype) if bias is not None else None
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    o = o.transpose(1, 2).reshape(b, n, heads * head_dim)
    o = getattr(attn, "norm", torch.nn.Identity())(o)
    if g is not None:
        o = o * g
    return attn.proj_drop(attn.proj(o)), q, k, float(attn.scale)


def block_forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    st, i = self._vtok_state, self._vtok_index
    if i == 0:
        st.begin(x)
    if not st.active(i, x):
        causal = {"is_causal": True} if is_causal else {}  # older timm blocks have no is_causal argument
        return self._vtok_orig_cls.forward(self, x, attn_mask=attn_mask, **causal)
    if attn_mask is not None or is_causal:
        raise ValueError("a vtok-patched timm block that reduces tokens does not take attn_mask / is_causal")
    out, q, k, scale = attention(self.attn, self.norm1(x), st.bias)
    x_in, x = x, x + self.drop_path1(self.ls1(out))
    x = st.after_attention(i, x, q, k, scale, x_in)
    x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
    x = st.after_block(i, x)
    return x


def _grid_hook(module: torch.nn.Module, inputs: tuple[Any, ...], output: Any) -> tuple[int, int] | None:
    out = output[0] if isinstance(output, tuple) else output
    if isinstance(out, Tensor) and out.dim() == 4:  # dynamic_img_size: NHWC
        return int(out.shape[1]), int(out.shape[2])
    img = inputs[0] if inputs else None
    if isinstance(img, Tensor) and img.dim() == 4 and hasattr(module, "dynamic_feat_size"):
        h, w = module.dynamic_feat_size(tuple(img.shape[-2:]))
        return int(h), int(w)
    gs = getattr(module, "grid_size", None)
    return (int(gs[0]), int(gs[1])) if gs is not None else None


def spec(model: torch.nn.Module) -> Spec | None:
    """A ``Spec`` if ``model`` is a timm VisionTransformer (or an open_clip ``TimmModel`` around one), else None;
    ``TypeError`` if it is one but built from blocks vtok cannot patch."""
    try:
        from timm.layers import Attention
        from timm.models.vision_transformer import Block, VisionTransformer
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    if not isinstance(model, VisionTransformer):
        trunk = getattr(model, "trunk", None)
        if isinstance(trunk, VisionTransformer):
            model = trunk
        else:
            return None
    blocks = list(model.blocks)
    for j, blk in enumerate(blocks):
        if getattr(type(blk), "_vtok_orig_cls", type(blk)) is not Block or type(blk.attn) is not Attention:
            raise TypeError(f"timm VisionTransformer block {j} is {type(blk).__name__} with "
                            f"{type(getattr(blk, 'attn', None)).__name__}; vtok patches only "
                            f"timm.models.vision_transformer.Block with timm.layers.Attention")
    pe = model.patch_embed
    n_patches = getattr(pe, "num_patches", None)
    if getattr(model, "dynamic_img_size", False):
        n_patches = None  # any resolution: counts are checked per forward
    return Spec("timm", model, blocks, int(model.num_prefix_tokens), model.cls_token is not None, pe, _grid_hook,
                n_patches, {Block: block_forward})
