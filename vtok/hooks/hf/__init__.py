"""Wrap a Hugging Face VLM so that its own ``forward`` / ``generate`` use fewer visual tokens.

    model = vtok.wrap(model, "divprune", keep=0.25)                  # pre-LLM: prune the projected image features
    model = vtok.wrap(model, "fastv", keep=0.5, layer=2)             # in-LLM: prune hidden states before layer 2
    model = vtok.wrap(model, "random", keep=[0.5, 0.25], layer=[2, 8])  # multi-stage (PyramidDrop-style)
    vtok.stats(model)                                                 # visual tokens before / after of the last call
    vtok.unwrap(model)

Stages: ``layer=None`` prunes before the language model; ``layer=K`` prunes the hidden states entering decoder layer
``K`` (layers before ``K`` see every token; from ``K`` on the hidden states, RoPE cos / sin, masks and the KV cache
hold only kept tokens). Budgets are per image (``keep`` a ratio of the image's tokens or an int count; a list with one
value per sample for a scalar ``layer``): an image of ``N`` prunable tokens keeps ``resolve_k(keep, N)`` of them. An
image the model splits into parts (LLaVA-NeXT / OneVision: base view and high-res tiles) has that budget split over
its parts in proportion to their sizes (at least one token each); its image-newline tokens are never pruned and come
on top (``vtok.stats`` counts them in ``before`` / ``after`` and reports them as ``protected``).

``generate(use_cache=False)`` re-runs the whole sequence every step; each stage then scores the prompt alone (the
generated tokens at the end of the rows are passed through, never scored), so it gives the cached ``generate``'s
tokens. ``model(**inputs, labels=labels)`` prunes ``labels`` (``input_ids``' layout) with the visual tokens: the loss
is the model's own over the pruned sequence.

Positions (pre-LLM stage): ``"original"`` keeps the unpruned prompt's position ids (Qwen: its 3-D ids) and decoding
continues after the unpruned prompt; ``"reindex"`` numbers the pruned prompt contiguously (Qwen: as ``get_rope_index``
would for images holding only the kept tokens). Default: the method's declaration (``vtok methods``). In-LLM stages
keep the positions the language model was given, as FastV / PyramidDrop do.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from vtok.budget import check_keep
from vtok.hooks.hf._runtime import Runtime, Stage
from vtok.hooks.hf.adapter import ADAPTERS, VLMAdapter, discover, find_adapter, register_adapter
from vtok.hooks.hf.llava import LlavaAdapter  # noqa: F401  (registered on import: ADAPTERS lists LLaVA from the start)
from vtok.hooks.hf.providers import PROVIDERS, llm_context
from vtok.pruners import get

_LLM_CONTEXT = frozenset(k for k, p in PROVIDERS.items() if p.llm is not None)  # what an in-LLM stage can get
_UNSUPPORTED_CACHES = ("static", "offloaded_static", "sliding_window", "hybrid", "mamba", "quantized")


def placement_error(method: str, layer: int | None) -> str | None:
    """Why ``method`` cannot run at ``layer`` (``None``: before the language model) beyond its context, or ``None``
    (the context check is separate: ``llm_context`` / the adapter's ``provides``). A method whose ``Placement``
    declares ``llm_only`` (``dart``) is refused before the language model."""
    why = get(method).placement.llm_only
    if layer is None and why:
        return f"method '{method}' runs inside the language model ({why}); pass layer=K with K >= 1"
    return None


def supported() -> list[str]:
    """The model classes ``wrap`` accepts (after discovering the adapter modules)."""
    _load_optional()
    return sorted(ADAPTERS)


def _load_optional() -> None:
    """Import the adapter modules (``vtok.hooks.hf.adapter.discover``: no list to edit for a new family)."""
    discover()


def _adapter(model: Any) -> VLMAdapter:
    """The registered adapter of ``model``'s class; ``TypeError`` listing the supported ones otherwise."""
    return find_adapter(model)


def _stage_methods(method: Any, n: int) -> list[str]:
    """One method name per stage: a name for every stage, or a list with one per stage."""
    if isinstance(method, str):
        return [method] * n
    if not isinstance(method, (list, tuple)) or not all(isinstance(m, str) for m in method):
        raise TypeError(f"method must be a method name or a list of names (one per stage), got {method!r}")
    if len(method) != n:
        raise ValueError(f"method lists {len(method)} names but there are {n} stages (layer=...)")
    return list(method)


def _stages(adapter: Any, model: Any, method: Any, keep: Any, layer: Any, options: dict[str, Any]) -> list[Stage]:
    layers = list(layer) if isinstance(layer, (list, tuple)) else [layer]
    if not layers:
        raise ValueError("layer must be None, an int or a non-empty list")
    names = _stage_methods(method, len(layers))
    infos = [get(m) for m in names]
    if len(layers) > 1:
        if not isinstance(keep, (list, tuple)) or len(keep) != len(layers):
            raise ValueError(f"with {len(layers)} stages (layer={layers}) keep must be a list of {len(layers)} "
                             f"budgets, got {keep!r}")
        keeps = [k if isinstance(k, (list, tuple)) else [k] for k in keep]
    else:
        keeps = [list(keep) if isinstance(keep, (list, tuple)) else [keep]]
    n_layers = adapter.num_layers(model)
    prev = -1
    for i, ly in enumerate(layers):
        if ly is None:
            if i != 0:
                raise ValueError("a pre-LLM stage (layer=None) must come first in layer=[...]")
            continue
        if isinstance(ly, bool) or not isinstance(ly, numbers.Integral):
            raise TypeError(f"layer must be None or an int, got {ly!r}")
        if not 0 <= ly < n_layers:
            raise ValueError(f"layer must be in [0, {n_layers}) for this language model ({n_layers} layers), got {ly}")
        if ly <= prev:
            raise ValueError(f"stage layers must be strictly increasing, got {layers}")
        prev = ly
    for ks in keeps:
        for j, k in enumerate(ks):
            check_keep(k, "keep" if len(ks) == 1 else f"keep[{j}]")
    ratios = [ks[0] for ks in keeps if len(ks) == 1 and isinstance(ks[0], float)]
    if len(ratios) == len(keeps) and any(b > a for a, b in zip(ratios, ratios[1:], strict=False)):
        raise ValueError(f"stage budgets must not grow from stage to stage, got keep={keep}")
    stages = []
    for ly, ks, name, info in zip(layers, keeps, names, infos, strict=True):
        problem = placement_error(name, ly)
        if problem:
            raise ValueError(problem)
        provided = adapter.provides(model)
        avail = provided if ly is None else llm_context(ly, name) | ({"frames"} & provided)
        missing = sorted(set(info.needs) - avail)
        if missing:
            where = "before the language model" if ly is None else f"at language-model layer {ly}"
            raise ValueError(f"method '{name}' needs context {missing}, which the wrapper cannot give {where} "
                             f"for {type(model).__name__} (it gives {sorted(avail)})")
        own = {k: v for k, v in options.items() if k in info.options}
        stages.append(Stage(ly, name, ks, own, frozenset(info.needs)))
    known = set().union(*(i.options for i in infos))
    bad = sorted(set(options) - known)
    if bad:
        what = f"method '{names[0]}'" if len(set(names)) == 1 else f"methods {sorted(set(names))}"
        raise TypeError(f"{what} got unknown option(s) {bad}; options: {sorted(known)}")
    return stages


def wrap(model: torch.nn.Module, method: str | Sequence[str], keep: Any, *,
         layer: int | None | Sequence[int | None] = None,
         positions: str | None = None, decode_kv: str | None = None, **options: Any) -> torch.nn.Module:
    """Make ``model`` (a supported Hugging Face VLM) prune visual tokens in its own ``forward`` / ``generate``.

    Args:
        model: e.g. ``LlavaForConditionalGeneration`` (``vtok.hooks.hf.supported()`` lists them), wrapped in place.
        method: a registered strategy (``vtok.methods()``), or one per stage for a method whose stages differ
            (HoliTom: ``["holitom", "holitom_llm"]`` with ``layer=[None, K]``).
        keep: per image, a ratio in ``(0, 1]`` or an int count of its prunable tokens (an image in several parts,
            LLaVA-NeXT's base view and tiles, splits it over them; newlines on top); for one stage a list gives one
            per sample; for several stages one per stage (each may itself be a per-sample list). ``fitprune`` at
            layers / budgets chosen by hand runs FitPrune's pruning rule there; the paper's schedule is the recipe
            ``fit_fitprune`` fits (``keep=sched.keep, layer=sched.layers``).
        layer: ``None`` (pre-LLM), a decoder layer ``K``, or a list of stages (``[None, 8]``, ``[2, 8, 16]``).
        positions: ``"original"`` or ``"reindex"`` for the pre-LLM stage; default: the method's declaration.
        decode_kv: ``"stage"`` (each layer's KV cache keeps the tokens its stage computed) or ``"final"`` (after the
            prefill, layers from the first in-LLM stage's attention layer ``K₁ − 1`` up to the last stage keep only
            the last stage's tokens: MustDrop's decode stage); default: the last stage's method's declaration.
        **options: the method's own options (with several methods, each stage gets the ones its method has).

    Returns:
        ``model`` itself. Its ``forward`` returns logits for the *pruned* sequence (``vtok.stats(model)`` says how
        many tokens each sample kept); the last position is the prompt's last token, as ``generate`` needs. With
        ``labels`` (``input_ids``' shape) its loss is over the pruned sequence (labels pruned alike).

    Raises:
        TypeError: unsupported model class (lists the supported ones); unknown options.
        ValueError: wrapped twice; a keep leaving zero image tokens; a layer out of range; a method needing context
            the placement cannot give (names the key); a method defined only inside the language model placed before
            it (``dart``); bad ``positions``.
        NotImplementedError: an attention implementation other than sdpa / eager for attention-scored in-LLM stages.
    """
    adapter = _adapter(model)
    if getattr(model, "_vtok_runtime", None) is not None:
        raise ValueError("model is already wrapped by vtok; call vtok.unwrap(model) first")
    stages = _stages(adapter, model, method, keep, layer, options)
    has_pre = any(s.layer is None for s in stages)
    default = get(stages[0].method).placement.positions if has_pre else "original"
    positions = default if positions is None else positions
    if positions not in ("original", "reindex"):
        raise ValueError(f"positions must be 'original' or 'reindex', got {positions!r}")
    if positions == "reindex" and not has_pre:
        raise ValueError("positions='reindex' applies to the pre-LLM stage; in-LLM stages keep the positions the "
                         "language model was given (add layer=None as a first stage, or use 'original')")
    impl = adapter.attn_implementation(model)
    if any(s.needs & {"text_attn", "self_cross_attn", "text_rows_attn"} for s in stages) \
            and impl not in ("sdpa", "eager"):
        raise NotImplementedError(f"in-LLM attention scores need attn_implementation 'sdpa' or 'eager', "
                                  f"the language model uses {impl!r}")
    inllm = [s for s in stages if s.layer is not None]
    decode_kv = (get(inllm[-1].method).placement.decode_kv if inllm else "stage") if decode_kv is None else decode_kv
    if decode_kv not in ("stage", "final"):
        raise ValueError(f"decode_kv must be 'stage' or 'final', got {decode_kv!r}")
    if decode_kv == "final" and not inllm:
        raise ValueError("decode_kv='final' prunes the KV cache of the layers before the last in-LLM stage; this "
                         "wrap has no in-LLM stage (layer=K)")
    rt = Runtime(model, adapter, stages, positions, method, keep, decode_kv)
    rt.install()
    _install_generate(model, rt)
    _install_loss(model, rt)
    model._vtok_runtime = rt
    return model


def _check_generate(model: torch.nn.Module, rt: Runtime, kwargs: dict[str, Any]) -> None:
    cfg = kwargs.get("generation_config") or model.generation_config
    beams = kwargs.get("num_beams", getattr(cfg, "num_beams", 1)) or 1
    if beams > 1 or kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens"):
        raise NotImplementedError("vtok-wrapped models support greedy and sampling generate; beam search and "
                                  "assisted decoding are not supported")
    if (kwargs.get("num_return_sequences") or getattr(cfg, "num_return_sequences", 1) or 1) > 1:
        raise NotImplementedError("vtok-wrapped models generate one sequence per prompt; num_return_sequences > 1 "
                                  "is not supported")
    impl = kwargs.get("cache_implementation", getattr(cfg, "cache_implementation", None))
    if impl in _UNSUPPORTED_CACHES:
        raise NotImplementedError(f"vtok-wrapped models need the default dynamic cache, got cache_implementation="
                                  f"{impl!r}")
    if rt.retro and not kwargs.get("use_cache", getattr(cfg, "use_cache", True)):
        raise NotImplementedError("vtok: decode_kv='final' prunes the KV cache after the prefill, and "
                                  "generate(use_cache=False) has none; use the cache, or wrap with decode_kv='stage'")


def _install_generate(model: torch.nn.Module, rt: Runtime) -> None:
    """``model.generate`` checked (``_check_generate``) and telling the runtime the prompt's length, so that the
    steps of an uncached generate score their prompt alone."""
    orig_generate = model.generate

    def generate(*args: Any, **kwargs: Any):
        _check_generate(model, rt, kwargs)
        ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        rt.generate_prompt = int(ids.shape[-1]) if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None
        try:
            return orig_generate(*args, **kwargs)
        finally:
            rt.generate_prompt = None

    model.generate = generate
    rt._undo.append(lambda: delattr(model, "generate"))


def _install_loss(model: torch.nn.Module, rt: Runtime) -> None:
    """``model.loss_function`` (transformers' per-instance setter) prunes ``labels`` like the sequence."""
    had = "_loss_function" in vars(model)
    before = vars(model).get("_loss_function")
    orig = model.loss_function

    def loss_function(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, **kwargs: Any):
        if kwargs.get("shift_labels") is not None and rt.label_index is not None:
            raise ValueError("vtok: shift_labels cannot follow the pruned sequence; pass labels (input_ids' layout) "
                             "and vtok prunes them")
        labels = rt.prune_labels(labels, logits.shape[1], kwargs.get("ignore_index", -100))
        return orig(logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)

    model.loss_function = loss_function

    def undo() -> None:
        if had:
            model._loss_function = before
        else:
            del model._loss_function

    rt._undo.append(undo)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``wrap``: the model behaves bit-exactly as before. Returns ``model``."""
    rt = getattr(model, "_vtok_runtime", None)
    if rt is None:
        raise ValueError("model is not wrapped by vtok")
    rt.remove()
    del model._vtok_runtime
    return model


@contextlib.contextmanager
def wrapped(model: torch.nn.Module, method: str | Sequence[str], keep: Any, **kwargs: Any
            ) -> Iterator[torch.nn.Module]:
    """``with vtok.wrapped(model, "divprune", 0.25): model.generate(...)`` — unwrapped again on exit."""
    wrap(model, method, keep, **kwargs)
    try:
        yield model
    finally:
        unwrap(model)


def stats(model: torch.nn.Module) -> dict[str, Any]:
    """For the last prefill of a wrapped model (of an uncached ``generate``: its prompt): visual tokens before /
    after per sample and per image (``per_image``: ``before`` / ``after`` count its placeholder tokens, ``protected``
    the never-pruned image-newlines among them, so a stage keeping ``k`` leaves ``after = k + protected``), the kept
    ``input_ids`` columns per sample, the stage layers, and the prefill token reduction."""
    rt = getattr(model, "_vtok_runtime", None)
    if rt is None:
        raise ValueError("model is not wrapped by vtok")
    return rt.stats.as_dict()


from vtok.hooks.hf.fitprune import FitSchedule, fit_fitprune  # noqa: E402  (uses wrap / unwrap above)

__all__ = ["ADAPTERS", "FitSchedule", "VLMAdapter", "fit_fitprune", "llm_context", "placement_error",
           "register_adapter", "stats", "supported", "unwrap", "wrap", "wrapped"]
