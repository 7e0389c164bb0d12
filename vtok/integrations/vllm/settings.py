"""The plugin's settings, read from the model's Hugging Face config (``hf_overrides``) and checked at startup.

Keys (all optional; without ``vtok_method`` the model runs exactly as vLLM's own class):

* ``vtok_method``: a pre-LLM vtok method whose context the plugin can supply (``supported_methods(family)``);
* ``vtok_keep``: a ratio in ``(0, 1]`` or an int count per image (``vtok.budget``), default ``1.0``;
* ``vtok_options``: the method's own options, e.g. ``{"seed": 0}`` for ``random``.

Nothing here imports vLLM, so the rules can be read (and tested) without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from vtok.api import compress, retained_count
from vtok.budget import resolve_k
from vtok.pruners import get as get_method
from vtok.pruners import methods as all_methods
from vtok.selection import Selection

KEYS = ("vtok_method", "vtok_keep", "vtok_options")
FAMILIES = ("llava", "qwen2_5_vl", "qwen3_vl")
# context the plugin gives a method, per family: the image features' patch grid and the tower's attention (TOWER_KEYS:
# LLaVA's CLS row and keys of the feature layer, Qwen2.5-VL's attention received and keys in its last full-attention
# block), recomputed as vtok.wrap does. Never the language model's attention (text_attn, ...)
TOWER_KEYS = frozenset({"cls_attn", "keys"})
SUPPLIED = {"llava": frozenset({"grid"}) | TOWER_KEYS, "qwen2_5_vl": frozenset({"grid", "frames"}) | TOWER_KEYS,
            "qwen3_vl": frozenset({"grid"}) | TOWER_KEYS}
IMAGE_FAMILIES = ("baseline", "diversity", "clustering", "ordered", "attention")
# strategy families offered per model family: Qwen2.5-VL takes videos, so its temporal strategies too (an image is
# one frame to them, as in vtok.wrap); LLaVA-1.5 takes images only, and Qwen3-VL's videos pass unpruned here
METHOD_FAMILIES = {"llava": IMAGE_FAMILIES, "qwen2_5_vl": (*IMAGE_FAMILIES, "temporal"), "qwen3_vl": IMAGE_FAMILIES}
# optional context a method reads when given: vtok.wrap supplies e.g. the text query, the plugin does not, so a
# method reading it would prune differently here; only what the plugin supplies (or "sizes", empty in a single
# stage) may be optional
OPTIONAL_OK = {fam: got | {"sizes"} for fam, got in SUPPLIED.items()}


def supported_methods(family: str) -> list[str]:
    """The vtok methods the plugin runs before the language model of ``family``: image (and, on Qwen2.5-VL, video)
    strategies whose required context the plugin supplies, with an output count known before the encoder runs."""
    out = []
    for m in all_methods():
        if (m.family not in METHOD_FAMILIES[family] or m.ragged or not m.needs <= SUPPLIED[family]
                or not m.uses <= OPTIONAL_OK[family] or m.placement.llm_only):
            continue
        if family != "llava" and m.placement.resize_input:
            continue  # downsample resizes the image before Qwen's tower in vtok.wrap; not done here
        out.append(m.name)
    return out


def _why_not(name: str, family: str) -> str:
    """Why ``name`` (a registered method) is not offered for ``family``."""
    m = get_method(name)
    if m.family not in METHOD_FAMILIES[family]:
        return (f"it is a {m.family} strategy; the plugin runs {list(METHOD_FAMILIES[family])} strategies on "
                f"{family}")
    if m.ragged:
        return "it picks a length per image from its content, so its token count is unknown before the encoder runs"
    missing = sorted(m.needs - SUPPLIED[family])
    if missing:
        return (f"it needs context the plugin cannot supply on {family}: {missing} (the language model's attention, "
                f"which vLLM's fused attention kernels do not expose, or tower attention not recomputed here)")
    extra = sorted(m.uses - OPTIONAL_OK[family])
    if extra:
        return (f"it reads optional context {extra} that the plugin does not supply (vtok.wrap may), so it could "
                f"prune differently from vtok.wrap")
    if m.placement.resize_input:
        return "it resizes the image before Qwen's vision tower in vtok.wrap, which the plugin does not do"
    return "it is not a pre-LLM image strategy"


@dataclass(frozen=True)
class ItemShape:
    """What ``vtok.wrap`` gives a method about one image or video: ``n`` tokens (``frames`` frames of an ``h x w``
    grid), and the ``grid`` it passes (``None``: an image method sees a video's tokens flattened)."""

    n: int
    grid: tuple[int, int] | None
    frames: int


@dataclass(frozen=True)
class Settings:
    """Validated plugin settings for one model."""

    method: str
    keep: float | int
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def tower_context(self) -> frozenset[str]:
        """The tower context (``TOWER_KEYS``) the method reads, required or optional."""
        m = get_method(self.method)
        return (m.needs | m.uses) & TOWER_KEYS

    def item_shape(self, frames: int, grid: tuple[int, int]) -> ItemShape:
        """The shape of an item of ``frames`` frames of ``grid`` (an image: 1 frame), as ``vtok.wrap`` passes it:
        temporal methods get the grid, image methods a video's tokens flattened (refused if they need the grid)."""
        m = get_method(self.method)
        given = grid if frames == 1 or m.family == "temporal" else None
        if given is None and "grid" in m.needs:
            raise ValueError(f"vtok: vtok_method {self.method!r} needs an image grid and cannot prune a video of "
                             f"{frames} frames (vtok.wrap refuses it too); use a temporal method, e.g. 'evs'")
        return ItemShape(frames * grid[0] * grid[1], given, frames)

    def count(self, n: int, grid: tuple[int, int] | None) -> int:
        """Tokens left of an image of ``n`` tokens (its placeholder count), before the encoder runs."""
        return retained_count(self.method, n, self.keep, grid=grid)

    def prune(self, feats: Tensor, grid: tuple[int, int] | ItemShape | None, ctx: dict[str, Tensor] | None = None
              ) -> tuple[Tensor, Selection]:
        """``feats [n, D]`` of one image (video) -> ``([k, D], selection)``, as ``vtok.compress`` on
        ``feats[None]``; ``grid``: the image's grid or an :class:`ItemShape`; ``ctx``: the item's context tensors
        without the batch dim (``cls_attn [n]``, ``keys [H, n, dh]``)."""
        kwargs: dict[str, Any] = dict(self.options)
        kwargs.update({key: v[None] for key, v in (ctx or {}).items()})
        if isinstance(grid, ItemShape):
            kwargs["frames"] = grid.frames
            grid = grid.grid
        if grid is not None:  # as vtok.wrap gives it: every method sees its image's grid
            kwargs["grid"] = grid
        out, sel = compress(feats[None], self.method, self.keep, **kwargs)
        return out[0], sel


def _check_keep(keep: Any) -> float | int:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise ValueError(f"vtok: vtok_keep must be a ratio in (0, 1] or an int count >= 1, got {keep!r}")
    if isinstance(keep, float) and not 0.0 < keep <= 1.0:
        raise ValueError(f"vtok: vtok_keep must be a ratio in (0, 1] or an int count >= 1, got {keep!r}")
    if isinstance(keep, int) and keep < 1:
        raise ValueError(f"vtok: vtok_keep must be a ratio in (0, 1] or an int count >= 1, got {keep!r}")
    resolve_k(keep, 4)  # vtok's own check of the rounding rule
    return keep


def read(config: Any, family: str) -> Settings | None:
    """The settings in ``config`` (a Hugging Face config after vLLM's ``hf_overrides``), or ``None`` when
    ``vtok_method`` is unset; raises ``ValueError`` with the reason for a bad setting."""
    if family not in FAMILIES:
        raise ValueError(f"vtok: unknown model family {family!r}; the plugin supports {list(FAMILIES)}")
    method = getattr(config, "vtok_method", None)
    keep = getattr(config, "vtok_keep", None)
    options = getattr(config, "vtok_options", None)
    if method is None:
        if keep is not None or options:
            raise ValueError("vtok: vtok_keep / vtok_options are set but vtok_method is not; set vtok_method too "
                             f"(one of {supported_methods(family)})")
        return None
    if not isinstance(method, str):
        raise ValueError(f"vtok: vtok_method must be a method name (str), got {method!r}")
    names = [m.name for m in all_methods()]
    ok = supported_methods(family)
    if method not in names:
        raise ValueError(f"vtok: unknown vtok_method {method!r}; the vLLM plugin supports {ok}")
    if method not in ok:
        raise ValueError(f"vtok: vtok_method {method!r} is not available in the vLLM plugin: "
                         f"{_why_not(method, family)}. Supported here: {ok}; vtok.wrap runs it on Hugging Face "
                         f"transformers")
    keep = _check_keep(1.0 if keep is None else keep)
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ValueError(f"vtok: vtok_options must be a dict of {method!r}'s options, got {options!r}")
    bad = sorted(set(options) - set(get_method(method).options))
    if bad:
        raise ValueError(f"vtok: unknown option(s) {bad} for {method!r}; its options: "
                         f"{sorted(get_method(method).options)}")
    return Settings(method, keep, dict(options))


def square_grid(n: int) -> tuple[int, int] | None:
    """``(s, s)`` when ``n == s * s`` (LLaVA's patch grid), else ``None``."""
    s = int(round(n ** 0.5))
    return (s, s) if s * s == n else None

