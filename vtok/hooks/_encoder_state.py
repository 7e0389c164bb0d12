"""Runtime state shared by the patched blocks of one encoder (see ``vtok.hooks.encoders``).

One ``EncoderState`` lives on the patched model as ``model._vtok_state``; every patched block holds a reference
to it and its own index. Block 0 resets the per-forward fields (``begin``), each block asks whether it has work
(``active``; otherwise it runs its original forward, so untouched blocks stay bit-exact), adds the
proportional-attention bias (``bias``), and calls ``after_attention`` between its attention and its MLP, where
tokens are merged (ToMe) or pruned (any other strategy) and captured tensors are stored.

Attention scores are recomputed from the block's own ``q``/``k`` for the few query rows needed (the CLS row),
never from an ``N × N`` matrix and never by switching the block to eager attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from vtok.budget import resolve_k
from vtok.context import Context
from vtok.kernels import ops
from vtok.selection import Selection

# context keys an encoder block can supply; everything else a strategy may need comes from outside the encoder
ENCODER_CONTEXT = frozenset({"cls_attn", "mid_attn", "keys", "grid", "sizes", "attn", "prev_hidden"})
CAPTURE_KEYS = ("cls_attn", "keys", "hidden", "attn", "attn_received")
MAX_FULL_ATTN_TOKENS = 2048  # ``attn`` (Zero-TPrune, capture) builds [B, H, N, N]: refuse beyond this


@dataclass
class Spec:
    """What the hook needs to know about one supported encoder."""

    arch: str  # "timm" or "open_clip"
    target: torch.nn.Module  # the module owning the blocks (the ViT, or CLIP's .visual)
    blocks: list[torch.nn.Module]
    n_prefix: int  # CLS / register / distillation tokens in front of the patch tokens
    has_cls: bool  # token 0 is a CLS token (else scores are mean received attention)
    embed: torch.nn.Module  # the patch embedding (a forward hook records the grid)
    grid_hook: Any  # (module, inputs, output) -> (h, w) | None
    n_patches: int | None  # patch tokens at the model's default resolution
    patched_forward: dict[type, Any] = field(default_factory=dict)  # block class -> replacement forward


@dataclass
class Plan:
    """What to do at which block: ToMe's ``r`` per block, or a pruning budget per block."""

    method: Any = None  # registry.Method, None for capture only
    merge_r: dict[int, int] = field(default_factory=dict)
    prune_keep: dict[int, int | float] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    prop_attn: bool = True
    at: str = "attention"  # prune between attention and MLP, or on the block's "output"
    score_rows: str = "cls"  # cls_attn / mid_attn from the CLS row, or averaged over "all" query rows
    mid_layer: int | None = None  # block whose attention gives mid_attn (None: the pruning block)


