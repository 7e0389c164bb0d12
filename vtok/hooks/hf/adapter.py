"""The adapter contract of ``vtok.wrap``: what one VLM family tells the engine, and the registry of families.

The engine (``_runtime.py``, ``_sequence.py``, ``_attention.py``) is shared by every family; an adapter, a
``VLMAdapter`` subclass, is the only model-specific code. It says

* which model classes it serves (``names``, matched along ``type(model).__mro__``) and how the language model numbers
  positions (``positions``: ``"1d"`` position ids, or ``"mrope"``: Qwen-style 3-D ids);
* where the language model is (``inner``, ``language_model``, ``decoder_layers``, ``self_attention``; shared
  defaults for transformers' ``model.model.language_model.layers[i].self_attn`` layout) and its placeholder ids
  (``image_token_ids``);
* where the vision tower is (``tower``, ``tower_layers``) and which tower layer's attention gives the vision-side
  context (``feature_layer``);
* which context the pre-LLM stage can give (``provides``);
* how the images and videos of a batch are found (``install``): it wraps the inner model's feature methods
  (``get_image_features`` / ``get_video_features``) with ``hook_features``, and each call describes what the model
  encoded as ``ImageRecord`` s, in prompt order, handed to ``rt.add_records(output, records)``;
* optionally, how the language model's own inputs follow the pruned sequence (no-op defaults): ``rope_kwargs``
  (the layers' RoPE-table arguments), ``attention_kwargs`` (a layer's arguments → its attention module's),
  ``lm_inputs`` (the language model's arguments into the engine's form), ``prefill_inputs`` (per-token inputs /
  masks of the pruned prefill) and ``stage_mask`` (an in-LLM stage's mask).

Adapters use only the engine's public API: ``rt.pre`` (the pre-LLM ``Stage`` or ``None``), ``rt.pre_context()``
(the context keys it reads: compute only these), ``rt.add_records``, ``rt.wrapper_s`` (the wrapper's own time),
``rt.stages`` (read only) and ``rt.adapter_state`` (a dict free for the adapter's hooks, one per wrapped model).

Registration and discovery: ``@register_adapter`` on the class registers one instance for each of its ``names``.
``discover()`` imports the adapter modules of this package, found by a naming rule, no list to edit: a public
module ``vtok/hooks/hf/<name>.py`` is an adapter module when ``<name>`` is the transformers model package of the
family it serves (``transformers/models/<name>/``: ``llava``, ``llava_next``, ``qwen2_vl``). Private modules
(``_runtime.py``, ...) and the package's tools (``tiny/``, ``fitprune.py``, ...) are never imported by it. A
module whose optional dependencies are missing (``ImportError`` naming a module outside vtok) is skipped.

Add a family = one adapter file + its tests:

1. ``vtok/hooks/hf/<model_type>.py`` (named after ``transformers.models.<model_type>``) holding a
   ``@register_adapter`` ``VLMAdapter`` subclass with ``names``, ``positions``, ``tower``, ``tower_layers``,
   ``feature_layer``, ``provides`` and ``install`` (through ``hook_features``); subclass an existing adapter for a
   variant (``LlavaNextAdapter(LlavaAdapter)``). ``vtok.hooks.hf.supported()`` then lists it.
2. Its tests: ``tests/hf/test_hf_<family>.py`` (records, pre-LLM selection against a reference on the unwrapped
   model, both ``positions``, ``unwrap`` bit-exact), a tiny builder in ``tiny/<family>.py`` (``register_family``)
   for the shared ``test_hf_families.py``, and ``tests/hf/test_hf_adapter_contract.py`` passing unchanged.
"""

from __future__ import annotations

import abc
import functools
import importlib
import importlib.util
import inspect
import pkgutil
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import Tensor

if TYPE_CHECKING:
    from vtok.hooks.hf._runtime import ImageRecord, Runtime
    from vtok.pruners.registry import Placement

POSITIONS = ("1d", "mrope")
_PACKAGE = __name__.rpartition(".")[0]  # vtok.hooks.hf

Undo = Callable[[], None]
Watch = Mapping[Hashable, torch.nn.Module]


