"""Fashion-MNIST scenes with visual questions: the task the small VLM (``vtok.bench.vlm``) is trained and judged on.

A scene is a 112×112 grey canvas cut into a 4×4 grid of 28-px cells; 3 to 7 cells hold one Fashion-MNIST item each
(downscaled to 24 px, placed at a random offset of 0–4 px inside its cell). With the VLM's 14-px patches every cell
is exactly 2×2 of the 8×8 = 64 visual tokens, so an object lives in ~4 tokens and a pruner that drops them loses it.
Train scenes draw their items from the Fashion-MNIST train split, held-out scenes from the test split. Seven of the
ten classes are used: pullover, coat and shirt are left out (at 24 px they are confused with each other and with
T-shirts even by classifiers trained on them, which would cap any model's accuracy below the yardstick's needs).

Questions (answered in one word, scored by exact match after lower-casing and stripping punctuation):

* ``where``: "What is in row 2, column 3?" → a class word or "nothing" (rows / columns counted from 1 at top / left);
* ``count``: "How many bags are there?" → "0" … "4";
* ``relation``: "Is there a sneaker left of the dress?" (left of / right of / above / below; the reference item
  appears once) → "yes" / "no";
* ``locate``: "Which row is the dress in?" / "Which column is the dress in?" (item appears once) → "1" … "4".

Every scene is a pure function of ``(split, seed, index)`` (NumPy ``default_rng([seed, index])``), so the held-out
set is fixed and any training step's batch can be rebuilt after a restart.
"""

from __future__ import annotations

import string
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

CANVAS, CELLS, CELL, ITEM = 112, 4, 28, 24
PATCH = 14
CLASS_IDS = (0, 1, 3, 5, 7, 8, 9)  # Fashion-MNIST labels used (pullover 2, coat 4, shirt 6 left out)
WORDS = ("top", "trousers", "dress", "sandal", "sneaker", "bag", "boot")  # answer word of each used class
PLURALS = ("tops", "trousers", "dresses", "sandals", "sneakers", "bags", "boots")
NOTHING = "nothing"
N_CLASSES = len(CLASS_IDS)
MIN_OBJECTS, MAX_OBJECTS = 3, 7
QTYPES = ("where", "count", "relation", "locate")
RELATIONS = ("left of", "right of", "above", "below")
ANSWERS = WORDS + (NOTHING, "0", "1", "2", "3", "4", "yes", "no")
HELDOUT_SEED = 20260
TRAIN_SEED = 0


@dataclass
class Scene:
    """One scene: ``image`` uint8 ``[112, 112]``; ``cells`` int64 ``[4, 4]`` (class index 0–6 into ``WORDS``, −1 empty);
    one question with its answer and type."""

    image: np.ndarray
    cells: np.ndarray
    question: str
    answer: str
    qtype: str
    meta: dict = field(default_factory=dict)


@lru_cache(maxsize=2)
def _items(split: str) -> tuple[list[np.ndarray], ...]:
    """Per used class, the split's images downscaled to ``ITEM`` px: a list of 7 uint8 arrays ``[n_c, 24, 24]``."""
    from vtok.bench.fashion_mnist import load_fashion_mnist

    images, labels = load_fashion_mnist(split)
    small = torch.nn.functional.interpolate(images[:, None].float(), size=(ITEM, ITEM), mode="area")
    small = small[:, 0].round().clamp_(0, 255).to(torch.uint8).numpy()
    lab = labels.numpy()
    return tuple(np.ascontiguousarray(small[lab == c]) for c in CLASS_IDS)


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def render(cells: np.ndarray, split: str, rng: np.random.Generator) -> np.ndarray:
    """Draw the items of ``cells [4, 4]`` (class index or −1) on a black canvas: uint8 ``[112, 112]``."""
    items = _items(split)
    canvas = np.zeros((CANVAS, CANVAS), dtype=np.uint8)
    for r in range(CELLS):
        for c in range(CELLS):
            k = int(cells[r, c])
            if k < 0:
                continue
            img = items[k][rng.integers(len(items[k]))]
            dy, dx = rng.integers(0, CELL - ITEM + 1, size=2)
            y, x = r * CELL + int(dy), c * CELL + int(dx)
            canvas[y:y + ITEM, x:x + ITEM] = img
    return canvas


def _positions(cells: np.ndarray, k: int) -> list[tuple[int, int]]:
    return [(int(r), int(c)) for r, c in zip(*np.nonzero(cells == k), strict=True)]


def relation_holds(cells: np.ndarray, x: int, rel: str, y: int) -> bool:
    """Whether some item of class ``x`` is ``rel`` (one of ``RELATIONS``) of the (single) item of class ``y``."""
    if rel not in RELATIONS:
        raise ValueError(f"rel must be one of {RELATIONS}, got {rel!r}")
    ys = _positions(cells, y)
    if len(ys) != 1:
        raise ValueError(f"class {WORDS[y]!r} must appear exactly once, appears {len(ys)} times")
    ry, cy = ys[0]
    for rx, cx in _positions(cells, x):
        if ((rel == "left of" and cx < cy) or (rel == "right of" and cx > cy) or (rel == "above" and rx < ry)
                or (rel == "below" and rx > ry)):
            return True
    return False


