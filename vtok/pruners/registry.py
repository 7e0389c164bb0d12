"""Registry of strategies: ``@register("name", family=..., needs=..., paper=...)``.

Every strategy is a pure function ``fn(tokens [B, N, D], k: int, ctx: Context, **options) -> Selection``.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vtok.context import CONTEXT_KEYS
from vtok.selection import Selection

_PACKAGE = Path(__file__).resolve().parents[1]  # the vtok package folder

FAMILIES = ("baseline", "attention", "transition", "diversity", "clustering", "temporal", "ordered")

Strategy = Callable[..., Selection]
Fewest = Callable[..., int]
"""``fewest(n, ctx, **options) -> int``: the fewest tokens a method can return from ``n`` (``ctx`` a mapping of its
context, e.g. ``{"grid": (14, 14)}``; ``options`` the method's options, defaults filled in)."""


@dataclass(frozen=True)
class Placement:
    """Where a strategy's paper / code applies it inside a ViT encoder and which attention it reads; ``vtok.patch``
    uses it for its defaults (the user can override each).

    Attributes:
        layer: default block (negative counts from the end); ``None``: the middle block ``depth // 2``.
        at: ``"attention"`` (between the block's attention and its MLP, ToMe / EViT) or ``"output"`` (on the block's
            output, as methods that read a layer's hidden states do, e.g. VisionZip at layer −2).
        score_rows: the query rows behind ``cls_attn`` / ``mid_attn``: ``"cls"`` (the CLS row; mean received attention
            for encoders without CLS) or ``"all"`` (attention received, averaged over heads and all query rows).
        mid_layer: the block ``mid_attn`` is read from, as a fraction of the depth (``floor(mid_layer · depth)``);
            ``None``: the pruning block itself.
        prop_attn: whether later blocks add ``log(size)`` to their attention logits once this method merged tokens
            (ToMe's proportional attention); ``False`` where the authors' code does not (VisionZip).
        positions: in a wrapped VLM (``vtok.wrap``), the position ids of a pre-LLM stage as the method's reference
            code gives them: ``"reindex"`` (the image-feature sequence is simply shortened, most pre-LLM methods) or
            ``"original"`` (kept tokens keep their unpruned position ids, FastV).
        attn_layer: in a wrapped VLM, which decoder layer's attention an in-LLM stage at layer ``K`` reads as
            ``text_attn``: ``"previous"`` (layer ``K − 1``'s, captured while it ran: FastV) or ``"own"`` (layer ``K``'s
            own queries / keys on its input, computed before it runs: PyramidDrop).
        decode_kv: in a wrapped VLM, what the KV cache of the layers between in-LLM stages holds while decoding:
            ``"stage"`` (the tokens each layer computed on) or ``"final"`` (only the last stage's tokens from the first
            stage's attention layer on: MustDrop's decode stage).
        resize_input: in a wrapped VLM whose vision tower takes any resolution (Qwen2-VL / Qwen2.5-VL), the image
            is resized *before* the tower so that the tower itself yields the method's pooled grid (``downsample``);
            towers of fixed resolution and plain tensors get the method's own (pooling) selection instead.
        llm_only: for a method defined on the language model's own state, why (``vtok.wrap`` refuses it before the
            language model, ``layer=None``, where it would silently read the vision tower's instead); ``None``: it
            may run there.
    """

    layer: int | None = None
    at: str = "attention"
    score_rows: str = "cls"
    mid_layer: float | None = None
    prop_attn: bool = True
    positions: str = "reindex"
    attn_layer: str = "previous"
    resize_input: bool = False
    decode_kv: str = "stage"
    llm_only: str | None = None


@dataclass(frozen=True)
class Method:
    """One registered strategy and what it declares about itself."""

    name: str
    fn: Strategy = field(repr=False)
    family: str
    needs: frozenset[str]
    uses: frozenset[str]
    paper: str
    merges: bool
    summary: str
    options: dict[str, object]
    placement: Placement = field(default_factory=Placement)
    fewest_fn: Fewest | None = field(default=None, repr=False)
    ragged: bool = False
    """Whether it picks its own count per sample (a ragged ``Selection`` with ``lengths``; ``keep`` is then a mean
    budget or a cap, see the method); such a method runs through ``vtok.compress``, not inside an encoder or VLM."""

    def __call__(self, *args, **kwargs) -> Selection:
        return self.fn(*args, **kwargs)

    def fewest(self, n: int, ctx: Mapping[str, object] | None = None, **options: object) -> int:
        """The fewest tokens this method can return from ``n`` with this context and these options: 1 for most
        methods; a budget floor for methods that cannot go lower by construction (``mustdrop``: every block merged;
        ``sparsevlm``: every token recycled). A fixed budget below it raises ``ValueError``."""
        if self.fewest_fn is None:
            return 1
        return int(self.fewest_fn(n, dict(ctx or {}), **{**self.options, **options}))

    @property
    def source(self) -> str | None:
        """The file that defines this method's function: ``"vtok/pruners/<name>.py"`` (a variant ``<base>_<suffix>``:
        ``<base>.py``) for vtok's own methods, relative to the folder holding the package; the absolute path for a
        method registered elsewhere; ``None`` where Python cannot tell (e.g. a function built by ``exec``)."""
        try:
            path = inspect.getsourcefile(inspect.unwrap(self.fn))
        except TypeError:
            return None
        if path is None:
            return None
        resolved = Path(path).resolve()
        if resolved.is_relative_to(_PACKAGE):
            return (Path(_PACKAGE.name) / resolved.relative_to(_PACKAGE)).as_posix()
        return str(resolved)


_REGISTRY: dict[str, Method] = {}


def register(name: str, *, family: str, paper: str, needs: Iterable[str] = (), uses: Iterable[str] = (),
             merges: bool = False, placement: Placement | None = None,
             fewest: Fewest | None = None, ragged: bool = False) -> Callable[[Strategy], Strategy]:
    """Register ``fn`` under ``name``. ``needs``: required context keys; ``uses``: optional ones; ``placement``: where
    the encoder hook applies it by default; ``fewest``: its budget floor where it has one (see ``Method.fewest``);
    ``ragged``: it returns a per-sample count (``Method.ragged``)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    unknown = (set(needs) | set(uses)) - set(CONTEXT_KEYS)
    if unknown:
        raise ValueError(f"unknown context keys {sorted(unknown)}; known: {sorted(CONTEXT_KEYS)}")

    def deco(fn: Strategy) -> Strategy:
        if name in _REGISTRY:
            raise ValueError(f"method '{name}' is already registered")
        params = list(inspect.signature(fn).parameters.values())[3:]
        options = {p.name: p.default for p in params if p.kind == p.KEYWORD_ONLY}
        summary = (inspect.getdoc(fn) or "").split("\n")[0]
        _REGISTRY[name] = Method(name, fn, family, frozenset(needs), frozenset(uses), paper, merges, summary,
                                 options, placement or Placement(), fewest, ragged)
        return fn

    return deco


def get(name: str) -> Method:
    """The registered method ``name``; unknown names raise ``ValueError`` listing close matches."""
    if not isinstance(name, str):
        raise TypeError(f"method must be a method name (str), got {type(name).__name__}")
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"did you mean {close}? " if close else ""
        raise ValueError(f"unknown method '{name}'; {hint}available: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def methods(family: str | None = None) -> list[Method]:
    """All registered methods (optionally one family), ordered by family then name; an unknown family raises
    ``ValueError`` listing the families."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {list(FAMILIES)}, got {family!r}")
    rows = [m for m in _REGISTRY.values() if family is None or m.family == family]
    return sorted(rows, key=lambda m: (FAMILIES.index(m.family), m.name))
