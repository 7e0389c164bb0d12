"""``Selection``: the one result type every strategy returns.

A selection says which of ``N`` tokens survive, in original order, and (for merging strategies)
which surviving slot every original token is averaged into.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """``x [B, N, ...]`` gathered along dim 1 with ``idx [B, k]`` → ``[B, k, ...]`` (exact copies of the rows).

    Uses one ``index_select`` on the flattened batch (several times faster than an expanded ``gather``)."""
    b, n = x.shape[:2]
    flat = (idx + torch.arange(b, device=idx.device)[:, None] * n).reshape(-1)
    return x.reshape((b * n,) + x.shape[2:]).index_select(0, flat).reshape(idx.shape + x.shape[2:])


@dataclass(frozen=True)
class Selection:
    """Kept tokens and an optional merge map.

    Attributes:
        keep: ``LongTensor [B, k]``, strictly ascending per row, values in ``[0, n)``. For a merging
            selection, ``keep[b, j]`` is the original token whose *position* output slot ``j`` takes.
        n: original token count ``N``.
        assign: optional ``LongTensor [B, N]``: the output slot in ``[0, k)`` each original token is merged
            into, or ``-1`` for a token that is dropped. ``None`` means plain gathering.
        size: optional ``[B, k]``: how many original tokens each output token stands for (ToMe's size).
            For a merging selection it defaults to the count of tokens assigned to each slot.
    """

    keep: Tensor
    n: int
    assign: Tensor | None = None
    size: Tensor | None = None

    @property
    def k(self) -> int:
        return self.keep.shape[1]

    @property
    def batch(self) -> int:
        return self.keep.shape[0]

    @property
    def merges(self) -> bool:
        return self.assign is not None

    @classmethod
    def identity(cls, batch: int, n: int, device: torch.device | str | None = None) -> Selection:
        """Keep every token: ``keep = arange(n)`` for each of ``batch`` rows."""
        return cls(torch.arange(n, device=device).expand(batch, n).contiguous(), n)

    @classmethod
    def from_indices(cls, idx: Tensor, n: int) -> Selection:
        """Selection from unordered unique indices ``[B, k]`` (sorted here)."""
        return cls(idx.sort(dim=1).values, n)

    @classmethod
    def from_mask(cls, mask: Tensor) -> Selection:
        """Selection from a boolean keep mask ``[B, N]`` with the same count of ``True`` per row."""
        counts = mask.sum(1)
        if counts.numel() and not bool((counts == counts[0]).all()):
            raise ValueError(f"mask must keep the same number of tokens in every row, got {counts.tolist()}")
        k = int(counts[0]) if counts.numel() else 0
        idx = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        # stable sort puts kept tokens first, in original order
        order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices
        return cls(idx.gather(1, order[:, :k]), mask.shape[1])

    def token_sizes(self) -> Tensor | None:
        """``[B, k]`` sizes: the explicit ``size``, else counts from ``assign``, else ``None``."""
        if self.size is not None:
            return self.size
        if self.assign is None:
            return None
        a = self.assign
        valid = a >= 0
        out = torch.zeros(a.shape[0], self.k, device=a.device, dtype=torch.float32)
        return out.scatter_add_(1, a.clamp_min(0), valid.to(torch.float32))

    def kept_mask(self) -> Tensor:
        """Boolean ``[B, N]``: True at kept positions."""
        m = torch.zeros(self.batch, self.n, dtype=torch.bool, device=self.keep.device)
        return m.scatter_(1, self.keep, True)

    def apply(self, tokens: Tensor, weights: Tensor | None = None) -> Tensor:
        """Reduce ``tokens [B, N, D]`` to ``[B, k, D]``.

        Without ``assign``: gather the kept rows (bit-exact copies). With ``assign``: each output slot is
        the weighted mean of the tokens assigned to it, weights being ``weights [B, N]`` (e.g. ToMe sizes
        carried from earlier merges) or 1. Accumulates in fp32 for half-precision inputs.
        """
        self._check_tokens(tokens)
        if self.assign is None:
            return gather_tokens(tokens, self.keep)
        b, n, d = tokens.shape
        a = self.assign
        w = torch.ones(b, n, device=tokens.device, dtype=torch.float32) if weights is None else weights.float()
        if weights is not None and weights.shape != (b, n):
            raise ValueError(f"weights must have shape [B, N] = {[b, n]}, got {list(weights.shape)}")
        w = w * (a >= 0)
        idx = a.clamp_min(0)
        acc = torch.float32 if tokens.dtype in (torch.float16, torch.bfloat16) else tokens.dtype
        num = torch.zeros(b, self.k, d, device=tokens.device, dtype=acc)
        num.scatter_add_(1, idx[..., None].expand(b, n, d), tokens.to(acc) * w[..., None].to(acc))
        den = torch.zeros(b, self.k, device=tokens.device, dtype=acc).scatter_add_(1, idx, w.to(acc))
        return (num / den.clamp_min(torch.finfo(acc).tiny)[..., None]).to(tokens.dtype)

    def gather(self, x: Tensor) -> Tensor:
        """Gather any per-token tensor ``x [B, N, ...]`` (positions, masks, sizes) at the kept indices."""
        if x.shape[:2] != (self.batch, self.n):
            raise ValueError(f"x must start with [B, N] = {[self.batch, self.n]}, got {list(x.shape)}")
        return gather_tokens(x, self.keep)

    def compose(self, after: Selection) -> Selection:
        """The selection equal to applying ``self`` and then ``after`` (defined on ``self``'s output)."""
        if after.n != self.k or after.batch != self.batch:
            raise ValueError(f"after must select from [B={self.batch}, N={self.k}] tokens, "
                             f"got [B={after.batch}, N={after.n}]")
        keep = self.keep.gather(1, after.keep)
        if self.assign is None and after.assign is None:
            return Selection(keep, self.n)
        first = self.assign if self.assign is not None else self._slot_of_each_token()
        second = after.assign if after.assign is not None else after._slot_of_each_token()
        valid = first >= 0
        assign = torch.where(valid, second.gather(1, first.clamp_min(0)), torch.full_like(first, -1))
        return Selection(keep, self.n, assign)

    def _slot_of_each_token(self) -> Tensor:
        """``[B, N]``: output slot of each kept token, -1 for dropped ones (for plain gathers)."""
        slots = torch.full((self.batch, self.n), -1, dtype=torch.long, device=self.keep.device)
        src = torch.arange(self.k, device=self.keep.device).expand(self.batch, -1)
        return slots.scatter_(1, self.keep, src)

    def _check_tokens(self, tokens: Tensor) -> None:
        if tokens.dim() < 2 or tokens.shape[0] != self.batch or tokens.shape[1] != self.n:
            raise ValueError(f"tokens must have shape [B={self.batch}, N={self.n}, ...], got {list(tokens.shape)}")

    def validate(self) -> Selection:
        """Check the contract; raises ``ValueError`` on a broken selection. Returns ``self``."""
        keep = self.keep
        if keep.dim() != 2 or keep.dtype != torch.long:
            raise ValueError(f"keep must be a LongTensor [B, k], got {keep.dtype} {list(keep.shape)}")
        if keep.shape[1] < 1 or keep.shape[1] > self.n:
            raise ValueError(f"keep must hold 1..N={self.n} indices per row, got {keep.shape[1]}")
        if bool((keep < 0).any()) or bool((keep >= self.n).any()):
            raise ValueError(f"keep indices must lie in [0, {self.n})")
        if keep.shape[1] > 1 and not bool((keep[:, 1:] > keep[:, :-1]).all()):
            raise ValueError("keep indices must be strictly ascending (sorted, unique) in every row")
        if self.assign is not None:
            a = self.assign
            if a.shape != (keep.shape[0], self.n) or a.dtype != torch.long:
                raise ValueError(f"assign must be a LongTensor [B, N] = {[keep.shape[0], self.n]}, "
                                 f"got {a.dtype} {list(a.shape)}")
            if bool((a < -1).any()) or bool((a >= self.k).any()):
                raise ValueError(f"assign values must lie in [-1, k={self.k})")
        if self.size is not None and self.size.shape != keep.shape:
            raise ValueError(f"size must have shape [B, k] = {list(keep.shape)}, got {list(self.size.shape)}")
        return self