def ask(cells: np.ndarray, rng: np.random.Generator, qtype: str | None = None) -> tuple[str, str, str]:
    """A question about the scene ``cells`` and its answer: ``(question, answer, qtype)``."""
    if qtype is None:
        qtype = QTYPES[int(rng.integers(len(QTYPES)))]
    if qtype not in QTYPES:
        raise ValueError(f"qtype must be one of {QTYPES}, got {qtype!r}")
    counts = np.bincount(cells[cells >= 0], minlength=N_CLASSES)
    singles = [k for k in range(N_CLASSES) if counts[k] == 1]
    if qtype in ("relation", "locate") and not singles:
        qtype = "where"
    if qtype == "where":
        occupied = np.argwhere(cells >= 0)
        if rng.random() < 0.75:
            r, c = occupied[rng.integers(len(occupied))]
        else:
            empty = np.argwhere(cells < 0)
            r, c = empty[rng.integers(len(empty))]
        k = int(cells[r, c])
        return f"What is in row {r + 1}, column {c + 1}?", (WORDS[k] if k >= 0 else NOTHING), qtype
    if qtype == "count":
        present = np.nonzero(counts)[0]
        k = int(present[rng.integers(len(present))]) if rng.random() < 0.7 else int(rng.integers(N_CLASSES))
        return f"How many {PLURALS[k]} are there?", str(min(int(counts[k]), 4)), qtype
    y = int(singles[rng.integers(len(singles))])
    if qtype == "locate":
        (r, c), = _positions(cells, y)
        if rng.random() < 0.5:
            return f"Which row is the {WORDS[y]} in?", str(r + 1), qtype
        return f"Which column is the {WORDS[y]} in?", str(c + 1), qtype
    others = [k for k in range(N_CLASSES) if k != y]
    want = rng.random() < 0.5  # balance yes / no where the scene allows it
    rels = [RELATIONS[int(i)] for i in rng.permutation(len(RELATIONS))]
    for rel in rels:
        pool = [k for k in others if relation_holds(cells, k, rel, y) == want]
        if pool:
            break
    else:
        rel, pool = rels[0], others
    x = int(pool[rng.integers(len(pool))])
    answer = "yes" if relation_holds(cells, x, rel, y) else "no"
    return f"Is there a {WORDS[x]} {rel} the {WORDS[y]}?", answer, qtype


def make_scene(split: str, seed: int, index: int, qtype: str | None = None) -> Scene:
    """Scene ``index`` of the stream ``(split, seed)``; deterministic."""
    _check_split(split)
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = np.random.default_rng([int(seed), int(index)])
    n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    cells = np.full(CELLS * CELLS, -1, dtype=np.int64)
    cells[rng.choice(CELLS * CELLS, size=n, replace=False)] = rng.integers(0, N_CLASSES, size=n)
    cells = cells.reshape(CELLS, CELLS)
    image = render(cells, split, rng)
    question, answer, qt = ask(cells, rng, qtype)
    return Scene(image=image, cells=cells, question=question, answer=answer, qtype=qt, meta={"n_objects": n})


def heldout(n: int = 2000, start: int = 0) -> list[Scene]:
    """The fixed held-out set (test-split items, seed ``HELDOUT_SEED``): scenes ``start … start + n − 1``."""
    if n < 0 or start < 0:
        raise ValueError(f"n and start must be >= 0, got n={n}, start={start}")
    return [make_scene("test", HELDOUT_SEED, i) for i in range(start, start + n)]


def normalize_answer(text: str) -> str:
    """First word of ``text``, lower-cased, punctuation stripped (the exact-match key)."""
    words = text.strip().lower().split()
    return words[0].strip(string.punctuation) if words else ""


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def chance_levels(scenes: list[Scene]) -> dict[str, float]:
    """Blind baselines on ``scenes``: ``majority`` (most frequent answer overall), ``per_type`` (the most frequent
    answer of each question type, i.e. a model that reads the question but not the image) and ``uniform`` (a
    uniform guess among the answers valid for the question type)."""
    if not scenes:
        raise ValueError("scenes must not be empty")
    n = len(scenes)
    overall = Counter(s.answer for s in scenes).most_common(1)[0][1] / n
    by_type: dict[str, Counter] = {}
    for s in scenes:
        by_type.setdefault(s.qtype, Counter())[s.answer] += 1
    per_type = sum(c.most_common(1)[0][1] for c in by_type.values()) / n
    valid = {"where": N_CLASSES + 1, "count": 5, "relation": 2, "locate": 4}
    uniform = sum(1.0 / valid[s.qtype] for s in scenes) / n
    return {"majority": overall, "per_type": per_type, "uniform": uniform}


def cell_targets(cells: np.ndarray) -> np.ndarray:
    """Per visual token (8×8 raster order) the class of its cell, ``N_CLASSES`` for empty: int64 ``[64]``."""
    side = CANVAS // PATCH
    per = side // CELLS
    t = np.where(cells < 0, N_CLASSES, cells).repeat(per, 0).repeat(per, 1)
    return t.reshape(side * side)


def count_targets(cells: np.ndarray) -> np.ndarray:
    """Per class, the number of items (capped at 4): int64 ``[7]``."""
    return np.minimum(np.bincount(cells[cells >= 0], minlength=N_CLASSES), 4)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W]`` → uint8 ``[H, W, 3]`` (the processor's input)."""
    if image.ndim != 2:
        raise ValueError(f"image must be [H, W], got shape {image.shape}")
    return np.repeat(image[:, :, None], 3, axis=2)


def pixel_values(images: list[np.ndarray] | np.ndarray, mean: float = 0.5, std: float = 0.5) -> Tensor:
    """uint8 scenes ``[n, 112, 112]`` → float ``[n, 3, 112, 112]`` as the saved processor makes them (to ~1e-7)."""
    x = torch.from_numpy(np.stack(list(images))).float().mul_(1.0 / 255.0)
    x = (x - mean) / std
    return x[:, None].expand(-1, 3, -1, -1).contiguous()
