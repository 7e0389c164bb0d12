"""The wrapper's engine: one ``Runtime`` per wrapped model.

It overrides (per instance, never per class) the language model's ``forward`` and, for in-LLM stages, the decoder
layers' ``forward``. An adapter (``vtok/hooks/hf/<family>.py``) fills ``Runtime.records`` with each image's projected
features and vision-side context during the model's own forward; the language-model override then

* **prefill** (the cache is empty and the call carries images): runs the pre-LLM stage on the image tokens, rebuilds
  a shorter left-padded batch with its attention mask and position ids (``original`` or ``reindex``) and calls the
  language model on it; in-LLM stages do the same to the hidden states at their layer;
* **decode** (the cache holds a pruned prompt): maps the attention mask, position ids and cache positions that
  ``generate`` computed for the unpruned prompt onto the pruned one.

The engine names no context key: a stage's context comes from the providers (``vtok.hooks.hf.providers``) of its
method's ``needs | uses``. ``install`` watches the attention modules their captures name (``_attention.CAPTURES``, at
the layer each provider says), keeps the hidden states of earlier layers where a ``"history"`` provider asks, and a
prefill computes the ``"prompt"`` providers once on the input embeddings; each stage then cuts every provider per
image record from a ``RecordView``. Captures land in ``_CallState.captures`` (capture → stage layer, freed when the
stage reads them), per-prompt values in ``_CallState.per_prompt`` and the values of ``keep`` providers in
``_CallState.per_record(key)`` (per stage layer, per record).
"""

from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from vtok.budget import resolve_k
from vtok.hooks.hf import _attention
from vtok.hooks.hf._sequence import (
    Slot,
    causal_keep_mask,
    gather_positions,
    gather_seq,
    rebuild,
    reindex_1d,
    reindex_mrope,
    select_slots,
)
from vtok.hooks.hf._sequence import budgets as slot_budgets
from vtok.hooks.hf.providers import Provider, RecordView, for_stage


@dataclass
class ImageRecord:
    """One image (or one part of it, e.g. LLaVA-NeXT's base view) as the adapter saw it in this call.

    Attributes:
        n: its placeholder tokens in the prompt (a contiguous run, in prompt order).
        image: index of the image in the call (several records may share one image).
        grid: ``(h, w)`` patch grid of the record's tokens (row-major), of its prunable tokens when ``protected`` is
            set (LLaVA-NeXT: the rows without their newline), or ``None``.
        protected: ``BoolTensor [n]`` of tokens never pruned, or ``None``.
        ctx: per-token context from the vision tower (``cls_attn [n]``, ``keys [H, n, dh]``, ...).
        token: the placeholder token id of its run (a video's differs from an image's); ``None``: the adapter's first
            ``image_token_ids``.
        frames: its frame count ``T`` (``n`` tokens = ``T`` frames of ``grid`` in time order; 1 for an image), or
            ``None`` where unknown.
        video: whether it is a video (``vtok.stats`` reports it per image).
    """

    n: int
    image: int
    grid: tuple[int, int] | None = None
    protected: Tensor | None = None
    ctx: dict[str, Tensor] = field(default_factory=dict)
    token: int | None = None
    frames: int | None = None
    video: bool = False


@dataclass
class Stage:
    """One pruning step: ``layer`` ``None`` = before the language model, else before decoder layer ``layer``."""

    layer: int | None
    method: str
    keep: list[Any]  # one per sample is resolved at call time; a single value is broadcast
    options: dict[str, Any]
    needs: frozenset[str]


@dataclass
class _Stats:
    layers: list[int | None] = field(default_factory=list)
    per_sample: list[dict[str, Any]] = field(default_factory=list)
    per_image: list[dict[str, Any]] = field(default_factory=list)
    prefill_tokens_before: int = 0
    prefill_tokens_after: int = 0
    wrapper_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        before, after = self.prefill_tokens_before, self.prefill_tokens_after
        return {"layers": self.layers, "per_sample": self.per_sample, "per_image": self.per_image,
                "prefill_tokens_before": before, "prefill_tokens_after": after,
                "prefill_reduction": (1 - after / before) if before else 0.0,
                "wrapper_seconds": self.wrapper_seconds}


@dataclass
class _InLLM:
    """State of one in-LLM stage during a call."""

    valid: Tensor  # [B, L_s]
    index_lm: Tensor  # [B, L_s] position in the language model's input sequence (-1 padding)
    mask_prefill: Any = None
    cos_sin: dict[tuple[str, int], tuple[Tensor, ...]] = field(default_factory=dict)  # gathered RoPE tables


