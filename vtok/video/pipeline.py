"""Video file → frames → ViT patch tokens → compressed tokens, with a picture of what survived.

What ``vtok compress-video`` and ``demos/compress_video.py`` run::

    enc = FrameEncoder.load("timm:vit_tiny_patch16_224")          # random weights unless checkpoint=...
    res = compress_video("clip.mp4", "frame_merge", keep=0.25, encoder=enc, frames=32, picture="out.png")
    res.before, res.after, res.seconds                            # 6272, 1568, {"decode": ..., "encode": ..., ...}

A temporal strategy (``vtok methods --family temporal``) gets ``frames=T`` and the per-frame ``grid``; an image
strategy runs inside every frame with an even share of the budget (``per_frame``). The encoder's last block gives the
tokens (its output, patch tokens only), ``cls_attn`` and ``keys`` through ``vtok.capture``; with an open_clip model
and ``text``, ``frame_scores`` are the cosine similarities of each frame's image embedding with the text's
(for ``query_budget``).

Every argument that can be checked before decoding is checked first (:func:`check_request`); a bad one raises
:class:`~vtok.video.errors.ArgumentError` naming it (``vtok compress-video`` names the flag instead).
"""

from __future__ import annotations

import numbers
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import vtok
from vtok.budget import Keep, resolve_k
from vtok.context import CONTEXT_KEYS
from vtok.pruners.registry import Method
from vtok.selection import Selection
from vtok.video.decode import BACKENDS, Video, check_path, load
from vtok.video.errors import ArgumentError, literal

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

SUPPLIED = frozenset({"frames", "grid", "cls_attn", "keys"})
"""Context every strategy gets from :func:`compress_video` (an image strategy gets each frame's share)."""

ON_REQUEST: dict[str, str] = {"frame_scores": "{text}TEXT with an open_clip encoder ({spec}open_clip:NAME)"}
"""Context :func:`compress_video` supplies when asked: key → what to pass (``{name}`` is an argument)."""

ONE_OF: dict[str, str] = {"query_budget": "frame_scores"}
"""Strategies that need one of several optional context keys (their ``uses``) and the one a video can supply."""


