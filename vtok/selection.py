"""``Selection``: the one result type every strategy returns.

A selection says which of ``N`` tokens survive (``keep``, always ascending: positions stay meaningful), which
surviving slot every original token is averaged into (``assign``, merging strategies), and optionally the order in
which the surviving slots are *emitted* (``order``). Slots are numbered by ascending ``keep``; ``apply`` / ``gather``
return them in emitted order, which is slot order unless ``order`` says otherwise (ToMe's ``[unmerged A | B]``,
VisionZip's ``[dominant | contextual]``: the order the authors' code produces, which the next ToMe block's
alternating split or a VLM's position ids depend on).

A *ragged* selection (``lengths`` set) keeps a different number of tokens per row: row ``b`` holds
``lengths[b]`` real outputs followed by padding up to ``k = max(lengths)``. ``apply`` / ``gather`` zero the
padding and ``valid_mask()`` says which outputs are real. Per-sample budgets (``vtok.compress(x, m, keep=[…])``)
and length-adaptive strategies (``adaptive_length``) return one; ``Selection.from_rows`` builds one from
per-sample selections.
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
        size: optional ``[B, k]``: how many original tokens each slot stands for (ToMe's size), per slot (aligned
            with ``keep``). For a merging selection it defaults to the count of tokens assigned to each slot.
        order: optional ``LongTensor [B, k]``, a permutation of ``0..k-1`` per row: output position ``j`` of
            ``apply`` / ``gather`` holds slot ``order[b, j]``. ``None`` = slot order (ascending positions). It never
            changes *which* tokens survive or how they are averaged, only the order they are emitted in.
        coef: optional ``[B, N]`` explicit mixing coefficients of a merging selection: slot ``j`` is
            ``Σ_{i: assign[i]=j} coef[i] · x_i`` with no normalisation (incoming ``weights`` are ignored: the strategy
            folded them in). For merges that are not weighted means, e.g. VisionZip's ``target + mean(others)``.
        lengths: optional ``LongTensor [B]``, ``1 <= lengths[b] <= k`` with ``max == k``: a ragged selection whose
            row ``b`` has only its first ``lengths[b]`` *emitted* outputs real, the rest padding (zeros in
            ``apply`` / ``gather``; their ``keep`` entries are unused positions, never tokens of the row's merges).
            ``None``: every row holds ``k`` outputs.
    """

    keep: Tensor
    n: int
    assign: Tensor | None = None
    size: Tensor | None = None
    order: Tensor | None = None
    coef: Tensor | None = None
    lengths: Tensor | None = None

    @property
    def k(self) -> int:
        """Outputs per row (the longest row of a ragged selection)."""
        return self.keep.shape[1]

    @property
    def ragged(self) -> bool:
        return self.lengths is not None

    def counts(self) -> Tensor:
        """``LongTensor [B]``: real outputs per row (``k`` everywhere unless ragged)."""
        if self.lengths is not None:
            return self.lengths
        return torch.full((self.batch,), self.k, dtype=torch.long, device=self.keep.device)

    def valid_mask(self) -> Tensor:
        """Boolean ``[B, k]`` in emitted order: True for real outputs, False for the padding of a ragged row."""
        ar = torch.arange(self.k, device=self.keep.device)
        return ar[None, :] < self.counts().to(ar.device)[:, None]

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
    def from_emitted(cls, positions: Tensor, n: int, assign: Tensor | None = None, size: Tensor | None = None,
                     coef: Tensor | None = None) -> Selection:
        """Selection from the emitted view: ``positions [B, k]`` = the original token each output takes, in output
        order (unique per row); ``assign [B, N]`` = the *output* index each token goes to (or -1); ``size [B, k]`` per
        output. Slots are renumbered by ascending position and ``order`` records the emission (``None`` when the
        positions are already ascending)."""
        keep, slot_to_out = positions.sort(dim=1)  # slot s is output slot_to_out[s]
        k = positions.shape[1]
        ar = torch.arange(k, device=positions.device).expand_as(positions)
        order = torch.empty_like(slot_to_out).scatter_(1, slot_to_out, ar)  # output j holds slot order[j]
        if assign is not None:
            assign = torch.where(assign >= 0, order.gather(1, assign.clamp_min(0)), torch.full_like(assign, -1))
        if size is not None:
            size = size.gather(1, slot_to_out)
        ordered = bool((order == ar).all()) if k else True
        return cls(keep, n, assign, size, None if ordered else order, coef)

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

    @classmethod
    def from_rows(cls, rows: list[Selection]) -> Selection:
        """One (ragged) selection from per-sample selections of one row each (``[1, k_b]`` from the same ``N``).

        Row ``b`` emits ``rows[b]``'s outputs in their order, then padding at the smallest positions it does not keep;
        ``lengths`` holds the ``k_b`` (``None`` when they are all equal). Merges and sizes are carried."""
        if not rows or any(r.batch != 1 for r in rows) or len({r.n for r in rows}) != 1:
            raise ValueError("rows must be a non-empty list of one-row selections of the same N")
        n, kmax = rows[0].n, max(r.k for r in rows)
        device = rows[0].keep.device
        ks = [r.k for r in rows]
        positions, assign, size, coef = [], [], [], []
        merging = any(r.merges for r in rows)
        sized = any(r.size is not None for r in rows)
        for r in rows:
            em = r.emitted_keep()[0]
            free = r.kept_mask()[0].logical_not().nonzero()[:, 0][:kmax - r.k]
            positions.append(torch.cat([em, free]))
            if merging:
                assign.append(r.output_of_each_token()[0])
                coef.append(r._effective_coef()[0] if r.coef is not None else None)
            if sized:
                s = r.token_sizes()
                s = torch.ones(r.k, device=device) if s is None else s[0].float()
                size.append(torch.cat([s, torch.ones(kmax - r.k, device=device)]))
        use_coef = merging and any(c is not None for c in coef)
        if use_coef:
            coef = [c if c is not None else r._effective_coef()[0] for c, r in zip(coef, rows, strict=True)]
        sel = cls.from_emitted(torch.stack(positions), n, torch.stack(assign) if merging else None,
                               torch.stack(size) if sized else None, torch.stack(coef) if use_coef else None)
        if len(set(ks)) == 1:
            return sel
        return cls(sel.keep, n, sel.assign, sel.size, sel.order, sel.coef,
                   torch.tensor(ks, dtype=torch.long, device=device))

    def emit(self, x: Tensor) -> Tensor:
        """Slot-aligned ``x [B, k, ...]`` → emitted order (what ``apply`` returns); the input itself without
        ``order``."""
        return x if self.order is None else gather_tokens(x, self.order)

    def emitted_keep(self) -> Tensor:
        """``[B, k]``: the original position each output token takes, in output order (``keep`` without ``order``)."""
        return self.emit(self.keep)

    def output_of_each_token(self) -> Tensor:
        """``[B, N]``: the output index (emitted order) each original token ends up in, -1 for dropped tokens (and
        for the unused positions behind a ragged row's padding)."""
        slot = self.assign if self.assign is not None else self._slot_of_each_token()
        if self.order is None:
            out = slot
        else:
            out_of_slot = torch.empty_like(self.order).scatter_(
                1, self.order, torch.arange(self.k, device=self.order.device).expand_as(self.order))
            out = torch.where(slot >= 0, out_of_slot.gather(1, slot.clamp_min(0)), slot)
        if self.lengths is not None:
            out = torch.where(out >= self.lengths[:, None], torch.full_like(out, -1), out)
        return out

    def token_sizes(self) -> Tensor | None:
        """``[B, k]`` sizes of the output tokens, in emitted order: the explicit ``size``, else counts from ``assign``,
        else ``None``."""
        if self.size is not None:
            return self.emit(self.size)
        if self.assign is None:
            return None
        a = self.assign
        valid = a >= 0
        out = torch.zeros(a.shape[0], self.k, device=a.device, dtype=torch.float32)
        return self.emit(out.scatter_add_(1, a.clamp_min(0), valid.to(torch.float32)))

    def kept_mask(self) -> Tensor:
        """Boolean ``[B, N]``: True at kept positions (a ragged row's padding positions are not kept)."""
        m = torch.zeros(self.batch, self.n, dtype=torch.bool, device=self.keep.device)
        if self.lengths is None:
            return m.scatter_(1, self.keep, True)
        return m.scatter_(1, self.emitted_keep(), self.valid_mask())

    def apply(self, tokens: Tensor, weights: Tensor | None = None) -> Tensor:
        """Reduce ``tokens [B, N, D]`` to ``[B, k, D]`` (in emitted order).

        Without ``assign``: gather the kept rows (bit-exact copies). With ``assign``: each output slot is
        the weighted mean of the tokens assigned to it, weights being ``weights [B, N]`` (e.g. ToMe sizes
        carried from earlier merges) or 1. Accumulates in fp32 for half-precision inputs.
        """
        self._check_tokens(tokens)
        return self._pad(self._apply(tokens, weights))

    def _pad(self, out: Tensor) -> Tensor:
        """Zero the padding outputs of a ragged selection (``out [B, k, ...]``)."""
        if self.lengths is None:
            return out
        valid = self.valid_mask().reshape(self.batch, self.k, *([1] * (out.dim() - 2)))
        return out.masked_fill(~valid, 0)

    def _apply(self, tokens: Tensor, weights: Tensor | None) -> Tensor:
        if self.assign is None:
            return gather_tokens(tokens, self.emitted_keep())
        b, n, d = tokens.shape
        a = self.assign
        if weights is not None and weights.shape != (b, n):
            raise ValueError(f"weights must have shape [B, N] = {[b, n]}, got {list(weights.shape)}")
        idx = a.clamp_min(0)
        acc = torch.float32 if tokens.dtype in (torch.float16, torch.bfloat16) else tokens.dtype
        num = torch.zeros(b, self.k, d, device=tokens.device, dtype=acc)
        if self.coef is not None:
            c = (self.coef.to(acc) * (a >= 0))[..., None]
            return self.emit(num.scatter_add_(1, idx[..., None].expand(b, n, d), tokens.to(acc) * c).to(tokens.dtype))
        w = torch.ones(b, n, device=tokens.device, dtype=acc) if weights is None else weights.to(acc)
        w = w * (a >= 0)
        num.scatter_add_(1, idx[..., None].expand(b, n, d), tokens.to(acc) * w[..., None].to(acc))
        den = torch.zeros(b, self.k, device=tokens.device, dtype=acc).scatter_add_(1, idx, w.to(acc))
        return self.emit((num / den.clamp_min(torch.finfo(acc).tiny)[..., None]).to(tokens.dtype))

    def gather(self, x: Tensor) -> Tensor:
        """Gather any per-token tensor ``x [B, N, ...]`` (positions, masks, sizes) at the kept indices, in emitted
        order (zeros at a ragged row's padding)."""
        if x.shape[:2] != (self.batch, self.n):
            raise ValueError(f"x must start with [B, N] = {[self.batch, self.n]}, got {list(x.shape)}")
        return self._pad(gather_tokens(x, self.emitted_keep()))

    def compose(self, after: Selection) -> Selection:
        """The selection equal to applying ``self`` and then ``after`` (defined on ``self``'s output, in its emitted
        order). Sizes are not carried (a merged result counts its members)."""
        if self.ragged or after.ragged:
            raise ValueError("compose needs selections with the same count in every row; a ragged selection "
                             "(per-sample lengths) cannot be composed")
        if after.n != self.k or after.batch != self.batch:
            raise ValueError(f"after must select from [B={self.batch}, N={self.k}] tokens, "
                             f"got [B={after.batch}, N={after.n}]")
        positions = self.emitted_keep().gather(1, after.emitted_keep())
        if self.assign is None and after.assign is None:
            return Selection.from_emitted(positions, self.n)
        first, second = self.output_of_each_token(), after.output_of_each_token()
        assign = torch.where(first >= 0, second.gather(1, first.clamp_min(0)), torch.full_like(first, -1))
        coef = None
        if self.coef is not None or after.coef is not None:  # linear maps compose: coefficients multiply
            c1, c2 = self._effective_coef(), after._effective_coef()
            coef = torch.where(first >= 0, c1 * c2.gather(1, first.clamp_min(0)), torch.zeros_like(c1))
        return Selection.from_emitted(positions, self.n, assign, coef=coef)

    def _effective_coef(self) -> Tensor:
        """``[B, N]`` coefficients of the unweighted ``apply``: ``coef``, else ``1 / group size`` (1 for a gather)."""
        if self.coef is not None:
            return self.coef
        slot = self.assign if self.assign is not None else self._slot_of_each_token()
        valid = slot >= 0
        count = torch.zeros(self.batch, self.k, device=slot.device).scatter_add_(1, slot.clamp_min(0), valid.float())
        return torch.where(valid, 1.0 / count.gather(1, slot.clamp_min(0)).clamp_min(1), torch.zeros_like(count[:, :1]))

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
        if self.order is not None:
            o = self.order
            ar = torch.arange(keep.shape[1], device=o.device).expand_as(keep)
            if o.shape != keep.shape or o.dtype != torch.long or not torch.equal(o.sort(1).values, ar):
                raise ValueError(f"order must be a LongTensor [B, k] = {list(keep.shape)} holding a permutation of "
                                 f"0..k-1 in every row")
        if self.coef is not None and (self.assign is None or self.coef.shape != self.assign.shape):
            raise ValueError(f"coef must have shape [B, N] = {[keep.shape[0], self.n]} and comes with assign")
        if self.lengths is not None:
            ln = self.lengths
            if ln.shape != (keep.shape[0],) or ln.dtype != torch.long:
                raise ValueError(f"lengths must be a LongTensor [B] = [{keep.shape[0]}], got {ln.dtype} "
                                 f"{list(ln.shape)}")
            if bool((ln < 1).any()) or bool((ln > self.k).any()) or int(ln.max()) != self.k:
                raise ValueError(f"lengths must lie in [1, k={self.k}] with max(lengths) == k, got {ln.tolist()}")
            if self.assign is not None:
                a = self.assign
                if self.order is not None:  # slot -> emitted output index
                    out_of_slot = torch.empty_like(self.order).scatter_(
                        1, self.order, torch.arange(self.k, device=a.device).expand_as(self.order))
                    a = torch.where(a >= 0, out_of_slot.gather(1, a.clamp_min(0)), a)
                if bool((a >= ln[:, None]).any()):
                    raise ValueError("assign must not merge tokens into a ragged row's padding outputs")
        return self