@dataclass
class _CallState:
    """What a prefill leaves for the decode steps of the same generation."""

    prompt_len: int  # the unpruned prompt length the caller's masks count
    valid: Tensor  # [B, L'] the pruned prompt's validity (what the cache holds), pre-LLM
    next_pos: Tensor  # [B] the position id of the first generated token
    seen: int = 0  # tokens appended after the prompt so far
    slots: list[list[Slot]] = field(default_factory=list)
    x_len: int = 0  # the language model's input length in this prefill (after the pre-LLM stage)
    index_prompt: Tensor | None = None  # [B, L'] prompt position of each language-model input token (-1 padding)
    inllm: dict[int, _InLLM] = field(default_factory=dict)
    phase: str = "prefill"
    pre: bool = False
    history: list[Tensor] = field(default_factory=list)  # [B, L, D] entering each layer since the last stage
    captures: dict[str, dict[int, Tensor]] = field(default_factory=dict)  # capture -> stage layer -> [B, ...]
    per_prompt: dict[str, dict[int, Tensor]] = field(default_factory=dict)  # "prompt" provider -> record -> value
    kept: dict[str, dict[int, dict[int, Tensor]]] = field(default_factory=dict)  # key -> stage layer -> record
    probing: bool = False  # a layer's own attention is being run for a stage's captures, not for its output
    slots_in: list[list[Slot]] = field(default_factory=list)
    valid_in: Tensor | None = None
    tail: int = 0  # generate(use_cache=False): the tokens generated so far, at the end of every row (never scored)

    def per_record(self, key: str) -> dict[int, dict[int, Tensor]]:
        """Per stage layer, per record, the value of ``key`` its stage was given in this prefill, for the providers
        that keep theirs (``Provider.keep``); empty for any other key."""
        return self.kept.get(key, {})


def _prompt_only(valid: Tensor, tail: int) -> Tensor:
    """``valid [B, L]`` without its last ``tail`` columns: the prompt of an uncached ``generate`` step, whose
    generated tokens sit at the end of every row (left padding) and must not change what a stage scores."""
    if not tail:
        return valid
    out = valid.clone()
    out[:, valid.shape[1] - tail:] = False
    return out