@dataclass
class FeatureCall:
    """One call of a hooked feature method (``get_image_features`` / ``get_video_features``).

    Attributes:
        args, kwargs: the call's own arguments.
        signature: the original method's signature.
        captured: what each watched module received, by its watch key (``capture(args, kwargs)`` of its forward).
        state: free for the adapter (e.g. a plan made before the call and read by ``make_records``).
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    signature: inspect.Signature
    captured: dict[Hashable, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)

    @functools.cached_property
    def arguments(self) -> dict[str, Any]:
        """The arguments by parameter name (``inspect.Signature.bind_partial``)."""
        return dict(self.signature.bind_partial(*self.args, **self.kwargs).arguments)


def layer_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The hidden states a layer receives (its first argument): ``[n, T, D]`` for CLIP / SigLIP encoder layers."""
    return args[0] if args else kwargs["hidden_states"]


def features_of(out: Any) -> Any:
    """The features a feature method returned: ``pooler_output`` (transformers 5.x) or the return value (4.x)."""
    return out.pooler_output if hasattr(out, "pooler_output") else out


class VLMAdapter(abc.ABC):
    """What ``vtok.wrap`` needs to know of one VLM family (see the module docstring).

    Subclasses declare ``names`` and ``positions`` and implement the vision side (``tower``, ``tower_layers``,
    ``feature_layer``), ``provides`` and ``install``. The structure accessors have defaults for transformers'
    ``model.model.language_model`` layout; override them where a family differs.
    """

    names: ClassVar[tuple[str, ...]] = ()  # the model class names it serves
    positions: ClassVar[str]  # "1d" (position ids [B, L]) or "mrope" (Qwen-style 3-D ids [3, B, L])

    # ------------------------------------------------------------------ language-model structure
    def inner(self, model: torch.nn.Module) -> torch.nn.Module:
        """The inner model (``model.model``): its forward gets ``input_ids`` and calls the feature methods."""
        return model.model

    def language_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The decoder stack the engine re-runs on the pruned sequence."""
        return self.inner(model).language_model

    def decoder_layers(self, model: torch.nn.Module) -> Sequence[torch.nn.Module]:
        """The language model's decoder layers, in order."""
        return self.language_model(model).layers

    def self_attention(self, layer: torch.nn.Module) -> torch.nn.Module:
        """The self-attention module of one decoder layer (watched for in-LLM attention scores)."""
        return layer.self_attn

    def attn_implementation(self, model: torch.nn.Module) -> str:
        """The language model's attention implementation (``"sdpa"``, ``"eager"``, ...)."""
        return model.config.text_config._attn_implementation or "sdpa"

    def num_layers(self, model: torch.nn.Module) -> int:
        """How many decoder layers the language model has (``layer=K`` must be below it)."""
        return len(self.decoder_layers(model))

    def image_token_ids(self, model: torch.nn.Module) -> list[int]:
        """The placeholder token ids of the prompt's visual runs: the image's, then the video's (if any)."""
        cfg = model.config
        return [getattr(cfg, "image_token_id", None) or cfg.image_token_index]

    # ------------------------------------------------------------------ language-model inputs (optional hooks)
    def rope_kwargs(self, model: torch.nn.Module) -> tuple[str, ...]:
        """The decoder layers' keyword arguments holding per-token RoPE tables ``(cos, sin)`` ``[B|1, L, d]`` that an
        in-LLM stage gathers at its kept tokens (each distinct table once per stage: layers may get different ones,
        e.g. Gemma 3's local / global RoPE)."""
        return ("position_embeddings",)

    def attention_kwargs(self, layer: torch.nn.Module, kw: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments ``self_attention(layer)`` takes, from those its decoder ``layer`` got (the engine
        runs the attention alone for methods reading a layer's own attention). Default: the same (Gemma 3 on
        transformers 4.x picks its layer's local or global RoPE table)."""
        return kw

    def group_records(self, model: torch.nn.Module, records: Sequence[ImageRecord], input_ids: Tensor) -> None:
        """Called once per prefill, before the budgets, with the call's records (in call order) and its prompt
        ``input_ids [B, L]``: may set each record's ``image`` so that the parts of one image share its budget, for
        families whose parts per image only the prompt tells (InternVL's tiles, Idefics3's crops). Default:
        nothing (the feature hook already numbered them)."""
        return None

    def lm_inputs(self, model: torch.nn.Module, rt: Runtime, kw: dict[str, Any]) -> None:
        """Called with the language model's keyword arguments as it received them, before the engine reads them;
        may edit ``kw`` in place into the engine's form (a 2-D ``attention_mask [B, L]`` or none). Default: nothing
        (Gemma 3: its model hands the language model a mask mapping, replaced here by the 2-D mask)."""
        return None

    def prefill_inputs(self, model: torch.nn.Module, rt: Runtime, kw: dict[str, Any], index: Tensor | None
                       ) -> None:
        """Called once per prefill with the keyword arguments the engine hands the language model (after the pre-LLM
        stage: the pruned ``inputs_embeds``, 2-D ``attention_mask``, ``position_ids``); ``index [B, L']``: the prompt
        column of each of its tokens (-1 padding), ``None`` when nothing was pruned before the language model (the
        identity). May edit ``kw`` in place: gather per-token inputs of the language model with ``index``, or build
        its masks. Default: nothing."""
        return None

    def stage_mask(self, model: torch.nn.Module, rt: Runtime, mask: Tensor | None, valid: Tensor, index: Tensor,
                   fmt: torch.dtype | None) -> Tensor | None:
        """The attention mask the decoder layers after an in-LLM stage get in the prefill. ``mask``: the engine's
        ``[B, 1, L, L]`` (causal over the kept tokens, padding masked; ``None``: none needed, SDPA's causal path);
        ``valid [B, L]``: the stage's validity; ``index [B, L]``: each token's position in the language model's input
        (-1 padding); ``fmt``: the mask dtype the layers take (``None`` / bool: boolean, True = attend; float:
        additive). Default: ``mask`` (Gemma 3 adds its bidirectional image blocks)."""
        return mask

    # ------------------------------------------------------------------ vision side
    @abc.abstractmethod
    def tower(self, model: torch.nn.Module) -> torch.nn.Module:
        """The vision tower's body (the module holding ``tower_layers``)."""

    @abc.abstractmethod
    def tower_layers(self, model: torch.nn.Module) -> Sequence[torch.nn.Module]:
        """The tower's layers (blocks), in order."""

    @abc.abstractmethod
    def feature_layer(self, model: torch.nn.Module) -> int:
        """Index in ``tower_layers`` of the layer whose attention gives ``cls_attn`` / ``keys`` (recomputed from the
        input it receives), ``-1`` when there is none (the features are the tower's embeddings)."""

    @abc.abstractmethod
    def provides(self, model: torch.nn.Module) -> set[str]:
        """The context keys the pre-LLM stage can give (``grid``, ``query``, ``frames``, ``cls_attn``, ...);
        ``vtok.wrap`` refuses a method needing another, naming the key. Must work without weights (meta device)."""

    @abc.abstractmethod
    def install(self, model: torch.nn.Module, rt: Runtime) -> list[Undo]:
        """Hook the feature methods so that every call hands ``rt.add_records(output, records)`` one
        ``ImageRecord`` per image (or part, or video) in prompt order; returns the undo callables (``vtok.unwrap``
        is bit-exact). Use ``hook_features``."""

    # ------------------------------------------------------------------ helpers for install
    @staticmethod
    def pre_placement(rt: Runtime) -> Placement | None:
        """The ``Placement`` of the pre-LLM stage's method, ``None`` without a pre-LLM stage."""
        from vtok.pruners import get

        return get(rt.pre.method).placement if rt.pre is not None else None

    def hook_features(self, model: torch.nn.Module, rt: Runtime, name: str,
                      watch: Watch | Callable[[FeatureCall], Watch] | None,
                      make_records: Callable[[Any, FeatureCall], list[ImageRecord]], *,
                      capture: Callable[[tuple[Any, ...], dict[str, Any]], Any] = layer_input,
                      run: Callable[[Callable[..., Any], FeatureCall], Any] | None = None) -> Undo:
        """Wrap the inner model's feature method ``name`` (on the instance, ``functools.wraps`` keeping the
        signature: ``generate`` inspects it to pre-encode the inputs); returns its undo.

        Per call: forward pre-hooks on the ``watch`` modules (a mapping ``key -> module``, or a function of the
        call giving one) store ``capture(args, kwargs)`` of each in ``call.captured[key]`` and are removed when the
        call ends, even on error; ``run(orig, call)`` (default: ``orig(*args, **kwargs)``) gives the output; then
        ``rt.add_records(output, make_records(output, call))``, that work timed into ``rt.wrapper_s``.
        """
        inner = self.inner(model)
        orig = getattr(inner, name)
        sig = inspect.signature(orig)

        @functools.wraps(orig)
        def hooked(*args: Any, **kwargs: Any) -> Any:
            call = FeatureCall(args, kwargs, sig)
            mods = watch(call) if callable(watch) else watch or {}

            def hook_for(key: Hashable) -> Callable[..., None]:
                def pre_hook(module: torch.nn.Module, a: tuple[Any, ...], kw: dict[str, Any]) -> None:
                    call.captured[key] = capture(a, kw)

                return pre_hook

            handles = [m.register_forward_pre_hook(hook_for(key), with_kwargs=True) for key, m in mods.items()]
            try:
                out = orig(*args, **kwargs) if run is None else run(orig, call)
            finally:
                for handle in handles:
                    handle.remove()
            t0 = time.perf_counter()
            rt.add_records(out, make_records(out, call))
            rt.wrapper_s += time.perf_counter() - t0
            return out

        setattr(inner, name, hooked)
        return lambda: delattr(inner, name)


# ---------------------------------------------------------------------------------------------------------- registry
ADAPTERS: dict[str, VLMAdapter] = {}

_A = TypeVar("_A", bound="type[VLMAdapter] | VLMAdapter")


def register_adapter(adapter: _A) -> _A:
    """Class decorator: register one instance of ``adapter`` for each model class name in its ``names`` (a later
    registration of a name replaces the earlier). An instance is registered as it is (an adapter configured by
    hand). Returns ``adapter``.

    Raises:
        TypeError: not a ``VLMAdapter`` subclass (or instance); empty or malformed ``names``; abstract methods left.
        ValueError: ``positions`` not one of ``POSITIONS``.
    """
    cls = adapter if isinstance(adapter, type) else type(adapter)
    if not issubclass(cls, VLMAdapter):
        raise TypeError(f"register_adapter takes a subclass of vtok.hooks.hf.adapter.VLMAdapter (or an instance of "
                        f"one), got {adapter!r}")
    names = cls.names
    if isinstance(names, str) or not isinstance(names, (tuple, list)) or not names \
            or not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"{cls.__name__}.names must be a non-empty tuple of model class names (e.g. "
                        f"('LlavaForConditionalGeneration',)), got {names!r}")
    positions = getattr(cls, "positions", None)
    if positions not in POSITIONS:
        raise ValueError(f"{cls.__name__}.positions must be one of {POSITIONS}, got {positions!r}")
    instance = cls() if isinstance(adapter, type) else adapter
    for name in names:
        ADAPTERS[name] = instance
    return adapter


def adapter_modules() -> list[str]:
    """The adapter modules of this package by the naming rule (see the module docstring), without importing them:
    public modules named after a transformers model package (none when transformers is missing)."""
    pkg = importlib.import_module(_PACKAGE)
    out = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.ispkg or info.name.startswith("_"):
            continue
        try:
            found = importlib.util.find_spec(f"transformers.models.{info.name}") is not None
        except ImportError:  # no transformers
            found = False
        if found:
            out.append(info.name)
    return sorted(out)


def discover() -> list[str]:
    """Import every adapter module (``adapter_modules``); each registers its adapters on import. A module whose
    optional dependencies are missing is skipped; an ``ImportError`` inside vtok itself is raised. Returns the
    modules imported."""
    done = []
    for name in adapter_modules():
        try:
            importlib.import_module(f"{_PACKAGE}.{name}")
        except ImportError as e:
            if (e.name or "").split(".")[0] == "vtok":
                raise
            continue
        done.append(name)
    return done


def find_adapter(model: Any) -> VLMAdapter:
    """The registered adapter of ``model``'s class (the first of ``type(model).__mro__`` with one), after
    ``discover()``. Raises ``TypeError`` for an unsupported class, listing the supported ones."""
    discover()
    for cls in type(model).__mro__:
        if cls.__name__ in ADAPTERS:
            return ADAPTERS[cls.__name__]
    raise TypeError(f"vtok.wrap does not support {type(model).__name__}; supported: {sorted(ADAPTERS)}")