class EncoderState:
    """Per-model hook state. After a forward: ``selection`` (original patch tokens kept / merged, a ``Selection``
    over the patch tokens only), ``sizes`` (how many original tokens each output token stands for, prefix tokens
    included, or ``None`` when nothing was merged) and ``grid`` (the patch grid of the input)."""

    def __init__(self, spec: Spec, plan: Plan):
        self.spec = spec
        self.plan = plan
        self.capture: dict[int, tuple[str, ...]] = {}
        self.captured: dict[int, dict[str, Tensor]] = {}
        self.handles: list[Any] = []
        self.owners: list[torch.nn.Module] = []
        self.grid_in: tuple[int, int] | None = None
        self.grid: tuple[int, int] | None = None
        self.sizes: Tensor | None = None
        self.n_patch0 = 0
        self._batch = 0
        self._device: torch.device | None = None
        self._sel: Selection | None = None
        self._mid: Tensor | None = None  # mid_attn read at plan.mid_layer during this forward
        self._pending: tuple[Tensor, Tensor, float, Tensor | None] | None = None  # (q, k, scale, x_in) for "output"

    # ------------------------------------------------------------------------------------------------ per forward

    @property
    def n_prefix(self) -> int:
        return self.spec.n_prefix

    @property
    def selection(self) -> Selection | None:
        """The composed selection of the last forward over its ``n_patch0`` patch tokens (identity if nothing was
        reduced); ``None`` before the first forward."""
        if self._sel is not None:
            return self._sel
        if self._device is None:
            return None
        return Selection.identity(self._batch, self.n_patch0, self._device)

    def begin(self, x: Tensor) -> None:
        """Reset at the first block: ``x [B, N, D]`` are the tokens entering the encoder."""
        b, n = x.shape[:2]
        self._batch, self._device = b, x.device
        self.n_patch0 = n - self.n_prefix
        g = self.grid_in
        self.grid = g if g is not None and g[0] * g[1] == self.n_patch0 else None
        self.sizes = None
        self._sel = None
        self._mid = None
        self._pending = None
        self.captured.clear()

    def _reduces(self, i: int, n: int) -> bool:
        p = self.n_prefix
        if i in self.plan.merge_r:
            return min(self.plan.merge_r[i], (n - p) // 2) > 0
        if i in self.plan.prune_keep:
            return resolve_k(self.plan.prune_keep[i], n - p) < n - p
        return False

    def active(self, i: int, x: Tensor) -> bool:
        """Whether block ``i`` must run the vtok forward (else its original forward, bit-exact)."""
        return ((self.sizes is not None and self.plan.prop_attn) or i in self.capture or i == self.plan.mid_layer
                or self._reduces(i, x.shape[1]))

    def bias(self, dtype: torch.dtype) -> Tensor | None:
        """Proportional attention (ToMe Sec. 3): ``log(size)`` added to every key's logits, ``[B, 1, 1, N]``, passed to
        ``scaled_dot_product_attention`` as its additive ``attn_mask`` (the fused kernel stays on)."""
        if self.sizes is None or not self.plan.prop_attn:
            return None
        return self.sizes.log().to(dtype)[:, None, None, :]

    # ------------------------------------------------------------------------------------------------ scores

    def _size_bias_rows(self, rows: Tensor, sizes: Tensor | None) -> Tensor:
        """Attention rows ``[B, H, M, N]`` computed without the size bias → with it: ``softmax(l + log s)`` equals
        ``s · softmax(l)`` renormalised."""
        if sizes is None or not self.plan.prop_attn:
            return rows
        rows = rows * sizes.float()[:, None, None, :]
        return rows / rows.sum(-1, keepdim=True)

    def received(self, q: Tensor, k: Tensor, scale: float, rows: str = "cls") -> Tensor:
        """``[B, N]`` (all tokens, head mean): the CLS row of this block's attention (``rows="cls"``), or the attention
        each token receives averaged over all query rows (``rows="all"``, and for encoders without CLS); chunked over
        queries, never ``N × N``."""
        if rows == "cls" and self.spec.has_cls:
            q = q[:, :, :1]
        n = q.shape[2]
        sizes = self.sizes
        if sizes is None or not self.plan.prop_attn:
            return ops.attention_received(q, k, scale=scale) / n
        out = torch.zeros(k.shape[0], k.shape[2], device=k.device)
        for s in range(0, n, 256):
            att = self._size_bias_rows(ops.attention_rows(q[:, :, s:s + 256], k, scale=scale), sizes)
            out += att.sum(2).mean(1)
        return out / n

    def patch_attn(self, q: Tensor, k: Tensor, scale: float) -> Tensor:
        """``[B, H, Np, Np]``: the block's attention among patch tokens (rows renormalised over patch keys)."""
        p = self.n_prefix
        n = k.shape[2] - p
        if n > MAX_FULL_ATTN_TOKENS:
            raise ValueError(f"the full attention matrix ('attn') is built only for <= {MAX_FULL_ATTN_TOKENS} patch "
                             f"tokens, got {n}")
        rows = ops.attention_rows(q[:, :, p:], k[:, :, p:], scale=scale)
        return self._size_bias_rows(rows, None if self.sizes is None else self.sizes[:, p:])

    # ------------------------------------------------------------------------------------------------ reduction

    def after_attention(self, i: int, x: Tensor, q: Tensor, k: Tensor, scale: float, x_in: Tensor | None = None
                        ) -> Tensor:
        """Between block ``i``'s attention and its MLP: capture, then merge / prune ``x [B, N, D]`` (``x_in``: the
        block's input, the ``prev_hidden`` of transition strategies); with ``at="output"`` the pruning waits for
        ``after_block`` with this attention's context."""
        if i in self.capture:
            self._capture(i, q, k, scale)
        if i == self.plan.mid_layer:
            self._mid = self.received(q, k, scale, self.plan.score_rows)[:, self.n_prefix:]
        if not self._reduces(i, x.shape[1]):
            return x
        if i in self.plan.merge_r:
            return self._merge(i, x, k)
        if self.plan.at == "output":
            self._pending = (q, k, scale, x_in)
            return x
        return self._prune(i, x, q, k, scale, x_in)

    def after_block(self, i: int, x: Tensor) -> Tensor:
        """After block ``i``'s MLP: capture its output, then prune it if the plan says ``at="output"``."""
        if "hidden" in self.capture.get(i, ()):
            self.captured.setdefault(i, {})["hidden"] = x[:, self.n_prefix:]
        if self._pending is None:
            return x
        (q, k, scale, x_in), self._pending = self._pending, None
        return self._prune(i, x, q, k, scale, x_in)

    def _capture(self, i: int, q: Tensor, k: Tensor, scale: float) -> None:
        p = self.n_prefix
        out = self.captured.setdefault(i, {})
        what = self.capture[i]
        if "cls_attn" in what:
            out["cls_attn"] = self.received(q, k, scale)[:, p:]
        if "attn_received" in what:
            out["attn_received"] = self.received(q, k, scale, "all")[:, p:]
        if "keys" in what:
            out["keys"] = k[:, :, p:]
        if "attn" in what:
            out["attn"] = self.patch_attn(q, k, scale)

    def _merge(self, i: int, x: Tensor, k: Tensor) -> Tensor:
        """ToMe step: bipartite matching on the block's keys (head mean), ``r`` pairs merged, prefix protected; the
        merged sequence comes out in the strategy's emission order (ToMe's ``[prefix, unmerged A, B]`` by default), so
        the next block's alternating split runs over it as in the authors' code."""
        p, n = self.n_prefix, x.shape[1]
        r = min(self.plan.merge_r[i], (n - p) // 2)
        # the registered strategy called directly: its inputs come from the block itself, so the validation
        # ``compress`` does for user input (finite checks over x and keys) is skipped on this per-block path
        ctx = Context(keys=k) if self.sizes is None else Context(keys=k, sizes=self.sizes)
        sel = self.plan.method.fn(x, n - r, ctx, protect_first=p, **self.plan.options)
        x = sel.apply(x, weights=self.sizes)
        self.sizes = sel.token_sizes()
        pos, out = sel.emitted_keep(), sel.output_of_each_token()  # prefix tokens are emitted first, unmerged
        patch_sel = Selection.from_emitted(pos[:, p:] - p, n - p, out[:, p:] - p)
        self._sel = patch_sel if self._sel is None else self._sel.compose(patch_sel)
        return x

    def _prune(self, i: int, x: Tensor, q: Tensor, k: Tensor, scale: float, x_in: Tensor | None = None) -> Tensor:
        """Any registered strategy on the patch tokens only; prefix tokens are re-attached in front."""
        from vtok.api import compress

        method = self.plan.method
        p = self.n_prefix
        patch = x[:, p:]
        ctx = self.context(method, q, k, scale, i, x_in)
        out, sel = compress(patch, method.name, self.plan.prune_keep[i], **ctx, **self.plan.options)
        if self.sizes is not None or sel.merges:
            b = x.shape[0]
            old = self.sizes if self.sizes is not None else torch.ones(b, x.shape[1], device=x.device)
            if sel.merges:
                a = sel.assign
                new = torch.zeros(b, sel.k, device=x.device, dtype=old.dtype)
                new = sel.emit(new.scatter_add_(1, a.clamp_min(0), old[:, p:] * (a >= 0)))
            else:
                new = sel.gather(old[:, p:])
            self.sizes = torch.cat([old[:, :p], new], 1)
        self._sel = sel if self._sel is None else self._sel.compose(sel)
        return torch.cat([x[:, :p], out], 1)

    def context(self, method: Any, q: Tensor, k: Tensor, scale: float, i: int, x_in: Tensor | None = None
                ) -> dict[str, Any]:
        """Exactly the context ``method`` declares (needs and uses) that an encoder block can supply (``x_in``: the
        block's input tokens, given as ``prev_hidden``)."""
        want = (method.needs | method.uses) & ENCODER_CONTEXT
        p = self.n_prefix
        n = k.shape[2] - p
        ctx: dict[str, Any] = {}
        if want & {"cls_attn", "mid_attn"}:
            score = self.received(q, k, scale, self.plan.score_rows)[:, p:]
            ctx.update({key: score for key in want & {"cls_attn", "mid_attn"}})
            if "mid_attn" in want and self._mid is not None:
                ctx["mid_attn"] = self._mid
        if "keys" in want:
            ctx["keys"] = k[:, :, p:]
        if "attn" in want:
            ctx["attn"] = self.patch_attn(q, k, scale)
        if "prev_hidden" in want and x_in is not None:
            ctx["prev_hidden"] = x_in[:, p:]
        if self.sizes is not None:  # also the weights of merging strategies' size-weighted averages
            ctx["sizes"] = self.sizes[:, p:]
        if "grid" in want:
            full = self._sel is None and self.grid is not None and self.grid[0] * self.grid[1] == n
            if full:
                ctx["grid"] = self.grid
            elif "grid" in method.needs:
                why = ("tokens were already dropped or merged at an earlier block" if self._sel is not None
                       else "the input's patch grid is unknown or has a different size, e.g. after patch dropout")
                raise ValueError(f"method '{method.name}' needs the patch grid at block {i}, but its {n} patch tokens "
                                 f"are no longer a full grid ({why}); prune at a single, earlier block")
        return ctx

