"""Context providers of the VLM wrapper: what each context key is, where it comes from, and how it is cut per image.

``PROVIDERS`` maps every context key a wrapped model's stage can be given (``vtok.context.CONTEXT_KEYS``) to a
``Provider``. The engine (``_runtime.Runtime``) knows no key by name: for a stage it asks for the method's
``needs | uses``, installs the captures their providers name, and calls their ``cut`` per image record.

Where a key comes from:

* **before the language model** (``tower``): ``"adapter"``: the family adapter computes it from the vision tower in
  its feature hook (``ImageRecord.ctx``; only the keys ``Runtime.pre_context()`` names and its ``provides`` lists);
  ``"slot"``: the record's own ``grid`` / ``frames``, which ``select_slots`` hands on; ``"engine"``: cut by the
  engine from the input embeddings, as inside the language model (``query``).
* **inside the language model** (``llm``), its source:

  - ``"attention"``: an attention-module capture (``_attention.CAPTURES``: ``"last_row"``, the last query row,
    heads averaged; ``"head_max"`` / ``"head_mean"``, every query row, heads max- / mean-reduced; ``"keys"``, the
    RoPE'd keys) taken while the decoder layer before the stage runs (``layer="previous"``) or, for a method whose
    ``Placement.attn_layer`` is ``"own"``, by running the stage's own layer's attention on the sequence entering it
    (``layer="placement"``); none exists before layer 0 unless it is the stage's own;
  - ``"prompt"``: computed once per prompt on the language model's input embeddings (``compute``), then read by
    every stage (the text after an image keeps its order through the stages);
  - ``"history"``: the hidden states entering the layers since the previous stage (none before layer 0);
  - ``"hidden"``: the hidden states entering the stage (with the language model's final norm where it says so);
  - ``"sequence"``: the tokens' indices in their sample's unpadded sequence;
  - ``"slot"``: the slot's own patch grid (``select_slots`` hands it on; nothing to cut).

The contract of a provider: ``cut(view) -> Tensor | None`` gives the value for one record from a ``RecordView``
(its sample, its token positions, the stage's hidden states, the prompt row, the other image tokens, the stage's
captures, ...), ``None`` leaving the key out (an optional key the stage cannot have here); an ``"attention"``
provider is cut only when its capture exists, and a stage that *needs* its key raises ``missing(layer)`` otherwise.
``together``: the key is cut only when the stage asks for every key of that set too. ``keep``: the engine keeps each
record's value per stage layer (``_CallState.per_record(key)``: FitPrune's fitting reads ``self_cross_attn``).
``token_dim``: the token dimension of its per-record value, along which ``select_slots`` cuts it to the prunable
tokens (``None``: not per token).

``llm_context(layer, method)`` (what ``vtok.wrap`` checks an in-LLM stage's ``needs`` against), ``tower_keys()``
and ``TOKEN_DIM`` are derived from ``PROVIDERS``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from vtok.pruners import get as get_method


@dataclass
class RecordView:
    """What a provider reads to cut its value for one record (one image, or part of one) at one stage.

    Attributes:
        b: the record's sample.
        record: its index in ``Runtime.records``.
        positions: ``LongTensor [n]``: its tokens in the sample's current sequence.
        image_pos: ``LongTensor [m]``: every image token of the sample (this record's included).
        hidden: ``[B, L, D]``: the sequence entering the stage (before the language model: its input embeddings).
        valid: ``BoolTensor [L]``: the sample's validity row.
        prompt: ``BoolTensor [L]``: the same, the prompt only (an uncached generate step's generated tokens off).
        captures: capture name → the ``[B, ...]`` tensor this stage's attention captures left.
        history: the hidden states ``[B, L, D]`` entering the layers since the previous stage.
        norm: the language model's final norm, or ``None``.
        per_prompt: key → record → value of the ``"prompt"`` providers.
    """

    b: int
    record: int
    positions: Tensor
    image_pos: Tensor
    hidden: Tensor
    valid: Tensor
    prompt: Tensor
    captures: Mapping[str, Tensor] = field(default_factory=dict)
    history: Sequence[Tensor] = ()
    norm: Callable[[Tensor], Tensor] | None = None
    per_prompt: Mapping[str, Mapping[int, Tensor]] = field(default_factory=dict)

    @property
    def width(self) -> int:
        """``L``: the stage's sequence length (captures may hold more keys; their last ``L`` are this sequence)."""
        return self.hidden.shape[1]

    @functools.cached_property
    def text(self) -> Tensor:
        """``LongTensor [T]``: the valid prompt tokens after the image (its last token at ``positions.max()``) that
        are no image token: the instruction the image is read with."""
        after = self.prompt.clone()
        after[: int(self.positions.max()) + 1] = False
        after[self.image_pos] = False
        return after.nonzero().squeeze(1)

    @functools.cached_property
    def seq(self) -> Tensor:
        """``LongTensor [L]``: each token's index in the sample's unpadded sequence at this stage."""
        return self.valid.long().cumsum(0) - 1


Cut = Callable[[RecordView], Tensor | None]


@dataclass(frozen=True)
class Provider:
    """How one context key is given to a wrapped model's stage; see the module docstring.

    Attributes:
        key: the context key.
        what: what it holds and where it comes from (one line, for docs).
        tower: before the language model: ``"adapter"``, ``"slot"``, ``"engine"``, or ``None`` (not given there).
        llm: inside the language model: ``"attention"``, ``"prompt"``, ``"history"``, ``"hidden"``, ``"sequence"``,
            ``"slot"``, or ``None`` (not given there).
        capture: for ``llm="attention"``, the ``_attention.CAPTURES`` entry it is cut from.
        layer: which decoder layer's attention it reads: ``"previous"`` (the layer before the stage) or
            ``"placement"`` (the method's ``Placement.attn_layer``: ``"own"`` reads the stage's own layer).
        at_layer0: for the other sources, whether a stage at layer 0 has it.
        together: the key is given only when the stage asks for all of these keys too.
        keep: the engine keeps each record's value per stage layer (``_CallState.per_record``).
        token_dim: the token dimension of the per-record value (``select_slots`` cuts it to the prunable tokens).
        cut: the value for one record (``None``: left out), or ``None`` where nobody cuts it (``"slot"``,
            ``"adapter"``).
        compute: for ``llm="prompt"``, the per-record value computed once per prompt, on a view whose ``hidden`` are
            the language model's input embeddings.
    """

    key: str
    what: str
    tower: str | None = None
    llm: str | None = None
    capture: str | None = None
    layer: str = "previous"
    at_layer0: bool = True
    together: frozenset[str] = frozenset()
    keep: bool = False
    token_dim: int | None = None
    cut: Cut | None = None
    compute: Cut | None = None

    def available(self, layer: int, own: bool) -> bool:
        """Whether an in-LLM stage entering decoder layer ``layer`` can have it; ``own``: the stage's method reads its
        own layer's attention (``Placement.attn_layer == "own"``). Nothing ran before layer 0."""
        if self.llm is None:
            return False
        if layer > 0:
            return True
        if self.capture is not None:
            return own and self.layer == "placement"
        return self.at_layer0

    def attention_layer(self, layer: int, own: bool) -> int:
        """The decoder layer whose attention module its capture watches for a stage at ``layer``."""
        return layer if own and self.layer == "placement" else layer - 1

    def missing(self, layer: int) -> RuntimeError:
        """The error of a stage at ``layer`` that needs this key but whose attention capture did not run."""
        return RuntimeError(f"vtok: no attention was captured for context '{self.key}' ({self.capture}) before "
                            f"layer {layer}; the attention implementation must be 'sdpa' or 'eager'")


# ---------------------------------------------------------------------------------------------------------- cuts
def _row(v: RecordView, capture: str) -> Tensor:
    """The sample's ``[Q, K]`` attention of ``capture`` over the stage's sequence (its last ``L`` rows / columns)."""
    w = v.width
    return v.captures[capture][v.b, -w:, -w:]


def _keys(v: RecordView) -> Tensor:
    """The sample's captured keys over the stage's sequence, ``[Hk, L, dh]``."""
    return v.captures["keys"][v.b, :, -v.width:]


def _instruction_ready(v: RecordView) -> bool:
    """DART's instruction pivots need the keys and the final norm (``text_features`` / ``text_keys`` / their
    ``text_seq_index`` come together or not at all)."""
    return "keys" in v.captures and v.norm is not None


def _self_cross(v: RecordView) -> Tensor:
    """FitPrune's two scores ``[2, n]`` from the head-max attention: the attention each image token receives from
    the image's own tokens (summed, divided by their count) and from the text after the image (summed)."""
    cols = _row(v, "head_max")[:, v.positions]
    return torch.stack([cols[v.positions].sum(0) / len(v.positions), cols[v.text].sum(0)])


def _query(v: RecordView) -> Tensor:
    """The mean embedding ``[D]`` of the sample's prompt tokens that are no image token (all of its prompt when it
    has none), in fp32 and back."""
    x = v.hidden[v.b]
    m = v.prompt.clone()
    m[v.image_pos] = False
    return x[m].float().mean(0).to(x.dtype) if bool(m.any()) else x[v.prompt].mean(0)


def _text_relevance(v: RecordView) -> Tensor:
    """SparseVLM's text relevance ``[T]`` of the text after the image, from the input embeddings."""
    from vtok.pruners.sparsevlm import text_relevance

    x = v.hidden[v.b]
    return text_relevance(x[v.positions], x[v.text])


def _from_prompt(key: str) -> Cut:
    """The cut of a ``"prompt"`` provider: its value computed at the prompt, ``None`` for a record without one."""
    return lambda v: v.per_prompt.get(key, {}).get(v.record)


_INSTRUCTION = frozenset({"text_features", "text_keys"})

PROVIDERS: dict[str, Provider] = {p.key: p for p in (
    # before the language model, from the vision tower (the adapters compute them)
    Provider("cls_attn", "attention each image token receives from the tower's CLS query (or its mean received "
             "attention) at the feature layer", tower="adapter", token_dim=-1),
    Provider("mid_attn", "the same at a middle tower layer (Placement.mid_layer)", tower="adapter", token_dim=-1),
    Provider("frames", "a video record's frame count", tower="slot"),
    Provider("relevance_features", "not given by the wrapper (vtok.compress callers pass it); cut per token if an "
             "adapter's record holds it", token_dim=-2),
    # both sides
    Provider("keys", "attention keys of the image tokens: the tower's at the feature layer; in the language model "
             "layer K-1's, RoPE applied, [Hk, n, dh]", tower="adapter", llm="attention", capture="keys",
             token_dim=-2, cut=lambda v: _keys(v)[:, v.positions]),
    Provider("grid", "the record's patch grid while its tokens are all there", tower="slot", llm="slot"),
    Provider("query", "the mean embedding of the sample's non-image prompt tokens in the sequence the stage sees",
             tower="engine", llm="hidden", cut=_query),
    # inside the language model
    Provider("text_attn", "the last query row's attention to each image token, heads averaged",
             llm="attention", capture="last_row", layer="placement", token_dim=-1,
             cut=lambda v: v.captures["last_row"][v.b, -v.width:][v.positions]),
    Provider("self_cross_attn", "FitPrune's self / cross attention each image token receives, heads max-reduced",
             llm="attention", capture="head_max", keep=True, token_dim=-1, cut=_self_cross),
    Provider("text_rows_attn", "the attention rows of the text after the image to its tokens, heads averaged",
             llm="attention", capture="head_mean", token_dim=-1,
             cut=lambda v: _row(v, "head_mean")[v.text][:, v.positions]),
    Provider("text_keys", "layer K-1's keys of the text after the image", llm="attention", capture="keys",
             together=_INSTRUCTION, cut=lambda v: _keys(v)[:, v.text] if v.norm is not None else None),
    Provider("text_relevance", "SparseVLM's relevance of the text after the image, from the input embeddings",
             llm="prompt", compute=_text_relevance, cut=_from_prompt("text_relevance")),
    Provider("prev_hidden", "the image tokens' hidden states entering the layers since the previous stage",
             llm="history", at_layer0=False, token_dim=-2,
             cut=lambda v: torch.stack([h[v.b, v.positions] for h in v.history]) if v.history else None),
    Provider("features", "the image tokens' hidden states after the language model's final norm", llm="hidden",
             token_dim=-2, cut=lambda v: v.norm(v.hidden[v.b, v.positions]) if v.norm is not None else None),
    Provider("text_features", "the final-normed hidden states of the text after the image", llm="hidden",
             together=_INSTRUCTION,
             cut=lambda v: v.norm(v.hidden[v.b, v.text]) if _instruction_ready(v) else None),
    Provider("seq_index", "the image tokens' indices in the unpadded sequence", llm="sequence", token_dim=-1,
             cut=lambda v: v.seq[v.positions]),
    Provider("text_seq_index", "the same of the text after the image", llm="sequence", together=_INSTRUCTION,
             cut=lambda v: v.seq[v.text] if _instruction_ready(v) else None),
)}

TOKEN_DIM: dict[str, int] = {k: p.token_dim for k, p in PROVIDERS.items() if p.token_dim is not None}
"""The token dimension of each per-record context tensor (``select_slots`` cuts it to the prunable tokens)."""


def for_stage(wanted: frozenset[str] | set[str], llm: bool) -> list[Provider]:
    """The providers the engine runs for a stage asking for ``wanted`` (its ``needs | uses``): inside the language
    model (``llm``) every ``llm`` provider, before it the ``tower="engine"`` ones; each only with its ``together``
    keys asked for as well."""
    return [p for k, p in PROVIDERS.items() if k in wanted and p.together <= wanted
            and (p.llm is not None if llm else p.tower == "engine")]


def llm_context(layer: int, method: str) -> frozenset[str]:
    """The context keys an in-LLM stage entering decoder layer ``layer`` can give ``method`` (besides ``frames``).
    Nothing ran before layer 0, so it has no earlier hidden states, keys or attention, unless the method reads its
    own layer's attention (``Placement.attn_layer="own"``)."""
    own = layer <= 0 and get_method(method).placement.attn_layer == "own"
    return frozenset(k for k, p in PROVIDERS.items() if p.available(layer, own))


def tower_keys() -> dict[str, str]:
    """Key → who gives it before the language model (``"adapter"``, ``"slot"``, ``"engine"``)."""
    return {k: p.tower for k, p in PROVIDERS.items() if p.tower is not None}
