"""The Fashion-MNIST scene questions (vtok.bench.vlm_task): determinism, answers right by construction, chance."""

from __future__ import annotations

import re

import numpy as np
import pytest

from vtok.bench import vlm_task as task
from vtok.bench.fashion_mnist import DEFAULT_DIR

pytestmark = pytest.mark.skipif(not (DEFAULT_DIR / "t10k-images-idx3-ubyte.gz").exists(),
                                reason="Fashion-MNIST not installed (make test installs it)")


def oracle(cells: np.ndarray, question: str) -> str:
    """The answer recomputed from the question's text and the cell grid alone."""
    words = {w: i for i, w in enumerate(task.WORDS)}
    plurals = {w: i for i, w in enumerate(task.PLURALS)}
    if m := re.fullmatch(r"What is in row (\d), column (\d)\?", question):
        k = cells[int(m[1]) - 1, int(m[2]) - 1]
        return task.WORDS[k] if k >= 0 else "nothing"
    if m := re.fullmatch(r"How many (\w+) are there\?", question):
        return str(min(4, int((cells == plurals[m[1]]).sum())))
    if m := re.fullmatch(r"Which (row|column) is the (\w+) in\?", question):
        (r, c), = np.argwhere(cells == words[m[2]])
        return str((r if m[1] == "row" else c) + 1)
    m = re.fullmatch(r"Is there a (\w+) (left of|right of|above|below) the (\w+)\?", question)
    assert m, question
    (ry, cy), = np.argwhere(cells == words[m[3]])
    xs = np.argwhere(cells == words[m[1]])
    test = {"left of": lambda r, c: c < cy, "right of": lambda r, c: c > cy, "above": lambda r, c: r < ry,
            "below": lambda r, c: r > ry}[m[2]]
    return "yes" if any(test(r, c) for r, c in xs) else "no"


def test_scenes_are_deterministic_and_splits_differ():
    a, b = task.make_scene("test", 7, 3), task.make_scene("test", 7, 3)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.cells, b.cells) and a.question == b.question
    c = task.make_scene("train", 7, 3)
    assert np.array_equal(a.cells, c.cells) and not np.array_equal(a.image, c.image)  # same layout, other items
    assert [s.question for s in task.heldout(5, start=10)] == [s.question for s in task.heldout(15)[10:]]


def test_answers_right_by_construction_and_image_matches_cells():
    for s in task.heldout(300):
        assert s.answer == oracle(s.cells, s.question), s.question
        assert s.answer in task.ANSWERS
        n = int((s.cells >= 0).sum())
        assert task.MIN_OBJECTS <= n <= task.MAX_OBJECTS
        blocks = s.image.reshape(task.CELLS, task.CELL, task.CELLS, task.CELL).max(axis=(1, 3))
        assert np.array_equal(blocks > 0, s.cells >= 0)


def test_question_types_balanced_and_chance_level():
    scenes = task.heldout(2000)
    types = {t: sum(s.qtype == t for s in scenes) for t in task.QTYPES}
    assert min(types.values()) > 350, types
    rel = [s.answer for s in scenes if s.qtype == "relation"]
    assert 0.4 < rel.count("yes") / len(rel) < 0.6
    chance = task.chance_levels(scenes)
    assert chance["per_type"] == pytest.approx(0.413, abs=1e-9)  # stated in docs/benchmarks.md
    assert chance["majority"] < chance["per_type"] < 0.5 and chance["uniform"] < 0.3


def test_targets_and_pixels():
    s = task.make_scene("train", 0, 0)
    t = task.cell_targets(s.cells).reshape(8, 8)
    assert t[0, 0] == t[1, 1] == (s.cells[0, 0] if s.cells[0, 0] >= 0 else task.N_CLASSES)
    counts = task.count_targets(s.cells)
    assert counts.shape == (task.N_CLASSES,) and counts.sum() == (s.cells >= 0).sum()  # at most 7 items: no cap hit
    px = task.pixel_values([s.image, s.image])
    assert px.shape == (2, 3, 112, 112) and float(px.min()) == -1.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="split"):
        task.make_scene("val", 0, 0)
    with pytest.raises(ValueError, match="index"):
        task.make_scene("test", 0, -1)
    with pytest.raises(ValueError, match="qtype"):
        task.make_scene("test", 0, 0, qtype="colour")
    with pytest.raises(ValueError, match="scenes"):
        task.chance_levels([])
    with pytest.raises(ValueError, match="image"):
        task.to_rgb(np.zeros((2, 2, 3), np.uint8))
    assert task.exact_match(" Bag.\n", "bag") and not task.exact_match("bags", "bag")
