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
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import vtok
from vtok.selection import Selection
from vtok.video.decode import Video, load

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class FrameEncoder:
    """A timm or open_clip ViT that turns frames into patch tokens (``"timm:NAME"`` / ``"open_clip:NAME"``)."""

    spec: str
    model: torch.nn.Module
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    clip: Any = None  # the whole open_clip model (text tower) when spec is open_clip

    @classmethod
    def load(cls, spec: str, checkpoint: str | Path | None = None, image_size: int | None = None) -> FrameEncoder:
        """Build ``spec`` with random weights (nothing is downloaded) and load ``checkpoint`` (a ``state_dict`` in
        ``.safetensors`` / ``.pt`` / ``.bin``) when given."""
        if not isinstance(spec, str) or ":" not in spec:
            raise ValueError(f"encoder must be 'timm:NAME' or 'open_clip:NAME', got {spec!r}")
        lib, name = spec.split(":", 1)
        clip = None
        if lib == "timm":
            import timm

            kw = {} if image_size is None else {"img_size": image_size}
            try:
                model = timm.create_model(name, pretrained=False, num_classes=0, **kw)
            except RuntimeError as e:
                raise ValueError(f"encoder: timm has no model {name!r} ({e})") from e
            cfg = model.pretrained_cfg
            size = int(model.patch_embed.img_size[0])
            mean, std = tuple(cfg.get("mean", OPENAI_MEAN)), tuple(cfg.get("std", OPENAI_STD))
            target = model
        elif lib == "open_clip":
            import open_clip

            try:
                clip = open_clip.create_model(name, pretrained=None)
            except RuntimeError as e:
                raise ValueError(f"encoder: open_clip has no model {name!r} ({e})") from e
            model = clip.visual
            size = model.image_size[0] if isinstance(model.image_size, (tuple, list)) else int(model.image_size)
            mean, std = OPENAI_MEAN, OPENAI_STD
            target = clip
        else:
            raise ValueError(f"encoder must start with 'timm:' or 'open_clip:', got {spec!r}")
        if checkpoint is not None:
            _load_state(target, Path(checkpoint))
        model.eval()
        return cls(spec, model, int(size), mean, std, clip)

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
            raise ValueError(f"text needs an open_clip encoder (a text tower); {self.spec} has none")
        import open_clip

        name = self.spec.split(":", 1)[1]
        tok = open_clip.get_tokenizer(name)([text])
        t = self.clip.encode_text(tok)
        return torch.nn.functional.cosine_similarity(embed.float(), t.float(), dim=-1)


def _load_state(model: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {str(path)!r} does not fit the encoder: missing {list(missing)[:5]}, "
                         f"unexpected {list(unexpected)[:5]}")


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
    video = load(path, num_frames=frames, size=encoder.image_size, backend=backend)
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


def compress_video(path: str | Path | None, method: str, keep: float | int, *, encoder: FrameEncoder,
                   frames: int = 32, backend: str = "auto", text: str | None = None,
                   picture: str | Path | None = None, options: dict[str, Any] | None = None, batch: int = 8,
                   encoded: EncodedVideo | None = None,
                   progress: Callable[[str, int, int], None] | None = None) -> VideoResult:
    """Decode ``frames`` frames of ``path`` (uniformly), encode them (or take ``encoded``), compress the
    ``[1, T·P, D]`` tokens with ``method`` to ``keep`` and draw ``picture`` (when given). ``progress(stage, done,
    total)`` reports each step."""
    info = vtok.get_method(method)
    report = progress or (lambda stage, done, total: None)
    if encoded is None:
        if path is None:
            raise ValueError("pass a video path or encoded=encode_video(...)")
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
        res.picture = draw_strip(video.frames, sel, enc["grid"], Path(picture),
                                 title=f"{info.name}: {t * p} -> {out.shape[1]} tokens (outlined: kept, blue: merged, "
                                       f"dark: dropped)")
        sec["draw"] = time.perf_counter() - t0
        report("draw", 1, 1)
    return res