@dataclass
class FrameEncoder:
    """A timm or open_clip ViT that turns frames into patch tokens (``"timm:NAME"`` / ``"open_clip:NAME"``)."""

    spec: str
    model: torch.nn.Module
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    clip: Any = None  # the whole open_clip model (text tower) when spec is open_clip
    checkpoint: Path | None = None  # the weights loaded; None: random weights
    grid: tuple[int, int] = (0, 0)  # patch grid (h, w) of one frame

    @property
    def random_weights(self) -> bool:
        """Whether no checkpoint was loaded: its tokens, and so which of them a strategy keeps, carry no meaning."""
        return self.checkpoint is None

    @classmethod
    def load(cls, spec: str, checkpoint: str | Path | None = None, image_size: int | None = None) -> FrameEncoder:
        """Build ``spec`` with random weights (nothing is downloaded) and load ``checkpoint`` (a ``state_dict`` in
        ``.safetensors`` / ``.pt`` / ``.bin``) when given."""
        lib, name = check_spec(spec)
        if checkpoint is not None:
            checkpoint = check_checkpoint(checkpoint)
        try:
            built = BUILDERS[lib](name, image_size)
        except RuntimeError as e:  # timm / open_clip: an unknown model name
            raise ArgumentError("spec", spec, f"{lib} has no model {literal(repr(name))} "
                                f"({literal(_first_line(e))})") from e
        if checkpoint is not None:
            _load_state(built.target, checkpoint)
        built.model.eval()
        return cls(spec, built.model, built.size, built.mean, built.std, built.clip, checkpoint, built.grid)

    def pixels(self, frames: np.ndarray) -> Tensor:
        """``uint8 [T, S, S, 3]`` → normalised ``[T, 3, S, S]``."""
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
        return (x - torch.tensor(self.mean)[:, None, None]) / torch.tensor(self.std)[:, None, None]

    @torch.no_grad()
    def encode(self, frames: np.ndarray, batch: int = 8,
               step: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Patch tokens of every frame: ``{"tokens": [T, P, D], "cls_attn": [T, P], "keys": [T, H, P, dh],
        "embed": [T, E] (the model's pooled output), "grid": (h, w)}``; ``step(n)`` after each batch of frames."""
        out: dict[str, list[Tensor]] = {"tokens": [], "cls_attn": [], "keys": [], "embed": []}
        grid = None
        last = None
        for s in range(0, len(frames), batch):
            x = self.pixels(frames[s:s + batch])
            with vtok.capture(self.model, what=("cls_attn", "keys", "hidden")) as feats:
                emb = self.model(x)
            last = max(feats) if last is None else last
            f = feats[last]
            grid = feats.grid
            out["tokens"].append(f["hidden"])
            out["cls_attn"].append(f["cls_attn"])
            out["keys"].append(f["keys"])
            out["embed"].append(emb[0] if isinstance(emb, tuple) else emb)
            if step is not None:
                step(len(x))
        res: dict[str, Any] = {k: torch.cat(v) for k, v in out.items()}
        res["grid"] = tuple(grid)
        return res

    @torch.no_grad()
    def text_scores(self, text: str, embed: Tensor) -> Tensor:
        """``[T]``: cosine similarity of each frame's image embedding with ``text`` (open_clip only)."""
        if self.clip is None:
            raise ArgumentError("text", text, f"needs an open_clip encoder (a text tower); {literal(self.spec)} "
                                "has none")
        import open_clip

        name = self.spec.split(":", 1)[1]
        tok = open_clip.get_tokenizer(name)([text])
        t = self.clip.encode_text(tok)
        return torch.nn.functional.cosine_similarity(embed.float(), t.float(), dim=-1)


@dataclass
class _Built:
    """A freshly built encoder: the vision tower, what a checkpoint's state_dict is for, input side, patch grid,
    normalisation, and the whole open_clip model (its text tower) or None."""

    model: torch.nn.Module
    target: torch.nn.Module
    size: int
    grid: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    clip: Any = None


def _build_timm(name: str, image_size: int | None) -> _Built:
    import timm

    kw = {} if image_size is None else {"img_size": image_size}
    model = timm.create_model(name, pretrained=False, num_classes=0, **kw)
    cfg = model.pretrained_cfg
    h, w = model.patch_embed.grid_size
    return _Built(model, model, int(model.patch_embed.img_size[0]), (int(h), int(w)),
                  tuple(cfg.get("mean", OPENAI_MEAN)), tuple(cfg.get("std", OPENAI_STD)))


def _build_open_clip(name: str, image_size: int | None) -> _Built:
    import open_clip

    clip = open_clip.create_model(name, pretrained=None)
    model = clip.visual
    size = model.image_size[0] if isinstance(model.image_size, (tuple, list)) else int(model.image_size)
    h, w = model.grid_size
    return _Built(model, clip, int(size), (int(h), int(w)), OPENAI_MEAN, OPENAI_STD, clip)


BUILDERS: dict[str, Callable[[str, int | None], _Built]] = {"timm": _build_timm, "open_clip": _build_open_clip}
"""Encoder libraries: ``LIB`` of ``"LIB:NAME"`` → a builder with random weights (nothing is downloaded)."""


def check_spec(spec: str) -> tuple[str, str]:
    """``"LIB:NAME"`` → ``(LIB, NAME)`` with ``LIB`` in :data:`BUILDERS` (the name is checked when built)."""
    lib, sep, name = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not (sep and name and lib in BUILDERS):
        raise ArgumentError("spec", spec, f"the encoder must be LIB:NAME with LIB one of {', '.join(BUILDERS)} "
                            f"(e.g. timm:vit_tiny_patch16_224, open_clip:ViT-B-32)")
    return lib, name


def _first_line(e: BaseException) -> str:
    """The first sentence of an error's first line (at most 200 characters), or its type's name."""
    lines = str(e).strip().splitlines()
    return lines[0].split(". ")[0][:200] if lines else type(e).__name__


def check_checkpoint(path: str | Path) -> Path:
    """``path`` as a :class:`Path` if it is a readable file (its contents are checked when loaded)."""
    p = Path(path)
    if not p.exists():
        raise ArgumentError("checkpoint", p, "no such file")
    if not p.is_file():
        raise ArgumentError("checkpoint", p, "not a file (a state_dict in .safetensors or .pt)")
    if not os.access(p, os.R_OK):
        raise ArgumentError("checkpoint", p, "cannot be read (permission denied)")
    return p


def _read_safetensors(path: Path) -> Mapping[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ArgumentError("checkpoint", path, f"not a readable .safetensors file ({literal(_first_line(e))})") from e


def _read_torch(path: Path) -> Mapping[str, Tensor]:
    try:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for a file it cannot read
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ArgumentError("checkpoint", path, f"torch.load cannot read it as a state_dict (.pt / .bin) "
                            f"({type(e).__name__}: {literal(_first_line(e))})") from e
    state = state.get("state_dict", state) if isinstance(state, Mapping) else state
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ArgumentError("checkpoint", path, f"holds a {type(state).__name__}, not a state_dict (name -> tensor)")
    return state


def _load_state(model: torch.nn.Module, path: Path) -> None:
    """Load a ``state_dict`` from ``path`` (``.safetensors``, else ``torch.load``) into ``model``; every failure is an
    :class:`ArgumentError` naming the file."""
    state = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape
        raise ArgumentError("checkpoint", path, f"does not fit the encoder ({literal(_first_line(e))})") from e
    if missing or unexpected:
        raise ArgumentError("checkpoint", path, f"does not fit the encoder: missing {literal(str(list(missing)[:5]))}, "
                            f"unexpected {literal(str(list(unexpected)[:5]))}")


def check_picture(path: str | Path) -> Path:
    """``path`` as a :class:`Path` if PIL can write a picture there: a known image extension, not a folder, its
    folder creatable."""
    from PIL import Image

    p = Path(path)
    ext = p.suffix.lower()
    if p.is_dir():
        raise ArgumentError("picture", p, "is a folder; name a .png file")
    if Image.registered_extensions().get(ext) not in Image.SAVE:
        what = f"unknown picture type {ext!r}" if ext else "no file extension"
        raise ArgumentError("picture", p, f"{literal(what)}; name a .png (or .jpg, .webp) file")
    parent = next(a for a in p.absolute().parents if a.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ArgumentError("picture", p, f"cannot be written: {literal(str(parent))} is not a writable folder")
    return p


def check_method(method: str, *, text: str | None = None) -> Method:
    """The registered ``method`` if :func:`compress_video` can feed it: its context is among :data:`SUPPLIED`, or
    asked for (``text`` → ``frame_scores``); ``text`` only with a method that reads frame scores."""
    try:
        info = vtok.get_method(method)
    except (ValueError, TypeError) as e:
        raise ArgumentError("method", method, f"{literal(str(e))} (see vtok methods)") from None
    needs = set(info.needs) | ({ONE_OF[info.name]} if info.name in ONE_OF else set())
    supplied = SUPPLIED | ({"frame_scores"} if text is not None else set())
    missing = sorted(needs - supplied)
    if missing and set(missing) <= set(ON_REQUEST):
        asks = " and ".join(ON_REQUEST[m] for m in missing)
        what = "; ".join(CONTEXT_KEYS[m].description for m in missing)
        raise ArgumentError("method", method, f"needs context {missing} ({literal(what)}): pass {asks}")
    if missing:
        raise ArgumentError("method", method, f"needs context {missing}, which a video's encoder does not give (it "
                            f"gives {sorted(SUPPLIED)}, and frame_scores with {{text}}TEXT); choose another method "
                            f"(see vtok methods)")
    if text is not None and "frame_scores" not in info.needs | info.uses:
        readers = sorted(m.name for m in vtok.methods() if "frame_scores" in m.needs | m.uses)
        raise ArgumentError("text", text, f"only steers strategies that read frame scores ({', '.join(readers)}); "
                            f"{{method}}{literal(info.name)} would ignore it")
    return info


def check_request(method: str, *, frames: int, path: str | Path | None = None, encoder: FrameEncoder | None = None,
                  backend: str = "auto", text: str | None = None, picture: str | Path | None = None) -> Method:
    """Check every argument of :func:`compress_video` that needs no decoding (``encoder`` None: those that need no
    encoder either); raises :class:`ArgumentError` (``ValueError`` naming the file for a bad ``path``). Returns the
    method."""
    info = check_method(method, text=text)
    if isinstance(frames, bool) or not isinstance(frames, numbers.Integral) or frames < 1:
        raise ArgumentError("frames", frames, "must be an int >= 1 (frames sampled uniformly)")
    if backend not in BACKENDS:
        raise ArgumentError("backend", backend, f"must be one of {', '.join(BACKENDS)}")
    if picture is not None:
        check_picture(picture)
    if encoder is not None and text is not None and encoder.clip is None:
        raise ArgumentError("text", text, f"needs an open_clip encoder (a text tower), not {literal(encoder.spec)}: "
                            f"pass {{spec}}open_clip:NAME")
    if path is not None:
        check_path(path)
    return info


@dataclass
class VideoResult:
    """What :func:`compress_video` did: token counts, seconds per stage, the selection and the frames."""

    video: Video
    method: str
    before: int
    after: int
    grid: tuple[int, int]
    patch: int
    selection: Selection
    tokens: Tensor
    seconds: dict[str, float] = field(default_factory=dict)
    picture: Path | None = None


@dataclass
class EncodedVideo:
    """Decoded and encoded frames: the :class:`Video`, the encoder's outputs (:meth:`FrameEncoder.encode`) and the
    seconds each took; reuse it to compare strategies on one clip."""

    video: Video
    features: dict[str, Any]
    seconds: dict[str, float]


def encode_video(path: str | Path, *, encoder: FrameEncoder, frames: int = 32, backend: str = "auto",
                 batch: int = 8, progress: Callable[[str, int, int], None] | None = None) -> EncodedVideo:
    """Decode ``frames`` frames of ``path`` uniformly at the encoder's input size and encode them."""
    report = progress or (lambda stage, done, total: None)
    sec: dict[str, float] = {}
    t0 = time.perf_counter()
    report("decode", 0, 1)
    try:
        video = load(path, num_frames=frames, size=encoder.image_size, backend=backend)
    except ArgumentError as e:
        raise e.renamed("num_frames", "frames") from None
    sec["decode"] = time.perf_counter() - t0
    report("decode", 1, 1)
    t0 = time.perf_counter()
    done = [0]

    def step(n: int) -> None:
        done[0] += n
        report("encode", done[0], len(video.frames))

    feats = encoder.encode(video.frames, batch=batch, step=step)
    sec["encode"] = time.perf_counter() - t0
    return EncodedVideo(video, feats, sec)


def compress_video(path: str | Path | None, method: str, keep: Keep, *, encoder: FrameEncoder,
                   frames: int = 32, backend: str = "auto", text: str | None = None,
                   picture: str | Path | None = None, options: dict[str, Any] | None = None, batch: int = 8,
                   encoded: EncodedVideo | None = None,
                   progress: Callable[[str, int, int], None] | None = None) -> VideoResult:
    """Decode ``frames`` frames of ``path`` (uniformly), encode them (or take ``encoded``), compress the
    ``[1, T·P, D]`` tokens with ``method`` to ``keep`` and draw ``picture`` (when given). ``progress(stage, done,
    total)`` reports each step. Arguments are checked before decoding (:func:`check_request`, and ``keep`` against
    ``frames × patches per frame``)."""
    if encoded is None and path is None:
        raise ValueError("pass a video path or encoded=encode_video(...)")
    t_in = frames if encoded is None else int(encoded.features["tokens"].shape[0])
    info = check_request(method, frames=t_in, path=path if encoded is None else None, encoder=encoder,
                         backend=backend, text=text, picture=picture)
    resolve_k(keep, t_in * encoder.grid[0] * encoder.grid[1])
    report = progress or (lambda stage, done, total: None)
    if encoded is None:
        encoded = encode_video(path, encoder=encoder, frames=frames, backend=backend, batch=batch, progress=report)
    video, enc = encoded.video, encoded.features
    sec = dict(encoded.seconds)
    t, p, d = enc["tokens"].shape
    tokens = enc["tokens"].reshape(1, t * p, d)
    ctx: dict[str, Any] = {"frames": t, "grid": enc["grid"],
                           "cls_attn": enc["cls_attn"].reshape(1, t * p),
                           "keys": enc["keys"].permute(1, 0, 2, 3).reshape(1, enc["keys"].shape[1], t * p, -1)}
    if text is not None:
        ctx["frame_scores"] = encoder.text_scores(text, enc["embed"])[None]
    options = dict(options or {})
    if info.family != "temporal":  # an image strategy: inside every frame, an even share of the budget
        options = {"strategy": method, "options": options}
        method = "per_frame"
    report("compress", 0, 1)
    t0 = time.perf_counter()
    out, sel = vtok.compress(tokens, method, keep, **ctx, **options)
    sec["compress"] = time.perf_counter() - t0
    report("compress", 1, 1)
    patch = encoder.image_size // enc["grid"][0]
    res = VideoResult(video, info.name, t * p, out.shape[1], enc["grid"], patch, sel, out, sec)
    if picture is not None:
        from vtok.video.draw import draw_strip

        report("draw", 0, 1)
        t0 = time.perf_counter()
        title = f"{info.name}: {t * p} -> {out.shape[1]} tokens (outlined: kept, blue: merged, dark: dropped)"
        if encoder.random_weights:
            title += f"\n{encoder.spec} has random weights: which patches are kept carries no meaning"
        res.picture = draw_strip(video.frames, sel, enc["grid"], Path(picture), title=title)
        sec["draw"] = time.perf_counter() - t0
        report("draw", 1, 1)
    return res