class Runtime:
    """Holds the overrides of one wrapped model; see the module docstring."""

    def __init__(self, model: torch.nn.Module, adapter: Any, stages: list[Stage], positions: str,
                 method: Any, keep: Any, decode_kv: str = "stage") -> None:
        self.model, self.adapter, self.stages, self.positions = model, adapter, stages, positions
        self.method, self.keep = method, keep
        self.lm = adapter.language_model(model)
        self.inner = adapter.inner(model)
        self.records: list[ImageRecord] = []
        self.wrapper_s = 0.0  # the wrapper's own time (context, strategy, bookkeeping) since the last prefill's stats
        self.input_ids: Tensor | None = None
        self.state: _CallState | None = None
        self.generate_prompt: int | None = None  # set by the wrapped generate(): the prompt's length
        self.label_index: Tensor | None = None  # [B, L'] prompt column of each output position of this call (-1 pad)
        self.stats = _Stats()
        self.adapter_state: dict[str, Any] = {}  # free for the adapter's hooks (per wrapped model)
        self._undo: list[Any] = []
        self._orig_lm_forward = self.lm.forward
        self.pre = next((s for s in stages if s.layer is None), None)
        self.inllm = [s for s in stages if s.layer is not None]
        # MustDrop's decode stage: after the prefill, layers from the first stage's attention layer up to the last
        # stage keep only the final visual tokens in their KV cache
        self.retro = range(max(self.inllm[0].layer - 1, 0), self.inllm[-1].layer) \
            if decode_kv == "final" and self.inllm else range(0)
        # the providers of each stage's context (per in-LLM stage layer; the pre-LLM stage's under None)
        self._providers: dict[int | None, list[Provider]] = {
            s.layer: for_stage(s.needs | self._uses(s), s.layer is not None) for s in stages}
        self._plan = self._capture_plan()
        self._probes = {ly for reqs in self._plan.values() for ly, _, probe in reqs if probe}
        # the stages that read the hidden states of the layers before them ("history" providers)
        self._history = [s.layer for s in self.inllm if any(p.llm == "history" for p in self._providers[s.layer])]

    def _capture_plan(self) -> dict[int, list[tuple[int, frozenset[str], bool]]]:
        """Per decoder layer whose attention module is watched: ``(stage layer, captures, own layer)`` of every stage
        whose providers read it; ``own layer``: captured only while the stage's own attention is probed on the
        sequence entering it (``Placement.attn_layer == "own"``). Captures before layer 0 do not exist."""
        plan: dict[int, list[tuple[int, frozenset[str], bool]]] = {}
        for s in self.inllm:
            own = self._own_attention(s)
            per_layer: dict[int, set[str]] = {}
            for p in self._providers[s.layer]:
                at = p.attention_layer(s.layer, own)
                if p.capture is not None and at >= 0:
                    per_layer.setdefault(at, set()).add(p.capture)
            for at, names in per_layer.items():
                plan.setdefault(at, []).append((s.layer, frozenset(names), at == s.layer))
        return plan

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        self._undo.append(self.inner.register_forward_pre_hook(self._on_call, with_kwargs=True))
        self.lm.forward = self._lm_forward
        self._undo.append(lambda: delattr(self.lm, "forward"))
        self._undo.extend(self.adapter.install(self.model, self))
        if self.inllm:
            layers = self.adapter.decoder_layers(self.model)
            first = min(s.layer for s in self.inllm)
            for i, layer in enumerate(layers):
                if i >= first or self._history or i in self.retro:
                    orig = layer.forward
                    layer.forward = self._make_layer_forward(i, orig)
                    self._undo.append(lambda layer=layer: delattr(layer, "forward"))
            for at, requests in self._plan.items():
                attn = self.adapter.self_attention(layers[at])
                _attention.watch(attn, self._make_attn_capture(requests))
                self._undo.append(lambda attn=attn: _attention.unwatch(attn))

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo.remove() if hasattr(undo, "remove") else undo()
        self._undo.clear()

    # ------------------------------------------------------------------ per call
    def add_records(self, output: Any, records: list[ImageRecord]) -> None:
        """Called by the adapter's feature hook: ``records`` describe ``output`` (the encoder's return value), which
        may come back later as precomputed ``mm_encoder_outputs`` (``generate`` encodes images before prefill)."""
        base = max((r.image for r in self.records), default=-1) + 1
        for r in records:
            r.image += base
        self.records.extend(records)
        with contextlib.suppress(Exception):
            object.__setattr__(output, "_vtok_records", records)

    def _on_call(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.input_ids = ids
        self.records = []
        self.label_index = None
        pre = kwargs.get("mm_encoder_outputs") or {}
        for key in ("image", "video"):
            out = pre.get(key) if isinstance(pre, dict) else None
            if out is not None:
                recs = getattr(out, "_vtok_records", None)
                if recs is None:
                    raise ValueError("vtok: precomputed mm_encoder_outputs must come from the wrapped model's own "
                                     "get_image_features (vtok needs its per-image records)")
                self.records.extend(recs)
        return None

    def _cache_len(self, kw: dict[str, Any]) -> int:
        cache = kw.get("cache", kw.get("past_key_values"))
        if cache is None or not hasattr(cache, "get_seq_length"):
            return 0
        return int(cache.get_seq_length())

    def _lm_forward(self, *args, **kw):
        if args:
            names = list(inspect.signature(self._orig_lm_forward).parameters)
            kw.update(dict(zip(names, args, strict=False)))
        self.adapter.lm_inputs(self.model, self, kw)
        if self._cache_len(kw) == 0:
            self.state = None
            if not self.records:
                return self._orig_lm_forward(**kw)
            return self._prefill(kw)
        if self.state is None or self.records:
            if self.records:
                raise NotImplementedError("vtok: images in a call that continues a cache (multi-turn with new "
                                          "images) are not supported by the wrapper; start from an empty cache")
            return self._orig_lm_forward(**kw)
        return self._decode(kw)

    # ------------------------------------------------------------------ prefill
    def _slots(self, valid: Tensor) -> list[list[Slot]]:
        ids = self.input_ids
        if ids is None:
            raise NotImplementedError("vtok: the wrapped model needs input_ids (with image placeholder tokens) when it "
                                      "is given images; inputs_embeds alone are not supported")
        self.adapter.group_records(self.model, self.records, ids)  # parts of one image share its budget
        kinds = self.adapter.image_token_ids(self.model)
        queues: dict[int, list[int]] = {t: [] for t in kinds}  # per placeholder id, its records in call order
        for i, rec in enumerate(self.records):
            tok = kinds[0] if rec.token is None else rec.token
            if tok not in queues:
                raise RuntimeError(f"vtok: a record's placeholder token {tok} is not one of {kinds}")
            queues[tok].append(i)
        heads = dict.fromkeys(kinds, 0)
        slots: list[list[Slot]] = []
        for b in range(ids.shape[0]):
            row = []
            for tok in kinds:
                pos = ((ids[b] == tok) & valid[b]).nonzero().squeeze(1)
                used = 0
                while used < len(pos):
                    if heads[tok] >= len(queues[tok]):
                        raise RuntimeError(f"vtok: sample {b} has {len(pos)} placeholder tokens {tok} but the "
                                           "features of its images / videos run out")
                    r = queues[tok][heads[tok]]
                    rec = self.records[r]
                    p = pos[used:used + rec.n]
                    n_free = rec.n - (0 if rec.protected is None else int(rec.protected.sum()))
                    row.append(Slot(r, p, rec.protected, rec.grid, n_free, rec.frames))
                    used += rec.n
                    heads[tok] += 1
                if used != len(pos):
                    raise RuntimeError(f"vtok: sample {b}'s placeholder tokens {tok} do not match its images' / "
                                       "videos' feature counts")
            row.sort(key=lambda sl: int(sl.positions[0]))
            slots.append(row)
        if any(heads[t] != len(queues[t]) for t in kinds):
            raise RuntimeError(f"vtok: {len(self.records)} image / video records but only {sum(heads.values())} "
                               "matched placeholder runs")
        return slots

    def _image_of(self) -> list[int]:
        """Per record of this call, its image (budgets are per image; LLaVA-NeXT splits one into two records)."""
        return [r.image for r in self.records]

    def _keeps(self, stage: Stage, b_sz: int) -> list[Any]:
        if len(stage.keep) == 1:
            return stage.keep * b_sz
        if len(stage.keep) != b_sz:
            raise ValueError(f"keep has {len(stage.keep)} per-sample values but the batch has {b_sz} samples")
        return stage.keep

    def _ctx(self, stage: Stage, x: Tensor, valid: Tensor, prompt: Tensor, slots: list[list[Slot]],
             captures: dict[str, Tensor] | None = None) -> dict[int, dict[str, Any]]:
        """Per record, the context ``stage`` reads: before the language model the adapter's (``ImageRecord.ctx``),
        and every provider of the stage (``self._providers``) cut from a ``RecordView`` of ``x [B, L, D]`` (the
        sequence the stage sees), ``valid [B, L]``, ``prompt [B, L]`` (``_prompt_only``) and ``captures`` (capture
        → ``[B, ...]``); an ``"attention"`` provider only where its capture exists, a ``keep`` one kept."""
        wanted = stage.needs | self._uses(stage)
        providers = [p for p in self._providers[stage.layer] if p.capture is None or p.capture in (captures or {})]
        st = self.state if stage.layer is not None else None  # a pre-LLM stage runs before the call's state exists
        norm = getattr(self.lm, "norm", None)
        ctx: dict[int, dict[str, Any]] = {}
        for b, row in enumerate(slots):
            image_pos = torch.cat([s.positions for s in row]) if row else None
            for s in row:
                c = {k: v for k, v in self.records[s.record].ctx.items() if k in wanted} if stage.layer is None \
                    else {}
                view = RecordView(b, s.record, s.positions, image_pos, x, valid[b], prompt[b], captures or {},
                                  st.history if st is not None else (), norm,
                                  st.per_prompt if st is not None else {})
                for p in providers:
                    value = p.cut(view)
                    if value is None:
                        continue
                    c[p.key] = value
                    if p.keep and st is not None:
                        st.kept.setdefault(p.key, {}).setdefault(stage.layer, {})[s.record] = value
                ctx[s.record] = c
        return ctx

    def _uses(self, stage: Stage) -> frozenset[str]:
        from vtok.pruners import get

        return get(stage.method).uses

    def pre_context(self) -> frozenset[str]:
        """The context keys the pre-LLM stage reads (its ``needs`` and optional ``uses``); empty without one. An
        adapter's feature hook computes only these (public engine API for adapters)."""
        return self.pre.needs | self._uses(self.pre) if self.pre is not None else frozenset()

    def _prefill(self, kw: dict[str, Any]):
        t0 = time.perf_counter()
        kw = self._prefill_inputs(kw)
        self.adapter.prefill_inputs(self.model, self, kw, self.state.index_prompt)
        self.wrapper_s += time.perf_counter() - t0
        out = self._orig_lm_forward(**kw)
        t0 = time.perf_counter()
        st = self.state
        if self.retro and st.inllm:
            cache = kw.get("cache", kw.get("past_key_values"))
            if cache is None and hasattr(out, "get"):  # created by the model (a forward with use_cache)
                cache = out.get("cache", out.get("past_key_values"))
            self._prune_cache(cache, st)
        self.label_index = self._final_index(st, st.valid_in)
        if not st.tail:  # an uncached generate step keeps the stats of its prompt (the first step)
            self._record_stats(st.slots_in, st, st.valid_in)
        if self.state is st:
            st.phase = "decode"
        self.wrapper_s = 0.0
        self.stats.wrapper_seconds += time.perf_counter() - t0
        return out

    def _prune_cache(self, cache: Any, st: _CallState) -> None:
        """MustDrop's decode stage: the KV cache of every layer in ``self.retro`` (which holds the sequence of the
        stage before it) keeps only the tokens the last stage kept, in the last stage's (left-padded) layout. For a
        merging stage a merged token's place takes its representative's cached keys / values."""
        if cache is None or not hasattr(cache, "layers"):
            return
        last = st.inllm[max(st.inllm)]
        index: dict[int | None, Tensor] = {}  # per source stage (layers of one stage share it)
        for i in self.retro:
            j = self._stage_at(i)
            if j not in index:
                src = st.inllm[j].index_lm if j is not None else torch.arange(
                    st.valid.shape[1], device=st.valid.device).expand_as(st.valid)
                # position in layer i's sequence of each final token: match their language-model input indices
                hit = (last.index_lm[:, :, None] == src[:, None, :]) & (last.index_lm[:, :, None] >= 0)
                index[j] = hit.float().argmax(-1)  # [B, L_final]; padding → 0 (masked in decode)
            idx = index[j]
            layer = cache.layers[i]
            for name in ("keys", "values"):
                t = getattr(layer, name)
                setattr(layer, name, t.gather(2, idx[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])))

    def _prefill_inputs(self, kw: dict[str, Any]) -> dict[str, Any]:
        x = kw.get("inputs_embeds")
        if x is None:
            ids = kw.pop("input_ids")
            x = self.lm.get_input_embeddings()(ids)
            kw["inputs_embeds"] = x
        kw.pop("input_ids", None)
        b_sz, p_len, _ = x.shape
        am = kw.get("attention_mask")
        if am is not None and (not isinstance(am, Tensor) or am.dim() != 2):
            raise NotImplementedError("vtok: the wrapper needs a 2-D attention_mask [B, L] (or none)")
        valid = am.bool() if am is not None else torch.ones(b_sz, p_len, dtype=torch.bool, device=x.device)
        slots = self._slots(valid)
        tail = p_len - self.generate_prompt if self.generate_prompt is not None else 0
        st = _CallState(prompt_len=p_len, valid=valid, next_pos=torch.zeros(b_sz, dtype=torch.long),
                        slots=slots, x_len=p_len, tail=max(tail, 0))
        pos_in = kw.get("position_ids")
        if self.pre is not None:
            ks = slot_budgets(slots, self._keeps(self.pre, b_sz), resolve_k, self._image_of())
            if any(k != n for row_k, row in zip(ks, slots, strict=True) for k, n in
                   zip(row_k, [len(s.positions) - (0 if s.protected is None else int(s.protected.sum()))
                               for s in row], strict=True)):
                picked = select_slots(x, slots, ks, self.pre.method, self.pre.options,
                                      self._ctx(self.pre, x, valid, _prompt_only(valid, st.tail), slots))
                res = rebuild(x, valid, slots, picked)
                full = pos_in if pos_in is not None else reindex_1d(valid)
                if self.positions == "original":
                    pos = gather_positions(full, res.index)
                elif full.dim() == 3 and full.shape[0] in (3, 4):
                    f3 = full[-3:].expand(3, *valid.shape)
                    starts = [{sl.record: int(f3[:, b, sl.positions].min()) for sl in row}
                              for b, row in enumerate(slots)]
                    rope = reindex_mrope(full[-3:], res.index, res.valid, res.slots, starts)
                    pos = rope if full.shape[0] == 3 else torch.cat([reindex_1d(res.valid)[None], rope])
                else:
                    pos = reindex_1d(res.valid)
                pos = pos * res.valid  # padding → 0 (broadcast over leading dims)
                kw["inputs_embeds"] = res.x
                kw["attention_mask"] = res.valid.to(am.dtype if am is not None else torch.long)
                kw["position_ids"] = pos
                if "cache_position" in kw:
                    kw["cache_position"] = torch.arange(res.x.shape[1], device=x.device)
                st.valid, st.slots, st.x_len, st.pre = res.valid, res.slots, res.x.shape[1], True
                st.index_prompt = res.index
                if self.positions == "original":  # decoding continues after the unpruned prompt
                    src = full.expand(full.shape[:-2] + valid.shape)
                    src = src if src.dim() == 2 else src[-3:].amax(0)
                    st.next_pos = src.masked_fill(~valid, -1).amax(-1) + 1
                else:
                    pos3 = pos if pos.dim() == 2 else pos[-3:].amax(0)
                    st.next_pos = pos3.masked_fill(~res.valid, -1).amax(-1) + 1
        st.slots_in, st.valid_in = slots, valid
        self._per_prompt(st, kw["inputs_embeds"])
        self.state = st
        return kw

    def _per_prompt(self, st: _CallState, x: Tensor) -> None:
        """The ``"prompt"`` providers of the in-LLM stages, once per prompt on the language model's input embeddings
        ``x [B, L, D]`` (the text after each image keeps its order through every later stage)."""
        providers = {p.key: p for s in self.inllm for p in self._providers[s.layer] if p.llm == "prompt"}
        if not providers:
            return
        prompt = _prompt_only(st.valid, st.tail)
        for b, row in enumerate(st.slots):
            image_pos = torch.cat([s.positions for s in row]) if row else None
            for s in row:
                view = RecordView(b, s.record, s.positions, image_pos, x, st.valid[b], prompt[b])
                for key, p in providers.items():
                    st.per_prompt.setdefault(key, {})[s.record] = p.compute(view)

    # ------------------------------------------------------------------ decode
    def _decode(self, kw: dict[str, Any]):
        st = self.state
        x = kw.get("inputs_embeds")
        q = x.shape[1] if x is not None else kw["input_ids"].shape[1]
        if st.pre:
            am = kw.get("attention_mask")
            if am is not None:
                if not isinstance(am, Tensor) or am.dim() != 2:
                    raise NotImplementedError("vtok: the wrapper needs a 2-D attention_mask [B, L] (or none)")
                tail = am[:, st.prompt_len:]
                if tail.shape[1] != st.seen + q:
                    raise RuntimeError(f"vtok: attention_mask has {am.shape[1]} columns, expected prompt "
                                       f"{st.prompt_len} + {st.seen + q} generated")
                kw["attention_mask"] = torch.cat([st.valid.to(am.dtype), tail], dim=1)
            elif not bool(st.valid.all()):
                ones = torch.ones(st.valid.shape[0], st.seen + q, dtype=torch.long, device=st.valid.device)
                kw["attention_mask"] = torch.cat([st.valid.long(), ones], dim=1)
            pos = st.next_pos[:, None].to(st.valid.device) + st.seen + torch.arange(q, device=st.valid.device)
            pos_in = kw.get("position_ids")
            if pos_in is not None and pos_in.dim() == 3:
                pos = pos[None].expand(pos_in.shape[0], -1, -1)
            kw["position_ids"] = pos
            if "cache_position" in kw:
                kw["cache_position"] = torch.arange(st.x_len + st.seen, st.x_len + st.seen + q,
                                                    device=st.valid.device)
        out = self._orig_lm_forward(**kw)
        st.seen += q
        return out

    # ------------------------------------------------------------------ in-LLM stages
    def _make_attn_capture(self, requests: list[tuple[int, frozenset[str], bool]]):
        """The callback of one watched attention module: for each ``(stage layer, captures, own layer)`` request
        (``_capture_plan``), the named ``_attention.CAPTURES`` of this prefill's call into ``state.captures``; an
        ``own layer`` request only while the stage's own attention is probed."""
        def cb(query, key, mask, scaling, module):
            st = self.state
            if st is None or st.phase != "prefill" or query.shape[2] < 2:
                return
            todo = [(layer, names) for layer, names, own in requests if st.probing or not own]
            if not todo:
                return
            if st.tail:  # an uncached generate step: score as its prompt alone (causal: the same rows)
                t = st.tail
                query, key = query[:, :, :-t], key[:, :, :-t]
                mask = mask[..., :-t, :-t] if isinstance(mask, Tensor) else mask
            done: dict[str, Tensor] = {}
            for layer, names in todo:
                for name in names:
                    if name not in done:
                        done[name] = _attention.CAPTURES[name](query, key, mask, scaling)
                    st.captures.setdefault(name, {})[layer] = done[name]

        return cb

    @staticmethod
    def _own_attention(stage: Stage) -> bool:
        from vtok.pruners import get

        return get(stage.method).placement.attn_layer == "own"

    def _probe_own_attention(self, i: int, j: int, hidden: Tensor, kw: dict[str, Any]) -> None:
        """The captures a stage at layer ``i`` reads from layer ``i`` itself (``Placement.attn_layer == "own"``): its
        attention module run once on ``input_layernorm(hidden)`` (the sequence entering the layer, so with the
        previous stage's mask and positions) without a KV cache, while the capture callback records. Costs one extra
        attention of that layer."""
        layer = self.adapter.decoder_layers(self.model)[i]
        norm = getattr(layer, "input_layernorm", None)
        if norm is None:
            raise NotImplementedError(f"vtok: {type(layer).__name__} has no input_layernorm; methods reading a "
                                      "layer's own attention need one")
        no_cache = ("cache", "past_key_value", "past_key_values", "layer_past", "use_cache", "output_attentions")
        probe_kw = {k: v for k, v in kw.items() if k not in no_cache}  # never writes the KV cache
        if j > 0:
            self._adjust_kwargs(j - 1, self.state, probe_kw, hidden)
        st = self.state
        st.probing = True
        try:
            # the class's forward, not the instance's __call__ / forward: transformers' output_attentions recorder
            # (module hooks in 5.x, an instance-level forward wrapper in 4.x) must not see the probe
            attn = self.adapter.self_attention(layer)
            type(attn).forward(attn, hidden_states=norm(hidden), **self.adapter.attention_kwargs(layer, probe_kw))
        finally:
            st.probing = False

    def _stage_at(self, i: int) -> int | None:
        k = None
        for j, s in enumerate(self.inllm):
            if s.layer <= i:
                k = j
        return k

    def _make_layer_forward(self, i: int, orig):
        def forward(*args, **kw):
            st = self.state
            if st is None:
                return orig(*args, **kw)
            if args:
                hidden, args = args[0], args[1:]
            else:
                hidden = kw.pop("hidden_states")
            j = self._stage_at(i)
            if st.phase == "decode" and i in self.retro and st.inllm:
                j = max(st.inllm)  # its cache now holds the final tokens
            if st.phase == "prefill":
                if any(ly > i for ly in self._history):
                    st.history.append(hidden)
                if j is not None and self.inllm[j].layer == i:
                    t0 = time.perf_counter()
                    if i in self._probes:
                        self._probe_own_attention(i, j, hidden, kw)
                    hidden = self._apply_stage(j, hidden)
                    self.wrapper_s += time.perf_counter() - t0
                    st.history = []
            if j is not None:
                self._adjust_kwargs(j, st, kw, hidden)
            return orig(hidden, *args, **kw)

        return forward

    def _apply_stage(self, j: int, hidden: Tensor) -> Tensor:
        st = self.state
        stage = self.inllm[j]
        prev = st.inllm.get(j - 1)
        valid = prev.valid if prev is not None else st.valid
        prompt = _prompt_only(valid, st.tail)  # what the stage scores
        index_lm = prev.index_lm if prev is not None else torch.arange(hidden.shape[1], device=hidden.device
                                                                       ).expand(hidden.shape[0], -1)
        slots = st.slots
        b_sz = hidden.shape[0]
        ks = slot_budgets(slots, self._keeps(stage, b_sz), resolve_k, self._image_of())
        captures: dict[str, Tensor] = {}  # capture -> [B, ...]: read once, freed with this stage
        for p in self._providers[stage.layer]:
            if p.capture is None:
                continue
            got = st.captures.get(p.capture, {}).pop(stage.layer, None)
            if got is not None:
                captures[p.capture] = got
            if p.capture not in captures and p.key in stage.needs:
                raise p.missing(stage.layer)
        picked = select_slots(hidden, slots, ks, stage.method, stage.options,
                              self._ctx(stage, hidden, valid, prompt, slots, captures))
        res = rebuild(hidden, valid, slots, picked)
        new_index_lm = torch.where(res.index >= 0, index_lm.gather(1, res.index.clamp_min(0)),
                                   torch.full_like(res.index, -1))
        st.inllm[j] = _InLLM(res.valid, new_index_lm)
        st.slots = res.slots
        return res.x

    def _adjust_kwargs(self, j: int, st: _CallState, kw: dict[str, Any], hidden: Tensor) -> None:
        s = st.inllm.get(j)
        if s is None:
            return
        mask_in = kw.get("attention_mask")
        fmt = None if mask_in is None else mask_in.dtype
        eager = self.adapter.attn_implementation(self.model) == "eager"
        if eager and fmt is None:
            fmt = hidden.dtype
        if st.phase == "prefill":
            if s.mask_prefill is None:
                # SDPA without padding: no mask, so it runs its is_causal path; eager always needs the causal mask
                full = not eager and bool(s.valid.all())
                s.mask_prefill = None if full else causal_keep_mask(s.valid, s.valid.shape[1], fmt)
                s.mask_prefill = self.adapter.stage_mask(self.model, self, s.mask_prefill, s.valid, s.index_lm, fmt)
            kw["attention_mask"] = s.mask_prefill
            for name in self.adapter.rope_kwargs(self.model):  # per layer: tables may differ between layers
                pe = kw.get(name)
                if pe is not None:
                    key = (name, id(pe[0]))
                    if key not in s.cos_sin:
                        s.cos_sin[key] = tuple(gather_seq(t, s.index_lm) for t in pe)
                    kw[name] = s.cos_sin[key]
            if isinstance(kw.get("position_ids"), Tensor):
                kw["position_ids"] = gather_positions(kw["position_ids"], s.index_lm)
            if "cache_position" in kw:
                kw["cache_position"] = torch.arange(s.valid.shape[1], device=hidden.device)
        else:
            q = hidden.shape[1]
            keys = torch.cat([s.valid, torch.ones(s.valid.shape[0], st.seen + q, dtype=torch.bool,
                                                  device=s.valid.device)], dim=1)
            if not bool(keys.all()) or (eager and q > 1):
                kw["attention_mask"] = causal_keep_mask(keys, q, fmt)
            elif mask_in is not None:
                kw["attention_mask"] = None  # the caller's mask counts the unpruned keys; nothing is masked here
            if "cache_position" in kw:
                n = s.valid.shape[1] + st.seen
                kw["cache_position"] = torch.arange(n, n + q, device=hidden.device)

    # ------------------------------------------------------------------ stats
    @staticmethod
    def _final_index(st: _CallState, valid: Tensor) -> Tensor:
        """``[B, L_out]``: the prompt column (``input_ids``) of each position the last stage leaves (its logits'
        positions; a merged token: its representative's column), -1 for padding."""
        idx = st.index_prompt
        if idx is None:
            idx = torch.where(valid, torch.arange(valid.shape[1], device=valid.device), -1)
        if st.inllm:
            last = st.inllm[max(st.inllm)].index_lm
            idx = torch.where(last >= 0, idx.gather(1, last.clamp_min(0)), -1)
        return idx

    def prune_labels(self, labels: Tensor, n_out: int, ignore_index: int = -100) -> Tensor:
        """``labels [B, L]`` (the ``input_ids`` layout) for this call's pruned sequence ``[B, L_out]``: each kept
        position takes its column's label (a merged token its representative's), padding ``ignore_index``; the loss
        is then the model's own over the pruned sequence. A call that pruned nothing gets ``labels`` back."""
        idx = self.label_index
        if idx is None:
            return labels
        st = self.state
        if not isinstance(labels, Tensor) or labels.shape != (idx.shape[0], st.prompt_len):
            got = list(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"vtok: labels must have the shape of input_ids {[idx.shape[0], st.prompt_len]} (they "
                             f"are pruned with the visual tokens), got {got}")
        if idx.shape[1] != n_out:
            raise ValueError(f"vtok: labels need logits for every position of the pruned sequence ({idx.shape[1]}), "
                             f"got {n_out}; leave logits_to_keep at 0")
        idx = idx.to(labels.device)
        return labels.gather(1, idx.clamp_min(0)).masked_fill(idx < 0, ignore_index)

    def _record_stats(self, slots_before: list[list[Slot]], st: _CallState, valid: Tensor) -> None:
        """Visual tokens before / after every stage, per sample and per image (``vtok.stats``)."""
        after = {s.record: len(s.positions) for row in st.slots for s in row}
        idx = self.label_index if self.label_index is not None else self._final_index(st, valid)
        per_sample, per_image = [], {}
        for b, row in enumerate(slots_before):
            vb = sum(len(s.positions) for s in row)
            va = sum(after.get(s.record, len(s.positions)) for s in row)
            n = int(valid[b].sum())
            per_sample.append({"visual_before": vb, "visual_after": va, "prompt_tokens_before": n,
                               "prompt_tokens_after": n - vb + va, "kept": idx[b][idx[b] >= 0].tolist()})
            for s in row:
                rec = self.records[s.record]
                agg = per_image.setdefault(rec.image, {"sample": b, "video": rec.video, "before": 0, "after": 0,
                                                       "protected": 0})
                agg["before"] += len(s.positions)
                agg["after"] += after.get(s.record, len(s.positions))
                agg["protected"] += 0 if rec.protected is None else int(rec.protected.sum())
        self.stats = _Stats(layers=[s.layer for s in self.stages], per_sample=per_sample,
                            wrapper_seconds=self.wrapper_s,
                            per_image=[{"image": i, **v} for i, v in sorted(per_image.items())],
                            prefill_tokens_before=sum(d["prompt_tokens_before"] for d in per_sample),
                            prefill_tokens_after=sum(d["prompt_tokens_after"] for d in per_sample))
